//! The inputs of a thin-pool or cache run: every decision the simulator's
//! scheduler (or a test, or a person editing a trace) makes, one [`Op`] at
//! a time.
//!
//! Thin traces and cache traces share the schema. Most ops mean the same in
//! both; [`Op::Reload`], [`Op::Resize`], [`Op::Invalidate`] and
//! [`Op::Status`] belong to cache traces only, and so do the disks
//! [`DiskId::Cache`] and
//! [`DiskId::Origin`] (a thin replay rejects them with an error);
//! [`Op::GrowMetadata`] and the ops that make, snapshot and delete thin
//! devices belong to thin traces only (a cache run rejects them).
//!
//! Ops are written so that any sequence is meaningful: devices are picked
//! by index modulo the live devices, positions modulo the device size, the
//! I/O to complete or fail modulo what is in flight. The minimizer can
//! therefore drop any op and the rest still replays.

/// How a power cut treats the writes a disk acknowledged but never
/// flushed (its volatile cache). Decisions inside a mode come from the
/// crash's own seed, so a recorded crash replays exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CrashMode {
    /// Every unflushed write is lost: only the durable image survives.
    LoseAll,
    /// Every unflushed write reached the disk.
    KeepAll,
    /// The writes reached the disk in order, up to a point.
    Prefix,
    /// Any subset of the unflushed writes reached the disk.
    Subset,
    /// A subset, and one of the kept writes reached it only in part (whole
    /// sectors of it).
    Torn,
}

impl CrashMode {
    /// Every mode, simplest first (the minimizer tries them in this order).
    pub const ALL: [CrashMode; 5] =
        [CrashMode::LoseAll, CrashMode::KeepAll, CrashMode::Prefix, CrashMode::Subset, CrashMode::Torn];

    /// The name used in text traces.
    pub fn name(self) -> &'static str {
        match self {
            CrashMode::LoseAll => "lose-all",
            CrashMode::KeepAll => "keep-all",
            CrashMode::Prefix => "prefix",
            CrashMode::Subset => "subset",
            CrashMode::Torn => "torn",
        }
    }

    /// The mode called `name` in text traces.
    pub fn from_name(name: &str) -> Option<CrashMode> {
        CrashMode::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// Which simulated disk a fault is armed on. Thin traces use
/// [`Metadata`](DiskId::Metadata) and [`Data`](DiskId::Data); cache traces
/// use [`Metadata`](DiskId::Metadata), [`Cache`](DiskId::Cache) and
/// [`Origin`](DiskId::Origin).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DiskId {
    /// The pool's (or the cache target's) metadata device.
    Metadata,
    /// The pool's data device (thin traces only).
    Data,
    /// The cache target's fast device, which holds the cache blocks (cache
    /// traces only).
    Cache,
    /// The cache target's origin, the slow device it caches (cache traces
    /// only).
    Origin,
}

impl DiskId {
    /// Every disk, in the order of their binary encoding.
    pub const ALL: [DiskId; 4] = [DiskId::Metadata, DiskId::Data, DiskId::Cache, DiskId::Origin];

    /// The name used in text traces.
    pub fn name(self) -> &'static str {
        match self {
            DiskId::Metadata => "metadata",
            DiskId::Data => "data",
            DiskId::Cache => "cache",
            DiskId::Origin => "origin",
        }
    }

    /// The disk called `name` in text traces.
    pub fn from_name(name: &str) -> Option<DiskId> {
        DiskId::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Whether the disk belongs to a thin pool ([`Metadata`](DiskId::Metadata)
    /// or [`Data`](DiskId::Data)); the others exist in cache traces only.
    pub fn is_thin(self) -> bool {
        matches!(self, DiskId::Metadata | DiskId::Data)
    }
}

/// The I/O mode of a cache target (its table's feature argument).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CacheIoMode {
    /// Writes go to the cache only and are written back to the origin
    /// later (the cache holds dirty blocks).
    Writeback,
    /// Writes go to the origin and to the cache (no dirty blocks).
    Writethrough,
    /// Every I/O goes to the origin; cached blocks are invalidated on
    /// write (requires a clean cache).
    Passthrough,
}

impl CacheIoMode {
    /// Every mode, in the order of their binary encoding (the minimizer
    /// tries earlier ones first).
    pub const ALL: [CacheIoMode; 3] =
        [CacheIoMode::Writeback, CacheIoMode::Writethrough, CacheIoMode::Passthrough];

    /// The name used in text traces (and in the kernel's table line).
    pub fn name(self) -> &'static str {
        match self {
            CacheIoMode::Writeback => "writeback",
            CacheIoMode::Writethrough => "writethrough",
            CacheIoMode::Passthrough => "passthrough",
        }
    }

    /// The mode called `name` in text traces.
    pub fn from_name(name: &str) -> Option<CacheIoMode> {
        CacheIoMode::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// The replacement policy a cache target is loaded with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CachePolicyKind {
    /// The stochastic multiqueue policy (the kernel's default).
    Smq,
    /// The cleaner policy: writes every dirty block back and promotes
    /// nothing.
    Cleaner,
}

