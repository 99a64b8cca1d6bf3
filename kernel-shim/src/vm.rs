//! Booting the kernel in qemu and replaying a trace there.
//!
//! [`KernelShim::prepare`] finds qemu and the kernel, builds the static
//! agent and the initramfs once; [`KernelShim::replay`] boots one VM for
//! one trace, [`KernelShim::replay_many`] and [`KernelShim::run_jobs`] one
//! VM for up to [`JOBS_PER_BOOT`] jobs: four virtio disks (request, result,
//! metadata, data) as files in a private temporary directory, each job on
//! its own slices of the pool disks ([`Layout`]), the console on a file, a
//! timeout on the whole boot.
//!
//! Cleanup: qemu runs in its own process group with `PR_SET_PDEATHSIG`
//! (it dies with the thread that started it) and `-no-reboot`; a guard
//! kills the group on drop (errors, panics, timeouts); temporary
//! directories are removed on drop, and directories left by processes that
//! were killed outright are swept at the next [`TempDir::new`]. Both are
//! registered with [`crate::cleanup`] while they live, so a SIGINT or
//! SIGTERM handler can take them down before the process exits.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use dmsim_model::block_device::MemDevice;
use dmsim_model::thin::dump::{dump_xml, DumpOptions};
use dmsim_traces::Trace;

use crate::agent::DiskRole;
use crate::cleanup;
use crate::error::ShimError;
use crate::initramfs::{build_agent, build_initramfs_with, Kernel, ROOT_MODULES};
use crate::protocol::{
    encode_cache_steps, encode_request_concurrent, log_offsets, read_frame, write_frame, CacheSpec,
    CacheStep, JobKind, KernelResult, Layout, PoolSpec, CACHE_STEPS_PARAM, CACHE_UBLK_PARAM,
    LOG_SLICE_SECTORS, REQUEST_MAGIC, RESULT_MAGIC,
};

/// What the data disk is filled with before a run (the simulator's
/// `DATA_GARBAGE`), so that unzeroed blocks read as garbage on both.
pub const DATA_FILL: u8 = 0xa7;

/// The agent's first console line ([`crate::agent`] prints it first thing):
/// the boot is over when it appears.
pub const AGENT_STARTED: &str = "dmsim-agent: started";

/// The environment variable that raises the guest kernel's console log
/// level for diagnosis (`DMSIM_KERNEL_LOGLEVEL=7`: dm-thin's mode changes
/// are `KERN_INFO`, 6, and the default, 5, hides them); with it the agent
/// also prints each op on the console before applying it, so that
/// `replay --console` shows which op each kernel message came in. It
/// changes the guest's timing a little; comparisons are otherwise
/// unchanged.
pub const KERNEL_LOGLEVEL_ENV: &str = "DMSIM_KERNEL_LOGLEVEL";

/// The guest kernel's command line.
fn kernel_command_line() -> String {
    match std::env::var(KERNEL_LOGLEVEL_ENV).ok().and_then(|v| v.parse::<u8>().ok()).filter(|l| *l <= 8) {
        Some(level) => format!("console=ttyS0 panic=-1 loglevel={level} rdinit=/init dmsim.ops_on_console"),
        None => "console=ttyS0 panic=-1 loglevel=5 rdinit=/init".into(),
    }
}

/// The first line of a run's console when its first boot hung and the VM
/// was booted again.
pub const HUNG_BOOT_NOTE: &str = "dmsim-host: the first boot did not reach the agent in time; booted again";

/// The first line of a run's console when the first boot's console stopped
/// growing once the agent ran ([`VmOptions::stall_timeout`]) and the VM
/// was booted again; the stalled console's last lines follow it.
pub const STALLED_RUN_NOTE: &str = "dmsim-host: the first boot stopped making progress; booted again";

const TEMP_PREFIX: &str = "dmsim-kernel-shim.";

/// A private temporary directory, removed on drop. Its name carries the
/// creating process's id, so directories of processes that died without
/// cleaning up are recognised and removed by the next one.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// A new directory under the system's temporary directory; first
    /// removes the shim's directories whose process no longer exists.
    pub fn new() -> Result<TempDir, ShimError> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let base = std::env::temp_dir();
        sweep_stale(&base);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = base.join(format!("{TEMP_PREFIX}{}.{n}", std::process::id()));
        cleanup::make_dir(&path, || {
            std::fs::create_dir(&path).map_err(|e| ShimError::io(format!("create {}", path.display()), e))
        })?;
        Ok(TempDir { path })
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
        cleanup::forget_dir(&self.path);
    }
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Removes `dmsim-kernel-shim.<pid>.<n>` directories of dead processes.
fn sweep_stale(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(TEMP_PREFIX)) else { continue };
        let Some(pid) = rest.split('.').next().and_then(|p| p.parse::<i32>().ok()) else { continue };
        if pid > 0 && !process_alive(pid) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A running qemu: its whole process group is killed on drop.
#[derive(Debug)]
pub struct QemuGuard {
    child: Child,
}

