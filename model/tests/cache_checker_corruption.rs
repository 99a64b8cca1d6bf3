//! The cache metadata checker against images written by the model
//! (`model::cache::metadata`), each damaged in one structure. Each test
//! asserts the checker reports it as a problem naming the right structure
//! and block. Where only a field is to be wrong, the block's checksum is
//! re-sealed so that the checksum does not give the damage away.

mod cache_common;
#[path = "../../tests/support/mod.rs"]
mod support;

use cache_common::{CacheOp, Run};
use dmsim_model::block_device::MemDevice;
use dmsim_model::cache::check::{
    check_cache_metadata, CacheCheckOptions, CacheCheckReport, Severity, Structure,
};
use dmsim_model::cache::inspect::{read_image, CacheImage};
use dmsim_model::pdata::layout::array::{value_offset, HEADER_SIZE};
use dmsim_model::pdata::layout::cache::{
    pack_mapping, M_DIRTY, M_VALID, SB_CACHE_BLOCKS, SB_METADATA_SM_ROOT,
};
use dmsim_model::pdata::layout::space_map::{bitmap_get, bitmap_set, IndexEntry, SmRoot};
use dmsim_model::pdata::layout::{get_u64, put_u32, put_u64, BlockKind};
use support::Image;

/// First cache block mapped, first origin block, number of mappings.
const FIRST_CBLOCK: u64 = 10;
const FIRST_OBLOCK: u64 = 5000;
const NR_MAPPED: u64 = 1200;

/// A model-written image: 3,000 cache blocks, 1,200 mapped (three array
/// blocks of mappings), some dirty, some discards, a clean shutdown (so
/// the hint array exists). Returns the image and its decoding.
fn base(version: u32) -> (Image, CacheImage) {
    let mut run = Run::new(version, 1024, 3000);
    run.apply(&CacheOp::InsertRun {
        cblock: FIRST_CBLOCK as u32,
        oblock: FIRST_OBLOCK,
        len: NR_MAPPED as u32,
    });
    run.apply(&CacheOp::Commit);
    for c in [10u32, 11, 600, 1100] {
        run.apply(&CacheOp::SetDirty { cblock: c, dirty: true });
    }
    for d in [0u64, 1, 77] {
        run.apply(&CacheOp::Discard { dblock: d, on: true });
    }
    let (dev, _) = run.finish();
    let img = Image(dev.into_bytes());
    let decoded = read_image(&mut MemDevice::from_bytes(img.0.clone())).expect("model image decodes");
    (img, decoded)
}

fn check_with(img: &Image, opts: &CacheCheckOptions) -> CacheCheckReport {
    let mut dev = MemDevice::from_bytes(img.0.clone());
    let r = check_cache_metadata(&mut dev, opts).expect("usable image");
    if std::env::var_os("DMSIM_SHOW_REPORTS").is_some() {
        eprintln!("{}", show(&r));
    }
    r
}

fn check(img: &Image) -> CacheCheckReport {
    check_with(img, &CacheCheckOptions::default())
}

fn show(r: &CacheCheckReport) -> String {
    r.problems.iter().map(|p| format!("  {p}\n")).collect()
}

/// Asserts a problem of `severity` in `structure` naming `block` whose
/// message contains `words`.
#[track_caller]
fn assert_problem(
    r: &CacheCheckReport,
    structure: Structure,
    block: Option<u64>,
    severity: Severity,
    words: &str,
) {
    assert!(
        r.problems.iter().any(|p| p.structure == structure
            && p.block == block
            && p.severity == severity
            && p.message.contains(words)),
        "expected a {severity} problem in {structure} at block {block:?} saying {words:?}; found:\n{}",
        show(r)
    );
}

fn sm_root(img: &Image) -> SmRoot {
    SmRoot::decode(&img.block(0)[SB_METADATA_SM_ROOT..SB_METADATA_SM_ROOT + 32])
}

fn bitmap0(img: &Image) -> u64 {
    IndexEntry::decode(&img.block(sm_root(img).bitmap_root)[16..32]).blocknr
}

