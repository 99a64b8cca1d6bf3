//! What travels between the host and the agent in the VM, and how.
//!
//! - The **request** is a trace in the text encoding (`dmsim_traces::text`):
//!   its header says how to build the pool ([`PoolSpec::from_header`]), its
//!   ops say what to do. It is written at the start of the request disk as
//!   a frame ([`write_frame`]).
//! - The **result** ([`KernelResult`]) is a small line-based text the agent
//!   writes as a frame at the start of the result disk: per op what the
//!   kernel answered, per live device and block a summary of the stamps it
//!   reads, the pool's last status line, and an error if the agent gave up.
//! - The metadata image is the metadata disk itself (a file on the host),
//!   read after the VM powered off.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use dmsim_traces::stamp::{self, SectorContent};
use dmsim_traces::{Header, Op, Trace};

use crate::error::ShimError;

/// Magic of a request frame.
pub const REQUEST_MAGIC: [u8; 8] = *b"DMSIMRQ1";
/// Magic of a result frame.
pub const RESULT_MAGIC: [u8; 8] = *b"DMSIMRS1";
/// First line of a result text.
pub const RESULT_FIRST_LINE: &str = "dmsim-kernel-result 1";

/// A frame: magic, little-endian u64 length, the bytes, zero padding to a
/// whole 512-byte sector.
pub fn write_frame(magic: [u8; 8], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 528);
    out.extend_from_slice(&magic);
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(body);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

/// The body of the frame at the start of `disk`; an error if the magic is
/// wrong or the length runs past the end.
pub fn read_frame(magic: [u8; 8], disk: &[u8]) -> Result<&[u8], ShimError> {
    if disk.len() < 16 || disk[..8] != magic {
        return Err(ShimError::Invalid(format!(
            "no {} frame (found {:?})",
            String::from_utf8_lossy(&magic),
            String::from_utf8_lossy(&disk[..disk.len().min(8)])
        )));
    }
    let len = u64::from_le_bytes(disk[8..16].try_into().expect("8 bytes"));
    if len > (disk.len() - 16) as u64 {
        return Err(ShimError::Invalid(format!("frame of {len} bytes on a disk of {} bytes", disk.len())));
    }
    Ok(&disk[16..16 + len as usize])
}

/// The pool's shape and features, from a trace header (the parameters
/// `dmsim_sim::run::RunConfig::header` writes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    /// The stamps' run id.
    pub run: u64,
    /// Data block size in sectors.
    pub block_sectors: u64,
    /// Data device size in blocks.
    pub data_blocks: u64,
    /// Size of every thin device in blocks.
    pub thin_blocks: u64,
    /// Metadata device size in sectors.
    pub metadata_sectors: u64,
    /// The metadata device's size after the trace's last `grow-metadata`
    /// op ([`PoolSpec::of_trace`]); `metadata_sectors` when it never grows.
    /// A job's metadata slice (and a ublk job's metadata disk) has this
    /// size, and the host reads back this much.
    pub metadata_disk_sectors: u64,
    /// Most thin devices alive at once.
    pub max_devices: usize,
    /// Low water mark in blocks (the simulator's table uses 2).
    pub low_water_mark: u64,
    /// The pool's feature words, in table order.
    pub features: Vec<&'static str>,
    /// `no_space_timeout`, in nanoseconds.
    pub no_space_timeout_ns: u64,
}

impl PoolSpec {
    /// Reads the header; missing or malformed parameters are an error.
    pub fn from_header(h: &Header) -> Result<PoolSpec, ShimError> {
        let get = |name: &str| -> Result<&str, ShimError> {
            h.param(name).ok_or_else(|| ShimError::Invalid(format!("trace header lacks parameter {name:?}")))
        };
        let num = |name: &str| -> Result<u64, ShimError> {
            let v = get(name)?;
            v.parse().map_err(|_| {
                ShimError::Invalid(format!("trace header parameter {name:?}: {v:?} is not a number"))
            })
        };
        let flag = |name: &str| -> Result<bool, ShimError> {
            match get(name)? {
                "0" => Ok(false),
                "1" => Ok(true),
                v => Err(ShimError::Invalid(format!(
                    "trace header parameter {name:?}: expected 0 or 1, got {v:?}"
                ))),
            }
        };
        let mut features = Vec::new();
        for name in
            ["skip_block_zeroing", "ignore_discard", "no_discard_passdown", "read_only", "error_if_no_space"]
        {
            if flag(name)? {
                features.push(name);
            }
        }
        let spec = PoolSpec {
            run: num("run")?,
            block_sectors: num("block_sectors")?,
            data_blocks: num("data_blocks")?,
            thin_blocks: num("thin_blocks")?,
            metadata_sectors: num("metadata_sectors")?,
            metadata_disk_sectors: num("metadata_sectors")?,
            max_devices: num("max_devices")? as usize,
            low_water_mark: 2,
            features,
            no_space_timeout_ns: num("no_space_timeout_ns")?,
        };
        let check = |what: &str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(ShimError::Invalid(format!("trace header: {what} {v} is outside {lo}..={hi}")))
            }
        };
        check("block_sectors", spec.block_sectors, 128, 1 << 21)?;
        if !spec.block_sectors.is_multiple_of(128) {
            return Err(ShimError::Invalid(format!(
                "block_sectors {} is not a multiple of 128",
                spec.block_sectors
            )));
        }
        check("data_blocks", spec.data_blocks, 1, 1 << 16)?;
        check("thin_blocks", spec.thin_blocks, 1, 1 << 16)?;
        check("metadata_sectors", spec.metadata_sectors, 256, 1 << 22)?;
        check("max_devices", spec.max_devices as u64, 1, 1 << 10)?;
        Ok(spec)
    }

    /// As [`PoolSpec::from_header`], with [`PoolSpec::metadata_disk_sectors`]
    /// from the trace's `grow-metadata` ops: each grows the device by its
    /// blocks of 4 KiB, up to the simulator's largest disk, as
    /// `ThinSim`'s growth does.
    pub fn of_trace(trace: &Trace) -> Result<PoolSpec, ShimError> {
        let mut spec = PoolSpec::from_header(&trace.header)?;
        for op in trace.ops() {
            if let Op::GrowMetadata { blocks, .. } = op {
                spec.metadata_disk_sectors = grown_metadata_sectors(spec.metadata_disk_sectors, blocks);
            }
        }
        Ok(spec)
    }

    /// Data device size in sectors.
    pub fn data_sectors(&self) -> u64 {
        self.data_blocks * self.block_sectors
    }

    /// Thin device size in sectors.
    pub fn thin_sectors(&self) -> u64 {
        self.thin_blocks * self.block_sectors
    }

    /// The thin-pool table's parameters after the two device names:
    /// `<block size> <low water mark> <#features> <features…>`.
    pub fn table_tail(&self) -> String {
        let mut s = format!("{} {} {}", self.block_sectors, self.low_water_mark, self.features.len());
        for f in &self.features {
            s.push(' ');
            s.push_str(f);
        }
        s
    }
}

/// A metadata device of `sectors` grown by `blocks` metadata blocks
/// (4 KiB each), never past the simulator's largest disk
/// (`dmsim_sim::run::MAX_DISK_SECTORS`) and never smaller.
pub fn grown_metadata_sectors(sectors: u64, blocks: u32) -> u64 {
    sectors.saturating_add(u64::from(blocks) * 8).min(dmsim_sim::run::MAX_DISK_SECTORS).max(sectors)
}

/// What a ublk job saw at one crash op: the power cut's choice on each
/// disk, the surviving metadata, and every live device read back through
/// the pool rebuilt on the surviving images.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CrashRecord {
    /// The crash op's index among the trace's ops.
    pub op: usize,
    /// Metadata disk: `(kept, unflushed)` volatile writes
    /// (`faults::CrashSummary`).
    pub metadata: (u32, u32),
    /// Data disk: `(kept, unflushed)`.
    pub data: (u32, u32),
    /// One kept write was torn (either disk).
    pub torn: bool,
    /// FNV-1a 64 of the surviving metadata image ([`fnv64`]), before the
    /// rebuilt pool wrote anything.
    pub metadata_fnv: u64,
    /// Mapped virtual blocks per device in the surviving metadata.
    pub mapped: std::collections::BTreeMap<u32, std::collections::BTreeSet<u64>>,
    /// Every live device read back after the rebuild, in creation order.
    pub devices: Vec<DeviceContents>,
    /// The data disk's writes since its last completed flush at the cut,
    /// in the order they reached it (FUA ones included): the order the
    /// crash mode chose among, which the kernel's concurrency fixes and
    /// the trace does not (a request DM core splits, the worker's own
    /// order). The simulator follows it when it has the same writes
    /// (`faults::SimDisk::follow_pending_order`).
    pub data_pending: Vec<dmsim_faults::PendingKey>,
}

/// A pending write's key as `<sector>+<nr>[f]:<fnv in hex>` (`f`: FUA).
fn pending_key_text(k: &dmsim_faults::PendingKey) -> String {
    format!("{}+{}{}:{:016x}", k.sector, k.nr_sectors, if k.fua { "f" } else { "" }, k.fnv)
}

/// [`pending_key_text`] read back; `None` when malformed.
fn parse_pending_key(text: &str) -> Option<dmsim_faults::PendingKey> {
    let (place, fnv) = text.split_once(':')?;
    let (sector, nr) = place.split_once('+')?;
    let (nr, fua) = match nr.strip_suffix('f') {
        Some(nr) => (nr, true),
        None => (nr, false),
    };
    Some(dmsim_faults::PendingKey {
        sector: sector.parse().ok()?,
        nr_sectors: nr.parse().ok()?,
        fua,
        fnv: u64::from_str_radix(fnv, 16).ok()?,
    })
}

pub use dmsim_faults::fnv64;

fn ranges_text(set: &std::collections::BTreeSet<u64>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut it = set.iter().copied().peekable();
    while let Some(a) = it.next() {
        let mut b = a;
        while it.peek() == Some(&(b + 1)) {
            b += 1;
            it.next();
        }
        out.push(if a == b { a.to_string() } else { format!("{a}-{b}") });
    }
    if out.is_empty() {
        "-".into()
    } else {
        out.join(",")
    }
}

fn parse_ranges(text: &str) -> Option<std::collections::BTreeSet<u64>> {
    let mut out = std::collections::BTreeSet::new();
    if text == "-" {
        return Some(out);
    }
    for part in text.split(',') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<u64>().ok()?, b.parse::<u64>().ok()?),
            None => {
                let a = part.parse::<u64>().ok()?;
                (a, a)
            }
        };
        if b < a || b - a > 1 << 24 {
            return None;
        }
        out.extend(a..=b);
    }
    Some(out)
}

/// What the kernel answered to one op of the trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpResult {
    /// The op's index among the trace's ops (0-based).
    pub index: usize,
    /// `ok`, an errno name (`EIO`, `ENOSPC`, …), `skipped` (nothing to do:
    /// no live device, too many devices, the message was refused) or
    /// `unsupported` (faults, metadata growths, and crashes outside a
    /// ublk job: not replayed on the kernel yet; a ublk job answers `ok`
    /// to a crash op and records it in [`KernelResult::crashes`], and
    /// `ok` to a `fault` or `aim-fault` op, armed on its controlled disk).
    pub outcome: String,
    /// For reads: the stamp summary of what came back.
    pub read: Option<String>,
}

/// What a live thin device reads back at the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceContents {
    /// The thin device id.
    pub id: u32,
    /// One stamp summary per data block of the device ([`summarize`]).
    pub blocks: Vec<String>,
}

/// Everything the agent reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelResult {
    /// `uname -r` in the VM.
    pub kernel_release: String,
    /// The device-mapper interface version.
    pub dm_version: [u32; 3],
    /// Registered target types and versions.
    pub targets: Vec<(String, [u32; 3])>,
    /// One entry per op of the trace, in order.
    pub ops: Vec<OpResult>,
    /// The devices alive at the end, in creation order.
    pub devices: Vec<DeviceContents>,
    /// The pool's INFO status line just before teardown.
    pub pool_status: String,
    /// Milliseconds the agent spent: module loading, the ops, the
    /// read-back, the teardown.
    pub timings_ms: Vec<(String, u64)>,
    /// For a logged job: the log-writes target's INFO status line just
    /// before its removal (`<entries> <highest log sector>`).
    pub log_status: Option<String>,
    /// In a cache job with [`CACHE_SETTLE_PARAM`]: op `i`'s index and the
    /// cache's INFO status line (taken without a commit) once its
    /// background work had settled after that op. In a ublk job whose
    /// trace has faults: the pool's INFO status line (without a commit)
    /// after each op.
    pub op_status: Vec<(usize, String)>,
    /// For a ublk job ([`JobKind::Ublk`]): what the controlled disks
    /// served, as `(name, count)`: `metadata-flushes`, `data-fua-writes`…
    /// (see `ublk::RequestCounts::named`), `metadata-volatile-at-stop`
    /// (writes no flush had covered when the device stopped),
    /// `metadata-granted-flags` and `…-max-io-buf-bytes` (as `ADD_DEV`
    /// answered), and `left-devices`, the ublk devices the kernel still
    /// had after the job's teardown.
    pub ublk: Vec<(String, u64)>,
    /// For a ublk job: one record per crash op, in order
    /// ([`CrashRecord`]).
    pub crashes: Vec<CrashRecord>,
    /// For a cache job on controlled disks ([`CACHE_UBLK_PARAM`]): the
    /// durable disks after every op [`crate::durable::is_mark`] names, in
    /// op order ([`crate::durable`]).
    pub durable: Vec<crate::durable::DurableMark>,
    /// What the agent observed besides the ops' results, as `(key,
    /// text)`: a cache job's [`CacheStep::FileWrite`] records
    /// `step<k>.<what>` (its outcome, status lines, `/sys` stat lines); a
    /// ublk job with faults records `fired.<op>` for every armed fault
    /// that fired during op `<op>` (the number of ops: during the final
    /// read-back): `<disk> <request> sector <s> nr <n>: <what>`.
    pub notes: Vec<(String, String)>,
    /// Set when the agent could not finish (the rest is what it got to).
    pub error: Option<String>,
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