impl QemuGuard {
    /// Starts `cmd` in a new process group, to die with the calling thread.
    pub fn spawn(mut cmd: Command) -> Result<QemuGuard, ShimError> {
        cmd.process_group(0);
        // SAFETY: prctl is async-signal-safe; nothing else runs in the hook.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cleanup::start_group(|| {
            let child = cmd.spawn().map_err(|e| ShimError::io("start qemu", e))?;
            let pgid = child.id() as i32;
            Ok((QemuGuard { child }, pgid))
        })
    }

    /// Waits until `console` holds `marker`, up to `within`: `true` if it
    /// does, `false` if the time ran out or qemu exited first.
    pub fn wait_for_console(
        &mut self,
        console: &Path,
        marker: &str,
        within: Duration,
    ) -> Result<bool, ShimError> {
        let deadline = Instant::now() + within;
        loop {
            // The console is a file qemu appends to; a read sees a prefix.
            if std::fs::read(console).is_ok_and(|b| b.windows(marker.len()).any(|w| w == marker.as_bytes())) {
                return Ok(true);
            }
            if self.child.try_wait().map_err(|e| ShimError::io("wait for qemu", e))?.is_some()
                || Instant::now() >= deadline
            {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the exit, up to `timeout`, watching `console` grow: what
    /// came first — the exit, the timeout, or `stall` without a byte
    /// added to the console.
    pub fn wait_progressing(
        &mut self,
        console: &Path,
        timeout: Duration,
        stall: Duration,
    ) -> Result<Waited, ShimError> {
        let deadline = Instant::now() + timeout;
        let (mut size, mut moved) = (0, Instant::now());
        loop {
            if let Some(s) = self.child.try_wait().map_err(|e| ShimError::io("wait for qemu", e))? {
                return Ok(Waited::Exited(s));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Waited::TimedOut);
            }
            let len = std::fs::metadata(console).map_or(0, |m| m.len());
            if len != size {
                (size, moved) = (len, now);
            } else if now.duration_since(moved) >= stall {
                return Ok(Waited::Stalled);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// How a wait for qemu ended ([`QemuGuard::wait_progressing`]).
#[derive(Debug)]
pub enum Waited {
    /// qemu exited.
    Exited(std::process::ExitStatus),
    /// The time ran out.
    TimedOut,
    /// Its console did not grow for the stall limit.
    Stalled,
}

impl Drop for QemuGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: signals the group this guard created.
            unsafe {
                libc::kill(-(self.child.id() as i32), libc::SIGKILL);
            }
        }
        let _ = self.child.wait();
        cleanup::forget_group(self.child.id() as i32);
    }
}

/// How to run the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmOptions {
    /// The qemu binary.
    pub qemu: PathBuf,
    /// Virtual CPUs.
    pub smp: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Limit on one job's share of a boot, replay and power-off: a boot
    /// of `n` jobs may take `n` times it.
    pub timeout: Duration,
    /// Limit on the boot alone: when the agent has not printed its first
    /// line by then (a TCG guest can hang bringing up its second vCPU on a
    /// loaded host), qemu is killed and the VM booted once more. The disks
    /// are untouched until the agent runs, so the second boot starts from
    /// the same state.
    pub boot_timeout: Duration,
    /// Limit on silence once the agent runs: the agent prints a line at
    /// every job and, every 30 s, the ops it has applied when they moved;
    /// a console that does not grow for this long is a VM that stopped
    /// (seen once in CI: a run of five short jobs silent after its
    /// request for the rest of the 10 minutes). qemu is killed and the VM
    /// booted once more from disks written afresh, and that boot is waited
    /// for to the end (`timeout`); the stalled console's tail heads the
    /// run's console ([`STALLED_RUN_NOTE`]).
    pub stall_timeout: Duration,
}

impl VmOptions {
    /// `qemu-system-x86_64` from `PATH`, 2 vCPUs, 1 GiB, 10 minutes, 2
    /// minutes for the boot (it takes about 3 s on an idle host) and 4 of
    /// silence.
    pub fn from_path() -> Result<VmOptions, ShimError> {
        Ok(VmOptions {
            qemu: find_in_path("qemu-system-x86_64")?,
            smp: 2,
            memory_mib: 1024,
            timeout: Duration::from_secs(600),
            boot_timeout: Duration::from_secs(120),
            stall_timeout: Duration::from_secs(240),
        })
    }
}

fn find_in_path(tool: &str) -> Result<PathBuf, ShimError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join(tool)).find(|p| p.is_file()).ok_or_else(|| {
        ShimError::Missing(format!("{tool} is not installed (Debian package qemu-system-x86)"))
    })
}

