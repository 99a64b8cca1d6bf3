//! Finding: dm-cache on the stock 6.1 kernel loses an acknowledged,
//! flushed write after a suspend/resume and a crash (docs/findings.md,
//! "dm-cache").
//!
//! The model's metadata maps ten cache blocks (three dirty) and was shut
//! down cleanly (CLEAN_SHUTDOWN set). The kernel activates dm-cache on it
//! (writeback, smq, no background writeback), the device is suspended and
//! resumed (a clean shutdown, then the same table), origin block 3, cached
//! clean in cache block 0, is written whole and the write is FLUSHED (an
//! fsync of the cache device, or the write sent FUA), then the metadata
//! device crashes.
//!
//! * **Flushed**: on disk after the crash, CLEAN_SHUTDOWN is still set and
//!   cache block 0 is recorded clean; the cache device holds the flushed
//!   write, the origin the old data. The flush committed nothing: dirtying
//!   a block that is already cached changes no metadata, and the flush
//!   commits only changed metadata.
//! * **Loss**: the same, then the next activation on the crashed disks
//!   (as after a reboot) takes the block as clean (status: three dirty
//!   blocks, the model's). Reads still come from the cache (the new data)
//!   while the block stays cached; then the path a user takes to drop a
//!   cache — the `cleaner` policy until nothing is dirty, a reload in
//!   `passthrough`, `invalidate_cblocks` — writes back the three blocks the
//!   metadata calls dirty but never block 0: in passthrough the read
//!   returns the origin's old data, and after the invalidation the flushed
//!   write is gone for good (the cache block still holds it, unmapped).
//! * **Kept** (the control): the same with a status between the flush and
//!   the crash; the status commits and clears CLEAN_SHUTDOWN, the next
//!   activation takes every block as dirty, and the same path keeps the
//!   write.
//! * **NoResume**: the write and fsync right after a fresh activation, then
//!   the crash: CLEAN_SHUTDOWN is already clear (the activation committed),
//!   so the window is the resume's only.
//!
//! Needs `qemu-system-x86_64` and `linux-image-amd64`; without them it
//! prints SKIPPED, or fails under `CI=true`.

use std::sync::OnceLock;
use std::time::Instant;

#[path = "common/cache_vm.rs"]
mod cache_vm;

use dmsim_kernel_shim::{CacheSpec, CacheStep, Job, KernelRun, KernelShim, ShimError};
use dmsim_model::block_device::MemDevice;
use dmsim_model::cache::inspect::{read_image, CacheImage};
use dmsim_model::cache::mapping::{discard_geometry, PolicyHints, ShutdownState};
use dmsim_model::cache::superblock::CacheStats;
use dmsim_model::cache::CacheMetadata;
use dmsim_traces::Op;

const RUN: u64 = 0xC1EA4;
const BS: u64 = 128;
const CACHE_BLOCKS: u64 = 64;
const ORIGIN_BLOCKS: u64 = 256;
const METADATA_SECTORS: u64 = 8192;
const CACHE_STAMP: u64 = 1_000_000;
const ORIGIN_STAMP: u64 = 2_000_000;
/// A migration threshold below one block: no background writeback.
const QUIET: Option<u64> = Some(64);

/// The model's mappings: (cblock, oblock, dirty).
const MAPPINGS: [(u32, u64, bool); 10] = [
    (0, 3, false),
    (1, 7, true),
    (2, 10, false),
    (5, 11, false),
    (6, 40, true),
    (7, 41, false),
    (20, 100, false),
    (21, 200, true),
    (40, 201, false),
    (63, 255, false),
];
/// The clean cached block the flushed write goes to.
const CBLOCK: u32 = MAPPINGS[0].0;
const OBLOCK: u64 = MAPPINGS[0].1;
/// The stamp of the flushed write (the job's first write).
const FLUSHED: u64 = 0;

fn in_ci() -> bool {
    cache_vm::in_ci()
}

