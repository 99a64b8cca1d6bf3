//! Coverage probes and per-seed swarm settings.

use std::collections::BTreeSet;

use dmsim_faults::{
    CrashMode, CrashSummary, DiskFault, DiskFaultKind, DiskId, FaultCoverage, FaultKind, FaultSwarm, Probe,
    SimDisk, SwarmProfile,
};
use dmsim_model::block_device::{BlockDevice, WriteFlags};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

#[test]
fn coverage_counts_what_fired_and_adds_up() {
    let mut disk = SimDisk::new(32);
    let mut buf = [0u8; 512];
    disk.arm(DiskFault::ReadError { permanent: true });
    disk.arm(DiskFault::BitFlip { bit: 1 });
    disk.arm(DiskFault::WriteError { permanent: false });
    disk.arm(DiskFault::Misdirect { offset: 2 });
    let _ = disk.read(0, &mut buf);
    let _ = disk.read(0, &mut buf); // bad sector hit
    disk.read(1, &mut buf).unwrap(); // bit flip
    let _ = disk.write(4, &buf, WriteFlags::default());
    disk.write(4, &buf, WriteFlags::default()).unwrap(); // misdirect
    disk.write(4, &buf, WriteFlags::default()).unwrap(); // clean
    let mut cov = FaultCoverage::new();
    cov.record_all_fired(&disk.take_fired());
    cov.record_failed_io();
    cov.record_crash(CrashMode::Torn, &CrashSummary { kept: 2, unflushed: 3, torn: true });
    cov.record_crash(CrashMode::Torn, &CrashSummary { kept: 0, unflushed: 3, torn: false });
    cov.record_crash(CrashMode::Prefix, &CrashSummary::default());

    let expect = [
        ("read-error-transient", 0),
        ("read-error-permanent", 1),
        ("write-error-transient", 1),
        ("write-error-permanent", 0),
        ("bit-flip", 1),
        ("misdirect", 1),
        ("bad-sector-hit", 1),
        ("failed-io", 1),
        ("crash-lose-all", 0),
        ("crash-keep-all", 0),
        ("crash-prefix", 1),
        ("crash-subset", 0),
        ("crash-torn", 2),
        ("torn-write", 1),
    ];
    assert_eq!(cov.iter().collect::<Vec<_>>(), expect);
    assert_eq!(cov.get(Probe::Fired(FaultKind::BitFlip)), 1);
    assert_eq!(cov.total(), 10);
    assert_eq!(
        cov.unseen(),
        ["read-error-transient", "write-error-permanent", "crash-lose-all", "crash-keep-all", "crash-subset"]
    );

    let mut sum = cov.clone();
    sum.add(&cov);
    assert!(sum.iter().zip(cov.iter()).all(|(a, b)| a.0 == b.0 && a.1 == 2 * b.1));
    let table = sum.to_string();
    assert_eq!(table.lines().count(), Probe::ALL.len());
    assert!(table.contains("crash-torn") && table.contains("4"), "{table}");
}

#[test]
fn swarm_settings_are_a_function_of_the_seed() {
    for seed in 0..50 {
        assert_eq!(FaultSwarm::from_seed(seed), FaultSwarm::from_seed(seed));
    }
    let differ = (0..50).filter(|&s| FaultSwarm::from_seed(s) != FaultSwarm::from_seed(s + 1)).count();
    assert!(differ > 30, "{differ}");
}

/// Which kinds of faults a setting can produce.
fn shape(s: &FaultSwarm) -> (bool, bool, bool, bool) {
    (s.crash_weight > 0, s.fail_io_weight > 0, s.metadata_fault_weight > 0, s.data_fault_weight > 0)
}

