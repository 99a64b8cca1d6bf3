//! Controlled disks: block devices served from userland through ublk.
//!
//! Linux 6.1's ublk driver (`ublk_drv`, built out of tree by
//! [`crate::ublk_module`]) is spoken through the engine's ABI module
//! (`dmsim_engine::ublk`, re-exported here): every request on
//! `/dev/ublkbN` becomes a descriptor the server fetches on `/dev/ublkcN`.
//! This module serves disks:
//!
//! - [`ControlledDisk`]: the semantics of `faults::SimDisk` — writes land
//!   in a volatile layer until a FLUSH completes, FUA writes are durable
//!   on completion; it keeps the durable image, what reads see, and the
//!   writes since the last flush (the material of a later power cut). It
//!   is plain data, driven one [`Request`] at a time, so that a later step
//!   can hold requests, fail them or cut power between them.
//! - [`UblkDevice`]: one device per disk, one queue, served by its own
//!   thread (the driver ties a queue to the task that fetched it),
//!   advertising a volatile write cache and FUA so that the kernel sends
//!   both.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use dmsim_faults::{CrashMode, CrashSummary, Image, PendingWrite, SimDisk};
use dmsim_model::block_device::{BlockDevice, WriteFlags};

use crate::error::ShimError;

pub use dmsim_engine::ublk::*;

fn io_err(what: impl Into<String>, e: std::io::Error) -> ShimError {
    ShimError::io(what, e)
}

fn node(path: &Path, wait: Duration) -> Result<(), ShimError> {
    dmsim_engine::ublk::wait_for_node(path, wait).map_err(ShimError::from)
}

/// What a controlled disk has served, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestCounts {
    /// Reads.
    pub reads: u64,
    /// Writes (FUA ones included).
    pub writes: u64,
    /// Writes with FUA.
    pub fua_writes: u64,
    /// Flushes.
    pub flushes: u64,
    /// Discards.
    pub discards: u64,
    /// Write-zeroes.
    pub write_zeroes: u64,
    /// Requests answered with an error (out of range, unknown op).
    pub errors: u64,
}

impl RequestCounts {
    /// `(name, count)` pairs, for the job's result.
    pub fn named(&self) -> [(&'static str, u64); 7] {
        [
            ("reads", self.reads),
            ("writes", self.writes),
            ("fua-writes", self.fua_writes),
            ("flushes", self.flushes),
            ("discards", self.discards),
            ("write-zeroes", self.write_zeroes),
            ("errors", self.errors),
        ]
    }
}

/// A disk with a volatile write cache: a `faults::SimDisk` (the
/// simulator's own disk, so that both sides keep the same write history
/// and choose crash states with the same code) served one ublk request
/// at a time. Reads see every acknowledged write; a write is durable once
/// a FLUSH completes after it, or at once with FUA.
///
/// Once [`ControlledDisk::cut_power`] ran (the queue thread does it when
/// the agent cuts power), every request fails with `EIO` and nothing more
/// reaches the disk; [`ControlledDisk::crash_state`] is then what a power
/// cut keeps, chosen exactly as `SimDisk::crash_state` does.
#[derive(Debug, Clone)]
pub struct ControlledDisk {
    disk: SimDisk,
    counts: RequestCounts,
    powered: bool,
    /// `aim-fault passdown`: the next discard fails with `EIO`.
    fail_next_discard: bool,
    /// Faults that fired, with their requests, not yet taken.
    fired: Vec<crate::ublk_faults::FiredRequest>,
    /// A discard writes zeroes over its range ([`ControlledDisk::zeroing_discards`]).
    discard_zeroes: bool,
    /// First sectors of the writes served (failed or not), in order, not
    /// yet taken ([`ControlledDisk::take_served_writes`]).
    served_writes: Vec<u64>,
}

/// A negative errno as a ublk result.
fn neg(errno: i32) -> i32 {
    -errno
}

impl ControlledDisk {
    /// A disk holding `image`, all of it durable. The length is rounded
    /// down to whole sectors.
    pub fn from_image(mut image: Vec<u8>) -> ControlledDisk {
        image.truncate(image.len() / 512 * 512);
        Self::of_disk(SimDisk::from_image(image))
    }

    /// A disk of `bytes` (rounded down to whole sectors), every one
    /// `fill`, all of it durable.
    pub fn filled(bytes: u64, fill: u8) -> ControlledDisk {
        Self::of_disk(SimDisk::filled(bytes / 512, fill))
    }

    fn of_disk(disk: SimDisk) -> ControlledDisk {
        ControlledDisk {
            disk,
            counts: RequestCounts::default(),
            powered: true,
            fail_next_discard: false,
            fired: Vec::new(),
            discard_zeroes: false,
            served_writes: Vec::new(),
        }
    }

    /// This disk, its discards written as zeroes over their range (a
    /// volatile write like any other, kept or lost at a power cut): what
    /// the thin pool model's data device does with a passdown discard
    /// (`model/src/thin/pool/io.rs`, as a loop device over a file
    /// punches a hole that reads back zeroes). Without it a discard
    /// changes nothing, as qemu's raw drives and the cache model's disks
    /// do.
    pub fn zeroing_discards(mut self) -> ControlledDisk {
        self.discard_zeroes = true;
        self
    }

    /// Arms a fault as the simulator arms its disk (see
    /// [`crate::ublk_faults`]).
    pub fn arm(&mut self, arm: crate::ublk_faults::Arm) {
        use crate::ublk_faults::Arm;
        match arm {
            Arm::Next(f) => self.disk.arm(f),
            Arm::AfterWrites { skip, fault } => self.disk.arm_after_writes(skip, fault),
            Arm::AfterWriteError(f) => self.disk.arm_after_write_error(f),
            Arm::NextDiscard => self.fail_next_discard = true,
        }
    }

