//! Judging one thin trace's kernel run against the serialized simulator:
//! what `dmsim replay --on kernel` prints for a thin trace and what
//! [`crate::thin_campaign`] counts, as one library call.
//!
//! The simulator runs the trace again following the kernel run's clock
//! ([`equivalence::simulate_following`]); then L1 at the end and at every
//! crash, the ops' outcomes when faults were armed on controlled disks,
//! L2 and L3, and the named class ([`DivergenceClass`]) that explains the
//! first divergence, if one does.

use dmsim_model::block_device::MemDevice;
use dmsim_model::thin::check::{check_thin_metadata, CheckOptions};
use dmsim_sim::oracle::faults::is_leak;
use dmsim_traces::{Op, Trace};

use crate::equivalence::{
    classify, classify_op_differences, compare_crashes, compare_l1, compare_l2, compare_l3,
    simulate_following, CrashComparison, DivergenceClass, FinalState, L2, L3,
};
use crate::error::ShimError;
use crate::fault_compare::{compare_ops, kernel_fired, OpDifference};
use crate::kernel_clock::ThinClock;
use crate::vm::KernelRun;

/// Everything one thin trace's kernel run is judged on.
#[derive(Debug, Clone)]
pub struct ThinReplayReport {
    /// The pool ran on controlled (ublk) disks: crash ops cut power and
    /// faults are armed.
    pub ublk: bool,
    /// The kernel's result carried a clock and the simulator followed it.
    pub followed_kernel_clock: bool,
    /// The run was an engine's on the trace's clock: the simulator ran on
    /// the trace's ticks too, and follows nothing
    /// ([`crate::equivalence::simulate_on_trace_clock`]).
    pub trace_clock: bool,
    /// The run was an engine's that committed where the kernel did (and
    /// nowhere else but where its requests commit): the simulator
    /// committed after the same ops
    /// ([`crate::equivalence::simulate_committing_at`]).
    pub kernel_commits: bool,
    /// The simulator's oracle objected while reading its devices back (a
    /// broken model); its state was then read from its images.
    pub oracle_violation: Option<String>,
    /// The first problem the simulator found at a metadata crash point it
    /// samples inside commits: a model finding the kernel replay does not
    /// judge (it holds the crash ops' states against the kernel's).
    pub crash_point_finding: Option<String>,
    /// What the simulator's metadata checker found wrong in its final
    /// metadata (a model finding; the run was still judged).
    pub end_check_finding: Option<String>,
    /// What dmsim's metadata checker finds wrong in the kernel's final
    /// metadata (damage only: leaks are legal after crashes and faults),
    /// or why it could not read it. Beside [`Self::end_check_finding`] it
    /// says whether the kernel leaves the same damage.
    pub kernel_end_check: Option<String>,
    /// The kernel's answer to each of the trace's `grow-metadata` ops
    /// (`ok` when the agent grew the metadata device as the simulator
    /// did), by op index.
    pub metadata_growths: Vec<(usize, String)>,
    /// L1 at the end: empty when every device reads the same stamps and
    /// the same blocks are mapped.
    pub differences: Vec<String>,
    /// L1 (and L3) at every crash, crash by crash.
    pub crashes: Vec<CrashComparison>,
    /// The class explaining the first crash that differs, if one does.
    pub crash_class: Option<DivergenceClass>,
    /// The class explaining an end difference, if one does.
    pub end_class: Option<DivergenceClass>,
    /// With L1 equal everywhere: the class explaining the op differences,
    /// if one does ([`crate::equivalence::classify_op_differences`]).
    pub op_class: Option<DivergenceClass>,
    /// On controlled disks: ops whose outcome or reads (and, with faults
    /// armed, the pool's mode after them) differ from the serialized
    /// model's.
    pub op_differences: Vec<OpDifference>,
    /// On controlled disks: the first op after which one side's metadata
    /// superblock had changed (it committed) and the other's had not, as
    /// `op N: the kernel committed, the model did not` (or the reverse);
    /// None when they committed after the same ops, or without the
    /// agent's record. Not judged: it tells where the two transactions
    /// parted, which a later difference often follows from.
    pub first_commit_difference: Option<String>,
    /// Faults that fired on the simulator, as `op N: what`.
    pub simulator_fired: Vec<String>,
    /// Faults that fired on the kernel's controlled disks, as `op N: what`.
    pub kernel_fired: Vec<String>,
    /// The trace armed faults (fault or aim-fault ops).
    pub faulted: bool,
    /// L2: the two thin_dumps compared, or why the kernel's could not be
    /// dumped.
    pub l2: Result<L2, String>,
    /// L3: the metadata blocks compared.
    pub l3: L3,
}

