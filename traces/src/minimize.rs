//! The minimizer: shrinks a failing input (a sequence of ops, or anything
//! else) to a small one that still fails.
//!
//! - [`ddmin`]: Zeller and Hildebrandt's delta debugging, which removes
//!   items and returns a *1-minimal* subsequence: removing any single item
//!   of it makes the failure go away.
//! - [`simplify_each`]: replaces items by simpler ones (see [`simpler_ops`]
//!   for ops) while the failure persists.
//! - [`minimize_ops`]: both, for a sequence of [`Op`]s.
//!
//! Each has a `*_with_stats` variant that also returns [`Stats`] (how many
//! times the predicate ran), for callers that print them.
//!
//! The predicate `still_fails` gets a candidate sequence and says whether
//! the failure is still there. It should be deterministic; if it is not,
//! the results are still subsequences of the input (or, for
//! [`simplify_each`], of the accepted replacements), only not minimal.

use std::collections::HashSet;

use crate::op::{CacheIoMode, CachePolicyKind, CrashMode, DiskFault, FaultAim, Op};

/// What a minimization cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Calls of the predicate.
    pub tests: u64,
    /// Candidates not tested because the same subsequence had already been
    /// found not to fail ([`ddmin`] only).
    pub cache_hits: u64,
    /// Candidates that still failed and were kept.
    pub reductions: u64,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Stats) {
        self.tests += o.tests;
        self.cache_hits += o.cache_hits;
        self.reductions += o.reductions;
    }
}

/// Delta debugging (ddmin): the smallest subsequence of `items` this finds
/// on which `still_fails` holds. The result is 1-minimal: `still_fails` is
/// false on the result with any one item removed (if the predicate is
/// deterministic). If `still_fails(items)` is false, `items` is returned
/// unchanged.
pub fn ddmin<T: Clone>(items: &[T], still_fails: impl FnMut(&[T]) -> bool) -> Vec<T> {
    ddmin_with_stats(items, still_fails).0
}

/// [`ddmin`], and what it cost.
///
/// The algorithm: split the current failing sequence into `n` chunks
/// (starting with 2); if one chunk alone fails, continue with it and `n =
/// 2`; else if the complement of one chunk fails, continue with that and
/// `n - 1` chunks; else double `n` (at most to the length). It stops when
/// every item is its own chunk and no complement fails, which is
/// 1-minimality. The empty sequence is tried once first. Subsequences
/// known not to fail are remembered (by their indices into `items`) and not
/// tested twice.
pub fn ddmin_with_stats<T: Clone>(items: &[T], still_fails: impl FnMut(&[T]) -> bool) -> (Vec<T>, Stats) {
    ddmin_inner(items, still_fails, false)
}

/// [`ddmin_with_stats`]; `known_failing` skips the first test of the whole
/// input.
fn ddmin_inner<T: Clone>(
    items: &[T],
    mut still_fails: impl FnMut(&[T]) -> bool,
    known_failing: bool,
) -> (Vec<T>, Stats) {
    let mut stats = Stats::default();
    let mut passing: HashSet<Vec<usize>> = HashSet::new();
    let mut test = |idx: &[usize], stats: &mut Stats| -> bool {
        if passing.contains(idx) {
            stats.cache_hits += 1;
            return false;
        }
        stats.tests += 1;
        let candidate: Vec<T> = idx.iter().map(|&i| items[i].clone()).collect();
        let fails = still_fails(&candidate);
        if !fails {
            passing.insert(idx.to_vec());
        }
        fails
    };

    let mut cur: Vec<usize> = (0..items.len()).collect();
    if !known_failing && !test(&cur, &mut stats) {
        return (items.to_vec(), stats);
    }
    if !cur.is_empty() && test(&[], &mut stats) {
        stats.reductions += 1;
        return (Vec::new(), stats);
    }
    let mut n = 2usize;
    while cur.len() >= 2 {
        n = n.min(cur.len());
        let bounds: Vec<(usize, usize)> =
            (0..n).map(|i| (i * cur.len() / n, (i + 1) * cur.len() / n)).collect();
        let mut reduced = false;
        // Reduce to a chunk.
        for &(a, b) in &bounds {
            let chunk = cur[a..b].to_vec();
            if test(&chunk, &mut stats) {
                cur = chunk;
                n = 2;
                reduced = true;
                break;
            }
        }
        // Reduce to a complement (with two chunks, these are the chunks).
        if !reduced && n > 2 {
            for &(a, b) in &bounds {
                let complement: Vec<usize> = cur[..a].iter().chain(&cur[b..]).copied().collect();
                if test(&complement, &mut stats) {
                    cur = complement;
                    n = (n - 1).max(2);
                    reduced = true;
                    break;
                }
            }
        }
        if reduced {
            stats.reductions += 1;
        } else if n >= cur.len() {
            break;
        } else {
            n = (2 * n).min(cur.len());
        }
    }
    (cur.iter().map(|&i| items[i].clone()).collect(), stats)
}

