//! The smq / mq / cleaner policies (model::cache::policy) against the rules
//! of dm-cache-policy-smq.c in Linux 6.1, and the determinism of the policy
//! (same calls → same background work, residency and state).

use dmsim_model::cache::policy::smq::inspect::QueueItem;
use dmsim_model::cache::policy::smq::ops::random_level;
use dmsim_model::cache::policy::{
    hints_valid, CachePolicy, DataDir, PolicyOp, PolicyType, PolicyWork, SmqParams, SmqPolicy,
};
use dmsim_model::errno::Errno;
use proptest::prelude::*;

const SEC: u64 = 1_000_000_000;
const BLOCK: u64 = 64; // sectors

fn policy(t: PolicyType, cache_blocks: u32, origin_blocks: u64) -> SmqPolicy {
    SmqPolicy::new(SmqParams::new(t, cache_blocks, origin_blocks * BLOCK, BLOCK), 0)
}

/// Reads `oblock` with a tick every 10 ms between (each tick clears the
/// hotspot hit bits, so every miss climbs) until the policy wants to
/// promote it; returns the number of lookups it took and the time.
fn miss_until_promoted(p: &mut SmqPolicy, oblock: u64, mut now: u64) -> (usize, u64) {
    for n in 1..=100 {
        let l = p.lookup(oblock, DataDir::Read, false);
        assert_eq!(l.cblock, None);
        if l.background_queued {
            return (n, now);
        }
        now += SEC / 100;
        p.tick(false, now);
    }
    panic!("block {oblock} never promoted");
}

#[test]
fn no_read_promotion_before_the_first_tick() {
    let mut p = policy(PolicyType::Smq, 64, 1 << 20);
    assert_eq!(p.promote_levels(), (64, 64));
    for _ in 0..200 {
        assert!(!p.lookup(7, DataDir::Read, false).background_queued);
    }
    assert_eq!(p.get_background_work(true), None);
    // The first tick finds empty hotspot statistics: poor confidence, 48.
    p.tick(true, SEC);
    assert_eq!(p.promote_levels(), (48, 48));
    assert_eq!(p.hotspot_level_jump(), 4);
}

#[test]
fn a_block_hit_often_enough_is_promoted() {
    let mut p = policy(PolicyType::Smq, 64, 1 << 20);
    p.tick(true, SEC);
    let (n, _) = miss_until_promoted(&mut p, 1234, SEC);
    assert!(n >= 2, "one miss is not enough");
    assert!(p.hotspot_level(1234).unwrap() >= 48);
    assert_eq!(p.residency(), 1, "the cache block is reserved at queue time");
    let w = p.get_background_work(false).expect("queued promotion is returned even when busy");
    assert_eq!(w, PolicyWork { op: PolicyOp::Promote, oblock: 1234, cblock: 0 });
    assert_eq!(p.lookup(1234, DataDir::Read, false).cblock, None, "not mapped until complete");
    p.complete_background_work(w, true);
    p.clear_dirty(0);
    assert_eq!(p.lookup(1234, DataDir::Read, false).cblock, Some(0));
    let e = p.entry(0).unwrap();
    assert_eq!((e.level, e.dirty), (63, false));
    p.check().unwrap();
}

#[test]
fn failed_promotion_frees_the_cache_block() {
    let mut p = policy(PolicyType::Smq, 64, 1 << 20);
    p.tick(true, SEC);
    miss_until_promoted(&mut p, 99, SEC);
    let w = p.get_background_work(true).unwrap();
    p.complete_background_work(w, false);
    assert_eq!(p.residency(), 0);
    assert_eq!(p.entry(w.cblock), None);
    p.check().unwrap();
}