/// A judged trace in one word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    /// L1 equal at the end and at every crash, and (with faults) every op
    /// the same.
    Equal,
    /// A divergence, and a named class explains its first appearance.
    Explained,
    /// A divergence no named class explains.
    Unexplained,
}

impl Verdict {
    /// The verdict's short name, for reports and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Equal => "equal",
            Verdict::Explained => "explained",
            Verdict::Unexplained => "unexplained",
        }
    }
}

impl ThinReplayReport {
    /// The first crash whose states differ at L1.
    pub fn first_bad_crash(&self) -> Option<&CrashComparison> {
        self.crashes.iter().find(|c| !c.differences.is_empty())
    }

    /// L1 equal at the end and at every crash.
    pub fn l1_equal_everywhere(&self) -> bool {
        self.differences.is_empty() && self.first_bad_crash().is_none()
    }

    /// The class of the first divergence: the first differing crash's if a
    /// crash differs, else the end's, else (L1 equal everywhere) the op
    /// differences'.
    pub fn class(&self) -> Option<&DivergenceClass> {
        if self.first_bad_crash().is_some() {
            self.crash_class.as_ref()
        } else if !self.differences.is_empty() {
            self.end_class.as_ref()
        } else {
            self.op_class.as_ref()
        }
    }

    /// The verdict: equal, a divergence a named class explains, or one
    /// none does. An op difference with L1 equal everywhere counts as a
    /// divergence too, explained only by [`DivergenceClass::CommitTiming`]
    /// and [`DivergenceClass::PieceErrorOrder`].
    pub fn verdict(&self) -> Verdict {
        let l1 = self.l1_equal_everywhere();
        if l1 && self.op_differences.is_empty() {
            Verdict::Equal
        } else if self.class().is_some() {
            Verdict::Explained
        } else {
            Verdict::Unexplained
        }
    }

    /// The first difference in one line: where (a crash or the end, or an
    /// op) and what; None when equal.
    pub fn first_difference(&self) -> Option<String> {
        if let Some(c) = self.first_bad_crash() {
            return Some(format!(
                "crash {} (op {}): {}",
                c.crash,
                c.op,
                c.differences.first().map_or("", String::as_str)
            ));
        }
        if let Some(d) = self.differences.first() {
            return Some(format!("end: {d}"));
        }
        self.op_differences.first().map(|d| format!("{d}"))
    }
}

