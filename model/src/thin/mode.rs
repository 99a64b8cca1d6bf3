//! The pool's operating modes (spec §3.9), ordered from healthy to failed.

use std::fmt;

/// A pool mode. The order matters: the kernel only ever degrades along it
/// except for the transitions back to [`PoolMode::Write`] described in §3.9.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PoolMode {
    /// Normal operation: provisioning, sharing breaks, discards, commits.
    Write,
    /// No free data blocks: bios that need a new block are queued (or errored
    /// with ENOSPC under `error_if_no_space`); everything else works.
    OutOfDataSpace,
    /// No free metadata blocks: no metadata changes; reads and writes to
    /// mapped, unshared blocks still work.
    OutOfMetadataSpace,
    /// Metadata is read-only (table feature or a metadata failure).
    ReadOnly,
    /// Everything fails with EIO.
    Fail,
}

impl PoolMode {
    /// The word the INFO status line prints for the mode (FAIL prints the
    /// whole line as `Fail`, so its word is never used).
    pub fn status_word(self) -> &'static str {
        match self {
            PoolMode::Write => "rw",
            PoolMode::OutOfDataSpace => "out_of_data_space",
            PoolMode::OutOfMetadataSpace | PoolMode::ReadOnly => "ro",
            PoolMode::Fail => "Fail",
        }
    }

    /// Whether metadata may change (messages, provisioning, commits).
    pub fn allows_metadata_changes(self) -> bool {
        matches!(self, PoolMode::Write | PoolMode::OutOfDataSpace)
    }
}

impl fmt::Display for PoolMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PoolMode::Write => "write",
            PoolMode::OutOfDataSpace => "out-of-data-space",
            PoolMode::OutOfMetadataSpace => "out-of-metadata-space",
            PoolMode::ReadOnly => "read-only",
            PoolMode::Fail => "fail",
        })
    }
}