#[test]
fn a_whole_block_write_is_promoted_at_once_and_handed_back() {
    let mut p = policy(PolicyType::Smq, 4, 1 << 20);
    let l = p.lookup_with_work(50, DataDir::Write, true);
    let w = l.work.expect("fast promotion while a cache block is free");
    assert_eq!(w, PolicyWork { op: PolicyOp::Promote, oblock: 50, cblock: 0 });
    assert_eq!(p.get_background_work(true), None, "handed-back work is not queued");
    // A second write to the same block while the first is in flight.
    assert_eq!(p.lookup_with_work(50, DataDir::Write, true).work, None);
    // A read is never fast-promoted.
    assert!(!p.lookup(51, DataDir::Read, true).background_queued);
    p.complete_background_work(w, true);
    p.set_dirty(0);
    assert!(p.entry(0).unwrap().dirty);
    assert_eq!(p.queue_order(true), vec![0]);
    p.check().unwrap();
}

/// A clean cache full of loaded blocks, cblock i at level 4 i.
fn full_clean_cache(t: PolicyType) -> SmqPolicy {
    let mut p = policy(t, 8, 1 << 20);
    p.tick(true, SEC);
    for c in 0..8u32 {
        p.load_mapping(1000 + c as u64, c, false, 4 * c, true).unwrap();
    }
    p
}

#[test]
fn a_full_cache_demotes_the_coldest_clean_block_first() {
    let mut p = full_clean_cache(PolicyType::Smq);
    assert_eq!(p.queue_order(false), (0..8).collect::<Vec<_>>());
    miss_until_promoted(&mut p, 5, SEC);
    // No free block: a demotion is queued instead of the promotion.
    assert_eq!(p.tracker().nr_promotions_queued(), 0);
    let w = p.get_background_work(false).unwrap();
    assert_eq!(w, PolicyWork { op: PolicyOp::Demote, oblock: 1000, cblock: 0 });
    // Demotions queued count toward the free target (25 % of 8 = 2).
    p.lookup(5, DataDir::Read, false);
    let w2 = p.get_background_work(false).unwrap();
    assert_eq!(w2, PolicyWork { op: PolicyOp::Demote, oblock: 1001, cblock: 1 });
    p.lookup(5, DataDir::Read, false);
    assert_eq!(p.get_background_work(false), None, "free target met by queued demotions");
    p.complete_background_work(w, true);
    p.complete_background_work(w2, true);
    assert_eq!(p.residency(), 6);
    // Now the block is promoted into the first freed cache block.
    assert!(p.lookup(5, DataDir::Read, false).background_queued);
    assert_eq!(
        p.get_background_work(false).unwrap(),
        PolicyWork { op: PolicyOp::Promote, oblock: 5, cblock: 0 }
    );
    p.check().unwrap();
}

#[test]
fn only_the_lower_half_of_the_clean_levels_is_demoted() {
    let mut p = policy(PolicyType::Smq, 4, 1 << 20);
    p.tick(true, SEC);
    for c in 0..4u32 {
        p.load_mapping(c as u64, c, false, 32 + c, true).unwrap();
    }
    miss_until_promoted(&mut p, 500, SEC);
    assert_eq!(p.get_background_work(false), None);
    assert!(p.tracker().is_empty());
}

#[test]
fn a_full_dirty_cache_writes_back_instead_of_demoting() {
    let mut p = policy(PolicyType::Smq, 4, 1 << 20);
    p.tick(true, SEC);
    for c in 0..4u32 {
        p.load_mapping(c as u64 * 7, c, true, 10 - c, true).unwrap();
    }
    miss_until_promoted(&mut p, 500, SEC);
    // Loaded entries sit in front of the sentinels, so even the busy
    // (non-crossing) writeback finds the lowest one: cblock 3 at level 7.
    let w = p.get_background_work(false).unwrap();
    assert_eq!(w, PolicyWork { op: PolicyOp::Writeback, oblock: 21, cblock: 3 });
    p.clear_dirty(3);
    p.complete_background_work(w, true);
    assert_eq!(p.queue_order(false), vec![3]);
    p.check().unwrap();
}

