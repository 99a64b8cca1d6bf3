//! The device-mapper ioctl interface (ABI version 4, spec §7.1), spoken
//! directly: no libdevmapper, so the replay agent links no C library and
//! runs static in a bare initramfs.
//!
//! The encoding and decoding of request buffers is pure and tested on any
//! host ([`Request`], [`Reply`]); [`Control`] sends them to
//! `/dev/mapper/control` and needs Linux with device-mapper and root.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::ShimError;

/// Size of `struct dm_ioctl`, rounded up to 8: where payloads start.
pub const HEADER_SIZE: usize = 312;
/// The part of the header the kernel requires (`data_size` >= this).
const HEADER_MIN: usize = 305;
/// Size of `struct dm_target_spec` without its parameter string.
const SPEC_SIZE: usize = 40;
/// Bytes of the `name` field (with its NUL).
const NAME_LEN: usize = 128;
/// Buffer size of requests that return a payload (dmsetup starts here too).
const OUT_BUFFER: usize = 16 * 1024;
/// Largest buffer tried before giving up on DM_BUFFER_FULL.
const OUT_BUFFER_MAX: usize = 16 * 1024 * 1024;

/// Request numbers (`_IOC_NR`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Cmd {
    /// DM_VERSION.
    Version = 0,
    /// DM_DEV_CREATE.
    DevCreate = 3,
    /// DM_DEV_REMOVE.
    DevRemove = 4,
    /// DM_DEV_SUSPEND (suspend with [`flags::SUSPEND`], resume without).
    DevSuspend = 6,
    /// DM_DEV_STATUS.
    DevStatus = 7,
    /// DM_TABLE_LOAD.
    TableLoad = 9,
    /// DM_TABLE_STATUS.
    TableStatus = 12,
    /// DM_LIST_VERSIONS.
    ListVersions = 13,
    /// DM_TARGET_MSG.
    TargetMsg = 14,
}

impl Cmd {
    /// The ioctl request number on x86-64: `_IOWR(0xfd, nr, struct dm_ioctl)`.
    pub fn ioctl_number(self) -> u64 {
        0xC138_FD00 + self as u64
    }
}

/// `dm_ioctl.flags` bits used here.
pub mod flags {
    /// DM_READONLY_FLAG.
    pub const READONLY: u32 = 1 << 0;
    /// DM_SUSPEND_FLAG.
    pub const SUSPEND: u32 = 1 << 1;
    /// DM_STATUS_TABLE_FLAG: TABLE instead of INFO status.
    pub const STATUS_TABLE: u32 = 1 << 4;
    /// DM_BUFFER_FULL_FLAG (out).
    pub const BUFFER_FULL: u32 = 1 << 8;
    /// DM_SKIP_LOCKFS_FLAG.
    pub const SKIP_LOCKFS: u32 = 1 << 10;
    /// DM_NOFLUSH_FLAG (suspend without flushing; status without commit).
    pub const NOFLUSH: u32 = 1 << 11;
    /// DM_DATA_OUT_FLAG (out: a message produced output).
    pub const DATA_OUT: u32 = 1 << 16;
}

/// One line of a table: `<start> <length> <target type> <params>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSpec {
    /// First sector.
    pub start: u64,
    /// Length in sectors.
    pub length: u64,
    /// Target type (`thin-pool`, `thin`, `linear`, …), at most 15 bytes.
    pub target_type: String,
    /// The parameter string.
    pub params: String,
}

/// A status line of one target, as DM_TABLE_STATUS returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetStatus {
    /// First sector.
    pub start: u64,
    /// Length in sectors.
    pub length: u64,
    /// Target type.
    pub target_type: String,
    /// The status (INFO) or table (TABLE) string.
    pub status: String,
}

/// A device number, as the kernel encodes it in `dm_ioctl.dev`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DevNum {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
}

impl DevNum {
    /// Decodes `new_encode_dev`'s encoding.
    pub fn decode(dev: u64) -> DevNum {
        let dev = dev as u32;
        DevNum { major: (dev & 0xfff00) >> 8, minor: (dev & 0xff) | ((dev >> 12) & 0xfff00) }
    }

    /// `major:minor`, as tables name devices.
    pub fn table_name(self) -> String {
        format!("{}:{}", self.major, self.minor)
    }
}

/// An encoded request buffer (8-byte aligned).
#[derive(Debug, Clone)]
pub struct Request {
    words: Vec<u64>,
}

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}

fn get_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

