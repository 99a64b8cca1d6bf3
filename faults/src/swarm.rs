//! Swarm testing of faults: each seed runs with its own fault settings.
//!
//! In the sense of TigerBeetle's (and Groce et al.'s) swarm testing, a
//! campaign does better when every seed enables only some fault kinds, with
//! its own weights, than when every seed mixes all of them thinly: a seed
//! with crashes only reaches deep states that constant I/O errors would cut
//! short, and a seed heavy on metadata errors exercises the failure paths
//! hard. [`FaultSwarm::from_seed`] picks one such setting per seed; the
//! simulator's op generator reads its weights.
//!
//! Misdirected writes and bit flips in data are corruption the target cannot
//! detect (dm-thin has no data checksums, and a misdirected metadata write
//! leaves a stale but well-formed block behind), so `from_seed` leaves them
//! off ([`FaultSwarm::misdirect`] and [`FaultSwarm::data_bit_flip`] are
//! false); [`FaultSwarm::with_corruption`] turns them on for campaigns that
//! want to see what such corruption does. Bit flips in metadata are on:
//! every metadata block carries a checksum.

use dmsim_traces::{CrashMode, DiskFault, DiskId};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A kind of [`DiskFault`], without its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DiskFaultKind {
    /// [`DiskFault::ReadError`].
    ReadError,
    /// [`DiskFault::WriteError`].
    WriteError,
    /// [`DiskFault::BitFlip`].
    BitFlip,
    /// [`DiskFault::Misdirect`].
    Misdirect,
}

impl DiskFaultKind {
    /// Every kind.
    pub const ALL: [DiskFaultKind; 4] = [
        DiskFaultKind::ReadError,
        DiskFaultKind::WriteError,
        DiskFaultKind::BitFlip,
        DiskFaultKind::Misdirect,
    ];

    /// The kind of `fault`.
    pub fn of(fault: &DiskFault) -> DiskFaultKind {
        match fault {
            DiskFault::ReadError { .. } => DiskFaultKind::ReadError,
            DiskFault::WriteError { .. } => DiskFaultKind::WriteError,
            DiskFault::BitFlip { .. } => DiskFaultKind::BitFlip,
            DiskFault::Misdirect { .. } => DiskFaultKind::Misdirect,
        }
    }

    /// The name used in parameters.
    pub fn name(self) -> &'static str {
        match self {
            DiskFaultKind::ReadError => "read-error",
            DiskFaultKind::WriteError => "write-error",
            DiskFaultKind::BitFlip => "bit-flip",
            DiskFaultKind::Misdirect => "misdirect",
        }
    }

    /// The kind called `name`.
    pub fn from_name(name: &str) -> Option<DiskFaultKind> {
        DiskFaultKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// The family a seed's settings were drawn from (a label for reports; the
/// weights are what count).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SwarmProfile {
    /// No faults at all.
    Quiet,
    /// Power cuts only.
    CrashesOnly,
    /// Faults on the metadata disk, perhaps with crashes.
    MetadataErrors,
    /// Failed data I/O and faults on the data disk, perhaps with crashes.
    DataErrors,
    /// Everything at once.
    Everything,
}

impl SwarmProfile {
    /// Every profile.
    pub const ALL: [SwarmProfile; 5] = [
        SwarmProfile::Quiet,
        SwarmProfile::CrashesOnly,
        SwarmProfile::MetadataErrors,
        SwarmProfile::DataErrors,
        SwarmProfile::Everything,
    ];

    /// The name used in parameters.
    pub fn name(self) -> &'static str {
        match self {
            SwarmProfile::Quiet => "quiet",
            SwarmProfile::CrashesOnly => "crashes-only",
            SwarmProfile::MetadataErrors => "metadata-errors",
            SwarmProfile::DataErrors => "data-errors",
            SwarmProfile::Everything => "everything",
        }
    }

    /// The profile called `name`.
    pub fn from_name(name: &str) -> Option<SwarmProfile> {
        SwarmProfile::ALL.into_iter().find(|p| p.name() == name)
    }
}

