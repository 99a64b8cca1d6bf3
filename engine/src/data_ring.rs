//! [`DataRing`]: the pool's data I/O in flight together on one io_uring,
//! each ended when the ring completes it, in the ring's order.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use dmsim_model::block_device::SECTOR_SIZE;
use dmsim_model::errno::Errno;
use dmsim_model::thin::pool::{DataRequest, IoId};
use io_uring::{opcode, squeue, types, IoUring};

use crate::aligned::AlignedBuf;
use crate::uring::{open_direct, EngineError};

/// A data I/O the ring completed: what [`dmsim_model::thin::pool::Pool::end_io`]
/// takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completed {
    /// The pool's name for it.
    pub id: IoId,
    /// `Ok`, or `EIO` when the storage failed it (or a part of it).
    pub result: Result<(), Errno>,
    /// For a read that succeeded: the bytes.
    pub read: Option<Vec<u8>>,
}

/// What a [`DataRing`] has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingStats {
    /// Reads submitted.
    pub reads: u64,
    /// Writes submitted (FUA ones too).
    pub writes: u64,
    /// Zeroings submitted.
    pub zeroes: u64,
    /// Copies submitted.
    pub copies: u64,
    /// Discards submitted.
    pub discards: u64,
    /// Flushes submitted.
    pub flushes: u64,
    /// The most data I/Os on the ring at once.
    pub most_in_flight: usize,
    /// Data I/Os that completed while one submitted before them was still
    /// on the ring: the ring's order, not the submission order.
    pub overtaking: u64,
}

/// What a request's completions answer when they succeed.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// A read or write: its length.
    Transfer,
    /// Fallocates: 0.
    Discard,
    /// An fsync: 0.
    Flush,
}

/// One data I/O on the ring.
#[derive(Debug)]
struct Slot {
    /// Its buffer (a read's destination, a write's or a copy's data).
    buf: AlignedBuf,
    /// Bytes of `buf` in use.
    len: usize,
    /// Completions still to come: a copy's read and write, a discard's
    /// ranges.
    pending: usize,
    /// The first failure among them.
    result: Result<(), Errno>,
    /// Whether it is a read (its bytes go back to the pool).
    is_read: bool,
    /// What each of its completions answers when it succeeded: every
    /// byte of a read or write, 0 for a fallocate or fsync.
    expect: i32,
}

/// `BLKDISCARD`: `_IO(0x12, 119)`.
const BLKDISCARD: libc::c_ulong = 0x1277;

/// The data device as the engine drives it: a file or block device opened
/// with `O_DIRECT`, every data I/O the pool puts in flight submitted at
/// once as io_uring operations and ended when the ring completes it, in
/// the order it completes them (not the order they were submitted):
///
/// | [`DataRequest`] | io_uring |
/// |---|---|
/// | `Read`, `Write` | `IORING_OP_READ`, `IORING_OP_WRITE` (FUA: `RWF_DSYNC`) |
/// | `Zero` | `IORING_OP_WRITE` of zeroes |
/// | `Copy` | `IORING_OP_READ` linked (`IOSQE_IO_LINK`) to `IORING_OP_WRITE` of the same buffer |
/// | `Discard` | `IORING_OP_FALLOCATE` punching a hole per range (reads back as zeroes); on a block device a `BLKDISCARD` ioctl per range, at submission |
/// | `Flush` | `IORING_OP_FSYNC` (datasync) with `IOSQE_IO_DRAIN`: after every operation submitted before it |
/// | `Nothing` | completes at once |
///
/// A request past the end of the device completes with `EIO` without
/// reaching the ring. The ring's own failures (setup, submission) are
/// [`EngineError`]s.
pub struct DataRing {
    file: File,
    ring: IoUring,
    nr_sectors: u64,
    path: PathBuf,
    in_flight: BTreeMap<u64, Slot>,
    /// Completed without the ring, to hand out at the next reap.
    ready: Vec<Completed>,
    stats: RingStats,
    /// A block device: discards are `BLKDISCARD` ioctls (a block device
    /// punches no holes without write-zeroes support, and 6.1's io_uring
    /// has no discard operation), done at submission.
    is_block: bool,
}

impl std::fmt::Debug for DataRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataRing")
            .field("path", &self.path)
            .field("nr_sectors", &self.nr_sectors)
            .field("in_flight", &self.in_flight.len())
            .finish()
    }
}

