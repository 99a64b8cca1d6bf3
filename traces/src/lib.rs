//! Traces: the versioned record of a run that moves between the simulator,
//! the kernel and the io_uring engine: header, events, stamped payloads,
//! text and binary encodings, the minimizer.
//!
//! - [`stamp`]: the self-describing payload every written sector carries,
//!   so that a read names the exact write whose data came back.
//! - [`op`]: the inputs of a thin-pool run.
//! - [`trace`]: the schema (header, events).
#![warn(missing_docs)]

pub mod op;
pub mod stamp;
pub mod trace;

pub use op::{CrashMode, DiskFault, DiskId, Op};
pub use trace::{Event, Header, Trace, FORMAT_VERSION};
