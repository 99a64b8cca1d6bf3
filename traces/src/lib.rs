//! Traces: the versioned record of a run that moves between the simulator,
//! the kernel and the io_uring engine (not yet built): header, events,
//! stamped payloads, text and binary encodings, the minimizer, importers.
//!
//! Built so far: [`stamp`], the self-describing payload every written sector
//! carries, so that a read names the exact write whose data came back.
#![warn(missing_docs)]

pub mod stamp;