/// How many rounds [`simplify_each`] makes at most (a round tries every
/// item once). Candidates that are really simpler (as [`simpler_ops`]'
/// are) converge long before; the bound protects against candidate
/// functions that cycle.
pub const MAX_SIMPLIFY_ROUNDS: usize = 64;

/// Replaces each item in turn by the first of its `candidates` on which
/// the sequence still fails, and repeats the whole pass until a pass
/// changes nothing (at most [`MAX_SIMPLIFY_ROUNDS`] passes). `candidates`
/// should list simpler versions of an item, simplest first, and not the
/// item itself. If `still_fails(&items)` is false, `items` is returned
/// unchanged.
pub fn simplify_each<T: Clone>(
    items: Vec<T>,
    candidates: impl Fn(&T) -> Vec<T>,
    still_fails: impl FnMut(&[T]) -> bool,
) -> Vec<T> {
    simplify_each_with_stats(items, candidates, still_fails).0
}

/// [`simplify_each`], and what it cost.
pub fn simplify_each_with_stats<T: Clone>(
    items: Vec<T>,
    candidates: impl Fn(&T) -> Vec<T>,
    mut still_fails: impl FnMut(&[T]) -> bool,
) -> (Vec<T>, Stats) {
    if !still_fails(&items) {
        return (items, Stats { tests: 1, ..Stats::default() });
    }
    let (items, mut stats) = simplify_inner(items, candidates, still_fails);
    stats.tests += 1;
    (items, stats)
}

/// [`simplify_each_with_stats`] on items known to fail.
fn simplify_inner<T: Clone>(
    mut items: Vec<T>,
    candidates: impl Fn(&T) -> Vec<T>,
    mut still_fails: impl FnMut(&[T]) -> bool,
) -> (Vec<T>, Stats) {
    let mut stats = Stats::default();
    for _ in 0..MAX_SIMPLIFY_ROUNDS {
        let mut changed = false;
        for i in 0..items.len() {
            for cand in candidates(&items[i]) {
                let old = std::mem::replace(&mut items[i], cand);
                stats.tests += 1;
                if still_fails(&items) {
                    stats.reductions += 1;
                    changed = true;
                    break;
                }
                items[i] = old;
            }
        }
        if !changed {
            break;
        }
    }
    (items, stats)
}