impl KernelResult {
    /// The text form.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let v = self.dm_version;
        let _ = writeln!(s, "{RESULT_FIRST_LINE}");
        let _ = writeln!(s, "kernel {}", one_line(&self.kernel_release));
        let _ = writeln!(s, "dm-version {}.{}.{}", v[0], v[1], v[2]);
        for (name, v) in &self.targets {
            let _ = writeln!(s, "target {} {}.{}.{}", one_line(name), v[0], v[1], v[2]);
        }
        for op in &self.ops {
            let _ = write!(s, "op {} {}", op.index, one_line(&op.outcome));
            if let Some(r) = &op.read {
                let _ = write!(s, " | {}", one_line(r));
            }
            s.push('\n');
        }
        for d in &self.devices {
            let _ = writeln!(s, "device {} {}", d.id, d.blocks.len());
            for (i, b) in d.blocks.iter().enumerate() {
                let _ = writeln!(s, "block {} {} {}", d.id, i, one_line(b));
            }
        }
        let _ = writeln!(s, "pool-status {}", one_line(&self.pool_status));
        for (what, ms) in &self.timings_ms {
            let _ = writeln!(s, "time {} {ms}", one_line(what));
        }
        if let Some(l) = &self.log_status {
            let _ = writeln!(s, "log-status {}", one_line(l));
        }
        for (i, line) in &self.op_status {
            let _ = writeln!(s, "op-status {i} {}", one_line(line));
        }
        for (what, n) in &self.ublk {
            let _ = writeln!(s, "ublk {} {n}", one_line(what));
        }
        for c in &self.crashes {
            let _ = writeln!(
                s,
                "crash {} {} {} {} {} {} {:016x}",
                c.op,
                c.metadata.0,
                c.metadata.1,
                c.data.0,
                c.data.1,
                u8::from(c.torn),
                c.metadata_fnv
            );
            for (id, set) in &c.mapped {
                let _ = writeln!(s, "crash-mapped {id} {}", ranges_text(set));
            }
            if !c.data_pending.is_empty() {
                let keys: Vec<String> = c.data_pending.iter().map(pending_key_text).collect();
                let _ = writeln!(s, "crash-pending {}", keys.join(" "));
            }
            for d in &c.devices {
                let _ = writeln!(s, "crash-device {} {}", d.id, d.blocks.len());
                for (i, b) in d.blocks.iter().enumerate() {
                    let _ = writeln!(s, "crash-block {} {} {}", d.id, i, one_line(b));
                }
            }
        }
        for m in &self.durable {
            m.write_text(&mut s);
        }
        for (key, text) in &self.notes {
            let _ = writeln!(s, "note {} {}", one_line(key).replace(' ', "_"), one_line(text));
        }
        if let Some(e) = &self.error {
            let _ = writeln!(s, "error {}", one_line(e));
        }
        s.push_str("end\n");
        s
    }

    /// Parses the concatenated texts of several results (one per job, each
    /// ending with its `end` line); never panics.
    pub fn many_from_text(text: &str) -> Result<Vec<KernelResult>, ShimError> {
        let mut out = Vec::new();
        let mut start = 0;
        let mut pos = 0;
        for line in text.split_inclusive('\n') {
            pos += line.len();
            if line.trim_end() == "end" {
                out.push(KernelResult::from_text(&text[start..pos])?);
                start = pos;
            }
        }
        if !text[start..].trim().is_empty() {
            return Err(ShimError::Invalid(format!(
                "kernel results: {} complete, then a truncated one",
                out.len()
            )));
        }
        Ok(out)
    }

    /// Parses [`Self::to_text`]'s output; never panics.
    pub fn from_text(text: &str) -> Result<KernelResult, ShimError> {
        let bad = |n: usize, line: &str, what: &str| {
            ShimError::Invalid(format!("kernel result line {}: {what}: {line:?}", n + 1))
        };
        let mut lines = text.lines().enumerate();
        match lines.next() {
            Some((_, l)) if l == RESULT_FIRST_LINE => {}
            other => return Err(bad(0, other.map_or("", |(_, l)| l), "not a kernel result")),
        }
        let mut r = KernelResult::default();
        let mut ended = false;
        let version = |n: usize, line: &str, v: &str| -> Result<[u32; 3], ShimError> {
            let parts: Vec<&str> = v.split('.').collect();
            if parts.len() != 3 {
                return Err(bad(n, line, "bad version"));
            }
            let mut out = [0; 3];
            for (o, p) in out.iter_mut().zip(parts) {
                *o = p.parse().map_err(|_| bad(n, line, "bad version"))?;
            }
            Ok(out)
        };
        for (n, line) in lines {
            let (key, rest) = line.split_once(' ').unwrap_or((line, ""));
            match key {
                "kernel" => r.kernel_release = rest.to_string(),
                "dm-version" => r.dm_version = version(n, line, rest)?,
                "target" => {
                    let (name, v) = rest.split_once(' ').ok_or_else(|| bad(n, line, "bad target"))?;
                    r.targets.push((name.to_string(), version(n, line, v)?));
                }
                "op" => {
                    let (head, read) = match rest.split_once(" | ") {
                        Some((h, r)) => (h, Some(r.to_string())),
                        None => (rest, None),
                    };
                    let (index, outcome) = head.split_once(' ').ok_or_else(|| bad(n, line, "bad op"))?;
                    let index = index.parse().map_err(|_| bad(n, line, "bad op index"))?;
                    r.ops.push(OpResult { index, outcome: outcome.to_string(), read });
                }
                "device" => {
                    let (id, count) = rest.split_once(' ').ok_or_else(|| bad(n, line, "bad device"))?;
                    let id = id.parse().map_err(|_| bad(n, line, "bad device id"))?;
                    let count: usize = count.parse().map_err(|_| bad(n, line, "bad block count"))?;
                    r.devices.push(DeviceContents { id, blocks: Vec::with_capacity(count.min(1 << 16)) });
                }
                "block" => {
                    let mut it = rest.splitn(3, ' ');
                    let (Some(id), Some(idx), summary) = (it.next(), it.next(), it.next().unwrap_or(""))
                    else {
                        return Err(bad(n, line, "bad block"));
                    };
                    let id: u32 = id.parse().map_err(|_| bad(n, line, "bad device id"))?;
                    let idx: usize = idx.parse().map_err(|_| bad(n, line, "bad block index"))?;
                    let dev = r.devices.last_mut().filter(|d| d.id == id && d.blocks.len() == idx);
                    let dev = dev.ok_or_else(|| bad(n, line, "block out of order"))?;
                    dev.blocks.push(summary.to_string());
                }
                "pool-status" => r.pool_status = rest.to_string(),
                "time" => {
                    let (what, ms) = rest.rsplit_once(' ').ok_or_else(|| bad(n, line, "bad time"))?;
                    r.timings_ms.push((what.to_string(), ms.parse().map_err(|_| bad(n, line, "bad time"))?));
                }
                "error" => r.error = Some(rest.to_string()),
                "ublk" => {
                    let (what, count) =
                        rest.rsplit_once(' ').ok_or_else(|| bad(n, line, "bad ublk count"))?;
                    let count = count.parse().map_err(|_| bad(n, line, "bad ublk count"))?;
                    r.ublk.push((what.to_string(), count));
                }
                "log-status" => r.log_status = Some(rest.to_string()),
                "note" => {
                    let (key, text) = rest.split_once(' ').unwrap_or((rest, ""));
                    r.notes.push((key.to_string(), text.to_string()));
                }
                "op-status" => {
                    let (i, status) = rest.split_once(' ').unwrap_or((rest, ""));
                    let i = i.parse().map_err(|_| bad(n, line, "bad op-status index"))?;
                    r.op_status.push((i, status.to_string()));
                }
                "crash" => {
                    let f: Vec<&str> = rest.split(' ').collect();
                    let num = |i: usize| -> Result<u32, ShimError> {
                        f.get(i).and_then(|v| v.parse().ok()).ok_or_else(|| bad(n, line, "bad crash"))
                    };
                    let op =
                        f.first().and_then(|v| v.parse().ok()).ok_or_else(|| bad(n, line, "bad crash"))?;
                    let fnv = f
                        .get(6)
                        .and_then(|v| u64::from_str_radix(v, 16).ok())
                        .ok_or_else(|| bad(n, line, "bad crash"))?;
                    if f.len() != 7 {
                        return Err(bad(n, line, "bad crash"));
                    }
                    r.crashes.push(CrashRecord {
                        op,
                        metadata: (num(1)?, num(2)?),
                        data: (num(3)?, num(4)?),
                        torn: num(5)? != 0,
                        metadata_fnv: fnv,
                        ..CrashRecord::default()
                    });
                }
                "crash-mapped" => {
                    let c = r.crashes.last_mut().ok_or_else(|| bad(n, line, "mapped before a crash"))?;
                    let (id, set) = rest.split_once(' ').ok_or_else(|| bad(n, line, "bad crash-mapped"))?;
                    let id = id.parse().map_err(|_| bad(n, line, "bad device id"))?;
                    let set = parse_ranges(set).ok_or_else(|| bad(n, line, "bad crash-mapped ranges"))?;
                    c.mapped.insert(id, set);
                }
                "crash-pending" => {
                    let c = r.crashes.last_mut().ok_or_else(|| bad(n, line, "pending before a crash"))?;
                    c.data_pending = rest
                        .split(' ')
                        .map(parse_pending_key)
                        .collect::<Option<_>>()
                        .ok_or_else(|| bad(n, line, "bad crash-pending"))?;
                }
                "crash-device" => {
                    let c = r.crashes.last_mut().ok_or_else(|| bad(n, line, "device before a crash"))?;
                    let (id, count) = rest.split_once(' ').ok_or_else(|| bad(n, line, "bad crash-device"))?;
                    let id = id.parse().map_err(|_| bad(n, line, "bad device id"))?;
                    let count: usize = count.parse().map_err(|_| bad(n, line, "bad block count"))?;
                    c.devices.push(DeviceContents { id, blocks: Vec::with_capacity(count.min(1 << 16)) });
                }
                "crash-block" => {
                    let mut it = rest.splitn(3, ' ');
                    let (Some(id), Some(idx), summary) = (it.next(), it.next(), it.next().unwrap_or(""))
                    else {
                        return Err(bad(n, line, "bad crash-block"));
                    };
                    let id: u32 = id.parse().map_err(|_| bad(n, line, "bad device id"))?;
                    let idx: usize = idx.parse().map_err(|_| bad(n, line, "bad block index"))?;
                    let dev = r
                        .crashes
                        .last_mut()
                        .and_then(|c| c.devices.last_mut())
                        .filter(|d| d.id == id && d.blocks.len() == idx);
                    let dev = dev.ok_or_else(|| bad(n, line, "crash block out of order"))?;
                    dev.blocks.push(summary.to_string());
                }
                "end" => {
                    ended = true;
                    break;
                }
                _ if crate::durable::DurableMark::parse_line(key, rest, &mut r.durable)
                    .map_err(|e| bad(n, line, &e))? => {}
                _ => return Err(bad(n, line, "unknown line")),
            }
        }
        if !ended {
            return Err(ShimError::Invalid("kernel result is truncated (no end line)".into()));
        }
        Ok(r)
    }
}

/// A summary of what `data` (read from a thin device at `first_sector`)
/// holds, as runs: `wK*N` N sectors of write K stamped for the sector they
/// were read from, `0*N` zeroes, `?*N` anything that is not a stamp,
/// `wK@sS*1` a stamp of write K meant for another sector S, `x*N` stamps
/// of another run. The device a stamp names is not compared: a snapshot
/// reads its origin's writes. Write numbers are unique within a run, so a
/// leak between devices still shows as a write that device never had.
pub fn summarize(data: &[u8], run: u64, first_sector: u64) -> String {
    let mut runs: Vec<(String, u32)> = Vec::new();
    for (i, content) in stamp::decode(data).into_iter().enumerate() {
        let sector = first_sector + i as u64;
        let token = match content {
            SectorContent::Zeroes => "0".to_string(),
            SectorContent::Foreign => "?".to_string(),
            SectorContent::Stamp(s) if s.run != run => "x".to_string(),
            SectorContent::Stamp(s) if s.sector == sector => format!("w{}", s.write),
            SectorContent::Stamp(s) => format!("w{}@s{}", s.write, s.sector),
        };
        match runs.last_mut() {
            Some((t, n)) if *t == token && !t.contains('@') => *n += 1,
            _ => runs.push((token, 1)),
        }
    }
    runs.iter().map(|(t, n)| format!("{t}*{n}")).collect::<Vec<_>>().join(" ")
}

/// First line of a request body.
pub const REQUEST_FIRST_LINE: &str = "dmsim-kernel-request 2";

