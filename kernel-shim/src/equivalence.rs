//! Level-1 equivalence (logical): every thin device reads the same stamps,
//! block by block, and the same blocks are mapped, on the kernel and on
//! the simulator.
//!
//! The kernel runs each request to completion before the next, so the
//! simulator is run the same way for the comparison
//! ([`simulate_serialized`]): after every op it quiesces (worker passes and
//! completions, oldest first, until nothing moves), and the trace's own
//! scheduling ops (`worker`, `complete`, `fail-io`, `tick`) are not
//! replayed. What is compared is one legal schedule on both sides, not the
//! trace's recorded interleaving.

use std::collections::{BTreeMap, BTreeSet};

use dmsim_sim::run::RunConfig;
use dmsim_sim::thin::ThinSim;
use dmsim_traces::{Event, Op, Trace};

use crate::error::ShimError;
use crate::kernel_clock::ThinClock;
use crate::protocol::{summarize, PoolSpec};
use crate::vm::{dump, mapped_blocks, KernelRun};

/// The end state L1 compares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FinalState {
    /// Live devices in creation order: id and one stamp summary per block.
    pub devices: Vec<(u32, Vec<String>)>,
    /// Mapped virtual blocks per device id.
    pub mapped: BTreeMap<u32, BTreeSet<u64>>,
}

impl FinalState {
    /// The kernel's end state.
    pub fn of_kernel(run: &KernelRun) -> FinalState {
        FinalState {
            devices: run.result.devices.iter().map(|d| (d.id, d.blocks.clone())).collect(),
            mapped: run.mapped.clone(),
        }
    }
}

/// Whether an op is replayed on the kernel (the rest are scheduling ops,
/// faults and crashes).
pub fn kernel_replays(op: &Op) -> bool {
    !matches!(
        op,
        Op::Worker
            | Op::Complete { .. }
            | Op::FailIo { .. }
            | Op::Tick { .. }
            | Op::Fault { .. }
            | Op::Crash { .. }
    )
}

/// Whether the last request that completed among `events` succeeded
/// (false when none completed: a write with no live device sent none).
fn last_request_ok(events: &[Event]) -> bool {
    events.iter().rev().find_map(|e| match e {
        Event::Done { result, .. } => Some(result == "ok"),
        _ => None,
    }) == Some(true)
}

/// The serialized simulator's end state and its disks.
#[derive(Debug, Clone, Default)]
pub struct SimulatedRun {
    /// What L1 compares.
    pub state: FinalState,
    /// The metadata image after the final commit (`ThinSim::finish`
    /// commits through a status query and checks it).
    pub metadata_image: Vec<u8>,
    /// Its thin_dump XML (dmsim's dump).
    pub thin_dump: String,
    /// The data device's content at the end.
    pub data_image: Vec<u8>,
    /// Requests that ended with ENOSPC, and pool mode changes, in the
    /// serialized run (a trace meant never to fill the pool has none).
    pub out_of_space: Vec<String>,
    /// Set when the simulator's oracle objected while reading the devices
    /// back (a broken model: see the `skip-zeroing` mutation). The state
    /// is then read from the model's committed images instead
    /// ([`read_images`]), so that it can still be held against the kernel.
    pub oracle_violation: Option<String>,
    /// The first problem the simulator found at a metadata crash point
    /// it samples inside a commit (`ThinSim::report_metadata_crash_points`):
    /// a model finding, not part of the comparison with the kernel.
    pub crash_point_finding: Option<String>,
    /// What the simulator's metadata checker found wrong in its final
    /// metadata, when it did (a model run as the stock kernel meets known
    /// findings there: a block counted twice and mapped once). Reported,
    /// not fatal: the devices were read back before the check, and the
    /// run is still held against the kernel's.
    pub end_check_finding: Option<String>,
    /// With [`simulate_serialized_crashing`]: the state at every crash op.
    pub crashes: Vec<SimulatedCrash>,
    /// The ops after which the model's metadata superblock differed from
    /// before them (it committed during the op or just before it, as its
    /// clock moved to the op's start; a crash op: before its power cut),
    /// the rebuilt pool's own writes left out: held against the agent's
    /// [`crate::protocol::COMMIT_OPS_NOTE`].
    pub commit_ops: Vec<usize>,
    /// The [`crate::protocol::commit_key`] of the model's metadata
    /// superblock after each op (a crash op: just before its power cut),
    /// by op index.
    pub superblocks: BTreeMap<usize, u64>,
    /// The [`crate::protocol::commit_contents_key`] of the model's metadata
    /// after each op of [`SimulatedRun::commit_ops`], by op index.
    pub contents: BTreeMap<usize, u64>,
    /// Where the run placed the kernel's commits
    /// ([`simulate_following`]): by op, for the ops it placed one in.
    pub commit_placements: BTreeMap<usize, CommitPlacement>,
    /// The data I/Os the simulator completed in each op, by op index.
    pub data_completions: BTreeMap<usize, usize>,
    /// The worker passes the simulator ran in each op, by op index.
    pub worker_passes: BTreeMap<usize, usize>,
    /// Per crash op whose kernel run recorded the data disk's unflushed
    /// writes ([`crate::protocol::CrashRecord::data_pending`]): whether
    /// the simulator's were the same writes (in any order) just before its
    /// power cut. Where they are not, the last data flush — the last
    /// commit's — came at another moment among the writes on the two
    /// sides.
    pub pending_agree: BTreeMap<usize, bool>,
    /// Free data blocks after each op as the pool's status line counts
    /// them (`sm_disk_get_nr_free`), by op index, where the model knows
    /// them without reading metadata
    /// ([`dmsim_model::thin::metadata::ThinMetadata::free_data_blocks_in_core`]).
    pub data_free: BTreeMap<usize, u64>,
    /// The ops in which a commit came between two pieces of a request
    /// ([`CommitPlacement::AfterPieces`]).
    pub piece_commit_ops: BTreeSet<usize>,
    /// With [`simulate_serialized_crashing`]: what every op did in the
    /// serialized run (its requests' results, the faults that fired, the
    /// pool's mode after it), to hold against the kernel's per-op
    /// outcomes ([`crate::fault_compare::compare_ops`]).
    pub ops: Vec<crate::fault_compare::SimOp>,
}

/// Runs `trace` on the simulator one request at a time, as the kernel
/// shim does, and reads every device back. Faults and crashes are refused
/// (the kernel shim does not replay them yet).
pub fn simulate_serialized(trace: &Trace) -> Result<FinalState, ShimError> {
    simulate_serialized_full(trace).map(|r| r.state)
}

/// As [`simulate_serialized`], with the final disks and their dump.
/// Crashes are refused (the virtio replay does not cut power); see
/// [`simulate_serialized_crashing`].
pub fn simulate_serialized_full(trace: &Trace) -> Result<SimulatedRun, ShimError> {
    simulate_serialized_inner(trace, false, None, None, None, &KernelOrders::default())
}

/// As [`simulate_serialized_full`], crash ops included (what a ublk
/// replay, which cuts power at them, is compared with): each crash op is
/// the simulator's own (`ThinSim::crash`: `SimDisk::crash_state` of both
/// disks, recovery, the live devices reactivated), and the state after
/// it is recorded in [`SimulatedRun::crashes`]. Fault and aim-fault ops
/// arm the simulator's disks as in a campaign run (the ublk job arms the
/// controlled disks the same way), and every op's outcome is recorded in
/// [`SimulatedRun::ops`].
pub fn simulate_serialized_crashing(trace: &Trace) -> Result<SimulatedRun, ShimError> {
    simulate_serialized_inner(trace, true, None, None, None, &KernelOrders::default())
}

/// As [`simulate_serialized_full`] (`crashes` false) or
/// [`simulate_serialized_crashing`] (true), following the kernel run's
/// clock when its result carries one ([`ThinClock`]): before each op the
/// simulator's time moves, a jiffy at a time, to the jiffy the kernel's op
/// started in, its waker placed where the kernel's timer wheel placed the
/// kernel's, so that timed commits land between the same ops; a pool
/// rebuilt after a power cut starts its clock when the kernel's did; and
/// the teardown comes when the kernel's did. Without a clock, the same as
/// those.
///
/// When the result also says where the kernel committed and each
/// commit's key ([`crate::protocol::COMMIT_SUPERBLOCKS_NOTE`]), then from
/// the first op where the simulator's commits part from the kernel's, its
/// commit timer is off and it commits where the kernel did
/// ([`follow_commits`]): the 1 s commit period is a constant the kernel
/// does not let be set, and its timer fires at moments no trace fixes.
pub fn simulate_following(trace: &Trace, crashes: bool, run: &KernelRun) -> Result<SimulatedRun, ShimError> {
    if on_trace_clock(&run.result) {
        return simulate_on_trace_clock(trace, crashes, &run.result);
    }
    if let Some(forced) = following_kernel_commits(&run.result) {
        return simulate_committing_at(trace, crashes, &forced, &run.result);
    }
    let clock = ThinClock::of(&run.result);
    match crate::protocol::commit_superblocks(&run.result) {
        Some(kernel) if clock.is_some() => {
            follow_commits(trace, crashes, clock.as_ref(), &kernel, &run.result)
        }
        _ => {
            simulate_serialized_inner(trace, crashes, clock.as_ref(), None, None, &kernel_orders(&run.result))
        }
    }
}

/// The note an engine job on the trace's clock leaves in its result
/// (`clock` = `trace`; [`crate::protocol::EngineJob::trace_clock`]; or
/// [`KERNEL_COMMITS`]).
pub const CLOCK_NOTE: &str = "clock";

/// [`CLOCK_NOTE`]'s value for an engine job that committed where the
/// kernel did ([`crate::protocol::EngineJob::follow_kernel`]).
pub const KERNEL_COMMITS: &str = "kernel-commits";

/// Where an engine that followed the kernel's commits was asked to commit
/// ([`crate::protocol::FORCED_COMMITS_NOTE`]); `None` when `result` is not
/// such a run.
pub fn following_kernel_commits(
    result: &crate::protocol::KernelResult,
) -> Option<BTreeMap<usize, crate::protocol::CommitPoint>> {
    result
        .notes
        .iter()
        .any(|(k, v)| k == CLOCK_NOTE && v == KERNEL_COMMITS)
        .then(|| crate::protocol::forced_commits(result).unwrap_or_default())
}

/// The serialized simulator as an engine that followed the kernel's
/// commits ran ([`crate::protocol::EngineJob::follow_kernel`]): no timed
/// commit of its own (its clock does not move at `tick` ops), a commit
/// at each of `forced`'s points (before an op's first request or a crash
/// op's power cut, after an op, or both), and after each request a write
/// waiting for data space outwaited, as on the trace's clock; `result`'s
/// orders of data writes and of a crash's unflushed writes.
pub fn simulate_committing_at(
    trace: &Trace,
    crashes: bool,
    forced: &BTreeMap<usize, crate::protocol::CommitPoint>,
    result: &crate::protocol::KernelResult,
) -> Result<SimulatedRun, ShimError> {
    let plan = CommitPlan {
        at: forced
            .iter()
            .map(|(&i, p)| (i, if p.before { CommitPlacement::BeforeOp } else { CommitPlacement::AfterOp }))
            .collect(),
        also_after: forced.iter().filter(|(_, p)| p.before && p.after).map(|(&i, _)| i).collect(),
        follow_from: 0,
        clock_from: None,
    };
    simulate_serialized_clocked(
        trace,
        crashes,
        None,
        Some(&plan),
        None,
        &kernel_orders(result),
        SimTime::Frozen,
    )
}

/// How the serialized simulator's time moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SimTime {
    /// Where a kernel run's clock says (or not at all without one).
    Kernel,
    /// At the trace's `tick` ops; after each request, a write that waits
    /// for data space meets the no-space timeout within its op (an engine
    /// on the trace's clock).
    Trace,
    /// Only to outwait the no-space timeout after each request, as
    /// [`SimTime::Trace`], `tick` ops ignored (an engine that follows the
    /// kernel's commits).
    Frozen,
}

/// Whether `result` is an engine's run on the trace's clock: its time was
/// the trace's `tick` ops, not a real clock.
pub fn on_trace_clock(result: &crate::protocol::KernelResult) -> bool {
    result.notes.iter().any(|(k, v)| k == CLOCK_NOTE && v == "trace")
}

/// The serialized simulator on the trace's own clock (its `tick` ops;
/// a request that waits for data space meets the no-space timeout within
/// its op), with `result`'s orders of data writes and of a crash's
/// unflushed writes: what an engine on the trace's clock must equal
/// exactly — no commit placement to follow, none to search.
pub fn simulate_on_trace_clock(
    trace: &Trace,
    crashes: bool,
    result: &crate::protocol::KernelResult,
) -> Result<SimulatedRun, ShimError> {
    simulate_serialized_clocked(trace, crashes, None, None, None, &kernel_orders(result), SimTime::Trace)
}

