//! The userland engine: the model's thin pool on real storage.
//!
//! The maintainer's plan moves dm-thin's slow paths to userland daemons
//! over io_uring and ublk; this crate is where dmsim's model runs as such
//! a daemon. Its first part is [`UringDevice`]: a [`BlockDevice`] over a
//! file or block device opened with `O_DIRECT`, every request an io_uring
//! operation, so that the model's metadata and data go to real storage
//! through the same trait the simulator's disks implement. Its second is
//! [`DataRing`]: the pool's data I/O in flight together on one ring and
//! ended in the ring's completion order; [`settle`] drives a pool so
//! (docs/engine.md). Its third is the server ([`serve`]): the pool on a
//! thread of its own, one ublk device per active thin device ([`ublk`]:
//! kernel 6.1's ABI), pool messages over a control socket
//! ([`EngineClient`]).
//!
//! [`BlockDevice`]: dmsim_model::block_device::BlockDevice

#![warn(missing_docs)]

mod aligned;
mod data_ring;
mod drive;
mod server;
pub mod ublk;
mod uring;

pub use data_ring::{Completed, DataRing, RingStats};
pub use drive::{settle, DriveError};
pub use server::{serve, EngineClient, EngineConfig, EngineMutations};
pub use uring::{EngineError, UringDevice};