/// What the agent does with one trace of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobKind {
    /// A fresh pool (metadata zeroed, data filled with the simulator's
    /// garbage byte by the agent), the trace's ops, read-back, teardown.
    Replay,
    /// A pool activated on the metadata and data the host put in the job's
    /// slices (images another implementation wrote), the thin devices
    /// `ids` activated and read back; the trace's ops are not run.
    Activate {
        /// Thin device ids to activate and read, in this order.
        ids: Vec<u32>,
    },
    /// As [`JobKind::Replay`], with the pool's metadata and data devices
    /// carved by dm-linear out of one dm-log-writes device (spec §7.2, §9),
    /// its log on the job's slice of the log disk, and a mark `op<i>` in
    /// the log after every op `i` (see [`mark_name`]). Each of `messages`
    /// (`(i, text)`) is a pool message sent just before op `i` (after op
    /// `i - 1`'s mark; `i` may be the number of ops: after the last op),
    /// in list order, each followed by a mark [`message_mark_name`]`(k)`,
    /// `k` its place in the list. A message the kernel refuses stops the
    /// job with an error.
    Logged {
        /// Pool messages (no spaces, commas or colons in the text) and the
        /// op each goes before.
        messages: Vec<(usize, String)>,
    },
    /// As [`JobKind::Replay`], with the pool's metadata and data devices
    /// each on dm-flakey (never down at first). A trace op `fault metadata
    /// write-error` or `fault data write-error` swaps that device's table
    /// to `error_writes`, always down (spec §7.3): from then on every write
    /// to it fails with EIO. Other faults are `unsupported`.
    Flakey,
    /// A dm-cache device ([`CacheSpec`], from the trace's header) over the
    /// metadata, cache and origin images the host put in the job's slices
    /// (zeroed metadata: the kernel formats it). The trace's reads, writes,
    /// discards and flushes go to the cache device; a `tick` sleeps that
    /// long and returns the status line; `worker` suspends and resumes the
    /// cache device (a clean shutdown, then the same table again); `crash`
    /// swaps the metadata device's table to `error`, so that its content
    /// stays what the kernel had written by then. At the end the final
    /// status is taken and the device suspended and removed (a clean
    /// shutdown, unless crashed). No read-back: every read is one the
    /// policy sees.
    Cache,
    /// As [`JobKind::Replay`], with the pool's metadata and data devices
    /// served by the agent through ublk (`crate::ublk`): controlled disks
    /// in guest RAM with a volatile write cache and FUA, the metadata
    /// starting zeroed and the data filled with [`crate::vm::DATA_FILL`].
    /// After the teardown the devices are stopped and deleted, and the
    /// durable images are written to the job's slices (the host reads the
    /// metadata image there); the result counts the requests served
    /// ([`KernelResult::ublk`]).
    Ublk,
    /// As [`JobKind::Ublk`], the pool being the userland engine's
    /// (`dmsim_engine::serve`, this agent started again as `engine …`) on
    /// the controlled disks rather than the kernel's dm-thin: its thin
    /// devices are ublk devices the engine serves with `depth` tags each
    /// (1: one request at a time); a crash op cuts the disks' power and
    /// kills the engine (`SIGKILL`), and a new engine opens what survives.
    Engine(EngineJob),
    /// As [`JobKind::Ublk`], with the trace's ops run as `steps` say
    /// rather than one after another: some started on a thread of their
    /// own and left in flight, the data disk's reads held at a gate
    /// (`crate::ublk::UblkDevice::hold_reads`) while other ops run, then
    /// released. An op no step names is not run (the trace's `worker` and
    /// `complete` ops say what the simulator does meanwhile). No quiet
    /// window, no power cut, no fault: a race as the trace's `complete`
    /// ops order it, for the findings that turn on one.
    Race {
        /// What the agent does, in order.
        steps: Vec<RaceStep>,
    },
}

/// The controlled disk a [`RaceStep`]'s gate step acts on: a thin pool's
/// data disk (written without a prefix: `hold-reads`) or metadata disk
/// (`metadata:`), a cache's metadata, cache or origin disk (`metadata:`,
/// `cache:`, `origin:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RaceDisk {
    /// A thin pool's data disk (no prefix).
    Data,
    /// The metadata disk, of a pool or a cache (`metadata:`).
    Metadata,
    /// A cache's cache (fast) disk (`cache:`).
    Cache,
    /// A cache's origin disk (`origin:`).
    Origin,
}

impl RaceDisk {
    /// The prefix a gate step on this disk is written with (`""` for the
    /// data disk).
    pub fn prefix(self) -> &'static str {
        match self {
            RaceDisk::Data => "",
            RaceDisk::Metadata => "metadata:",
            RaceDisk::Cache => "cache:",
            RaceDisk::Origin => "origin:",
        }
    }

    /// The disk's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            RaceDisk::Data => "data",
            RaceDisk::Metadata => "metadata",
            RaceDisk::Cache => "cache",
            RaceDisk::Origin => "origin",
        }
    }

    /// Whether a cache job has this disk (a thin job has the data and the
    /// metadata disks).
    pub fn in_cache(self) -> bool {
        self != RaceDisk::Data
    }

    /// Whether a thin pool's job has this disk.
    pub fn in_thin(self) -> bool {
        matches!(self, RaceDisk::Data | RaceDisk::Metadata)
    }
}

/// One step of a race: a [`JobKind::Race`] job's, or a cache job's
/// ([`CACHE_RACE_PARAM`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RaceStep {
    /// Run op `i` and wait for it (text `i`).
    Op(usize),
    /// Start op `i` on a thread of its own and go on (text `bg<i>`): a
    /// read, write, discard or flush.
    Background(usize),
    /// Hold `disk`'s requests of these kinds from now on, until picked or
    /// released (`crate::ublk::UblkDevice::gate`); text: the disk's
    /// [`RaceDisk::prefix`], `hold-` and the kinds joined by `+`
    /// (`hold-reads`, `cache:hold-writes+flushes`), or `hold-all` for the
    /// three.
    Hold {
        /// The disk.
        disk: RaceDisk,
        /// Hold reads.
        reads: bool,
        /// Hold writes.
        writes: bool,
        /// Hold flushes (the pool's commit flushes the data disk first and
        /// waits for it).
        flushes: bool,
    },
    /// Wait until `disk` holds `n` requests (text `held=<n>`, with the
    /// disk's prefix), at most [`RACE_WAIT`].
    Held {
        /// The disk.
        disk: RaceDisk,
        /// How many requests.
        n: usize,
    },
    /// Serve the `k`-th request `disk` holds (0: the oldest) and wait
    /// until it is served, keeping the others held (text `serve=<k>`, with
    /// the disk's prefix).
    Serve {
        /// The disk.
        disk: RaceDisk,
        /// Which held request.
        k: usize,
    },
    /// Serve every held request on every disk, in order, and stop holding
    /// (text `release`).
    Release,
    /// Wait for op `i`, started in the background (text `wait<i>`).
    Wait(usize),
    /// Sleep `ms` milliseconds (text `pause=<ms>`): for the kernel to take
    /// in a request nothing outside it can see arrive (a discard waiting
    /// in the pool for I/O before it). A judgement of the kernel's speed,
    /// not a proof; the test that uses one says what it waits for.
    Pause(u64),
    /// Wait for every op started in the background (text `join`).
    Join,
}

/// How long a [`RaceStep::Held`] or [`RaceStep::Serve`] waits before the
/// job fails.
pub const RACE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl RaceStep {
    /// The step's text in a job line.
    pub fn to_text(self) -> String {
        match self {
            RaceStep::Op(i) => i.to_string(),
            RaceStep::Background(i) => format!("bg{i}"),
            RaceStep::Hold { disk, reads, writes, flushes } => {
                let kinds: Vec<&str> = [(reads, "reads"), (writes, "writes"), (flushes, "flushes")]
                    .into_iter()
                    .filter_map(|(on, name)| on.then_some(name))
                    .collect();
                // Holding nothing is opening the gate.
                let kinds = if kinds.is_empty() { "nothing".to_string() } else { kinds.join("+") };
                format!("{}hold-{kinds}", disk.prefix())
            }
            RaceStep::Held { disk, n } => format!("{}held={n}", disk.prefix()),
            RaceStep::Serve { disk, k } => format!("{}serve={k}", disk.prefix()),
            RaceStep::Release => "release".into(),
            RaceStep::Wait(i) => format!("wait{i}"),
            RaceStep::Pause(ms) => format!("pause={ms}"),
            RaceStep::Join => "join".into(),
        }
    }

    /// Parses [`RaceStep::to_text`]'s output; `None` if it is not one.
    pub fn parse(text: &str) -> Option<RaceStep> {
        let number =
            |t: &str| t.parse().ok().filter(|_| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()));
        let (disk, t) = [RaceDisk::Metadata, RaceDisk::Cache, RaceDisk::Origin]
            .into_iter()
            .find_map(|d| text.strip_prefix(d.prefix()).map(|rest| (d, rest)))
            .unwrap_or((RaceDisk::Data, text));
        // A gate step on a disk, or a step of the job as a whole (no
        // prefix).
        let gate = if let Some(kinds) = t.strip_prefix("hold-") {
            let (mut reads, mut writes, mut flushes) = (false, false, false);
            match kinds {
                "all" => (reads, writes, flushes) = (true, true, true),
                "nothing" => {}
                kinds => {
                    for kind in kinds.split('+') {
                        let seen = match kind {
                            "reads" => &mut reads,
                            "writes" => &mut writes,
                            "flushes" => &mut flushes,
                            _ => return None,
                        };
                        if *seen {
                            return None;
                        }
                        *seen = true;
                    }
                }
            }
            Some(RaceStep::Hold { disk, reads, writes, flushes })
        } else if let Some(n) = t.strip_prefix("held=") {
            Some(RaceStep::Held { disk, n: number(n)? })
        } else if let Some(k) = t.strip_prefix("serve=") {
            Some(RaceStep::Serve { disk, k: number(k)? })
        } else {
            None
        };
        if gate.is_some() {
            return gate;
        }
        if disk != RaceDisk::Data {
            return None;
        }
        match t {
            "release" => Some(RaceStep::Release),
            "join" => Some(RaceStep::Join),
            t => {
                if let Some(ms) = t.strip_prefix("pause=") {
                    number(ms).map(|ms: usize| RaceStep::Pause(ms as u64))
                } else if let Some(i) = t.strip_prefix("wait") {
                    number(i).map(RaceStep::Wait)
                } else if let Some(i) = t.strip_prefix("bg") {
                    number(i).map(RaceStep::Background)
                } else {
                    number(t).map(RaceStep::Op)
                }
            }
        }
    }

    /// Steps as a job line or a header parameter carries them: their
    /// texts joined by commas.
    pub fn list_text(steps: &[RaceStep]) -> String {
        steps.iter().map(|s| s.to_text()).collect::<Vec<_>>().join(",")
    }

    /// Parses [`Self::list_text`]'s output; `None` if a step is not one.
    pub fn parse_list(text: &str) -> Option<Vec<RaceStep>> {
        text.split(',').map(RaceStep::parse).collect()
    }

    /// The op the step runs, if it runs one.
    pub fn op(self) -> Option<usize> {
        match self {
            RaceStep::Op(i) | RaceStep::Background(i) => Some(i),
            _ => None,
        }
    }

    /// The disk a gate step acts on (`None` for the other steps).
    pub fn disk(self) -> Option<RaceDisk> {
        match self {
            RaceStep::Hold { disk, .. } | RaceStep::Held { disk, .. } | RaceStep::Serve { disk, .. } => {
                Some(disk)
            }
            _ => None,
        }
    }
}

/// The text of the log mark the agent drops after op `index` of a logged
/// job.
pub fn mark_name(index: usize) -> String {
    format!("op{index}")
}

/// The text of the log mark the agent drops after the `k`-th pool message
/// of a logged job ([`JobKind::Logged`]'s `messages`).
pub fn message_mark_name(k: usize) -> String {
    format!("msg{k}")
}

/// Sectors of the log disk each logged job gets (1 GiB; the file is
/// sparse, and the host reads only the log's length).
pub const LOG_SLICE_SECTORS: u64 = 1 << 21;

/// Where each job's log starts on the log disk (`None` for jobs that are
/// not logged), and the log disk's size in sectors (at least 1 MiB).
pub fn log_offsets(kinds: &[JobKind]) -> (Vec<Option<u64>>, u64) {
    let mut end = 0;
    let offsets = kinds
        .iter()
        .map(|k| {
            matches!(k, JobKind::Logged { .. }).then(|| {
                end += LOG_SLICE_SECTORS;
                end - LOG_SLICE_SECTORS
            })
        })
        .collect();
    (offsets, end.max(SLICE_ALIGN))
}

