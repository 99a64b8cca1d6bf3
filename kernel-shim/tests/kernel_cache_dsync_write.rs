//! A whole-block O_DSYNC write that dm-cache promotes by overwrite
//! survives a crash on the stock 6.1 kernel, because the block layer
//! follows it with a flush — the boundary of a model finding
//! (docs/findings.md, "dm-cache", the FUA overwrite).
//!
//! The model finding (`CacheFixes::fua_overwrite_waits_for_commit`): in
//! writeback mode a write covering a whole cache block of an uncached
//! origin block, with free cache blocks, is promoted at once using the bio
//! itself as the copy ("overwrite"). `map_bio` hands the bio to the
//! migration and returns before its FUA check; the migration writes the bio
//! to the new cache block, inserts the mapping into the open transaction and
//! completes the bio. A bare FUA bio is therefore acknowledged with its
//! mapping uncommitted, and a crash loses it.
//!
//! What the VM can send is not a bare FUA bio: the agent writes FUA as
//! `pwritev2(RWF_DSYNC)` on the block device, and the block device's write
//! path sets REQ_FUA *and* then syncs (`generic_write_sync` → a PREFLUSH
//! bio), and the flush commits. This test holds that boundary on the stock
//! kernel: in every variant the write is promoted by overwrite (its data is
//! in a cache block) and survives the crash. A bare FUA bio comes, for
//! example, from iomap's O_DSYNC direct overwrite on XFS or ext4, which
//! skips the sync when the device advertises FUA — and dm-cache always
//! does (`flush_supported`). `kernel_finding_cache_fua_overwrite.rs` sends
//! one from ext4 in the VM and shows the loss.
//!
//! * **Dsync**: the O_DSYNC write, crash, reboot, read (v1 and v2).
//! * **Status**: the same with a status (a commit) before the crash.
//! * **Fsync**: a plain write and an fsync.
//!
//! Needs `qemu-system-x86_64` and `linux-image-amd64`; without them it
//! prints SKIPPED, or fails under `CI=true`.

use std::sync::OnceLock;

#[path = "common/cache_vm.rs"]
mod cache_vm;
use cache_vm::outcome;

use dmsim_kernel_shim::{CacheSpec, CacheStep, Job, KernelRun};
use dmsim_model::block_device::MemDevice;
use dmsim_model::cache::inspect::read_image;
use dmsim_traces::Op;

const RUN: u64 = 0xF0A;
const BS: u64 = 128;
const CACHE_BLOCKS: u64 = 16;
const ORIGIN_BLOCKS: u64 = 64;
const METADATA_SECTORS: u64 = 8192;
const ORIGIN_STAMP: u64 = 2_000_000;
const CACHE_STAMP: u64 = 1_000_000;
/// The origin block written (not cached: the metadata maps nothing).
const OBLOCK: u64 = 9;
/// The stamp of the write (the job's first write).
const WRITTEN: u64 = 0;
/// A migration threshold below one block: no background writeback.
const QUIET: Option<u64> = Some(64);

fn spec(version: u32) -> CacheSpec {
    cache_vm::writeback_spec(RUN, BS, CACHE_BLOCKS, ORIGIN_BLOCKS, METADATA_SECTORS, version, QUIET)
}

fn stamped(write: u64, first_sector: u64) -> Vec<u8> {
    cache_vm::stamped(RUN, BS, write, first_sector)
}

fn reads(write: u64) -> String {
    format!("w{write}*{BS}")
}

/// Empty cache metadata of the given version, formatted and sized by the
/// model (the kernel accepts it: the metadata tests hold that).
fn metadata(version: u32) -> Vec<u8> {
    cache_vm::empty_metadata(BS, CACHE_BLOCKS, METADATA_SECTORS, version)
}

fn origin_image() -> Vec<u8> {
    (0..ORIGIN_BLOCKS).flat_map(|b| stamped(ORIGIN_STAMP + b, b * BS)).collect()
}

fn cache_image() -> Vec<u8> {
    (0..CACHE_BLOCKS).flat_map(|c| stamped(CACHE_STAMP + c, c * BS)).collect()
}

fn write(fua: bool) -> Op {
    Op::Write { dev: 0, sector: (OBLOCK * BS) as u32, nr_sectors: BS as u16, fua, preflush: false }
}

