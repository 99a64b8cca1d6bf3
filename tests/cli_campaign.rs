//! The campaign commands of the `dmsim` binary, run as a user would: `check`
//! (summary, JSON, determinism, failures folder, CI rule), `run`, `replay`,
//! `minimize`, `show`, and their errors (exit 2 with a one-line message,
//! never a panic).

use std::path::PathBuf;
use std::process::{Command, Output};

/// Seeds the clean model passes in both campaigns (kept small for time).
const CLEAN_SEEDS: &str = "0..4";

mod cli_common;
use cli_common::{dmsim, s, stderr, stdout};

/// A fresh, empty folder of its own for one test.
fn scratch(tag: &str) -> PathBuf {
    cli_common::scratch("cli-campaign", tag)
}

/// Exit 2, a one-line message on stderr mentioning `needle`, no panic.
fn assert_usage_error(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "stdout: {}\nstderr: {err}", stdout(o));
    assert!(err.contains(needle), "{needle:?} not in {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn check_on_a_small_range_passes_and_prints_the_summary() {
    let dir = scratch("check");
    let failures = dir.join("failures");
    let out = dmsim(&["check", "--seeds", CLEAN_SEEDS, "--failures", s(&failures)]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", stderr(&out));
    for needle in [
        "dmsim check: seeds 0..4 (4 seeds), campaigns: thin + metadata",
        "thin campaign: 300 ops per seed",
        "bios",
        "reads checked",
        "crash states",
        "faults fired",
        "crash-lose-all",
        "ENOSPC",
        "EIO",
        "simulated seconds",
        "thin_check runs",
        "metadata crash campaign",
        "crash states judged",
        "no violations",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    assert!(!failures.exists(), "no failures, no folder");
}

#[test]
fn check_json_has_the_fields() {
    let out = dmsim(&["check", "--seeds", CLEAN_SEEDS, "--campaign", "thin", "--json", "--jobs", "2"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON summary");
    assert_eq!(v["seeds"]["start"], 0);
    assert_eq!(v["seeds"]["end"], 4);
    assert_eq!(v["ok"], true);
    assert_eq!(v["violations"], 0);
    assert!(v["metadata"].is_null(), "only the thin campaign ran");
    let thin = &v["thin"];
    assert_eq!(thin["seeds"], 4);
    for field in ["ops", "bios", "reads_checked", "crash_states", "enospc", "eio", "thin_check_runs"] {
        assert!(thin[field].is_u64(), "{field}: {thin}");
    }
    assert!(thin["bios"].as_u64().unwrap() > 0);
    assert!(thin["sim_seconds"].as_f64().unwrap() > 0.0);
    assert!(thin["faults_fired"]["write-error-permanent"].is_u64(), "{thin}");
    assert_eq!(thin["failures"].as_array().map(Vec::len), Some(0));

    // The same seeds on one thread give the same numbers.
    let again = dmsim(&["check", "--seeds", CLEAN_SEEDS, "--campaign", "thin", "--json", "--jobs", "1"]);
    let w: serde_json::Value = serde_json::from_slice(&again.stdout).expect("JSON summary");
    assert_eq!(v["thin"], w["thin"]);
}

#[test]
fn check_determinism_passes() {
    let out = dmsim(&["check", "--seeds", "0..3", "--check-determinism"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", stderr(&out));
    assert!(text.contains("determinism: every seed ran twice; the runs are byte-identical"), "{text}");
}

#[test]
fn run_then_replay_is_byte_identical() {
    let dir = scratch("replay");
    for name in ["seed-2.trace", "seed-2.bin"] {
        let trace = dir.join(name);
        let out = dmsim(&["run", "--seed", "2", "--ops", "200", "--trace", s(&trace)]);
        assert_eq!(out.status.code(), Some(0), "{}\n{}", stdout(&out), stderr(&out));
        assert!(stdout(&out).contains("dmsim run: seed 2"), "{}", stdout(&out));
        let bytes = std::fs::read(&trace).expect("trace written");
        assert_eq!(bytes.starts_with(b"DMTR"), name.ends_with(".bin"), "encoding follows the extension");
        let out = dmsim(&["replay", s(&trace)]);
        let text = stdout(&out);
        assert_eq!(out.status.code(), Some(0), "{text}\n{}", stderr(&out));
        assert!(text.contains("replay: byte-identical to the recording"), "{text}");
        assert!(text.contains("on replay: no violation"), "{text}");
    }
    // --binary forces the binary encoding whatever the name.
    let forced = dir.join("forced.trace");
    let out = dmsim(&["run", "--seed", "2", "--ops", "50", "--binary", "--trace", s(&forced)]);
    assert_eq!(out.status.code(), Some(0));
    assert!(std::fs::read(&forced).unwrap().starts_with(b"DMTR"));
}

#[test]
fn a_locking_design_is_recorded_and_replayed() {
    let dir = scratch("locking");
    let trace = dir.join("refcount.trace");
    let out = dmsim(&[
        "run",
        "--seed",
        "5",
        "--ops",
        "120",
        "--workload",
        "snapshot-heavy",
        "--locking",
        "refcount-sharing",
        "--trace",
        s(&trace),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}\n{}", stdout(&out), stderr(&out));
    let text = std::fs::read_to_string(&trace).expect("trace written");
    assert!(text.contains("param locking refcount-sharing"), "the header names the design");
    let out = dmsim(&["replay", s(&trace)]);
    assert!(stdout(&out).contains("replay: byte-identical to the recording"), "{}", stdout(&out));
    // The kernel's design is not written, so default traces keep their bytes.
    let default = dir.join("default.trace");
    assert_eq!(dmsim(&["run", "--seed", "5", "--ops", "20", "--trace", s(&default)]).status.code(), Some(0));
    assert!(!std::fs::read_to_string(&default).unwrap().contains("param locking"));
    let out =
        dmsim(&["check", "--seeds", "0..2", "--campaign", "thin", "--locking", "refcount-sharing", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON summary");
    assert_eq!(json["locking"], "refcount-sharing");
}

#[test]
fn show_prints_the_timeline() {
    let dir = scratch("show");
    let trace = dir.join("t.trace");
    let out =
        dmsim(&["run", "--seed", "3", "--ops", "80", "--workload", "snapshot-heavy", "--trace", s(&trace)]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let out = dmsim(&["show", s(&trace)]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(text.contains("seed 3, workload snapshot-heavy, 80 ops"), "{text}");
    assert!(text.contains("settings:"), "{text}");
    assert!(text.contains("     1       0  create a thin device"), "{text}");
    assert!(text.contains("write dev#"), "{text}");
    assert!(text.contains("→ bio "), "{text}");
    let ops_only = stdout(&dmsim(&["show", "--ops-only", s(&trace)]));
    assert!(!ops_only.contains("→ bio "), "{ops_only}");
    assert!(ops_only.contains("     1       0  create a thin device"), "{ops_only}");
}

#[test]
fn bad_inputs_exit_2_with_a_message() {
    let dir = scratch("bad");
    let malformed = dir.join("malformed.trace");
    std::fs::write(&malformed, "dmsim-trace 1\nseed 1\nworkload random\nwrite dev=banana\n").unwrap();
    for cmd in ["replay", "show"] {
        assert_usage_error(&dmsim(&[cmd, s(&malformed)]), "malformed.trace: line 4");
    }
    let out_path = dir.join("out.trace");
    assert_usage_error(&dmsim(&["minimize", s(&malformed), "-o", s(&out_path)]), "line 4");
    let truncated = dir.join("truncated.bin");
    std::fs::write(&truncated, b"DMTR\x01").unwrap();
    assert_usage_error(&dmsim(&["replay", s(&truncated)]), "binary trace: byte offset");
    let garbage = dir.join("garbage");
    std::fs::write(&garbage, [0xffu8, 0xfe, 0x00, 0x80]).unwrap();
    assert_usage_error(&dmsim(&["show", s(&garbage)]), "not a trace");
    assert_usage_error(&dmsim(&["replay", s(&dir.join("missing.trace"))]), "cannot open");
    assert_usage_error(&dmsim(&["check", "--workload", "nope"]), "invalid value 'nope' for '--workload");
    assert_usage_error(&dmsim(&["run", "--seed", "1", "--mutation", "nope"]), "unknown mutation \"nope\"");
    assert_usage_error(&dmsim(&["check", "--seeds", "5..5"]), "empty seed range");
    assert_usage_error(&dmsim(&["check", "--locking", "nope"]), "unknown locking design \"nope\"");

    assert_usage_error(&dmsim(&["check", "--time", "soon"]), "expected a duration");
    // The kernel backend reads the trace before it boots anything.
    assert_usage_error(&dmsim(&["replay", "--on", "kernel", s(&malformed)]), "malformed.trace: line 4");
    assert_usage_error(
        &dmsim(&["replay", "--on", "qemu", s(&malformed)]),
        "use `sim`, `kernel`, `engine` or `all`",
    );

    // A clean trace has nothing to minimize.
    let clean = dir.join("clean.trace");
    assert_eq!(dmsim(&["run", "--seed", "1", "--ops", "30", "--trace", s(&clean)]).status.code(), Some(0));
    assert_usage_error(&dmsim(&["minimize", s(&clean), "-o", s(&out_path)]), "no violation");
    // A header naming a design this build does not know.
    let bad_design = dir.join("bad-design.trace");
    let text =
        std::fs::read_to_string(&clean).unwrap().replacen("param ops", "param locking nope\nparam ops", 1);
    std::fs::write(&bad_design, text).unwrap();
    assert_usage_error(&dmsim(&["replay", s(&bad_design)]), "unknown locking design \"nope\"");
}

#[test]
fn a_missing_thin_check_is_an_error_under_ci_only() {
    let empty = scratch("no-path");
    let run = |ci: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_dmsim"));
        c.args(["check", "--seeds", "0..1", "--campaign", "thin"]).env("PATH", &empty);
        match ci {
            Some(v) => c.env("CI", v),
            None => c.env_remove("CI"),
        };
        c.output().expect("run dmsim")
    };
    let out = run(Some("true"));
    assert_usage_error(&out, "thin_check is not installed");
    let out = run(None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("thin_check is not installed; runs are judged by the model's checker only"));
    assert!(stdout(&out).contains("not installed"), "{}", stdout(&out));
}

#[test]
fn a_broken_model_fails_and_its_minimized_trace_replays_the_failure() {
    let dir = scratch("mutation");
    let failures = dir.join("failures");
    let out = dmsim(&[
        "check",
        "--campaign",
        "thin",
        "--seeds",
        "0..2",
        "--mutation",
        "write-to-shared-in-place",
        "--minimize-max",
        "1",
        "--failures",
        s(&failures),
    ]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}\n{}", stderr(&out));
    assert!(text.contains("FAILED thin seed 0"), "{text}");
    assert!(text.contains("minimized: "), "{text}");
    assert!(text.contains(" → "), "{text}");
    let full = failures.join("seed-0.trace");
    let min = failures.join("seed-0.min.trace");
    assert!(full.is_file() && min.is_file(), "{text}");

    let out = dmsim(&["replay", s(&min)]);
    let replayed = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{replayed}\n{}", stderr(&out));
    assert!(replayed.contains("on replay: the recorded violation recurs"), "{replayed}");
    assert!(replayed.contains("replay: byte-identical to the recording"), "{replayed}");

    // `dmsim minimize` on the full trace gives a short trace that fails too.
    let again = dir.join("again.min.bin");
    let out = dmsim(&["minimize", s(&full), "-o", s(&again)]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", stderr(&out));
    assert!(text.contains("minimized: ") && text.contains("violation: oracle: "), "{text}");
    assert!(std::fs::read(&again).unwrap().starts_with(b"DMTR"));
    assert_eq!(dmsim(&["replay", s(&again)]).status.code(), Some(1));
    let shown = stdout(&dmsim(&["show", s(&again)]));
    assert!(shown.contains("*** VIOLATION (oracle)"), "{shown}");
}

#[test]
fn the_cache_metadata_campaign_runs_alone_and_in_all() {
    let out = dmsim(&["check", "--campaign", "cache-metadata", "--seeds", "0..3", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON summary");
    assert!(v["thin"].is_null() && v["metadata"].is_null(), "only the cache campaign ran: {v}");
    let cache = &v["cache_metadata"];
    assert_eq!(cache["seeds"], 3);
    assert!(cache["crash_states"].as_u64().unwrap() > 50, "{cache}");
    assert!(cache["torn_writes"].as_u64().unwrap() > 0, "{cache}");
    assert_eq!(cache["violations"], 0);

    let out = dmsim(&["check", "--seeds", "0..2"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("campaigns: thin + metadata + cache metadata"), "{text}");
    assert!(text.contains("cache metadata crash campaign: 60 metadata operations per seed"), "{text}");

    // A broken cache commit is caught, with the command that reproduces it.
    let dir = scratch("cache-mutation");
    let out = dmsim(&[
        "check",
        "--campaign",
        "cache-metadata",
        "--seeds",
        "1..2",
        "--mutation",
        "cache-commit-forgets-stats",
        "--failures",
        s(&dir.join("f")),
    ]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("FAILED cache metadata seed 1"), "{text}");
    assert!(
        text.contains(
            "reproduce: dmsim check --campaign cache-metadata --seeds 1..2 --metadata-ops 60 --crashes-per-point 8 --mutation cache-commit-forgets-stats"
        ),
        "{text}"
    );
}