/// How an engine job runs the engine ([`JobKind::Engine`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineJob {
    /// Tags per thin device's queue (1: one request at a time).
    pub depth: u16,
    /// The commit period in milliseconds; 0: the model's own (one second,
    /// the kernel's `COMMIT_PERIOD`).
    pub commit_period_ms: u64,
    /// The deliberately broken engine: a FLUSH acknowledged before any
    /// commit covers it (`dmsim_engine::EngineMutations::ack_flush_early`).
    pub ack_flush_early: bool,
    /// The deliberately broken engine that acknowledges every eighth write
    /// without doing it (`dmsim_engine::EngineMutations::drop_writes`).
    pub drop_writes: bool,
    /// The engine's clock is the trace's (`dmsim_engine::EngineConfig::
    /// trace_clock`): the agent sends the sum of the trace's `tick` ops
    /// at each, so that the engine commits where the serialized
    /// simulator does; `commit_period_ms` is ignored then. Otherwise real
    /// time.
    pub trace_clock: bool,
    /// The engine commits where the kernel did: the job comes right after
    /// a kernel job ([`JobKind::Ublk`]) of the same trace in the same
    /// boot; the engine's clock is a trace clock that `tick` ops do not
    /// move (no timed commit of its own), and after every op after which
    /// the kernel's superblock had changed (for a crash op, before its
    /// power cut) the agent asks it to commit. Its result notes
    /// [`crate::equivalence::CLOCK_NOTE`] = `kernel-commits` and
    /// [`FORCED_COMMITS_NOTE`]. Implies `trace_clock`.
    pub follow_kernel: bool,
}

impl EngineJob {
    /// The serialized engine: depth 1, the model's commit period on the
    /// trace's clock, no bug.
    pub fn serialized() -> EngineJob {
        EngineJob {
            depth: 1,
            commit_period_ms: 0,
            ack_flush_early: false,
            drop_writes: false,
            trace_clock: true,
            follow_kernel: false,
        }
    }

    /// The serialized engine committing where the kernel job before it
    /// did ([`Self::follow_kernel`]): what `--on all` runs, so that the
    /// kernel's and the engine's metadata can be held against each other.
    pub fn following_kernel() -> EngineJob {
        EngineJob { follow_kernel: true, ..EngineJob::serialized() }
    }

    /// The engine at queue depth `depth`: serialized (and on the trace's
    /// clock) at 1; on real time above, where the order of completions is
    /// the machine's anyway.
    pub fn at_depth(depth: u16) -> EngineJob {
        EngineJob { depth, trace_clock: depth <= 1, ..EngineJob::serialized() }
    }

    /// `depth,period[,trace-clock][,follow-kernel][,ack-flush-early][,drop-writes]`,
    /// one word of a job line.
    pub fn text(&self) -> String {
        let mut s = format!("{},{}", self.depth, self.commit_period_ms);
        if self.trace_clock {
            s.push_str(",trace-clock");
        }
        if self.follow_kernel {
            s.push_str(",follow-kernel");
        }
        if self.ack_flush_early {
            s.push_str(",ack-flush-early");
        }
        if self.drop_writes {
            s.push_str(",drop-writes");
        }
        s
    }

    /// Parses [`EngineJob::text`]; `None` when malformed.
    pub fn parse(word: &str) -> Option<EngineJob> {
        let mut parts = word.split(',');
        let depth: u16 = parts.next()?.parse().ok().filter(|&d| d >= 1)?;
        let commit_period_ms = parts.next()?.parse().ok()?;
        let mut job = EngineJob { depth, commit_period_ms, trace_clock: false, ..EngineJob::serialized() };
        for bug in parts {
            match bug {
                "trace-clock" if !job.trace_clock => job.trace_clock = true,
                "follow-kernel" if !job.follow_kernel => job.follow_kernel = true,
                "ack-flush-early" if !job.ack_flush_early => job.ack_flush_early = true,
                "drop-writes" if !job.drop_writes => job.drop_writes = true,
                _ => return None,
            }
        }
        // Following the kernel's commits is on a trace clock, at depth 1.
        if job.follow_kernel && !(job.trace_clock && job.depth == 1) {
            return None;
        }
        Some(job)
    }
}

impl JobKind {
    /// Whether the agent prepares fresh disks for this job.
    pub fn is_fresh(&self) -> bool {
        matches!(
            self,
            JobKind::Replay
                | JobKind::Logged { .. }
                | JobKind::Flakey
                | JobKind::Ublk
                | JobKind::Race { .. }
                | JobKind::Engine(_)
        )
    }
}

/// A request body: [`REQUEST_FIRST_LINE`], then per job a line
/// `job replay <len>`, `job logged <len>` or `job activate <len> <id,id,…|->` followed by
/// `len` bytes of the trace's text encoding. The jobs run one after the
/// other; see [`encode_request_concurrent`].
pub fn encode_request(jobs: &[(JobKind, String)]) -> Vec<u8> {
    encode_request_concurrent(jobs, 1)
}

/// As [`encode_request`], asking the agent to run up to `concurrent` jobs
/// at a time (a line `concurrent <n>` after the first, only when `n` > 1):
/// each job has its own devices and disk slices, so their waits (a
/// trace's ticks are real time in the guest) overlap. A job that reads
/// the result of the one before (an engine job following the kernel's
/// commits) still runs after it.
pub fn encode_request_concurrent(jobs: &[(JobKind, String)], concurrent: usize) -> Vec<u8> {
    let mut out = format!("{REQUEST_FIRST_LINE}\n").into_bytes();
    if concurrent > 1 {
        out.extend_from_slice(format!("concurrent {concurrent}\n").as_bytes());
    }
    for (kind, text) in jobs {
        let line = match kind {
            JobKind::Replay => format!("job replay {}\n", text.len()),
            JobKind::Logged { messages } if messages.is_empty() => format!("job logged {}\n", text.len()),
            JobKind::Logged { messages } => {
                let m: Vec<String> = messages.iter().map(|(i, t)| format!("{i}:{t}")).collect();
                format!("job logged {} {}\n", text.len(), m.join(","))
            }
            JobKind::Flakey => format!("job flakey {}\n", text.len()),
            JobKind::Ublk => format!("job ublk {}\n", text.len()),
            JobKind::Engine(e) => format!("job engine {} {}\n", text.len(), e.text()),
            JobKind::Cache => format!("job cache {}\n", text.len()),
            JobKind::Race { steps } => {
                let steps = if steps.is_empty() { "-".to_string() } else { RaceStep::list_text(steps) };
                format!("job race {} {steps}\n", text.len())
            }
            JobKind::Activate { ids } => {
                let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
                let ids = if ids.is_empty() { "-".to_string() } else { ids.join(",") };
                format!("job activate {} {ids}\n", text.len())
            }
        };
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(text.as_bytes());
    }
    out
}

/// Parses [`encode_request`]'s output into jobs; never panics.
pub fn decode_request(body: &[u8]) -> Result<Vec<(JobKind, dmsim_traces::Trace)>, ShimError> {
    decode_request_concurrent(body).map(|(jobs, _)| jobs)
}

/// Parses [`encode_request_concurrent`]'s output into jobs and how many
/// may run at a time (1 without the line); never panics.
pub fn decode_request_concurrent(
    body: &[u8],
) -> Result<(Vec<(JobKind, dmsim_traces::Trace)>, usize), ShimError> {
    let bad = |what: String| ShimError::Invalid(format!("request: {what}"));
    let line_at = |at: usize| -> Result<(&str, usize), ShimError> {
        let rest = &body[at.min(body.len())..];
        let end =
            rest.iter().position(|&b| b == b'\n').ok_or_else(|| bad(format!("no line at byte {at}")))?;
        let line = std::str::from_utf8(&rest[..end]).map_err(|e| bad(format!("line at byte {at}: {e}")))?;
        Ok((line, at + end + 1))
    };
    let (first, mut at) = line_at(0)?;
    if first != REQUEST_FIRST_LINE {
        return Err(bad(format!("first line {first:?}, expected {REQUEST_FIRST_LINE:?}")));
    }
    let mut concurrent = 1;
    if body.get(at..).is_some_and(|rest| rest.starts_with(b"concurrent ")) {
        let (line, next) = line_at(at)?;
        concurrent = match line.strip_prefix("concurrent ").map(str::parse::<usize>) {
            Some(Ok(n)) if (1..=MAX_CONCURRENT_JOBS).contains(&n) => n,
            _ => {
                return Err(bad(format!(
                    "bad line {line:?}: expected `concurrent N`, N from 1 to {MAX_CONCURRENT_JOBS}"
                )))
            }
        };
        at = next;
    }
    let mut jobs = Vec::new();
    while at < body.len() {
        let (line, next) = line_at(at)?;
        let words: Vec<&str> = line.split(' ').collect();
        let len: usize = match words.get(2).map(|w| w.parse()) {
            Some(Ok(n)) if words[0] == "job" => n,
            _ => return Err(bad(format!("bad job line {line:?}"))),
        };
        let kind = match (words[1], words.get(3)) {
            ("replay", None) => JobKind::Replay,
            ("logged", None) => JobKind::Logged { messages: Vec::new() },
            ("logged", Some(m)) if words.len() == 4 => {
                let parse = |one: &str| -> Option<(usize, String)> {
                    let (i, t) = one.split_once(':')?;
                    Some((i.parse().ok()?, t.to_string())).filter(|(_, t)| !t.is_empty())
                };
                let messages: Option<Vec<_>> = m.split(',').map(parse).collect();
                JobKind::Logged {
                    messages: messages.ok_or_else(|| bad(format!("bad messages in {line:?}")))?,
                }
            }
            ("flakey", None) => JobKind::Flakey,
            ("ublk", None) => JobKind::Ublk,
            ("engine", Some(e)) if words.len() == 4 => JobKind::Engine(
                EngineJob::parse(e).ok_or_else(|| bad(format!("bad engine job in {line:?}")))?,
            ),
            ("cache", None) => JobKind::Cache,
            ("race", Some(&"-")) if words.len() == 4 => JobKind::Race { steps: Vec::new() },
            ("race", Some(steps)) if words.len() == 4 => {
                let steps = RaceStep::parse_list(steps);
                JobKind::Race { steps: steps.ok_or_else(|| bad(format!("bad race steps in {line:?}")))? }
            }
            ("activate", Some(&"-")) if words.len() == 4 => JobKind::Activate { ids: Vec::new() },
            ("activate", Some(ids)) if words.len() == 4 => {
                let ids: Result<Vec<u32>, _> = ids.split(',').map(str::parse).collect();
                JobKind::Activate { ids: ids.map_err(|_| bad(format!("bad device ids in {line:?}")))? }
            }
            _ => return Err(bad(format!("bad job line {line:?}"))),
        };
        let end = next.checked_add(len).filter(|&e| e <= body.len());
        let end = end.ok_or_else(|| bad(format!("job {} runs past the end", jobs.len())))?;
        let text = std::str::from_utf8(&body[next..end])
            .map_err(|e| bad(format!("job {}: not UTF-8: {e}", jobs.len())))?;
        let trace =
            dmsim_traces::from_text(text).map_err(|e| bad(format!("job {}: trace: {e}", jobs.len())))?;
        jobs.push((kind, trace));
        at = end;
    }
    Ok((jobs, concurrent))
}

/// The most jobs a request may ask to run at a time.
pub const MAX_CONCURRENT_JOBS: usize = 64;

/// Where one job's pool lives on the VM's two pool disks, in sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    /// First sector of the job's metadata device on the metadata disk.
    pub metadata_offset: u64,
    /// First sector of the job's data device on the data disk.
    pub data_offset: u64,
}

/// The pool disks of one boot: every job gets its own metadata slice (so
/// the host reads each job's metadata image afterwards); fresh jobs share
/// the data disk's first region, refilled by the agent before each one;
/// activation jobs get their own data slices, written by the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Per job, in order.
    pub slices: Vec<Slice>,
    /// Size of the metadata disk in sectors.
    pub metadata_sectors: u64,
    /// Size of the data disk in sectors.
    pub data_sectors: u64,
}

/// Slices start on 1 MiB boundaries.
const SLICE_ALIGN: u64 = 2048;

impl Layout {
    /// The layout of `jobs` (their pool specs and whether they are fresh).
    pub fn of(jobs: &[(&PoolSpec, bool)]) -> Layout {
        let align = |n: u64| n.div_ceil(SLICE_ALIGN) * SLICE_ALIGN;
        let shared = jobs.iter().filter(|(_, fresh)| *fresh).map(|(s, _)| align(s.data_sectors())).max();
        let mut data_end = shared.unwrap_or(0);
        let mut metadata_end = 0;
        let mut slices = Vec::new();
        for (spec, fresh) in jobs {
            let data_offset = if *fresh {
                0
            } else {
                data_end += align(spec.data_sectors());
                data_end - align(spec.data_sectors())
            };
            slices.push(Slice { metadata_offset: metadata_end, data_offset });
            metadata_end += align(spec.metadata_disk_sectors);
        }
        Layout {
            slices,
            metadata_sectors: metadata_end.max(SLICE_ALIGN),
            data_sectors: data_end.max(SLICE_ALIGN),
        }
    }
}

/// A dm-cache job's device (spec §4.5): `cache <metadata> <cache>
/// <origin> <block size> <#features> <mode> [metadata2] smq <#args>
/// [migration_threshold <n>]`, over three dm-linear slices: the job's
/// metadata slice, and on its data slice the cache device followed by the
/// origin device. Travels as the parameters of a trace header
/// ([`CacheSpec::header`]) that also reads as a [`PoolSpec`] (data blocks =
/// cache + origin blocks), so [`Layout`] places it like an activation job.
///
/// A job that resizes the cache (the `resize` op) has disks larger than the
/// first table's devices ([`CacheSpec::disk_blocks`]): the cache device is
/// a dm-linear over the first blocks of its disk, reloaded with another
/// length at each resize; the origin device is its whole disk, and the
/// table's length says how much of it is cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSpec {
    /// The stamps' run id.
    pub run: u64,
    /// Cache block size in sectors (a multiple of 128 here).
    pub block_sectors: u64,
    /// Cache device size in blocks.
    pub cache_blocks: u64,
    /// Origin device size in blocks (the cache device's length).
    pub origin_blocks: u64,
    /// Metadata device size in sectors.
    pub metadata_sectors: u64,
    /// The `metadata2` feature (metadata version 2 when formatting).
    pub metadata2: bool,
    /// `writeback` or `writethrough`.
    pub mode: String,
    /// The core's `migration_threshold` policy argument (sectors), if given.
    pub migration_threshold: Option<u64>,
    /// The blocks of the disks under the cache and origin devices, when
    /// larger than `cache_blocks` and `origin_blocks` (room for resizes);
    /// None: the devices' sizes.
    pub disk_blocks: Option<(u64, u64)>,
}

