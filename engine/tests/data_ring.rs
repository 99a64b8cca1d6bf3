//! The pool's data I/O on io_uring ([`DataRing`], [`settle`]), natively on
//! the host: each request does what it asks to the file; and the model's
//! pool with its metadata on an io_uring device and its data I/O on the
//! ring — many requests in flight together, ended in the ring's order —
//! reads back every block as the same pool on memory devices does (data
//! I/O ended oldest first) and maps the same blocks. A deliberately broken
//! engine (it skips the zeroing of new blocks) is caught by that
//! comparison.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use dmsim_engine::{settle, DataRing, UringDevice};
use dmsim_model::block_device::{BlockDevice, MemDevice, SECTOR_SIZE};
use dmsim_model::errno::Errno;
use dmsim_model::thin::dump::read_devices;
use dmsim_model::thin::pool::{BioRequest, DataRequest, IoId, Pool, PoolOptions};
use dmsim_model::thin::table::{PoolFeatures, PoolTable};

/// A file under Cargo's scratch folder for integration tests, removed on
/// drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let path =
            PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("ring-{}-{name}", std::process::id()));
        Scratch(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A pattern that differs in every sector and every byte position.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed).wrapping_add((i / 512) as u8)).collect()
}

fn sectors(file: &Path, sector: u64, nr: u64) -> Vec<u8> {
    let bytes = std::fs::read(file).expect("read the file");
    bytes[(sector * SECTOR_SIZE) as usize..((sector + nr) * SECTOR_SIZE) as usize].to_vec()
}

/// A completion as the tests compare it: id, result, bytes read.
type Done = (u64, Result<(), Errno>, Option<Vec<u8>>);

/// Reaps until `n` I/Os completed; returns them by id.
fn reap_all(ring: &mut DataRing, n: usize) -> Vec<Done> {
    let mut out = Vec::new();
    while out.len() < n {
        out.extend(ring.reap(1).expect("reap").into_iter().map(|c| (c.id.0, c.result, c.read)));
    }
    out.sort_by_key(|c| c.0);
    out
}

#[test]
fn each_data_request_does_what_it_asks_to_the_file() {
    let f = Scratch::new("requests");
    drop(UringDevice::create(&f.0, 256).expect("a file"));
    let mut ring = DataRing::open(&f.0, 8).expect("a ring");
    let a = pattern(1, 8 * 512);
    let b = pattern(2, 8 * 512);
    ring.submit(IoId(1), DataRequest::Write { sector: 0, data: a.clone(), fua: false }).expect("submit");
    ring.submit(IoId(2), DataRequest::Write { sector: 16, data: b.clone(), fua: true }).expect("submit");
    ring.submit(IoId(3), DataRequest::Write { sector: 40, data: b.clone(), fua: false }).expect("submit");
    ring.submit(IoId(4), DataRequest::Nothing).expect("submit");
    let done = reap_all(&mut ring, 4);
    assert!(done.iter().all(|c| c.1.is_ok()), "{done:?}");
    assert_eq!(ring.in_flight(), 0);
    assert_eq!(sectors(&f.0, 0, 8), a);
    assert_eq!(sectors(&f.0, 16, 8), b);

    ring.submit(IoId(5), DataRequest::Copy { from: 0, to: 32, nr_sectors: 8 }).expect("submit");
    ring.submit(IoId(6), DataRequest::Zero { sector: 16, nr_sectors: 4 }).expect("submit");
    ring.submit(IoId(7), DataRequest::Discard { ranges: vec![(40, 44), (46, 48)] }).expect("submit");
    ring.submit(IoId(8), DataRequest::Flush).expect("submit");
    let done = reap_all(&mut ring, 4);
    assert!(done.iter().all(|c| c.1.is_ok()), "{done:?}");
    assert_eq!(sectors(&f.0, 32, 8), a, "the copy");
    assert!(sectors(&f.0, 16, 4).iter().all(|&x| x == 0), "the zeroing");
    assert_eq!(sectors(&f.0, 20, 4), b[4 * 512..], "past the zeroing");
    let after = sectors(&f.0, 40, 8);
    assert!(after[..4 * 512].iter().all(|&x| x == 0), "the first discarded range reads zeroes");
    assert_eq!(after[4 * 512..6 * 512], b[4 * 512..6 * 512], "between the ranges");
    assert!(after[6 * 512..].iter().all(|&x| x == 0), "the second range");

    ring.submit(IoId(9), DataRequest::Read { sector: 32, nr_sectors: 8 }).expect("submit");
    ring.submit(IoId(10), DataRequest::Read { sector: 250, nr_sectors: 8 }).expect("past the end");
    ring.submit(IoId(11), DataRequest::Copy { from: 0, to: 255, nr_sectors: 2 }).expect("past the end");
    let done = reap_all(&mut ring, 3);
    assert_eq!(done[0], (9, Ok(()), Some(a)));
    assert_eq!(done[1], (10, Err(Errno::EIO), None), "a read past the end fails");
    assert_eq!(done[2], (11, Err(Errno::EIO), None), "a copy past the end fails");
    assert!(ring.submit(IoId(12), DataRequest::Flush).is_ok());
    assert!(ring.submit(IoId(12), DataRequest::Flush).is_err(), "an id already in flight is refused");
    reap_all(&mut ring, 1);
}

