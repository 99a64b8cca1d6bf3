//! What the dm-cache VM tests share: the CI rule, stamped blocks, empty
//! metadata, one boot for a list of jobs, and reading status lines and op
//! results.

// Each test uses its own part of this module.
#![allow(dead_code)]

use dmsim_kernel_shim::{CacheSpec, Job, KernelRun, KernelShim, ShimError};
use dmsim_model::block_device::MemDevice;
use dmsim_model::cache::CacheMetadata;
use dmsim_traces::stamp;

/// Under `CI=true` a missing prerequisite fails instead of skipping.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// A block of `bs` sectors stamped as write `write` of run `run`, for the
/// sectors from `first_sector`.
pub fn stamped(run: u64, bs: u64, write: u64, first_sector: u64) -> Vec<u8> {
    let mut b = vec![0u8; (bs * 512) as usize];
    stamp::fill(&mut b, run, write, 0, first_sector);
    b
}

/// The cache the finding tests build: `cache_blocks` blocks of `bs`
/// sectors over `origin_blocks`, metadata of `metadata_sectors` in
/// `version`, writeback with smq and `threshold` as its migration
/// threshold, the job's disks sized to fit.
pub fn writeback_spec(
    run: u64,
    bs: u64,
    cache_blocks: u64,
    origin_blocks: u64,
    metadata_sectors: u64,
    version: u32,
    threshold: Option<u64>,
) -> CacheSpec {
    CacheSpec {
        run,
        block_sectors: bs,
        cache_blocks,
        origin_blocks,
        metadata_sectors,
        metadata2: version == 2,
        mode: "writeback".into(),
        migration_threshold: threshold,
        disk_blocks: None,
    }
}

/// Empty cache metadata, formatted and sized by the model, committed.
pub fn empty_metadata(bs: u64, cache_blocks: u64, metadata_sectors: u64, version: u32) -> Vec<u8> {
    let mut md = CacheMetadata::format(MemDevice::new(metadata_sectors), bs as u32, version).unwrap();
    md.resize(cache_blocks as u32).unwrap();
    md.commit(false).unwrap();
    md.close().as_bytes().to_vec()
}

/// Runs `jobs` in one boot (`what` names them in the SKIPPED line); every
/// job's agent must have succeeded. None when the VM's prerequisites are
/// missing outside CI.
pub fn boot(what: &str, jobs: &[Job]) -> Option<Vec<KernelRun>> {
    let shim = match KernelShim::prepare() {
        Ok(s) => s,
        Err(e @ ShimError::Missing(_)) if !in_ci() => {
            eprintln!("SKIPPED: {what}: {e}");
            return None;
        }
        Err(e) => panic!("preparing the VM: {e}"),
    };
    let runs = shim.run_jobs(jobs).unwrap_or_else(|e| panic!("{what}: {e}"));
    for (i, run) in runs.iter().enumerate() {
        assert_eq!(run.result.error, None, "job {i}: the agent failed; console tail:\n{}", {
            let lines: Vec<&str> = run.console.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        });
    }
    Some(runs)
}

/// Op `i`'s outcome and what it read (a read's summary, a status line).
pub fn outcome(run: &KernelRun, i: usize) -> (&str, Option<&str>) {
    let op = &run.result.ops[i];
    (op.outcome.as_str(), op.read.as_deref())
}

/// Field `i` of a cache INFO status line as a number (`<metadata block
/// size> <used>/<total> <cache block size> <resident>/<total> <read hits>
/// <read misses> <write hits> <write misses> <demotions> <promotions>
/// <dirty> …`: 3 is resident — its part before the slash —, 9 promotions,
/// 10 dirty).
pub fn status_field(line: &str, i: usize) -> u64 {
    let f = dmsim_kernel_shim::protocol::cache_status_field(line, i)
        .unwrap_or_else(|| panic!("status {line:?} has no field {i}"));
    f.parse().unwrap_or_else(|_| panic!("status {line:?}: field {i} is {f:?}"))
}
