//! The deterministic executor.
//!
//! Today: the metadata crash campaign ([`campaign`]) — seeded workloads of
//! pool metadata operations on a simulated disk, with every commit's crash
//! states rebuilt and judged. Still to come (the simulator issue): the
//! scheduler over submitters, worker steps and I/O completions, simulated
//! time, the thin target's workloads, the oracle, traces and minimization.

#![warn(missing_docs)]

pub mod campaign;
pub mod workload;
