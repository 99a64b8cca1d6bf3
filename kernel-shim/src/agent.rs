//! The replay agent: runs as `/init` (PID 1) of the initramfs in the VM.
//!
//! 1. Mounts devtmpfs, proc and sysfs; loads the kernel modules listed in
//!    [`MODULE_LIST`] (in dependency order, with `finit_module`).
//! 2. Finds its disks by their virtio serial numbers ([`DiskRole`]).
//! 3. Reads the request (jobs, each a trace in the text encoding) from the
//!    request disk and runs each job in turn ([`run_job`]) on its own
//!    slices of the metadata and data disks ([`Layout`], dm-linear
//!    devices): a replay job gets a fresh pool (metadata zeroed, data
//!    refilled with [`DATA_FILL`]) and replays the trace ([`Replayer`]): a
//!    thin-pool built from the trace header; `create_thin`, `create_snap`
//!    and `delete` messages (and a logged job's other pool messages
//!    between ops); every read, write, discard and flush as one request
//!    run to completion before the next (O_DIRECT
//!    `pread`/`pwritev2`, FUA as `RWF_DSYNC`, PREFLUSH as an `fsync`
//!    before the write, flush as `fsync`, discard as `BLKDISCARD`).
//!    An activation job opens a pool on the images the host wrote and
//!    activates the listed thin devices. A ublk job builds the pool on two
//!    ublk devices the agent serves itself ([`crate::ublk`]), cuts their
//!    power at every crash op and rebuilds the pool on what survives
//!    (`power_cut`), and writes their durable images to its slices
//!    afterwards.
//! 4. Reads every live device back, block by block, as stamp summaries,
//!    removes the devices and the pool (a clean shutdown: the pool commits),
//!    and after the last job writes one [`KernelResult`] per job to the
//!    result disk and powers off.
//!
//! Everything here but [`init_main`] also works on a host with
//! device-mapper: [`Replayer`] needs only block devices and the control
//! node.

use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dmsim_traces::{Op, Trace};

use crate::dm::{Control, DevNum, TargetSpec};
use crate::error::ShimError;
use crate::protocol::{
    cache_status_field, cache_steps, decode_request_concurrent, errno_name, log_offsets, mark_name,
    message_mark_name, read_frame, summarize, write_frame, CacheSpec, CacheStep, DeviceContents, JobKind,
    KernelResult, Layout, OpResult, PoolSpec, Slice, CACHE_SETTLE_PARAM, CACHE_TICKS_SLEEP_ONLY_PARAM,
    CACHE_UBLK_PARAM, COARSE_PREFIX, JIFFY_PHASE, LOG_SLICE_SECTORS, OP_END_PREFIX, REQUEST_MAGIC,
    RESULT_MAGIC,
};
use crate::vm::DATA_FILL;

/// The file in the initramfs that lists the modules to load, one path a
/// line, dependencies first.
pub const MODULE_LIST: &str = "/etc/dmsim-modules";

/// Name of the pool device of the first job (job `i`'s pool is
/// `dmsim-pool{i}`; names differ per job so that a job whose teardown
/// failed does not stop the next).
pub const POOL_NAME: &str = "dmsim-pool0";

/// The disks the host attaches, told apart by their virtio serial numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskRole {
    /// The request frame (the trace), read-only.
    Request,
    /// The result frame, written by the agent.
    Result,
    /// The pool's metadata device.
    Metadata,
    /// The pool's data device.
    Data,
    /// The dm-log-writes logs of logged jobs (one slice per job).
    Log,
}

impl DiskRole {
    /// Every role.
    pub const ALL: [DiskRole; 5] =
        [DiskRole::Request, DiskRole::Result, DiskRole::Metadata, DiskRole::Data, DiskRole::Log];

    /// The virtio serial number of the disk (at most 20 characters).
    pub fn serial(self) -> &'static str {
        match self {
            DiskRole::Request => "dmsim-request",
            DiskRole::Result => "dmsim-result",
            DiskRole::Metadata => "dmsim-metadata",
            DiskRole::Data => "dmsim-data",
            DiskRole::Log => "dmsim-log",
        }
    }
}

/// Prints a line on the console, prefixed so the host can pick it out.
fn log(msg: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "dmsim-agent: {msg}");
    let _ = out.flush();
}

/// Ops applied in this boot, for the heartbeat ([`start_heartbeat`]).
static OPS_APPLIED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One more op applied.
fn op_applied() {
    OPS_APPLIED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// How often the heartbeat looks.
const HEARTBEAT: Duration = Duration::from_secs(30);

/// Prints `dmsim-agent: N ops applied` every [`HEARTBEAT`] when the count
/// moved since the last line: a VM that works keeps its console growing,
/// so that the host's stall watchdog (`VmOptions::stall_timeout`) tells it
/// from one that stopped (no line at all while ops do not move).
fn start_heartbeat() {
    let _ = std::thread::Builder::new().name("heartbeat".into()).spawn(|| {
        let mut last = 0;
        loop {
            std::thread::sleep(HEARTBEAT);
            let now = OPS_APPLIED.load(std::sync::atomic::Ordering::Relaxed);
            if now != last {
                log(&format!("{now} ops applied"));
                last = now;
            }
        }
    });
}

/// Whether the kernel's command line asks the agent to print each op on
/// the console before it applies it (`dmsim.ops_on_console`, which the
/// host adds with [`crate::vm::KERNEL_LOGLEVEL_ENV`]): beside the kernel's
/// own messages, it says which op each one came in.
fn ops_on_console() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::fs::read_to_string("/proc/cmdline")
            .is_ok_and(|c| c.split_whitespace().any(|w| w == "dmsim.ops_on_console"))
    })
}

fn cstr(s: &str) -> std::ffi::CString {
    std::ffi::CString::new(s).unwrap_or_default()
}

fn mount(source: &str, target: &str, fstype: &str) -> Result<(), ShimError> {
    let _ = std::fs::create_dir_all(target);
    let (s, t, f) = (cstr(source), cstr(target), cstr(fstype));
    // SAFETY: valid NUL-terminated strings; no data argument.
    let r = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(ShimError::io(format!("mount {fstype} on {target}"), e));
        }
    }
    Ok(())
}

/// Loads one module file with `finit_module`; already loaded is fine.
pub fn load_module(path: &Path, params: &str) -> Result<(), ShimError> {
    let file = File::open(path).map_err(|e| ShimError::io(format!("open module {}", path.display()), e))?;
    let params = cstr(params);
    // SAFETY: a valid fd and a NUL-terminated parameter string.
    let r = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(ShimError::io(format!("finit_module {}", path.display()), e));
        }
    }
    Ok(())
}

/// Loads every module of [`MODULE_LIST`], in order. A module whose load
/// fails is reported but does not stop the others (crc32c-intel needs
/// SSE4.2, which not every emulated CPU has).
fn load_modules() -> Vec<String> {
    let mut failures = Vec::new();
    let list = match std::fs::read_to_string(MODULE_LIST) {
        Ok(l) => l,
        Err(e) => return vec![format!("read {MODULE_LIST}: {e}")],
    };
    for line in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Err(e) = load_module(Path::new(line), "") {
            failures.push(e.to_string());
        }
    }
    failures
}

/// The block device nodes of the attached disks, by role: `/dev/vdX`
/// whose `/sys/block/vdX/serial` names the role. Waits up to `wait`.
pub fn find_disks(wait: Duration) -> Result<Vec<(DiskRole, PathBuf)>, ShimError> {
    let deadline = Instant::now() + wait;
    loop {
        let mut found = Vec::new();
        if let Ok(entries) = std::fs::read_dir("/sys/block") {
            for e in entries.flatten() {
                let name = e.file_name();
                let serial = std::fs::read_to_string(e.path().join("serial")).unwrap_or_default();
                if let Some(role) = DiskRole::ALL.into_iter().find(|r| r.serial() == serial.trim()) {
                    let dev = Path::new("/dev").join(&name);
                    if dev.exists() {
                        found.push((role, dev));
                    }
                }
            }
        }
        if DiskRole::ALL.iter().all(|r| found.iter().any(|(f, _)| f == r)) {
            return Ok(found);
        }
        if Instant::now() > deadline {
            let names: Vec<String> = found.iter().map(|(r, p)| format!("{r:?}={}", p.display())).collect();
            return Err(ShimError::Invalid(format!("not every disk appeared; found {}", names.join(", "))));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn disk(disks: &[(DiskRole, PathBuf)], role: DiskRole) -> Result<&Path, ShimError> {
    disks
        .iter()
        .find(|(r, _)| *r == role)
        .map(|(_, p)| p.as_path())
        .ok_or_else(|| ShimError::Invalid(format!("no {role:?} disk")))
}

/// The device number of a block device node.
pub fn block_dev_num(path: &Path) -> Result<DevNum, ShimError> {
    let md = std::fs::metadata(path).map_err(|e| ShimError::io(format!("stat {}", path.display()), e))?;
    if !md.file_type().is_block_device() {
        return Err(ShimError::Invalid(format!("{} is not a block device", path.display())));
    }
    let rdev = md.rdev();
    Ok(DevNum { major: libc::major(rdev), minor: libc::minor(rdev) })
}

/// A page-aligned buffer for O_DIRECT.
pub(crate) struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

impl AlignedBuf {
    pub(crate) fn zeroed(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len.max(4096), 4096).expect("valid layout");
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, len }
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points to at least len initialised bytes we own.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len.max(4096), 4096).expect("valid layout");
        // SAFETY: allocated with this layout in `zeroed`.
        unsafe { std::alloc::dealloc(self.ptr, layout) }
    }
}

// SAFETY: an AlignedBuf owns its allocation alone; moving it to another
// thread moves that ownership.
unsafe impl Send for AlignedBuf {}

/// One op's data request on a thin device, with its own buffer, so that
/// it can run on a thread of its own (given its own descriptor) while
/// other ops go on ([`crate::protocol::RaceStep::Background`]).
struct DataIo {
    index: usize,
    /// The live device it goes to (an index into the replayer's devices).
    dev: usize,
    kind: DataIoKind,
}

enum DataIoKind {
    /// A stamped write; `fua` as `RWF_DSYNC`, `preflush` as a flush first.
    Write { buf: AlignedBuf, sector: u64, fua: bool, preflush: bool },
    /// A read, summarized against the trace's run.
    Read { buf: AlignedBuf, sector: u64, run: u64 },
    /// `BLKDISCARD` of `[offset, length]` in bytes.
    Discard { range: [u64; 2] },
    /// `fsync`: an empty flush.
    Flush,
}

impl DataIo {
    /// Sends the request to `file` (the device's) and waits for it; what
    /// the kernel answered.
    fn run(self, file: &File) -> OpResult {
        self.run_keeping(file).0
    }

    /// As [`DataIo::run`], also returning what a read read.
    fn run_keeping(self, file: &File) -> (OpResult, Option<Vec<u8>>) {
        let mut kept = None;
        let r = self.run_into(file, &mut kept);
        (r, kept)
    }

    fn run_into(self, file: &File, kept: &mut Option<Vec<u8>>) -> OpResult {
        let index = self.index;
        let done = |outcome: String, read: Option<String>| OpResult { index, outcome, read };
        match self.kind {
            DataIoKind::Write { buf, sector, fua, preflush } => {
                if preflush {
                    // DM core splits a PREFLUSH write into an empty flush
                    // and the write; userspace cannot send one bio with both.
                    if let Err(e) = file.sync_all() {
                        return done(errno_of(&e), None);
                    }
                }
                let iov = libc::iovec { iov_base: buf.ptr.cast(), iov_len: buf.len };
                let rwf = if fua { libc::RWF_DSYNC } else { 0 };
                // SAFETY: one valid iovec over an owned, aligned buffer.
                let r = unsafe { libc::pwritev2(file.as_raw_fd(), &iov, 1, (sector * 512) as i64, rwf) };
                if r < 0 {
                    return done(errno_of(&std::io::Error::last_os_error()), None);
                }
                if r as usize != buf.len {
                    return done(format!("short-write {r}"), None);
                }
                done("ok".into(), None)
            }
            DataIoKind::Read { mut buf, sector, run } => {
                match read_exact_at(file, buf.as_mut_slice(), sector * 512) {
                    Ok(()) => {
                        *kept = Some(buf.as_slice().to_vec());
                        done("ok".into(), Some(summarize(buf.as_slice(), run, sector)))
                    }
                    Err(e) => done(errno_of(&e), None),
                }
            }
            DataIoKind::Discard { range } => {
                // SAFETY: BLKDISCARD reads two u64s from the pointer.
                let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKDISCARD as _, range.as_ptr()) };
                if r < 0 {
                    return done(errno_of(&std::io::Error::last_os_error()), None);
                }
                done("ok".into(), None)
            }
            DataIoKind::Flush => match file.sync_all() {
                Ok(()) => done("ok".into(), None),
                Err(e) => done(errno_of(&e), None),
            },
        }
    }
}

fn errno_of(e: &std::io::Error) -> String {
    e.raw_os_error().map_or_else(|| e.to_string(), errno_name)
}

/// An I/O error as an op outcome: its errno's name (or its text).
pub(crate) fn errno_text(e: &std::io::Error) -> String {
    errno_of(e)
}

fn open_direct(path: &Path) -> Result<File, ShimError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| ShimError::io(format!("open {} O_DIRECT", path.display()), e))
}

/// Waits for a device node (devtmpfs creates them as devices appear).
fn wait_for(path: &Path) -> Result<(), ShimError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(ShimError::Invalid(format!("{} did not appear", path.display())));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// A live thin device.
struct Thin {
    id: u32,
    name: String,
    file: File,
}

/// Replays a trace's ops on a real thin-pool, one request at a time.
pub struct Replayer<'c> {
    ctl: &'c Control,
    /// Device names start with this (`dmsim-pool{prefix}`, `dmsim-t{prefix}-{id}`).
    prefix: String,
    pool_name: String,
    spec: PoolSpec,
    /// Where device nodes live (`/dev`).
    dev_dir: PathBuf,
    pool: DevNum,
    devices: Vec<Thin>,
    next_id: u32,
    next_write: u64,
    /// The job's coarse clock, read around the pool's creation and every
    /// op ([`COARSE_PREFIX`] timings, moved to the result at the end).
    clock: CoarseClock,
    times: Vec<(String, u64)>,
    /// The pool's table line (loaded again by a growth that reloads).
    table: TargetSpec,
    /// When the trace grows the metadata device: the dm-linear device the
    /// pool has for metadata ([`Replayer::new_growable`]).
    metadata_linear: Option<MetadataLinear>,
    /// The userland engine the pool runs on instead of the kernel's
    /// dm-thin ([`Replayer::new_on_engine`]).
    engine: Option<EngineProc>,
    /// Where the clock of an engine on the trace's clock started (a new
    /// engine after a power cut starts where the dead one's stopped).
    trace_time: u64,
}

/// The userland engine as the agent runs it ([`JobKind::Engine`]): this
/// binary started again as `engine …` (`dmsim_engine::serve`), a child
/// process serving the pool's thin devices as ublk devices, asked over its
/// control socket. A crash kills it (`SIGKILL`) and keeps its ublk
/// devices for the next engine to take over ([`Orphans`], ublk's user
/// recovery); drop kills it too and stops and deletes every ublk device
/// it served or was given to take over.
pub struct EngineProc {
    child: Option<std::process::Child>,
    client: dmsim_engine::EngineClient,
    /// The ublk devices it said it serves, by thin device id.
    dev_ids: Vec<(u32, u32)>,
    /// A dead engine's devices this one takes over when asked to activate
    /// their thin devices.
    orphans: Orphans,
    /// Devices it took over (`recover`).
    recovered: u64,
    /// How it runs.
    job: crate::protocol::EngineJob,
    /// The metadata device's size the engine shows the pool, when the
    /// trace grows it (the controlled disk has the size the growths
    /// reach).
    metadata_sectors: Option<u64>,
}

/// Where a new engine starts: its trace clock's time, and the metadata
/// device's size when the trace grows it.
#[derive(Debug, Clone, Copy, Default)]
pub struct EngineStart {
    /// The trace clock's start, in nanoseconds.
    pub trace_time: u64,
    /// The metadata device's size to show the pool (`None`: all of it).
    pub metadata_sectors: Option<u64>,
}

impl EngineProc {
    /// Starts the engine on `metadata` and `data` (formatting a new pool
    /// when `format`), run as `job` says, and waits until it answers.
    pub fn spawn(
        spec: &PoolSpec,
        metadata: &Path,
        data: &Path,
        prefix: &str,
        format: bool,
        job: crate::protocol::EngineJob,
        start: EngineStart,
    ) -> Result<EngineProc, ShimError> {
        let socket = PathBuf::from(format!("/run/dmsim-engine{prefix}.sock"));
        let _ = std::fs::create_dir_all("/run");
        let mut cmd = std::process::Command::new("/proc/self/exe");
        cmd.arg("engine")
            .arg("--metadata")
            .arg(metadata)
            .arg("--data")
            .arg(data)
            .arg("--table")
            .arg(spec.table_tail())
            .arg("--socket")
            .arg(&socket)
            .arg("--no-space-timeout-ns")
            .arg(spec.no_space_timeout_ns.to_string())
            .arg("--depth")
            .arg(job.depth.to_string())
            .arg("--commit-period-ms")
            .arg(job.commit_period_ms.to_string());
        if format {
            cmd.arg("--format");
        }
        if job.ack_flush_early {
            cmd.arg("--ack-flush-early");
        }
        if job.drop_writes {
            cmd.arg("--drop-writes");
        }
        if job.trace_clock {
            cmd.arg("--trace-clock").arg(start.trace_time.to_string());
        }
        if let Some(sectors) = start.metadata_sectors {
            cmd.arg("--metadata-sectors").arg(sectors.to_string());
        }
        let child = cmd.spawn().map_err(|e| ShimError::io("start the engine", e))?;
        let mut engine = EngineProc {
            child: Some(child),
            client: dmsim_engine::EngineClient::new(&socket),
            dev_ids: Vec::new(),
            orphans: Orphans::default(),
            recovered: 0,
            job,
            metadata_sectors: start.metadata_sectors,
        };
        if let Err(e) = engine.client.wait_ready(Duration::from_secs(30)) {
            let status = engine.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            engine.kill();
            return Err(ShimError::Invalid(format!(
                "the engine did not answer ({e}){}",
                status.map(|s| format!("; it ended: {s}")).unwrap_or_default()
            )));
        }
        Ok(engine)
    }

    /// One request to the engine; its answer.
    fn request(&self, line: &str) -> Result<String, ShimError> {
        self.client.request(line).map_err(ShimError::from)
    }

    /// Serves thin device `id` of `sectors`; its block node. A device a
    /// dead engine served ([`Self::adopt`]) is taken over (`recover`:
    /// the same `/dev/ublkbN`); any other gets a new ublk device.
    fn activate(&mut self, id: u32, sectors: u64) -> Result<PathBuf, ShimError> {
        if let Some(k) = self.orphans.0.iter().position(|(t, _)| *t == id) {
            let (_, dev) = self.orphans.0.remove(k);
            let answer = self.request(&format!("recover {id} {sectors} {dev}"));
            let path = match answer {
                Ok(p) => PathBuf::from(p),
                Err(e) => {
                    // Deleted with the others.
                    self.orphans.0.push((id, dev));
                    return Err(e);
                }
            };
            self.dev_ids.push((id, dev));
            if path != Path::new(&format!("/dev/ublkb{dev}")) {
                return Err(ShimError::Invalid(format!(
                    "the engine took over ublk device {dev} of thin device {id} as {}",
                    path.display()
                )));
            }
            self.recovered += 1;
            return Ok(path);
        }
        let path = PathBuf::from(self.request(&format!("activate {id} {sectors}"))?);
        let dev = path
            .to_str()
            .and_then(|p| p.strip_prefix("/dev/ublkb"))
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| ShimError::Invalid(format!("the engine answered {path:?} for an activation")))?;
        self.dev_ids.push((id, dev));
        Ok(path)
    }

    /// Stops serving thin device `id`.
    fn deactivate(&mut self, id: u32) -> Result<(), ShimError> {
        self.request(&format!("deactivate {id}"))?;
        self.dev_ids.retain(|(t, _)| *t != id);
        Ok(())
    }

    /// Asks the engine to stop (its devices deleted, the pool closed: a
    /// clean shutdown) and waits for it to exit.
    fn stop(mut self) -> Result<(), ShimError> {
        let r = self.request("stop");
        if r.is_ok() {
            // The engine deleted its devices itself.
            self.dev_ids.clear();
        }
        let status = self.child.take().map(|mut c| c.wait());
        r?;
        match status {
            Some(Ok(s)) if s.success() => Ok(()),
            Some(Ok(s)) => Err(ShimError::Invalid(format!("the engine exited with {s}"))),
            Some(Err(e)) => Err(ShimError::io("wait for the engine", e)),
            None => Ok(()),
        }
    }

    /// Kills the engine (`SIGKILL`: no shutdown of any kind) and stops and
    /// deletes the ublk devices it served or was to take over.
    fn kill(&mut self) {
        let mut all = self.kill_keeping_devices();
        all.delete_all();
    }

    /// Kills the engine (`SIGKILL`) and leaves its ublk devices as the
    /// driver keeps them for a new server (quiesced, their block nodes
    /// in place): they, and those it was to take over, are returned.
    fn kill_keeping_devices(&mut self) -> Orphans {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let mut kept = Orphans(std::mem::take(&mut self.dev_ids));
        kept.0.append(&mut self.orphans.0);
        kept
    }

    /// Gives this engine a dead one's devices to take over.
    fn adopt(&mut self, mut orphans: Orphans) {
        self.orphans.0.append(&mut orphans.0);
    }

    /// Stops and deletes the dead engine's devices not taken over.
    fn release_orphans(&mut self) {
        self.orphans.delete_all();
    }
}

/// ublk devices (thin device id, ublk device id) of an engine that was
/// killed, kept for a new engine to take over (ublk's user recovery,
/// `dmsim_engine::ublk::F_USER_RECOVERY`); whatever none took over is
/// stopped and deleted on drop, so that no device outlives a job.
#[derive(Debug, Default)]
pub struct Orphans(Vec<(u32, u32)>);

