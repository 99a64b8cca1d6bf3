//! ublk, kernel 6.1's legacy ABI: the control commands, the parameters,
//! the per-tag descriptors and I/O commands, laid out as in 6.1's
//! `include/uapi/linux/ublk_cmd.h` and spoken directly with the
//! `io-uring` crate.
//!
//! Every request on `/dev/ublkbN` becomes a descriptor the server fetches
//! with io_uring `URING_CMD`s on `/dev/ublkcN` and answers with
//! `COMMIT_AND_FETCH_REQ`; control commands (add, parameters, start, stop,
//! delete) go to `/dev/ublk-control` on a ring with 128-byte submission
//! entries. The kernel shim's controlled disks and the engine's thin
//! devices are both served through this module.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::uring::EngineError;

/// `UBLK_CMD_GET_DEV_INFO`.
pub const CMD_GET_DEV_INFO: u32 = 0x02;
/// `UBLK_CMD_ADD_DEV`.
pub const CMD_ADD_DEV: u32 = 0x04;
/// `UBLK_CMD_DEL_DEV`.
pub const CMD_DEL_DEV: u32 = 0x05;
/// `UBLK_CMD_START_DEV`.
pub const CMD_START_DEV: u32 = 0x06;
/// `UBLK_CMD_STOP_DEV`.
pub const CMD_STOP_DEV: u32 = 0x07;
/// `UBLK_CMD_SET_PARAMS`.
pub const CMD_SET_PARAMS: u32 = 0x08;
/// `UBLK_CMD_START_USER_RECOVERY`.
pub const CMD_START_USER_RECOVERY: u32 = 0x10;
/// `UBLK_CMD_END_USER_RECOVERY`.
pub const CMD_END_USER_RECOVERY: u32 = 0x11;

/// `UBLK_F_USER_RECOVERY`: when the server dies, the driver quiesces the
/// device instead of deleting its disk (requests it had not handed out
/// wait), and a new server takes it over (`START_USER_RECOVERY`, its
/// fetches, `END_USER_RECOVERY`); requests the dead server had taken fail
/// with EIO (6.1, without `UBLK_F_USER_RECOVERY_REISSUE`).
pub const F_USER_RECOVERY: u64 = 1 << 3;

/// `UBLK_S_DEV_LIVE`, in [`DevInfo::state`].
pub const S_DEV_LIVE: u16 = 1;
/// `UBLK_S_DEV_QUIESCED`: the server died and the device waits for a new
/// one ([`F_USER_RECOVERY`]).
pub const S_DEV_QUIESCED: u16 = 2;
/// `UBLK_IO_FETCH_REQ`.
pub const IO_FETCH_REQ: u32 = 0x20;
/// `UBLK_IO_COMMIT_AND_FETCH_REQ`.
pub const IO_COMMIT_AND_FETCH_REQ: u32 = 0x21;

/// `UBLK_IO_OP_READ`.
pub const OP_READ: u8 = 0;
/// `UBLK_IO_OP_WRITE`.
pub const OP_WRITE: u8 = 1;
/// `UBLK_IO_OP_FLUSH`.
pub const OP_FLUSH: u8 = 2;
/// `UBLK_IO_OP_DISCARD`.
pub const OP_DISCARD: u8 = 3;
/// `UBLK_IO_OP_WRITE_ZEROES`.
pub const OP_WRITE_ZEROES: u8 = 5;
/// `UBLK_IO_F_FUA`, in `op_flags`.
pub const IO_F_FUA: u32 = 1 << 13;

/// `UBLK_ATTR_VOLATILE_CACHE`.
pub const ATTR_VOLATILE_CACHE: u32 = 1 << 2;
/// `UBLK_ATTR_FUA`.
pub const ATTR_FUA: u32 = 1 << 3;
/// `UBLK_PARAM_TYPE_BASIC`.
pub const PARAM_TYPE_BASIC: u32 = 1 << 0;
/// `UBLK_PARAM_TYPE_DISCARD`.
pub const PARAM_TYPE_DISCARD: u32 = 1 << 1;

/// The control node the module creates.
pub const CONTROL_PATH: &str = "/dev/ublk-control";

