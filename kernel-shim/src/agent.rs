//! The replay agent: runs as `/init` (PID 1) of the initramfs in the VM.
//!
//! 1. Mounts devtmpfs, proc and sysfs; loads the kernel modules listed in
//!    [`MODULE_LIST`] (in dependency order, with `finit_module`).
//! 2. Finds its disks by their virtio serial numbers ([`DiskRole`]).
//! 3. Reads the request (a trace in the text encoding) from the request
//!    disk and replays it ([`Replayer`]): a thin-pool over the metadata
//!    and data disks, built from the trace header; `create_thin`,
//!    `create_snap` and `delete` messages; every read, write, discard and
//!    flush as one request run to completion before the next (O_DIRECT
//!    `pread`/`pwritev2`, FUA as `RWF_DSYNC`, PREFLUSH as an `fsync`
//!    before the write, flush as `fsync`, discard as `BLKDISCARD`).
//! 4. Reads every live device back, block by block, as stamp summaries,
//!    removes the devices and the pool (a clean shutdown: the pool commits),
//!    writes the [`KernelResult`] to the result disk and powers off.
//!
//! Everything here but [`init_main`] also works on a host with
//! device-mapper: [`Replayer`] needs only block devices and the control
//! node.

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
    errno_name, read_frame, summarize, write_frame, DeviceContents, KernelResult, OpResult, PoolSpec,
    REQUEST_MAGIC, RESULT_MAGIC,
};

/// The file in the initramfs that lists the modules to load, one path a
/// line, dependencies first.
pub const MODULE_LIST: &str = "/etc/dmsim-modules";

/// Name of the pool device.
pub const POOL_NAME: &str = "dmsim-pool";

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
}

impl DiskRole {
    /// Every role.
    pub const ALL: [DiskRole; 4] = [DiskRole::Request, DiskRole::Result, DiskRole::Metadata, DiskRole::Data];

    /// The virtio serial number of the disk (at most 20 characters).
    pub fn serial(self) -> &'static str {
        match self {
            DiskRole::Request => "dmsim-request",
            DiskRole::Result => "dmsim-result",
            DiskRole::Metadata => "dmsim-metadata",
            DiskRole::Data => "dmsim-data",
        }
    }
}

/// Prints a line on the console, prefixed so the host can pick it out.
fn log(msg: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "dmsim-agent: {msg}");
    let _ = out.flush();
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
struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

impl AlignedBuf {
    fn zeroed(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len.max(4096), 4096).expect("valid layout");
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, len }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points to at least len initialised bytes we own.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
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

