//! Opening damaged metadata with the model, and working on it, gives
//! errors — never a panic, never a hang. Support engineers load field
//! images that may be damaged anywhere.

use std::sync::OnceLock;

use dmsim_model::block_device::MemDevice;
use dmsim_model::pdata::btree::node::{set_value64, Node};
use dmsim_model::pdata::checksum::{salt_of, seal};
use dmsim_model::pdata::PdataError;
use dmsim_model::thin::metadata::ThinError;
use dmsim_model::thin::superblock::Superblock;
use dmsim_model::thin::ThinMetadata;
use proptest::prelude::*;

mod common;

/// A model-written image with devices, a snapshot, shared and unshared
/// leaves, and a held metadata snapshot.
fn base() -> &'static Vec<u8> {
    static BASE: OnceLock<Vec<u8>> = OnceLock::new();
    BASE.get_or_init(|| {
        let mut md = ThinMetadata::format(MemDevice::new(2 * 2048), 128).unwrap();
        md.resize_data_dev(40_000).unwrap();
        md.create_thin(0).unwrap();
        md.commit().unwrap();
        md.open_thin(0).unwrap();
        for v in 0..700 {
            let d = md.alloc_data_block().unwrap();
            md.insert_block(0, v * 2, d).unwrap();
        }
        md.commit().unwrap();
        md.create_snap(1, 0).unwrap();
        md.commit().unwrap();
        md.open_thin(1).unwrap();
        for v in 0..50 {
            let d = md.alloc_data_block().unwrap();
            md.insert_block(1, v * 20, d).unwrap();
        }
        md.reserve_metadata_snap().unwrap();
        md.commit().unwrap();
        md.close_thin(0).unwrap();
        md.close_thin(1).unwrap();
        md.commit().unwrap();
        md.close().map_err(|(_, e)| e).unwrap().into_bytes()
    })
}

/// Blocks in use in the base image (those with a valid checksum).
fn used_blocks() -> &'static Vec<usize> {
    static USED: OnceLock<Vec<usize>> = OnceLock::new();
    USED.get_or_init(|| {
        (0..base().len() / 4096).filter(|&b| salt_of(&base()[b * 4096..][..4096]).is_some()).collect()
    })
}

#[derive(Debug, Clone)]
struct Damage {
    /// Index into the used blocks.
    block: usize,
    offset: usize,
    value: u64,
    /// Write 1, 4 or 8 bytes.
    width: usize,
}

fn damage() -> impl Strategy<Value = Damage> {
    (any::<usize>(), 0..4096usize, any::<u64>(), prop::sample::select(vec![1usize, 4, 8]))
        .prop_map(|(block, offset, value, width)| Damage { block, offset, value, width })
}

/// Applies the damage; with `reseal`, each damaged block gets a valid
/// checksum again, so the damage reaches the structures behind it.
fn damaged(damages: &[Damage], reseal: bool) -> Vec<u8> {
    let mut img = base().clone();
    let used = used_blocks();
    for d in damages {
        let b = used[d.block % used.len()];
        let block = &mut img[b * 4096..(b + 1) * 4096];
        let salt = salt_of(block);
        let off = d.offset.min(4096 - d.width);
        block[off..off + d.width].copy_from_slice(&d.value.to_le_bytes()[..d.width]);
        if let (true, Some(salt)) = (reseal, salt) {
            seal(block, salt);
        }
    }
    img
}

/// Everything a pool does with its metadata, errors ignored.
fn exercise(img: Vec<u8>) {
    let Ok(mut md) = ThinMetadata::open(MemDevice::from_bytes(img), 128, false) else { return };
    for dev in 0..3 {
        if md.open_thin(dev).is_ok() {
            for v in (0..1500).step_by(37) {
                let _ = md.find_block(dev, v);
            }
            let _ = md.find_mapped_range(dev, 0, 2000);
            let _ = md.mapped_count(dev);
        }
    }
    let _ = md.alloc_data_block().and_then(|d| md.insert_block(0, 12_345, d));
    let _ = md.remove_range(0, 100, 400);
    let _ = md.remove_range(1, 0, 60);
    let _ = md.create_thin(9);
    let _ = md.create_snap(10, 1);
    let _ = md.delete_thin(2);
    let _ = md.data_block_count(3);
    let _ = md.free_data_blocks();
    let _ = md.release_metadata_snap();
    let _ = md.reserve_metadata_snap();
    let _ = md.set_transaction_id(0, 1);
    let _ = md.commit();
    let _ = md.abort();
    let _ = md.resize_data_dev(50_000);
    let _ = md.commit();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(400), ..ProptestConfig::default() })]

    #[test]
    fn the_model_survives_damaged_metadata(damages in prop::collection::vec(damage(), 1..6), reseal in any::<bool>()) {
        exercise(damaged(&damages, reseal));
    }
}

