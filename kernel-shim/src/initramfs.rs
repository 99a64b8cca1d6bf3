//! The initramfs the VM boots: a cpio archive (`newc`, uncompressed) with
//! the static agent as `/init`, the device-mapper, virtio and ext4 modules
//! of the kernel resolved from its `modules.dep`, and the list of modules the
//! agent loads in order.
//!
//! Also: finding the kernel to boot ([`Kernel::find`]) and building the
//! static agent ([`build_agent`]).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::ShimError;

/// The modules the agent loads (by name as in `modules.dep`, `-` and `_`
/// alike), besides their dependencies. crc32c has no static dependency
/// from dm-persistent-data (libcrc32c asks the crypto API for it at load
/// time, which would need modprobe), so its providers are listed first.
/// ext4 is for a cache job's file-system steps (`CacheStep::MountExt4`).
pub const ROOT_MODULES: &[&str] = &[
    "crc32c_generic",
    "crc32c-intel",
    "virtio_pci",
    "virtio_blk",
    "dm-mod",
    "dm-bufio",
    "dm-persistent-data",
    "dm-bio-prison",
    "dm-thin-pool",
    "dm-cache",
    "dm-cache-smq",
    "dm-log-writes",
    "dm-flakey",
    "loop",
    "ext4",
];

/// A cpio `newc` archive being written.
#[derive(Debug, Default)]
pub struct Cpio {
    out: Vec<u8>,
    ino: u32,
    dirs: BTreeSet<String>,
}

impl Cpio {
    /// An empty archive.
    pub fn new() -> Cpio {
        Cpio::default()
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            if mode & 0o170000 == 0o040000 { 2 } else { 1 },
            0, // mtime: reproducible archives
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    /// A directory and its parents (each once).
    pub fn dir(&mut self, path: &str) {
        let path = path.trim_matches('/');
        let mut so_far = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if !so_far.is_empty() {
                so_far.push('/');
            }
            so_far.push_str(part);
            if self.dirs.insert(so_far.clone()) {
                let name = so_far.clone();
                self.entry(&name, 0o040755, (0, 0), &[]);
            }
        }
    }

    /// A regular file (its directory is created first).
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        let path = path.trim_start_matches('/');
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.entry(path, 0o100000 | (mode & 0o7777), (0, 0), data);
    }

    /// A character device node.
    pub fn char_dev(&mut self, path: &str, major: u32, minor: u32) {
        let path = path.trim_start_matches('/');
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.entry(path, 0o020600, (major, minor), &[]);
    }

    /// The archive with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        // Pad to 512 as cpio tools do.
        while !self.out.len().is_multiple_of(512) {
            self.out.push(0);
        }
        self.out
    }
}

/// A kernel to boot and its modules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// The release (`6.1.0-56-amd64`).
    pub release: String,
    /// The bootable image (`/boot/vmlinuz-<release>`).
    pub image: PathBuf,
    /// Its module tree (`/lib/modules/<release>`).
    pub modules: PathBuf,
}