impl Orphans {
    /// Stops and deletes every device.
    fn delete_all(&mut self) {
        if self.0.is_empty() {
            return;
        }
        match crate::ublk::UblkControl::open() {
            Ok(ctl) => {
                for (_, dev) in std::mem::take(&mut self.0) {
                    let _ = ctl.device_command(crate::ublk::CMD_STOP_DEV, dev);
                    if let Err(e) = ctl.device_command(crate::ublk::CMD_DEL_DEV, dev) {
                        log(&format!("deleting ublk dev {dev} of a killed engine: {e}"));
                    }
                }
            }
            Err(e) => log(&format!("a killed engine's ublk devices: {e}")),
        }
    }
}

impl Drop for Orphans {
    fn drop(&mut self) {
        self.delete_all();
    }
}

impl Drop for EngineProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `dmsim-kernel-agent engine …`: the engine in the VM (see
/// [`EngineProc`]); the exit status (0 after a `stop`).
pub fn engine_main(args: &[String]) -> i32 {
    let get = |name: &str| -> Option<String> {
        let i = args.iter().position(|a| a == name)?;
        args.get(i + 1).cloned()
    };
    let (Some(metadata), Some(data), Some(table), Some(socket)) =
        (get("--metadata"), get("--data"), get("--table"), get("--socket"))
    else {
        eprintln!("engine: --metadata, --data, --table and --socket are required");
        return 2;
    };
    let mut config =
        dmsim_engine::EngineConfig::new(Path::new(&metadata), Path::new(&data), &table, Path::new(&socket));
    config.format = args.iter().any(|a| a == "--format");
    config.mutations.ack_flush_early = args.iter().any(|a| a == "--ack-flush-early");
    config.mutations.drop_writes = args.iter().any(|a| a == "--drop-writes");
    if let Some(t) = get("--no-space-timeout-ns").and_then(|v| v.parse().ok()) {
        config.no_space_timeout = Duration::from_nanos(t);
    }
    config.trace_clock = get("--trace-clock").and_then(|v| v.parse().ok());
    config.metadata_sectors = get("--metadata-sectors").and_then(|v| v.parse().ok());
    if let Some(d) = get("--depth").and_then(|v| v.parse().ok()) {
        config.queue_depth = d;
    }
    if let Some(ms) = get("--commit-period-ms").and_then(|v| v.parse::<u64>().ok()).filter(|&ms| ms > 0) {
        config.commit_period = Some(Duration::from_millis(ms));
    }
    match dmsim_engine::serve(&config, || {}) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("engine: {e}");
            1
        }
    }
}

/// The pool's metadata device in a job that grows it: a dm-linear device
/// over the first `sectors` of the controlled metadata disk (which has
/// the size the trace's growths reach), extended by each growth.
struct MetadataLinear {
    name: String,
    disk: PathBuf,
    sectors: u64,
    disk_sectors: u64,
}

impl<'c> Replayer<'c> {
    /// Builds the pool over `metadata` and `data` (block devices). With
    /// `format`, the metadata's first 4 KiB are zeroed first so that a new
    /// pool is formatted; without, the pool opens what is there. Device
    /// names carry `prefix`.
    pub fn new(
        ctl: &'c Control,
        spec: PoolSpec,
        metadata: &Path,
        data: &Path,
        dev_dir: &Path,
        prefix: &str,
        format: bool,
    ) -> Result<Replayer<'c>, ShimError> {
        if format {
            let mut f = OpenOptions::new()
                .write(true)
                .open(metadata)
                .map_err(|e| ShimError::io(format!("open {}", metadata.display()), e))?;
            f.write_all(&[0u8; 4096]).map_err(|e| ShimError::io("zero the metadata superblock", e))?;
            f.sync_all().map_err(|e| ShimError::io("flush the metadata device", e))?;
        }
        let table = TargetSpec {
            start: 0,
            length: spec.data_sectors(),
            target_type: "thin-pool".into(),
            params: format!(
                "{} {} {}",
                block_dev_num(metadata)?.table_name(),
                block_dev_num(data)?.table_name(),
                spec.table_tail()
            ),
        };
        let pool_name = format!("dmsim-pool{prefix}");
        let clock = CoarseClock::new();
        let created_a = clock.now_us();
        ctl.create(&pool_name)?;
        let pool = match ctl
            .load(&pool_name, std::slice::from_ref(&table), false)
            .and_then(|_| ctl.resume(&pool_name))
        {
            Ok(p) => p,
            Err(e) => {
                let _ = ctl.remove(&pool_name);
                return Err(e);
            }
        };
        let times = vec![
            (format!("{COARSE_PREFIX}create-a"), created_a),
            (format!("{COARSE_PREFIX}create-b"), clock.now_us()),
        ];
        Ok(Replayer {
            ctl,
            prefix: prefix.to_string(),
            pool_name,
            spec,
            dev_dir: dev_dir.to_path_buf(),
            pool,
            devices: Vec::new(),
            next_id: 0,
            next_write: 0,
            clock,
            times,
            table,
            metadata_linear: None,
            engine: None,
            trace_time: 0,
        })
    }

    /// As [`Replayer::new`], the pool being the userland engine's
    /// ([`EngineProc`]) on `metadata` and `data`, run as `engine` says; no
    /// device-mapper device is made.
    #[allow(clippy::too_many_arguments)]
    pub fn new_on_engine(
        ctl: &'c Control,
        spec: PoolSpec,
        metadata: &Path,
        data: &Path,
        prefix: &str,
        format: bool,
        engine: crate::protocol::EngineJob,
        start: EngineStart,
    ) -> Result<Replayer<'c>, ShimError> {
        let clock = CoarseClock::new();
        let created_a = clock.now_us();
        let engine = EngineProc::spawn(&spec, metadata, data, prefix, format, engine, start)?;
        let times = vec![
            (format!("{COARSE_PREFIX}create-a"), created_a),
            (format!("{COARSE_PREFIX}create-b"), clock.now_us()),
        ];
        let table = TargetSpec {
            start: 0,
            length: spec.data_sectors(),
            target_type: "engine".into(),
            params: spec.table_tail(),
        };
        Ok(Replayer {
            ctl,
            prefix: prefix.to_string(),
            pool_name: format!("engine{prefix}"),
            spec,
            dev_dir: PathBuf::from("/dev"),
            pool: DevNum { major: 0, minor: 0 },
            devices: Vec::new(),
            next_id: 0,
            next_write: 0,
            clock,
            times,
            table,
            metadata_linear: None,
            engine: Some(engine),
            trace_time: start.trace_time,
        })
    }

    /// As [`Replayer::new`], the pool's metadata device being a dm-linear
    /// device `dmsim-ml<prefix>` over the first `sectors` of `disk`, which
    /// [`Replayer::grow_metadata`] extends; [`Replayer::teardown`] removes
    /// it after the pool.
    #[allow(clippy::too_many_arguments)]
    pub fn new_growable(
        ctl: &'c Control,
        spec: PoolSpec,
        disk: &Path,
        sectors: u64,
        data: &Path,
        dev_dir: &Path,
        prefix: &str,
        format: bool,
    ) -> Result<Replayer<'c>, ShimError> {
        let name = format!("dmsim-ml{prefix}");
        let disk_sectors = spec.metadata_disk_sectors;
        let path = linear(ctl, &name, disk, 0, sectors, dev_dir)?;
        match Replayer::new(ctl, spec, &path, data, dev_dir, prefix, format) {
            Ok(mut r) => {
                r.metadata_linear =
                    Some(MetadataLinear { name, disk: disk.to_path_buf(), sectors, disk_sectors });
                Ok(r)
            }
            Err(e) => {
                let _ = ctl.remove(&name);
                Err(e)
            }
        }
    }

    /// The metadata device's size now, when this replayer can grow it.
    fn metadata_sectors_now(&self) -> Option<u64> {
        self.metadata_linear
            .as_ref()
            .map(|l| l.sectors)
            .or_else(|| self.engine.as_ref().and_then(|e| e.metadata_sectors))
    }

    /// A `grow-metadata` op, as the simulator's (`ThinSim`'s growth): the
    /// pool suspended (its presuspend commits), the metadata device
    /// extended by `blocks` metadata blocks (the dm-linear device reloaded
    /// longer), the pool's table loaded again when `reload`, and the pool
    /// resumed, whose preresume sees the larger device and extends the
    /// metadata space map (6.1's `maybe_resize_metadata_dev`). A resume
    /// that fails is tried once more, as the simulator does; a pool left
    /// suspended would hang every later request, so a second failure
    /// stops the job. Without a growable device the op is `unsupported`.
    fn grow_metadata(&mut self, index: usize, blocks: u32, reload: bool) -> Result<OpResult, ShimError> {
        let done = |outcome: String| Ok(OpResult { index, outcome, read: None });
        if let Some(engine) = self.engine.as_mut() {
            // The engine shows the pool more of the controlled disk.
            let Some(now) = engine.metadata_sectors else { return done("unsupported".into()) };
            let sectors =
                crate::protocol::grown_metadata_sectors(now, blocks).min(self.spec.metadata_disk_sectors);
            let answer =
                engine.request(&format!("grow-metadata {sectors}{}", if reload { " reload" } else { "" }))?;
            engine.metadata_sectors = Some(sectors);
            return done(if answer.is_empty() { "ok".into() } else { format!("ok ({answer})") });
        }
        let Some(l) = self.metadata_linear.as_ref() else { return done("unsupported".into()) };
        let sectors = crate::protocol::grown_metadata_sectors(l.sectors, blocks).min(l.disk_sectors);
        let (name, table) = (l.name.clone(), linear_target(0, sectors, &l.disk, 0)?);
        self.ctl.suspend(&self.pool_name, 0)?;
        self.ctl.suspend(&name, 0)?;
        self.ctl.load(&name, &[table], false)?;
        self.ctl.resume(&name)?;
        if let Some(l) = self.metadata_linear.as_mut() {
            l.sectors = sectors;
        }
        if reload {
            self.ctl.load(&self.pool_name, std::slice::from_ref(&self.table), false)?;
        }
        match self.ctl.resume(&self.pool_name) {
            Ok(_) => done("ok".into()),
            Err(e) => {
                log(&format!("op {index}: the pool's resume after a metadata growth failed ({e}); again"));
                self.ctl.resume(&self.pool_name)?;
                done(format!("ok (resumed the second time; the first: {e})"))
            }
        }
    }

    fn index(&self, dev: u8) -> Option<usize> {
        (!self.devices.is_empty()).then(|| dev as usize % self.devices.len())
    }

    fn activate(&mut self, id: u32) -> Result<(), ShimError> {
        if let Some(engine) = self.engine.as_mut() {
            let path = engine.activate(id, self.spec.thin_sectors())?;
            wait_for(&path)?;
            let file = open_direct(&path)?;
            self.devices.push(Thin { id, name: path.display().to_string(), file });
            return Ok(());
        }
        let name = format!("dmsim-t{}-{id}", self.prefix);
        self.ctl.create(&name)?;
        let table = TargetSpec {
            start: 0,
            length: self.spec.thin_sectors(),
            target_type: "thin".into(),
            params: format!("{} {id}", self.pool.table_name()),
        };
        let dev = match self.ctl.load(&name, &[table], false).and_then(|_| self.ctl.resume(&name)) {
            Ok(dev) => dev,
            Err(e) => {
                let _ = self.ctl.remove(&name);
                return Err(e);
            }
        };
        let path = self.dev_dir.join(format!("dm-{}", dev.minor));
        wait_for(&path)?;
        let file = open_direct(&path)?;
        self.devices.push(Thin { id, name, file });
        Ok(())
    }

    /// Activates device `id` just created by a message the pool accepted.
    /// `pool_message` reports a create as done even when the commit after
    /// it fails (out of metadata space, say); the abort then drops the
    /// device, and its table load fails with ENODATA ("Couldn't open thin
    /// internal device"). The op's answer says so and the replay goes on
    /// without the device, as the simulator's does; any other failure is
    /// the agent's.
    fn activate_created(&mut self, index: usize, id: u32) -> Result<OpResult, ShimError> {
        let outcome = match self.activate(id) {
            Ok(()) => "ok",
            Err(ShimError::Dm { source, .. }) if source.raw_os_error() == Some(libc::ENODATA) => {
                "ok (not activated: ENODATA, the commit after the message failed)"
            }
            // thin_ctr refuses every table while the pool is in fail mode
            // (the commit after the message failed for good); the
            // simulator does not activate a new device then either.
            Err(ShimError::Dm { source, .. })
                if source.raw_os_error() == Some(libc::EINVAL) && self.pool_failed() =>
            {
                "ok (not activated: EINVAL, the pool is in fail mode)"
            }
            Err(e) => return Err(e),
        };
        Ok(OpResult { index, outcome: outcome.into(), read: None })
    }

    /// The pool's status line without a commit (`DM_NOFLUSH`: the model
    /// does not commit for a look at its mode either).
    fn pool_status_noflush(&self) -> Result<String, ShimError> {
        if let Some(engine) = &self.engine {
            return engine.request("status noflush");
        }
        let s = self.ctl.status(&self.pool_name, false, true)?;
        Ok(s.into_iter().map(|t| t.status).collect::<Vec<_>>().join(" ; "))
    }

    /// Whether the pool's status says it is in fail mode (`Fail`).
    fn pool_failed(&self) -> bool {
        self.pool_status_noflush().is_ok_and(|s| s.split_whitespace().any(|w| w == "Fail"))
    }

    /// Whether the pool takes metadata changes: its mode is `rw` or
    /// `out_of_data_space`, not `ro` (read-only or out of metadata space)
    /// or `Fail`. The simulator, like a careful administrator, sends no
    /// create, snapshot or delete otherwise; neither does the agent, which
    /// would otherwise remove a device for a delete the pool must refuse,
    /// and in fail mode could not load its table again.
    fn metadata_writable(&self) -> bool {
        self.pool_status_noflush()
            .is_ok_and(|s| s.split_whitespace().any(|w| w == "rw" || w == "out_of_data_space"))
    }

    fn message(&self, msg: &str) -> Result<(), ShimError> {
        if let Some(engine) = &self.engine {
            return engine.request(&format!("message {msg}")).map(|_| ());
        }
        self.ctl.message(&self.pool_name, 0, msg).map(|_| ())
    }

    /// Clamps a request like the simulator: position modulo the device,
    /// length at least 1 and at most to the device's end.
    fn clamp(&self, sector: u32, nr: u64) -> (u64, u64) {
        let size = self.spec.thin_sectors();
        let sector = u64::from(sector) % size;
        (sector, nr.max(1).min(size - sector))
    }

    /// Applies one op; what the kernel answered. An op of cache traces (a
    /// cache op, or a fault on a cache trace's disk) is an error: this is a
    /// thin pool.
    pub fn apply(&mut self, index: usize, op: &Op) -> Result<OpResult, ShimError> {
        op_applied();
        if ops_on_console() {
            log(&format!("op {index}: {}", dmsim_traces::text::op_to_line(op)));
        }
        let a = self.clock.now_us();
        let r = self.apply_op(index, op);
        let b = self.clock.now_us();
        self.times.push((format!("{COARSE_PREFIX}op-a-{index}"), a));
        self.times.push((format!("{COARSE_PREFIX}op-b-{index}"), b));
        r
    }

    fn apply_op(&mut self, index: usize, op: &Op) -> Result<OpResult, ShimError> {
        if let Some(e) = op.thin_error() {
            return Err(ShimError::Invalid(e));
        }
        let done = |outcome: String, read: Option<String>| Ok(OpResult { index, outcome, read });
        let skipped = || done("skipped".into(), None);
        match *op {
            Op::Write { .. } | Op::Read { .. } | Op::Discard { .. } | Op::Flush { .. } => {
                Ok(match self.data_io(index, op) {
                    Ok(io) => {
                        let dev = io.dev;
                        io.run(&self.devices[dev].file)
                    }
                    Err(answer) => answer,
                })
            }
            Op::CreateThin => {
                if self.devices.len() >= self.spec.max_devices {
                    return skipped();
                }
                if !self.metadata_writable() {
                    return done("skipped (the pool's metadata is not writable)".into(), None);
                }
                let id = self.next_id;
                if let Err(e) = self.message(&format!("create_thin {id}")) {
                    return done(format!("skipped ({e})"), None);
                }
                self.next_id += 1;
                self.activate_created(index, id)
            }
            Op::CreateSnap { origin } => {
                if self.devices.len() >= self.spec.max_devices {
                    return skipped();
                }
                if !self.metadata_writable() {
                    return done("skipped (the pool's metadata is not writable)".into(), None);
                }
                let Some(i) = self.index(origin) else { return skipped() };
                let origin_name = self.devices[i].name.clone();
                let origin_id = self.devices[i].id;
                let id = self.next_id;
                // The documented protocol: suspend an active origin first
                // (the engine takes messages between requests).
                let dm = self.engine.is_none();
                if dm {
                    self.ctl.suspend(&origin_name, 0)?;
                }
                let r = self.message(&format!("create_snap {id} {origin_id}"));
                if dm {
                    self.ctl.resume(&origin_name)?;
                }
                if let Err(e) = r {
                    return done(format!("skipped ({e})"), None);
                }
                self.next_id += 1;
                self.activate_created(index, id)
            }
            Op::Delete { dev } => {
                if !self.metadata_writable() {
                    return done("skipped (the pool's metadata is not writable)".into(), None);
                }
                let Some(i) = self.index(dev) else { return skipped() };
                let thin = self.devices.remove(i);
                let (id, name) = (thin.id, thin.name.clone());
                drop(thin);
                self.remove_device(id, &name)?;
                if let Err(e) = self.message(&format!("delete {id}")) {
                    match self.activate(id) {
                        Ok(()) => {
                            let last = self.devices.pop().expect("just activated");
                            self.devices.insert(i, last);
                        }
                        // In fail mode no thin table loads: the device is
                        // gone for the rest of the trace, as on the
                        // simulator.
                        Err(ShimError::Dm { source, .. })
                            if source.raw_os_error() == Some(libc::EINVAL) && self.pool_failed() =>
                        {
                            return done(
                                format!("skipped ({e}; not re-activated: the pool is in fail mode)"),
                                None,
                            );
                        }
                        Err(e) => return Err(e),
                    }
                    return done(format!("skipped ({e})"), None);
                }
                done("ok".into(), None)
            }
            // The kernel runs its own worker and completes its own I/O;
            // every request above already ran to completion.
            Op::Worker | Op::Complete { .. } | Op::FailIo { .. } => done("ok".into(), None),
            // The kernel keeps its own time; an engine on the trace's
            // clock is told the trace's.
            Op::Tick { millis } => {
                if let Some(e) = self.engine.as_ref().filter(|e| e.job.trace_clock && !e.job.follow_kernel) {
                    e.request(&format!("advance {}", u64::from(millis) * 1_000_000))?;
                }
                done("ok".into(), None)
            }
            Op::GrowMetadata { blocks, reload } => self.grow_metadata(index, blocks, reload),
            Op::Fault { .. } | Op::Crash { .. } | Op::AimFault { .. } => done("unsupported".into(), None),
            // Rejected above (`thin_error`); kept as an error here too.
            Op::Reload { .. } | Op::Resize { .. } | Op::Invalidate { .. } | Op::Status => {
                Err(ShimError::Invalid(format!(
                    "op `{}` belongs to cache traces; this is a thin trace",
                    op.name()
                )))
            }
        }
    }

    /// The request of a read, write, discard or flush op, ready to run on
    /// any thread ([`DataIo::run`]); `Err(answer)` when the op sends none
    /// (no live device, discards ignored; callers pass only those four). A
    /// write takes its stamp's number here, in op order, wherever it then
    /// runs.
    fn data_io(&mut self, index: usize, op: &Op) -> Result<DataIo, OpResult> {
        let skipped = Err(OpResult { index, outcome: "skipped".into(), read: None });
        let (dev, kind) = match *op {
            Op::Write { dev, sector, nr_sectors, fua, preflush } => {
                let Some(i) = self.index(dev) else { return skipped };
                let (sector, nr) = self.clamp(sector, u64::from(nr_sectors));
                let write = self.next_write;
                self.next_write += 1;
                let mut buf = AlignedBuf::zeroed((nr * 512) as usize);
                let id = self.devices[i].id;
                dmsim_traces::stamp::fill(buf.as_mut_slice(), self.spec.run, write, id, sector);
                (i, DataIoKind::Write { buf, sector, fua, preflush })
            }
            Op::Read { dev, sector, nr_sectors } => {
                let Some(i) = self.index(dev) else { return skipped };
                let (sector, nr) = self.clamp(sector, u64::from(nr_sectors));
                (
                    i,
                    DataIoKind::Read {
                        buf: AlignedBuf::zeroed((nr * 512) as usize),
                        sector,
                        run: self.spec.run,
                    },
                )
            }
            Op::Discard { dev, sector, nr_sectors } => {
                if self.spec.features.contains(&"ignore_discard") {
                    return skipped;
                }
                let Some(i) = self.index(dev) else { return skipped };
                let (sector, nr) = self.clamp(sector, u64::from(nr_sectors));
                (i, DataIoKind::Discard { range: [sector * 512, nr * 512] })
            }
            Op::Flush { dev } => {
                let Some(i) = self.index(dev) else { return skipped };
                (i, DataIoKind::Flush)
            }
            _ => return skipped,
        };
        Ok(DataIo { index, dev, kind })
    }

    /// Reads every live device back, one summary per data block.
    pub fn read_back(&self) -> Result<Vec<DeviceContents>, ShimError> {
        let bs = self.spec.block_sectors;
        let mut out = Vec::new();
        for thin in &self.devices {
            let mut buf = AlignedBuf::zeroed((bs * 512) as usize);
            let mut blocks = Vec::new();
            for b in 0..self.spec.thin_blocks {
                let summary = match read_exact_at(&thin.file, buf.as_mut_slice(), b * bs * 512) {
                    Ok(()) => summarize(buf.as_slice(), self.spec.run, b * bs),
                    Err(e) => format!("read-error {}", errno_of(&e)),
                };
                blocks.push(summary);
            }
            out.push(DeviceContents { id: thin.id, blocks });
        }
        Ok(out)
    }

    /// The pool's INFO status line (this commits, as `dmsetup status` does).
    pub fn pool_status(&self) -> Result<String, ShimError> {
        if let Some(engine) = &self.engine {
            return engine.request("status");
        }
        let s = self.ctl.status(&self.pool_name, false, false)?;
        Ok(s.into_iter().map(|t| t.status).collect::<Vec<_>>().join(" ; "))
    }

    /// Removes every thin device, then the pool (its destructor commits).
    pub fn teardown(mut self) -> Result<(), ShimError> {
        if let Some(engine) = self.engine.take() {
            // The engine's stop deactivates every device and closes the pool.
            self.devices.clear();
            return engine.stop();
        }
        for thin in std::mem::take(&mut self.devices) {
            let name = thin.name.clone();
            drop(thin);
            self.ctl.remove(&name)?;
        }
        self.ctl.remove(&self.pool_name)?;
        match self.metadata_linear.take() {
            Some(l) => self.ctl.remove(&l.name),
            None => Ok(()),
        }
    }

    /// Removes thin device `id` (named `name`): its dm device, or the
    /// engine's ublk device.
    fn remove_device(&mut self, id: u32, name: &str) -> Result<(), ShimError> {
        match self.engine.as_mut() {
            Some(engine) => engine.deactivate(id),
            None => self.ctl.remove(name),
        }
    }

    /// Kills the engine a pool runs on (`SIGKILL`), as a crash does; its
    /// ublk devices are returned for the next engine to take over. A
    /// kernel pool is torn down instead (its disks dead, that is what a
    /// crash leaves of it).
    fn crash_teardown(mut self) -> Result<Orphans, ShimError> {
        match self.engine.take() {
            Some(mut engine) => {
                self.devices.clear();
                Ok(engine.kill_keeping_devices())
            }
            None => self.teardown().map(|()| Orphans::default()),
        }
    }

    /// Activates existing thin devices (of a pool opened on existing
    /// metadata), in order; the first failure is returned.
    pub fn activate_existing(&mut self, ids: &[u32]) -> Result<(), ShimError> {
        for &id in ids {
            self.activate(id)?;
            self.next_id = self.next_id.max(id.saturating_add(1));
        }
        Ok(())
    }
}

