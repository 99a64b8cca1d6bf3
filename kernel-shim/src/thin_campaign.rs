//! The thin campaign's traces on the real kernel: every seed's trace, as
//! `dmsim check` generates it (its workload, its swarm's faults and
//! crashes), replayed on dm-thin with the pool on controlled (ublk) disks
//! and judged against the serialized simulator ([`thin_replay::judge`]).
//! `dmsim check --on kernel` is this, with a summary.
//!
//! Traces run a few per boot (a boot that fails is retried one trace at a
//! time, so one bad trace costs only itself); a trace the serialized
//! simulator cannot run is refused before the VM boots, with the reason.

use dmsim_model::thin::pool::LockingDesign;
use dmsim_sim::run::{generate, CampaignSettings, RunConfig};
use dmsim_traces::{Event, Op, Trace};

use crate::equivalence::simulate_serialized_crashing;
use crate::thin_replay::{judge, ThinReplayReport, Verdict};
use crate::vm::{Job, KernelShim};

/// The pool's no-space timeout in the kernel campaign: 1 s, the least the
/// kernel's `no_space_timeout` module parameter (whole seconds) can say.
/// The campaign's own is the kernel's default, 60 s, which costs nothing
/// in simulated time but on the kernel holds the agent for a minute of
/// real time at every write a full pool queues (the agent sends one
/// request at a time and waits for it), with several such writes in most
/// traces that fill their pool.
pub const KERNEL_NO_SPACE_TIMEOUT_NS: u64 = 1_000_000_000;

/// The thin campaign's trace of `seed` with `ops` ops under `settings`, as
/// the kernel campaign runs it: the ops `dmsim check` and `dmsim run`
/// generate for the seed, scheduling ops included (the kernel replay
/// skips them; the serialized simulator too). The header differs from the
/// campaign's where the model must be the stock kernel to be held against
/// it (the ops do not depend on any of it; both sides of the comparison
/// read it from the header):
/// - the model as kernel 6.1 behaves, without the candidate fixes for the
///   kernel bugs dmsim found (`settings.kernel_as_is`), which the
///   campaign turns on so as to report new problems only;
/// - 6.1's locking design, also for the region-crossing workload (which
///   the campaign runs under the 6.4 regions design, whose discards are
///   split where 6.1's are not);
/// - the pool's no-space timeout [`KERNEL_NO_SPACE_TIMEOUT_NS`].
///
/// `settings`' mutations stay (a deliberately broken model is to be seen
/// diverging from the kernel).
pub fn campaign_trace(seed: u64, ops: usize, settings: &CampaignSettings) -> Trace {
    let settings = CampaignSettings { kernel_as_is: true, locking: LockingDesign::Kernel61, ..*settings };
    let mut cfg = RunConfig::for_seed(seed, ops, &settings);
    cfg.thin.options.locking = LockingDesign::Kernel61;
    cfg.thin.options.no_space_timeout = KERNEL_NO_SPACE_TIMEOUT_NS;
    Trace { header: cfg.header(), events: generate(&cfg).into_iter().map(Event::Op).collect() }
}

/// What became of one seed.
#[derive(Debug, Clone)]
pub enum SeedResult {
    /// Replayed and judged.
    Judged(Box<ThinReplayReport>),
    /// Not replayed: the serialized simulator cannot run the trace (why).
    Refused(String),
    /// Replayed, but the VM or the agent failed, or the judge could not
    /// run (why).
    Failed(String),
}

/// One seed's trace and its result.
#[derive(Debug, Clone)]
pub struct SeedOutcome {
    /// The seed.
    pub seed: u64,
    /// Its workload's name.
    pub workload: String,
    /// Its ops (scheduling ops included).
    pub ops: usize,
    /// Its crash ops.
    pub crash_ops: usize,
    /// Whether it arms faults.
    pub faulted: bool,
    /// What became of it.
    pub result: SeedResult,
    /// For a seed judged other than equal (every seed when the run keeps
    /// all answers): the agent's answer
    /// ([`crate::protocol::KernelResult::to_text`]: every op's outcome,
    /// status lines, fired faults, commits, clock readings), to study
    /// without another boot.
    pub kernel_answer: Option<String>,
    /// With [`Self::kernel_answer`]: the kernel's final metadata image,
    /// so that the seed can be judged again without a boot
    /// ([`crate::vm::KernelRun::from_saved`]).
    pub kernel_metadata: Option<Vec<u8>>,
    /// With [`Target::All`]: the engine's run of the same trace.
    pub engine: Option<EngineSide>,
    /// When the seed ran side by side with others
    /// ([`KernelShim::set_concurrent`]) and was not judged equal or
    /// explained there: what that run said (its line's verdict and first
    /// difference). The outcome is then the seed's run alone, in a boot
    /// of its own batch run one at a time: a side-by-side run loads the
    /// guest, and the kernel's timers (its commit period, the no-space
    /// timeout) land elsewhere among the ops than when the trace runs
    /// alone.
    pub side_by_side: Option<String>,
}