    /// Faults armed and not fired (an armed discard failure included).
    pub fn armed(&self) -> usize {
        self.disk.armed() + usize::from(self.fail_next_discard)
    }

    /// Whether an `aim-fault passdown` still waits for a discard.
    pub fn discard_failure_armed(&self) -> bool {
        self.fail_next_discard
    }

    /// The faults that fired since the last call, in order, with the
    /// requests they fired on.
    pub fn take_fired(&mut self) -> Vec<crate::ublk_faults::FiredRequest> {
        std::mem::take(&mut self.fired)
    }

    /// The first sectors of the writes and write-zeroes served since the
    /// last call, in the order they were served — those that failed (an
    /// armed fault, a bad sector) too: the order decides which write a
    /// fault meets. Not those after a power cut.
    pub fn take_served_writes(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.served_writes)
    }

    fn note_fired(&mut self, req: &Request) {
        let request = match req.kind {
            RequestKind::Read => "read",
            RequestKind::Write { fua: false } => "write",
            RequestKind::Write { fua: true } => "write-fua",
            RequestKind::Discard => "discard",
            RequestKind::Flush => "flush",
            RequestKind::WriteZeroes => "write-zeroes",
            RequestKind::Other(_) => "other",
        };
        for f in self.disk.take_fired() {
            self.fired.push(crate::ublk_faults::FiredRequest {
                request,
                sector: req.sector,
                nr_sectors: req.nr_sectors,
                what: f.description,
            });
        }
    }

    /// Size in sectors.
    pub fn sectors(&self) -> u64 {
        self.disk.visible().len() as u64 / 512
    }

    /// What is certainly durable now.
    pub fn durable(&self) -> &Image {
        self.disk.durable()
    }

    /// What reads return now.
    pub fn visible(&self) -> &Image {
        self.disk.visible()
    }

    /// Writes acknowledged since the last completed flush, in order.
    pub fn since_flush(&self) -> &[PendingWrite] {
        self.disk.since_flush()
    }

    /// What was served so far.
    pub fn counts(&self) -> RequestCounts {
        self.counts
    }

    /// Cuts the power: from now on every request fails with `EIO` and the
    /// disk's state (durable image, volatile writes) no longer changes.
    pub fn cut_power(&mut self) {
        self.powered = false;
    }

    /// Whether [`Self::cut_power`] has not run.
    pub fn powered(&self) -> bool {
        self.powered
    }

    /// What a power cut now leaves, as `mode` and `seed` choose among the
    /// volatile writes: `faults::SimDisk::crash_state` itself (durable
    /// image, FUA writes, the kept unflushed writes in order, one perhaps
    /// torn).
    pub fn crash_state(&self, mode: CrashMode, seed: u32) -> (Vec<u8>, CrashSummary) {
        self.disk.crash_state(mode, seed)
    }

    /// The byte length of a request, or `None` when it leaves the disk or
    /// the buffer.
    fn len(&self, sector: u64, nr: u32, buf_len: usize) -> Option<usize> {
        let end = sector.checked_add(u64::from(nr))?;
        if end > self.sectors() || u64::from(nr) * 512 > buf_len as u64 {
            return None;
        }
        Some(nr as usize * 512)
    }

    /// Serves one request with `buf` (the tag's buffer: a write's data
    /// in, a read's data out). Returns the ublk result: bytes done, or a
    /// negative errno (`EIO` out of range or after a power cut,
    /// `EOPNOTSUPP` for an unknown op). Never panics on a hostile request.
    pub fn serve(&mut self, req: &Request, buf: &mut [u8]) -> i32 {
        let bytes = (u64::from(req.nr_sectors) * 512).min(i32::MAX as u64) as i32;
        let eio = neg(libc::EIO);
        if self.powered && matches!(req.kind, RequestKind::Write { .. } | RequestKind::WriteZeroes) {
            self.served_writes.push(req.sector);
        }
        let result = if !self.powered {
            eio
        } else {
            match req.kind {
                RequestKind::Flush => {
                    // Everything acknowledged is durable now; the sector of
                    // a flush request means nothing.
                    self.counts.flushes += 1;
                    match self.disk.flush() {
                        Ok(()) => 0,
                        Err(_) => eio,
                    }
                }
                RequestKind::Read => match self.len(req.sector, req.nr_sectors, buf.len()) {
                    Some(n) => match self.disk.read(req.sector, &mut buf[..n]) {
                        Ok(()) => {
                            self.counts.reads += 1;
                            bytes
                        }
                        Err(_) => eio,
                    },
                    None => eio,
                },
                RequestKind::Write { fua } => match self.len(req.sector, req.nr_sectors, buf.len()) {
                    Some(n) => match self.disk.write(req.sector, &buf[..n], WriteFlags { fua }) {
                        Ok(()) => {
                            self.counts.writes += 1;
                            if fua {
                                self.counts.fua_writes += 1;
                            }
                            bytes
                        }
                        Err(_) => eio,
                    },
                    None => eio,
                },
                RequestKind::WriteZeroes => match self.len(req.sector, req.nr_sectors, usize::MAX) {
                    Some(n) => match self.disk.write(req.sector, &vec![0u8; n], WriteFlags::default()) {
                        Ok(()) => {
                            self.counts.write_zeroes += 1;
                            bytes
                        }
                        Err(_) => eio,
                    },
                    None => eio,
                },
                // Like qemu's raw drives and the model's disks: a discard
                // changes nothing.
                RequestKind::Discard => match self.len(req.sector, req.nr_sectors, usize::MAX) {
                    Some(_) if self.fail_next_discard => {
                        self.fail_next_discard = false;
                        self.fired.push(crate::ublk_faults::FiredRequest {
                            request: "discard",
                            sector: req.sector,
                            nr_sectors: req.nr_sectors,
                            what: "aimed passdown discard error".into(),
                        });
                        eio
                    }
                    Some(n) if self.discard_zeroes => {
                        match self.disk.write(req.sector, &vec![0u8; n], WriteFlags::default()) {
                            Ok(()) => {
                                self.counts.discards += 1;
                                bytes
                            }
                            Err(_) => eio,
                        }
                    }
                    Some(_) => {
                        self.counts.discards += 1;
                        bytes
                    }
                    None => eio,
                },
                RequestKind::Other(_) => neg(libc::EOPNOTSUPP),
            }
        };
        if result < 0 {
            self.counts.errors += 1;
        }
        self.note_fired(req);
        result
    }
}