/// `BLKDISCARD`: `_IO(0x12, 119)`.
const BLKDISCARD: u64 = 0x1277;

fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, offset)
}

/// A dm-linear device over `len` sectors of `disk` from `offset`: its
/// node. Removed by the caller.
fn linear(
    ctl: &Control,
    name: &str,
    disk: &Path,
    offset: u64,
    len: u64,
    dev_dir: &Path,
) -> Result<PathBuf, ShimError> {
    let table = TargetSpec {
        start: 0,
        length: len,
        target_type: "linear".into(),
        params: format!("{} {offset}", block_dev_num(disk)?.table_name()),
    };
    device(ctl, name, &[table], dev_dir)
}

/// A device-mapper device of `targets`, created and resumed: its node.
/// Removed by the caller; on failure nothing is left.
fn device(ctl: &Control, name: &str, targets: &[TargetSpec], dev_dir: &Path) -> Result<PathBuf, ShimError> {
    device_stamped(ctl, name, targets, dev_dir, &CoarseClock::new()).map(|(path, _)| path)
}

/// [`device`], with the coarse clock ([`CoarseClock`]) read around the
/// table's load and around its resume: `[load before, load after, resume
/// before, resume after]`.
fn device_stamped(
    ctl: &Control,
    name: &str,
    targets: &[TargetSpec],
    dev_dir: &Path,
    clock: &CoarseClock,
) -> Result<(PathBuf, [u64; 4]), ShimError> {
    ctl.create(name)?;
    let mut at = [0; 4];
    at[0] = clock.now_us();
    let r = ctl.load(name, targets, false).and_then(|_| {
        at[1] = clock.now_us();
        at[2] = clock.now_us();
        let d = ctl.resume(name);
        at[3] = clock.now_us();
        d
    });
    let dev = match r {
        Ok(d) => d,
        Err(e) => {
            let _ = ctl.remove(name);
            return Err(e);
        }
    };
    let path = dev_dir.join(format!("dm-{}", dev.minor));
    wait_for(&path)?;
    Ok((path, at))
}

/// The kernel's `CLOCK_MONOTONIC_COARSE`, which moves when jiffies do (a
/// tick at a time), in microseconds since the clock was made: what a cache
/// job's settled replay reports, so that the serialized simulator sees
/// the same jiffies the kernel's smq saw.
#[derive(Debug, Clone, Copy)]
struct CoarseClock {
    base: u64,
}

impl CoarseClock {
    fn raw_us() -> u64 {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes one timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
        ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
    }

    fn new() -> Self {
        CoarseClock { base: Self::raw_us() }
    }

    fn now_us(&self) -> u64 {
        Self::raw_us().saturating_sub(self.base)
    }

    /// The absolute jiffy, mod 8, at which this clock read 0: the kernel's
    /// `jiffies` (from `/proc/timer_list`) less the clock's jiffies since
    /// its base, read when no tick came in between (None if that never
    /// happened in a few tries, or the file is unreadable).
    fn jiffy_phase(&self) -> Option<u64> {
        let res = Self::resolution_us().max(1);
        for _ in 0..8 {
            let before = self.now_us();
            let text = std::fs::read_to_string("/proc/timer_list").ok()?;
            let after = self.now_us();
            if before != after {
                continue;
            }
            let jiffies: u64 = text.lines().find_map(|l| l.strip_prefix("jiffies: ")?.trim().parse().ok())?;
            return Some(jiffies.wrapping_sub(before / res) % 8);
        }
        None
    }

    /// The clock's resolution (one jiffy), in microseconds.
    fn resolution_us() -> u64 {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_getres writes one timespec.
        unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
        ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
    }
}

/// A linear target of `len` sectors at `start` over `dev` from `offset`.
fn linear_target(start: u64, len: u64, dev: &Path, offset: u64) -> Result<TargetSpec, ShimError> {
    Ok(TargetSpec {
        start,
        length: len,
        target_type: "linear".into(),
        params: format!("{} {offset}", block_dev_num(dev)?.table_name()),
    })
}

/// Fills a block device with `byte` (O_DIRECT, 1 MiB at a time) and
/// flushes it.
fn fill_device(path: &Path, byte: u8, sectors: u64) -> Result<(), ShimError> {
    fill_range(path, byte, 0, sectors)
}

/// Fills `sectors` sectors of a block device from sector `from` with
/// `byte` (O_DIRECT, 1 MiB at a time) and flushes it.
fn fill_range(path: &Path, byte: u8, from: u64, sectors: u64) -> Result<(), ShimError> {
    let file = open_direct(path)?;
    let mut buf = AlignedBuf::zeroed(1 << 20);
    buf.as_mut_slice().fill(byte);
    let total = sectors * 512;
    let mut at = 0u64;
    while at < total {
        let n = (total - at).min(1 << 20) as usize;
        use std::os::unix::fs::FileExt;
        file.write_all_at(&buf.as_slice()[..n], from * 512 + at)
            .map_err(|e| ShimError::io(format!("fill {} at byte {at}", path.display()), e))?;
        at += n as u64;
    }
    file.sync_all().map_err(|e| ShimError::io(format!("flush {}", path.display()), e))
}

/// Where a job's pool lives: the two pool disks and the job's slice.
#[derive(Debug, Clone)]
pub struct JobDisks<'a> {
    /// The metadata disk.
    pub metadata: &'a Path,
    /// The data disk.
    pub data: &'a Path,
    /// The job's place on them.
    pub slice: Slice,
    /// Where device nodes live (`/dev`).
    pub dev_dir: &'a Path,
    /// For a logged job: the log disk and where the job's log starts on it.
    pub log: Option<(&'a Path, u64)>,
}

/// Runs one job: linear devices over its slices, the pool from the
/// trace's header (fresh: metadata zeroed, data filled with
/// [`DATA_FILL`]; or opened on what the host wrote), the ops (replay) or
/// the activation of the listed devices, the read-back and the teardown.
/// Failures after the pool exists are recorded in the result's `error`,
/// with what was done so far. `kernel_before`: the result of the job
/// before this one when it was a kernel job ([`JobKind::Ublk`]) of the
/// same trace (an engine job following the kernel's commits needs it).
pub fn run_job(
    ctl: &Control,
    job: usize,
    kind: &JobKind,
    trace: &Trace,
    disks: &JobDisks<'_>,
    kernel_before: Option<&KernelResult>,
) -> KernelResult {
    let mut result = KernelResult::default();
    if let Ok(v) = ctl.version() {
        result.dm_version = v;
    }
    if let Ok(t) = ctl.target_versions() {
        result.targets = t;
    }
    let spec = match PoolSpec::of_trace(trace) {
        Ok(s) => s,
        Err(e) => {
            result.error = Some(e.to_string());
            return result;
        }
    };
    if let JobKind::Logged { .. } = kind {
        run_logged_job(ctl, job, kind, trace, spec, disks, &mut result);
        return result;
    }
    if *kind == JobKind::Flakey {
        run_flakey_job(ctl, job, trace, spec, disks, &mut result);
        return result;
    }
    if *kind == JobKind::Cache {
        run_cache_job(ctl, job, trace, disks, &mut result);
        return result;
    }
    if matches!(kind, JobKind::Ublk | JobKind::Race { .. } | JobKind::Engine(_)) {
        run_ublk_job(ctl, job, kind, trace, spec, disks, kernel_before, &mut result);
        return result;
    }
    let (meta_name, data_name) = (format!("dmsim-m{job}"), format!("dmsim-d{job}"));
    let t0 = Instant::now();
    let slices = linear(
        ctl,
        &meta_name,
        disks.metadata,
        disks.slice.metadata_offset,
        spec.metadata_sectors,
        disks.dev_dir,
    )
    .and_then(|m| {
        linear(ctl, &data_name, disks.data, disks.slice.data_offset, spec.data_sectors(), disks.dev_dir)
            .map(|d| (m, d))
    });
    let (metadata, data) = match slices {
        Ok(p) => p,
        Err(e) => {
            let _ = ctl.remove(&meta_name);
            result.error = Some(format!("linear devices for the pool: {e}"));
            return result;
        }
    };
    if kind.is_fresh() {
        if let Err(e) = fill_device(&data, DATA_FILL, spec.data_sectors()) {
            result.error = Some(e.to_string());
        }
    }
    result.timings_ms.push(("fill".into(), t0.elapsed().as_millis() as u64));
    if result.error.is_none() {
        run_pool(ctl, job, kind, trace, spec, &metadata, &data, disks.dev_dir, &mut result);
    }
    // The metadata image must reach the host's file.
    if let Ok(f) = OpenOptions::new().write(true).open(&metadata) {
        let _ = f.sync_all();
    }
    for name in [&meta_name, &data_name] {
        if let Err(e) = ctl.remove(name) {
            result.error = result.error.take().or(Some(format!("removing {name}: {e}")));
        }
    }
    result
}

#[allow(clippy::too_many_arguments)]
fn run_pool(
    ctl: &Control,
    job: usize,
    kind: &JobKind,
    trace: &Trace,
    spec: PoolSpec,
    metadata: &Path,
    data: &Path,
    dev_dir: &Path,
    result: &mut KernelResult,
) {
    run_pool_marked(ctl, job, kind, trace, spec, metadata, data, dev_dir, None, result)
}

/// As [`run_pool`]; with `marks`, a log-writes device to which a mark
/// [`mark_name`]`(i)` is sent after every op `i`.
#[allow(clippy::too_many_arguments)]
fn run_pool_marked(
    ctl: &Control,
    job: usize,
    kind: &JobKind,
    trace: &Trace,
    spec: PoolSpec,
    metadata: &Path,
    data: &Path,
    dev_dir: &Path,
    marks: Option<&str>,
    result: &mut KernelResult,
) {
    run_pool_with(ctl, job, kind, trace, spec, metadata, data, dev_dir, marks, None, result)
}

/// Sends the pool messages of a logged job that go just before op `i`
/// (`i` = the number of ops: after the last op), each followed by its
/// mark on the log-writes device `marks`.
fn send_messages(
    ctl: &Control,
    replayer: &Replayer<'_>,
    messages: &[(usize, String)],
    i: usize,
    marks: Option<&str>,
) -> Result<(), String> {
    for (k, (_, text)) in messages.iter().enumerate().filter(|(_, (at, _))| *at == i) {
        replayer.message(text).map_err(|e| format!("pool message {text:?} before op {i}: {e}"))?;
        if let Some(lw) = marks {
            ctl.message(lw, 0, &format!("mark {}", message_mark_name(k)))
                .map_err(|e| format!("log mark after message {k}: {e}"))?;
        }
    }
    Ok(())
}

/// The dm-flakey devices of a [`JobKind::Flakey`] job: per disk (metadata,
/// data) the flakey device's name and the device under it.
type FlakeyDevices<'a> = [(&'a str, &'a Path); 2];

/// The table of a flakey device over `dev`: never down, or (`failing`)
/// always down with `error_writes`.
fn flakey_table(dev: &Path, len: u64, failing: bool) -> Result<TargetSpec, ShimError> {
    let num = block_dev_num(dev)?.table_name();
    let params = if failing { format!("{num} 0 0 1 1 error_writes") } else { format!("{num} 0 86400 0") };
    Ok(TargetSpec { start: 0, length: len, target_type: "flakey".into(), params })
}

/// Swaps a flakey device's table (suspend without flushing, load,
/// resume; spec §7.3).
fn swap_flakey(ctl: &Control, name: &str, table: TargetSpec) -> Result<(), ShimError> {
    use crate::dm::flags::{NOFLUSH, SKIP_LOCKFS};
    ctl.suspend(name, NOFLUSH | SKIP_LOCKFS)?;
    let loaded = ctl.load(name, &[table], false);
    let resumed = ctl.resume(name);
    loaded?;
    resumed.map(|_| ())
}

/// As [`run_pool_marked`]; with `flakey`, a fault op swaps the named
/// disk's flakey device to `error_writes`.
#[allow(clippy::too_many_arguments)]
fn run_pool_with(
    ctl: &Control,
    job: usize,
    kind: &JobKind,
    trace: &Trace,
    spec: PoolSpec,
    metadata: &Path,
    data: &Path,
    dev_dir: &Path,
    marks: Option<&str>,
    flakey: Option<FlakeyDevices<'_>>,
    result: &mut KernelResult,
) {
    let lens = [spec.metadata_sectors, spec.data_sectors()];
    // Queued writes on a full pool wait this long before failing.
    set_no_space_timeout(&spec);
    let mut replayer =
        match Replayer::new(ctl, spec, metadata, data, dev_dir, &job.to_string(), kind.is_fresh()) {
            Ok(r) => r,
            Err(e) => {
                result.error = Some(format!("creating the pool: {e}"));
                return;
            }
        };
    let t0 = Instant::now();
    match kind {
        JobKind::Replay | JobKind::Logged { .. } | JobKind::Flakey | JobKind::Ublk | JobKind::Engine(_) => {
            let messages = match kind {
                JobKind::Logged { messages } => messages.as_slice(),
                _ => &[],
            };
            let nr_ops = trace.ops().count();
            for (i, op) in trace.ops().map(Some).chain([None]).enumerate() {
                if let Err(e) = send_messages(ctl, &replayer, messages, i, marks) {
                    result.error = Some(e);
                    break;
                }
                let Some(op) = op else { break };
                debug_assert!(i < nr_ops);
                // A cache trace's op or disk: an error, before the flakey
                // swap below could take a cache disk for the data disk.
                if let Some(e) = op.thin_error() {
                    result.error = Some(format!("op {i} ({op:?}): {e}"));
                    break;
                }
                if let (Some(devs), Op::Fault { disk, fault: dmsim_traces::DiskFault::WriteError { .. } }) =
                    (flakey, op)
                {
                    let d = usize::from(disk != dmsim_traces::DiskId::Metadata);
                    let swapped =
                        flakey_table(devs[d].1, lens[d], true).and_then(|t| swap_flakey(ctl, devs[d].0, t));
                    let outcome = match swapped {
                        Ok(()) => "ok".to_string(),
                        Err(e) => format!("flakey swap failed ({e})"),
                    };
                    result.ops.push(OpResult { index: i, outcome, read: None });
                    continue;
                }
                match replayer.apply(i, &op) {
                    Ok(r) => result.ops.push(r),
                    Err(e) => {
                        result.error = Some(format!("op {i} ({op:?}): {e}"));
                        break;
                    }
                }
                if let Some(lw) = marks {
                    if let Err(e) = ctl.message(lw, 0, &format!("mark {}", mark_name(i))) {
                        result.error = Some(format!("log mark after op {i}: {e}"));
                        break;
                    }
                }
            }
        }
        JobKind::Activate { ids } => {
            if let Err(e) = replayer.activate_existing(ids) {
                result.error = Some(format!("activating the devices {ids:?}: {e}"));
            }
        }
        // Runs in `run_cache_job`, never on a pool.
        JobKind::Cache => result.error = Some("a cache job on a thin-pool".into()),
        // Runs in `run_ublk_job`.
        JobKind::Race { .. } => result.error = Some("a race job on disks not controlled".into()),
    }
    finish_replay(replayer, t0, result);
}

/// The end of a replay job, after its ops (begun at `t0`): every live
/// device read back, the pool's status, the teardown, each timed; the
/// first error is kept in `result`.
fn finish_replay(mut replayer: Replayer<'_>, t0: Instant, result: &mut KernelResult) {
    result.timings_ms.push(("ops".into(), t0.elapsed().as_millis() as u64));
    result.timings_ms.push((format!("{COARSE_PREFIX}res"), CoarseClock::resolution_us()));
    if let Some(p) = replayer.clock.jiffy_phase() {
        result.timings_ms.push((JIFFY_PHASE.to_string(), p));
    }
    result.timings_ms.append(&mut replayer.times);
    let t1 = Instant::now();
    match replayer.read_back() {
        Ok(d) => result.devices = d,
        Err(e) => result.error = result.error.take().or(Some(format!("read-back: {e}"))),
    }
    result.timings_ms.push(("read-back".into(), t1.elapsed().as_millis() as u64));
    match replayer.pool_status() {
        Ok(s) => result.pool_status = s,
        Err(e) => result.error = result.error.take().or(Some(format!("pool status: {e}"))),
    }
    let t2 = Instant::now();
    let clock = replayer.clock;
    result.timings_ms.push((format!("{COARSE_PREFIX}teardown-a"), clock.now_us()));
    if let Err(e) = replayer.teardown() {
        result.error = result.error.take().or(Some(format!("teardown: {e}")));
    }
    result.timings_ms.push(("teardown".into(), t2.elapsed().as_millis() as u64));
}

/// Largest controlled disk a ublk job keeps in guest RAM (two copies of
/// it: the durable image and what reads see).
const UBLK_MAX_DISK_BYTES: u64 = 256 << 20;

/// A ublk job ([`JobKind::Ublk`]): two controlled disks in guest RAM
/// (metadata zeroed, data filled with [`DATA_FILL`]) served through ublk,
/// the pool on them as in a replay job — a crash op cuts their power and
/// rebuilds the pool on what survives ([`power_cut`]) — then both devices
/// stopped and deleted (also when the replay failed), the requests they
/// served counted, and their durable images written to the job's slices
/// of the metadata and data disks, where the host reads them. An engine
/// job that follows the kernel's commits takes them from `kernel_before`.
#[allow(clippy::too_many_arguments)]
fn run_ublk_job(
    ctl: &Control,
    job: usize,
    kind: &JobKind,
    trace: &Trace,
    spec: PoolSpec,
    disks: &JobDisks<'_>,
    kernel_before: Option<&KernelResult>,
    result: &mut KernelResult,
) {
    use crate::ublk::{live_devices, live_devices_of, ControlledDisk, UblkControl, UblkDevice};
    let t0 = Instant::now();
    // Where the kernel committed, for an engine that follows it.
    let following = match kind {
        JobKind::Engine(e) if e.follow_kernel => {
            let kernel = kernel_before.filter(|k| k.error.is_none());
            match kernel.and_then(crate::protocol::kernel_commit_points) {
                Some(points) => Some(Following {
                    points,
                    keys: kernel.and_then(crate::protocol::commit_superblocks).unwrap_or_default(),
                }),
                None => {
                    result.error = Some(
                        "an engine job following the kernel's commits comes right after a kernel job of \
                         the same trace that ran to the end (its `commit-ops` note)"
                            .into(),
                    );
                    return;
                }
            }
        }
        _ => None,
    };
    // The metadata disk has the size the trace's growths reach; the pool
    // sees its first `metadata_sectors` through a dm-linear device until
    // a growth extends it ([`Replayer::grow_metadata`]).
    let (meta_bytes, data_bytes) = (spec.metadata_disk_sectors * 512, spec.data_sectors() * 512);
    if meta_bytes.max(data_bytes) > UBLK_MAX_DISK_BYTES {
        result.error = Some(format!(
            "ublk: disks of {meta_bytes} and {data_bytes} bytes exceed the {UBLK_MAX_DISK_BYTES} bytes kept in RAM"
        ));
        return;
    }
    let ublk = match UblkControl::open() {
        Ok(c) => c,
        Err(e) => {
            result.error = Some(format!("ublk: {e}"));
            return;
        }
    };
    let meta = ControlledDisk::filled(meta_bytes, 0);
    let data = ControlledDisk::filled(data_bytes, DATA_FILL).zeroing_discards();
    let shapes = ublk_shapes(trace, &spec);
    let devices = UblkDevice::start(&ublk, meta, shapes[0])
        .and_then(|m| UblkDevice::start(&ublk, data, shapes[1]).map(|d| (m, d)));
    let (meta, data) = match devices {
        Ok(p) => p,
        Err(e) => {
            result.error = Some(format!("ublk: starting the devices: {e}"));
            result.ublk.push(("left-devices".into(), live_devices().len() as u64));
            return;
        }
    };
    result.timings_ms.push(("ublk-start".into(), t0.elapsed().as_millis() as u64));
    for (role, dev) in [("metadata", &meta), ("data", &data)] {
        let g = dev.granted();
        result.ublk.push((format!("{role}-granted-flags"), g.flags));
        result.ublk.push((format!("{role}-max-io-buf-bytes"), u64::from(g.max_io_buf_bytes)));
    }
    let mut devs = UblkPair { ctl: &ublk, devs: Some((meta, data)), counts: Default::default(), shapes };
    match kind {
        JobKind::Race { steps } => {
            run_race_pool(ctl, job, trace, steps, spec.clone(), &mut devs, disks.dev_dir, result)
        }
        JobKind::Engine(engine) => run_ublk_pool(
            ctl,
            job,
            trace,
            spec.clone(),
            &mut devs,
            disks.dev_dir,
            Some((*engine, following.as_ref())),
            result,
        ),
        _ => run_ublk_pool(ctl, job, trace, spec.clone(), &mut devs, disks.dev_dir, None, result),
    }
    let t1 = Instant::now();
    let mut served = Vec::new();
    let ids: Vec<u32> = devs.devs.as_ref().map(|(m, d)| vec![m.dev_id(), d.dev_id()]).unwrap_or_default();
    if let Some((meta, data)) = devs.devs.take() {
        for (k, (role, dev)) in [("metadata", meta), ("data", data)].into_iter().enumerate() {
            match dev.stop() {
                Ok(disk) => {
                    add_counts(&mut devs.counts[k], disk.counts());
                    served.push((role, disk));
                }
                Err(e) => {
                    result.error =
                        result.error.take().or(Some(format!("ublk: stopping the {role} disk: {e}")))
                }
            }
        }
    }
    // Its own devices only: other jobs' may be running beside it.
    result.ublk.push(("left-devices".into(), live_devices_of(&ids).len() as u64));
    result.timings_ms.push(("ublk-stop".into(), t1.elapsed().as_millis() as u64));
    let t2 = Instant::now();
    for (k, role) in ["metadata", "data"].into_iter().enumerate() {
        for (name, n) in devs.counts[k].named() {
            result.ublk.push((format!("{role}-{name}"), n));
        }
    }
    // A concurrent engine job is judged in the VM: its data image is not
    // read on the host (the metadata image still goes out).
    let concurrent = matches!(kind, JobKind::Engine(e) if e.depth > 1);
    for (role, disk) in &served {
        let volatile = disk.since_flush().iter().filter(|w| !w.fua).count() as u64;
        result.ublk.push((format!("{role}-volatile-at-stop"), volatile));
        if concurrent && *role == "data" {
            continue;
        }
        let (name, at, len, disk_path) = if *role == "metadata" {
            (format!("dmsim-m{job}"), disks.slice.metadata_offset, spec.metadata_disk_sectors, disks.metadata)
        } else {
            (format!("dmsim-d{job}"), disks.slice.data_offset, spec.data_sectors(), disks.data)
        };
        // What the disk reads after the teardown: with the writes still in
        // its volatile cache (the block manager's write-back of dirty
        // blocks at close is not flushed: in a read-only pool, block 0
        // with its needs_check flag), as the simulator's final images are
        // (`ThinSim::close`, `visible`).
        let written = linear(ctl, &name, disk_path, at, len, disks.dev_dir).and_then(|path| {
            let w = write_image(&path, disk.visible());
            let removed = ctl.remove(&name);
            w.and(removed)
        });
        if let Err(e) = written {
            result.error = result.error.take().or(Some(format!("ublk: writing the {role} image out: {e}")));
        }
    }
    result.timings_ms.push(("ublk-copy-out".into(), t2.elapsed().as_millis() as u64));
}