impl SeedOutcome {
    /// The verdict when judged.
    pub fn verdict(&self) -> Option<Verdict> {
        match &self.result {
            SeedResult::Judged(r) => Some(r.verdict()),
            _ => None,
        }
    }

    /// The outcome's one word: equal, explained, unexplained, refused or
    /// failed.
    pub fn word(&self) -> &'static str {
        match &self.result {
            SeedResult::Judged(r) => r.verdict().name(),
            SeedResult::Refused(_) => "refused",
            SeedResult::Failed(_) => "failed",
        }
    }

    /// One line for a report: the seed, its workload, ops and crashes,
    /// the outcome and, when there is one, the first difference and its
    /// class.
    pub fn line(&self) -> String {
        format!(
            "seed {} {} ({} ops, {} crashes{}): {}",
            self.seed,
            self.workload,
            self.ops,
            self.crash_ops,
            if self.faulted { ", faults" } else { "" },
            self.verdict_text()
        )
    }

    /// [`Self::line`] after the seed's description: the outcome, the
    /// first difference and the rest.
    fn verdict_text(&self) -> String {
        let head = self.word().to_string();
        let line = match &self.result {
            SeedResult::Judged(r) => {
                let crashes_equal = r.crashes.iter().filter(|c| c.differences.is_empty()).count();
                let mut s = format!("{head}; crashes L1-equal {crashes_equal}/{}", r.crashes.len());
                if let Some(d) = r.first_difference() {
                    s.push_str(&format!("; first: {d}"));
                }
                if let Some(k) = r.class() {
                    s.push_str(&format!("; class {}", k.name()));
                }
                if !r.metadata_growths.is_empty() {
                    let grown = r.metadata_growths.iter().filter(|(_, a)| a == "ok").count();
                    s.push_str(&format!("; metadata grown {grown}/{}", r.metadata_growths.len()));
                }
                if r.verdict() != Verdict::Equal {
                    if let Some(d) = &r.first_commit_difference {
                        s.push_str(&format!("; commits part at {d}"));
                    }
                }
                if r.crash_point_finding.is_some() {
                    s.push_str("; the model reports a problem at an inner crash point");
                }
                if let Some(f) = &r.end_check_finding {
                    let kernel = r.kernel_end_check.as_deref().unwrap_or("clean");
                    s.push_str(&format!("; the model's final metadata: {f}; the kernel's: {kernel}"));
                }
                s
            }
            SeedResult::Refused(why) | SeedResult::Failed(why) => format!("{head}: {why}"),
        };
        let line = match &self.engine {
            None => line,
            Some(e) => format!("{line}; {}", e.line()),
        };
        match &self.side_by_side {
            None => line,
            Some(then) => {
                format!("{line}; run alone after it ran side by side with others, where it was: {then}")
            }
        }
    }
}

impl EngineSide {
    /// The engine's verdict against the simulator, its L2, and the
    /// kernel–engine comparison, in a few words.
    pub fn line(&self) -> String {
        let mut s = match &self.result {
            SeedResult::Judged(r) => {
                let l2 = r.l2.as_ref().map_or("unknown", |l| l.label());
                let mut s = format!("engine: {}, L2 {l2}", r.verdict().name());
                if let Some(d) = r.first_difference() {
                    s.push_str(&format!(" (first: {d})"));
                }
                s
            }
            SeedResult::Refused(why) => format!("engine: refused ({why})"),
            SeedResult::Failed(why) => format!("engine: failed ({why})"),
        };
        if let Some(p) = &self.pair {
            s.push_str(&format!("; kernel–engine: {}", p.line()));
        }
        s
    }
}

