//! The cache target's I/O paths (`model::cache::core`) against a plain
//! reference: a byte array that every completed write lands in. Requests
//! run one at a time to completion (each data I/O completed in a chosen
//! order, the worker run until idle), so every read must return exactly
//! what the reference holds — through promotions, demotions, writebacks,
//! overwrites, mode switches and invalidations — and the devices must agree
//! with the metadata after every clean shutdown.

use dmsim_model::block_device::{MemDevice, SECTOR_SIZE};
use dmsim_model::cache::core::{BioRequest, Cache, CacheDisk, CacheIoInfo, CacheIoKind, CacheOptions};
use dmsim_model::errno::Errno;
use dmsim_model::mutation::Mutations;
use proptest::prelude::*;

const BS: u64 = 64;
const CACHE_BLOCKS: u64 = 4;
const ORIGIN_BLOCKS: u64 = 24;
const SECTORS: u64 = BS * ORIGIN_BLOCKS;

type MemCache = Cache<MemDevice, MemDevice, MemDevice>;

fn line(mode: &str, policy: &str) -> String {
    format!("/dev/m /dev/c /dev/o {BS} 2 {mode} metadata2 {policy} 2 migration_threshold 1000000")
}

fn new_cache(mode: &str, opts: CacheOptions) -> MemCache {
    let cache = MemDevice::from_bytes(vec![0xc5; (CACHE_BLOCKS * BS * SECTOR_SIZE) as usize]);
    Cache::create(&line(mode, "smq"), MemDevice::new(2048), cache, MemDevice::new(SECTORS), 0, opts)
        .expect("a fresh cache loads")
}

/// Runs the worker and completes I/O (picking with `order`) until idle.
fn settle(c: &mut MemCache, order: &mut impl FnMut(&[CacheIoInfo]) -> usize) {
    for _ in 0..100_000 {
        if c.worker_wanted() {
            c.run_worker();
            continue;
        }
        let io = c.in_flight_io();
        if io.is_empty() {
            assert!(c.is_idle(), "work pending with no I/O in flight");
            c.check().expect("model consistent");
            return;
        }
        let i = order(&io) % io.len();
        c.complete_io(io[i].id).unwrap();
    }
    panic!("the cache never settled");
}

/// Submits one request and drives the cache — worker passes and data I/O
/// completions (the one `pick` chooses) — until that request completes;
/// migrations may still be in flight afterwards, racing the next request.
fn do_io_with(
    c: &mut MemCache,
    req: BioRequest,
    pick: &mut impl FnMut(&[CacheIoInfo]) -> usize,
) -> Result<Vec<u8>, Errno> {
    let id = c.submit(req).unwrap();
    let mut turn = 0u64;
    for _ in 0..100_000 {
        let done = c.take_completions();
        if let Some(d) = done.iter().find(|d| d.id == id) {
            assert_eq!(done.len(), 1, "only the one request was in flight");
            c.check().expect("model consistent");
            return d.result.map(|()| d.data.clone());
        }
        let io = c.in_flight_io();
        turn += 1;
        // Worker passes and completions interleave.
        if c.worker_wanted() && (io.is_empty() || turn.is_multiple_of(2)) {
            c.run_worker();
            continue;
        }
        assert!(!io.is_empty(), "request {id:?} waits with nothing to run");
        let i = pick(&io) % io.len();
        c.complete_io(io[i].id).unwrap();
    }
    panic!("request {id:?} never completed");
}

fn pattern(tag: u64, nr: u64) -> Vec<u8> {
    (0..nr * SECTOR_SIZE).map(|i| (tag.wrapping_mul(31).wrapping_add(i / 7) % 251) as u8 + 1).collect()
}

