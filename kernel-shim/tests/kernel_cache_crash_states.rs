//! The stock kernel's crash states of cache campaign traces
//! (`dmsim_kernel_shim::cache_replay::judge_crash_states`): 12 seeds'
//! traces replayed on dm-cache with its three devices on one dm-log-writes
//! device and a mark after every op (one boot); after every FLUSH, FUA or
//! PREFLUSH write, the kernel's durable disks are loaded by the model's
//! cache target as after a power cut and every origin block is read back;
//! each read must be one the oracle allows after a crash at that point.
//!
//! Needs `qemu-system-x86_64` and `linux-image-amd64`; without them it
//! prints SKIPPED, or fails under `CI=true`.

use dmsim_kernel_shim::cache_replay::{judge, judge_crash_states, logged_plan, replayable_config};
use dmsim_kernel_shim::{KernelShim, ShimError};
use dmsim_sim::cache_run;
use dmsim_sim::run::Checkers;

const TRACES: u64 = 12;
const OPS: usize = 120;

#[test]
fn the_kernels_crash_states_of_cache_traces_read_as_the_oracle_allows() {
    let shim = match KernelShim::prepare() {
        Ok(s) => s,
        Err(e @ ShimError::Missing(_)) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("SKIPPED: crash states of cache traces on the kernel: {e}");
            return;
        }
        Err(e) => panic!("preparing the VM: {e}"),
    };
    let plans: Vec<_> = (100..100 + TRACES)
        .map(|seed| {
            let out = cache_run::run_config(&replayable_config(seed, OPS), &Checkers::default());
            assert!(out.violation.is_none(), "seed {seed}: {:?}", out.violation);
            logged_plan(&out.trace).unwrap_or_else(|e| panic!("seed {seed}: {e}"))
        })
        .collect();
    let jobs: Vec<_> = plans.iter().map(|p| p.job.clone()).collect();
    let runs = shim.run_jobs(&jobs).unwrap_or_else(|e| panic!("the logged cache jobs: {e}"));
    let (mut points, mut reads, mut with_points) = (0, 0, 0);
    let mut failures = Vec::new();
    for (k, (p, run)) in plans.iter().zip(&runs).enumerate() {
        let seed = 100 + k as u64;
        assert_eq!(run.result.error, None, "seed {seed}: the agent failed");
        let l1 = judge(p, run).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert!(l1.l1_violations.is_empty(), "seed {seed}: L1 {:?}", l1.l1_violations);
        let r = judge_crash_states(p, run).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        points += r.points;
        reads += r.reads;
        with_points += usize::from(r.points > 0);
        failures.extend(r.violations.iter().map(|v| format!("seed {seed}: {v}")));
    }
    eprintln!(
        "{TRACES} logged cache traces: {points} crash states at FLUSH/FUA points ({with_points} traces with one \
         or more), {reads} blocks read back, {} reads the oracle refuses",
        failures.len()
    );
    assert!(with_points >= 10, "at least 10 traces have a durability point");
    assert!(failures.is_empty(), "the kernel's crash states:\n{}", failures.join("\n"));
}

/// Diagnosis of one seed's crash state (`DMSIM_CRASH_SEED=N
/// DMSIM_CRASH_OP=I`): the kernel's metadata and devices after op I.
#[test]
#[ignore]
fn show_a_crash_state() {
    use dmsim_kernel_shim::logwrites::{self, EntryKind};
    use dmsim_kernel_shim::protocol::{mark_name, summarize};
    use dmsim_kernel_shim::Job;
    use dmsim_model::block_device::MemDevice;
    use dmsim_model::cache::inspect::read_image;
    let seed: u64 = std::env::var("DMSIM_CRASH_SEED").unwrap().parse().unwrap();
    let op: usize = std::env::var("DMSIM_CRASH_OP").unwrap().parse().unwrap();
    let out = cache_run::run_config(&replayable_config(seed, OPS), &Checkers::default());
    let p = logged_plan(&out.trace).unwrap();
    let runs = KernelShim::prepare().unwrap().run_jobs(std::slice::from_ref(&p.job)).unwrap();
    let run = &runs[0];
    for (i, (o, r)) in p.ops.iter().zip(&run.result.ops).enumerate().take(op + 1) {
        eprintln!("op {i}: {o:?} -> {} {:?}", r.outcome, r.read);
    }
    let Job::Cache { metadata, cache, origin, .. } = &p.job else { panic!() };
    let log = logwrites::parse(run.log.as_ref().unwrap().as_ref().unwrap()).unwrap();
    let mark = log
        .entries
        .iter()
        .position(|e| matches!(&e.kind, EntryKind::Mark(t) if *t == mark_name(op)))
        .unwrap();
    let mut dev = [metadata.as_slice(), cache.as_slice(), origin.as_slice()].concat();
    log.replay_into(&mut dev, 0..mark).unwrap();
    let (m, c) = (metadata.len(), cache.len());
    let img = read_image(&mut MemDevice::from_bytes(dev[..m].to_vec())).unwrap();
    eprintln!("clean shutdown {} ", img.superblock.clean_shutdown());
    let bs = (p.cfg.cache.block_sectors * 512) as usize;
    for (cb, mp) in img.mappings.iter().enumerate().filter(|(_, mp)| mp.valid()) {
        let cached = &dev[m + cb * bs..m + (cb + 1) * bs];
        let ob = mp.oblock as usize;
        let orig = &dev[m + c + ob * bs..m + c + (ob + 1) * bs];
        let s = p.cfg.cache.block_sectors;
        eprintln!(
            "cblock {cb} -> oblock {ob} dirty {}: cache [{}] origin [{}]",
            img.is_dirty(cb),
            summarize(cached, p.cfg.cache.run, ob as u64 * s),
            summarize(orig, p.cfg.cache.run, ob as u64 * s)
        );
    }
    for (k, e) in log.entries.iter().enumerate().take(mark) {
        if !matches!(e.kind, EntryKind::Mark(_)) {
            eprintln!("log {k}: {:?} sector {} nr {}", e.kind, e.sector, e.nr_sectors);
        } else {
            eprintln!("log {k}: {:?}", e.kind);
        }
    }
}
