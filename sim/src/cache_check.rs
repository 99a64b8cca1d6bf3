//! How the cache metadata crash campaign judges an image: the metadata
//! checker's verdict, as (unusable, what) on failure.

use dmsim_model::block_device::MemDevice;
use dmsim_model::cache::inspect::read_image;

/// `Err((true, why))` when the image is not usable cache metadata,
/// `Err((false, why))` when it is damaged, `Ok` when it is clean.
pub fn judge(dev: &mut MemDevice) -> Result<(), (bool, String)> {
    read_image(dev).map(|_| ()).map_err(|e| (false, e.to_string()))
}