#[derive(Debug, Clone)]
enum Step {
    Write { block: u64, off: u64, nr: u64, fua: bool },
    Read { block: u64, nr_blocks: u64 },
    Flush,
    Discard { block: u64, nr_blocks: u64 },
    Tick { ms: u64 },
    Reload { mode: u8, cleaner: bool },
    Invalidate { cblock: u64 },
    Status,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0..ORIGIN_BLOCKS, 0..BS, 1..BS * 2, any::<bool>())
            .prop_map(|(block, off, nr, fua)| Step::Write { block, off, nr, fua }),
        5 => (0..ORIGIN_BLOCKS, 1..3u64).prop_map(|(block, nr_blocks)| Step::Read { block, nr_blocks }),
        1 => Just(Step::Flush),
        1 => (0..ORIGIN_BLOCKS, 1..4u64).prop_map(|(block, nr_blocks)| Step::Discard { block, nr_blocks }),
        2 => (1..2500u64).prop_map(|ms| Step::Tick { ms }),
        1 => (0..3u8, any::<bool>()).prop_map(|(mode, cleaner)| Step::Reload { mode, cleaner }),
        1 => (0..CACHE_BLOCKS).prop_map(|cblock| Step::Invalidate { cblock }),
        1 => Just(Step::Status),
    ]
}

/// Runs `steps`; `Err` names the first disagreement with the reference.
fn run(steps: &[Step], order_seed: u64, opts: CacheOptions) -> Result<u64, String> {
    run_with(steps, order_seed, opts, false, "writeback")
}

/// [`run`]; with `slow_writeback`, writes and copies to the origin
/// complete only when nothing else can.
fn run_with(
    steps: &[Step],
    order_seed: u64,
    opts: CacheOptions,
    slow_writeback: bool,
    mode: &str,
) -> Result<u64, String> {
    let mut c = new_cache(mode, opts);
    let mut reference = vec![0u8; (SECTORS * SECTOR_SIZE) as usize];
    // Sectors whose contents a discard made undefined (until written).
    let mut undefined = vec![false; SECTORS as usize];
    let mut x = order_seed | 1;
    let mut rand = move |n: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x as usize) % n.max(1)
    };
    let mut order = |io: &[CacheIoInfo]| {
        if slow_writeback {
            // Writes and copies to the origin land last.
            let fast: Vec<usize> = (0..io.len())
                .filter(|&i| {
                    !(matches!(io[i].kind, CacheIoKind::Copy | CacheIoKind::Write)
                        && io[i].disk == CacheDisk::Origin)
                })
                .collect();
            if !fast.is_empty() {
                return fast[rand(fast.len())];
            }
        }
        rand(io.len())
    };
    let mut now = 0;
    for (i, s) in steps.iter().enumerate() {
        match *s {
            Step::Write { block, off, nr, fua } => {
                let sector = block * BS + off;
                let nr = nr.min(SECTORS - sector);
                let data = pattern(i as u64, nr);
                let mut req = BioRequest::write(sector, data.clone());
                req.fua = fua;
                do_io_with(&mut c, req, &mut order).map_err(|e| format!("step {i}: write failed: {e}"))?;
                let at = (sector * SECTOR_SIZE) as usize;
                reference[at..at + data.len()].copy_from_slice(&data);
                undefined[sector as usize..(sector + nr) as usize].fill(false);
            }
            Step::Discard { block, nr_blocks } => {
                let sector = block * BS;
                let nr = (nr_blocks * BS).min(SECTORS - sector);
                do_io_with(&mut c, BioRequest::discard(sector, nr), &mut order)
                    .map_err(|e| format!("step {i}: discard failed: {e}"))?;
                // dm-cache discards only mark whole discard blocks (the
                // cache block size here); their data is undefined after.
                undefined[sector as usize..(sector + nr) as usize].fill(true);
            }
            Step::Read { block, nr_blocks } => {
                let nr = (nr_blocks * BS).min(SECTORS - block * BS);
                let got = do_io_with(&mut c, BioRequest::read(block * BS, nr), &mut order)
                    .map_err(|e| format!("step {i}: read failed: {e}"))?;
                if let Some(s) = first_difference(&got, &reference, &undefined, block * BS) {
                    return Err(format!("step {i}: read of block {block} differs at sector {s}"));
                }
            }
            Step::Flush => {
                do_io_with(&mut c, BioRequest::flush(), &mut order)
                    .map_err(|e| format!("step {i}: flush: {e}"))?;
            }
            Step::Tick { ms } => {
                now += ms * 1_000_000;
                c.set_time(now);
                c.run_worker();
            }
            Step::Reload { mode, cleaner } => {
                settle(&mut c, &mut order);
                c.suspend().map_err(|e| format!("step {i}: suspend: {e}"))?;
                check_clean_blocks(&mut c, &undefined).map_err(|e| format!("step {i}: {e}"))?;
                let mode = ["writeback", "writethrough", "passthrough"][mode as usize];
                let policy = if cleaner { "cleaner" } else { "smq" };
                let (next, r) = c.reload(&line(mode, policy)).map_err(|f| f.error.to_string())?;
                c = next;
                if let Err(e) = r {
                    if !e.message.contains("passthrough") {
                        return Err(format!("step {i}: reload to {mode}/{policy}: {e}"));
                    }
                }
                c.set_time(now);
            }
            Step::Invalidate { cblock } => {
                settle(&mut c, &mut order);
                let range = format!("{cblock}");
                let _ = c.message(&["invalidate_cblocks", &range]);
            }
            Step::Status => {
                let _ = c.status(false);
            }
        }
    }
    settle(&mut c, &mut order);
    for b in 0..ORIGIN_BLOCKS {
        let got = do_io_with(&mut c, BioRequest::read(b * BS, BS), &mut order)
            .map_err(|e| format!("final read: {e}"))?;
        if let Some(s) = first_difference(&got, &reference, &undefined, b * BS) {
            return Err(format!("final read of block {b} differs at sector {s}"));
        }
    }
    settle(&mut c, &mut order);
    c.suspend().map_err(|e| format!("final suspend: {e}"))?;
    check_clean_blocks(&mut c, &undefined)?;
    let k = c.counters();
    Ok(k.succeeded.iter().sum())
}

