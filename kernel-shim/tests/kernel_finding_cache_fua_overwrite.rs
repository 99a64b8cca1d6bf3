//! The dm-cache FUA overwrite finding (docs/findings.md, "dm-cache",
//! finding 2, `CacheFixes::fua_overwrite_waits_for_commit`) on the stock
//! 6.1 kernel, with ext4 on the cache device.
//!
//! The model's claim: in writeback mode a write covering a whole cache
//! block of an uncached origin block, with a free cache block, is promoted
//! by overwrite (the bio is the copy); `map_bio` hands it to the migration
//! and returns before its REQ_FUA check, and the migration completes the
//! bio once the mapping is in the open transaction, without a commit. A
//! bare REQ_FUA bio is then acknowledged with its mapping uncommitted.
//!
//! From user space a bare REQ_FUA bio comes from iomap's direct O_DSYNC
//! overwrite: ext4 maps an allocated, written extent with no metadata
//! pending for datasync (no `IOMAP_F_DIRTY`), the device advertises FUA
//! (dm-cache's `flush_supported`), so iomap sets REQ_FUA and drops the
//! flush it would otherwise send at completion. Here: an ext4 image made
//! on the host (`mke2fs -d`) holds a file whose data covers a whole cache
//! block, aligned on the device; the agent mounts the cache device
//! (`noatime,lazytime,commit=600`: no journal commit — no flush — in the
//! window), `syncfs`, writes that cache block's worth of the file with
//! `O_DIRECT` and `RWF_DSYNC`, and records the cache's status (without a
//! commit) and the cache and metadata devices' `/sys` counters around it;
//! then the crash (the metadata device fails), the file system cut off
//! (the cache device's table becomes `error`) and unmounted, the reboot on
//! the disks as they are, and a raw read of the block.
//!
//! * **Dsync** (metadata v1 and v2): the write alone.
//! * **Fsync** (the control): the same write, then `fsync` (a flush: a
//!   commit) before the crash.
//! * **Sync** (the mechanism's control): the write with `RWF_SYNC`
//!   instead: iomap then sends it without REQ_FUA and syncs at completion
//!   (`generic_write_sync`: a flush, a commit) before acknowledging it.
//!
//! Needs `qemu-system-x86_64`, `linux-image-amd64`, `mke2fs` and
//! `debugfs` (e2fsprogs); without them it prints SKIPPED, or fails under
//! `CI=true`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

#[path = "common/cache_vm.rs"]
mod cache_vm;
use cache_vm::outcome;

use dmsim_kernel_shim::{CacheSpec, CacheStep, FileSync, FileWrite, Job, KernelRun};
use dmsim_traces::Op;

const RUN: u64 = 0xF0B;
const BS: u64 = 128;
const CACHE_BLOCKS: u64 = 16;
/// 16 MiB: the ext4 file system's size.
const ORIGIN_BLOCKS: u64 = 256;
const METADATA_SECTORS: u64 = 8192;
const ORIGIN_STAMP: u64 = 2_000_000;
const CACHE_STAMP: u64 = 1_000_000;
/// The file system's block size, and its blocks per cache block.
const FS_BLOCK: u64 = 4096;
const FS_BLOCKS_PER_CACHE_BLOCK: u64 = BS * 512 / FS_BLOCK;
/// The file in the image, and its size.
const FILE: &str = "data";
const FILE_BYTES: usize = 1 << 20;
/// The stamps' write number of the file write.
const WRITTEN: u64 = 0;
/// A migration threshold below one block: no background promotion.
const QUIET: Option<u64> = Some(64);
/// The mount: no atime or mtime updates through the journal, and the
/// journal's commit timer far beyond the job (a commit flushes).
const MOUNT_OPTIONS: &str = "noatime,lazytime,commit=600,errors=continue";

/// The ext4 image and where the file's aligned cache block lies.
struct FsImage {
    bytes: Vec<u8>,
    /// The byte offset in the file of the aligned whole cache block.
    file_offset: u64,
    /// The device sector it lies on (a cache block boundary).
    device_sector: u64,
}

