//! Resizes of dm-cache on the stock kernel (`resize` ops replayed by
//! `dmsim_kernel_shim::cache_replay`), one boot, one job: the cache and
//! the origin grown, a shrink of the origin refused over dirty blocks
//! (EFBIG), a clean shrink of both after the cleaner wrote everything back
//! (clean mappings past the ends dropped), a growth that shows the origin's
//! kept tail again, and a shrink of the cache over dirty blocks refused
//! (EINVAL, which also sets NEEDS_CHECK: the shim repairs the metadata and
//! loads the device again, as the simulator does). Every read the kernel
//! returns must be one the oracle allows (L1), and each resize's outcome
//! must be the one the model gives.
//!
//! Needs `qemu-system-x86_64` and `linux-image-amd64`; without them it
//! prints SKIPPED, or fails under `CI=true`.

use dmsim_faults::FaultSwarm;
use dmsim_kernel_shim::cache_replay::{judge, plan};
use dmsim_kernel_shim::{KernelShim, ShimError};
use dmsim_sim::cache_run::{self, CacheCampaignSettings, CacheRunConfig, CacheWorkload};
use dmsim_traces::op::{CacheIoMode, CachePolicyKind};
use dmsim_traces::{Op, Trace};

const BS: u64 = 128;

/// The resizes' outcomes the story must have (kernel 6.1 as the model has
/// it).
const OUTCOMES: [&str; 5] = ["ok", "EFBIG", "ok", "ok", "EINVAL"];

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

fn config() -> CacheRunConfig {
    let settings = CacheCampaignSettings { workload: Some(CacheWorkload::Resize), ..Default::default() };
    let mut cfg = CacheRunConfig::for_seed(5, 0, &settings);
    let c = &mut cfg.cache;
    (c.block_sectors, c.cache_blocks, c.origin_blocks) = (BS, 8, 32);
    (c.metadata_version, c.io_mode, c.policy) = (2, CacheIoMode::Writeback, CachePolicyKind::Smq);
    (c.discard_passdown, c.migration_threshold) = (true, 2048);
    cfg.swarm = FaultSwarm::none();
    cfg
}

fn write(block: u64) -> Op {
    Op::Write { dev: 0, sector: (block * BS) as u32, nr_sectors: BS as u16, fua: false, preflush: false }
}

fn read(block: u64) -> Op {
    Op::Read { dev: 0, sector: (block * BS) as u32, nr_sectors: BS as u16 }
}

fn resize(cache_blocks: u32, origin_blocks: u32) -> Op {
    Op::Resize { cache_blocks, origin_blocks }
}

fn reload(policy: CachePolicyKind) -> Op {
    Op::Reload { mode: CacheIoMode::Writeback, policy }
}

/// The story's ops.
fn ops() -> Vec<Op> {
    // Whole-block writes to discarded blocks are promoted by overwrite:
    // origin blocks 0..8 dirty in the cache.
    let mut ops = vec![Op::Discard { dev: 0, sector: 0, nr_sectors: (32 * BS) as u32 }];
    ops.extend((0..8).map(write));
    ops.extend([resize(16, 64), read(50), write(40)]);
    // Dirty blocks 4..8 lie past a 4-block origin.
    ops.push(resize(16, 4));
    ops.push(reload(CachePolicyKind::Cleaner));
    ops.extend((0..30).map(|_| Op::Tick { millis: 100 }));
    // All clean: both shrink, dropping clean mappings.
    ops.push(resize(2, 4));
    ops.extend((0..4).map(read));
    // The origin's tail is still on its disk.
    ops.push(resize(4, 48));
    ops.extend([read(5), read(40), reload(CachePolicyKind::Smq)]);
    ops.extend((0..4).map(write));
    // Dirty blocks among the cache blocks a 1-block cache drops.
    ops.push(resize(1, 48));
    ops.extend((0..6).map(read));
    ops
}

fn trace() -> Trace {
    let cfg = config();
    let out = cache_run::run_ops(&cfg, &ops(), &dmsim_sim::run::Checkers::default());
    assert!(out.violation.is_none(), "the simulator's own run fails: {:?}", out.violation);
    out.trace
}

#[test]
fn the_resize_story_runs_clean_on_the_simulator() {
    let cfg = config();
    let mut sim = dmsim_sim::cache_sim::CacheSim::new(cfg.cache).unwrap();
    for op in ops() {
        sim.apply(&op).unwrap();
        sim.quiesce().unwrap();
    }
    sim.finish().unwrap();
    let got: Vec<String> =
        sim.resize_log().iter().map(|r| r.map_or_else(|e| e.to_string(), |()| "ok".into())).collect();
    assert_eq!(got, OUTCOMES);
    assert_eq!(sim.stats().repairs, 1);
    assert_eq!(sim.geometry(), (4, 48));
    let p = plan(&trace()).unwrap();
    let spec = dmsim_kernel_shim::protocol::CacheSpec::from_header(&p.job.trace().header).unwrap();
    assert_eq!(spec.disk_blocks, Some((16, 64)), "the job's disks hold the largest sizes");
}

#[test]
fn resizes_on_the_kernel_read_what_the_oracle_allows_and_refuse_as_the_model() {
    let shim = match KernelShim::prepare() {
        Ok(s) => s,
        Err(e @ ShimError::Missing(_)) if !in_ci() => {
            eprintln!("SKIPPED: cache resizes on the kernel: {e}");
            return;
        }
        Err(e) => panic!("preparing the VM: {e}"),
    };
    let t = trace();
    let p = plan(&t).unwrap();
    let runs = shim.run_jobs(std::slice::from_ref(&p.job)).unwrap_or_else(|e| panic!("the job: {e}"));
    let run = &runs[0];
    if let Some(e) = &run.result.error {
        let tail: Vec<&str> = run.console.lines().rev().take(30).collect();
        panic!(
            "the agent failed after {} ops: {e}\nconsole tail:\n{}",
            run.result.ops.len(),
            tail.join("\n")
        );
    }
    let r = judge(&p, run).unwrap_or_else(|e| panic!("judging: {e}"));
    eprintln!("resizes (kernel, model): {:?}", r.resizes);
    eprintln!(
        "{} reads judged, {} as simulated; L2 identical {}, same blocks {}; status {}",
        r.reads, r.reads_as_simulated, r.l2_identical, r.same_blocks, r.kernel_status
    );
    assert!(r.l1_violations.is_empty(), "L1: {:?}", r.l1_violations);
    assert!(r.failed_requests.is_empty(), "failed requests: {:?}", r.failed_requests);
    let kernel: Vec<&str> = r.resizes.iter().map(|(k, _)| k.split(' ').next().unwrap_or("")).collect();
    let model: Vec<&str> = r.resizes.iter().map(|(_, m)| m.as_str()).collect();
    assert_eq!(kernel, OUTCOMES, "the kernel's resizes");
    // The refused cache shrink set NEEDS_CHECK on the kernel too: the old
    // table was refused until the metadata was repaired.
    assert!(
        r.resizes[4].0.contains("the old table refused too (EINVAL): metadata repaired"),
        "{:?}",
        r.resizes
    );
    assert!(!r.resizes[1].0.contains("repaired"), "an origin refusal leaves the metadata writable");
    assert_eq!(model, OUTCOMES, "the model's resizes");
    assert!(r.reads > 60, "the read-back was judged");
    // The repaired metadata holds no NEEDS_CHECK (status ends in `-`).
    assert!(r.kernel_status.trim_end().ends_with('-'), "{}", r.kernel_status);
}