#[test]
fn dirty_blocks_are_written_back_when_idle_and_not_when_busy() {
    let mut p = policy(PolicyType::Smq, 16, 1 << 20);
    p.tick(true, SEC);
    for c in 0..6u32 {
        p.load_mapping(100 + c as u64, c, c % 2 == 0, c, true).unwrap();
    }
    assert_eq!(p.get_background_work(false), None, "busy: the clean target is always met");
    let mut written = Vec::new();
    while let Some(w) = p.get_background_work(true) {
        assert_eq!(w.op, PolicyOp::Writeback);
        assert!(p.entry(w.cblock).unwrap().pending_work);
        p.clear_dirty(w.cblock); // the core's force_clear_dirty
        p.complete_background_work(w, true);
        written.push(w.cblock);
    }
    assert_eq!(written, vec![0, 2, 4], "oldest (lowest level) first");
    assert_eq!(p.queue_sizes(), (6, 0));
    p.check().unwrap();
}

#[test]
fn cleaner_writes_back_everything_and_never_promotes() {
    for ignores_idle in [true, false] {
        let mut params = SmqParams::new(PolicyType::Cleaner, 16, (1 << 20) * BLOCK, BLOCK);
        params.cleaner_ignores_idle = ignores_idle;
        let mut p = SmqPolicy::new(params, 0);
        assert!(!p.migrations_allowed());
        for c in 0..3u32 {
            p.load_mapping(c as u64, c, true, 0, false).unwrap();
        }
        let mut now = 0;
        for i in 0..50 {
            now += SEC + 1;
            p.tick(true, now);
            let l = p.lookup_with_work(1000 + i % 3, DataDir::Write, true);
            assert_eq!(l.work, None);
            p.lookup(2000 + i % 2, DataDir::Read, false);
        }
        assert_eq!(p.residency(), 3);
        let busy = p.get_background_work(false);
        // 6.1.y cleans under load; 6.1.0 only when idle.
        assert_eq!(busy.is_some(), ignores_idle);
        let mut n = 0;
        let mut next = busy.or_else(|| p.get_background_work(true));
        while let Some(w) = next {
            assert_eq!(w.op, PolicyOp::Writeback);
            p.clear_dirty(w.cblock);
            p.complete_background_work(w, true);
            n += 1;
            next = p.get_background_work(true);
        }
        assert_eq!(n, 3);
        assert_eq!(p.queue_sizes(), (3, 0));
        assert_eq!(p.emit_config_values(), "0 ");
    }
}

#[test]
fn busy_writeback_does_not_cross_the_writeback_sentinels() {
    // The cleaner cleans under load in 6.1.y, but its busy writeback still
    // stops at the first sentinel of each level: a block dirtied now sits
    // behind both sentinels and is only reached once both sets have moved
    // past it (two writeback periods), or at once when idle.
    let j = SEC / 250;
    let mut p = policy(PolicyType::Cleaner, 8, 1 << 20);
    p.tick(true, j); // starts the 60 s cache period before any block exists
    p.load_mapping(40, 0, false, 5, true).unwrap();
    p.set_dirty(0);
    assert_eq!(p.queue_level(true, 5)[2], QueueItem::Block(0));
    assert_eq!(p.get_background_work(false), None);
    p.tick(true, 10 * SEC + j);
    assert_eq!(p.get_background_work(false), None, "one set still in front");
    p.tick(true, 20 * SEC + 2 * j);
    let w = p.get_background_work(false).unwrap();
    assert_eq!(w, PolicyWork { op: PolicyOp::Writeback, oblock: 40, cblock: 0 });
    // The idle path crosses sentinels.
    let mut q = policy(PolicyType::Cleaner, 8, 1 << 20);
    q.tick(true, j);
    q.load_mapping(40, 0, false, 5, true).unwrap();
    q.set_dirty(0);
    assert_eq!(q.get_background_work(true).map(|w| w.cblock), Some(0));
}

