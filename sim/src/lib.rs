//! The deterministic executor (not yet built): a seeded scheduler over
//! submitters, worker steps and I/O completions, simulated time, workload
//! generators, the oracle, crash exploration and campaigns.
#![warn(missing_docs)]
