//! `dmsim replay --on kernel A.trace B.trace …`: many thin traces in one
//! boot, each judged as alone, a line per trace and a summary — run as a
//! user would. Bad combinations and bad traces are refused before any
//! boot (exit 2). In one boot: two quiet traces equal to the simulator,
//! and the same snapshot trace under a broken model (a write to a shared
//! block made in place) diverging, so the run exits 1 and names it.
//!
//! The boot needs qemu, a kernel image and the ublk module's build (as
//! `kernel_ublk_crash`); without qemu or the kernel the test prints
//! SKIPPED, or fails under `CI=true`.

use std::path::{Path, PathBuf};

use dmsim_model::mutation::Mutations;
use dmsim_sim::run::{CampaignSettings, RunConfig};
use dmsim_traces::{Event, Op, Trace};

mod cli_common;
use cli_common::{dmsim, s, stderr, stdout};

fn scratch(tag: &str) -> PathBuf {
    cli_common::scratch("replay-many", tag)
}

/// A device, writes, a snapshot of it, a write to the shared block, a
/// flush: `mutations` names the model's deliberate bugs (none: the model
/// as it is).
fn snapshot_trace(seed: u64, mutations: &[&str]) -> Trace {
    let settings = CampaignSettings {
        mutations: Mutations::from_names(mutations.iter().copied()).expect("known mutations"),
        ..CampaignSettings::default()
    };
    let mut cfg = RunConfig::for_seed(seed, 8, &settings);
    cfg.thin.block_sectors = 128;
    cfg.thin.data_blocks = 32;
    cfg.thin.thin_blocks = 16;
    cfg.thin.max_devices = 4;
    cfg.thin.features = Default::default();
    let write =
        |block: u32| Op::Write { dev: 0, sector: block * 128, nr_sectors: 128, fua: false, preflush: false };
    let ops = [
        Op::CreateThin,
        write(0),
        write(1),
        Op::CreateSnap { origin: 0 },
        write(0),
        Op::Read { dev: 1, sector: 0, nr_sectors: 128 },
        Op::Flush { dev: 0 },
    ];
    Trace { header: cfg.header(), events: ops.into_iter().map(Event::Op).collect() }
}

fn write_trace(dir: &Path, name: &str, trace: &Trace) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, dmsim_traces::to_text(trace)).expect("write the trace");
    path
}

/// Exit 2, a one-line message on stderr mentioning `needle`, no boot.
fn assert_refused(args: &[&str], needle: &str) {
    let out = dmsim(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert!(err.contains(needle), "{args:?}: {needle:?} not in {err}");
    assert!(!err.contains("booting"), "{args:?} booted: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_combinations_and_bad_traces_are_refused_before_any_boot() {
    let dir = scratch("refused");
    let a = write_trace(&dir, "a.trace", &snapshot_trace(1, &[]));
    let b = write_trace(&dir, "b.trace", &snapshot_trace(2, &[]));
    let bad = dir.join("bad.trace");
    std::fs::write(&bad, "dmsim-trace 1\nseed 1\nfrob\n").unwrap();
    let (a, b, bad) = (s(&a), s(&b), s(&bad));
    assert_refused(&["replay", a, b], "more than one trace is for `--on kernel`");
    assert_refused(&["replay", "--on", "engine", a, b], "more than one trace is for `--on kernel`");
    assert_refused(&["replay", "--on", "kernel", "--race", "0", a, b], "no --race");
    assert_refused(&["replay", "--on", "kernel", "--kernel-answer", a, a, b], "no --race, --kernel-answer");
    assert_refused(&["replay", "--on", "kernel", "--disks", "nvme", a, b], "unknown --disks");
    assert_refused(
        &["replay", "--on", "kernel", "--concurrent", "2", a],
        "--concurrent is for more than one trace",
    );
    assert_refused(&["replay", "--on", "kernel", a, bad], "bad.trace");
    // On virtio disks a broken model's oracle objection refuses its trace.
    let broken = write_trace(&dir, "broken.trace", &snapshot_trace(3, &["write-to-shared-in-place"]));
    assert_refused(&["replay", "--on", "kernel", a, s(&broken)], "broken.trace: invalid input: simulator");
    assert_refused(&["replay", "--on", "kernel", a, "/nonexistent/x.trace"], "x.trace");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn many_traces_share_one_boot_and_each_is_judged() {
    if let Err(e) = cli_common::kernel_prerequisites() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true and the kernel shim's prerequisites are missing: {e}");
        }
        return eprintln!("SKIPPED: many traces in one boot: {e}");
    }
    let dir = scratch("one-boot");
    let quiet = [
        write_trace(&dir, "q1.trace", &snapshot_trace(1, &[])),
        write_trace(&dir, "q2.trace", &snapshot_trace(2, &[])),
    ];
    let broken = write_trace(&dir, "broken.trace", &snapshot_trace(3, &["write-to-shared-in-place"]));
    // On controlled disks: there the serialized simulator runs a broken
    // model through its oracle's objections, to hold its state against
    // the kernel's (on virtio disks the trace is refused before the boot).
    let out = dmsim(&["replay", "--on", "kernel", "--disks", "ublk", s(&quiet[0]), s(&quiet[1]), s(&broken)]);
    let (text, err) = (stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(1), "the broken model's trace diverges: {text}\n{err}");
    // The three side by side (the default), then the diverging one again
    // alone, in a second boot, whose verdict is the one reported.
    assert!(err.contains("for 3 traces (1 boot, up to 3 at a time)"), "{err}");
    assert!(err.contains("1 trace(s) diverged side by side with others: running them again"), "{err}");
    for q in &quiet {
        assert!(text.contains(&format!("{}: equal, L2 identical", q.display())), "{text}");
    }
    let line = text.lines().find(|l| l.starts_with(s(&broken))).unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("unexplained") && line.contains("dev 1 block 0"), "{line}");
    assert!(
        line.contains(
            "; run alone after it ran side by side with others, where it was: unexplained; first: "
        ),
        "{line}"
    );
    assert!(text.contains("3 traces in 2 boots: 2 equal, 0 explained, 1 unexplained, 0 failed"), "{text}");
    // The quiet ones one after the other, as JSON: exit 0.
    let out = dmsim(&["replay", "--on", "kernel", "--json", "--concurrent", "1", s(&quiet[0]), s(&quiet[1])]);
    assert_eq!(out.status.code(), Some(0), "{}\n{}", stdout(&out), stderr(&out));
    assert!(stderr(&out).contains("up to 1 at a time"), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert_eq!(json["equal"], 2);
    assert_eq!(json["traces"].as_array().map(Vec::len), Some(2));
    assert_eq!(json["traces"][1]["verdict"], "equal");
    assert!(json["traces"][1]["side_by_side"].is_null());
    std::fs::remove_dir_all(&dir).unwrap();
}
