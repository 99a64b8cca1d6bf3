//! The kernel's crash states of a cache trace replayed on controlled disks
//! ([`crate::cache_replay::ublk_plan`]), judged and held against the
//! model's own.
//!
//! After every FLUSH, FUA or PREFLUSH write, and after every status query
//! and reload (they commit without flushing the data devices), the agent
//! recorded what a power cut that loses every volatile write would keep
//! of the metadata, cache and origin disks ([`crate::durable`]); each disk
//! has its own flushes, so a commit that flushed the metadata disk alone
//! shows as such. At each such mark [`judge_ublk_crash_states`]:
//!
//! - loads the kernel's durable images with the model's cache target as
//!   after a power cut and reads every origin block back; each read must
//!   be one the oracle allows after a crash at that point of the same
//!   requests (**L1 at the crash**);
//! - does the same with the serialized simulator's durable images at the
//!   same op (the run that follows the kernel's clock best, as
//!   [`crate::cache_replay::judge`] finds it) and compares: the same
//!   (origin block → cache block) mappings in the durable metadata, and
//!   the same content per origin block after recovery;
//! - lists the kernel's durable mappings whose cache block does not hold
//!   durable data of that origin block (a commit made durable before the
//!   cache data it maps: what `CacheFixes::flush_before_commit` is about).

use std::collections::BTreeMap;

use dmsim_model::block_device::MemDevice;
use dmsim_model::cache::core::{BioRequest, Cache};
use dmsim_traces::op::{CacheIoMode, CachePolicyKind};
use dmsim_traces::stamp::{self, SectorContent};
use dmsim_traces::Op;

use crate::cache_replay::{expand, misuse, CachePlan, CacheReplayReport, Feeder};
use crate::durable::{unpack, DurableMark};
use crate::error::ShimError;
use crate::protocol::summarize;
use crate::vm::{Job, KernelRun};

/// How one trace's crash states on controlled disks compare.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UblkCrashReport {
    /// Marks judged ([`crate::durable::is_mark`]).
    pub marks: usize,
    /// Of those, commits without a FLUSH (status queries, reloads).
    pub commit_marks: usize,
    /// Marks whose kernel crash state the model's matches (mappings and
    /// every block's content after recovery).
    pub matching: usize,
    /// Blocks read back from the kernel's crash states.
    pub reads: usize,
    /// L1: reads of the kernel's crash states after a FLUSH, FUA or
    /// PREFLUSH write that the oracle refuses.
    pub l1_violations: Vec<String>,
    /// Reads of the kernel's crash states after a commit without a FLUSH
    /// (a status query, a reload) that the oracle refuses: durable
    /// mappings whose data is not (`CacheFixes::flush_before_commit`).
    pub commit_l1_violations: Vec<String>,
    /// The first mark whose states differ: its op and what differs (the
    /// first differing mapping or block).
    pub first_difference: Option<(usize, String)>,
    /// Every differing mark's op.
    pub differing: Vec<usize>,
    /// The kernel's durable mappings whose cache block holds no durable
    /// data of their origin block: `op N: ...`.
    pub unbacked: Vec<String>,
}

/// What the model's cache target reads from durable images after a power
/// cut.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Recovered {
    /// The durable metadata's valid mappings: origin block → (cache
    /// block, dirty).
    mapped: BTreeMap<u64, (u32, bool)>,
    /// Every origin block's bytes as read back.
    blocks: Vec<Vec<u8>>,
}

/// The three durable images of a job, rebuilt mark by mark.
struct Images {
    disks: [Vec<u8>; 3],
    run: u64,
    block_sectors: u64,
}

impl Images {
    /// Applies one mark's changes.
    fn apply(&mut self, mark: &DurableMark) -> Result<(), String> {
        for (sector, packed) in &mark.metadata {
            let bytes = unpack(packed, 512)?;
            put(&mut self.disks[0], sector.saturating_mul(512), &bytes, "metadata")?;
        }
        let bs = self.block_sectors;
        for (k, list, what) in [(1, &mark.cache, "cache"), (2, &mark.origin, "origin")] {
            for (block, summary) in list {
                let first = block.saturating_mul(bs);
                let bytes = expand(summary, self.run, first)?;
                put(&mut self.disks[k], first.saturating_mul(512), &bytes, what)?;
            }
        }
        Ok(())
    }
}

