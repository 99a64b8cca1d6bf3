//! The thin campaign on the kernel, a sample (`dmsim check --on kernel`
//! is the whole of it; docs/kernel-shim.md, "The campaign on the
//! kernel"): the campaign's traces of seeds 0..8 — every workload the
//! seeds draw, their swarms' faults and crashes — replayed on dm-thin with
//! the pool on controlled disks and judged against the serialized
//! simulator at the end and at every crash. Every seed must run (none
//! refused, none failed), and at least [`EQUAL_AT_LEAST`] of them be
//! L1-equal at the end and at every crash; every other seed's first
//! difference is printed. Then the detectors, on one kernel run of a
//! durability seed (the mutations are the model's: the kernel's answer
//! to the honest trace is judged again): a deliberately broken model
//! (`data-not-flushed-before-commit`) must diverge from the kernel at a
//! crash, the report naming it; one that does not commit for a flush
//! (`fua-before-commit`) must commit after other ops than the kernel.
//!
//! Needs what `kernel_ublk_crash` needs (qemu, `linux-image-amd64`,
//! `linux-source-6.1`, `linux-headers-<release>`). Without them the test
//! prints SKIPPED, or fails under `CI=true`.

#[path = "common/thin_tools.rs"]
mod thin_tools;
use std::time::Instant;

use thin_tools::skip_or_fail;

use dmsim_kernel_shim::thin_campaign::{self, SeedOutcome, SeedResult, Summary, Target};
use dmsim_kernel_shim::thin_replay::{judge, ThinReplayReport, Verdict};
use dmsim_kernel_shim::{KernelResult, KernelRun, KernelShim, ShimError};
use dmsim_model::mutation::Mutations;
use dmsim_sim::run::CampaignSettings;

/// The sample's seeds.
const SEEDS: std::ops::Range<u64> = 0..8;

/// Seeds of the sample that must be L1-equal at the end and at every
/// crash (the measure; an op answered otherwise in a named class,
/// such as the pool's mode around a timer commit, does not count
/// against it): 8 of 8 in stop 39's two runs, 7 or 8 since the kernel
/// grows its metadata device (seed 3) and the simulator follows a FUA
/// write with the agent's flush (seed 1); seed 7 depends on the kernel's
/// timing (a `delete` meets a device whose write a full pool queued;
/// docs/kernel-shim.md, "Where it stands"). Since stop 39 the pool's mode
/// is compared at every op, so seeds 6 and 7 are often *commit-timing*
/// rather than equal at every op. One more seed's worth of margin.
const EQUAL_AT_LEAST: usize = 6;

/// A durability seed equal on the kernel with the model as it is, with
/// 15 crashes.
const DETECTOR_SEEDS: [u64; 1] = [40];

/// The sample's metadata-pressure seed (its workload grows the metadata
/// device).
const METADATA_PRESSURE_SEED: u64 = 3;

