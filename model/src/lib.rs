//! The targets' logic: persistent-data in the kernel's on-disk format, the
//! dm-thin pool metadata and target, and the dm-cache metadata.
//!
//! This crate is pure: it has no threads, no clock and no randomness of its
//! own, and it reaches storage only through [`block_device::BlockDevice`].
//! Everything that varies between runs — timing, faults, crash points — is
//! decided by the caller (the simulator, a test, the kernel shim).

#![warn(missing_docs)]

pub mod block_device;
pub mod cache;
pub mod deferred_set;
pub mod errno;
pub mod mutation;
pub mod pdata;
pub mod prison;
pub mod prison_v2;
pub mod probes;
pub mod sync;
pub mod thin;
pub mod timer_wheel;
