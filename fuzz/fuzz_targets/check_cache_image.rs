//! Fuzz the cache metadata checker and the cache_dump XML writer with
//! arbitrary images.
//!
//! Run: `cargo fuzz run -s none check_cache_image` from the repository
//! root (seed the corpus with images made by cache_restore from
//! tests/fixtures/cache/*.xml, or by the model, for deeper coverage).

#![no_main]

use dmsim_model::block_device::MemDevice;
use dmsim_model::cache::check::{check_cache_metadata, CacheCheckOptions};
use dmsim_model::cache::dump::dump;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut dev = MemDevice::from_bytes(data.to_vec());
    let _ = check_cache_metadata(&mut dev, &CacheCheckOptions::default());
    let with_origin = CacheCheckOptions { origin_blocks: Some(1 << 16), ..CacheCheckOptions::default() };
    let _ = check_cache_metadata(&mut dev, &with_origin);
    let mut out = Vec::new();
    let _ = dump(&mut dev, &mut out);
});
