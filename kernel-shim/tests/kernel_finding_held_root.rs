//! The thin metadata campaign's one "known kernel behaviour", held against
//! the real kernel: does `reserve_metadata_snap` (and
//! `release_metadata_snap`) put the metadata snapshot's `held_root` on
//! disk before the commit that accounts for it?
//!
//! The hypothesis (`dmsim_sim::campaign::known_kernel_behaviour`, written
//! from the 6.1.166 source): the message writes the new `held_root` into
//! the superblock's buffer in place, outside a commit; the commit that
//! follows starts with `dm_tm_pre_commit`, whose flush writes every dirty
//! block, the superblock included, so block 0 would reach the disk with
//! the new `held_root` and the old space-map roots before the commit's own
//! superblock write. A power cut in between would leave a snapshot the
//! space maps never counted.
//!
//! One logged job (dm-log-writes, marks after every op and every message)
//! runs: a thin device, two block writes, a flush, `reserve_metadata_snap`,
//! two more writes, a flush, `release_metadata_snap`, a write, a flush.
//! For each message the test walks the log between the mark before it and
//! the mark after it and decodes every write of metadata block 0; it
//! rebuilds the durable disks just before and just after each of those
//! writes and judges them with the model's checker, Debian's `thin_check`
//! and (where a snapshot is held) `thin_dump -m`; it also builds the state
//! the hypothesis predicts (the durable disks just before the commit's
//! superblock write, block 0 carrying the new `held_root`) to show what the
//! checkers would say of it; and it runs the model's pool through the same
//! steps with its metadata disk recording, to compare the request streams.
//!
//! What Debian's 6.1.192 kernel does (this test asserts it): `held_root`
//! reaches the disk only in the commit's own superblock write, together
//! with the new space-map roots, after the pre-commit flush; no block-0
//! write carries a changed `held_root` with the old roots, and every crash
//! state in the two messages is clean. Stable 6.1.178 and later defer the
//! `held_root` update to commit time (CVE-2026-72108, "dm thin metadata:
//! fix metadata snapshot consistency on commit failure"); the model and the
//! campaign's excuse follow the older source. See docs/findings.md,
//! finding 9.
//!
//! Needs `qemu-system-x86_64` and `linux-image-amd64` (and `thin_check`,
//! `thin_dump`); without them it prints SKIPPED, or fails under `CI=true`.

use std::path::{Path, PathBuf};

#[path = "common/thin_tools.rs"]
mod thin_tools;
use std::time::Instant;
use thin_tools::{in_ci, tool};

use dmsim_faults::DiskEvent;
use dmsim_kernel_shim::logwrites::{self, EntryKind, Log};
use dmsim_kernel_shim::protocol::{mark_name, message_mark_name, PoolSpec};
use dmsim_kernel_shim::vm::DATA_FILL;
use dmsim_kernel_shim::{Job, KernelShim, ShimError};
use dmsim_model::block_device::MemDevice;
use dmsim_model::pdata::checksum::{seal, THIN_SUPERBLOCK_SALT};
use dmsim_model::pdata::layout::thin::SB_HELD_ROOT;
use dmsim_model::thin::check::{check_thin_metadata, CheckOptions};
use dmsim_model::thin::dump::{dump_xml, DumpOptions};
use dmsim_model::thin::superblock::Superblock;
use dmsim_sim::campaign::known_kernel_behaviour;
use dmsim_sim::run::RunConfig;
use dmsim_sim::thin::ThinSim;
use dmsim_traces::{Op, Trace};

/// Runs of the job in the one boot.
const RUNS: usize = 2;
/// The messages: each goes just before the op with this index.
const RESERVE_BEFORE: usize = 4;
const RELEASE_BEFORE: usize = 7;

const TRACE: &str = "dmsim-trace 1
seed 0
workload durability
param ops 9
param run 77
param block_sectors 128
param data_blocks 64
param thin_blocks 16
param metadata_sectors 4096
param max_devices 2
param skip_block_zeroing 0
param ignore_discard 0
param no_discard_passdown 0
param read_only 0
param error_if_no_space 0
param no_space_timeout_ns 60000000000
param mutations \"\"
create-thin
write dev=0 sector=0 nr=128
write dev=0 sector=128 nr=128
flush dev=0
write dev=0 sector=256 nr=128
write dev=0 sector=384 nr=128
flush dev=0
write dev=0 sector=512 nr=128
flush dev=0
";

