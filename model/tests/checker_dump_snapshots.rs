//! Snapshots of the thin_dump XML of small fixture images (made with
//! Debian's thin_restore), so that a change to the dump format shows up
//! in review. The byte-for-byte comparison with thin_dump itself is in the
//! root crate's `tests/metadata_cli.rs`.

#[path = "../../tests/support/mod.rs"]
mod support;

use dmsim_model::block_device::MemDevice;
use dmsim_model::thin::dump::{dump_xml, DumpOptions};

fn dump(img: &support::Image, metadata_snap: bool) -> String {
    let mut dev = MemDevice::from_bytes(img.0.clone());
    let mut out = Vec::new();
    dump_xml(&mut dev, &mut out, &DumpOptions { metadata_snap }).expect("dump");
    String::from_utf8(out).expect("utf-8")
}

#[test]
fn dump_empty_pool() {
    let Some(img) = support::restore("empty.xml", 1 << 20) else { return };
    insta::assert_snapshot!(dump(&img, false));
}

#[test]
fn dump_two_devices() {
    let Some(img) = support::restore("two_devices.xml", 1 << 20) else { return };
    insta::assert_snapshot!(dump(&img, false));
}

#[test]
fn dump_snapshots_and_metadata_snapshot() {
    let Some(mut img) = support::restore("snapshots.xml", 1 << 20) else { return };
    insta::assert_snapshot!("snapshots_live", dump(&img, false));
    img.take_metadata_snapshot();
    insta::assert_snapshot!("snapshots_held", dump(&img, true));
}

#[test]
fn dump_empty_device_flags_and_extreme_values() {
    let Some(img) = support::restore("empty_device.xml", 1 << 20) else { return };
    insta::assert_snapshot!(dump(&img, false));
}
