//! Races of cache traces on the kernel's dm-cache: the cache's three
//! disks controlled ([`crate::cache_replay::ublk_plan`]), the trace's ops
//! run as race steps say — some in the background, the disks' requests
//! held at their gates and served in the order the steps pick — and the
//! kernel's run judged ([`judge_race`]):
//!
//! - **L1**: every read the kernel returned is one the oracle allows, the
//!   oracle fed the requests as the race ran them (a background request
//!   submitted at its step and completed when the race waited for it), so
//!   two writes in flight together may land either way, and a read pins
//!   what later reads may return;
//! - **clean copies**: in the kernel's disks at rest (after the clean
//!   shutdown), every cache block the metadata records clean, and not
//!   discarded, holds what its origin block holds (reported);
//! - the simulator's run of the trace as written (its `worker` and
//!   `complete` ops order the same race), and its objection, if any.

use dmsim_model::block_device::MemDevice;
use dmsim_model::cache::inspect::read_image;
use dmsim_sim::cache_run;
use dmsim_sim::oracle::IoTicket;
use dmsim_sim::run::Checkers;
use dmsim_traces::{Op, Trace};

use crate::cache_replay::{ublk_plan, CachePlan, Feeder};
use crate::error::ShimError;
use crate::protocol::{RaceStep, CACHE_RACE_PARAM};
use crate::vm::{Job, KernelRun};

/// [`ublk_plan`] as a race ([`CACHE_RACE_PARAM`]): the
/// job's ops run as `steps` say (comma-separated, as `dmsim replay --race`
/// takes them; see [`crate::protocol::RaceStep`]) — some in the
/// background, the controlled disks' requests held at their gates
/// (`cache:hold-writes`, `origin:serve=1` …) — then the read-back. The
/// steps name the trace's ops by their index in the trace; the trace's
/// `worker` and `complete` ops say what the simulator does meanwhile and
/// are the kernel's own (a step naming one is refused); an op no step
/// names is not run. An error says which step is wrong.
pub fn race_plan(trace: &Trace, steps: &str) -> Result<CachePlan, ShimError> {
    let mut p = ublk_plan(trace)?;
    let ops: Vec<Op> = trace.ops().collect();
    // The job's op of each trace op (the plan drops `worker` and
    // `complete`, and keeps every other op in order).
    let mut job_op = Vec::with_capacity(ops.len());
    let mut next = 0;
    for op in &ops {
        if matches!(op, Op::Worker | Op::Complete { .. }) {
            job_op.push(None);
        } else {
            job_op.push(Some(next));
            next += 1;
        }
    }
    let to_job = |i: usize, word: &RaceStep| match job_op.get(i) {
        Some(Some(j)) => Ok(*j),
        Some(None) => Err(ShimError::Invalid(format!(
            "race step {:?}: op {i} ({}) is the simulator's scheduling; the kernel does it on its own",
            word.to_text(),
            ops[i].name()
        ))),
        None => Err(ShimError::Invalid(format!(
            "race step {:?}: the trace has {} ops",
            word.to_text(),
            ops.len()
        ))),
    };
    let mut job_steps = Vec::new();
    for step in crate::thin_replay::parse_steps(steps, &ops, true)? {
        job_steps.push(match step {
            RaceStep::Op(i) => RaceStep::Op(to_job(i, &step)?),
            RaceStep::Background(i) => RaceStep::Background(to_job(i, &step)?),
            RaceStep::Wait(i) => RaceStep::Wait(to_job(i, &step)?),
            other => other,
        });
    }
    // The read-back, after the steps.
    job_steps.extend((next..p.ops.len()).map(RaceStep::Op));
    if let Job::Cache { trace, .. } = &mut p.job {
        trace.header.params.push((CACHE_RACE_PARAM.into(), RaceStep::list_text(&job_steps)));
    }
    Ok(p)
}

/// The race steps of a plan [`race_plan`] made (by the job's op indices).
pub fn plan_steps(plan: &CachePlan) -> Result<Vec<RaceStep>, ShimError> {
    let Job::Cache { trace, .. } = &plan.job else {
        return Err(ShimError::Invalid("not a cache job".into()));
    };
    let text = trace
        .header
        .param(CACHE_RACE_PARAM)
        .ok_or_else(|| ShimError::Invalid("the cache job is not a race".into()))?;
    RaceStep::parse_list(text).ok_or_else(|| ShimError::Invalid(format!("race steps {text:?}")))
}

/// How a cache race's kernel run compares (see the module's
/// documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheRaceReport {
    /// The simulator's objection to the trace as written (the model as the
    /// trace's header configures it: its candidate fixes on or off).
    pub model_objection: Option<String>,
    /// The kernel's reads judged.
    pub reads: usize,
    /// L1: the kernel's reads the oracle does not allow (empty: L1 holds).
    pub l1_violations: Vec<String>,
    /// Requests the kernel failed.
    pub failed_requests: Vec<String>,
    /// Cache blocks recorded clean (and not discarded) whose data differs
    /// from their origin block's in the kernel's disks at rest, each as
    /// `cache block C (origin block O): cache [..], origin [..]`.
    pub clean_copies_differ: Vec<String>,
}

