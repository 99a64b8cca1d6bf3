//! The deterministic executor.
//!
//! Today: the metadata crash campaign ([`campaign`]) — seeded workloads of
//! pool metadata operations on a simulated disk, with every commit's crash
//! states rebuilt and judged; and the [`oracle`], the reference of what reads
//! of thin devices may return. Still to come (the simulator issue): the
//! scheduler over submitters, worker steps and I/O completions, simulated
//! time, the thin target's workloads, traces and minimization.

#![warn(missing_docs)]

pub mod campaign;
pub mod oracle;
pub mod thin;
pub mod workload;

/// The README, so that its Rust code blocks (the thin target walkthrough)
/// run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