/// `struct ublksrv_ctrl_cmd` (6.1: 32 bytes, `data[2]`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct CtrlCmd {
    /// The device.
    pub dev_id: u32,
    /// `-1` for device commands.
    pub queue_id: u16,
    /// Length of the buffer at `addr`.
    pub len: u16,
    /// A buffer in or out.
    pub addr: u64,
    /// Inline data (`START_DEV`: the server's pid).
    pub data: [u64; 2],
}

/// `struct ublksrv_ctrl_dev_info` (64 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct DevInfo {
    /// Hardware queues.
    pub nr_hw_queues: u16,
    /// Tags per queue.
    pub queue_depth: u16,
    /// Owned by the driver.
    pub state: u16,
    /// Padding.
    pub pad0: u16,
    /// Largest request in bytes (the per-tag buffer).
    pub max_io_buf_bytes: u32,
    /// The device id (`u32::MAX`: the driver picks).
    pub dev_id: u32,
    /// Owned by the driver.
    pub ublksrv_pid: i32,
    /// Padding.
    pub pad1: u32,
    /// `UBLK_F_*` asked; the driver answers with what it grants.
    pub flags: u64,
    /// For the server.
    pub ublksrv_flags: u64,
    /// Reserved.
    pub reserved: [u64; 3],
}

/// `struct ublk_param_basic`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ParamBasic {
    /// `UBLK_ATTR_*`.
    pub attrs: u32,
    /// log2 of the logical block size.
    pub logical_bs_shift: u8,
    /// log2 of the physical block size.
    pub physical_bs_shift: u8,
    /// log2 of the optimal I/O size.
    pub io_opt_shift: u8,
    /// log2 of the minimal I/O size.
    pub io_min_shift: u8,
    /// Largest request in sectors.
    pub max_sectors: u32,
    /// Chunk size in sectors (0: none).
    pub chunk_sectors: u32,
    /// The device's size in sectors.
    pub dev_sectors: u64,
    /// Virtual boundary mask (0: none).
    pub virt_boundary_mask: u64,
}

/// `struct ublk_param_discard`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ParamDiscard {
    /// Alignment in bytes.
    pub discard_alignment: u32,
    /// Granularity in bytes.
    pub discard_granularity: u32,
    /// Largest discard in sectors.
    pub max_discard_sectors: u32,
    /// Largest write-zeroes in sectors (0: not supported).
    pub max_write_zeroes_sectors: u32,
    /// 6.1 supports only 1.
    pub max_discard_segments: u16,
    /// Reserved.
    pub reserved0: u16,
}

/// `struct ublk_params` (6.1: basic and discard).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Params {
    /// `size_of::<Params>()`.
    pub len: u32,
    /// `UBLK_PARAM_TYPE_*` present.
    pub types: u32,
    /// The basic parameters.
    pub basic: ParamBasic,
    /// The discard parameters.
    pub discard: ParamDiscard,
}

/// `struct ublksrv_io_desc`: one per tag, in the mmapped area.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoDesc {
    /// Op in bits 0–7, flags above.
    pub op_flags: u32,
    /// Length in sectors.
    pub nr_sectors: u32,
    /// First sector (meaningless for a FLUSH).
    pub start_sector: u64,
    /// The buffer the driver copies from or to.
    pub addr: u64,
}

/// `struct ublksrv_io_cmd` (16 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct IoCmd {
    /// The queue.
    pub q_id: u16,
    /// The tag.
    pub tag: u16,
    /// For a commit: bytes done or `-errno`.
    pub result: i32,
    /// The tag's buffer.
    pub addr: u64,
}

pub(crate) fn bytes_of<T: Copy, const N: usize>(v: &T) -> [u8; N] {
    assert!(std::mem::size_of::<T>() <= N, "command payload too large");
    let mut out = [0u8; N];
    // SAFETY: T is a plain repr(C) value of at most N bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(
            (v as *const T).cast::<u8>(),
            out.as_mut_ptr(),
            std::mem::size_of::<T>(),
        )
    };
    out
}

