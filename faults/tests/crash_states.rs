//! Crash states of a `SimDisk`: the semantics of every `CrashMode` and of
//! the bounded-exhaustive enumeration.

use dmsim_faults::{CrashMode, CrashSummary, SimDisk};
use dmsim_model::block_device::{BlockDevice, WriteFlags, SECTOR_SIZE};

const S: usize = SECTOR_SIZE as usize;

fn write(disk: &mut SimDisk, sector: u64, sectors: usize, byte: u8) {
    disk.write(sector, &vec![byte; sectors * S], WriteFlags::default()).unwrap();
}

fn fua(disk: &mut SimDisk, sector: u64, sectors: usize, byte: u8) {
    disk.write(sector, &vec![byte; sectors * S], WriteFlags { fua: true }).unwrap();
}

fn at(image: &(impl std::ops::Index<usize, Output = u8> + ?Sized), sector: u64) -> u8 {
    image[sector as usize * S]
}

/// A disk with a flushed write and `n` unflushed two-sector writes, write
/// `i` at sector `2 * i + 10` holding byte `i + 1`.
fn disk_with(n: u64) -> SimDisk {
    let mut disk = SimDisk::new(64);
    write(&mut disk, 0, 1, 0xee);
    disk.flush().unwrap();
    for i in 0..n {
        write(&mut disk, 2 * i + 10, 2, i as u8 + 1);
    }
    disk
}

#[test]
fn unflushed_writes_are_tracked_and_cleared_by_flush() {
    let mut disk = disk_with(3);
    assert_eq!(disk.unflushed(), 3);
    fua(&mut disk, 40, 1, 9);
    assert_eq!(disk.unflushed(), 3, "FUA writes are not volatile");
    assert_eq!(disk.since_flush().len(), 4, "but they keep their place in the order");
    disk.flush().unwrap();
    assert_eq!(disk.unflushed(), 0);
    assert!(disk.since_flush().is_empty());
}

#[test]
fn lose_all_is_durable_and_keep_all_is_visible() {
    let disk = disk_with(5);
    for seed in 0..4 {
        let (img, sum) = disk.crash_state(CrashMode::LoseAll, seed);
        assert_eq!(img, disk.durable());
        assert_eq!(sum, CrashSummary { kept: 0, unflushed: 5, torn: false });
        let (img, sum) = disk.crash_state(CrashMode::KeepAll, seed);
        assert_eq!(img, disk.visible());
        assert_eq!(sum, CrashSummary { kept: 5, unflushed: 5, torn: false });
    }
    assert_eq!(at(disk.durable(), 0), 0xee, "the flushed write is durable");
}

#[test]
fn prefix_keeps_a_prefix_in_order_and_reaches_both_ends() {
    let disk = disk_with(6);
    let mut lengths = std::collections::BTreeSet::new();
    for seed in 0..200 {
        let (img, sum) = disk.crash_state(CrashMode::Prefix, seed);
        let kept: Vec<bool> = (0..6).map(|i| at(&img, 2 * i + 10) == i as u8 + 1).collect();
        let k = kept.iter().take_while(|&&b| b).count();
        assert!(kept[k..].iter().all(|&b| !b), "seed {seed}: {kept:?} is not a prefix");
        assert_eq!(sum.kept as usize, k);
        assert!(!sum.torn);
        lengths.insert(k);
    }
    assert_eq!(lengths.len(), 7, "every prefix length 0..=6 shows up: {lengths:?}");
}

#[test]
fn subset_applies_overlapping_writes_in_order() {
    // Three writes to the same two sectors; a crash state shows the last
    // kept one, never an earlier one over a later one.
    let mut disk = SimDisk::new(16);
    for byte in 1..=3 {
        write(&mut disk, 4, 2, byte);
    }
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..100 {
        let (img, sum) = disk.crash_state(CrashMode::Subset, seed);
        let shown = at(&img, 4);
        seen.insert(shown);
        match sum.kept {
            0 => assert_eq!(shown, 0),
            _ => assert_ne!(shown, 0),
        }
        // With the third write kept, it must win.
        if sum.kept == 3 {
            assert_eq!(shown, 3);
        }
    }
    assert!(seen.len() >= 3, "{seen:?}");
    // Exhaustively: 8 subsets, 4 distinct images (nothing, or the last kept
    // of 1, 2, 3).
    let all = disk.crash_states_exhaustive(3).unwrap();
    let shown: Vec<u8> = all.iter().map(|(img, _)| at(img, 4)).collect();
    assert_eq!(shown, vec![0, 1, 2, 3]);
}