impl Kernel {
    /// The kernel named by `DMSIM_KERNEL` (a release), or the newest
    /// `/boot/vmlinuz-*` that has a module tree with dm-thin-pool.
    pub fn find() -> Result<Kernel, ShimError> {
        if let Ok(release) = std::env::var("DMSIM_KERNEL") {
            return Kernel::at(Path::new("/boot"), Path::new("/lib/modules"), &release);
        }
        let mut releases: Vec<String> = std::fs::read_dir("/boot")
            .map_err(|e| ShimError::Missing(format!("cannot list /boot ({e}); install linux-image-amd64")))?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_prefix("vmlinuz-").map(str::to_string))
            .collect();
        releases.sort();
        releases
            .iter()
            .rev()
            .find_map(|r| Kernel::at(Path::new("/boot"), Path::new("/lib/modules"), r).ok())
            .ok_or_else(|| {
                ShimError::Missing(
                    "no /boot/vmlinuz-* with dm-thin-pool in /lib/modules; install linux-image-amd64".into(),
                )
            })
    }

    /// The kernel `release` under the given directories.
    pub fn at(boot: &Path, lib_modules: &Path, release: &str) -> Result<Kernel, ShimError> {
        let image = boot.join(format!("vmlinuz-{release}"));
        let modules = lib_modules.join(release);
        if !image.is_file() {
            return Err(ShimError::Missing(format!("{} does not exist", image.display())));
        }
        std::fs::File::open(&image)
            .map_err(|e| ShimError::Missing(format!("cannot read {} ({e})", image.display())))?;
        let dep = std::fs::read_to_string(modules.join("modules.dep")).map_err(|e| {
            ShimError::Missing(format!("cannot read {}/modules.dep ({e})", modules.display()))
        })?;
        if !dep.lines().any(|l| l.contains("/dm-thin-pool.ko")) {
            return Err(ShimError::Missing(format!("{} has no dm-thin-pool module", modules.display())));
        }
        Ok(Kernel { release: release.to_string(), image, modules })
    }

    /// The module files to load, relative to the module tree, dependencies
    /// before their users, each once.
    pub fn module_order(&self, roots: &[&str]) -> Result<Vec<String>, ShimError> {
        let dep = std::fs::read_to_string(self.modules.join("modules.dep"))
            .map_err(|e| ShimError::io(format!("read {}/modules.dep", self.modules.display()), e))?;
        resolve_modules(&dep, roots)
    }
}

/// A module's name from its path in `modules.dep` (`-` as `_`).
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Orders the modules `roots` need, dependencies first, from the text of
/// a `modules.dep`. A root that is not in it is an error (a module that
/// is built in is not listed either: name only modules).
pub fn resolve_modules(modules_dep: &str, roots: &[&str]) -> Result<Vec<String>, ShimError> {
    let mut deps: std::collections::BTreeMap<String, (String, Vec<String>)> = Default::default();
    for line in modules_dep.lines() {
        let Some((module, rest)) = line.split_once(':') else { continue };
        let module = module.trim();
        deps.insert(
            module_name(module),
            (module.to_string(), rest.split_whitespace().map(str::to_string).collect()),
        );
    }
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit(
        name: &str,
        deps: &std::collections::BTreeMap<String, (String, Vec<String>)>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
        depth: usize,
    ) -> Result<(), ShimError> {
        if depth > 64 {
            return Err(ShimError::Invalid(format!("modules.dep: dependency cycle through {name}")));
        }
        if seen.contains(name) {
            return Ok(());
        }
        let (path, needs) = deps
            .get(name)
            .ok_or_else(|| ShimError::Missing(format!("module {name} is not in modules.dep")))?;
        // modules.dep lists every dependency, the deepest last.
        for d in needs.iter().rev() {
            visit(&module_name(d), deps, seen, order, depth + 1)?;
        }
        if seen.insert(name.to_string()) {
            order.push(path.clone());
        }
        Ok(())
    }
    for root in roots {
        visit(&root.replace('-', "_"), &deps, &mut seen, &mut order, 0)?;
    }
    Ok(order)
}

/// Builds the initramfs: `/init` (the agent), the modules of `roots` and
/// their dependencies under `/lib/modules/<release>/`, and the agent's
/// module list.
pub fn build_initramfs(kernel: &Kernel, agent: &[u8], roots: &[&str]) -> Result<Vec<u8>, ShimError> {
    build_initramfs_with(kernel, agent, roots, &[])
}

/// As [`build_initramfs`], with modules that are not in the kernel's tree
/// (`(file name, bytes)`, e.g. an out-of-tree `ublk_drv.ko`) under
/// `/lib/modules/<release>/extra/`, loaded after the others.
pub fn build_initramfs_with(
    kernel: &Kernel,
    agent: &[u8],
    roots: &[&str],
    extra: &[(String, Vec<u8>)],
) -> Result<Vec<u8>, ShimError> {
    let order = kernel.module_order(roots)?;
    let mut cpio = Cpio::new();
    for d in ["dev", "proc", "sys", "tmp", "etc"] {
        cpio.dir(d);
    }
    cpio.char_dev("dev/console", 5, 1);
    cpio.char_dev("dev/null", 1, 3);
    cpio.file("init", 0o755, agent);
    let mut list = String::new();
    for m in &order {
        let src = kernel.modules.join(m);
        let data =
            std::fs::read(&src).map_err(|e| ShimError::io(format!("read module {}", src.display()), e))?;
        let dest = format!("lib/modules/{}/{m}", kernel.release);
        cpio.file(&dest, 0o644, &data);
        list.push('/');
        list.push_str(&dest);
        list.push('\n');
    }
    for (name, data) in extra {
        if name.is_empty() || name.contains('/') {
            return Err(ShimError::Invalid(format!("module file name {name:?}")));
        }
        let dest = format!("lib/modules/{}/extra/{name}", kernel.release);
        cpio.file(&dest, 0o644, data);
        list.push('/');
        list.push_str(&dest);
        list.push('\n');
    }
    cpio.file(crate::agent::MODULE_LIST, 0o644, list.as_bytes());
    Ok(cpio.finish())
}