/// The superblock fields the finding is about.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fields {
    held_root: u64,
    trans_id: u64,
    /// (bitmap root, nr_allocated) of the data and metadata space maps.
    data_sm: (u64, u64),
    metadata_sm: (u64, u64),
    mapping_root: u64,
    details_root: u64,
}

impl Fields {
    fn of(block: &[u8]) -> Fields {
        let sb = Superblock::decode(block);
        Fields {
            held_root: sb.held_root,
            trans_id: sb.trans_id,
            data_sm: (sb.data_sm_root.bitmap_root, sb.data_sm_root.nr_allocated),
            metadata_sm: (sb.metadata_sm_root.bitmap_root, sb.metadata_sm_root.nr_allocated),
            mapping_root: sb.data_mapping_root,
            details_root: sb.device_details_root,
        }
    }

    fn same_roots(&self, other: &Fields) -> bool {
        self.data_sm == other.data_sm && self.metadata_sm == other.metadata_sm
    }
}

impl std::fmt::Display for Fields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "held_root {} trans_id {} data sm (bitmap root, allocated) {:?} metadata sm {:?} mapping root {} \
             details root {}",
            self.held_root,
            self.trans_id,
            self.data_sm,
            self.metadata_sm,
            self.mapping_root,
            self.details_root
        )
    }
}

/// What the checkers say of one metadata image.
#[derive(Debug)]
struct Verdict {
    /// The model's checker: its problems.
    model: Vec<String>,
    model_damage: bool,
    /// thin_check: `Ok` or its output.
    thin_check: Result<(), String>,
    /// With a snapshot held: `thin_dump -m` (`Ok` with the number of
    /// mapped blocks it lists, or its output) and the model's dump of the
    /// snapshot.
    snapshot: Option<(Result<usize, String>, Result<usize, String>)>,
}

impl Verdict {
    fn clean(&self) -> bool {
        self.model.is_empty()
            && self.thin_check.is_ok()
            && self.snapshot.as_ref().is_none_or(|(t, m)| t.is_ok() && m.is_ok())
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let first = |s: &str| s.lines().next().unwrap_or("").to_string();
        match self.model.as_slice() {
            [] => write!(f, "model checker clean")?,
            p => write!(f, "model checker: {} problems ({}), first: {}", p.len(), self.model_damage, p[0])?,
        }
        match &self.thin_check {
            Ok(()) => write!(f, "; thin_check accepts")?,
            Err(e) => write!(f, "; thin_check rejects: {}", e.lines().collect::<Vec<_>>().join(" | "))?,
        }
        if let Some((t, m)) = &self.snapshot {
            match t {
                Ok(n) => write!(f, "; thin_dump -m lists {n} mappings")?,
                Err(e) => write!(f, "; thin_dump -m fails: {}", first(e))?,
            }
            match m {
                Ok(n) => write!(f, ", the model's snapshot dump {n}")?,
                Err(e) => write!(f, ", the model's snapshot dump fails: {}", first(e))?,
            }
        }
        Ok(())
    }
}

struct Tools {
    thin_check: PathBuf,
    thin_dump: PathBuf,
}

fn run_tool(tool: &Path, args: &[&str], image: &[u8]) -> Result<String, String> {
    let dir = dmsim_kernel_shim::vm::TempDir::new().expect("a temporary directory");
    let path = dir.path().join("metadata.img");
    std::fs::write(&path, image).expect("write the image");
    let out = std::process::Command::new(tool).args(args).arg(&path).output().expect("run the tool");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        Ok(text)
    } else {
        Err(text.trim().to_string())
    }
}