/// Counts over a campaign's outcomes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Seeds run.
    pub seeds: usize,
    /// Equal: L1 equal at the end and at every crash, and every op
    /// answered as the model does.
    pub equal: usize,
    /// L1 equal at the end and at every crash, whatever the ops' answers
    /// (the measure; `equal` and the seeds whose only differences
    /// are in ops).
    pub l1_equal: usize,
    /// Diverging, the first divergence in a named class.
    pub explained: usize,
    /// Diverging, no named class.
    pub unexplained: usize,
    /// Refused before the VM.
    pub refused: usize,
    /// The VM, agent or judge failed.
    pub failed: usize,
    /// Crash states judged, and those L1-equal.
    pub crash_states: usize,
    /// Crash states L1-equal.
    pub crash_states_equal: usize,
    /// Crash states where the simulator followed the kernel's order of
    /// the data disk's unflushed writes (it differed from its own).
    pub crash_states_reordered: usize,
    /// Explained divergences by class name.
    pub classes: std::collections::BTreeMap<&'static str, usize>,
    /// With [`Target::All`]: the three-way counts.
    pub three_way: Option<ThreeWay>,
}

/// Counts of a campaign on the kernel and the engine ([`Target::All`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ThreeWay {
    /// Seeds both ran and were judged.
    pub seeds: usize,
    /// The kernel's final metadata dumps as the simulator's (L2 identical).
    pub kernel_l2_identical: usize,
    /// The engine equal to the simulator (every op, every crash, the end).
    pub engine_equal: usize,
    /// The engine L1-equal at the end and at every crash.
    pub engine_l1_equal: usize,
    /// The engine's final metadata dumps as the simulator's.
    pub engine_l2_identical: usize,
    /// The engine's crash states, and those L1-equal.
    pub engine_crash_states: usize,
    /// The engine's crash states L1-equal to the simulator's.
    pub engine_crash_states_equal: usize,
    /// Seeds where the kernel and the engine committed after the same ops.
    pub same_commits: usize,
    /// Of those, the seeds where kernel and engine are L1-equal, have the
    /// same thin_dump, and identical metadata images.
    pub same_commits_l1_equal: usize,
    /// See [`Self::same_commits_l1_equal`].
    pub same_commits_l2_identical: usize,
    /// See [`Self::same_commits_l1_equal`].
    pub same_commits_l3_identical: usize,
    /// Kernel and engine L1-equal at the end.
    pub pair_l1_equal: usize,
    /// Kernel and engine with the same thin_dump.
    pub pair_l2_identical: usize,
    /// Kernel and engine with identical metadata images (L3).
    pub pair_l3_identical: usize,
}

impl Summary {
    /// The counts of `outcomes`.
    pub fn of(outcomes: &[SeedOutcome]) -> Summary {
        let mut s = Summary { seeds: outcomes.len(), ..Summary::default() };
        for o in outcomes {
            match &o.result {
                SeedResult::Judged(r) => {
                    s.crash_states += r.crashes.len();
                    s.crash_states_equal += r.crashes.iter().filter(|c| c.differences.is_empty()).count();
                    s.crash_states_reordered += r.crashes.iter().filter(|c| c.data_reordered).count();
                    s.l1_equal += usize::from(r.l1_equal_everywhere());
                    match r.verdict() {
                        Verdict::Equal => s.equal += 1,
                        Verdict::Explained => {
                            s.explained += 1;
                            if let Some(k) = r.class() {
                                *s.classes.entry(k.name()).or_default() += 1;
                            }
                        }
                        Verdict::Unexplained => s.unexplained += 1,
                    }
                }
                SeedResult::Refused(_) => s.refused += 1,
                SeedResult::Failed(_) => s.failed += 1,
            }
            if let Some(e) = &o.engine {
                let t = s.three_way.get_or_insert_with(ThreeWay::default);
                let identical = |l2: &Result<crate::equivalence::L2, String>| {
                    l2.as_ref().is_ok_and(|l| l.first_difference().is_none())
                };
                if let (SeedResult::Judged(k), SeedResult::Judged(r), Some(p)) =
                    (&o.result, &e.result, &e.pair)
                {
                    t.seeds += 1;
                    t.kernel_l2_identical += usize::from(identical(&k.l2));
                    t.engine_equal += usize::from(r.verdict() == Verdict::Equal);
                    t.engine_l1_equal += usize::from(r.l1_equal_everywhere());
                    t.engine_l2_identical += usize::from(identical(&r.l2));
                    t.engine_crash_states += r.crashes.len();
                    t.engine_crash_states_equal +=
                        r.crashes.iter().filter(|c| c.differences.is_empty()).count();
                    t.pair_l1_equal += usize::from(p.l1.is_empty());
                    t.pair_l2_identical += usize::from(identical(&p.l2));
                    t.pair_l3_identical += usize::from(p.l3.is_identical());
                    if p.same_commits == Some(true) {
                        t.same_commits += 1;
                        t.same_commits_l1_equal += usize::from(p.l1.is_empty());
                        t.same_commits_l2_identical += usize::from(identical(&p.l2));
                        t.same_commits_l3_identical += usize::from(p.l3.is_identical());
                    }
                }
            }
        }
        s
    }