impl DataRing {
    /// Opens `path` (a file or block device, a whole number of sectors)
    /// for direct I/O with a ring of `depth` entries (1 to 4096).
    pub fn open(path: &Path, depth: u32) -> Result<DataRing, EngineError> {
        let (file, nr_sectors) = open_direct(path)?;
        let ring = IoUring::new(depth.clamp(1, 4096)).map_err(EngineError::Ring)?;
        let is_block = {
            use std::os::unix::fs::FileTypeExt;
            file.metadata().is_ok_and(|m| m.file_type().is_block_device())
        };
        Ok(DataRing {
            is_block,
            file,
            ring,
            nr_sectors,
            path: path.to_path_buf(),
            in_flight: BTreeMap::new(),
            ready: Vec::new(),
            stats: RingStats::default(),
        })
    }

    /// Has the kernel signal the eventfd `fd` whenever the ring posts a
    /// completion (`IORING_REGISTER_EVENTFD`), so that a caller waiting on
    /// other things too (the engine's ublk ring) wakes for it.
    pub fn register_eventfd(&self, fd: i32) -> Result<(), EngineError> {
        self.ring.submitter().register_eventfd(fd).map_err(EngineError::Ring)
    }

    /// What the ring has done so far.
    pub fn stats(&self) -> RingStats {
        self.stats
    }

    /// Data I/Os submitted and not yet handed back by [`Self::reap`].
    pub fn in_flight(&self) -> usize {
        self.in_flight.len() + self.ready.len()
    }