/// Where the serialized simulator makes a commit the kernel made during
/// an op (the kernel's commit timer's, or one the op's own requests
/// made): the worker's next pass commits a changed transaction
/// ([`dmsim_model::thin::pool::Pool::request_commit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitPlacement {
    /// Before the op's first request (for a crash op: before the power
    /// cut).
    BeforeOp,
    /// Once this many of the op's data I/Os completed and the worker
    /// settled.
    AfterData(usize),
    /// After the op, its requests complete.
    AfterOp,
    /// Between two pieces of the op's request: DM core had mapped this
    /// many of them when the worker's pass took them and committed
    /// (`dmsim_sim::thin::ThinSim::plan_commit_after_pieces`).
    AfterPieces(usize),
    /// At the end of the op's `k`-th worker pass (from 1), whatever the
    /// pass did: the kernel's timer due while its worker was busy with
    /// the op (`dmsim_sim::thin::ThinSim::plan_commit_in_pass`; a passdown
    /// discard's first pass ends in a commit, before its second).
    InPass(usize),
}

/// A commit plan for the serialized simulator: per op, where it commits
/// for the kernel. Its own commit timer runs before `follow_from` and
/// from `clock_from` on, and is off in between.
#[derive(Debug, Clone, Default)]
struct CommitPlan {
    at: BTreeMap<usize, CommitPlacement>,
    /// Ops after which a commit comes too, whatever `at` places there.
    also_after: BTreeSet<usize>,
    follow_from: usize,
    clock_from: Option<usize>,
}

/// The serialized run that commits where the kernel did: `kernel` maps
/// each op after which the kernel's superblock had changed to the new
/// superblock's [`crate::protocol::commit_key`]; `result` is the kernel's
/// run (its ops' outcomes, the faults that fired in each).
///
/// The simulator first runs with its own timer, following the kernel's
/// clock. If the two sides never part, that run is the answer. Otherwise,
/// from the first op where they part — one committed and the other did
/// not, or with another key or other contents (data reference counts,
/// devices and mappings: [`crate::protocol::COMMIT_CONTENTS_NOTE`]; a
/// commit between a passdown discard's two passes and one before the op
/// leave the same superblock); a metadata write fault fired in the kernel's
/// op and not in the simulator's (a commit that failed writes no
/// superblock); the free data blocks after a commit op differ (the status
/// line's count: a commit that came elsewhere among a request's pieces
/// leaves the same superblock behind and another count) — the
/// simulator's timer is off and it commits where the kernel did: at each
/// op where they part and the kernel committed or met a fault, the
/// placements of a commit in that op (before it, after each of its data
/// completions once the worker settled, between each two pieces of its
/// request, at the end of each of its worker passes, after it) are tried
/// in that order, and the first under which
/// the op agrees — the kernel's outcome, read and mode
/// ([`crate::fault_compare::compare_ops`]), key, faults and free data
/// blocks — is kept; then the next op where they part. (No commit is
/// placed in an op that sends a FLUSH or FUA request: that commit is the
/// model's own to make.) When no placement
/// makes an op agree, the one that agrees best (the outcome counts most)
/// is kept where the kernel committed; at the eighth such op the timer,
/// following the kernel's clock, takes over again.
///
/// Deterministic: the same trace and kernel result give the same plan.
pub fn follow_commits(
    trace: &Trace,
    crashes: bool,
    clock: Option<&ThinClock>,
    kernel: &BTreeMap<usize, u64>,
    result: &crate::protocol::KernelResult,
) -> Result<SimulatedRun, ShimError> {
    let mut plan = CommitPlan::default();
    let orders = kernel_orders(result);
    // The kernel's superblock after op `i`, if it ever changed by then.
    let kernel_at = |i: usize| kernel.range(..=i).next_back().map(|(_, f)| *f);
    let metadata_write_fault = |what: &str| fault_kind(what) == Some(("metadata", "write-error"));
    let kernel_faulted: BTreeSet<usize> = crate::fault_compare::kernel_fired(result)
        .into_iter()
        .filter(|(_, what)| metadata_write_fault(what))
        .map(|(i, _)| i)
        .collect();
    let sim_faulted = |run: &SimulatedRun, i: usize| {
        run.ops.iter().any(|o| o.index == i && o.fired.iter().any(|w| metadata_write_fault(w)))
    };
    // Whether op `i` agrees: where one side committed, both did, to the
    // same key; a metadata write fault fired in both or neither.
    // What the kernel's commits hold, where the agent read it (0: not
    // read).
    let kernel_contents = crate::protocol::commit_contents(result).unwrap_or_default();
    let contents_agree = |run: &SimulatedRun, i: usize| match kernel_contents.get(&i) {
        Some(&k) if k != 0 => run.contents.get(&i) == Some(&k),
        _ => true,
    };
    let commits_agree = |run: &SimulatedRun, i: usize| {
        let sim_committed = run.commit_ops.contains(&i);
        match kernel.get(&i) {
            Some(k) => sim_committed && run.superblocks.get(&i) == Some(k) && contents_agree(run, i),
            None => !sim_committed || run.superblocks.get(&i).copied() == kernel_at(i),
        }
    };
    // Per crash op whose data disk's unflushed writes the kernel
    // recorded: the op of the kernel's last commit before it (after the
    // crash before it, if any). That commit's data flush decides which
    // writes are unflushed at the cut; where the simulator's differ, the
    // commit came elsewhere among the op's writes, and placing it is
    // placing that flush.
    let crash_ops: Vec<usize> = result.crashes.iter().map(|c| c.op).collect();
    let flush_for_crash: BTreeMap<usize, usize> = orders
        .crashes
        .keys()
        .filter_map(|&c| {
            let since = crash_ops.iter().filter(|&&o| o < c).max().map_or(0, |&o| o + 1);
            kernel.range(since..c).next_back().map(|(&p, _)| (p, c))
        })
        .collect();
    // Whether the unflushed writes at the crash op `i`'s commit decides
    // (if any) are the kernel's.
    let pending_ok = |run: &SimulatedRun, i: usize| {
        flush_for_crash.get(&i).is_none_or(|c| run.pending_agree.get(c) != Some(&false))
    };
    // Whether the free data blocks after op `i` are the kernel's, where
    // both sides know them: a commit that came elsewhere among a
    // request's pieces leaves the same superblock and another count (the
    // pieces after it allocate).
    let kernel_free: BTreeMap<usize, u64> = result
        .op_status
        .iter()
        .filter_map(|(i, line)| Some((*i, crate::fault_compare::kernel_free_data_blocks(line)?)))
        .collect();
    let free_ok = |run: &SimulatedRun, i: usize| match (run.data_free.get(&i), kernel_free.get(&i)) {
        (Some(s), Some(k)) => s == k,
        _ => true,
    };
    let agrees = |run: &SimulatedRun, i: usize| {
        commits_agree(run, i)
            && kernel_faulted.contains(&i) == sim_faulted(run, i)
            && pending_ok(run, i)
            && free_ok(run, i)
    };
    let first_difference = |run: &SimulatedRun, from: usize| {
        let candidates: BTreeSet<usize> = kernel
            .keys()
            .chain(&run.commit_ops)
            .chain(&kernel_faulted)
            .copied()
            .filter(|&i| i >= from)
            .collect();
        candidates.into_iter().find(|&i| !agrees(run, i))
    };
    // Whether op `i` sends a FLUSH or FUA request (the agent's FUA write
    // is followed by a flush).
    let flushes = |i: usize| {
        matches!(
            trace.ops().nth(i),
            Some(Op::Flush { .. } | Op::Write { fua: true, .. } | Op::Write { preflush: true, .. })
        )
    };
    // Ops no placement makes agree before the timer takes over.
    const MISSES: usize = 8;
    // Full agreement; agreement at the op itself (the ops after it up to
    // the kernel's next commit may differ for another reason).
    const FULL: u8 = 63;
    const AGREES: u8 = 62;
    let mut misses = 0;
    // The simulator's timer, following the kernel's clock, until the two
    // first part; the kernel's commits from there on.
    plan.follow_from = usize::MAX;
    let timed_run = simulate_serialized_inner(trace, crashes, clock, Some(&plan), None, &orders)?;
    // (A fault that fired on one side only is no reason to leave the
    // clock: the commit it met may be one the op made itself.)
    let commit_ops: BTreeSet<usize> = kernel.keys().chain(&timed_run.commit_ops).copied().collect();
    let Some(mut from) = commit_ops
        .into_iter()
        .find(|&i| !commits_agree(&timed_run, i) || !pending_ok(&timed_run, i) || !free_ok(&timed_run, i))
    else {
        return Ok(timed_run);
    };
    plan.follow_from = from;
    loop {
        let run = simulate_serialized_inner(trace, crashes, clock, Some(&plan), None, &orders)?;
        let Some(i) = first_difference(&run, from) else { return Ok(run) };
        from = i + 1;
        if !(kernel.contains_key(&i) || kernel_faulted.contains(&i)) || plan.at.contains_key(&i) || flushes(i)
        {
            // The simulator committed where the kernel did not, or the
            // op was placed already: nothing to place. Nor in an op that
            // flushes: the commit a FLUSH or FUA request waits for is the
            // model's own to make (a timer's in the same op is overwritten
            // by it), and placing one would hide a model that does not.
            continue;
        }
        // How well op `i` agrees under a placement: its outcome (and read,
        // and mode) first, then the commit's key, then the faults, then
        // the unflushed writes at the crash it decides (the run then goes
        // on to that crash), then the free data blocks after it, then the
        // ops after it up to the kernel's next commit (their outcomes,
        // modes and free data blocks); 63 is full agreement. Also: the
        // op's data completions, and whether a commit between its
        // request's pieces was made.
        // The ops up to the kernel's next commit: which freed data blocks a
        // commit made allocatable shows there (a remap that frees one
        // block and allocates another commits the same key before or
        // after it; only a later allocation tells them apart).
        let until = kernel.range(i + 1..).next().map_or(i, |(&j, _)| j - 1);
        let stop = flush_for_crash.get(&i).copied().unwrap_or(i).max(until);
        let mut tried = |placement: CommitPlacement| -> Result<(u8, usize, bool, usize), ShimError> {
            plan.at.insert(i, placement);
            let r = simulate_serialized_inner(trace, crashes, clock, Some(&plan), Some(stop), &orders)?;
            let completions = r.data_completions.get(&i).copied().unwrap_or(0);
            // The pool's mode after the op may differ where the kernel's
            // status line was read while the commit ran: it shows no mode
            // (`Error`, while an abort runs), or the kernel's next one is
            // the simulator's.
            let mode_in_passing = |d: &crate::fault_compare::OpDifference| {
                d.what == "mode"
                    && (d.kernel.starts_with("unknown")
                        || next_kernel_mode(result, d.index)
                            .is_some_and(|(_, m)| crate::fault_compare::modes_agree(&d.sim, m)))
            };
            let differences = crate::fault_compare::compare_ops(&r.ops, result);
            let agree_at = |j: usize| differences.iter().all(|d| d.index != j || mode_in_passing(d));
            let same_outcome = agree_at(i);
            let same_faults = kernel_faulted.contains(&i) == sim_faulted(&r, i);
            let later_agree = (i + 1..=until).all(|j| agree_at(j) && free_ok(&r, j));
            let score = 32 * u8::from(same_outcome)
                + 16 * u8::from(commits_agree(&r, i))
                + 8 * u8::from(same_faults)
                + 4 * u8::from(pending_ok(&r, i))
                + 2 * u8::from(free_ok(&r, i))
                + u8::from(later_agree);
            let passes = r.worker_passes.get(&i).copied().unwrap_or(0);
            Ok((score, completions, r.piece_commit_ops.contains(&i), passes))
        };
        let mut best = (tried(CommitPlacement::BeforeOp)?.0, CommitPlacement::BeforeOp);
        let mut k = 0;
        while best.0 < FULL {
            let placement = CommitPlacement::AfterData(k);
            let (score, completions, _, _) = tried(placement)?;
            if score > best.0 {
                best = (score, placement);
            }
            k += 1;
            if k > completions {
                break;
            }
        }
        // Between the pieces of the op's request, while there are pieces
        // to come.
        let mut k = 1;
        while best.0 < FULL {
            let placement = CommitPlacement::AfterPieces(k);
            let (score, _, made, _) = tried(placement)?;
            if !made {
                break;
            }
            if score > best.0 {
                best = (score, placement);
            }
            k += 1;
        }
        // At the end of each of the op's worker passes.
        let mut k = 1;
        while best.0 < FULL {
            let placement = CommitPlacement::InPass(k);
            let (score, _, _, passes) = tried(placement)?;
            if score > best.0 {
                best = (score, placement);
            }
            if k >= passes {
                break;
            }
            k += 1;
        }
        if best.0 < FULL {
            let score = tried(CommitPlacement::AfterOp)?.0;
            if score > best.0 {
                best = (score, CommitPlacement::AfterOp);
            }
        }
        if best.0 >= AGREES {
            plan.at.insert(i, best.1);
            continue;
        }
        // No placement makes the op agree: it differs for another reason.
        // The one that agrees best is kept (the outcome counts most)
        // where the kernel committed; a fault alone places nothing. After
        // `MISSES` such ops the two runs are too far apart to follow: the
        // timer, following the kernel's clock, places the commits from
        // here on.
        if kernel.contains_key(&i) {
            plan.at.insert(i, best.1);
        } else {
            plan.at.remove(&i);
        }
        misses += 1;
        if misses == MISSES {
            plan.at.retain(|&j, _| j < i);
            plan.clock_from = Some(i);
            return simulate_serialized_inner(trace, crashes, clock, Some(&plan), None, &orders);
        }
    }
}