/// The two controlled disks of a ublk job (`None` once stopped) and what
/// the devices stopped so far served.
struct UblkPair<'u> {
    ctl: &'u crate::ublk::UblkControl,
    devs: Option<(crate::ublk::UblkDevice<'u>, crate::ublk::UblkDevice<'u>)>,
    counts: [crate::ublk::RequestCounts; 2],
    /// How the metadata and the data disk are served ([`ublk_shapes`]).
    shapes: [crate::ublk::DeviceShape; 2],
}

/// How a ublk job serves its metadata and data disks: as is, or, when the
/// trace arms faults, with requests of at most one metadata block (8
/// sectors) and one data block, so that the block layer does not merge
/// neighbouring writes and a fault fires on the request the model's disk
/// would fire it on (an aimed fault counts a commit's writes).
fn ublk_shapes(trace: &Trace, spec: &PoolSpec) -> [crate::ublk::DeviceShape; 2] {
    use crate::ublk::DeviceShape;
    if !trace.ops().any(|op| matches!(op, Op::Fault { .. } | Op::AimFault { .. })) {
        return [DeviceShape::default(); 2];
    }
    let data_max = u32::try_from(spec.block_sectors).unwrap_or(u32::MAX);
    [
        DeviceShape { max_sectors: 8, ..DeviceShape::default() },
        DeviceShape { max_sectors: data_max, ..DeviceShape::default() },
    ]
}

fn add_counts(to: &mut crate::ublk::RequestCounts, c: crate::ublk::RequestCounts) {
    to.reads += c.reads;
    to.writes += c.writes;
    to.fua_writes += c.fua_writes;
    to.flushes += c.flushes;
    to.discards += c.discards;
    to.write_zeroes += c.write_zeroes;
    to.errors += c.errors;
}

/// How long the kernel must send its data disk nothing new, during an op
/// of a ublk job, before the oldest data request it holds completes
/// ([`crate::ublk::UblkDevice::hold_until_quiet`]): the pool's worker
/// settles first, as in the serialized simulator.
pub const DATA_QUIET_WINDOW: std::time::Duration = std::time::Duration::from_millis(5);

/// The seed of the data disk's crash choice, from the crash op's seed:
/// the simulator's (`ThinSim::crash`), the two disks' caches being
/// independent.
pub const DATA_CRASH_SEED_XOR: u32 = 0x9e37_79b9;

/// Sets dm-thin-pool's `no_space_timeout` module parameter to the pool's
/// (whole seconds, at least 1: 0 would mean forever in the kernel).
fn set_no_space_timeout(spec: &PoolSpec) {
    let secs = spec.no_space_timeout_ns.div_ceil(1_000_000_000).max(1);
    let _ = std::fs::write("/sys/module/dm_thin_pool/parameters/no_space_timeout", secs.to_string());
}

/// Where a kernel run committed, for an engine to commit there too
/// ([`crate::protocol::EngineJob::follow_kernel`]).
#[derive(Debug, Clone)]
pub struct Following {
    /// Per op: before its first request, after it, or both.
    pub points: std::collections::BTreeMap<usize, crate::protocol::CommitPoint>,
    /// The commit key ([`crate::protocol::commit_key`]) of the superblock
    /// the kernel had after each op where it committed.
    pub keys: std::collections::BTreeMap<usize, u64>,
}

/// A ublk job's pool: the trace's ops as in a replay job; at a crash op,
/// [`power_cut`]. Then the read-back, the pool's status and the teardown.
/// On the engine (`engine_job`) following a kernel run ([`Following`]):
/// the engine asked to commit where the kernel did — before an op, after
/// it (unless the engine's superblock already has the kernel's commit
/// key), before a crash op's power cut.
#[allow(clippy::too_many_arguments)]
fn run_ublk_pool(
    ctl: &Control,
    job: usize,
    trace: &Trace,
    spec: PoolSpec,
    devs: &mut UblkPair<'_>,
    dev_dir: &Path,
    engine_job: Option<(crate::protocol::EngineJob, Option<&Following>)>,
    result: &mut KernelResult,
) {
    let (engine_job, following) = match engine_job {
        Some((e, f)) => (Some(e), f),
        None => (None, None),
    };
    set_no_space_timeout(&spec);
    let Some((m, d)) = devs.devs.as_ref().map(|(m, d)| (m.block().to_path_buf(), d.block().to_path_buf()))
    else {
        return;
    };
    let prefix = job.to_string();
    let created = if let Some(engine) = engine_job {
        let start = EngineStart {
            trace_time: 0,
            metadata_sectors: (spec.metadata_disk_sectors > spec.metadata_sectors)
                .then_some(spec.metadata_sectors),
        };
        Replayer::new_on_engine(ctl, spec.clone(), &m, &d, &prefix, true, engine, start)
    } else if spec.metadata_disk_sectors > spec.metadata_sectors {
        Replayer::new_growable(ctl, spec.clone(), &m, spec.metadata_sectors, &d, dev_dir, &prefix, true)
    } else {
        Replayer::new(ctl, spec.clone(), &m, &d, dev_dir, &prefix, true)
    };
    let mut replayer = match created {
        Ok(r) => r,
        Err(e) => {
            result.error = Some(format!("creating the pool: {e}"));
            return;
        }
    };
    if following.is_some() {
        result.notes.push((crate::equivalence::CLOCK_NOTE.into(), crate::equivalence::KERNEL_COMMITS.into()));
    } else if engine_job.is_some_and(|e| e.trace_clock) {
        result.notes.push((crate::equivalence::CLOCK_NOTE.into(), "trace".into()));
    }
    // The ops before whose first request, and during which, the
    // superblock changed.
    let (mut before_ops, mut during_ops) = (Vec::new(), Vec::new());
    let t0 = Instant::now();
    if let Some(engine) = engine_job.filter(|e| e.depth > 1) {
        // Every block was read back and judged by the oracle already.
        run_concurrent(&mut replayer, trace, &spec, usize::from(engine.depth), result);
        result.timings_ms.push(("ops".into(), t0.elapsed().as_millis() as u64));
        match replayer.pool_status() {
            Ok(s) => result.pool_status = s,
            Err(e) => result.error = result.error.take().or(Some(format!("pool status: {e}"))),
        }
        if let Err(e) = replayer.teardown() {
            result.error = result.error.take().or(Some(format!("teardown: {e}")));
        }
        return;
    }
    let faulted = trace.ops().any(|op| matches!(op, Op::Fault { .. } | Op::AimFault { .. }));
    // The ops after which the metadata superblock differs from before
    // them: the pool committed during the op (or between it and the op
    // before; for a crash op, before the power cut). Reported as the notes
    // `commit-ops` and, with each new superblock's commit key
    // (`protocol::commit_key`), `commit-superblocks`.
    let superblock = |devs: &UblkPair<'_>| {
        devs.devs
            .as_ref()
            .map(|(m, _)| m.visible_prefix(crate::protocol::SUPERBLOCK_BYTES))
            .unwrap_or_default()
    };
    // Where the engine was asked to commit.
    let mut asked: std::collections::BTreeMap<usize, crate::protocol::CommitPoint> = Default::default();
    // Asks the engine to commit at op `i` if the kernel did there: before
    // its first request (`before`; in the gap between two ops, where the
    // engine commits nothing of its own) or after it — unless the engine's
    // superblock is already the one the kernel's commit left (the op's own
    // commit: a message, a flush), when another commit could only move
    // blocks the kernel did not.
    let commit_here = |replayer: &Replayer<'_>,
                       devs: &UblkPair<'_>,
                       i: usize,
                       before: bool,
                       asked: &mut std::collections::BTreeMap<usize, crate::protocol::CommitPoint>|
     -> Result<(), ShimError> {
        let (Some(f), Some(e)) = (following, replayer.engine.as_ref()) else { return Ok(()) };
        let done = || {
            let now = crate::protocol::commit_key(&superblock(devs));
            f.keys.get(&i) == Some(&now)
        };
        match f.points.get(&i) {
            Some(p) if (before && p.before) || (!before && p.after && !done()) => {
                let a = asked.entry(i).or_default();
                if before {
                    a.before = true;
                } else {
                    a.after = true;
                }
                e.request("commit").map(|_| ())
            }
            _ => Ok(()),
        }
    };
    // The key of what the last commit holds
    // (`protocol::commit_contents_key`), for the metadata whose superblock
    // reads `sb`; 0 (unknown) if the pool committed again since.
    let contents = |devs: &UblkPair<'_>, sb: &[u8]| {
        devs.devs.as_ref().map_or(0, |(m, _)| {
            m.with_visible(|image| {
                if image.len() >= sb.len() && image.range(0..sb.len()) == sb {
                    crate::protocol::commit_contents_key(&mut image.clone())
                } else {
                    0
                }
            })
        })
    };
    let mut last_superblock = superblock(devs);
    let mut commit_ops = Vec::new();
    // Per op of `commit_ops`: the contents key.
    let mut commit_contents = Vec::new();
    let mut crash_checks: Vec<(usize, String)> = Vec::new();
    // Thin devices a new engine took over after a crash (ublk's user
    // recovery).
    let mut recovered = 0;
    for (i, op) in trace.ops().enumerate() {
        if let Some(e) = op.thin_error() {
            result.error = Some(format!("op {i} ({op:?}): {e}"));
            break;
        }
        if let Some(r) = arm_ublk_fault(devs, i, &op) {
            result.ops.push(r);
            continue;
        }
        if let Op::Crash { mode, seed } = op {
            if let Err(e) = commit_here(&replayer, devs, i, true, &mut asked) {
                result.error = Some(format!("op {i} (the commit before the power cut): {e}"));
                break;
            }
            if faulted {
                note_fired(devs, i, result);
            }
            // A commit since the op before (the commit timer's) counts as
            // the crash op's: it is what the power cut meets.
            let now = superblock(devs);
            if now != last_superblock {
                commit_ops.push((i, crate::protocol::commit_key(&now)));
                commit_contents.push((i, contents(devs, &now)));
            }
            match power_cut(ctl, job, &spec, devs, replayer, mode, seed, i, dev_dir, &mut crash_checks) {
                Ok((r, record)) => {
                    replayer = r;
                    recovered += replayer.engine.as_ref().map_or(0, |e| e.recovered);
                    result.crashes.push(record);
                    result.ops.push(OpResult { index: i, outcome: "ok".into(), read: None });
                    last_superblock = superblock(devs);
                    continue;
                }
                Err(e) => {
                    result.error = Some(format!("op {i} (power cut): {e}"));
                    result.timings_ms.push(("ops".into(), t0.elapsed().as_millis() as u64));
                    return;
                }
            }
        }
        // The data disk holds the op's data I/O until the pool is quiet:
        // the serialized simulator's order ([`DATA_QUIET_WINDOW`]).
        let hold = |window| {
            if let Some((_, d)) = devs.devs.as_ref() {
                d.hold_until_quiet(window);
            }
        };
        // The order in which the op's data writes were served (the
        // simulator follows it: `protocol::DATA_WRITES_NOTE_PREFIX`).
        let served = || devs.devs.as_ref().map(|(_, d)| d.take_served_writes()).unwrap_or_default();
        if let Err(e) = commit_here(&replayer, devs, i, true, &mut asked) {
            result.error = Some(format!("op {i} (the commit before it): {e}"));
            break;
        }
        let at_start = superblock(devs);
        if at_start != last_superblock {
            before_ops.push(i);
        }
        served();
        hold(Some(DATA_QUIET_WINDOW));
        let applied = replayer.apply(i, &op);
        hold(None);
        let writes = served();
        if writes.len() >= 2 {
            let text = writes.iter().map(u64::to_string).collect::<Vec<_>>().join(" ");
            result.notes.push((format!("{}{i}", crate::protocol::DATA_WRITES_NOTE_PREFIX), text));
        }
        match applied {
            Ok(r) => result.ops.push(r),
            Err(e) => {
                result.error = Some(format!("op {i} ({op:?}): {e}"));
                break;
            }
        }
        if let Err(e) = commit_here(&replayer, devs, i, false, &mut asked) {
            result.error = Some(format!("op {i} (the commit after it): {e}"));
            break;
        }
        if faulted {
            note_fired(devs, i, result);
        }
        // The pool's status after every op (its mode, its free data
        // blocks), without a commit (DM_NOFLUSH): the model does not
        // commit between ops either. The status and the superblock are
        // of one moment: the pool's timer may commit between the two
        // reads (the status would show the mode before the commit, the
        // superblock the commit), so the status is taken again until the
        // superblock is the same before and after it (a few tries).
        let mut now = superblock(devs);
        let mut line = String::new();
        for _ in 0..4 {
            line = match replayer.pool_status_noflush() {
                Ok(s) => s,
                Err(e) => format!("status failed: {e}"),
            };
            let before = std::mem::replace(&mut now, superblock(devs));
            if before == now {
                break;
            }
        }
        result.op_status.push((i, line));
        if now != at_start {
            during_ops.push(i);
        }
        if now != last_superblock {
            commit_ops.push((i, crate::protocol::commit_key(&now)));
            commit_contents.push((i, contents(devs, &now)));
            last_superblock = now;
        }
    }
    result.notes.push((
        crate::protocol::COMMIT_OPS_NOTE.into(),
        commit_ops.iter().map(|(i, _)| i.to_string()).collect::<Vec<_>>().join(" "),
    ));
    if engine_job.is_some() {
        result.ublk.push((crate::protocol::ENGINE_RECOVERED_COUNT.into(), recovered));
    }
    let list = |ops: &[usize]| ops.iter().map(usize::to_string).collect::<Vec<_>>().join(" ");
    result.notes.push((crate::protocol::COMMIT_BEFORE_OPS_NOTE.into(), list(&before_ops)));
    result.notes.push((crate::protocol::COMMIT_DURING_OPS_NOTE.into(), list(&during_ops)));
    if following.is_some() {
        result.notes.push((
            crate::protocol::FORCED_COMMITS_NOTE.into(),
            asked.iter().map(|(i, p)| p.word(*i)).collect::<Vec<_>>().join(" "),
        ));
    }
    for (op, verdict) in crash_checks {
        result.notes.push((format!("{}{op}", crate::thin_replay::CRASH_CHECK_NOTE_PREFIX), verdict));
    }
    let keys =
        |ops: &[(usize, u64)]| ops.iter().map(|(i, f)| format!("{i}:{f:016x}")).collect::<Vec<_>>().join(" ");
    result.notes.push((crate::protocol::COMMIT_SUPERBLOCKS_NOTE.into(), keys(&commit_ops)));
    result.notes.push((crate::protocol::COMMIT_CONTENTS_NOTE.into(), keys(&commit_contents)));
    finish_replay(replayer, t0, result);
    if faulted {
        note_fired(devs, trace.ops().count(), result);
    }
}

/// Locks `m`; a poisoned lock (a panic on another thread) still gives
/// the value as it was left.
fn guard<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The note of a concurrent replay's oracle violations
/// ([`run_concurrent`]): separated by ` ;; `, empty when none.
pub const ORACLE_VIOLATIONS_NOTE: &str = "oracle-violations";

/// The note of a concurrent replay's counts: `requests N max-in-flight M
/// overtaken K blocks-read-back B`.
pub const CONCURRENCY_NOTE: &str = "concurrency";