impl CacheSpec {
    /// Cache device size in sectors.
    pub fn cache_sectors(&self) -> u64 {
        self.cache_blocks * self.block_sectors
    }

    /// Origin device size in sectors.
    pub fn origin_sectors(&self) -> u64 {
        self.origin_blocks * self.block_sectors
    }

    /// The cache disk's size in sectors (the cache device's, or more).
    pub fn cache_disk_sectors(&self) -> u64 {
        self.disk_blocks.map_or(self.cache_blocks, |d| d.0) * self.block_sectors
    }

    /// The origin disk's size in sectors (the origin device's, or more).
    pub fn origin_disk_sectors(&self) -> u64 {
        self.disk_blocks.map_or(self.origin_blocks, |d| d.1) * self.block_sectors
    }

    /// The trace header carrying this spec (a valid [`PoolSpec`] header too).
    pub fn header(&self) -> Header {
        let mut params: Vec<(String, String)> = vec![
            ("run".into(), self.run.to_string()),
            ("block_sectors".into(), self.block_sectors.to_string()),
            (
                "data_blocks".into(),
                ((self.cache_disk_sectors() + self.origin_disk_sectors()) / self.block_sectors).to_string(),
            ),
            ("thin_blocks".into(), self.origin_blocks.to_string()),
            ("metadata_sectors".into(), self.metadata_sectors.to_string()),
            ("max_devices".into(), "1".into()),
            ("no_space_timeout_ns".into(), "1000000000".into()),
        ];
        for f in
            ["skip_block_zeroing", "ignore_discard", "no_discard_passdown", "read_only", "error_if_no_space"]
        {
            params.push((f.into(), "0".into()));
        }
        params.push(("cache_blocks".into(), self.cache_blocks.to_string()));
        params.push(("origin_blocks".into(), self.origin_blocks.to_string()));
        params.push(("cache_metadata2".into(), u8::from(self.metadata2).to_string()));
        params.push(("cache_mode".into(), self.mode.clone()));
        if let Some(t) = self.migration_threshold {
            params.push(("migration_threshold".into(), t.to_string()));
        }
        if let Some((c, o)) = self.disk_blocks {
            params.push(("cache_disk_blocks".into(), c.to_string()));
            params.push(("origin_disk_blocks".into(), o.to_string()));
        }
        Header { seed: 0, workload: "cache".into(), params }
    }

    /// Reads [`Self::header`]'s parameters back; an error if one is
    /// missing or out of range.
    pub fn from_header(h: &Header) -> Result<CacheSpec, ShimError> {
        let pool = PoolSpec::from_header(h)?;
        let get = |name: &str| -> Result<&str, ShimError> {
            h.param(name).ok_or_else(|| ShimError::Invalid(format!("cache job header lacks {name:?}")))
        };
        let num = |name: &str| -> Result<u64, ShimError> {
            let v = get(name)?;
            v.parse()
                .map_err(|_| ShimError::Invalid(format!("cache job header: {name} {v:?} is not a number")))
        };
        let mode = get("cache_mode")?.to_string();
        if mode != "writeback" && mode != "writethrough" {
            return Err(ShimError::Invalid(format!("cache job header: mode {mode:?}")));
        }
        let spec = CacheSpec {
            run: pool.run,
            block_sectors: pool.block_sectors,
            cache_blocks: num("cache_blocks")?,
            origin_blocks: num("origin_blocks")?,
            metadata_sectors: pool.metadata_sectors,
            metadata2: get("cache_metadata2")? == "1",
            mode,
            migration_threshold: h
                .param("migration_threshold")
                .map(|_| num("migration_threshold"))
                .transpose()?,
            disk_blocks: match h.param("cache_disk_blocks") {
                None => None,
                Some(_) => Some((num("cache_disk_blocks")?, num("origin_disk_blocks")?)),
            },
        };
        let (cache_disk, origin_disk) = spec.disk_blocks.unwrap_or((spec.cache_blocks, spec.origin_blocks));
        if spec.cache_blocks == 0
            || spec.origin_blocks == 0
            || cache_disk < spec.cache_blocks
            || origin_disk < spec.origin_blocks
            || cache_disk + origin_disk != pool.data_blocks
        {
            return Err(ShimError::Invalid(format!(
                "cache job header: {} cache and {} origin blocks on disks of {cache_disk} and {origin_disk} for {} \
                 data blocks",
                spec.cache_blocks, spec.origin_blocks, pool.data_blocks
            )));
        }
        Ok(spec)
    }

    /// The cache target's parameters after `cache`, given the three devices'
    /// table names.
    pub fn table_params(&self, metadata: &str, cache: &str, origin: &str) -> String {
        self.table_params_as([metadata, cache, origin], &self.mode, "smq", self.migration_threshold)
    }

    /// As [`Self::table_params`], in another mode (`passthrough` too), with
    /// another policy and migration threshold.
    pub fn table_params_as(
        &self,
        [metadata, cache, origin]: [&str; 3],
        mode: &str,
        policy: &str,
        migration_threshold: Option<u64>,
    ) -> String {
        let mut features = vec![mode];
        if self.metadata2 {
            features.push("metadata2");
        }
        let args = match migration_threshold {
            Some(t) => format!("2 migration_threshold {t}"),
            None => "0".into(),
        };
        format!(
            "{metadata} {cache} {origin} {} {} {} {policy} {args}",
            self.block_sectors,
            features.len(),
            features.join(" ")
        )
    }
}

/// A step of a cache job that no trace op says, taken just before op `at`
/// of the trace (`at` may be the number of ops: after the last one). Steps
/// travel in the trace header's `cache_steps` parameter
/// ([`encode_cache_steps`]); a job without it has none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheStep {
    /// A reboot on the disks as they are: the cache device is suspended (a
    /// clean shutdown, unless the metadata device crashed) and removed, the
    /// metadata device's table is restored (a `crash` swapped it to
    /// `error`; the slice underneath kept what the kernel had written),
    /// and a fresh cache table is loaded: a new activation, in `mode`
    /// (`writeback`, `writethrough` or `passthrough`) with `policy` and
    /// the core's `migration_threshold` if given.
    Reactivate {
        /// The io mode.
        mode: String,
        /// The policy's name (`smq`, `cleaner`, …).
        policy: String,
        /// The core's `migration_threshold` argument (sectors), if given.
        migration_threshold: Option<u64>,
    },
    /// A target message to the cache device (e.g. `invalidate_cblocks 0`);
    /// a refused message stops the job with an error.
    Message(String),
    /// From now on every write to the cache (fast) device is dropped
    /// silently while reads still work (dm-flakey's `drop_writes` swapped
    /// in under the cache target), until the next [`Self::Reactivate`]
    /// restores the device. Of a power cut this is the state in which every
    /// write the device acknowledged since the step was still in its
    /// volatile cache — a legal crash state as long as no FLUSH reached the
    /// device in between, which the caller must argue (dm-flakey cannot
    /// tell).
    DropCacheWrites,
    /// Mounts the cache device as ext4 on [`FS_MOUNT_POINT`] with these
    /// mount options (comma-separated; `noatime` and `lazytime` become
    /// mount flags, the rest goes to ext4).
    MountExt4(String),
    /// A direct write into a file of the mounted file system (see
    /// [`FileWrite`]); its observations go to the result's notes.
    FileWrite(FileWrite),
    /// Cuts the file system off the cache: the cache device's table
    /// becomes `error` (a suspend without flush or freeze: the old cache
    /// table's postsuspend runs), so nothing the unmount writes reaches a
    /// disk, then the file system is unmounted. Meant after a `crash` op,
    /// before a [`Self::Reactivate`].
    CutAndUnmount,
}

/// Where a cache job's [`CacheStep::MountExt4`] mounts the file system.
pub const FS_MOUNT_POINT: &str = "/mnt/dmsim-fs";

/// An `O_DIRECT` write of stamped data into a file of the file system a
/// [`CacheStep::MountExt4`] mounted, opened without `O_SYNC` and written
/// as [`FileSync`] says. Before it, a `syncfs` (everything so far
/// durable); around it (and around the fsync of [`FileSync::DsyncFsync`]),
/// the cache's status without a commit and the `/sys` stat lines of the
/// cache and metadata devices, as notes `step<k>.<what>` (see
/// [`KernelResult::notes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileWrite {
    /// The file, relative to the mount point (letters, digits, `_`, `.`,
    /// `/`; no `..`).
    pub path: String,
    /// The byte offset in the file (a multiple of 4096).
    pub offset: u64,
    /// The write's length in sectors (a multiple of 8, at most 2048).
    pub sectors: u64,
    /// The cache device's sector the file's bytes at `offset` lie on: the
    /// data is stamped for it, so a raw read of the device there
    /// summarizes as this write.
    pub device_sector: u64,
    /// The stamps' write number.
    pub write: u64,
    /// How the write is synced.
    pub sync: FileSync,
}

/// How a [`FileWrite`] is synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileSync {
    /// `RWF_DSYNC` (iomap may send it as one bare REQ_FUA bio and no
    /// flush); text `dsync`.
    Dsync,
    /// `RWF_DSYNC`, then an `fsync` of the file; text `fsync`.
    DsyncFsync,
    /// `RWF_SYNC` (iomap sends no FUA and syncs at completion); text
    /// `sync`.
    Sync,
}

impl FileSync {
    /// The word in a step's text.
    pub fn word(self) -> &'static str {
        match self {
            FileSync::Dsync => "dsync",
            FileSync::DsyncFsync => "fsync",
            FileSync::Sync => "sync",
        }
    }

    /// Parses [`Self::word`].
    pub fn from_word(word: &str) -> Option<FileSync> {
        [FileSync::Dsync, FileSync::DsyncFsync, FileSync::Sync].into_iter().find(|s| s.word() == word)
    }
}

impl FileWrite {
    /// Whether the fields are in range (the agent refuses others).
    pub fn valid(&self) -> bool {
        let path_ok = !self.path.is_empty()
            && self.path.bytes().all(|b| b.is_ascii_alphanumeric() || b"_./".contains(&b))
            && !self.path.split('/').any(|c| c.is_empty() || c == "..");
        path_ok
            && self.offset.is_multiple_of(4096)
            && self.sectors.is_multiple_of(8)
            && (8..=2048).contains(&self.sectors)
    }
}

/// Field `i` of a cache INFO status line (`<metadata block size>
/// <used>/<total> <cache block size> <resident>/<total> <read hits> <read
/// misses> <write hits> <write misses> <demotions> <promotions> <dirty>
/// …`), its part before a slash: 3 is the residency, 8 demotions, 9
/// promotions, 10 dirty blocks.
pub fn cache_status_field(line: &str, i: usize) -> Option<&str> {
    let f = line.split_whitespace().nth(i)?;
    Some(f.split_once('/').map_or(f, |(a, _)| a))
}

/// Each op's write number: the writes before it among `ops` (the
/// simulator stamps a write with its number in trace order, whatever
/// order a race runs the ops in).
pub fn write_numbers(ops: &[Op]) -> Vec<u64> {
    ops.iter()
        .scan(0u64, |writes, op| {
            let n = *writes;
            *writes += u64::from(matches!(op, Op::Write { .. }));
            Some(n)
        })
        .collect()
}

/// The header parameter holding a cache job's steps.
pub const CACHE_STEPS_PARAM: &str = "cache_steps";

/// The header parameter that runs a cache job on controlled disks
/// ([`CACHE_UBLK_PARAM`]) as a race: its value is the steps, as
/// [`RaceStep::to_text`] writes them, joined by commas. The job's ops run
/// as the steps say (some in the background, the disks' requests held at
/// their gates meanwhile) rather than one after another; an op no step
/// names is not run. Gate steps name the cache's disks (`metadata:`,
/// `cache:`, `origin:`). A foreground op waits, as in a settled job, for
/// the cache's background work to settle.
pub const CACHE_RACE_PARAM: &str = "cache_race";

/// The header parameter (`1`) that serves a cache job's metadata, cache
/// and origin devices from the agent as three controlled disks
/// (`crate::ublk`, each starting as the image the host supplied), and
/// records their durable state after every FLUSH, FUA or PREFLUSH write
/// and every status query and reload ([`KernelResult::durable`],
/// [`crate::durable::is_mark`]). The job's metadata slice gets the durable
/// metadata image at the end. Needs the ublk module in the initramfs.
pub const CACHE_UBLK_PARAM: &str = "cache_ublk";

/// In a cache job with [`CACHE_TICKS_SLEEP_ONLY_PARAM`], the timing entry
/// `op-end-<i>` holds the milliseconds from the first op to the end of op
/// `i` (the kernel's clock, for the serialized simulator to follow).
pub const OP_END_PREFIX: &str = "op-end-";