fn read() -> Op {
    Op::Read { dev: 0, sector: (OBLOCK * BS) as u32, nr_sectors: BS as u16 }
}

/// A status query (the cache job's `tick`).
const STATUS: Op = Op::Tick { millis: 0 };

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// (version): O_DSYNC write, crash, reboot, read.
    Dsync(u32),
    /// O_DSYNC write, status (a commit), crash, reboot, read.
    Status,
    /// Plain write, fsync, crash, reboot, read.
    Fsync,
}

const KINDS: [Kind; 4] = [Kind::Dsync(1), Kind::Dsync(2), Kind::Status, Kind::Fsync];

/// The job's ops and the index of the status after the reboot.
fn ops(kind: Kind) -> (Vec<Op>, usize) {
    let mut ops = match kind {
        Kind::Dsync(_) => vec![write(true)],
        Kind::Status => vec![write(true), STATUS],
        Kind::Fsync => vec![write(false), Op::Flush { dev: 0 }],
    };
    ops.push(Op::CRASH);
    let reboot = ops.len();
    ops.extend([STATUS, read(), STATUS]);
    (ops, reboot)
}

fn job(kind: Kind) -> Job {
    let version = if let Kind::Dsync(v) = kind { v } else { 1 };
    let (ops, reboot) = ops(kind);
    let steps = [(
        reboot,
        CacheStep::Reactivate { mode: "writeback".into(), policy: "smq".into(), migration_threshold: QUIET },
    )];
    Job::cache_with_steps(&spec(version), &steps, ops, metadata(version), cache_image(), origin_image())
}

fn boot() -> Option<&'static Vec<KernelRun>> {
    static BOOT: OnceLock<Option<Vec<KernelRun>>> = OnceLock::new();
    BOOT.get_or_init(|| cache_vm::boot("the dm-cache O_DSYNC write", &KINDS.map(job))).as_ref()
}

fn run_of(runs: &[KernelRun], kind: Kind) -> &KernelRun {
    &runs[KINDS.iter().position(|&k| k == kind).unwrap()]
}

/// (resident, promotions) of a cache status line.
fn resident_promotions(line: &str) -> (u64, u64) {
    (cache_vm::status_field(line, 3), cache_vm::status_field(line, 9))
}

/// The cache blocks holding the write (any of them: the policy chose).
fn cache_blocks_holding_the_write(run: &KernelRun) -> Vec<u64> {
    let data = run.cache_data.as_ref().expect("a cache job's data");
    (0..CACHE_BLOCKS)
        .filter(|&c| {
            let b = &data.cache[(c * BS * 512) as usize..((c + 1) * BS * 512) as usize];
            dmsim_kernel_shim::protocol::summarize(b, RUN, OBLOCK * BS) == reads(WRITTEN)
        })
        .collect()
}

/// Every variant: the write was promoted by overwrite (its data is in a
/// cache block, with no copy from the origin), the next activation maps
/// it, and the read returns it.
#[test]
fn a_dsync_write_promoted_by_overwrite_survives_the_crash() {
    let Some(runs) = boot() else { return };
    for kind in KINDS {
        let run = run_of(runs, kind);
        let (_, reboot) = ops(kind);
        assert_eq!(outcome(run, 0).0, "ok", "{kind:?}: the write was acknowledged");
        let (_, status) = outcome(run, reboot);
        let status = status.expect("status after the reboot");
        let (_, got) = outcome(run, reboot + 1);
        let holders = cache_blocks_holding_the_write(run);
        let img = read_image(&mut MemDevice::from_bytes(run.metadata_image.clone())).expect("decodes");
        let mapped: Vec<u64> = holders
            .iter()
            .copied()
            .filter(|&c| img.mappings[c as usize].valid() && img.mappings[c as usize].oblock == OBLOCK)
            .collect();
        eprintln!(
            "{kind:?}: after the reboot: status {status}; read of origin block {OBLOCK}: {got:?}; cache \
             blocks holding the write: {holders:?}, mapped to it at the end: {mapped:?}"
        );
        assert_eq!(holders.len(), 1, "{kind:?}: promoted: the data is in one cache block");
        assert_eq!(mapped, holders, "{kind:?}: that cache block maps the origin block");
        assert_eq!(resident_promotions(status).0, 1, "{kind:?}: the next activation maps it");
        assert_eq!(got, Some(reads(WRITTEN).as_str()), "{kind:?}: the write survived");
    }
}