#[test]
fn swarm_settings_vary_across_seeds() {
    let all: Vec<FaultSwarm> = (0..100).map(FaultSwarm::from_seed).collect();
    let shapes: BTreeSet<_> = all.iter().map(shape).collect();
    assert!(shapes.len() >= 3, "{shapes:?}");
    let profiles: BTreeSet<SwarmProfile> = all.iter().map(|s| s.profile).collect();
    assert_eq!(profiles.len(), SwarmProfile::ALL.len());
    assert!(all.iter().any(FaultSwarm::is_quiet), "some seeds run with no faults at all");
    assert!(all.iter().any(|s| shape(s) == (true, false, false, false)), "some crash only");
    assert!(all.iter().any(|s| s.metadata_fault_weight > 0), "some arm metadata faults");
    let modes: BTreeSet<Vec<CrashMode>> = all.iter().map(|s| s.crash_modes.clone()).collect();
    assert!(modes.len() > 5);
    for s in &all {
        assert!(!s.crash_modes.is_empty());
        assert!(!s.misdirect && !s.data_bit_flip, "no undetectable corruption by default");
        assert!(!s.allowed.contains(&DiskFaultKind::Misdirect));
        assert!(s.permanent_percent <= 100);
        if s.metadata_fault_weight > 0 || s.data_fault_weight > 0 {
            assert!(s.pick_fault(&mut ChaCha8Rng::seed_from_u64(0)).is_some(), "{s:?}");
        }
    }
}

#[test]
fn picked_faults_respect_the_settings() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    assert_eq!(FaultSwarm::none().pick_fault(&mut rng), None);
    assert!(FaultSwarm::none().is_quiet());
    for seed in 0..100 {
        let s = FaultSwarm::from_seed(seed);
        for _ in 0..50 {
            if let Some((disk, fault)) = s.pick_fault(&mut rng) {
                let kind = DiskFaultKind::of(&fault);
                assert!(s.permits(disk, kind), "seed {seed}: {disk:?} {fault:?}");
                assert!(!matches!(fault, DiskFault::Misdirect { .. }));
                assert!(!(disk == DiskId::Data && kind == DiskFaultKind::BitFlip));
            }
        }
        assert!(s.crash_modes.contains(&s.pick_crash_mode(&mut rng)));
    }
    // With corruption switched on, every kind shows up on both disks.
    let s = FaultSwarm {
        metadata_fault_weight: 1,
        data_fault_weight: 1,
        permanent_percent: 50,
        ..FaultSwarm::none()
    }
    .with_corruption();
    let mut seen = BTreeSet::new();
    for _ in 0..2000 {
        let (disk, fault) = s.pick_fault(&mut rng).unwrap();
        if let DiskFault::Misdirect { offset } = fault {
            assert!(offset != 0 && offset.unsigned_abs() <= s.max_misdirect);
        }
        seen.insert((disk, DiskFaultKind::of(&fault)));
    }
    assert_eq!(seen.len(), 4, "bit flips and misdirects on both disks: {seen:?}");
    let s = FaultSwarm { allowed: DiskFaultKind::ALL.to_vec(), ..s };
    let mut seen = BTreeSet::new();
    for _ in 0..2000 {
        let (disk, fault) = s.pick_fault(&mut rng).unwrap();
        seen.insert((disk, DiskFaultKind::of(&fault)));
    }
    assert_eq!(seen.len(), 8, "{seen:?}");
}

#[test]
fn swarm_params_round_trip() {
    let mut cases: Vec<FaultSwarm> = (0..100).map(FaultSwarm::from_seed).collect();
    cases.push(FaultSwarm::none());
    cases.push(FaultSwarm::from_seed(7).with_corruption());
    for s in cases {
        let params = s.params();
        assert_eq!(FaultSwarm::from_params(&params), Ok(s.clone()), "{params:?}");
        assert!(params.iter().all(|(k, v)| !k.is_empty() && !v.is_empty() && !v.contains(' ')));
    }
    let p = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
    assert!(FaultSwarm::from_params(&p("crash_modes", "none")).is_err());
    assert!(FaultSwarm::from_params(&p("crash_modes", "sideways")).is_err());
    assert!(FaultSwarm::from_params(&p("colour", "blue")).is_err());
    assert!(FaultSwarm::from_params(&p("permanent_percent", "101")).is_err());
    let mut twice = p("crash_weight", "1");
    twice.extend(p("crash_weight", "2"));
    assert!(FaultSwarm::from_params(&twice).is_err());
    assert_eq!(FaultSwarm::from_params(&[]), Ok(FaultSwarm::none()));
}