/// The header parameter (`1`) that makes a cache job's `tick` ops plain
/// sleeps, without the status query (and its commit) they otherwise are:
/// a campaign trace's ticks are the passage of time only.
pub const CACHE_TICKS_SLEEP_ONLY_PARAM: &str = "cache_ticks_sleep_only";

/// The header parameter (`1`) that makes a cache job wait, after every op,
/// until the cache's background work has settled, and report the status
/// line it settled on ([`KernelResult::op_status`]): the kernel's
/// migration worker then runs between ops, as the serialized simulator's
/// does, instead of racing the next op. Settled means every promotion the
/// policy queued has completed (its residency, less the promotions and
/// plus the demotions completed since the table was loaded, is back to
/// where it was when the table was loaded, as the status line tells) and
/// the status line stayed the same over a few polls. The job also reports
/// the kernel's coarse clock ([`COARSE_PREFIX`]) around every op and
/// table load.
pub const CACHE_SETTLE_PARAM: &str = "cache_settle";

/// In a cache job with [`CACHE_SETTLE_PARAM`], timing entries named
/// `coarse-us-<what>` hold the kernel's `CLOCK_MONOTONIC_COARSE` — it
/// moves a jiffy at a time, when jiffies do — in microseconds since the
/// job began, read: around the first table's load and resume (`load-a`,
/// `load-b`, `resume-a`, `resume-b`), at the start and end of op `i`
/// (`op-a-<i>`, `op-b-<i>`), and around a reload's load and resume
/// (`op-load-a-<i>` …); `res` is the clock's resolution (one jiffy). smq
/// reads jiffies for its periods; these say which jiffy each op saw.
pub const COARSE_PREFIX: &str = "coarse-us-";

/// A job's [`COARSE_PREFIX`] readings (microseconds, by name without the
/// prefix) and the clock's resolution (`res`, one jiffy), None when the
/// job reports no usable clock: no resolution, one that is not a whole
/// number of milliseconds up to a second, or a reading past a day (no job
/// runs that long; a simulator following such a clock would tick for
/// ever).
pub fn coarse_readings(result: &KernelResult) -> Option<(std::collections::BTreeMap<&str, u64>, u64)> {
    const DAY_US: u64 = 86_400 * 1_000_000;
    let t: std::collections::BTreeMap<&str, u64> =
        result.timings_ms.iter().filter_map(|(k, v)| Some((k.strip_prefix(COARSE_PREFIX)?, *v))).collect();
    let res = *t.get("res")?;
    let usable = (1000..=1_000_000).contains(&res) && res % 1000 == 0 && t.values().all(|&v| v <= DAY_US);
    usable.then_some((t, res))
}

/// In a settled cache job, the timing entry holding the kernel's absolute
/// `jiffies`, mod 8, when the [`COARSE_PREFIX`] clock read 0 (timer wheel
/// buckets one to eight jiffies apart are aligned on absolute jiffies: the
/// waker's runs depend on it).
pub const JIFFY_PHASE: &str = "jiffy-phase";

/// The note of a thin job on controlled disks listing, space-separated,
/// the ops after which the pool's metadata superblock (its first
/// [`SUPERBLOCK_BYTES`]) differed from before them: where the kernel
/// committed. Empty when it never did; absent from older agents.
pub const COMMIT_OPS_NOTE: &str = "commit-ops";

/// The note of a thin job on controlled disks listing the ops (not crash
/// ops) before whose first request the superblock already differed from
/// the reading after the op before: the pool committed in between (the
/// commit timer, in the gap between two ops). Absent from older agents.
pub const COMMIT_BEFORE_OPS_NOTE: &str = "commit-before-ops";

/// As [`COMMIT_BEFORE_OPS_NOTE`], the ops during which the superblock
/// changed (from its reading before the op's first request to the one
/// after it).
pub const COMMIT_DURING_OPS_NOTE: &str = "commit-during-ops";

/// Where a kernel run committed, for an engine to commit there too
/// ([`EngineJob::follow_kernel`]): per op, before its first request,
/// after it, or both. From the notes [`COMMIT_BEFORE_OPS_NOTE`] and
/// [`COMMIT_DURING_OPS_NOTE`]; from [`COMMIT_OPS_NOTE`] alone (an older
/// agent), after each op. A crash op's commit is before its power cut.
/// `None` when the result records no commits.
pub fn kernel_commit_points(result: &KernelResult) -> Option<BTreeMap<usize, CommitPoint>> {
    let list = |name: &str| op_list_note(result, name);
    let all = list(COMMIT_OPS_NOTE)?;
    let crashes: std::collections::BTreeSet<usize> = result.crashes.iter().map(|c| c.op).collect();
    let mut points: BTreeMap<usize, CommitPoint> = BTreeMap::new();
    match (list(COMMIT_BEFORE_OPS_NOTE), list(COMMIT_DURING_OPS_NOTE)) {
        (Some(before), Some(during)) => {
            for i in before {
                points.entry(i).or_default().before = true;
            }
            for i in during {
                points.entry(i).or_default().after = true;
            }
            for i in all.into_iter().filter(|i| crashes.contains(i)) {
                points.entry(i).or_default().before = true;
            }
        }
        _ => {
            for i in all {
                let p = points.entry(i).or_default();
                if crashes.contains(&i) {
                    p.before = true;
                } else {
                    p.after = true;
                }
            }
        }
    }
    Some(points)
}

/// Where a commit is made at one op ([`kernel_commit_points`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitPoint {
    /// Before the op's first request (a crash op: before its power cut).
    pub before: bool,
    /// After the op (its requests complete).
    pub after: bool,
}

impl CommitPoint {
    /// `7b`, `7a` or `7ba` for op 7: one word of [`FORCED_COMMITS_NOTE`].
    pub fn word(&self, op: usize) -> String {
        format!("{op}{}{}", if self.before { "b" } else { "" }, if self.after { "a" } else { "" })
    }

    /// Parses [`Self::word`]: the op and the point.
    pub fn parse(word: &str) -> Option<(usize, CommitPoint)> {
        let digits = word.find(|c: char| !c.is_ascii_digit()).unwrap_or(word.len());
        let op = word[..digits].parse().ok()?;
        let p = match &word[digits..] {
            "b" => CommitPoint { before: true, after: false },
            "a" => CommitPoint { before: false, after: true },
            "ba" => CommitPoint { before: true, after: true },
            _ => return None,
        };
        Some((op, p))
    }
}

/// The prefix of a thin job's notes `data-writes.<op>` on controlled
/// disks: the first sectors of the data disk's writes (write-zeroes
/// included) the agent served during op `<op>`, space-separated, in the
/// order it served them — for an op that served two or more. The
/// serialized simulator completes its data writes in that order
/// ([`data_write_orders`]): 6.1's io_uring runs a task's queued work
/// newest first (`tctx_task_work` takes the list as `llist` left it), so
/// two requests the pool queued together reach the agent in the other
/// order, and the agent serves what it holds in the order it came.
pub const DATA_WRITES_NOTE_PREFIX: &str = "data-writes.";

/// Per op, the data disk's write order a kernel answer recorded in its
/// [`DATA_WRITES_NOTE_PREFIX`] notes (none from older agents); a note
/// that does not parse is left out.
pub fn data_write_orders(result: &KernelResult) -> std::collections::BTreeMap<usize, Vec<u64>> {
    result
        .notes
        .iter()
        .filter_map(|(k, v)| {
            let op = k.strip_prefix(DATA_WRITES_NOTE_PREFIX)?.parse().ok()?;
            let sectors: Option<Vec<u64>> = v.split_whitespace().map(|w| w.parse().ok()).collect();
            Some((op, sectors?))
        })
        .collect()
}

/// The note of a thin job on controlled disks listing, space-separated,
/// The count (in [`KernelResult::ublk`]) of an engine job's thin devices
/// a new engine took over after a crash, each on the ublk device the
/// killed engine served (ublk's user recovery).
pub const ENGINE_RECOVERED_COUNT: &str = "engine-recovered-devices";

/// An engine job following the kernel's commits
/// ([`EngineJob::follow_kernel`]): where the agent asked the engine to
/// commit, one [`CommitPoint::word`] per op, separated by spaces.
pub const FORCED_COMMITS_NOTE: &str = "forced-commits";

/// The points of a result's [`FORCED_COMMITS_NOTE`], or `None` without
/// one (malformed words are passed over).
pub fn forced_commits(result: &KernelResult) -> Option<BTreeMap<usize, CommitPoint>> {
    let (_, text) = result.notes.iter().find(|(k, _)| k == FORCED_COMMITS_NOTE)?;
    Some(text.split_whitespace().filter_map(CommitPoint::parse).collect())
}

/// `op:key` for each op of [`COMMIT_OPS_NOTE`]: the [`commit_key`] of the
/// superblock the op left, in 16 hex digits.
pub const COMMIT_SUPERBLOCKS_NOTE: &str = "commit-superblocks";

/// What a thin metadata superblock says of the transaction it commits,
/// wherever the pool placed its blocks: FNV-1a 64 ([`fnv64`]) of its
/// `trans_id`, `time`, flags, whether a metadata snapshot is held, and
/// the data and metadata space maps' sizes and allocated counts. Two
/// pools that made the same changes have the same key even when their
/// trees sit in other blocks (a fault moved the metadata, the pieces of a
/// request were allocated in another order). 0 for a block too short to
/// be a superblock.
pub fn commit_key(superblock: &[u8]) -> u64 {
    if superblock.len() < 512 {
        return 0;
    }
    let sb = dmsim_model::thin::superblock::Superblock::decode(superblock);
    let fields = [
        sb.trans_id,
        u64::from(sb.time),
        u64::from(sb.flags),
        u64::from(sb.held_root != 0),
        sb.data_sm_root.nr_blocks,
        sb.data_sm_root.nr_allocated,
        sb.metadata_sm_root.nr_blocks,
        sb.metadata_sm_root.nr_allocated,
    ];
    fnv64(&fields.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<_>>())
}

/// The ops and commit keys ([`commit_key`]) of a result's
/// [`COMMIT_SUPERBLOCKS_NOTE`], or `None` without one (an older agent).
pub fn commit_superblocks(result: &KernelResult) -> Option<BTreeMap<usize, u64>> {
    op_key_note(result, COMMIT_SUPERBLOCKS_NOTE)
}

/// `op:key` for each op of [`COMMIT_OPS_NOTE`]: the [`commit_contents_key`]
/// of the metadata the op left, in 16 hex digits (0: not read, the pool
/// committed again meanwhile). Absent from older agents.
pub const COMMIT_CONTENTS_NOTE: &str = "commit-contents";

/// A fingerprint of what a thin metadata image's last commit holds: its
/// data reference counts
/// (`dmsim_model::thin::check::committed_data_counts`) and every
/// device's details and mappings (`dmsim_model::thin::dump::read_devices`),
/// FNV-1a 64 over them in order; 0 when they cannot be read. Two commits
/// whose superblocks share a [`commit_key`] (the same totals) can differ
/// here: a commit between a passdown discard's two passes holds the
/// discarded blocks' raised counts and no longer their mappings.
pub fn commit_contents_key(dev: &mut dyn dmsim_model::block_device::BlockDevice) -> u64 {
    let Ok(counts) = dmsim_model::thin::check::committed_data_counts(dev) else { return 0 };
    let Ok(devices) = dmsim_model::thin::dump::read_devices(dev) else { return 0 };
    let mut bytes = Vec::new();
    for (b, c) in counts {
        bytes.extend(b.to_le_bytes());
        bytes.extend(c.to_le_bytes());
    }
    for (id, d) in devices {
        bytes.extend(id.to_le_bytes());
        bytes.extend(d.details.to_bytes());
        for (v, (b, t)) in d.mappings {
            bytes.extend(v.to_le_bytes());
            bytes.extend(b.to_le_bytes());
            bytes.extend(t.to_le_bytes());
        }
    }
    fnv64(&bytes)
}

/// The ops and keys of a result's [`COMMIT_CONTENTS_NOTE`], or `None`
/// without one (an older agent).
pub fn commit_contents(result: &KernelResult) -> Option<BTreeMap<usize, u64>> {
    op_key_note(result, COMMIT_CONTENTS_NOTE)
}

/// The `op:hex` words of the note `name`, or `None` without it.
fn op_key_note(result: &KernelResult, name: &str) -> Option<BTreeMap<usize, u64>> {
    let (_, text) = result.notes.iter().find(|(k, _)| k == name)?;
    let one = |w: &str| {
        let (i, f) = w.split_once(':')?;
        Some((i.parse().ok()?, u64::from_str_radix(f, 16).ok()?))
    };
    Some(text.split_whitespace().filter_map(one).collect())
}

/// The bytes of the thin metadata superblock (its block).
pub const SUPERBLOCK_BYTES: usize = 4096;

/// The ops of a result's [`COMMIT_OPS_NOTE`], or `None` without one.
pub fn commit_ops(result: &KernelResult) -> Option<Vec<usize>> {
    op_list_note(result, COMMIT_OPS_NOTE)
}

/// The op indices of `result`'s note `name` (space-separated; other words
/// passed over), or `None` without the note.
fn op_list_note(result: &KernelResult, name: &str) -> Option<Vec<usize>> {
    let (_, text) = result.notes.iter().find(|(k, _)| k == name)?;
    Some(text.split_whitespace().filter_map(|w| w.parse().ok()).collect())
}