/// What one replay on the kernel produced.
#[derive(Debug, Clone)]
pub struct KernelRun {
    /// The agent's report.
    pub result: KernelResult,
    /// The metadata device after the pool's clean removal.
    pub metadata_image: Vec<u8>,
    /// `thin_dump`-style XML of that image (dmsim's dump, byte-identical
    /// to Debian's thin_dump), or the dump's error.
    pub thin_dump: Result<String, String>,
    /// Mapped virtual blocks per thin device id, from the image.
    pub mapped: BTreeMap<u32, BTreeSet<u64>>,
    /// Everything the VM printed on its console.
    pub console: String,
    /// Kernel uptime when the agent started (the boot, as the guest saw it).
    pub boot: Duration,
    /// Wall time of the whole VM run on the host (shared by every job of
    /// the boot).
    pub wall: Duration,
    /// How many jobs that boot ran.
    pub jobs_in_boot: usize,
    /// For a [`Job::Logged`]: the dm-log-writes log, as long as its super
    /// block says (`logwrites::parse` reads it), or why it could not be
    /// read.
    pub log: Option<Result<Vec<u8>, String>>,
    /// For a [`Job::Cache`]: the cache and origin devices afterwards (the
    /// metadata is [`Self::metadata_image`]; `thin_dump` is an error).
    pub cache_data: Option<CacheData>,
}

impl KernelRun {
    /// A run that carries only the agent's result: no metadata image,
    /// dump, console or log, no time spent. For judging a kernel answer
    /// saved earlier (`kernel-seed-N.kernel`) where only the per-op and
    /// per-crash records matter, and for tests.
    pub fn from_result(result: KernelResult) -> KernelRun {
        KernelRun {
            result,
            metadata_image: Vec::new(),
            thin_dump: Err(String::new()),
            mapped: BTreeMap::new(),
            console: String::new(),
            boot: Duration::ZERO,
            wall: Duration::ZERO,
            jobs_in_boot: 1,
            log: None,
            cache_data: None,
        }
    }

    /// A thin job's run as saved by the kernel campaign: the agent's
    /// result and the final metadata image (dumped again, so that the
    /// mappings are judged as after a boot); no console, log or time.
    pub fn from_saved(result: KernelResult, metadata_image: Vec<u8>) -> KernelRun {
        let thin_dump = dump(&metadata_image);
        let mapped = thin_dump.as_ref().map(|x| mapped_blocks(x)).unwrap_or_default();
        KernelRun { metadata_image, thin_dump, mapped, ..KernelRun::from_result(result) }
    }
}

/// Most jobs one boot runs ([`KernelShim::run_jobs`] splits longer lists).
pub const JOBS_PER_BOOT: usize = 64;

/// One job for the VM.
#[derive(Debug, Clone)]
pub enum Job {
    /// Replay the trace on a fresh pool.
    Replay(Trace),
    /// Open a pool on images another implementation wrote (the trace's
    /// header gives the pool's shape; its ops are not run), activate the
    /// thin devices `ids` and read every block of them.
    Activate {
        /// The pool's shape, from its header.
        trace: Trace,
        /// Thin device ids to activate and read.
        ids: Vec<u32>,
        /// The metadata device's content (at most `metadata_sectors`).
        metadata: Vec<u8>,
        /// The data device's content (at most the data device's size).
        data: Vec<u8>,
    },
    /// Replay the trace on a fresh pool whose metadata and data devices
    /// are carved out of one dm-log-writes device, with a mark after every
    /// op (see `protocol::JobKind::Logged`); the run carries the log.
    Logged(Trace),
    /// As [`Job::Logged`], with pool messages sent between ops, each
    /// followed by a mark (see `protocol::JobKind::Logged`).
    LoggedWithMessages {
        /// The ops.
        trace: Trace,
        /// `(i, text)`: the pool message `text` just before op `i`.
        messages: Vec<(usize, String)>,
    },
    /// Replay the trace on a fresh pool whose metadata and data devices
    /// sit on dm-flakey; the trace's write-error faults make the device
    /// fail every write from then on (see `protocol::JobKind::Flakey`).
    Flakey(Trace),
    /// Replay the trace on a fresh pool whose metadata and data devices
    /// are controlled disks the agent serves through ublk (see
    /// `protocol::JobKind::Ublk`); needs a shim prepared with
    /// [`KernelShim::prepare_with_ublk`]. The run's result counts the
    /// requests the disks served (`KernelResult::ublk`).
    Ublk(Trace),
    /// As [`Job::Ublk`], the pool being the userland engine's rather than
    /// the kernel's (see `protocol::JobKind::Engine`): its thin devices
    /// served over ublk with `depth` tags each.
    Engine {
        /// The trace.
        trace: Trace,
        /// How the engine runs.
        engine: crate::protocol::EngineJob,
    },
    /// As [`Job::Ublk`], with the trace's ops run as `steps` say: some in
    /// the background, the data disk's reads held at a gate meanwhile (see
    /// `protocol::JobKind::Race`). No faults, no crashes.
    Race {
        /// The pool's shape and the ops the steps name.
        trace: Trace,
        /// What the agent does, in order.
        steps: Vec<crate::protocol::RaceStep>,
    },
    /// A dm-cache device on images the host provides (see
    /// `protocol::JobKind::Cache`; build it with [`Job::cache`]): the run
    /// carries the metadata image after the clean shutdown and the cache
    /// and origin devices' contents ([`KernelRun::cache_data`]).
    Cache {
        /// The spec in its header ([`CacheSpec::header`]) and the I/O.
        trace: Trace,
        /// The metadata device's content (at most `metadata_sectors`;
        /// zeroes: the kernel formats).
        metadata: Vec<u8>,
        /// The cache device's content (at most its size).
        cache: Vec<u8>,
        /// The origin device's content (at most its size).
        origin: Vec<u8>,
    },
}

