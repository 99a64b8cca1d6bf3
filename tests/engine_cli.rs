//! `dmsim engine` from the command line, as the README runs it: `serve`
//! on two files, then `message`, `status`, `devices` and `stop` over its
//! socket; refusals exit 2 with the kernel's errno; SIGTERM stops the
//! engine as `stop` does (its socket removed, the pool closed). This
//! host has no ublk: `activate` must say so.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

fn dmsim(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dmsim")).args(args).output().expect("dmsim runs")
}

fn scratch(name: &str) -> PathBuf {
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("engine-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `dmsim engine serve` on new files in `dir`; waits for its socket.
fn serve(dir: &Path) -> (Child, String) {
    serve_with(dir, &[])
}

/// [`serve`] with more options.
fn serve_with(dir: &Path, extra: &[&str]) -> (Child, String) {
    let (meta, data, socket) = (dir.join("meta"), dir.join("data"), dir.join("sock"));
    std::fs::File::create(&meta).unwrap().set_len(4 << 20).unwrap();
    std::fs::File::create(&data).unwrap().set_len(8 << 20).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_dmsim"))
        .args(["engine", "serve", "--format", "--table", "128 0 0"])
        .arg("--metadata")
        .arg(&meta)
        .arg("--data")
        .arg(&data)
        .arg("--socket")
        .arg(&socket)
        .args(extra)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "the engine's socket did not appear");
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, socket.to_str().unwrap().to_string())
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn serve_message_status_stop() {
    let dir = scratch("run");
    let (mut child, socket) = serve(&dir);
    let s = socket.as_str();
    let out = dmsim(&["engine", "message", "--socket", s, "create_thin", "0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = dmsim(&["engine", "status", "--socket", s]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(status.starts_with("0 ") && status.contains(" rw "), "{status}");
    let out = dmsim(&["engine", "message", "--socket", s, "create_thin", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("EEXIST"), "{}", text(&out));
    if !Path::new("/dev/ublk-control").exists() {
        let out = dmsim(&["engine", "activate", "--socket", s, "0", "2048"]);
        assert_eq!(out.status.code(), Some(2));
        assert!(text(&out).contains("ublk_drv"), "{}", text(&out));
    }
    let out = dmsim(&["engine", "devices", "--socket", s]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // On real time the clock is not the caller's.
    let out = dmsim(&["engine", "advance", "--socket", s, "5"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("real time"), "{}", text(&out));
    let out = dmsim(&["engine", "stop", "--socket", s]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(child.wait().unwrap().success());
    assert!(!Path::new(s).exists(), "the socket is removed");
    let out = dmsim(&["engine", "status", "--socket", s]);
    assert_eq!(out.status.code(), Some(2), "nobody answers: {}", text(&out));
    // The pool was closed: the metadata checks clean with the device.
    let out = dmsim(&["metadata", "check", dir.join("meta").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sigterm_stops_the_engine_cleanly() {
    let dir = scratch("term");
    let (mut child, socket) = serve(&dir);
    let out = dmsim(&["engine", "message", "--socket", &socket, "create_thin", "7"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!Path::new(&socket).exists());
    let out = dmsim(&["metadata", "dump", dir.join("meta").to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("dev_id=\"7\""), "{}", text(&out));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_trace_clock_moves_on_advance() {
    let dir = scratch("clock");
    let (mut child, socket) = serve_with(&dir, &["--trace-clock", "1000"]);
    let s = socket.as_str();
    let out = dmsim(&["engine", "time", "--socket", s]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1000", "{}", text(&out));
    let out = dmsim(&["engine", "advance", "--socket", s, "2500000000"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2500001000");
    let out = dmsim(&["engine", "stop", "--socket", s]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(child.wait().unwrap().success());
    // A trace clock and a commit period are one too many clocks.
    let out = dmsim(&[
        "engine",
        "serve",
        "--metadata",
        "m",
        "--data",
        "d",
        "--trace-clock",
        "0",
        "--commit-period-ms",
        "5",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    std::fs::remove_dir_all(&dir).unwrap();
}
