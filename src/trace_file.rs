//! Reading and writing trace files: text (the default) or binary, told
//! apart by the binary encoding's magic bytes when reading, and by
//! `--binary` or a `.bin` extension when writing.

use std::path::Path;

use dmsim_traces::binary::{from_bytes, to_bytes, MAGIC};
use dmsim_traces::text::{from_text, to_text};
use dmsim_traces::Trace;

/// The encoding of a trace file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// The line-oriented text encoding.
    Text,
    /// The compact binary encoding.
    Binary,
}

impl Encoding {
    /// The encoding to write `path` in: binary when asked for or when the
    /// file name ends in `.bin`, text otherwise.
    pub fn for_output(path: &Path, binary: bool) -> Encoding {
        if binary || path.extension().is_some_and(|e| e.eq_ignore_ascii_case("bin")) {
            Encoding::Binary
        } else {
            Encoding::Text
        }
    }
}

/// Decodes a trace held in memory, whichever its encoding; the error says
/// where the input went wrong.
pub fn decode(bytes: &[u8]) -> Result<(Trace, Encoding), String> {
    if bytes.starts_with(&MAGIC) {
        return from_bytes(bytes).map(|t| (t, Encoding::Binary)).map_err(|e| format!("binary trace: {e}"));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        format!(
            "not a trace: neither the binary magic nor UTF-8 text (invalid byte at offset {})",
            e.valid_up_to()
        )
    })?;
    from_text(text).map(|t| (t, Encoding::Text)).map_err(|e| e.to_string())
}

/// Reads and decodes the trace file at `path`; the error names the file.
pub fn read(path: &Path) -> Result<(Trace, Encoding), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    decode(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// Encodes `trace`.
pub fn encode(trace: &Trace, encoding: Encoding) -> Vec<u8> {
    match encoding {
        Encoding::Text => to_text(trace).into_bytes(),
        Encoding::Binary => to_bytes(trace),
    }
}

/// Writes `trace` to `path` in `encoding`; the error names the file.
pub fn write(path: &Path, trace: &Trace, encoding: Encoding) -> Result<(), String> {
    std::fs::write(path, encode(trace, encoding)).map_err(|e| format!("cannot write {}: {e}", path.display()))
}