fn put(disk: &mut [u8], at: u64, bytes: &[u8], what: &str) -> Result<(), String> {
    let at = usize::try_from(at).map_err(|_| format!("{what}: offset {at} out of range"))?;
    let end = at.checked_add(bytes.len()).filter(|&e| e <= disk.len());
    let end = end.ok_or_else(|| format!("{what}: {} bytes at {at} leave the disk", bytes.len()))?;
    disk[at..end].copy_from_slice(bytes);
    Ok(())
}

/// The durable metadata's valid mappings; an image no commit has reached
/// yet (all zero) maps nothing.
fn durable_mappings(image: &[u8]) -> Result<BTreeMap<u64, (u32, bool)>, String> {
    if image.iter().all(|&b| b == 0) {
        return Ok(BTreeMap::new());
    }
    Ok(crate::cache_replay::mappings(image)?.into_iter().map(|(c, (o, dirty))| (o, (c, dirty))).collect())
}

/// Loads `disks` (metadata, cache, origin) with the model's cache target
/// (default options) as after a power cut (a passthrough table that cannot load is loaded in
/// writeback, as a user would) and reads every origin block back.
fn recover(
    plan: &CachePlan,
    (mode, policy): (CacheIoMode, CachePolicyKind),
    disks: &[Vec<u8>; 3],
) -> Result<Recovered, String> {
    let c = &plan.cfg.cache;
    let mapped = durable_mappings(&disks[0]).map_err(|e| format!("the durable metadata: {e}"))?;
    // The same recovery for both sides: the model as the kernel is, no
    // deliberate bugs (the plan's options shape the model's run only).
    let options = dmsim_model::cache::core::CacheOptions::default();
    let load = |mode: CacheIoMode| {
        let [m, cd, od] = disks.clone().map(MemDevice::from_bytes);
        Cache::create(&c.table_line(mode, policy), m, cd, od, 0, options)
    };
    let target = match load(mode) {
        Err(e) if e.message.contains("passthrough") => load(CacheIoMode::Writeback),
        r => r,
    }
    .map_err(|e| format!("the crash state does not load: {e}"))?;
    let bs = c.block_sectors;
    let mut blocks = Vec::new();
    for b in 0..c.origin_blocks {
        let id =
            target.submit(BioRequest::read(b * bs, bs)).map_err(|e| format!("read of block {b}: {e}"))?;
        let mut data = None;
        for _ in 0..100_000 {
            if let Some(d) = target.take_completions().into_iter().find(|d| d.id == id) {
                data = Some(d);
                break;
            }
            if target.worker_wanted() {
                target.run_worker();
            } else if let Some(io) = target.in_flight_io().first() {
                let io = io.id;
                target.complete_io(io).map_err(|e| e.to_string())?;
            }
        }
        let d = data.ok_or_else(|| format!("a read of block {b} never completed"))?;
        d.result.map_err(|e| format!("the read of block {b} failed: {e}"))?;
        blocks.push(d.data);
    }
    Ok(Recovered { mapped, blocks })
}

/// The kernel's durable mappings whose cache block holds a sector that is
/// neither zero nor a stamp of its origin block's sector (data that never
/// belonged to the block: the mapping is durable, its data is not).
fn unbacked(plan: &CachePlan, disks: &[Vec<u8>; 3], mapped: &BTreeMap<u64, (u32, bool)>) -> Vec<String> {
    let c = &plan.cfg.cache;
    let bytes = (c.block_sectors * 512) as usize;
    let mut out = Vec::new();
    for (&ob, &(cb, dirty)) in mapped {
        let Some(data) = disks[1].get(cb as usize * bytes..(cb as usize + 1) * bytes) else { continue };
        let foreign = stamp::decode(data).into_iter().enumerate().any(|(k, s)| match s {
            SectorContent::Zeroes => false,
            SectorContent::Stamp(s) => s.run != c.run || s.sector != ob * c.block_sectors + k as u64,
            SectorContent::Foreign => true,
        });
        if foreign {
            out.push(format!(
                "origin block {ob} → cache block {cb} ({}) holds [{}]",
                if dirty { "dirty" } else { "clean" },
                summarize(data, c.run, ob * c.block_sectors)
            ));
        }
    }
    out
}