/// How a device is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceShape {
    /// Tags on the one queue.
    pub depth: u16,
    /// Bytes per tag buffer (the largest request).
    pub buf_bytes: u32,
    /// The largest request in sectors the device advertises
    /// (`max_sectors`); 0: the buffer's size. A small one keeps the block
    /// layer from merging neighbouring writes into one request, so that
    /// the disk sees the requests the model's disk sees (one per metadata
    /// block, at most one data block each).
    pub max_sectors: u32,
}

impl Default for DeviceShape {
    fn default() -> Self {
        DeviceShape { depth: 16, buf_bytes: 512 << 10, max_sectors: 0 }
    }
}

/// A served ublk device: its block node and the thread serving it.
/// [`UblkDevice::stop`] stops and deletes it and returns the disk; drop
/// does the same, best effort, on error paths.
pub struct UblkDevice<'c> {
    ctl: &'c UblkControl,
    dev_id: u32,
    block: PathBuf,
    granted: DevInfo,
    thread: Option<JoinHandle<Result<(), String>>>,
    /// The disk, shared with the queue thread (locked per request).
    disk: Arc<Mutex<ControlledDisk>>,
    deleted: bool,
    /// Set by [`UblkDevice::cut_power`]; the queue thread then fails
    /// every request.
    power_cut: Arc<AtomicBool>,
    /// Faults to arm and faults fired, shared with the queue thread.
    control: Arc<Mutex<crate::ublk_faults::DiskControl>>,
    /// The quiet window, in microseconds, for which the queue thread holds
    /// requests ([`UblkDevice::hold_until_quiet`]); 0: none held.
    hold_us: Arc<AtomicU64>,
    /// The gate ([`UblkDevice::gate`]), shared with the queue thread.
    gate: Arc<Gate>,
}

/// What a disk's gate holds ([`UblkDevice::gate`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GateKinds {
    /// Read requests.
    pub reads: bool,
    /// Write requests (FUA or not).
    pub writes: bool,
    /// FLUSH requests (a pool's commit flushes the data device first and
    /// waits for it: holding that flush holds the pool's worker).
    pub flushes: bool,
}

/// Requests held at a closed gate: closed by [`UblkDevice::gate`],
/// counted and served by the queue thread.
#[derive(Debug, Default)]
struct Gate {
    /// Whether reads are held.
    reads: AtomicBool,
    /// Whether writes are held.
    writes: AtomicBool,
    /// Whether flushes are held.
    flushes: AtomicBool,
    /// How many requests the gate holds now.
    held: AtomicUsize,
    /// Held requests to serve now, by their place among those held
    /// ([`UblkDevice::serve_held`]), in the order asked.
    serve: Mutex<Vec<usize>>,
}

impl Gate {
    fn holds(&self, kind: RequestKind) -> bool {
        match kind {
            RequestKind::Read => self.reads.load(Ordering::SeqCst),
            RequestKind::Write { .. } => self.writes.load(Ordering::SeqCst),
            RequestKind::Flush => self.flushes.load(Ordering::SeqCst),
            _ => false,
        }
    }

    fn open(&self) -> bool {
        !self.reads.load(Ordering::SeqCst)
            && !self.writes.load(Ordering::SeqCst)
            && !self.flushes.load(Ordering::SeqCst)
    }
}

impl std::fmt::Debug for UblkDevice<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UblkDevice").field("dev_id", &self.dev_id).field("block", &self.block).finish()
    }
}

