//! What the tests of the `dmsim` binary share: running it, its output as
//! text, and scratch folders of their own. (Each test file compiles this
//! module on its own and uses part of it.)
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};

/// Runs the `dmsim` binary with `args` and waits for it.
pub fn dmsim(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dmsim")).args(args).output().expect("run dmsim")
}

/// Standard output, as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Standard error, as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A fresh, empty folder for one test, named `<prefix>-<pid>-<n>-<tag>`
/// under cargo's temporary folder for tests.
pub fn scratch(prefix: &str, tag: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{prefix}-{}-{n}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch folder");
    dir
}

/// A path as `&str` (the tests' paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Whether this machine can boot the kernel shim's VM: qemu on `PATH` and
/// a kernel image in `/boot`; why not otherwise.
pub fn kernel_prerequisites() -> Result<(), String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if !std::env::split_paths(&path).any(|d| d.join("qemu-system-x86_64").is_file()) {
        return Err("qemu-system-x86_64 is not installed".into());
    }
    let has_kernel = std::fs::read_dir("/boot")
        .map(|rd| rd.flatten().any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-")))
        .unwrap_or(false);
    if !has_kernel {
        return Err("no /boot/vmlinuz-* (apt-get install linux-image-amd64)".into());
    }
    Ok(())
}
