//! The fuzz target's inputs through the `dmsim` binary, as a user turns a
//! crash into a trace (`fuzz-to-trace`, then `replay` and `minimize`), its
//! errors, and `dmsim check`'s table of coverage probes.

use std::path::PathBuf;

use dmsim_model::mutation::Mutations;
use dmsim_sim::fuzz::{run_bytes, FuzzSettings};

mod cli_common;
use cli_common::{dmsim, s, stderr, stdout};

/// A fresh, empty folder of its own for one test.
fn scratch(tag: &str) -> PathBuf {
    cli_common::scratch("fuzz-cli", tag)
}

fn bytes(seed: u64, len: usize) -> Vec<u8> {
    dmsim_sim::fuzz::sample_input(seed, len)
}

#[test]
fn a_crash_of_a_broken_model_becomes_a_trace_that_replays_and_minimizes() {
    let dir = scratch("crash");
    let mutation = "skip-zeroing";
    let settings =
        FuzzSettings { mutations: Mutations::by_name(mutation).unwrap(), ..FuzzSettings::default() };
    let data = (0..400)
        .map(|seed| bytes(seed, 300))
        .find(|d| run_bytes(d, &settings).violation.is_some())
        .expect("an input of the series catches the mutation");
    let input = dir.join("crash-input");
    std::fs::write(&input, &data).unwrap();

    // The clean model runs the same input clean.
    let clean = dir.join("clean.trace");
    let out = dmsim(&["fuzz-to-trace", s(&input), "-o", s(&clean)]);
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("no violation"), "{}", stdout(&out));

    let trace = dir.join("crash.trace");
    let out = dmsim(&["fuzz-to-trace", "--mutation", mutation, s(&input), "-o", s(&trace)]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}{}", stderr(&out));
    for needle in
        ["dmsim fuzz-to-trace:", "(300 bytes): a thin run", "VIOLATION", "oracle", "replay it: dmsim replay"]
    {
        assert!(text.contains(needle), "{needle:?} not in\n{text}");
    }
    // The same input again: the same trace bytes.
    let again = dir.join("again.trace");
    let out = dmsim(&["fuzz-to-trace", "--mutation", mutation, s(&input), "-o", s(&again)]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(std::fs::read(&trace).unwrap(), std::fs::read(&again).unwrap());

    let out = dmsim(&["replay", s(&trace)]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}{}", stderr(&out));
    assert!(text.contains("replay: byte-identical to the recording"), "{text}");
    assert!(text.contains("on replay: the recorded violation recurs"), "{text}");

    let min = dir.join("crash.min.trace");
    let out = dmsim(&["minimize", s(&trace), "-o", s(&min)]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
    let line = text.lines().find(|l| l.starts_with("minimized: ")).expect("a minimized line");
    let counts: Vec<usize> = line
        .trim_start_matches("minimized: ")
        .split(" ops")
        .next()
        .unwrap()
        .split(" → ")
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(counts[1] < counts[0], "{line}");
    let out = dmsim(&["replay", s(&min)]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).contains("the recorded violation recurs"), "{}", stdout(&out));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unusable_inputs_and_outputs_are_refused_with_a_message() {
    let dir = scratch("hostile");
    let big = dir.join("big");
    std::fs::write(&big, vec![7u8; (1 << 20) + 1]).unwrap();
    let out_file = dir.join("out.trace");
    for (args, needle) in [
        (vec!["fuzz-to-trace", s(&big), "-o", s(&out_file)], "1 MiB"),
        (vec!["fuzz-to-trace", s(&dir), "-o", s(&out_file)], "regular file"),
        (vec!["fuzz-to-trace", "/no/such/input", "-o", s(&out_file)], "/no/such/input"),
        (vec!["fuzz-to-trace", s(&big), "-o", s(&dir)], "is a folder"),
    ] {
        let out = dmsim(&args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}{err}", stdout(&out));
        assert!(err.contains(needle), "{args:?}: {needle:?} not in {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    assert!(!out_file.exists(), "nothing written for refused input");
    // An empty input is an input: one thin device, and nothing else.
    let empty = dir.join("empty");
    std::fs::write(&empty, b"").unwrap();
    let out = dmsim(&["fuzz-to-trace", s(&empty), "-o", s(&out_file)]);
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("(0 bytes): a thin run"), "{}", stdout(&out));
    assert!(stdout(&out).contains(", 1 ops"), "{}", stdout(&out));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn check_reports_the_coverage_probes_the_same_every_time() {
    let dir = scratch("probes");
    let failures = dir.join("failures");
    let run = |jobs: &str, json: bool| {
        let mut args = vec!["check", "--campaign", "thin", "--seeds", "0..12", "--jobs", jobs, "--failures"];
        args.push(s(&failures));
        if json {
            args.push("--json");
        }
        let out = dmsim(&args);
        assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
        stdout(&out)
    };
    let text = run("1", false);
    assert_eq!(text, run("2", false), "the same seeds print the same summary, probes included");
    let table = &text[text.find("  coverage probes").expect("the probe table")..];
    let rows: Vec<&str> = table.lines().skip(1).take_while(|l| l.starts_with("    ")).collect();
    let names: Vec<&str> = rows.iter().map(|r| r.split_whitespace().next().unwrap()).collect();
    for name in
        ["btree-root-split", "btree-three-levels", "break-sharing-copy", "no-space-timeout", "crash-torn"]
    {
        assert!(names.contains(&name), "{name} not in the table:\n{table}");
    }
    // Every row: a name, the seeds that reached it (at most 12), the times.
    for r in &rows {
        let cols: Vec<&str> = r.split_whitespace().collect();
        assert_eq!(cols.len(), 3, "{r}");
        let seeds: u64 = cols[1].parse().unwrap();
        let times: u64 = cols[2].parse().unwrap();
        assert!(seeds <= 12 && (seeds == 0) == (times == 0), "{r}");
    }
    assert!(table.contains("rare probes (reached by 1 to 2 seeds)"), "{table}");

    let json = run("2", true);
    assert_eq!(json, run("1", true), "the same seeds give the same JSON");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let p = &v["thin"]["probes"];
    let probes = p["probes"].as_object().expect("probes by name");
    assert_eq!(probes.len(), rows.len(), "the JSON has every row of the table");
    for r in &rows {
        let cols: Vec<&str> = r.split_whitespace().collect();
        assert_eq!(probes[cols[0]]["seeds"].as_u64(), Some(cols[1].parse().unwrap()), "{r}");
        assert_eq!(probes[cols[0]]["times"].as_u64(), Some(cols[2].parse().unwrap()), "{r}");
    }
    assert_eq!(p["rare_max_seeds"].as_u64(), Some(2));
    let mut kept = Vec::new();
    for rare in p["rare"].as_array().expect("rare probes") {
        let seeds = rare["seeds"].as_array().unwrap();
        assert!(!seeds.is_empty() && seeds.len() <= 2, "{rare}");
        assert_eq!(probes[rare["probe"].as_str().unwrap()]["seeds"].as_u64(), Some(seeds.len() as u64));
        kept.extend(seeds.iter().map(|s| s.as_u64().unwrap()));
    }
    kept.sort_unstable();
    kept.dedup();
    let keep: Vec<u64> = p["keep_seeds"].as_array().unwrap().iter().map(|s| s.as_u64().unwrap()).collect();
    assert_eq!(keep, kept, "the seeds to keep are those of the rare probes");
    if !keep.is_empty() {
        let list = keep.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
        assert!(text.contains(&format!("  seeds to keep: {list}")), "{text}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