impl CachePolicyKind {
    /// Every policy, in the order of their binary encoding (the minimizer
    /// tries earlier ones first).
    pub const ALL: [CachePolicyKind; 2] = [CachePolicyKind::Smq, CachePolicyKind::Cleaner];

    /// The name used in text traces (and in the kernel's table line).
    pub fn name(self) -> &'static str {
        match self {
            CachePolicyKind::Smq => "smq",
            CachePolicyKind::Cleaner => "cleaner",
        }
    }

    /// The policy called `name` in text traces.
    pub fn from_name(name: &str) -> Option<CachePolicyKind> {
        CachePolicyKind::ALL.into_iter().find(|p| p.name() == name)
    }
}

/// A fault armed on a simulated disk. It fires on the disk's next request
/// of the matching kind (see `dmsim_faults::ArmedFault`), so a recorded
/// fault replays exactly and survives the removal of unrelated ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DiskFault {
    /// The next read fails with EIO. Permanent: the sectors it touched
    /// keep failing reads and writes from then on.
    ReadError {
        /// Bad sectors stay bad.
        permanent: bool,
    },
    /// The next write fails with EIO (nothing of it lands). Permanent as
    /// for reads.
    WriteError {
        /// Bad sectors stay bad.
        permanent: bool,
    },
    /// The next read returns its data with one bit flipped (the disk is
    /// not changed).
    BitFlip {
        /// Which bit of the returned buffer, modulo its length in bits.
        bit: u32,
    },
    /// The next write lands `offset` sectors away from where it was sent
    /// (clamped to the disk), and reports success.
    Misdirect {
        /// Signed distance in sectors.
        offset: i32,
    },
}

/// Where an aimed fault ([`Op::AimFault`]) strikes: at a window of the
/// pool's metadata handling, or between a passdown discard's two passes,
/// rather than at the next request of a kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultAim {
    /// The metadata disk's write `request` writes from now fails
    /// (transiently). The pool writes metadata only when it commits, so
    /// this is the request-th write of the next commit (or of a later one,
    /// when the next writes fewer blocks).
    Commit {
        /// Writes that pass first (0: the commit's first write fails).
        request: u8,
    },
    /// The next commit's first metadata write fails, and so does the first
    /// metadata read after it: the abort that follows the failed commit,
    /// which rereads the superblock, fails too (the pool must then go to
    /// fail mode).
    Abort,
    /// The next passdown discard to the data device to complete (pass one
    /// of a discard, before pass two) fails with EIO instead, even across
    /// a crash. Kernel 6.1 ignores the error (`passdown_endio`): pass two
    /// runs and the user's discard succeeds.
    Passdown,
}

impl FaultAim {
    /// The aim's name in the text format (`commit`, `abort`, `passdown`).
    pub fn name(self) -> &'static str {
        match self {
            FaultAim::Commit { .. } => "commit",
            FaultAim::Abort => "abort",
            FaultAim::Passdown => "passdown",
        }
    }
}