/// Candidate simplifications of one op, simplest first, none equal to `op`
/// and each simpler by a measure that cannot decrease forever (so repeated
/// simplification ends): the all-at-once simplest version first, then one
/// field at a time. Devices, picks and sectors go to 0, lengths to 1 or
/// half, flags off, faults transient and toward bit 0 / offset ±1, ticks
/// shorter, crashes toward [`CrashMode::LoseAll`] and seed 0, reloads
/// toward the earlier modes and policies of [`CacheIoMode::ALL`] and
/// [`CachePolicyKind::ALL`] (writeback, smq), invalidations toward cache
/// block 0 and one block, resizes toward one cache block and one origin
/// block (or half), metadata growths toward zero blocks and no reload (a suspend and
/// resume), aimed faults toward a commit's first request (an abort's aim
/// becomes a commit's; a passdown aim, the one aim at the data device,
/// has no smaller form).
pub fn simpler_ops(op: &Op) -> Vec<Op> {
    let mut out: Vec<Op> = Vec::new();
    match *op {
        Op::Write { dev, sector, nr_sectors, fua, preflush } => {
            let simplest =
                Op::Write { dev: 0, sector: 0, nr_sectors: nr_sectors.min(1), fua: false, preflush: false };
            out.push(simplest);
            if fua {
                out.push(Op::Write { dev, sector, nr_sectors, fua: false, preflush });
            }
            if preflush {
                out.push(Op::Write { dev, sector, nr_sectors, fua, preflush: false });
            }
            for nr in smaller(nr_sectors.into(), 1) {
                out.push(Op::Write { dev, sector, nr_sectors: nr as u16, fua, preflush });
            }
            for s in smaller(sector.into(), 0) {
                out.push(Op::Write { dev, sector: s as u32, nr_sectors, fua, preflush });
            }
            for d in smaller(dev.into(), 0) {
                out.push(Op::Write { dev: d as u8, sector, nr_sectors, fua, preflush });
            }
        }
        Op::Read { dev, sector, nr_sectors } => {
            out.push(Op::Read { dev: 0, sector: 0, nr_sectors: nr_sectors.min(1) });
            for nr in smaller(nr_sectors.into(), 1) {
                out.push(Op::Read { dev, sector, nr_sectors: nr as u16 });
            }
            for s in smaller(sector.into(), 0) {
                out.push(Op::Read { dev, sector: s as u32, nr_sectors });
            }
            for d in smaller(dev.into(), 0) {
                out.push(Op::Read { dev: d as u8, sector, nr_sectors });
            }
        }
        Op::Discard { dev, sector, nr_sectors } => {
            out.push(Op::Discard { dev: 0, sector: 0, nr_sectors: nr_sectors.min(1) });
            for nr in smaller(nr_sectors.into(), 1) {
                out.push(Op::Discard { dev, sector, nr_sectors: nr as u32 });
            }
            for s in smaller(sector.into(), 0) {
                out.push(Op::Discard { dev, sector: s as u32, nr_sectors });
            }
            for d in smaller(dev.into(), 0) {
                out.push(Op::Discard { dev: d as u8, sector, nr_sectors });
            }
        }
        Op::Flush { dev } => out.extend(smaller(dev.into(), 0).map(|d| Op::Flush { dev: d as u8 })),
        Op::CreateSnap { origin } => {
            out.extend(smaller(origin.into(), 0).map(|d| Op::CreateSnap { origin: d as u8 }))
        }
        Op::Delete { dev } => out.extend(smaller(dev.into(), 0).map(|d| Op::Delete { dev: d as u8 })),
        Op::Complete { pick } => out.extend(smaller(pick.into(), 0).map(|p| Op::Complete { pick: p as u8 })),
        Op::FailIo { pick } => out.extend(smaller(pick.into(), 0).map(|p| Op::FailIo { pick: p as u8 })),
        Op::Fault { disk, fault } => {
            let faults: Vec<DiskFault> = match fault {
                DiskFault::ReadError { permanent: true } => vec![DiskFault::ReadError { permanent: false }],
                DiskFault::WriteError { permanent: true } => vec![DiskFault::WriteError { permanent: false }],
                DiskFault::ReadError { .. } | DiskFault::WriteError { .. } => vec![],
                DiskFault::BitFlip { bit } => {
                    smaller(bit.into(), 0).map(|b| DiskFault::BitFlip { bit: b as u32 }).collect()
                }
                DiskFault::Misdirect { offset } => {
                    let mag = u64::from(offset.unsigned_abs());
                    smaller(mag, 1)
                        .map(|m| DiskFault::Misdirect {
                            offset: if offset < 0 { -(m as i64) as i32 } else { m as i32 },
                        })
                        .collect()
                }
            };
            out.extend(faults.into_iter().map(|fault| Op::Fault { disk, fault }));
        }
        Op::Tick { millis } => out.extend(smaller(millis.into(), 1).map(|m| Op::Tick { millis: m as u16 })),
        Op::Crash { mode, seed } => {
            let rank = |m: CrashMode| CrashMode::ALL.iter().position(|&x| x == m).unwrap_or(0);
            for &m in CrashMode::ALL.iter().filter(|&&m| rank(m) < rank(mode)) {
                out.push(Op::Crash { mode: m, seed: 0 });
                if seed != 0 {
                    out.push(Op::Crash { mode: m, seed });
                }
            }
            if seed != 0 {
                out.push(Op::Crash { mode, seed: 0 });
            }
        }
        Op::Reload { mode, policy } => {
            let rank = |m: CacheIoMode| CacheIoMode::ALL.iter().position(|&x| x == m).unwrap_or(0);
            let prank = |p: CachePolicyKind| CachePolicyKind::ALL.iter().position(|&x| x == p).unwrap_or(0);
            out.push(Op::Reload { mode: CacheIoMode::ALL[0], policy: CachePolicyKind::ALL[0] });
            for &m in CacheIoMode::ALL.iter().filter(|&&m| rank(m) < rank(mode)) {
                out.push(Op::Reload { mode: m, policy });
            }
            for &p in CachePolicyKind::ALL.iter().filter(|&&p| prank(p) < prank(policy)) {
                out.push(Op::Reload { mode, policy: p });
            }
        }
        Op::Invalidate { cblock, nr } => {
            out.push(Op::Invalidate { cblock: 0, nr: nr.min(1) });
            for n in smaller(nr.into(), 1) {
                out.push(Op::Invalidate { cblock, nr: n as u16 });
            }
            for c in smaller(cblock.into(), 0) {
                out.push(Op::Invalidate { cblock: c as u32, nr });
            }
        }
        Op::Resize { cache_blocks, origin_blocks } => {
            for c in smaller(cache_blocks.into(), 1) {
                out.push(Op::Resize { cache_blocks: c as u32, origin_blocks });
            }
            for o in smaller(origin_blocks.into(), 1) {
                out.push(Op::Resize { cache_blocks, origin_blocks: o as u32 });
            }
        }
        Op::GrowMetadata { blocks, reload } => {
            if reload {
                out.push(Op::GrowMetadata { blocks, reload: false });
            }
            out.extend(smaller(blocks.into(), 0).map(|b| Op::GrowMetadata { blocks: b as u32, reload }))
        }
        Op::AimFault { aim: FaultAim::Commit { request } } => out.extend(
            smaller(request.into(), 0).map(|r| Op::AimFault { aim: FaultAim::Commit { request: r as u8 } }),
        ),
        Op::AimFault { aim: FaultAim::Abort } => {
            out.push(Op::AimFault { aim: FaultAim::Commit { request: 0 } })
        }
        // The one aim at the data device: no smaller form (a commit aim is
        // another fault, not a simpler one of it).
        Op::AimFault { aim: FaultAim::Passdown } => {}
        Op::CreateThin | Op::Worker | Op::Status => {}
    }
    let mut unique: Vec<Op> = Vec::with_capacity(out.len());
    for o in out {
        if o != *op && !unique.contains(&o) {
            unique.push(o);
        }
    }
    unique
}