/// The first sector of a read at `first` that differs from the reference,
/// ignoring sectors a discard left undefined.
fn first_difference(got: &[u8], reference: &[u8], undefined: &[bool], first: u64) -> Option<u64> {
    let n = got.len() as u64 / SECTOR_SIZE;
    (0..n).map(|k| first + k).find(|&s| {
        let at = (s * SECTOR_SIZE) as usize;
        let k = ((s - first) * SECTOR_SIZE) as usize;
        !undefined[s as usize] && got[k..k + SECTOR_SIZE as usize] != reference[at..at + SECTOR_SIZE as usize]
    })
}

/// Every mapping the metadata records as clean holds the same bytes on
/// both devices (but in sectors a discard left undefined: a promotion of a
/// discarded block copies nothing).
fn check_clean_blocks(c: &mut MemCache, undefined: &[bool]) -> Result<(), String> {
    for cb in 0..CACHE_BLOCKS as u32 {
        let Ok(Some((ob, dirty))) = c.metadata().lookup(cb) else { continue };
        if dirty {
            continue;
        }
        let len = (BS * SECTOR_SIZE) as usize;
        let cs = (u64::from(cb) * BS * SECTOR_SIZE) as usize;
        let cached = c.cache_device().as_bytes()[cs..cs + len].to_vec();
        if let Some(s) = first_difference(&cached, c.origin_device().as_bytes(), undefined, ob * BS) {
            return Err(format!(
                "cache block {cb} is clean for origin block {ob} but the devices differ at sector {s}"
            ));
        }
    }
    Ok(())
}

#[test]
fn a_hot_block_is_promoted_and_reads_back() {
    let mut order = |_io: &[CacheIoInfo]| 0;
    let mut c = new_cache("writeback", CacheOptions::default());
    let data = pattern(7, BS);
    do_io_with(&mut c, BioRequest::write(3 * BS, data.clone()), &mut order).unwrap();
    for k in 0..20 {
        let got = do_io_with(&mut c, BioRequest::read(3 * BS, BS), &mut order).unwrap();
        assert_eq!(got, data, "read {k}");
        c.set_time((k + 1) * 1_000_000_000);
        settle(&mut c, &mut order);
    }
    assert!(c.counters().succeeded[0] >= 1, "the block was promoted: {:?}", c.counters());
    let status = c.status(false);
    assert!(status.contains(" 1/4 ") || status.contains("/4 "), "{status}");
}

