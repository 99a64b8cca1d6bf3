//! Building `ublk_drv.ko` for the VM's kernel, once per kernel release.
//!
//! Debian's 6.1 kernel does not ship ublk (`# CONFIG_BLK_DEV_UBLK is not
//! set`). The driver is one file, so the shim builds it out of tree: from
//! Debian's own source package of the same kernel (`linux-source-6.1`,
//! `/usr/src/linux-source-6.1.tar.xz`) it extracts only
//! `drivers/block/ublk_drv.c` and `include/uapi/linux/ublk_cmd.h`, checks
//! that the header is the one the headers package carries (the driver
//! includes that one), and runs `make -C /usr/src/linux-headers-<release>
//! M=<dir> modules` with a one-line Kbuild, `obj-m := ublk_drv.o`. The
//! module is kept in `target/ublk/<release>/ublk_drv.ko`. A recipe, not a
//! copy: no kernel source is in the repository.
//!
//! Prerequisites (`scripts/test-all` installs them): `linux-source-6.1`,
//! `linux-headers-<release>`, `make`, `gcc`, `xz`. A missing one is
//! [`ShimError::Missing`].

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::ShimError;
use crate::initramfs::{workspace_dir, Kernel};
use crate::vm::TempDir;

/// The module's file name.
pub const MODULE_FILE: &str = "ublk_drv.ko";

/// The source tarball of `release`'s kernel series (`6.1.0-57-amd64` →
/// `/usr/src/linux-source-6.1.tar.xz`) and the directory name inside it.
pub fn source_tarball(release: &str) -> Result<(PathBuf, String), ShimError> {
    let mut parts = release.split(['.', '-']);
    let (Some(major), Some(minor)) = (parts.next(), parts.next()) else {
        return Err(ShimError::Invalid(format!("kernel release {release:?} has no major.minor")));
    };
    if major.parse::<u32>().is_err() || minor.parse::<u32>().is_err() {
        return Err(ShimError::Invalid(format!("kernel release {release:?} has no major.minor")));
    }
    let dir = format!("linux-source-{major}.{minor}");
    Ok((PathBuf::from(format!("/usr/src/{dir}.tar.xz")), dir))
}

/// The headers tree of `release` (`/usr/src/linux-headers-<release>`).
pub fn headers_dir(release: &str) -> PathBuf {
    PathBuf::from(format!("/usr/src/linux-headers-{release}"))
}

/// Where the built module of `release` is kept.
pub fn cached_module(release: &str) -> PathBuf {
    workspace_dir().join("target").join("ublk").join(release).join(MODULE_FILE)
}

/// The Debian packages the build needs for `release`.
pub fn packages(release: &str) -> Result<String, ShimError> {
    let (_, dir) = source_tarball(release)?;
    Ok(format!("{dir} linux-headers-{release}"))
}

