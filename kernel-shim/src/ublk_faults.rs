//! Armed faults on the controlled (ublk) disks.
//!
//! A trace's `fault <disk> <kind>` op arms the fault on the controlled
//! disk it names exactly as the simulator arms its `faults::SimDisk`
//! (`SimDisk::arm`): the disk's next request of the matching kind fails,
//! flips a bit or lands elsewhere. The `aim-fault` ops reduce to the same
//! disk-level arming the simulator does (`ThinSim`'s `AimFault`):
//! `commit request=N` is `SimDisk::arm_after_writes(N, transient write
//! error)` on the metadata disk; `abort` is that with `N = 0` and a
//! transient read error armed when the write error fires
//! (`SimDisk::arm_after_write_error`); `passdown` fails the data disk's
//! next discard with `EIO` (the only discards a data disk sees are the
//! pool's passdowns), and survives a power cut as in the simulator.
//!
//! The disk lives in its ublk queue thread; the agent reaches it through a
//! [`DiskControl`] behind a mutex, which the thread drains before it serves
//! each request (in arming order, so the disk's FIFO of armed faults is the
//! simulator's) and into which it records every fault that fired.

use std::fmt;

use dmsim_traces::DiskFault;

/// How a fault is armed on a controlled disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arm {
    /// `SimDisk::arm`: the next request of the fault's kind.
    Next(DiskFault),
    /// `SimDisk::arm_after_writes`: a write fault on the write after the
    /// next `skip` writes.
    AfterWrites {
        /// Writes that pass first.
        skip: usize,
        /// The (write) fault.
        fault: DiskFault,
    },
    /// `SimDisk::arm_after_write_error`: armed when the next armed write
    /// error fires.
    AfterWriteError(DiskFault),
    /// The next discard request fails with `EIO` (`aim-fault passdown`).
    NextDiscard,
}

/// A fault that fired on a controlled disk: on which request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FiredRequest {
    /// The request's kind: `read`, `write`, `write-fua` or `discard`.
    pub request: &'static str,
    /// Its first sector.
    pub sector: u64,
    /// Its length in sectors.
    pub nr_sectors: u32,
    /// What fired (`faults::FiredFault`'s description, or `aimed
    /// passdown discard error`).
    pub what: String,
}

impl fmt::Display for FiredRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} sector {} nr {}: {}", self.request, self.sector, self.nr_sectors, self.what)
    }
}

/// What the agent and a disk's queue thread share: faults to arm (the
/// thread arms them before the next request) and faults that fired (the
/// agent takes them after each op).
#[derive(Debug, Default)]
pub struct DiskControl {
    /// Armed by the agent, not yet handed to the disk.
    pub arms: Vec<Arm>,
    /// Fired and not yet taken by the agent, in order.
    pub fired: Vec<FiredRequest>,
}

/// The arming of a trace's `aim-fault` op: `(metadata arms, data arms)`,
/// as `ThinSim` arms its disks for it.
pub fn aim_arms(aim: dmsim_traces::FaultAim) -> (Vec<Arm>, Vec<Arm>) {
    use dmsim_traces::FaultAim;
    let transient_write = DiskFault::WriteError { permanent: false };
    match aim {
        FaultAim::Commit { request } => {
            (vec![Arm::AfterWrites { skip: request.into(), fault: transient_write }], vec![])
        }
        FaultAim::Abort => (
            vec![
                Arm::AfterWrites { skip: 0, fault: transient_write },
                Arm::AfterWriteError(DiskFault::ReadError { permanent: false }),
            ],
            vec![],
        ),
        FaultAim::Passdown => (vec![], vec![Arm::NextDiscard]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmsim_traces::FaultAim;

    #[test]
    fn aims_arm_as_the_simulator_does() {
        let w = DiskFault::WriteError { permanent: false };
        assert_eq!(
            aim_arms(FaultAim::Commit { request: 2 }),
            (vec![Arm::AfterWrites { skip: 2, fault: w }], vec![])
        );
        let (m, d) = aim_arms(FaultAim::Abort);
        assert_eq!(m.len(), 2);
        assert!(d.is_empty());
        assert_eq!(aim_arms(FaultAim::Passdown), (vec![], vec![Arm::NextDiscard]));
    }
}
