//! The deterministic executor.
//!
//! Today: the metadata crash campaign ([`campaign`]) — seeded workloads of
//! pool metadata operations on a simulated disk, with every commit's crash
//! states rebuilt and judged; the [`oracle`], the reference of what reads of
//! thin devices may return; and [`thin`], which drives the thin target step
//! by step (requests, worker passes, data I/O completions in any order,
//! simulated time, crashes, injected faults) with the oracle judging every
//! read and everything recorded as a trace; [`run`], one seed of the thin
//! campaign (workload, pool shape and fault swarm from the seed), replay
//! and minimization of traces; [`generate`], the workload generators;
//! [`cache_campaign`], the cache metadata crash campaign, with its
//! workloads ([`cache_workload`]) and its verdict on an image
//! ([`cache_check`]); [`cache_sim`], which drives the cache target (its
//! I/O paths, migrations, reloads, crashes) under the oracle, and
//! [`cache_run`], one seed of the cache campaign, replay and minimization
//! of cache traces; [`probes`], the rare states a thin run reached, added
//! up over a campaign's seeds; [`fuzz`], the fuzz target's entry point:
//! bytes in, a whole thin or cache run and its trace out.

#![warn(missing_docs)]

pub mod cache_campaign;
pub mod cache_check;
pub mod cache_concurrency;
pub mod cache_run;
pub mod cache_sim;
pub mod cache_workload;
pub mod campaign;
mod completion;
pub use completion::quiet_caught_panics;
pub mod concurrency;
pub mod fuzz;
pub mod generate;
pub mod header_params;
pub mod oracle;
pub mod probes;
pub mod run;
pub mod thin;
pub mod workload;

/// The walkthrough page (docs/library.md), so that its Rust code blocks
/// run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../docs/library.md")]
pub struct ReadmeDoctests;