fn get_u64(buf: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

fn round8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

/// The NUL-terminated string at the start of `buf` (lossy, bounded).
fn c_string(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

impl Request {
    /// A request for device `name` (may be empty for global requests) with
    /// `flags`, a payload placed at [`HEADER_SIZE`], and room for at least
    /// `out_room` bytes of output.
    pub fn new(
        name: &str,
        flags: u32,
        payload: &[u8],
        target_count: u32,
        out_room: usize,
    ) -> Result<Request, ShimError> {
        if name.len() >= NAME_LEN || name.contains('\0') {
            return Err(ShimError::Invalid(format!("device name {name:?} is too long or holds a NUL")));
        }
        let size = round8(HEADER_SIZE + payload.len().max(out_room));
        let mut words = vec![0u64; size / 8];
        let buf = bytes_mut(&mut words);
        put_u32(buf, 0, 4); // version 4.0.0: accepted by every ABI-4 kernel
        put_u32(buf, 12, size as u32);
        put_u32(buf, 16, HEADER_SIZE as u32);
        put_u32(buf, 20, target_count);
        put_u32(buf, 28, flags);
        buf[48..48 + name.len()].copy_from_slice(name.as_bytes());
        buf[HEADER_SIZE..HEADER_SIZE + payload.len()].copy_from_slice(payload);
        Ok(Request { words })
    }

    /// The buffer's bytes.
    pub fn bytes(&self) -> &[u8] {
        bytes(&self.words)
    }

    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.words.as_mut_ptr().cast()
    }

    /// Reads the buffer as the kernel left it.
    pub fn reply(&self) -> Reply {
        Reply::parse(self.bytes())
    }
}

fn bytes(words: &[u64]) -> &[u8] {
    // SAFETY: u64 has no padding or invalid bit patterns; the byte view
    // covers exactly the vector's initialised memory.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast(), words.len() * 8) }
}

fn bytes_mut(words: &mut [u64]) -> &mut [u8] {
    // SAFETY: as in `bytes`; every byte pattern is a valid u64.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast(), words.len() * 8) }
}

/// The payload of a TABLE_LOAD: the target specs, each followed by its
/// parameter string, `next` counted from the start of each spec.
pub fn encode_table(targets: &[TargetSpec]) -> Result<Vec<u8>, ShimError> {
    let mut out = Vec::new();
    for t in targets {
        if t.target_type.len() >= 16 || t.target_type.contains('\0') || t.params.contains('\0') {
            return Err(ShimError::Invalid(format!("bad target {:?} {:?}", t.target_type, t.params)));
        }
        let len = round8(SPEC_SIZE + t.params.len() + 1);
        let at = out.len();
        out.resize(at + len, 0);
        let spec = &mut out[at..];
        put_u64(spec, 0, t.start);
        put_u64(spec, 8, t.length);
        put_u32(spec, 20, len as u32);
        spec[24..24 + t.target_type.len()].copy_from_slice(t.target_type.as_bytes());
        spec[SPEC_SIZE..SPEC_SIZE + t.params.len()].copy_from_slice(t.params.as_bytes());
    }
    Ok(out)
}

/// The payload of a TARGET_MSG: `{u64 sector; char message[]}`.
pub fn encode_message(sector: u64, message: &str) -> Result<Vec<u8>, ShimError> {
    if message.contains('\0') {
        return Err(ShimError::Invalid(format!("message {message:?} holds a NUL")));
    }
    let mut out = vec![0u8; round8(8 + message.len() + 1)];
    put_u64(&mut out, 0, sector);
    out[8..8 + message.len()].copy_from_slice(message.as_bytes());
    Ok(out)
}

/// A request buffer as the kernel returned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The kernel's interface version.
    pub version: [u32; 3],
    /// `data_size`.
    pub data_size: u32,
    /// `data_start`: where the output payload starts.
    pub data_start: u32,
    /// `target_count`.
    pub target_count: u32,
    /// `open_count`.
    pub open_count: i32,
    /// `flags`.
    pub flags: u32,
    /// `event_nr`.
    pub event_nr: u32,
    /// `dev`.
    pub dev: DevNum,
    /// The output payload (from `data_start` to `data_size`, bounded by the
    /// buffer).
    pub payload: Vec<u8>,
}

impl Reply {
    /// Reads a header and its payload; out-of-range offsets give an empty
    /// payload, never a panic.
    pub fn parse(buf: &[u8]) -> Reply {
        if buf.len() < HEADER_MIN {
            return Reply {
                version: [0; 3],
                data_size: 0,
                data_start: 0,
                target_count: 0,
                open_count: 0,
                flags: 0,
                event_nr: 0,
                dev: DevNum { major: 0, minor: 0 },
                payload: Vec::new(),
            };
        }
        let data_size = get_u32(buf, 12);
        let data_start = get_u32(buf, 16);
        let end = (data_size as usize).min(buf.len());
        let start = (data_start as usize).min(end);
        Reply {
            version: [get_u32(buf, 0), get_u32(buf, 4), get_u32(buf, 8)],
            data_size,
            data_start,
            target_count: get_u32(buf, 20),
            open_count: get_u32(buf, 24) as i32,
            flags: get_u32(buf, 28),
            event_nr: get_u32(buf, 32),
            dev: DevNum::decode(get_u64(buf, 40)),
            payload: buf[start..end].to_vec(),
        }
    }