impl<'c> UblkDevice<'c> {
    /// Adds a device of `disk`'s size, sets its parameters (volatile
    /// cache, FUA, discard, 512-byte logical blocks), starts its server
    /// thread, starts it and waits for `/dev/ublkbN`. On failure nothing
    /// is left (the device is stopped and deleted).
    pub fn start(
        ctl: &'c UblkControl,
        disk: ControlledDisk,
        shape: DeviceShape,
    ) -> Result<UblkDevice<'c>, ShimError> {
        let info = ctl.add_device(shape.depth, shape.buf_bytes, 0)?;
        let mut dev = UblkDevice {
            ctl,
            dev_id: info.dev_id,
            block: PathBuf::from(format!("/dev/ublkb{}", info.dev_id)),
            granted: info,
            thread: None,
            disk: Arc::new(Mutex::new(disk)),
            deleted: false,
            power_cut: Arc::new(AtomicBool::new(false)),
            control: Arc::new(Mutex::new(crate::ublk_faults::DiskControl::default())),
            hold_us: Arc::new(AtomicU64::new(0)),
            gate: Arc::new(Gate::default()),
        };
        let buf_bytes = info.max_io_buf_bytes;
        let limits = Limits {
            sectors: lock(&dev.disk).sectors(),
            max_sectors: match shape.max_sectors {
                0 => buf_bytes >> 9,
                m => m.clamp(8, buf_bytes >> 9),
            },
            discard_granularity: 4096,
            max_discard_sectors: 1 << 22,
        };
        ctl.set_params(dev.dev_id, limits)?;
        let char_dev = PathBuf::from(format!("/dev/ublkc{}", dev.dev_id));
        node(&char_dev, Duration::from_secs(10))?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let depth = info.queue_depth;
        let shared = QueueShared {
            disk: Arc::clone(&dev.disk),
            power_cut: Arc::clone(&dev.power_cut),
            control: Arc::clone(&dev.control),
            hold_us: Arc::clone(&dev.hold_us),
            gate: Arc::clone(&dev.gate),
        };
        let thread = std::thread::Builder::new()
            .name(format!("ublk{}", dev.dev_id))
            .spawn(move || serve_queue(&char_dev, depth, buf_bytes, &shared, ready_tx))
            .map_err(|e| io_err("spawn the ublk queue thread", e))?;
        dev.thread = Some(thread);
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(ShimError::Invalid(format!("ublk queue of dev {}: {e}", dev.dev_id))),
            Err(_) => {
                let e = dev.join().err().unwrap_or_default();
                return Err(ShimError::Invalid(format!("ublk queue of dev {} ended early: {e}", dev.dev_id)));
            }
        }
        ctl.start_device(dev.dev_id)?;
        node(&dev.block, Duration::from_secs(10))?;
        // One request per bio, as the simulator's disk takes them: the
        // block layer would merge adjacent bios (a write over two thin
        // blocks mapped to adjacent data blocks, say) into one request,
        // and a power cut's choice among the volatile writes would then
        // count them differently.
        let nomerges = format!("/sys/block/ublkb{}/queue/nomerges", dev.dev_id);
        std::fs::write(&nomerges, "2").map_err(|e| io_err(format!("write 2 to {nomerges}"), e))?;
        Ok(dev)
    }

    /// Cuts the disk's power: every request the queue thread takes from
    /// now on fails with `EIO` and changes nothing, so the disk keeps the
    /// durable image and volatile writes it had ([`ControlledDisk::cut_power`]).
    /// Failing rather than holding the requests lets the dead pool be torn
    /// down: a held request would keep a suspend or a remove waiting
    /// forever. [`UblkDevice::stop`] then returns the disk.
    pub fn cut_power(&self) {
        self.power_cut.store(true, Ordering::SeqCst);
    }

    /// Holds the disk's reads, writes, discards and write-zeroes until the
    /// kernel has been quiet (no new request) for `window`, then completes
    /// the oldest held one and waits for quiet again; a FLUSH is served at
    /// once, and makes durable only the writes completed before it.
    /// `None` (the default) serves every request as it comes; turning
    /// holding off serves what is held, in order.
    ///
    /// This is the serialized simulator's order (`ThinSim::quiesce`): the
    /// pool's worker runs to the end — allocations, commits and their
    /// data flushes, errors for want of space — before the oldest data
    /// I/O in flight completes, and again after each completion. Served
    /// at once, a data write the pool remapped in its map function races
    /// the worker's commit to the disk, and a power cut keeps or loses it
    /// as the race went; held, it completes after the worker settles.
    /// A quiet window is a judgement of the kernel's speed, not a proof
    /// that its worker is idle: a worker slower than the window completes
    /// in the racing order again.
    pub fn hold_until_quiet(&self, window: Option<Duration>) {
        let us = window.map_or(0, |w| (w.as_micros() as u64).max(1));
        self.hold_us.store(us, Ordering::SeqCst);
    }

    /// Sets what the disk's gate holds. While it holds a kind, every
    /// request of that kind is held, whatever
    /// [`UblkDevice::hold_until_quiet`] says, until
    /// [`UblkDevice::serve_held`] picks it or the gate opens
    /// (`GateKinds::default()`), which serves what is held in the order it
    /// came. A power cut opens it too (the requests then fail).
    ///
    /// This is how a replay keeps one of the pool's I/Os in flight — a
    /// break-sharing copy starts with a read of the shared block; a write
    /// the pool remapped is one write — while other requests race it: the
    /// trace's `complete` order for the few I/Os a race turns on.
    pub fn gate(&self, kinds: GateKinds) {
        self.gate.reads.store(kinds.reads, Ordering::SeqCst);
        self.gate.writes.store(kinds.writes, Ordering::SeqCst);
        self.gate.flushes.store(kinds.flushes, Ordering::SeqCst);
    }

    /// How many requests the gate holds now ([`UblkDevice::gate`]).
    pub fn held(&self) -> usize {
        self.gate.held.load(Ordering::SeqCst)
    }

    /// Asks the queue thread to serve the `k`-th request the gate holds
    /// (0: the oldest), keeping the others held; an index past the end is
    /// ignored. The count [`UblkDevice::held`] drops once it is served.
    pub fn serve_held(&self, k: usize) {
        lock(&self.gate.serve).push(k);
    }

    /// Arms a fault on the disk: the queue thread hands it to the disk
    /// before it serves the next request ([`ControlledDisk::arm`]).
    pub fn arm(&self, arm: crate::ublk_faults::Arm) {
        lock(&self.control).arms.push(arm);
    }

    /// The faults that fired since the last call, in order.
    pub fn take_fired(&self) -> Vec<crate::ublk_faults::FiredRequest> {
        std::mem::take(&mut lock(&self.control).fired)
    }

    /// The disk's [`ControlledDisk::take_served_writes`].
    pub fn take_served_writes(&self) -> Vec<u64> {
        lock(&self.disk).take_served_writes()
    }

    /// The first `len` bytes a read of the disk would return now (its
    /// volatile writes included): the metadata superblock, whose change
    /// between two ops says the pool committed in between.
    pub fn visible_prefix(&self, len: usize) -> Vec<u8> {
        let disk = lock(&self.disk);
        let v = disk.disk.visible();
        v.range(0..len.min(v.len()))
    }

    /// `f` of the whole disk as a read would return it now (its volatile
    /// writes included), read in place under the disk's lock.
    pub fn with_visible<R>(&self, f: impl FnOnce(&Image) -> R) -> R {
        let disk = lock(&self.disk);
        f(disk.disk.visible())
    }

    /// The block device node (`/dev/ublkbN`).
    pub fn block(&self) -> &Path {
        &self.block
    }

    /// The device id.
    pub fn dev_id(&self) -> u32 {
        self.dev_id
    }

    /// The device as `ADD_DEV` answered: the `UBLK_F_*` flags granted
    /// (6.1 as a module always adds `UBLK_F_URING_CMD_COMP_IN_TASK`), the
    /// buffer size rounded to pages, the queues capped at the CPUs.
    pub fn granted(&self) -> DevInfo {
        self.granted
    }

    fn join(&mut self) -> Result<ControlledDisk, String> {
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| "the ublk queue thread panicked".to_string())??,
            None => return Err("no queue thread".into()),
        }
        Ok(std::mem::replace(&mut *lock(&self.disk), ControlledDisk::from_image(Vec::new())))
    }

    /// Runs `f` on the disks of `devices` at one instant: every disk is
    /// locked (in the order given) before `f` runs, so no request changes
    /// any of them meanwhile — what `f` sees of their durable images is
    /// what one power cut at that instant would keep.
    pub fn with_disks<R>(devices: &[&UblkDevice<'_>], f: impl FnOnce(&[&ControlledDisk]) -> R) -> R {
        let guards: Vec<_> = devices.iter().map(|d| lock(&d.disk)).collect();
        let disks: Vec<&ControlledDisk> = guards.iter().map(|g| &**g).collect();
        f(&disks)
    }

    fn simple(&self, op: u32) -> Result<i32, ShimError> {
        Ok(self.ctl.device_command(op, self.dev_id)?)
    }

    /// Who holds the block device open as a holder (device-mapper
    /// devices on it): `/sys/block/ublkbN/holders`.
    pub fn holders(&self) -> Vec<String> {
        let dir = format!("/sys/block/ublkb{}/holders", self.dev_id);
        let mut out: Vec<String> = std::fs::read_dir(dir)
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        out.sort();
        out
    }

    /// Stops the device (the driver removes the disk, then aborts the
    /// queue's fetches, so the thread ends), joins the thread, deletes
    /// the device; returns the disk as served. A device another device
    /// still holds (a pool whose teardown failed) is stopped but not
    /// deleted, and that is an error: 6.1's `DEL_DEV` waits,
    /// uninterruptibly, until the last reference to the disk goes.
    pub fn stop(mut self) -> Result<ControlledDisk, ShimError> {
        self.shut()
    }

    fn shut(&mut self) -> Result<ControlledDisk, ShimError> {
        // A held request would keep the stop waiting.
        self.gate(GateKinds::default());
        let held = self.holders();
        let stopped = self.simple(CMD_STOP_DEV);
        let disk = self.join();
        self.deleted = true;
        if !held.is_empty() {
            return Err(ShimError::Invalid(format!(
                "ublk dev {} is still held by {held:?}: stopped, not deleted (DEL_DEV would wait for them forever)",
                self.dev_id
            )));
        }
        // DEL_DEV waits until the char device is closed: after the join.
        let deleted = self.simple(CMD_DEL_DEV);
        stopped?;
        deleted?;
        disk.map_err(|e| ShimError::Invalid(format!("ublk dev {}: {e}", self.dev_id)))
    }
}