/// What a request asks, decoded from its descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// `UBLK_IO_OP_READ`.
    Read,
    /// `UBLK_IO_OP_WRITE`; `fua` with `UBLK_IO_F_FUA`.
    Write {
        /// Durable on completion.
        fua: bool,
    },
    /// `UBLK_IO_OP_FLUSH` (its sector is meaningless).
    Flush,
    /// `UBLK_IO_OP_DISCARD`.
    Discard,
    /// `UBLK_IO_OP_WRITE_ZEROES` (not advertised; served as a write of zeroes).
    WriteZeroes,
    /// Anything else (answered `EOPNOTSUPP`).
    Other(u8),
}

/// One request fetched from the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// The tag it came on.
    pub tag: u16,
    /// What it asks.
    pub kind: RequestKind,
    /// First sector.
    pub sector: u64,
    /// Length in sectors.
    pub nr_sectors: u32,
}

impl Request {
    /// Decodes a descriptor.
    pub fn from_desc(tag: u16, d: &IoDesc) -> Request {
        let op = (d.op_flags & 0xff) as u8;
        let kind = match op {
            OP_READ => RequestKind::Read,
            OP_WRITE => RequestKind::Write { fua: d.op_flags & IO_F_FUA != 0 },
            OP_FLUSH => RequestKind::Flush,
            OP_DISCARD => RequestKind::Discard,
            OP_WRITE_ZEROES => RequestKind::WriteZeroes,
            other => RequestKind::Other(other),
        };
        Request { tag, kind, sector: d.start_sector, nr_sectors: d.nr_sectors }
    }
}

/// The control device and its ring (128-byte entries, as 6.1 requires).
pub struct UblkControl {
    file: File,
    ring: Mutex<io_uring::IoUring<io_uring::squeue::Entry128, io_uring::cqueue::Entry>>,
}

impl std::fmt::Debug for UblkControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UblkControl").field("fd", &self.file.as_raw_fd()).finish()
    }
}

fn io_err(what: impl Into<String>, e: std::io::Error) -> EngineError {
    EngineError::Io { what: what.into(), source: e }
}

impl UblkControl {
    /// Opens [`CONTROL_PATH`] (the module must be loaded).
    pub fn open() -> Result<UblkControl, EngineError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(CONTROL_PATH)
            .map_err(|e| io_err(format!("open {CONTROL_PATH} (is ublk_drv loaded?)"), e))?;
        let ring = io_uring::IoUring::<io_uring::squeue::Entry128, io_uring::cqueue::Entry>::builder()
            .build(4)
            .map_err(|e| io_err("io_uring with 128-byte entries for ublk control", e))?;
        Ok(UblkControl { file, ring: Mutex::new(ring) })
    }

    /// Sends one control command; its result (`>= 0`) or the errno.
    pub fn command(&self, op: u32, cmd: &CtrlCmd) -> Result<i32, EngineError> {
        let name = match op {
            CMD_ADD_DEV => "ADD_DEV",
            CMD_DEL_DEV => "DEL_DEV",
            CMD_START_DEV => "START_DEV",
            CMD_STOP_DEV => "STOP_DEV",
            CMD_SET_PARAMS => "SET_PARAMS",
            CMD_GET_DEV_INFO => "GET_DEV_INFO",
            CMD_START_USER_RECOVERY => "START_USER_RECOVERY",
            CMD_END_USER_RECOVERY => "END_USER_RECOVERY",
            _ => "control command",
        };
        let what = format!("ublk {name} (dev {})", cmd.dev_id);
        let mut ring =
            self.ring.lock().map_err(|_| EngineError::Ublk("ublk control ring poisoned".into()))?;
        let sqe = io_uring::opcode::UringCmd80::new(io_uring::types::Fd(self.file.as_raw_fd()), op)
            .cmd(bytes_of::<CtrlCmd, 80>(cmd))
            .build()
            .user_data(u64::from(op));
        // SAFETY: the command's buffer (cmd.addr) outlives the wait below.
        unsafe { ring.submission().push(&sqe) }
            .map_err(|_| EngineError::Ublk(format!("{what}: submission queue full")))?;
        loop {
            match ring.submit_and_wait(1) {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(io_err(what, e)),
            }
        }
        let cqe =
            ring.completion().next().ok_or_else(|| EngineError::Ublk(format!("{what}: no completion")))?;
        let res = cqe.result();
        if res < 0 {
            return Err(io_err(what, std::io::Error::from_raw_os_error(-res)));
        }
        Ok(res)
    }
}