fn judge(image: &[u8], tools: &Tools) -> Verdict {
    let report = check_thin_metadata(&mut MemDevice::from_bytes(image.to_vec()), &CheckOptions::default())
        .map_err(|e| e.to_string());
    let (model, model_damage) = match report {
        Ok(r) => (r.problems.iter().map(|p| p.to_string()).collect(), r.has_damage()),
        Err(e) => (vec![format!("cannot check: {e}")], true),
    };
    let thin_check = run_tool(&tools.thin_check, &[], image).map(|_| ());
    let snapshot = (Superblock::decode(&image[..4096]).held_root != 0).then(|| {
        let mappings = |xml: &str| xml.matches("_mapping ").count();
        let theirs = run_tool(&tools.thin_dump, &["-m"], image).map(|x| mappings(&x));
        let mut out = Vec::new();
        let ours = dump_xml(
            &mut MemDevice::from_bytes(image.to_vec()),
            &mut out,
            &DumpOptions { metadata_snap: true },
        )
        .map_err(|e| e.to_string())
        .map(|()| mappings(&String::from_utf8_lossy(&out)));
        (theirs, ours)
    });
    Verdict { model, model_damage, thin_check, snapshot }
}

/// One message's stretch of the log: the mark before it and the mark after.
struct Window {
    name: &'static str,
    start: usize,
    end: usize,
}

/// A write of metadata block 0 in the log.
struct SbWrite {
    entry: usize,
    fields: Fields,
}

fn entry_text(log: &Log<'_>, i: usize) -> String {
    let e = &log.entries[i];
    match &e.kind {
        EntryKind::Write { fua } => {
            let what =
                if e.sector < 4096 { format!(" (metadata block {})", e.sector / 8) } else { String::new() };
            format!("{i}: write {}+{}{}{what}", e.sector, e.nr_sectors, if *fua { " fua" } else { "" })
        }
        EntryKind::Flush => format!("{i}: flush"),
        EntryKind::Discard => format!("{i}: discard {}+{}", e.sector, e.nr_sectors),
        EntryKind::Mark(t) => format!("{i}: mark {t}"),
    }
}