impl Drop for UblkDevice<'_> {
    fn drop(&mut self) {
        if !self.deleted {
            let _ = self.shut();
        }
    }
}

/// The nodes of [`live_devices`] that belong to the devices `ids` (their
/// `ublkc<id>` and `ublkb<id>`): what a job left of its own devices while
/// other jobs' devices run beside it.
pub fn live_devices_of(ids: &[u32]) -> Vec<String> {
    live_devices()
        .into_iter()
        .filter(|name| {
            let id = name.strip_prefix("ublkc").or_else(|| name.strip_prefix("ublkb"));
            id.and_then(|id| id.parse::<u32>().ok()).is_some_and(|id| ids.contains(&id))
        })
        .collect()
}

/// The ublk devices the kernel has now (`/sys/class/ublk-char` entries
/// and `/dev/ublkb*` nodes), for a check that none is left.
pub fn live_devices() -> Vec<String> {
    let mut out = Vec::new();
    for dir in ["/sys/class/ublk-char", "/sys/block"] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("ublkc") || name.starts_with("ublkb") {
                    out.push(name);
                }
            }
        }
    }
    out.sort();
    out
}

/// Hands the armed faults to the disk, in arming order.
fn apply_arms(disk: &mut ControlledDisk, control: &Mutex<crate::ublk_faults::DiskControl>) {
    for a in std::mem::take(&mut lock(control).arms) {
        disk.arm(a);
    }
}