/// Judges a kernel run of `plan` (made by [`race_plan`] from `trace`).
pub fn judge_race(plan: &CachePlan, trace: &Trace, run: &KernelRun) -> Result<CacheRaceReport, ShimError> {
    if let Some(e) = &run.result.error {
        return Err(ShimError::Invalid(format!("the agent failed: {e}")));
    }
    let ops: Vec<Op> = trace.ops().collect();
    let model = cache_run::run_ops(&plan.cfg, &ops, &Checkers::default());
    let mut report = CacheRaceReport {
        model_objection: model.violation.map(|v| v.to_string()),
        reads: 0,
        l1_violations: Vec::new(),
        failed_requests: Vec::new(),
        clean_copies_differ: Vec::new(),
    };
    // L1: the oracle fed as the race ran.
    let answers: std::collections::BTreeMap<usize, &crate::protocol::OpResult> =
        run.result.ops.iter().map(|r| (r.index, r)).collect();
    let answer = |i: usize| {
        answers
            .get(&i)
            .copied()
            .ok_or_else(|| ShimError::Invalid(format!("the kernel did not answer op {i}")))
    };
    let write_numbers = crate::protocol::write_numbers(&plan.ops);
    let mut feeder = Feeder::new(&plan.cfg)?;
    let mut in_flight: Vec<(usize, Option<IoTicket>)> = Vec::new();
    let done = |i: usize, ticket: Option<IoTicket>, feeder: &mut Feeder, report: &mut CacheRaceReport| {
        let fed = feeder.complete(i, &plan.ops[i], ticket, answer(i)?)?;
        report.failed_requests.extend(fed.failed);
        if fed.read.is_some() {
            report.reads += 1;
        }
        report.l1_violations.extend(fed.violation);
        Ok::<(), ShimError>(())
    };
    for step in plan_steps(plan)? {
        match step {
            RaceStep::Op(i) => {
                let op = plan.ops.get(i).ok_or_else(|| ShimError::Invalid(format!("step op {i}")))?;
                let ok = answer(i)?.outcome == "ok";
                let ticket = feeder.submit(op, write_numbers[i], ok)?;
                done(i, ticket, &mut feeder, &mut report)?;
            }
            RaceStep::Background(i) => {
                let op = plan.ops.get(i).ok_or_else(|| ShimError::Invalid(format!("step op {i}")))?;
                let ok = answer(i)?.outcome == "ok";
                in_flight.push((i, feeder.submit(op, write_numbers[i], ok)?));
            }
            RaceStep::Wait(i) => {
                if let Some(k) = in_flight.iter().position(|(j, _)| *j == i) {
                    let (i, t) = in_flight.remove(k);
                    done(i, t, &mut feeder, &mut report)?;
                }
            }
            RaceStep::Join => {
                for (i, t) in std::mem::take(&mut in_flight) {
                    done(i, t, &mut feeder, &mut report)?;
                }
            }
            _ => {}
        }
    }
    for (i, t) in std::mem::take(&mut in_flight) {
        done(i, t, &mut feeder, &mut report)?;
    }
    report.clean_copies_differ = clean_copies_differ(plan, run)?;
    Ok(report)
}