#[test]
fn opening_what_cannot_be_a_data_device_is_a_clear_error() {
    let missing = Scratch::new("missing");
    let e = DataRing::open(&missing.0, 8).expect_err("missing");
    assert!(e.to_string().contains("ring-"), "{e}");
    let odd = Scratch::new("odd");
    std::fs::write(&odd.0, [0u8; 700]).expect("write");
    let e = DataRing::open(&odd.0, 8).expect_err("not whole sectors");
    assert!(e.to_string().contains("700 bytes"), "{e}");
}

const BLOCK: u64 = 128;
const DATA_BLOCKS: u64 = 64;
const THIN_BLOCKS: u64 = 32;

/// A deterministic stream of numbers (a linear congruential generator: the
/// test needs no more).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// One side of the comparison: a pool and how its data I/O ends.
trait Side {
    fn pool(&self) -> &dyn PoolOps;
    fn settle(&mut self);
}

/// What the test asks of a pool, whatever its devices.
trait PoolOps {
    fn message(&self, text: &str);
    fn activate(&self, id: u64);
    fn submit(&self, thin: u64, req: BioRequest);
    fn completions(&self) -> Vec<(Result<(), Errno>, Vec<u8>)>;
    fn commit(&self);
}

impl<M: BlockDevice, D: BlockDevice> PoolOps for Pool<M, D> {
    fn message(&self, text: &str) {
        Pool::message(self, text).expect(text);
    }
    fn activate(&self, id: u64) {
        self.activate_thin(id, THIN_BLOCKS * BLOCK).expect("activate");
    }
    fn submit(&self, thin: u64, req: BioRequest) {
        Pool::submit(self, thin, req).expect("submit");
    }
    fn completions(&self) -> Vec<(Result<(), Errno>, Vec<u8>)> {
        self.take_completions().into_iter().map(|c| (c.result, c.data)).collect()
    }
    fn commit(&self) {
        let status = self.status(false);
        assert!(status.contains(" rw "), "{status}");
    }
}

fn table() -> PoolTable {
    PoolTable {
        metadata_dev: "meta".into(),
        data_dev: "data".into(),
        data_block_size: BLOCK as u32,
        low_water_mark: 2,
        features: PoolFeatures::default(),
    }
}

/// What the data device holds before the pool: garbage, so that a block
/// provisioned without its zeroing shows it.
fn garbage() -> Vec<u8> {
    vec![0xa5; (DATA_BLOCKS * BLOCK * SECTOR_SIZE) as usize]
}

/// The pool on memory devices, its data I/O ended oldest first.
struct Memory(Pool<MemDevice, MemDevice>);

impl Side for Memory {
    fn pool(&self) -> &dyn PoolOps {
        &self.0
    }
    fn settle(&mut self) {
        loop {
            if self.0.worker_wanted() {
                self.0.run_worker();
                continue;
            }
            match self.0.in_flight_io().first() {
                Some(io) => self.0.complete_io(io.id).expect("complete"),
                None => return,
            }
        }
    }
}

/// The engine: the metadata on an io_uring device, the data I/O on a
/// ring, ended in the ring's order. With `skip_zeroing` it is broken on
/// purpose: it ends a zeroing without doing it.
struct Engine {
    pool: Pool<UringDevice, UringDevice>,
    ring: DataRing,
    submitted: BTreeSet<IoId>,
    skip_zeroing: bool,
    _files: (Scratch, Scratch),
}

