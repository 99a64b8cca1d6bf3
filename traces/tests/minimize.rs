//! The minimizer: ddmin finds known causes and returns 1-minimal results,
//! simplify_each and simpler_ops converge on the simplest failing ops.

use std::collections::BTreeSet;

use dmsim_traces::minimize::{
    ddmin, ddmin_with_stats, minimize_ops, simpler_ops, simplify_each, simplify_each_with_stats,
};
use dmsim_traces::{CacheIoMode, CachePolicyKind, CrashMode, DiskFault, DiskId, FaultAim, Op};
use proptest::prelude::*;
use proptest::test_runner::RngSeed;

/// Whether removing any one item of `result` makes `fails` false.
fn one_minimal<T: Clone>(result: &[T], mut fails: impl FnMut(&[T]) -> bool) -> bool {
    (0..result.len()).all(|i| {
        let mut smaller = result.to_vec();
        smaller.remove(i);
        !fails(&smaller)
    })
}

#[test]
fn ddmin_finds_a_two_element_cause_in_a_hundred() {
    let items: Vec<u32> = (0..100).collect();
    let fails = |s: &[u32]| s.contains(&17) && s.contains(&83);
    let (result, stats) = ddmin_with_stats(&items, fails);
    assert_eq!(result, vec![17, 83]);
    assert!(one_minimal(&result, fails));
    assert!(stats.tests > 0 && stats.tests < 100, "{stats:?}");
    println!("ddmin: 100 items -> {result:?} in {} tests ({} cached)", stats.tests, stats.cache_hits);
    assert_eq!(ddmin(&items, fails), result);
}

#[test]
fn ddmin_keeps_order_and_handles_adjacent_causes() {
    let items: Vec<u32> = (0..100).collect();
    let result = ddmin(&items, |s| s.contains(&50) && s.contains(&49) && s.contains(&0));
    assert_eq!(result, vec![0, 49, 50]);
}

#[test]
fn ddmin_edge_cases() {
    let items: Vec<u32> = (0..10).collect();
    // Not failing: the input, unchanged, after one test.
    let (r, stats) = ddmin_with_stats(&items, |_| false);
    assert_eq!(r, items);
    assert_eq!(stats.tests, 1);
    // Failing always: the empty sequence.
    assert_eq!(ddmin(&items, |_| true), Vec::<u32>::new());
    // Empty and one-item inputs.
    assert_eq!(ddmin(&[] as &[u32], |_| true), Vec::<u32>::new());
    assert_eq!(ddmin(&[7u32], |s| s == [7]), vec![7]);
    // Non-monotone: fails when the count of even numbers is 2 or 4.
    let fails = |s: &[u32]| matches!(s.iter().filter(|&&x| x % 2 == 0).count(), 2 | 4);
    let r = ddmin(&items[..8], fails);
    assert!(fails(&r) && one_minimal(&r, fails), "{r:?}");
    assert_eq!(r, vec![0, 2]);
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, rng_seed: RngSeed::Fixed(0), ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config(300))]

    /// For a monotone failure (all of a set of items present) ddmin finds
    /// exactly that set.
    #[test]
    fn ddmin_finds_exactly_the_cause(n in 1usize..80, cause in prop::collection::btree_set(0usize..80, 0..5)) {
        let cause: BTreeSet<usize> = cause.into_iter().filter(|&c| c < n).collect();
        let items: Vec<usize> = (0..n).collect();
        let fails = |s: &[usize]| cause.iter().all(|c| s.contains(c));
        let r = ddmin(&items, fails);
        prop_assert_eq!(r, cause.iter().copied().collect::<Vec<_>>());
    }

    /// For any deterministic failure the result fails and is 1-minimal.
    #[test]
    fn ddmin_result_is_one_minimal(items in prop::collection::vec(0u8..16, 0..40), modulus in 2u32..7, want in 0u32..7) {
        let fails = |s: &[u8]| s.iter().map(|&x| u32::from(x)).sum::<u32>() % modulus == want % modulus;
        let r = ddmin(&items, fails);
        if fails(&items) {
            prop_assert!(fails(&r));
            prop_assert!(one_minimal(&r, fails));
        } else {
            prop_assert_eq!(r, items);
        }
    }

    /// Taking the first candidate again and again ends, and no candidate is
    /// the op itself.
    #[test]
    fn simpler_ops_terminate(ops in prop::collection::vec(any_op(), 1..20)) {
        for op in ops {
            let mut cur = op;
            for step in 0.. {
                prop_assert!(step < 200, "{:?} does not converge", op);
                let cands = simpler_ops(&cur);
                prop_assert!(!cands.contains(&cur));
                // The last candidate is the smallest step: the longest chain.
                match cands.last() {
                    Some(&next) => cur = next,
                    None => break,
                }
            }
        }
    }
}