/// What a cache job's data devices held after the VM powered off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheData {
    /// The cache device.
    pub cache: Vec<u8>,
    /// The origin device.
    pub origin: Vec<u8>,
}

impl Job {
    /// A cache job: the device `spec` describes, the images, and `ops`
    /// (reads, writes, discards and flushes of the cache device; a tick
    /// sleeps and reports the status line).
    pub fn cache(
        spec: &CacheSpec,
        ops: Vec<dmsim_traces::Op>,
        metadata: Vec<u8>,
        cache: Vec<u8>,
        origin: Vec<u8>,
    ) -> Job {
        Job::cache_with_steps(spec, &[], ops, metadata, cache, origin)
    }

    /// As [`Job::cache`], with steps no op says (a reboot in another mode
    /// or policy, a target message) taken between the ops (see
    /// `protocol::CacheStep`).
    pub fn cache_with_steps(
        spec: &CacheSpec,
        steps: &[(usize, CacheStep)],
        ops: Vec<dmsim_traces::Op>,
        metadata: Vec<u8>,
        cache: Vec<u8>,
        origin: Vec<u8>,
    ) -> Job {
        let mut header = spec.header();
        if !steps.is_empty() {
            header.params.push((CACHE_STEPS_PARAM.into(), encode_cache_steps(steps)));
        }
        let trace = Trace { header, events: ops.into_iter().map(dmsim_traces::Event::Op).collect() };
        Job::Cache { trace, metadata, cache, origin }
    }

    /// Its trace.
    pub fn trace(&self) -> &Trace {
        match self {
            Job::Replay(t)
            | Job::Logged(t)
            | Job::Flakey(t)
            | Job::Ublk(t)
            | Job::Race { trace: t, .. }
            | Job::Engine { trace: t, .. }
            | Job::Activate { trace: t, .. }
            | Job::LoggedWithMessages { trace: t, .. }
            | Job::Cache { trace: t, .. } => t,
        }
    }

    /// Whether the job runs on controlled disks served through ublk (a
    /// [`Job::Ublk`], or a cache job with [`CACHE_UBLK_PARAM`]): it needs a
    /// shim prepared with [`KernelShim::prepare_with_ublk`].
    pub fn needs_ublk(&self) -> bool {
        match self {
            Job::Ublk(_) | Job::Race { .. } | Job::Engine { .. } => true,
            Job::Cache { trace, .. } => trace.header.param(CACHE_UBLK_PARAM) == Some("1"),
            _ => false,
        }
    }

    /// What the agent is asked to do.
    pub fn kind(&self) -> JobKind {
        match self {
            Job::Replay(_) => JobKind::Replay,
            Job::Logged(_) => JobKind::Logged { messages: Vec::new() },
            Job::LoggedWithMessages { messages, .. } => JobKind::Logged { messages: messages.clone() },
            Job::Flakey(_) => JobKind::Flakey,
            Job::Ublk(_) => JobKind::Ublk,
            Job::Engine { engine, .. } => JobKind::Engine(*engine),
            Job::Race { steps, .. } => JobKind::Race { steps: steps.clone() },
            Job::Activate { ids, .. } => JobKind::Activate { ids: ids.clone() },
            Job::Cache { .. } => JobKind::Cache,
        }
    }
}

/// The kernel, the initramfs and qemu, ready to boot.
#[derive(Debug)]
pub struct KernelShim {
    kernel: Kernel,
    options: VmOptions,
    dir: TempDir,
    initramfs: PathBuf,
    /// The ublk module in the initramfs, if any.
    ublk_module: Option<PathBuf>,
    /// Jobs of a boot running at a time in [`Self::run_jobs`].
    concurrent: usize,
}

impl KernelShim {
    /// Finds qemu and the kernel, builds the agent and the initramfs.
    /// [`ShimError::Missing`] when a prerequisite is not installed.
    pub fn prepare() -> Result<KernelShim, ShimError> {
        let options = VmOptions::from_path()?;
        let kernel = Kernel::find()?;
        KernelShim::prepare_with(kernel, options)
    }

    /// As [`Self::prepare`], with a given kernel and VM options.
    pub fn prepare_with(kernel: Kernel, options: VmOptions) -> Result<KernelShim, ShimError> {
        KernelShim::prepare_with_modules(kernel, options, None)
    }

    /// As [`Self::prepare`], with `ublk_drv.ko` built for the kernel
    /// ([`crate::ublk_module::ublk_module`], cached per release) in the
    /// initramfs, so that [`Job::Ublk`] jobs can run.
    /// [`ShimError::Missing`] names the packages the module needs.
    pub fn prepare_with_ublk() -> Result<KernelShim, ShimError> {
        let options = VmOptions::from_path()?;
        let kernel = Kernel::find()?;
        let module = crate::ublk_module::ublk_module(&kernel)?;
        KernelShim::prepare_with_modules(kernel, options, Some(module))
    }