/// Smaller values than `v` worth trying, smallest first: `min`, then half
/// of `v` (if between `min` and `v`). Empty if `v <= min`.
fn smaller(v: u64, min: u64) -> impl Iterator<Item = u64> {
    let half = v / 2;
    let cands: [Option<u64>; 2] = [(v > min).then_some(min), (half > min && half < v).then_some(half)];
    cands.into_iter().flatten()
}

/// The whole minimization of a failing sequence of ops: [`ddmin`], then
/// [`simplify_each`] with [`simpler_ops`], then [`ddmin`] again (simpler
/// ops sometimes make others unnecessary). If `still_fails(ops)` is false,
/// `ops` is returned unchanged.
pub fn minimize_ops(ops: &[Op], mut still_fails: impl FnMut(&[Op]) -> bool) -> (Vec<Op>, Stats) {
    let (ops1, mut stats) = ddmin_with_stats(ops, &mut still_fails);
    if stats.tests == 1 && stats.reductions == 0 && !ops.is_empty() {
        // Only the whole input was tested: it does not fail.
        return (ops1, stats);
    }
    let (ops2, s2) = simplify_inner(ops1, simpler_ops, &mut still_fails);
    stats += s2;
    let (ops3, s3) = ddmin_inner(&ops2, &mut still_fails, true);
    stats += s3;
    (ops3, stats)
}
