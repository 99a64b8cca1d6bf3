//! The cache target's I/O paths (`model::cache::core`) against a plain
//! reference: a byte array that every completed write lands in. Requests
//! run one at a time to completion (each data I/O completed in a chosen
//! order, the worker run until idle), so every read must return exactly
//! what the reference holds — through promotions, demotions, writebacks,
//! overwrites, mode switches, invalidations and resizes of the cache and
//! the origin — and the devices must agree with the metadata after every
//! clean shutdown.

use dmsim_model::block_device::{MemDevice, SECTOR_SIZE};
use dmsim_model::cache::core::{BioRequest, Cache, CacheDisk, CacheIoInfo, CacheIoKind, CacheOptions};
use dmsim_model::cache::table::DeviceSizes;
use dmsim_model::cache::{CacheMetadata, OpenOptions};
use dmsim_model::errno::Errno;
use dmsim_model::mutation::Mutations;
use proptest::prelude::*;

const BS: u64 = 64;
const CACHE_BLOCKS: u64 = 4;
const ORIGIN_BLOCKS: u64 = 24;
const SECTORS: u64 = BS * ORIGIN_BLOCKS;
/// The largest cache and origin a resize asks for: the devices underneath
/// have this size from the start, and the table sees a prefix of them (as
/// through a dm-linear).
const MAX_CACHE_BLOCKS: u64 = 8;
const MAX_ORIGIN_BLOCKS: u64 = 32;
const MAX_SECTORS: u64 = BS * MAX_ORIGIN_BLOCKS;

type MemCache = Cache<MemDevice, MemDevice, MemDevice>;

fn line(mode: &str, policy: &str) -> String {
    format!("/dev/m /dev/c /dev/o {BS} 2 {mode} metadata2 {policy} 2 migration_threshold 1000000")
}

fn new_cache(mode: &str, opts: CacheOptions) -> MemCache {
    let cache = MemDevice::from_bytes(vec![0xc5; (CACHE_BLOCKS * BS * SECTOR_SIZE) as usize]);
    Cache::create(&line(mode, "smq"), MemDevice::new(2048), cache, MemDevice::new(SECTORS), 0, opts)
        .expect("a fresh cache loads")
}

/// The sizes a table sees with `cache` cache blocks and `origin` origin
/// blocks, on devices of the largest sizes.
fn sizes(cache: u64, origin: u64) -> DeviceSizes {
    DeviceSizes { target_len: origin * BS, cache_sectors: cache * BS, origin_sectors: MAX_SECTORS }
}

/// A fresh cache on devices of the largest sizes, presented at the
/// initial ones.
fn new_resizable_cache(mode: &str, opts: CacheOptions) -> MemCache {
    let cache = MemDevice::from_bytes(vec![0xc5; (MAX_CACHE_BLOCKS * BS * SECTOR_SIZE) as usize]);
    let s = sizes(CACHE_BLOCKS, ORIGIN_BLOCKS);
    Cache::create_sized(
        &line(mode, "smq"),
        s,
        MemDevice::new(2048),
        cache,
        MemDevice::new(MAX_SECTORS),
        0,
        opts,
    )
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
    Write {
        block: u64,
        off: u64,
        nr: u64,
        fua: bool,
    },
    Read {
        block: u64,
        nr_blocks: u64,
    },
    Flush,
    Discard {
        block: u64,
        nr_blocks: u64,
    },
    Tick {
        ms: u64,
    },
    Reload {
        mode: u8,
        cleaner: bool,
    },
    /// A table reload on a cache device of `cache` blocks and an origin of
    /// `origin` blocks (same mode and policy).
    Resize {
        cache: u64,
        origin: u64,
    },
    Invalidate {
        cblock: u64,
    },
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
        1 => (1..=MAX_CACHE_BLOCKS, 4..=MAX_ORIGIN_BLOCKS)
            .prop_map(|(cache, origin)| Step::Resize { cache, origin }),
        1 => (0..CACHE_BLOCKS).prop_map(|cblock| Step::Invalidate { cblock }),
        1 => Just(Step::Status),
    ]
}

