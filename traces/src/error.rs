//! The one error type of the trace decoders ([`crate::text::from_text`],
//! [`crate::binary::from_bytes`]).
//!
//! Every error says where the input went wrong (a 1-based line of a text
//! trace, a byte offset of a binary one) and what was expected there.

use std::fmt;

/// Where in an input a decoding error was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// A 1-based line of a text trace.
    Line(usize),
    /// A 0-based byte offset of a binary trace.
    Offset(usize),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Line(n) => write!(f, "line {n}"),
            Location::Offset(n) => write!(f, "byte offset {n}"),
        }
    }
}

/// Why a trace could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceError {
    /// A line of a text trace is not what the format allows there.
    #[error("line {line}: expected {expected}; found {:?}", clip(text))]
    Text {
        /// 1-based line number.
        line: usize,
        /// The offending line, as it appears in the input (without its
        /// line terminator); empty at the end of the input.
        text: String,
        /// What the format allows at that point.
        expected: String,
    },
    /// The trace names a format version this build cannot read.
    #[error(
        "{at}: unsupported trace format version {} (this build reads version {supported} only)",
        clip(found)
    )]
    UnsupportedVersion {
        /// Where the version was found.
        at: Location,
        /// The version the trace names, as written.
        found: String,
        /// The one version this build reads ([`crate::FORMAT_VERSION`]).
        supported: u32,
    },
    /// A binary trace is truncated, malformed, or has trailing bytes.
    #[error("byte offset {offset}: expected {expected}")]
    Binary {
        /// 0-based offset of the first byte that could not be decoded
        /// (the input's length if it ended too soon).
        offset: usize,
        /// What the format requires at that point.
        expected: String,
    },
}

impl TraceError {
    /// Where in the input the error was found.
    pub fn location(&self) -> Location {
        match self {
            TraceError::Text { line, .. } => Location::Line(*line),
            TraceError::UnsupportedVersion { at, .. } => *at,
            TraceError::Binary { offset, .. } => Location::Offset(*offset),
        }
    }
}

/// The longest piece of input an error message quotes, in characters.
pub const MAX_QUOTED_CHARS: usize = 80;

/// `s` as an error message quotes it: whole when short, otherwise its
/// first [`MAX_QUOTED_CHARS`] characters and how long it really is, so that
/// a megabyte of junk on one line does not end up in the message.
pub fn clip(s: &str) -> String {
    match s.char_indices().nth(MAX_QUOTED_CHARS) {
        None => s.to_string(),
        Some((end, _)) => format!("{}… ({} bytes in all)", &s[..end], s.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_keeps_short_text_and_cuts_long_text() {
        assert_eq!(clip("create_thin"), "create_thin");
        let long = "é".repeat(1 << 20);
        let c = clip(&long);
        assert!(c.starts_with(&"é".repeat(MAX_QUOTED_CHARS)), "{c}");
        assert!(c.ends_with("… (2097152 bytes in all)"), "{c}");
        let e = TraceError::Text { line: 3, text: "x".repeat(1 << 20), expected: "a word".into() };
        assert!(e.to_string().len() < 200, "{}", e.to_string().len());
    }
}