fn spec(version: u32) -> CacheSpec {
    cache_vm::writeback_spec(RUN, BS, CACHE_BLOCKS, ORIGIN_BLOCKS, METADATA_SECTORS, version, QUIET)
}

fn stamped(write: u64, first_sector: u64) -> Vec<u8> {
    cache_vm::stamped(RUN, BS, write, first_sector)
}

/// What a block reads when it holds one stamp for the sectors it is read at.
fn reads(write: u64) -> String {
    format!("w{write}*{BS}")
}

fn origin_image() -> Vec<u8> {
    (0..ORIGIN_BLOCKS).flat_map(|b| stamped(ORIGIN_STAMP + b, b * BS)).collect()
}

fn oblock_of(c: u32) -> Option<u64> {
    MAPPINGS.iter().find(|m| m.0 == c).map(|m| m.1)
}

fn cache_image() -> Vec<u8> {
    (0..CACHE_BLOCKS as u32)
        .flat_map(|c| stamped(CACHE_STAMP + u64::from(c), oblock_of(c).unwrap_or(u64::from(c)) * BS))
        .collect()
}

/// The model's image: formatted, sized, the mappings inserted, a clean
/// shutdown with the dirty bits.
fn model_image(version: u32) -> Vec<u8> {
    let mut md = CacheMetadata::format(MemDevice::new(METADATA_SECTORS), BS as u32, version).unwrap();
    md.resize(CACHE_BLOCKS as u32).unwrap();
    let mut dirty = vec![false; CACHE_BLOCKS as usize];
    for &(c, o, d) in &MAPPINGS {
        md.insert_mapping(c, o).unwrap();
        dirty[c as usize] = d;
    }
    let (discard_block_size, nr) = discard_geometry(BS, ORIGIN_BLOCKS * BS);
    let state = ShutdownState {
        dirty,
        discard_block_size,
        discards: vec![false; nr as usize],
        stats: CacheStats::default(),
        policy: PolicyHints {
            name: "smq".into(),
            version: [2, 0, 0],
            hint_size: 4,
            hints: vec![0; CACHE_BLOCKS as usize],
        },
    };
    md.clean_shutdown(&state).unwrap();
    md.close().as_bytes().to_vec()
}

fn full_read(b: u64) -> Op {
    Op::Read { dev: 0, sector: (b * BS) as u32, nr_sectors: BS as u16 }
}

fn full_write(b: u64, fua: bool) -> Op {
    Op::Write { dev: 0, sector: (b * BS) as u32, nr_sectors: BS as u16, fua, preflush: false }
}

/// The start both jobs share: suspend + resume, the write of the clean
/// cached block made durable (an fsync after it, or FUA), the crash.
fn flushed_write(fua: bool) -> Vec<Op> {
    let mut ops = vec![Op::Worker, full_write(OBLOCK, fua)];
    if !fua {
        ops.push(Op::Flush { dev: 0 });
    }
    ops.push(Op::CRASH);
    ops
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// (version, FUA instead of an fsync): stop at the crash.
    Flushed(u32, bool),
    /// (version): go on to the next activation and the cleaner,
    /// passthrough and invalidation.
    Loss(u32),
    /// The control: as [`Kind::Loss`] with a status (a commit, clearing
    /// CLEAN_SHUTDOWN, as the candidate fix would) between the flush and
    /// the crash.
    Kept(u32),
    /// As [`Kind::Flushed`] without the suspend and resume: the write and
    /// its fsync right after the activation, then the crash.
    NoResume(u32),
}

const KINDS: [Kind; 6] = [
    Kind::Flushed(1, false),
    Kind::Flushed(2, true),
    Kind::Loss(1),
    Kind::Loss(2),
    Kind::Kept(1),
    Kind::NoResume(1),
];

