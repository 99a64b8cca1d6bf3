//! What the shim has made and must take down when the process is told to
//! stop: its temporary folders and its qemu process groups.
//!
//! Every [`crate::vm::TempDir`] and [`crate::vm::QemuGuard`] registers here
//! while it lives. A signal handler (the `dmsim` binary installs one for
//! SIGINT and SIGTERM) calls [`clean_up_now`], which kills every registered
//! qemu group, removes every registered folder and closes the registry, so
//! that nothing new is made between the clean-up and the process's exit
//! (a thread that tries gets [`ShimError::Interrupted`]).
//!
//! SIGKILL cannot be caught: then qemu dies by `PR_SET_PDEATHSIG`, and the
//! folders are swept by the next run (see [`crate::vm`]).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::ShimError;

struct Registry {
    dirs: BTreeSet<PathBuf>,
    groups: BTreeSet<i32>,
    closed: bool,
}

static REGISTRY: Mutex<Registry> =
    Mutex::new(Registry { dirs: BTreeSet::new(), groups: BTreeSet::new(), closed: false });

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    // A panic while holding the lock leaves the sets consistent (each
    // change is one insert or remove): keep going.
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `make` (which creates `dir`) and registers `dir`, unless the
/// process is shutting down.
pub(crate) fn make_dir(dir: &Path, make: impl FnOnce() -> Result<(), ShimError>) -> Result<(), ShimError> {
    let mut r = registry();
    if r.closed {
        return Err(ShimError::Interrupted);
    }
    make()?;
    r.dirs.insert(dir.to_path_buf());
    Ok(())
}

/// Forgets `dir` (its owner removed it).
pub(crate) fn forget_dir(dir: &Path) {
    registry().dirs.remove(dir);
}

/// Runs `spawn` (which starts a process group and returns its id) and
/// registers the group, unless the process is shutting down.
pub(crate) fn start_group<T>(spawn: impl FnOnce() -> Result<(T, i32), ShimError>) -> Result<T, ShimError> {
    let mut r = registry();
    if r.closed {
        return Err(ShimError::Interrupted);
    }
    let (t, pgid) = spawn()?;
    r.groups.insert(pgid);
    Ok(t)
}

/// Forgets process group `pgid` (its owner killed and reaped it).
pub(crate) fn forget_group(pgid: i32) {
    registry().groups.remove(&pgid);
}

/// What [`clean_up_now`] took down.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CleanedUp {
    /// Folders removed.
    pub dirs: usize,
    /// qemu process groups killed.
    pub groups: usize,
}

/// Kills every registered qemu group (SIGKILL), removes every registered
/// folder, and refuses new ones from now on. Safe to call from any thread
/// (not from inside an async signal handler: run it from a thread that
/// waits for signals).
pub fn clean_up_now() -> CleanedUp {
    let mut r = registry();
    r.closed = true;
    let groups = std::mem::take(&mut r.groups);
    for &pgid in &groups {
        // SAFETY: signals a process group this process created.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
    let dirs = std::mem::take(&mut r.dirs);
    for d in &dirs {
        let _ = std::fs::remove_dir_all(d);
    }
    CleanedUp { dirs: dirs.len(), groups: groups.len() }
}
