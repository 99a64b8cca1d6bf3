//! Images written by the model must be what the kernel's tools expect:
//! Debian's `thin_check` accepts them and `thin_dump` prints exactly what
//! dmsim's own dump prints. Under `CI=true` the tools must be installed.

use std::ffi::OsStr;

use dmsim_model::block_device::MemDevice;
use dmsim_model::thin::dump::{dump_xml, DumpOptions};
use dmsim_model::thin::ThinMetadata;
use proptest::prelude::*;

mod common;
#[path = "../../tests/support/mod.rs"]
mod support;

use common::{map_op, run_mappings, DATA_BLOCK_SIZE};
use support::{run_tool, Image, TempFile};

fn our_dump(dev: &MemDevice, metadata_snap: bool) -> String {
    let mut out = Vec::new();
    dump_xml(&mut dev.clone(), &mut out, &DumpOptions { metadata_snap }).expect("dmsim dump");
    String::from_utf8(out).expect("utf-8")
}

/// Runs thin_check and thin_dump (also `-m` when a metadata snapshot is
/// held) on the image and compares. Returns false when the tools are
/// missing outside CI.
fn agree_with_tools(dev: &MemDevice) -> bool {
    let img = TempFile::with_bytes("interop.img", dev.as_bytes());
    let path = img.path().as_os_str();
    let Some((status, _, stderr)) = run_tool("thin_check", &[path]) else { return false };
    assert!(status.success(), "thin_check rejected a model-written image:\n{stderr}");
    let (status, theirs, stderr) = run_tool("thin_dump", &[path]).expect("thin_dump");
    assert!(status.success(), "thin_dump failed:\n{stderr}");
    assert_eq!(our_dump(dev, false), String::from_utf8(theirs).unwrap(), "dumps differ");
    if Image(dev.as_bytes().to_vec()).sb_u64(dmsim_model::pdata::layout::thin::SB_HELD_ROOT) != 0 {
        let (status, theirs, stderr) =
            run_tool("thin_dump", &[OsStr::new("-m"), path]).expect("thin_dump -m");
        assert!(status.success(), "thin_dump -m failed:\n{stderr}");
        assert_eq!(our_dump(dev, true), String::from_utf8(theirs).unwrap(), "metadata snapshot dumps differ");
    }
    true
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(48), ..ProptestConfig::default() })]

    #[test]
    fn model_images_pass_thin_check_and_dump_identically(ops in prop::collection::vec(map_op(), 1..60)) {
        let dev = run_mappings(&ops, 200_000);
        agree_with_tools(&dev);
    }
}

/// One large, deterministic history: 80,000 mappings made
/// and removed, snapshots of snapshots, writes that copy shared leaves, a
/// held metadata snapshot. The trees are three levels deep and both space
/// maps need their overflow trees.
#[test]
fn a_large_history_passes_thin_check_and_dumps_identically() {
    let mut md = ThinMetadata::format(MemDevice::new(64 * 2048), DATA_BLOCK_SIZE).unwrap();
    md.resize_data_dev(1_000_000).unwrap();
    md.commit().unwrap();
    md.create_thin(0).unwrap();
    md.commit().unwrap();
    md.open_thin(0).unwrap();
    const N: u64 = 80_000;
    for v in 0..N {
        let d = md.alloc_data_block().unwrap();
        // Every other block, then the gaps, so leaves split in the middle too.
        md.insert_block(0, (v * 2) % N + (v * 2 / N), d).unwrap();
    }
    md.commit().unwrap();
    // Three snapshots of the origin and one of a snapshot: the origin's
    // root is referenced four times.
    for (snap, origin) in [(1, 0), (2, 0), (3, 0), (4, 1)] {
        md.create_snap(snap, origin).unwrap();
        md.commit().unwrap();
    }
    // Writes to every device copy shared leaves; the copies add references
    // to the data blocks, so the counts pass 2.
    for dev in 0..5u64 {
        md.open_thin(dev).unwrap();
        for v in (dev * 97..N).step_by(1999) {
            let d = md.alloc_data_block().unwrap();
            md.insert_block(dev, v, d).unwrap();
        }
        md.close_thin(dev).unwrap();
    }
    md.commit().unwrap();
    md.reserve_metadata_snap().unwrap();
    md.commit().unwrap();
    md.open_thin(2).unwrap();
    md.remove_range(2, 10_000, 50_000).unwrap();
    md.close_thin(2).unwrap();
    md.delete_thin(3).unwrap();
    md.commit().unwrap();
    md.close_thin(0).unwrap();
    md.commit().unwrap();
    let dev = md.close().map_err(|(_, e)| e).unwrap();

    let img = Image(dev.as_bytes().to_vec());
    let data_overflow = img.data_sm().ref_count_root;
    let meta_overflow = img.metadata_sm().ref_count_root;
    assert!(
        img.nr_entries(data_overflow) > 0 || img.is_internal(data_overflow),
        "a data block count passed 2"
    );
    assert!(
        img.nr_entries(meta_overflow) > 0 || img.is_internal(meta_overflow),
        "a metadata block count passed 2"
    );
    let (_, dev0_root) = {
        let (leaf, i) = img.find(img.mapping_root(), 0).expect("device 0");
        (leaf, img.value_u64(leaf, i))
    };
    assert!(img.is_internal(dev0_root), "device 0's tree has internal nodes");
    assert!(img.is_internal(img.value_u64(dev0_root, 0)), "and is at least three levels deep");
    agree_with_tools(&dev);
}

/// Growing both devices: the metadata space map's extension (bitmaps
/// allocated from the new region, accounted for round by round) and the
/// data space map's growth across bitmap boundaries.
#[test]
fn grown_devices_pass_thin_check_and_dump_identically() {
    let mut md = ThinMetadata::format(MemDevice::new(2 * 2048), DATA_BLOCK_SIZE).unwrap();
    md.resize_data_dev(10_000).unwrap();
    md.create_thin(0).unwrap();
    md.commit().unwrap();
    md.open_thin(0).unwrap();
    for v in 0..3000 {
        let d = md.alloc_data_block().unwrap();
        md.insert_block(0, v, d).unwrap();
    }
    md.close_thin(0).unwrap();
    md.commit().unwrap();
    // Grow the metadata device from 512 to 40,000 blocks (three bitmaps):
    // a bigger device holding the same bytes.
    let small = md.close().map_err(|(_, e)| e).unwrap();
    let mut bytes = small.into_bytes();
    bytes.resize(40_000 * 4096, 0);
    let mut md = ThinMetadata::open(MemDevice::from_bytes(bytes), DATA_BLOCK_SIZE, false).unwrap();
    md.resize_metadata_dev(40_000).unwrap();
    md.resize_data_dev(70_000).unwrap();
    md.commit().unwrap();
    assert_eq!(md.metadata_dev_size().unwrap(), 40_000);
    assert_eq!(md.data_dev_size().unwrap(), 70_000);
    md.open_thin(0).unwrap();
    for v in 3000..40_000 {
        let d = md.alloc_data_block().unwrap();
        md.insert_block(0, v, d).unwrap();
    }
    md.close_thin(0).unwrap();
    md.commit().unwrap();
    let dev = md.close().map_err(|(_, e)| e).unwrap();
    let report = dmsim_model::thin::check::check_thin_metadata(
        &mut dev.clone(),
        &dmsim_model::thin::check::CheckOptions::default(),
    )
    .unwrap();
    assert!(report.is_clean(), "{:#?}", report.problems);
    assert_eq!(report.metadata_nr_blocks, 40_000);
    assert_eq!(report.data_nr_blocks, 70_000);
    agree_with_tools(&dev);
}