    /// Percent of the seeds equal (0 with no seeds).
    pub fn equal_percent(&self) -> f64 {
        percent(self.equal, self.seeds)
    }

    /// Percent of the seeds L1-equal at the end and at every crash (0
    /// with no seeds).
    pub fn l1_equal_percent(&self) -> f64 {
        percent(self.l1_equal, self.seeds)
    }
}

fn percent(n: usize, of: usize) -> f64 {
    if of == 0 {
        0.0
    } else {
        100.0 * n as f64 / of as f64
    }
}

/// What a campaign's traces replay on in the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The kernel's dm-thin, the pool on controlled (ublk) disks.
    Kernel,
    /// The userland engine on the same controlled disks
    /// (`protocol::JobKind::Engine`), run as the job says.
    Engine(crate::protocol::EngineJob),
    /// Both, one after the other in the same boot: the seed's outcome is
    /// the kernel's, with the engine's ([`SeedOutcome::engine`]) and the
    /// two runs held against each other beside it. With
    /// `EngineJob::following_kernel()` the engine commits where the kernel
    /// did, so that the two can be held against each other block for block.
    All(crate::protocol::EngineJob),
}

impl Target {
    /// The jobs that replay `trace` on this target.
    pub fn jobs(self, trace: &Trace) -> Vec<Job> {
        match self {
            Target::Kernel => vec![Job::Ublk(trace.clone())],
            Target::Engine(engine) => vec![Job::Engine { trace: trace.clone(), engine }],
            Target::All(engine) => {
                vec![Job::Ublk(trace.clone()), Job::Engine { trace: trace.clone(), engine }]
            }
        }
    }

    /// `kernel`, `engine` or `all`.
    pub fn name(self) -> &'static str {
        match self {
            Target::Kernel => "kernel",
            Target::Engine(_) => "engine",
            Target::All(_) => "all",
        }
    }
}

/// The engine's side of a seed run on the kernel and the engine
/// ([`Target::All`]).
#[derive(Debug, Clone)]
pub struct EngineSide {
    /// The engine's run judged against the serialized simulator.
    pub result: SeedResult,
    /// The kernel's run and the engine's held against each other (L1, L2,
    /// L3), when both ran.
    pub pair: Option<crate::thin_replay::RunPair>,
    /// The engine's answer and final metadata, kept as the kernel's are
    /// ([`SeedOutcome::kernel_answer`]) — and whenever the two runs
    /// differ — to judge again without a boot.
    pub answer: Option<(String, Vec<u8>)>,
}

