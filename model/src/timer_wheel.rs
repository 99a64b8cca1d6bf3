//! Where kernel 6.1 runs a delayed work item, in simulated time.
//!
//! Both targets' wakers re-queue themselves with `queue_delayed_work(…,
//! COMMIT_PERIOD)`, `HZ` jiffies ahead. The timer wheel does not fire a
//! timer at its due jiffy: a timer 64 to 511 jiffies away goes into a
//! level-1 bucket of 8 jiffies and fires at the first multiple of 8, in
//! absolute jiffies, strictly after its due jiffy (`calc_index` in
//! kernel/time/timer.c rounds the expiry up so that no timer fires early).
//! With `HZ` = 250 each run is 251 to 258 jiffies after the last. Which
//! jiffies are multiples of 8 depends on the absolute jiffy at simulated
//! time 0, its *phase*: a kernel replay reads it from the guest.

/// Simulated time in nanoseconds.
pub type Nanos = u64;

/// Debian 6.1's `CONFIG_HZ` (amd64).
pub const HZ: u32 = 250;

/// When a delayed work queued at `now` with a delay of `delay_jiffies`
/// (64 to 511: level 1 of the wheel) runs, on a kernel of `hz` whose
/// absolute jiffy at time 0 is `phase` (mod 8). The result is the start
/// of that jiffy.
pub fn delayed_work_due(now: Nanos, delay_jiffies: u64, hz: u32, phase: u64) -> Nanos {
    let per_jiffy = 1_000_000_000 / u64::from(hz.max(1));
    let phase = phase % 8;
    let due = now / per_jiffy + phase + delay_jiffies;
    let bucket = ((due >> 3) + 1) << 3;
    (bucket - phase) * per_jiffy
}

#[cfg(test)]
mod tests {
    use super::*;

    const JIFFY: Nanos = 4_000_000;

    #[test]
    fn a_timer_fires_at_the_next_bucket_after_its_due_jiffy() {
        // Absolute 3 + 250 = 253: bucket 256, relative 253.
        assert_eq!(delayed_work_due(0, 250, 250, 3), 253 * JIFFY);
        // Due exactly on a boundary (6 + 250 = 256): the next one, 264.
        assert_eq!(delayed_work_due(0, 250, 250, 6), 258 * JIFFY);
        // Anywhere inside a jiffy counts as that jiffy.
        assert_eq!(delayed_work_due(JIFFY - 1, 250, 250, 3), 253 * JIFFY);
        assert_eq!(delayed_work_due(JIFFY, 250, 250, 3), 253 * JIFFY, "jiffy 1: due 254, the same bucket");
    }

    #[test]
    fn every_run_is_251_to_258_jiffies_after_the_last() {
        for phase in 0..8 {
            let mut t = 0;
            for _ in 0..20 {
                let next = delayed_work_due(t, 250, 250, phase);
                let gap = (next - t) / JIFFY;
                assert!((251..=258).contains(&gap), "phase {phase}: gap {gap}");
                t = next;
            }
        }
    }
}
