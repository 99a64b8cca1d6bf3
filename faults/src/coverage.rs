//! Coverage probes: how often each fault kind actually fired in a run.
//!
//! A campaign that arms faults but never sees them fire tests nothing; the
//! probes make that visible. Counts add up across seeds with
//! [`FaultCoverage::add`] and list in a fixed order.

use std::fmt;

use dmsim_traces::CrashMode;

use crate::armed::{FaultKind, FiredFault};
use crate::crash_state::CrashSummary;

/// One thing the coverage counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Probe {
    /// A disk fault of this kind fired (see [`FiredFault`]).
    Fired(FaultKind),
    /// A data I/O was failed by the simulator itself (the `FailIo` op).
    FailedIo,
    /// A crash state of this mode was built.
    Crash(CrashMode),
    /// A crash state actually tore a write.
    Torn,
}

impl Probe {
    /// Every probe, in report order.
    pub const ALL: [Probe; 14] = [
        Probe::Fired(FaultKind::ReadErrorTransient),
        Probe::Fired(FaultKind::ReadErrorPermanent),
        Probe::Fired(FaultKind::WriteErrorTransient),
        Probe::Fired(FaultKind::WriteErrorPermanent),
        Probe::Fired(FaultKind::BitFlip),
        Probe::Fired(FaultKind::Misdirect),
        Probe::Fired(FaultKind::BadSectorHit),
        Probe::FailedIo,
        Probe::Crash(CrashMode::LoseAll),
        Probe::Crash(CrashMode::KeepAll),
        Probe::Crash(CrashMode::Prefix),
        Probe::Crash(CrashMode::Subset),
        Probe::Crash(CrashMode::Torn),
        Probe::Torn,
    ];

    /// The probe's name in reports, e.g. `write-error-permanent` or
    /// `crash-prefix`.
    pub fn name(self) -> &'static str {
        match self {
            Probe::Fired(kind) => kind.name(),
            Probe::FailedIo => "failed-io",
            Probe::Crash(CrashMode::LoseAll) => "crash-lose-all",
            Probe::Crash(CrashMode::KeepAll) => "crash-keep-all",
            Probe::Crash(CrashMode::Prefix) => "crash-prefix",
            Probe::Crash(CrashMode::Subset) => "crash-subset",
            Probe::Crash(CrashMode::Torn) => "crash-torn",
            Probe::Torn => "torn-write",
        }
    }

    fn index(self) -> usize {
        Probe::ALL.iter().position(|&p| p == self).expect("every probe is listed in ALL")
    }
}

/// How often each fault kind fired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultCoverage {
    counts: [u64; Probe::ALL.len()],
}

impl FaultCoverage {
    /// No fault seen yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one occurrence of `probe`.
    pub fn record(&mut self, probe: Probe) {
        self.counts[probe.index()] += 1;
    }

    /// Counts a fault that fired on a disk.
    pub fn record_fired(&mut self, fired: &FiredFault) {
        self.record(Probe::Fired(fired.kind));
    }

    /// Counts every fault in `fired`.
    pub fn record_all_fired(&mut self, fired: &[FiredFault]) {
        fired.iter().for_each(|f| self.record_fired(f));
    }

    /// Counts a data I/O failed by the simulator.
    pub fn record_failed_io(&mut self) {
        self.record(Probe::FailedIo);
    }

    /// Counts a crash state built in `mode`, and a torn write if it tore
    /// one.
    pub fn record_crash(&mut self, mode: CrashMode, summary: &CrashSummary) {
        self.record(Probe::Crash(mode));
        if summary.torn {
            self.record(Probe::Torn);
        }
    }

    /// How often `probe` was seen.
    pub fn get(&self, probe: Probe) -> u64 {
        self.counts[probe.index()]
    }

    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &FaultCoverage) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
    }

    /// Every probe with its name and count, in the fixed order of
    /// [`Probe::ALL`] (zero counts included).
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Probe::ALL.iter().zip(self.counts.iter()).map(|(p, &c)| (p.name(), c))
    }

    /// The probes never seen, in order.
    pub fn unseen(&self) -> Vec<&'static str> {
        self.iter().filter(|&(_, c)| c == 0).map(|(n, _)| n).collect()
    }

    /// Sum of every count.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
}

impl fmt::Display for FaultCoverage {
    /// One `name  count` line per probe, in the fixed order.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, count) in self.iter() {
            writeln!(f, "  {name:<24}{count:>10}")?;
        }
        Ok(())
    }
}
