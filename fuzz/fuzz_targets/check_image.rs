//! Fuzz the metadata checker, the XML dumper and the committed data
//! counts reader with arbitrary images.
//!
//! Run: `cargo fuzz run -s none check_image` from the repository root
//! (seed the corpus with images made by thin_restore from
//! tests/fixtures/*.xml for deeper coverage).

#![no_main]

use dmsim_model::block_device::MemDevice;
use dmsim_model::thin::check::{check_thin_metadata, committed_data_counts, CheckOptions};
use dmsim_model::thin::dump::{dump_xml, DumpOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut dev = MemDevice::from_bytes(data.to_vec());
    let _ = check_thin_metadata(&mut dev, &CheckOptions::default());
    let mut out = Vec::new();
    let _ = dump_xml(&mut dev, &mut out, &DumpOptions::default());
    let _ = dump_xml(&mut dev, &mut out, &DumpOptions { metadata_snap: true });
    let _ = committed_data_counts(&mut dev);
});