    fn prepare_with_modules(
        kernel: Kernel,
        options: VmOptions,
        ublk_module: Option<PathBuf>,
    ) -> Result<KernelShim, ShimError> {
        let agent_path = build_agent()?;
        let agent = std::fs::read(&agent_path)
            .map_err(|e| ShimError::io(format!("read {}", agent_path.display()), e))?;
        let mut extra = Vec::new();
        if let Some(m) = &ublk_module {
            let bytes = std::fs::read(m).map_err(|e| ShimError::io(format!("read {}", m.display()), e))?;
            extra.push((crate::ublk_module::MODULE_FILE.to_string(), bytes));
        }
        let image = build_initramfs_with(&kernel, &agent, ROOT_MODULES, &extra)?;
        let dir = TempDir::new()?;
        let initramfs = dir.path().join("initramfs.cpio");
        std::fs::write(&initramfs, image)
            .map_err(|e| ShimError::io(format!("write {}", initramfs.display()), e))?;
        Ok(KernelShim { kernel, options, dir, initramfs, ublk_module, concurrent: 1 })
    }

    /// The ublk module the initramfs carries, if prepared with
    /// [`Self::prepare_with_ublk`].
    pub fn ublk_module(&self) -> Option<&Path> {
        self.ublk_module.as_deref()
    }

    /// The kernel booted.
    pub fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    /// Size of the initramfs in bytes.
    pub fn initramfs_size(&self) -> u64 {
        std::fs::metadata(&self.initramfs).map(|m| m.len()).unwrap_or(0)
    }

    /// Boots one VM and replays `trace` in it.
    pub fn replay(&self, trace: &Trace) -> Result<KernelRun, ShimError> {
        let mut runs = self.run_jobs(&[Job::Replay(trace.clone())])?;
        runs.pop().ok_or_else(|| ShimError::Invalid("the VM returned no result".into()))
    }

    /// Replays every trace, each on a fresh pool (zeroed metadata, data
    /// full of [`DATA_FILL`]), up to [`JOBS_PER_BOOT`] traces per boot; one
    /// [`KernelRun`] per trace, in order.
    pub fn replay_many(&self, traces: &[Trace]) -> Result<Vec<KernelRun>, ShimError> {
        let jobs: Vec<Job> = traces.iter().cloned().map(Job::Replay).collect();
        self.run_jobs(&jobs)
    }

    /// Runs `jobs` in as few boots as [`JOBS_PER_BOOT`] allows, as many
    /// at a time as [`Self::set_concurrent`] said (one by default); one
    /// [`KernelRun`] per job, in order.
    pub fn run_jobs(&self, jobs: &[Job]) -> Result<Vec<KernelRun>, ShimError> {
        self.run_jobs_concurrent(jobs, self.concurrent)
    }

    /// How many jobs of a boot [`Self::run_jobs`] runs at a time (1 to
    /// [`crate::protocol::MAX_CONCURRENT_JOBS`]; 1 unless set); see
    /// [`Self::run_jobs_concurrent`].
    pub fn concurrent(&self) -> usize {
        self.concurrent
    }

    /// Sets [`Self::concurrent`].
    pub fn set_concurrent(&mut self, concurrent: usize) {
        self.concurrent = concurrent.clamp(1, crate::protocol::MAX_CONCURRENT_JOBS);
    }

    /// As [`Self::run_jobs`], up to `concurrent` jobs of a boot running
    /// at a time (each on its own devices and disk slices; a job that
    /// reads the result of the one before still runs after it). The
    /// guest's memory grows with `concurrent` ([`Self::memory_for`]), and
    /// the agent starts a job only while the disks the running jobs hold
    /// in memory leave room for its own.
    pub fn run_jobs_concurrent(&self, jobs: &[Job], concurrent: usize) -> Result<Vec<KernelRun>, ShimError> {
        let concurrent = concurrent.clamp(1, crate::protocol::MAX_CONCURRENT_JOBS);
        let mut out = Vec::with_capacity(jobs.len());
        for chunk in jobs.chunks(JOBS_PER_BOOT) {
            out.extend(self.boot(chunk, concurrent)?);
        }
        Ok(out)
    }

    /// The guest memory of a boot running `concurrent` jobs at a time, in
    /// MiB: [`VmOptions::memory_mib`], and 256 MiB more a job past the
    /// first, up to 8 GiB.
    pub fn memory_for(&self, concurrent: usize) -> u32 {
        let more = (concurrent.saturating_sub(1) as u32).saturating_mul(256);
        self.options.memory_mib.saturating_add(more).min(8192.max(self.options.memory_mib))
    }

