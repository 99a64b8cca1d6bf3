//! Finding: dm-cache on the stock 6.1 kernel commits a mapping whose data
//! never reached the cache device, so after a power cut a block reads data
//! that was never written to it (docs/findings.md, "dm-cache", model
//! finding 1, `CacheFixes::flush_before_commit`).
//!
//! dm-cache's `commit` flushes the metadata device only; unlike dm-thin it
//! does not flush its data devices first. A cache block's new contents — a
//! promotion's copy, or a write promoted by overwrite — can therefore still
//! be in the cache device's volatile write cache when a commit makes the
//! mapping durable. A power cut then keeps the mapping and loses the data:
//! the next activation takes the block as dirty (an unclean shutdown),
//! serves whatever the cache block held before, and would write it back
//! over the origin's good data.
//!
//! The job: a fresh cache (writeback, smq, no background writeback), then
//!
//! 1. from here on every write to the cache device is dropped
//!    (`drop_cache_writes`: dm-flakey's `drop_writes` under the cache
//!    target) — the state of a power cut in which the device had flushed
//!    nothing since: no FLUSH reaches the cache device in this job, because
//!    the only commit (step 3) flushes the metadata device alone;
//! 2. a plain (not FUA) write of a whole uncached origin block X: smq
//!    promotes it by overwrite, the write is acknowledged;
//! 3. a status, which commits the metadata (the mapping X → cache block c);
//! 4. crash (the metadata device fails from here), reboot on the disks as
//!    they are, read X.
//!
//! * **Committed**: X reads cache block c's old contents — data that was
//!   never written to X (neither X's old data nor the write).
//! * **Control**: the same without the status: nothing committed, the
//!   mapping is gone, X reads its old data (a lost unflushed write, which is
//!   legal).
//!
//! Needs `qemu-system-x86_64` and `linux-image-amd64`; without them it
//! prints SKIPPED, or fails under `CI=true`.

use std::sync::OnceLock;

#[path = "common/cache_vm.rs"]
mod cache_vm;
use cache_vm::outcome;

use dmsim_kernel_shim::{CacheSpec, CacheStep, Job, KernelRun};
use dmsim_traces::Op;

const RUN: u64 = 0xF1A5;
const BS: u64 = 128;
const CACHE_BLOCKS: u64 = 16;
const ORIGIN_BLOCKS: u64 = 64;
const METADATA_SECTORS: u64 = 8192;
const ORIGIN_STAMP: u64 = 2_000_000;
const CACHE_STAMP: u64 = 1_000_000;
/// The origin block written.
const OBLOCK: u64 = 9;
/// A migration threshold below one block: no background writeback.
const QUIET: Option<u64> = Some(64);
/// A status query (the cache job's `tick`).
const STATUS: Op = Op::Tick { millis: 0 };

fn spec(version: u32) -> CacheSpec {
    cache_vm::writeback_spec(RUN, BS, CACHE_BLOCKS, ORIGIN_BLOCKS, METADATA_SECTORS, version, QUIET)
}

fn stamped(write: u64, first_sector: u64) -> Vec<u8> {
    cache_vm::stamped(RUN, BS, write, first_sector)
}

fn metadata(version: u32) -> Vec<u8> {
    cache_vm::empty_metadata(BS, CACHE_BLOCKS, METADATA_SECTORS, version)
}

fn origin_image() -> Vec<u8> {
    (0..ORIGIN_BLOCKS).flat_map(|b| stamped(ORIGIN_STAMP + b, b * BS)).collect()
}

/// Each cache block holds a stamp naming origin block X's sectors, so a
/// read of X that returns a cache block's old contents decodes as that
/// stamp (`w100000c`), telling which block it came from.
fn cache_image() -> Vec<u8> {
    (0..CACHE_BLOCKS).flat_map(|c| stamped(CACHE_STAMP + c, OBLOCK * BS)).collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// (version): the status commits before the crash.
    Committed(u32),
    /// No commit before the crash.
    Control,
}