/// The workspace this crate was built in (for building the agent).
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// The static agent binary: `DMSIM_KERNEL_AGENT` if set (a prebuilt
/// binary), else built from this workspace with cargo
/// (`--release --target x86_64-unknown-linux-gnu`, `crt-static`, in its own
/// target directory so it never contends with the build that runs it).
pub fn build_agent() -> Result<PathBuf, ShimError> {
    if let Some(p) = std::env::var_os("DMSIM_KERNEL_AGENT") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(ShimError::Missing(format!("DMSIM_KERNEL_AGENT={} is not a file", p.display())))
        };
    }
    let ws = workspace_dir();
    let target_dir = ws.join("target").join("kernel-agent");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let triple = "x86_64-unknown-linux-gnu";
    let out = Command::new(&cargo)
        .current_dir(&ws)
        .args(["build", "--release", "--quiet", "-p", "dmsim-kernel-shim", "--bin", "dmsim-kernel-agent"])
        .args(["--target", triple])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .map_err(|e| {
            ShimError::Missing(format!("cannot run cargo ({}): {e}", Path::new(&cargo).display()))
        })?;
    if !out.status.success() {
        return Err(ShimError::Build(String::from_utf8_lossy(&out.stderr).into_owned()));
    }
    let bin = target_dir.join(triple).join("release").join("dmsim-kernel-agent");
    if !bin.is_file() {
        return Err(ShimError::Build(format!("{} was not built", bin.display())));
    }
    Ok(bin)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/md/dm-thin-pool.ko: kernel/drivers/md/persistent-data/dm-persistent-data.ko kernel/drivers/md/dm-bio-prison.ko kernel/drivers/md/dm-bufio.ko kernel/drivers/md/dm-mod.ko kernel/lib/libcrc32c.ko
kernel/drivers/md/persistent-data/dm-persistent-data.ko: kernel/drivers/md/dm-bufio.ko kernel/drivers/md/dm-mod.ko kernel/lib/libcrc32c.ko
kernel/drivers/md/dm-bio-prison.ko:
kernel/drivers/md/dm-bufio.ko:
kernel/drivers/md/dm-mod.ko:
kernel/lib/libcrc32c.ko:
kernel/crypto/crc32c_generic.ko:
";

    #[test]
    fn dependencies_come_first() {
        let order = resolve_modules(DEP, &["crc32c_generic", "dm-thin-pool"]).unwrap();
        let pos = |m: &str| order.iter().position(|p| p.ends_with(m)).unwrap();
        assert_eq!(order.len(), 7);
        assert!(pos("/libcrc32c.ko") < pos("/dm-persistent-data.ko"));
        assert!(
            pos("/dm-mod.ko") < pos("/dm-bufio.ko") || pos("/dm-bufio.ko") < pos("/dm-persistent-data.ko")
        );
        assert!(pos("/dm-persistent-data.ko") < pos("/dm-thin-pool.ko"));
        assert!(resolve_modules(DEP, &["no-such"]).unwrap_err().is_missing());
    }

    #[test]
    fn cpio_newc_layout() {
        let mut c = Cpio::new();
        c.file("a/b", 0o644, b"xyz");
        let out = c.finish();
        assert_eq!(&out[..6], b"070701");
        // First entry is the directory "a".
        assert_eq!(&out[110..112], b"a\0");
        assert!(out.len().is_multiple_of(512));
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("a/b\0"));
        assert!(text.contains("TRAILER!!!"));
    }
}