/// The cache blocks the kernel's metadata records clean (and not
/// discarded) whose data differs from their origin block's, in the
/// kernel's disks at rest.
fn clean_copies_differ(plan: &CachePlan, run: &KernelRun) -> Result<Vec<String>, ShimError> {
    let Some(data) = &run.cache_data else { return Ok(Vec::new()) };
    let image = read_image(&mut MemDevice::from_bytes(run.metadata_image.clone()))
        .map_err(|e| ShimError::Invalid(format!("the kernel's metadata: {e}")))?;
    let bytes = (plan.cfg.cache.block_sectors * 512) as usize;
    let (dbs, _) = dmsim_model::cache::mapping::discard_geometry(
        plan.cfg.cache.block_sectors,
        plan.cfg.cache.origin_sectors(),
    );
    let discarded = |oblock: u64| {
        let d = (oblock * plan.cfg.cache.block_sectors / dbs.max(1)) as usize;
        image.discards.get(d).copied().unwrap_or(false)
    };
    let mut out = Vec::new();
    for (c, m) in image.mappings.iter().enumerate() {
        if !m.valid() || image.is_dirty(c) || discarded(m.oblock) {
            continue;
        }
        let o = m.oblock as usize;
        let (Some(cached), Some(origin)) =
            (data.cache.get(c * bytes..(c + 1) * bytes), data.origin.get(o * bytes..(o + 1) * bytes))
        else {
            continue;
        };
        if cached != origin {
            out.push(format!(
                "cache block {c} (origin block {o}): cache [{}], origin [{}]",
                dmsim_sim::thin::summarize(cached),
                dmsim_sim::thin::summarize(origin)
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{KernelResult, OpResult};

    /// Two one-sector writes to a clean cached block in flight together,
    /// then two reads: a cache trace and its race (the shape of the
    /// writethrough finding, without the promotion: the judge does not
    /// care where the data came from).
    fn race() -> (Trace, CachePlan) {
        use dmsim_sim::cache_run::{CacheCampaignSettings, CacheRunConfig};
        let mut cfg = CacheRunConfig::for_seed(0, 10, &CacheCampaignSettings::default());
        let c = &mut cfg.cache;
        (c.block_sectors, c.cache_blocks, c.origin_blocks) = (128, 4, 16);
        c.io_mode = dmsim_traces::op::CacheIoMode::Writethrough;
        (c.policy, c.discard_passdown) = (dmsim_traces::op::CachePolicyKind::Smq, true);
        let ops = "write dev=0 sector=1024 nr=1\nwrite dev=0 sector=1024 nr=1\nworker\ncomplete pick=0\n\
                   complete pick=0\nread dev=0 sector=1024 nr=8\nread dev=0 sector=1024 nr=8\n";
        let header = dmsim_traces::to_text(&Trace { header: cfg.header(), events: Vec::new() });
        let trace = dmsim_traces::from_text(&format!("{header}{ops}")).expect("a trace");
        let plan = race_plan(&trace, "bg0,bg1,join,5,6").expect("a plan");
        (trace, plan)
    }

    /// A kernel run of [`race`] whose two reads returned `first` and
    /// `second` (the read-back reads zeroes, and block 8 what the second
    /// read did).
    fn kernel_run(plan: &CachePlan, first: &str, second: &str) -> KernelRun {
        let ops = (0..plan.ops.len())
            .map(|i| OpResult {
                index: i,
                outcome: "ok".into(),
                read: match i {
                    0 | 1 => None,
                    2 => Some(first.into()),
                    3 => Some(second.into()),
                    12 => Some(format!("{} 0*127", &second[..4])),
                    _ => Some("0*128".into()),
                },
            })
            .collect();
        KernelRun::from_result(KernelResult { ops, ..KernelResult::default() })
    }

    #[test]
    fn the_steps_name_the_jobs_ops_and_the_read_back_follows() {
        let (_, plan) = race();
        let steps: Vec<String> = plan_steps(&plan).unwrap().iter().map(|s| s.to_text()).collect();
        // The trace's ops 5 and 6 are the job's 2 and 3 (no worker, no
        // completions); the read-back's 16 blocks follow.
        assert_eq!(steps[..5], ["bg0", "bg1", "join", "2", "3"]);
        assert_eq!(steps.len(), 5 + 16);
        assert_eq!(steps[5], "4");
    }

    #[test]
    fn steps_naming_the_simulators_scheduling_or_no_op_are_refused() {
        let (trace, _) = race();
        for (steps, says) in [
            ("bg0,bg1,2", "the simulator's scheduling"),
            ("0,1,9", "the trace has 7 ops"),
            ("wait9", "the trace has 7 ops"),
            ("hold-writes", "no data disk"),
            ("bg2", "read, write, discard or flush"),
            ("0,cache:hold-sometimes", "expected an op index"),
        ] {
            let e = race_plan(&trace, steps).expect_err(steps).to_string();
            assert!(e.contains(says), "{steps}: {e}");
        }
    }

    /// The oracle fed as the race ran: with both writes in flight
    /// together either may win, but once a read saw one, a later read may
    /// not see the other. Fed one request at a time (the second write
    /// last), the first case would be a violation too.
    #[test]
    fn a_read_pins_the_winner_of_two_writes_in_flight_together() {
        let (trace, plan) = race();
        for (first, second, violation) in [
            ("w0*1 0*7", "w0*1 0*7", false),
            ("w1*1 0*7", "w1*1 0*7", false),
            ("w0*1 0*7", "w1*1 0*7", true),
            ("w1*1 0*7", "w0*1 0*7", true),
        ] {
            let r = judge_race(&plan, &trace, &kernel_run(&plan, first, second)).expect("judged");
            assert_eq!(r.reads, 2 + 16);
            assert_eq!(
                r.l1_violations.is_empty(),
                !violation,
                "{first} then {second}: {:?}",
                r.l1_violations
            );
            if violation {
                assert!(r.l1_violations[0].starts_with("op 3 (read 1024+8)"), "{:?}", r.l1_violations);
            }
        }
        // One at a time, the second write last: only it may be read.
        let serial = race_plan(&trace, "0,1,5,6").expect("a plan");
        let r = judge_race(&serial, &trace, &kernel_run(&serial, "w0*1 0*7", "w0*1 0*7")).expect("judged");
        assert!(r.l1_violations[0].starts_with("op 2 (read 1024+8)"), "{:?}", r.l1_violations);
    }
}
