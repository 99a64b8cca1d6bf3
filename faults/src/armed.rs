//! Armed faults: what fires on a disk request, and the record of what fired.

use std::fmt;

use dmsim_traces::DiskFault;

/// A fault waiting on a [`SimDisk`](crate::SimDisk) for its request.
///
/// It fires on the disk's next request of the matching kind, oldest armed
/// fault first, at most one per request:
///
/// - [`DiskFault::ReadError`] and [`DiskFault::BitFlip`] on the next `read`;
/// - [`DiskFault::WriteError`] and [`DiskFault::Misdirect`] on the next
///   `write`;
/// - flushes are never faulted.
///
/// What firing does:
///
/// - `ReadError`: the read returns `Err(IoError::Failed)`. If permanent, the
///   sectors it touched become bad: every later read or write touching one
///   fails.
/// - `WriteError`: the write fails and nothing of it lands. Permanent as for
///   reads.
/// - `BitFlip { bit }`: the read succeeds, and the returned buffer has bit
///   `bit % (len * 8)` flipped (bit `k` is bit `k % 8` of byte `k / 8`). The
///   disk is unchanged.
/// - `Misdirect { offset }`: the write lands at `sector + offset`, clamped so
///   that it stays inside the disk, and reports success. The volatile-cache
///   bookkeeping follows where it landed.
///
/// A request touching a bad sector fails before any armed fault is looked
/// at, so it does not consume one. Requests out of the disk's range or of
/// zero length never fire a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArmedFault {
    /// The fault.
    pub fault: DiskFault,
}

/// What kind of fault fired (the coverage probes count these).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// A read failed once.
    ReadErrorTransient,
    /// A read failed and its sectors became bad.
    ReadErrorPermanent,
    /// A write failed once.
    WriteErrorTransient,
    /// A write failed and its sectors became bad.
    WriteErrorPermanent,
    /// A read returned one bit flipped.
    BitFlip,
    /// A write landed elsewhere.
    Misdirect,
    /// A request failed because it touched a bad sector.
    BadSectorHit,
}

impl FaultKind {
    /// Every kind, in the order reports list them.
    pub const ALL: [FaultKind; 7] = [
        FaultKind::ReadErrorTransient,
        FaultKind::ReadErrorPermanent,
        FaultKind::WriteErrorTransient,
        FaultKind::WriteErrorPermanent,
        FaultKind::BitFlip,
        FaultKind::Misdirect,
        FaultKind::BadSectorHit,
    ];

    /// A short name.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::ReadErrorTransient => "read-error-transient",
            FaultKind::ReadErrorPermanent => "read-error-permanent",
            FaultKind::WriteErrorTransient => "write-error-transient",
            FaultKind::WriteErrorPermanent => "write-error-permanent",
            FaultKind::BitFlip => "bit-flip",
            FaultKind::Misdirect => "misdirect",
            FaultKind::BadSectorHit => "bad-sector-hit",
        }
    }
}

/// A fault that fired, as [`SimDisk::take_fired`](crate::SimDisk::take_fired)
/// reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FiredFault {
    /// What fired.
    pub kind: FaultKind,
    /// First sector of the request it fired on (where it was sent, for a
    /// misdirected write).
    pub sector: u64,
    /// Length of that request in sectors.
    pub nr_sectors: u64,
    /// For people, e.g. `read-error sector 8 nr 8 permanent`.
    pub description: String,
}

impl fmt::Display for FiredFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.description)
    }
}