/// Op indices of the reboot's part of a [`Kind::Loss`] or [`Kind::Kept`]
/// job, from its first op after the crash.
mod at {
    /// Status after the reactivation on the crashed disks (writeback, smq).
    pub const REACTIVATED: usize = 0;
    /// A read of the block, still cached.
    pub const READ_CACHED: usize = 1;
    /// Statuses under the cleaner policy.
    pub const CLEANER: [usize; 2] = [2, 3];
    /// Status in passthrough.
    pub const PASSTHROUGH: usize = 4;
    /// A read of the block in passthrough.
    pub const READ_PASSTHROUGH: usize = 5;
    /// Status after `invalidate_cblocks`.
    pub const INVALIDATED: usize = 6;
    /// A read of the block back in writeback.
    pub const READ_AFTER: usize = 7;
    /// Status at the end.
    pub const LAST: usize = 8;
}

/// The ops of a [`Kind::Loss`] (or, with a status between the flush and
/// the crash, [`Kind::Kept`]) job, and the index of its first op after the
/// crash.
fn reboot_ops(status_before_crash: bool) -> (Vec<Op>, usize) {
    let tick = |millis| Op::Tick { millis };
    let mut ops = flushed_write(false);
    if status_before_crash {
        ops.insert(ops.len() - 1, tick(0));
    }
    let base = ops.len();
    ops.extend([
        tick(0),
        full_read(OBLOCK),
        tick(1500),
        tick(1500),
        tick(0),
        full_read(OBLOCK),
        tick(0),
        full_read(OBLOCK),
        tick(0),
    ]);
    assert_eq!(ops.len(), base + at::LAST + 1);
    (ops, base)
}

fn job(kind: Kind) -> Job {
    match kind {
        Kind::NoResume(v) => {
            let ops = flushed_write(false)[1..].to_vec();
            Job::cache(&spec(v), ops, model_image(v), cache_image(), origin_image())
        }
        Kind::Flushed(v, fua) => {
            Job::cache(&spec(v), flushed_write(fua), model_image(v), cache_image(), origin_image())
        }
        Kind::Loss(v) | Kind::Kept(v) => {
            let (ops, b) = reboot_ops(kind == Kind::Kept(v));
            let reactivate = |mode: &str, policy: &str, migration_threshold| CacheStep::Reactivate {
                mode: mode.into(),
                policy: policy.into(),
                migration_threshold,
            };
            let steps = [
                (b + at::REACTIVATED, reactivate("writeback", "smq", QUIET)),
                (b + at::CLEANER[0], reactivate("writeback", "cleaner", None)),
                (b + at::PASSTHROUGH, reactivate("passthrough", "smq", QUIET)),
                (b + at::INVALIDATED, CacheStep::Message(format!("invalidate_cblocks {CBLOCK}"))),
                (b + at::READ_AFTER, reactivate("writeback", "smq", QUIET)),
            ];
            Job::cache_with_steps(&spec(v), &steps, ops, model_image(v), cache_image(), origin_image())
        }
    }
}

fn boot() -> Option<&'static Vec<KernelRun>> {
    static BOOT: OnceLock<Option<Vec<KernelRun>>> = OnceLock::new();
    BOOT.get_or_init(|| {
        let shim = match KernelShim::prepare() {
            Ok(s) => s,
            Err(e @ ShimError::Missing(_)) if !in_ci() => {
                eprintln!("SKIPPED: the dm-cache clean-shutdown finding: {e}");
                return None;
            }
            Err(e) => panic!("preparing the VM: {e}"),
        };
        let jobs: Vec<Job> = KINDS.iter().map(|&k| job(k)).collect();
        let t = Instant::now();
        let runs = shim.run_jobs(&jobs).unwrap_or_else(|e| panic!("the cache jobs: {e}"));
        eprintln!(
            "one boot, {} cache jobs: VM {:?}, with the host's part {:?}",
            runs.len(),
            runs[0].wall,
            t.elapsed()
        );
        for (k, run) in KINDS.iter().zip(&runs) {
            assert_eq!(run.result.error, None, "{k:?}: the agent failed; console tail:\n{}", {
                let lines: Vec<&str> = run.console.lines().collect();
                lines[lines.len().saturating_sub(30)..].join("\n")
            });
            eprintln!("{k:?}: timings {:?}", run.result.timings_ms);
        }
        Some(runs)
    })
    .as_ref()
}

