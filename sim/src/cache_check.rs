//! How the cache metadata crash campaign judges an image: the cache
//! metadata checker's verdict ([`dmsim_model::cache::check`]), every
//! reference count included.

use dmsim_model::block_device::BlockDevice;
use dmsim_model::cache::check::{check_cache_metadata, CacheCheckOptions};

/// `Err((true, why))` when the image is not usable cache metadata,
/// `Err((false, why))` when the checker finds any problem (leaks
/// included: a crash state must be a committed state, and those leak
/// nothing), `Ok` when it is clean. `origin_blocks` bounds the mappings.
pub fn judge(dev: &mut dyn BlockDevice, origin_blocks: u64) -> Result<(), (bool, String)> {
    let opts = CacheCheckOptions { origin_blocks: Some(origin_blocks), ..CacheCheckOptions::default() };
    let report = check_cache_metadata(dev, &opts).map_err(|e| (true, e.to_string()))?;
    match report.problems.first() {
        None => Ok(()),
        Some(first) => Err((
            false,
            format!(
                "{} problems, first: {} block {:?}: {}",
                report.problems.len(),
                first.structure,
                first.block,
                first.message
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use dmsim_model::block_device::MemDevice;
    use dmsim_model::cache::{CacheMetadata, OpenOptions};

    use super::*;

    #[test]
    fn a_fresh_cache_is_clean_and_a_mapping_past_the_origin_is_not() {
        let mut md = CacheMetadata::open(MemDevice::new(4096), OpenOptions::new(128, 2)).unwrap();
        md.resize(64).unwrap();
        md.insert_mapping(3, 40).unwrap();
        md.commit(false).unwrap();
        let mut dev = md.close();
        assert_eq!(judge(&mut dev, 100), Ok(()));
        let (unusable, why) = judge(&mut dev, 40).unwrap_err();
        assert!(!unusable && why.contains("mapping"), "{why}");
        assert!(judge(&mut MemDevice::new(64), 100).unwrap_err().0, "zeroes are not cache metadata");
    }
}
