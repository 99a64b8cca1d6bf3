//! The metadata campaign's aimed faults (issue 16, item 3): one seed in
//! three fails a drawn request of one commit in five; the failed commit's
//! crash states, the abort and the reopen are judged. The abort path's
//! mutations, which neither the random faults of the thin campaign nor the
//! metadata campaign without aimed faults reach, are caught in the default
//! budget and minimized.

use dmsim_model::mutation::Mutations;
use dmsim_sim::campaign::{aims_faults, minimize, run_seed, run_seed_ops, CampaignConfig, ViolationKind};

/// Each abort mutation and the first seed of the default budget (0..64)
/// that catches it (README, "Mutations").
const CAUGHT: [(&str, u64); 2] = [("abort-keeps-mapping-root", 4), ("abort-keeps-data-space-map", 4)];

#[test]
fn every_abort_mutation_is_listed() {
    let listed: Vec<&str> = CAUGHT.iter().map(|(m, _)| *m).collect();
    let all: Vec<&str> = Mutations::ABORTS.iter().map(|(m, _)| *m).collect();
    assert_eq!(listed, all);
}

#[test]
fn seeds_that_aim_faults_fail_commits_and_stay_clean() {
    let cfg = CampaignConfig { seeds: 0..12, ..CampaignConfig::default() };
    let mut failed = 0;
    for seed in cfg.seeds.clone() {
        let out = run_seed(&cfg, seed);
        assert!(out.violations.is_empty(), "seed {seed}: {:#?}", out.violations);
        if !aims_faults(seed) {
            assert_eq!(out.failed_commits, 0, "seed {seed} aims no fault");
        }
        failed += out.failed_commits;
    }
    assert!(failed >= 3, "only {failed} commits failed in 12 seeds");
}

#[test]
fn abort_mutations_are_caught_in_the_default_budget_and_minimized() {
    for (mutation, seed) in CAUGHT {
        assert!(CampaignConfig::default().seeds.contains(&seed) && aims_faults(seed));
        let cfg =
            CampaignConfig { mutations: Mutations::by_name(mutation).unwrap(), ..CampaignConfig::default() };
        for earlier in 0..seed {
            assert!(
                run_seed(&cfg, earlier).violations.is_empty(),
                "{mutation}: seed {earlier} catches it first"
            );
        }
        let out = run_seed(&cfg, seed);
        let v = out.violations.first().unwrap_or_else(|| panic!("{mutation}: seed {seed} was not caught"));
        assert_eq!(v.kind, ViolationKind::ReferenceMismatch, "{v:?}");
        assert!(v.detail.contains("after the abort of a failed commit"), "{v:?}");
        assert!(run_seed(&CampaignConfig::default(), seed).violations.is_empty());
        let m = minimize(&cfg, seed).expect("the seed fails");
        assert!(m.ops.len() <= 10, "{mutation}: {:#?}", m.ops);
        assert_eq!(run_seed_ops(&cfg, seed, &m.ops).violations.first(), Some(&m.violation));
        let clean = run_seed_ops(&CampaignConfig::default(), seed, &m.ops);
        assert!(clean.violations.is_empty(), "{mutation}: {:#?}", clean.violations);
    }
}
