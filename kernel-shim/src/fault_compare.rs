//! Per-op comparison of a ublk replay with the serialized simulator, for
//! traces with armed faults: what each op returned (`ok` or an errno),
//! what each read returned, and the pool's mode after each op.
//!
//! The serialized simulator ([`crate::equivalence::simulate_serialized_crashing`])
//! records one [`SimOp`] per trace op; the agent records one
//! [`crate::protocol::OpResult`] per op and, in a trace with faults, the
//! pool's status line after each op (without a commit) and the faults
//! that fired on the controlled disks (`fired.<op>` notes).
//! [`compare_ops`] lists every op where the two differ, naming the op.

use dmsim_traces::{Event, Op};

use crate::equivalence::same_summary;
use crate::protocol::{KernelResult, OpResult};

/// What one op did in the serialized simulator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimOp {
    /// The op's index among the trace's ops.
    pub index: usize,
    /// The op in the trace's text form.
    pub op: String,
    /// `ok`, the first errno of its requests (`EIO`, `ENOSPC`, …), or
    /// `skipped` when it sent no request (no live device; not an I/O op).
    pub outcome: String,
    /// For a read that succeeded: what it returned (stamp summary).
    pub read: Option<String>,
    /// The faults that fired during the op (`<disk> <what>`).
    pub fired: Vec<String>,
    /// The pool's mode after the op (`write`, `out-of-data-space`,
    /// `read-only`, `fail`).
    pub mode: String,
}

/// Whether the op sends a request to a thin device (its outcome is one).
pub fn is_io(op: &Op) -> bool {
    matches!(op, Op::Write { .. } | Op::Read { .. } | Op::Discard { .. } | Op::Flush { .. })
}

impl SimOp {
    /// The record of op `index` from the events it produced; `mode` is
    /// the pool's mode before it and is updated.
    pub fn of_events(index: usize, op: &Op, events: &[Event], mode: &mut String) -> SimOp {
        let mut outcome: Option<String> = None;
        let mut read = None;
        let mut fired = Vec::new();
        if matches!(op, Op::Crash { .. }) {
            // Recovery loads the pool afresh, in write mode.
            *mode = "write".into();
        }
        for e in events {
            match e {
                Event::Done { result, read: r, .. } => {
                    match &outcome {
                        Some(o) if o != "ok" => {}
                        _ => outcome = Some(result.clone()),
                    }
                    if read.is_none() {
                        read.clone_from(r);
                    }
                }
                Event::FaultFired { disk, what } => fired.push(format!("{} {what}", disk.name())),
                Event::Mode(m) => m.clone_into(mode),
                _ => {}
            }
        }
        let outcome = match outcome {
            Some(o) => o,
            None if is_io(op) => "skipped".into(),
            None => "ok".into(),
        };
        let read = if outcome == "ok" { read } else { None };
        SimOp { index, op: dmsim_traces::text::op_to_line(op), outcome, read, fired, mode: mode.clone() }
    }
}

/// The pool's mode in a thin-pool status line, in the simulator's words:
/// `rw` → `write`, `ro` → `read-only` (6.1 prints `ro` for
/// `PM_OUT_OF_METADATA_SPACE` too: see [`modes_agree`]),
/// `out_of_data_space` → `out-of-data-space`, `Fail` → `fail`; `None`
/// when unreadable.
pub fn kernel_mode(status: &str) -> Option<&'static str> {
    let fields: Vec<&str> = status.split_whitespace().collect();
    match fields.first() {
        Some(&"Fail") => return Some("fail"),
        Some(&"Error") | None => return None,
        _ => {}
    }
    match *fields.get(4)? {
        "rw" => Some("write"),
        "ro" => Some("read-only"),
        "out_of_data_space" => Some("out-of-data-space"),
        _ => None,
    }
}

/// The free data blocks a thin-pool status line shows (its used/total
/// data blocks field); `None` when it shows none (`Fail`, `Error`, a
/// status that failed).
pub fn kernel_free_data_blocks(status: &str) -> Option<u64> {
    kernel_mode(status)?;
    let (used, total) = status.split_whitespace().nth(2)?.split_once('/')?;
    total.parse::<u64>().ok()?.checked_sub(used.parse().ok()?)
}

/// Whether the model's mode `sim` is what the kernel's status showed
/// (`kernel`, from [`kernel_mode`]): 6.1's `pool_status` prints `ro` for
/// both read-only modes (`is_read_only_pool_mode`), so `read-only`
/// stands for `out-of-metadata-space` as well.
pub fn modes_agree(sim: &str, kernel: &str) -> bool {
    sim == kernel || (kernel == "read-only" && sim == "out-of-metadata-space")
}

/// Whether the status line says `needs_check`.
pub fn kernel_needs_check(status: &str) -> bool {
    status.split_whitespace().any(|w| w == "needs_check")
}

/// One op where the kernel and the serialized simulator differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpDifference {
    /// The op's index among the trace's ops.
    pub index: usize,
    /// The op in the trace's text form.
    pub op: String,
    /// What differs: `outcome`, `read` or `mode`.
    pub what: &'static str,
    /// The simulator's side.
    pub sim: String,
    /// The kernel's side.
    pub kernel: String,
}

impl std::fmt::Display for OpDifference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "op {} `{}`: {} model {} kernel {}", self.index, self.op, self.what, self.sim, self.kernel)
    }
}

