//! What the thin VM tests share: the CI rule (and skipping by it), finding a tool, and Debian's
//! `thin_check` verdict on an image.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// Under `CI=true` a missing prerequisite fails instead of skipping.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Skips `test` (loudly) on a missing prerequisite `what`; fails on it
/// under CI.
pub fn skip_or_fail(test: &str, what: &str) {
    if in_ci() {
        panic!("CI=true and a prerequisite is missing: {what}");
    }
    eprintln!("SKIPPED: {test}: {what}");
}

/// A tool from PATH or the sbin directories.
pub fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// `Ok` if `thin_check` at `tool` accepts `image`, else its output.
pub fn thin_check_verdict(tool: &Path, image: &[u8]) -> Result<(), String> {
    let dir = dmsim_kernel_shim::vm::TempDir::new().expect("a temporary directory");
    let path = dir.path().join("metadata.img");
    std::fs::write(&path, image).expect("write the image");
    let out = std::process::Command::new(tool).arg(&path).output().expect("run thin_check");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }
}