fn any_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (any::<u8>(), any::<u32>(), any::<u16>(), any::<bool>(), any::<bool>()).prop_map(
            |(dev, sector, nr_sectors, fua, preflush)| Op::Write { dev, sector, nr_sectors, fua, preflush }
        ),
        (any::<u8>(), any::<u32>(), any::<u32>()).prop_map(|(dev, sector, nr_sectors)| Op::Discard {
            dev,
            sector,
            nr_sectors
        }),
        any::<u8>().prop_map(|pick| Op::Complete { pick }),
        any::<i32>()
            .prop_map(|offset| Op::Fault { disk: DiskId::Data, fault: DiskFault::Misdirect { offset } }),
        any::<u32>().prop_map(|bit| Op::Fault { disk: DiskId::Metadata, fault: DiskFault::BitFlip { bit } }),
        any::<u16>().prop_map(|millis| Op::Tick { millis }),
        (prop::sample::select(CrashMode::ALL.to_vec()), any::<u32>())
            .prop_map(|(mode, seed)| Op::Crash { mode, seed }),
        (
            prop::sample::select(CacheIoMode::ALL.to_vec()),
            prop::sample::select(CachePolicyKind::ALL.to_vec())
        )
            .prop_map(|(mode, policy)| Op::Reload { mode, policy }),
        (any::<u32>(), any::<u16>()).prop_map(|(cblock, nr)| Op::Invalidate { cblock, nr }),
        Just(Op::Status),
        (any::<u32>(), any::<u32>())
            .prop_map(|(cache_blocks, origin_blocks)| Op::Resize { cache_blocks, origin_blocks }),
        (prop::sample::select(DiskId::ALL.to_vec()), any::<bool>())
            .prop_map(|(disk, permanent)| Op::Fault { disk, fault: DiskFault::ReadError { permanent } }),
    ]
}

#[test]
fn simpler_ops_examples() {
    let w = Op::Write { dev: 2, sector: 257, nr_sectors: 256, fua: true, preflush: true };
    let c = simpler_ops(&w);
    assert_eq!(c[0], Op::Write { dev: 0, sector: 0, nr_sectors: 1, fua: false, preflush: false });
    assert!(c.contains(&Op::Write { dev: 2, sector: 257, nr_sectors: 256, fua: false, preflush: true }));
    assert!(c.contains(&Op::Write { dev: 2, sector: 257, nr_sectors: 128, fua: true, preflush: true }));
    assert_eq!(
        simpler_ops(&Op::Crash { mode: CrashMode::Torn, seed: 17 })[0],
        Op::Crash { mode: CrashMode::LoseAll, seed: 0 }
    );
    assert_eq!(simpler_ops(&Op::Crash { mode: CrashMode::LoseAll, seed: 0 }), vec![]);
    assert_eq!(
        simpler_ops(&Op::Fault { disk: DiskId::Data, fault: DiskFault::ReadError { permanent: true } }),
        vec![Op::Fault { disk: DiskId::Data, fault: DiskFault::ReadError { permanent: false } }]
    );
    assert_eq!(
        simpler_ops(&Op::Fault { disk: DiskId::Data, fault: DiskFault::Misdirect { offset: -8 } }),
        vec![
            Op::Fault { disk: DiskId::Data, fault: DiskFault::Misdirect { offset: -1 } },
            Op::Fault { disk: DiskId::Data, fault: DiskFault::Misdirect { offset: -4 } },
        ]
    );
    assert_eq!(
        simpler_ops(&Op::Tick { millis: 1000 }),
        vec![Op::Tick { millis: 1 }, Op::Tick { millis: 500 }]
    );
    assert_eq!(simpler_ops(&Op::Complete { pick: 0 }), vec![]);
    assert_eq!(simpler_ops(&Op::Worker), vec![]);
    assert_eq!(simpler_ops(&Op::Status), vec![]);
    let reload = |mode, policy| Op::Reload { mode, policy };
    assert_eq!(
        simpler_ops(&reload(CacheIoMode::Passthrough, CachePolicyKind::Cleaner)),
        vec![
            reload(CacheIoMode::Writeback, CachePolicyKind::Smq),
            reload(CacheIoMode::Writeback, CachePolicyKind::Cleaner),
            reload(CacheIoMode::Writethrough, CachePolicyKind::Cleaner),
            reload(CacheIoMode::Passthrough, CachePolicyKind::Smq),
        ]
    );
    assert_eq!(simpler_ops(&reload(CacheIoMode::Writeback, CachePolicyKind::Smq)), vec![]);
    assert_eq!(
        simpler_ops(&Op::Invalidate { cblock: 300, nr: 8 }),
        vec![
            Op::Invalidate { cblock: 0, nr: 1 },
            Op::Invalidate { cblock: 300, nr: 1 },
            Op::Invalidate { cblock: 300, nr: 4 },
            Op::Invalidate { cblock: 0, nr: 8 },
            Op::Invalidate { cblock: 150, nr: 8 },
        ]
    );
    assert_eq!(simpler_ops(&Op::Invalidate { cblock: 0, nr: 1 }), vec![]);
    let resize = |cache_blocks, origin_blocks| Op::Resize { cache_blocks, origin_blocks };
    assert_eq!(
        simpler_ops(&resize(8, 100)),
        vec![resize(1, 100), resize(4, 100), resize(8, 1), resize(8, 50)]
    );
    assert_eq!(simpler_ops(&resize(1, 1)), vec![]);
    let aim = |aim| Op::AimFault { aim };
    assert_eq!(simpler_ops(&aim(FaultAim::Abort)), vec![aim(FaultAim::Commit { request: 0 })]);
    assert_eq!(
        simpler_ops(&aim(FaultAim::Commit { request: 3 })),
        vec![aim(FaultAim::Commit { request: 0 }), aim(FaultAim::Commit { request: 1 })]
    );
    assert_eq!(simpler_ops(&aim(FaultAim::Passdown)), vec![]);
}