/// `at reactivate MODE POLICY [THRESHOLD]`, `at message TEXT` or `at
/// drop_cache_writes`, joined by `;` (message texts hold no `;`).
pub fn encode_cache_steps(steps: &[(usize, CacheStep)]) -> String {
    let one = |(at, step): &(usize, CacheStep)| match step {
        CacheStep::Reactivate { mode, policy, migration_threshold: Some(t) } => {
            format!("{at} reactivate {mode} {policy} {t}")
        }
        CacheStep::Reactivate { mode, policy, migration_threshold: None } => {
            format!("{at} reactivate {mode} {policy}")
        }
        CacheStep::Message(text) => format!("{at} message {text}"),
        CacheStep::DropCacheWrites => format!("{at} drop_cache_writes"),
        CacheStep::MountExt4(options) => format!("{at} mount_ext4 {options}"),
        CacheStep::FileWrite(w) => format!(
            "{at} file_write {} {} {} {} {} {}",
            w.path,
            w.offset,
            w.sectors,
            w.device_sector,
            w.write,
            w.sync.word()
        ),
        CacheStep::CutAndUnmount => format!("{at} cut_and_unmount"),
    };
    steps.iter().map(one).collect::<Vec<_>>().join(";")
}

/// The steps of a cache job's header (none without the parameter); never
/// panics.
pub fn cache_steps(h: &Header) -> Result<Vec<(usize, CacheStep)>, ShimError> {
    let Some(text) = h.param(CACHE_STEPS_PARAM) else { return Ok(Vec::new()) };
    let bad = |one: &str| ShimError::Invalid(format!("cache job header: bad step {one:?}"));
    let word_ok = |w: &str| !w.is_empty() && w.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    text.split(';')
        .map(|one| {
            let words: Vec<&str> = one.split(' ').collect();
            let at: usize = words[0].parse().map_err(|_| bad(one))?;
            let step = match (words.get(1), &words[2.min(words.len())..]) {
                (Some(&"reactivate"), [mode, policy, rest @ ..]) if rest.len() <= 1 => {
                    if !["writeback", "writethrough", "passthrough"].contains(mode) || !word_ok(policy) {
                        return Err(bad(one));
                    }
                    let migration_threshold =
                        rest.first().map(|t| t.parse::<u64>().map_err(|_| bad(one))).transpose()?;
                    CacheStep::Reactivate {
                        mode: mode.to_string(),
                        policy: policy.to_string(),
                        migration_threshold,
                    }
                }
                (Some(&"message"), [_, ..]) if words[2..].iter().all(|w| !w.is_empty()) => {
                    CacheStep::Message(words[2..].join(" "))
                }
                (Some(&"drop_cache_writes"), []) => CacheStep::DropCacheWrites,
                (Some(&"mount_ext4"), [options])
                    if options.split(',').all(|o| {
                        !o.is_empty() && o.bytes().all(|b| b.is_ascii_alphanumeric() || b"_=".contains(&b))
                    }) =>
                {
                    CacheStep::MountExt4(options.to_string())
                }
                (Some(&"file_write"), [path, offset, sectors, device_sector, write, sync]) => {
                    let num = |w: &str| w.parse::<u64>().map_err(|_| bad(one));
                    let sync = FileSync::from_word(sync).ok_or_else(|| bad(one))?;
                    let w = FileWrite {
                        path: path.to_string(),
                        offset: num(offset)?,
                        sectors: num(sectors)?,
                        device_sector: num(device_sector)?,
                        write: num(write)?,
                        sync,
                    };
                    if !w.valid() {
                        return Err(bad(one));
                    }
                    CacheStep::FileWrite(w)
                }
                (Some(&"cut_and_unmount"), []) => CacheStep::CutAndUnmount,
                _ => return Err(bad(one)),
            };
            Ok((at, step))
        })
        .collect()
}