#[test]
fn a_failed_work_allocation_puts_the_block_back_in_front() {
    let mut p = policy(PolicyType::Smq, 8, 1 << 20);
    p.tick(true, SEC);
    p.load_mapping(1, 0, true, 3, true).unwrap();
    p.load_mapping(2, 1, true, 3, true).unwrap();
    assert_eq!(p.queue_order(true), vec![1, 0]);
    // GFP_NOWAIT failure: the writeback is dropped, the entry goes back to
    // the front of its level, and the next request picks it again.
    p.tracker_mut().fail_next_allocs(1);
    assert_eq!(p.get_background_work(true), None);
    assert_eq!(p.queue_order(true), vec![1, 0]);
    assert_eq!(p.get_background_work(true).map(|w| w.cblock), Some(1));
    // A failed promotion gives its reserved cache block back — to the tail
    // of the free list, so the next promotion takes cblock 3, not 2: the
    // allocator is first-freed-first-reused, not lowest-index-first.
    p.tracker_mut().fail_next_allocs(1);
    assert!(p.lookup_with_work(77, DataDir::Write, true).work.is_none());
    assert_eq!(p.residency(), 2);
    assert_eq!(p.lookup_with_work(77, DataDir::Write, true).work.map(|w| w.cblock), Some(3));
    p.check().unwrap();
}

#[test]
fn hints_round_trip_through_get_hint_and_load_mapping() {
    let mut a = policy(PolicyType::Smq, 32, 1 << 20);
    a.tick(true, SEC);
    for c in 0..20u32 {
        a.load_mapping(c as u64 * 3, c, c % 3 == 0, (c * 7) % 70, true).unwrap();
    }
    // Some churn: hits move entries up.
    for c in 0..20u64 {
        a.lookup(c * 3, DataDir::Read, false);
    }
    let saved = a.policy_hints();
    assert_eq!((saved.name.as_str(), saved.version, saved.hint_size), ("smq", [2, 0, 0], 4));
    assert_eq!(saved.hints.len(), 32);
    assert_eq!(&saved.hints[20..], &[0; 12], "unmapped blocks hint 0");
    assert_eq!(a.get_hint(9), 63, "a hint of 63 or more loads at 63 and a hit cannot raise it");

    let mut b = policy(PolicyType::Smq, 32, 1 << 20);
    for c in 0..20u32 {
        let e = a.entry(c).unwrap();
        b.load_mapping(e.oblock, c, e.dirty, saved.hints[c as usize], true).unwrap();
    }
    assert_eq!(b.policy_hints(), saved);
    b.check().unwrap();

    // Without valid hints the level is hash_32(cblock, 9) & 63.
    let mut c = policy(PolicyType::Smq, 32, 1 << 20);
    c.load_mapping(1, 5, false, 60, false).unwrap();
    assert_eq!(c.get_hint(5), random_level(5));
    c.load_mapping(3, 6, false, 200, true).unwrap();
    assert_eq!(c.get_hint(6), 63, "hints are capped at the top level");
    c.invalidate_mapping(6).unwrap();
    assert_eq!(c.load_mapping(2, 5, false, 0, false), Err(Errno::EINVAL));
    assert_eq!(c.invalidate_mapping(6), Err(Errno::ENODATA));
    c.invalidate_mapping(5).unwrap();
    assert_eq!(c.residency(), 0);
}

#[test]
fn hint_validity_follows_the_metadata_rules() {
    let ok = |t, clean, name, v, size, root| hints_valid(t, clean, name, v, size, root);
    assert!(ok(PolicyType::Smq, true, "smq", [2, 0, 0], 4, true));
    assert!(ok(PolicyType::Default, true, "smq", [2, 9, 9], 4, true), "default reports smq");
    assert!(!ok(PolicyType::Mq, true, "smq", [2, 0, 0], 4, true));
    assert!(!ok(PolicyType::Smq, false, "smq", [2, 0, 0], 4, true));
    assert!(!ok(PolicyType::Smq, true, "smq", [1, 0, 0], 4, true));
    assert!(!ok(PolicyType::Smq, true, "smq", [2, 0, 0], 0, true));
    assert!(!ok(PolicyType::Smq, true, "smq", [2, 0, 0], 4, false));
}

