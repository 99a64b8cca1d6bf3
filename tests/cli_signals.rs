//! SIGINT and SIGTERM take down what a run made (issue 13): `dmsim replay
//! --on kernel` interrupted while its VM runs leaves no qemu process and
//! no temporary folder, and exits 128 + the signal; `dmsim check`
//! interrupted mid-campaign leaves no temporary file either.
//!
//! Each run gets a private `TMPDIR`, so "nothing left" is exact: no
//! `dmsim-*` entry in it afterwards, and no process whose command line
//! names it. The kernel part needs `qemu-system-x86_64` and Debian's
//! kernel: without them it prints SKIPPED, or fails under `CI=true`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dmsim_sim::run::{CampaignSettings, RunConfig};
use dmsim_traces::{Event, Op, Trace};

mod cli_common;
use cli_common::kernel_prerequisites;

fn scratch(tag: &str) -> PathBuf {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-signals-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch folder");
    dir
}

/// Processes (pid, command line) whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmd.contains(needle) {
            out.push((pid, cmd));
        }
    }
    out
}

/// The `dmsim-*` entries left in `dir`.
fn leftovers(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.retain(|n| n.starts_with("dmsim-"));
    v.sort();
    v
}

fn spawn_dmsim(args: &[&str], tmpdir: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_dmsim"))
        .args(args)
        .env("TMPDIR", tmpdir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start dmsim")
}

/// Sends `sig`, then waits (at most 60 s) for the exit; returns the exit
/// code and stderr.
fn interrupt(mut child: Child, sig: i32) -> (Option<i32>, String) {
    // SAFETY: signals our own child.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
    let started = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("dmsim did not exit within 60 s of signal {sig}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("collect");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn name(sig: i32) -> &'static str {
    if sig == libc::SIGINT {
        "SIGINT"
    } else {
        "SIGTERM"
    }
}

#[test]
fn an_interrupted_campaign_exits_128_plus_the_signal_and_leaves_no_files() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let tmp = scratch(&format!("check-{sig}"));
        let failures = tmp.join("failures");
        let child = spawn_dmsim(
            &["check", "--seeds", "0..100000", "--jobs", "2", "--failures", failures.to_str().unwrap()],
            &tmp,
        );
        // Long enough for thin_check runs and campaigns to be under way.
        std::thread::sleep(Duration::from_secs(3));
        let (code, err) = interrupt(child, sig);
        assert_eq!(code, Some(128 + sig), "{}: {err}", name(sig));
        assert!(err.contains(&format!("interrupted by {}", name(sig))), "{err}");
        assert_eq!(leftovers(&tmp), Vec::<String>::new(), "{}", name(sig));
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}

/// A quiet trace that keeps the VM busy for a few seconds.
fn busy_trace() -> Trace {
    let mut ops = vec![Op::CreateThin];
    for i in 0..64 {
        ops.push(Op::Write {
            dev: 0,
            sector: (i % 16) * 128,
            nr_sectors: 128,
            fua: false,
            preflush: i % 8 == 0,
        });
        ops.push(Op::Read { dev: 0, sector: (i % 16) * 128, nr_sectors: 128 });
    }
    let mut cfg = RunConfig::for_seed(11, ops.len(), &CampaignSettings::default());
    cfg.thin.block_sectors = 128;
    cfg.thin.data_blocks = 32;
    cfg.thin.thin_blocks = 16;
    cfg.thin.max_devices = 4;
    cfg.thin.features = Default::default();
    Trace { header: cfg.header(), events: ops.into_iter().map(Event::Op).collect() }
}

#[test]
fn an_interrupted_kernel_replay_leaves_no_vm_and_no_folder() {
    if let Err(e) = kernel_prerequisites() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true and a prerequisite is missing: {e}");
        }
        eprintln!("SKIPPED: kernel signal test: {e}");
        return;
    }
    let traces = scratch("traces");
    let trace = traces.join("busy.trace");
    std::fs::write(&trace, dmsim_traces::to_text(&busy_trace())).unwrap();
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let tmp = scratch(&format!("kernel-{sig}"));
        let needle = tmp.to_str().unwrap().to_string();
        let child = spawn_dmsim(&["replay", "--on", "kernel", trace.to_str().unwrap()], &tmp);
        // Wait for this run's qemu (the first run may build the agent).
        let started = Instant::now();
        loop {
            if processes_mentioning(&needle).iter().any(|(_, c)| c.contains("qemu-system")) {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(600), "no qemu started within 10 minutes");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!leftovers(&tmp).is_empty(), "the run made its folders");
        let (code, err) = interrupt(child, sig);
        assert_eq!(code, Some(128 + sig), "{}: {err}", name(sig));
        assert!(err.contains("stopped 1 VM(s)"), "{err}");
        // qemu was SIGKILLed by the handler; give the kernel a moment to
        // reap it (it is reparented once dmsim exits).
        let deadline = Instant::now() + Duration::from_secs(10);
        while processes_mentioning(&needle).iter().any(|(_, c)| c.contains("qemu-system")) {
            assert!(
                Instant::now() < deadline,
                "qemu outlived {}: {:?}",
                name(sig),
                processes_mentioning(&needle)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(leftovers(&tmp), Vec::<String>::new(), "{}", name(sig));
        std::fs::remove_dir_all(&tmp).unwrap();
    }
    std::fs::remove_dir_all(&traces).unwrap();
}
