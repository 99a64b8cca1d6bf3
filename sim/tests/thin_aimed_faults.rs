//! Aimed faults in the thin campaign (issue 16, Build 3): the swarm arms
//! metadata faults at the Nth request of the next commit, and at a commit
//! and then its abort (`Op::AimFault`), before flushes, FUA writes and pool
//! messages. The error paths they reach carry two test-only mutations
//! (`Mutations::AIMED`); each is caught in the default budget from the seed
//! given, its trace minimized, and the same seeds without their aimed
//! faults (the swarm's `aimed_percent` 0, every other op the same) miss it.

#[path = "common/minimized.rs"]
mod minimized;

use dmsim_model::mutation::Mutations;
use dmsim_sim::run::{run_config, violation_signature, CampaignSettings, Checkers, RunConfig};
use dmsim_traces::{FaultAim, Op};

use minimized::{DEFAULT_OPS, DEFAULT_SEEDS};

fn config(seed: u64, mutation: Option<&str>, aimed: bool) -> RunConfig {
    let mutations = mutation.map(|m| Mutations::by_name(m).unwrap()).unwrap_or_default();
    let settings = CampaignSettings { mutations, ..Default::default() };
    let mut cfg = RunConfig::for_seed(seed, DEFAULT_OPS, &settings);
    if !aimed {
        cfg.swarm.aimed_percent = 0;
    }
    cfg
}

#[test]
fn every_aimed_mutation_is_listed_and_the_swarm_aims_in_the_default_budget() {
    let names: Vec<&str> = Mutations::AIMED.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["failed-commit-acks-flush", "abort-ignores-superblock-read-error"]);
    // Seeds of the default budget aim both kinds, and a seed's other ops
    // are those it draws without them.
    let mut kinds = [0usize; 2];
    for seed in DEFAULT_SEEDS {
        let cfg = RunConfig::for_seed(seed, DEFAULT_OPS, &CampaignSettings::default());
        let ops = dmsim_sim::run::generate(&cfg);
        for op in &ops {
            match op {
                Op::AimFault { aim: FaultAim::Commit { request } } => {
                    assert!(*request < 4);
                    kinds[0] += 1;
                }
                Op::AimFault { aim: FaultAim::Abort } => kinds[1] += 1,
                _ => {}
            }
        }
        let mut plain = cfg.clone();
        plain.swarm.aimed_percent = 0;
        let without: Vec<Op> = dmsim_sim::run::generate(&plain);
        let kept: Vec<Op> = ops.iter().copied().filter(|op| !matches!(op, Op::AimFault { .. })).collect();
        assert!(without.starts_with(&kept), "seed {seed}: the aimed faults changed other ops");
    }
    assert!(kinds[0] > 50 && kinds[1] > 25, "{kinds:?}");
}

#[test]
fn aimed_fault_mutations_are_caught_in_the_default_budget_and_minimized() {
    let cases = [
        ("failed-commit-acks-flush", 58, "oracle: dev # sector #: wrong data"),
        (
            "abort-ignores-superblock-read-error",
            4,
            "pool: read-only mode after the abort of a failed commit could not reread the superblock, not fail mode",
        ),
    ];
    for (name, first_seed, signature) in cases {
        let (seed, out) = DEFAULT_SEEDS
            .map(|seed| (seed, run_config(&config(seed, Some(name), true), &Checkers::default())))
            .find(|(_, out)| out.violation.is_some())
            .unwrap_or_else(|| panic!("{name}: nothing caught in {DEFAULT_SEEDS:?}"));
        let v = out.violation.as_ref().unwrap();
        assert_eq!(seed, first_seed, "{name}: {v}");
        assert_eq!(violation_signature(v.kind, &v.what), signature, "{name}: {v}");
        assert!(out.trace.ops().any(|op| matches!(op, Op::AimFault { .. })), "{name}");
        // The same seed without the mutation passes.
        let clean = run_config(&config(seed, None, true), &Checkers::default());
        assert!(clean.violation.is_none(), "{name}: seed {seed} fails without the mutation");
        // Minimized: fewer ops, the same failure on replay.
        minimized::assert_minimizes(name, &out.trace, signature);
        // Without aimed faults the default budget misses it.
        let missed = DEFAULT_SEEDS
            .filter(|&s| run_config(&config(s, Some(name), false), &Checkers::default()).violation.is_some());
        assert_eq!(missed.count(), 0, "{name}: caught without aimed faults");
    }
}
