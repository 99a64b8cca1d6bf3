//! A read-only [`BlockDevice`] over a file or block device, read on demand
//! with positioned reads (the image is never loaded whole into memory).
//!
//! Reads that follow one another through the device are served from a
//! read-ahead window that doubles with each sequential miss, up to
//! [`MAX_WINDOW`] bytes: a checker walking an image laid out in order
//! (what `thin_restore` and a fresh pool write) makes one system call per
//! 256 KiB instead of one per 4 KiB block, and a random walk reads only
//! what it asks for.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use dmsim_model::block_device::{BlockDevice, IoError, WriteFlags, SECTOR_SIZE};
use dmsim_traces::file::{open_input, Accept};

/// A file opened read-only as a block device. A trailing partial sector
/// is ignored.
pub struct FileDevice {
    file: File,
    nr_sectors: u64,
    /// Bytes read ahead, starting at sector `window_start`.
    window: Vec<u8>,
    window_start: u64,
    /// The size of the next read-ahead, in bytes.
    next_window: usize,
}

/// The largest read-ahead, in bytes.
pub const MAX_WINDOW: usize = 256 * 1024;

impl FileDevice {
    /// Opens `path` read-only: a regular file or a block device (a
    /// directory, FIFO, socket or character device such as `/dev/zero` is
    /// refused, with an error naming the path and what it is).
    pub fn open(path: &Path) -> Result<Self, String> {
        let (file, len) = open_input(path, Accept::FileOrBlockDevice)?;
        Ok(FileDevice {
            file,
            nr_sectors: len / SECTOR_SIZE,
            window: Vec::new(),
            window_start: 0,
            next_window: 0,
        })
    }

    /// The sector just past the read-ahead window.
    fn window_end(&self) -> u64 {
        self.window_start + self.window.len() as u64 / SECTOR_SIZE
    }
}

impl BlockDevice for FileDevice {
    fn nr_sectors(&self) -> u64 {
        self.nr_sectors
    }

    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let len = buf.len();
        let in_range = sector
            .checked_add(len as u64 / SECTOR_SIZE)
            .is_some_and(|e| e <= self.nr_sectors && (len as u64).is_multiple_of(SECTOR_SIZE));
        if !in_range {
            return Err(IoError::OutOfRange { sector, len, nr_sectors: self.nr_sectors });
        }
        let end = sector + len as u64 / SECTOR_SIZE;
        if sector >= self.window_start && end <= self.window_end() {
            let at = ((sector - self.window_start) * SECTOR_SIZE) as usize;
            buf.copy_from_slice(&self.window[at..at + len]);
            return Ok(());
        }
        // A miss: read ahead if it continues the window, else only `buf`.
        let sequential = !self.window.is_empty() && sector == self.window_end();
        self.next_window = if sequential { (self.next_window * 2).clamp(len, MAX_WINDOW) } else { len };
        let ahead = ((self.nr_sectors - sector) * SECTOR_SIZE).min(self.next_window as u64) as usize;
        if ahead > len {
            self.window.resize(ahead, 0);
            if self.file.read_exact_at(&mut self.window, sector * SECTOR_SIZE).is_ok() {
                self.window_start = sector;
                buf.copy_from_slice(&self.window[..len]);
                return Ok(());
            }
            // A read error past `buf` must not fail `buf`: read it alone.
        }
        self.window.clear();
        self.window_start = sector;
        self.file
            .read_exact_at(buf, sector * SECTOR_SIZE)
            .map_err(|e| IoError::Failed { sector, reason: e.to_string() })?;
        // Remember `buf` as the window, so that the next read can tell it
        // follows on.
        self.window.extend_from_slice(buf);
        Ok(())
    }

    fn write(&mut self, sector: u64, _buf: &[u8], _flags: WriteFlags) -> Result<(), IoError> {
        Err(IoError::Failed { sector, reason: "the image is opened read-only".into() })
    }

    fn flush(&mut self) -> Result<(), IoError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn image(nr_sectors: u64) -> (std::path::PathBuf, Vec<u8>) {
        let bytes: Vec<u8> = (0..nr_sectors * SECTOR_SIZE).map(|i| (i * 7 + i / 4096) as u8).collect();
        let path =
            std::env::temp_dir().join(format!("dmsim-file-device-{}-{nr_sectors}.img", std::process::id()));
        std::fs::write(&path, &bytes).unwrap();
        (path, bytes)
    }

    proptest! {
        /// Whatever the order of the reads (runs through the device, jumps
        /// back, reads inside or across the window, up to the end), each
        /// returns the file's bytes.
        #[test]
        fn reads_in_any_order_return_the_files_bytes(
            reads in prop::collection::vec((0u64..700, 1u64..24, any::<bool>()), 1..120),
        ) {
            let (path, bytes) = image(600);
            let mut dev = FileDevice::open(&path).unwrap();
            let mut next = 0u64;
            for (at, len, follow) in reads {
                let sector = if follow { next } else { at };
                let mut buf = vec![0u8; (len * SECTOR_SIZE) as usize];
                let r = dev.read(sector, &mut buf);
                if sector + len > 600 {
                    prop_assert!(r.is_err());
                    next = 0;
                    continue;
                }
                prop_assert!(r.is_ok());
                let from = (sector * SECTOR_SIZE) as usize;
                prop_assert!(buf == bytes[from..from + buf.len()], "sector {} len {}", sector, len);
                next = sector + len;
            }
            std::fs::remove_file(&path).unwrap();
        }
    }

    #[test]
    fn a_sequential_walk_grows_the_window_to_its_maximum() {
        let (path, _) = image(2048);
        let mut dev = FileDevice::open(&path).unwrap();
        let mut buf = vec![0u8; 4096];
        for b in 0..200 {
            dev.read(b * 8, &mut buf).unwrap();
        }
        assert_eq!(dev.next_window, MAX_WINDOW);
        // A jump back reads only what it asks for.
        dev.read(0, &mut buf).unwrap();
        assert_eq!((dev.window_start, dev.window.len()), (0, 4096));
        std::fs::remove_file(&path).unwrap();
    }
}
