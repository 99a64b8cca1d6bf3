//! Traces: the versioned record of a run that moves between the simulator,
//! the kernel and the io_uring engine (not yet built): header, events,
//! stamped payloads, text and binary encodings, the minimizer, importers.
#![warn(missing_docs)]
