//! [`UringDevice`]: a [`BlockDevice`] whose requests are io_uring
//! operations on an `O_DIRECT` file descriptor.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use dmsim_model::block_device::{byte_range, BlockDevice, IoError, WriteFlags, SECTOR_SIZE};
use io_uring::{opcode, types, IoUring};

use crate::aligned::AlignedBuf;

/// Why a [`UringDevice`] could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The file or device could not be opened (or created, or sized).
    #[error("{path}: {what}: {source}")]
    Open {
        /// The path.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The system's answer.
        #[source]
        source: std::io::Error,
    },
    /// The path's size is not a whole number of sectors, or zero.
    #[error("{path}: {bytes} bytes is not a positive whole number of 512-byte sectors")]
    Size {
        /// The path.
        path: PathBuf,
        /// Its size.
        bytes: u64,
    },
    /// More (or fewer) sectors asked of a device than it can show.
    #[error("{path}: cannot show {sectors} sectors of a device of {size}")]
    Visible {
        /// The path.
        path: PathBuf,
        /// The sectors asked.
        sectors: u64,
        /// The device's own size in sectors.
        size: u64,
    },
    /// The kernel refused the io_uring instance.
    #[error("io_uring setup: {0}")]
    Ring(#[source] std::io::Error),
    /// A system call failed (a ublk command, a socket, a thread).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The system's answer.
        #[source]
        source: std::io::Error,
    },
    /// ublk or the engine's control channel answered something unusable.
    #[error("{0}")]
    Ublk(String),
    /// The engine refused a request with an errno (a pool message the
    /// pool refused, a device that does not activate).
    #[error("{errno}: {message}")]
    Refused {
        /// The errno, as the kernel's target would return it.
        errno: dmsim_model::errno::Errno,
        /// What the pool said.
        message: String,
    },
}

/// A block device over a file or a block device opened with `O_DIRECT`,
/// each request one io_uring operation, submitted and waited for:
/// a read is `IORING_OP_READ`, a write `IORING_OP_WRITE` (a FUA write with
/// `RWF_DSYNC`, the kernel's REQ_FUA for a file), and a flush
/// `IORING_OP_FSYNC` with `IORING_FSYNC_DATASYNC` (REQ_PREFLUSH): every
/// write before it has completed, so the fsync covers them all.
///
/// Requests out of range or not a whole number of sectors get the same
/// [`IoError::OutOfRange`] as the in-memory devices; a failure of the
/// storage underneath is [`IoError::Failed`] with the system's error.
/// Callers' buffers need no alignment: the data goes through a page-aligned
/// bounce buffer.
pub struct UringDevice {
    file: File,
    ring: IoUring,
    /// The sectors it shows ([`UringDevice::set_visible_sectors`]).
    nr_sectors: u64,
    /// The file's or block device's own size, in sectors.
    real_sectors: u64,
    bounce: AlignedBuf,
    path: PathBuf,
}

impl std::fmt::Debug for UringDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringDevice").field("path", &self.path).field("nr_sectors", &self.nr_sectors).finish()
    }
}

impl UringDevice {
    /// Opens an existing file or block device for direct I/O; its size is
    /// the device's size.
    pub fn open(path: &Path) -> Result<UringDevice, EngineError> {
        let (file, nr_sectors) = open_direct(path)?;
        let ring = IoUring::new(8).map_err(EngineError::Ring)?;
        Ok(UringDevice {
            file,
            ring,
            nr_sectors,
            real_sectors: nr_sectors,
            bounce: AlignedBuf::default(),
            path: path.to_path_buf(),
        })
    }

    /// Shows only the first `sectors` of the file or device (a metadata
    /// device that a trace grows later: the kernel's replay puts a
    /// dm-linear device of that length under the pool), or more of it
    /// again, up to its own size; requests past them are out of range.
    pub fn set_visible_sectors(&mut self, sectors: u64) -> Result<(), EngineError> {
        if sectors == 0 || sectors > self.real_sectors {
            return Err(EngineError::Visible { path: self.path.clone(), sectors, size: self.real_sectors });
        }
        self.nr_sectors = sectors;
        Ok(())
    }