    /// One boot running `jobs`, up to `concurrent` at a time.
    fn boot(&self, jobs: &[Job], concurrent: usize) -> Result<Vec<KernelRun>, ShimError> {
        // No more threads (or guest memory) than the boot has jobs.
        let concurrent = concurrent.min(jobs.len()).max(1);
        if self.ublk_module.is_none() && jobs.iter().any(Job::needs_ublk) {
            return Err(ShimError::Invalid(
                "a ublk job needs the ublk module: prepare the shim with KernelShim::prepare_with_ublk"
                    .into(),
            ));
        }
        let specs: Vec<PoolSpec> =
            jobs.iter().map(|j| PoolSpec::of_trace(j.trace())).collect::<Result<_, _>>()?;
        for (job, spec) in jobs.iter().zip(&specs) {
            if let Job::Activate { metadata, data, .. } = job {
                if metadata.len() as u64 > spec.metadata_sectors * 512
                    || data.len() as u64 > spec.data_sectors() * 512
                {
                    return Err(ShimError::Invalid(format!(
                        "activation images of {} and {} bytes exceed the pool's devices ({} and {} sectors)",
                        metadata.len(),
                        data.len(),
                        spec.metadata_sectors,
                        spec.data_sectors()
                    )));
                }
            }
        }
        let layout =
            Layout::of(&jobs.iter().zip(&specs).map(|(j, s)| (s, j.kind().is_fresh())).collect::<Vec<_>>());
        let run_dir = TempDir::new()?;
        let d = run_dir.path();
        let disk = |role: DiskRole| d.join(format!("{}.img", role.serial()));

        let encoded: Vec<(JobKind, String)> =
            jobs.iter().map(|j| (j.kind(), dmsim_traces::to_text(j.trace()))).collect();
        let (log_slices, log_sectors) = log_offsets(&jobs.iter().map(Job::kind).collect::<Vec<_>>());
        // The disks, written again before every boot: a second boot starts
        // from what the first did.
        let write_disks = || -> Result<(), ShimError> {
            let request = write_frame(REQUEST_MAGIC, &encode_request_concurrent(&encoded, concurrent));
            write_sized(&disk(DiskRole::Request), &request, request.len() as u64)?;
            let result_size: u64 = (1 << 20)
                + jobs
                    .iter()
                    .zip(&specs)
                    .map(|(j, s)| {
                        // A ublk job reads every device back at each crash
                        // too, and lists the surviving mappings.
                        let crashes =
                            j.trace().ops().filter(|op| matches!(op, dmsim_traces::Op::Crash { .. })).count()
                                as u64;
                        // A cache job on controlled disks ships its durable
                        // disks' changes after every FLUSH or FUA.
                        let marks = match j {
                            Job::Cache { trace, .. } if trace.header.param(CACHE_UBLK_PARAM) == Some("1") => {
                                trace.ops().filter(crate::durable::is_mark).count() as u64
                            }
                            _ => 0,
                        };
                        4096 + j.trace().events.len() as u64 * 256
                            + marks * (256 << 10)
                            + (1 + crashes)
                                * (s.max_devices as u64)
                                    .saturating_mul(s.thin_blocks)
                                    .saturating_mul(512 + 24)
                    })
                    .sum::<u64>();
            write_sized(&disk(DiskRole::Result), &[], result_size.div_ceil(512) * 512)?;
            // Sparse: every metadata slice starts zeroed, the fresh jobs' data
            // region is filled by the agent; activation images go in their slices.
            write_sized(&disk(DiskRole::Metadata), &[], layout.metadata_sectors * 512)?;
            write_sized(&disk(DiskRole::Data), &[], layout.data_sectors * 512)?;
            write_sized(&disk(DiskRole::Log), &[], log_sectors * 512)?;
            for (job, slice) in jobs.iter().zip(&layout.slices) {
                if let Job::Activate { metadata, data, .. } = job {
                    write_at(&disk(DiskRole::Metadata), metadata, slice.metadata_offset * 512)?;
                    write_at(&disk(DiskRole::Data), data, slice.data_offset * 512)?;
                }
                if let Job::Cache { metadata, cache, origin, trace } = job {
                    let c = CacheSpec::from_header(&trace.header)?;
                    write_at(&disk(DiskRole::Metadata), metadata, slice.metadata_offset * 512)?;
                    write_at(&disk(DiskRole::Data), cache, slice.data_offset * 512)?;
                    write_at(
                        &disk(DiskRole::Data),
                        origin,
                        (slice.data_offset + c.cache_disk_sectors()) * 512,
                    )?;
                }
            }
            Ok(())
        };

        let console_path = d.join("console.log");
        let qemu_log = d.join("qemu.log");
        let qemu_command = || -> Result<Command, ShimError> {
            let mut cmd = Command::new(&self.options.qemu);
            cmd.args(["-machine", "q35", "-accel", "tcg", "-cpu", "max"])
                .args(["-smp", &self.options.smp.to_string(), "-m", &self.memory_for(concurrent).to_string()])
                .args(["-nodefaults", "-display", "none", "-no-reboot", "-no-user-config"])
                .arg("-kernel")
                .arg(&self.kernel.image)
                .arg("-initrd")
                .arg(&self.initramfs)
                .args(["-append", &kernel_command_line()])
                .arg("-serial")
                .arg(format!("file:{}", console_path.display()));
            for (i, role) in DiskRole::ALL.into_iter().enumerate() {
                cmd.arg("-drive")
                    .arg(format!("file={},if=none,id=d{i},format=raw,cache=unsafe", disk(role).display()));
                cmd.arg("-device").arg(format!("virtio-blk-pci,drive=d{i},serial={}", role.serial()));
            }
            let log = File::options()
                .create(true)
                .append(true)
                .open(&qemu_log)
                .map_err(|e| ShimError::io("create the qemu log", e))?;
            let log2 = log.try_clone().map_err(|e| ShimError::io("clone the qemu log", e))?;
            cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
            Ok(cmd)
        };

        // The limit is a job's: a boot of many jobs may take as many times
        // it (a 300-op campaign trace waits out its ticks in real time,
        // a minute or more); a VM that stops is the stall watchdog's.
        let limit = self.options.timeout.saturating_mul(u32::try_from(jobs.len().max(1)).unwrap_or(u32::MAX));
        let start = Instant::now();
        let mut boots = 0;
        let mut stalled_tail = None;
        let status = loop {
            boots += 1;
            write_disks()?;
            let mut qemu = QemuGuard::spawn(qemu_command()?)?;
            let left = limit.saturating_sub(start.elapsed());
            let started =
                qemu.wait_for_console(&console_path, AGENT_STARTED, self.options.boot_timeout.min(left))?;
            if !started
                && boots < 2
                && start.elapsed() < limit
                && qemu.child.try_wait().ok().flatten().is_none()
            {
                // A hung boot: once more, from the same disks.
                drop(qemu);
                let _ = std::fs::rename(&console_path, d.join("console.hung-boot.log"));
                continue;
            }
            let left = limit.saturating_sub(start.elapsed());
            // The second boot is waited out to the end.
            let stall = if boots < 2 { self.options.stall_timeout } else { Duration::MAX };
            match qemu.wait_progressing(&console_path, left, stall)? {
                Waited::Exited(s) => break Some(s),
                Waited::Stalled if start.elapsed() < limit => {
                    // A VM that stopped: once more, from disks written
                    // afresh; what the first one printed is kept.
                    drop(qemu);
                    let text = std::fs::read_to_string(&console_path).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    stalled_tail = Some(lines[lines.len().saturating_sub(20)..].join("\n"));
                    let _ = std::fs::rename(&console_path, d.join("console.stalled.log"));
                    continue;
                }
                Waited::Stalled | Waited::TimedOut => break None,
            }
        };
        let wall = start.elapsed();
        let mut console = std::fs::read_to_string(&console_path).unwrap_or_default();
        if let Some(tail) = &stalled_tail {
            console.insert_str(
                0,
                &format!("{STALLED_RUN_NOTE}; its console ended:\n{tail}\n{STALLED_RUN_NOTE} (end)\n"),
            );
        } else if boots > 1 {
            console.insert_str(0, &format!("{HUNG_BOOT_NOTE}\n"));
        }
        let tail = || {
            let q = std::fs::read_to_string(&qemu_log).unwrap_or_default();
            let lines: Vec<&str> = console.lines().collect();
            let mut t = lines[lines.len().saturating_sub(40)..].join("\n");
            if !q.trim().is_empty() {
                t.push_str("\nqemu: ");
                t.push_str(q.trim());
            }
            t
        };
        let Some(status) = status else {
            return Err(ShimError::Timeout { seconds: limit.as_secs(), console: tail() });
        };
        let result_bytes =
            std::fs::read(disk(DiskRole::Result)).map_err(|e| ShimError::io("read the result disk", e))?;
        let body = read_frame(RESULT_MAGIC, &result_bytes).map_err(|e| ShimError::Vm {
            what: format!("no result (qemu {status}): {e}"),
            console: tail(),
        })?;
        let text = String::from_utf8_lossy(body);
        let results = KernelResult::many_from_text(&text)
            .map_err(|e| ShimError::Vm { what: e.to_string(), console: tail() })?;
        if results.len() != jobs.len() {
            let what = match results.first().and_then(|r| r.error.as_ref()) {
                Some(e) if results.len() == 1 => format!("the agent failed: {e}"),
                _ => format!("{} results for {} jobs", results.len(), jobs.len()),
            };
            return Err(ShimError::Vm { what, console: tail() });
        }
        let metadata_disk = std::fs::read(disk(DiskRole::Metadata))
            .map_err(|e| ShimError::io("read the metadata disk", e))?;
        let mut runs = Vec::with_capacity(jobs.len());
        for ((((result, slice), spec), log_at), job) in
            results.into_iter().zip(&layout.slices).zip(&specs).zip(&log_slices).zip(jobs)
        {
            let cache_data = match job {
                Job::Cache { trace, .. } => {
                    let c = CacheSpec::from_header(&trace.header)?;
                    let read = |at: u64, len: u64| -> Result<Vec<u8>, ShimError> {
                        use std::os::unix::fs::FileExt;
                        let f = File::open(disk(DiskRole::Data))
                            .map_err(|e| ShimError::io("open the data disk", e))?;
                        let mut out = vec![0u8; (len * 512) as usize];
                        f.read_exact_at(&mut out, at * 512)
                            .map_err(|e| ShimError::io("read the data disk", e))?;
                        Ok(out)
                    };
                    Some(CacheData {
                        cache: read(slice.data_offset, c.cache_disk_sectors())?,
                        origin: read(slice.data_offset + c.cache_disk_sectors(), c.origin_disk_sectors())?,
                    })
                }
                _ => None,
            };
            let log = log_at.map(|at| read_log(&disk(DiskRole::Log), at * 512));
            let at = (slice.metadata_offset * 512) as usize;
            let len = (spec.metadata_disk_sectors * 512) as usize;
            let metadata_image = metadata_disk
                .get(at..at + len)
                .ok_or_else(|| ShimError::Invalid("the metadata disk shrank".into()))?
                .to_vec();
            let thin_dump = if cache_data.is_some() {
                Err("a cache job's metadata is cache metadata".to_string())
            } else {
                dump(&metadata_image)
            };
            let mapped = thin_dump.as_ref().map(|x| mapped_blocks(x)).unwrap_or_default();
            let boot = result
                .timings_ms
                .iter()
                .find(|(w, _)| w == "boot")
                .map_or(Duration::ZERO, |(_, ms)| Duration::from_millis(*ms));
            runs.push(KernelRun {
                result,
                metadata_image,
                thin_dump,
                mapped,
                console: console.clone(),
                boot,
                wall,
                jobs_in_boot: jobs.len(),
                log,
                cache_data,
            });
        }
        Ok(runs)
    }