/// Judges `run`, the kernel's run of `trace` (`ublk`: on controlled
/// disks), against the serialized simulator following the kernel's clock.
/// An agent error is an error here: there is nothing to judge.
pub fn judge(trace: &Trace, ublk: bool, run: &KernelRun) -> Result<ThinReplayReport, ShimError> {
    if let Some(e) = &run.result.error {
        return Err(ShimError::Invalid(format!("the agent failed: {e}")));
    }
    let trace_clock = crate::equivalence::on_trace_clock(&run.result);
    let kernel_commits = crate::equivalence::following_kernel_commits(&run.result).is_some();
    let followed_kernel_clock = !trace_clock && !kernel_commits && ThinClock::of(&run.result).is_some();
    let sim = simulate_following(trace, ublk, run)?;
    let differences = compare_l1(&sim.state, &FinalState::of_kernel(run));
    let crashes = compare_crashes(&sim.crashes, &run.result.crashes);
    let crash_class = crashes
        .iter()
        .find(|c| !c.differences.is_empty())
        .and_then(|c| classify(&sim.ops, &run.result.ops, c.op));
    let end_class =
        if differences.is_empty() { None } else { classify(&sim.ops, &run.result.ops, usize::MAX) };
    let faulted = trace.ops().any(|op| matches!(op, Op::Fault { .. } | Op::AimFault { .. }));
    // Every op's outcome and reads on controlled disks (the pool's mode
    // too where the agent recorded it: traces with faults).
    let op_differences = if ublk { compare_ops(&sim.ops, &run.result) } else { Vec::new() };
    let block_sectors = trace.header.param("block_sectors").and_then(|v| v.parse().ok()).unwrap_or(0);
    let op_class = classify_op_differences(&op_differences, &sim.ops, &run.result, block_sectors);
    let simulator_fired =
        sim.ops.iter().flat_map(|o| o.fired.iter().map(move |f| format!("op {}: {f}", o.index))).collect();
    let kernel_fired = kernel_fired(&run.result).into_iter().map(|(i, f)| format!("op {i}: {f}")).collect();
    let l2 = match &run.thin_dump {
        Ok(kernel_dump) => Ok(compare_l2(&sim.thin_dump, kernel_dump)),
        Err(e) => Err(format!("dmsim cannot dump the kernel's metadata: {e}")),
    };
    let l3 = compare_l3(&sim.metadata_image, &run.metadata_image);
    Ok(ThinReplayReport {
        ublk,
        followed_kernel_clock,
        trace_clock,
        kernel_commits,
        oracle_violation: sim.oracle_violation,
        crash_point_finding: sim.crash_point_finding,
        end_check_finding: sim.end_check_finding,
        kernel_end_check: metadata_damage(&run.metadata_image),
        metadata_growths: trace
            .ops()
            .enumerate()
            .filter(|(_, op)| matches!(op, Op::GrowMetadata { .. }))
            .map(|(i, _)| {
                let answer = run.result.ops.iter().find(|o| o.index == i);
                (i, answer.map_or_else(|| "not reached".to_string(), |o| o.outcome.clone()))
            })
            .collect(),
        differences,
        crashes,
        crash_class,
        end_class,
        op_class,
        op_differences,
        first_commit_difference: crate::protocol::commit_ops(&run.result)
            .and_then(|kernel| first_commit_difference(&sim.commit_ops, &kernel)),
        simulator_fired,
        kernel_fired,
        faulted,
        l2,
        l3,
    })
}

/// Two runs of one trace compared with each other (the kernel's and the
/// engine's, `dmsim replay --on all`): what each run's devices read at the
/// end and the blocks mapped (L1), their thin_dumps (L2), their metadata
/// images block for block (L3).
#[derive(Debug, Clone)]
pub struct RunPair {
    /// L1 differences, `a` in the first place of each.
    pub l1: Vec<String>,
    /// The dumps compared, or why one cannot be.
    pub l2: Result<L2, String>,
    /// The images compared.
    pub l3: L3,
    /// Whether both committed after the same ops (the superblock changed
    /// during the same ops: `protocol::commit_ops`); `None` when a run did
    /// not record it. Each side's commit timer runs on its own real clock,
    /// and where a commit falls decides, for a pool that fills, which
    /// writes get space: two runs that committed after different ops can
    /// each be equal to the simulator following it and differ from each
    /// other.
    pub same_commits: Option<bool>,
}

impl RunPair {
    /// The two read the same (L1) and dump the same (L2).
    pub fn l1_l2_equal(&self) -> bool {
        self.l1.is_empty() && self.l2.as_ref().is_ok_and(|l| l.first_difference().is_none())
    }

    /// A few words: L1, L2, L3, and the commits when they differ.
    pub fn line(&self) -> String {
        let l1 = if self.l1.is_empty() { "equal".to_string() } else { format!("{} differ", self.l1.len()) };
        let l2 = self.l2.as_ref().map_or("unknown", |l| l.label());
        let mut s = format!("L1 {l1}, L2 {l2}, L3 {} of {} blocks differ", self.l3.differing, self.l3.blocks);
        if self.same_commits == Some(false) {
            s.push_str(" (they committed after different ops)");
        }
        s
    }
}

/// Compares run `a` with run `b` of the same trace ([`RunPair`]).
pub fn compare_runs(a: &KernelRun, b: &KernelRun) -> RunPair {
    let l2 = match (&a.thin_dump, &b.thin_dump) {
        (Ok(x), Ok(y)) => Ok(compare_l2(x, y)),
        (Err(e), _) | (_, Err(e)) => Err(format!("a metadata image does not dump: {e}")),
    };
    let same_commits = crate::protocol::commit_ops(&a.result)
        .zip(crate::protocol::commit_ops(&b.result))
        .map(|(x, y)| x == y);
    RunPair {
        l1: compare_l1(&FinalState::of_kernel(a), &FinalState::of_kernel(b)),
        l2,
        l3: compare_l3(&a.metadata_image, &b.metadata_image),
        same_commits,
    }
}

