//! The checker and the dumper on mutated images: whatever the bytes, they
//! return (Ok or Err) without panicking, and the checker is deterministic.
//!
//! Mutations start from valid thin_restore images and either leave the
//! checksum stale (exercising the validators) or re-seal the block as the
//! kind it was (so that the damage reaches the structure-level checks).

#[path = "../../tests/support/mod.rs"]
mod support;

use std::sync::OnceLock;

use dmsim_model::block_device::MemDevice;
use dmsim_model::pdata::checksum;
use dmsim_model::pdata::layout::{BlockKind, BLOCK_SIZE};
use dmsim_model::thin::check::{check_thin_metadata, CheckOptions};
use dmsim_model::thin::dump::{dump_xml, DumpOptions};
use proptest::prelude::*;
use support::Image;

/// A base image and the kind of each of its blocks, by checksum.
type Base = (Image, Vec<Option<BlockKind>>);

/// Base images: (image, kind of each block by its checksum).
fn bases() -> Option<&'static Vec<Base>> {
    static BASES: OnceLock<Option<Vec<Base>>> = OnceLock::new();
    BASES
        .get_or_init(|| {
            let mut out = Vec::new();
            for (xml, size, snap) in [
                ("two_devices.xml", 64 * 4096, false),
                ("snapshots.xml", 64 * 4096, true),
                ("many.xml", 256 * 4096, false),
            ] {
                let mut img = support::restore(xml, size)?;
                if snap {
                    img.take_metadata_snapshot();
                }
                let kinds = (0..img.nr_blocks()).map(|b| kind_of(img.block(b))).collect();
                out.push((img, kinds));
            }
            Some(out)
        })
        .as_ref()
}

fn kind_of(block: &[u8]) -> Option<BlockKind> {
    let salt = checksum::salt_of(block)?;
    [BlockKind::ThinSuperblock, BlockKind::BtreeNode, BlockKind::Bitmap, BlockKind::MetadataIndex]
        .into_iter()
        .find(|k| k.salt() == salt)
}

#[derive(Debug, Clone)]
enum Mutation {
    FlipBit { block: u16, off: u16, bit: u8 },
    WriteU32 { block: u16, off: u16, value: u32 },
    WriteU64 { block: u16, off: u16, value: u64 },
    Truncate { blocks: u16, tail: u16 },
}

fn interesting_u64() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0u64), Just(1), Just(u64::MAX), Just(u32::MAX as u64), 0u64..300, any::<u64>(),]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<u16>(), 0u16..4096, 0u8..8).prop_map(|(block, off, bit)| Mutation::FlipBit { block, off, bit }),
        4 => (any::<u16>(), 0u16..4092, interesting_u64())
            .prop_map(|(block, off, v)| Mutation::WriteU32 { block, off, value: v as u32 }),
        4 => (any::<u16>(), 0u16..4088, interesting_u64())
            .prop_map(|(block, off, value)| Mutation::WriteU64 { block, off, value }),
        1 => (any::<u16>(), 0u16..4096).prop_map(|(blocks, tail)| Mutation::Truncate { blocks, tail }),
    ]
}

/// Header fields worth hitting more often than random offsets would.
fn header_offsets() -> impl Strategy<Value = u16> {
    prop_oneof![
        // btree node header and first keys/values; bitmap/index headers
        Just(16u16),
        Just(20),
        Just(24),
        Just(32),
        Just(40),
        Just(48),
        // superblock roots and sm roots
        Just(56),
        Just(64),
        Just(72),
        Just(80),
        Just(88),
        Just(192),
        Just(200),
        Just(208),
        Just(216),
        Just(320),
        Just(328),
    ]
}

fn apply(img: &mut Vec<u8>, kinds: &[Option<BlockKind>], m: &Mutation, reseal: bool) {
    let nr = (img.len() / BLOCK_SIZE).max(1);
    let (block, touched) = match *m {
        Mutation::FlipBit { block, off, bit } => {
            let b = block as usize % nr;
            if let Some(x) = img.get_mut(b * BLOCK_SIZE + off as usize) {
                *x ^= 1 << bit;
            }
            (b, true)
        }
        Mutation::WriteU32 { block, off, value } => {
            let b = block as usize % nr;
            let s = b * BLOCK_SIZE + off as usize;
            if let Some(x) = img.get_mut(s..s + 4) {
                x.copy_from_slice(&value.to_le_bytes());
            }
            (b, true)
        }
        Mutation::WriteU64 { block, off, value } => {
            let b = block as usize % nr;
            let s = b * BLOCK_SIZE + off as usize;
            if let Some(x) = img.get_mut(s..s + 8) {
                x.copy_from_slice(&value.to_le_bytes());
            }
            (b, true)
        }
        Mutation::Truncate { blocks, tail } => {
            let len = (blocks as usize % (nr + 1)) * BLOCK_SIZE + tail as usize;
            img.truncate(len);
            (0, false)
        }
    };
    if reseal && touched {
        if let (Some(Some(kind)), Some(blk)) =
            (kinds.get(block), img.get_mut(block * BLOCK_SIZE..(block + 1) * BLOCK_SIZE))
        {
            // Keep whatever location field the mutation left.
            let loc =
                u64::from_le_bytes(blk[kind.blocknr_offset()..kind.blocknr_offset() + 8].try_into().unwrap());
            kind.prepare_for_write(blk, loc);
        }
    }
}

fn run_both(bytes: Vec<u8>) {
    let opts = CheckOptions::default();
    let mut dev = MemDevice::from_bytes(bytes.clone());
    let first = check_thin_metadata(&mut dev, &opts);
    let mut dev = MemDevice::from_bytes(bytes.clone());
    let second = check_thin_metadata(&mut dev, &opts);
    assert_eq!(first, second, "the checker is deterministic");
    let mut dev = MemDevice::from_bytes(bytes);
    let mut out = Vec::new();
    let _ = dump_xml(&mut dev, &mut out, &DumpOptions::default());
    let _ = dump_xml(&mut dev, &mut out, &DumpOptions { metadata_snap: true });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_images_never_panic(
        which in 0usize..3,
        muts in prop::collection::vec(mutation(), 1..6),
        reseal in any::<bool>(),
    ) {
        let Some(bases) = bases() else { return Ok(()) };
        let (img, kinds) = &bases[which % bases.len()];
        let mut bytes = img.0.clone();
        for m in &muts {
            apply(&mut bytes, kinds, m, reseal);
        }
        run_both(bytes);
    }

    #[test]
    fn resealed_header_writes_never_panic(
        which in 0usize..3,
        writes in prop::collection::vec((any::<u16>(), header_offsets(), interesting_u64(), any::<bool>()), 1..4),
    ) {
        let Some(bases) = bases() else { return Ok(()) };
        let (img, kinds) = &bases[which % bases.len()];
        let mut bytes = img.0.clone();
        for (block, off, value, wide) in writes {
            let m = if wide {
                Mutation::WriteU64 { block, off, value }
            } else {
                Mutation::WriteU32 { block, off, value: value as u32 }
            };
            apply(&mut bytes, kinds, &m, true);
        }
        run_both(bytes);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..3 * BLOCK_SIZE), sealed in any::<bool>()) {
        let mut bytes = bytes;
        if sealed && bytes.len() >= BLOCK_SIZE {
            // A valid superblock checksum over random fields.
            BlockKind::ThinSuperblock.prepare_for_write(&mut bytes[..BLOCK_SIZE], 0);
        }
        run_both(bytes);
    }
}