    /// Where the shim keeps its files (removed on drop).
    pub fn work_dir(&self) -> &Path {
        self.dir.path()
    }
}

fn write_sized(path: &Path, content: &[u8], size: u64) -> Result<(), ShimError> {
    let mut f = File::create(path).map_err(|e| ShimError::io(format!("create {}", path.display()), e))?;
    f.write_all(content).map_err(|e| ShimError::io(format!("write {}", path.display()), e))?;
    f.set_len(size.max(content.len() as u64))
        .map_err(|e| ShimError::io(format!("size {}", path.display()), e))
}

fn write_at(path: &Path, content: &[u8], offset: u64) -> Result<(), ShimError> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| ShimError::io(format!("open {}", path.display()), e))?;
    f.write_all_at(content, offset)
        .map_err(|e| ShimError::io(format!("write {} at {offset}", path.display()), e))
}

/// The log that starts at byte `at` of the log disk's file: its length
/// from its super block and entry headers, then those bytes.
fn read_log(path: &Path, at: u64) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
    let limit = LOG_SLICE_SECTORS * 512;
    let len = crate::logwrites::log_length(|off, buf| {
        if off.saturating_add(buf.len() as u64) > limit {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "past the job's log slice"));
        }
        f.read_exact_at(buf, at + off)
    })
    .map_err(|e| e.to_string())?;
    let mut out = vec![0u8; len as usize];
    f.read_exact_at(&mut out, at).map_err(|e| format!("read {len} bytes of log: {e}"))?;
    Ok(out)
}