/// The name of an errno, as traces spell request results.
pub fn errno_name(errno: i32) -> String {
    match errno {
        libc::EIO => "EIO".into(),
        libc::ENOSPC => "ENOSPC".into(),
        libc::EOPNOTSUPP => "EOPNOTSUPP".into(),
        libc::EINVAL => "EINVAL".into(),
        libc::EBUSY => "EBUSY".into(),
        libc::ENODATA => "ENODATA".into(),
        libc::EROFS => "EROFS".into(),
        libc::EPERM => "EPERM".into(),
        libc::ENXIO => "ENXIO".into(),
        libc::ENODEV => "ENODEV".into(),
        libc::ETIMEDOUT => "ETIMEDOUT".into(),
        libc::EAGAIN => "EAGAIN".into(),
        libc::EEXIST => "EEXIST".into(),
        libc::ENOENT => "ENOENT".into(),
        libc::ENOMEM => "ENOMEM".into(),
        libc::EFBIG => "EFBIG".into(),
        e => format!("errno{e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_write_orders_are_read_from_the_notes() {
        let mut r = KernelResult::default();
        r.notes.push((format!("{DATA_WRITES_NOTE_PREFIX}12"), "256 128 0".into()));
        r.notes.push((format!("{DATA_WRITES_NOTE_PREFIX}x"), "1 2".into()));
        r.notes.push((format!("{DATA_WRITES_NOTE_PREFIX}13"), "1 two".into()));
        r.notes.push(("fired.12".into(), "data write sector 0 nr 8: write-error".into()));
        let orders = data_write_orders(&r);
        assert_eq!(orders.into_iter().collect::<Vec<_>>(), vec![(12, vec![256, 128, 0])]);
    }

    #[test]
    fn frames_round_trip_and_reject_garbage() {
        let f = write_frame(REQUEST_MAGIC, b"hello");
        assert_eq!(f.len(), 512);
        assert_eq!(read_frame(REQUEST_MAGIC, &f).unwrap(), b"hello");
        assert!(read_frame(RESULT_MAGIC, &f).is_err());
        let mut g = f.clone();
        g[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(read_frame(REQUEST_MAGIC, &g).is_err());
        assert!(read_frame(REQUEST_MAGIC, &f[..3]).is_err());
    }

    #[test]
    fn results_round_trip() {
        let r = KernelResult {
            kernel_release: "6.1.0-56-amd64".into(),
            dm_version: [4, 47, 0],
            targets: vec![("thin-pool".into(), [1, 22, 0])],
            ops: vec![
                OpResult { index: 0, outcome: "ok".into(), read: None },
                OpResult { index: 1, outcome: "ok".into(), read: Some("w0*8 0*120".into()) },
            ],
            devices: vec![DeviceContents { id: 0, blocks: vec!["w0*8 0*120".into(), "0*128".into()] }],
            pool_status: "1 11/512 2/16 - rw discard_passdown queue_if_no_space - 1024".into(),
            timings_ms: vec![("ops".into(), 12)],
            log_status: Some("12 345".into()),
            op_status: vec![(1, "8 11/512 128 2/16 0 1 0 0 0 1 0".into())],
            ublk: vec![("metadata-flushes".into(), 7), ("left-devices".into(), 0)],
            crashes: Vec::new(),
            durable: vec![crate::durable::DurableMark {
                op: 3,
                metadata: vec![(0, "z12.ff".into())],
                cache: vec![(1, "w2*128".into())],
                origin: Vec::new(),
            }],
            notes: vec![
                ("step1.outcome".into(), "ok".into()),
                ("step1.status-after".into(), "8 1/2 a b".into()),
            ],
            error: Some("it broke\nbadly".into()),
        };
        let text = r.to_text();
        let back = KernelResult::from_text(&text).unwrap();
        assert_eq!(back.ublk, r.ublk);
        assert_eq!(back.durable, r.durable);
        assert_eq!(back.notes, r.notes);
        let mut with_crash = KernelResult { error: Some("it broke".into()), ..r.clone() };
        with_crash.crashes.push(CrashRecord {
            op: 12,
            metadata: (1, 3),
            data: (0, 2),
            torn: true,
            metadata_fnv: fnv64(b"x"),
            mapped: [(0u32, [0u64, 1, 2, 7].into_iter().collect()), (1, Default::default())]
                .into_iter()
                .collect(),
            devices: vec![DeviceContents { id: 0, blocks: vec!["w1*8".into(), "0*8".into()] }],
            data_pending: vec![
                dmsim_faults::PendingKey { sector: 256, nr_sectors: 128, fua: false, fnv: 0xfeed },
                dmsim_faults::PendingKey { sector: 8, nr_sectors: 1, fua: true, fnv: u64::MAX },
            ],
        });
        let text2 = with_crash.to_text();
        assert!(text2.contains("crash-pending 256+128:000000000000feed 8+1f:ffffffffffffffff\n"), "{text2}");
        assert_eq!(KernelResult::from_text(&text2).unwrap(), with_crash);
        for bad in ["256+x:00", "256+128", "+1:00", "1+2:zz"] {
            let t = text2.replace("256+128:000000000000feed", bad);
            assert!(KernelResult::from_text(&t).is_err(), "{bad}");
        }
        assert!(
            KernelResult::from_text(&text2.replace("crash-mapped 0 0-2,7", "crash-mapped 0 9-2")).is_err()
        );
        assert!(KernelResult::from_text(&text2.replace("crash 12 ", "crash x ")).is_err());
        assert!(KernelResult::from_text(&text2.replace("crash-block 0 1 ", "crash-block 0 5 ")).is_err());
        assert!(KernelResult::from_text(&text.replace("ublk left-devices 0", "ublk left-devices x")).is_err());
        assert_eq!(back.error.as_deref(), Some("it broke badly"));
        assert_eq!(back.log_status.as_deref(), Some("12 345"));
        assert_eq!(back.op_status, r.op_status);
        assert!(KernelResult::from_text(&text.replace("op-status 1", "op-status x")).is_err());
        assert_eq!(back.ops, r.ops);
        assert_eq!(back.devices, r.devices);
        assert_eq!(back.targets, r.targets);
        assert!(KernelResult::from_text(&text.replace("end\n", "")).is_err());
        assert!(KernelResult::from_text("nonsense").is_err());
        assert!(KernelResult::from_text(&text.replace("block 0 1", "block 0 7")).is_err());
    }

    #[test]
    fn requests_round_trip_and_reject_garbage() {
        let text = "dmsim-trace 1\nseed 3\nworkload random\nparam x 1\ncreate-thin\n".to_string();
        let jobs = vec![
            (JobKind::Replay, text.clone()),
            (JobKind::Activate { ids: vec![0, 2] }, text.clone()),
            (JobKind::Activate { ids: vec![] }, text.clone()),
            (JobKind::Logged { messages: vec![] }, text.clone()),
            (
                JobKind::Logged {
                    messages: vec![(2, "reserve_metadata_snap".into()), (5, "release_metadata_snap".into())],
                },
                text.clone(),
            ),
            (JobKind::Flakey, text.clone()),
            (JobKind::Cache, "dmsim-trace 1\nseed 0\nworkload cache\n".into()),
            (JobKind::Ublk, text.clone()),
        ];
        let body = encode_request(&jobs);
        let back = decode_request(&body).unwrap();
        assert_eq!(back.len(), 8);
        assert_eq!(back[7].0, JobKind::Ublk);
        assert_eq!(back[6].0, JobKind::Cache);
        assert_eq!(back[5].0, JobKind::Flakey);
        assert_eq!(back[4].0, jobs[4].0);
        assert_eq!(back[3].0, JobKind::Logged { messages: vec![] });
        assert_eq!(back[1].0, JobKind::Activate { ids: vec![0, 2] });
        assert_eq!(back[2].0, JobKind::Activate { ids: vec![] });
        assert_eq!(back[0].1.header.seed, 3);
        assert!(decode_request(&body[..body.len() - 3]).is_err());
        assert!(decode_request(b"nonsense\n").is_err());
        for bad in ["x:reserve_metadata_snap", "1:", "1reserve", "1:a,,2:b"] {
            let body = format!("{REQUEST_FIRST_LINE}\njob logged {} {bad}\n{text}", text.len());
            assert!(decode_request(body.as_bytes()).is_err(), "{bad}");
        }
        let huge = format!("{REQUEST_FIRST_LINE}\njob replay 18446744073709551615\n");
        assert!(decode_request(huge.as_bytes()).is_err());

        // How many at a time: absent means one; the line only when more.
        assert_eq!(decode_request_concurrent(&body).unwrap().1, 1);
        assert_eq!(encode_request_concurrent(&jobs, 1), body);
        let (back, n) = decode_request_concurrent(&encode_request_concurrent(&jobs, 12)).unwrap();
        assert_eq!((back.len(), n), (8, 12));
        assert_eq!(back[7].0, JobKind::Ublk);
        for bad in ["concurrent 0", "concurrent 65", "concurrent x", "concurrent -1", "concurrent "] {
            let body = format!("{REQUEST_FIRST_LINE}\n{bad}\njob replay {}\n{text}", text.len());
            assert!(decode_request_concurrent(body.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn commit_points_come_from_the_kernels_notes_and_round_trip() {
        let b = CommitPoint { before: true, after: false };
        let a = CommitPoint { before: false, after: true };
        let ba = CommitPoint { before: true, after: true };
        for (op, p) in [(0, b), (7, a), (12, ba)] {
            assert_eq!(CommitPoint::parse(&p.word(op)), Some((op, p)));
        }
        for bad in ["", "a", "7", "7x", "7ab", "-1a", "7 a"] {
            assert_eq!(CommitPoint::parse(bad), None, "{bad:?}");
        }
        let note = |k: &str, v: &str| (k.to_string(), v.to_string());
        let mut r = KernelResult::default();
        assert_eq!(kernel_commit_points(&r), None, "no commits recorded");
        // An older agent: after each op, before a crash op's power cut.
        r.notes.push(note(COMMIT_OPS_NOTE, "2 5 9"));
        r.crashes.push(CrashRecord { op: 5, ..CrashRecord::default() });
        assert_eq!(kernel_commit_points(&r), Some([(2, a), (5, b), (9, a)].into_iter().collect()));
        // Before and during, as the agent records them now.
        r.notes.push(note(COMMIT_BEFORE_OPS_NOTE, "2 9"));
        r.notes.push(note(COMMIT_DURING_OPS_NOTE, "9"));
        assert_eq!(kernel_commit_points(&r), Some([(2, b), (5, b), (9, ba)].into_iter().collect()));
    }

    #[test]
    fn engine_jobs_round_trip_and_reject_garbage() {
        let text = "dmsim-trace 1\nseed 3\nworkload random\ncreate-thin\n".to_string();
        let engines = [
            EngineJob::serialized(),
            EngineJob { depth: 8, commit_period_ms: 250, trace_clock: false, ..EngineJob::serialized() },
            EngineJob::at_depth(8),
            EngineJob { ack_flush_early: true, commit_period_ms: 3_600_000, ..EngineJob::serialized() },
            EngineJob { depth: 4, drop_writes: true, ack_flush_early: true, ..EngineJob::serialized() },
            EngineJob::following_kernel(),
        ];
        let jobs: Vec<_> = engines.iter().map(|e| (JobKind::Engine(*e), text.clone())).collect();
        let back = decode_request(&encode_request(&jobs)).expect("decodes");
        assert_eq!(
            back.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
            jobs.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>()
        );
        assert!(EngineJob::serialized().text().contains("trace-clock"));
        assert!(!EngineJob::at_depth(8).trace_clock);
        for bad in [
            "0,0",
            "1",
            "x,0",
            "1,x",
            "1,0,frob",
            "1,0,drop-writes,drop-writes",
            "1,0,trace-clock,trace-clock",
            "1,0,follow-kernel",
            "4,0,trace-clock,follow-kernel",
            "1,-1",
            "",
        ] {
            assert_eq!(EngineJob::parse(bad), None, "{bad:?}");
            let body = format!("{REQUEST_FIRST_LINE}\njob engine {} {bad}\n{text}", text.len());
            assert!(decode_request(body.as_bytes()).is_err(), "{bad:?}");
        }
        assert!(JobKind::Engine(EngineJob::serialized()).is_fresh());
    }

    #[test]
    fn write_numbers_count_the_writes_before_each_op() {
        let w = Op::Write { dev: 0, sector: 0, nr_sectors: 1, fua: false, preflush: false };
        let r = Op::Read { dev: 0, sector: 0, nr_sectors: 1 };
        assert_eq!(write_numbers(&[w, r, w, w, r]), [0, 1, 1, 2, 3]);
        assert_eq!(write_numbers(&[]), Vec::<u64>::new());
    }

    #[test]
    fn race_steps_round_trip_and_reject_garbage() {
        let text = "dmsim-trace 1\nseed 3\nworkload random\nparam x 1\ncreate-thin\n".to_string();
        let (data, cache, origin) = (RaceDisk::Data, RaceDisk::Cache, RaceDisk::Origin);
        let steps = vec![
            RaceStep::Op(0),
            RaceStep::Hold { disk: data, reads: true, writes: false, flushes: false },
            RaceStep::Background(12),
            RaceStep::Held { disk: data, n: 1 },
            RaceStep::Op(3),
            RaceStep::Hold { disk: data, reads: false, writes: true, flushes: false },
            RaceStep::Hold { disk: data, reads: true, writes: true, flushes: true },
            RaceStep::Hold { disk: cache, reads: false, writes: true, flushes: true },
            RaceStep::Hold { disk: RaceDisk::Metadata, reads: false, writes: false, flushes: false },
            RaceStep::Serve { disk: data, k: 2 },
            RaceStep::Held { disk: origin, n: 2 },
            RaceStep::Serve { disk: origin, k: 1 },
            RaceStep::Pause(200),
            RaceStep::Wait(12),
            RaceStep::Release,
            RaceStep::Join,
        ];
        let jobs = vec![
            (JobKind::Race { steps: steps.clone() }, text.clone()),
            (JobKind::Race { steps: vec![] }, text.clone()),
        ];
        let body = encode_request(&jobs);
        let line =
            "0,hold-reads,bg12,held=1,3,hold-writes,hold-reads+writes+flushes,cache:hold-writes+flushes,\
                    metadata:hold-nothing,serve=2,origin:held=2,origin:serve=1,pause=200,wait12,release,join";
        assert!(String::from_utf8_lossy(&body).contains(line), "{}", String::from_utf8_lossy(&body));
        let back = decode_request(&body).unwrap();
        assert_eq!(back[0].0, JobKind::Race { steps });
        assert_eq!(back[1].0, JobKind::Race { steps: vec![] });
        assert!(back[0].0.is_fresh());
        assert_eq!(
            RaceStep::parse("hold-all"),
            Some(RaceStep::Hold { disk: data, reads: true, writes: true, flushes: true })
        );
        assert_eq!(
            RaceStep::parse("cache:hold-all"),
            Some(RaceStep::Hold { disk: cache, reads: true, writes: true, flushes: true })
        );
        assert_eq!(RaceStep::parse("origin:serve=3").and_then(RaceStep::disk), Some(origin));
        for bad in [
            "bg",
            "bgx",
            "held=",
            "held=-1",
            "serve=",
            "+3",
            "1,,2",
            "join,wait",
            "bg-1",
            "hold",
            "pause=x",
            "wait",
            "hold-",
            "hold-reads+reads",
            "hold-everything",
            "hold-reads+",
            "cache:3",
            "origin:bg3",
            "cache:release",
            "data:hold-reads",
            "cache:",
            "cache:cache:held=1",
        ] {
            let body = format!("{REQUEST_FIRST_LINE}\njob race {} {bad}\n{text}", text.len());
            assert!(decode_request(body.as_bytes()).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        /// Any job line and step list: decoded or refused, never a panic;
        /// what decodes encodes to the same steps.
        #[test]
        fn race_job_lines_never_panic(steps in "((cache|origin|metadata):)?[a-z0-9=,:+-]{0,40}", len in 0usize..80) {
            let text = "dmsim-trace 1\nseed 3\nworkload random\ncreate-thin\n";
            let body = format!("{REQUEST_FIRST_LINE}\njob race {len} {steps}\n{text}");
            if let Ok(jobs) = decode_request(body.as_bytes()) {
                for (kind, _) in jobs {
                    if let JobKind::Race { steps } = kind {
                        for s in steps {
                            proptest::prop_assert_eq!(RaceStep::parse(&s.to_text()), Some(s));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn layouts_share_fresh_data_and_separate_metadata() {
        let spec = |data_blocks, metadata_sectors| PoolSpec {
            run: 1,
            block_sectors: 128,
            data_blocks,
            thin_blocks: 16,
            metadata_sectors,
            metadata_disk_sectors: metadata_sectors,
            max_devices: 4,
            low_water_mark: 2,
            features: vec![],
            no_space_timeout_ns: 1,
        };
        let (a, b, c) = (spec(100, 4096), spec(20, 4096), spec(30, 1000));
        let l = Layout::of(&[(&a, true), (&b, false), (&c, true)]);
        assert_eq!(l.slices[0], Slice { metadata_offset: 0, data_offset: 0 });
        assert_eq!(l.slices[1], Slice { metadata_offset: 4096, data_offset: 14336 });
        assert_eq!(l.slices[2], Slice { metadata_offset: 8192, data_offset: 0 });
        assert_eq!(l.metadata_sectors, 10240);
        assert_eq!(l.data_sectors, 14336 + 4096);
    }

    #[test]
    fn cache_specs_round_trip_through_a_header() {
        let spec = CacheSpec {
            run: 7,
            block_sectors: 128,
            cache_blocks: 64,
            origin_blocks: 256,
            metadata_sectors: 8192,
            metadata2: true,
            mode: "writeback".into(),
            migration_threshold: Some(64),
            disk_blocks: None,
        };
        let h = spec.header();
        assert_eq!(CacheSpec::from_header(&h).unwrap(), spec);
        let roomy = CacheSpec { disk_blocks: Some((100, 300)), ..spec.clone() };
        assert_eq!(CacheSpec::from_header(&roomy.header()).unwrap(), roomy);
        assert_eq!(PoolSpec::from_header(&roomy.header()).unwrap().data_sectors(), 400 * 128);
        assert_eq!((roomy.cache_disk_sectors(), roomy.origin_disk_sectors()), (100 * 128, 300 * 128));
        let cramped = CacheSpec { disk_blocks: Some((63, 300)), ..spec.clone() };
        assert!(CacheSpec::from_header(&cramped.header()).is_err(), "a disk smaller than its device");
        assert_eq!(PoolSpec::from_header(&h).unwrap().data_sectors(), 320 * 128);
        assert_eq!(
            spec.table_params("1:2", "3:4", "5:6"),
            "1:2 3:4 5:6 128 2 writeback metadata2 smq 2 migration_threshold 64"
        );
        let plain =
            CacheSpec { metadata2: false, migration_threshold: None, mode: "writethrough".into(), ..spec };
        assert_eq!(CacheSpec::from_header(&plain.header()).unwrap(), plain);
        assert_eq!(plain.table_params("a", "b", "c"), "a b c 128 1 writethrough smq 0");
        let mut bad = plain.header();
        bad.params.retain(|(k, _)| k != "cache_mode");
        assert!(CacheSpec::from_header(&bad).is_err());
    }

    #[test]
    fn cache_steps_round_trip_through_a_header() {
        let steps = vec![
            (
                4,
                CacheStep::Reactivate {
                    mode: "passthrough".into(),
                    policy: "smq".into(),
                    migration_threshold: None,
                },
            ),
            (6, CacheStep::Message("invalidate_cblocks 0".into())),
            (6, CacheStep::DropCacheWrites),
            (0, CacheStep::MountExt4("noatime,lazytime,commit=600".into())),
            (
                0,
                CacheStep::FileWrite(FileWrite {
                    path: "d/data".into(),
                    offset: 20480,
                    sectors: 128,
                    device_sector: 10368,
                    write: 5,
                    sync: FileSync::DsyncFsync,
                }),
            ),
            (2, CacheStep::CutAndUnmount),
            (
                7,
                CacheStep::Reactivate {
                    mode: "writeback".into(),
                    policy: "cleaner".into(),
                    migration_threshold: Some(2048),
                },
            ),
        ];
        let mut h = CacheSpec {
            run: 7,
            block_sectors: 128,
            cache_blocks: 64,
            origin_blocks: 256,
            metadata2: false,
            metadata_sectors: 8192,
            mode: "writeback".into(),
            migration_threshold: None,
            disk_blocks: None,
        }
        .header();
        assert!(cache_steps(&h).unwrap().is_empty());
        h.params.push((CACHE_STEPS_PARAM.into(), encode_cache_steps(&steps)));
        let text = dmsim_traces::to_text(&dmsim_traces::Trace { header: h, events: Vec::new() });
        let back = dmsim_traces::from_text(&text).unwrap();
        assert_eq!(cache_steps(&back.header).unwrap(), steps);
        for bad in [
            "",
            "x reactivate writeback smq",
            "1 reactivate sideways smq",
            "1 reactivate writeback",
            "1 message",
            "1 message a  b",
            "1 reactivate writeback smq 1 2",
            "1 drop_cache_writes now",
            "1 dance",
            "1 mount_ext4",
            "1 mount_ext4 a,,b",
            "1 mount_ext4 a b",
            "1 file_write data 4096 128 0 0",
            "1 file_write data 4095 128 0 0 dsync",
            "1 file_write data 4096 127 0 0 dsync",
            "1 file_write ../data 4096 128 0 0 dsync",
            "1 file_write data 4096 128 0 0 osync",
            "1 cut_and_unmount now",
        ] {
            let mut h = back.header.clone();
            h.params.retain(|(k, _)| k != CACHE_STEPS_PARAM);
            h.params.push((CACHE_STEPS_PARAM.into(), bad.into()));
            assert!(cache_steps(&h).is_err(), "{bad:?}");
        }
        assert_eq!(
            back.header.param("cache_mode").map(|_| CacheSpec::from_header(&back.header)
                .unwrap()
                .table_params_as(["a", "b", "c"], "passthrough", "cleaner", Some(9))),
            Some("a b c 128 1 passthrough cleaner 2 migration_threshold 9".to_string())
        );
    }

    #[test]
    fn many_results_parse() {
        let r = KernelResult { kernel_release: "k".into(), ..KernelResult::default() };
        let two = format!("{}{}", r.to_text(), r.to_text());
        assert_eq!(KernelResult::many_from_text(&two).unwrap().len(), 2);
        assert!(KernelResult::many_from_text(&two[..two.len() - 4]).is_err());
        assert!(KernelResult::many_from_text("").unwrap().is_empty());
    }

    #[test]
    fn summaries_name_misplaced_stamps() {
        let mut buf = vec![0u8; 512 * 4];
        stamp::fill(&mut buf[..1024], 9, 3, 1, 10);
        assert_eq!(summarize(&buf, 9, 10), "w3*2 0*2");
        assert_eq!(summarize(&buf, 9, 11), "w3@s10*1 w3@s11*1 0*2");
        assert_eq!(summarize(&buf, 8, 10), "x*2 0*2");
    }
}