/// Concurrent replay ([`crate::protocol::EngineJob`] with a depth above
/// 1): the trace's reads, writes, discards and flushes sent with up to
/// `depth` in flight, each on a thread of its own, completing in whatever
/// order the device completes them; pool messages (create, snapshot,
/// delete) wait until nothing is in flight. Crash, fault and growth ops
/// are skipped (concurrent replay is judged by the oracle alone, without a
/// crash model). Every request goes through the oracle as it is sent and
/// as it completes (its lock taken around each, so the oracle sees an
/// order that really happened), every read is judged, and at the end
/// every block of every live device is read and judged too. The
/// violations and the counts go to the result's notes
/// ([`ORACLE_VIOLATIONS_NOTE`], [`CONCURRENCY_NOTE`]).
fn run_concurrent(
    replayer: &mut Replayer<'_>,
    trace: &Trace,
    spec: &PoolSpec,
    depth: usize,
    result: &mut KernelResult,
) {
    use dmsim_sim::oracle::{Oracle, OracleConfig};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    let config = OracleConfig {
        zeroing: !spec.features.contains(&"skip_block_zeroing"),
        ..OracleConfig::new(spec.run, spec.block_sectors)
    };
    let oracle = Arc::new(Mutex::new(Oracle::new(config)));
    let violations: Arc<Mutex<Vec<String>>> = Arc::default();
    let sequence = Arc::new(AtomicU64::new(0));
    let (tx, rx) = std::sync::mpsc::channel::<(OpResult, u64, u64)>();
    let mut in_flight = 0usize;
    let (mut requests, mut most, mut overtaken) = (0u64, 0usize, 0u64);
    // Submission numbers of the requests in flight, to count overtaking.
    let mut open: std::collections::BTreeSet<u64> = std::collections::BTreeSet::new();
    let mut answers: Vec<OpResult> = Vec::new();
    let note = |v: &Mutex<Vec<String>>, what: String| {
        v.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(what)
    };
    let mut reap = |answers: &mut Vec<OpResult>, open: &mut std::collections::BTreeSet<u64>| {
        if let Ok((r, submitted, _)) = rx.recv() {
            open.remove(&submitted);
            if open.first().is_some_and(|&first| first < submitted) {
                overtaken += 1;
            }
            answers.push(r);
        }
    };
    for (i, op) in trace.ops().enumerate() {
        let data = matches!(op, Op::Write { .. } | Op::Read { .. } | Op::Discard { .. } | Op::Flush { .. });
        if !data {
            while in_flight > 0 {
                reap(&mut answers, &mut open);
                in_flight -= 1;
            }
        }
        match op {
            Op::Crash { .. } | Op::Fault { .. } | Op::AimFault { .. } | Op::GrowMetadata { .. } => {
                answers.push(OpResult {
                    index: i,
                    outcome: "skipped (concurrent replay)".into(),
                    read: None,
                });
                continue;
            }
            _ if !data => {
                // A message: the device it names before, the device it
                // made after.
                let named = match op {
                    Op::CreateSnap { origin } => replayer.index(origin).map(|k| replayer.devices[k].id),
                    Op::Delete { dev } => replayer.index(dev).map(|k| replayer.devices[k].id),
                    _ => None,
                };
                let before = replayer.devices.len();
                match replayer.apply(i, &op) {
                    Ok(r) => {
                        let mut o = guard(&oracle);
                        let made = (replayer.devices.len() > before).then(|| replayer.devices[before].id);
                        let sectors = spec.thin_sectors();
                        let fed = match (op, made, named) {
                            (Op::CreateThin, Some(id), _) => o.create_thin(id, sectors),
                            (Op::CreateSnap { .. }, Some(id), Some(origin)) => o.create_snap(id, origin),
                            (Op::Delete { .. }, _, Some(id)) if r.outcome == "ok" => o.delete(id),
                            _ => Ok(()),
                        };
                        if let Err(e) = fed {
                            note(&violations, format!("op {i}: the oracle refused the message: {e:?}"));
                        }
                        answers.push(r);
                    }
                    Err(e) => {
                        result.error = Some(format!("op {i} ({op:?}): {e}"));
                        break;
                    }
                }
                continue;
            }
            _ => {}
        }
        let io = match replayer.data_io(i, &op) {
            Ok(io) => io,
            Err(answer) => {
                answers.push(answer);
                continue;
            }
        };
        let thin = &replayer.devices[io.dev];
        let (id, file) = match thin.file.try_clone() {
            Ok(f) => (thin.id, f),
            Err(e) => {
                result.error = Some(format!("op {i}: cloning the device's file: {e}"));
                break;
            }
        };
        let write = replayer.next_write.wrapping_sub(1);
        while in_flight >= depth {
            reap(&mut answers, &mut open);
            in_flight -= 1;
        }
        let (oracle, violations, sequence, tx) =
            (Arc::clone(&oracle), Arc::clone(&violations), Arc::clone(&sequence), tx.clone());
        // The submission's number is taken with the oracle's lock, in the
        // thread, so that numbers follow the oracle's order.
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<u64>();
        let spawned = std::thread::Builder::new().name(format!("op{i}")).spawn(move || {
            let bad = |what: String| {
                violations.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(what)
            };
            let (ticket, flush_ticket, submitted) = {
                let mut o = guard(&oracle);
                let submitted = sequence.fetch_add(1, Ordering::SeqCst);
                let mut flush_ticket = None;
                let ticket = match &io.kind {
                    DataIoKind::Write { buf, sector, fua, preflush } => {
                        if *preflush {
                            flush_ticket = o.flush_submitted(id).ok();
                        }
                        o.write_submitted(id, *sector, buf.len as u64 / 512, write, *fua)
                    }
                    DataIoKind::Read { buf, sector, .. } => {
                        o.read_submitted(id, *sector, buf.len as u64 / 512)
                    }
                    DataIoKind::Discard { range } => o.discard_submitted(id, range[0] / 512, range[1] / 512),
                    DataIoKind::Flush => o.flush_submitted(id),
                };
                (ticket, flush_ticket, submitted)
            };
            let _ = ready_tx.send(submitted);
            let is = |k: &DataIoKind| match k {
                DataIoKind::Write { .. } => 0,
                DataIoKind::Read { .. } => 1,
                DataIoKind::Discard { .. } => 2,
                DataIoKind::Flush => 3,
            };
            let kind = is(&io.kind);
            let (r, bytes) = io.run_keeping(&file);
            let ok = r.outcome == "ok";
            let completed = {
                let mut o = guard(&oracle);
                let completed = sequence.fetch_add(1, Ordering::SeqCst);
                match ticket {
                    Ok(t) => {
                        if let Some(f) = flush_ticket {
                            let _ = o.flush_completed(f, ok);
                        }
                        let fed =
                            match kind {
                                0 => o.write_completed(t, ok).map_err(|e| format!("{e:?}")),
                                1 => o.read_completed(t, ok, bytes.as_deref().unwrap_or(&[])).map_err(|e| {
                                    match e.violation() {
                                        Some(v) => format!("VIOLATION {v:?}"),
                                        None => format!("{e:?}"),
                                    }
                                }),
                                2 => o.discard_completed(t, ok).map_err(|e| format!("{e:?}")),
                                _ => o.flush_completed(t, ok).map_err(|e| format!("{e:?}")),
                            };
                        if let Err(e) = fed {
                            bad(format!("op {}: {e}", r.index));
                        }
                    }
                    Err(e) => bad(format!("op {}: the oracle refused the request: {e:?}", r.index)),
                }
                completed
            };
            let _ = tx.send((r, submitted, completed));
        });
        match spawned {
            Ok(_) => {
                requests += 1;
                in_flight += 1;
                most = most.max(in_flight);
                if let Ok(n) = ready_rx.recv() {
                    open.insert(n);
                }
            }
            Err(e) => {
                result.error = Some(format!("op {i}: spawning its thread: {e}"));
                break;
            }
        }
    }
    while in_flight > 0 {
        reap(&mut answers, &mut open);
        in_flight -= 1;
    }
    // Every block of every live device, judged at rest.
    let mut reads_judged = 0u64;
    let bs = spec.block_sectors;
    for thin in &replayer.devices {
        let mut buf = AlignedBuf::zeroed((bs * 512) as usize);
        for b in 0..spec.thin_blocks {
            let ok = read_exact_at(&thin.file, buf.as_mut_slice(), b * bs * 512).is_ok();
            let mut o = guard(&oracle);
            match o.read_submitted(thin.id, b * bs, bs) {
                Ok(t) => {
                    if let Err(e) = o.read_completed(t, ok, buf.as_slice()) {
                        note(&violations, format!("read-back dev {} block {b}: {e:?}", thin.id));
                    }
                    reads_judged += 1;
                }
                Err(e) => note(&violations, format!("read-back dev {} block {b}: {e:?}", thin.id)),
            }
        }
    }
    answers.sort_by_key(|r| r.index);
    result.ops.extend(answers);
    let found = violations.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    result.notes.push((ORACLE_VIOLATIONS_NOTE.into(), found.join(" ;; ")));
    result.notes.push((
        CONCURRENCY_NOTE.into(),
        format!(
            "requests {requests} max-in-flight {most} overtaken {overtaken} blocks-read-back {reads_judged}"
        ),
    ));
}

/// A race job's pool ([`JobKind::Race`]): the pool on the controlled
/// disks, the trace's ops run as `steps` say — some on threads of their
/// own, the data disk's requests held at its gate meanwhile — then the
/// read-back, the pool's status and the teardown. Whatever happens, the
/// gate is opened and every background op waited for before the
/// teardown (a held request would keep it waiting).
#[allow(clippy::too_many_arguments)]
fn run_race_pool(
    ctl: &Control,
    job: usize,
    trace: &Trace,
    steps: &[crate::protocol::RaceStep],
    spec: PoolSpec,
    devs: &mut UblkPair<'_>,
    dev_dir: &Path,
    result: &mut KernelResult,
) {
    use crate::protocol::RaceStep;
    set_no_space_timeout(&spec);
    let Some((m, data)) = devs.devs.as_ref() else { return };
    let prefix = job.to_string();
    let mut replayer = match Replayer::new(ctl, spec, m.block(), data.block(), dev_dir, &prefix, true) {
        Ok(r) => r,
        Err(e) => {
            result.error = Some(format!("creating the pool: {e}"));
            return;
        }
    };
    let ops: Vec<Op> = trace.ops().collect();
    let t0 = Instant::now();
    type Background = Vec<(usize, std::thread::JoinHandle<OpResult>)>;
    let mut background: Background = Vec::new();
    // Waits for the background ops `which` picks (all: `None`).
    let join = |background: &mut Background, which: Option<usize>, result: &mut KernelResult| {
        let (now, later): (Background, Background) =
            std::mem::take(background).into_iter().partition(|(i, _)| which.is_none_or(|w| w == *i));
        *background = later;
        for (i, h) in now {
            match h.join() {
                Ok(r) => result.ops.push(r),
                Err(_) => result.error = result.error.take().or(Some(format!("op {i}: its thread panicked"))),
            }
        }
    };
    // The controlled disk a gate step names: a pool has a metadata and a
    // data disk.
    let gate_disk = |disk: crate::protocol::RaceDisk| match disk {
        crate::protocol::RaceDisk::Data => Ok(data),
        crate::protocol::RaceDisk::Metadata => Ok(m),
        other => Err(format!("a thin pool has no {} disk", other.name())),
    };
    for (k, step) in steps.iter().enumerate() {
        let op_of = |i: usize| {
            ops.get(i)
                .cloned()
                .ok_or_else(|| format!("step {k} ({}): the trace has {} ops", step.to_text(), ops.len()))
        };
        let done: Result<(), String> = match *step {
            RaceStep::Op(i) => op_of(i).and_then(|op| {
                if let Some(e) = op.thin_error() {
                    return Err(format!("op {i} ({op:?}): {e}"));
                }
                match op {
                    Op::Fault { .. } | Op::AimFault { .. } | Op::Crash { .. } => {
                        Err(format!("op {i} ({op:?}): a race job runs no faults or crashes"))
                    }
                    _ => replayer
                        .apply(i, &op)
                        .map(|r| result.ops.push(r))
                        .map_err(|e| format!("op {i} ({op:?}): {e}")),
                }
            }),
            RaceStep::Background(i) => op_of(i).and_then(|op| {
                if !matches!(op, Op::Read { .. } | Op::Write { .. } | Op::Discard { .. } | Op::Flush { .. }) {
                    return Err(format!(
                        "op {i} ({op:?}): only a read, write, discard or flush runs in the background"
                    ));
                }
                if ops_on_console() {
                    log(&format!("op {i} (in the background): {}", dmsim_traces::text::op_to_line(&op)));
                }
                match replayer.data_io(i, &op) {
                    Ok(io) => replayer.devices[io.dev]
                        .file
                        .try_clone()
                        .map_err(|e| format!("op {i}: dup the thin device's descriptor: {e}"))
                        .and_then(|file| {
                            std::thread::Builder::new()
                                .name(format!("op{i}"))
                                .spawn(move || io.run(&file))
                                .map(|h| background.push((i, h)))
                                .map_err(|e| format!("op {i}: spawn its thread: {e}"))
                        }),
                    Err(answer) => {
                        result.ops.push(answer);
                        Ok(())
                    }
                }
            }),
            RaceStep::Hold { disk, reads, writes, flushes } => gate_disk(disk).map(|d| {
                d.gate(crate::ublk::GateKinds { reads, writes, flushes });
            }),
            RaceStep::Held { disk, n } => gate_disk(disk).and_then(|d| wait_held(d, disk, k, n)),
            RaceStep::Serve { disk, k: j } => gate_disk(disk).and_then(|d| serve_held(d, disk, k, j)),
            RaceStep::Release => {
                for d in [m, data] {
                    d.gate(crate::ublk::GateKinds::default());
                }
                Ok(())
            }
            RaceStep::Wait(i) => {
                if background.iter().any(|(b, _)| *b == i) {
                    join(&mut background, Some(i), result);
                    Ok(())
                } else {
                    Err(format!("step {k}: op {i} is not running in the background"))
                }
            }
            RaceStep::Pause(ms) => {
                std::thread::sleep(Duration::from_millis(ms));
                Ok(())
            }
            RaceStep::Join => {
                join(&mut background, None, result);
                Ok(())
            }
        };
        if let Err(e) = done {
            result.error = Some(e);
            break;
        }
    }
    for d in [m, data] {
        d.gate(crate::ublk::GateKinds::default());
    }
    join(&mut background, None, result);
    result.ops.sort_by_key(|r| r.index);
    finish_replay(replayer, t0, result);
}

/// A race's [`crate::protocol::RaceStep::Held`] (step `k`): waits until
/// `dev` (the race's `disk`) holds `n` requests, at most
/// [`crate::protocol::RACE_WAIT`].
fn wait_held(
    dev: &crate::ublk::UblkDevice<'_>,
    disk: crate::protocol::RaceDisk,
    k: usize,
    n: usize,
) -> Result<(), String> {
    wait_until(crate::protocol::RACE_WAIT, || dev.held() >= n).map_err(|w| {
        format!("step {k}: the {} disk holds {} requests after {w:?}, expected {n}", disk.name(), dev.held())
    })
}

/// A race's [`crate::protocol::RaceStep::Serve`] (step `k`): serves the
/// `j`-th request `dev` holds and waits until it is served.
fn serve_held(
    dev: &crate::ublk::UblkDevice<'_>,
    disk: crate::protocol::RaceDisk,
    k: usize,
    j: usize,
) -> Result<(), String> {
    let before = dev.held();
    if j >= before {
        return Err(format!("step {k}: serve request {j} of the {before} the {} disk holds", disk.name()));
    }
    dev.serve_held(j);
    wait_until(crate::protocol::RACE_WAIT, || dev.held() < before)
        .map_err(|w| format!("step {k}: held request {j} on the {} disk not served after {w:?}", disk.name()))
}

/// Polls `done` every millisecond until it holds (`Ok`) or `limit` has
/// passed (`Err(limit)`).
fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> Result<(), Duration> {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() > deadline {
            return Err(limit);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// A trace's `fault` or `aim-fault` op, armed on the controlled disks as
/// the simulator arms its disks ([`crate::ublk_faults`]); `None` for any
/// other op.
fn arm_ublk_fault(devs: &UblkPair<'_>, index: usize, op: &Op) -> Option<OpResult> {
    use crate::ublk_faults::{aim_arms, Arm};
    let (meta_arms, data_arms) = match *op {
        Op::Fault { disk: dmsim_traces::DiskId::Metadata, fault } => (vec![Arm::Next(fault)], vec![]),
        Op::Fault { disk: dmsim_traces::DiskId::Data, fault } => (vec![], vec![Arm::Next(fault)]),
        Op::AimFault { aim } => aim_arms(aim),
        _ => return None,
    };
    let outcome = match devs.devs.as_ref() {
        Some((m, d)) => {
            meta_arms.into_iter().for_each(|a| m.arm(a));
            data_arms.into_iter().for_each(|a| d.arm(a));
            "ok"
        }
        None => "skipped (the controlled disks are gone)",
    };
    Some(OpResult { index, outcome: outcome.into(), read: None })
}

/// Records the faults that fired on the controlled disks since the last
/// call as notes `fired.<op> = <disk> <request> sector <s> nr <n>: <what>`,
/// `op` being the op during which they fired (the number of ops: during
/// the read-back or teardown).
fn note_fired(devs: &UblkPair<'_>, index: usize, result: &mut KernelResult) {
    if let Some((m, d)) = devs.devs.as_ref() {
        for (role, dev) in [("metadata", m), ("data", d)] {
            for f in dev.take_fired() {
                result.notes.push((format!("fired.{index}"), format!("{role} {f}")));
            }
        }
    }
}

/// A power cut at crash op `index`: both disks fail every request from
/// now on ([`crate::ublk::UblkDevice::cut_power`]); the dead pool and its
/// thin devices are removed (each error logged, none fatal: the disks are
/// dead); both ublk devices stopped and deleted; each disk's surviving
/// image chosen by `faults::SimDisk::crash_state` (metadata with `seed`,
/// data with `seed ^ DATA_CRASH_SEED_XOR`, as the simulator does); a
/// needs_check flag cleared as the simulator's recovery does; new ublk
/// devices started on the images; the pool rebuilt on them with the same
/// table and the live thin devices reactivated, in order; and every live
/// device read back. Returns the new replayer and the crash's record.
#[allow(clippy::too_many_arguments)]
fn power_cut<'c>(
    ctl: &'c Control,
    job: usize,
    spec: &PoolSpec,
    devs: &mut UblkPair<'_>,
    mut replayer: Replayer<'c>,
    mode: dmsim_traces::CrashMode,
    seed: u32,
    index: usize,
    dev_dir: &Path,
    crash_checks: &mut Vec<(usize, String)>,
) -> Result<(Replayer<'c>, crate::protocol::CrashRecord), String> {
    use crate::ublk::{ControlledDisk, UblkDevice};
    // An engine on the trace's clock: its time (the trace's ticks, and the
    // no-space deadlines it moved to), where the new engine starts.
    let trace_time = match replayer.engine.as_ref().filter(|e| e.job.trace_clock) {
        Some(e) => e
            .request("time")
            .map_err(|e| e.to_string())
            .and_then(|t| t.parse::<u64>().map_err(|_| format!("the engine's time `{t}`")))
            .map_err(|e| format!("the engine's clock before the power cut: {e}"))?,
        None => 0,
    };
    let (meta, data) = devs.devs.take().ok_or("the controlled disks are gone")?;
    meta.cut_power();
    data.cut_power();
    let ids: Vec<u32> = replayer.devices.iter().map(|t| t.id).collect();
    let (next_id, next_write) = (replayer.next_id, replayer.next_write);
    // The metadata device's size now (the disk may be larger: the trace
    // grows it later); the crash state is that much of the disk.
    let grown = replayer.metadata_sectors_now();
    let (clock, mut times) = (replayer.clock, std::mem::take(&mut replayer.times));
    let engine_job = replayer.engine.as_ref().map(|e| e.job);
    let t = Instant::now();
    // The dead pool's teardown: every thin device, then the pool. On 6.1
    // the pool's postsuspend commits, the commit's I/O fails, the pool
    // goes to fail mode; remove still succeeds (see docs/kernel-shim.md).
    // The engine is killed (SIGKILL) instead.
    let teardown = replayer.crash_teardown();
    log(&format!(
        "power cut at op {index}: teardown of the dead pool took {} ms: {}",
        t.elapsed().as_millis(),
        match &teardown {
            Ok(_) => "ok".to_string(),
            Err(e) => format!("{e}"),
        }
    ));
    let mut disks = Vec::new();
    for (k, (role, dev)) in [("metadata", meta), ("data", data)].into_iter().enumerate() {
        let disk = dev.stop().map_err(|e| format!("stopping the dead {role} disk: {e}"))?;
        add_counts(&mut devs.counts[k], disk.counts());
        disks.push(disk);
    }
    let orphans = teardown.map_err(|e| format!("tearing the dead pool down: {e}"))?;
    // An aimed passdown failure waits across the crash, as in the
    // simulator; every other armed fault goes with the dead disks.
    let passdown = disks[1].discard_failure_armed();
    let (meta_image, m) = disks[0].crash_state(mode, seed);
    let (data_image, d) = disks[1].crash_state(mode, seed ^ DATA_CRASH_SEED_XOR);
    let meta_image = if dmsim_sim::thin::needs_check_set(&meta_image) {
        log(&format!("power cut at op {index}: needs_check set; cleared as the simulator's recovery does"));
        dmsim_sim::thin::clear_needs_check(meta_image, spec.block_sectors as u32)
            .map_err(|e| format!("clearing needs_check: {e}"))?
    } else {
        meta_image
    };
    // dmsim's checker on what survived (leaks aside, as after any crash
    // of a pool whose transaction was open): reported per crash, judged
    // on the host ([`crate::thin_replay::crash_checks`]).
    let checked = crate::thin_replay::metadata_damage(&meta_image).unwrap_or_else(|| "clean".to_string());
    crash_checks.push((index, checked));
    let xml = crate::vm::dump(&meta_image).map_err(|e| format!("dump of the surviving metadata: {e}"))?;
    let mut record = crate::protocol::CrashRecord {
        op: index,
        metadata: (m.kept, m.unflushed),
        data: (d.kept, d.unflushed),
        torn: m.torn || d.torn,
        metadata_fnv: crate::protocol::fnv64(
            &meta_image[..grown.map_or(meta_image.len(), |s| (s as usize * 512).min(meta_image.len()))],
        ),
        mapped: crate::vm::mapped_blocks(&xml),
        devices: Vec::new(),
        data_pending: disks[1].since_flush().iter().map(dmsim_faults::PendingWrite::key).collect(),
    };
    let meta = UblkDevice::start(devs.ctl, ControlledDisk::from_image(meta_image), devs.shapes[0])
        .map_err(|e| format!("restarting the metadata disk: {e}"))?;
    let data = UblkDevice::start(
        devs.ctl,
        ControlledDisk::from_image(data_image).zeroing_discards(),
        devs.shapes[1],
    )
    .map_err(|e| format!("restarting the data disk: {e}"))?;
    if passdown {
        data.arm(crate::ublk_faults::Arm::NextDiscard);
    }
    let (mp, dp) = (meta.block().to_path_buf(), data.block().to_path_buf());
    devs.devs = Some((meta, data));
    let prefix = job.to_string();
    let reloaded = match (grown, engine_job) {
        (_, Some(engine)) => {
            let start = EngineStart { trace_time, metadata_sectors: grown };
            Replayer::new_on_engine(ctl, spec.clone(), &mp, &dp, &prefix, false, engine, start)
        }
        (Some(sectors), None) => {
            Replayer::new_growable(ctl, spec.clone(), &mp, sectors, &dp, dev_dir, &prefix, false)
        }
        (None, None) => Replayer::new(ctl, spec.clone(), &mp, &dp, dev_dir, &prefix, false),
    };
    let mut replayer = reloaded.map_err(|e| format!("the pool does not load after the crash: {e}"))?;
    // The new engine takes over the dead one's ublk devices as it
    // activates their thin devices (the same /dev/ublkbN).
    if let Some(engine) = replayer.engine.as_mut() {
        engine.adopt(orphans);
    }
    // Every device the surviving metadata holds is read back, as the
    // simulator's crash state reads every device of its surviving images:
    // also one the workload no longer uses (a delete answered ok and then
    // undone by the abort after its failed commit). Those are activated
    // for the read-back alone and removed again; the workload goes on
    // with its own devices, as the simulator's does.
    let extra: Vec<u32> =
        crate::equivalence::data_mappings(&xml).into_keys().filter(|id| !ids.contains(id)).collect();
    let rebuilt = replayer
        .activate_existing(&ids)
        .map_err(|e| format!("a device lost in the crash: {e}"))
        .and_then(|()| {
            for &id in &extra {
                if let Err(e) = replayer.activate(id) {
                    log(&format!(
                        "power cut at op {index}: device {id} of the metadata does not activate: {e}"
                    ));
                }
            }
            // Devices the crash took away are not served again.
            if let Some(engine) = replayer.engine.as_mut() {
                engine.release_orphans();
            }
            let read = replayer.read_back().map_err(|e| format!("read-back after the crash: {e}"));
            while replayer.devices.len() > ids.len() {
                let thin = replayer.devices.pop().expect("an extra device");
                let (id, name) = (thin.id, thin.name.clone());
                drop(thin);
                replayer
                    .remove_device(id, &name)
                    .map_err(|e| format!("removing device {name} after its read-back: {e}"))?;
            }
            read
        });
    match rebuilt {
        Ok(mut devices) => {
            // In id order, as the simulator reads its images.
            devices.sort_by_key(|d| d.id);
            record.devices = devices;
        }
        Err(e) => {
            // Leave nothing on the disks, so that they can be deleted.
            let _ = replayer.teardown();
            return Err(e);
        }
    }
    replayer.next_id = replayer.next_id.max(next_id);
    replayer.next_write = next_write;
    replayer.trace_time = trace_time;
    // One clock for the whole job: the rebuilt pool's creation, read on
    // its own clock, as `rebuild-a-<op>` / `rebuild-b-<op>` on the job's.
    for (k, v) in std::mem::take(&mut replayer.times) {
        let v = (v + replayer.clock.base).saturating_sub(clock.base);
        times.push((format!("{}-{index}", k.replace("create-", "rebuild-")), v));
    }
    replayer.clock = clock;
    replayer.times = times;
    Ok((replayer, record))
}

/// Writes `image` at the start of the block device `path` and flushes it.
fn write_image(path: &Path, image: &dmsim_faults::Image) -> Result<(), ShimError> {
    use std::os::unix::fs::FileExt;
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| ShimError::io(format!("open {}", path.display()), e))?;
    f.write_all_at(&image.to_vec(), 0).map_err(|e| ShimError::io(format!("write {}", path.display()), e))?;
    f.sync_all().map_err(|e| ShimError::io(format!("flush {}", path.display()), e))
}

