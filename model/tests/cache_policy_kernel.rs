//! smq held to what Debian's 6.1 kernel did with the same mappings
//! (`kernel-shim/tests/kernel_cache_metadata.rs`, the "keep" job: the
//! model's metadata activated with a quiet migration threshold, one status,
//! the clean shutdown). The kernel loaded ten mappings with hints 5, 17,
//! 63, 0, 30, 44, 9, 12, 50, 1 (cache blocks 0, 1, 2, 5, 6, 7, 20, 21, 40,
//! 63; blocks 1, 6 and 21 dirty) and saved hints 2, 1, 6, 0, 2, 4, 3, 0, 5,
//! 1: each entry's rank by hint within its queue (clean or dirty), left by
//! the redistribution at the first tick, which the resume runs.

use dmsim_model::cache::policy::{CachePolicy, PolicyType, SmqParams, SmqPolicy};

/// (cache block, origin block, dirty, hint loaded, hint the kernel saved).
const KERNEL_RUN: [(u32, u64, bool, u32, u32); 10] = [
    (0, 3, false, 5, 2),
    (1, 7, true, 17, 1),
    (2, 10, false, 63, 6),
    (5, 11, false, 0, 0),
    (6, 40, true, 30, 2),
    (7, 41, false, 44, 4),
    (20, 100, false, 9, 3),
    (21, 200, true, 12, 0),
    (40, 201, false, 50, 5),
    (63, 255, false, 1, 1),
];

#[test]
fn smq_saves_the_hints_the_kernel_saved() {
    // 64 cache blocks of 128 sectors over a 256-block origin, as in the VM.
    let params = SmqParams::new(PolicyType::Smq, 64, 256 * 128, 128);
    let mut p = SmqPolicy::new(params, 0);
    for &(c, o, dirty, hint, _) in &KERNEL_RUN {
        p.load_mapping(o, c, dirty, hint, true).expect("load");
    }
    assert_eq!(p.residency(), 10);
    // Before any tick the loaded hints are the levels.
    for &(c, _, _, hint, _) in &KERNEL_RUN {
        assert_eq!(p.get_hint(c), hint, "cache block {c} before the first tick");
    }
    // The resume's tick, a little later.
    p.tick(true, 1_000_000_000);
    let saved: Vec<u32> = KERNEL_RUN.iter().map(|&(c, ..)| p.get_hint(c)).collect();
    let kernel: Vec<u32> = KERNEL_RUN.iter().map(|&(.., k)| k).collect();
    assert_eq!(saved, kernel, "the hints smq saves at the clean shutdown");
}