/// What one run's log shows for one message; `Err` says what contradicts
/// the expectation. `Ok`: the bytes of the block-0 write that changed
/// held_root.
fn examine(log: &Log<'_>, spec: &PoolSpec, w: &Window, tools: &Tools, r: usize) -> Result<Vec<u8>, String> {
    let meta = (spec.metadata_sectors * 512) as usize;
    let mut device = vec![0u8; meta];
    device.resize(meta + (spec.data_sectors() * 512) as usize, DATA_FILL);
    log.replay_into(&mut device, 0..w.start).map_err(|e| e.to_string())?;
    let committed = device[..4096].to_vec();
    let before = Fields::of(&committed);
    let writes: Vec<SbWrite> = (w.start..w.end)
        .filter(|&i| matches!(log.entries[i].kind, EntryKind::Write { .. }) && log.entries[i].sector == 0)
        .map(|i| SbWrite { entry: i, fields: Fields::of(&log.data(&log.entries[i])[..4096]) })
        .collect();
    eprintln!("run {r}: {}: log entries {}..{}; durable superblock before: {before}", w.name, w.start, w.end);
    eprintln!(
        "run {r}: {}: entries: {}",
        w.name,
        (w.start..=w.end).map(|i| entry_text(log, i)).collect::<Vec<_>>().join(", ")
    );
    for s in &writes {
        eprintln!("run {r}: {}: entry {}: block 0 written with {}", w.name, s.entry, s.fields);
    }
    // The write that changes held_root.
    let first = writes
        .iter()
        .find(|s| s.fields.held_root != before.held_root)
        .ok_or_else(|| format!("{}: no write of block 0 changes held_root", w.name))?;
    // The hypothesis: held_root changed, space-map roots as committed.
    if let Some(early) =
        writes.iter().find(|s| s.fields.held_root != before.held_root && s.fields.same_roots(&before))
    {
        return Err(format!(
            "{}: entry {} writes block 0 with the new held_root {} and the old space-map roots: {}",
            w.name, early.entry, early.fields.held_root, early.fields
        ));
    }
    let flush = (w.start..first.entry).rev().find(|&i| log.entries[i].kind == EntryKind::Flush);
    let batch = flush.map(|f| {
        let from =
            (w.start..f).rev().find(|&i| log.entries[i].kind == EntryKind::Flush).map_or(w.start, |p| p + 1);
        (from..f).map(|i| log.entries[i].sector / 8).collect::<Vec<_>>()
    });
    eprintln!(
        "run {r}: {}: held_root {} -> {} first reaches the disk at entry {} with the new space-map roots \
         (metadata sm {:?} -> {:?}, data sm {:?} -> {:?}); the pre-commit flush before it is entry {:?}, \
         covering metadata blocks {:?}",
        w.name,
        before.held_root,
        first.fields.held_root,
        first.entry,
        before.metadata_sm,
        first.fields.metadata_sm,
        before.data_sm,
        first.fields.data_sm,
        flush,
        batch.clone().unwrap_or_default()
    );
    if flush.is_none() {
        return Err(format!("{}: no flush before the superblock write at entry {}", w.name, first.entry));
    }
    if first.fields.held_root != 0 && !batch.unwrap_or_default().contains(&first.fields.held_root) {
        return Err(format!(
            "{}: the copy block {} is not in the pre-commit flush",
            w.name, first.fields.held_root
        ));
    }
    // Every crash state around every superblock write of the message.
    let mut dev = vec![0u8; device.len()];
    let mut last = 0;
    for s in &writes {
        for (label, upto) in [("just before", s.entry), ("just after", s.entry + 1)] {
            log.replay_into(&mut dev, last..upto).map_err(|e| e.to_string())?;
            last = upto;
            if dev[..meta] == vec![0u8; meta][..] {
                continue;
            }
            let image = &dev[..meta];
            let v = judge(image, tools);
            let known = known_kernel_behaviour(&committed, image);
            eprintln!(
                "run {r}: {}: crash {label} entry {} (held_root {}): {v}; campaign signature: {}",
                w.name,
                s.entry,
                Superblock::decode(&image[..4096]).held_root,
                known.unwrap_or("no")
            );
            if !v.clean() {
                return Err(format!(
                    "{}: the crash state {label} entry {} is not clean: {v}",
                    w.name, s.entry
                ));
            }
            if known.is_some() {
                return Err(format!("{}: a real crash state has the campaign's signature", w.name));
            }
        }
    }
    // What the hypothesis predicted: the state just before the commit's
    // superblock write, block 0 carrying the new held_root.
    let mut predicted = vec![0u8; device.len()];
    log.replay_into(&mut predicted, 0..first.entry).map_err(|e| e.to_string())?;
    let mut image = predicted[..meta].to_vec();
    image[SB_HELD_ROOT..SB_HELD_ROOT + 8].copy_from_slice(&first.fields.held_root.to_le_bytes());
    seal(&mut image[..4096], THIN_SUPERBLOCK_SALT);
    let v = judge(&image, tools);
    eprintln!(
        "run {r}: {}: the hypothesised state (never written by this kernel): {v}; campaign signature: {}",
        w.name,
        known_kernel_behaviour(&committed, &image).unwrap_or("no")
    );
    if v.clean() {
        return Err(format!("{}: the checkers accept the hypothesised state", w.name));
    }
    Ok(log.data(&log.entries[first.entry])[..4096].to_vec())
}

/// The model doing the same: the ops before the reserve, then the message
/// with the metadata disk recording.
struct ModelReserve {
    /// The metadata requests, as text.
    stream: String,
    /// A block-0 write carried the new held_root with the old space-map
    /// roots.
    early: bool,
    /// The last block-0 write: the commit's superblock.
    superblock: Vec<u8>,
}

fn model_reserve(trace: &Trace) -> ModelReserve {
    let cfg = RunConfig::from_header(&trace.header).expect("a valid header");
    let mut sim = ThinSim::new(cfg.thin);
    for op in trace.ops().take(RESERVE_BEFORE) {
        sim.apply(&op).expect("the model applies the op");
        sim.quiesce().expect("the model quiesces");
    }
    let base = sim
        .pool()
        .with_metadata(|md| md.transaction_manager().block_manager().device_mut().start_recording());
    sim.pool().message("reserve_metadata_snap").expect("the model reserves a metadata snapshot");
    let events =
        sim.pool().with_metadata(|md| md.transaction_manager().block_manager().device_mut().take_log());
    let before = Fields::of(base.block(0));
    let mut early = false;
    let mut superblock = Vec::new();
    let mut text = Vec::new();
    for (i, e) in events.iter().enumerate() {
        match e {
            DiskEvent::Write { sector, data, .. } if *sector == 0 => {
                let f = Fields::of(&data[..4096]);
                early |= f.held_root != before.held_root && f.same_roots(&before);
                superblock = data[..4096].to_vec();
                text.push(format!("{i}: block 0 ({f})"));
            }
            DiskEvent::Write { sector, .. } => text.push(format!("{i}: block {}", sector / 8)),
            DiskEvent::Flush => text.push(format!("{i}: flush")),
        }
    }
    ModelReserve { stream: text.join(", "), early, superblock }
}

