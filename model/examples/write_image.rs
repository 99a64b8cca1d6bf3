//! Writes a small pool metadata image for manual inspection:
//! `cargo run -p dmsim-model --example write_image -- OUT.img`.
use dmsim_model::block_device::MemDevice;
use dmsim_model::thin::ThinMetadata;

fn main() {
    let out = std::env::args().nth(1).expect("usage: write_image OUT");
    let mut md = ThinMetadata::format(MemDevice::new(8 * 2048), 128).unwrap();
    md.resize_data_dev(100_000).unwrap();
    md.create_thin(0).unwrap();
    md.open_thin(0).unwrap();
    for v in 0..5000u64 {
        let d = md.alloc_data_block().unwrap();
        md.insert_block(0, v * 3, d).unwrap();
    }
    md.commit().unwrap();
    md.create_snap(1, 0).unwrap();
    md.open_thin(1).unwrap();
    for v in 0..200u64 {
        let d = md.alloc_data_block().unwrap();
        md.insert_block(1, v * 3, d).unwrap();
    }
    md.remove_range(0, 300, 9000).unwrap();
    md.close_thin(0).unwrap();
    md.close_thin(1).unwrap();
    md.commit().unwrap();
    let dev = md.close().map_err(|(_, e)| e).unwrap();
    std::fs::write(out, dev.as_bytes()).unwrap();
}