/// Overwrites mapping `cblock` (value in the mapping array) and re-seals
/// its array block.
fn set_mapping(img: &mut Image, d: &CacheImage, cblock: u64, value: u64) -> u64 {
    let b = d.blocks.mapping.ablocks[(cblock / 509) as usize];
    put_u64(img.block_mut(b), value_offset(8, (cblock % 509) as usize), value);
    img.reseal(b, BlockKind::Array);
    b
}

#[test]
fn model_images_are_clean() {
    for version in [1, 2] {
        let (img, d) = base(version);
        let r = check(&img);
        assert!(r.is_clean(), "v{version}:\n{}", show(&r));
        assert_eq!(r.mapped_blocks, NR_MAPPED);
        assert_eq!(r.dirty_blocks, 4);
        assert_eq!(r.cache_blocks, 3000);
        assert!(d.blocks.mapping.ablocks.len() == 6 && d.hints.is_some());
    }
}

#[test]
fn a_flipped_bit_in_the_superblock_is_caught() {
    let (mut img, _) = base(1);
    img.flip_bit(0, SB_CACHE_BLOCKS, 3);
    let r = check(&img);
    assert_problem(&r, Structure::CacheSuperblock, Some(0), Severity::Damage, "checksum");
}

#[test]
fn a_flipped_bit_in_an_array_block_is_caught() {
    for version in [1, 2] {
        let (mut img, d) = base(version);
        let b = d.blocks.mapping.ablocks[1];
        img.flip_bit(b, value_offset(8, 17), 5);
        let r = check(&img);
        assert_problem(&r, Structure::MappingArray, Some(b), Severity::Damage, "array block 1: bad checksum");
        // A header field, re-sealed: only the field is wrong.
        let (mut img, d) = base(version);
        let b = d.blocks.mapping.ablocks[0];
        put_u32(img.block_mut(b), 12, 4);
        img.reseal(b, BlockKind::Array);
        let r = check(&img);
        assert_problem(&r, Structure::MappingArray, Some(b), Severity::Damage, "value size 4, expected 8");
    }
}

#[test]
fn a_flipped_bit_in_an_array_btree_node_is_caught() {
    let (mut img, d) = base(2);
    let root = d.blocks.mapping.nodes[0];
    img.flip_bit(root, 40, 0);
    let r = check(&img);
    assert_problem(&r, Structure::MappingArray, Some(root), Severity::Damage, "bad checksum");
    // The hint array's btree, re-sealed with a key out of order.
    let (mut img, d) = base(1);
    let root = d.blocks.hint.as_ref().expect("hints").nodes[0];
    put_u64(img.block_mut(root), 32, 1);
    img.reseal(root, BlockKind::BtreeNode);
    let r = check(&img);
    assert_problem(&r, Structure::HintArray, Some(root), Severity::Damage, "keys out of order");
}

#[test]
fn a_flipped_bit_in_a_bitset_word_block_is_caught() {
    let (mut img, d) = base(2);
    let b = d.blocks.discard.ablocks[0];
    img.flip_bit(b, HEADER_SIZE + 3, 1);
    let r = check(&img);
    assert_problem(&r, Structure::DiscardBitset, Some(b), Severity::Damage, "bad checksum");
    let (mut img, d) = base(2);
    let b = d.blocks.dirty.as_ref().expect("v2 dirty bitset").ablocks[0];
    img.flip_bit(b, HEADER_SIZE, 0);
    let r = check(&img);
    assert_problem(&r, Structure::DirtyBitset, Some(b), Severity::Damage, "bad checksum");
}

#[test]
fn a_flipped_bit_in_a_space_map_block_is_caught() {
    let (mut img, _) = base(1);
    let bitmap = bitmap0(&img);
    img.flip_bit(bitmap, 100, 2);
    let r = check(&img);
    assert_problem(
        &r,
        Structure::MetadataBitmap { index: 0 },
        Some(bitmap),
        Severity::Damage,
        "bad checksum",
    );
    let (mut img, _) = base(1);
    let index = sm_root(&img).bitmap_root;
    img.flip_bit(index, 20, 1);
    let r = check(&img);
    assert_problem(&r, Structure::MetadataIndex, Some(index), Severity::Damage, "bad checksum");
}

