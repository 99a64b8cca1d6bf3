//! The trace schema, version 1: a header that says how to rebuild the run
//! (seed, workload, every setting as a named parameter) and the events of
//! the run in order — the inputs ([`Op`]s) and what was observed.
//!
//! Replaying a trace means running its ops again from its header; the
//! observations it then records must equal the stored ones byte for byte.

use crate::op::Op;

/// The schema version this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// How to rebuild a run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Header {
    /// The seed the run was generated from (its ops are in the trace, so
    /// replay does not need it; it names the run).
    pub seed: u64,
    /// The workload generator's name (`random`, `snapshot-heavy`, …).
    pub workload: String,
    /// Every setting of the run, by name, in a fixed order: geometry, pool
    /// features, fault settings, test-only mutations. The simulator writes
    /// and reads these; the trace only carries them.
    pub params: Vec<(String, String)>,
}

impl Header {
    /// The value of parameter `name`, if present.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// One thing that happened in a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An input: what the scheduler did next.
    Op(Op),
    /// A request finished.
    Done {
        /// The pool's number for the request (in submission order).
        bio: u64,
        /// The thin device id it went to.
        dev: u32,
        /// `ok` or the errno's name (`EIO`, `ENOSPC`, …).
        result: String,
        /// For a read, what came back, summarised by the simulator (runs
        /// of stamps, zeroes, garbage); `None` for other requests.
        read: Option<String>,
    },
    /// An armed fault fired (the disk and a description).
    FaultFired {
        /// Which disk.
        disk: crate::op::DiskId,
        /// What happened, e.g. `read-error sector 8 permanent`.
        what: String,
    },
    /// A crash state was built: how many of each disk's unflushed writes
    /// survived, of how many, and whether one was torn.
    Crashed {
        /// Metadata disk: (kept, unflushed).
        metadata: (u32, u32),
        /// Data disk: (kept, unflushed).
        data: (u32, u32),
        /// Whether a kept write was torn.
        torn: bool,
    },
    /// The pool changed mode (`write`, `out-of-data-space`, `read-only`,
    /// `fail`).
    Mode(String),
    /// A check failed; the run stops here.
    Violation {
        /// Which detector: `oracle`, `checker`, `thin_check`, `pool`
        /// (an unexpected error or a hang), `load` (the pool did not
        /// load after a crash).
        kind: String,
        /// What it said.
        message: String,
    },
}

/// A whole run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Trace {
    /// How to rebuild it.
    pub header: Header,
    /// What happened, in order.
    pub events: Vec<Event>,
}

impl Trace {
    /// The inputs, in order.
    pub fn ops(&self) -> impl Iterator<Item = Op> + '_ {
        self.events.iter().filter_map(|e| match e {
            Event::Op(op) => Some(*op),
            _ => None,
        })
    }

    /// The violation the run ended with, if any: (kind, message).
    pub fn violation(&self) -> Option<(&str, &str)> {
        self.events.iter().rev().find_map(|e| match e {
            Event::Violation { kind, message } => Some((kind.as_str(), message.as_str())),
            _ => None,
        })
    }
}