#[test]
fn a_whole_block_write_to_a_discarded_block_is_promoted_by_overwrite() {
    let mut order = |_io: &[CacheIoInfo]| 0;
    let mut c = new_cache("writeback", CacheOptions::default());
    do_io_with(&mut c, BioRequest::discard(0, SECTORS), &mut order).unwrap();
    for b in 0..4 {
        do_io_with(&mut c, BioRequest::write(b * BS, pattern(b, BS)), &mut order).unwrap();
    }
    assert!(c.counters().overwrites >= 1, "{:?}", c.counters());
    for b in 0..4 {
        assert_eq!(do_io_with(&mut c, BioRequest::read(b * BS, BS), &mut order).unwrap(), pattern(b, BS));
    }
}

#[test]
fn default_sequences_agree_with_the_reference() {
    let steps: Vec<Step> = (0..400)
        .map(|i| match i % 9 {
            0..=3 => Step::Write {
                block: (i * 7) % ORIGIN_BLOCKS,
                off: (i * 13) % BS,
                nr: 1 + (i * 29) % (BS * 2),
                fua: i % 5 == 0,
            },
            4..=6 => Step::Read { block: (i * 5) % ORIGIN_BLOCKS, nr_blocks: 1 + i % 2 },
            7 => Step::Tick { ms: 1200 },
            _ => Step::Flush,
        })
        .collect();
    let migrations = run(&steps, 1, CacheOptions::default()).unwrap();
    assert!(migrations > 0, "the sequence migrates blocks");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Reads always return the reference's bytes, whatever the order of
    /// data I/O completions, the mode switches and the policy.
    #[test]
    fn reads_match_the_reference(steps in prop::collection::vec(step(), 1..120), seed in any::<u64>()) {
        if let Err(e) = run(&steps, seed, CacheOptions::default()) {
            prop_assert!(false, "{}", e);
        }
    }
}

/// A deliberately broken variant each: the reference catches it on some
/// sequence of the same generator.
fn caught(mutation: &str) -> bool {
    caught_with(mutation, false, "writeback")
}

fn caught_with(mutation: &str, slow_writeback: bool, mode: &'static str) -> bool {
    let opts = CacheOptions { mutations: Mutations::by_name(mutation).unwrap(), ..CacheOptions::default() };
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 400,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(&(prop::collection::vec(step(), 1..150), any::<u64>()), |(steps, seed)| {
            // Only a wrong read or devices that disagree with the metadata
            // count: the detectors under test.
            match run_with(&steps, seed, opts, slow_writeback, mode) {
                Err(e) if e.contains("differ") => Err(TestCaseError::fail(e)),
                _ => Ok(()),
            }
        })
        .is_err()
}

#[test]
fn the_reference_catches_a_demotion_that_drops_dirty_data() {
    assert!(caught("cache-demote-frees-dirty"));
}

#[test]
fn the_reference_catches_a_write_that_ignores_a_migration_lock() {
    assert!(caught("cache-write-ignores-migration-lock"));
}

#[test]
fn the_reference_catches_a_writeback_that_cleans_before_its_copy() {
    // Writeback copies land last: a demotion of a block whose copy is
    // still in flight drops the only copy of its data.
    assert!(caught_with("cache-writeback-clean-before-copy", true, "writeback"));
}

#[test]
fn slow_writebacks_keep_the_data() {
    let steps: Vec<Step> = (0..600)
        .map(|i| match i % 11 {
            0..=3 => Step::Write { block: (i * 7) % ORIGIN_BLOCKS, off: 0, nr: BS, fua: false },
            4..=8 => Step::Read { block: (i * 5) % ORIGIN_BLOCKS, nr_blocks: 1 },
            9 => Step::Tick { ms: 1500 },
            _ => Step::Flush,
        })
        .collect();
    let migrations = run_with(&steps, 3, CacheOptions::default(), true, "writeback").unwrap();
    assert!(migrations > 0, "blocks migrated");
}

#[test]
fn the_reference_catches_writethrough_that_acknowledges_before_the_origin() {
    // The origin half lands last: a demotion of the clean block exposes it.
    assert!(caught_with("cache-writethrough-acks-before-origin", true, "writethrough"));
}
