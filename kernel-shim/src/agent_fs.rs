//! The agent's file-system steps of a cache job: mounting the cache
//! device as ext4, a direct `RWF_DSYNC` write into a file of it
//! ([`FileWrite`]), unmounting, and the `/sys` stat line of a block device
//! (its I/O counters). Only the VM's agent (root, its own devices) calls
//! these.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use crate::agent::{errno_text, AlignedBuf};
use crate::error::ShimError;
use crate::protocol::{FileSync, FileWrite, FS_MOUNT_POINT};

fn cstring(s: &str) -> Result<std::ffi::CString, ShimError> {
    std::ffi::CString::new(s).map_err(|_| ShimError::Invalid(format!("{s:?} holds a NUL byte")))
}

/// Mount flags for the options the VFS takes as flags (`noatime`,
/// `nodiratime`, `lazytime`), and the rest joined for ext4.
fn split_options(options: &str) -> (libc::c_ulong, String) {
    let mut flags = 0;
    let mut rest = Vec::new();
    for o in options.split(',').filter(|o| !o.is_empty()) {
        match o {
            "noatime" => flags |= libc::MS_NOATIME,
            "nodiratime" => flags |= libc::MS_NODIRATIME,
            "lazytime" => flags |= libc::MS_LAZYTIME,
            _ => rest.push(o),
        }
    }
    (flags, rest.join(","))
}

/// Mounts `node` as ext4 on [`FS_MOUNT_POINT`] with `options`.
pub(crate) fn mount_ext4(node: &Path, options: &str) -> Result<(), ShimError> {
    std::fs::create_dir_all(FS_MOUNT_POINT)
        .map_err(|e| ShimError::io(format!("create {FS_MOUNT_POINT}"), e))?;
    let (flags, data) = split_options(options);
    let source = cstring(&node.to_string_lossy())?;
    let (target, fstype, data_c) = (cstring(FS_MOUNT_POINT)?, cstring("ext4")?, cstring(&data)?);
    // SAFETY: valid NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), flags, data_c.as_ptr().cast())
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        return Err(ShimError::io(
            format!("mount {} as ext4 ({options}) on {FS_MOUNT_POINT}", node.display()),
            e,
        ));
    }
    Ok(())
}

/// Whether a file system is mounted on [`FS_MOUNT_POINT`].
pub(crate) fn is_mounted() -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts.lines().any(|l| l.split_whitespace().nth(1) == Some(FS_MOUNT_POINT))
}

/// Unmounts [`FS_MOUNT_POINT`] if something is mounted there; a busy
/// mount is detached (gone once its last user is).
pub(crate) fn unmount() -> Result<(), ShimError> {
    if !is_mounted() {
        return Ok(());
    }
    let target = cstring(FS_MOUNT_POINT)?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::umount2(target.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let first = std::io::Error::last_os_error();
    // SAFETY: as above.
    if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } == 0 {
        return Err(ShimError::io(format!("unmount {FS_MOUNT_POINT} (detached instead)"), first));
    }
    Err(ShimError::io(format!("unmount {FS_MOUNT_POINT}"), first))
}

/// The `/sys/dev/block/<major>:<minor>/stat` line of the block device
/// `node` (read, write, discard and flush counters).
pub(crate) fn stat_line(node: &Path) -> Result<String, ShimError> {
    let md = std::fs::metadata(node).map_err(|e| ShimError::io(format!("stat {}", node.display()), e))?;
    let rdev = md.rdev();
    let path = format!("/sys/dev/block/{}:{}/stat", libc::major(rdev), libc::minor(rdev));
    let line = std::fs::read_to_string(&path).map_err(|e| ShimError::io(format!("read {path}"), e))?;
    Ok(line.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// Runs `w` on the mounted file system: `syncfs`, `observe("before")`, the
/// write, `observe("after")`, then for [`FileSync::DsyncFsync`] the fsync
/// and `observe("after-fsync")`. Returns the notes: `outcome` (`ok`, an errno
/// name or `short-write N`), `fsync` (likewise) and what `observe` added.
/// The stamps are those of write `w.write` of run `run` at
/// `w.device_sector`.
pub(crate) fn file_write(
    w: &FileWrite,
    run: u64,
    mut observe: impl FnMut(&str, &mut Vec<(String, String)>) -> Result<(), ShimError>,
) -> Result<Vec<(String, String)>, ShimError> {
    if !w.valid() {
        return Err(ShimError::Invalid(format!("file write {w:?} out of range")));
    }
    let path = Path::new(FS_MOUNT_POINT).join(&w.path);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .map_err(|e| ShimError::io(format!("open {} O_DIRECT", path.display()), e))?;
    let len = (w.sectors * 512) as usize;
    let size = file.metadata().map_err(|e| ShimError::io(format!("stat {}", path.display()), e))?.len();
    if w.offset + len as u64 > size {
        return Err(ShimError::Invalid(format!(
            "file write at {} of {len} bytes: {} holds {size} (it would extend the file)",
            w.offset,
            path.display()
        )));
    }
    let mut notes = Vec::new();
    // SAFETY: a valid open descriptor.
    if unsafe { libc::syncfs(file.as_raw_fd()) } != 0 {
        return Err(ShimError::io("syncfs before the file write", std::io::Error::last_os_error()));
    }
    observe("before", &mut notes)?;
    let mut buf = AlignedBuf::zeroed(len);
    dmsim_traces::stamp::fill(buf.as_mut_slice(), run, w.write, 0, w.device_sector);
    let flags = if w.sync == FileSync::Sync { libc::RWF_SYNC } else { libc::RWF_DSYNC };
    let outcome = pwrite_synced(&file, buf.as_slice(), w.offset, flags);
    notes.push(("outcome".into(), outcome));
    observe("after", &mut notes)?;
    if w.sync == FileSync::DsyncFsync {
        let outcome = match file.sync_all() {
            Ok(()) => "ok".to_string(),
            Err(e) => errno_text(&e),
        };
        notes.push(("fsync".into(), outcome));
        observe("after-fsync", &mut notes)?;
    }
    Ok(notes)
}

/// One `pwritev2` with `flags` (`RWF_DSYNC`, `RWF_SYNC`) of `data` at
/// `offset`: `ok`, an errno name or `short-write N`.
fn pwrite_synced(file: &File, data: &[u8], offset: u64, flags: libc::c_int) -> String {
    let iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    // SAFETY: one valid iovec over a live buffer the kernel only reads.
    let r = unsafe { libc::pwritev2(file.as_raw_fd(), &iov, 1, offset as i64, flags) };
    if r < 0 {
        errno_text(&std::io::Error::last_os_error())
    } else if r as usize != data.len() {
        format!("short-write {r}")
    } else {
        "ok".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_options_become_mount_flags() {
        let (flags, rest) = split_options("noatime,lazytime,commit=600,errors=continue");
        assert_eq!(flags, libc::MS_NOATIME | libc::MS_LAZYTIME);
        assert_eq!(rest, "commit=600,errors=continue");
        assert_eq!(split_options(""), (0, String::new()));
    }
}