/// An e2fsprogs tool from PATH or the sbin directories.
fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn run_tool(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cmd:?}: {}: {}", out.status, String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The first file block that starts a run of a cache block's worth of
/// physically contiguous blocks on a cache block boundary: (its index in
/// the file, its physical block).
fn aligned_run(blocks: &[u64]) -> Option<(u64, u64)> {
    let n = FS_BLOCKS_PER_CACHE_BLOCK as usize;
    (0..blocks.len().saturating_sub(n - 1)).find_map(|i| {
        let first = blocks[i];
        let contiguous = blocks[i..i + n].iter().enumerate().all(|(j, &b)| b == first + j as u64);
        (first.is_multiple_of(FS_BLOCKS_PER_CACHE_BLOCK) && contiguous).then_some((i as u64, first))
    })
}

/// Makes the image with `mke2fs -d` (a file of non-zero bytes, so every
/// block is allocated and written), finds the file's blocks with
/// `debugfs`, and stamps the aligned cache block as the origin's data.
/// `Err` names what failed; None: a tool is missing.
fn make_fs_image(dir: &Path) -> Option<Result<FsImage, String>> {
    let (mke2fs, debugfs) = (tool("mke2fs")?, tool("debugfs")?);
    Some((|| {
        let root = dir.join("root");
        std::fs::create_dir_all(&root).map_err(|e| format!("create {}: {e}", root.display()))?;
        std::fs::write(root.join(FILE), vec![0xa5u8; FILE_BYTES])
            .map_err(|e| format!("write the file: {e}"))?;
        let img = dir.join("ext4.img");
        let fs_blocks = ORIGIN_BLOCKS * BS * 512 / FS_BLOCK;
        run_tool(
            Command::new(&mke2fs)
                .args(["-q", "-F", "-t", "ext4", "-b", &FS_BLOCK.to_string()])
                .args(["-E", "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0", "-d"])
                .arg(&root)
                .arg(&img)
                .arg(fs_blocks.to_string()),
        )?;
        let listed = run_tool(Command::new(&debugfs).args(["-R", &format!("blocks /{FILE}")]).arg(&img))?;
        let blocks: Vec<u64> = listed
            .split_whitespace()
            .map(|w| w.parse().map_err(|_| format!("debugfs listed {w:?} as a block")))
            .collect::<Result<_, _>>()?;
        if blocks.len() as u64 != FILE_BYTES as u64 / FS_BLOCK {
            return Err(format!("debugfs listed {} blocks of /{FILE}: {listed:?}", blocks.len()));
        }
        let (index, first) =
            aligned_run(&blocks).ok_or_else(|| format!("no aligned cache block in /{FILE}: {blocks:?}"))?;
        let mut bytes = std::fs::read(&img).map_err(|e| format!("read {}: {e}", img.display()))?;
        let device_sector = first * FS_BLOCK / 512;
        let at = (device_sector * 512) as usize;
        bytes[at..at + (BS * 512) as usize].copy_from_slice(&stamped(ORIGIN_STAMP, device_sector));
        Ok(FsImage { bytes, file_offset: index * FS_BLOCK, device_sector })
    })())
}

fn fs_image() -> Option<&'static FsImage> {
    static IMAGE: OnceLock<Option<FsImage>> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let dir = dmsim_kernel_shim::vm::TempDir::new().expect("a temporary directory");
            match make_fs_image(dir.path()) {
                None if cache_vm::in_ci() => {
                    panic!("CI=true and a prerequisite is missing: mke2fs or debugfs")
                }
                None => {
                    eprintln!(
                        "SKIPPED: the dm-cache FUA overwrite on ext4: no mke2fs or debugfs (e2fsprogs)"
                    );
                    None
                }
                Some(Err(e)) => panic!("making the ext4 image: {e}"),
                Some(Ok(image)) => Some(image),
            }
        })
        .as_ref()
}

fn spec(version: u32) -> CacheSpec {
    cache_vm::writeback_spec(RUN, BS, CACHE_BLOCKS, ORIGIN_BLOCKS, METADATA_SECTORS, version, QUIET)
}

fn stamped(write: u64, first_sector: u64) -> Vec<u8> {
    cache_vm::stamped(RUN, BS, write, first_sector)
}

fn reads(write: u64) -> String {
    format!("w{write}*{BS}")
}

fn cache_image() -> Vec<u8> {
    (0..CACHE_BLOCKS).flat_map(|c| stamped(CACHE_STAMP + c, c * BS)).collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// (metadata version): the O_DSYNC write alone before the crash.
    Dsync(u32),
    /// The O_DSYNC write and an fsync before the crash (the control).
    Fsync,
    /// The write with RWF_SYNC (no FUA; a sync at completion).
    Sync,
}

const KINDS: [Kind; 4] = [Kind::Dsync(1), Kind::Dsync(2), Kind::Fsync, Kind::Sync];