fn run_of(runs: &[KernelRun], kind: Kind) -> &KernelRun {
    &runs[KINDS.iter().position(|&k| k == kind).unwrap()]
}

fn image(run: &KernelRun) -> CacheImage {
    read_image(&mut MemDevice::from_bytes(run.metadata_image.clone())).expect("the kernel's image decodes")
}

fn block(bytes: &[u8], b: u64) -> &[u8] {
    &bytes[(b * BS * 512) as usize..((b + 1) * BS * 512) as usize]
}

/// What the cache slice's block `c` and the origin slice's block `o` hold
/// (summaries for the sectors of origin block `o`).
fn on_disk(run: &KernelRun, c: u32, o: u64) -> (String, String) {
    let data = run.cache_data.as_ref().expect("a cache job's data");
    let summary = |bytes: &[u8], b: u64| dmsim_kernel_shim::protocol::summarize(block(bytes, b), RUN, o * BS);
    (summary(&data.cache, u64::from(c)), summary(&data.origin, o))
}

/// (resident, dirty) of a cache status line (`<metadata block size>
/// <used>/<total> <cache block size> <resident>/<total> <read hits> <read
/// misses> <write hits> <write misses> <demotions> <promotions> <dirty> …`).
fn resident_dirty(line: &str) -> (u64, u64) {
    let w: Vec<&str> = line.split_whitespace().collect();
    let n = |s: &str| s.parse::<u64>().unwrap_or_else(|_| panic!("status {line:?}"));
    let resident = w.get(3).and_then(|f| f.split_once('/')).map(|(a, _)| n(a));
    (
        resident.unwrap_or_else(|| panic!("status {line:?}")),
        n(w.get(10).unwrap_or_else(|| panic!("status {line:?}"))),
    )
}

fn op_read(run: &KernelRun, index: usize) -> &str {
    let op = &run.result.ops[index];
    assert_eq!(op.outcome, "ok", "op {index}");
    op.read.as_deref().unwrap_or_else(|| panic!("op {index} read nothing"))
}

/// The write and its flush (or FUA) were acknowledged; afterwards the crash
/// leaves CLEAN_SHUTDOWN set and the block clean on disk, with the flushed
/// data in the cache block and the old data on the origin.
#[test]
fn a_flushed_write_to_a_clean_cached_block_is_recorded_nowhere_after_a_crash() {
    let Some(runs) = boot() else { return };
    for kind in [Kind::Flushed(1, false), Kind::Flushed(2, true)] {
        let run = run_of(runs, kind);
        let outcomes: Vec<&str> = run.result.ops.iter().map(|o| o.outcome.as_str()).collect();
        assert!(outcomes.iter().all(|&o| o == "ok"), "{kind:?}: every op acknowledged: {outcomes:?}");
        let img = image(run);
        let (in_cache, in_origin) = on_disk(run, CBLOCK, OBLOCK);
        eprintln!(
            "{kind:?}: after the crash: CLEAN_SHUTDOWN {}, cache block {CBLOCK} valid {} dirty {}; the cache block \
             reads {in_cache}, origin block {OBLOCK} {in_origin}",
            img.superblock.clean_shutdown(),
            img.mappings[CBLOCK as usize].valid(),
            img.is_dirty(CBLOCK as usize),
        );
        assert!(
            img.superblock.clean_shutdown(),
            "{kind:?}: the flush committed nothing: CLEAN_SHUTDOWN stays set"
        );
        assert_eq!(img.mappings[CBLOCK as usize].oblock, OBLOCK);
        assert!(img.mappings[CBLOCK as usize].valid());
        assert!(!img.is_dirty(CBLOCK as usize), "{kind:?}: the block is recorded clean");
        assert_eq!(in_cache, reads(FLUSHED), "{kind:?}: the flushed write is in the cache block");
        assert_eq!(in_origin, reads(ORIGIN_STAMP + OBLOCK), "{kind:?}: the origin holds the old data");
    }
}