/// The first difference between the kernel's recovered crash state and
/// the model's.
fn difference(plan: &CachePlan, kernel: &Recovered, model: &Recovered) -> Option<String> {
    let cb =
        |m: &BTreeMap<u64, (u32, bool)>| m.iter().map(|(o, (c, _))| (*o, *c)).collect::<BTreeMap<_, _>>();
    let (k, m) = (cb(&kernel.mapped), cb(&model.mapped));
    if k != m {
        let ob = k.keys().chain(m.keys()).copied().find(|o| k.get(o) != m.get(o)).unwrap_or(0);
        return Some(format!(
            "mappings differ first at origin block {ob}: kernel {:?}, model {:?} (kernel {k:?}, model {m:?})",
            k.get(&ob),
            m.get(&ob)
        ));
    }
    let bs = plan.cfg.cache.block_sectors;
    let run = plan.cfg.cache.run;
    for (b, (kb, mb)) in kernel.blocks.iter().zip(&model.blocks).enumerate() {
        if kb != mb {
            let first = b as u64 * bs;
            return Some(format!(
                "block {b} reads [{}] on the kernel's, [{}] on the model's",
                summarize(kb, run, first),
                summarize(mb, run, first)
            ));
        }
    }
    None
}

/// Judges a run of a [`crate::cache_replay::ublk_plan`] job (see the
/// module's documentation); the serialized simulator runs with the plan's
/// options (`plan.cfg.cache.options`: its fixes and mutations), both
/// sides' crash states are recovered with the default ones.
pub fn judge_ublk_crash_states(plan: &CachePlan, run: &KernelRun) -> Result<UblkCrashReport, ShimError> {
    crash_states_followed(plan, run, &crate::cache_replay::follow_the_kernel(plan, run)?)
}

/// [`crate::cache_replay::judge`] and [`judge_ublk_crash_states`] of one
/// run, sharing the search for the serialized run that follows the
/// kernel's clock.
pub fn judge_with_crash_states(
    plan: &CachePlan,
    run: &KernelRun,
) -> Result<(CacheReplayReport, UblkCrashReport), ShimError> {
    let best = crate::cache_replay::follow_the_kernel(plan, run)?;
    let crashes = crash_states_followed(plan, run, &best)?;
    Ok((crate::cache_replay::judge_followed(plan, run, best)?, crashes))
}

