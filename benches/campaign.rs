//! `cargo bench --bench campaign`: how fast the thin campaign simulates.
//!
//! Runs a fixed set of seeds on one thread, twice: first as the baseline,
//! every seed with no faults at all (`FaultSwarm::none()`: no crashes, no
//! I/O errors), then as `dmsim check` runs them, every seed with its own
//! fault swarm. For each it prints simulated seconds per wall second, bios
//! per second and crash states per second, and the ratios of the campaign
//! to the baseline measured in the same run. The cache campaign gets the
//! same two passes and the same columns (its crash states are its crashes:
//! each one a state of all three disks, recovered and checked), with its
//! ratios to the thin campaign's. Two more lines time the thin and the
//! cache metadata crash campaigns on the same seeds. Times are the
//! thread's CPU seconds (`CLOCK_THREAD_CPUTIME_ID`), not wall time: this
//! machine is shared, and other work does not count. Nothing asserts on
//! speed: the numbers are for people comparing two builds on one machine.
//!
//! `DMSIM_BENCH_SEEDS=A..B` and `DMSIM_BENCH_OPS=N` change the work.

use std::time::Duration;

use dmsim_faults::FaultSwarm;
use dmsim_sim::cache_campaign;
use dmsim_sim::cache_run::{self, CacheCampaignSettings, CacheRunConfig};
use dmsim_sim::campaign::{self, CampaignConfig, SeedOutcome};
use dmsim_sim::run::{run_config, CampaignSettings, Checkers, RunConfig};
use dmsim_sim::thin::ThinStats;

/// CPU time this thread has used.
fn cpu_now() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(r, 0, "CLOCK_THREAD_CPUTIME_ID is available on Linux");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU time spent in `f`.
fn cpu_time<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = cpu_now();
    let t = f();
    (t, cpu_now() - start)
}

/// What one pass over the seeds did.
struct Pass {
    name: &'static str,
    wall: Duration,
    stats: ThinStats,
    violations: usize,
}