#[test]
fn the_campaigns_traces_on_the_kernel() {
    let shim = match KernelShim::prepare_with_ublk() {
        Ok(s) => s,
        Err(e @ ShimError::Missing(_)) => return skip_or_fail("kernel campaign test", &e.to_string()),
        Err(e) => panic!("preparing the VM: {e}"),
    };
    let started = Instant::now();
    let outcomes =
        thin_campaign::run(&shim, SEEDS, 300, &CampaignSettings::default(), 4, false, Target::Kernel, |o| {
            eprintln!("{}", o.line());
        });
    let s = Summary::of(&outcomes);
    eprintln!(
        "{} seeds in {:.0} s: {} equal, {} explained, {} unexplained, {} refused, {} failed; crash states {}/{} equal",
        s.seeds,
        started.elapsed().as_secs_f64(),
        s.equal,
        s.explained,
        s.unexplained,
        s.refused,
        s.failed,
        s.crash_states_equal,
        s.crash_states
    );
    assert_eq!(s.seeds, SEEDS.count());
    for o in &outcomes {
        assert!(
            matches!(o.result, SeedResult::Judged(_)),
            "seed {} did not run to a verdict: {}",
            o.seed,
            o.line()
        );
    }
    assert!(
        s.l1_equal >= EQUAL_AT_LEAST,
        "{} of {} seeds L1-equal, expected at least {EQUAL_AT_LEAST}",
        s.l1_equal,
        s.seeds
    );
    assert!(s.crash_states > 0, "the sample's swarms cut power");
    // Seed 3 is a metadata-pressure seed: its pool runs out of metadata
    // space and the trace grows the metadata device; the agent grows the
    // kernel's as the simulator grows its own.
    let pressure = outcomes.iter().find(|o| o.seed == METADATA_PRESSURE_SEED).expect("the seed ran");
    let SeedResult::Judged(r) = &pressure.result else { panic!("{}", pressure.line()) };
    assert!(!r.metadata_growths.is_empty(), "seed {METADATA_PRESSURE_SEED} grows its metadata device");
    assert!(r.metadata_growths.iter().all(|(_, a)| a == "ok"), "{:?}", r.metadata_growths);
    assert_eq!(r.class(), None, "{}", pressure.line());

    // The detectors, on one kernel run of a durability seed: the mutations
    // are the model's only (the agent runs the same ops whatever the
    // header says), so each broken model is judged against the kernel's
    // answer to the honest trace, kept for that, without another boot.
    let honest = CampaignSettings::default();
    let baseline = thin_campaign::run(&shim, DETECTOR_SEEDS, 300, &honest, 4, true, Target::Kernel, |_| {});
    let judge_broken = |b: &SeedOutcome, mutation: &str| -> ThinReplayReport {
        let answer = b.kernel_answer.as_deref().expect("the answer is kept");
        let image = b.kernel_metadata.clone().expect("the metadata is kept");
        let run = KernelRun::from_saved(KernelResult::from_text(answer).expect("the answer parses"), image);
        let broken = CampaignSettings {
            mutations: Mutations::from_names([mutation]).expect("a known mutation"),
            ..CampaignSettings::default()
        };
        let trace = thin_campaign::campaign_trace(b.seed, 300, &broken);
        judge(&trace, true, &run).unwrap_or_else(|e| panic!("seed {} with {mutation}: {e}", b.seed))
    };
    for b in &baseline {
        assert_eq!(
            b.verdict(),
            Some(Verdict::Equal),
            "seed {} with the model as it is: {}",
            b.seed,
            b.line()
        );
        // The model that commits before the data it maps is flushed loses
        // data at a crash the kernel keeps.
        let r = judge_broken(b, "data-not-flushed-before-commit");
        let c = r
            .first_bad_crash()
            .unwrap_or_else(|| panic!("the broken model matched the kernel: {:?}", r.first_difference()));
        eprintln!("broken: seed {}: {:?}", b.seed, r.first_difference());
        assert!(
            c.differences.iter().any(|d| d.contains(" block ")),
            "the report names a block: {:?}",
            c.differences
        );
        assert!(
            r.first_difference().is_some_and(|d| d.starts_with(&format!("crash {} (op {})", c.crash, c.op))),
            "{:?}",
            r.first_difference()
        );

        // The commit record: a model that lets FLUSH and FUA bios pass
        // without a commit (`fua-before-commit`) commits after other ops
        // than the kernel, and the report says where the two first part
        // (the agent's record of the kernel's metadata superblock after
        // each op against the model's).
        let r = judge_broken(b, "fua-before-commit");
        let parted = r.first_commit_difference.as_deref().unwrap_or_else(|| {
            panic!("the model that does not commit for a flush committed where the kernel did")
        });
        assert!(parted.ends_with("the kernel committed, the model did not"), "{parted}");
        // And it loses at a crash what the kernel's flushes made durable.
        let c = r.first_bad_crash().unwrap_or_else(|| panic!("no crash differs: {:?}", r.first_difference()));
        assert!(c.differences.iter().any(|d| d.contains(" block ")), "{:?}", c.differences);
        let SeedResult::Judged(honest) = &b.result else { unreachable!("checked above") };
        eprintln!(
            "seed {}: commits part (model as it is) {:?}; (no commit on flush) {parted}",
            b.seed, honest.first_commit_difference
        );
    }
}
