//! The first real-kernel interop check: boots Debian's kernel in qemu (one
//! boot), builds a pool, a thin device and a snapshot on the kernel's
//! dm-thin, writes stamped data, reads it back, and has Debian's
//! `thin_check` judge the metadata the kernel wrote.
//!
//! Needs `qemu-system-x86_64`, `linux-image-amd64` and
//! `thin-provisioning-tools` (`scripts/test-all` installs them). Without
//! them the test prints SKIPPED, or fails under `CI=true`.

use std::time::Instant;

use dmsim_kernel_shim::{KernelShim, ShimError};
use dmsim_sim::run::{CampaignSettings, RunConfig};
use dmsim_traces::{Event, Op, Trace};

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Skips (loudly) on a missing prerequisite, fails on it under CI.
fn skip_or_fail(what: &str) {
    if in_ci() {
        panic!("CI=true and a prerequisite is missing: {what}");
    }
    eprintln!("SKIPPED: kernel VM test: {what}");
}

fn thin_check() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join("thin_check")).find(|p| p.is_file())
}

fn trace(ops: &[Op]) -> Trace {
    let mut cfg = RunConfig::for_seed(7, ops.len(), &CampaignSettings::default());
    cfg.thin.block_sectors = 128;
    cfg.thin.data_blocks = 32;
    cfg.thin.thin_blocks = 16;
    cfg.thin.max_devices = 4;
    // The seed may draw the metadata-pressure workload's small metadata
    // device; these traces want the ordinary one.
    cfg.thin.metadata_sectors = dmsim_sim::thin::ThinSimConfig::default().metadata_sectors;
    cfg.thin.features = Default::default();
    Trace { header: cfg.header(), events: ops.iter().map(|op| Event::Op(*op)).collect() }
}

#[test]
fn pool_thin_and_snapshot_on_the_real_kernel() {
    let t0 = Instant::now();
    let shim = match KernelShim::prepare() {
        Ok(s) => s,
        Err(e @ ShimError::Missing(_)) => return skip_or_fail(&e.to_string()),
        Err(e) => panic!("preparing the VM: {e}"),
    };
    let Some(thin_check) = thin_check() else {
        return skip_or_fail("thin_check is not installed (Debian package thin-provisioning-tools)");
    };
    let prepared = t0.elapsed();
    let w = |dev, sector, nr_sectors, fua, preflush| Op::Write { dev, sector, nr_sectors, fua, preflush };
    let ops = [
        Op::CreateThin,                                        // op 0: thin 0
        w(0, 0, 128, false, false),                            // op 1: write 0, block 0 whole
        w(0, 300, 8, false, false),                            // op 2: write 1, block 2 partly
        Op::Flush { dev: 0 },                                  // op 3
        Op::CreateSnap { origin: 0 },                          // op 4: thin 1, snapshot of 0
        w(0, 0, 8, true, false),                               // op 5: write 2, FUA, breaks sharing
        w(1, 600, 16, false, true),                            // op 6: write 3 on the snapshot, PREFLUSH
        Op::Discard { dev: 0, sector: 1024, nr_sectors: 256 }, // op 7: unmapped range
        Op::Read { dev: 0, sector: 0, nr_sectors: 128 },       // op 8
        Op::Read { dev: 1, sector: 0, nr_sectors: 128 },       // op 9
        Op::Worker,                                            // op 10: nothing on the kernel
    ];
    let run = shim.replay(&trace(&ops)).unwrap_or_else(|e| panic!("kernel run: {e}"));
    let r = &run.result;
    eprintln!(
        "kernel {} (dm {:?}): boot {:?} (guest uptime at /init), VM wall time {:?}, prepare {:?}, timings {:?}",
        r.kernel_release, r.dm_version, run.boot, run.wall, prepared, r.timings_ms
    );
    assert_eq!(r.error, None, "the agent failed; console:\n{}", run.console);
    assert!(r.targets.iter().any(|(n, _)| n == "thin-pool"), "targets: {:?}", r.targets);

    let outcomes: Vec<&str> = r.ops.iter().map(|o| o.outcome.as_str()).collect();
    assert_eq!(outcomes, vec!["ok"; ops.len()], "op results: {:?}", r.ops);
    assert_eq!(r.ops[8].read.as_deref(), Some("w2*8 w0*120"));
    assert_eq!(r.ops[9].read.as_deref(), Some("w0*128"));

    let ids: Vec<u32> = r.devices.iter().map(|d| d.id).collect();
    assert_eq!(ids, vec![0, 1]);
    let zero = "0*128";
    let mut origin = vec![zero.to_string(); 16];
    origin[0] = "w2*8 w0*120".into();
    origin[2] = "0*44 w1*8 0*76".into();
    let mut snap = vec![zero.to_string(); 16];
    snap[0] = "w0*128".into();
    snap[2] = "0*44 w1*8 0*76".into();
    snap[4] = "0*88 w3*16 0*24".into();
    assert_eq!(r.devices[0].blocks, origin, "origin reads back");
    assert_eq!(r.devices[1].blocks, snap, "snapshot reads back");

    let dump =
        run.thin_dump.as_ref().unwrap_or_else(|e| panic!("dmsim cannot dump the kernel's metadata: {e}"));
    let mapped: Vec<Vec<u64>> = run.mapped.values().map(|s| s.iter().copied().collect()).collect();
    assert_eq!(mapped, vec![vec![0, 2], vec![0, 2, 4]], "mappings in the kernel's metadata:\n{dump}");

    // Debian's thin_check on the image the kernel wrote.
    let dir = dmsim_kernel_shim::vm::TempDir::new().unwrap();
    let image = dir.path().join("kernel-metadata.img");
    std::fs::write(&image, &run.metadata_image).unwrap();
    let out = std::process::Command::new(&thin_check).arg(&image).output().unwrap();
    assert!(
        out.status.success(),
        "thin_check rejects the kernel's metadata: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("kernel VM test: {:?} in all", t0.elapsed());
}

// Generated traces against the simulator: `tests/kernel_corpus.rs` (many
// traces in one boot).