/// One seed's fault settings.
///
/// Weights are relative to whatever other ops the generator weighs them
/// against; zero turns a kind of op off. The same seed always gives the same
/// settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultSwarm {
    /// The family these settings came from.
    pub profile: SwarmProfile,
    /// Weight of `Op::Crash`.
    pub crash_weight: u32,
    /// The crash modes to choose among (never empty).
    pub crash_modes: Vec<CrashMode>,
    /// Weight of `Op::FailIo` (the simulator fails an in-flight data I/O).
    pub fail_io_weight: u32,
    /// Weight of `Op::Fault` on the metadata disk.
    pub metadata_fault_weight: u32,
    /// Weight of `Op::Fault` on the data disk.
    pub data_fault_weight: u32,
    /// The disk fault kinds that may be armed (further limited by
    /// [`FaultSwarm::misdirect`] and [`FaultSwarm::data_bit_flip`]).
    pub allowed: Vec<DiskFaultKind>,
    /// Chance, in percent, that a read or write error is permanent.
    pub permanent_percent: u32,
    /// Misdirected writes allowed (on either disk). Off in `from_seed`:
    /// undetectable corruption.
    pub misdirect: bool,
    /// Bit flips allowed on the data disk. Off in `from_seed`: dm-thin has
    /// no data checksums, so the flip is undetectable.
    pub data_bit_flip: bool,
    /// Largest distance of a misdirected write, in sectors (at least 1).
    pub max_misdirect: u32,
    /// Chance, in percent, that a flush or a pool message of a thin trace
    /// comes after an aimed fault (`Op::AimFault`: a metadata write error
    /// at the Nth request of the next commit, or at a commit and then at
    /// its abort); a third of it, that a discard to a pool that passes
    /// discards down comes after a passdown aim (its discard to the data
    /// device fails). 0 in [`FaultSwarm::from_seed`] and
    /// [`FaultSwarm::none`]; the thin campaign draws it for its seeds with
    /// metadata faults.
    pub aimed_percent: u32,
}

impl FaultSwarm {
    /// No faults at all.
    pub fn none() -> FaultSwarm {
        FaultSwarm {
            profile: SwarmProfile::Quiet,
            crash_weight: 0,
            crash_modes: CrashMode::ALL.to_vec(),
            fail_io_weight: 0,
            metadata_fault_weight: 0,
            data_fault_weight: 0,
            allowed: Vec::new(),
            permanent_percent: 0,
            misdirect: false,
            data_bit_flip: false,
            max_misdirect: 16,
            aimed_percent: 0,
        }
    }