impl Engine {
    fn new(name: &str, skip_zeroing: bool) -> Engine {
        let (m, d) = (Scratch::new(&format!("{name}-meta")), Scratch::new(&format!("{name}-data")));
        let metadata = UringDevice::create(&m.0, 4096).expect("metadata file");
        std::fs::write(&d.0, garbage()).expect("data file");
        let data = UringDevice::open(&d.0).expect("data file");
        let ring = DataRing::open(&d.0, 32).expect("ring");
        let pool =
            Pool::create(table(), DATA_BLOCKS * BLOCK, metadata, data, PoolOptions::default()).expect("pool");
        Engine { pool, ring, submitted: BTreeSet::new(), skip_zeroing, _files: (m, d) }
    }

    fn metadata_image(&self) -> Vec<u8> {
        std::fs::read(&self._files.0 .0).expect("metadata file")
    }
}

impl Side for Engine {
    fn pool(&self) -> &dyn PoolOps {
        &self.pool
    }
    fn settle(&mut self) {
        if !self.skip_zeroing {
            settle(&self.pool, &mut self.ring, &mut self.submitted).expect("settled");
            return;
        }
        // The broken engine: settle's loop, a zeroing ended at once.
        loop {
            if self.pool.worker_wanted() {
                self.pool.run_worker();
                continue;
            }
            for io in self.pool.in_flight_io() {
                if self.submitted.insert(io.id) {
                    match self.pool.data_request(io.id).expect("in flight") {
                        DataRequest::Zero { .. } => self.ring.submit(io.id, DataRequest::Nothing),
                        request => self.ring.submit(io.id, request),
                    }
                    .expect("submit");
                }
            }
            if self.ring.in_flight() == 0 {
                return;
            }
            for c in self.ring.reap(1).expect("reap") {
                self.submitted.remove(&c.id);
                self.pool.end_io(c.id, c.result, c.read.as_deref()).expect("end");
            }
        }
    }
}

/// The workload, the same on every side: two thin devices (the second a
/// snapshot of the first, taken a third of the way in), batches of
/// partial-block writes (new blocks are zeroed first), whole-block
/// overwrites, writes to shared blocks (copies) and discards, each batch
/// of requests to distinct blocks in flight together, with a flush now
/// and then; then every block of both devices read back. Returns what the
/// reads returned.
fn workload(side: &mut dyn Side) -> Vec<Vec<u8>> {
    let mut rng = Lcg(7);
    side.pool().message("create_thin 0");
    side.pool().activate(0);
    let mut devices = vec![0u64];
    let mut stamp = 0u8;
    for batch in 0..12 {
        if batch == 4 {
            side.pool().message("create_snap 1 0");
            side.pool().activate(1);
            devices.push(1);
        }
        let mut used = BTreeSet::new();
        for _ in 0..8 {
            let dev = devices[rng.below(devices.len() as u64) as usize];
            let block = rng.below(THIN_BLOCKS);
            if !used.insert((dev, block)) {
                continue;
            }
            let base = block * BLOCK;
            let req = match rng.below(6) {
                0 => BioRequest::discard(base, BLOCK),
                1 => {
                    stamp = stamp.wrapping_add(1);
                    BioRequest::write(base, pattern(stamp, (BLOCK * SECTOR_SIZE) as usize))
                }
                _ => {
                    let offset = rng.below(BLOCK - 1);
                    let nr = 1 + rng.below(BLOCK - offset);
                    stamp = stamp.wrapping_add(1);
                    BioRequest::write(base + offset, pattern(stamp, (nr * SECTOR_SIZE) as usize))
                }
            };
            side.pool().submit(dev, req);
        }
        if batch % 3 == 2 {
            side.pool().submit(0, BioRequest::flush());
        }
        side.settle();
        for (result, _) in side.pool().completions() {
            assert_eq!(result, Ok(()), "batch {batch}");
        }
    }
    let mut reads = Vec::new();
    for &dev in &devices {
        for block in 0..THIN_BLOCKS {
            side.pool().submit(dev, BioRequest::read(block * BLOCK, BLOCK));
            side.settle();
            let done = side.pool().completions();
            assert_eq!(done.len(), 1);
            assert_eq!(done[0].0, Ok(()), "read of dev {dev} block {block}");
            reads.push(done[0].1.clone());
        }
    }
    side.pool().commit();
    reads
}

fn memory_pool() -> Memory {
    let metadata = MemDevice::new(4096);
    let data = MemDevice::from_bytes(garbage());
    Memory(Pool::create(table(), DATA_BLOCKS * BLOCK, metadata, data, PoolOptions::default()).expect("pool"))
}

