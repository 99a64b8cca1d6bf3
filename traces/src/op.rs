//! The inputs of a thin-pool run: every decision the simulator's scheduler
//! (or a test, or a person editing a trace) makes, one [`Op`] at a time.
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

/// Which simulated disk a fault is armed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DiskId {
    /// The pool's metadata device.
    Metadata,
    /// The pool's data device.
    Data,
}

impl DiskId {
    /// The name used in text traces.
    pub fn name(self) -> &'static str {
        match self {
            DiskId::Metadata => "metadata",
            DiskId::Data => "data",
        }
    }

    /// The disk called `name` in text traces.
    pub fn from_name(name: &str) -> Option<DiskId> {
        [DiskId::Metadata, DiskId::Data].into_iter().find(|d| d.name() == name)
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

/// One input of a thin-pool run.
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
}

impl Op {
    /// A crash that keeps only durable data (the simplest crash state).
    pub const CRASH: Op = Op::Crash { mode: CrashMode::LoseAll, seed: 0 };
}