/// A concurrent replay judged by the oracle (`protocol::EngineJob` with a
/// depth above 1): the agent fed every request to the oracle as it was
/// sent and as it completed, and read every block back at the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConcurrentReport {
    /// What the oracle objected to (none: the run is clean).
    pub violations: Vec<String>,
    /// Requests sent, the most in flight at once, how many completed
    /// before one sent earlier, and the blocks read back at the end.
    pub requests: u64,
    /// See [`Self::requests`].
    pub max_in_flight: u64,
    /// See [`Self::requests`].
    pub overtaken: u64,
    /// See [`Self::requests`].
    pub blocks_read_back: u64,
    /// Ops answered with an error (a full pool's ENOSPC, say: legal, and
    /// judged by the oracle as failed requests).
    pub failed_ops: usize,
}

/// Reads a concurrent run's verdict from its notes; an error when the run
/// failed or carries no verdict (an agent that did not replay
/// concurrently).
pub fn judge_concurrent(run: &KernelRun) -> Result<ConcurrentReport, ShimError> {
    if let Some(e) = &run.result.error {
        return Err(ShimError::Invalid(format!("the agent failed: {e}")));
    }
    let note = |key: &str| run.result.notes.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    let counts = note(crate::agent::CONCURRENCY_NOTE).ok_or_else(|| {
        ShimError::Invalid("the run has no concurrency note: not a concurrent replay".into())
    })?;
    let words: Vec<&str> = counts.split_whitespace().collect();
    let count = |name: &str| -> u64 {
        words
            .iter()
            .position(|w| *w == name)
            .and_then(|i| words.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let violations = note(crate::agent::ORACLE_VIOLATIONS_NOTE)
        .unwrap_or("")
        .split(" ;; ")
        .filter(|v| !v.trim().is_empty())
        .map(str::to_string)
        .collect();
    Ok(ConcurrentReport {
        violations,
        requests: count("requests"),
        max_in_flight: count("max-in-flight"),
        overtaken: count("overtaken"),
        blocks_read_back: count("blocks-read-back"),
        failed_ops: run.result.ops.iter().filter(|o| o.outcome.starts_with('E')).count(),
    })
}

/// The first op in one list of committing ops and not in the other, in
/// words ([`ThinReplayReport::first_commit_difference`]).
pub fn first_commit_difference(model: &[usize], kernel: &[usize]) -> Option<String> {
    let m: std::collections::BTreeSet<usize> = model.iter().copied().collect();
    let k: std::collections::BTreeSet<usize> = kernel.iter().copied().collect();
    let op = m.symmetric_difference(&k).min()?;
    Some(if k.contains(op) {
        format!("op {op}: the kernel committed, the model did not")
    } else {
        format!("op {op}: the model committed, the kernel did not")
    })
}

/// The prefix of a job's notes `crash-check.<op>`: dmsim's checker on
/// the metadata that survived the power cut at op `<op>`, `clean` or the
/// damage (leaks aside, [`metadata_damage`]).
pub const CRASH_CHECK_NOTE_PREFIX: &str = "crash-check.";

/// Every crash's checker verdict in `run` ([`CRASH_CHECK_NOTE_PREFIX`]),
/// by op: `None` for a clean image, the damage otherwise.
pub fn crash_checks(run: &KernelRun) -> Vec<(usize, Option<String>)> {
    let mut out: Vec<(usize, Option<String>)> = run
        .result
        .notes
        .iter()
        .filter_map(|(k, v)| {
            let op = k.strip_prefix(CRASH_CHECK_NOTE_PREFIX)?.parse().ok()?;
            Some((op, (v != "clean").then(|| v.clone())))
        })
        .collect();
    out.sort_by_key(|(op, _)| *op);
    out
}

/// dmsim's metadata checker on a final metadata image: its damage (every
/// problem but a leaked data block, which crashes and faults may leave),
/// or why the image could not be read; None when clean.
pub fn metadata_damage(image: &[u8]) -> Option<String> {
    let mut dev = MemDevice::from_bytes(image.to_vec());
    match check_thin_metadata(&mut dev, &CheckOptions::default()) {
        Ok(report) => {
            let damage: Vec<String> =
                report.problems.iter().filter(|p| !is_leak(p)).map(|p| p.to_string()).collect();
            (!damage.is_empty()).then(|| damage.join("; "))
        }
        Err(e) => Some(format!("unreadable: {e}")),
    }
}

/// A report with nothing in it: equal everywhere (for tests).
#[cfg(test)]
pub(crate) fn empty_report() -> ThinReplayReport {
    ThinReplayReport {
        ublk: true,
        followed_kernel_clock: true,
        trace_clock: false,
        kernel_commits: false,
        oracle_violation: None,
        crash_point_finding: None,
        end_check_finding: None,
        kernel_end_check: None,
        metadata_growths: Vec::new(),
        differences: Vec::new(),
        crashes: Vec::new(),
        crash_class: None,
        end_class: None,
        op_class: None,
        op_differences: Vec::new(),
        first_commit_difference: None,
        simulator_fired: Vec::new(),
        kernel_fired: Vec::new(),
        faulted: false,
        l2: Err("not dumped".into()),
        l3: compare_l3(&[], &[]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool's metadata with one mapping of data block `b`, its count
    /// raised `extra` times more (as a passdown discard's hold a commit
    /// made durable), committed and closed.
    fn image_counting_twice(extra: u32) -> Vec<u8> {
        use dmsim_model::thin::ThinMetadata;
        let mut md = ThinMetadata::format(MemDevice::new(2 * 2048), 128).unwrap();
        md.resize_data_dev(64).unwrap();
        md.create_thin(0).unwrap();
        md.open_thin(0).unwrap();
        let b = md.alloc_data_block().unwrap();
        md.insert_block(0, 0, b).unwrap();
        for _ in 0..extra {
            md.inc_data_range(b, b + 1).unwrap();
        }
        md.close_thin(0).unwrap();
        md.commit().unwrap();
        md.close().unwrap_or_else(|(_, e)| panic!("closing: {e}")).into_bytes()
    }

    #[test]
    fn final_metadata_damage_is_named_and_a_clean_image_has_none() {
        assert_eq!(metadata_damage(&image_counting_twice(0)), None);
        let damage = metadata_damage(&image_counting_twice(1)).expect("a block counted twice is damage");
        assert!(damage.contains("count on disk 2, expected 1"), "{damage}");
        let unreadable = metadata_damage(&[0u8; 8192]).expect("zeroes are no metadata");
        assert!(unreadable.starts_with("unreadable: "), "{unreadable}");
    }

    fn report() -> ThinReplayReport {
        empty_report()
    }

    fn crash(k: usize, op: usize, differences: &[&str]) -> CrashComparison {
        CrashComparison {
            crash: k,
            op,
            differences: differences.iter().map(|s| s.to_string()).collect(),
            metadata_identical: differences.is_empty(),
            choices: [((0, 0), (0, 0)); 2],
            data_reordered: false,
        }
    }

    #[test]
    fn a_trace_equal_everywhere_is_equal() {
        let mut r = report();
        r.crashes = vec![crash(0, 10, &[]), crash(1, 20, &[])];
        assert_eq!(r.verdict(), Verdict::Equal);
        assert_eq!(r.first_difference(), None);
    }

    #[test]
    fn a_crash_difference_without_a_class_is_unexplained_and_named() {
        let mut r = report();
        r.crashes = vec![crash(0, 10, &[]), crash(1, 20, &["dev 1 block 3: …"])];
        // The end's class does not explain a crash's difference.
        r.end_class = Some(DivergenceClass::MetadataGrowth { op: 5 });
        assert_eq!(r.verdict(), Verdict::Unexplained);
        assert_eq!(r.first_difference().unwrap(), "crash 1 (op 20): dev 1 block 3: …");
        r.crash_class = Some(DivergenceClass::MetadataGrowth { op: 5 });
        assert_eq!(r.verdict(), Verdict::Explained);
    }

    #[test]
    fn the_first_commit_difference_names_the_op_and_the_side() {
        assert_eq!(first_commit_difference(&[3, 9, 20], &[3, 9, 20]), None);
        assert_eq!(first_commit_difference(&[], &[]), None);
        assert_eq!(
            first_commit_difference(&[3, 9, 20], &[3, 10, 20]).unwrap(),
            "op 9: the model committed, the kernel did not"
        );
        assert_eq!(
            first_commit_difference(&[3], &[3, 7]).unwrap(),
            "op 7: the kernel committed, the model did not"
        );
    }

    #[test]
    fn an_end_difference_takes_the_ends_class() {
        let mut r = report();
        r.differences = vec!["dev 2 block 0: …".into()];
        assert_eq!(r.verdict(), Verdict::Unexplained);
        r.end_class = Some(DivergenceClass::MetadataGrowth { op: 7 });
        assert_eq!(r.verdict(), Verdict::Explained);
        assert_eq!(r.first_difference().unwrap(), "end: dev 2 block 0: …");
    }
}

/// What a race job's kernel run ([`crate::Job::Race`]) is judged on.
#[derive(Debug, Clone)]
pub struct RaceReport {
    /// The simulator's run of the trace as written
    /// ([`crate::equivalence::simulate_as_written`]): its state, and its
    /// oracle's objection if the model as the trace's header configures it
    /// lost or misplaced data.
    pub model: crate::equivalence::SimulatedRun,
    /// The kernel's end state.
    pub kernel: FinalState,
    /// L1 differences between the two ([`compare_l1`]); empty: equal.
    pub differences: Vec<String>,
}

/// Parses a race job's steps, comma-separated as `dmsim replay --race`
/// takes them (`0,1,hold-reads,bg3,held=1,5,release,join`; see
/// [`crate::protocol::RaceStep`]), checking that every op a step names is
/// in the trace and every disk a gate step names is the pool's (`data`,
/// no prefix, or `metadata:`).
pub fn parse_race_steps(text: &str, trace: &Trace) -> Result<Vec<crate::protocol::RaceStep>, ShimError> {
    let ops: Vec<Op> = trace.ops().collect();
    parse_steps(text, &ops, false)
}

/// [`parse_race_steps`] over `ops`, for a cache's race (`cache`: gate
/// steps name the cache's `metadata:`, `cache:` or `origin:` disk) or a
/// pool's.
pub(crate) fn parse_steps(
    text: &str,
    ops: &[Op],
    cache: bool,
) -> Result<Vec<crate::protocol::RaceStep>, ShimError> {
    use crate::protocol::RaceStep;
    let disks = if cache { "metadata:, cache: or origin:" } else { "none (the data disk) or metadata:" };
    let mut steps = Vec::new();
    for word in text.split(',').map(str::trim) {
        let step = RaceStep::parse(word).ok_or_else(|| {
            ShimError::Invalid(format!(
                "race step {word:?}: expected an op index, bg<i>, [disk:]hold-<reads|writes|flushes>[+…], \
                 [disk:]hold-all, [disk:]held=<n>, [disk:]serve=<k>, release, wait<i>, pause=<ms> or join \
                 (disk: {disks})"
            ))
        })?;
        if let Some(disk) = step.disk() {
            if (cache && !disk.in_cache()) || (!cache && !disk.in_thin()) {
                return Err(ShimError::Invalid(format!(
                    "race step {word:?}: a {} has no {} disk (gate steps' disks: {disks})",
                    if cache { "cache" } else { "thin pool" },
                    disk.name()
                )));
            }
        }
        if let Some(i) = step.op() {
            if i >= ops.len() {
                return Err(ShimError::Invalid(format!(
                    "race step {word:?}: the trace has {} ops",
                    ops.len()
                )));
            }
        }
        if let RaceStep::Background(i) = step {
            if !matches!(ops[i], Op::Read { .. } | Op::Write { .. } | Op::Discard { .. } | Op::Flush { .. }) {
                return Err(ShimError::Invalid(format!(
                    "race step {word:?}: op {i} is not a read, write, discard or flush, which alone run in the background"
                )));
            }
        }
        steps.push(step);
    }
    Ok(steps)
}

/// Judges a race job's kernel run against `model`, the simulator's run of
/// the same trace as written ([`crate::equivalence::simulate_as_written`],
/// which needs no VM: run it first to refuse a trace before booting). An
/// agent error is an error here.
pub fn judge_race(model: crate::equivalence::SimulatedRun, run: &KernelRun) -> Result<RaceReport, ShimError> {
    if let Some(e) = &run.result.error {
        return Err(ShimError::Invalid(format!("the agent failed: {e}")));
    }
    let kernel = FinalState::of_kernel(run);
    let differences = compare_l1(&model.state, &kernel);
    Ok(RaceReport { model, kernel, differences })
}
