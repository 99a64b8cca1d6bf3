//! Aimed faults in the thin campaign (issue 16, Build 3): the swarm arms
//! metadata faults at the Nth request of the next commit, and at a commit
//! and then its abort (`Op::AimFault`), before flushes, FUA writes and pool
//! messages, and a data fault at the next passdown discard (between a
//! discard's two passes) before discards. The error paths they reach carry
//! four test-only mutations (`Mutations::AIMED`); each is caught in the
//! default budget from the seed given, its trace minimized, and the same
//! seeds without their aimed faults (the swarm's `aimed_percent` 0, or only
//! the passdown aims left out, every other op the same) miss it.

#[path = "common/minimized.rs"]
mod minimized;

use dmsim_model::mutation::Mutations;
use dmsim_sim::run::{run_config, run_ops, violation_signature, CampaignSettings, Checkers, RunConfig};
use dmsim_traces::{DiskId, Event, FaultAim, Op};

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

/// The first seed of the default budget, with aimed faults, that catches
/// mutation `name`, and its run.
fn first_caught(name: &str) -> (u64, dmsim_sim::run::RunOutcome) {
    let mutations = Mutations::by_name(name).unwrap();
    minimized::first_failing(name, &CampaignSettings { mutations, ..Default::default() })
}

#[test]
fn every_aimed_mutation_is_listed_and_the_swarm_aims_in_the_default_budget() {
    let names: Vec<&str> = Mutations::AIMED.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        [
            "failed-commit-acks-flush",
            "abort-ignores-superblock-read-error",
            "passdown-error-skips-pass-two",
            "passdown-error-fails-discard",
        ]
    );
    // Seeds of the default budget aim every kind, and a seed's other ops
    // are those it draws without them.
    let mut kinds = [0usize; 3];
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
                Op::AimFault { aim: FaultAim::Passdown } => kinds[2] += 1,
                _ => {}
            }
        }
        // A passdown aim comes right before a discard, and only to a pool
        // that passes discards down.
        for (i, op) in ops.iter().enumerate() {
            if *op == (Op::AimFault { aim: FaultAim::Passdown }) {
                assert!(!cfg.thin.features.no_discard_passdown, "seed {seed}");
                assert!(matches!(ops.get(i + 1), None | Some(Op::Discard { .. })), "seed {seed} op {i}");
            }
        }
        // Without the passdown aims, the commit and abort aims are the
        // same: they come from streams of their own.
        let others: Vec<Op> =
            ops.iter().copied().filter(|op| *op != (Op::AimFault { aim: FaultAim::Passdown })).collect();
        assert!(
            without_passdown_aims(&cfg).starts_with(&others),
            "seed {seed}: the passdown aims changed other ops"
        );
        let mut plain = cfg.clone();
        plain.swarm.aimed_percent = 0;
        let without: Vec<Op> = dmsim_sim::run::generate(&plain);
        let kept: Vec<Op> = ops.iter().copied().filter(|op| !matches!(op, Op::AimFault { .. })).collect();
        assert!(without.starts_with(&kept), "seed {seed}: the aimed faults changed other ops");
    }
    assert!(kinds[0] > 50 && kinds[1] > 25 && kinds[2] > 25, "{kinds:?}");
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
        let (seed, out) = first_caught(name);
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

/// The ops seed `cfg` draws with its passdown aims left out, and nothing
/// else changed: the aims come from a stream of their own, so the ops of a
/// longer run without them, cut to length, are those a generator that never
/// aims at a passdown would draw.
fn without_passdown_aims(cfg: &RunConfig) -> Vec<Op> {
    let mut longer = cfg.clone();
    longer.ops = cfg.ops * 2;
    let mut ops: Vec<Op> = dmsim_sim::run::generate(&longer)
        .into_iter()
        .filter(|op| *op != (Op::AimFault { aim: FaultAim::Passdown }))
        .collect();
    ops.truncate(cfg.ops);
    ops
}

#[test]
fn passdown_error_mutations_are_caught_with_the_passdown_aim_and_far_later_without() {
    // The mutation, the first seed that catches it, how, and the first seed
    // that catches it without the passdown aims.
    let cases = [
        ("passdown-error-skips-pass-two", 9, "pool: # requests never completed", FIRST_WITHOUT[0]),
        (
            "passdown-error-fails-discard",
            4,
            "oracle: a discard failed with EIO in write mode: no fault could reach it",
            FIRST_WITHOUT[1],
        ),
    ];
    for (name, first_seed, signature, _) in cases {
        let (seed, out) = first_caught(name);
        let v = out.violation.as_ref().unwrap();
        assert_eq!(seed, first_seed, "{name}: {v}");
        assert_eq!(violation_signature(v.kind, &v.what), signature, "{name}: {v}");
        // The aim fired: the failed passdown is the aimed one.
        assert!(
            out.trace.events.iter().any(|e| matches!(
                e,
                Event::FaultFired { disk: DiskId::Data, what } if what.starts_with("aimed passdown discard error")
            )),
            "{name}: seed {seed}"
        );
        // The same seed without the mutation passes.
        let clean = run_config(&config(seed, None, true), &Checkers::default());
        assert!(clean.violation.is_none(), "{name}: seed {seed} fails without the mutation");
        assert!(clean.probes.get("passdown-failed").unwrap() > 0, "{name}: seed {seed}");
        minimized::assert_minimizes(name, &out.trace, signature);
    }
    // Without the passdown aims (every other op the same), a passdown
    // discard fails only where a random data fault hits one. Elsewhere the
    // code both mutations change never runs: those runs are the same with
    // and without them, and pass. Where one did fail, the mutations run.
    let mut failing = Vec::new();
    for seed in DEFAULT_SEEDS {
        let cfg = config(seed, None, true);
        let out = run_ops(&cfg, &without_passdown_aims(&cfg), &Checkers::default());
        assert!(out.violation.is_none(), "seed {seed}: {:?}", out.violation);
        if out.probes.get("passdown-failed") != Some(0) {
            failing.push(seed);
        }
    }
    println!("seeds with a failed passdown without the aims: {failing:?}");
    for (name, first_seed, _, first_without) in cases {
        let caught = failing.iter().copied().find(|&seed| {
            let cfg = config(seed, Some(name), true);
            run_ops(&cfg, &without_passdown_aims(&cfg), &Checkers::default()).violation.is_some()
        });
        println!("{name}: first caught at seed {first_seed} with the aims, {caught:?} without");
        assert_eq!(caught, first_without, "{name}");
        assert!(caught.is_none_or(|c| c > first_seed + 30), "{name}");
    }
}

/// The first seed of the default budget that catches each passdown
/// mutation without the passdown aims (a random data fault on a passdown
/// discard), in the order of `Mutations::AIMED`'s last two.
const FIRST_WITHOUT: [Option<u64>; 2] = [Some(44), Some(44)];
