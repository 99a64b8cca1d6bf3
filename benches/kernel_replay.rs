//! `cargo bench --bench kernel_replay`: how fast traces replay on the real
//! kernel.
//!
//! Boots Debian's 6.1 kernel in qemu (software emulation) once with the
//! ublk module, replays a fixed set of thin campaign traces with their
//! crash ops (power cuts on the controlled disks, issue 17) in that one
//! boot, and prints traces per minute and crash states per second — per
//! wall second and per CPU second of qemu and the host (the machine is
//! shared: wall time is noise, CPU time less so) — beside the baseline
//! measured in the same run: the serialized simulator's CPU time for the
//! same traces, followed the kernel's clock. It also counts how many
//! traces and crash states were L1-equal. Nothing asserts on speed.
//! Without qemu or the kernel it says so and exits 0.
//!
//! `DMSIM_BENCH_SEEDS=A..B` and `DMSIM_BENCH_OPS=N` change the work
//! (default seeds 40..48 of the durability workload, 120 ops).

use std::time::{Duration, Instant};

use dmsim_faults::FaultSwarm;
use dmsim_kernel_shim::equivalence::{
    compare_crashes, compare_l1, kernel_replays, simulate_following, FinalState,
};
use dmsim_kernel_shim::{Job, KernelShim};
use dmsim_sim::run::{generate, CampaignSettings, RunConfig, Workload};
use dmsim_traces::{Event, Op, Trace};

/// CPU time of this process's finished children (qemu).
fn children_cpu() -> Duration {
    // SAFETY: getrusage writes the rusage it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    assert_eq!(r, 0, "getrusage(RUSAGE_CHILDREN)");
    let d = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    d(ru.ru_utime) + d(ru.ru_stime)
}

/// CPU time this thread has used.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(r, 0, "CLOCK_THREAD_CPUTIME_ID");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn env_range(name: &str, default: std::ops::Range<u64>) -> std::ops::Range<u64> {
    std::env::var(name)
        .ok()
        .and_then(|v| {
            let (a, b) = v.split_once("..")?;
            Some(a.parse().ok()?..b.parse().ok()?)
        })
        .unwrap_or(default)
}

/// A durability seed's trace: its crash ops, no faults (the kernel replay
/// does not take them yet), the scheduling ops left out.
fn trace(seed: u64, ops: usize) -> Trace {
    let settings = CampaignSettings { workload: Some(Workload::Durability), ..CampaignSettings::default() };
    let mut cfg = RunConfig::for_seed(seed, ops, &settings);
    cfg.swarm = FaultSwarm::none();
    let ops: Vec<Op> = generate(&cfg)
        .into_iter()
        .filter(|op| kernel_replays(op) || matches!(op, Op::Crash { .. }))
        .collect();
    Trace { header: cfg.header(), events: ops.iter().map(|op| Event::Op(*op)).collect() }
}

fn main() {
    let seeds = env_range("DMSIM_BENCH_SEEDS", 40..48);
    let ops: usize = std::env::var("DMSIM_BENCH_OPS").ok().and_then(|v| v.parse().ok()).unwrap_or(120);
    let shim = match KernelShim::prepare_with_ublk() {
        Ok(s) => s,
        Err(e) => {
            println!("kernel replay bench: skipped ({e})");
            return;
        }
    };
    let traces: Vec<Trace> = seeds.clone().map(|s| trace(s, ops)).collect();
    let jobs: Vec<Job> = traces.iter().map(|t| Job::Ublk(t.clone())).collect();
    let (cpu0, wall0) = (children_cpu() + thread_cpu(), Instant::now());
    let runs = match shim.run_jobs(&jobs) {
        Ok(r) => r,
        Err(e) => {
            println!("kernel replay bench: the VM failed: {e}");
            std::process::exit(1);
        }
    };
    let (kernel_cpu, wall) = (children_cpu() + thread_cpu() - cpu0, wall0.elapsed());
    let mut crash_states = 0;
    let (mut equal_traces, mut equal_crashes, mut failed) = (0, 0, 0);
    let sim0 = thread_cpu();
    for (t, run) in traces.iter().zip(&runs) {
        if run.result.error.is_some() {
            failed += 1;
            continue;
        }
        crash_states += run.result.crashes.len();
        let Ok(sim) = simulate_following(t, true, run) else {
            failed += 1;
            continue;
        };
        let crashes = compare_crashes(&sim.crashes, &run.result.crashes);
        let ok_crashes = crashes.iter().filter(|c| c.differences.is_empty()).count();
        equal_crashes += ok_crashes;
        let end = compare_l1(&sim.state, &FinalState::of_kernel(run));
        equal_traces += usize::from(end.is_empty() && ok_crashes == crashes.len());
    }
    let sim_cpu = thread_cpu() - sim0;
    let n = traces.len();
    let per_min = |d: Duration| n as f64 * 60.0 / d.as_secs_f64().max(1e-9);
    let per_sec = |d: Duration| crash_states as f64 / d.as_secs_f64().max(1e-9);
    println!(
        "kernel replay: {n} traces of {ops} ops (seeds {seeds:?}), {crash_states} crash states, one boot; \
         {failed} failed; L1 equal at the end and every crash: {equal_traces} of {n}; crash states L1-equal: \
         {equal_crashes} of {crash_states}"
    );
    println!(
        "  kernel (qemu + host): {:.1} traces/min, {:.2} crash states/s per wall second ({:.1} s); \
         {:.1} traces/min, {:.2} crash states/s per CPU second ({:.1} s)",
        per_min(wall),
        per_sec(wall),
        wall.as_secs_f64(),
        per_min(kernel_cpu),
        per_sec(kernel_cpu),
        kernel_cpu.as_secs_f64()
    );
    println!(
        "  baseline, the serialized simulator on the same traces: {:.1} traces/min per CPU second ({:.3} s); \
         the kernel replay costs {:.0}x its CPU",
        per_min(sim_cpu),
        sim_cpu.as_secs_f64(),
        kernel_cpu.as_secs_f64() / sim_cpu.as_secs_f64().max(1e-9)
    );
}