#[test]
fn the_undamaged_base_works() {
    let mut md = ThinMetadata::open(MemDevice::from_bytes(base().clone()), 128, false).unwrap();
    md.open_thin(0).unwrap();
    assert_eq!(md.mapped_count(0).unwrap(), 700);
    assert!(md.metadata_snap().unwrap() != 0);
}

/// A damaged key that the search finds but the removal cannot reach used to
/// spin `remove_range` for ever (the kernel's loop has the same shape).
#[test]
fn an_unremovable_key_is_an_error_not_a_hang() {
    let d = vec![
        Damage { block: 7112047503529438921, offset: 1698, value: 941545805129028217, width: 4 },
        Damage { block: 16157452927145466176, offset: 32, value: 13073467820834321913, width: 1 },
    ];
    let mut md = ThinMetadata::open(MemDevice::from_bytes(damaged(&d, true)), 128, false).unwrap();
    md.open_thin(0).unwrap();
    assert_eq!(md.broken(), None);
    let err = md.remove_range(0, 100, 400).unwrap_err();
    assert!(err.to_string().contains("cannot be removed"), "{err}");
    // A runaway, not plain damage: the metadata keeps it (a pool reports it
    // as a broken invariant; on the model's own metadata it is a bug).
    assert!(matches!(err, ThinError::Pdata(PdataError::Runaway { .. })), "{err:?}");
    assert!(md.broken().is_some_and(|b| b.contains("cannot be removed")), "{:?}", md.broken());
}

/// The base image with device 0's mapping tree turned into a cycle: its
/// root (an internal node) names itself as its second child, resealed;
/// and a key under that child.
fn cyclic() -> (Vec<u8>, u64) {
    let mut img = base().clone();
    let sb = Superblock::decode(&img[..4096]);
    let top = Node::new(&img[sb.data_mapping_root as usize * 4096..][..4096]);
    let root = top.value64(top.index_of(0).expect("device 0 in the top level"));
    let block = &mut img[root as usize * 4096..][..4096];
    assert!(Node::new(block).is_internal() && Node::new(block).nr_entries() >= 2);
    let salt = salt_of(block).expect("a node");
    let key = Node::new(block).key(1);
    set_value64(block, 1, root);
    seal(block, salt);
    (img, key)
}

/// A cycle in a tree is reported as a runaway walk, by every walk that
/// meets it — an error with a clear message, never a hang — and the
/// metadata keeps the first.
#[test]
fn a_cycle_is_a_runaway_error_not_a_hang() {
    let (img, key) = cyclic();
    let mut md = ThinMetadata::open(MemDevice::from_bytes(img.clone()), 128, false).unwrap();
    md.open_thin(0).unwrap();
    let err = md.find_block(0, key).unwrap_err();
    assert!(matches!(err, ThinError::Pdata(PdataError::Runaway { .. })), "{err:?}");
    assert!(err.to_string().contains("a cycle?"), "{err}");
    assert!(md.broken().is_some_and(|b| b.contains("a cycle?")), "{:?}", md.broken());
    // Key 0 lies under the first child, off the cycle.
    assert!(md.find_block(0, 0).unwrap().is_some());
    // Removal walks it too.
    let removed = md.remove_range(0, key, key + 10);
    assert!(matches!(removed, Err(ThinError::Pdata(PdataError::Runaway { .. }))), "{removed:?}");
    md.close_thin(0).unwrap();
    let _ = md.abort();
    // Kept across the abort.
    assert!(md.broken().is_some_and(|b| b.contains("a cycle?")));
    exercise(img);
}