    /// Creates (or truncates) a regular file of `nr_sectors` sectors,
    /// zero-filled, and opens it.
    pub fn create(path: &Path, nr_sectors: u64) -> Result<UringDevice, EngineError> {
        let open_err = |what, source| EngineError::Open { path: path.to_path_buf(), what, source };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| open_err("create", e))?;
        file.set_len(nr_sectors * SECTOR_SIZE).map_err(|e| open_err("set its length", e))?;
        drop(file);
        UringDevice::open(path)
    }

    /// The path it was opened at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Submits `sqe` and waits for its completion: the byte count or the
    /// error.
    fn run(&mut self, sqe: io_uring::squeue::Entry) -> std::io::Result<usize> {
        // SAFETY: the buffer `sqe` points at (the bounce buffer) lives in
        // `self` and is not touched until the completion below is reaped.
        unsafe { self.ring.submission().push(&sqe) }
            .map_err(|_| std::io::Error::other("the submission queue is full"))?;
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
        let cqe = self.ring.completion().next().ok_or_else(|| std::io::Error::other("no completion"))?;
        match cqe.result() {
            r if r < 0 => Err(std::io::Error::from_raw_os_error(-r)),
            r => Ok(r as usize),
        }
    }

    fn failed(sector: u64, what: &str, e: std::io::Error) -> IoError {
        IoError::Failed { sector, reason: format!("{what}: {e}") }
    }
}

/// Opens `path` (a file or block device) for reading and writing with
/// `O_DIRECT`; returns it and its size in sectors, which must be a
/// positive whole number.
pub(crate) fn open_direct(path: &Path) -> Result<(File, u64), EngineError> {
    let open_err = |what, source| EngineError::Open { path: path.to_path_buf(), what, source };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| open_err("open with O_DIRECT", e))?;
    let bytes = device_bytes(&file).map_err(|e| open_err("size", e))?;
    if bytes == 0 || !bytes.is_multiple_of(SECTOR_SIZE) {
        return Err(EngineError::Size { path: path.to_path_buf(), bytes });
    }
    Ok((file, bytes / SECTOR_SIZE))
}

/// The size in bytes of a regular file or a block device.
fn device_bytes(file: &File) -> std::io::Result<u64> {
    let meta = file.metadata()?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    let mut bytes: u64 = 0;
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: u64 = 0x8008_1272;
    // SAFETY: the ioctl writes one u64 through the pointer.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut bytes as *mut u64) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(bytes)
}

impl BlockDevice for UringDevice {
    fn nr_sectors(&self) -> u64 {
        self.nr_sectors
    }

    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let range = byte_range(sector, buf.len(), self.nr_sectors * SECTOR_SIZE)?;
        if buf.is_empty() {
            return Ok(());
        }
        let fd = types::Fd(self.file.as_raw_fd());
        let bounce = self.bounce.get(buf.len());
        let sqe =
            opcode::Read::new(fd, bounce.as_mut_ptr(), buf.len() as u32).offset(range.start as u64).build();
        match self.run(sqe) {
            Ok(n) if n == buf.len() => {
                buf.copy_from_slice(self.bounce.get(buf.len()));
                Ok(())
            }
            Ok(n) => {
                Err(Self::failed(sector, "read", std::io::Error::other(format!("short read: {n} bytes"))))
            }
            Err(e) => Err(Self::failed(sector, "read", e)),
        }
    }

    fn write(&mut self, sector: u64, buf: &[u8], flags: WriteFlags) -> Result<(), IoError> {
        let range = byte_range(sector, buf.len(), self.nr_sectors * SECTOR_SIZE)?;
        if buf.is_empty() {
            return Ok(());
        }
        let fd = types::Fd(self.file.as_raw_fd());
        let bounce = self.bounce.get(buf.len());
        bounce.copy_from_slice(buf);
        let rw_flags = if flags.fua { libc::RWF_DSYNC } else { 0 };
        let sqe = opcode::Write::new(fd, bounce.as_ptr(), buf.len() as u32)
            .offset(range.start as u64)
            .rw_flags(rw_flags)
            .build();
        match self.run(sqe) {
            Ok(n) if n == buf.len() => Ok(()),
            Ok(n) => {
                Err(Self::failed(sector, "write", std::io::Error::other(format!("short write: {n} bytes"))))
            }
            Err(e) => Err(Self::failed(sector, "write", e)),
        }
    }

    fn flush(&mut self) -> Result<(), IoError> {
        let fd = types::Fd(self.file.as_raw_fd());
        let sqe = opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build();
        self.run(sqe).map(|_| ()).map_err(|e| Self::failed(0, "fsync", e))
    }
}
