//! The one door to storage: a sector-addressed block device.
//!
//! The metadata code talks to a [`BlockDevice`] in 4 KiB blocks; the data
//! path (later) uses arbitrary sector ranges. Both go through this trait so
//! that the simulator can put a fault-injecting disk underneath, tests an
//! in-memory one, and the command line a file.

use thiserror::Error;

/// Bytes in one sector, the unit of device addressing.
pub const SECTOR_SIZE: u64 = 512;

/// An I/O failure reported by a device.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IoError {
    /// The request reaches past the end of the device.
    #[error(
        "I/O beyond the end of the device: sector {sector} + {len} bytes, device has {nr_sectors} sectors"
    )]
    OutOfRange {
        /// First sector of the request.
        sector: u64,
        /// Length of the request in bytes.
        len: usize,
        /// Size of the device in sectors.
        nr_sectors: u64,
    },
    /// The device reported an error (EIO), e.g. an injected fault.
    #[error("I/O error at sector {sector}: {reason}")]
    Failed {
        /// First sector of the failed request.
        sector: u64,
        /// What the device said.
        reason: String,
    },
}

/// Flags carried by a write, with the kernel's meaning.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// REQ_FUA: the write is durable when it completes.
    pub fua: bool,
}

/// A device addressed in 512-byte sectors.
///
/// Writes are acknowledged into a (possibly volatile) write cache; only
/// [`BlockDevice::flush`] (REQ_PREFLUSH) or a FUA write makes them durable.
/// Buffers must be a whole number of sectors long.
pub trait BlockDevice {
    /// Size of the device in sectors.
    fn nr_sectors(&self) -> u64;
    /// Reads `buf.len()` bytes starting at `sector`.
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), IoError>;
    /// Writes `buf` starting at `sector`.
    fn write(&mut self, sector: u64, buf: &[u8], flags: WriteFlags) -> Result<(), IoError>;
    /// Makes every completed write durable (an empty REQ_PREFLUSH bio).
    fn flush(&mut self) -> Result<(), IoError>;
}

/// The byte range of a request of `len` bytes at `sector` on a device of
/// `device_bytes`, or the error a device reports for it: past the end, or
/// not a whole number of sectors. Shared by the in-memory devices.
pub fn byte_range(sector: u64, len: usize, device_bytes: u64) -> Result<std::ops::Range<usize>, IoError> {
    let out_of_range = || IoError::OutOfRange { sector, len, nr_sectors: device_bytes / SECTOR_SIZE };
    let start = sector.checked_mul(SECTOR_SIZE).ok_or_else(out_of_range)?;
    let end = start.checked_add(len as u64).ok_or_else(out_of_range)?;
    if end > device_bytes || !(len as u64).is_multiple_of(SECTOR_SIZE) {
        return Err(out_of_range());
    }
    Ok(start as usize..end as usize)
}

impl<D: BlockDevice + ?Sized> BlockDevice for &mut D {
    fn nr_sectors(&self) -> u64 {
        (**self).nr_sectors()
    }
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), IoError> {
        (**self).read(sector, buf)
    }
    fn write(&mut self, sector: u64, buf: &[u8], flags: WriteFlags) -> Result<(), IoError> {
        (**self).write(sector, buf, flags)
    }
    fn flush(&mut self) -> Result<(), IoError> {
        (**self).flush()
    }
}

/// An in-memory device with no write cache: every write is durable at once.
///
/// Used by tests and by tools that work on a whole image in memory. The
/// simulator's crash-aware disk lives in the `faults` crate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemDevice {
    bytes: Vec<u8>,
}

impl MemDevice {
    /// A zero-filled device of `nr_sectors` sectors.
    pub fn new(nr_sectors: u64) -> Self {
        MemDevice { bytes: vec![0; (nr_sectors * SECTOR_SIZE) as usize] }
    }

    /// A device holding `bytes`, padded with zeroes to a whole sector.
    pub fn from_bytes(mut bytes: Vec<u8>) -> Self {
        let rem = bytes.len() % SECTOR_SIZE as usize;
        if rem != 0 {
            bytes.resize(bytes.len() + SECTOR_SIZE as usize - rem, 0);
        }
        MemDevice { bytes }
    }

    /// The device's contents.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The device's contents, mutable (for tests that corrupt an image).
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        &mut self.bytes
    }

    /// Consumes the device, returning its contents.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    fn range(&self, sector: u64, len: usize) -> Result<std::ops::Range<usize>, IoError> {
        byte_range(sector, len, self.bytes.len() as u64)
    }
}

impl BlockDevice for MemDevice {
    fn nr_sectors(&self) -> u64 {
        self.bytes.len() as u64 / SECTOR_SIZE
    }
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let r = self.range(sector, buf.len())?;
        buf.copy_from_slice(&self.bytes[r]);
        Ok(())
    }
    fn write(&mut self, sector: u64, buf: &[u8], _flags: WriteFlags) -> Result<(), IoError> {
        let r = self.range(sector, buf.len())?;
        self.bytes[r].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), IoError> {
        Ok(())
    }
}

/// A read-only view of bytes in memory as a device (a trailing partial
/// sector is not part of it): for reading an image another owner holds,
/// without copying it. Writes fail.
#[derive(Debug, Clone, Copy)]
pub struct SliceDevice<'a> {
    bytes: &'a [u8],
}

impl<'a> SliceDevice<'a> {
    /// The device over `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        let whole = bytes.len() - bytes.len() % SECTOR_SIZE as usize;
        SliceDevice { bytes: &bytes[..whole] }
    }
}

impl BlockDevice for SliceDevice<'_> {
    fn nr_sectors(&self) -> u64 {
        self.bytes.len() as u64 / SECTOR_SIZE
    }
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let r = byte_range(sector, buf.len(), self.bytes.len() as u64)?;
        buf.copy_from_slice(&self.bytes[r]);
        Ok(())
    }
    fn write(&mut self, sector: u64, _buf: &[u8], _flags: WriteFlags) -> Result<(), IoError> {
        Err(IoError::Failed { sector, reason: "a read-only view".into() })
    }
    fn flush(&mut self) -> Result<(), IoError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_device_round_trips_and_rejects_out_of_range() {
        let mut d = MemDevice::new(8);
        d.write(1, &[7u8; 512], WriteFlags::default()).unwrap();
        let mut buf = [0u8; 1024];
        d.read(0, &mut buf).unwrap();
        assert!(buf[..512].iter().all(|&b| b == 0));
        assert!(buf[512..].iter().all(|&b| b == 7));
        assert!(matches!(d.read(7, &mut buf), Err(IoError::OutOfRange { .. })));
        assert!(matches!(d.read(u64::MAX, &mut buf), Err(IoError::OutOfRange { .. })));
    }

    #[test]
    fn slice_device_reads_whole_sectors_and_refuses_writes() {
        let mut bytes = vec![3u8; 1024 + 100];
        bytes[512] = 9;
        let mut d = SliceDevice::new(&bytes);
        assert_eq!(d.nr_sectors(), 2);
        let mut buf = [0u8; 512];
        d.read(1, &mut buf).unwrap();
        assert_eq!(buf[0], 9);
        assert!(matches!(d.read(2, &mut buf), Err(IoError::OutOfRange { .. })));
        assert!(d.write(0, &buf, WriteFlags::default()).is_err());
    }
}