    /// The status lines of a TABLE_STATUS reply (`next` is counted from
    /// the start of the payload). Malformed payloads are an error.
    pub fn statuses(&self) -> Result<Vec<TargetStatus>, ShimError> {
        let p = &self.payload;
        let mut out = Vec::new();
        let mut at = 0usize;
        for i in 0..self.target_count {
            if at + SPEC_SIZE > p.len() {
                return Err(ShimError::Invalid(format!(
                    "status payload: spec {i} at {at} past the end ({})",
                    p.len()
                )));
            }
            let spec = &p[at..];
            out.push(TargetStatus {
                start: get_u64(spec, 0),
                length: get_u64(spec, 8),
                target_type: c_string(&spec[24..40]),
                status: c_string(&spec[SPEC_SIZE..]),
            });
            let next = get_u32(spec, 20) as usize;
            if i + 1 < self.target_count && next <= at {
                return Err(ShimError::Invalid(format!("status payload: spec {i} points back to {next}")));
            }
            at = next;
        }
        Ok(out)
    }

    /// The output of a TARGET_MSG, if the target produced any.
    pub fn message_output(&self) -> Option<String> {
        (self.flags & flags::DATA_OUT != 0).then(|| c_string(&self.payload))
    }

    /// `(name, version)` of every target type, from a LIST_VERSIONS reply
    /// (`struct dm_target_versions {u32 next; u32 version[3]; char name[]}`).
    pub fn target_versions(&self) -> Vec<(String, [u32; 3])> {
        let p = &self.payload;
        let mut out = Vec::new();
        let mut at = 0usize;
        while at + 16 <= p.len() {
            let e = &p[at..];
            out.push((c_string(&e[16..]), [get_u32(e, 4), get_u32(e, 8), get_u32(e, 12)]));
            let next = get_u32(e, 0) as usize;
            if next == 0 {
                break;
            }
            at += next;
        }
        out
    }
}

/// An open `/dev/mapper/control`.
#[derive(Debug)]
pub struct Control {
    file: File,
}

