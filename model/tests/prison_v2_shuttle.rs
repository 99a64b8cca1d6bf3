//! Prison v2 under shuttle: random and PCT schedules of an I/O thread's
//! `get`/`put` (several bios) against a migration's
//! `lock`/`quiesce`/`lock_promote`/`unlock` on one cell; see
//! `common/prison_v2_race.rs` for what is checked.
//!
//! Run with `cargo test -p dmsim-model --features shuttle --test prison_v2_shuttle`.
#![cfg(feature = "shuttle")]

#[path = "common/prison_v2_race.rs"]
mod race;

const ITERATIONS: usize = 2000;

#[test]
fn get_put_race_lock_quiesce_promote_unlock() {
    for r in race::races(3) {
        shuttle::check_random(move || race::run(r), ITERATIONS);
        shuttle::check_pct(move || race::run(r), ITERATIONS, 3);
    }
}