/// A logged job (spec §7.2, §9): one backing device (the job's metadata
/// slice, then the shared data region), data filled with [`DATA_FILL`] and
/// the metadata's first 4 KiB zeroed before logging starts; a log-writes
/// device over it with the log on the job's slice of the log disk; the
/// pool's metadata and data devices as dm-linear ranges of the log-writes
/// device; the ops with a mark after each; the log-writes device removed
/// last (its destructor logs what is still unflushed and a final mark).
fn run_logged_job(
    ctl: &Control,
    job: usize,
    kind: &JobKind,
    trace: &Trace,
    spec: PoolSpec,
    disks: &JobDisks<'_>,
    result: &mut KernelResult,
) {
    let Some((log_disk, log_offset)) = disks.log else {
        result.error = Some("a logged job without a log slice".into());
        return;
    };
    let (m, d) = (spec.metadata_sectors, spec.data_sectors());
    let names = [
        format!("dmsim-m{job}"),
        format!("dmsim-d{job}"),
        format!("dmsim-lw{job}"),
        format!("dmsim-l{job}"),
        format!("dmsim-b{job}"),
    ];
    let t0 = Instant::now();
    let setup = || -> Result<(PathBuf, PathBuf), ShimError> {
        let backing = device(
            ctl,
            &names[4],
            &[
                linear_target(0, m, disks.metadata, disks.slice.metadata_offset)?,
                linear_target(m, d, disks.data, disks.slice.data_offset)?,
            ],
            disks.dev_dir,
        )?;
        fill_range(&backing, 0, 0, 8)?;
        fill_range(&backing, DATA_FILL, m, d)?;
        let log = device(
            ctl,
            &names[3],
            &[linear_target(0, LOG_SLICE_SECTORS, log_disk, log_offset)?],
            disks.dev_dir,
        )?;
        fill_range(&log, 0, 0, 8)?;
        let lw_table = TargetSpec {
            start: 0,
            length: m + d,
            target_type: "log-writes".into(),
            params: format!(
                "{} {}",
                block_dev_num(&backing)?.table_name(),
                block_dev_num(&log)?.table_name()
            ),
        };
        let lw = device(ctl, &names[2], &[lw_table], disks.dev_dir)?;
        let metadata = device(ctl, &names[0], &[linear_target(0, m, &lw, 0)?], disks.dev_dir)?;
        let data = device(ctl, &names[1], &[linear_target(0, d, &lw, m)?], disks.dev_dir)?;
        Ok((metadata, data))
    };
    match setup() {
        Ok((metadata, data)) => {
            result.timings_ms.push(("fill".into(), t0.elapsed().as_millis() as u64));
            run_pool_marked(
                ctl,
                job,
                kind,
                trace,
                spec,
                &metadata,
                &data,
                disks.dev_dir,
                Some(&names[2]),
                result,
            );
        }
        Err(e) => result.error = Some(format!("the logged devices: {e}")),
    }
    for (i, name) in names.iter().enumerate() {
        if i == 2 {
            match ctl.status(name, false, false) {
                Ok(s) => {
                    result.log_status = Some(s.into_iter().map(|t| t.status).collect::<Vec<_>>().join(" ; "))
                }
                Err(_) => continue, // never created
            }
        }
        if let Err(e) = ctl.remove(name) {
            // Devices a failed setup never created are not an error.
            if !matches!(&e, ShimError::Dm { source, .. } if source.raw_os_error() == Some(libc::ENXIO)) {
                result.error = result.error.take().or(Some(format!("removing {name}: {e}")));
            }
        }
    }
    // The log and the metadata image must reach the host's files.
    for disk in [log_disk, disks.metadata] {
        if let Ok(f) = OpenOptions::new().write(true).open(disk) {
            let _ = f.sync_all();
        }
    }
}

/// A flakey job: the job's linear slices as usual (data filled with
/// [`DATA_FILL`]), each under a dm-flakey device that is never down; the
/// pool on the two flakey devices; the trace's write-error faults swap a
/// flakey device to `error_writes`.
fn run_flakey_job(
    ctl: &Control,
    job: usize,
    trace: &Trace,
    spec: PoolSpec,
    disks: &JobDisks<'_>,
    result: &mut KernelResult,
) {
    let (m, d) = (spec.metadata_sectors, spec.data_sectors());
    let names = [
        format!("dmsim-fm{job}"),
        format!("dmsim-fd{job}"),
        format!("dmsim-m{job}"),
        format!("dmsim-d{job}"),
    ];
    let t0 = Instant::now();
    let setup = || -> Result<[PathBuf; 4], ShimError> {
        let meta_lin = linear(ctl, &names[2], disks.metadata, disks.slice.metadata_offset, m, disks.dev_dir)?;
        let data_lin = linear(ctl, &names[3], disks.data, disks.slice.data_offset, d, disks.dev_dir)?;
        fill_range(&meta_lin, 0, 0, 8)?;
        fill_device(&data_lin, DATA_FILL, d)?;
        let fm = device(ctl, &names[0], &[flakey_table(&meta_lin, m, false)?], disks.dev_dir)?;
        let fd = device(ctl, &names[1], &[flakey_table(&data_lin, d, false)?], disks.dev_dir)?;
        Ok([fm, fd, meta_lin, data_lin])
    };
    match setup() {
        Ok([fm, fd, meta_lin, data_lin]) => {
            result.timings_ms.push(("fill".into(), t0.elapsed().as_millis() as u64));
            let devs: FlakeyDevices<'_> = [(&names[0], &meta_lin), (&names[1], &data_lin)];
            run_pool_with(
                ctl,
                job,
                &JobKind::Flakey,
                trace,
                spec,
                &fm,
                &fd,
                disks.dev_dir,
                None,
                Some(devs),
                result,
            );
        }
        Err(e) => result.error = Some(format!("the flakey devices: {e}")),
    }
    for name in &names {
        if let Err(e) = ctl.remove(name) {
            if !matches!(&e, ShimError::Dm { source, .. } if source.raw_os_error() == Some(libc::ENXIO)) {
                result.error = result.error.take().or(Some(format!("removing {name}: {e}")));
            }
        }
    }
    if let Ok(f) = OpenOptions::new().write(true).open(disks.metadata) {
        let _ = f.sync_all();
    }
}

/// A cache job ([`JobKind::Cache`]): dm-linear slices for the metadata,
/// the cache device and the origin (as the host wrote them), the cache
/// device over them, the trace's I/O on it (one request at a time,
/// O_DIRECT; a `tick` sleeps and reports the status line), the final
/// status line, then suspend (the kernel's clean shutdown) and removal.
/// Nothing is read but what the trace reads: every read is seen by the
/// policy (smq may promote on it).
fn run_cache_job(ctl: &Control, job: usize, trace: &Trace, disks: &JobDisks<'_>, result: &mut KernelResult) {
    let spec = match CacheSpec::from_header(&trace.header) {
        Ok(s) => s,
        Err(e) => {
            result.error = Some(e.to_string());
            return;
        }
    };
    // On controlled disks (the header's `cache_ublk`): the three devices
    // are ublk devices the agent serves, started on the host's images.
    let on_ublk = trace.header.param(CACHE_UBLK_PARAM) == Some("1");
    let names = [
        format!("dmsim-cache{job}"),
        format!("dmsim-cm{job}"),
        format!("dmsim-cc{job}"),
        format!("dmsim-co{job}"),
    ];
    let steps = match cache_steps(&trace.header) {
        Ok(s) => s,
        Err(e) => {
            result.error = Some(e.to_string());
            return;
        }
    };
    let t0 = Instant::now();
    // The cache device is the first `c_len` sectors of its disk (`c_disk`,
    // larger in a job that resizes); the origin device is its whole disk.
    let (m_len, c_len) = (spec.metadata_sectors, spec.cache_sectors());
    let (c_disk, o_disk) = (spec.cache_disk_sectors(), spec.origin_disk_sectors());
    let ublk_ctl = if on_ublk {
        match crate::ublk::UblkControl::open() {
            Ok(c) => Some(c),
            Err(e) => {
                result.error = Some(format!("ublk: {e}"));
                return;
            }
        }
    } else {
        None
    };
    let mut ublk = match ublk_ctl.as_ref().map(|u| CacheUblk::start(u, &spec, disks)).transpose() {
        Ok(u) => u,
        Err(e) => {
            result.error = Some(format!("ublk: the cache's controlled disks: {e}"));
            result.ublk.push(("left-devices".into(), crate::ublk::live_devices().len() as u64));
            return;
        }
    };
    let clock = CoarseClock::new();
    let setup = || -> Result<(CacheDevs, PathBuf, [u64; 4]), ShimError> {
        // Where the three devices lie: (device, offset) of each.
        let places: [(PathBuf, u64); 3] = if let Some(u) = &ublk {
            // Each device straight on its own controlled disk: a flush of
            // one reaches that disk alone.
            u.blocks().map(|b| (b, 0))
        } else {
            [
                (disks.metadata.to_path_buf(), disks.slice.metadata_offset),
                (disks.data.to_path_buf(), disks.slice.data_offset),
                (disks.data.to_path_buf(), disks.slice.data_offset + c_disk),
            ]
        };
        let [(meta_dev, meta_at), (cache_dev, c_at), (origin_dev, o_at)] = places;
        let m = linear(ctl, &names[1], &meta_dev, meta_at, m_len, disks.dev_dir)?;
        let c = linear(ctl, &names[2], &cache_dev, c_at, c_len, disks.dev_dir)?;
        let o = linear(ctl, &names[3], &origin_dev, o_at, o_disk, disks.dev_dir)?;
        let devs = CacheDevs {
            name: names[0].clone(),
            meta_name: names[1].clone(),
            meta_table: linear_target(0, m_len, &meta_dev, meta_at)?,
            cache_slice: names[2].clone(),
            meta_node: m.clone(),
            tables: [
                block_dev_num(&m)?.table_name(),
                block_dev_num(&c)?.table_name(),
                block_dev_num(&o)?.table_name(),
            ],
            dev_dir: disks.dev_dir.to_path_buf(),
            cache_under: (cache_dev, c_at),
            sizes: Cell::new((c_len, spec.origin_sectors())),
        };
        let (node, at) = devs.activate_stamped(ctl, &spec, &clock)?;
        Ok((devs, node, at))
    };
    match setup() {
        Ok((devs, node, at)) => {
            result.timings_ms.push(("setup".into(), t0.elapsed().as_millis() as u64));
            if trace.header.param(CACHE_SETTLE_PARAM) == Some("1") {
                result.timings_ms.push((format!("{COARSE_PREFIX}res"), CoarseClock::resolution_us()));
                if let Some(p) = clock.jiffy_phase() {
                    result.timings_ms.push((JIFFY_PHASE.to_string(), p));
                }
                for (k, v) in ["load-a", "load-b", "resume-a", "resume-b"].iter().zip(at) {
                    result.timings_ms.push((format!("{COARSE_PREFIX}{k}"), v));
                }
            }
            if let Err(e) = cache_io(ctl, &devs, node, &spec, trace, &steps, &clock, ublk.as_mut(), result) {
                result.error = Some(e.to_string());
            }
            // A file system a step mounted (a job that failed midway):
            // off the device before it goes.
            if let Err(e) = crate::agent_fs::unmount() {
                result.error = result.error.take().or(Some(format!("after the job: {e}")));
            }
            // Suspend first: the kernel's postsuspend writes the clean
            // shutdown; the removal then finds nothing more to do.
            let t2 = Instant::now();
            if let Err(e) = ctl.suspend(&names[0], 0) {
                result.error = result.error.take().or(Some(format!("suspending the cache: {e}")));
            }
            result.timings_ms.push(("teardown".into(), t2.elapsed().as_millis() as u64));
        }
        Err(e) => result.error = Some(format!("the cache devices: {e}")),
    }
    for name in &names {
        if let Err(e) = ctl.remove(name) {
            if !matches!(&e, ShimError::Dm { source, .. } if source.raw_os_error() == Some(libc::ENXIO)) {
                result.error = result.error.take().or(Some(format!("removing {name}: {e}")));
            }
        }
    }
    if let Some(u) = ublk.take() {
        // Faults that fired after the last op (the teardown's clean
        // shutdown), noted at the number of ops.
        u.note_fired(trace.ops().count(), result);
        u.finish(ctl, job, &spec, disks, result);
    }
    for disk in [disks.metadata, disks.data] {
        if let Ok(f) = OpenOptions::new().write(true).open(disk) {
            let _ = f.sync_all();
        }
    }
}

/// The three controlled disks of a cache job on ublk
/// ([`CACHE_UBLK_PARAM`]): metadata, cache device, origin, each started on
/// the image the host put in the job's slices; and the marks of their
/// durable state ([`crate::durable`]).
struct CacheUblk<'u> {
    devs: Vec<crate::ublk::UblkDevice<'u>>,
    taker: crate::durable::MarkTaker,
}

/// The roles of a cache job's disks, in order.
const CACHE_ROLES: [&str; 3] = ["metadata", "cache", "origin"];

/// Where a cache job's images lie, in [`CACHE_ROLES`] order: (disk,
/// offset, sectors).
fn cache_places<'d>(spec: &CacheSpec, disks: &JobDisks<'d>) -> [(&'d Path, u64, u64); 3] {
    let c_disk = spec.cache_disk_sectors();
    [
        (disks.metadata, disks.slice.metadata_offset, spec.metadata_sectors),
        (disks.data, disks.slice.data_offset, c_disk),
        (disks.data, disks.slice.data_offset + c_disk, spec.origin_disk_sectors()),
    ]
}

impl<'u> CacheUblk<'u> {
    /// Reads the job's images from its slices and serves each as a
    /// controlled disk. On failure the disks started so far are stopped
    /// and deleted (their drop).
    fn start(
        ctl: &'u crate::ublk::UblkControl,
        spec: &CacheSpec,
        disks: &JobDisks<'_>,
    ) -> Result<CacheUblk<'u>, ShimError> {
        use crate::ublk::{ControlledDisk, DeviceShape, UblkDevice};
        let mut images = Vec::new();
        for ((path, at, sectors), role) in cache_places(spec, disks).into_iter().zip(CACHE_ROLES) {
            if sectors * 512 > UBLK_MAX_DISK_BYTES {
                return Err(ShimError::Invalid(format!(
                    "the {role} disk of {sectors} sectors exceeds the {UBLK_MAX_DISK_BYTES} bytes kept in RAM"
                )));
            }
            let f = File::open(path).map_err(|e| ShimError::io(format!("open {}", path.display()), e))?;
            let mut image = vec![0u8; (sectors * 512) as usize];
            read_exact_at(&f, &mut image, at * 512)
                .map_err(|e| ShimError::io(format!("read the {role} image"), e))?;
            images.push(image);
        }
        let mut devs = Vec::new();
        for (image, role) in images.iter().zip(CACHE_ROLES) {
            let dev =
                UblkDevice::start(ctl, ControlledDisk::from_image(image.clone()), DeviceShape::default())
                    .map_err(|e| ShimError::Invalid(format!("starting the {role} disk: {e}")))?;
            devs.push(dev);
        }
        let images: [dmsim_faults::Image; 3] = images
            .into_iter()
            .map(dmsim_faults::Image::from)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|_| ShimError::Invalid("three images".into()))?;
        Ok(CacheUblk { devs, taker: crate::durable::MarkTaker::new(spec.run, spec.block_sectors, images) })
    }

    /// The three block devices' nodes.
    fn blocks(&self) -> [PathBuf; 3] {
        [0, 1, 2].map(|k| self.devs[k].block().to_path_buf())
    }

    /// Records the faults that fired on the three disks since the last
    /// call as notes `fired.<op> = <role> <request> …` (as
    /// [`note_fired`] does for a pool's disks).
    fn note_fired(&self, index: usize, result: &mut KernelResult) {
        for (dev, role) in self.devs.iter().zip(CACHE_ROLES) {
            for f in dev.take_fired() {
                result.notes.push((format!("fired.{index}"), format!("{role} {f}")));
            }
        }
    }

    /// The mark of the three disks' durable state now, after op `op`.
    fn mark(&mut self, op: usize) -> crate::durable::DurableMark {
        let CacheUblk { devs, taker } = self;
        let refs: Vec<&crate::ublk::UblkDevice<'_>> = devs.iter().collect();
        crate::ublk::UblkDevice::with_disks(&refs, |d| {
            taker.take(op, [d[0].durable(), d[1].durable(), d[2].durable()])
        })
    }

    /// After the cache's devices are gone: every disk stopped and deleted,
    /// the requests each served counted in the result, the ublk devices
    /// left counted, and each durable image written to the job's slice
    /// (where the host reads the metadata image and the cache's data).
    fn finish(
        self,
        ctl: &Control,
        job: usize,
        spec: &CacheSpec,
        disks: &JobDisks<'_>,
        result: &mut KernelResult,
    ) {
        let mut served = Vec::new();
        let places = cache_places(spec, disks);
        for ((dev, role), place) in self.devs.into_iter().zip(CACHE_ROLES).zip(places) {
            match dev.stop() {
                Ok(disk) => {
                    for (name, n) in disk.counts().named() {
                        result.ublk.push((format!("{role}-{name}"), n));
                    }
                    served.push((role, place, disk));
                }
                Err(e) => {
                    result.error =
                        result.error.take().or(Some(format!("ublk: stopping the {role} disk: {e}")))
                }
            }
        }
        result.ublk.push(("left-devices".into(), crate::ublk::live_devices().len() as u64));
        for (role, (path, at, len), disk) in &served {
            let name = format!("dmsim-cw{job}");
            let written = linear(ctl, &name, path, *at, *len, disks.dev_dir).and_then(|node| {
                let w = write_image(&node, disk.durable());
                let removed = ctl.remove(&name);
                w.and(removed)
            });
            if let Err(e) = written {
                result.error =
                    result.error.take().or(Some(format!("ublk: writing the {role} image out: {e}")));
            }
        }
    }
}

/// The status line of a device (joined over its targets).
fn status_line(ctl: &Control, name: &str) -> Result<String, ShimError> {
    status_line_as(ctl, name, false)
}

/// [`status_line`]; with `noflush`, without the commit a cache's status
/// otherwise makes.
fn status_line_as(ctl: &Control, name: &str, noflush: bool) -> Result<String, ShimError> {
    let s = ctl.status(name, false, noflush)?;
    Ok(s.into_iter().map(|t| t.status).collect::<Vec<_>>().join(" ; "))
}

/// A cache job's devices: the cache device's name, the metadata device's
/// (and its dm-linear table, restored after a crash), and the three
/// devices' table names.
struct CacheDevs {
    name: String,
    meta_name: String,
    meta_table: TargetSpec,
    /// The cache (fast) device's name (a dm-linear; a
    /// [`CacheStep::DropCacheWrites`] swaps in dm-flakey `drop_writes`).
    cache_slice: String,
    /// The metadata device's node.
    meta_node: PathBuf,
    tables: [String; 3],
    dev_dir: PathBuf,
    /// The disk under the cache device and where the device starts on it
    /// (a resize reloads the device's dm-linear with another length).
    cache_under: (PathBuf, u64),
    /// The sectors of the cache device and of the table's length now
    /// (a resize changes them).
    sizes: Cell<(u64, u64)>,
}

impl CacheDevs {
    /// The node of the cache device `file` has open.
    fn node_of(&self, file: &File) -> Result<PathBuf, ShimError> {
        let md = file.metadata().map_err(|e| ShimError::io("stat the cache device", e))?;
        Ok(self.dev_dir.join(format!("dm-{}", libc::minor(md.rdev()))))
    }

    /// Creates the cache device in `mode` with `policy`: its node.
    fn activate(
        &self,
        ctl: &Control,
        spec: &CacheSpec,
        mode: &str,
        policy: &str,
        migration_threshold: Option<u64>,
    ) -> Result<PathBuf, ShimError> {
        device(ctl, &self.name, &[self.table(spec, mode, policy, migration_threshold)], &self.dev_dir)
    }

    /// The cache table in `mode` with `policy`, as long as the origin
    /// the table covers now.
    fn table(
        &self,
        spec: &CacheSpec,
        mode: &str,
        policy: &str,
        migration_threshold: Option<u64>,
    ) -> TargetSpec {
        let [m, c, o] = &self.tables;
        TargetSpec {
            start: 0,
            length: self.sizes.get().1,
            target_type: "cache".into(),
            params: spec.table_params_as([m, c, o], mode, policy, migration_threshold),
        }
    }

    /// The cache device's dm-linear table, as long as it is now.
    fn cache_linear(&self) -> Result<TargetSpec, ShimError> {
        linear_target(0, self.sizes.get().0, &self.cache_under.0, self.cache_under.1)
    }

    /// The cache device's dm-flakey table that drops every write.
    fn cache_flakey(&self) -> Result<TargetSpec, ShimError> {
        let (under, at) = &self.cache_under;
        Ok(TargetSpec {
            start: 0,
            length: self.sizes.get().0,
            target_type: "flakey".into(),
            // Up 0 s, down 1 s: always down; down means drop writes.
            params: format!("{} {at} 0 1 1 drop_writes", block_dev_num(under)?.table_name()),
        })
    }