/// What the serialized simulator holds right after a crash op's recovery,
/// before the rebuilt pool writes anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimulatedCrash {
    /// The crash op's index among the trace's ops.
    pub op: usize,
    /// Every device as the recovered images read ([`read_images`]).
    pub state: FinalState,
    /// FNV-1a 64 of the recovered metadata image
    /// ([`crate::protocol::fnv64`]).
    pub metadata_fnv: u64,
    /// Metadata disk: `(kept, unflushed)` volatile writes.
    pub metadata: (u32, u32),
    /// Data disk: `(kept, unflushed)`.
    pub data: (u32, u32),
    /// The kernel's data disk had the simulator's unflushed writes in
    /// another order ([`crate::protocol::CrashRecord::data_pending`]), and
    /// the power cut chose among them in the kernel's.
    pub data_reordered: bool,
}

/// The orders of the kernel's data disk the serialized run follows.
#[derive(Debug, Default)]
struct KernelOrders {
    /// Per crash op, the order of the data disk's writes since the last
    /// flush ([`crate::protocol::CrashRecord::data_pending`]).
    crashes: BTreeMap<usize, Vec<dmsim_faults::PendingKey>>,
    /// Per op, the order in which the data disk served its writes
    /// ([`crate::protocol::data_write_orders`]).
    writes: BTreeMap<usize, Vec<u64>>,
}

/// The kernel run's [`KernelOrders`] (empty for a run that recorded none).
fn kernel_orders(result: &crate::protocol::KernelResult) -> KernelOrders {
    KernelOrders {
        crashes: result
            .crashes
            .iter()
            .filter(|c| !c.data_pending.is_empty())
            .map(|c| (c.op, c.data_pending.clone()))
            .collect(),
        writes: crate::protocol::data_write_orders(result),
    }
}

/// The serialized run: following `clock` when given, committing as `plan`
/// says when given (its own commit timer off between the plan's
/// `follow_from` and `clock_from`), and stopping after op `stop_after`
/// when given (the run then holds only [`SimulatedRun::superblocks`],
/// [`SimulatedRun::data_completions`], [`SimulatedRun::ops`] and
/// [`SimulatedRun::commit_ops`]).
fn simulate_serialized_inner(
    trace: &Trace,
    crashes: bool,
    clock: Option<&ThinClock>,
    plan: Option<&CommitPlan>,
    stop_after: Option<usize>,
    orders: &KernelOrders,
) -> Result<SimulatedRun, ShimError> {
    simulate_serialized_clocked(trace, crashes, clock, plan, stop_after, orders, SimTime::Kernel)
}

/// [`simulate_serialized_inner`], its time moving as `time` says: with
/// [`SimTime::Trace`] the trace's `tick` ops move the simulator's clock
/// (so its timed commits come where the trace's time puts them); with
/// that and [`SimTime::Frozen`], after each request a write that waits
/// for data space meets the no-space timeout within its op
/// ([`ThinSim::outwait_no_space`]) — what an engine does
/// ([`simulate_on_trace_clock`], [`simulate_committing_at`]).
fn simulate_serialized_clocked(
    trace: &Trace,
    crashes: bool,
    clock: Option<&ThinClock>,
    plan: Option<&CommitPlan>,
    stop_after: Option<usize>,
    orders: &KernelOrders,
    time: SimTime,
) -> Result<SimulatedRun, ShimError> {
    let trace_clock = time != SimTime::Kernel;
    let mut cfg = RunConfig::from_header(&trace.header).map_err(ShimError::Invalid)?;
    if let Some(c) = clock {
        cfg.thin.options.waker_wheel_phase = Some(c.wheel_phase());
    }
    let placement = |i: usize| plan.and_then(|p| p.at.get(&i).copied());
    // Whether the simulator's own timer commits during op `i` (set at
    // every op: a crash's new pool takes the run's options).
    let timed = |i: usize| plan.is_none_or(|p| i < p.follow_from || p.clock_from.is_some_and(|c| i >= c));
    if let Some(e) = trace.ops().find_map(|op| op.thin_error()) {
        return Err(ShimError::Invalid(e));
    }
    if let Some(op) = trace
        .ops()
        .find(|op| !crashes && matches!(op, Op::Fault { .. } | Op::AimFault { .. } | Op::Crash { .. }))
    {
        let hint = " on virtio disks (only controlled disks cut power and fail requests: \
             `replay --on kernel --disks ublk`)";
        return Err(ShimError::Invalid(format!("the serialized comparison does not support {op:?}{hint}")));
    }
    let spec = PoolSpec::from_header(&trace.header)?;
    let mut sim = ThinSim::new(cfg.thin);
    // Judged here: the states at the trace's crash ops, against the
    // kernel's. The crash points the simulator samples inside commits are
    // its own campaign's check (a model run as the stock kernel meets the
    // known findings there); their first problem is reported, not fatal.
    sim.report_metadata_crash_points();
    let fail = |f: dmsim_sim::thin::ThinFailure| ShimError::Invalid(format!("simulator: {f}"));
    let mut crash_states = Vec::new();
    let mut first_oracle = None;
    let mut ops = Vec::new();
    let mut mode = "write".to_string();
    let mut now = 0;
    // Where the model committed: the ops after which its metadata
    // superblock differs from before them (the agent's `commit-ops`).
    let superblock = |sim: &ThinSim| {
        sim.pool().with_metadata(|md| {
            let v = md.transaction_manager().block_manager().device().visible();
            v.range(0..crate::protocol::SUPERBLOCK_BYTES.min(v.len()))
        })
    };
    let mut last_superblock = superblock(&sim);
    let mut commit_ops = Vec::new();
    let mut superblocks = BTreeMap::new();
    let mut contents = BTreeMap::new();
    let mut data_completions = BTreeMap::new();
    let mut worker_passes = BTreeMap::new();
    let mut pending_agree = BTreeMap::new();
    let mut data_free = BTreeMap::new();
    let mut piece_commit_ops = BTreeSet::new();
    // Op `i` is over (a crash op: its power cut is next): a commit placed
    // after it is made, and whether it committed (its superblock changed
    // since the op before it) is noted.
    // `i` None: a crash op's pool was rebuilt, and later commits are
    // counted from its superblock.
    let mut end_op = |sim: &mut ThinSim, i: Option<usize>| -> Result<(), ShimError> {
        let Some(i) = i else {
            last_superblock = superblock(sim);
            return Ok(());
        };
        data_completions.insert(i, sim.data_completions());
        worker_passes.insert(i, sim.passes());
        if sim.piece_commits() > 0 {
            piece_commit_ops.insert(i);
        }
        if let Some(free) = sim.pool().with_metadata(|md| md.free_data_blocks_in_core()) {
            data_free.insert(i, free);
        }
        let sb = superblock(sim);
        superblocks.insert(i, crate::protocol::commit_key(&sb));
        if sb != last_superblock {
            commit_ops.push(i);
            let key = sim.pool().with_metadata(|md| {
                crate::protocol::commit_contents_key(
                    &mut md.transaction_manager().block_manager().device().visible().clone(),
                )
            });
            contents.insert(i, key);
        }
        last_superblock = sb;
        Ok(())
    };
    let mut previous_was_crash = false;
    let mut stopped = false;
    for (i, op) in trace.ops().enumerate() {
        if let Some(prev) = i.checked_sub(1) {
            if !previous_was_crash {
                end_op(&mut sim, Some(prev))?;
            }
            if stop_after == Some(prev) {
                stopped = true;
                break;
            }
        }
        previous_was_crash = matches!(op, Op::Crash { .. });
        sim.pool().set_timed_commits(timed(i));
        if let Some(c) = clock {
            // A crash op has no reading of its own: it came right after
            // the op before it.
            let start = if let Op::Crash { .. } = op { c.before(i) } else { c.op_start(i) };
            if let Some(t) = start {
                c.advance(&mut sim, &mut now, t).map_err(fail)?;
            }
        }
        // The kernel's data disk's order of the op's writes.
        sim.follow_data_writes(orders.writes.get(&i).cloned().unwrap_or_default());
        sim.plan_commit(match placement(i) {
            Some(CommitPlacement::AfterData(k)) => Some(k),
            _ => None,
        });
        match placement(i) {
            Some(CommitPlacement::AfterPieces(k)) => sim.plan_commit_after_pieces(k),
            Some(CommitPlacement::InPass(k)) => sim.plan_commit_in_pass(k),
            _ => {}
        }
        // A commit placed before or after the op is part of the op: its
        // events (faults that fire, mode changes) are the op's.
        let at = sim.events().len();
        let also_after = plan.is_some_and(|p| p.also_after.contains(&i));
        let commit_if_placed = |sim: &mut ThinSim, here: CommitPlacement| {
            if placement(i) == Some(here) || (here == CommitPlacement::AfterOp && also_after) {
                sim.commit_now().map_err(fail)?;
            }
            Ok::<(), ShimError>(())
        };
        commit_if_placed(&mut sim, CommitPlacement::BeforeOp)?;
        if previous_was_crash {
            end_op(&mut sim, Some(i))?;
        }
        if matches!(op, Op::Fault { .. } | Op::AimFault { .. }) {
            sim.apply(&op).map_err(fail)?;
            commit_if_placed(&mut sim, CommitPlacement::AfterOp)?;
            ops.push(crate::fault_compare::SimOp::of_events(i, &op, &sim.events()[at..], &mut mode));
            continue;
        }
        if let Op::Crash { .. } = op {
            // The kernel's order of the data disk's unflushed writes, when
            // they are the simulator's too: the crash mode then chooses
            // among them as the agent's disk did.
            if let Some(order) = orders.crashes.get(&i) {
                pending_agree.insert(i, sim.pool().with_data_device(|d| d.has_pending(order)));
            }
            let data_reordered = orders
                .crashes
                .get(&i)
                .is_some_and(|order| sim.pool().with_data_device(|d| d.follow_pending_order(order)));
            sim.apply(&op).map_err(fail)?;
            ops.push(crate::fault_compare::SimOp::of_events(i, &op, &sim.events()[at..], &mut mode));
            let (metadata, data) = sim
                .events()
                .iter()
                .rev()
                .find_map(|e| match e {
                    Event::Crashed { metadata, data, .. } => Some((*metadata, *data)),
                    _ => None,
                })
                .unwrap_or_default();
            let image = sim.metadata_image();
            let xml = dump(&image).map_err(|e| ShimError::Invalid(format!("dump after crash {i}: {e}")))?;
            let data_image = sim.pool().with_data_device(|d| d.visible().to_vec());
            crash_states.push(SimulatedCrash {
                op: i,
                state: read_images(&xml, &data_image, &spec),
                metadata_fnv: crate::protocol::fnv64(&image),
                metadata,
                data,
                data_reordered,
            });
            if let Some((c, t)) = clock.and_then(|c| Some((c, c.rebuild(i)?))) {
                // The kernel's new pool was created after the dead one's
                // teardown: its commit clock and waker start then.
                c.advance(&mut sim, &mut now, t).map_err(fail)?;
                sim.pool().start_clock(now);
            }
            // The agent reads every live device back through the rebuilt
            // pool, which leaves their mapping trees in dm-bufio's cache;
            // reading them here too keeps the model's metadata reads (and
            // so where a "next read" fault fires) the kernel's.
            let live = crash_states.last().map_or(0, |c: &SimulatedCrash| c.state.devices.len());
            let bs = spec.block_sectors;
            for dev in 0..live {
                for b in 0..spec.thin_sectors() / bs {
                    let read = Op::Read { dev: dev as u8, sector: (b * bs) as u32, nr_sectors: bs as u16 };
                    for r in [sim.apply(&read), sim.quiesce()] {
                        match r {
                            Err(f) if f.kind == "oracle" => {
                                first_oracle.get_or_insert(f.to_string());
                            }
                            r => r.map_err(fail)?,
                        }
                    }
                }
            }
            end_op(&mut sim, None)?;
            continue;
        }
        if time == SimTime::Trace && matches!(op, Op::Tick { .. }) {
            sim.apply(&op).and_then(|()| sim.settle()).map_err(fail)?;
        }
        if !kernel_replays(&op) {
            commit_if_placed(&mut sim, CommitPlacement::AfterOp)?;
            ops.push(crate::fault_compare::SimOp::of_events(i, &op, &sim.events()[at..], &mut mode));
            continue;
        }
        // With crashes, a broken model's oracle may object to a read
        // after a crash (data its committed metadata maps was lost): the
        // run goes on, so that its crash states can be held against the
        // kernel's, and the objection is reported.
        // The agent's FUA write is a `RWF_DSYNC` O_DIRECT write: on 6.1 a
        // FUA bio and then, when it succeeded, a flush of the whole device
        // (`blkdev_write_iter` ends with `generic_write_sync`). The flush
        // is part of the op: it makes earlier writes durable, and in a
        // read-only pool it can fail (a flush to a thin device whose block
        // 0 is unmapped is unserviceable there), failing the write(2).
        let then_flush = match op {
            Op::Write { dev, fua: true, .. } => Some(Op::Flush { dev }),
            _ => None,
        };
        for (k, step) in std::iter::once(op).chain(then_flush).enumerate() {
            if k > 0 && !last_request_ok(&sim.events()[at..]) {
                break;
            }
            // On the trace's clock the engine's status after the request is
            // the settled pool's (`settle`: mode changes recorded at once).
            let outwait =
                |sim: &mut ThinSim| if trace_clock { sim.outwait_no_space().map(|_| ()) } else { Ok(()) };
            let settle = |sim: &mut ThinSim| if trace_clock { sim.settle() } else { sim.quiesce() };
            for r in [sim.apply(&step), settle(&mut sim), outwait(&mut sim)] {
                match r {
                    Err(f) if crashes && f.kind == "oracle" => {
                        first_oracle.get_or_insert(f.to_string());
                    }
                    r => r.map_err(fail)?,
                }
            }
        }
        // The agent waits for its request: a write a full pool queues
        // holds it until space comes back or the no-space timeout fails
        // the write. Following the kernel's clock, the simulator's time
        // moves on to where the kernel's op ended before the op counts as
        // done, so that its queued request meets the same timeout within
        // the same op.
        if let Some((c, t)) = clock.and_then(|c| Some((c, c.op_end(i)?))) {
            c.advance(&mut sim, &mut now, t).map_err(fail)?;
        }
        commit_if_placed(&mut sim, CommitPlacement::AfterOp)?;
        ops.push(crate::fault_compare::SimOp::of_events(i, &op, &sim.events()[at..], &mut mode));
    }
    if let Some(last) = trace.ops().count().checked_sub(1) {
        if !previous_was_crash && !stopped {
            end_op(&mut sim, Some(last))?;
        }
    }
    if stopped || stop_after.is_some_and(|s| s + 1 >= trace.ops().count()) {
        return Ok(SimulatedRun {
            superblocks,
            contents,
            data_completions,
            worker_passes,
            ops,
            commit_ops,
            pending_agree,
            data_free,
            piece_commit_ops,
            ..SimulatedRun::default()
        });
    }
    if let Some((c, t)) = clock.and_then(|c| Some((c, c.teardown()?))) {
        c.advance(&mut sim, &mut now, t).map_err(fail)?;
    }
    let run = finished(sim, &spec, first_oracle)?;
    Ok(SimulatedRun {
        crashes: crash_states,
        ops,
        commit_ops,
        superblocks,
        contents,
        data_completions,
        worker_passes,
        pending_agree,
        data_free,
        piece_commit_ops,
        commit_placements: plan.map(|p| p.at.clone()).unwrap_or_default(),
        ..run
    })
}