#[test]
fn an_unflushed_write_never_overwrites_a_later_fua_write() {
    let mut disk = SimDisk::new(16);
    write(&mut disk, 2, 1, 1);
    fua(&mut disk, 2, 1, 2);
    assert_eq!(at(disk.durable(), 2), 2);
    for mode in CrashMode::ALL {
        for seed in 0..20 {
            assert_eq!(at(&disk.crash_state(mode, seed).0, 2), 2, "{mode:?} seed {seed}");
        }
    }
    // And a later unflushed write may or may not land over the FUA one.
    write(&mut disk, 2, 1, 3);
    let shown: std::collections::BTreeSet<u8> =
        (0..50).map(|seed| at(&disk.crash_state(CrashMode::Subset, seed).0, 2)).collect();
    assert_eq!(shown, [2, 3].into_iter().collect());
}

#[test]
fn torn_keeps_whole_sectors_of_one_write_a_nonempty_proper_subset() {
    let mut disk = SimDisk::new(64);
    // One 8-sector write whose every sector is distinct, plus a single-sector
    // write that can never be torn.
    let data: Vec<u8> = (0..8).flat_map(|k| vec![k as u8 + 1; S]).collect();
    disk.write(8, &data, WriteFlags::default()).unwrap();
    write(&mut disk, 30, 1, 0x77);
    let mut torn_seen = 0;
    for seed in 0..300 {
        let (img, sum) = disk.crash_state(CrashMode::Torn, seed);
        let sectors: Vec<bool> = (0..8u64)
            .map(|k| {
                let sector = &img[(8 + k as usize) * S..(9 + k as usize) * S];
                // Whole sectors: either all old or all new.
                assert!(sector.iter().all(|&b| b == 0) || sector.iter().all(|&b| b == k as u8 + 1));
                sector[0] != 0
            })
            .collect();
        let landed = sectors.iter().filter(|&&b| b).count();
        if sum.torn {
            torn_seen += 1;
            assert!(landed > 0 && landed < 8, "seed {seed}: torn write kept {landed} of 8 sectors");
        } else {
            assert!(landed == 0 || landed == 8, "seed {seed}");
        }
    }
    assert!(torn_seen > 50, "{torn_seen}");
    // A single-sector write alone is never torn.
    let mut disk = SimDisk::new(8);
    write(&mut disk, 1, 1, 5);
    assert!((0..100).all(|seed| !disk.crash_state(CrashMode::Torn, seed).1.torn));
}

#[test]
fn crash_states_are_reproducible_from_the_seed_and_vary_with_it() {
    let disk = disk_with(12);
    for mode in CrashMode::ALL {
        for seed in 0..10 {
            assert_eq!(disk.crash_state(mode, seed), disk.crash_state(mode, seed));
        }
    }
    let distinct: std::collections::BTreeSet<Vec<u8>> =
        (0..20).map(|seed| disk.crash_state(CrashMode::Subset, seed).0).collect();
    assert!(distinct.len() > 10);
}

#[test]
fn exhaustive_lists_every_subset_and_dedupes() {
    // Disjoint writes with distinct data: 2^n distinct images.
    for n in 0..=6u64 {
        let disk = disk_with(n);
        let all = disk.crash_states_exhaustive(6).unwrap();
        assert_eq!(all.len(), 1 << n);
        assert_eq!(all[0].0, disk.durable(), "the first state is the durable image");
        assert!(all.iter().any(|(img, _)| img == disk.visible()));
        let kept_total: u32 = all.iter().map(|(_, s)| s.kept).sum();
        assert_eq!(kept_total as u64, n * (1 << n) / 2, "each write kept in half the subsets");
    }
    assert!(disk_with(7).crash_states_exhaustive(6).is_none());
    // Writes that change nothing collapse.
    let mut disk = SimDisk::new(16);
    write(&mut disk, 0, 1, 0);
    write(&mut disk, 1, 1, 0);
    write(&mut disk, 2, 1, 4);
    assert_eq!(disk.crash_states_exhaustive(8).unwrap().len(), 2);
}

#[test]
fn exhaustive_contains_every_seeded_untorn_state() {
    let disk = disk_with(5);
    let all = disk.crash_states_exhaustive(5).unwrap();
    for mode in [CrashMode::LoseAll, CrashMode::KeepAll, CrashMode::Prefix, CrashMode::Subset] {
        for seed in 0..30 {
            let (img, _) = disk.crash_state(mode, seed);
            assert!(all.iter().any(|(i, _)| *i == img), "{mode:?} seed {seed}");
        }
    }
}