#[test]
fn a_wrong_reference_count_is_caught() {
    for version in [1, 2] {
        // Count 2 where one array btree leaf references the block.
        let (mut img, d) = base(version);
        let b = d.blocks.mapping.ablocks[2];
        let bitmap = bitmap0(&img);
        assert_eq!(bitmap_get(&img.block(bitmap)[16..], b), 1);
        bitmap_set(&mut img.block_mut(bitmap)[16..], b, 2);
        img.reseal(bitmap, BlockKind::Bitmap);
        let r = check(&img);
        assert_problem(
            &r,
            Structure::MetadataSpaceMap,
            Some(b),
            Severity::Damage,
            "count on disk 2, expected 1",
        );
        // Count 0 for a block in use: damage too.
        let (mut img, d) = base(version);
        let b = d.blocks.discard.nodes[0];
        let bitmap = bitmap0(&img);
        bitmap_set(&mut img.block_mut(bitmap)[16..], b, 0);
        img.reseal(bitmap, BlockKind::Bitmap);
        let r = check_with(&img, &CacheCheckOptions { check_totals: false, ..Default::default() });
        assert_problem(
            &r,
            Structure::MetadataSpaceMap,
            Some(b),
            Severity::Damage,
            "count on disk 0, expected 1",
        );
        // Count 1 for a block nothing references: a leak, non-fatal.
        let (mut img, _) = base(version);
        let free = sm_root(&img).nr_blocks - 1;
        bitmap_set(&mut img.block_mut(bitmap)[16..], free, 1);
        img.reseal(bitmap, BlockKind::Bitmap);
        let r = check_with(&img, &CacheCheckOptions { check_totals: false, ..Default::default() });
        assert_problem(&r, Structure::MetadataSpaceMap, Some(free), Severity::NonFatal, "leaked");
        assert!(!r.has_damage(), "a leak alone is not damage:\n{}", show(&r));
        // With the totals checked, the index entry and root disagree too.
        let r = check(&img);
        assert_problem(
            &r,
            Structure::MetadataBitmap { index: 0 },
            Some(bitmap),
            Severity::Damage,
            "free entries",
        );
    }
}

#[test]
fn a_dirty_bit_on_an_unmapped_block_is_caught() {
    // Version 2: the bit in the dirty bitset.
    let (mut img, d) = base(2);
    let b = d.blocks.dirty.as_ref().expect("dirty bitset").ablocks[0];
    let unmapped = 2000u64;
    let off = value_offset(8, (unmapped / 64) as usize);
    let word = get_u64(img.block(b), off) | 1 << (unmapped % 64);
    put_u64(img.block_mut(b), off, word);
    img.reseal(b, BlockKind::Array);
    let r = check(&img);
    // Not damage: the kernel leaves such bits after an unclean shutdown
    // (dirty bits are written only by a clean one).
    assert_problem(&r, Structure::DirtyBitset, Some(b), Severity::NonFatal, "unmapped cache block 2000");
    assert_eq!(r.dirty_blocks, 4, "unmapped blocks are not counted dirty");
    // Version 1: M_DIRTY without M_VALID in the mapping.
    let (mut img, d) = base(1);
    let b = set_mapping(&mut img, &d, unmapped, pack_mapping(0, M_DIRTY));
    let r = check(&img);
    assert_problem(&r, Structure::MappingArray, Some(b), Severity::NonFatal, "unmapped but flagged dirty");
}

#[test]
fn two_cache_blocks_mapping_one_origin_block_are_caught() {
    for version in [1, 2] {
        let (mut img, d) = base(version);
        let b = set_mapping(&mut img, &d, 1000, pack_mapping(FIRST_OBLOCK + 3, M_VALID));
        let r = check(&img);
        let words = format!("origin block {} is mapped by cache blocks 13 and 1000", FIRST_OBLOCK + 3);
        assert_problem(&r, Structure::MappingArray, Some(b), Severity::Damage, &words);
    }
}

