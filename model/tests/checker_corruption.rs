//! The checker against images made by Debian's thin_restore and then
//! damaged one structure at a time. Each test asserts the checker names
//! the right structure and block.

#[path = "../../tests/support/mod.rs"]
mod support;

use dmsim_model::block_device::MemDevice;
use dmsim_model::pdata::layout::thin::*;
use dmsim_model::pdata::layout::{put_u32, put_u64, BlockKind};
use dmsim_model::thin::check::{check_thin_metadata, CheckOptions, CheckReport, Severity, Structure};
use support::{restore, thin_check_clean, Image};

const SIZE: u64 = 4 << 20;

/// Options for thin_restore images: their space-map totals are
/// inconsistent as written (see `restored_images_have_inconsistent_totals`).
fn lenient() -> CheckOptions {
    CheckOptions { check_totals: false, ..CheckOptions::default() }
}

fn check_with(img: &Image, opts: &CheckOptions) -> CheckReport {
    let mut dev = MemDevice::from_bytes(img.0.clone());
    let r = check_thin_metadata(&mut dev, opts).expect("usable image");
    if std::env::var_os("DMSIM_SHOW_REPORTS").is_some() {
        eprintln!("{}", dump(&r));
    }
    r
}

fn check(img: &Image) -> CheckReport {
    check_with(img, &lenient())
}

fn dump(r: &CheckReport) -> String {
    r.problems.iter().map(|p| format!("  {p}\n")).collect()
}

/// Asserts a problem in `structure` naming `block` exists.
#[track_caller]
fn assert_problem(r: &CheckReport, structure: Structure, block: Option<u64>, severity: Severity) {
    assert!(
        r.problems.iter().any(|p| p.structure == structure && p.block == block && p.severity == severity),
        "expected a {severity} problem in {structure} at block {block:?}; found:\n{}",
        dump(r)
    );
}

/// The baseline image for a fixture, asserted clean.
fn baseline(xml: &str) -> Option<Image> {
    let img = restore(xml, SIZE)?;
    let r = check(&img);
    assert!(r.is_clean(), "{xml} should be clean:\n{}", dump(&r));
    Some(img)
}

#[test]
fn restored_images_have_inconsistent_totals() {
    // thin_restore 0.9.0 frees block 8 (an empty leaf it no longer needs)
    // in the bitmap without updating the index entry's nr_free or the
    // root's nr_allocated. The strict checker says so; thin_check does
    // not look at these totals.
    let Some(img) = restore("two_devices.xml", SIZE) else { return };
    let r = check_with(&img, &CheckOptions::default());
    assert_problem(&r, Structure::MetadataSpaceMap, None, Severity::Damage);
    assert_problem(&r, Structure::MetadataBitmap { index: 0 }, Some(3), Severity::Damage);
    assert!(
        r.problems
            .iter()
            .all(|p| matches!(p.structure, Structure::MetadataSpaceMap | Structure::MetadataBitmap { .. })
                && !p.message.contains("count on disk")),
        "{}",
        dump(&r)
    );
    if let Some(clean) = thin_check_clean(&img, &[]) {
        assert!(clean, "thin_check 0.9.0 accepts thin_restore's own output");
    }
    // With the totals made consistent, the strict check is clean.
    let mut fixed = img.clone();
    fix_metadata_totals(&mut fixed);
    let r = check_with(&fixed, &CheckOptions::default());
    assert!(r.is_clean(), "{}", dump(&r));
}

/// Recomputes the metadata space map's nr_free (first bitmap) and
/// nr_allocated from the bitmap.
fn fix_metadata_totals(img: &mut Image) {
    let nr = img.metadata_sm().nr_blocks;
    let used = (0..nr).filter(|&b| img.metadata_count(b) != 0).count() as u64;
    let first_free = (0..nr).find(|&b| img.metadata_count(b) == 0).unwrap_or(nr);
    let idx = img.metadata_index();
    put_u32(img.block_mut(idx), 16 + 8, (nr - used) as u32);
    put_u32(img.block_mut(idx), 16 + 12, first_free as u32);
    img.reseal(idx, BlockKind::MetadataIndex);
    put_u64(img.block_mut(0), SB_METADATA_SM_ROOT + 8, used);
    img.reseal(0, BlockKind::ThinSuperblock);
}

