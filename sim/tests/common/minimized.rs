//! What every mutation-catching test of the thin campaign does: find the
//! first seed of the default budget that fails, and check its trace
//! minimizes.
#![allow(dead_code)] // Not every test target that includes it uses all of it.

use dmsim_sim::run::{
    minimize, replay, run_config, violation_signature, CampaignSettings, Checkers, RunConfig, RunOutcome,
};
use dmsim_traces::Trace;

/// `dmsim check`'s default budget.
pub const DEFAULT_SEEDS: std::ops::Range<u64> = 0..64;
/// `dmsim check`'s ops per seed.
pub const DEFAULT_OPS: usize = 300;

/// The first seed of [`DEFAULT_SEEDS`] whose run under `settings` has a
/// violation, and that run (panics, naming `name`, when none has).
pub fn first_failing(name: &str, settings: &CampaignSettings) -> (u64, RunOutcome) {
    DEFAULT_SEEDS
        .map(|seed| {
            (seed, run_config(&RunConfig::for_seed(seed, DEFAULT_OPS, settings), &Checkers::default()))
        })
        .find(|(_, out)| out.violation.is_some())
        .unwrap_or_else(|| panic!("{name}: nothing caught in {DEFAULT_SEEDS:?}"))
}

/// Minimizes `trace`, which fails as `signature`, and checks what a user
/// relies on: ops were removed, the minimized trace fails the same way on
/// replay and replays exactly. Prints the sizes under `name` and returns
/// the minimized length.
pub fn assert_minimizes(name: &str, trace: &Trace, signature: &str) -> usize {
    let before = trace.ops().count();
    let min = minimize(trace, &Checkers::default(), |_, _| {}).expect("minimizes");
    println!(
        "{name}: seed {}, {before} → {} ops ({} runs): {signature}",
        trace.header.seed, min.ops_after, min.runs
    );
    assert!(min.ops_after < before, "{name}: nothing removed");
    assert_eq!(min.signature, signature, "{name}");
    let again = replay(&min.trace, &Checkers::default()).unwrap();
    let v = again.outcome.violation.expect("the minimized trace fails");
    assert_eq!(violation_signature(v.kind, &v.what), signature, "{name}");
    assert_eq!(again.first_difference, None, "{name}: the minimized trace replays exactly");
    min.ops_after
}

/// Runs `f` on every item, on as many threads as the machine has cores
/// (each item's work is independent and deterministic; the order of the
/// threads changes nothing but the time). A panic in any fails the test,
/// after the others have finished.
pub fn for_each_in_parallel<T: Sync>(items: &[T], f: impl Fn(&T) + Sync) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(items.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                match items.get(i) {
                    Some(item) => f(item),
                    None => break,
                }
            });
        }
    });
}
