//! First end-to-end checks of the thin metadata writer.

use dmsim_model::block_device::MemDevice;
use dmsim_model::pdata::checksum::salt_of;
use dmsim_model::pdata::layout::{get_u64, BlockKind};
use dmsim_model::thin::superblock::Superblock;
use dmsim_model::thin::ThinMetadata;

const MB: u64 = 2048; // sectors

#[test]
fn fresh_format_has_the_kernel_layout() {
    let md = ThinMetadata::format(MemDevice::new(4 * MB), 128).unwrap();
    let dev = md.close().map_err(|(_, e)| e).unwrap();
    let bytes = dev.as_bytes();
    let block = |b: usize| &bytes[b * 4096..(b + 1) * 4096];
    let sb = Superblock::decode(block(0));
    // NB = 1 bitmap for a 1024-block metadata device.
    assert_eq!(sb.metadata_sm_root.bitmap_root, 1);
    assert_eq!(sb.metadata_sm_root.ref_count_root, 2);
    assert_eq!(get_u64(block(1), 16), 3, "first index entry points at bitmap 3");
    assert_eq!(sb.data_sm_root.bitmap_root, 4);
    assert_eq!(sb.data_sm_root.ref_count_root, 5);
    assert_eq!(sb.data_mapping_root, 6);
    assert_eq!(sb.device_details_root, 7);
    assert_eq!(sb.metadata_nr_blocks, 1024);
    assert_eq!(sb.metadata_sm_root.nr_blocks, 1024);
    assert_eq!(sb.metadata_sm_root.nr_allocated, 8);
    assert_eq!(sb.data_sm_root.nr_blocks, 0);
    assert_eq!(salt_of(block(0)), Some(BlockKind::ThinSuperblock.salt()));
    for b in [2, 4, 5, 6, 7] {
        assert_eq!(salt_of(block(b)), Some(BlockKind::BtreeNode.salt()), "block {b}");
    }
    assert_eq!(salt_of(block(3)), Some(BlockKind::Bitmap.salt()));
    assert_eq!(salt_of(block(1)), Some(BlockKind::MetadataIndex.salt()));
}

#[test]
fn mappings_survive_commit_and_reopen() {
    let mut md = ThinMetadata::format(MemDevice::new(8 * MB), 128).unwrap();
    md.resize_data_dev(100_000).unwrap();
    md.create_thin(0).unwrap();
    md.open_thin(0).unwrap();
    for v in 0..5000u64 {
        let d = md.alloc_data_block().unwrap();
        md.insert_block(0, v * 3, d).unwrap();
    }
    md.commit().unwrap();
    md.create_snap(1, 0).unwrap();
    md.open_thin(1).unwrap();
    for v in 0..200u64 {
        let d = md.alloc_data_block().unwrap();
        md.insert_block(1, v * 3, d).unwrap();
    }
    md.remove_range(0, 300, 9000).unwrap();
    md.close_thin(0).unwrap();
    md.close_thin(1).unwrap();
    md.commit().unwrap();
    let dev = md.close().map_err(|(_, e)| e).unwrap();

    let mut md = ThinMetadata::open(dev, 128, false).unwrap();
    md.open_thin(0).unwrap();
    md.open_thin(1).unwrap();
    assert_eq!(md.mapped_count(0).unwrap(), 5000 - 2900);
    assert_eq!(md.mapped_count(1).unwrap(), 5000);
    assert_eq!(md.find_block(0, 3).unwrap().unwrap().block, 1);
    assert!(md.find_block(0, 301).unwrap().is_none());
    assert!(md.find_block(0, 600).unwrap().is_none());
    let snap = md.find_block(1, 600).unwrap().unwrap();
    assert_eq!(snap.block, 200);
    assert!(snap.shared);
    assert_eq!(md.data_block_count(0).unwrap(), 1, "snapshot remapped block 0");
    // Data block v backs origin vblock 3v.
    // A snapshot references the origin's tree, not its data blocks: counts
    // only go up when a shared leaf is copied, so a block whose leaf both
    // devices still share keeps a count of 1.
    assert_eq!(md.data_block_count(3500).unwrap(), 1, "leaf still shared");
    assert_eq!(md.data_block_count(150).unwrap(), 0, "origin unmapped, snapshot remapped");
    assert_eq!(md.data_block_count(250).unwrap(), 1, "origin unmapped, snapshot kept");
    assert_eq!(md.free_data_blocks().unwrap(), 100_000 - 5200 + 150 - 50);
}