#[test]
fn summary_facts() {
    let Some(img) = baseline("two_devices.xml") else { return };
    let r = check(&img);
    assert_eq!(r.transaction_id, 2);
    assert_eq!(r.data_nr_blocks, 1000);
    assert_eq!(r.devices.len(), 2);
    assert_eq!(r.devices[0].counted_mappings, Some(5));
    assert_eq!(r.devices[1].mapped_blocks, Some(2));
    assert_eq!(r.mapping_entries, 7);
}

#[test]
fn all_fixtures_are_clean() {
    for xml in ["empty.xml", "two_devices.xml", "snapshots.xml", "many.xml", "empty_device.xml"] {
        if baseline(xml).is_none() {
            return;
        }
    }
}

#[test]
fn superblock_bit_flip() {
    let Some(mut img) = baseline("two_devices.xml") else { return };
    img.flip_bit(0, 2000, 3);
    let r = check(&img);
    assert_problem(&r, Structure::Superblock, Some(0), Severity::Damage);
}

#[test]
fn details_tree_node_bit_flip() {
    let Some(mut img) = baseline("many.xml") else { return };
    let root = img.details_root();
    assert!(img.is_internal(root), "many.xml has an internal details node");
    img.flip_bit(root, 40, 0);
    assert_problem(&check(&img), Structure::DetailsTree { snap: false }, Some(root), Severity::Damage);
    // And a details leaf.
    let Some(mut img) = baseline("many.xml") else { return };
    let leaf = img.value_u64(img.details_root(), 1);
    img.flip_bit(leaf, 3000, 5);
    assert_problem(&check(&img), Structure::DetailsTree { snap: false }, Some(leaf), Severity::Damage);
}

#[test]
fn top_level_mapping_node_bit_flip() {
    let Some(mut img) = baseline("many.xml") else { return };
    let root = img.mapping_root();
    img.flip_bit(root, 100, 7);
    assert_problem(
        &check(&img),
        Structure::TopLevelMappingTree { snap: false },
        Some(root),
        Severity::Damage,
    );
}

#[test]
fn bottom_level_mapping_node_bit_flip() {
    let Some(img0) = baseline("many.xml") else { return };
    let root = img0.device_root(0);
    assert!(img0.is_internal(root), "device 0 of many.xml has an internal node");
    for b in [root, img0.value_u64(root, 1)] {
        let mut img = img0.clone();
        img.flip_bit(b, 4095, 1);
        assert_problem(
            &check(&img),
            Structure::MappingTree { dev: 0, snap: false },
            Some(b),
            Severity::Damage,
        );
    }
}

#[test]
fn data_space_map_index_tree_bit_flip() {
    let Some(mut img) = baseline("two_devices.xml") else { return };
    let root = img.data_sm().bitmap_root;
    img.flip_bit(root, 48, 2);
    assert_problem(&check(&img), Structure::DataIndexTree, Some(root), Severity::Damage);
}

#[test]
fn data_overflow_tree_bit_flip() {
    // Data block 5 is mapped by four devices: count 4 lives in the overflow tree.
    let Some(mut img) = baseline("snapshots.xml") else { return };
    let root = img.data_sm().ref_count_root;
    assert!(img.nr_entries(root) > 0, "the data overflow tree has an entry");
    img.flip_bit(root, 40, 4);
    assert_problem(&check(&img), Structure::DataOverflowTree, Some(root), Severity::Damage);
}

#[test]
fn metadata_overflow_tree_bit_flip() {
    let Some(mut img) = baseline("two_devices.xml") else { return };
    let root = img.metadata_sm().ref_count_root;
    img.flip_bit(root, 1000, 0);
    assert_problem(&check(&img), Structure::MetadataOverflowTree, Some(root), Severity::Damage);
}

#[test]
fn metadata_index_bit_flip() {
    let Some(mut img) = baseline("two_devices.xml") else { return };
    let idx = img.metadata_index();
    img.flip_bit(idx, 17, 0);
    assert_problem(&check(&img), Structure::MetadataIndex, Some(idx), Severity::Damage);
}

#[test]
fn metadata_bitmap_bit_flip() {
    let Some(mut img) = baseline("two_devices.xml") else { return };
    let bm = img.metadata_index_entry(0).blocknr;
    img.flip_bit(bm, 3000, 6);
    assert_problem(&check(&img), Structure::MetadataBitmap { index: 0 }, Some(bm), Severity::Damage);
}