const KINDS: [Kind; 3] = [Kind::Committed(1), Kind::Committed(2), Kind::Control];

/// The ops and the index of the first op after the reboot.
fn ops(kind: Kind) -> (Vec<Op>, usize) {
    let write = Op::Write {
        dev: 0,
        sector: (OBLOCK * BS) as u32,
        nr_sectors: BS as u16,
        fua: false,
        preflush: false,
    };
    let mut ops = vec![write];
    if kind != Kind::Control {
        ops.push(STATUS);
    }
    ops.push(Op::CRASH);
    let reboot = ops.len();
    ops.extend([STATUS, Op::Read { dev: 0, sector: (OBLOCK * BS) as u32, nr_sectors: BS as u16 }, STATUS]);
    (ops, reboot)
}

fn job(kind: Kind) -> Job {
    let version = if let Kind::Committed(v) = kind { v } else { 1 };
    let (ops, reboot) = ops(kind);
    let steps = [
        (0, CacheStep::DropCacheWrites),
        (
            reboot,
            CacheStep::Reactivate {
                mode: "writeback".into(),
                policy: "smq".into(),
                migration_threshold: QUIET,
            },
        ),
    ];
    Job::cache_with_steps(&spec(version), &steps, ops, metadata(version), cache_image(), origin_image())
}

fn boot() -> Option<&'static Vec<KernelRun>> {
    static BOOT: OnceLock<Option<Vec<KernelRun>>> = OnceLock::new();
    BOOT.get_or_init(|| cache_vm::boot("the dm-cache commit-without-data-flush finding", &KINDS.map(job)))
        .as_ref()
}

fn run_of(runs: &[KernelRun], kind: Kind) -> &KernelRun {
    &runs[KINDS.iter().position(|&k| k == kind).unwrap()]
}

/// (resident, dirty) of a cache status line.
fn resident_dirty(line: &str) -> (u64, u64) {
    (cache_vm::status_field(line, 3), cache_vm::status_field(line, 10))
}

#[test]
fn a_committed_mapping_whose_data_was_lost_serves_data_never_written_to_the_block() {
    let Some(runs) = boot() else { return };
    for v in [1, 2] {
        let kind = Kind::Committed(v);
        let run = run_of(runs, kind);
        let (_, reboot) = ops(kind);
        assert_eq!(outcome(run, 0).0, "ok", "v{v}: the write was acknowledged");
        let before = outcome(run, 1).1.expect("the status before the crash");
        let after = outcome(run, reboot).1.expect("the status after the reboot");
        let (ok, got) = outcome(run, reboot + 1);
        eprintln!(
            "v{v}: status before the crash {before}; after the reboot {after}; read of X: {ok} {got:?}"
        );
        assert_eq!(resident_dirty(before).0, 1, "v{v}: the write was promoted (one block resident)");
        assert_eq!(resident_dirty(after), (1, 1), "v{v}: the committed mapping came back, taken as dirty");
        let got = got.expect("the read returned data");
        let written = format!("w0*{BS}");
        let old = format!("w{}*{BS}", ORIGIN_STAMP + OBLOCK);
        assert_ne!(got, written, "v{v}: the write was dropped with the cache device's volatile cache");
        assert_ne!(got, old, "v{v}: not X's old data either");
        assert!(
            got.starts_with(&format!("w{CACHE_STAMP}")) || got.starts_with("w100000"),
            "v{v}: X reads a cache block's old contents: {got}"
        );
    }
}

#[test]
fn without_the_commit_the_block_reads_its_old_data() {
    let Some(runs) = boot() else { return };
    let run = run_of(runs, Kind::Control);
    let (_, reboot) = ops(Kind::Control);
    let after = outcome(run, reboot).1.expect("status");
    let (_, got) = outcome(run, reboot + 1);
    eprintln!("control: after the reboot {after}; read of X {got:?}");
    assert_eq!(resident_dirty(after).0, 0, "control: nothing was committed");
    assert_eq!(got, Some(format!("w{}*{BS}", ORIGIN_STAMP + OBLOCK).as_str()), "control: X's old data");
}
