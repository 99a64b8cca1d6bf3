//! dmsim against hostile input, as issue 13 asks: every subcommand given
//! what a hostile or careless user would give it exits 2 with a message,
//! within seconds, under a 2 GiB address-space limit — never killed,
//! never aborting, never a panic. Also: one exit-status table in every
//! command's `--help` and in the README, and `--json` output that is the
//! same bytes for the same run.

use std::ffi::{OsStr, OsString};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The address-space limit every hostile run gets.
const ADDRESS_SPACE: u64 = 2 << 30;
/// How long a refusal may take.
const PROMPTLY: Duration = Duration::from_secs(20);

/// A fresh, empty folder of its own for one test.
fn scratch(tag: &str) -> PathBuf {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-hostile-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch folder");
    dir
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs dmsim with `args` under the address-space limit (and, with
/// `as_nobody`, as user 65534 so that mode 000 files are unreadable even
/// when the test runs as root); kills it after [`PROMPTLY`] and fails.
fn dmsim_limited(args: &[OsString], as_nobody: bool) -> (Output, Duration) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dmsim"));
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit { rlim_cur: ADDRESS_SPACE, rlim_max: ADDRESS_SPACE };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let drop_to_nobody = as_nobody && libc::geteuid() == 0;
            if drop_to_nobody
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(65534) != 0
                    || libc::setuid(65534) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let started = Instant::now();
    let mut child = cmd.spawn().expect("start dmsim");
    // Drain both pipes while it runs, so that a full pipe cannot stall it.
    let drain = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > PROMPTLY {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "dmsim {args:?} still ran after {PROMPTLY:?}; stderr: {}",
                String::from_utf8_lossy(&stderr.join().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = started.elapsed();
    (Output { status, stdout: stdout.join().unwrap(), stderr: stderr.join().unwrap() }, took)
}

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// Exit 2 with a short message, no signal, no panic, no abort.
fn assert_refused(args: &[OsString], out: &Output, took: Duration) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "dmsim {args:?}: status {:?} after {took:?}\nstderr: {err}",
        out.status
    );
    assert!(!err.trim().is_empty(), "dmsim {args:?}: exit 2 without a message");
    assert!(!err.contains("panicked") && !err.contains("memory allocation"), "dmsim {args:?}: {err}");
    assert!(err.len() < 2000, "dmsim {args:?}: a {} byte message: {err}", err.len());
}

/// The hostile inputs: (name, path, needs user nobody to be unreadable).
fn hostile_inputs(dir: &Path) -> Vec<(&'static str, PathBuf, bool)> {
    let fifo = dir.join("fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    // A size-limited slice of /dev/urandom, under the trace cap, and one
    // over it.
    let random = dir.join("random.bin");
    let mut bytes = vec![0u8; 32 << 20];
    let mut urandom = std::fs::File::open("/dev/urandom").expect("urandom");
    std::io::Read::read_exact(&mut urandom, &mut bytes).expect("read urandom");
    std::fs::write(&random, &bytes).expect("write random");
    let big_random = dir.join("random-over-cap.bin");
    bytes.resize((64 << 20) + 4096, 0x5a);
    std::fs::write(&big_random, &bytes).expect("write random");
    let empty = dir.join("empty");
    std::fs::write(&empty, b"").unwrap();
    let terabyte = dir.join("terabyte-of-zeroes");
    std::fs::File::create(&terabyte).unwrap().set_len(1 << 40).unwrap();
    let junk_line = dir.join("junk-line.trace");
    std::fs::write(&junk_line, format!("dmsim-trace 1\nseed {}\nworkload random\n", "x".repeat(1 << 20)))
        .unwrap();
    let unreadable = dir.join("unreadable");
    std::fs::write(&unreadable, b"dmsim-trace 1\n").unwrap();
    std::fs::set_permissions(&unreadable, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
    // The scratch folder must be reachable by user nobody.
    for d in [dir, dir.parent().unwrap()] {
        let _ = std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755));
    }
    vec![
        ("/dev/zero", PathBuf::from("/dev/zero"), false),
        ("/dev/urandom", PathBuf::from("/dev/urandom"), false),
        ("a FIFO without a writer", fifo, false),
        ("a directory", dir.to_path_buf(), false),
        ("an unreadable file", unreadable, true),
        ("32 MiB of /dev/urandom", random, false),
        ("64 MiB + 4 KiB of /dev/urandom", big_random, false),
        ("an empty file", empty, false),
        ("a sparse 1 TB file of zeroes", terabyte, false),
        ("a 1 MB junk token", junk_line, false),
        ("a path that does not exist", dir.join("missing"), false),
    ]
}

#[test]
fn every_subcommand_refuses_hostile_files_promptly_within_2_gib() {
    let dir = scratch("files");
    let out_file = dir.join("out");
    let inputs = hostile_inputs(&dir);
    let commands: Vec<Vec<&str>> = vec![
        vec!["show"],
        vec!["show", "--ops-only"],
        vec!["replay"],
        vec!["replay", "--on", "kernel"],
        vec!["minimize", "-o", out_file.to_str().unwrap()],
        vec!["metadata", "check"],
        vec!["metadata", "dump"],
        vec!["metadata", "dump", "--metadata-snap"],
    ];
    let mut slowest = Duration::ZERO;
    for (name, path, as_nobody) in &inputs {
        if *as_nobody && !is_root() && std::fs::File::open(path).is_ok() {
            eprintln!("note: {name} is readable by this user; skipped");
            continue;
        }
        for c in &commands {
            let mut args = os(c);
            args.push(path.as_os_str().to_owned());
            let (out, took) = dmsim_limited(&args, *as_nobody);
            assert_refused(&args, &out, took);
            slowest = slowest.max(took);
            let err = String::from_utf8_lossy(&out.stderr);
            if *name == "a 1 MB junk token" && c[0] != "metadata" {
                assert!(err.contains("bytes in all"), "the junk token is cut: {err}");
            }
        }
    }
    assert!(!out_file.exists(), "nothing written for refused input");
    eprintln!("slowest refusal: {slowest:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn out_of_range_options_are_refused_before_any_work() {
    let dir = scratch("options");
    let a_file = dir.join("a-file");
    std::fs::write(&a_file, b"not a folder").unwrap();
    let huge = "99999999999";
    // A thin trace: --race steps are checked against it before the VM boots.
    let race_trace = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/sim/tests/fixtures/no-passdown-discard-races-break-sharing.trace"
    );
    // A cache trace: its steps name the cache's disks and the trace's ops.
    let cache_race =
        concat!(env!("CARGO_MANIFEST_DIR"), "/sim/tests/fixtures/cache-writethrough-pairs-race.trace");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["run", "--seed", "1", "--ops", huge], "--ops"),
        (vec!["run", "--seed", "1", "--ops", "0"], "--ops"),
        (vec!["check", "--ops", huge], "--ops"),
        (vec!["check", "--metadata-ops", huge], "--metadata-ops"),
        (vec!["check", "--metadata-ops", "0"], "--metadata-ops"),
        (vec!["check", "--crashes-per-point", huge], "--crashes-per-point"),
        (vec!["check", "--crashes-per-point", "0"], "--crashes-per-point"),
        (vec!["check", "--jobs", "0"], "--jobs"),
        (vec!["check", "--jobs", huge], "--jobs"),
        (vec!["check", "--time", "0s"], "zero"),
        (vec!["check", "--time", "99999999999999999999h"], "--time"),
        (vec!["check", "--time", "9999999h9999999h"], "longest run"),
        (vec!["check", "--seeds", "5..5"], "empty seed range"),
        (vec!["check", "--failures", a_file.to_str().unwrap()], "not a folder"),
        (vec!["replay", "--on", "elsewhere", a_file.to_str().unwrap()], "unknown backend"),
        (vec!["replay", "--console", "c.txt", a_file.to_str().unwrap()], "--console is for `--on kernel`"),
        (vec!["replay", "--race", "0", a_file.to_str().unwrap()], "--race is for `--on kernel`"),
        (vec!["replay", "--on", "kernel", "--race", "0,nope", race_trace], "race step \"nope\""),
        (vec!["replay", "--on", "kernel", "--race", "0,bg999", race_trace], "the trace has 12 ops"),
        (vec!["replay", "--on", "kernel", "--race", "held=", race_trace], "race step"),
        (vec!["replay", "--on", "kernel", "--race", "bg0", race_trace], "which alone run in the background"),
        (
            vec!["replay", "--on", "kernel", "--race", "cache:hold-reads", race_trace],
            "a thin pool has no cache disk",
        ),
        (vec!["replay", "--on", "kernel", "--race", "0,hold-writes", cache_race], "a cache has no data disk"),
        (vec!["replay", "--on", "kernel", "--race", "0,1", cache_race], "the simulator's scheduling"),
        (vec!["replay", "--on", "kernel", "--race", "0,bg32", cache_race], "the trace has 32 ops"),
        (vec!["replay", "--kernel-answer", "x.kernel", race_trace], "--kernel-answer is for"),
        (vec!["replay", "--on", "kernel", "--kernel-answer", "x.kernel", race_trace], "--disks ublk"),
        (
            vec![
                "replay",
                "--on",
                "kernel",
                "--disks",
                "ublk",
                "--kernel-answer",
                a_file.to_str().unwrap(),
                race_trace,
            ],
            "not a kernel answer",
        ),
        (vec!["check", "--on", "elsewhere"], "--on"),
        (vec!["check", "--on", "kernel", "--time", "10m"], "--time is not supported"),
        (vec!["check", "--on", "kernel", "--campaign", "cache"], "thin campaign"),
        (vec!["check", "--on", "kernel", "--per-boot", "0"], "--per-boot"),
        (vec!["check", "--on", "kernel", "--locking", "regions-6.4"], "a patch the kernel does not run"),
        (vec!["check", "--on", "kernel", "--per-boot", "65"], "--per-boot"),
        (vec!["check", "--answers", dir.to_str().unwrap()], "goes with --on kernel"),
        (vec!["check", "--on", "kernel", "--answers", a_file.to_str().unwrap()], "is not a folder"),
        (vec!["no-such-command"], "unrecognized subcommand"),
        (vec!["run", "--seed", "1", "--trace", dir.to_str().unwrap()], "is a folder"),
        (vec!["minimize", a_file.to_str().unwrap(), "-o", dir.to_str().unwrap()], "is a folder"),
    ];
    for (c, needle) in cases {
        let args = os(&c);
        let (out, took) = dmsim_limited(&args, false);
        assert_refused(&args, &out, took);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "dmsim {c:?}: {needle:?} not in {err}");
        assert!(took < Duration::from_secs(5), "dmsim {c:?} took {took:?} to refuse");
    }
    let long = "9".repeat(100_000);
    let args = os(&["check", "--seeds", &long]);
    let (out, took) = dmsim_limited(&args, false);
    assert_refused(&args, &out, took);
    assert!(String::from_utf8_lossy(&out.stderr).contains("bytes in all"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The table as `dmsim --help` prints it.
fn exit_table(help: &str) -> &str {
    let at = help.find("Exit status (the same for every dmsim command):").expect("the table");
    help[at..].trim_end()
}

#[test]
fn every_command_prints_the_one_exit_status_table_and_the_readme_has_it() {
    let top = Command::new(env!("CARGO_BIN_EXE_dmsim")).arg("--help").output().unwrap();
    let top = String::from_utf8_lossy(&top.stdout).into_owned();
    let table = exit_table(&top).to_string();
    for line in
        ["  0    nothing wrong was found", "  1    problems were found", "  2    bad or unusable input"]
    {
        assert!(table.contains(line), "{line:?} not in\n{table}");
    }
    let commands: &[&[&str]] = &[
        &["check"],
        &["run"],
        &["replay"],
        &["minimize"],
        &["show"],
        &["fuzz-to-trace"],
        &["metadata", "check"],
        &["metadata", "dump"],
        &["engine", "serve"],
        &["engine", "message"],
        &["engine", "status"],
        &["engine", "stop"],
    ];
    for c in commands {
        let out = Command::new(env!("CARGO_BIN_EXE_dmsim")).args(*c).arg("--help").output().unwrap();
        assert_eq!(out.status.code(), Some(0));
        let help = String::from_utf8_lossy(&out.stdout);
        assert_eq!(exit_table(&help), table, "dmsim {c:?} --help");
        let own = help[..help.find("Exit status (the same").unwrap()].trim_end();
        assert!(
            own.ends_with('.') || own.ends_with(')'),
            "dmsim {c:?}: its own words on status 1 come first"
        );
        assert!(own.contains("Status"), "dmsim {c:?} --help says what its statuses mean:\n{own}");
    }
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    assert!(readme.contains(&table), "README.md carries the table exactly as --help prints it:\n{table}");
}

#[test]
fn json_summaries_are_the_same_bytes_for_the_same_run() {
    let dir = scratch("json");
    let failures = dir.join("f");
    let run = |jobs: &str, extra: &[&str]| {
        let mut args = os(&["check", "--seeds", "0..3", "--json", "--jobs", jobs, "--failures"]);
        args.push(failures.as_os_str().to_owned());
        args.extend(extra.iter().map(OsString::from));
        let out = Command::new(env!("CARGO_BIN_EXE_dmsim")).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    };
    let first = run("1", &[]);
    let second = run("2", &[]);
    assert_eq!(first, second, "identical runs (1 and 2 threads) print identical JSON");
    let v: serde_json::Value = serde_json::from_slice(&first).unwrap();
    assert!(v.get("timings").is_none() && v.get("wall_seconds").is_none(), "no timings unless asked");
    let timed = run("2", &["--timings"]);
    let v: serde_json::Value = serde_json::from_slice(&timed).unwrap();
    assert!(v["timings"]["wall_seconds"].as_f64().is_some_and(|s| s > 0.0), "{v}");

    // The metadata checker's report too.
    let example = dir.join("meta.img");
    let made = Command::new(env!("CARGO_BIN_EXE_dmsim"))
        .args([OsStr::new("metadata"), OsStr::new("check"), OsStr::new("--json"), example.as_os_str()])
        .output()
        .unwrap();
    assert_eq!(made.status.code(), Some(2), "a missing image is unusable input");
    std::fs::remove_dir_all(&dir).unwrap();
}