#[test]
fn data_bitmap_bit_flip() {
    let Some(mut img) = baseline("two_devices.xml") else { return };
    let bm = img.data_index_entry(0).blocknr;
    img.flip_bit(bm, 16, 0);
    assert_problem(&check(&img), Structure::DataBitmap { index: 0 }, Some(bm), Severity::Damage);
}

#[test]
fn wrong_metadata_reference_count() {
    let Some(mut img) = baseline("two_devices.xml") else { return };
    let leaf = img.device_root(1);
    assert_eq!(img.metadata_count(leaf), 1);
    img.set_metadata_count(leaf, 2);
    let r = check(&img);
    assert_problem(&r, Structure::MetadataSpaceMap, Some(leaf), Severity::Damage);
    assert_eq!(r.problems.len(), 1, "{}", dump(&r));
    assert_ne!(thin_check_clean(&img, &[]), Some(true), "thin_check sees metadata counts");
}

#[test]
fn wrong_data_reference_count_which_thin_check_0_9_misses() {
    // Data block 10 is mapped by devices 0 and 1: count 2. Make it 1.
    let Some(mut img) = baseline("two_devices.xml") else { return };
    let bm = img.data_index_entry(0).blocknr;
    assert_eq!(img.bitmap_count(bm, 10), 2);
    img.set_data_count(10, 1);
    let r = check(&img);
    assert_problem(&r, Structure::DataSpaceMap, Some(10), Severity::Damage);
    assert_eq!(r.problems.len(), 1, "{}", dump(&r));
    // The gap: thin_check 0.9.0 has data reference counting disabled.
    if let Some(clean) = thin_check_clean(&img, &[]) {
        assert!(clean, "thin_check 0.9.0 was expected NOT to notice a wrong data count");
    }
}

#[test]
fn mapped_blocks_wrong_which_thin_check_0_9_misses() {
    let Some(mut img) = baseline("two_devices.xml") else { return };
    let (leaf, i) = img.find(img.details_root(), 0).unwrap();
    let off = img.value_offset(leaf, i);
    assert_eq!(img.u64_at(leaf, off), 5);
    put_u64(img.block_mut(leaf), off, 6);
    img.reseal(leaf, BlockKind::BtreeNode);
    let r = check(&img);
    assert_problem(&r, Structure::Device { dev: 0, snap: false }, None, Severity::Damage);
    assert_eq!(r.problems.len(), 1, "{}", dump(&r));
    // The gap: thin_check 0.9.0 does not compare mapped_blocks.
    if let Some(clean) = thin_check_clean(&img, &[]) {
        assert!(clean, "thin_check 0.9.0 was expected NOT to notice a wrong mapped_blocks");
    }
}

#[test]
fn keys_out_of_order() {
    let Some(mut img) = baseline("two_devices.xml") else { return };
    let leaf = img.device_root(0);
    // Swap keys 0 and 1 (values stay), then re-seal: only the order is wrong.
    let (k0, k1) = (img.key(leaf, 0), img.key(leaf, 1));
    put_u64(img.block_mut(leaf), 32, k1);
    put_u64(img.block_mut(leaf), 40, k0);
    img.reseal(leaf, BlockKind::BtreeNode);
    let r = check(&img);
    assert_problem(&r, Structure::MappingTree { dev: 0, snap: false }, Some(leaf), Severity::Damage);
    assert!(r.problems.iter().any(|p| p.message.contains("out of order")), "{}", dump(&r));
    assert_ne!(thin_check_clean(&img, &[]), Some(true));
}

#[test]
fn leaked_block_is_non_fatal_but_not_clean() {
    let Some(mut img) = baseline("two_devices.xml") else { return };
    let b = img.free_metadata_block(20);
    img.set_metadata_count(b, 1);
    let r = check(&img);
    assert_problem(&r, Structure::MetadataSpaceMap, Some(b), Severity::NonFatal);
    assert!(!r.is_clean() && !r.has_damage(), "{}", dump(&r));
    // thin_check 0.9.0: a leak is non-fatal, yet still exit status 1
    // unless --ignore-non-fatal-errors.
    if let Some(clean) = thin_check_clean(&img, &[]) {
        assert!(!clean, "thin_check 0.9.0 exits non-zero on a leak");
        assert_eq!(thin_check_clean(&img, &["--ignore-non-fatal-errors"]), Some(true));
    }
}

