//! Shared by the metadata test files: a random operation language over
//! thin devices and mappings, and a runner that applies it to the model and
//! to a plain reference, checking as it goes.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

use dmsim_model::block_device::MemDevice;
use dmsim_model::pdata::PdataError;
use dmsim_model::thin::check::{check_thin_metadata, CheckOptions};
use dmsim_model::thin::metadata::ThinError;
use dmsim_model::thin::ThinMetadata;
use proptest::prelude::*;

/// Proptest cases: `PROPTEST_CASES` from the environment if set (for long
/// runs), else `default`. (An explicit `cases` in a config would otherwise
/// override the variable.)
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Data block size used throughout (64 KiB).
pub const DATA_BLOCK_SIZE: u32 = 128;

/// Commits, closes and reopens the metadata from its image.
pub fn reopen(md: ThinMetadata<MemDevice>) -> ThinMetadata<MemDevice> {
    let dev = md.close().map_err(|(_, e)| e).expect("close");
    ThinMetadata::open(dev, DATA_BLOCK_SIZE, false).expect("reopen")
}

/// Closes the metadata, has the independent checker judge the image (it
/// must be clean), and reopens it.
pub fn assert_clean(md: ThinMetadata<MemDevice>) -> ThinMetadata<MemDevice> {
    let mut dev = md.close().map_err(|(_, e)| e).expect("close");
    let report = check_thin_metadata(&mut dev, &CheckOptions::default()).expect("checkable");
    assert!(report.is_clean(), "checker found problems: {:#?}", report.problems);
    ThinMetadata::open(dev, DATA_BLOCK_SIZE, false).expect("reopen")
}

// ---------------------------------------------------------------------------
// Devices and mappings against a map per device.

#[derive(Debug, Clone)]
pub enum MapOp {
    CreateThin(u64),
    CreateSnap(u64, u64),
    Delete(u64),
    /// Provision `len` blocks from `vblock`, each a fresh data block.
    Map {
        dev: u64,
        vblock: u64,
        len: u64,
    },
    Unmap {
        dev: u64,
        vblock: u64,
        len: u64,
    },
    Commit,
    Reopen,
    Abort,
    ReserveMetadataSnap,
    ReleaseMetadataSnap,
}

pub const DEVS: u64 = 6;
pub const VBLOCKS: u64 = 6000;

pub fn map_op() -> impl Strategy<Value = MapOp> {
    prop_oneof![
        2 => (0..DEVS).prop_map(MapOp::CreateThin),
        2 => (0..DEVS, 0..DEVS).prop_map(|(d, o)| MapOp::CreateSnap(d, o)),
        1 => (0..DEVS).prop_map(MapOp::Delete),
        8 => (0..DEVS, 0..VBLOCKS, 1..400u64).prop_map(|(dev, vblock, len)| MapOp::Map { dev, vblock, len }),
        4 => (0..DEVS, 0..VBLOCKS, 1..1500u64).prop_map(|(dev, vblock, len)| MapOp::Unmap { dev, vblock, len }),
        2 => Just(MapOp::Commit),
        1 => Just(MapOp::Reopen),
        1 => Just(MapOp::Abort),
        1 => Just(MapOp::ReserveMetadataSnap),
        1 => Just(MapOp::ReleaseMetadataSnap),
    ]
}

pub type Reference = BTreeMap<u64, BTreeMap<u64, u64>>;

