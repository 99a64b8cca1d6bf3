//! The cache campaign (`dmsim_sim::cache_run`): default seeds run clean,
//! runs are deterministic, traces replay byte for byte, every deliberately
//! broken cache target is caught and minimized, and each kernel behaviour
//! the candidate fixes address is caught when its fix is off.

use dmsim_model::mutation::Mutations;
use dmsim_sim::cache_run::{self, CacheCampaignSettings, CacheRunConfig};
use dmsim_sim::cache_sim::CacheStats;
use dmsim_sim::run::violation_signature;
use dmsim_traces::binary::to_bytes;
use dmsim_traces::text::to_text;

const OPS: usize = 300;

fn outcome(seed: u64, settings: &CacheCampaignSettings) -> cache_run::CacheRunOutcome {
    cache_run::run_config(&CacheRunConfig::for_seed(seed, OPS, settings))
}

#[test]
fn default_seeds_run_clean_and_reach_every_migration() {
    let settings = CacheCampaignSettings::default();
    let mut total = CacheStats::default();
    for seed in 0..32 {
        let out = outcome(seed, &settings);
        if let Some(v) = &out.violation {
            panic!("seed {seed} ({}): {v}\n{}", out.trace.header.workload, to_text(&out.trace));
        }
        total.add(&out.stats);
    }
    eprintln!("{total:?}");
    assert!(total.reads_checked > 1000, "{total:?}");
    assert!(
        total.migrations.iter().all(|&m| m > 0),
        "promotions, demotions and writebacks all happen: {total:?}"
    );
    assert!(total.overwrites > 0 && total.crashes > 0 && total.reloads > 0, "{total:?}");
    assert!(total.reloads_refused > 0, "passthrough refused with dirty blocks: {total:?}");
    assert!(total.clean_checks > 0 && total.io_errors > 0, "{total:?}");
}

#[test]
fn a_seed_gives_the_same_trace_every_time() {
    let settings = CacheCampaignSettings::default();
    for seed in [3, 11, 42] {
        let a = outcome(seed, &settings);
        let b = outcome(seed, &settings);
        assert_eq!(to_text(&a.trace), to_text(&b.trace), "seed {seed}");
        assert_eq!(to_bytes(&a.trace), to_bytes(&b.trace), "seed {seed}");
    }
}

#[test]
fn a_trace_replays_byte_for_byte_from_its_header() {
    let settings = CacheCampaignSettings::default();
    for seed in [5, 21] {
        let out = outcome(seed, &settings);
        let r = cache_run::replay(&out.trace).unwrap();
        assert_eq!(r.first_difference, None, "seed {seed}");
    }
}

/// The first seed (of `limit`) on which `cfg_for` fails, and its outcome.
fn first_failure(
    limit: u64,
    cfg_for: impl Fn(u64) -> CacheRunConfig,
) -> Option<(u64, cache_run::CacheRunOutcome)> {
    (0..limit).map(|s| (s, cache_run::run_config(&cfg_for(s)))).find(|(_, o)| o.violation.is_some())
}

#[test]
fn every_cache_mutation_is_caught_and_minimized() {
    for (name, _) in Mutations::CACHE_TARGET {
        let settings =
            CacheCampaignSettings { mutations: Mutations::by_name(name).unwrap(), ..Default::default() };
        let (seed, out) = first_failure(64, |s| CacheRunConfig::for_seed(s, OPS, &settings))
            .unwrap_or_else(|| panic!("{name}: no seed of 64 catches it"));
        let v = out.violation.as_ref().unwrap();
        let m = cache_run::minimize(&out.trace, |_, _| {}).unwrap();
        eprintln!("{name}: seed {seed}: {v}; minimized {} -> {} ops", m.ops_before, m.ops_after);
        assert!(m.ops_after < m.ops_before && m.ops_after <= 40, "{name}: {} ops left", m.ops_after);
        let (kind, message) = m.trace.violation().expect("the minimized trace fails");
        assert_eq!(violation_signature(kind, message), m.signature, "{name}");
        // The same trace on the unbroken model passes.
        let mut header = m.trace.header.clone();
        for (k, v) in &mut header.params {
            if k == "mutations" {
                v.clear();
            }
        }
        let cfg = CacheRunConfig::from_header(&header).unwrap();
        let ops: Vec<_> = m.trace.ops().collect();
        let clean = cache_run::run_ops(&cfg, &ops);
        assert!(clean.violation.is_none(), "{name}: the minimized trace fails without the mutation too");
    }
}

/// Each candidate fix guards against a kernel behaviour the campaign
/// catches: with the fix off (as the kernel is), a seed that passes with it
/// fails.
#[test]
fn each_kernel_behaviour_is_caught_with_its_fix_off() {
    type Off = fn(&mut dmsim_model::cache::core::CacheFixes);
    let fixes: [(&str, Off); 4] = [
        ("resume_clears_clean_shutdown", |f| f.resume_clears_clean_shutdown = false),
        ("flush_before_commit", |f| f.flush_before_commit = false),
        ("fua_overwrite_waits_for_commit", |f| f.fua_overwrite_waits_for_commit = false),
        ("writethrough_pairs_one_at_a_time", |f| f.writethrough_pairs_one_at_a_time = false),
    ];
    let settings = CacheCampaignSettings::default();
    for (name, off) in fixes {
        let cfg_for = |s| {
            let mut cfg = CacheRunConfig::for_seed(s, OPS, &settings);
            off(&mut cfg.cache.options.fixes);
            cfg
        };
        let (seed, out) =
            first_failure(400, cfg_for).unwrap_or_else(|| panic!("{name}: nothing caught in 400 seeds"));
        eprintln!("{name} off: seed {seed}: {}", out.violation.as_ref().unwrap());
        let with_fix = outcome(seed, &settings);
        assert!(with_fix.violation.is_none(), "{name}: seed {seed} fails with the fix on too");
    }
}