/// The kernel's outcome in the simulator's words: `skipped (…)` is
/// `skipped`.
fn normalized(outcome: &str) -> &str {
    if outcome.starts_with("skipped") {
        "skipped"
    } else {
        outcome
    }
}

/// Every op where the kernel's run differs from the serialized model's:
/// an I/O op's outcome (ok / errno), a successful read's content, and the
/// pool's mode after an op (only where the kernel recorded its status:
/// traces with faults; only the first op of each run of differing modes).
/// Ops the kernel did not reach (the agent stopped) are left out.
pub fn compare_ops(sim: &[SimOp], kernel: &KernelResult) -> Vec<OpDifference> {
    let mut out = Vec::new();
    let by_index = |i: usize| -> Option<&OpResult> { kernel.ops.iter().find(|o| o.index == i) };
    let status = |i: usize| kernel.op_status.iter().find(|(j, _)| *j == i).map(|(_, s)| s.as_str());
    let mut mode_differs = false;
    for s in sim {
        let Some(k) = by_index(s.index) else { continue };
        let diff = |what, sim: String, kernel: String| OpDifference {
            index: s.index,
            op: s.op.clone(),
            what,
            sim,
            kernel,
        };
        let is_io_op = ["write", "read", "discard", "flush"].iter().any(|w| s.op.starts_with(w));
        if is_io_op {
            if normalized(&k.outcome) != s.outcome {
                out.push(diff("outcome", s.outcome.clone(), k.outcome.clone()));
            } else if s.outcome == "ok"
                && s.read.as_ref().is_some_and(|r| !same_summary(r, k.read.as_deref().unwrap_or("")))
            {
                out.push(diff(
                    "read",
                    s.read.clone().unwrap_or_default(),
                    k.read.clone().unwrap_or_else(|| "nothing".into()),
                ));
            }
        }
        if let Some(line) = status(s.index) {
            let km = kernel_mode(line).unwrap_or("unknown");
            if !modes_agree(&s.mode, km) {
                if !mode_differs {
                    let nc = if kernel_needs_check(line) { " needs_check" } else { "" };
                    out.push(diff("mode", s.mode.clone(), format!("{km}{nc} ({line})")));
                }
                mode_differs = true;
            } else {
                mode_differs = false;
            }
        }
    }
    out
}

/// The faults the kernel's run fired, per op: `(op, "<disk> <request>
/// sector <s> nr <n>: <what>")` from the agent's `fired.<op>` notes.
pub fn kernel_fired(kernel: &KernelResult) -> Vec<(usize, String)> {
    kernel
        .notes
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("fired.")?.parse().ok()?, v.clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_data_blocks_are_read_from_a_status_line() {
        let line = "0 67/512 28/29 - rw discard_passdown queue_if_no_space - 128 ";
        assert_eq!(kernel_free_data_blocks(line), Some(1));
        assert_eq!(kernel_free_data_blocks("Fail"), None);
        assert_eq!(kernel_free_data_blocks("status failed: EIO"), None);
        assert_eq!(kernel_free_data_blocks("0 67/512 30/29 - rw"), None);
    }

    #[test]
    fn misplaced_stamps_read_as_their_writes() {
        use crate::equivalence::without_stamp_sectors;
        assert_eq!(without_stamp_sectors("w1@s3840*1 w1@s3841*1 w16*39"), "w1*2 w16*39");
        assert!(same_summary("w1*2 w16*39", "w1@s3840*1 w1@s3841*1 w16*39"));
        assert!(!same_summary("w1*3 w16*39", "w1@s3840*1 w1@s3841*1 w16*39"));
        // Both sides say where: the sectors count.
        assert!(!same_summary("w1@s3840*1", "w1@s3841*1"));
    }

    #[test]
    fn modes_read_from_status_lines() {
        assert_eq!(kernel_mode("1 10/45 0/71 - rw discard_passdown queue_if_no_space - 1024"), Some("write"));
        assert_eq!(
            kernel_mode("1 10/45 0/71 - ro discard_passdown queue_if_no_space needs_check 1024"),
            Some("read-only")
        );
        assert!(kernel_needs_check("1 10/45 0/71 - ro discard_passdown queue_if_no_space needs_check 1024"));
        assert_eq!(kernel_mode("Fail"), Some("fail"));
        assert_eq!(kernel_mode("Error"), None);
        assert_eq!(kernel_mode(""), None);
        assert_eq!(kernel_mode("1 2"), None);
    }

    #[test]
    fn differing_outcomes_name_the_op() {
        let op = Op::Read { dev: 0, sector: 0, nr_sectors: 8 };
        let mut mode = "write".to_string();
        let done = Event::Done { bio: 0, dev: 1, result: "EIO".into(), read: None };
        let sim = vec![SimOp::of_events(3, &op, &[done, Event::Mode("read-only".into())], &mut mode)];
        assert_eq!(sim[0].outcome, "EIO");
        assert_eq!(sim[0].mode, "read-only");
        let kernel = KernelResult {
            ops: vec![OpResult { index: 3, outcome: "ok".into(), read: Some("zeroes".into()) }],
            op_status: vec![(3, "1 10/45 0/71 - rw discard_passdown queue_if_no_space - 1024".into())],
            ..KernelResult::default()
        };
        let d = compare_ops(&sim, &kernel);
        assert_eq!(d.len(), 2, "{d:?}");
        assert_eq!(
            d[0].to_string(),
            format!("op 3 `{}`: outcome model EIO kernel ok", dmsim_traces::text::op_to_line(&op))
        );
        assert_eq!(d[1].what, "mode");
    }
}
