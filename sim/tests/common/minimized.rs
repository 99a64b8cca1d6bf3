//! The check every mutation-catching test makes of its failing trace.
#![allow(dead_code)] // Not every test target that includes it uses all of it.

use dmsim_sim::run::{minimize, replay, violation_signature, Checkers};
use dmsim_traces::Trace;

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