    /// The settings of `seed`, drawn from a stream of their own (not the one
    /// the workload uses). Roughly: 15% quiet, 25% crashes only, 20%
    /// metadata errors, 20% data errors, 20% everything; within a profile
    /// the weights, crash modes, allowed kinds and permanence vary. Never
    /// misdirected writes or data bit flips.
    pub fn from_seed(seed: u64) -> FaultSwarm {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5357_4152_4d5f_4641);
        let roll = rng.gen_range(0..100);
        let profile = match roll {
            0..15 => SwarmProfile::Quiet,
            15..40 => SwarmProfile::CrashesOnly,
            40..60 => SwarmProfile::MetadataErrors,
            60..80 => SwarmProfile::DataErrors,
            _ => SwarmProfile::Everything,
        };
        let mut s = FaultSwarm { profile, ..FaultSwarm::none() };
        let weight = |rng: &mut ChaCha8Rng| rng.gen_range(1..=8u32);
        // Crashes are what most durability bugs need, and a crash ends an
        // epoch cheaply: weigh them up to a few percent of the ops.
        let crash_weight = |rng: &mut ChaCha8Rng| rng.gen_range(4..=40u32);
        let maybe = |rng: &mut ChaCha8Rng| if rng.gen_bool(0.5) { rng.gen_range(1..=4u32) } else { 0 };
        let modes = |rng: &mut ChaCha8Rng| -> Vec<CrashMode> {
            if rng.gen_bool(0.4) {
                return CrashMode::ALL.to_vec();
            }
            let mut m: Vec<CrashMode> = CrashMode::ALL.into_iter().filter(|_| rng.gen_bool(0.5)).collect();
            if m.is_empty() {
                m.push(CrashMode::ALL[rng.gen_range(0..CrashMode::ALL.len())]);
            }
            m
        };
        let kinds = |rng: &mut ChaCha8Rng, from: &[DiskFaultKind]| -> Vec<DiskFaultKind> {
            let mut k: Vec<DiskFaultKind> = from.iter().copied().filter(|_| rng.gen_bool(0.6)).collect();
            if k.is_empty() {
                k.push(from[rng.gen_range(0..from.len())]);
            }
            k
        };
        let detectable = [DiskFaultKind::ReadError, DiskFaultKind::WriteError, DiskFaultKind::BitFlip];
        match profile {
            SwarmProfile::Quiet => {}
            SwarmProfile::CrashesOnly => {
                s.crash_weight = crash_weight(&mut rng);
                s.crash_modes = modes(&mut rng);
            }
            SwarmProfile::MetadataErrors => {
                s.metadata_fault_weight = weight(&mut rng);
                s.allowed = kinds(&mut rng, &detectable);
                s.crash_weight = maybe(&mut rng);
                s.crash_modes = modes(&mut rng);
            }
            SwarmProfile::DataErrors => {
                s.fail_io_weight = maybe(&mut rng);
                s.data_fault_weight = weight(&mut rng);
                s.allowed = kinds(&mut rng, &detectable[..2]);
                s.crash_weight = maybe(&mut rng);
                s.crash_modes = modes(&mut rng);
            }
            SwarmProfile::Everything => {
                s.crash_weight = crash_weight(&mut rng);
                s.crash_modes = modes(&mut rng);
                s.fail_io_weight = weight(&mut rng);
                s.metadata_fault_weight = weight(&mut rng);
                s.data_fault_weight = weight(&mut rng);
                s.allowed = detectable.to_vec();
            }
        }
        if !s.allowed.is_empty() {
            s.permanent_percent = [0, 10, 50, 100][rng.gen_range(0..4)];
        }
        s
    }

    /// These settings with undetectable corruption switched on: misdirected
    /// writes and data bit flips allowed.
    pub fn with_corruption(mut self) -> FaultSwarm {
        self.misdirect = true;
        self.data_bit_flip = true;
        for k in [DiskFaultKind::BitFlip, DiskFaultKind::Misdirect] {
            if !self.allowed.contains(&k) {
                self.allowed.push(k);
            }
        }
        self
    }

    /// No fault or crash can happen under these settings.
    pub fn is_quiet(&self) -> bool {
        self.crash_weight == 0
            && self.fail_io_weight == 0
            && self.aimed_percent == 0
            && self.fault_choices().is_empty()
    }

    /// Whether `kind` may be armed on `disk` under these settings. These
    /// are a thin pool's settings: never on the cache traces' disks
    /// ([`DiskId::Cache`], [`DiskId::Origin`]).
    pub fn permits(&self, disk: DiskId, kind: DiskFaultKind) -> bool {
        let weight = match disk {
            DiskId::Metadata => self.metadata_fault_weight,
            DiskId::Data => self.data_fault_weight,
            DiskId::Cache | DiskId::Origin => 0,
        };
        weight > 0
            && self.allowed.contains(&kind)
            && match kind {
                DiskFaultKind::Misdirect => self.misdirect,
                DiskFaultKind::BitFlip => disk == DiskId::Metadata || self.data_bit_flip,
                DiskFaultKind::ReadError | DiskFaultKind::WriteError => true,
            }
    }

    /// Every (disk, kind) that may be armed.
    fn fault_choices(&self) -> Vec<(DiskId, DiskFaultKind)> {
        let mut out = Vec::new();
        for disk in [DiskId::Metadata, DiskId::Data] {
            for kind in DiskFaultKind::ALL {
                if self.permits(disk, kind) {
                    out.push((disk, kind));
                }
            }
        }
        out
    }

    /// A fault to arm, drawn from `rng`: a disk in proportion to its fault
    /// weight (among the disks with a permitted kind), then one of the kinds
    /// it permits (evenly), then the fault's parameters. `None` when no
    /// fault is permitted.
    pub fn pick_fault(&self, rng: &mut impl Rng) -> Option<(DiskId, DiskFault)> {
        let choices = self.fault_choices();
        let disks: Vec<(DiskId, u32)> =
            [(DiskId::Metadata, self.metadata_fault_weight), (DiskId::Data, self.data_fault_weight)]
                .into_iter()
                .filter(|&(d, _)| choices.iter().any(|c| c.0 == d))
                .collect();
        let total: u32 = disks.iter().map(|d| d.1).sum();
        if total == 0 {
            return None;
        }
        let mut x = rng.gen_range(0..total);
        let mut disk = disks[0].0;
        for &(d, w) in &disks {
            if x < w {
                disk = d;
                break;
            }
            x -= w;
        }
        let kinds: Vec<DiskFaultKind> = choices.iter().filter(|c| c.0 == disk).map(|c| c.1).collect();
        let kind = kinds[rng.gen_range(0..kinds.len())];
        let fault = match kind {
            DiskFaultKind::ReadError => {
                DiskFault::ReadError { permanent: rng.gen_range(0..100) < self.permanent_percent }
            }
            DiskFaultKind::WriteError => {
                DiskFault::WriteError { permanent: rng.gen_range(0..100) < self.permanent_percent }
            }
            DiskFaultKind::BitFlip => DiskFault::BitFlip { bit: rng.gen() },
            DiskFaultKind::Misdirect => {
                let distance = rng.gen_range(1..=self.max_misdirect.clamp(1, i32::MAX as u32)) as i32;
                DiskFault::Misdirect { offset: if rng.gen_bool(0.5) { distance } else { -distance } }
            }
        };
        Some((disk, fault))
    }

    /// A crash mode, evenly among [`FaultSwarm::crash_modes`].
    pub fn pick_crash_mode(&self, rng: &mut impl Rng) -> CrashMode {
        match self.crash_modes.len() {
            0 => CrashMode::LoseAll,
            n => self.crash_modes[rng.gen_range(0..n)],
        }
    }

    /// The settings as `(key, value)` pairs, in a fixed order, for a trace
    /// header; [`FaultSwarm::from_params`] reads them back.
    pub fn params(&self) -> Vec<(String, String)> {
        let list = |names: Vec<&str>| if names.is_empty() { "none".to_string() } else { names.join(",") };
        [
            ("profile", self.profile.name().to_string()),
            ("crash_weight", self.crash_weight.to_string()),
            ("crash_modes", list(self.crash_modes.iter().map(|m| m.name()).collect())),
            ("fail_io_weight", self.fail_io_weight.to_string()),
            ("metadata_fault_weight", self.metadata_fault_weight.to_string()),
            ("data_fault_weight", self.data_fault_weight.to_string()),
            ("allowed", list(self.allowed.iter().map(|k| k.name()).collect())),
            ("permanent_percent", self.permanent_percent.to_string()),
            ("misdirect", self.misdirect.to_string()),
            ("data_bit_flip", self.data_bit_flip.to_string()),
            ("max_misdirect", self.max_misdirect.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        // Written only when on, so that headers written before aimed
        // faults existed are still what these settings write.
        .chain(
            (self.aimed_percent > 0).then(|| ("aimed_percent".to_string(), self.aimed_percent.to_string())),
        )
        .collect()
    }

    /// Settings from `(key, value)` pairs as [`FaultSwarm::params`] writes
    /// them. Missing keys keep the values of [`FaultSwarm::none`]; an unknown
    /// or repeated key, or a bad value, is an error.
    pub fn from_params(params: &[(String, String)]) -> Result<FaultSwarm, String> {
        let mut s = FaultSwarm::none();
        let mut seen: Vec<&str> = Vec::new();
        for (key, value) in params {
            if seen.contains(&key.as_str()) {
                return Err(format!("fault swarm: {key} given twice"));
            }
            seen.push(key);
            let bad = || format!("fault swarm: bad value {value:?} for {key}");
            let num = || value.parse::<u32>().map_err(|_| bad());
            let flag = || value.parse::<bool>().map_err(|_| bad());
            let items = || value.split(',').filter(|_| value != "none");
            match key.as_str() {
                "profile" => s.profile = SwarmProfile::from_name(value).ok_or_else(bad)?,
                "crash_weight" => s.crash_weight = num()?,
                "crash_modes" => {
                    s.crash_modes =
                        items().map(|n| CrashMode::from_name(n).ok_or_else(bad)).collect::<Result<_, _>>()?
                }
                "fail_io_weight" => s.fail_io_weight = num()?,
                "metadata_fault_weight" => s.metadata_fault_weight = num()?,
                "data_fault_weight" => s.data_fault_weight = num()?,
                "allowed" => {
                    s.allowed = items()
                        .map(|n| DiskFaultKind::from_name(n).ok_or_else(bad))
                        .collect::<Result<_, _>>()?
                }
                "permanent_percent" => {
                    s.permanent_percent = num()?;
                    if s.permanent_percent > 100 {
                        return Err(bad());
                    }
                }
                "aimed_percent" => {
                    s.aimed_percent = num()?;
                    if s.aimed_percent > 100 {
                        return Err(bad());
                    }
                }
                "misdirect" => s.misdirect = flag()?,
                "data_bit_flip" => s.data_bit_flip = flag()?,
                "max_misdirect" => {
                    s.max_misdirect = num()?;
                    if s.max_misdirect == 0 {
                        return Err(bad());
                    }
                }
                _ => return Err(format!("fault swarm: unknown parameter {key}")),
            }
        }
        if s.crash_modes.is_empty() {
            return Err("fault swarm: crash_modes is empty".to_string());
        }
        Ok(s)
    }
}

impl Default for FaultSwarm {
    fn default() -> Self {
        FaultSwarm::none()
    }
}