/// Runs `trace` on the simulator as written — its `worker` and
/// `complete` ops too, so that requests overlap and complete as the trace
/// orders them — and reads every device back: what a race job
/// ([`crate::Job::Race`]) is held against. An oracle objection (a lost
/// write, say) is reported in [`SimulatedRun::oracle_violation`] and the
/// state read from the model's images. Faults and crashes are refused.
pub fn simulate_as_written(trace: &Trace) -> Result<SimulatedRun, ShimError> {
    let cfg = RunConfig::from_header(&trace.header).map_err(ShimError::Invalid)?;
    let spec = PoolSpec::from_header(&trace.header)?;
    if let Some(e) = trace.ops().find_map(|op| op.thin_error()) {
        return Err(ShimError::Invalid(e));
    }
    if let Some(op) =
        trace.ops().find(|op| matches!(op, Op::Fault { .. } | Op::AimFault { .. } | Op::Crash { .. }))
    {
        return Err(ShimError::Invalid(format!("a race is replayed without faults or crashes, not {op:?}")));
    }
    let mut sim = ThinSim::new(cfg.thin);
    let mut first_oracle = None;
    for op in trace.ops() {
        match sim.apply(&op) {
            Err(f) if f.kind == "oracle" => {
                first_oracle.get_or_insert(f.to_string());
            }
            r => r.map_err(|f| ShimError::Invalid(format!("simulator: {f}")))?,
        }
    }
    finished(sim, &spec, first_oracle)
}

/// The end of a simulator run: `ThinSim::finish` (every device read back,
/// the final commit, the metadata check), the devices as read, the disks
/// as the kernel's teardown leaves them and their dump. `first_oracle`:
/// an objection the oracle raised earlier in the run.
fn finished(
    mut sim: ThinSim,
    spec: &PoolSpec,
    first_oracle: Option<String>,
) -> Result<SimulatedRun, ShimError> {
    let fail = |f: dmsim_sim::thin::ThinFailure| ShimError::Invalid(format!("simulator: {f}"));
    let before = sim.events().len();
    let mut oracle_violation = first_oracle;
    let mut end_check_finding = None;
    match sim.finish() {
        Ok(()) => {}
        Err(f) if f.kind == "oracle" => {
            oracle_violation.get_or_insert(f.to_string());
        }
        // The metadata check is finish's last step: every device was read
        // back before it.
        Err(f) if f.kind == "checker" => end_check_finding = Some(f.what.clone()),
        Err(f) => return Err(fail(f)),
    }
    let mut devices: Vec<(u32, Vec<String>)> = Vec::new();
    for e in &sim.events()[before..] {
        // A read-back read that failed (an armed fault, a bad sector)
        // reads as the agent reports it.
        let summary = match e {
            Event::Done { dev, result, .. } if result != "ok" => (*dev, format!("read-error {result}")),
            Event::Done { dev, read: Some(summary), .. } => (*dev, summary.clone()),
            _ => continue,
        };
        match devices.iter_mut().find(|(d, _)| *d == summary.0) {
            Some((_, blocks)) => blocks.push(summary.1),
            None => devices.push((summary.0, vec![summary.1])),
        }
    }
    let out_of_space = sim
        .events()
        .iter()
        .filter_map(|e| match e {
            Event::Done { result, .. } if result.contains("ENOSPC") => Some(format!("{e:?}")),
            Event::Mode(m) => Some(format!("mode {m}")),
            _ => None,
        })
        .collect();
    // The disks as the kernel's teardown leaves them (the agent removes
    // the thin devices and the pool: a commit unless read-only, then the
    // block manager writes back what is still dirty, such as block 0 with
    // the needs_check flag of a read-only pool).
    let crash_point_finding = sim.metadata_crash_point_finding().map(str::to_string);
    let (metadata_image, data_image) = sim.close().map_err(ShimError::Invalid)?;
    let thin_dump = dump(&metadata_image)
        .map_err(|e| ShimError::Invalid(format!("dump of the model's metadata: {e}")))?;
    let state = if oracle_violation.is_some() {
        read_images(&thin_dump, &data_image, spec)
    } else {
        FinalState { devices, mapped: mapped_blocks(&thin_dump) }
    };
    Ok(SimulatedRun {
        state,
        metadata_image,
        thin_dump,
        data_image,
        out_of_space,
        oracle_violation,
        crash_point_finding,
        end_check_finding,
        ..SimulatedRun::default()
    })
}

/// Mapped virtual block → data block, per device, from thin_dump XML.
pub fn data_mappings(xml: &str) -> BTreeMap<u32, BTreeMap<u64, u64>> {
    let mut out: BTreeMap<u32, BTreeMap<u64, u64>> = BTreeMap::new();
    let mut dev = None;
    for line in xml.lines().map(str::trim) {
        if line.starts_with("<device ") {
            dev = attr(line, "dev_id").map(|d| d as u32);
            if let Some(d) = dev {
                out.entry(d).or_default();
            }
        } else if let Some(d) = dev {
            let m = out.entry(d).or_default();
            if line.starts_with("<single_mapping ") {
                if let (Some(v), Some(b)) = (attr(line, "origin_block"), attr(line, "data_block")) {
                    m.insert(v, b);
                }
            } else if line.starts_with("<range_mapping ") {
                if let (Some(v), Some(b), Some(n)) =
                    (attr(line, "origin_begin"), attr(line, "data_begin"), attr(line, "length"))
                {
                    m.extend((0..n.min(1 << 24)).map(|i| (v + i, b + i)));
                }
            }
        }
    }
    out
}

fn attr(line: &str, name: &str) -> Option<u64> {
    let key = format!(" {name}=\"");
    let at = line.find(&key)? + key.len();
    let end = line[at..].find('"')? + at;
    line[at..end].parse().ok()
}

/// What every device of a pool reads, from its images alone: a mapped
/// block reads the data block its mapping names, an unmapped one zeroes.
/// Devices in id order (the order they were created in a trace).
pub fn read_images(xml: &str, data: &[u8], spec: &PoolSpec) -> FinalState {
    let bytes = (spec.block_sectors * 512) as usize;
    let zero = vec![0u8; bytes];
    let maps = data_mappings(xml);
    let devices = maps
        .iter()
        .map(|(&id, m)| {
            let blocks = (0..spec.thin_blocks)
                .map(|v| {
                    let content = m.get(&v).map_or(&zero[..], |&b| {
                        let at = b as usize * bytes;
                        data.get(at..at + bytes).unwrap_or(&zero[..])
                    });
                    summarize(content, spec.run, v * spec.block_sectors)
                })
                .collect();
            (id, blocks)
        })
        .collect();
    FinalState { devices, mapped: mapped_blocks(xml) }
}

/// A stamp summary with misplaced stamps (`wK@sS*1`, [`summarize`]) taken
/// as stamps of write K (`wK*N`): the simulator's own summaries
/// (`dmsim_sim::thin::summarize`) do not say for which sector a stamp was
/// meant, so stale data in a block provisioned without zeroing reads
/// `w1*217` there and `w1@s3840*1 w1@s3841*1 …` on the kernel.
pub fn without_stamp_sectors(summary: &str) -> String {
    let mut runs: Vec<(String, u64)> = Vec::new();
    for part in summary.split_whitespace() {
        let Some((token, n)) = part.rsplit_once('*') else { return summary.to_string() };
        let Ok(n) = n.parse::<u64>() else { return summary.to_string() };
        let token = token.split_once("@s").map_or(token, |(w, _)| w);
        match runs.last_mut() {
            Some((t, m)) if t == token => *m += n,
            _ => runs.push((token.to_string(), n)),
        }
    }
    runs.iter().map(|(t, n)| format!("{t}*{n}")).collect::<Vec<_>>().join(" ")
}

/// Whether two summaries of the same block agree: equal, or equal once
/// misplaced stamps are read as their writes ([`without_stamp_sectors`])
/// when only one side says where its stamps were meant (the simulator's
/// summaries never do).
pub fn same_summary(a: &str, b: &str) -> bool {
    a == b || (a.contains("@s") != b.contains("@s") && without_stamp_sectors(a) == without_stamp_sectors(b))
}

/// Level 2: how two thin_dumps compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum L2 {
    /// Byte-identical.
    Identical,
    /// Identical once data block numbers are left out (`data_block`,
    /// `data_begin`, and range boundaries that follow from them): the same
    /// virtual blocks mapped with the same times, allocated elsewhere.
    SameButDataBlocks {
        /// The first differing line, both sides.
        first: (usize, String, String),
    },
    /// Identical once data block numbers and mapping times are left out.
    SameButDataBlocksAndTimes {
        /// The first differing line, both sides.
        first: (usize, String, String),
    },
    /// Different in what is mapped or in the devices' details.
    Differs {
        /// The first differing line (1-based), simulator, kernel.
        first: (usize, String, String),
    },
}

impl L2 {
    /// Whether the dumps are byte-identical.
    pub fn is_identical(&self) -> bool {
        matches!(self, L2::Identical)
    }

