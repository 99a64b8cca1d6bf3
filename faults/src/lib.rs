//! The storage fault model: a simulated disk with a volatile write cache
//! and the kernel's durability rules, and the crash states it can leave.
//!
//! Today: [`SimDisk`] (acknowledged writes sit in a volatile cache until a
//! flush; FUA writes are durable at once) with a log of every request since
//! a chosen point, and [`crash_image`] that rebuilds what the disk could
//! hold after a power cut at any point of that log — every write flushed
//! before it, plus any subset of the unflushed ones, possibly torn at
//! sector granularity. Every choice comes from the caller's seeded RNG.
//! Still to come (the simulator issue): I/O errors, misdirected writes, bit
//! flips, latency and completion reordering, coverage probes.

#![warn(missing_docs)]

mod disk;

pub use disk::{crash_image, CrashPoint, DiskEvent, SimDisk, TearMode};