    /// [`Self::activate`] in the job's first mode with smq, with the
    /// coarse clock read around the load and the resume (see
    /// [`device_stamped`]).
    fn activate_stamped(
        &self,
        ctl: &Control,
        spec: &CacheSpec,
        clock: &CoarseClock,
    ) -> Result<(PathBuf, [u64; 4]), ShimError> {
        let [m, c, o] = &self.tables;
        let table = TargetSpec {
            start: 0,
            length: spec.origin_sectors(),
            target_type: "cache".into(),
            params: spec.table_params_as([m, c, o], &spec.mode, "smq", spec.migration_threshold),
        };
        device_stamped(ctl, &self.name, &[table], &self.dev_dir, clock)
    }
}

/// The trace's I/O on the cache device, its steps between the ops, and the
/// final status; `clock` is the job's coarse clock; with `durable` (a job
/// on controlled disks), a mark of the disks' durable state after every
/// op [`crate::durable::is_mark`] names ([`KernelResult::durable`]). With
/// [`crate::protocol::CACHE_RACE_PARAM`] (on controlled disks), the ops
/// run as its race steps say ([`cache_race`]).
#[allow(clippy::too_many_arguments)]
fn cache_io(
    ctl: &Control,
    devs: &CacheDevs,
    node: PathBuf,
    spec: &CacheSpec,
    trace: &Trace,
    steps: &[(usize, CacheStep)],
    clock: &CoarseClock,
    mut durable: Option<&mut CacheUblk<'_>>,
    result: &mut KernelResult,
) -> Result<(), ShimError> {
    let name = devs.name.as_str();
    let mut file = open_direct(&node)?;
    let ops: Vec<Op> = trace.ops().collect();
    let settle = trace.header.param(CACHE_SETTLE_PARAM) == Some("1");
    let mut cx = CacheOpContext {
        ctl,
        devs,
        spec,
        ops: &ops,
        write_numbers: crate::protocol::write_numbers(&ops),
        clock,
        t0: Instant::now(),
        settle,
        sleep_only_ticks: trace.header.param(CACHE_TICKS_SLEEP_ONLY_PARAM) == Some("1"),
        settled: Settled::default(),
        current: (spec.mode.as_str(), "smq"),
    };
    if settle {
        cx.settled.rebase(ctl, name)?;
    }
    if let Some(race) = trace.header.param(crate::protocol::CACHE_RACE_PARAM) {
        let Some(u) = durable else {
            return Err(ShimError::Invalid("a cache race needs controlled disks (cache_ublk)".into()));
        };
        if !steps.is_empty() {
            return Err(ShimError::Invalid("a cache race takes no cache steps".into()));
        }
        let race = crate::protocol::RaceStep::parse_list(race)
            .ok_or_else(|| ShimError::Invalid("the cache race's steps do not parse".into()))?;
        file = cache_race(&mut cx, &race, file, u, result)?;
    } else {
        for index in 0..=ops.len() {
            for (k, (_, step)) in steps.iter().enumerate().filter(|(_, (at, _))| *at == index) {
                let t = Instant::now();
                file = cache_step(ctl, devs, spec, (k, step), file, result).map_err(|e| {
                    ShimError::Invalid(format!("cache step {k} ({step:?}) before op {index}: {e}"))
                })?;
                result.timings_ms.push((format!("step{k}"), t.elapsed().as_millis() as u64));
            }
            if index == ops.len() {
                break;
            }
            file = cx.run_op(index, file, durable.as_deref_mut(), result)?;
        }
    }
    result.timings_ms.push(("ops".into(), cx.t0.elapsed().as_millis() as u64));
    drop(file);
    result.pool_status = status_line(ctl, name)?;
    Ok(())
}

/// What every op of a cache job needs ([`cache_io`]).
struct CacheOpContext<'a> {
    ctl: &'a Control,
    devs: &'a CacheDevs,
    spec: &'a CacheSpec,
    ops: &'a [Op],
    /// Each op's write number ([`crate::protocol::write_numbers`]).
    write_numbers: Vec<u64>,
    clock: &'a CoarseClock,
    /// When the ops began.
    t0: Instant,
    /// The job waits for the cache's background work after every op
    /// ([`CACHE_SETTLE_PARAM`]).
    settle: bool,
    /// Ticks only sleep ([`CACHE_TICKS_SLEEP_ONLY_PARAM`]).
    sleep_only_ticks: bool,
    settled: Settled,
    /// The mode and policy of the table in use (for a refused reload).
    current: (&'a str, &'a str),
}

impl CacheOpContext<'_> {
    /// The coarse clock's reading as `what`, in a settled job.
    fn stamp(&self, result: &mut KernelResult, what: String) {
        if self.settle {
            result.timings_ms.push((format!("{COARSE_PREFIX}{what}"), self.clock.now_us()));
        }
    }

    /// Runs op `index` on the cache device (`file`; returned, reopened
    /// when a resize recreated the device) and records what the kernel
    /// answered, then what follows every op: the faults that fired, the
    /// settled status, the durable mark.
    fn run_op(
        &mut self,
        index: usize,
        file: File,
        durable: Option<&mut CacheUblk<'_>>,
        result: &mut KernelResult,
    ) -> Result<File, ShimError> {
        let op = self.ops[index];
        self.stamp(result, format!("op-a-{index}"));
        let (file, outcome, read) = self.answer(index, op, file, durable.as_deref(), result)?;
        self.finish_op(index, op, OpResult { index, outcome, read }, durable, result)?;
        Ok(file)
    }

    /// What follows every op, foreground or background: its answer
    /// recorded, the faults that fired, the settled status, the durable
    /// mark.
    fn finish_op(
        &mut self,
        index: usize,
        op: Op,
        answer: OpResult,
        durable: Option<&mut CacheUblk<'_>>,
        result: &mut KernelResult,
    ) -> Result<(), ShimError> {
        let name = self.devs.name.as_str();
        op_applied();
        self.stamp(result, format!("op-b-{index}"));
        result.ops.push(answer);
        if let Some(u) = durable.as_deref() {
            u.note_fired(index, result);
        }
        if self.settle {
            if matches!(op, Op::Reload { .. } | Op::Invalidate { .. }) {
                self.settled.rebase(self.ctl, name)?;
            }
            let line = self.settled.wait(self.ctl, name)?;
            result.op_status.push((index, line));
        }
        // On controlled disks: what a power cut now would keep, after an
        // op that had to make something durable or that committed.
        if let Some(u) = durable {
            if crate::durable::is_mark(&op) {
                result.durable.push(u.mark(index));
            }
        }
        if self.sleep_only_ticks {
            // A campaign trace's replay: when each op ended, for the
            // serialized simulator's clock (`cache_replay::judge`).
            result.timings_ms.push((format!("{OP_END_PREFIX}{index}"), self.t0.elapsed().as_millis() as u64));
        }
        Ok(())
    }

    /// The kernel's answer to op `index`, and the cache device's file
    /// (`file`, or reopened: a resize may recreate the device).
    fn answer(
        &mut self,
        index: usize,
        op: Op,
        file: File,
        durable: Option<&CacheUblk<'_>>,
        result: &mut KernelResult,
    ) -> Result<(File, String, Option<String>), ShimError> {
        let (ctl, devs, spec) = (self.ctl, self.devs, self.spec);
        let (name, meta_name) = (devs.name.as_str(), devs.meta_name.as_str());
        // A resize takes the device's file (it may recreate the device)
        // and gives back the one to go on with.
        if let Op::Resize { cache_blocks, origin_blocks } = op {
            let (outcome, note, file) =
                cache_resize(ctl, devs, spec, self.current, (cache_blocks, origin_blocks), file)?;
            return Ok((file, outcome, note));
        }
        let (outcome, read) = match op {
            Op::Read { .. } | Op::Write { .. } | Op::Discard { .. } | Op::Flush { .. } => {
                cache_request(&file, spec.run, devs.sizes.get().1, op, self.write_numbers[index])
            }
            Op::Tick { millis } => {
                std::thread::sleep(Duration::from_millis(u64::from(millis)));
                if self.sleep_only_ticks {
                    ("ok".into(), None)
                } else {
                    ("ok".into(), Some(status_line(ctl, name)?))
                }
            }
            Op::Status => ("ok".into(), Some(status_line(ctl, name)?)),
            Op::Reload { mode, policy } => {
                // A table swap on the same devices: suspend (the clean
                // shutdown), load, resume; a table the constructor refuses
                // leaves the old one, resumed.
                let table = devs.table(spec, mode.name(), policy.name(), spec.migration_threshold);
                suspend_retrying(ctl, name)?;
                self.stamp(result, format!("op-load-a-{index}"));
                let loaded = ctl.load(name, &[table], false);
                self.stamp(result, format!("op-load-b-{index}"));
                self.stamp(result, format!("op-resume-a-{index}"));
                let resumed = ctl.resume(name);
                self.stamp(result, format!("op-resume-b-{index}"));
                match (loaded, resumed) {
                    (Ok(()), Ok(_)) => {
                        self.current = (mode.name(), policy.name());
                        ("ok".into(), None)
                    }
                    (Err(ShimError::Dm { source, .. }), Ok(_)) => {
                        (errno_name(source.raw_os_error().unwrap_or(0)), None)
                    }
                    (Ok(()), Err(ShimError::Dm { source, .. })) => {
                        // The constructor took the table, its preresume
                        // did not (6.1: passthrough over blocks loaded
                        // dirty): the device is suspended with it. Load
                        // the table that was active again.
                        let (mode, policy) = self.current;
                        let old = devs.table(spec, mode, policy, spec.migration_threshold);
                        ctl.load(name, &[old], false)?;
                        ctl.resume(name)?;
                        (errno_name(source.raw_os_error().unwrap_or(0)), None)
                    }
                    (Err(e), _) | (_, Err(e)) => return Err(e),
                }
            }
            Op::Invalidate { cblock, nr } => {
                let blocks = devs.sizes.get().0 / spec.block_sectors;
                let begin = u64::from(cblock) % blocks;
                let end = (begin + u64::from(nr.max(1))).min(blocks);
                match ctl.message(name, 0, &format!("invalidate_cblocks {begin}-{end}")) {
                    Ok(_) => ("ok".into(), None),
                    Err(ShimError::Dm { source, .. }) => {
                        (errno_name(source.raw_os_error().unwrap_or(0)), None)
                    }
                    Err(e) => return Err(e),
                }
            }
            Op::Worker => {
                // A suspend (the target's clean shutdown) and a resume of
                // the same table.
                ctl.suspend(name, 0)?;
                ctl.resume(name)?;
                ("ok".into(), None)
            }
            Op::Fault { disk, fault } => {
                // On controlled disks: armed on the disk it names, as the
                // simulator arms its `SimDisk` (the disk's next request of
                // the fault's kind). Elsewhere there is nothing to arm.
                let role = match disk {
                    dmsim_traces::DiskId::Metadata => Some(0),
                    dmsim_traces::DiskId::Cache => Some(1),
                    dmsim_traces::DiskId::Origin => Some(2),
                    dmsim_traces::DiskId::Data => None,
                };
                match (durable, role) {
                    (Some(u), Some(k)) => {
                        u.devs[k].arm(crate::ublk_faults::Arm::Next(fault));
                        ("ok".into(), None)
                    }
                    _ => ("unsupported".into(), None),
                }
            }
            Op::Crash { .. } => {
                // The metadata device fails every I/O from now on: its
                // content stays what the kernel had written (bufio's
                // unwritten buffers are lost), as after a power cut.
                use crate::dm::flags::{NOFLUSH, SKIP_LOCKFS};
                let error = TargetSpec {
                    start: 0,
                    length: spec.metadata_sectors,
                    target_type: "error".into(),
                    params: String::new(),
                };
                ctl.suspend(meta_name, NOFLUSH | SKIP_LOCKFS)?;
                let loaded = ctl.load(meta_name, &[error], false);
                ctl.resume(meta_name)?;
                loaded?;
                ("ok".into(), None)
            }
            _ => ("unsupported".into(), None),
        };
        Ok((file, outcome, read))
    }
}

/// A cache request (a read, write, discard or flush) on the cache device
/// (`file`, `size` sectors long now: sectors wrap around as the
/// simulator's do), O_DIRECT; `write` is a write's number (its stamp).
/// The outcome and a read's summary.
fn cache_request(file: &File, run: u64, size: u64, op: Op, write: u64) -> (String, Option<String>) {
    let clamp = |sector: u32, nr: u64| {
        let sector = u64::from(sector) % size;
        (sector, nr.max(1).min(size - sector))
    };
    match op {
        Op::Read { sector, nr_sectors, .. } => {
            let (sector, nr) = clamp(sector, u64::from(nr_sectors));
            let mut buf = AlignedBuf::zeroed((nr * 512) as usize);
            match read_exact_at(file, buf.as_mut_slice(), sector * 512) {
                Ok(()) => ("ok".to_string(), Some(summarize(buf.as_slice(), run, sector))),
                Err(e) => (errno_of(&e), None),
            }
        }
        Op::Write { sector, nr_sectors, fua, preflush, .. } => {
            let (sector, nr) = clamp(sector, u64::from(nr_sectors));
            let mut buf = AlignedBuf::zeroed((nr * 512) as usize);
            dmsim_traces::stamp::fill(buf.as_mut_slice(), run, write, 0, sector);
            let synced = if preflush { file.sync_all().map_err(|e| errno_of(&e)) } else { Ok(()) };
            let iov = libc::iovec { iov_base: buf.ptr.cast(), iov_len: buf.len };
            let rwf = if fua { libc::RWF_DSYNC } else { 0 };
            let outcome = match synced {
                Err(e) => e,
                Ok(()) => {
                    // SAFETY: one valid iovec over an owned, aligned buffer.
                    let r = unsafe { libc::pwritev2(file.as_raw_fd(), &iov, 1, (sector * 512) as i64, rwf) };
                    if r < 0 {
                        errno_of(&std::io::Error::last_os_error())
                    } else if r as usize != buf.len {
                        format!("short-write {r}")
                    } else {
                        "ok".into()
                    }
                }
            };
            (outcome, None)
        }
        Op::Discard { sector, nr_sectors, .. } => {
            let (sector, nr) = clamp(sector, u64::from(nr_sectors));
            let range: [u64; 2] = [sector * 512, nr * 512];
            // SAFETY: BLKDISCARD reads two u64s from the pointer.
            let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKDISCARD as _, range.as_ptr()) };
            let outcome = if r < 0 { errno_of(&std::io::Error::last_os_error()) } else { "ok".to_string() };
            (outcome, None)
        }
        Op::Flush { .. } => match file.sync_all() {
            Ok(()) => ("ok".into(), None),
            Err(e) => (errno_of(&e), None),
        },
        _ => ("unsupported".into(), None),
    }
}

/// A cache job's race ([`crate::protocol::CACHE_RACE_PARAM`]): the ops as
/// `steps` say, on the controlled disks `u`. A foreground op is run as in
/// a settled job ([`CacheOpContext::run_op`]); a background one (a read,
/// write, discard or flush) on a thread of its own, its answer recorded
/// when it is waited for. Whatever happens, the gates are opened and
/// every background op waited for before the job goes on.
fn cache_race(
    cx: &mut CacheOpContext<'_>,
    steps: &[crate::protocol::RaceStep],
    file: File,
    u: &mut CacheUblk<'_>,
    result: &mut KernelResult,
) -> Result<File, ShimError> {
    // Taken by a foreground op while it runs, given back after it (a
    // failed op ends the race).
    let mut file = Some(file);
    use crate::protocol::{RaceDisk, RaceStep};
    type Background = Vec<(usize, std::thread::JoinHandle<(String, Option<String>)>)>;
    let mut background: Background = Vec::new();
    // Waits for the background ops `which` picks (all: `None`).
    let join = |cx: &mut CacheOpContext<'_>,
                u: &mut CacheUblk<'_>,
                background: &mut Background,
                which: Option<usize>,
                result: &mut KernelResult|
     -> Result<(), ShimError> {
        let (now, later): (Background, Background) =
            std::mem::take(background).into_iter().partition(|(i, _)| which.is_none_or(|w| w == *i));
        *background = later;
        for (i, h) in now {
            let (outcome, read) =
                h.join().map_err(|_| ShimError::Invalid(format!("op {i}: its thread panicked")))?;
            cx.finish_op(i, cx.ops[i], OpResult { index: i, outcome, read }, Some(u), result)?;
        }
        Ok(())
    };
    let role = |disk: RaceDisk| match disk {
        RaceDisk::Metadata => Ok(0),
        RaceDisk::Cache => Ok(1),
        RaceDisk::Origin => Ok(2),
        RaceDisk::Data => Err("a cache has no data disk (its disks: metadata:, cache:, origin:)".to_string()),
    };
    let mut outcome: Result<(), String> = Ok(());
    for (k, &step) in steps.iter().enumerate() {
        let op_of = |i: usize| {
            cx.ops
                .get(i)
                .copied()
                .ok_or_else(|| format!("step {k} ({}): the job has {} ops", step.to_text(), cx.ops.len()))
        };
        let done: Result<(), String> = match step {
            RaceStep::Op(i) => match op_of(i) {
                Err(e) => Err(e),
                Ok(_) => match file.take().map(|f| cx.run_op(i, f, Some(&mut *u), result)) {
                    None => Err("the cache device's file is gone".into()),
                    Some(Ok(f)) => {
                        file = Some(f);
                        Ok(())
                    }
                    Some(Err(e)) => {
                        outcome = Err(format!("race step {k} (op {i}): {e}"));
                        break;
                    }
                },
            },
            RaceStep::Background(i) => op_of(i).and_then(|op| {
                if !matches!(op, Op::Read { .. } | Op::Write { .. } | Op::Discard { .. } | Op::Flush { .. }) {
                    return Err(format!(
                        "op {i}: only a read, write, discard or flush runs in the background"
                    ));
                }
                if ops_on_console() {
                    log(&format!("op {i} (in the background): {}", dmsim_traces::text::op_to_line(&op)));
                }
                cx.stamp(result, format!("op-a-{i}"));
                let (run, size, write) = (cx.spec.run, cx.devs.sizes.get().1, cx.write_numbers[i]);
                file.as_ref()
                    .ok_or_else(|| "the cache device's file is gone".to_string())
                    .and_then(|f| {
                        f.try_clone().map_err(|e| format!("op {i}: dup the cache device's descriptor: {e}"))
                    })
                    .and_then(|f| {
                        std::thread::Builder::new()
                            .name(format!("op{i}"))
                            .spawn(move || cache_request(&f, run, size, op, write))
                            .map(|h| background.push((i, h)))
                            .map_err(|e| format!("op {i}: spawn its thread: {e}"))
                    })
            }),
            RaceStep::Hold { disk, reads, writes, flushes } => role(disk).map(|r| {
                u.devs[r].gate(crate::ublk::GateKinds { reads, writes, flushes });
            }),
            RaceStep::Held { disk, n } => role(disk).and_then(|r| wait_held(&u.devs[r], disk, k, n)),
            RaceStep::Serve { disk, k: j } => role(disk).and_then(|r| serve_held(&u.devs[r], disk, k, j)),
            RaceStep::Release => {
                for d in &u.devs {
                    d.gate(crate::ublk::GateKinds::default());
                }
                Ok(())
            }
            RaceStep::Wait(i) => {
                if background.iter().any(|(b, _)| *b == i) {
                    join(cx, u, &mut background, Some(i), result).map_err(|e| e.to_string())
                } else {
                    Err(format!("op {i} is not running in the background"))
                }
            }
            RaceStep::Pause(ms) => {
                std::thread::sleep(Duration::from_millis(ms));
                Ok(())
            }
            RaceStep::Join => join(cx, u, &mut background, None, result).map_err(|e| e.to_string()),
        };
        if let Err(e) = done {
            outcome = Err(format!("race step {k} ({}): {e}", step.to_text()));
            break;
        }
    }
    for d in &u.devs {
        d.gate(crate::ublk::GateKinds::default());
    }
    let joined = join(cx, u, &mut background, None, result);
    result.ops.sort_by_key(|r| r.index);
    outcome.map_err(ShimError::Invalid)?;
    joined?;
    file.ok_or_else(|| ShimError::Invalid("the cache device's file is gone".into()))
}

/// Waiting for a cache's background work to settle between ops (see
/// [`CACHE_SETTLE_PARAM`]).
#[derive(Debug, Default)]
struct Settled {
    /// Residency less promotions plus demotions when nothing was pending
    /// (after the table's load, or an invalidation).
    base: i64,
}

impl Settled {
    /// The status line's residency less its promotions plus demotions.
    fn balance(line: &str) -> Result<i64, ShimError> {
        let num = |i: usize| -> Result<i64, ShimError> {
            let f = cache_status_field(line, i);
            f.and_then(|f| f.parse().ok())
                .ok_or_else(|| ShimError::Invalid(format!("cache status {line:?}: field {i} is {f:?}")))
        };
        Ok(num(3)? - num(9)? + num(8)?)
    }

    fn poll(ctl: &Control, name: &str) -> Result<String, ShimError> {
        status_line_as(ctl, name, true)
    }

    /// Takes the balance after a table load or an invalidation (nothing
    /// is pending then: a new table starts with no background work).
    fn rebase(&mut self, ctl: &Control, name: &str) -> Result<(), ShimError> {
        self.base = Self::balance(&Self::poll(ctl, name)?)?;
        Ok(())
    }

    /// Polls the status (without a commit) until every queued promotion
    /// has completed and the line is the same three polls running; at
    /// most two seconds (then the last line, as it was).
    fn wait(&mut self, ctl: &Control, name: &str) -> Result<String, ShimError> {
        let start = Instant::now();
        let mut last = String::new();
        let mut same = 0;
        loop {
            let line = Self::poll(ctl, name)?;
            if line == last && Self::balance(&line)? == self.base {
                same += 1;
                if same >= 3 {
                    return Ok(line);
                }
            } else {
                same = 0;
            }
            if start.elapsed() > Duration::from_secs(2) {
                return Ok(line);
            }
            last = line;
            std::thread::sleep(Duration::from_millis(3));
        }
    }
}