    /// A short name for tables.
    pub fn label(&self) -> &'static str {
        match self {
            L2::Identical => "identical",
            L2::SameButDataBlocks { .. } => "data-blocks",
            L2::SameButDataBlocksAndTimes { .. } => "data+times",
            L2::Differs { .. } => "DIFFERS",
        }
    }

    /// The first differing line, if any: (line, simulator, kernel).
    pub fn first_difference(&self) -> Option<&(usize, String, String)> {
        match self {
            L2::Identical => None,
            L2::SameButDataBlocks { first }
            | L2::SameButDataBlocksAndTimes { first }
            | L2::Differs { first } => Some(first),
        }
    }
}

/// One mapping per line, `single_mapping` and `range_mapping` expanded,
/// with the data block and the time kept or blanked.
fn expand_dump(xml: &str, data: bool, time: bool) -> Vec<String> {
    let attr = |line: &str, name: &str| -> Option<u64> {
        let key = format!(" {name}=\"");
        let at = line.find(&key)? + key.len();
        let end = line[at..].find('"')? + at;
        line[at..end].parse().ok()
    };
    let mut out = Vec::new();
    for line in xml.lines().map(str::trim) {
        let mapping = |v: u64, d: u64, t: u64| {
            let d = if data { d.to_string() } else { "_".into() };
            let t = if time { t.to_string() } else { "_".into() };
            format!("map {v} -> {d} @{t}")
        };
        if line.starts_with("<single_mapping ") {
            match (attr(line, "origin_block"), attr(line, "data_block"), attr(line, "time")) {
                (Some(v), Some(d), Some(t)) => out.push(mapping(v, d, t)),
                _ => out.push(line.to_string()),
            }
        } else if line.starts_with("<range_mapping ") {
            match (
                attr(line, "origin_begin"),
                attr(line, "data_begin"),
                attr(line, "length"),
                attr(line, "time"),
            ) {
                (Some(v), Some(d), Some(n), Some(t)) if n <= 1 << 20 => {
                    out.extend((0..n).map(|i| mapping(v + i, d + i, t)));
                }
                _ => out.push(line.to_string()),
            }
        } else {
            out.push(line.to_string());
        }
    }
    out
}

/// Compares the simulator's thin_dump with the kernel's (L2).
pub fn compare_l2(sim: &str, kernel: &str) -> L2 {
    let Some(first) = dmsim_sim::run::first_difference(sim, kernel) else { return L2::Identical };
    let same = |data: bool, time: bool| expand_dump(sim, data, time) == expand_dump(kernel, data, time);
    if same(false, true) {
        L2::SameButDataBlocks { first }
    } else if same(false, false) {
        L2::SameButDataBlocksAndTimes { first }
    } else {
        L2::Differs { first }
    }
}

/// Level 3: the metadata images block by block (4 KiB).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L3 {
    /// Blocks compared (the longer image's count).
    pub blocks: usize,
    /// Blocks that differ.
    pub differing: usize,
    /// The first differing block.
    pub first: Option<usize>,
    /// The superblock's fields that differ (by their names in the
    /// kernel's `thin_disk_superblock`), when block 0 differs.
    pub superblock_fields: Vec<&'static str>,
}

impl L3 {
    /// Whether every block is identical.
    pub fn is_identical(&self) -> bool {
        self.differing == 0
    }
}

/// Compares two metadata images block by block (L3).
pub fn compare_l3(sim: &[u8], kernel: &[u8]) -> L3 {
    const BLOCK: usize = 4096;
    let blocks = sim.len().max(kernel.len()).div_ceil(BLOCK);
    let block = |img: &[u8], i: usize| -> Vec<u8> {
        let mut b = img.get(i * BLOCK..img.len().min((i + 1) * BLOCK)).unwrap_or(&[]).to_vec();
        b.resize(BLOCK, 0);
        b
    };
    let differing: Vec<usize> = (0..blocks).filter(|&i| block(sim, i) != block(kernel, i)).collect();
    let (a, b) = (block(sim, 0), block(kernel, 0));
    let superblock_fields = SUPERBLOCK_FIELDS
        .iter()
        .filter(|(_, at, len)| a[*at..at + len] != b[*at..at + len])
        .map(|f| f.0)
        .collect();
    L3 { blocks, differing: differing.len(), first: differing.first().copied(), superblock_fields }
}

/// The fields of the thin-pool superblock: name, offset, length.
const SUPERBLOCK_FIELDS: [(&str, usize, usize); 19] = [
    ("csum", 0, 4),
    ("flags", 4, 4),
    ("blocknr", 8, 8),
    ("uuid", 16, 16),
    ("magic", 32, 8),
    ("version", 40, 4),
    ("time", 44, 4),
    ("trans_id", 48, 8),
    ("held_root", 56, 8),
    ("data_space_map_root", 64, 128),
    ("metadata_space_map_root", 192, 128),
    ("data_mapping_root", 320, 8),
    ("device_details_root", 328, 8),
    ("data_block_size", 336, 4),
    ("metadata_block_size", 340, 4),
    ("metadata_nr_blocks", 344, 8),
    ("compat_flags", 352, 4),
    ("compat_ro_flags", 356, 4),
    ("incompat_flags", 360, 4),
];

/// The differences between two end states, the first ones first (empty
/// when L1-equal). Each names the device and block, and both sides.
pub fn compare_l1(sim: &FinalState, kernel: &FinalState) -> Vec<String> {
    let mut out = Vec::new();
    let ids = |s: &FinalState| s.devices.iter().map(|(d, _)| *d).collect::<Vec<_>>();
    if ids(sim) != ids(kernel) {
        out.push(format!("live devices: simulator {:?}, kernel {:?}", ids(sim), ids(kernel)));
    }
    for (id, sim_blocks) in &sim.devices {
        let Some((_, k_blocks)) = kernel.devices.iter().find(|(d, _)| d == id) else { continue };
        for (b, (s, k)) in sim_blocks.iter().zip(k_blocks).enumerate() {
            if !same_summary(s, k) {
                out.push(format!("dev {id} block {b}: simulator reads {s}, kernel reads {k}"));
            }
        }
        if sim_blocks.len() != k_blocks.len() {
            out.push(format!("dev {id}: simulator {} blocks, kernel {}", sim_blocks.len(), k_blocks.len()));
        }
    }
    let empty = BTreeSet::new();
    let all: BTreeSet<u32> = sim.mapped.keys().chain(kernel.mapped.keys()).copied().collect();
    for id in all {
        let (s, k) = (sim.mapped.get(&id).unwrap_or(&empty), kernel.mapped.get(&id).unwrap_or(&empty));
        if s != k {
            let only_sim: Vec<u64> = s.difference(k).copied().collect();
            let only_kernel: Vec<u64> = k.difference(s).copied().collect();
            out.push(format!(
                "dev {id} mappings: mapped only on the simulator {only_sim:?}, only on the kernel {only_kernel:?}"
            ));
        }
    }
    out
}

/// How one crash compares: the crash's ordinal and op, the L1
/// differences of the states after it (empty when equal), and whether
/// the surviving metadata images are identical (L3 at the crash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashComparison {
    /// 0 for the trace's first crash.
    pub crash: usize,
    /// The crash op's index among the trace's ops.
    pub op: usize,
    /// [`compare_l1`] of the simulator's and the kernel's state.
    pub differences: Vec<String>,
    /// The surviving metadata images have the same fingerprint.
    pub metadata_identical: bool,
    /// `(kept, unflushed)` on the metadata and data disks: simulator, kernel.
    pub choices: [((u32, u32), (u32, u32)); 2],
    /// The simulator's power cut followed the kernel's order of the data
    /// disk's unflushed writes ([`SimulatedCrash::data_reordered`]).
    pub data_reordered: bool,
}

/// A named class that explains a divergence between the kernel and the
/// serialized simulator (docs/kernel-shim.md, "Divergence classes").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DivergenceClass {
    /// The trace grew the metadata device at op `op`, before the
    /// divergence, and the kernel replay did not (the agent answered the
    /// op other than `ok`: `unsupported` on virtio disks, or a failed
    /// suspend or resume): the simulator grew its metadata disk (and the
    /// pool its metadata space), so from there the kernel's pool runs out
    /// of metadata space where the simulator's does not. On controlled
    /// disks the agent grows the metadata device as the simulator does
    /// ([`crate::protocol::PoolSpec::metadata_disk_sectors`]), and a
    /// growth both made explains nothing.
    MetadataGrowth {
        /// The first `grow-metadata` op.
        op: usize,
    },
    /// Every device reads the same everywhere and the ops differ only in
    /// the pool's mode after some ops, between `write` and
    /// `out-of-data-space`, until the two agree again: one side had
    /// already left (or entered) out-of-data-space mode and the other did
    /// so a few ops later (every op in between differing only so, with
    /// the same outcomes and reads). 6.1 leaves that mode only at a commit
    /// (`check_for_data_space`), which the 1 s commit timer may make; its
    /// period is a constant the kernel does not let be set, and the agent
    /// reads the status at a moment the trace does not fix (just after
    /// the op; the kernel's worker runs on its own).
    CommitTiming {
        /// The first op whose mode differs.
        op: usize,
    },
    /// An op's outcome is `EIO` on one side and `ENOSPC` on the other, for
    /// a request DM core cut into pieces (it spans two pool blocks or
    /// more) in a pool out of data space, with a fault firing during the
    /// op: one piece can fail for want of space and another on the
    /// fault. DM core keeps the error of the piece that completes last
    /// (`dm_io_set_error` and `__dm_io_complete` overwrite the status for
    /// every failing piece), and which completes last — the piece the
    /// worker fails, or the one the controlled disk fails — the trace does
    /// not fix: the serialized model runs the worker first.
    PieceErrorOrder {
        /// The first op whose outcome differs so.
        op: usize,
    },
    /// The pool's mode after one op differs, and a fault of one kind on
    /// one disk fired during that op on one side and after it on the
    /// other (by the first op the kernel has a status for where the two
    /// modes agree again, each side keeping its mode until then): the
    /// fault was armed to fire on a disk's Nth
    /// request of its kind from the arming (`aim-fault commit request=N`
    /// counts metadata writes), and the request it met came an op later
    /// on one side — the kernel's commit ran after the op's status read
    /// (its commit timer), or its transactions wrote a different number
    /// of metadata blocks before it (their metadata sits in other blocks,
    /// L3), or the write it met was one dm-bufio made between commits
    /// (its write-back when dirty buffers outnumber clean ones threefold,
    /// `__check_watermark`; the model writes metadata only at commits),
    /// whose error the next commit reports. A request in between whose
    /// outcome differs as the two modes say (fail: EIO,
    /// out-of-data-space: ENOSPC, write: ok) is part of it.
    FaultTiming {
        /// The op whose mode differs.
        op: usize,
    },
}

impl DivergenceClass {
    /// The class's short name, for reports and JSON.
    pub fn name(&self) -> &'static str {
        match self {
            DivergenceClass::MetadataGrowth { .. } => "metadata-growth",
            DivergenceClass::CommitTiming { .. } => "commit-timing",
            DivergenceClass::PieceErrorOrder { .. } => "piece-error-order",
            DivergenceClass::FaultTiming { .. } => "fault-timing",
        }
    }
}

impl std::fmt::Display for DivergenceClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DivergenceClass::CommitTiming { op } => write!(
                f,
                "commit-timing: the pool's mode after op {op} is out-of-data-space on one side and write on \
                 the other, and the two agree again a few ops later (in between only the mode differs): the \
                 commit that ends the mode (the 1 s commit timer) came on either side of the status reads"
            ),
            DivergenceClass::PieceErrorOrder { op } => write!(
                f,
                "piece-error-order: op {op}'s request spans pool blocks and ends EIO on one side, ENOSPC on \
                 the other, in a pool out of data space with a fault firing: DM core keeps the error of the \
                 piece that completes last, an order the trace does not fix"
            ),
            DivergenceClass::FaultTiming { op } => write!(
                f,
                "fault-timing: the pool's mode after op {op} differs; an armed fault fired during op {op} on \
                 one side and after it on the other (it counts the disk's requests: a commit after the status \
                 read, metadata in other blocks, or dm-bufio's write-back between commits), and the modes agree \
                 again after it (requests in between end as each side's mode says)"
            ),
            DivergenceClass::MetadataGrowth { op } => write!(
                f,
                "metadata-growth: the trace grows the metadata device at op {op}; the simulator grows its \
                 disk, the kernel replay does not grow the controlled disk"
            ),
        }
    }
}

/// The class of a divergence first seen at op `at` (the end of the trace:
/// `usize::MAX`), from the serialized simulator's per-op record; None when
/// no named class explains it.
pub fn classify(
    sim_ops: &[crate::fault_compare::SimOp],
    kernel_ops: &[crate::protocol::OpResult],
    at: usize,
) -> Option<DivergenceClass> {
    let kernel_grew = |i: usize| kernel_ops.iter().any(|k| k.index == i && k.outcome == "ok");
    sim_ops
        .iter()
        .find(|o| o.index < at && o.op.starts_with("grow-metadata") && !kernel_grew(o.index))
        .map(|o| DivergenceClass::MetadataGrowth { op: o.index })
}

