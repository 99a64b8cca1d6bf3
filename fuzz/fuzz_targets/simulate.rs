//! Coverage-guided search over whole simulated runs: the bytes become a
//! thin (or cache) configuration and a sequence of ops
//! (`dmsim_sim::fuzz::FuzzCase`), the run goes exactly as `dmsim replay`
//! runs a trace, and any violation — the oracle, the metadata checkers,
//! the model's invariants, a panic of the model — is a crash.
//!
//! Run (docs/fuzzing.md): `cargo fuzz run simulate` from the repository
//! root. A crash leaves its input in `fuzz/artifacts/simulate/`; turn it
//! into an ordinary trace with `dmsim fuzz-to-trace <input> -o
//! crash.trace`, then `dmsim replay`, `minimize` and `show` it.
//!
//! Guidance: libFuzzer's own edge coverage, plus the run's coverage probes
//! (`dmsim_sim::probes`): each probe has a function of its own that runs
//! a loop as many times as the probe was reached (up to 255), so that
//! libFuzzer's counters of that loop make "probe N reached k times" a
//! feature of its own, including probes that are values rather than
//! code (the deepest tree, the pool's mode changes).

#![no_main]

use dmsim_sim::fuzz::{run_bytes, FuzzSettings};
use libfuzzer_sys::fuzz_target;

/// One function per probe, each a loop with a distinct constant, so that
/// no two are merged and each has counters of its own.
macro_rules! probe_features {
    ($($i:literal)*) => {
        const FEATURES: &[fn(u64)] = &[$({
            #[inline(never)]
            fn reached(times: u64) {
                for _ in 0..times.min(255) {
                    std::hint::black_box($i);
                }
            }
            reached
        }),*];
    };
}

probe_features!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31
                32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47);

fuzz_target!(
    init: {
        // A panic the simulator catches is a violation it reports (and
        // this target then panics with it); others reach libFuzzer's hook.
        dmsim_sim::quiet_caught_panics();
    },
    |data: &[u8]| {
        let out = run_bytes(data, &FuzzSettings::default());
        if let Some(probes) = &out.probes {
            for (i, (_, count)) in probes.iter().enumerate() {
                if let Some(feature) = FEATURES.get(i) {
                    feature(count);
                }
            }
        }
        if let Some(v) = out.violation {
            panic!(
                "{} violation at op {}: {}\n(turn this input into a trace: dmsim fuzz-to-trace <input> -o crash.trace)",
                v.kind, v.step, v.what
            );
        }
    }
);