/// The file write's step index (its notes are `step1.…`).
const WRITE_STEP: usize = 1;
/// The ops: the crash, then (after the reboot) a status, the raw read of
/// the written range, a status.
const REBOOT: usize = 1;
const READ: usize = 2;

fn job(kind: Kind, image: &FsImage) -> Job {
    let version = if let Kind::Dsync(v) = kind { v } else { 1 };
    let write = FileWrite {
        path: FILE.into(),
        offset: image.file_offset,
        sectors: BS,
        device_sector: image.device_sector,
        write: WRITTEN,
        sync: match kind {
            Kind::Dsync(_) => FileSync::Dsync,
            Kind::Fsync => FileSync::DsyncFsync,
            Kind::Sync => FileSync::Sync,
        },
    };
    let steps = [
        (0, CacheStep::MountExt4(MOUNT_OPTIONS.into())),
        (0, CacheStep::FileWrite(write)),
        (REBOOT, CacheStep::CutAndUnmount),
        (
            REBOOT,
            CacheStep::Reactivate {
                mode: "writeback".into(),
                policy: "smq".into(),
                migration_threshold: QUIET,
            },
        ),
    ];
    let read = Op::Read { dev: 0, sector: image.device_sector as u32, nr_sectors: BS as u16 };
    let ops = vec![Op::CRASH, Op::Tick { millis: 0 }, read, Op::Tick { millis: 0 }];
    let metadata = cache_vm::empty_metadata(BS, CACHE_BLOCKS, METADATA_SECTORS, version);
    Job::cache_with_steps(&spec(version), &steps, ops, metadata, cache_image(), image.bytes.clone())
}

fn boot() -> Option<(&'static FsImage, &'static Vec<KernelRun>)> {
    static BOOT: OnceLock<Option<Vec<KernelRun>>> = OnceLock::new();
    let image = fs_image()?;
    let runs = BOOT
        .get_or_init(|| cache_vm::boot("the dm-cache FUA overwrite on ext4", &KINDS.map(|k| job(k, image))))
        .as_ref()?;
    Some((image, runs))
}

fn run_of(runs: &[KernelRun], kind: Kind) -> &KernelRun {
    &runs[KINDS.iter().position(|&k| k == kind).expect("a listed kind")]
}

/// The file write's note `what`.
fn note<'a>(run: &'a KernelRun, what: &str) -> &'a str {
    let key = format!("step{WRITE_STEP}.{what}");
    let found = run.result.notes.iter().find(|(k, _)| *k == key);
    found.map(|(_, v)| v.as_str()).unwrap_or_else(|| panic!("no note {key}: {:?}", run.result.notes))
}

/// Field `i` of a `/sys/block/*/stat` line (4: writes completed, 6:
/// sectors written, 14: flushes completed).
fn stat_field(line: &str, i: usize) -> u64 {
    let f = line.split_whitespace().nth(i).unwrap_or_else(|| panic!("stat {line:?} has no field {i}"));
    f.parse().unwrap_or_else(|_| panic!("stat {line:?}: field {i} is {f:?}"))
}

/// (writes, sectors written, flushes) from `from` to `to` of device `dev`
/// (`cache` or `meta`).
fn stat_delta(run: &KernelRun, dev: &str, from: &str, to: &str) -> [u64; 3] {
    let (a, b) = (note(run, &format!("{dev}-stat-{from}")), note(run, &format!("{dev}-stat-{to}")));
    [4, 6, 14].map(|i| stat_field(b, i) - stat_field(a, i))
}

/// The cache blocks holding the write at the end.
fn cache_blocks_holding_the_write(run: &KernelRun, image: &FsImage) -> Vec<u64> {
    let data = run.cache_data.as_ref().expect("a cache job's data");
    (0..CACHE_BLOCKS)
        .filter(|&c| {
            let b = &data.cache[(c * BS * 512) as usize..((c + 1) * BS * 512) as usize];
            dmsim_kernel_shim::protocol::summarize(b, RUN, image.device_sector) == reads(WRITTEN)
        })
        .collect()
}