/// The limits a new device advertises ([`UblkControl::set_params`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The device's size in sectors.
    pub sectors: u64,
    /// The largest request in sectors.
    pub max_sectors: u32,
    /// The discard granularity in bytes.
    pub discard_granularity: u32,
    /// The largest discard in sectors.
    pub max_discard_sectors: u32,
}

impl UblkControl {
    /// `ADD_DEV`: a new device, one queue of `depth` tags with buffers of
    /// `buf_bytes`, the features `flags` (`UBLK_F_*`), its id chosen by
    /// the driver; the device as granted (6.1 rounds the buffer to pages
    /// and caps the queues at the CPUs).
    pub fn add_device(&self, depth: u16, buf_bytes: u32, flags: u64) -> Result<DevInfo, EngineError> {
        let info = DevInfo {
            nr_hw_queues: 1,
            queue_depth: depth,
            max_io_buf_bytes: buf_bytes,
            dev_id: u32::MAX,
            flags,
            ..DevInfo::default()
        };
        self.info_command(CMD_ADD_DEV, u32::MAX, info)
    }

    /// A command that passes a device's info to the driver and gets it
    /// back as the driver wrote it (`ADD_DEV`, `GET_DEV_INFO`).
    fn info_command(&self, op: u32, dev_id: u32, mut info: DevInfo) -> Result<DevInfo, EngineError> {
        let cmd = CtrlCmd {
            dev_id,
            queue_id: u16::MAX,
            len: std::mem::size_of::<DevInfo>() as u16,
            addr: std::ptr::addr_of_mut!(info) as u64,
            data: [0; 2],
        };
        self.command(op, &cmd)?;
        // SAFETY: the kernel wrote the device's info back into the live,
        // initialised local.
        Ok(unsafe { std::ptr::read_volatile(std::ptr::addr_of!(info)) })
    }

    /// `SET_PARAMS`: a volatile write cache and FUA (so that the kernel
    /// sends both), 512-byte logical and 4 KiB physical blocks, and
    /// `limits`.
    pub fn set_params(&self, dev_id: u32, limits: Limits) -> Result<(), EngineError> {
        let mut params = Params {
            len: std::mem::size_of::<Params>() as u32,
            types: PARAM_TYPE_BASIC | PARAM_TYPE_DISCARD,
            basic: ParamBasic {
                attrs: ATTR_VOLATILE_CACHE | ATTR_FUA,
                logical_bs_shift: 9,
                physical_bs_shift: 12,
                io_opt_shift: 12,
                io_min_shift: 9,
                max_sectors: limits.max_sectors,
                chunk_sectors: 0,
                dev_sectors: limits.sectors,
                virt_boundary_mask: 0,
            },
            discard: ParamDiscard {
                discard_alignment: 0,
                discard_granularity: limits.discard_granularity,
                max_discard_sectors: limits.max_discard_sectors,
                max_write_zeroes_sectors: 0,
                max_discard_segments: 1,
                reserved0: 0,
            },
        };
        let cmd = CtrlCmd {
            dev_id,
            queue_id: u16::MAX,
            len: std::mem::size_of::<Params>() as u16,
            addr: std::ptr::addr_of_mut!(params) as u64,
            data: [0; 2],
        };
        self.command(CMD_SET_PARAMS, &cmd).map(|_| ())
    }

    /// `START_DEV`, this process the server (its queue must be fetching:
    /// the command waits for that, and then for the disk to be added,
    /// whose partition table the kernel reads meanwhile).
    pub fn start_device(&self, dev_id: u32) -> Result<(), EngineError> {
        let cmd =
            CtrlCmd { dev_id, queue_id: u16::MAX, len: 0, addr: 0, data: [u64::from(std::process::id()), 0] };
        self.command(CMD_START_DEV, &cmd).map(|_| ())
    }