impl Control {
    /// Opens the control node at `path` (normally `/dev/mapper/control`).
    pub fn open(path: &Path) -> Result<Control, ShimError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| ShimError::io(format!("open {}", path.display()), e))?;
        Ok(Control { file })
    }

    /// Sends one request; retries with a larger buffer while the kernel
    /// reports DM_BUFFER_FULL.
    fn call(
        &self,
        cmd: Cmd,
        name: &str,
        flags: u32,
        payload: &[u8],
        target_count: u32,
        out: bool,
    ) -> Result<Reply, ShimError> {
        let mut room = if out { OUT_BUFFER } else { 0 };
        loop {
            let mut req = Request::new(name, flags, payload, target_count, room)?;
            // SAFETY: the buffer is as large as its data_size field says,
            // aligned, and lives across the call; the kernel writes at most
            // data_size bytes into it.
            let r = unsafe { libc::ioctl(self.file.as_raw_fd(), cmd.ioctl_number() as _, req.as_mut_ptr()) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                return Err(ShimError::Dm { what: format!("{cmd:?} {name:?}"), source: e });
            }
            let reply = req.reply();
            if reply.flags & flags::BUFFER_FULL != 0 && out && room < OUT_BUFFER_MAX {
                room *= 4;
                continue;
            }
            return Ok(reply);
        }
    }

    /// DM_VERSION: the kernel's interface version.
    pub fn version(&self) -> Result<[u32; 3], ShimError> {
        Ok(self.call(Cmd::Version, "", 0, &[], 0, false)?.version)
    }

    /// DM_LIST_VERSIONS: every registered target type and its version.
    pub fn target_versions(&self) -> Result<Vec<(String, [u32; 3])>, ShimError> {
        Ok(self.call(Cmd::ListVersions, "", 0, &[], 0, true)?.target_versions())
    }

    /// DM_DEV_CREATE: a new device with no table; its device number.
    pub fn create(&self, name: &str) -> Result<DevNum, ShimError> {
        Ok(self.call(Cmd::DevCreate, name, 0, &[], 0, false)?.dev)
    }

    /// DM_TABLE_LOAD into the inactive slot.
    pub fn load(&self, name: &str, targets: &[TargetSpec], read_only: bool) -> Result<(), ShimError> {
        let payload = encode_table(targets)?;
        let fl = if read_only { flags::READONLY } else { 0 };
        self.call(Cmd::TableLoad, name, fl, &payload, targets.len() as u32, false)?;
        Ok(())
    }

    /// Resume (DM_DEV_SUSPEND without DM_SUSPEND_FLAG): swaps in a loaded
    /// table. Returns the device number.
    pub fn resume(&self, name: &str) -> Result<DevNum, ShimError> {
        Ok(self.call(Cmd::DevSuspend, name, 0, &[], 0, false)?.dev)
    }

    /// Suspend, with extra `flags` (NOFLUSH, SKIP_LOCKFS).
    pub fn suspend(&self, name: &str, extra: u32) -> Result<(), ShimError> {
        self.call(Cmd::DevSuspend, name, flags::SUSPEND | extra, &[], 0, false)?;
        Ok(())
    }

    /// DM_DEV_REMOVE.
    pub fn remove(&self, name: &str) -> Result<(), ShimError> {
        self.call(Cmd::DevRemove, name, 0, &[], 0, false)?;
        Ok(())
    }

    /// DM_TARGET_MSG to the target at `sector`; its output, if any.
    pub fn message(&self, name: &str, sector: u64, message: &str) -> Result<Option<String>, ShimError> {
        let payload = encode_message(sector, message)?;
        Ok(self.call(Cmd::TargetMsg, name, 0, &payload, 0, true)?.message_output())
    }

    /// DM_TABLE_STATUS: INFO status (or the TABLE with `table`);
    /// `noflush` asks thin-pool not to commit first.
    pub fn status(&self, name: &str, table: bool, noflush: bool) -> Result<Vec<TargetStatus>, ShimError> {
        let fl = if table { flags::STATUS_TABLE } else { 0 } | if noflush { flags::NOFLUSH } else { 0 };
        self.call(Cmd::TableStatus, name, fl, &[], 0, true)?.statuses()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_spec() {
        assert_eq!(Cmd::Version.ioctl_number(), 0xC138FD00);
        assert_eq!(Cmd::TableLoad.ioctl_number(), 0xC138FD09);
        assert_eq!(Cmd::TargetMsg.ioctl_number(), 0xC138FD0E);
    }

    #[test]
    fn header_layout() {
        let r = Request::new("pool", flags::SUSPEND, b"xyz", 2, 0).unwrap();
        let b = r.bytes();
        assert_eq!(b.len(), 320);
        assert_eq!(get_u32(b, 0), 4);
        assert_eq!(get_u32(b, 12), 320);
        assert_eq!(get_u32(b, 16), 312);
        assert_eq!(get_u32(b, 20), 2);
        assert_eq!(get_u32(b, 28), flags::SUSPEND);
        assert_eq!(&b[48..53], b"pool\0");
        assert_eq!(&b[312..315], b"xyz");
        assert!(Request::new(&"x".repeat(128), 0, &[], 0, 0).is_err());
    }

    #[test]
    fn table_specs_chain_from_each_spec() {
        let t = encode_table(&[
            TargetSpec { start: 0, length: 8, target_type: "linear".into(), params: "8:0 0".into() },
            TargetSpec { start: 8, length: 8, target_type: "zero".into(), params: String::new() },
        ])
        .unwrap();
        assert_eq!(get_u32(&t, 20), 48); // 40 + "8:0 0\0" = 46, rounded to 48
        assert_eq!(&t[24..30], b"linear");
        assert_eq!(&t[40..46], b"8:0 0\0");
        assert_eq!(get_u64(&t[48..], 0), 8);
        assert_eq!(t.len(), 48 + 48);
    }

    #[test]
    fn device_numbers() {
        assert_eq!(DevNum::decode((253 << 8) | 3), DevNum { major: 253, minor: 3 });
        assert_eq!(DevNum::decode((253 << 8) | 0x12 | (0x300 << 12)), DevNum { major: 253, minor: 0x312 });
    }

    #[test]
    fn status_payload_is_parsed_and_bounded() {
        let mut buf = vec![0u8; 312 + 128];
        let len = buf.len() as u32;
        put_u32(&mut buf, 12, len);
        put_u32(&mut buf, 16, 312);
        put_u32(&mut buf, 20, 1);
        let p = &mut buf[312..];
        put_u64(p, 8, 1024);
        p[24..33].copy_from_slice(b"thin-pool");
        p[40..47].copy_from_slice(b"1 2/3 -");
        let reply = Reply::parse(&buf);
        let s = reply.statuses().unwrap();
        assert_eq!(s[0].target_type, "thin-pool");
        assert_eq!(s[0].status, "1 2/3 -");
        assert_eq!(s[0].length, 1024);
        put_u32(&mut buf, 20, 3);
        assert!(Reply::parse(&buf).statuses().is_err());
        assert_eq!(Reply::parse(&buf[..10]).payload.len(), 0);
    }
}