/// Runs `steps`; `Err` names the first disagreement with the reference.
/// What a run did.
#[derive(Debug, Default)]
struct Outcome {
    /// Migrations that succeeded.
    migrations: u64,
    /// Resizes taken, refused with EINVAL (a dirty cache block dropped)
    /// and refused with EFBIG (a dirty block past the origin's end).
    resizes: [u64; 3],
}

fn run(steps: &[Step], order_seed: u64, opts: CacheOptions) -> Result<Outcome, String> {
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
) -> Result<Outcome, String> {
    let mut c = new_resizable_cache(mode, opts);
    // The table's mode and policy, and the blocks it sees.
    let (mut table_mode, mut table_policy) = (mode, "smq");
    let (mut cache_blocks, mut origin_blocks) = (CACHE_BLOCKS, ORIGIN_BLOCKS);
    // The whole origin device: what lies past the table's end stays there
    // and shows again when the origin grows back.
    let mut reference = vec![0u8; (MAX_SECTORS * SECTOR_SIZE) as usize];
    // Sectors whose contents a discard made undefined (until written).
    let mut undefined = vec![false; MAX_SECTORS as usize];
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
    let mut resizes = [0u64; 3];
    for (i, s) in steps.iter().enumerate() {
        let sectors = origin_blocks * BS;
        match *s {
            Step::Write { block, off, nr, fua } => {
                let sector = (block % origin_blocks) * BS + off;
                let nr = nr.min(sectors - sector);
                let data = pattern(i as u64, nr);
                let mut req = BioRequest::write(sector, data.clone());
                req.fua = fua;
                do_io_with(&mut c, req, &mut order).map_err(|e| format!("step {i}: write failed: {e}"))?;
                let at = (sector * SECTOR_SIZE) as usize;
                reference[at..at + data.len()].copy_from_slice(&data);
                undefined[sector as usize..(sector + nr) as usize].fill(false);
            }
            Step::Discard { block, nr_blocks } => {
                let sector = (block % origin_blocks) * BS;
                let nr = (nr_blocks * BS).min(sectors - sector);
                do_io_with(&mut c, BioRequest::discard(sector, nr), &mut order)
                    .map_err(|e| format!("step {i}: discard failed: {e}"))?;
                // dm-cache discards only mark whole discard blocks (the
                // cache block size here); their data is undefined after.
                undefined[sector as usize..(sector + nr) as usize].fill(true);
            }
            Step::Read { block, nr_blocks } => {
                let block = block % origin_blocks;
                let nr = (nr_blocks * BS).min(sectors - block * BS);
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
                let s = sizes(cache_blocks, origin_blocks);
                let (next, r) = c.reload_sized(&line(mode, policy), s).map_err(|f| f.error.to_string())?;
                c = next;
                match r {
                    Ok(()) => (table_mode, table_policy) = (mode, policy),
                    Err(e) if e.message.contains("passthrough") => {
                        // Refused at preresume (6.1): the old table again.
                        let (next, r) = c
                            .reload_sized(&line(table_mode, table_policy), s)
                            .map_err(|f| f.error.to_string())?;
                        c = next;
                        r.map_err(|e| format!("step {i}: the old table after a refused passthrough: {e}"))?;
                    }
                    Err(e) => return Err(format!("step {i}: reload to {mode}/{policy}: {e}")),
                }
                c.set_time(now);
            }
            Step::Resize { cache, origin } => {
                settle(&mut c, &mut order);
                c.suspend().map_err(|e| format!("step {i}: suspend: {e}"))?;
                check_clean_blocks(&mut c, &undefined).map_err(|e| format!("step {i}: {e}"))?;
                let params = line(table_mode, table_policy);
                let refusal = resize_refusal(&mut c, cache, origin);
                let (next, r) =
                    c.reload_sized(&params, sizes(cache, origin)).map_err(|f| f.error.to_string())?;
                c = next;
                match (r, refusal) {
                    (Ok(()), _) => {
                        resizes[0] += 1;
                        (cache_blocks, origin_blocks) = (cache, origin);
                    }
                    (Err(e), Some(why)) if e.errno == why => {
                        resizes[if why == Errno::EINVAL { 1 } else { 2 }] += 1;
                        // The device is left suspended with the new table:
                        // load the old one again (a repair first when the
                        // refusal set NEEDS_CHECK).
                        c = restore(c, &params, sizes(cache_blocks, origin_blocks), opts, now)
                            .map_err(|e| format!("step {i}: back to the old size: {e}"))?;
                    }
                    (Err(e), _) => {
                        return Err(format!("step {i}: resize to {cache}/{origin} blocks refused: {e}"))
                    }
                }
                c.set_time(now);
            }
            Step::Invalidate { cblock } => {
                settle(&mut c, &mut order);
                let range = format!("{}", cblock % cache_blocks);
                let _ = c.message(&["invalidate_cblocks", &range]);
            }
            Step::Status => {
                let _ = c.status(false);
            }
        }
    }
    settle(&mut c, &mut order);
    for b in 0..origin_blocks {
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
    Ok(Outcome { migrations: k.succeeded.iter().sum(), resizes })
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

/// The errno a table reload on `cache` cache blocks and `origin` origin
/// blocks must fail with, after a clean shutdown: EINVAL if a dropped cache
/// block is stored dirty (`dm_cache_resize`), else EFBIG if a mapping past
/// the origin's new end loads dirty (`load_filtered_mapping`: every
/// mapping loads dirty when the metadata was not shut down cleanly before
/// it was opened).
fn resize_refusal(c: &mut MemCache, cache: u64, origin: u64) -> Option<Errno> {
    let (now_cache, _) = c.target().geometry();
    let md = c.metadata();
    let clean = md.clean_when_opened();
    let mut loaded = Vec::new();
    for cb in 0..now_cache {
        // After the clean shutdown the stored dirty bits are the in-core
        // ones (v2: clear for every unmapped block).
        if let Ok(Some((ob, dirty))) = md.lookup(cb) {
            if u64::from(cb) >= cache && dirty {
                return Some(Errno::EINVAL);
            }
            loaded.push((cb, ob, dirty || !clean));
        }
    }
    let beyond = loaded.iter().any(|&(cb, ob, dirty)| u64::from(cb) < cache && ob >= origin && dirty);
    beyond.then_some(Errno::EFBIG)
}

/// After a refused resize: the old table on its own sizes. A refusal that
/// set NEEDS_CHECK (a cache shrink) leaves metadata no table loads on; an
/// administrator removes the device, clears the flag
/// (`cache_check --clear-needs-check-flag`) and loads it again.
fn restore(
    c: MemCache,
    params: &str,
    s: DeviceSizes,
    opts: CacheOptions,
    now: u64,
) -> Result<MemCache, String> {
    let (c, r) = c.reload_sized(params, s).map_err(|f| f.error.to_string())?;
    match r {
        Ok(()) => Ok(c),
        Err(e) if e.message.contains("check/repair") => {
            let (m, cd, od) = c.close();
            let opts_md = OpenOptions::new(BS as u32, 2);
            let mut md = CacheMetadata::open(m, opts_md).map_err(|e| e.to_string())?;
            if !md.needs_check() {
                return Err(format!("the old table is refused ({e}) but NEEDS_CHECK is not set"));
            }
            md.clear_needs_check();
            md.commit(false).map_err(|e| e.to_string())?;
            Cache::create_sized(params, s, md.close(), cd, od, now, opts).map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Every mapping the metadata records as clean holds the same bytes on
/// both devices (but in sectors a discard left undefined: a promotion of a
/// discarded block copies nothing).
fn check_clean_blocks(c: &mut MemCache, undefined: &[bool]) -> Result<(), String> {
    let (cache_blocks, _) = c.target().geometry();
    for cb in 0..cache_blocks {
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
    let out = run(&steps, 1, CacheOptions::default()).unwrap();
    assert!(out.migrations > 0, "the sequence migrates blocks");
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
    let out = run_with(&steps, 3, CacheOptions::default(), true, "writeback").unwrap();
    assert!(out.migrations > 0, "blocks migrated");
}

#[test]
fn the_reference_catches_writethrough_that_acknowledges_before_the_origin() {
    // The origin half lands last: a demotion of the clean block exposes it.
    assert!(caught_with("cache-writethrough-acks-before-origin", true, "writethrough"));
}

#[test]
fn the_reference_catches_a_shrink_that_drops_dirty_blocks() {
    assert!(caught("cache-shrink-drops-dirty"));
}

#[test]
fn the_generator_reaches_every_resize_outcome() {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 300,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let strategy = (prop::collection::vec(step(), 1..120), any::<u64>());
    let mut total = [0u64; 3];
    for _ in 0..300 {
        let (steps, seed) = proptest::strategy::ValueTree::current(&strategy.new_tree(&mut runner).unwrap());
        let out = run(&steps, seed, CacheOptions::default()).unwrap();
        for (t, n) in total.iter_mut().zip(out.resizes) {
            *t += n;
        }
    }
    assert!(total.iter().all(|&n| n > 0), "resizes taken / EINVAL / EFBIG: {total:?}");
}

/// One suspend and a reload at `cache` and `origin` blocks, as a resize
/// step does: the new table's result.
fn resize(
    c: MemCache,
    cache: u64,
    origin: u64,
) -> (MemCache, Result<(), dmsim_model::thin::pool::TargetError>) {
    c.suspend().unwrap();
    c.reload_sized(&line("writeback", "smq"), sizes(cache, origin)).map_err(|f| f.error).unwrap()
}

#[test]
fn resizes_grow_shrink_and_refuse_as_the_kernel_does() {
    let mut order = |_io: &[CacheIoInfo]| 0;
    let mut c = new_resizable_cache("writeback", CacheOptions::default());
    // Whole-block writes to discarded blocks are promoted by overwrite:
    // origin blocks 0..4 end up dirty in cache blocks 0..4.
    do_io_with(&mut c, BioRequest::discard(0, SECTORS), &mut order).unwrap();
    for b in 0..4 {
        do_io_with(&mut c, BioRequest::write(b * BS, pattern(b, BS)), &mut order).unwrap();
    }
    settle(&mut c, &mut order);
    assert_eq!(c.target().geometry(), (4, 24));
    let dirty: Vec<bool> = (0..4).map(|cb| c.target().is_dirty(cb)).collect();
    assert!(dirty.iter().all(|d| *d), "every cache block dirty: {dirty:?}");

    // Growing both: taken; the new blocks are unmapped, the new origin
    // blocks read as the origin device holds them (zeroes).
    let (mut c, r) = resize(c, 8, 32);
    r.unwrap();
    assert_eq!(c.target().geometry(), (8, 32));
    assert_eq!(c.metadata().cache_blocks(), 8);
    assert!((4..8).all(|cb| matches!(c.metadata().lookup(cb), Ok(None))));
    let got = do_io_with(&mut c, BioRequest::read(30 * BS, BS), &mut order).unwrap();
    assert!(got.iter().all(|&b| b == 0), "a new origin block reads zeroes");
    assert!(c.status(false).contains(" 4/8 "), "{}", c.status(false));

    // Shrinking the origin below dirty origin block 3: EFBIG, metadata
    // untouched and still writable; the device stays suspended.
    settle(&mut c, &mut order);
    let (c, r) = resize(c, 8, 3);
    let e = r.unwrap_err();
    assert_eq!(e.errno, Errno::EFBIG, "{e}");
    assert!(e.message.contains("unable to shrink origin; cache block 3 is dirty"), "{e}");
    assert!(c.is_suspended());
    assert_eq!(c.target().mode(), dmsim_model::cache::target::CacheMode::Write);
    // Loading the old table again works.
    let (mut c, r) = c.reload_sized(&line("writeback", "smq"), sizes(8, 32)).map_err(|f| f.error).unwrap();
    r.unwrap();
    assert_eq!(do_io_with(&mut c, BioRequest::read(3 * BS, BS), &mut order).unwrap(), pattern(3, BS));

    // The old table is a new target: its I/O tracker starts idle, so smq
    // writes every dirty block back at once (6.1's `dm_iot_init`). Block 3
    // is written again, dirty.
    settle(&mut c, &mut order);
    assert!((0..4).all(|cb| !c.target().is_dirty(cb)), "a new table writes back at once");
    do_io_with(&mut c, BioRequest::write(3 * BS, pattern(3, BS)), &mut order).unwrap();
    assert!(c.target().is_dirty(3));

    // Shrinking the cache below dirty cache block 3: EINVAL, and as any
    // failed metadata operation, NEEDS_CHECK and read-only.
    settle(&mut c, &mut order);
    let (c, r) = resize(c, 2, 32);
    let e = r.unwrap_err();
    assert_eq!(e.errno, Errno::EINVAL, "{e}");
    assert!(e.message.contains("unable to shrink cache due to dirty blocks"), "{e}");
    assert_eq!(c.target().mode(), dmsim_model::cache::target::CacheMode::ReadOnly);
    // No table loads any more, the old one included, until a repair.
    let (c, r) = c.reload_sized(&line("writeback", "smq"), sizes(8, 32)).map_err(|f| f.error).unwrap();
    assert!(r.unwrap_err().message.contains("check/repair"));
    let mut c = restore(c, &line("writeback", "smq"), sizes(8, 32), CacheOptions::default(), 0).unwrap();
    for b in 0..4 {
        assert_eq!(do_io_with(&mut c, BioRequest::read(b * BS, BS), &mut order).unwrap(), pattern(b, BS));
    }

    // Clean blocks go with a shrink: write everything back with the
    // cleaner, then shrink both below the cached blocks.
    settle(&mut c, &mut order);
    c.suspend().unwrap();
    let (mut c, r) =
        c.reload_sized(&line("writeback", "cleaner"), sizes(8, 32)).map_err(|f| f.error).unwrap();
    r.unwrap();
    for t in 1..=5 {
        c.set_time(t * 1_000_000_000);
        settle(&mut c, &mut order);
    }
    assert_eq!((0..8).filter(|&cb| c.target().is_dirty(cb)).count(), 0, "the cleaner wrote every block back");
    // The cache shrinks over clean blocks 2 and 3.
    let (c, r) = resize(c, 2, 32);
    r.unwrap();
    // The repair opened the metadata after an unclean shutdown, and a
    // reload keeps it open: every mapping still loads dirty, so a clean
    // one past a shorter origin's end refuses the shrink too.
    let (c, r) = resize(c, 2, 1);
    assert_eq!(r.unwrap_err().errno, Errno::EFBIG);
    // That load made every block dirty in core again: the cleaner writes
    // them back once more.
    let (mut c, r) =
        c.reload_sized(&line("writeback", "cleaner"), sizes(2, 32)).map_err(|f| f.error).unwrap();
    r.unwrap();
    assert!(c.target().is_dirty(1));
    for t in 6..=10 {
        c.set_time(t * 1_000_000_000);
        settle(&mut c, &mut order);
    }
    assert!(!c.target().is_dirty(1));
    // Removed after a clean shutdown and loaded again, it opens clean.
    c.suspend().unwrap();
    let (m, cd, od) = c.close();
    let c =
        Cache::create_sized(&line("writeback", "smq"), sizes(2, 32), m, cd, od, 0, CacheOptions::default())
            .unwrap();
    let (mut c, r) = resize(c, 2, 1);
    r.unwrap();
    assert_eq!(c.target().geometry(), (2, 1));
    // Origin blocks 1.. are past the end: their clean mappings are gone
    // from the metadata; block 0 stays cached.
    assert_eq!(c.metadata().lookup(0).unwrap(), Some((0, false)));
    assert_eq!(c.metadata().lookup(1).unwrap(), None);
    assert!(c.submit(BioRequest::read(BS, BS)).is_err(), "past the end of the device");
    // Grown back, the origin still holds the data.
    let (mut c, r) = resize(c, 8, 32);
    r.unwrap();
    for b in 0..4 {
        assert_eq!(do_io_with(&mut c, BioRequest::read(b * BS, BS), &mut order).unwrap(), pattern(b, BS));
    }
}
