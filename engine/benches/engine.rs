//! `cargo bench -p dmsim-engine --bench engine`: the model's pool as the
//! engine runs it natively — metadata on an io_uring device, data I/O on a
//! [`DataRing`] — beside raw io_uring I/O on the same data file.
//!
//! Three workloads, each at queue depth 1 (a request, then the pool
//! settles) and 32 (32 requests in flight, then it settles): provisioning
//! writes (whole blocks into unmapped space: an allocation and a mapping
//! each), reads of mapped blocks, and break-sharing writes (a partial
//! write to a block a snapshot shares: a new block, a copy, a remap). The
//! baseline is the same number of block-sized writes or reads straight to
//! the data file through a `DataRing` at the same depth: the physical
//! limit the engine's data path is held against. Each line prints CPU
//! seconds (the process's user and system time, `getrusage`, io_uring's
//! workers included) and wall seconds, and the ratio of the engine's CPU
//! to the baseline's, measured in the same run. Nothing asserts on speed:
//! the numbers are for people comparing builds on one machine.
//!
//! `DMSIM_BENCH_BLOCKS=N` changes the blocks each workload touches
//! (default 512; a block is 64 KiB). The files go to Cargo's target
//! folder and are removed at the end.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dmsim_engine::{settle, DataRing, UringDevice};
use dmsim_model::block_device::SECTOR_SIZE;
use dmsim_model::thin::pool::{BioRequest, DataRequest, IoId, Pool, PoolOptions};
use dmsim_model::thin::table::{PoolFeatures, PoolTable};

const BLOCK: u64 = 128;

/// CPU time of the whole process (every thread, io_uring's workers too).
fn cpu_now() -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    assert_eq!(r, 0, "getrusage");
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// CPU and wall time of `f`.
fn measure(f: impl FnOnce()) -> (Duration, Duration) {
    let (cpu, wall) = (cpu_now(), Instant::now());
    f();
    (cpu_now() - cpu, wall.elapsed())
}

/// Files removed on drop.
struct Files(Vec<PathBuf>);

impl Drop for Files {
    fn drop(&mut self) {
        for f in &self.0 {
            let _ = std::fs::remove_file(f);
        }
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let _ = std::fs::create_dir_all(&dir);
    dir.join(format!("bench-{}-{name}", std::process::id()))
}

type EnginePool = Pool<UringDevice, UringDevice>;

/// A fresh pool of `blocks` data blocks on `meta` and `data`, with a
/// ring of `depth` on the data file.
fn engine(meta: &Path, data: &Path, blocks: u64, depth: u32) -> (EnginePool, DataRing) {
    let metadata = UringDevice::create(meta, 16384).expect("metadata file");
    let data_dev = UringDevice::create(data, blocks * BLOCK).expect("data file");
    let ring = DataRing::open(data, depth).expect("ring");
    let table = PoolTable {
        metadata_dev: "meta".into(),
        data_dev: "data".into(),
        data_block_size: BLOCK as u32,
        low_water_mark: 0,
        features: PoolFeatures::default(),
    };
    let pool = Pool::create(table, blocks * BLOCK, metadata, data_dev, PoolOptions::default()).expect("pool");
    (pool, ring)
}

/// Submits `reqs` to thin device `thin` `depth` at a time, the pool
/// settling after each group; every request must succeed.
fn run(pool: &EnginePool, ring: &mut DataRing, thin: u64, reqs: Vec<BioRequest>, depth: usize) {
    let mut submitted = BTreeSet::new();
    for group in reqs.chunks(depth) {
        for r in group {
            pool.submit(thin, r.clone()).expect("submit");
        }
        settle(pool, ring, &mut submitted).expect("settled");
        for c in pool.take_completions() {
            assert_eq!(c.result, Ok(()), "request {:?}", c.id);
        }
    }
}

/// The same number of block-sized transfers straight to a file of the
/// same size beside the data file, `depth` in flight at a time.
fn raw(ring: &mut DataRing, blocks: u64, depth: usize, write: bool) {
    let data = vec![0x5au8; (BLOCK * SECTOR_SIZE) as usize];
    let mut next = 0u64;
    for group in (0..blocks).collect::<Vec<_>>().chunks(depth) {
        for &b in group {
            let req = if write {
                DataRequest::Write { sector: b * BLOCK, data: data.clone(), fua: false }
            } else {
                DataRequest::Read { sector: b * BLOCK, nr_sectors: BLOCK }
            };
            ring.submit(IoId(next), req).expect("submit");
            next += 1;
        }
        let mut left = group.len();
        while left > 0 {
            let done = ring.reap(1).expect("reap");
            assert!(done.iter().all(|c| c.result.is_ok()));
            left -= done.len();
        }
    }
}

fn main() {
    let blocks: u64 = std::env::var("DMSIM_BENCH_BLOCKS").ok().and_then(|v| v.parse().ok()).unwrap_or(512);
    let whole = |b: u64, seed: u8| BioRequest::write(b * BLOCK, vec![seed; (BLOCK * SECTOR_SIZE) as usize]);
    println!("engine bench: {blocks} blocks of 64 KiB per workload; CPU s (process: user + system) / wall s");
    println!(
        "{:<34} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "workload", "engine", "wall", "raw", "wall", "cpu ratio"
    );
    for depth in [1usize, 32] {
        let (meta, data) = (scratch(&format!("meta-{depth}")), scratch(&format!("data-{depth}")));
        let raw_file = scratch(&format!("raw-{depth}"));
        let _files = Files(vec![meta.clone(), data.clone(), raw_file.clone()]);
        drop(UringDevice::create(&raw_file, blocks * BLOCK).expect("raw file"));
        let mut raw_ring = DataRing::open(&raw_file, depth as u32).expect("raw ring");
        // The pool needs room for the workloads' blocks twice (a
        // snapshot's broken sharing) plus slack.
        let (pool, mut ring) = engine(&meta, &data, 2 * blocks + 64, depth as u32);
        pool.message("create_thin 0").expect("create");
        pool.activate_thin(0, blocks * BLOCK).expect("activate");
        let mut lines = Vec::new();
        let provision =
            measure(|| run(&pool, &mut ring, 0, (0..blocks).map(|b| whole(b, 1)).collect(), depth));
        let raw_write = measure(|| raw(&mut raw_ring, blocks, depth, true));
        lines.push(("provisioning writes", provision, raw_write));
        let read = measure(|| {
            run(&pool, &mut ring, 0, (0..blocks).map(|b| BioRequest::read(b * BLOCK, BLOCK)).collect(), depth)
        });
        let raw_read = measure(|| raw(&mut raw_ring, blocks, depth, false));
        lines.push(("reads of mapped blocks", read, raw_read));
        pool.message("create_snap 1 0").expect("snapshot");
        let partial = |b: u64| BioRequest::write(b * BLOCK + 8, vec![2u8; (8 * SECTOR_SIZE) as usize]);
        let share = measure(|| run(&pool, &mut ring, 0, (0..blocks).map(partial).collect(), depth));
        let raw_copy = measure(|| raw(&mut raw_ring, blocks, depth, true));
        lines.push(("break-sharing writes", share, raw_copy));
        for (name, (cpu, wall), (raw_cpu, raw_wall)) in lines {
            println!(
                "{:<34} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>10.2}",
                format!("{name}, depth {depth}"),
                cpu.as_secs_f64(),
                wall.as_secs_f64(),
                raw_cpu.as_secs_f64(),
                raw_wall.as_secs_f64(),
                cpu.as_secs_f64() / raw_cpu.as_secs_f64().max(1e-9)
            );
        }
        println!("  ring: {:?}", ring.stats());
    }
}
