//! The cache checker on mutated cache metadata images (random bit flips,
//! block copies, optionally re-sealed so that the damage reaches the
//! structure-level checks): it never panics, is deterministic, and never
//! says "clean" about an image that the model's own decoder
//! (`cache::inspect::read_image`) refuses and that Debian's `cache_check`
//! (0.9.0, when installed) rejects too.
//!
//! Cases: `PROPTEST_CASES` or 64.

mod cache_common;
#[path = "../../tests/support/mod.rs"]
mod support;

use std::sync::OnceLock;

use cache_common::{CacheOp, Run};
use dmsim_model::block_device::MemDevice;
use dmsim_model::cache::check::{check_cache_metadata, CacheCheckOptions};
use dmsim_model::cache::inspect::read_image;
use dmsim_model::pdata::checksum;
use dmsim_model::pdata::layout::{BlockKind, BLOCK_SIZE};
use proptest::prelude::*;
use support::{run_tool, TempFile};

/// A base image and the kind of each of its blocks, by checksum.
type Base = (Vec<u8>, Vec<Option<BlockKind>>);

/// Metadata blocks of the base images (small, so that cache_check is fast).
const META_BLOCKS: u64 = 96;

fn bases() -> &'static Vec<Base> {
    static BASES: OnceLock<Vec<Base>> = OnceLock::new();
    BASES.get_or_init(|| {
        let mut out = Vec::new();
        for version in [1, 2] {
            let mut run = Run::new(version, META_BLOCKS, 1300);
            run.apply(&CacheOp::InsertRun { cblock: 3, oblock: 40, len: 700 });
            run.apply(&CacheOp::Commit);
            for c in [3u32, 4, 300, 650] {
                run.apply(&CacheOp::SetDirty { cblock: c, dirty: true });
            }
            run.apply(&CacheOp::Discard { dblock: 5, on: true });
            let bytes = run.finish().0.into_bytes();
            let kinds = bytes.chunks(BLOCK_SIZE).map(kind_of).collect();
            out.push((bytes, kinds));
        }
        out
    })
}

fn kind_of(block: &[u8]) -> Option<BlockKind> {
    let salt = checksum::salt_of(block)?;
    [
        BlockKind::CacheSuperblock,
        BlockKind::BtreeNode,
        BlockKind::Bitmap,
        BlockKind::MetadataIndex,
        BlockKind::Array,
    ]
    .into_iter()
    .find(|k| k.salt() == salt)
}

#[derive(Debug, Clone)]
enum Mutation {
    FlipBit { block: u16, off: u16, bit: u8 },
    CopyBlock { from: u16, to: u16 },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        // Mostly in block headers and the first values, where the fields are.
        3 => (any::<u16>(), 0u16..96, 0u8..8).prop_map(|(block, off, bit)| Mutation::FlipBit { block, off, bit }),
        2 => (any::<u16>(), 0u16..4096, 0u8..8).prop_map(|(block, off, bit)| Mutation::FlipBit { block, off, bit }),
        2 => (any::<u16>(), 180u16..300, 0u8..8).prop_map(|(block, off, bit)| Mutation::FlipBit { block, off, bit }),
        1 => (any::<u16>(), any::<u16>()).prop_map(|(from, to)| Mutation::CopyBlock { from, to }),
    ]
}

/// Blocks in use in the base (mutations aim there; the tail is zeroes).
fn used_blocks(img: &[u8]) -> usize {
    img.chunks(BLOCK_SIZE).rposition(|b| b.iter().any(|&x| x != 0)).map_or(1, |p| p + 1)
}

fn apply(img: &mut [u8], kinds: &[Option<BlockKind>], m: &Mutation, reseal: bool) {
    let nr = used_blocks(img);
    let block = match *m {
        Mutation::FlipBit { block, off, bit } => {
            let b = block as usize % nr;
            img[b * BLOCK_SIZE + off as usize] ^= 1 << bit;
            b
        }
        Mutation::CopyBlock { from, to } => {
            let (f, t) = (from as usize % nr, to as usize % nr);
            img.copy_within(f * BLOCK_SIZE..(f + 1) * BLOCK_SIZE, t * BLOCK_SIZE);
            t
        }
    };
    if reseal {
        if let Some(Some(kind)) = kinds.get(block) {
            let blk = &mut img[block * BLOCK_SIZE..(block + 1) * BLOCK_SIZE];
            let loc =
                u64::from_le_bytes(blk[kind.blocknr_offset()..kind.blocknr_offset() + 8].try_into().unwrap());
            kind.prepare_for_write(blk, loc);
        }
    }
}

/// cache_check's verdict (None: not installed outside CI).
fn cache_check_clean(bytes: &[u8]) -> Option<bool> {
    let f = TempFile::with_bytes("ccprop.img", bytes);
    run_tool("cache_check", &[f.path().as_os_str()]).map(|(s, _, _)| s.success())
}

fn judge(bytes: Vec<u8>) {
    let opts = CacheCheckOptions::default();
    let first = check_cache_metadata(&mut MemDevice::from_bytes(bytes.clone()), &opts);
    let second = check_cache_metadata(&mut MemDevice::from_bytes(bytes.clone()), &opts);
    assert_eq!(first, second, "the checker is deterministic");
    let says_clean = matches!(&first, Ok(r) if r.is_clean());
    if !says_clean {
        return;
    }
    if let Err(e) = read_image(&mut MemDevice::from_bytes(bytes.clone())) {
        if cache_check_clean(&bytes) == Some(false) {
            panic!("the model's decoder refuses the image ({e}) and cache_check rejects it, but the checker says clean");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cache_common::cases(64),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn mutated_cache_images_are_judged_without_panics(
        base in 0usize..2,
        mutations in prop::collection::vec(mutation(), 1..4),
        reseal in any::<bool>(),
    ) {
        let (img, kinds) = &bases()[base];
        let mut bytes = img.clone();
        for m in &mutations {
            apply(&mut bytes, kinds, m, reseal);
        }
        judge(bytes);
    }

    #[test]
    fn arbitrary_bytes_after_a_cache_superblock_never_panic(
        tail in prop::collection::vec(any::<u8>(), 0..3 * BLOCK_SIZE),
        sb_bytes in prop::collection::vec((0usize..BLOCK_SIZE, any::<u8>()), 0..16),
    ) {
        // A sealed superblock with random fields, then random blocks.
        let mut bytes = bases()[1].0[..BLOCK_SIZE].to_vec();
        for (off, v) in sb_bytes {
            bytes[off] = v;
        }
        BlockKind::CacheSuperblock.prepare_for_write(&mut bytes[..BLOCK_SIZE], 0);
        bytes.extend_from_slice(&tail);
        let _ = check_cache_metadata(&mut MemDevice::from_bytes(bytes), &CacheCheckOptions::default());
    }
}