/// Replays the thin campaign's trace of every seed in `seeds` on
/// `target` (the kernel, or the engine), `per_boot` traces a boot (at
/// least 1), the pool on ublk disks,
/// and judges each; `progress` sees every outcome as it is judged, in
/// seed order. `shim` must be prepared with
/// [`KernelShim::prepare_with_ublk`]. With `keep_all`, every outcome
/// carries the kernel's answer and metadata
/// ([`SeedOutcome::kernel_answer`]), not only those that are not equal.
#[allow(clippy::too_many_arguments)]
pub fn run(
    shim: &KernelShim,
    seeds: impl IntoIterator<Item = u64>,
    ops: usize,
    settings: &CampaignSettings,
    per_boot: usize,
    keep_all: bool,
    target: Target,
    mut progress: impl FnMut(&SeedOutcome),
) -> Vec<SeedOutcome> {
    let mut out = Vec::new();
    let mut pending: Vec<(SeedOutcome, Trace)> = Vec::new();
    for seed in seeds {
        let trace = campaign_trace(seed, ops, settings);
        let outcome = SeedOutcome {
            seed,
            workload: trace.header.workload.clone(),
            ops: trace.ops().count(),
            crash_ops: trace.ops().filter(|op| matches!(op, Op::Crash { .. })).count(),
            faulted: trace.ops().any(|op| matches!(op, Op::Fault { .. } | Op::AimFault { .. })),
            result: SeedResult::Refused(String::new()),
            kernel_answer: None,
            kernel_metadata: None,
            engine: None,
            side_by_side: None,
        };
        let refused = simulate_serialized_crashing(&trace).map(|_| ()).map_err(|e| e.to_string());
        match refused {
            Err(e) => {
                // Refused before the VM; the batch's earlier seeds first,
                // so that outcomes come in seed order.
                flush(shim, &mut pending, &mut out, keep_all, target, &mut progress);
                let o = SeedOutcome { result: SeedResult::Refused(e), ..outcome };
                progress(&o);
                out.push(o);
            }
            Ok(_) => {
                pending.push((outcome, trace));
                if pending.len() >= per_boot.max(1) {
                    flush(shim, &mut pending, &mut out, keep_all, target, &mut progress);
                }
            }
        }
    }
    flush(shim, &mut pending, &mut out, keep_all, target, &mut progress);
    out
}

/// Replays the pending traces in one boot and reports them.
fn flush(
    shim: &KernelShim,
    pending: &mut Vec<(SeedOutcome, Trace)>,
    out: &mut Vec<SeedOutcome>,
    keep_all: bool,
    target: Target,
    progress: &mut impl FnMut(&SeedOutcome),
) {
    for o in replay_batch(shim, std::mem::take(pending), keep_all, target) {
        progress(&o);
        out.push(o);
    }
}

/// One boot for `batch`, its traces as many at a time as the shim runs
/// them; when the boot fails, each trace again alone. A seed that ran
/// side by side with others and was judged unexplained or failed runs
/// again alone (the seeds to confirm in one boot, one at a time), and
/// that run is its outcome ([`SeedOutcome::side_by_side`] keeps what the
/// first said).
fn replay_batch(
    shim: &KernelShim,
    batch: Vec<(SeedOutcome, Trace)>,
    keep_all: bool,
    target: Target,
) -> Vec<SeedOutcome> {
    let concurrent = shim.concurrent();
    if concurrent <= 1 || batch.len() <= 1 {
        return replay_batch_at(shim, batch, keep_all, target, concurrent);
    }
    let mut out = replay_batch_at(shim, batch.clone(), keep_all, target, concurrent);
    let again: Vec<usize> = (0..out.len())
        .filter(|&i| {
            out[i].verdict() == Some(Verdict::Unexplained) || matches!(out[i].result, SeedResult::Failed(_))
        })
        .collect();
    if again.is_empty() {
        return out;
    }
    let alone = replay_batch_at(shim, again.iter().map(|&i| batch[i].clone()).collect(), keep_all, target, 1);
    for (i, o) in again.into_iter().zip(alone) {
        out[i] = SeedOutcome { side_by_side: Some(out[i].verdict_text()), ..o };
    }
    out
}