#[test]
fn held_root_reaches_the_disk_only_with_the_commit_that_counts_it() {
    let t0 = Instant::now();
    let shim = match KernelShim::prepare() {
        Ok(s) => s,
        Err(e @ ShimError::Missing(_)) if !in_ci() => return eprintln!("SKIPPED: kernel finding 9: {e}"),
        Err(e) => panic!("preparing the VM: {e}"),
    };
    let tools = match (tool("thin_check"), tool("thin_dump")) {
        (Some(thin_check), Some(thin_dump)) => Tools { thin_check, thin_dump },
        _ if !in_ci() => return eprintln!("SKIPPED: kernel finding 9: thin_check or thin_dump missing"),
        _ => panic!("CI=true and thin_check or thin_dump is missing"),
    };
    let trace = dmsim_traces::from_text(TRACE).expect("the trace parses");
    let spec = PoolSpec::from_header(&trace.header).expect("a valid header");
    let ops: Vec<Op> = trace.ops().collect();
    assert!(
        matches!(ops[RESERVE_BEFORE - 1], Op::Flush { .. })
            && matches!(ops[RELEASE_BEFORE - 1], Op::Flush { .. })
    );
    let messages = vec![
        (RESERVE_BEFORE, "reserve_metadata_snap".to_string()),
        (RELEASE_BEFORE, "release_metadata_snap".to_string()),
    ];
    let job = Job::LoggedWithMessages { trace: trace.clone(), messages };
    let runs = shim.run_jobs(&vec![job; RUNS]).unwrap_or_else(|e| panic!("the kernel runs: {e}"));
    let vm = runs[0].wall;
    let mut failures = Vec::new();
    let mut kernel_superblocks = Vec::new();
    for (r, run) in runs.iter().enumerate() {
        assert_eq!(run.result.error, None, "run {r}: the agent failed; console tail:\n{}", {
            let lines: Vec<&str> = run.console.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        });
        let bytes = match run.log.as_ref().expect("a logged run carries its log") {
            Ok(b) => b,
            Err(e) => panic!("run {r}: the log: {e}"),
        };
        let log = logwrites::parse(bytes).expect("a readable log");
        assert_eq!(log.sector_size, 512);
        let mark = |t: String| log.mark(&t).unwrap_or_else(|| panic!("run {r}: no mark {t:?}"));
        let windows = [
            Window {
                name: "reserve",
                start: mark(mark_name(RESERVE_BEFORE - 1)),
                end: mark(message_mark_name(0)),
            },
            Window {
                name: "release",
                start: mark(mark_name(RELEASE_BEFORE - 1)),
                end: mark(message_mark_name(1)),
            },
        ];
        for w in &windows {
            match examine(&log, &spec, w, &tools, r) {
                Ok(sb) if w.name == "reserve" => kernel_superblocks.push(sb),
                Ok(_) => {}
                Err(e) => failures.push(format!("run {r}: {e}")),
            }
        }
    }
    let model = model_reserve(&trace);
    eprintln!("the model's reserve_metadata_snap message, metadata requests: {}", model.stream);
    eprintln!(
        "the model {} block 0 with the new held_root and the old space-map roots before its commit's \
         superblock write; its commit's superblock is {} the kernel's",
        if model.early { "writes" } else { "does not write" },
        if kernel_superblocks.iter().all(|k| *k == model.superblock) { "byte for byte" } else { "not" }
    );
    for (r, k) in kernel_superblocks.iter().enumerate() {
        if *k != model.superblock {
            failures.push(format!(
                "run {r}: the model's commit superblock differs from the kernel's: model {}, kernel {}",
                Fields::of(&model.superblock),
                Fields::of(k)
            ));
        }
    }
    eprintln!("VM {vm:?}, the whole test {:?}", t0.elapsed());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
