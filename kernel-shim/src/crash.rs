//! Real crash states: the kernel's durable disks at every FLUSH/FUA point
//! of a trace, rebuilt from a dm-log-writes log, held against the model's
//! durable disks at the same point.
//!
//! A [`crate::Job::Logged`] run puts the pool's metadata and data devices
//! on one dm-log-writes device (so its log orders the writes of both) and
//! drops a mark `op<i>` into the log after every op `i`. dm-log-writes
//! logs a write only once it is durable (a FUA write on completion, any
//! other write just before the FLUSH entry that covered it, spec §7.2), and
//! a mark lands behind everything logged so far: replaying the log up to
//! the mark `op<i>` onto the devices' initial content (metadata zeroed,
//! data full of [`crate::vm::DATA_FILL`]) gives what the kernel's disks
//! held durably right after op `i` ([`kernel_crash_states`]): what a power
//! cut that loses every volatile cache would leave.
//!
//! The model's crash state at the same point is the serialized simulator's
//! (as in [`crate::equivalence`]) after op `i`: the durable images of its
//! two simulated disks ([`model_crash_states`]).
//!
//! Each state is then judged ([`judge`]): the model's checker on the
//! metadata (leaks allowed, as after any crash), and every thin device of
//! the committed metadata read through a pool the model opens on the two
//! images ([`read_through_pool`]). Two states *match* when they read the
//! same at L1 ([`crate::equivalence::compare_l1`]): the same devices, the
//! same stamps in every block, the same mapped blocks.
//!
//! Points: the ops after which something must be durable — a flush, a FUA
//! write, a PREFLUSH write ([`is_durability_point`]).

use std::collections::BTreeSet;

use dmsim_model::block_device::MemDevice;
use dmsim_model::thin::check::{check_thin_metadata, CheckOptions, Severity, Structure};
use dmsim_model::thin::pool::{BioRequest, Pool, PoolOptions};
use dmsim_model::thin::table::PoolTable;
use dmsim_sim::run::RunConfig;
use dmsim_sim::thin::ThinSim;
use dmsim_traces::{Op, Trace};

use crate::equivalence::{kernel_replays, FinalState};
use crate::error::ShimError;
use crate::logwrites::{self, EntryKind};
use crate::protocol::{mark_name, summarize, PoolSpec};
use crate::vm::{dump, mapped_blocks, DATA_FILL};

/// Whether op `op` is a point where something must be durable afterwards:
/// a flush, a FUA write or a PREFLUSH write.
pub fn is_durability_point(op: &Op) -> bool {
    matches!(op, Op::Flush { .. } | Op::Write { fua: true, .. } | Op::Write { preflush: true, .. })
}

/// The durable disks at one point of a trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashImages {
    /// The op (index among the trace's ops) after which they were taken.
    pub op: usize,
    /// The metadata device.
    pub metadata: Vec<u8>,
    /// The data device.
    pub data: Vec<u8>,
    /// Whether the metadata's superblock changed since the previous op:
    /// a commit reached the disk during this op.
    pub committed: bool,
}

/// The kernel's durable disks after every durability point of `trace`,
/// rebuilt from the log of a logged run. An error names the missing mark
/// or the log's defect.
pub fn kernel_crash_states(trace: &Trace, log_bytes: &[u8]) -> Result<Vec<CrashImages>, ShimError> {
    let spec = PoolSpec::from_header(&trace.header)?;
    let log = logwrites::parse(log_bytes).map_err(|e| ShimError::Invalid(e.to_string()))?;
    if log.sector_size != 512 {
        return Err(ShimError::Invalid(format!("log sector size {} (expected 512)", log.sector_size)));
    }
    let meta_bytes = (spec.metadata_sectors * 512) as usize;
    let mut device = vec![0u8; meta_bytes];
    device.resize(meta_bytes + (spec.data_sectors() * 512) as usize, DATA_FILL);
    let mut out = Vec::new();
    let mut at = 0;
    let mut superblock = device[..4096].to_vec();
    for (i, op) in trace.ops().enumerate() {
        let name = mark_name(i);
        let Some(mark) = log.entries[at..]
            .iter()
            .position(|e| matches!(&e.kind, EntryKind::Mark(t) if *t == name))
            .map(|p| p + at)
        else {
            return Err(ShimError::Invalid(format!("the log has no mark {name:?} after entry {at}")));
        };
        log.replay_into(&mut device, at..mark).map_err(|e| ShimError::Invalid(e.to_string()))?;
        at = mark + 1;
        let committed = device[..4096] != superblock[..];
        if committed {
            superblock = device[..4096].to_vec();
        }
        if is_durability_point(&op) {
            out.push(CrashImages {
                op: i,
                metadata: device[..meta_bytes].to_vec(),
                data: device[meta_bytes..].to_vec(),
                committed,
            });
        }
    }
    Ok(out)
}