/// The thin_dump XML of a metadata image.
pub fn dump(image: &[u8]) -> Result<String, String> {
    let mut dev = MemDevice::from_bytes(image.to_vec());
    let mut out = Vec::new();
    dump_xml(&mut dev, &mut out, &DumpOptions::default()).map_err(|e| e.to_string())?;
    String::from_utf8(out).map_err(|e| e.to_string())
}

fn attr(line: &str, name: &str) -> Option<u64> {
    let key = format!(" {name}=\"");
    let at = line.find(&key)? + key.len();
    let end = line[at..].find('"')? + at;
    line[at..end].parse().ok()
}

/// Mapped virtual blocks per device, from thin_dump XML.
pub fn mapped_blocks(xml: &str) -> BTreeMap<u32, BTreeSet<u64>> {
    let mut out: BTreeMap<u32, BTreeSet<u64>> = BTreeMap::new();
    let mut dev = None;
    for line in xml.lines().map(str::trim) {
        if line.starts_with("<device ") {
            dev = attr(line, "dev_id").map(|d| d as u32);
            if let Some(d) = dev {
                out.entry(d).or_default();
            }
        } else if let Some(d) = dev {
            if line.starts_with("<single_mapping ") {
                if let Some(b) = attr(line, "origin_block") {
                    out.entry(d).or_default().insert(b);
                }
            } else if line.starts_with("<range_mapping ") {
                if let (Some(b), Some(n)) = (attr(line, "origin_begin"), attr(line, "length")) {
                    out.entry(d).or_default().extend(b..b.saturating_add(n.min(1 << 24)));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mappings_from_xml() {
        let xml = r#"<superblock uuid="" time="3" transaction="7" data_block_size="256" nr_data_blocks="40000">
  <device dev_id="1" mapped_blocks="6" transaction="1" creation_time="0" snap_time="2">
    <range_mapping origin_begin="0" data_begin="100" length="4" time="0"/>
    <single_mapping origin_block="9" data_block="5" time="1"/>
  </device>
  <device dev_id="2" mapped_blocks="0" transaction="3" creation_time="1" snap_time="2">
  </device>
</superblock>"#;
        let m = mapped_blocks(xml);
        assert_eq!(m[&1].iter().copied().collect::<Vec<_>>(), vec![0, 1, 2, 3, 9]);
        assert!(m[&2].is_empty());
    }

    #[test]
    fn temp_dirs_are_removed_on_drop() {
        let d = TempDir::new().unwrap();
        let p = d.path().to_path_buf();
        std::fs::write(p.join("x"), b"1").unwrap();
        drop(d);
        assert!(!p.exists());
    }
}
