//! A read-only [`BlockDevice`] over a file or block device, read on demand
//! with positioned reads (the image is never loaded whole into memory).

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
}

impl FileDevice {
    /// Opens `path` read-only: a regular file or a block device (a
    /// directory, FIFO, socket or character device such as `/dev/zero` is
    /// refused, with an error naming the path and what it is).
    pub fn open(path: &Path) -> Result<Self, String> {
        let (file, len) = open_input(path, Accept::FileOrBlockDevice)?;
        Ok(FileDevice { file, nr_sectors: len / SECTOR_SIZE })
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
        self.file
            .read_exact_at(buf, sector * SECTOR_SIZE)
            .map_err(|e| IoError::Failed { sector, reason: e.to_string() })
    }

    fn write(&mut self, sector: u64, _buf: &[u8], _flags: WriteFlags) -> Result<(), IoError> {
        Err(IoError::Failed { sector, reason: "the image is opened read-only".into() })
    }

    fn flush(&mut self) -> Result<(), IoError> {
        Ok(())
    }
}
