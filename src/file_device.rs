//! A read-only [`BlockDevice`] over a file or block device, read on demand
//! with positioned reads (the image is never loaded whole into memory).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use dmsim_model::block_device::{BlockDevice, IoError, WriteFlags, SECTOR_SIZE};

/// A file opened read-only as a block device. A trailing partial sector
/// is ignored.
pub struct FileDevice {
    file: File,
    nr_sectors: u64,
}

impl FileDevice {
    /// Opens `path` read-only.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        // seek to the end rather than metadata().len(): block devices
        // report a length of 0 in their metadata.
        let len = {
            use std::io::{Seek, SeekFrom};
            let mut f = &file;
            f.seek(SeekFrom::End(0))?
        };
        Ok(FileDevice { file, nr_sectors: len / SECTOR_SIZE })
    }
}

impl BlockDevice for FileDevice {
    fn nr_sectors(&self) -> u64 {
        self.nr_sectors
    }

    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let len = buf.len();
        let out_of_range = || IoError::OutOfRange { sector, len, nr_sectors: self.nr_sectors };
        let end = sector
            .checked_add(len as u64 / SECTOR_SIZE)
            .filter(|&e| e <= self.nr_sectors && (len as u64).is_multiple_of(SECTOR_SIZE))
            .ok_or_else(out_of_range)?;
        let _ = end;
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
