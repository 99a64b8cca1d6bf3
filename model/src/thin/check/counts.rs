//! The committed data reference counts of a thin-pool metadata image,
//! read without checking anything else: what a commit made durable about
//! who holds which data block.
//!
//! Two commits can leave superblocks alike in every field (transaction id,
//! totals of allocated blocks) and still hold different counts: a
//! passdown discard's first pass raises a shared block's count that its
//! second pass drops again, and a commit between the two makes the raised
//! count durable. Comparing these counts tells such commits apart.

use std::collections::BTreeMap;

use crate::block_device::BlockDevice;
use crate::pdata::layout::space_map::SmRoot;
use crate::pdata::layout::space_map::{
    IndexEntry, ENTRIES_PER_BITMAP, INDEX_ENTRY_SIZE, REF_COUNT_VALUE_SIZE, ROOT_SIZE,
};
use crate::pdata::layout::thin::{SB_DATA_SM_ROOT, SUPERBLOCK_LOCATION};
use crate::pdata::layout::BlockKind;

use super::block::{bitmap_entry, le32, Reader};
use super::node::scan;

/// Every data block with a non-zero reference count in the data space map
/// the superblock of `dev` points at (the last commit's, as the device
/// reads now), with its count. An error says what could not be read:
/// a block's checksum or location, a btree, a missing bitmap.
pub fn committed_data_counts(dev: &mut dyn BlockDevice) -> Result<BTreeMap<u64, u32>, String> {
    let mut reader = Reader::new(dev);
    let sb = reader
        .read_as(SUPERBLOCK_LOCATION, BlockKind::ThinSuperblock)
        .map_err(|e| format!("superblock: {e}"))?;
    let root = SmRoot::decode(&sb[SB_DATA_SM_ROOT..SB_DATA_SM_ROOT + ROOT_SIZE]);
    let mut index: BTreeMap<u64, IndexEntry> = BTreeMap::new();
    scan(&mut reader, root.bitmap_root, INDEX_ENTRY_SIZE, true, &mut |k, v| {
        index.insert(k, IndexEntry::decode(v));
        Ok(())
    })
    .map_err(|e| format!("data space map index, node {}: {}", e.block, e.what))?;
    let mut overflow: BTreeMap<u64, u32> = BTreeMap::new();
    scan(&mut reader, root.ref_count_root, REF_COUNT_VALUE_SIZE, true, &mut |k, v| {
        overflow.insert(k, le32(v, 0));
        Ok(())
    })
    .map_err(|e| format!("data space map overflow tree, node {}: {}", e.block, e.what))?;
    let nr_bitmaps = root.nr_blocks.div_ceil(ENTRIES_PER_BITMAP);
    let mut counts = BTreeMap::new();
    for i in 0..nr_bitmaps {
        let Some(e) = index.get(&i) else {
            return Err(format!("data space map: no index entry for bitmap {i}"));
        };
        let bitmap =
            reader.read_as(e.blocknr, BlockKind::Bitmap).map_err(|f| format!("data bitmap {i}: {f}"))?;
        let first = i * ENTRIES_PER_BITMAP;
        for entry in 0..ENTRIES_PER_BITMAP.min(root.nr_blocks - first) {
            let b = first + entry;
            let count = match bitmap_entry(&bitmap[..], entry) {
                0 => continue,
                3 => *overflow
                    .get(&b)
                    .ok_or_else(|| format!("data block {b}: count 3 or more, not in the overflow tree"))?,
                c => c,
            };
            counts.insert(b, count);
        }
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block_device::{MemDevice, SliceDevice};
    use crate::thin::ThinMetadata;

    fn counts(md: &mut ThinMetadata<MemDevice>) -> Result<BTreeMap<u64, u32>, String> {
        let bytes = md.transaction_manager().block_manager().device().as_bytes();
        committed_data_counts(&mut SliceDevice::new(bytes))
    }

    #[test]
    fn counts_are_the_last_commits_overflow_included() {
        let mut md = ThinMetadata::format(MemDevice::new(8 * 1024), 128).unwrap();
        md.resize_data_dev(20_000).unwrap();
        md.create_thin(0).unwrap();
        md.open_thin(0).unwrap();
        let b = md.alloc_data_block().unwrap();
        md.insert_block(0, 5, b).unwrap();
        // A block of the second bitmap.
        md.inc_data_range(16_400, 16_401).unwrap();
        md.commit().unwrap();
        assert_eq!(counts(&mut md).unwrap(), BTreeMap::from([(b, 1), (16_400, 1)]));
        // Raised in the open transaction only: the commit's counts stand.
        md.inc_data_range(b, b + 1).unwrap();
        assert_eq!(counts(&mut md).unwrap(), BTreeMap::from([(b, 1), (16_400, 1)]));
        md.commit().unwrap();
        assert_eq!(counts(&mut md).unwrap(), BTreeMap::from([(b, 2), (16_400, 1)]));
        // Past the bitmap's two bits: the overflow tree.
        md.inc_data_range(b, b + 1).unwrap();
        md.inc_data_range(b, b + 1).unwrap();
        md.commit().unwrap();
        assert_eq!(counts(&mut md).unwrap(), BTreeMap::from([(b, 4), (16_400, 1)]));
    }

    #[test]
    fn unreadable_images_are_errors_not_panics() {
        assert!(committed_data_counts(&mut MemDevice::new(0)).is_err());
        assert!(committed_data_counts(&mut MemDevice::new(64)).is_err());
        let mut md = ThinMetadata::format(MemDevice::new(8 * 256), 128).unwrap();
        md.resize_data_dev(100).unwrap();
        md.commit().unwrap();
        let mut bytes = md.transaction_manager().block_manager().device().as_bytes().to_vec();
        assert_eq!(committed_data_counts(&mut SliceDevice::new(&bytes)), Ok(BTreeMap::new()));
        // Every block but the superblock zeroed: the index is gone.
        bytes[4096..].fill(0);
        let e = committed_data_counts(&mut SliceDevice::new(&bytes)).unwrap_err();
        assert!(e.contains("index"), "{e}");
    }
}