#[test]
fn two_devices_sharing_a_leaf_without_the_count() {
    let Some(mut img) = baseline("two_devices.xml") else { return };
    let (leaf0, leaf1) = (img.device_root(0), img.device_root(1));
    // Point device 1 at device 0's tree in the top-level leaf.
    let top = img.mapping_root();
    let (tl, i) = img.find(top, 1).unwrap();
    let off = img.value_offset(tl, i);
    put_u64(img.block_mut(tl), off, leaf0);
    img.reseal(tl, BlockKind::BtreeNode);
    let r = check(&img);
    // Two references, one counted.
    assert_problem(&r, Structure::MetadataSpaceMap, Some(leaf0), Severity::Damage);
    // Device 1's old leaf is now unreferenced (a leak).
    assert_problem(&r, Structure::MetadataSpaceMap, Some(leaf1), Severity::NonFatal);
    // And device 1's details no longer match its tree.
    assert_problem(&r, Structure::Device { dev: 1, snap: false }, None, Severity::Damage);
    assert_ne!(thin_check_clean(&img, &[]), Some(true));
}

#[test]
fn mapping_leaf_also_used_as_a_bitmap() {
    let Some(mut img) = baseline("two_devices.xml") else { return };
    let leaf = img.device_root(0);
    // The data space map's index entry 0 now names device 0's leaf.
    let root = img.data_sm().bitmap_root;
    let off = img.value_offset(root, 0);
    put_u64(img.block_mut(root), off, leaf);
    img.reseal(root, BlockKind::BtreeNode);
    let r = check(&img);
    assert!(
        r.problems.iter().any(|p| p.block == Some(leaf) && p.message.contains("used both as")),
        "{}",
        dump(&r)
    );
    assert!(r.has_damage());
}

#[test]
fn mapping_past_the_data_device() {
    let Some(mut img) = baseline("two_devices.xml") else { return };
    let leaf = img.device_root(1);
    let off = img.value_offset(leaf, 1);
    put_u64(img.block_mut(leaf), off, pack_block_time(1000, 0));
    img.reseal(leaf, BlockKind::BtreeNode);
    let r = check(&img);
    assert_problem(&r, Structure::MappingTree { dev: 1, snap: false }, Some(leaf), Severity::Damage);
}

#[test]
fn reference_past_the_metadata_device() {
    let Some(mut img) = baseline("two_devices.xml") else { return };
    let top = img.mapping_root();
    let off = img.value_offset(top, 0);
    put_u64(img.block_mut(top), off, 1 << 40);
    img.reseal(top, BlockKind::BtreeNode);
    let r = check(&img);
    assert_problem(&r, Structure::MappingTree { dev: 0, snap: false }, Some(1 << 40), Severity::Damage);
}

#[test]
fn child_outside_the_parent_key_range() {
    let Some(mut img) = baseline("many.xml") else { return };
    let root = img.device_root(0);
    // Raise the parent's key for child 1 above that child's first key.
    let child = img.value_u64(root, 1);
    let first = img.key(child, 0);
    put_u64(img.block_mut(root), 32 + 8, first + 1);
    img.reseal(root, BlockKind::BtreeNode);
    let r = check(&img);
    assert_problem(&r, Structure::MappingTree { dev: 0, snap: false }, Some(child), Severity::Damage);
}

#[test]
fn cycle_is_reported_not_followed() {
    let Some(mut img) = baseline("many.xml") else { return };
    let root = img.device_root(0);
    let off = img.value_offset(root, 1);
    put_u64(img.block_mut(root), off, root);
    img.reseal(root, BlockKind::BtreeNode);
    let r = check(&img);
    assert!(r.has_damage(), "{}", dump(&r));
    assert_problem(&r, Structure::MappingTree { dev: 0, snap: false }, Some(root), Severity::Damage);
}