/// The class of op differences that only the kernel's timing explains:
/// every difference is either in the pool's mode, between `write` and
/// `out-of-data-space`, with the two modes agreeing again at the next op
/// whose status the kernel recorded ([`DivergenceClass::CommitTiming`]);
/// an outcome `EIO` against `ENOSPC` of a request spanning pool blocks
/// in a pool out of data space with a fault firing during the op
/// ([`DivergenceClass::PieceErrorOrder`]; `block_sectors` is the pool's
/// block size); or the mode after an op where an armed fault fired on one
/// side and a little later on the other ([`DivergenceClass::FaultTiming`]).
/// The class of the first difference is returned; `None` when there is no
/// difference or one no class explains.
pub fn classify_op_differences(
    differences: &[crate::fault_compare::OpDifference],
    sim_ops: &[crate::fault_compare::SimOp],
    kernel: &crate::protocol::KernelResult,
    block_sectors: u64,
) -> Option<DivergenceClass> {
    let mut classes = differences.iter().map(|d| {
        commit_timing(d, sim_ops, kernel)
            .or_else(|| piece_error_order(d, sim_ops, kernel, block_sectors))
            .or_else(|| fault_timing(d, sim_ops, kernel))
            .or_else(|| fault_timing_outcome(d, differences, sim_ops, kernel))
    });
    // The first difference's class, if every difference has one.
    let class = classes.next()??;
    classes.all(|c| c.is_some()).then_some(class)
}

/// `d` as [`DivergenceClass::CommitTiming`], if it is one: the modes
/// after op `d.index` are write and out-of-data-space, and at the ops the
/// kernel has a status for after it they stay such a pair until they agree
/// again.
fn commit_timing(
    d: &crate::fault_compare::OpDifference,
    sim_ops: &[crate::fault_compare::SimOp],
    kernel: &crate::protocol::KernelResult,
) -> Option<DivergenceClass> {
    use crate::fault_compare::modes_agree;
    let timing_pair = |a: &str, b: &str| {
        let pair = [a, b];
        pair.contains(&"write") && pair.contains(&"out-of-data-space")
    };
    let kernel_now = d.kernel.split_whitespace().next().unwrap_or("");
    if d.what != "mode" || !timing_pair(&d.sim, kernel_now) {
        return None;
    }
    for (j, kernel_then) in kernel_modes_after(kernel, d.index) {
        let sim_then = &sim_ops.iter().find(|o| o.index == j)?.mode;
        if modes_agree(sim_then, kernel_then) {
            return Some(DivergenceClass::CommitTiming { op: d.index });
        }
        if !timing_pair(sim_then, kernel_then) {
            return None;
        }
    }
    None
}

/// The ops after op `i` whose status line the kernel recorded shows a
/// mode, with the mode, in order (see [`next_kernel_mode`]).
fn kernel_modes_after(
    kernel: &crate::protocol::KernelResult,
    i: usize,
) -> impl Iterator<Item = (usize, &'static str)> + '_ {
    let skipped = move |j: usize| kernel.ops.iter().any(|o| o.index == j && o.outcome.starts_with("skipped"));
    kernel
        .op_status
        .iter()
        .filter(move |(j, _)| *j > i && !skipped(*j))
        .filter_map(|(j, line)| Some((*j, crate::fault_compare::kernel_mode(line)?)))
}

/// The first op after op `i` whose status line the kernel recorded shows
/// a mode, and the mode. A line reading `Error` (6.1's `pool_status`
/// prints it when it cannot read the metadata's counters, as while a
/// failed commit's abort runs) shows none and is passed over, and so is
/// an op the agent skipped (it sent the pool nothing: the moment is
/// still the op before's).
fn next_kernel_mode(kernel: &crate::protocol::KernelResult, i: usize) -> Option<(usize, &'static str)> {
    kernel_modes_after(kernel, i).next()
}

/// A fired fault's disk and kind, from either side's description
/// (`metadata write-error sector 104 …`, `metadata write sector 112 nr 8:
/// write-error …`).
fn fault_kind(what: &str) -> Option<(&str, &str)> {
    const KINDS: [&str; 6] =
        ["write-error", "read-error", "bit-flip", "misdirect", "bad-sector-hit", "passdown"];
    let disk = what.split_whitespace().next()?;
    let kind = KINDS.iter().find(|k| what.contains(*k))?;
    Some((disk, kind))
}

/// `d` as [`DivergenceClass::FaultTiming`], if it is one.
fn fault_timing(
    d: &crate::fault_compare::OpDifference,
    sim_ops: &[crate::fault_compare::SimOp],
    kernel: &crate::protocol::KernelResult,
) -> Option<DivergenceClass> {
    fault_timing_span(d, sim_ops, kernel).map(|span| DivergenceClass::FaultTiming { op: span.op })
}

/// The ops a [`DivergenceClass::FaultTiming`] spans: its mode difference
/// after `op`, each side keeping its mode until op `agree`, where the
/// modes agree again.
struct FaultSpan<'a> {
    op: usize,
    agree: usize,
    sim_mode: &'a str,
    kernel_mode: &'a str,
}

/// `d`, an outcome difference, as part of a [`DivergenceClass::FaultTiming`]
/// another difference starts: its op comes after that one's, no later
/// than the op where the modes agree again, and each side's outcome is
/// what its mode until then gives a request (`fail`: EIO;
/// out-of-data-space: ENOSPC, as with `error_if_no_space`; `write`: ok)
/// — the request ran before the fault that changes the later side's mode
/// met it (the campaign's seed 27: the kernel's write got ENOSPC, and the
/// commit after it met the fault the model's had met six ops before).
fn fault_timing_outcome(
    d: &crate::fault_compare::OpDifference,
    differences: &[crate::fault_compare::OpDifference],
    sim_ops: &[crate::fault_compare::SimOp],
    kernel: &crate::protocol::KernelResult,
) -> Option<DivergenceClass> {
    if d.what != "outcome" {
        return None;
    }
    let gives = |mode: &str| match mode {
        "fail" => Some("EIO"),
        "out-of-data-space" => Some("ENOSPC"),
        "write" => Some("ok"),
        _ => None,
    };
    let kernel_outcome = d.kernel.split_whitespace().next()?;
    differences.iter().filter(|d0| d0.index < d.index).find_map(|d0| {
        let span = fault_timing_span(d0, sim_ops, kernel)?;
        let fits = d.index <= span.agree
            && gives(span.sim_mode) == Some(d.sim.as_str())
            && gives(span.kernel_mode) == Some(kernel_outcome);
        fits.then_some(DivergenceClass::FaultTiming { op: span.op })
    })
}

/// The span of `d` as [`DivergenceClass::FaultTiming`], if it is one.
fn fault_timing_span<'a>(
    d: &'a crate::fault_compare::OpDifference,
    sim_ops: &[crate::fault_compare::SimOp],
    kernel: &crate::protocol::KernelResult,
) -> Option<FaultSpan<'a>> {
    use crate::fault_compare::{kernel_fired, modes_agree};
    if d.what != "mode" {
        return None;
    }
    let i = d.index;
    // The first op after it the kernel has a status for (a crash op or a
    // scheduling op in between has none) where the modes agree again —
    // each side keeping its mode of op `i` until then (the side the fault
    // met later had not met it yet) — and the fault fired on the other
    // side in between.
    let kernel_at_i = d.kernel.split_whitespace().next()?;
    let mut next = None;
    for (j, kernel_then) in kernel_modes_after(kernel, i) {
        let sim_then = &sim_ops.iter().find(|o| o.index == j)?.mode;
        if modes_agree(sim_then, kernel_then) {
            next = Some(j);
            break;
        }
        if *sim_then != d.sim || kernel_then != kernel_at_i {
            return None;
        }
    }
    let next = next?;
    let in_range = |op: usize| op > i && op <= next;
    let sim_fired = |at: &dyn Fn(usize) -> bool| -> Vec<(&str, &str)> {
        sim_ops
            .iter()
            .filter(|o| at(o.index))
            .flat_map(|o| o.fired.iter().filter_map(|f| fault_kind(f)))
            .collect()
    };
    let fired = kernel_fired(kernel);
    let kernel_fired_in = |at: &dyn Fn(usize) -> bool| -> Vec<(&str, &str)> {
        fired.iter().filter(|(j, _)| at(*j)).filter_map(|(_, f)| fault_kind(f)).collect()
    };
    let at_i = |op: usize| op == i;
    let (sim_now, kernel_now) = (sim_fired(&at_i), kernel_fired_in(&at_i));
    let (sim_later, kernel_later) = (sim_fired(&in_range), kernel_fired_in(&in_range));
    let moved = |here: &[(&str, &str)], there_now: &[(&str, &str)], there_later: &[(&str, &str)]| {
        here.iter().any(|k| !there_now.contains(k) && there_later.contains(k))
    };
    (moved(&sim_now, &kernel_now, &kernel_later) || moved(&kernel_now, &sim_now, &sim_later))
        .then_some(FaultSpan { op: i, agree: next, sim_mode: d.sim.as_str(), kernel_mode: kernel_at_i })
}