/// [`replay_batch`]'s boot, `concurrent` jobs at a time.
fn replay_batch_at(
    shim: &KernelShim,
    batch: Vec<(SeedOutcome, Trace)>,
    keep_all: bool,
    target: Target,
    concurrent: usize,
) -> Vec<SeedOutcome> {
    if batch.is_empty() {
        return Vec::new();
    }
    let jobs: Vec<Job> = batch.iter().flat_map(|(_, t)| target.jobs(t)).collect();
    let per_trace = jobs.len() / batch.len();
    let judged = |trace: &Trace, run: &crate::vm::KernelRun| match judge(trace, true, run) {
        Ok(r) => SeedResult::Judged(Box::new(r)),
        Err(e) => SeedResult::Failed(e.to_string()),
    };
    match shim.run_jobs_concurrent(&jobs, concurrent) {
        Ok(runs) if runs.len() == jobs.len() => batch
            .into_iter()
            .zip(runs.chunks(per_trace))
            .map(|((o, trace), runs)| {
                let run = &runs[0];
                let engine = runs.get(1).map(|e| {
                    let side = EngineSide {
                        result: judged(&trace, e),
                        pair: (run.result.error.is_none() && e.result.error.is_none())
                            .then(|| crate::thin_replay::compare_runs(run, e)),
                        answer: None,
                    };
                    let differs = !side.pair.as_ref().is_some_and(crate::thin_replay::RunPair::l1_l2_equal)
                        || !matches!(&side.result, SeedResult::Judged(r) if r.verdict() == Verdict::Equal);
                    let answer =
                        (keep_all || differs).then(|| (e.result.to_text(), e.metadata_image.clone()));
                    EngineSide { answer, ..side }
                });
                let o = SeedOutcome { result: judged(&trace, run), engine, ..o };
                let keep = keep_all
                    || o.verdict() != Some(Verdict::Equal)
                    || o.engine.as_ref().is_some_and(|e| e.answer.is_some());
                let kernel_answer = keep.then(|| run.result.to_text());
                let kernel_metadata = keep.then(|| run.metadata_image.clone());
                SeedOutcome { kernel_answer, kernel_metadata, ..o }
            })
            .collect(),
        Ok(runs) if batch.len() == 1 => {
            let why = format!("the VM returned {} results for {} jobs", runs.len(), jobs.len());
            batch
                .into_iter()
                .map(|(o, _)| SeedOutcome { result: SeedResult::Failed(why.clone()), ..o })
                .collect()
        }
        Err(e) if batch.len() == 1 => batch
            .into_iter()
            .map(|(o, _)| SeedOutcome { result: SeedResult::Failed(e.to_string()), ..o })
            .collect(),
        _ => {
            batch.into_iter().flat_map(|one| replay_batch_at(shim, vec![one], keep_all, target, 1)).collect()
        }
    }
}

/// One seed's concurrent replay on the engine ([`run_concurrent`]).
#[derive(Debug, Clone)]
pub struct ConcurrentOutcome {
    /// The seed.
    pub seed: u64,
    /// Its workload's name.
    pub workload: String,
    /// The oracle's verdict, or why there is none (the VM or the agent
    /// failed).
    pub result: Result<crate::thin_replay::ConcurrentReport, String>,
}

impl ConcurrentOutcome {
    /// One line for a report.
    pub fn line(&self) -> String {
        match &self.result {
            Ok(r) => format!(
                "seed {} {}: {} requests, at most {} in flight, {} overtaken, {} failed ops, {} blocks read back: {}",
                self.seed,
                self.workload,
                r.requests,
                r.max_in_flight,
                r.overtaken,
                r.failed_ops,
                r.blocks_read_back,
                match r.violations.first() {
                    None => "no oracle violation".to_string(),
                    Some(v) => format!("{} ORACLE VIOLATIONS; first: {v}", r.violations.len()),
                }
            ),
            Err(e) => format!("seed {} {}: failed: {e}", self.seed, self.workload),
        }
    }
}