/// Ops during which the kernel's log shows a commit (its superblock
/// written), every op of the trace.
pub fn kernel_commit_ops(trace: &Trace, log_bytes: &[u8]) -> Result<BTreeSet<usize>, ShimError> {
    let log = logwrites::parse(log_bytes).map_err(|e| ShimError::Invalid(e.to_string()))?;
    let mut out = BTreeSet::new();
    let mut op = 0;
    let ops = trace.ops().count();
    for e in &log.entries {
        match &e.kind {
            EntryKind::Mark(t) => {
                if let Some(i) = t.strip_prefix("op").and_then(|n| n.parse::<usize>().ok()) {
                    op = i + 1;
                }
            }
            EntryKind::Write { .. } if e.sector < 8 && op < ops => {
                out.insert(op);
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The model's crash states: the serialized simulator (every op that the
/// kernel replays, each run to quiescence) and, after every durability
/// point, the durable images of its metadata and data disks. Also every
/// op during which the model's durable superblock changed.
pub fn model_crash_states(trace: &Trace) -> Result<(Vec<CrashImages>, BTreeSet<usize>), ShimError> {
    let cfg = RunConfig::from_header(&trace.header).map_err(ShimError::Invalid)?;
    if let Some(e) = trace.ops().find_map(|op| op.thin_error()) {
        return Err(ShimError::Invalid(e));
    }
    if let Some(op) = trace.ops().find(|op| matches!(op, Op::Fault { .. } | Op::Crash { .. })) {
        return Err(ShimError::Invalid(format!("crash states do not support {op:?} in the trace")));
    }
    let mut sim = ThinSim::new(cfg.thin);
    let fail = |f: dmsim_sim::thin::ThinFailure| ShimError::Invalid(format!("simulator: {f}"));
    let durable_metadata = |sim: &ThinSim| {
        sim.pool().with_metadata(|md| md.transaction_manager().block_manager().device().durable().to_vec())
    };
    let mut superblock = durable_metadata(&sim)[..4096].to_vec();
    let mut out = Vec::new();
    let mut commits = BTreeSet::new();
    for (i, op) in trace.ops().enumerate() {
        if kernel_replays(&op) {
            sim.apply(&op).map_err(fail)?;
            sim.quiesce().map_err(fail)?;
        }
        let metadata = durable_metadata(&sim);
        let committed = metadata[..4096] != superblock[..];
        if committed {
            superblock = metadata[..4096].to_vec();
            commits.insert(i);
        }
        if is_durability_point(&op) {
            let data = sim.pool().with_data_device(|d| d.durable().to_vec());
            out.push(CrashImages { op: i, metadata, data, committed });
        }
    }
    Ok((out, commits))
}

/// What one crash state reads and what the checker said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashRead {
    /// Every thin device of the committed metadata, read through the
    /// model's pool opened on the images, and the mapped blocks.
    pub state: FinalState,
    /// Problems the checker allows after a crash (leaked or over-counted
    /// data blocks), as its messages.
    pub allowed: Vec<String>,
}

/// Judges one crash state: the model's checker must find nothing but
/// leaks (non-fatal problems and over-counted data blocks, as after any
/// crash); then the model opens a pool on the images and reads every thin
/// device the metadata holds. An error says what failed.
pub fn judge(images: &CrashImages, trace: &Trace) -> Result<CrashRead, String> {
    let cfg = RunConfig::from_header(&trace.header)?;
    let mut dev = MemDevice::from_bytes(images.metadata.clone());
    let report = check_thin_metadata(&mut dev, &CheckOptions::default())
        .map_err(|e| format!("checker cannot read the metadata: {e}"))?;
    let (allowed, damage): (Vec<_>, Vec<_>) = report.problems.iter().partition(|p| {
        p.severity == Severity::NonFatal
            || (p.structure == Structure::DataSpaceMap && p.message.contains("count on disk"))
    });
    if !damage.is_empty() {
        return Err(format!("checker: {:?}", damage.iter().map(|p| p.to_string()).collect::<Vec<_>>()));
    }
    let allowed = allowed.iter().map(|p| p.to_string()).collect();
    let state = read_through_pool(images, cfg.thin.features, cfg.thin.options, &trace.header)?;
    Ok(CrashRead { state, allowed })
}

/// Opens the model's pool on the two images (as the kernel would activate
/// it after the crash) and reads every thin device the metadata holds,
/// block by block, as stamp summaries; devices in id order.
pub fn read_through_pool(
    images: &CrashImages,
    features: dmsim_model::thin::table::PoolFeatures,
    options: PoolOptions,
    header: &dmsim_traces::Header,
) -> Result<FinalState, String> {
    let spec = PoolSpec::from_header(header).map_err(|e| e.to_string())?;
    let xml = dump(&images.metadata).map_err(|e| format!("dump of the crash state's metadata: {e}"))?;
    let mapped = mapped_blocks(&xml);
    let table = PoolTable {
        metadata_dev: "/dev/crash-meta".into(),
        data_dev: "/dev/crash-data".into(),
        data_block_size: spec.block_sectors as u32,
        low_water_mark: spec.low_water_mark,
        features,
    };
    let pool = Pool::create(
        table,
        spec.data_sectors(),
        MemDevice::from_bytes(images.metadata.clone()),
        MemDevice::from_bytes(images.data.clone()),
        options,
    )
    .map_err(|e| format!("the model cannot open the pool on the crash state: {e}"))?;
    let bs = spec.block_sectors;
    let mut devices = Vec::new();
    for &id in mapped.keys() {
        pool.activate_thin(u64::from(id), spec.thin_sectors())
            .map_err(|e| format!("activate thin {id}: {e}"))?;
        let mut blocks = Vec::new();
        for b in 0..spec.thin_blocks {
            let bio = pool
                .submit(u64::from(id), BioRequest::read(b * bs, bs))
                .map_err(|e| format!("read thin {id} block {b}: {e}"))?;
            let mut done = None;
            for _ in 0..1000 {
                if let Some(c) = pool.take_completions().into_iter().find(|c| c.id == bio) {
                    done = Some(c);
                    break;
                }
                pool.run_worker();
                for io in pool.in_flight_io() {
                    pool.complete_io(io.id).map_err(|e| format!("complete a read: {e}"))?;
                }
            }
            let c = done.ok_or_else(|| format!("read of thin {id} block {b} never completed"))?;
            blocks.push(match c.result {
                Ok(()) => summarize(&c.data, spec.run, b * bs),
                Err(e) => format!("read-error {e:?}"),
            });
        }
        devices.push((id, blocks));
    }
    Ok(FinalState { devices, mapped })
}
