//! The storage fault model: a simulated disk with a volatile write cache
//! and the kernel's durability rules, the crash states it can leave, the
//! faults that can be armed on it, and the per-seed settings and coverage
//! of those faults.
//!
//! - [`SimDisk`]: acknowledged writes sit in a volatile cache until a flush;
//!   FUA writes are durable at once. The disk always knows the writes since
//!   the last flush, and can log every request from a chosen point.
//! - Crash states: [`SimDisk::crash_state`] builds one for a
//!   [`CrashMode`] and seed,
//!   [`SimDisk::crash_states_exhaustive`] every one (bounded), and
//!   [`crash_image`] one at any point of a recorded log ([`CrashOverlay`]:
//!   the same as the blocks it changes, read through an [`OverlayDevice`];
//!   [`JudgedStates`]: a memo of judged states). A crash state is
//!   bytes only: the simulator rebuilds a fresh disk from it, so armed
//!   faults and permanent bad sectors are forgotten across a power cut (a
//!   simplification).
//! - Armed faults ([`SimDisk::arm`], [`ArmedFault`]): read and write
//!   errors, transient or permanent (bad sectors), bit flips on reads,
//!   misdirected writes; [`SimDisk::take_fired`] reports what fired.
//! - [`Image`]: a disk's bytes in shared 4 KiB chunks, copy-on-write: a
//!   clone costs a reference per chunk, a write copies only a shared
//!   chunk it lands in. The disk's two images, its recorded bases and
//!   every crash image are [`Image`]s.
//! - [`FaultCoverage`]: how often each kind of fault fired.
//! - [`FaultSwarm`]: per-seed fault settings (swarm testing).
//!
//! Every choice comes from a ChaCha8 generator seeded by the caller.
//! Still to come: latency and completion reordering.

#![warn(missing_docs)]

mod armed;
mod coverage;
mod crash_state;
mod disk;
mod image;
mod overlay;
mod swarm;

pub use armed::{ArmedFault, FaultKind, FiredFault};
pub use coverage::{FaultCoverage, Probe};
pub use crash_state::CrashSummary;
pub use disk::{crash_image, fnv64, CrashPoint, DiskEvent, PendingKey, PendingWrite, SimDisk, TearMode};
pub use dmsim_traces::{CrashMode, DiskFault, DiskId};
pub use image::{Image, CHUNK};
pub use overlay::{CrashOverlay, DistinctStates, JudgedStates, OverlayDevice, ReadBlocks, OVERLAY_BLOCK};
pub use swarm::{DiskFaultKind, FaultSwarm, SwarmProfile};