    /// Submits data I/O `id` doing `request` to the ring (or, for one
    /// with nothing to do or out of range, completes it at once). An id
    /// already in flight is refused.
    pub fn submit(&mut self, id: IoId, request: DataRequest) -> Result<(), EngineError> {
        if self.in_flight.contains_key(&id.0) || self.ready.iter().any(|c| c.id == id) {
            return Err(EngineError::Ring(std::io::Error::other(format!(
                "data I/O {} is already in flight",
                id.0
            ))));
        }
        let in_range =
            |sector: u64, nr: u64| sector.checked_add(nr).is_some_and(|end| end <= self.nr_sectors);
        let ok = match &request {
            DataRequest::Read { sector, nr_sectors } | DataRequest::Zero { sector, nr_sectors } => {
                in_range(*sector, *nr_sectors)
            }
            DataRequest::Write { sector, data, .. } => {
                (data.len() as u64).is_multiple_of(SECTOR_SIZE)
                    && in_range(*sector, data.len() as u64 / SECTOR_SIZE)
            }
            DataRequest::Copy { from, to, nr_sectors } => {
                in_range(*from, *nr_sectors) && in_range(*to, *nr_sectors)
            }
            DataRequest::Discard { ranges } => ranges.iter().all(|&(b, e)| b <= e && in_range(b, e - b)),
            DataRequest::Flush | DataRequest::Nothing => true,
        };
        if !ok {
            self.ready.push(Completed { id, result: Err(Errno::EIO), read: None });
            return Ok(());
        }
        let fd = types::Fd(self.file.as_raw_fd());
        let mut slot = Slot {
            buf: AlignedBuf::default(),
            len: 0,
            pending: 0,
            result: Ok(()),
            is_read: false,
            expect: 0,
        };
        let bytes = |nr: u64| (nr * SECTOR_SIZE) as usize;
        let counter = match &request {
            DataRequest::Read { .. } => Some(&mut self.stats.reads),
            DataRequest::Write { .. } => Some(&mut self.stats.writes),
            DataRequest::Zero { .. } => Some(&mut self.stats.zeroes),
            DataRequest::Copy { .. } => Some(&mut self.stats.copies),
            DataRequest::Discard { .. } => Some(&mut self.stats.discards),
            DataRequest::Flush => Some(&mut self.stats.flushes),
            DataRequest::Nothing => None,
        };
        if let Some(c) = counter {
            *c += 1;
        }
        let request_kind = match request {
            DataRequest::Discard { .. } => Kind::Discard,
            DataRequest::Flush => Kind::Flush,
            _ => Kind::Transfer,
        };
        let mut entries: Vec<squeue::Entry> = Vec::new();
        match request {
            DataRequest::Nothing => {
                self.ready.push(Completed { id, result: Ok(()), read: None });
                return Ok(());
            }
            DataRequest::Read { sector, nr_sectors } => {
                slot.len = bytes(nr_sectors);
                slot.is_read = true;
                let buf = slot.buf.get(slot.len);
                entries.push(
                    opcode::Read::new(fd, buf.as_mut_ptr(), slot.len as u32)
                        .offset(sector * SECTOR_SIZE)
                        .build(),
                );
            }
            DataRequest::Write { sector, data, fua } => {
                slot.len = data.len();
                let buf = slot.buf.get(slot.len);
                buf.copy_from_slice(&data);
                let flags = if fua { libc::RWF_DSYNC } else { 0 };
                entries.push(
                    opcode::Write::new(fd, buf.as_ptr(), slot.len as u32)
                        .offset(sector * SECTOR_SIZE)
                        .rw_flags(flags)
                        .build(),
                );
            }
            DataRequest::Zero { sector, nr_sectors } => {
                slot.len = bytes(nr_sectors);
                let buf = slot.buf.get(slot.len);
                buf.fill(0);
                entries.push(
                    opcode::Write::new(fd, buf.as_ptr(), slot.len as u32)
                        .offset(sector * SECTOR_SIZE)
                        .build(),
                );
            }
            DataRequest::Copy { from, to, nr_sectors } => {
                slot.len = bytes(nr_sectors);
                let buf = slot.buf.get(slot.len);
                entries.push(
                    opcode::Read::new(fd, buf.as_mut_ptr(), slot.len as u32)
                        .offset(from * SECTOR_SIZE)
                        .build()
                        .flags(squeue::Flags::IO_LINK),
                );
                entries.push(
                    opcode::Write::new(fd, buf.as_ptr(), slot.len as u32).offset(to * SECTOR_SIZE).build(),
                );
            }
            DataRequest::Discard { ranges } if self.is_block => {
                let mut result = Ok(());
                for (b, e) in ranges.into_iter().filter(|(b, e)| e > b) {
                    let range: [u64; 2] = [b * SECTOR_SIZE, (e - b) * SECTOR_SIZE];
                    // SAFETY: BLKDISCARD reads two u64s from a live array.
                    let r = unsafe { libc::ioctl(self.file.as_raw_fd(), BLKDISCARD as _, range.as_ptr()) };
                    if r != 0 {
                        result = Err(Errno::EIO);
                    }
                }
                self.ready.push(Completed { id, result, read: None });
                return Ok(());
            }
            DataRequest::Discard { ranges } => {
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                for (b, e) in ranges.into_iter().filter(|(b, e)| e > b) {
                    entries.push(
                        opcode::Fallocate::new(fd, (e - b) * SECTOR_SIZE)
                            .offset(b * SECTOR_SIZE)
                            .mode(mode)
                            .build(),
                    );
                }
                if entries.is_empty() {
                    self.ready.push(Completed { id, result: Ok(()), read: None });
                    return Ok(());
                }
            }
            DataRequest::Flush => {
                entries.push(
                    opcode::Fsync::new(fd)
                        .flags(types::FsyncFlags::DATASYNC)
                        .build()
                        .flags(squeue::Flags::IO_DRAIN),
                );
            }
        }
        slot.pending = entries.len();
        if !matches!(request_kind, Kind::Discard | Kind::Flush) {
            slot.expect = slot.len as i32;
        }
        // The slot's buffer is heap memory that stays where it is while the
        // slot sits in the map (moving the slot moves no bytes of it).
        self.in_flight.insert(id.0, slot);
        self.stats.most_in_flight = self.stats.most_in_flight.max(self.in_flight.len());
        for entry in entries {
            let entry = entry.user_data(id.0);
            loop {
                // SAFETY: the buffer the entry points at belongs to the
                // slot, which stays in `in_flight` until every completion
                // of the entry has been reaped.
                if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                    break;
                }
                // The submission queue is full: hand it to the kernel.
                self.ring.submit().map_err(EngineError::Ring)?;
            }
        }
        self.ring.submit().map_err(EngineError::Ring)?;
        Ok(())
    }

    /// Waits until at least `min` data I/Os (no more than are in flight)
    /// have completed, and returns every one completed by then, in the
    /// order the ring completed them.
    pub fn reap(&mut self, min: usize) -> Result<Vec<Completed>, EngineError> {
        let mut done = std::mem::take(&mut self.ready);
        let min = min.min(done.len() + self.in_flight.len());
        loop {
            let cqes: Vec<(u64, i32)> = self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
            for (key, res) in cqes {
                let Some(slot) = self.in_flight.get_mut(&key) else { continue };
                // A read or write must move every byte (a short one
                // failed); a fallocate or fsync answers 0.
                if res != slot.expect && slot.result.is_ok() {
                    slot.result = Err(Errno::EIO);
                }
                slot.pending -= 1;
                if slot.pending == 0 {
                    let slot = self.in_flight.remove(&key).expect("just seen");
                    // Ids grow in submission order (the pool's do).
                    if self.in_flight.keys().next().is_some_and(|&first| first < key) {
                        self.stats.overtaking += 1;
                    }
                    let read = (slot.is_read && slot.result.is_ok()).then(|| {
                        let mut buf = slot.buf;
                        buf.get(slot.len).to_vec()
                    });
                    done.push(Completed { id: IoId(key), result: slot.result, read });
                }
            }
            if done.len() >= min {
                return Ok(done);
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(EngineError::Ring(e)),
            }
        }
    }
}