#[test]
fn the_pool_on_the_ring_reads_and_maps_as_the_pool_in_memory() {
    let mut memory = memory_pool();
    let expected = workload(&mut memory);
    let mut engine = Engine::new("honest", false);
    let got = workload(&mut engine);
    let differing: Vec<usize> = (0..expected.len()).filter(|&i| expected[i] != got[i]).collect();
    assert!(differing.is_empty(), "blocks read differently (device-major index): {differing:?}");
    // The same blocks mapped (the same thin_dump: each device's mappings
    // and their data blocks).
    let mem_image =
        memory.0.with_metadata(|md| md.transaction_manager().block_manager().device().as_bytes().to_vec());
    let mem = read_devices(&mut MemDevice::from_bytes(mem_image)).expect("memory metadata");
    let ring = read_devices(&mut MemDevice::from_bytes(engine.metadata_image())).expect("engine metadata");
    assert_eq!(mem, ring);
    assert_eq!(mem.len(), 2);
    assert!(mem.values().all(|d| !d.mappings.is_empty()));
    // Not vacuous: every kind of data I/O went through the ring, many at
    // once. (A thin device's FLUSH is the pool's commit, which flushes the
    // data file itself; whether any I/O overtook an earlier one is the
    // host's to decide, so it is shown, not asserted.)
    let stats = engine.ring.stats();
    assert!(stats.reads > 0 && stats.writes > 0 && stats.zeroes > 0, "{stats:?}");
    assert!(stats.copies > 0 && stats.discards > 0, "{stats:?}");
    assert!(stats.most_in_flight > 1, "{stats:?}");
    eprintln!("ring: {stats:?}");
}

#[test]
fn an_engine_that_skips_zeroing_reads_otherwise() {
    let expected = workload(&mut memory_pool());
    let got = workload(&mut Engine::new("broken", true));
    let differing = (0..expected.len()).filter(|&i| expected[i] != got[i]).count();
    assert!(differing > 0, "the comparison must catch a block provisioned without its zeroing");
    assert!(got.iter().any(|b| b.contains(&0xa5)), "the garbage under an unzeroed block shows");
}

/// The pool's side of the engine's path: a data I/O in flight says what
/// it asks ([`Pool::data_request`]); ended by the caller
/// ([`Pool::end_io`]) it runs the same end-io path; a read ended without
/// its bytes, or with another length, is refused and stays in flight; an
/// id not in flight is refused.
#[test]
fn the_pool_hands_out_its_data_io_and_takes_it_back() {
    let pool = memory_pool().0;
    pool.message("create_thin 0").expect("create");
    pool.activate_thin(0, THIN_BLOCKS * BLOCK).expect("activate");
    pool.submit(0, BioRequest::write(0, pattern(1, (BLOCK * SECTOR_SIZE) as usize))).expect("submit");
    while pool.worker_wanted() {
        pool.run_worker();
    }
    let io = pool.in_flight_io()[0];
    let Some(DataRequest::Write { sector, data, fua: false }) = pool.data_request(io.id) else {
        panic!("a whole-block write: {:?}", pool.data_request(io.id));
    };
    assert_eq!(data, pattern(1, (BLOCK * SECTOR_SIZE) as usize));
    pool.end_io(io.id, Ok(()), None).expect("ended");
    assert!(pool.data_request(io.id).is_none(), "no longer in flight");
    assert!(pool.end_io(io.id, Ok(()), None).is_err(), "not in flight any more");
    while pool.worker_wanted() {
        pool.run_worker();
    }
    assert_eq!(pool.take_completions().len(), 1);

    pool.submit(0, BioRequest::read(0, 8)).expect("submit");
    while pool.worker_wanted() {
        pool.run_worker();
    }
    let io = pool.in_flight_io()[0];
    assert_eq!(pool.data_request(io.id), Some(DataRequest::Read { sector, nr_sectors: 8 }));
    assert!(pool.end_io(io.id, Ok(()), None).is_err(), "a read that succeeded needs its bytes");
    assert!(pool.end_io(io.id, Ok(()), Some(&[0u8; 512])).is_err(), "and all of them");
    assert!(pool.data_request(io.id).is_some(), "a refused end leaves it in flight");
    pool.end_io(io.id, Ok(()), Some(&pattern(9, 8 * 512))).expect("ended");
    let done = pool.take_completions();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].data, pattern(9, 8 * 512), "the request reads what the caller's device returned");
    pool.submit(0, BioRequest::read(0, 8)).expect("submit");
    while pool.worker_wanted() {
        pool.run_worker();
    }
    let io = pool.in_flight_io()[0];
    pool.end_io(io.id, Err(Errno::EIO), None).expect("ended with an error");
    assert_eq!(pool.take_completions()[0].result, Err(Errno::EIO));
}
