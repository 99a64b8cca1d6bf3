//! Prison v2 under loom: every interleaving (up to preemption bound 3) of an
//! I/O thread's `get`/`put` against a migration's
//! `lock`/`quiesce`/`lock_promote`/`unlock` on one cell; see
//! `common/prison_v2_race.rs` for what is checked.
//!
//! Run with
//! `RUSTFLAGS="--cfg loom" cargo test -p dmsim-model --test prison_v2_loom --release --target-dir target/loom`.
#![cfg(loom)]

#[path = "common/prison_v2_race.rs"]
mod race;

/// Explores `race`; returns how many executions loom ran.
fn explore(race: race::Race) -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let executions = Arc::new(AtomicUsize::new(0));
    let n = executions.clone();
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(move || {
        n.fetch_add(1, Ordering::Relaxed);
        race::run(race)
    });
    executions.load(Ordering::Relaxed)
}

#[test]
fn get_put_race_lock_quiesce_promote_unlock() {
    for r in race::races(2) {
        let executions = explore(r);
        eprintln!("{r:?}: {executions} executions");
        // Guards against the race degenerating into one schedule.
        assert!(executions > 10, "{r:?}: only {executions} executions");
    }
}