fn run(cmd: &mut Command, what: &str) -> Result<(), ShimError> {
    let out = cmd.output().map_err(|e| ShimError::Missing(format!("cannot run {what}: {e}")))?;
    if !out.status.success() {
        return Err(ShimError::Build(format!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// Whether `module` is built for `release`: its `vermagic=` names it.
pub fn vermagic_matches(module: &[u8], release: &str) -> bool {
    let needle = format!("vermagic={release} ");
    module.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// The module for `kernel`: the cached one, or built now (see the module
/// documentation). [`ShimError::Missing`] names the packages to install.
pub fn ublk_module(kernel: &Kernel) -> Result<PathBuf, ShimError> {
    let release = &kernel.release;
    let cached = cached_module(release);
    if let Ok(bytes) = std::fs::read(&cached) {
        if vermagic_matches(&bytes, release) {
            return Ok(cached);
        }
    }
    let (tarball, top) = source_tarball(release)?;
    let headers = headers_dir(release);
    let install = || format!("install them: apt-get install {}", packages(release).unwrap_or_default());
    if !tarball.is_file() {
        return Err(ShimError::Missing(format!("{} does not exist; {}", tarball.display(), install())));
    }
    if !headers.join("Makefile").is_file() {
        return Err(ShimError::Missing(format!("{} does not exist; {}", headers.display(), install())));
    }
    let header_in_package = std::fs::read_dir("/usr/src")
        .map_err(|e| ShimError::io("list /usr/src", e))?
        .flatten()
        .map(|e| e.path().join("include/uapi/linux/ublk_cmd.h"))
        .find(|p| p.is_file() && p.to_string_lossy().contains("linux-headers-"));
    let tmp = TempDir::new()?;
    let src = tmp.path().join("src");
    let build = tmp.path().join("build");
    for d in [&src, &build] {
        std::fs::create_dir_all(d).map_err(|e| ShimError::io(format!("create {}", d.display()), e))?;
    }
    let files = ["drivers/block/ublk_drv.c", "include/uapi/linux/ublk_cmd.h"];
    run(
        Command::new("tar")
            .arg("-xJf")
            .arg(&tarball)
            .arg("-C")
            .arg(&src)
            .arg("--strip-components=1")
            .args(files.iter().map(|f| format!("{top}/{f}"))),
        &format!("tar: extract ublk from {}", tarball.display()),
    )?;
    // The driver includes <uapi/linux/ublk_cmd.h> from the headers tree;
    // it must be the source's.
    let ours =
        std::fs::read(src.join(files[1])).map_err(|e| ShimError::io("read the extracted ublk_cmd.h", e))?;
    if let Some(theirs) = header_in_package {
        let theirs =
            std::fs::read(&theirs).map_err(|e| ShimError::io(format!("read {}", theirs.display()), e))?;
        if theirs != ours {
            return Err(ShimError::Build(format!(
                "ublk_cmd.h of {} differs from the headers package's; the source and headers packages are of different kernels",
                tarball.display()
            )));
        }
    }
    std::fs::copy(src.join(files[0]), build.join("ublk_drv.c"))
        .map_err(|e| ShimError::io("copy ublk_drv.c to the build directory", e))?;
    std::fs::write(build.join("Kbuild"), "obj-m := ublk_drv.o\n")
        .map_err(|e| ShimError::io("write Kbuild", e))?;
    run(
        Command::new("make")
            .arg("-s")
            .arg("-C")
            .arg(&headers)
            .arg(format!("M={}", build.display()))
            .arg("modules"),
        &format!("make -C {} M=… modules", headers.display()),
    )?;
    let built = build.join(MODULE_FILE);
    let bytes = std::fs::read(&built)
        .map_err(|e| ShimError::Build(format!("{} was not built: {e}", built.display())))?;
    if !vermagic_matches(&bytes, release) {
        return Err(ShimError::Build(format!("{} is not built for {release} (vermagic)", built.display())));
    }
    let dir = cached.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| ShimError::io(format!("create {}", dir.display()), e))?;
    let partial = dir.join(format!("{MODULE_FILE}.{}", std::process::id()));
    std::fs::write(&partial, &bytes).map_err(|e| ShimError::io(format!("write {}", partial.display()), e))?;
    std::fs::rename(&partial, &cached)
        .map_err(|e| ShimError::io(format!("rename to {}", cached.display()), e))?;
    Ok(cached)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_package_follows_the_release() {
        let (t, d) = source_tarball("6.1.0-57-amd64").unwrap();
        assert_eq!(t, PathBuf::from("/usr/src/linux-source-6.1.tar.xz"));
        assert_eq!(d, "linux-source-6.1");
        assert_eq!(packages("6.1.0-57-amd64").unwrap(), "linux-source-6.1 linux-headers-6.1.0-57-amd64");
        assert!(source_tarball("garbage").is_err());
        assert!(source_tarball("").is_err());
    }

    #[test]
    fn vermagic_is_matched_whole() {
        let m = b"\0name=ublk_drv\0vermagic=6.1.0-57-amd64 SMP preempt\0";
        assert!(vermagic_matches(m, "6.1.0-57-amd64"));
        assert!(!vermagic_matches(m, "6.1.0-5"));
        assert!(!vermagic_matches(m, "6.1.0-58-amd64"));
    }
}
