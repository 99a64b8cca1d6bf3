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

fn explore(race: race::Race) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(move || race::run(race));
}

#[test]
fn get_put_race_lock_quiesce_promote_unlock() {
    for r in race::races(1) {
        explore(r);
    }
}