/// A `resize` op: the cache suspended (its clean shutdown), its cache
/// device's dm-linear reloaded with the new length, the table in use loaded
/// with the new origin length, resumed; sizes clamped as the simulator
/// clamps them, and within the job's disks. Its outcome: `ok`, or the
/// errno of the refusal. A table the constructor refuses leaves the old
/// one, on the old cache device. A preresume that refuses (6.1: EINVAL
/// for a dirty cache block dropped, which also sets NEEDS_CHECK; EFBIG
/// for a dirty block past the origin's end) leaves the device suspended
/// with the new table: the old sizes and table are loaded again — after a
/// repair if NEEDS_CHECK refuses every table (the device removed, the flag
/// cleared in the metadata as `cache_check --clear-needs-check-flag` does,
/// the device created again; the op's note then says why). Returns the
/// cache device's file, reopened if the device was recreated.
fn cache_resize(
    ctl: &Control,
    devs: &CacheDevs,
    spec: &CacheSpec,
    (mode, policy): (&str, &str),
    (cache_blocks, origin_blocks): (u32, u32),
    file: File,
) -> Result<(String, Option<String>, File), ShimError> {
    let bs = spec.block_sectors;
    let max = dmsim_sim::run::MAX_DISK_SECTORS / bs;
    let sectors = |blocks: u32| u64::from(blocks).clamp(1, max) * bs;
    let new = (sectors(cache_blocks), sectors(origin_blocks));
    if new.0 > spec.cache_disk_sectors() || new.1 > spec.origin_disk_sectors() {
        return Err(ShimError::Invalid(format!(
            "resize to {} cache and {} origin sectors: the job's disks hold {} and {}",
            new.0,
            new.1,
            spec.cache_disk_sectors(),
            spec.origin_disk_sectors()
        )));
    }
    let name = devs.name.as_str();
    let old = devs.sizes.get();
    let errno = |e: ShimError| match e {
        ShimError::Dm { source, .. } => Ok(errno_name(source.raw_os_error().unwrap_or(0))),
        e => Err(e),
    };
    suspend_retrying(ctl, name)?;
    devs.sizes.set(new);
    swap_flakey(ctl, &devs.cache_slice, devs.cache_linear()?)?;
    if let Err(e) = ctl.load(name, &[devs.table(spec, mode, policy, spec.migration_threshold)], false) {
        devs.sizes.set(old);
        swap_flakey(ctl, &devs.cache_slice, devs.cache_linear()?)?;
        ctl.resume(name)?;
        return Ok((errno(e)?, None, file));
    }
    let refused = match ctl.resume(name) {
        Ok(_) => return Ok(("ok".into(), None, file)),
        Err(e) => errno(e)?,
    };
    devs.sizes.set(old);
    swap_flakey(ctl, &devs.cache_slice, devs.cache_linear()?)?;
    let table = devs.table(spec, mode, policy, spec.migration_threshold);
    match ctl.load(name, std::slice::from_ref(&table), false) {
        Ok(()) => {
            ctl.resume(name)?;
            Ok((refused, None, file))
        }
        Err(e @ ShimError::Dm { .. }) => {
            let note = format!("the old table refused too ({}): metadata repaired", errno(e)?);
            drop(file);
            ctl.remove(name)?;
            clear_needs_check(&devs.meta_node, spec)?;
            let node = device(ctl, name, &[table], &devs.dev_dir)?;
            Ok((refused, Some(note), open_direct(&node)?))
        }
        Err(e) => Err(e),
    }
}

/// Clears NEEDS_CHECK in the cache metadata on `path` with the model (what
/// `cache_check --clear-needs-check-flag` does; the VM has no
/// thin-provisioning-tools), in a new commit.
fn clear_needs_check(path: &Path, spec: &CacheSpec) -> Result<(), ShimError> {
    use dmsim_model::block_device::MemDevice;
    use dmsim_model::cache::CacheMetadata;
    use std::os::unix::fs::FileExt;
    let len = (spec.metadata_sectors * 512) as usize;
    let f = open_direct(path)?;
    let mut buf = AlignedBuf::zeroed(len);
    read_exact_at(&f, buf.as_mut_slice(), 0).map_err(|e| ShimError::io("read the cache metadata", e))?;
    let version = if spec.metadata2 { 2 } else { 1 };
    let opts = dmsim_model::cache::OpenOptions::new(spec.block_sectors as u32, version);
    let mut md = CacheMetadata::open(MemDevice::from_bytes(buf.as_slice().to_vec()), opts)
        .map_err(|e| ShimError::Invalid(format!("the cache metadata does not open: {e}")))?;
    md.clear_needs_check();
    md.commit(false).map_err(|e| ShimError::Invalid(format!("clearing NEEDS_CHECK: {e}")))?;
    let bytes = md.close().into_bytes();
    buf.as_mut_slice().copy_from_slice(&bytes[..len]);
    f.write_all_at(buf.as_slice(), 0).map_err(|e| ShimError::io("write the cache metadata", e))?;
    f.sync_all().map_err(|e| ShimError::io("sync the cache metadata", e))
}

/// Suspends the cache device for a table swap. The kernel sometimes
/// answers EBUSY for a while after a previous swap (seen on 6.1 with
/// dm-cache); the suspend is retried for up to two seconds.
fn suspend_retrying(ctl: &Control, name: &str) -> Result<(), ShimError> {
    use crate::dm::flags::SKIP_LOCKFS;
    let mut tries = 0;
    loop {
        match ctl.suspend(name, SKIP_LOCKFS) {
            Err(ShimError::Dm { source, .. }) if source.raw_os_error() == Some(libc::EBUSY) && tries < 40 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            r => return r.map(|_| ()),
        }
    }
}

/// One step of a cache job (see [`CacheStep`]), the job's `k`th; takes
/// the cache device's open file and returns it, reopened if the device was
/// recreated. A file write's observations go to `result`'s notes.
fn cache_step(
    ctl: &Control,
    devs: &CacheDevs,
    spec: &CacheSpec,
    (k, step): (usize, &CacheStep),
    file: File,
    result: &mut KernelResult,
) -> Result<File, ShimError> {
    match step {
        CacheStep::MountExt4(options) => {
            crate::agent_fs::mount_ext4(&devs.node_of(&file)?, options)?;
            Ok(file)
        }
        CacheStep::FileWrite(w) => {
            let node = devs.node_of(&file)?;
            let observe = |when: &str, notes: &mut Vec<(String, String)>| -> Result<(), ShimError> {
                notes.push((format!("status-{when}"), status_line_as(ctl, &devs.name, true)?));
                notes.push((format!("cache-stat-{when}"), crate::agent_fs::stat_line(&node)?));
                notes.push((format!("meta-stat-{when}"), crate::agent_fs::stat_line(&devs.meta_node)?));
                Ok(())
            };
            let notes = crate::agent_fs::file_write(w, spec.run, observe)?;
            result.notes.extend(notes.into_iter().map(|(key, text)| (format!("step{k}.{key}"), text)));
            Ok(file)
        }
        CacheStep::CutAndUnmount => {
            let error = TargetSpec {
                start: 0,
                length: devs.sizes.get().1,
                target_type: "error".into(),
                params: String::new(),
            };
            swap_flakey(ctl, &devs.name, error)?;
            crate::agent_fs::unmount()?;
            Ok(file)
        }
        CacheStep::Message(text) => {
            ctl.message(&devs.name, 0, text)?;
            Ok(file)
        }
        CacheStep::DropCacheWrites => {
            swap_flakey(ctl, &devs.cache_slice, devs.cache_flakey()?)?;
            Ok(file)
        }
        CacheStep::Reactivate { mode, policy, migration_threshold } => {
            drop(file);
            // The old table goes: its postsuspend's clean shutdown fails
            // on a crashed metadata device, and nothing it held in core
            // reaches the disk.
            ctl.suspend(&devs.name, 0)?;
            ctl.remove(&devs.name)?;
            ctl.suspend(&devs.meta_name, 0)?;
            let loaded = ctl.load(&devs.meta_name, std::slice::from_ref(&devs.meta_table), false);
            ctl.resume(&devs.meta_name)?;
            loaded?;
            // The cache device as it was (a drop_cache_writes step swapped
            // it to dm-flakey; otherwise this reloads the same table).
            swap_flakey(ctl, &devs.cache_slice, devs.cache_linear()?)?;
            let node = devs.activate(ctl, spec, mode, policy, *migration_threshold)?;
            open_direct(&node)
        }
    }
}

/// Milliseconds since the kernel started (`/proc/uptime`).
fn uptime_ms() -> u64 {
    let s = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
    let secs: f64 = s.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
    (secs * 1000.0) as u64
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string()
}

fn read_request(path: &Path) -> Result<(Vec<(JobKind, Trace)>, usize), ShimError> {
    let mut f = File::open(path).map_err(|e| ShimError::io(format!("open {}", path.display()), e))?;
    let mut head = [0u8; 16];
    f.read_exact(&mut head).map_err(|e| ShimError::io("read the request header", e))?;
    let len = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
    let size = f.seek(SeekFrom::End(0)).map_err(|e| ShimError::io("size of the request disk", e))?;
    if len > size.saturating_sub(16) {
        return Err(ShimError::Invalid(format!("request of {len} bytes on a disk of {size}")));
    }
    f.seek(SeekFrom::Start(0)).map_err(|e| ShimError::io("seek", e))?;
    let mut all = vec![0u8; 16 + len as usize];
    f.read_exact(&mut all).map_err(|e| ShimError::io("read the request", e))?;
    decode_request_concurrent(read_frame(REQUEST_MAGIC, &all)?)
}

fn write_result(path: &Path, results: &[KernelResult]) -> Result<(), ShimError> {
    let text: String = results.iter().map(KernelResult::to_text).collect();
    let frame = write_frame(RESULT_MAGIC, text.as_bytes());
    let mut f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| ShimError::io(format!("open {}", path.display()), e))?;
    let size = f.seek(SeekFrom::End(0)).map_err(|e| ShimError::io("size of the result disk", e))?;
    if frame.len() as u64 > size {
        return Err(ShimError::Invalid(format!(
            "result of {} bytes does not fit the result disk ({size})",
            frame.len()
        )));
    }
    f.seek(SeekFrom::Start(0)).map_err(|e| ShimError::io("seek", e))?;
    f.write_all(&frame).map_err(|e| ShimError::io("write the result", e))?;
    f.sync_all().map_err(|e| ShimError::io("flush the result disk", e))
}

fn power_off() -> ! {
    // SAFETY: plain syscalls; PID 1 may reboot.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
        // With -no-reboot, a restart also ends qemu.
        libc::reboot(libc::RB_AUTOBOOT);
    }
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The agent as `/init`: never returns (the VM powers off). Progress and
/// errors go to the console as `dmsim-agent:` lines.
pub fn init_main() -> ! {
    let t0 = Instant::now();
    // The host's boot watchdog waits for this line (vm::AGENT_STARTED).
    log("started");
    for (s, t, f) in [("devtmpfs", "/dev", "devtmpfs"), ("proc", "/proc", "proc"), ("sysfs", "/sys", "sysfs")]
    {
        if let Err(e) = mount(s, t, f) {
            log(&format!("{e}"));
        }
    }
    let boot_ms = uptime_ms();
    log(&format!("kernel up for {boot_ms} ms"));
    for f in load_modules() {
        log(&format!("module: {f}"));
    }
    let modules_ms = t0.elapsed().as_millis() as u64;
    log(&format!("modules loaded after {modules_ms} ms"));
    let disks = match find_disks(Duration::from_secs(20)) {
        Ok(d) => d,
        Err(e) => {
            log(&format!("FAILED: {e}"));
            power_off();
        }
    };
    let result_disk = match disk(&disks, DiskRole::Result) {
        Ok(p) => p.to_path_buf(),
        Err(e) => {
            log(&format!("FAILED: {e}"));
            power_off();
        }
    };
    let mut results = match run(&disks) {
        Ok(r) => r,
        Err(e) => vec![KernelResult { error: Some(e.to_string()), ..KernelResult::default() }],
    };
    let release = kernel_release();
    let agent_ms = t0.elapsed().as_millis() as u64;
    for (i, result) in results.iter_mut().enumerate() {
        result.kernel_release = release.clone();
        result.timings_ms.insert(0, ("modules".into(), modules_ms));
        result.timings_ms.insert(0, ("boot".into(), boot_ms));
        result.timings_ms.push(("agent".into(), agent_ms));
        if let Some(e) = &result.error {
            log(&format!("job {i}: error: {e}"));
        }
    }
    match write_result(&result_disk, &results) {
        Ok(()) => log("result written"),
        Err(e) => log(&format!("FAILED to write the result: {e}")),
    }
    power_off();
}

fn run(disks: &[(DiskRole, PathBuf)]) -> Result<Vec<KernelResult>, ShimError> {
    let (jobs, concurrent) = read_request(disk(disks, DiskRole::Request)?)?;
    log(&format!("request: {} jobs, up to {concurrent} at a time", jobs.len()));
    let ctl_path = Path::new("/dev/mapper/control");
    wait_for(ctl_path)?;
    let ctl = Control::open(ctl_path)?;
    let metadata = disk(disks, DiskRole::Metadata)?;
    let data = disk(disks, DiskRole::Data)?;
    let specs: Vec<(PoolSpec, bool)> = jobs
        .iter()
        .map(|(kind, trace)| PoolSpec::of_trace(trace).map(|s| (s, kind.is_fresh())))
        .collect::<Result<_, _>>()?;
    let layout = Layout::of(&specs.iter().map(|(s, f)| (s, *f)).collect::<Vec<_>>());
    let kinds: Vec<JobKind> = jobs.iter().map(|(k, _)| k.clone()).collect();
    let (logs, _) = log_offsets(&kinds);
    let log_disk = disk(disks, DiskRole::Log)?;
    start_heartbeat();
    let run_one = |i: usize, kernel_before: Option<&KernelResult>| {
        let (kind, trace) = &jobs[i];
        log(&format!("job {i} of {}: {} ops", jobs.len(), trace.ops().count()));
        let log = logs[i].map(|at| (log_disk, at));
        let job_disks = JobDisks { metadata, data, slice: layout.slices[i], dev_dir: Path::new("/dev"), log };
        run_job(&ctl, i, kind, trace, &job_disks, kernel_before)
    };
    // The kernel's run of the same trace just before, if that is what the
    // job before was: such a job runs right after it, in the same chain.
    let follows_before = |i: usize| i > 0 && jobs[i - 1].0 == JobKind::Ublk && jobs[i - 1].1 == jobs[i].1;
    // One at a time is one thread taking the chains in order.
    let chains = chains_of(jobs.len(), follows_before);
    let costs: Vec<u64> =
        specs.iter().zip(&jobs).map(|((spec, _), (kind, _))| memory_cost(kind, spec)).collect();
    // dm-thin-pool's no_space_timeout is one module parameter for every
    // pool, set by each job as it starts: jobs that want different values
    // do not run side by side.
    let classes: Vec<u64> = specs.iter().map(|(spec, _)| spec.no_space_timeout_ns).collect();
    let budget = memory_budget();
    log(&format!("{} chains, {} MiB for the jobs' disks in memory", chains.len(), budget >> 20));
    let limits = Limits { concurrent, costs: &costs, budget, classes: &classes };
    Ok(run_side_by_side(&chains, &limits, run_one))
}

/// What bounds the jobs running side by side.
struct Limits<'a> {
    /// Jobs at a time.
    concurrent: usize,
    /// Each job's memory, in bytes ([`memory_cost`]).
    costs: &'a [u64],
    /// The memory the running jobs may take together (one job alone
    /// may take more).
    budget: u64,
    /// Each job's class: only jobs of one class run side by side.
    classes: &'a [u64],
}

/// The jobs `0..n` as chains of consecutive jobs, a job in the same chain
/// as the one before when `follows_before` says it reads its result.
fn chains_of(n: usize, follows_before: impl Fn(usize) -> bool) -> Vec<Vec<usize>> {
    let mut chains: Vec<Vec<usize>> = Vec::new();
    for i in 0..n {
        match chains.last_mut() {
            Some(chain) if follows_before(i) => chain.push(i),
            _ => chains.push(vec![i]),
        }
    }
    chains
}

/// The guest memory a job's disks take while it runs, in bytes: a ublk
/// job serves its disks from memory (the disk and its durable copy); a
/// job on virtio disks needs little beyond the page cache.
fn memory_cost(kind: &JobKind, spec: &PoolSpec) -> u64 {
    let disks = (spec.metadata_disk_sectors + spec.data_sectors()).saturating_mul(512);
    match kind {
        JobKind::Ublk | JobKind::Race { .. } | JobKind::Engine(_) => disks.saturating_mul(3),
        _ => disks / 8 + (16 << 20),
    }
}

/// Half the guest's available memory: what concurrent jobs' disks may
/// take together.
fn memory_budget() -> u64 {
    let available_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    });
    available_kib.unwrap_or(512 << 10).saturating_mul(1024) / 2
}

/// Runs the `chains` (job indices; the jobs of a chain in turn, each
/// given the result of the one before) on up to `limits.concurrent`
/// threads, a job starting only when its cost fits in the budget beside
/// the jobs running and they are of its class (or when it runs alone);
/// the results by job index.
fn run_side_by_side<R: Send>(
    chains: &[Vec<usize>],
    limits: &Limits<'_>,
    run: impl Fn(usize, Option<&R>) -> R + Sync,
) -> Vec<R> {
    use std::sync::{Condvar, Mutex};
    let (costs, budget) = (limits.costs, limits.budget);
    let n = chains.iter().map(Vec::len).sum::<usize>();
    let next_chain = Mutex::new(0usize);
    // (bytes taken, jobs running, their class).
    let taken = (Mutex::new((0u64, 0usize, 0u64)), Condvar::new());
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..n).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..limits.concurrent.min(chains.len()) {
            scope.spawn(|| loop {
                let chain = {
                    let mut next = next_chain.lock().unwrap_or_else(|e| e.into_inner());
                    let Some(chain) = chains.get(*next) else { return };
                    *next += 1;
                    chain
                };
                let mut done: Vec<(usize, R)> = Vec::with_capacity(chain.len());
                for &i in chain {
                    let cost = costs.get(i).copied().unwrap_or(0);
                    let class = limits.classes.get(i).copied().unwrap_or(0);
                    {
                        let (m, cv) = &taken;
                        let mut t = m.lock().unwrap_or_else(|e| e.into_inner());
                        while t.1 > 0 && (t.0.saturating_add(cost) > budget || t.2 != class) {
                            t = cv.wait(t).unwrap_or_else(|e| e.into_inner());
                        }
                        t.0 = t.0.saturating_add(cost);
                        t.1 += 1;
                        t.2 = class;
                    }
                    let r = run(i, done.last().map(|(_, r)| r));
                    {
                        let (m, cv) = &taken;
                        let mut t = m.lock().unwrap_or_else(|e| e.into_inner());
                        t.0 = t.0.saturating_sub(cost);
                        t.1 -= 1;
                        cv.notify_all();
                    }
                    done.push((i, r));
                }
                let mut all = results.lock().unwrap_or_else(|e| e.into_inner());
                for (i, r) in done {
                    all[i] = Some(r);
                }
            });
        }
    });
    results.into_inner().unwrap_or_else(|e| e.into_inner()).into_iter().flatten().collect()
}

/// Whether this process runs as the VM's init (PID 1).
pub fn is_init() -> bool {
    std::process::id() == 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::sync::Mutex;

    #[test]
    fn a_job_reading_the_one_before_shares_its_chain() {
        let follows = [false, true, true, false, false, true];
        assert_eq!(chains_of(6, |i| follows[i]), vec![vec![0, 1, 2], vec![3], vec![4, 5]]);
        assert_eq!(chains_of(0, |_| true), Vec::<Vec<usize>>::new());
    }

    /// Up to `concurrent` jobs at a time and never more memory than the
    /// budget (unless alone), every result at its job's index, a chain's
    /// jobs in turn, each given the result of the one before.
    #[test]
    fn jobs_side_by_side_keep_their_order_limits_and_chains() {
        let chains = vec![vec![0], vec![1, 2, 3], vec![4], vec![5], vec![6, 7], vec![8], vec![9]];
        let costs = [30, 10, 10, 10, 50, 120, 20, 20, 40, 10];
        // Job 8 is of another class: it runs alone.
        let classes = [1, 1, 1, 1, 1, 1, 1, 1, 2, 1];
        let (running, most) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let (bytes, most_bytes) = (AtomicU64::new(0), AtomicU64::new(0));
        let running_classes = Mutex::new(Vec::new());
        let mixed = AtomicUsize::new(0);
        let order = Mutex::new(Vec::new());
        let limits = Limits { concurrent: 3, costs: &costs, budget: 100, classes: &classes };
        let results = run_side_by_side(&chains, &limits, |i, before: Option<&(usize, usize)>| {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            let b = bytes.fetch_add(costs[i], Ordering::SeqCst) + costs[i];
            if now > 1 {
                most_bytes.fetch_max(b, Ordering::SeqCst);
            }
            {
                let mut rc = running_classes.lock().unwrap();
                rc.push(classes[i]);
                if rc.iter().any(|&c| c != classes[i]) {
                    mixed.fetch_add(1, Ordering::SeqCst);
                }
            }
            order.lock().unwrap().push(i);
            std::thread::sleep(Duration::from_millis(5 + (i as u64 * 7) % 11));
            {
                let mut rc = running_classes.lock().unwrap();
                let at = rc.iter().position(|&c| c == classes[i]).unwrap();
                rc.remove(at);
            }
            bytes.fetch_sub(costs[i], Ordering::SeqCst);
            running.fetch_sub(1, Ordering::SeqCst);
            (i, before.map_or(usize::MAX, |b| b.0))
        });
        assert_eq!(mixed.load(Ordering::SeqCst), 0, "jobs of two classes ran side by side");
        assert_eq!(results.len(), 10);
        for (i, r) in results.iter().enumerate() {
            assert_eq!(r.0, i, "result {i} in its place");
        }
        // Chained jobs got the result of the one before; others none.
        let before: Vec<usize> = results.iter().map(|r| r.1).collect();
        let none = usize::MAX;
        assert_eq!(before, vec![none, none, 1, 2, none, none, none, 6, none, none]);
        assert!(most.load(Ordering::SeqCst) <= 3, "at most 3 at a time");
        assert!(most.load(Ordering::SeqCst) >= 2, "some ran side by side");
        assert!(most_bytes.load(Ordering::SeqCst) <= 100, "within the memory budget when not alone");
        let order = order.into_inner().unwrap();
        let at = |j: usize| order.iter().position(|&x| x == j).unwrap();
        assert!(at(1) < at(2) && at(2) < at(3) && at(6) < at(7), "a chain in turn: {order:?}");
    }
}