/// `d` as [`DivergenceClass::PieceErrorOrder`], if it is one.
fn piece_error_order(
    d: &crate::fault_compare::OpDifference,
    sim_ops: &[crate::fault_compare::SimOp],
    kernel: &crate::protocol::KernelResult,
    block_sectors: u64,
) -> Option<DivergenceClass> {
    use crate::fault_compare::kernel_mode;
    let outcomes = [d.sim.as_str(), d.kernel.split_whitespace().next().unwrap_or("")];
    if d.what != "outcome" || !(outcomes.contains(&"EIO") && outcomes.contains(&"ENOSPC")) {
        return None;
    }
    // `read|write dev=D sector=S nr=N …`: more than one pool block.
    if !matches!(d.op.split_whitespace().next(), Some("read" | "write")) || block_sectors == 0 {
        return None;
    }
    let field = |name: &str| -> Option<u64> {
        d.op.split_whitespace().find_map(|w| w.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
    };
    let (sector, nr) = (field("sector")?, field("nr")?);
    if nr == 0 || sector / block_sectors == (sector + nr - 1) / block_sectors {
        return None;
    }
    let sim = sim_ops.iter().find(|o| o.index == d.index)?;
    let kernel_status =
        kernel.op_status.iter().find(|(i, _)| *i == d.index).and_then(|(_, l)| kernel_mode(l));
    let out_of_space = sim.mode == "out-of-data-space" || kernel_status == Some("out-of-data-space");
    let fired = !sim.fired.is_empty()
        || crate::fault_compare::kernel_fired(kernel).iter().any(|(i, _)| *i == d.index);
    (out_of_space && fired).then_some(DivergenceClass::PieceErrorOrder { op: d.index })
}

/// Compares the simulator's crash states with the kernel's crash records,
/// crash by crash. A crash only one side has is a difference too.
pub fn compare_crashes(
    sim: &[SimulatedCrash],
    kernel: &[crate::protocol::CrashRecord],
) -> Vec<CrashComparison> {
    let mut out = Vec::new();
    for k in 0..sim.len().max(kernel.len()) {
        match (sim.get(k), kernel.get(k)) {
            (Some(s), Some(c)) => {
                let kstate = FinalState {
                    devices: c.devices.iter().map(|d| (d.id, d.blocks.clone())).collect(),
                    mapped: c.mapped.clone(),
                };
                let mut differences = Vec::new();
                if s.op != c.op {
                    differences
                        .push(format!("crash at op {} on the simulator, op {} on the kernel", s.op, c.op));
                }
                differences.extend(compare_l1(&s.state, &kstate));
                out.push(CrashComparison {
                    crash: k,
                    op: s.op,
                    differences,
                    metadata_identical: s.metadata_fnv == c.metadata_fnv,
                    choices: [(s.metadata, s.data), (c.metadata, c.data)],
                    data_reordered: s.data_reordered,
                });
            }
            (Some(s), None) => out.push(CrashComparison {
                crash: k,
                op: s.op,
                differences: vec!["the kernel did not reach this crash".into()],
                metadata_identical: false,
                choices: [(s.metadata, s.data), ((0, 0), (0, 0))],
                data_reordered: s.data_reordered,
            }),
            (None, Some(c)) => out.push(CrashComparison {
                crash: k,
                op: c.op,
                differences: vec!["the simulator has no such crash".into()],
                metadata_identical: false,
                choices: [((0, 0), (0, 0)), (c.metadata, c.data)],
                data_reordered: false,
            }),
            (None, None) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mode that differs for one op between write and
    /// out-of-data-space, agreeing again at the next op, is commit timing;
    /// one that stays apart, a mode other than those two, or any other
    /// difference is not.
    #[test]
    fn a_mode_one_op_apart_is_commit_timing_and_nothing_else_is() {
        use crate::fault_compare::compare_ops;
        use crate::protocol::{KernelResult, OpResult};
        let status =
            |mode: &str| format!("0 64/512 17/21 - {mode} discard_passdown queue_if_no_space - 1024");
        let with_modes = |sim: [&str; 3], kernel: [&str; 3]| {
            let ops: Vec<_> = (0..3)
                .map(|i| crate::fault_compare::SimOp {
                    mode: sim[i].into(),
                    ..sim_op(i, "discard dev=0 sector=0 nr=8")
                })
                .collect();
            let k = KernelResult {
                ops: (0..3).map(|i| OpResult { index: i, outcome: "ok".into(), read: None }).collect(),
                op_status: (0..3).map(|i| (i, status(kernel[i]))).collect(),
                ..KernelResult::default()
            };
            let d = compare_ops(&ops, &k);
            assert!(!d.is_empty(), "{sim:?} {kernel:?}");
            classify_op_differences(&d, &ops, &k, 256)
        };
        let ods = "out-of-data-space";
        assert_eq!(
            with_modes(["write", "write", "write"], ["out_of_data_space", "rw", "rw"]),
            Some(DivergenceClass::CommitTiming { op: 0 })
        );
        assert_eq!(
            with_modes([ods, "write", "write"], ["rw", "rw", "rw"]).map(|c| c.name()),
            Some("commit-timing")
        );
        // Apart for two ops, agreeing at the third (the campaign's seed 93:
        // the kernel's commit that ends the mode came two ops later).
        assert_eq!(
            with_modes(["write", "write", "write"], ["out_of_data_space", "out_of_data_space", "rw"]),
            Some(DivergenceClass::CommitTiming { op: 0 })
        );
        // Apart to the end: not timing.
        assert_eq!(
            with_modes(
                ["write", "write", "write"],
                ["out_of_data_space", "out_of_data_space", "out_of_data_space"]
            ),
            None
        );
        // Apart, then another pair before they agree: not timing.
        assert_eq!(
            with_modes(["write", "fail", "write"], ["out_of_data_space", "out_of_data_space", "rw"]),
            None
        );
        // Another pair of modes.
        assert_eq!(with_modes(["fail", "write", "write"], ["out_of_data_space", "rw", "rw"]), None);
        // An op both sides skipped in between (it sent the pool nothing;
        // the kernel's status after it still the mode before): the next
        // op that ran is where the modes agree (the campaign's seed 124).
        let skipped_between = |kernel_last: &str| {
            let ops: Vec<_> = (0..3)
                .map(|i| crate::fault_compare::SimOp {
                    mode: "write".into(),
                    outcome: if i == 1 { "skipped".into() } else { "ok".into() },
                    ..sim_op(i, "discard dev=0 sector=0 nr=8")
                })
                .collect();
            let k = KernelResult {
                ops: (0..3)
                    .map(|i| OpResult {
                        index: i,
                        outcome: if i == 1 { "skipped".into() } else { "ok".into() },
                        read: None,
                    })
                    .collect(),
                op_status: vec![
                    (0, status("out_of_data_space")),
                    (1, status("out_of_data_space")),
                    (2, status(kernel_last)),
                ],
                ..KernelResult::default()
            };
            let d = compare_ops(&ops, &k);
            assert!(d.iter().all(|d| d.index == 0), "{d:?}");
            classify_op_differences(&d, &ops, &k, 256)
        };
        assert_eq!(skipped_between("rw"), Some(DivergenceClass::CommitTiming { op: 0 }));
        assert_eq!(skipped_between("out_of_data_space"), None, "still apart at the next op that ran");
        // An outcome difference is never timing.
        let ops = vec![sim_op(0, "write dev=0 sector=0 nr=8 fua")];
        let k = KernelResult {
            ops: vec![OpResult { index: 0, outcome: "EIO".into(), read: None }],
            ..KernelResult::default()
        };
        assert_eq!(classify_op_differences(&compare_ops(&ops, &k), &ops, &k, 256), None);
    }

    /// EIO against ENOSPC is the pieces' completion order only for a
    /// request over two pool blocks or more, in a pool out of data space,
    /// with a fault firing during the op.
    #[test]
    fn eio_against_enospc_over_two_blocks_is_piece_error_order_and_nothing_else_is() {
        use crate::fault_compare::compare_ops;
        use crate::protocol::{KernelResult, OpResult};
        let ods = "0 64/512 17/17 - out_of_data_space discard_passdown error_if_no_space - 1024";
        let rw = "0 64/512 17/17 - rw discard_passdown error_if_no_space - 1024";
        let classify = |op: &str, sim_outcome: &str, kernel_outcome: &str, status: &str, fired: bool| {
            let ops = vec![crate::fault_compare::SimOp {
                outcome: sim_outcome.into(),
                mode: if status == ods { "out-of-data-space".into() } else { "write".into() },
                ..sim_op(0, op)
            }];
            let mut k = KernelResult {
                ops: vec![OpResult { index: 0, outcome: kernel_outcome.into(), read: None }],
                op_status: vec![(0, status.into())],
                ..KernelResult::default()
            };
            if fired {
                k.notes.push(("fired.0".into(), "data write sector 384 nr 128: bad-sector-hit".into()));
            }
            let d = compare_ops(&ops, &k);
            assert_eq!(d.len(), 1, "{op} {sim_outcome} {kernel_outcome}");
            classify_op_differences(&d, &ops, &k, 256)
        };
        let over_two = "write dev=0 sector=384 nr=256";
        assert_eq!(
            classify(over_two, "EIO", "ENOSPC", ods, true),
            Some(DivergenceClass::PieceErrorOrder { op: 0 })
        );
        assert_eq!(
            classify(over_two, "ENOSPC", "EIO", ods, true).map(|c| c.name()),
            Some("piece-error-order")
        );
        // One block: one piece, one error.
        assert_eq!(classify("write dev=0 sector=256 nr=256", "EIO", "ENOSPC", ods, true), None);
        // No fault fired: nothing could fail a piece with EIO.
        assert_eq!(classify(over_two, "EIO", "ENOSPC", ods, false), None);
        // Space left on both sides: nothing could fail one with ENOSPC.
        assert_eq!(classify(over_two, "EIO", "ENOSPC", rw, true), None);
        // Another pair of outcomes.
        assert_eq!(classify(over_two, "ok", "EIO", ods, true), None);
    }

    /// A mode one op apart, with a fault that fired an op later on one
    /// side than on the other, is fault timing; without the moved fault,
    /// or with the modes still apart after it, it is not.
    #[test]
    fn a_mode_one_op_apart_with_a_fault_an_op_later_is_fault_timing() {
        use crate::fault_compare::compare_ops;
        use crate::protocol::{KernelResult, OpResult};
        let status =
            |mode: &str| format!("0 62/512 13/13 - {mode} no_discard_passdown queue_if_no_space - 128");
        let case = |kernel_fires_at: Option<usize>, kernel_modes: [&str; 2]| {
            let ops = vec![
                crate::fault_compare::SimOp {
                    mode: "read-only".into(),
                    fired: vec!["metadata write-error sector 104 nr 8 transient".into()],
                    ..sim_op(0, "write dev=1 sector=512 nr=256")
                },
                crate::fault_compare::SimOp {
                    mode: "read-only".into(),
                    ..sim_op(1, "read dev=0 sector=0 nr=8")
                },
            ];
            let mut k = KernelResult {
                ops: (0..2).map(|i| OpResult { index: i, outcome: "ok".into(), read: None }).collect(),
                op_status: (0..2).map(|i| (i, status(kernel_modes[i]))).collect(),
                ..KernelResult::default()
            };
            if let Some(at) = kernel_fires_at {
                k.notes.push((
                    format!("fired.{at}"),
                    "metadata write sector 112 nr 8: write-error sector 112 nr 8 transient".into(),
                ));
            }
            let d = compare_ops(&ops, &k);
            classify_op_differences(&d, &ops, &k, 256)
        };
        assert_eq!(case(Some(1), ["rw", "ro"]), Some(DivergenceClass::FaultTiming { op: 0 }));
        // The fault never fired on the kernel: not timing.
        assert_eq!(case(None, ["rw", "ro"]), None);
        // Fired at the same op on both sides: the mode difference is another.
        assert_eq!(case(Some(0), ["rw", "ro"]), None);
        // Still apart after it.
        assert_eq!(case(Some(1), ["rw", "rw"]), None);
    }

    /// Seed 27: the kernel's status after the op right after the
    /// difference read `Error` (its commit's abort was running); the
    /// modes are compared at the next op with a mode, and the fault's
    /// firing is looked for up to there.
    #[test]
    fn a_status_reading_error_is_passed_over_to_the_next_op_with_a_mode() {
        use crate::fault_compare::compare_ops;
        use crate::protocol::{KernelResult, OpResult};
        let rw = "0 62/512 13/13 - rw no_discard_passdown queue_if_no_space - 128".to_string();
        let ops: Vec<_> = (0..3)
            .map(|i| crate::fault_compare::SimOp {
                mode: "fail".into(),
                fired: if i == 0 {
                    vec!["metadata write-error sector 104 nr 8 transient".into()]
                } else {
                    vec![]
                },
                ..sim_op(i, "discard dev=0 sector=0 nr=256")
            })
            .collect();
        let case = |statuses: [&str; 3], fired_at: usize| {
            let mut k = KernelResult {
                ops: (0..3).map(|i| OpResult { index: i, outcome: "ok".into(), read: None }).collect(),
                op_status: (0..3).map(|i| (i, statuses[i].to_string())).collect(),
                ..KernelResult::default()
            };
            k.notes.push((
                format!("fired.{fired_at}"),
                "metadata write sector 112 nr 8: write-error sector 112 nr 8 transient".into(),
            ));
            let d = compare_ops(&ops, &k);
            classify_op_differences(&d, &ops, &k, 256)
        };
        assert_eq!(case([&rw, "Error", "Fail"], 1), Some(DivergenceClass::FaultTiming { op: 0 }));
        assert_eq!(case([&rw, "Error", "Fail"], 2), Some(DivergenceClass::FaultTiming { op: 0 }));
        // Apart still at the op with a mode: not timing.
        assert_eq!(case([&rw, "Error", &rw], 1), None);
        // The kernel keeps its mode one more status read, its fault firing
        // after it (stop 37's campaign run: the timer's commit came right
        // after that read), then fails: fault timing over two ops.
        assert_eq!(case([&rw, &rw, "Fail"], 2), Some(DivergenceClass::FaultTiming { op: 0 }));
        // The fault fired after the modes agreed again: not this.
        assert_eq!(case([&rw, &rw, "Fail"], 3), None);
        // The kernel changes to another mode on the way: not timing.
        let ro = rw.replace(" rw ", " ro ");
        assert_eq!(case([&rw, &ro, "Fail"], 2), None);
    }

    /// The campaign's seed 27 (stop 37): the model's commit met the
    /// aimed faults at op 0 (fail); the kernel's write error met a
    /// dm-bufio write-back an op later, and its commit reported it at op
    /// 2, after that op's write had got ENOSPC out of data space — the
    /// model's EIO in fail mode. The outcome is part of the fault timing
    /// only when each side's outcome is its mode's and its op comes by
    /// the op where the modes agree again.
    #[test]
    fn an_outcome_between_a_fault_timings_ops_that_each_mode_gives_is_part_of_it() {
        use crate::fault_compare::compare_ops;
        use crate::protocol::{KernelResult, OpResult};
        let ods = "0 64/512 16/16 - out_of_data_space no_discard_passdown error_if_no_space - 128";
        let case = |kernel_outcome: &str, sim_outcome: &str, statuses: [&str; 3]| {
            let ops: Vec<_> = (0..3)
                .map(|i| crate::fault_compare::SimOp {
                    mode: "fail".into(),
                    outcome: if i == 2 { sim_outcome.into() } else { "ok".into() },
                    fired: if i == 0 {
                        vec![
                            "metadata write-error sector 8 nr 8 transient".into(),
                            "metadata read-error sector 0 nr 8 transient".into(),
                        ]
                    } else {
                        vec![]
                    },
                    ..sim_op(
                        i,
                        if i == 2 {
                            "write dev=0 sector=852 nr=139"
                        } else {
                            "discard dev=1 sector=0 nr=181"
                        },
                    )
                })
                .collect();
            let mut k = KernelResult {
                ops: (0..3)
                    .map(|i| OpResult {
                        index: i,
                        outcome: if i == 2 { kernel_outcome.into() } else { "ok".into() },
                        read: None,
                    })
                    .collect(),
                op_status: (0..3).map(|i| (i, statuses[i].to_string())).collect(),
                ..KernelResult::default()
            };
            k.notes.push((
                "fired.1".into(),
                "metadata write sector 16 nr 8: write-error sector 16 nr 8 transient".into(),
            ));
            k.notes.push((
                "fired.2".into(),
                "metadata read sector 0 nr 8: read-error sector 0 nr 8 transient".into(),
            ));
            let d = compare_ops(&ops, &k);
            assert!(d.iter().any(|x| x.what == "outcome"), "{d:?}");
            classify_op_differences(&d, &ops, &k, 128)
        };
        assert_eq!(case("ENOSPC", "EIO", [ods, ods, "Fail"]), Some(DivergenceClass::FaultTiming { op: 0 }));
        // An outcome neither mode gives: not this.
        assert_eq!(case("EIO", "ENOSPC", [ods, ods, "Fail"]), None);
        assert_eq!(case("EIO", "ok", [ods, ods, "Fail"]), None);
        // The modes never agree again: no fault timing to be part of.
        assert_eq!(case("ENOSPC", "EIO", [ods, ods, ods]), None);
    }

    /// Seed 62 of the kernel campaign (`skip_block_zeroing`, metadata
    /// pressure): at op 175 a write's block allocation commits with no
    /// metadata block left, which puts the pool out of metadata space;
    /// `schedule_zero` then inserts the mapping directly, the read-only
    /// block manager refuses it, the abort cannot set needs_check, and
    /// stock 6.1 fails the pool (its console: "couldn't lock superblock",
    /// then every read EIO). The serialized model does the same.
    #[test]
    fn running_out_of_metadata_without_zeroing_fails_the_pool_as_stock_6_1_does() {
        let path =
            concat!(env!("CARGO_MANIFEST_DIR"), "/../sim/tests/fixtures/ooms-without-zeroing-fails.trace");
        let text = std::fs::read_to_string(path).expect("the fixture");
        let trace = dmsim_traces::text::from_text(&text).expect("a trace");
        let run = simulate_serialized_crashing(&trace).expect("the simulator runs it");
        let op = |i: usize| run.ops.iter().find(|o| o.index == i).expect("the op");
        assert_eq!(op(174).mode, "write");
        assert_eq!((op(175).outcome.as_str(), op(175).mode.as_str()), ("EIO", "fail"));
        assert_eq!((op(183).outcome.as_str(), op(183).mode.as_str()), ("EIO", "fail"), "a read in fail mode");
        // With the candidate fix the mapping goes through the mode's fail
        // variant: the write fails, the pool stays out of metadata space
        // and serves the read.
        let fixed = text.replace(
            "param fix.read_only_deferred_bios_take_cells 0",
            "param fix.read_only_deferred_bios_take_cells 0\nparam fix.unzeroed_mapping_checks_the_mode 1",
        );
        let trace = dmsim_traces::text::from_text(&fixed).expect("a trace");
        let run = simulate_serialized_crashing(&trace).expect("the simulator runs it");
        let op = |i: usize| run.ops.iter().find(|o| o.index == i).expect("the op");
        assert_eq!((op(175).outcome.as_str(), op(175).mode.as_str()), ("EIO", "out-of-metadata-space"));
        assert_eq!((op(183).outcome.as_str(), op(183).mode.as_str()), ("ok", "out-of-metadata-space"));
    }

    fn sim_op(index: usize, op: &str) -> crate::fault_compare::SimOp {
        crate::fault_compare::SimOp {
            index,
            op: op.into(),
            outcome: "ok".into(),
            read: None,
            fired: Vec::new(),
            mode: "write".into(),
        }
    }

    /// The pinned failed-delete trace (its fix on, so that the model runs
    /// it): after its crash the simulator reads every live device back as
    /// the agent does, which caches device 1's mapping subtree, so the
    /// metadata read error armed before the `delete` no longer fires on
    /// the delete's read of it (on stock 6.1 it does not either: the
    /// agent's read-back cached it there).
    #[test]
    fn after_a_crash_the_simulator_reads_back_as_the_agent_does() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../sim/tests/fixtures/failed-delete-leaves-a-tree-without-details.trace"
        );
        let text = std::fs::read_to_string(path)
            .expect("the fixture")
            .replace("param fix.failed_message_aborts 0", "param fix.failed_message_aborts 1");
        let trace = dmsim_traces::text::from_text(&text).expect("a trace");
        let run = simulate_serialized_crashing(&trace).expect("the simulator runs it");
        let delete = run.ops.iter().find(|o| o.op.starts_with("delete")).expect("the delete op");
        assert!(
            delete.fired.is_empty(),
            "the delete read a block the read-back had cached: {:?}",
            delete.fired
        );
        assert_eq!(run.crashes.len(), 1);
    }

    /// An engine that follows the kernel's commits is judged by a
    /// simulator that commits after the ops it was told and nowhere else
    /// of its own: a `tick` moves no clock; on the trace's clock the same
    /// tick makes a timed commit.
    #[test]
    fn the_simulator_commits_where_the_kernel_did_and_ticks_move_no_clock() {
        use crate::protocol::{KernelResult, FORCED_COMMITS_NOTE};
        let cfg = RunConfig::for_seed(0, 300, &dmsim_sim::run::CampaignSettings::default());
        let bs = cfg.thin.block_sectors;
        let write = |block: u64| Op::Write {
            dev: 0,
            sector: (block * bs) as u32,
            nr_sectors: bs as u16,
            fua: false,
            preflush: false,
        };
        let ops = [Op::CreateThin, write(0), Op::Tick { millis: 2000 }, write(1), write(2)];
        let trace = Trace { header: cfg.header(), events: ops.iter().map(|op| Event::Op(*op)).collect() };
        let after = crate::protocol::CommitPoint { before: false, after: true };
        let committing_at = |forced: &[usize]| {
            let forced: BTreeMap<usize, crate::protocol::CommitPoint> =
                forced.iter().map(|&i| (i, after)).collect();
            simulate_committing_at(&trace, true, &forced, &KernelResult::default()).expect("runs").commit_ops
        };
        assert_eq!(committing_at(&[]), vec![0], "the message's commit alone: the tick moved no clock");
        assert_eq!(committing_at(&[1]), vec![0, 1]);
        assert_eq!(committing_at(&[1, 3]), vec![0, 1, 3]);
        assert_eq!(committing_at(&[0]), vec![0], "nothing changed since the message's commit");
        assert_eq!(committing_at(&[2]), vec![0, 2], "op 1's write committed after the tick op");
        let on_trace = simulate_on_trace_clock(&trace, true, &KernelResult::default()).expect("runs");
        assert_eq!(on_trace.commit_ops, vec![0, 2], "on the trace's clock the tick's timed commit");
        // The judge finds the engine's run by its notes.
        let mut result = KernelResult::default();
        assert_eq!(following_kernel_commits(&result), None);
        result.notes.push((CLOCK_NOTE.into(), KERNEL_COMMITS.into()));
        result.notes.push((FORCED_COMMITS_NOTE.into(), "1a 3b 4ba".into()));
        let before = crate::protocol::CommitPoint { before: true, after: false };
        let both = crate::protocol::CommitPoint { before: true, after: true };
        let points = following_kernel_commits(&result).expect("the points");
        assert_eq!(points, [(1, after), (3, before), (4, both)].into_iter().collect());
        // Before op 3 nothing changed since op 1's commit; before op 4 op
        // 3's write is committed and after it op 4's (both op 4's).
        let run = simulate_committing_at(&trace, true, &points, &KernelResult::default()).expect("runs");
        assert_eq!(run.commit_ops, vec![0, 1, 4], "op 3's write committed before op 4's, then op 4's");
        assert!(!on_trace_clock(&result));
    }

    #[test]
    fn a_divergence_after_a_metadata_growth_is_named_and_one_before_is_not() {
        let ops = [
            sim_op(0, "write dev=0 sector=0 nr=8"),
            sim_op(1, "grow-metadata blocks=4 reload"),
            sim_op(2, "create-thin"),
        ];
        let unsupported = [crate::protocol::OpResult { index: 1, outcome: "unsupported".into(), read: None }];
        assert_eq!(classify(&ops, &unsupported, 1), None, "at op 1 the metadata had not grown before it");
        assert_eq!(classify(&ops, &unsupported, 2), Some(DivergenceClass::MetadataGrowth { op: 1 }));
        assert_eq!(classify(&ops, &unsupported, usize::MAX).map(|c| c.name()), Some("metadata-growth"));
        // The kernel grew its device too: nothing is explained.
        let grown = [crate::protocol::OpResult { index: 1, outcome: "ok".into(), read: None }];
        assert_eq!(classify(&ops, &grown, usize::MAX), None);
        assert_eq!(
            classify(&[sim_op(0, "write dev=0 sector=0 nr=8"), sim_op(1, "create-thin")], &[], usize::MAX),
            None
        );
    }

    #[test]
    fn l2_tells_allocation_from_mapping_differences() {
        let a = r#"<superblock uuid="" time="1" transaction="0" data_block_size="128" nr_data_blocks="64">
  <device dev_id="0" mapped_blocks="3" transaction="0" creation_time="0" snap_time="1">
    <range_mapping origin_begin="0" data_begin="0" length="2" time="0"/>
    <single_mapping origin_block="5" data_block="2" time="1"/>
  </device>
</superblock>"#;
        assert_eq!(compare_l2(a, a), L2::Identical);
        let b = a.replace(r#"data_block="2""#, r#"data_block="7""#);
        assert!(matches!(compare_l2(a, &b), L2::SameButDataBlocks { first: (4, _, _) }));
        let c = b.replace(r#"time="1"/>"#, r#"time="0"/>"#);
        assert_eq!(compare_l2(a, &c).label(), "data+times");
        let d = a.replace(r#"origin_block="5""#, r#"origin_block="6""#);
        assert_eq!(compare_l2(a, &d).label(), "DIFFERS");
        // A range split differently is the same mapping.
        let e = a.replace(
            r#"<range_mapping origin_begin="0" data_begin="0" length="2" time="0"/>"#,
            "<single_mapping origin_block=\"0\" data_block=\"0\" time=\"0\"/>\n<single_mapping origin_block=\"1\" data_block=\"1\" time=\"0\"/>",
        );
        assert!(matches!(compare_l2(a, &e), L2::SameButDataBlocks { .. }));
    }

    #[test]
    fn l3_counts_differing_blocks() {
        let a = vec![0u8; 4096 * 3];
        let mut b = a.clone();
        b[4096 + 7] = 1;
        assert_eq!(
            compare_l3(&a, &b),
            L3 { blocks: 3, differing: 1, first: Some(1), superblock_fields: vec![] }
        );
        b[44] = 1;
        assert_eq!(compare_l3(&a, &b).superblock_fields, vec!["time"]);
        assert!(compare_l3(&a, &a).is_identical());
        assert_eq!(compare_l3(&a, &a[..4096]).differing, 0, "missing blocks read as zeroes");
    }

    #[test]
    fn crashes_compare_one_by_one_and_name_the_block() {
        use crate::protocol::{CrashRecord, DeviceContents};
        let state = FinalState {
            devices: vec![(0, vec!["w0*128".into(), "0*128".into()])],
            mapped: [(0, [0u64].into_iter().collect())].into_iter().collect(),
        };
        let sim = SimulatedCrash {
            op: 4,
            state,
            metadata_fnv: 9,
            metadata: (0, 0),
            data: (1, 2),
            data_reordered: false,
        };
        let kernel = CrashRecord {
            op: 4,
            metadata: (0, 0),
            data: (1, 2),
            torn: false,
            metadata_fnv: 9,
            mapped: sim.state.mapped.clone(),
            devices: vec![DeviceContents { id: 0, blocks: vec!["w0*128".into(), "0*128".into()] }],
            data_pending: Vec::new(),
        };
        let same = compare_crashes(std::slice::from_ref(&sim), std::slice::from_ref(&kernel));
        assert!(same[0].differences.is_empty() && same[0].metadata_identical);
        let mut lost = kernel.clone();
        lost.devices[0].blocks[0] = "0*128".into();
        let d = compare_crashes(&[sim.clone(), sim.clone()], &[kernel, lost]);
        assert!(d[0].differences.is_empty());
        assert_eq!(d[1].crash, 1);
        assert_eq!(d[1].differences, vec!["dev 0 block 0: simulator reads w0*128, kernel reads 0*128"]);
        let missing = compare_crashes(&[sim], &[]);
        assert_eq!(missing[0].differences, vec!["the kernel did not reach this crash"]);
    }

    #[test]
    fn differences_name_device_and_block() {
        let a = FinalState {
            devices: vec![(0, vec!["w0*128".into(), "0*128".into()])],
            mapped: [(0, [0u64].into_iter().collect())].into_iter().collect(),
        };
        let mut b = a.clone();
        assert!(compare_l1(&a, &b).is_empty());
        b.devices[0].1[1] = "w1*128".into();
        b.mapped.get_mut(&0).unwrap().insert(1);
        let d = compare_l1(&a, &b);
        assert_eq!(d[0], "dev 0 block 1: simulator reads 0*128, kernel reads w1*128");
        assert!(d[1].contains("only on the kernel [1]"));
    }
}
