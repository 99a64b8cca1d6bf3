//! Writes a small dm-cache metadata image for manual inspection:
//! `cargo run -p dmsim-model --example write_cache_image -- OUT.img [1|2]`
//! (metadata version 1 by default). A cache of 4,096 blocks of 64 KiB,
//! 1,000 of them mapped, every tenth dirty, smq hints, and a clean shutdown.
use dmsim_model::block_device::MemDevice;
use dmsim_model::cache::mapping::{discard_geometry, PolicyHints, ShutdownState};
use dmsim_model::cache::superblock::CacheStats;
use dmsim_model::cache::{CacheMetadata, OpenOptions};

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(out), version) = (args.next(), args.next()) else {
        eprintln!("usage: write_cache_image OUT.img [1|2]");
        std::process::exit(2);
    };
    let version: u32 = match version.as_deref() {
        None | Some("1") => 1,
        Some("2") => 2,
        Some(v) => {
            eprintln!("write_cache_image: metadata version {v:?}: use 1 or 2");
            std::process::exit(2);
        }
    };
    let (block_sectors, cache_blocks, origin_blocks) = (128u32, 4096u32, 65_536u64);
    let mut md = CacheMetadata::open(MemDevice::new(8 * 2048), OpenOptions::new(block_sectors, version))
        .expect("format");
    md.resize(cache_blocks).expect("resize");
    for c in 0..1000u32 {
        md.insert_mapping(c, u64::from(c) * 7).expect("insert");
    }
    md.commit(false).expect("commit");
    let (discard_block_size, discard_blocks) =
        discard_geometry(u64::from(block_sectors), origin_blocks * u64::from(block_sectors));
    let state = ShutdownState {
        dirty: (0..cache_blocks).map(|c| c < 1000 && c % 10 == 0).collect(),
        discard_block_size,
        discards: vec![false; discard_blocks as usize],
        stats: CacheStats { read_hits: 900, read_misses: 100, write_hits: 300, write_misses: 50 },
        policy: PolicyHints {
            name: "smq".into(),
            version: [2, 0, 0],
            hint_size: 4,
            hints: (0..cache_blocks).map(|c| c % 64).collect(),
        },
    };
    md.clean_shutdown(&state).expect("clean shutdown");
    if let Err(e) = std::fs::write(&out, md.close().as_bytes()) {
        eprintln!("write_cache_image: cannot write {out}: {e}");
        std::process::exit(2);
    }
}