#[test]
fn metadata_snapshot_is_checked_and_counted() {
    let Some(mut img) = baseline("snapshots.xml") else { return };
    let snap = img.take_metadata_snapshot();
    let r = check(&img);
    assert!(r.is_clean(), "{}", dump(&r));
    assert_eq!(r.held_root, snap);
    if let Some(clean) = thin_check_clean(&img, &[]) {
        assert!(clean, "thin_check accepts the hand-made metadata snapshot");
    }
    // Forgetting the snapshot's reference to the details root is damage.
    let mut bad = img.clone();
    let d = bad.details_root();
    bad.set_metadata_count(d, 1);
    assert_problem(&check(&bad), Structure::MetadataSpaceMap, Some(d), Severity::Damage);
    // Damage inside the copy is reported against the snapshot.
    let mut bad = img.clone();
    bad.flip_bit(snap, 3000, 1);
    assert_problem(&check(&bad), Structure::SnapshotSuperblock, Some(snap), Severity::Damage);
}

#[test]
fn snapshot_only_device_mappings_count_as_data_references() {
    // Remove device 7 from the live trees after taking a snapshot: its
    // data references are then held only by the snapshot's leaves, and
    // the data space map must still count them.
    let Some(mut img) = baseline("snapshots.xml") else { return };
    let before = check(&img);
    img.take_metadata_snapshot();
    // Point the live superblock at fresh copies of the two roots that lack
    // device 7 (the last entry of each root leaf).
    for root_off in [SB_DEVICE_DETAILS_ROOT, SB_DATA_MAPPING_ROOT] {
        let old = img.sb_u64(root_off);
        let new = img.free_metadata_block(1);
        let mut blk = img.block(old).to_vec();
        let n = u32::from_le_bytes(blk[16..20].try_into().unwrap());
        put_u32(&mut blk, 16, n - 1);
        BlockKind::BtreeNode.prepare_for_write(&mut blk, new);
        img.block_mut(new).copy_from_slice(&blk);
        img.set_metadata_count(new, 1);
        img.set_metadata_count(old, 1);
        if root_off == SB_DATA_MAPPING_ROOT {
            // The new top-level leaf holds its own reference to each
            // remaining device's subtree root.
            for i in 0..(n - 1) as usize {
                let sub = img.value_u64(new, i);
                let c = img.metadata_count(sub);
                img.set_metadata_count(sub, c + 1);
            }
        }
        put_u64(img.block_mut(0), root_off, new);
        img.reseal(0, BlockKind::ThinSuperblock);
    }
    let r = check(&img);
    assert!(r.is_clean(), "{}", dump(&r));
    assert!(r.devices.iter().any(|d| d.dev == 7 && d.snapshot_only), "{:?}", r.devices);
    assert_eq!(r.mapping_entries, before.mapping_entries);
}

#[test]
fn leaves_at_unequal_depths() {
    let Some(mut img) = baseline("many.xml") else { return };
    let root = img.device_root(0);
    assert!(img.is_internal(root) && !img.is_internal(img.value_u64(root, 1)));
    // Put an extra internal level above child 1 only: a copy of the root
    // holding just that child, referenced from the root in its place.
    let extra = img.free_metadata_block(1);
    let mut blk = img.block(root).to_vec();
    let (k1, c1) = (img.key(root, 1), img.value_u64(root, 1));
    put_u32(&mut blk, 16, 1);
    put_u64(&mut blk, 32, k1);
    let voff = img.value_offset(root, 0);
    put_u64(&mut blk, voff, c1);
    BlockKind::BtreeNode.prepare_for_write(&mut blk, extra);
    img.block_mut(extra).copy_from_slice(&blk);
    img.set_metadata_count(extra, 1);
    let off = img.value_offset(root, 1);
    put_u64(img.block_mut(root), off, extra);
    img.reseal(root, BlockKind::BtreeNode);
    let r = check(&img);
    assert_problem(&r, Structure::MappingTree { dev: 0, snap: false }, Some(root), Severity::Damage);
    assert!(r.problems.iter().any(|p| p.message.contains("unequal depths")), "{}", dump(&r));
    assert_ne!(thin_check_clean(&img, &[]), Some(true));
}

#[test]
fn truncated_image() {
    let Some(img) = baseline("many.xml") else { return };
    let mut short = img.clone();
    short.0.truncate(100 * 4096);
    let r = check(&short);
    assert_problem(&r, Structure::MetadataSpaceMap, None, Severity::Damage);
    assert!(r.has_damage());
    // Too short for a superblock: unusable, not a panic.
    let mut dev = MemDevice::from_bytes(img.0[..3000].to_vec());
    assert!(check_thin_metadata(&mut dev, &lenient()).is_err());
}