/// One input of a thin-pool or cache run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Write `nr_sectors` (at least 1) at `sector` of a device.
    Write {
        /// Index into the live devices.
        dev: u8,
        /// First sector (modulo the device size).
        sector: u32,
        /// Length (clamped to the device end).
        nr_sectors: u16,
        /// REQ_FUA.
        fua: bool,
        /// REQ_PREFLUSH.
        preflush: bool,
    },
    /// Read a range of a device.
    Read {
        /// Index into the live devices.
        dev: u8,
        /// First sector.
        sector: u32,
        /// Length.
        nr_sectors: u16,
    },
    /// Discard a range of a device.
    Discard {
        /// Index into the live devices.
        dev: u8,
        /// First sector.
        sector: u32,
        /// Length.
        nr_sectors: u32,
    },
    /// An empty flush to a device.
    Flush {
        /// Index into the live devices.
        dev: u8,
    },
    /// `create_thin` with the next id, then activate it.
    CreateThin,
    /// Quiesce, then `create_snap` of a live device with the next id.
    CreateSnap {
        /// Index into the live devices.
        origin: u8,
    },
    /// Quiesce, deactivate and `delete` a device.
    Delete {
        /// Index into the live devices.
        dev: u8,
    },
    /// One worker pass.
    Worker,
    /// Complete one in-flight data I/O (index modulo the number in flight).
    Complete {
        /// Which one.
        pick: u8,
    },
    /// Fail one in-flight data I/O with EIO (index modulo the number in
    /// flight): a transient error of the data device.
    FailIo {
        /// Which one.
        pick: u8,
    },
    /// Arm a fault on one of the pool's disks.
    Fault {
        /// Which disk.
        disk: DiskId,
        /// What happens to its next matching request.
        fault: DiskFault,
    },
    /// Advance simulated time.
    Tick {
        /// By this many milliseconds.
        millis: u16,
    },
    /// Power cut, then recovery: both disks keep their durable image plus
    /// what `mode` and `seed` choose of their volatile caches; the pool is
    /// reloaded on that state and the devices reactivated.
    Crash {
        /// How the volatile caches fare.
        mode: CrashMode,
        /// Seed of the choices within the mode.
        seed: u32,
    },
    /// Cache traces only: suspend the cache (its clean shutdown), load a
    /// table with this mode and policy on the same devices, and resume.
    Reload {
        /// The I/O mode of the new table.
        mode: CacheIoMode,
        /// The policy of the new table.
        policy: CachePolicyKind,
    },
    /// Cache traces only: the `invalidate_cblocks` message for the cache
    /// blocks `cblock..cblock + nr`.
    Invalidate {
        /// First cache block (modulo the cache size).
        cblock: u32,
        /// How many blocks; meant to be at least 1 (the codecs accept any
        /// value, as for the lengths of other ops, and the simulator reads
        /// 0 as 1).
        nr: u16,
    },
    /// Cache traces only: an INFO status query (in the kernel it commits
    /// as a side effect).
    Status,
    /// Cache traces only: suspend the cache (its clean shutdown), present
    /// the cache device with `cache_blocks` blocks and the origin with
    /// `origin_blocks` (the table's length), load the table in use on them
    /// and resume. The kernel resizes the metadata at preresume: a shrink
    /// over dirty blocks is refused. The simulator keeps both sizes within
    /// its bounds (at least one block, at most its largest disk).
    Resize {
        /// Cache blocks of the cache device (in the table's block size).
        cache_blocks: u32,
        /// Origin blocks the table covers.
        origin_blocks: u32,
    },
    /// Thin traces only: what an administrator does when the pool runs
    /// short of metadata space. Suspend the pool (after its data I/O
    /// completes), grow the metadata device by `blocks` 4 KiB blocks, and
    /// resume it, with its table loaded again (`reload`) or as it is: the
    /// kernel grows the metadata space map at preresume; a new table's
    /// mode applies, a resume without one keeps the pool's mode (see
    /// `docs/campaign.md`). Zero blocks is a suspend and resume (or a
    /// reload) on the same device. The simulator keeps the device within
    /// its largest disk.
    GrowMetadata {
        /// 4 KiB blocks added to the metadata device.
        blocks: u32,
        /// Load the pool's table again before the resume.
        reload: bool,
    },
    /// Thin traces only: arm a fault aimed at a window of the pool's
    /// metadata handling or of a discard's two passes (see [`FaultAim`]); the campaign's swarm draws
    /// these beside the faults of [`Op::Fault`].
    AimFault {
        /// The window.
        aim: FaultAim,
    },
}

impl Op {
    /// A crash that keeps only durable data (the simplest crash state).
    pub const CRASH: Op = Op::Crash { mode: CrashMode::LoseAll, seed: 0 };

    /// The op's name: the first word of its text line (`write`, `crash`,
    /// `reload`, …).
    pub fn name(&self) -> &'static str {
        match self {
            Op::Write { .. } => "write",
            Op::Read { .. } => "read",
            Op::Discard { .. } => "discard",
            Op::Flush { .. } => "flush",
            Op::CreateThin => "create-thin",
            Op::CreateSnap { .. } => "create-snap",
            Op::Delete { .. } => "delete",
            Op::Worker => "worker",
            Op::Complete { .. } => "complete",
            Op::FailIo { .. } => "fail-io",
            Op::Fault { .. } => "fault",
            Op::Tick { .. } => "tick",
            Op::Crash { .. } => "crash",
            Op::Reload { .. } => "reload",
            Op::Invalidate { .. } => "invalidate",
            Op::Status => "status",
            Op::Resize { .. } => "resize",
            Op::GrowMetadata { .. } => "grow-metadata",
            Op::AimFault { .. } => "aim-fault",
        }
    }

    /// Whether the op belongs to cache traces only ([`Op::Reload`],
    /// [`Op::Resize`], [`Op::Invalidate`], [`Op::Status`]).
    pub fn is_cache_only(&self) -> bool {
        matches!(self, Op::Reload { .. } | Op::Resize { .. } | Op::Invalidate { .. } | Op::Status)
    }

    /// Whether the op belongs to thin traces only ([`Op::CreateThin`],
    /// [`Op::CreateSnap`], [`Op::Delete`], [`Op::GrowMetadata`],
    /// [`Op::AimFault`]).
    pub fn is_thin_only(&self) -> bool {
        matches!(
            self,
            Op::CreateThin
                | Op::CreateSnap { .. }
                | Op::Delete { .. }
                | Op::GrowMetadata { .. }
                | Op::AimFault { .. }
        )
    }

    /// Why a thin run cannot take this op, if it cannot: a cache-only op,
    /// or a fault on a disk the pool does not have. `None` for every op a
    /// thin trace may hold.
    pub fn thin_error(&self) -> Option<String> {
        match self {
            op if op.is_cache_only() => {
                Some(format!("op `{}` belongs to cache traces; this is a thin trace", op.name()))
            }
            Op::Fault { disk, .. } if !disk.is_thin() => Some(format!(
                "disk `{}` belongs to cache traces; this is a thin trace (its disks are `metadata` and `data`)",
                disk.name()
            )),
            _ => None,
        }
    }
}
