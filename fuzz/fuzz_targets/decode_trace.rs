//! Fuzz the trace decoders with arbitrary input: `from_bytes` and
//! `from_text` must never panic, and whatever they accept must encode back
//! to an equal trace (the binary decoder accepts canonical input only, so
//! its re-encoding must be the very same bytes). `file::decode`, what the
//! CLI reads trace files with, must never panic either, and its errors
//! quote only a clipped piece of the input.
//!
//! Run: `cargo fuzz run -s none decode_trace` from the repository root
//! (`cargo +nightly fuzz run decode_trace` adds AddressSanitizer).

#![no_main]

use dmsim_traces::{from_bytes, from_text, to_bytes, to_text};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = dmsim_traces::file::decode(data) {
        assert!(e.len() < 4096, "an error of {} bytes", e.len());
    }
    if let Ok(trace) = from_bytes(data) {
        assert_eq!(to_bytes(&trace), data);
        assert_eq!(from_text(&to_text(&trace)).as_ref(), Ok(&trace));
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(trace) = from_text(s) {
            assert_eq!(from_text(&to_text(&trace)).as_ref(), Ok(&trace));
            assert_eq!(from_bytes(&to_bytes(&trace)).as_ref(), Ok(&trace));
        }
    }
});