#[test]
fn a_cache_block_past_the_end_is_caught() {
    for version in [1, 2] {
        // The superblock says 500 cache blocks; the mapping array holds
        // 3,000 entries, with mappings up to cache block 1,209.
        let (mut img, d) = base(version);
        put_u32(img.block_mut(0), SB_CACHE_BLOCKS, 500);
        img.reseal(0, BlockKind::CacheSuperblock);
        let r = check(&img);
        let last = *d.blocks.mapping.ablocks.last().unwrap();
        assert_problem(&r, Structure::MappingArray, Some(last), Severity::Damage, "needs 500");
        let b = d.blocks.mapping.ablocks[0];
        assert_problem(
            &r,
            Structure::MappingArray,
            Some(b),
            Severity::Damage,
            "cache block 500 maps origin block",
        );
        assert_problem(&r, Structure::MappingArray, None, Severity::Damage, "more mappings past the cache");
    }
}

#[test]
fn mappings_past_the_origin_are_caught_when_its_size_is_given() {
    let (img, d) = base(1);
    let opts = CacheCheckOptions { origin_blocks: Some(FIRST_OBLOCK + NR_MAPPED), ..Default::default() };
    assert!(check_with(&img, &opts).is_clean());
    let opts = CacheCheckOptions { origin_blocks: Some(FIRST_OBLOCK + NR_MAPPED - 1), ..Default::default() };
    let r = check_with(&img, &opts);
    let last = FIRST_CBLOCK + NR_MAPPED - 1;
    let b = d.blocks.mapping.ablocks[(last / 509) as usize];
    assert_problem(&r, Structure::MappingArray, Some(b), Severity::Damage, "past the origin's 6199 blocks");
    assert_eq!(r.problems.len(), 1, "{}", show(&r));
}

#[test]
fn an_overwritten_superblock_is_one_damage_problem() {
    let (mut img, d) = base(1);
    let node = d.blocks.mapping.nodes[0];
    let copy = img.block(node).to_vec();
    img.block_mut(0).copy_from_slice(&copy);
    let r = check(&img);
    assert_problem(&r, Structure::CacheSuperblock, Some(0), Severity::Damage, "overwritten");
    assert_eq!(r.problems.len(), 1);
}

#[test]
fn wrong_array_lengths_and_hint_width_are_caught() {
    // The discard bitset's length against discard_nr_blocks.
    let (mut img, d) = base(1);
    let nr = get_u64(img.block(0), dmsim_model::pdata::layout::cache::SB_DISCARD_NR_BLOCKS);
    put_u64(img.block_mut(0), dmsim_model::pdata::layout::cache::SB_DISCARD_NR_BLOCKS, nr + 64);
    img.reseal(0, BlockKind::CacheSuperblock);
    let r = check(&img);
    let last = *d.blocks.discard.ablocks.last().unwrap();
    assert_problem(&r, Structure::DiscardBitset, Some(last), Severity::Damage, "discard_nr_blocks");
    // A hint array shorter than the cache after a clean shutdown: the
    // kernel's load fails (so does the mapping array's length).
    let (mut img, d) = base(1);
    put_u32(img.block_mut(0), SB_CACHE_BLOCKS, 3001);
    img.reseal(0, BlockKind::CacheSuperblock);
    let r = check(&img);
    let last = *d.blocks.hint.as_ref().expect("hints").ablocks.last().unwrap();
    assert_problem(&r, Structure::HintArray, Some(last), Severity::Damage, "load of the mappings fails");
    let last = *d.blocks.mapping.ablocks.last().unwrap();
    assert_problem(&r, Structure::MappingArray, Some(last), Severity::Damage, "needs 3001");
    // A hint width the kernel never uses.
    let (mut img, _) = base(1);
    put_u32(img.block_mut(0), dmsim_model::pdata::layout::cache::SB_POLICY_HINT_SIZE, 8);
    img.reseal(0, BlockKind::CacheSuperblock);
    let r = check(&img);
    assert_problem(&r, Structure::CacheSuperblock, Some(0), Severity::Damage, "policy_hint_size 8");
    assert!(r.problems_in(Structure::HintArray).any(|p| p.message.contains("value size 4, expected 8")));
}