/// The queue thread: opens the char device, maps the descriptors, fetches
/// on every tag, reports ready, then serves until every tag is aborted
/// (the device stopped). The disk stays in `disk` ([`UblkDevice::stop`] takes it).
fn serve_queue(
    char_dev: &Path,
    depth: u16,
    buf_bytes: u32,
    shared: &QueueShared,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) -> Result<(), String> {
    let QueueShared { disk, power_cut, control, hold_us, gate } = shared;
    let fail = |e: String| {
        let _ = ready.send(Err(e.clone()));
        Err(e)
    };
    let file = match OpenOptions::new().read(true).write(true).open(char_dev) {
        Ok(f) => f,
        Err(e) => return fail(format!("open {}: {e}", char_dev.display())),
    };
    let fd = file.as_raw_fd();
    let descs = match DescMap::new(fd, depth) {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    let entries = u32::from(depth).next_power_of_two().max(4);
    let mut ring = match io_uring::IoUring::<io_uring::squeue::Entry, io_uring::cqueue::Entry>::builder()
        .build(entries)
    {
        Ok(r) => r,
        Err(e) => return fail(format!("io_uring for the queue: {e}")),
    };
    let mut bufs: Vec<Vec<u8>> = (0..depth).map(|_| vec![0u8; buf_bytes as usize]).collect();
    for tag in 0..depth {
        let sqe = io_sqe(fd, IO_FETCH_REQ, tag, 0, &mut bufs[usize::from(tag)]);
        // SAFETY: the buffers live until every tag is aborted, below.
        if unsafe { ring.submission().push(&sqe) }.is_err() {
            return fail("submission queue full".into());
        }
    }
    if let Err(e) = ring.submit() {
        return fail(format!("submit the fetches: {e}"));
    }
    let _ = ready.send(Ok(()));
    let mut live = usize::from(depth);
    let mut error = None;
    // Requests held until the kernel is quiet, oldest first.
    let mut held: std::collections::VecDeque<Request> = std::collections::VecDeque::new();
    // Requests held at the gate, oldest first.
    let mut gated: std::collections::VecDeque<Request> = std::collections::VecDeque::new();
    // Serves one request and queues its answer with the next fetch.
    let serve = |ring: &mut io_uring::IoUring, bufs: &mut [Vec<u8>], req: &Request| -> Result<(), String> {
        let tag = req.tag;
        let result = {
            let mut disk = lock(disk);
            if disk.powered() && power_cut.load(Ordering::SeqCst) {
                disk.cut_power();
            }
            apply_arms(&mut disk, control);
            let result = disk.serve(req, &mut bufs[usize::from(tag)]);
            let fired = disk.take_fired();
            if !fired.is_empty() {
                lock(control).fired.extend(fired);
            }
            result
        };
        let sqe = io_sqe(fd, IO_COMMIT_AND_FETCH_REQ, tag, result, &mut bufs[usize::from(tag)]);
        // SAFETY: as above; at most `depth` commands are in flight.
        if unsafe { ring.submission().push(&sqe) }.is_err() {
            return Err("submission queue full".into());
        }
        Ok(())
    };
    while live > 0 {
        let window = hold_us.load(Ordering::SeqCst);
        // Holding off, or power cut: what is held is served, in order.
        if window == 0 || power_cut.load(Ordering::SeqCst) {
            while let Some(req) = held.pop_front() {
                serve(&mut ring, &mut bufs, &req)?;
            }
        }
        // Gated requests picked to be served.
        for k in std::mem::take(&mut *lock(&gate.serve)) {
            if let Some(req) = gated.remove(k) {
                serve(&mut ring, &mut bufs, &req)?;
                gate.held.store(gated.len(), Ordering::SeqCst);
            }
        }
        // The gate opened, or power cut: the gated requests are served.
        if !gated.is_empty() && (gate.open() || power_cut.load(Ordering::SeqCst)) {
            while let Some(req) = gated.pop_front() {
                serve(&mut ring, &mut bufs, &req)?;
            }
            gate.held.store(0, Ordering::SeqCst);
        }
        let waited = if held.is_empty() && gated.is_empty() {
            ring.submit_and_wait(1)
        } else {
            // Gated requests alone: a short poll for the gate to open or
            // a pick.
            let wait_us = if held.is_empty() { GATE_POLL_US } else { window };
            let ts = io_uring::types::Timespec::new()
                .sec(wait_us / 1_000_000)
                .nsec(((wait_us % 1_000_000) * 1000) as u32);
            let args = io_uring::types::SubmitArgs::new().timespec(&ts);
            ring.submitter().submit_with_args(1, &args)
        };
        match waited {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => {
                // Quiet for the window: the oldest held request completes
                // (none: the gate's poll ran out).
                if let Some(req) = held.pop_front() {
                    serve(&mut ring, &mut bufs, &req)?;
                }
                continue;
            }
            Err(e) => return Err(format!("io_uring wait: {e}")),
        }
        let done: Vec<(u64, i32)> =
            ring.completion().map(|c: io_uring::cqueue::Entry| (c.user_data(), c.result())).collect();
        for (user_data, res) in done {
            let tag = user_data as u16;
            if usize::from(tag) >= bufs.len() {
                error.get_or_insert(format!("completion for unknown tag {user_data}"));
                continue;
            }
            if res == 0 {
                let req = Request::from_desc(tag, &descs.get(tag));
                if gate.holds(req.kind) && !power_cut.load(Ordering::SeqCst) {
                    gated.push_back(req);
                    gate.held.store(gated.len(), Ordering::SeqCst);
                    continue;
                }
                let hold = hold_us.load(Ordering::SeqCst) != 0
                    && !power_cut.load(Ordering::SeqCst)
                    && !matches!(req.kind, RequestKind::Flush | RequestKind::Other(_));
                if hold {
                    held.push_back(req);
                } else {
                    serve(&mut ring, &mut bufs, &req)?;
                }
            } else {
                // -ENODEV: aborted (the device stops); anything else is
                // our mistake, and the tag is lost as well.
                if res != -libc::ENODEV {
                    error.get_or_insert(format!("tag {tag}: command failed with errno {}", -res));
                }
                live -= 1;
            }
        }
    }
    drop(ring);
    drop(descs);
    drop(file);
    // Faults armed after the last request stay armed on the disk.
    apply_arms(&mut lock(disk), control);
    match error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// What a queue thread shares with its [`UblkDevice`].
struct QueueShared {
    disk: Arc<Mutex<ControlledDisk>>,
    power_cut: Arc<AtomicBool>,
    control: Arc<Mutex<crate::ublk_faults::DiskControl>>,
    hold_us: Arc<AtomicU64>,
    gate: Arc<Gate>,
}

/// How often, in microseconds, a queue thread holding only gated requests
/// looks whether the gate opened or one was picked.
const GATE_POLL_US: u64 = 2_000;

/// Locks a disk or its fault control; a poisoned lock (a panic while
/// serving) still gives the value as it was left (a disk's state, or plain
/// vectors of arms and fired faults).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(kind: RequestKind, sector: u64, nr_sectors: u32) -> Request {
        Request { tag: 0, kind, sector, nr_sectors }
    }

    #[test]
    fn abi_sizes_are_6_1s() {
        assert_eq!(std::mem::size_of::<CtrlCmd>(), 32);
        assert_eq!(std::mem::size_of::<DevInfo>(), 64);
        assert_eq!(std::mem::size_of::<ParamBasic>(), 32);
        assert_eq!(std::mem::size_of::<ParamDiscard>(), 20);
        assert_eq!(std::mem::size_of::<Params>(), 64);
        assert_eq!(std::mem::size_of::<IoDesc>(), 24);
        assert_eq!(std::mem::size_of::<IoCmd>(), 16);
    }

    #[test]
    fn descriptors_decode() {
        let d = IoDesc { op_flags: u32::from(OP_WRITE) | IO_F_FUA, nr_sectors: 8, start_sector: 16, addr: 0 };
        assert_eq!(Request::from_desc(3, &d), req_tag(3, RequestKind::Write { fua: true }, 16, 8));
        let d = IoDesc { op_flags: u32::from(OP_FLUSH), nr_sectors: 0, start_sector: u64::MAX, addr: 0 };
        assert_eq!(Request::from_desc(0, &d).kind, RequestKind::Flush);
        let d = IoDesc { op_flags: 0x7f, ..IoDesc::default() };
        assert_eq!(Request::from_desc(0, &d).kind, RequestKind::Other(0x7f));
    }

    fn req_tag(tag: u16, kind: RequestKind, sector: u64, nr_sectors: u32) -> Request {
        Request { tag, kind, sector, nr_sectors }
    }

    #[test]
    fn writes_are_volatile_until_a_flush_and_fua_is_durable() {
        let mut d = ControlledDisk::from_image(vec![0xa7; 16 * 512]);
        let mut buf = vec![1u8; 4096];
        assert_eq!(d.serve(&req(RequestKind::Write { fua: false }, 2, 2), &mut buf), 1024);
        assert_eq!(d.visible().range(1024..2048), vec![1u8; 1024]);
        assert_eq!(d.durable().range(1024..2048), vec![0xa7u8; 1024]);
        let mut fua = vec![2u8; 512];
        assert_eq!(d.serve(&req(RequestKind::Write { fua: true }, 8, 1), &mut fua), 512);
        assert_eq!(d.durable().range(4096..4608), vec![2u8; 512]);
        assert_eq!(d.since_flush().len(), 2);
        let mut out = vec![0u8; 1024];
        assert_eq!(d.serve(&req(RequestKind::Read, 2, 2), &mut out), 1024);
        assert_eq!(out, vec![1u8; 1024]);
        // A flush's sector is meaningless: no bounds check.
        assert_eq!(d.serve(&req(RequestKind::Flush, u64::MAX, 0), &mut []), 0);
        assert_eq!(d.durable(), d.visible());
        assert!(d.since_flush().is_empty());
        let c = d.counts();
        assert_eq!((c.writes, c.fua_writes, c.flushes, c.reads, c.errors), (2, 1, 1, 1, 0));
    }

    /// The disk keeps the order in which it served writes (the agent's
    /// `data-writes.<op>` note): write-zeroes and failed writes too; not
    /// reads, flushes, or anything after a power cut.
    #[test]
    fn served_writes_are_kept_in_order_until_taken() {
        let mut d = ControlledDisk::from_image(vec![0; 16 * 512]);
        let mut buf = vec![1u8; 4096];
        d.serve(&req(RequestKind::Write { fua: false }, 8, 1), &mut buf);
        d.serve(&req(RequestKind::Read, 0, 1), &mut buf);
        d.serve(&req(RequestKind::WriteZeroes, 2, 2), &mut buf);
        d.serve(&req(RequestKind::Flush, 0, 0), &mut buf);
        d.serve(&req(RequestKind::Write { fua: true }, 0, 1), &mut buf);
        // Past the end: it fails, and is served.
        d.serve(&req(RequestKind::Write { fua: false }, 15, 4), &mut buf);
        assert_eq!(d.take_served_writes(), vec![8, 2, 0, 15]);
        assert!(d.take_served_writes().is_empty());
        d.cut_power();
        d.serve(&req(RequestKind::Write { fua: false }, 3, 1), &mut buf);
        assert!(d.take_served_writes().is_empty());
    }

    #[test]
    fn a_discard_zeroes_its_range_volatile_only_on_a_zeroing_disk() {
        let mut plain = ControlledDisk::from_image(vec![0xa7; 16 * 512]);
        assert_eq!(plain.serve(&req(RequestKind::Discard, 4, 4), &mut []), 2048);
        assert_eq!(plain.visible(), &vec![0xa7; 16 * 512][..], "a plain disk's discard changes nothing");
        let mut d = ControlledDisk::from_image(vec![0xa7; 16 * 512]).zeroing_discards();
        assert_eq!(d.serve(&req(RequestKind::Discard, 4, 4), &mut []), 2048);
        assert_eq!(d.visible().range(2048..4096), vec![0u8; 2048]);
        assert_eq!(d.visible().range(0..2048), vec![0xa7u8; 2048]);
        assert_eq!(d.durable().range(2048..4096), vec![0xa7u8; 2048], "volatile until a flush");
        assert_eq!(d.since_flush().len(), 1, "one write in the crash log, as the model's zero write");
        assert_eq!(d.serve(&req(RequestKind::Discard, 15, 2), &mut []), -libc::EIO, "past the end");
        assert_eq!(d.counts().discards, 1);
    }

    #[test]
    fn hostile_requests_fail_without_panicking() {
        let mut d = ControlledDisk::from_image(vec![0; 8 * 512]);
        let mut buf = vec![0u8; 1024];
        assert_eq!(d.serve(&req(RequestKind::Read, 7, 2), &mut buf), -libc::EIO);
        assert_eq!(d.serve(&req(RequestKind::Write { fua: false }, u64::MAX, 2), &mut buf), -libc::EIO);
        assert_eq!(d.serve(&req(RequestKind::Read, 0, 4), &mut buf), -libc::EIO, "larger than the buffer");
        assert_eq!(d.serve(&req(RequestKind::Discard, 4, 8), &mut buf), -libc::EIO);
        assert_eq!(d.serve(&req(RequestKind::Other(9), 0, 1), &mut buf), -libc::EOPNOTSUPP);
        assert_eq!(d.serve(&req(RequestKind::Discard, 0, 8), &mut buf), 4096);
        assert_eq!(d.counts().errors, 5);
        assert!(d.since_flush().is_empty());
    }

    #[test]
    fn a_power_cut_fails_requests_and_keeps_what_simdisk_would() {
        use dmsim_model::block_device::BlockDevice;
        let mut d = ControlledDisk::from_image(vec![0; 64 * 512]);
        let mut sim = SimDisk::from_image(vec![0; 64 * 512]);
        for i in 0..12u64 {
            let fua = i % 5 == 4;
            let mut buf = vec![i as u8 + 1; 4 * 512];
            assert_eq!(d.serve(&req(RequestKind::Write { fua }, i * 3, 4), &mut buf), 2048);
            sim.write(i * 3, &buf[..2048], WriteFlags { fua }).unwrap();
            if i == 3 {
                assert_eq!(d.serve(&req(RequestKind::Flush, 0, 0), &mut []), 0);
                sim.flush().unwrap();
            }
        }
        d.cut_power();
        let mut buf = vec![0xee; 512];
        assert_eq!(d.serve(&req(RequestKind::Write { fua: true }, 0, 1), &mut buf), -libc::EIO);
        assert_eq!(d.serve(&req(RequestKind::Flush, 0, 0), &mut []), -libc::EIO);
        assert_eq!(d.serve(&req(RequestKind::Read, 0, 1), &mut buf), -libc::EIO);
        for mode in CrashMode::ALL {
            for seed in [0, 1, 7, 0x9e37_79b9] {
                assert_eq!(d.crash_state(mode, seed), sim.crash_state(mode, seed), "{mode:?} {seed}");
            }
        }
        assert_eq!(d.visible(), sim.visible(), "nothing after the cut reached the disk");
    }

    #[test]
    fn armed_faults_fire_on_the_requests_simdisk_fires_them_on() {
        use crate::ublk_faults::Arm;
        use dmsim_traces::DiskFault;
        let mut d = ControlledDisk::from_image(vec![0; 32 * 512]);
        let mut buf = vec![5u8; 4096];
        d.arm(Arm::Next(DiskFault::ReadError { permanent: true }));
        d.arm(Arm::AfterWrites { skip: 1, fault: DiskFault::WriteError { permanent: false } });
        d.arm(Arm::NextDiscard);
        assert_eq!(d.armed(), 3);
        // The flush and the first write pass; the second write fails.
        assert_eq!(d.serve(&req(RequestKind::Flush, 0, 0), &mut []), 0);
        assert_eq!(d.serve(&req(RequestKind::Write { fua: false }, 0, 1), &mut buf), 512);
        assert_eq!(d.serve(&req(RequestKind::Write { fua: true }, 4, 2), &mut buf), -libc::EIO);
        // The read fails and its sectors go bad: a later write there too.
        assert_eq!(d.serve(&req(RequestKind::Read, 8, 2), &mut buf), -libc::EIO);
        assert_eq!(d.serve(&req(RequestKind::Write { fua: false }, 9, 1), &mut buf), -libc::EIO);
        assert_eq!(d.serve(&req(RequestKind::Discard, 16, 8), &mut buf), -libc::EIO);
        assert_eq!(d.serve(&req(RequestKind::Discard, 16, 8), &mut buf), 8 * 512);
        let fired: Vec<String> = d.take_fired().iter().map(ToString::to_string).collect();
        assert_eq!(
            fired,
            [
                "write-fua sector 4 nr 2: write-error sector 4 nr 2 transient",
                "read sector 8 nr 2: read-error sector 8 nr 2 permanent",
                "write sector 9 nr 1: bad-sector-hit write sector 9 nr 1 (bad sector 9)",
                "discard sector 16 nr 8: aimed passdown discard error",
            ]
        );
        assert_eq!(d.armed(), 0);
        assert!(d.take_fired().is_empty());
    }
}