/// [`judge_ublk_crash_states`] with the serialized run that follows the
/// kernel best already found.
fn crash_states_followed(
    plan: &CachePlan,
    run: &KernelRun,
    best: &crate::cache_replay::SimRun,
) -> Result<UblkCrashReport, ShimError> {
    let bad = |e: String| ShimError::Invalid(e);
    let Job::Cache { metadata, cache, origin, .. } = &plan.job else {
        return Err(bad("not a cache job".into()));
    };
    if let Some(e) = &run.result.error {
        return Err(bad(format!("the agent failed: {e}")));
    }
    let results = &run.result.ops;
    if results.len() != plan.ops.len() {
        return Err(bad(format!("the kernel ran {} ops of {}", results.len(), plan.ops.len())));
    }
    let expected: Vec<usize> =
        plan.ops.iter().enumerate().filter(|(_, op)| crate::durable::is_mark(op)).map(|(i, _)| i).collect();
    let got: Vec<usize> = run.result.durable.iter().map(|m| m.op).collect();
    if got != expected {
        return Err(bad(format!("durable marks after ops {got:?}, expected after {expected:?}")));
    }
    let c = &plan.cfg.cache;
    let mut images = Images {
        disks: [metadata.clone(), cache.clone(), origin.clone()],
        run: c.run,
        block_sectors: c.block_sectors,
    };
    let model = crate::cache_replay::model_durable_states(plan, run, best)?;
    let mut report = UblkCrashReport::default();
    let mut table = (c.io_mode, c.policy);
    let mut marks = run.result.durable.iter().peekable();
    for (i, (op, r)) in plan.ops.iter().zip(results).enumerate() {
        if let (Op::Reload { mode, policy }, "ok") = (op, r.outcome.as_str()) {
            table = (*mode, *policy);
        }
        let Some(mark) = marks.next_if(|m| m.op == i) else { continue };
        images.apply(mark).map_err(|e| bad(format!("the mark after op {i}: {e}")))?;
        report.marks += 1;
        let commit_mark = !crate::crash::is_durability_point(op);
        report.commit_marks += usize::from(commit_mark);
        let kernel = recover(plan, table, &images.disks)
            .map_err(|e| bad(format!("the kernel's crash state after op {i}: {e}")))?;
        report.unbacked.extend(
            unbacked(plan, &images.disks, &kernel.mapped).into_iter().map(|u| format!("op {i}: {u}")),
        );
        // L1: the oracle after the same requests, then a crash.
        let mut feeder = Feeder::new(&plan.cfg)?;
        for (k, (op, r)) in plan.ops.iter().zip(results).enumerate().take(i + 1) {
            feeder.feed(k, op, r)?;
        }
        feeder.oracle.crash();
        let bs = c.block_sectors;
        for (b, data) in kernel.blocks.iter().enumerate() {
            let b = b as u64;
            let t = feeder.oracle.read_submitted(0, b * bs, bs).map_err(misuse)?;
            report.reads += 1;
            if let Err(e) = feeder.oracle.read_completed(t, true, data) {
                let to =
                    if commit_mark { &mut report.commit_l1_violations } else { &mut report.l1_violations };
                to.push(format!(
                    "a crash after op {i} ({}): block {b} reads [{}]: {e}",
                    op.name(),
                    summarize(data, c.run, b * bs)
                ));
            }
        }
        // The model's own crash state at the same op.
        let diff = match model.get(&i) {
            None => Some("the model has no crash state here".to_string()),
            Some(m) => match recover(plan, table, m) {
                Ok(ours) => difference(plan, &kernel, &ours),
                Err(e) => Some(format!("the model's crash state: {e}")),
            },
        };
        match diff {
            None => report.matching += 1,
            Some(d) => {
                report.differing.push(i);
                report.first_difference.get_or_insert((i, format!("after op {i} ({}): {d}", op.name())));
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unbacked_mappings_and_the_first_difference_are_named() {
        use dmsim_traces::{Event, Trace};
        let cfg = crate::cache_replay::replayable_config(3, 50);
        let trace = Trace { header: cfg.header(), events: vec![Event::Op(Op::Status)] };
        let plan = crate::cache_replay::plan(&trace).unwrap();
        let (run, bs) = (plan.cfg.cache.run, plan.cfg.cache.block_sectors);
        let bytes = (bs * 512) as usize;
        let mut cache = vec![0xa5u8; 2 * bytes];
        // Cache block 0 holds origin block 3's data, cache block 1 the fill.
        stamp::fill(&mut cache[..bytes], run, 1, 0, 3 * bs);
        let disks = [Vec::new(), cache, Vec::new()];
        let mapped: BTreeMap<u64, (u32, bool)> = [(3, (0, true)), (5, (1, false))].into();
        let u = unbacked(&plan, &disks, &mapped);
        assert_eq!(u.len(), 1, "{u:?}");
        assert!(u[0].starts_with("origin block 5 → cache block 1 (clean)"), "{u:?}");

        let block = |w| {
            let mut b = vec![0u8; bytes];
            stamp::fill(&mut b, run, w, 0, bs);
            b
        };
        let kernel = Recovered { mapped: mapped.clone(), blocks: vec![vec![0; bytes], block(1)] };
        assert_eq!(difference(&plan, &kernel, &kernel.clone()), None);
        let other = Recovered { mapped: mapped.clone(), blocks: vec![vec![0; bytes], block(2)] };
        let d = difference(&plan, &kernel, &other).unwrap();
        assert!(d.starts_with("block 1 reads [w1*"), "{d}");
        let fewer = Recovered { mapped: [(3, (0, true))].into(), blocks: kernel.blocks.clone() };
        let d = difference(&plan, &kernel, &fewer).unwrap();
        assert!(d.starts_with("mappings differ first at origin block 5"), "{d}");
    }

    #[test]
    fn marks_rebuild_images_and_refuse_what_leaves_the_disk() {
        let mut img =
            Images { disks: [vec![0; 1024], vec![0; 2048], vec![0; 2048]], run: 5, block_sectors: 2 };
        let mut o = vec![0u8; 1024];
        stamp::fill(&mut o, 5, 7, 0, 2);
        let mark = DurableMark {
            op: 0,
            metadata: vec![(1, crate::durable::pack(&[9u8; 512]))],
            cache: Vec::new(),
            origin: vec![(1, summarize(&o, 5, 2))],
        };
        img.apply(&mark).unwrap();
        assert_eq!(&img.disks[0][512..], &[9u8; 512][..]);
        assert_eq!(&img.disks[2][1024..], &o[..]);
        let off = DurableMark { op: 1, origin: vec![(2, "0*2".into())], ..DurableMark::default() };
        assert!(img.apply(&off).unwrap_err().contains("leave the disk"));
        assert!(durable_mappings(&[0u8; 4096]).unwrap().is_empty(), "nothing committed: nothing mapped");
    }
}
