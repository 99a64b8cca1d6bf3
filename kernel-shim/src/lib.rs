//! Replay of dmsim traces against the real dm-thin of a stock kernel.
//!
//! Where the host has no device-mapper (as on the CI machines), the shim
//! boots Debian's `linux-image-amd64` in `qemu-system-x86_64` (TCG, no
//! KVM) with an initramfs it builds itself ([`initramfs`]): the kernel's
//! device-mapper and virtio modules and a static replay agent ([`agent`])
//! as `/init`. The agent speaks the device-mapper ioctl ABI directly
//! ([`dm`]), builds a thin-pool over two virtio disks from the trace
//! header, replays the trace's ops one request at a time, reads every
//! device back as stamps and returns a [`KernelResult`] ([`protocol`])
//! through a third disk; the metadata image the kernel wrote is the fourth
//! disk's file. [`vm`] runs all of it from the host, with cleanup on every
//! path.
//!
//! Entry points: [`KernelShim::prepare`] once, then [`KernelShim::replay`]
//! (one boot for one trace), [`KernelShim::replay_many`] or
//! [`KernelShim::run_jobs`] (many traces and activations per boot), or
//! [`replay_on_kernel`] for a single trace; [`equivalence`] compares the
//! kernel's end state with the serialized simulator's at L1 (stamps and
//! mappings), L2 (thin_dump) and L3 (metadata blocks).
//! [`crash`] rebuilds the kernel's durable disks at every FLUSH/FUA point
//! from a dm-log-writes log ([`logwrites`]) and holds them against the
//! model's; flakey jobs inject write errors through dm-flakey;
//! [`cache_replay`] replays cache campaign traces on dm-cache, judged by
//! the oracle (L1) and held against the serialized simulator (L2, L3).
//! [`ublk`] serves a pool's disks from the agent as controlled disks
//! (a volatile cache and FUA, as `faults::SimDisk`), through the
//! `ublk_drv.ko` that [`ublk_module`] builds for the kernel
//! ([`KernelShim::prepare_with_ublk`], [`Job::Ublk`]); a ublk job cuts
//! the disks' power at a trace's crash ops and rebuilds the pool on what
//! `faults::SimDisk::crash_state` keeps
//! ([`equivalence::simulate_serialized_crashing`],
//! [`equivalence::compare_crashes`]). A cache job can run on three
//! controlled disks too ([`cache_replay::ublk_plan`]): the agent records
//! their durable state at every FLUSH, FUA, status and reload
//! ([`durable`]), and [`cache_crash`] judges those crash states and holds
//! them against the simulator's; [`cache_race`] runs a cache trace as a
//! race on them (requests held at the disks' gates and served in a chosen
//! order) and judges it with the oracle.
//! An engine job ([`Job::Engine`]) runs the userland engine
//! (`dmsim_engine`, the model's pool served over ublk) on the same
//! controlled disks, judged the same way; [`thin_campaign`] runs the thin
//! campaign's traces on the kernel, the engine or both in one boot, the
//! engine then committing where the kernel did
//! ([`protocol::EngineJob::following_kernel`]).
#![warn(missing_docs)]

pub mod agent;
mod agent_fs;
pub mod cache_crash;
pub mod cache_race;
pub mod cache_replay;
pub mod cleanup;
pub mod crash;
pub mod dm;
pub mod durable;
pub mod equivalence;
pub mod error;
pub mod fault_compare;
pub mod initramfs;
pub mod kernel_clock;
pub mod logwrites;
pub mod protocol;
pub mod thin_campaign;
pub mod thin_replay;
pub mod ublk;
pub mod ublk_faults;
pub mod ublk_module;
pub mod vm;

pub use error::ShimError;
pub use protocol::{
    CacheSpec, CacheStep, DeviceContents, FileSync, FileWrite, KernelResult, OpResult, PoolSpec,
};
pub use vm::{CacheData, Job, KernelRun, KernelShim, VmOptions, HUNG_BOOT_NOTE, STALLED_RUN_NOTE};

/// Boots one VM with the default kernel and options and replays `trace`
/// in it (builds the agent and the initramfs first; for many traces, use
/// [`KernelShim::prepare`] once and [`KernelShim::replay`] per trace).
pub fn replay_on_kernel(trace: &dmsim_traces::Trace) -> Result<KernelRun, ShimError> {
    KernelShim::prepare()?.replay(trace)
}