/// The next activation on the crashed disks takes the block as clean; the
/// cleaner writes back only the blocks the metadata calls dirty, and
/// passthrough then reads the origin's old data: the flushed write is lost.
#[test]
fn the_next_activation_loses_the_flushed_write() {
    let Some(runs) = boot() else { return };
    for v in [1, 2] {
        let run = run_of(runs, Kind::Loss(v));
        let b = reboot_ops(false).1;
        let outcomes: Vec<&str> = run.result.ops.iter().map(|o| o.outcome.as_str()).collect();
        assert!(outcomes.iter().all(|&o| o == "ok"), "v{v}: every op acknowledged: {outcomes:?}");
        let status = |i: usize| {
            let line = op_read(run, i).to_string();
            eprintln!("v{v}: op {i}: status {line}");
            line
        };
        let model_dirty = MAPPINGS.iter().filter(|m| m.2).count() as u64;

        // The reboot: ten blocks resident, the model's three dirty; block
        // 0 is not among them. Reads still come from the cache block.
        assert_eq!(resident_dirty(&status(b + at::REACTIVATED)), (10, model_dirty), "v{v}: loaded as clean");
        let got = op_read(run, b + at::READ_CACHED);
        eprintln!("v{v}: op {}: read of origin block {OBLOCK} while cached: {got}", b + at::READ_CACHED);
        assert_eq!(got, reads(FLUSHED), "v{v}: the cached block still serves the flushed write");

        // The cleaner: nothing left dirty.
        status(b + at::CLEANER[0]);
        let cleaned = status(b + at::CLEANER[1]);
        assert_eq!(resident_dirty(&cleaned), (10, 0), "v{v}: the cleaner cleaned every dirty block");

        // Passthrough (allowed: every block is clean) reads the origin.
        assert_eq!(resident_dirty(&status(b + at::PASSTHROUGH)), (10, 0));
        let got = op_read(run, b + at::READ_PASSTHROUGH);
        eprintln!(
            "v{v}: op {}: read of origin block {OBLOCK} in passthrough: {got}",
            b + at::READ_PASSTHROUGH
        );
        assert_eq!(
            got,
            reads(ORIGIN_STAMP + OBLOCK),
            "v{v}: passthrough reads the origin's old data, not the flushed write"
        );

        // invalidate_cblocks drops the mapping; back in writeback the old
        // data is all there is.
        assert_eq!(resident_dirty(&status(b + at::INVALIDATED)), (9, 0));
        let got = op_read(run, b + at::READ_AFTER);
        eprintln!("v{v}: op {}: read of origin block {OBLOCK} back in writeback: {got}", b + at::READ_AFTER);
        assert_eq!(got, reads(ORIGIN_STAMP + OBLOCK), "v{v}: the flushed write is gone");
        status(b + at::LAST);

        // On disk: block 0 unmapped, the flushed data orphaned in the cache
        // block, the origin's old data; the three blocks the metadata
        // called dirty were written back.
        let img = image(run);
        assert!(img.superblock.clean_shutdown());
        assert!(!img.mappings[CBLOCK as usize].valid(), "v{v}: cache block {CBLOCK} unmapped");
        let (in_cache, in_origin) = on_disk(run, CBLOCK, OBLOCK);
        eprintln!(
            "v{v}: at the end: cache block {CBLOCK} reads {in_cache}, origin block {OBLOCK} {in_origin}"
        );
        assert_eq!(in_cache, reads(FLUSHED));
        assert_eq!(in_origin, reads(ORIGIN_STAMP + OBLOCK));
        for &(c, o, _) in MAPPINGS.iter().filter(|m| m.2) {
            let (_, origin) = on_disk(run, c, o);
            assert_eq!(origin, reads(CACHE_STAMP + u64::from(c)), "v{v}: dirty cache block {c} written back");
        }
    }
}