/// The failure: a FUA write of at least 4 sectors somewhere before a crash
/// that is not lose-all.
fn fua_then_crash(ops: &[Op]) -> bool {
    let Some(w) = ops.iter().position(|op| matches!(op, Op::Write { fua: true, nr_sectors: 4.., .. })) else {
        return false;
    };
    ops[w..].iter().any(|op| matches!(op, Op::Crash { mode, .. } if *mode != CrashMode::LoseAll))
}

fn noisy_run() -> Vec<Op> {
    let mut ops = Vec::new();
    for i in 0..30u8 {
        ops.push(Op::Write {
            dev: i % 3,
            sector: u32::from(i) * 100,
            nr_sectors: 64,
            fua: i == 11,
            preflush: i % 2 == 0,
        });
        ops.push(Op::Worker);
        ops.push(Op::Complete { pick: i });
        if i == 20 {
            ops.push(Op::Crash { mode: CrashMode::Torn, seed: 99 });
        }
    }
    ops
}

#[test]
fn simplify_each_simplifies_every_item() {
    let ops = vec![
        Op::Write { dev: 2, sector: 257, nr_sectors: 256, fua: true, preflush: true },
        Op::Tick { millis: 700 },
        Op::Crash { mode: CrashMode::Torn, seed: 99 },
    ];
    let (r, stats) = simplify_each_with_stats(ops, simpler_ops, fua_then_crash);
    assert_eq!(
        r,
        vec![
            Op::Write { dev: 0, sector: 0, nr_sectors: 4, fua: true, preflush: false },
            Op::Tick { millis: 1 },
            Op::Crash { mode: CrashMode::KeepAll, seed: 0 },
        ]
    );
    assert!(stats.reductions > 0 && stats.tests > stats.reductions, "{stats:?}");
    // Not failing: unchanged.
    let ops = vec![Op::Tick { millis: 700 }];
    assert_eq!(simplify_each(ops.clone(), simpler_ops, |_| false), ops);
    // A cycling candidate function still ends.
    let r = simplify_each(vec![0u8, 1], |&x| vec![1 - x], |_| true);
    assert_eq!(r.len(), 2);
}

#[test]
fn minimize_ops_end_to_end() {
    let ops = noisy_run();
    let (r, stats) = minimize_ops(&ops, fua_then_crash);
    assert_eq!(
        r,
        vec![
            Op::Write { dev: 0, sector: 0, nr_sectors: 4, fua: true, preflush: false },
            Op::Crash { mode: CrashMode::KeepAll, seed: 0 },
        ]
    );
    println!("minimize_ops: {} ops -> {} in {} tests", ops.len(), r.len(), stats.tests);
    let (r, stats) = minimize_ops(&ops[..5], fua_then_crash);
    assert_eq!((r, stats.tests), (ops[..5].to_vec(), 1));
}
