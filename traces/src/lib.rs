//! Traces: the versioned record of a run that moves between the simulator,
//! the kernel and the io_uring engine: header, events, stamped payloads,
//! text and binary encodings, the minimizer.
//!
//! - [`stamp`]: the self-describing payload every written sector carries,
//!   so that a read names the exact write whose data came back.
//! - [`op`]: the inputs of a thin-pool or cache run.
//! - [`trace`]: the schema (header, events).
//! - [`text`]: the text encoding (one event per line; the format's
//!   reference is that module's documentation).
//! - [`binary`]: the compact binary encoding.
//! - [`error`]: [`TraceError`], what the decoders report.
//! - [`file`]: trace files, read within a size cap from regular files
//!   only, written atomically.
//! - [`minimize`]: delta debugging and op simplification, to shrink a
//!   failing run.
#![warn(missing_docs)]

pub mod binary;
pub mod error;
pub mod file;
pub mod minimize;
pub mod op;
pub mod stamp;
pub mod text;
pub mod trace;

pub use binary::{from_bytes, to_bytes};
pub use error::{Location, TraceError};
pub use minimize::{ddmin, simpler_ops, simplify_each, Stats};
pub use op::{CacheIoMode, CachePolicyKind, CrashMode, DiskFault, DiskId, FaultAim, Op};
pub use text::{from_text, to_text};
pub use trace::{Event, Header, Trace, FORMAT_VERSION};