impl Pass {
    fn per_sec(&self, n: u64) -> f64 {
        n as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    fn sim_per_wall(&self) -> f64 {
        self.stats.sim_time_ns as f64 / 1e9 / self.wall.as_secs_f64().max(1e-9)
    }
}

fn thin_pass(name: &'static str, seeds: std::ops::Range<u64>, ops: usize, quiet: bool) -> Pass {
    let settings = CampaignSettings::default();
    let checkers = Checkers::default();
    let mut stats = ThinStats::default();
    let mut violations = 0;
    let ((), wall) = cpu_time(|| {
        for seed in seeds {
            let mut cfg = RunConfig::for_seed(seed, ops, &settings);
            if quiet {
                cfg.swarm = FaultSwarm::none();
            }
            let out = run_config(&cfg, &checkers);
            stats.add(&out.stats);
            violations += usize::from(out.violation.is_some());
        }
    });
    Pass { name, wall, stats, violations }
}

/// As [`thin_pass`], for the cache campaign (its crash states are its
/// crashes).
fn cache_pass(name: &'static str, seeds: std::ops::Range<u64>, ops: usize, quiet: bool) -> Pass {
    let settings = CacheCampaignSettings::default();
    let mut stats = ThinStats::default();
    let mut violations = 0;
    let ((), wall) = cpu_time(|| {
        for seed in seeds {
            let mut cfg = CacheRunConfig::for_seed(seed, ops, &settings);
            if quiet {
                cfg.swarm = FaultSwarm::none();
            }
            let out = cache_run::run_config(&cfg, &Checkers::default());
            stats.bios += out.stats.bios;
            stats.crash_states += out.stats.crashes;
            stats.sim_time_ns += out.stats.sim_time_ns;
            violations += usize::from(out.violation.is_some());
        }
    });
    Pass { name, wall, stats, violations }
}

fn env_or<T>(name: &str, parse: impl Fn(&str) -> Option<T>, default: T) -> T {
    std::env::var(name).ok().and_then(|v| parse(&v)).unwrap_or(default)
}

fn main() {
    // `cargo bench` passes `--bench` (and any filter); they are ignored.
    let seeds = env_or(
        "DMSIM_BENCH_SEEDS",
        |v| {
            let (a, b) = v.split_once("..")?;
            let (a, b) = (a.parse().ok()?, b.parse().ok()?);
            (a < b).then_some(a..b)
        },
        0..48u64,
    );
    let ops = env_or("DMSIM_BENCH_OPS", |v| v.parse().ok(), 300usize);
    println!(
        "dmsim campaign benchmark: seeds {}..{}, {ops} ops per seed, one thread",
        seeds.start, seeds.end
    );

    // Warm up caches and the allocator on a few seeds first.
    let _ = thin_pass("warm-up", 0..2, ops, false);
    let base = thin_pass("baseline (no faults)", seeds.clone(), ops, true);
    let camp = thin_pass("campaign (fault swarm)", seeds.clone(), ops, false);

    println!(
        "\n{:<26} {:>9} {:>14} {:>12} {:>16} {:>11}",
        "thin", "CPU s", "sim s / CPU s", "bios / s", "crash states / s", "violations"
    );
    for p in [&base, &camp] {
        println!(
            "{:<26} {:>9.3} {:>14.1} {:>12.0} {:>16.1} {:>11}",
            p.name,
            p.wall.as_secs_f64(),
            p.sim_per_wall(),
            p.per_sec(p.stats.bios),
            p.per_sec(p.stats.crash_states),
            p.violations
        );
    }
    let ratio = |a: f64, b: f64| if b > 0.0 { format!("{:.2}x", a / b) } else { "n/a".to_string() };
    println!(
        "{:<26} {:>9} {:>14} {:>12}",
        "campaign / baseline",
        ratio(camp.wall.as_secs_f64(), base.wall.as_secs_f64()),
        ratio(camp.sim_per_wall(), base.sim_per_wall()),
        ratio(camp.per_sec(camp.stats.bios), base.per_sec(base.stats.bios)),
    );

    let _ = cache_pass("warm-up", 0..2, ops, false);
    let cache_base = cache_pass("baseline (no faults)", seeds.clone(), ops, true);
    let cache_camp = cache_pass("campaign (fault swarm)", seeds.clone(), ops, false);
    println!(
        "\n{:<26} {:>9} {:>14} {:>12} {:>16} {:>11}",
        "cache", "CPU s", "sim s / CPU s", "bios / s", "crash states / s", "violations"
    );
    for p in [&cache_base, &cache_camp] {
        println!(
            "{:<26} {:>9.3} {:>14.1} {:>12.0} {:>16.1} {:>11}",
            p.name,
            p.wall.as_secs_f64(),
            p.sim_per_wall(),
            p.per_sec(p.stats.bios),
            p.per_sec(p.stats.crash_states),
            p.violations
        );
    }
    println!(
        "{:<26} {:>9} {:>14} {:>12} {:>16}",
        "cache / thin (campaign)",
        ratio(cache_camp.wall.as_secs_f64(), camp.wall.as_secs_f64()),
        ratio(cache_camp.sim_per_wall(), camp.sim_per_wall()),
        ratio(cache_camp.per_sec(cache_camp.stats.bios), camp.per_sec(camp.stats.bios)),
        ratio(cache_camp.per_sec(cache_camp.stats.crash_states), camp.per_sec(camp.stats.crash_states)),
    );

    // The metadata campaigns are slower per seed: time their first 16 seeds.
    // The baseline is the campaign as it was before the memo of judged
    // states: one draw per request, every crash state judged in full (the
    // memo's answers again too: `verify_memo`).
    let seeds = seeds.start..seeds.end.min(seeds.start + 16);
    let cfg = CampaignConfig { seeds: seeds.clone(), ..CampaignConfig::default() };
    let full = CampaignConfig { verify_memo: true, crashes_per_point: 1, ..cfg.clone() };
    println!(
        "\n{:<44} {:>9} {:>8} {:>13} {:>10} {:>16} {:>11}",
        "metadata crash campaigns",
        "CPU s",
        "commits",
        "crash states",
        "memo hits",
        "crash states / s",
        "violations"
    );
    type RunSeed = fn(&CampaignConfig, u64) -> SeedOutcome;
    let campaigns: [(&str, &CampaignConfig, RunSeed); 3] = [
        ("thin metadata, 1 draw, all judged in full", &full, campaign::run_seed),
        ("thin metadata", &cfg, campaign::run_seed),
        ("cache metadata", &cfg, cache_campaign::run_seed),
    ];
    let mut rates = Vec::new();
    for (name, cfg, run) in campaigns {
        let (outcomes, cpu) = cpu_time(|| seeds.clone().map(|seed| run(cfg, seed)).collect::<Vec<_>>());
        let states: usize = outcomes.iter().map(|o| o.crash_states).sum();
        let hits: usize = outcomes.iter().map(|o| o.memo_hits).sum();
        let commits: usize = outcomes.iter().map(|o| o.commits).sum();
        let failing = outcomes.iter().filter(|o| !o.violations.is_empty()).count();
        let rate = states as f64 / cpu.as_secs_f64().max(1e-9);
        rates.push(rate);
        println!(
            "{:<44} {:>9.3} {:>8} {:>13} {:>10} {:>16.0} {:>11}",
            format!("{name} (seeds {}..{})", seeds.start, seeds.end),
            cpu.as_secs_f64(),
            commits,
            states,
            hits,
            rate,
            failing
        );
    }
    println!("{:<44} {:>9}", "thin metadata / judged in full (states / s)", ratio(rates[1], rates[0]));
}