#[test]
fn writeback_sentinels_alternate_every_ten_seconds() {
    let mut p = policy(PolicyType::Smq, 8, 1 << 20);
    let both = |cur_last: bool| vec![QueueItem::Sentinel(!cur_last), QueueItem::Sentinel(cur_last)];
    assert_eq!(p.queue_level(true, 3), both(true));
    assert_eq!(p.queue_level(false, 3), both(true));
    p.tick(true, 10 * SEC); // exactly the deadline: not after it
    assert_eq!(p.queue_level(true, 3), both(true));
    p.tick(true, 10 * SEC + SEC / 250);
    assert_eq!(p.queue_level(true, 3), both(false), "writeback set swapped");
    assert_eq!(p.queue_level(false, 3), both(true), "demote set not yet");
    p.tick(true, 61 * SEC);
    assert_eq!(p.queue_level(false, 3), both(false), "demote set swapped after 60 s");
    // A loaded dirty block sits in front of both sentinels.
    p.load_mapping(9, 2, true, 3, true).unwrap();
    assert_eq!(p.queue_level(true, 3)[0], QueueItem::Block(2));
}

#[test]
fn mq_accepts_and_ignores_the_old_tunables() {
    let mut mq = policy(PolicyType::Mq, 8, 1 << 20);
    for t in ["random_threshold", "SEQUENTIAL_THRESHOLD", "discard_promote_adjustment"] {
        assert_eq!(mq.set_config_value(t, "17"), Ok(()));
    }
    assert_eq!(mq.set_config_value("read_promote_adjustment", "x"), Err(Errno::EINVAL));
    assert_eq!(mq.set_config_value("migration_threshold", "2048"), Err(Errno::EINVAL));
    assert_eq!(
        mq.emit_config_values(),
        "10 random_threshold 0 sequential_threshold 0 discard_promote_adjustment 0 \
         read_promote_adjustment 0 write_promote_adjustment 0 "
    );
    assert_eq!(mq.policy_hints().name, "mq");
    let mut smq = policy(PolicyType::Smq, 8, 1 << 20);
    assert_eq!(smq.set_config_value("random_threshold", "1"), Err(Errno::EINVAL));
    assert_eq!(smq.emit_config_values(), "0 ");
    assert_eq!(PolicyType::from_name("default").unwrap().name(), "smq");
    assert_eq!(PolicyType::from_name("SMQ"), None);
}

#[test]
fn hotspot_geometry() {
    // 1024 hotspot blocks of 16 cache blocks need 16384 origin blocks.
    let p = policy(PolicyType::Smq, 64, 16384);
    assert_eq!((p.hotspot_block_size(), p.nr_hotspot_blocks()), (16 * BLOCK, 1024));
    let p = policy(PolicyType::Smq, 64, 16383);
    assert_eq!(p.hotspot_block_size(), 8 * BLOCK);
    let p = policy(PolicyType::Smq, 64, 10);
    assert_eq!(p.hotspot_block_size(), BLOCK, "never below the cache block");
    let p = policy(PolicyType::Smq, 8192, 1 << 30);
    assert_eq!(p.nr_hotspot_blocks(), 2048);
}

// ---- determinism ----

#[derive(Debug, Clone)]
enum Op {
    Lookup { oblock: u64, write: bool, fast: bool, with_work: bool },
    GetWork { idle: bool },
    Complete { which: usize, success: bool },
    Dirty { cblock: u32, set: bool },
    Invalidate { cblock: u32 },
    Tick { ms: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u64..600, any::<bool>(), any::<bool>(), any::<bool>())
            .prop_map(|(oblock, write, fast, with_work)| Op::Lookup { oblock, write, fast, with_work }),
        2 => any::<bool>().prop_map(|idle| Op::GetWork { idle }),
        2 => (0usize..8, prop::bool::weighted(0.9)).prop_map(|(which, success)| Op::Complete { which, success }),
        1 => (0u32..16, any::<bool>()).prop_map(|(cblock, set)| Op::Dirty { cblock, set }),
        1 => (0u32..16).prop_map(|cblock| Op::Invalidate { cblock }),
        2 => (1u64..3000).prop_map(|ms| Op::Tick { ms }),
    ]
}