    /// `GET_DEV_INFO`: device `dev_id` as the driver holds it (its state,
    /// its granted flags and depth).
    pub fn device_info(&self, dev_id: u32) -> Result<DevInfo, EngineError> {
        self.info_command(CMD_GET_DEV_INFO, dev_id, DevInfo::default())
    }

    /// `START_USER_RECOVERY` of device `dev_id`, whose server died: tried
    /// again for up to `wait` while the driver answers EBUSY (it quiesces
    /// a device only at its monitor's next run, up to 5 s after the
    /// death, and the dead server's char device must be closed).
    pub fn start_recovery(&self, dev_id: u32, wait: Duration) -> Result<(), EngineError> {
        let deadline = Instant::now() + wait;
        loop {
            match self.device_command(CMD_START_USER_RECOVERY, dev_id) {
                Ok(_) => return Ok(()),
                Err(EngineError::Io { source, .. })
                    if source.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `END_USER_RECOVERY`: this process serves device `dev_id` again (its
    /// queue must be fetching: the command waits for that), which goes
    /// live.
    pub fn end_recovery(&self, dev_id: u32) -> Result<(), EngineError> {
        let cmd =
            CtrlCmd { dev_id, queue_id: u16::MAX, len: 0, addr: 0, data: [u64::from(std::process::id()), 0] };
        self.command(CMD_END_USER_RECOVERY, &cmd).map(|_| ())
    }

    /// A command that names only the device (`STOP_DEV`, `DEL_DEV`).
    pub fn device_command(&self, op: u32, dev_id: u32) -> Result<i32, EngineError> {
        let cmd = CtrlCmd { dev_id, queue_id: u16::MAX, ..CtrlCmd::default() };
        self.command(op, &cmd)
    }
}

/// Waits up to `wait` for `path` to exist (a node the driver creates).
pub fn wait_for_node(path: &Path, wait: Duration) -> Result<(), EngineError> {
    let deadline = Instant::now() + wait;
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(EngineError::Ublk(format!("{} did not appear", path.display())));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// The read-only mapping of a queue's descriptors.
pub struct DescMap {
    ptr: *mut libc::c_void,
    len: usize,
}

impl DescMap {
    /// Maps the descriptors of queue 0 of the char device `fd`, `depth` tags.
    pub fn new(fd: i32, depth: u16) -> Result<DescMap, String> {
        let len = (usize::from(depth) * std::mem::size_of::<IoDesc>()).div_ceil(4096) * 4096;
        // SAFETY: a fresh shared read-only mapping of the driver's
        // descriptor area of queue 0 (offset 0).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!("mmap the descriptors: {}", std::io::Error::last_os_error()));
        }
        Ok(DescMap { ptr, len })
    }

    /// The descriptor of `tag` (below the depth mapped).
    pub fn get(&self, tag: u16) -> IoDesc {
        // SAFETY: tag < depth, within the mapping; the driver wrote the
        // descriptor before completing the fetch (volatile: shared memory).
        unsafe { std::ptr::read_volatile(self.ptr.cast::<IoDesc>().add(usize::from(tag))) }
    }
}

// SAFETY: the mapping is plain shared memory owned by the value; moving
// it to another thread (the engine's pool thread) moves only the pointer.
unsafe impl Send for DescMap {}

impl Drop for DescMap {
    fn drop(&mut self) {
        // SAFETY: unmaps what `new` mapped.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// The submission of an I/O command (`op`: [`IO_FETCH_REQ`] or
/// [`IO_COMMIT_AND_FETCH_REQ`]) for `tag` of queue 0 on the char device
/// `fd`, with `buf` as the tag's buffer and `result` as the answer of the
/// request committed; its user data is the tag.
pub fn io_sqe(fd: i32, op: u32, tag: u16, result: i32, buf: &mut [u8]) -> io_uring::squeue::Entry {
    let cmd = IoCmd { q_id: 0, tag, result, addr: buf.as_mut_ptr() as u64 };
    io_uring::opcode::UringCmd16::new(io_uring::types::Fd(fd), op)
        .cmd(bytes_of::<IoCmd, 16>(&cmd))
        .build()
        .user_data(u64::from(tag))
}