fn report(kind: Kind, run: &KernelRun, image: &FsImage) {
    let (_, status) = outcome(run, REBOOT);
    let (_, got) = outcome(run, READ);
    eprintln!(
        "{kind:?}: file offset {} on device sector {}; write {}; status before {:?}, after {:?}; cache \
         device (writes, sectors, flushes) over the write {:?}, metadata device {:?}; after the reboot: \
         status {status:?}, read {got:?}; cache blocks holding the write {:?}",
        image.file_offset,
        image.device_sector,
        note(run, "outcome"),
        note(run, "status-before"),
        note(run, "status-after"),
        stat_delta(run, "cache", "before", "after"),
        stat_delta(run, "meta", "before", "after"),
        cache_blocks_holding_the_write(run, image),
    );
    if kind == Kind::Fsync {
        eprintln!(
            "{kind:?}: fsync {}; over the fsync: cache device {:?}, metadata device {:?}",
            note(run, "fsync"),
            stat_delta(run, "cache", "after", "after-fsync"),
            stat_delta(run, "meta", "after", "after-fsync"),
        );
    }
}

/// Every variant: the write is acknowledged and promoted by overwrite
/// (promotions and residency up by one, the data in a cache block). An
/// `RWF_DSYNC` write is one bio of a whole cache block and no flush (the
/// cache device counts one write of 128 sectors), with nothing written to
/// the metadata device (no commit) when it completes; an `RWF_SYNC` one is
/// followed by a flush that commits before it returns.
#[test]
fn the_dsync_file_write_is_one_bare_fua_bio_promoted_by_overwrite() {
    let Some((image, runs)) = boot() else { return };
    eprintln!("one boot, {} jobs, VM {:.1} s", runs.len(), runs[0].wall.as_secs_f64());
    for kind in KINDS {
        let run = run_of(runs, kind);
        report(kind, run, image);
        assert_eq!(note(run, "outcome"), "ok", "{kind:?}: the write was acknowledged");
        let field = |when: &str, i: usize| cache_vm::status_field(note(run, &format!("status-{when}")), i);
        assert_eq!(field("after", 9), field("before", 9) + 1, "{kind:?}: one promotion");
        assert_eq!(field("after", 3), field("before", 3) + 1, "{kind:?}: one block more resident");
        let (cache, meta) =
            (stat_delta(run, "cache", "before", "after"), stat_delta(run, "meta", "before", "after"));
        if kind == Kind::Sync {
            assert!(cache[0] > 1 && cache[1] >= BS, "{kind:?}: the write and a flush: {cache:?}");
            assert!(meta[0] > 0, "{kind:?}: a commit before the write returned");
        } else {
            assert_eq!(cache, [1, BS, 0], "{kind:?}: one bio, no flush");
            assert_eq!(meta[0], 0, "{kind:?}: no commit");
        }
        assert_eq!(
            cache_blocks_holding_the_write(run, image).len(),
            1,
            "{kind:?}: its data is in a cache block"
        );
    }
}

/// The finding on the stock kernel: the acknowledged O_DSYNC write is lost
/// — after the reboot the block is not mapped and reads the origin's old
/// data — while the controls (an fsync before the crash; RWF_SYNC) keep
/// it.
#[test]
fn the_acknowledged_dsync_write_is_lost_and_an_fsync_keeps_it() {
    let Some((_, runs)) = boot() else { return };
    for kind in KINDS {
        let run = run_of(runs, kind);
        let (status, got) = (outcome(run, REBOOT).1.expect("a status"), outcome(run, READ).1);
        let resident = cache_vm::status_field(status, 3);
        match kind {
            Kind::Dsync(_) => {
                assert_eq!(resident, 0, "{kind:?}: the mapping was not committed");
                assert_eq!(got, Some(reads(ORIGIN_STAMP).as_str()), "{kind:?}: the write is lost");
            }
            Kind::Fsync | Kind::Sync => {
                if kind == Kind::Fsync {
                    assert_eq!(note(run, "fsync"), "ok");
                    assert!(stat_delta(run, "meta", "after", "after-fsync")[0] > 0, "the fsync committed");
                }
                assert_eq!(resident, 1, "{kind:?}: the mapping was committed");
                assert_eq!(got, Some(reads(WRITTEN).as_str()), "{kind:?}: the write survived");
            }
        }
    }
}

#[test]
fn an_aligned_run_is_found_only_on_a_boundary() {
    let n = FS_BLOCKS_PER_CACHE_BLOCK;
    let blocks: Vec<u64> = (1291..1291 + 64).collect();
    assert_eq!(aligned_run(&blocks), Some((1296 - 1291, 1296)));
    let mut broken: Vec<u64> = (32..32 + n).collect();
    broken[3] = 999;
    assert_eq!(aligned_run(&broken), None);
    assert_eq!(aligned_run(&[]), None);
}