/// The control: a status between the flush and the crash commits, which
/// clears CLEAN_SHUTDOWN (what the candidate fix would do at the first
/// dirtying write). The next activation then takes every mapped block as
/// dirty, the cleaner writes the flushed write back, and the same path —
/// passthrough, invalidation — keeps it: the recovery works once the flag
/// is clear, so the loss above is the stale flag's doing.
#[test]
fn with_the_flag_cleared_before_the_crash_the_same_path_keeps_the_write() {
    let Some(runs) = boot() else { return };
    let run = run_of(runs, Kind::Kept(1));
    let outcomes: Vec<&str> = run.result.ops.iter().map(|o| o.outcome.as_str()).collect();
    assert!(outcomes.iter().all(|&o| o == "ok"), "control: every op acknowledged: {outcomes:?}");
    let b = reboot_ops(true).1;
    let status = |i: usize| {
        let line = op_read(run, i).to_string();
        eprintln!("control: op {i}: status {line}");
        line
    };
    // The status before the crash: the model's three dirty blocks and
    // block 0.
    assert_eq!(resident_dirty(&status(b - 2)), (10, 4));
    assert_eq!(resident_dirty(&status(b + at::REACTIVATED)), (10, 10), "control: every block taken as dirty");
    assert_eq!(op_read(run, b + at::READ_CACHED), reads(FLUSHED));
    status(b + at::CLEANER[0]);
    assert_eq!(resident_dirty(&status(b + at::CLEANER[1])), (10, 0), "control: the cleaner cleaned all");
    assert_eq!(resident_dirty(&status(b + at::PASSTHROUGH)), (10, 0));
    let got = op_read(run, b + at::READ_PASSTHROUGH);
    eprintln!(
        "control: op {}: read of origin block {OBLOCK} in passthrough: {got}",
        b + at::READ_PASSTHROUGH
    );
    assert_eq!(got, reads(FLUSHED), "control: the flushed write was written back");
    assert_eq!(resident_dirty(&status(b + at::INVALIDATED)), (9, 0));
    assert_eq!(op_read(run, b + at::READ_AFTER), reads(FLUSHED));
    status(b + at::LAST);
    let (in_cache, in_origin) = on_disk(run, CBLOCK, OBLOCK);
    eprintln!(
        "control: at the end: cache block {CBLOCK} reads {in_cache}, origin block {OBLOCK} {in_origin}"
    );
    assert_eq!(in_origin, reads(FLUSHED), "control: the origin holds the flushed write");
}

/// Without the suspend and resume, the same write and fsync right after
/// the activation of the cleanly shut down metadata, then the crash: what
/// On 6.1 the activation's own commit has already cleared CLEAN_SHUTDOWN:
/// the next activation takes every block as dirty. The window is the
/// resume's only.
#[test]
fn after_a_fresh_activation_the_flag_is_already_clear() {
    let Some(runs) = boot() else { return };
    let run = run_of(runs, Kind::NoResume(1));
    let img = image(run);
    let (in_cache, in_origin) = on_disk(run, CBLOCK, OBLOCK);
    eprintln!(
        "no resume: after the crash: CLEAN_SHUTDOWN {}, cache block {CBLOCK} dirty {}; the cache block reads \
         {in_cache}, origin block {OBLOCK} {in_origin}",
        img.superblock.clean_shutdown(),
        img.is_dirty(CBLOCK as usize),
    );
    assert_eq!(in_cache, reads(FLUSHED));
    assert!(!img.superblock.clean_shutdown(), "no resume: the activation cleared CLEAN_SHUTDOWN");
}