/// Applies `ops` to a fresh pool and to the reference, checking as it goes;
/// returns the closed metadata image.
pub fn run_mappings(ops: &[MapOp], nr_data_blocks: u64) -> MemDevice {
    let mut md = ThinMetadata::format(MemDevice::new(32 * 2048), DATA_BLOCK_SIZE).unwrap();
    md.resize_data_dev(nr_data_blocks).unwrap();
    md.commit().unwrap();
    let mut devs: Reference = BTreeMap::new();
    let mut committed = devs.clone();
    let mut snap_held = false;
    // What the metadata snapshot holds: its data blocks stay in use.
    let mut held: Reference = BTreeMap::new();
    for op in ops {
        // The pool commits after every message; metadata driven otherwise
        // can reach states the kernel never writes (see create_snap).
        if matches!(
            op,
            MapOp::CreateThin(_)
                | MapOp::CreateSnap(..)
                | MapOp::Delete(_)
                | MapOp::ReserveMetadataSnap
                | MapOp::ReleaseMetadataSnap
        ) {
            md.commit().unwrap();
            committed = devs.clone();
        }
        match *op {
            MapOp::CreateThin(d) => match md.create_thin(d) {
                Ok(()) => {
                    assert!(!devs.contains_key(&d));
                    devs.insert(d, BTreeMap::new());
                }
                Err(ThinError::Exists(_)) => assert!(devs.contains_key(&d)),
                Err(e) => panic!("create_thin {d}: {e}"),
            },
            MapOp::CreateSnap(d, o) => match md.create_snap(d, o) {
                Ok(()) => {
                    let copy = devs[&o].clone();
                    devs.insert(d, copy);
                }
                Err(ThinError::Exists(_)) => assert!(devs.contains_key(&d)),
                Err(ThinError::NoSuchDevice(x)) => assert!(x == o && !devs.contains_key(&o)),
                Err(e) => panic!("create_snap {d} {o}: {e}"),
            },
            MapOp::Delete(d) => match md.delete_thin(d) {
                Ok(()) => {
                    devs.remove(&d).expect("deleted a device the reference lacks");
                }
                Err(ThinError::NoSuchDevice(_)) => assert!(!devs.contains_key(&d)),
                Err(e) => panic!("delete {d}: {e}"),
            },
            MapOp::Map { dev, vblock, len } => {
                let Some(map) = devs.get_mut(&dev) else { continue };
                md.open_thin(dev).unwrap();
                for v in vblock..(vblock + len).min(VBLOCKS) {
                    let d = match md.alloc_data_block() {
                        Ok(d) => d,
                        Err(ThinError::Pdata(PdataError::NoSpace(_))) => break,
                        Err(e) => panic!("alloc: {e}"),
                    };
                    md.insert_block(dev, v, d).unwrap();
                    map.insert(v, d);
                }
                assert_eq!(md.mapped_count(dev).unwrap(), map.len() as u64);
                md.close_thin(dev).unwrap();
            }
            MapOp::Unmap { dev, vblock, len } => {
                let Some(map) = devs.get_mut(&dev) else { continue };
                md.open_thin(dev).unwrap();
                let end = vblock + len;
                md.remove_range(dev, vblock, end).unwrap();
                map.retain(|&v, _| v < vblock || v >= end);
                assert_eq!(md.mapped_count(dev).unwrap(), map.len() as u64);
                md.close_thin(dev).unwrap();
            }
            MapOp::Commit => {
                md.commit().unwrap();
                committed = devs.clone();
            }
            MapOp::Reopen => {
                md.commit().unwrap();
                committed = devs.clone();
                md = assert_clean(md);
            }
            MapOp::Abort => {
                // The kernel keeps in-core device records across an abort
                // (spec §2.4.12); this model does too, so reopen instead to
                // compare with the committed reference.
                md.abort().unwrap();
                let dev = md.crash();
                md = ThinMetadata::open(dev, DATA_BLOCK_SIZE, false).unwrap();
                devs = committed.clone();
            }
            MapOp::ReserveMetadataSnap => match md.reserve_metadata_snap() {
                Ok(()) => {
                    assert!(!snap_held);
                    snap_held = true;
                    committed = devs.clone();
                    held = devs.clone();
                    md.commit().unwrap();
                }
                Err(ThinError::SnapshotExists) => {
                    assert!(snap_held);
                    md.commit().unwrap();
                    committed = devs.clone();
                }
                Err(e) => panic!("reserve: {e}"),
            },
            MapOp::ReleaseMetadataSnap => match md.release_metadata_snap() {
                Ok(()) => {
                    assert!(snap_held);
                    snap_held = false;
                    held.clear();
                    md.commit().unwrap();
                }
                Err(ThinError::NoSnapshot) => assert!(!snap_held),
                Err(e) => panic!("release: {e}"),
            },
        }
    }
    md.commit().unwrap();
    let mut md = assert_clean(md);
    // Every mapping, and nothing else, is there.
    let mut in_use = BTreeSet::new();
    for (&dev, map) in &devs {
        md.open_thin(dev).unwrap();
        assert_eq!(md.mapped_count(dev).unwrap(), map.len() as u64);
        for v in 0..VBLOCKS {
            let got = md.find_block(dev, v).unwrap().map(|l| l.block);
            assert_eq!(got, map.get(&v).copied(), "device {dev} vblock {v}");
        }
        in_use.extend(map.values().copied());
        md.close_thin(dev).unwrap();
    }
    in_use.extend(held.values().flat_map(|m| m.values().copied()));
    assert_eq!(md.free_data_blocks().unwrap(), nr_data_blocks - in_use.len() as u64);
    md.close().map_err(|(_, e)| e).unwrap()
}
