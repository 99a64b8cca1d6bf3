//! Reading untrusted metadata blocks without ever panicking.
//!
//! Every accessor here is bounds-checked and returns a neutral value (zero)
//! for an offset outside the block, so that a corrupt count or offset read
//! from disk can never index out of range. Callers validate header fields
//! before relying on them; these helpers are the safety net.

use crate::block_device::{BlockDevice, SECTOR_SIZE};
use crate::pdata::checksum;
use crate::pdata::layout::{BlockKind, BLOCK_SIZE};

/// One 4 KiB metadata block.
pub(crate) type Block = Box<[u8; BLOCK_SIZE]>;

/// Little-endian u32 at `off`, 0 when out of range.
pub(crate) fn le32(b: &[u8], off: usize) -> u32 {
    off.checked_add(4)
        .and_then(|end| b.get(off..end))
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// Little-endian u64 at `off`, 0 when out of range.
pub(crate) fn le64(b: &[u8], off: usize) -> u64 {
    off.checked_add(8).and_then(|end| b.get(off..end)).map_or(0, |s| {
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        u64::from_le_bytes(a)
    })
}

/// The two-bit count of `entry` in a bitmap block (header included in
/// `block`), with the kernel's bit order (see `layout::space_map`).
pub(crate) fn bitmap_entry(block: &[u8], entry: u64) -> u32 {
    let bit = match usize::try_from(entry).ok().and_then(|e| e.checked_mul(2)) {
        Some(b) => b,
        None => return 0,
    };
    let byte_of = |bit: usize| block.get(16 + bit / 8).copied().unwrap_or(0);
    let hi = (byte_of(bit) >> (bit % 8)) & 1;
    let lo = (byte_of(bit + 1) >> ((bit + 1) % 8)) & 1;
    u32::from((hi << 1) | lo)
}

/// Why a block could not be used as the structure it was expected to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BlockFault {
    /// Past the end of the device.
    OutOfRange {
        /// Blocks in the device.
        nr_blocks: u64,
    },
    /// The device refused the read.
    Io(String),
    /// Checksum does not match the expected kind; `looks_like` is the kind
    /// whose salt does match, if any.
    Checksum {
        /// The kind the block does checksum as.
        looks_like: Option<BlockKind>,
    },
    /// The self-location field names another block.
    WrongLocation(u64),
}

impl std::fmt::Display for BlockFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BlockFault::OutOfRange { nr_blocks } => {
                write!(f, "beyond the end of the metadata device ({nr_blocks} blocks)")
            }
            BlockFault::Io(e) => write!(f, "read failed: {e}"),
            BlockFault::Checksum { looks_like: Some(k) } => {
                write!(f, "bad checksum (the block checksums as a {k} block)")
            }
            BlockFault::Checksum { looks_like: None } => write!(f, "bad checksum"),
            BlockFault::WrongLocation(c) => write!(f, "block number mismatch: block claims to be {c}"),
        }
    }
}

/// Reads 4 KiB blocks from a device whose size is only trusted as far as
/// the device itself reports it.
pub(crate) struct Reader<'a> {
    dev: &'a mut dyn BlockDevice,
    nr_blocks: u64,
}

impl<'a> Reader<'a> {
    /// A reader over `dev`; a trailing partial block is ignored.
    pub(crate) fn new(dev: &'a mut dyn BlockDevice) -> Self {
        let nr_blocks = dev.nr_sectors() / (BLOCK_SIZE as u64 / SECTOR_SIZE);
        Reader { dev, nr_blocks }
    }

    /// Whole blocks in the device.
    pub(crate) fn nr_blocks(&self) -> u64 {
        self.nr_blocks
    }

    /// The raw block `b`.
    pub(crate) fn read(&mut self, b: u64) -> Result<Block, BlockFault> {
        if b >= self.nr_blocks {
            return Err(BlockFault::OutOfRange { nr_blocks: self.nr_blocks });
        }
        let mut block: Block = Box::new([0u8; BLOCK_SIZE]);
        // b < nr_blocks = nr_sectors / 8, so the multiplication cannot overflow.
        let sector = b * (BLOCK_SIZE as u64 / SECTOR_SIZE);
        self.dev.read(sector, &mut block[..]).map_err(|e| BlockFault::Io(e.to_string()))?;
        Ok(block)
    }

    /// Block `b`, validated as `kind`: checksum with the kind's salt and
    /// the self-location field.
    pub(crate) fn read_as(&mut self, b: u64, kind: BlockKind) -> Result<Block, BlockFault> {
        let block = self.read(b)?;
        verify(&block, b, kind)?;
        Ok(block)
    }
}

/// Checks a block's checksum and location as the kernel's validators do.
pub(crate) fn verify(block: &Block, b: u64, kind: BlockKind) -> Result<(), BlockFault> {
    if checksum::stored_checksum(&block[..]) != checksum::block_checksum(&block[..], kind.salt()) {
        return Err(BlockFault::Checksum { looks_like: kind_of(&block[..]) });
    }
    let claimed = le64(&block[..], kind.blocknr_offset());
    if claimed != b {
        return Err(BlockFault::WrongLocation(claimed));
    }
    Ok(())
}

/// The kind whose salt makes the block's checksum match, if any.
pub(crate) fn kind_of(block: &[u8]) -> Option<BlockKind> {
    let salt = checksum::salt_of(block)?;
    [
        BlockKind::ThinSuperblock,
        BlockKind::BtreeNode,
        BlockKind::Bitmap,
        BlockKind::MetadataIndex,
        BlockKind::Array,
        BlockKind::CacheSuperblock,
    ]
    .into_iter()
    .find(|k| k.salt() == salt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdata::layout::space_map::bitmap_set;

    #[test]
    fn accessors_never_panic_out_of_range() {
        let b = [1u8; 16];
        assert_eq!(le32(&b, 12), 0x0101_0101);
        assert_eq!(le32(&b, 13), 0);
        assert_eq!(le64(&b, usize::MAX), 0);
        assert_eq!(bitmap_entry(&b, u64::MAX), 0);
    }

    #[test]
    fn bitmap_entry_agrees_with_the_layout_codec() {
        let mut block = vec![0u8; BLOCK_SIZE];
        for (e, v) in [(0u64, 1u32), (1, 2), (31, 3), (32, 1), (16319, 2)] {
            bitmap_set(&mut block[16..], e, v);
        }
        for (e, v) in [(0u64, 1u32), (1, 2), (31, 3), (32, 1), (16319, 2), (5, 0)] {
            assert_eq!(bitmap_entry(&block, e), v, "entry {e}");
        }
    }
}