/// The campaign's trace of every seed in `seeds` replayed on the engine
/// with up to `depth` requests in flight (`protocol::EngineJob::depth`),
/// `per_boot` traces a boot, each judged by the oracle in the VM
/// ([`crate::thin_replay::judge_concurrent`]); `progress` sees each
/// outcome in seed order. Traces that grow the metadata device are left
/// out (a concurrent replay skips growth ops, and such a pool would only
/// run out of metadata space): they are not in the result.
pub fn run_concurrent(
    shim: &KernelShim,
    seeds: impl IntoIterator<Item = u64>,
    ops: usize,
    settings: &CampaignSettings,
    per_boot: usize,
    depth: u16,
    mut progress: impl FnMut(&ConcurrentOutcome),
) -> Vec<ConcurrentOutcome> {
    let engine = crate::protocol::EngineJob::at_depth(depth);
    let traces: Vec<(u64, Trace)> = seeds
        .into_iter()
        .map(|seed| (seed, campaign_trace(seed, ops, settings)))
        .filter(|(_, t)| !t.ops().any(|op| matches!(op, Op::GrowMetadata { .. })))
        .collect();
    let mut out = Vec::new();
    for batch in traces.chunks(per_boot.max(1)) {
        let jobs: Vec<Job> = batch.iter().map(|(_, t)| Job::Engine { trace: t.clone(), engine }).collect();
        let runs = shim.run_jobs(&jobs);
        for (k, (seed, trace)) in batch.iter().enumerate() {
            let result = match &runs {
                Ok(runs) => match runs.get(k) {
                    Some(run) => crate::thin_replay::judge_concurrent(run).map_err(|e| e.to_string()),
                    None => Err(format!("the VM returned {} results for {} jobs", runs.len(), jobs.len())),
                },
                Err(e) => Err(e.to_string()),
            };
            let o = ConcurrentOutcome { seed: *seed, workload: trace.header.workload.clone(), result };
            progress(&o);
            out.push(o);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_campaign_trace_is_the_seeds_generated_ops() {
        let settings = CampaignSettings::default();
        let a = campaign_trace(7, 50, &settings);
        let b = campaign_trace(7, 50, &settings);
        assert_eq!(a, b, "deterministic");
        let cfg = RunConfig::for_seed(7, 50, &settings);
        assert_eq!(a.ops().collect::<Vec<_>>(), generate(&cfg), "the campaign's ops");
        assert_ne!(a.header, cfg.header(), "the fixes and the no-space timeout differ");
        let as_is = CampaignSettings { kernel_as_is: true, ..settings };
        let mut cfg = RunConfig::for_seed(7, 50, &as_is);
        cfg.thin.options.no_space_timeout = KERNEL_NO_SPACE_TIMEOUT_NS;
        assert_eq!(a.header, cfg.header());
        // A region-crossing seed runs under 6.1's locking, not the 6.4
        // regions the campaign gives that workload.
        let region =
            CampaignSettings { workload: Some(dmsim_sim::run::Workload::RegionCrossing), ..settings };
        assert_eq!(RunConfig::for_seed(7, 50, &region).thin.options.locking, LockingDesign::Regions);
        let t = campaign_trace(7, 50, &region);
        let back = RunConfig::from_header(&t.header).expect("the header parses");
        assert_eq!(back.thin.options.locking, LockingDesign::Kernel61);
        assert_eq!(back.thin.options.fixes, dmsim_model::thin::pool::KernelFixes::default());
        assert_ne!(campaign_trace(8, 50, &settings), a);
    }

    fn judged(verdict: &str) -> SeedOutcome {
        let mut r = crate::thin_replay::empty_report();
        match verdict {
            "equal" => {}
            "explained" => {
                r.differences = vec!["x".into()];
                r.end_class = Some(crate::equivalence::DivergenceClass::MetadataGrowth { op: 3 });
            }
            _ => r.differences = vec!["x".into()],
        }
        SeedOutcome {
            seed: 1,
            workload: "random".into(),
            ops: 10,
            crash_ops: 0,
            faulted: false,
            result: SeedResult::Judged(Box::new(r)),
            kernel_answer: None,
            kernel_metadata: None,
            engine: None,
            side_by_side: None,
        }
    }

    #[test]
    fn the_summary_counts_every_outcome() {
        let mut refused = judged("equal");
        refused.result = SeedResult::Refused("no".into());
        let outcomes =
            vec![judged("equal"), judged("equal"), judged("explained"), judged("unexplained"), refused];
        let s = Summary::of(&outcomes);
        assert_eq!((s.seeds, s.equal, s.explained, s.unexplained, s.refused, s.failed), (5, 2, 1, 1, 1, 0));
        assert_eq!(s.classes.get("metadata-growth"), Some(&1));
        assert!((s.equal_percent() - 40.0).abs() < 1e-9);
        assert_eq!(s.l1_equal, 2, "the two equal seeds; the others differ at the end");
        // A seed whose ops alone differ is L1-equal, not equal.
        let mut op_only = crate::thin_replay::empty_report();
        op_only.op_differences = vec![crate::fault_compare::OpDifference {
            index: 3,
            op: "discard dev=0 sector=0 nr=8".into(),
            what: "mode",
            sim: "write".into(),
            kernel: "fail".into(),
        }];
        let s =
            Summary::of(&[SeedOutcome { result: SeedResult::Judged(Box::new(op_only)), ..judged("equal") }]);
        assert_eq!((s.equal, s.l1_equal, s.unexplained), (0, 1, 1));
        assert!((s.l1_equal_percent() - 100.0).abs() < 1e-9);
        assert!(
            outcomes[3].line().contains("unexplained; crashes L1-equal 0/0; first: end: x"),
            "{}",
            outcomes[3].line()
        );
    }
}