/// Runs `ops` as a cache core would (completing only issued work, touching
/// only mapped blocks) and returns everything observable.
fn run(t: PolicyType, loaded: &[(u32, u64, bool, u32)], ops: &[Op]) -> (Vec<String>, SmqPolicy) {
    let mut p = SmqPolicy::new(SmqParams::new(t, 16, 4096 * BLOCK, BLOCK), 0);
    for &(c, o, d, h) in loaded {
        let _ = p.load_mapping(o, c, d, h, true);
    }
    let mut now = 0;
    p.tick(true, now);
    let mut inflight: Vec<PolicyWork> = Vec::new();
    let mut log = Vec::new();
    for op in ops {
        match *op {
            Op::Lookup { oblock, write, fast, with_work } => {
                let dir = if write { DataDir::Write } else { DataDir::Read };
                if with_work {
                    let l = p.lookup_with_work(oblock, dir, fast);
                    inflight.extend(l.work);
                    log.push(format!("{l:?}"));
                } else {
                    log.push(format!("{:?}", p.lookup(oblock, dir, fast)));
                }
            }
            Op::GetWork { idle } => {
                let w = p.get_background_work(idle);
                inflight.extend(w);
                log.push(format!("{w:?}"));
            }
            Op::Complete { which, success } => {
                if !inflight.is_empty() {
                    let w = inflight.remove(which % inflight.len());
                    // As the core does: a written-back block is cleaned
                    // before completion, a copied promotion after.
                    if success && w.op == PolicyOp::Writeback {
                        p.clear_dirty(w.cblock);
                    }
                    p.complete_background_work(w, success);
                    if success && w.op == PolicyOp::Promote {
                        p.clear_dirty(w.cblock);
                    }
                    log.push(format!("done {w:?} {success}"));
                }
            }
            Op::Dirty { cblock, set } => {
                if p.entry(cblock).is_some_and(|e| !e.pending_work) {
                    if set {
                        p.set_dirty(cblock)
                    } else {
                        p.clear_dirty(cblock)
                    }
                }
            }
            Op::Invalidate { cblock } => {
                if p.entry(cblock).is_none_or(|e| !e.pending_work) {
                    log.push(format!("{:?}", p.invalidate_mapping(cblock)));
                }
            }
            Op::Tick { ms } => {
                now += ms * 1_000_000;
                p.tick(false, now);
            }
        }
        p.check().unwrap_or_else(|e| panic!("after {op:?}: {e}"));
        let pending = p.tracker().len() as u32;
        assert!(p.residency() <= 16 && pending <= 16 + p.residency());
        log.push(format!("residency {}", p.residency()));
    }
    (log, p)
}

fn loaded() -> impl Strategy<Value = Vec<(u32, u64, bool, u32)>> {
    prop::collection::vec((0u32..16, 0u64..600, any::<bool>(), 0u32..80), 0..12).prop_map(|v| {
        let mut seen = std::collections::BTreeSet::new();
        v.into_iter().filter(|&(c, o, _, _)| seen.insert(c) && seen.insert(1000 + o as u32)).collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn same_calls_give_the_same_work_and_residency(
        t in prop_oneof![Just(PolicyType::Smq), Just(PolicyType::Mq), Just(PolicyType::Cleaner)],
        loaded in loaded(),
        ops in prop::collection::vec(op(), 1..300),
    ) {
        let (log1, p1) = run(t, &loaded, &ops);
        let (log2, p2) = run(t, &loaded, &ops);
        prop_assert_eq!(log1, log2);
        prop_assert_eq!(p1.policy_hints(), p2.policy_hints());
        prop_assert!(p1 == p2, "whole policy state differs");
        if t == PolicyType::Cleaner {
            prop_assert_eq!(p1.tracker().nr_promotions_queued(), 0);
        }
    }
}