fn errno_of(e: &std::io::Error) -> String {
    e.raw_os_error().map_or_else(|| e.to_string(), errno_name)
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
pub struct Replayer {
    ctl: Control,
    spec: PoolSpec,
    /// Where device nodes live (`/dev`).
    dev_dir: PathBuf,
    pool: DevNum,
    devices: Vec<Thin>,
    next_id: u32,
    next_write: u64,
}

impl Replayer {
    /// Builds the pool over `metadata` and `data` (block devices; the
    /// metadata's first 4 KiB are zeroed so that a new pool is formatted).
    pub fn new(
        ctl: Control,
        spec: PoolSpec,
        metadata: &Path,
        data: &Path,
        dev_dir: &Path,
    ) -> Result<Replayer, ShimError> {
        {
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
        ctl.create(POOL_NAME)?;
        ctl.load(POOL_NAME, &[table], false)?;
        let pool = ctl.resume(POOL_NAME)?;
        Ok(Replayer {
            ctl,
            spec,
            dev_dir: dev_dir.to_path_buf(),
            pool,
            devices: Vec::new(),
            next_id: 0,
            next_write: 0,
        })
    }

    fn index(&self, dev: u8) -> Option<usize> {
        (!self.devices.is_empty()).then(|| dev as usize % self.devices.len())
    }

    fn activate(&mut self, id: u32) -> Result<(), ShimError> {
        let name = format!("dmsim-thin{id}");
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

    fn message(&self, msg: &str) -> Result<(), ShimError> {
        self.ctl.message(POOL_NAME, 0, msg).map(|_| ())
    }

    /// Clamps a request like the simulator: position modulo the device,
    /// length at least 1 and at most to the device's end.
    fn clamp(&self, sector: u32, nr: u64) -> (u64, u64) {
        let size = self.spec.thin_sectors();
        let sector = u64::from(sector) % size;
        (sector, nr.max(1).min(size - sector))
    }

    /// Applies one op; what the kernel answered.
    pub fn apply(&mut self, index: usize, op: &Op) -> Result<OpResult, ShimError> {
        let done = |outcome: String, read: Option<String>| Ok(OpResult { index, outcome, read });
        let skipped = || done("skipped".into(), None);
        match *op {
            Op::Write { dev, sector, nr_sectors, fua, preflush } => {
                let Some(i) = self.index(dev) else { return skipped() };
                let (sector, nr) = self.clamp(sector, u64::from(nr_sectors));
                let write = self.next_write;
                self.next_write += 1;
                let thin = &self.devices[i];
                let mut buf = AlignedBuf::zeroed((nr * 512) as usize);
                dmsim_traces::stamp::fill(buf.as_mut_slice(), self.spec.run, write, thin.id, sector);
                if preflush {
                    // DM core splits a PREFLUSH write into an empty flush
                    // and the write; userspace cannot send one bio with both.
                    if let Err(e) = thin.file.sync_all() {
                        return done(errno_of(&e), None);
                    }
                }
                let iov = libc::iovec { iov_base: buf.ptr.cast(), iov_len: buf.len };
                let rwf = if fua { libc::RWF_DSYNC } else { 0 };
                // SAFETY: one valid iovec over an owned, aligned buffer.
                let r = unsafe { libc::pwritev2(thin.file.as_raw_fd(), &iov, 1, (sector * 512) as i64, rwf) };
                if r < 0 {
                    return done(errno_of(&std::io::Error::last_os_error()), None);
                }
                if r as usize != buf.len {
                    return done(format!("short-write {r}"), None);
                }
                done("ok".into(), None)
            }
            Op::Read { dev, sector, nr_sectors } => {
                let Some(i) = self.index(dev) else { return skipped() };
                let (sector, nr) = self.clamp(sector, u64::from(nr_sectors));
                let thin = &self.devices[i];
                let mut buf = AlignedBuf::zeroed((nr * 512) as usize);
                match read_exact_at(&thin.file, buf.as_mut_slice(), sector * 512) {
                    Ok(()) => done("ok".into(), Some(summarize(buf.as_slice(), self.spec.run, sector))),
                    Err(e) => done(errno_of(&e), None),
                }
            }
            Op::Discard { dev, sector, nr_sectors } => {
                if self.spec.features.contains(&"ignore_discard") {
                    return skipped();
                }
                let Some(i) = self.index(dev) else { return skipped() };
                let (sector, nr) = self.clamp(sector, u64::from(nr_sectors));
                let range: [u64; 2] = [sector * 512, nr * 512];
                // SAFETY: BLKDISCARD reads two u64s from the pointer.
                let r =
                    unsafe { libc::ioctl(self.devices[i].file.as_raw_fd(), BLKDISCARD as _, range.as_ptr()) };
                if r < 0 {
                    return done(errno_of(&std::io::Error::last_os_error()), None);
                }
                done("ok".into(), None)
            }
            Op::Flush { dev } => {
                let Some(i) = self.index(dev) else { return skipped() };
                match self.devices[i].file.sync_all() {
                    Ok(()) => done("ok".into(), None),
                    Err(e) => done(errno_of(&e), None),
                }
            }
            Op::CreateThin => {
                if self.devices.len() >= self.spec.max_devices {
                    return skipped();
                }
                let id = self.next_id;
                if let Err(e) = self.message(&format!("create_thin {id}")) {
                    return done(format!("skipped ({e})"), None);
                }
                self.next_id += 1;
                self.activate(id)?;
                done("ok".into(), None)
            }
            Op::CreateSnap { origin } => {
                if self.devices.len() >= self.spec.max_devices {
                    return skipped();
                }
                let Some(i) = self.index(origin) else { return skipped() };
                let origin_name = self.devices[i].name.clone();
                let origin_id = self.devices[i].id;
                let id = self.next_id;
                // The documented protocol: suspend an active origin first.
                self.ctl.suspend(&origin_name, 0)?;
                let r = self.message(&format!("create_snap {id} {origin_id}"));
                self.ctl.resume(&origin_name)?;
                if let Err(e) = r {
                    return done(format!("skipped ({e})"), None);
                }
                self.next_id += 1;
                self.activate(id)?;
                done("ok".into(), None)
            }
            Op::Delete { dev } => {
                let Some(i) = self.index(dev) else { return skipped() };
                let thin = self.devices.remove(i);
                let (id, name) = (thin.id, thin.name.clone());
                drop(thin);
                self.ctl.remove(&name)?;
                if let Err(e) = self.message(&format!("delete {id}")) {
                    self.activate(id)?;
                    let last = self.devices.pop().expect("just activated");
                    self.devices.insert(i, last);
                    return done(format!("skipped ({e})"), None);
                }
                done("ok".into(), None)
            }
            // The kernel runs its own worker and completes its own I/O;
            // every request above already ran to completion.
            Op::Worker | Op::Complete { .. } | Op::FailIo { .. } | Op::Tick { .. } => done("ok".into(), None),
            Op::Fault { .. } | Op::Crash { .. } => done("unsupported".into(), None),
        }
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
        let s = self.ctl.status(POOL_NAME, false, false)?;
        Ok(s.into_iter().map(|t| t.status).collect::<Vec<_>>().join(" ; "))
    }

    /// Removes every thin device, then the pool (its destructor commits).
    pub fn teardown(mut self) -> Result<(), ShimError> {
        for thin in std::mem::take(&mut self.devices) {
            let name = thin.name.clone();
            drop(thin);
            self.ctl.remove(&name)?;
        }
        self.ctl.remove(POOL_NAME)
    }
}

/// `BLKDISCARD`: `_IO(0x12, 119)`.
const BLKDISCARD: u64 = 0x1277;

fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, offset)
}

/// Runs a whole request: the pool from the header, the ops, the read-back
/// and the teardown. Failures after the pool exists are recorded in the
/// result's `error`, with what was done so far.
pub fn run_trace(ctl: Control, trace: &Trace, metadata: &Path, data: &Path, dev_dir: &Path) -> KernelResult {
    let mut result = KernelResult::default();
    if let Ok(v) = ctl.version() {
        result.dm_version = v;
    }
    let spec = match PoolSpec::from_header(&trace.header) {
        Ok(s) => s,
        Err(e) => {
            result.error = Some(e.to_string());
            return result;
        }
    };
    // Queued writes on a full pool wait this long before failing; 0 would
    // mean forever in the kernel.
    let secs = spec.no_space_timeout_ns.div_ceil(1_000_000_000).max(1);
    let _ = std::fs::write("/sys/module/dm_thin_pool/parameters/no_space_timeout", secs.to_string());
    let mut replayer = match Replayer::new(ctl, spec, metadata, data, dev_dir) {
        Ok(r) => r,
        Err(e) => {
            result.error = Some(format!("creating the pool: {e}"));
            return result;
        }
    };
    if let Ok(t) = replayer.ctl.target_versions() {
        result.targets = t;
    }
    let t0 = Instant::now();
    for (i, op) in trace.ops().enumerate() {
        match replayer.apply(i, &op) {
            Ok(r) => result.ops.push(r),
            Err(e) => {
                result.error = Some(format!("op {i} ({op:?}): {e}"));
                break;
            }
        }
    }
    result.timings_ms.push(("ops".into(), t0.elapsed().as_millis() as u64));
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
    if let Err(e) = replayer.teardown() {
        result.error = result.error.take().or(Some(format!("teardown: {e}")));
    }
    result.timings_ms.push(("teardown".into(), t2.elapsed().as_millis() as u64));
    // The metadata device's content must reach the host's file.
    if let Ok(f) = OpenOptions::new().write(true).open(metadata) {
        let _ = f.sync_all();
    }
    result
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

fn read_request(path: &Path) -> Result<Trace, ShimError> {
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
    let body = read_frame(REQUEST_MAGIC, &all)?;
    let text =
        std::str::from_utf8(body).map_err(|e| ShimError::Invalid(format!("request is not UTF-8: {e}")))?;
    dmsim_traces::from_text(text).map_err(|e| ShimError::Invalid(format!("request trace: {e}")))
}

fn write_result(path: &Path, result: &KernelResult) -> Result<(), ShimError> {
    let frame = write_frame(RESULT_MAGIC, result.to_text().as_bytes());
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
    let mut result = match run(&disks) {
        Ok(r) => r,
        Err(e) => KernelResult { error: Some(e.to_string()), ..KernelResult::default() },
    };
    result.kernel_release = kernel_release();
    result.timings_ms.insert(0, ("modules".into(), modules_ms));
    result.timings_ms.insert(0, ("boot".into(), boot_ms));
    result.timings_ms.push(("agent".into(), t0.elapsed().as_millis() as u64));
    if let Some(e) = &result.error {
        log(&format!("error: {e}"));
    }
    match write_result(&result_disk, &result) {
        Ok(()) => log("result written"),
        Err(e) => log(&format!("FAILED to write the result: {e}")),
    }
    power_off();
}

fn run(disks: &[(DiskRole, PathBuf)]) -> Result<KernelResult, ShimError> {
    let trace = read_request(disk(disks, DiskRole::Request)?)?;
    log(&format!("request: {} ops", trace.ops().count()));
    let ctl_path = Path::new("/dev/mapper/control");
    wait_for(ctl_path)?;
    let ctl = Control::open(ctl_path)?;
    let metadata = disk(disks, DiskRole::Metadata)?;
    let data = disk(disks, DiskRole::Data)?;
    Ok(run_trace(ctl, &trace, metadata, data, Path::new("/dev")))
}

/// Whether this process runs as the VM's init (PID 1).
pub fn is_init() -> bool {
    std::process::id() == 1
}
