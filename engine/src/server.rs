//! The engine as a server: the model's pool on a thread of its own,
//! serving one ublk device per active thin device, driven by pool messages
//! over a control socket.
//!
//! Threads:
//!
//! - the **pool thread** owns the [`Pool`] (metadata on a [`UringDevice`],
//!   data I/O on a [`DataRing`]), every ublk queue's ring and buffers, and
//!   the commit clock. It waits on one io_uring: the ublk fetches of every
//!   device, and a poll of an eventfd that both the data ring (registered
//!   on it) and the control thread signal. Each ublk request becomes a
//!   request to the pool ([`Pool::submit`]); each completion the pool
//!   hands back ([`Pool::take_completions`]) is committed to ublk with its
//!   result. A FLUSH or FUA request therefore completes when the model's
//!   thin target completes it: after the commit that covers it.
//! - the **control thread** accepts connections on a Unix socket, one
//!   request line and one answer line each ([`Request`](ControlRequest)),
//!   and runs the ublk control commands, which block (`START_DEV` waits
//!   until the disk is added, and the kernel reads the new disk's
//!   partition table meanwhile: the pool thread serves those reads).
//!
//! Time: by default the pool's clock is the engine's monotonic clock, so
//! its commit period and no-space timeout are real seconds, as the
//! kernel's are. With a **trace clock** ([`EngineConfig::trace_clock`])
//! it is the caller's instead: it moves only on `advance NS` requests (a
//! replay sends each of the trace's `tick` ops), and, when requests wait for
//! data space and nothing else moves, to the pool's no-space deadline —
//! so that a serialized replay commits exactly where the serialized
//! simulator does, whatever the machine's speed.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dmsim_model::block_device::BlockDevice;
use dmsim_model::errno::Errno;
use dmsim_model::thin::metadata::ThinId;
use dmsim_model::thin::pool::{BioId, BioRequest, IoId, Pool, PoolOptions, TargetError};
use dmsim_model::thin::table::PoolTable;
use io_uring::{opcode, types, IoUring};

use crate::data_ring::DataRing;
use crate::ublk::{self, DescMap, Limits, Request as UblkRequest, RequestKind, UblkControl};
use crate::uring::{EngineError, UringDevice};

/// Deliberate bugs, for the tests that show a detector catches them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineMutations {
    /// A FLUSH request to a thin device is acknowledged at once, before
    /// any commit covers the writes before it (the engine bug the crash
    /// comparison must catch).
    pub ack_flush_early: bool,
    /// Every eighth write to a thin device is acknowledged without being
    /// done (a lost write the oracle must catch in concurrent replay).
    pub drop_writes: bool,
}

/// What the engine serves and how.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The pool's metadata device (a file or block device).
    pub metadata: PathBuf,
    /// The pool's data device.
    pub data: PathBuf,
    /// The pool table's arguments after the two devices: `block_size
    /// low_water_mark [n feature...]`, as in a `thin-pool` table line.
    pub table_tail: String,
    /// Zero the metadata's superblock first, so that a new pool is
    /// formatted (otherwise the pool opens what is there).
    pub format: bool,
    /// The control socket's path (created; removed at the end).
    pub socket: PathBuf,
    /// The `no_space_timeout` (0: queue for ever).
    pub no_space_timeout: Duration,
    /// Tags per thin device's ublk queue (1: one request at a time).
    pub queue_depth: u16,
    /// `None`: the model's timed commits (a commit when a worker pass
    /// finds the last one over a second old, the kernel's
    /// `COMMIT_PERIOD`). `Some(p)`: those off, and a commit asked every
    /// `p` instead (a test that must see only the commits flushes make
    /// sets an hour).
    pub commit_period: Option<Duration>,
    /// `None` (the default): the pool's clock is real time. `Some(t)`:
    /// the pool's clock starts at `t` nanoseconds and moves only on
    /// `advance NS` requests and, when requests wait for data space and nothing
    /// else moves, to the pool's no-space deadline (see the module's
    /// docs). `commit_period` is ignored then.
    pub trace_clock: Option<u64>,
    /// Show only this many sectors of the metadata device (`None`: all of
    /// it); `grow-metadata` shows more later, as a metadata device that a
    /// trace grows.
    pub metadata_sectors: Option<u64>,
    /// Deliberate bugs (none by default).
    pub mutations: EngineMutations,
}

impl EngineConfig {
    /// A configuration with the defaults: no format, a 60 s no-space
    /// timeout (the kernel's default), queue depth 16, no mutations.
    pub fn new(metadata: &Path, data: &Path, table_tail: &str, socket: &Path) -> EngineConfig {
        EngineConfig {
            metadata: metadata.to_path_buf(),
            data: data.to_path_buf(),
            table_tail: table_tail.to_string(),
            format: false,
            socket: socket.to_path_buf(),
            no_space_timeout: Duration::from_secs(60),
            queue_depth: 16,
            commit_period: None,
            trace_clock: None,
            metadata_sectors: None,
            mutations: EngineMutations::default(),
        }
    }
}

/// Bytes per tag buffer: the largest request a thin device takes.
const BUF_BYTES: u32 = 512 << 10;

/// The user data of the wake eventfd's poll on the pool thread's ring.
const WAKE: u64 = u64::MAX;

/// How long `recover` waits for the driver to quiesce a dead engine's
/// device (its monitor runs every 5 s) and close the dead server's char
/// device.
const RECOVERY_WAIT: Duration = Duration::from_secs(20);

/// How long the pool thread sleeps at most between two looks at its
/// clock (the commit period's resolution).
const TICK: Duration = Duration::from_millis(20);

/// A request the pool thread answers once the pool has settled.
enum Deferred {
    /// Move the trace clock on by this many nanoseconds.
    Advance(u64),
    /// Grow the metadata device.
    GrowMetadata { sectors: u64, reload: bool },
    /// Commit a changed transaction now (the worker's next pass).
    Commit,
    /// Answer: the request ran (with this answer, or the time's), and
    /// the pool was still moving.
    Answer(Option<Result<String, String>>),
}

/// One request to the pool thread, with where its answer goes.
enum Command {
    Message(String, Sender<Result<String, String>>),
    Status(bool, Sender<Result<String, String>>),
    /// Move the trace clock on by this many nanoseconds (answered, with
    /// the new time, once the pool has settled at it); `None`: only say
    /// the time.
    Time(Option<u64>, Sender<Result<String, String>>),
    /// Grow the metadata device to this many sectors (reloading the pool's
    /// table or not), once the pool has settled.
    GrowMetadata(u64, bool, Sender<Result<String, String>>),
    /// Commit a changed transaction once the pool has settled (answered
    /// with the time once the commit is on disk).
    Commit(Sender<Result<String, String>>),
    Activate(ThinId, u64, Sender<Result<String, String>>),
    Deactivate(ThinId, Sender<Result<String, String>>),
    /// Open ublk device `dev_id`'s char device and fetch on every tag;
    /// `recovering`: a device a dead engine served, already started (no
    /// partition scan to answer outside the pool).
    Attach {
        dev_id: u32,
        thin: ThinId,
        depth: u16,
        recovering: bool,
        reply: Sender<Result<String, String>>,
    },
    /// Answer when every tag of `dev_id` has been aborted (the device
    /// stopped) and its char device is closed.
    Detached(u32, Sender<Result<String, String>>),
    /// `dev_id` has started: its requests go to the pool from now on.
    Started(u32, Sender<Result<String, String>>),
    /// Close the pool (its last commit) and end the thread.
    Close(Sender<Result<String, String>>),
}

/// One served ublk queue.
struct Queue {
    thin: ThinId,
    file: File,
    descs: DescMap,
    bufs: Vec<Vec<u8>>,
    /// Tags still fetching.
    live: usize,
    /// Who waits for the queue to end.
    detached: Vec<Sender<Result<String, String>>>,
    /// The device is being started: the kernel reads its partition table
    /// (`START_DEV` on 6.1 scans partitions, a dm-thin device is never
    /// scanned). Those reads are answered with zeroes without reaching the
    /// pool, so that they neither touch the model (its block cache, a
    /// fault armed for the next read of the data disk) nor the data disk.
    starting: bool,
}

/// The pool thread's state.
struct PoolThread {
    pool: Pool<UringDevice, UringDevice>,
    data: DataRing,
    submitted: BTreeSet<IoId>,
    ring: IoUring,
    queues: BTreeMap<u32, Queue>,
    /// The ublk request of every request in the pool: device, tag, and
    /// its answer on success (the bytes of a read or write: 6.1 ends a
    /// read or write request by the bytes answered, and requeues the rest).
    bios: BTreeMap<BioId, (u32, u16, i32)>,
    wake: Arc<EventFd>,
    start: Instant,
    mutations: EngineMutations,
    /// [`EngineConfig::commit_period`], and when the next such commit is asked.
    commit_period: Option<Duration>,
    next_commit: Instant,
    /// Commands waiting for the next loop.
    cmds: Receiver<Command>,
    /// Writes seen, for [`EngineMutations::drop_writes`].
    writes_seen: u64,
    /// [`EngineConfig::trace_clock`] is set.
    trace_clock: bool,
    /// Requests waiting for the pool to settle, in order.
    deferred: std::collections::VecDeque<(Deferred, Sender<Result<String, String>>)>,
    /// The pool table's length (the data device's size), in sectors.
    data_sectors: u64,
}

/// An eventfd, closed on drop.
#[derive(Debug)]
pub(crate) struct EventFd(i32);

impl EventFd {
    fn new() -> Result<EventFd, EngineError> {
        // SAFETY: a plain system call; the fd is owned by the value.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(EngineError::Io { what: "eventfd".into(), source: std::io::Error::last_os_error() });
        }
        Ok(EventFd(fd))
    }

    fn signal(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our fd.
        unsafe { libc::write(self.0, one.as_ptr().cast(), 8) };
    }

    fn clear(&self) {
        let mut v = [0u8; 8];
        // SAFETY: reads 8 bytes into a live buffer (non-blocking).
        unsafe { libc::read(self.0, v.as_mut_ptr().cast(), 8) };
    }
}

impl Drop for EventFd {
    fn drop(&mut self) {
        // SAFETY: closes the fd this value owns.
        unsafe { libc::close(self.0) };
    }
}

fn errno_text(e: &TargetError) -> String {
    format!("{} {}", e.errno, e.message)
}

impl PoolThread {
    fn open(
        config: &EngineConfig,
        cmds: Receiver<Command>,
        wake: Arc<EventFd>,
    ) -> Result<PoolThread, EngineError> {
        if config.format {
            zero_superblock(&config.metadata)?;
        }
        let mut metadata = UringDevice::open(&config.metadata)?;
        if let Some(sectors) = config.metadata_sectors {
            metadata.set_visible_sectors(sectors)?;
        }
        let data_dev = UringDevice::open(&config.data)?;
        let data = DataRing::open(&config.data, 256)?;
        data.register_eventfd(wake.0)?;
        let len = data_dev.nr_sectors();
        // The table's device words are names only (the pool has its
        // devices already); paths could hold spaces.
        let args = format!("metadata data {}", config.table_tail);
        let words: Vec<&str> = args.split_whitespace().collect();
        let table = PoolTable::parse_args(&words)
            .map_err(|e| EngineError::Ublk(format!("the pool table `{args}`: {e}")))?;
        let options = PoolOptions {
            no_space_timeout: config.no_space_timeout.as_nanos() as u64,
            timed_commits: config.commit_period.is_none() || config.trace_clock.is_some(),
            ..PoolOptions::default()
        };
        let pool = Pool::create(table, len, metadata, data_dev, options)
            .map_err(|e| EngineError::Ublk(format!("creating the pool: {}", errno_text(&e))))?;
        let ring = IoUring::new(256).map_err(EngineError::Ring)?;
        let start = Instant::now();
        pool.start_clock(config.trace_clock.unwrap_or(0));
        Ok(PoolThread {
            pool,
            data,
            submitted: BTreeSet::new(),
            ring,
            queues: BTreeMap::new(),
            bios: BTreeMap::new(),
            wake,
            start,
            mutations: config.mutations,
            commit_period: config.commit_period.filter(|_| config.trace_clock.is_none()),
            next_commit: start + config.commit_period.unwrap_or_default(),
            cmds,
            writes_seen: 0,
            trace_clock: config.trace_clock.is_some(),
            deferred: std::collections::VecDeque::new(),
            data_sectors: len,
        })
    }

    fn push(&mut self, sqe: &io_uring::squeue::Entry) -> Result<(), EngineError> {
        // SAFETY: every buffer an entry names (a queue's tag buffers)
        // lives until its tags are aborted and the queue dropped.
        if unsafe { self.ring.submission().push(sqe) }.is_err() {
            self.ring.submit().map_err(|e| EngineError::Io { what: "io_uring submit".into(), source: e })?;
            // SAFETY: as above.
            unsafe { self.ring.submission().push(sqe) }
                .map_err(|_| EngineError::Ublk("the engine's ring is full".into()))?;
        }
        Ok(())
    }

    fn arm_wake(&mut self) -> Result<(), EngineError> {
        let sqe = opcode::PollAdd::new(types::Fd(self.wake.0), libc::POLLIN as u32).build().user_data(WAKE);
        self.push(&sqe)
    }

    /// Runs until a [`Command::Close`].
    fn run(mut self) -> Result<(), EngineError> {
        self.arm_wake()?;
        loop {
            while let Ok(cmd) = self.cmds.try_recv() {
                if let Command::Close(reply) = cmd {
                    return self.close(reply);
                }
                self.command(cmd)?;
            }
            if !self.trace_clock {
                self.pool.set_time(self.start.elapsed().as_nanos() as u64);
            }
            if let Some(period) = self.commit_period {
                if Instant::now() >= self.next_commit {
                    self.pool.request_commit();
                    self.next_commit = Instant::now() + period;
                }
            }
            self.drive()?;
            self.answer()?;
            self.run_deferred()?;
            let ts = types::Timespec::new().nsec(TICK.as_nanos() as u32);
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR)) => {}
                Err(e) => return Err(EngineError::Io { what: "io_uring wait".into(), source: e }),
            }
            let cqes: Vec<(u64, i32)> = self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
            for (user_data, res) in cqes {
                if user_data == WAKE {
                    self.wake.clear();
                    self.arm_wake()?;
                    continue;
                }
                self.fetched((user_data >> 16) as u32, user_data as u16, res)?;
            }
        }
    }

    /// The pool's last commit, its devices closed; then the answer.
    fn close(self, reply: Sender<Result<String, String>>) -> Result<(), EngineError> {
        let r = match self.pool.close() {
            Ok(_) => Ok("closed".to_string()),
            Err((_, e)) => Err(errno_text(&e)),
        };
        let _ = reply.send(r);
        Ok(())
    }

    fn command(&mut self, cmd: Command) -> Result<(), EngineError> {
        match cmd {
            Command::Message(text, reply) => {
                let r = self.pool.message(&text).map(|()| String::new()).map_err(|e| errno_text(&e));
                let _ = reply.send(r);
            }
            Command::Status(noflush, reply) => {
                let _ = reply.send(Ok(self.pool.status(noflush)));
            }
            Command::Time(None, reply) => {
                let _ = reply.send(Ok(self.pool.now().to_string()));
            }
            Command::Time(Some(t), reply) if self.trace_clock => {
                self.deferred.push_back((Deferred::Advance(t), reply))
            }
            Command::Time(Some(_), reply) => {
                let _ = reply.send(Err(
                    "EINVAL the engine's clock is real time (a trace clock is asked at its start: --trace-clock)"
                        .to_string(),
                ));
            }
            Command::GrowMetadata(sectors, reload, reply) => {
                self.deferred.push_back((Deferred::GrowMetadata { sectors, reload }, reply))
            }
            Command::Commit(reply) => self.deferred.push_back((Deferred::Commit, reply)),
            Command::Activate(thin, sectors, reply) => {
                let r = self
                    .pool
                    .activate_thin(thin, sectors)
                    .map(|()| String::new())
                    .map_err(|e| errno_text(&e));
                let _ = reply.send(r);
            }
            Command::Deactivate(thin, reply) => {
                let r = self.pool.deactivate_thin(thin).map(|()| String::new()).map_err(|e| errno_text(&e));
                let _ = reply.send(r);
            }
            Command::Attach { dev_id, thin, depth, recovering, reply } => {
                let r = self.attach(dev_id, thin, depth, !recovering);
                let _ = reply.send(r.map(|()| String::new()));
            }
            Command::Started(dev_id, reply) => {
                if let Some(q) = self.queues.get_mut(&dev_id) {
                    q.starting = false;
                }
                let _ = reply.send(Ok(String::new()));
            }
            Command::Detached(dev_id, reply) => match self.queues.get_mut(&dev_id) {
                Some(q) => q.detached.push(reply),
                None => {
                    let _ = reply.send(Ok(String::new()));
                }
            },
            Command::Close(_) => unreachable!("handled by run"),
        }
        Ok(())
    }

    fn attach(&mut self, dev_id: u32, thin: ThinId, depth: u16, starting: bool) -> Result<(), String> {
        let char_dev = PathBuf::from(format!("/dev/ublkc{dev_id}"));
        ublk::wait_for_node(&char_dev, Duration::from_secs(10)).map_err(|e| e.to_string())?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&char_dev)
            .map_err(|e| format!("open {}: {e}", char_dev.display()))?;
        let descs = DescMap::new(file.as_raw_fd(), depth)?;
        let bufs = (0..depth).map(|_| vec![0u8; BUF_BYTES as usize]).collect();
        let fd = file.as_raw_fd();
        self.queues.insert(
            dev_id,
            Queue { thin, file, descs, bufs, live: usize::from(depth), detached: Vec::new(), starting },
        );
        for tag in 0..depth {
            let sqe = {
                let q = self.queues.get_mut(&dev_id).expect("just inserted");
                ublk::io_sqe(fd, ublk::IO_FETCH_REQ, tag, 0, &mut q.bufs[usize::from(tag)])
                    .user_data(u64::from(dev_id) << 16 | u64::from(tag))
            };
            self.push(&sqe).map_err(|e| e.to_string())?;
        }
        self.ring.submit().map_err(|e| format!("submit the fetches: {e}"))?;
        Ok(())
    }

    /// A fetch (or commit-and-fetch) of `dev_id`'s `tag` completed with `res`.
    fn fetched(&mut self, dev_id: u32, tag: u16, res: i32) -> Result<(), EngineError> {
        let Some(q) = self.queues.get_mut(&dev_id) else { return Ok(()) };
        if res != 0 {
            // Aborted: the device stops (-ENODEV), or our mistake.
            q.live -= 1;
            if q.live == 0 {
                let q = self.queues.remove(&dev_id).expect("just seen");
                let r = if res == -libc::ENODEV {
                    Ok(String::new())
                } else {
                    Err(format!("tag {tag}: errno {}", -res))
                };
                for w in q.detached {
                    let _ = w.send(r.clone());
                }
            }
            return Ok(());
        }
        let req = UblkRequest::from_desc(tag, &q.descs.get(tag));
        let bytes = (u64::from(req.nr_sectors) * 512) as usize;
        if matches!(req.kind, RequestKind::Write { .. })
            && self.mutations.drop_writes
            && self.lose_this_write()
        {
            return self.commit(dev_id, tag, bytes as i32);
        }
        let Some(q) = self.queues.get_mut(&dev_id) else { return Ok(()) };
        if q.starting && matches!(req.kind, RequestKind::Read) {
            // The partition scan of START_DEV (see `Queue::starting`).
            q.bufs[usize::from(tag)][..bytes.min(BUF_BYTES as usize)].fill(0);
            return self.commit(dev_id, tag, bytes as i32);
        }
        let bio = match req.kind {
            RequestKind::Read => Some(BioRequest::read(req.sector, u64::from(req.nr_sectors))),
            RequestKind::Write { fua } => {
                let data = q.bufs[usize::from(tag)].get(..bytes).map(<[u8]>::to_vec);
                data.map(|d| {
                    let w = BioRequest::write(req.sector, d);
                    if fua {
                        w.with_fua()
                    } else {
                        w
                    }
                })
            }
            RequestKind::WriteZeroes => {
                (bytes <= BUF_BYTES as usize).then(|| BioRequest::write(req.sector, vec![0; bytes]))
            }
            RequestKind::Discard => Some(BioRequest::discard(req.sector, u64::from(req.nr_sectors))),
            RequestKind::Flush if self.mutations.ack_flush_early => return self.commit(dev_id, tag, 0),
            RequestKind::Flush => Some(BioRequest::flush()),
            RequestKind::Other(_) => return self.commit(dev_id, tag, -libc::EOPNOTSUPP),
        };
        let Some(bio) = bio else { return self.commit(dev_id, tag, -libc::EIO) };
        let thin = q.thin;
        let done = match req.kind {
            RequestKind::Read | RequestKind::Write { .. } | RequestKind::WriteZeroes => bytes as i32,
            _ => 0,
        };
        match self.pool.submit(thin, bio) {
            Ok(id) => {
                self.bios.insert(id, (dev_id, tag, done));
                Ok(())
            }
            Err(e) => self.commit(dev_id, tag, -e.errno.code()),
        }
    }

    /// Whether [`EngineMutations::drop_writes`] loses this write (every
    /// eighth).
    fn lose_this_write(&mut self) -> bool {
        self.writes_seen += 1;
        self.writes_seen.is_multiple_of(8)
    }

    /// Answers `dev_id`'s `tag` with `result` and fetches its next request.
    fn commit(&mut self, dev_id: u32, tag: u16, result: i32) -> Result<(), EngineError> {
        let Some(q) = self.queues.get_mut(&dev_id) else { return Ok(()) };
        let fd = q.file.as_raw_fd();
        let sqe = ublk::io_sqe(fd, ublk::IO_COMMIT_AND_FETCH_REQ, tag, result, &mut q.bufs[usize::from(tag)])
            .user_data(u64::from(dev_id) << 16 | u64::from(tag));
        self.push(&sqe)
    }

    /// The pool's worker and its data I/O, until nothing moves without
    /// waiting: every new data I/O onto the data ring, every completion
    /// the ring has ended.
    fn drive(&mut self) -> Result<(), EngineError> {
        loop {
            let mut moved = false;
            while self.pool.worker_wanted() {
                self.pool.run_worker();
                moved = true;
            }
            for io in self.pool.in_flight_io() {
                if self.submitted.contains(&io.id) {
                    continue;
                }
                let Some(request) = self.pool.data_request(io.id) else { continue };
                self.data.submit(io.id, request)?;
                self.submitted.insert(io.id);
                moved = true;
            }
            for done in self.data.reap(0)? {
                self.submitted.remove(&done.id);
                self.pool
                    .end_io(done.id, done.result, done.read.as_deref())
                    .map_err(|e| EngineError::Ublk(format!("data I/O {}: {}", done.id.0, errno_text(&e))))?;
                moved = true;
            }
            if !moved {
                return Ok(());
            }
        }
    }

    /// Whether the pool has settled: its worker has nothing to do and no
    /// data I/O is in flight.
    fn settled(&self) -> bool {
        self.submitted.is_empty() && !self.pool.worker_wanted()
    }

    /// The deferred requests, each once the pool has settled (after
    /// [`Self::drive`] and [`Self::answer`]), in order: an `advance` of
    /// the trace clock (the worker runs at the new time, so a timed commit
    /// that is due is made before the answer), a metadata growth, a
    /// requested commit (made before the answer). Then,
    /// on a trace clock, if requests still wait in the pool with nothing
    /// moving — waiting for data space — the time of the no-space
    /// deadline, which fails them as the kernel's timeout would (the
    /// serialized simulator does the same after each op:
    /// `ThinSim::outwait_no_space`).
    fn run_deferred(&mut self) -> Result<(), EngineError> {
        while self.settled() {
            if let Some((what, reply)) = self.deferred.pop_front() {
                let answer = match what {
                    Deferred::Advance(t) => {
                        self.pool.set_time(self.pool.now().saturating_add(t));
                        None
                    }
                    Deferred::Answer(answer) => answer,
                    Deferred::GrowMetadata { sectors, reload } => Some(self.grow_metadata(sectors, reload)),
                    Deferred::Commit => {
                        self.pool.request_commit();
                        None
                    }
                };
                self.drive()?;
                self.answer()?;
                // The commit's metadata I/O is synchronous; data I/O the
                // worker started is waited for.
                if !self.settled() {
                    self.deferred.push_front((Deferred::Answer(answer), reply));
                    return Ok(());
                }
                let _ = reply.send(answer.unwrap_or_else(|| Ok(self.pool.now().to_string())));
                continue;
            }
            if !self.trace_clock || self.bios.is_empty() {
                return Ok(());
            }
            let Some(deadline) = self.pool.no_space_deadline() else { return Ok(()) };
            self.pool.set_time(deadline.max(self.pool.now()));
            self.drive()?;
            self.answer()?;
            if self.pool.no_space_deadline() == Some(deadline) {
                return Ok(());
            }
        }
        Ok(())
    }

    /// A metadata growth, as the kernel's replay makes one: the pool
    /// suspended (its presuspend commits), the metadata device showing
    /// `sectors`, the pool resumed — with its table loaded again when
    /// `reload` — whose preresume extends the metadata space map. A resume
    /// that fails is tried once more, as the kernel shim's agent does.
    fn grow_metadata(&mut self, sectors: u64, reload: bool) -> Result<String, String> {
        let show = |pool: &Pool<UringDevice, UringDevice>, sectors: u64| {
            pool.with_metadata(|md| {
                let device = md.transaction_manager().block_manager().device_mut();
                let before = device.nr_sectors();
                device.set_visible_sectors(sectors).map(|()| before)
            })
        };
        // A size the device cannot show is refused before anything moves.
        let before = show(&self.pool, sectors).map_err(|e| format!("EINVAL {e}"))?;
        if let Err(e) = self.pool.suspend() {
            let _ = show(&self.pool, before);
            return Err(errno_text(&e));
        }
        let len = self.data_sectors;
        let resume = |pool: &Pool<UringDevice, UringDevice>| {
            if reload {
                pool.reload_and_resume(len)
            } else {
                pool.resume_same_table(len)
            }
        };
        match resume(&self.pool) {
            Ok(()) => Ok(String::new()),
            Err(e) => match resume(&self.pool) {
                Ok(()) => Ok(format!("resumed the second time; the first: {}", errno_text(&e))),
                Err(e2) => Err(format!("{} (and again: {})", errno_text(&e), errno_text(&e2))),
            },
        }
    }

    /// Commits every completed request to its ublk tag.
    fn answer(&mut self) -> Result<(), EngineError> {
        for c in self.pool.take_completions() {
            let Some((dev_id, tag, done)) = self.bios.remove(&c.id) else { continue };
            let result = match c.result {
                Ok(()) => {
                    if let Some(q) = self.queues.get_mut(&dev_id) {
                        let buf = &mut q.bufs[usize::from(tag)];
                        let n = c.data.len().min(buf.len());
                        buf[..n].copy_from_slice(&c.data[..n]);
                    }
                    done
                }
                Err(e) => -e.code(),
            };
            self.commit(dev_id, tag, result)?;
        }
        Ok(())
    }
}

/// Zeroes the first 4 KiB of `path` and flushes it.
fn zero_superblock(path: &Path) -> Result<(), EngineError> {
    let io = |what: &str, source| EngineError::Io { what: format!("{}: {what}", path.display()), source };
    let mut f = OpenOptions::new().write(true).open(path).map_err(|e| io("open to format", e))?;
    f.write_all(&[0u8; 4096]).map_err(|e| io("zero the superblock", e))?;
    f.sync_all().map_err(|e| io("flush", e))
}

/// The control thread's view of the engine.
struct Control {
    cmds: Sender<Command>,
    wake: Arc<EventFd>,
    ctl: Option<UblkControl>,
    /// Active thin devices: id → (ublk device id, block node).
    devices: Mutex<BTreeMap<ThinId, (u32, PathBuf)>>,
    queue_depth: u16,
    block_bytes: u32,
}

impl Control {
    fn ask(&self, make: impl FnOnce(Sender<Result<String, String>>) -> Command) -> Result<String, String> {
        let (tx, rx) = channel();
        self.cmds.send(make(tx)).map_err(|_| "the pool thread has ended".to_string())?;
        self.wake.signal();
        rx.recv().map_err(|_| "the pool thread has ended".to_string())?
    }

    fn ublk(&self) -> Result<&UblkControl, String> {
        self.ctl
            .as_ref()
            .ok_or_else(|| format!("ublk is not available ({} missing: load ublk_drv)", ublk::CONTROL_PATH))
    }

    fn simple(&self, op: u32, dev_id: u32) -> Result<i32, String> {
        self.ublk()?.device_command(op, dev_id).map_err(|e| e.to_string())
    }

    /// Activates thin device `thin` with `sectors` and serves it as a new
    /// ublk device; its block node.
    fn activate(&self, thin: ThinId, sectors: u64) -> Result<String, String> {
        if self.devices.lock().map_err(|_| "poisoned")?.contains_key(&thin) {
            return Err(format!("EEXIST thin device {thin} is already served"));
        }
        self.ublk()?;
        self.ask(|r| Command::Activate(thin, sectors, r))?;
        match self.serve(thin, sectors) {
            Ok(path) => Ok(path),
            Err(e) => {
                let _ = self.ask(|r| Command::Deactivate(thin, r));
                Err(e)
            }
        }
    }

    fn serve(&self, thin: ThinId, sectors: u64) -> Result<String, String> {
        let ctl = self.ublk()?;
        // A device a new engine can take over when this one dies.
        let info =
            ctl.add_device(self.queue_depth, BUF_BYTES, ublk::F_USER_RECOVERY).map_err(|e| e.to_string())?;
        let dev_id = info.dev_id;
        let undo = |e: String| {
            let _ = self.simple(ublk::CMD_STOP_DEV, dev_id);
            self.wait_detached(dev_id);
            let _ = self.simple(ublk::CMD_DEL_DEV, dev_id);
            Err(e)
        };
        // The thin target's limits: discards in whole blocks, as dm-thin's
        // io_hints set them.
        let limits = Limits {
            sectors,
            max_sectors: info.max_io_buf_bytes >> 9,
            discard_granularity: self.block_bytes,
            max_discard_sectors: (self.block_bytes >> 9).saturating_mul(1024),
        };
        if let Err(e) = ctl.set_params(dev_id, limits) {
            return undo(e.to_string());
        }
        let depth = info.queue_depth;
        if let Err(e) = self.ask(|reply| Command::Attach { dev_id, thin, depth, recovering: false, reply }) {
            return undo(e);
        }
        if let Err(e) = ctl.start_device(dev_id) {
            return undo(e.to_string());
        }
        let block = PathBuf::from(format!("/dev/ublkb{dev_id}"));
        if let Err(e) = ublk::wait_for_node(&block, Duration::from_secs(10)) {
            return undo(e.to_string());
        }
        // START_DEV has returned: the partition scan is over.
        if let Err(e) = self.ask(|reply| Command::Started(dev_id, reply)) {
            return undo(e);
        }
        self.served(thin, dev_id)
    }

    /// Waits (up to 10 s) until the pool thread has let go of `dev_id`'s
    /// queue (every tag aborted, its char device closed).
    fn wait_detached(&self, dev_id: u32) {
        let (tx, rx) = channel();
        if self.cmds.send(Command::Detached(dev_id, tx)).is_ok() {
            self.wake.signal();
            let _ = rx.recv_timeout(Duration::from_secs(10));
        }
    }

    /// Records that thin device `thin` is served on ublk device `dev_id`
    /// (one request per bio, as the kernel's thin devices take them); its
    /// block node.
    fn served(&self, thin: ThinId, dev_id: u32) -> Result<String, String> {
        let block = PathBuf::from(format!("/dev/ublkb{dev_id}"));
        let _ = std::fs::write(format!("/sys/block/ublkb{dev_id}/queue/nomerges"), "2");
        self.devices.lock().map_err(|_| "poisoned")?.insert(thin, (dev_id, block.clone()));
        Ok(block.display().to_string())
    }

    /// Activates thin device `thin` with `sectors` and serves it on ublk
    /// device `dev_id`, which a dead engine served (ublk's user recovery):
    /// once the driver has quiesced the device and closed the dead
    /// server's char device, `START_USER_RECOVERY`, the queue fetching,
    /// `END_USER_RECOVERY`. Its block node, the one the dead engine
    /// served. On failure the device is left as it was (quiesced), for
    /// its owner to delete.
    fn recover(&self, thin: ThinId, sectors: u64, dev_id: u32) -> Result<String, String> {
        if self.devices.lock().map_err(|_| "poisoned")?.contains_key(&thin) {
            return Err(format!("EEXIST thin device {thin} is already served"));
        }
        let ctl = self.ublk()?;
        let info = ctl.device_info(dev_id).map_err(|e| e.to_string())?;
        if info.flags & ublk::F_USER_RECOVERY == 0 {
            return Err(format!("EINVAL ublk device {dev_id} was not added for user recovery"));
        }
        ctl.start_recovery(dev_id, RECOVERY_WAIT).map_err(|e| e.to_string())?;
        self.ask(|r| Command::Activate(thin, sectors, r))?;
        let depth = info.queue_depth;
        let taken = self
            .ask(|reply| Command::Attach { dev_id, thin, depth, recovering: true, reply })
            .and_then(|_| ctl.end_recovery(dev_id).map_err(|e| e.to_string()));
        if let Err(e) = taken {
            self.wait_detached(dev_id);
            let _ = self.ask(|r| Command::Deactivate(thin, r));
            return Err(e);
        }
        self.served(thin, dev_id)
    }

    /// Stops and deletes thin device `thin`'s ublk device, then
    /// deactivates it in the pool.
    fn deactivate(&self, thin: ThinId) -> Result<String, String> {
        let entry = self.devices.lock().map_err(|_| "poisoned")?.remove(&thin);
        let Some((dev_id, _)) = entry else {
            return Err(format!("ENODATA thin device {thin} is not served"));
        };
        let (tx, rx) = channel();
        self.cmds.send(Command::Detached(dev_id, tx)).map_err(|_| "the pool thread has ended")?;
        self.wake.signal();
        let stopped = self.simple(ublk::CMD_STOP_DEV, dev_id);
        let detached = rx.recv().map_err(|_| "the pool thread has ended".to_string())?;
        let deleted = self.simple(ublk::CMD_DEL_DEV, dev_id);
        stopped?;
        detached?;
        deleted?;
        self.ask(|r| Command::Deactivate(thin, r))
    }

    /// One request line; its answer (without `ok` / `error`).
    fn handle(&self, line: &str) -> Result<String, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize, what: &str| -> Result<u64, String> {
            words
                .get(i)
                .and_then(|w| w.parse().ok())
                .ok_or_else(|| format!("EINVAL `{line}`: expected {what}"))
        };
        match words.first().copied() {
            Some("ping") => Ok(std::process::id().to_string()),
            Some("message") if words.len() > 1 => {
                let text = words[1..].join(" ");
                self.ask(|r| Command::Message(text, r))
            }
            Some("status") => match words.get(1).copied() {
                None => self.ask(|r| Command::Status(false, r)),
                Some("noflush") => self.ask(|r| Command::Status(true, r)),
                Some(w) => Err(format!("EINVAL `status {w}`: expected `status` or `status noflush`")),
            },
            Some("time") if words.len() == 1 => self.ask(|r| Command::Time(None, r)),
            Some("commit") if words.len() == 1 => self.ask(Command::Commit),
            Some("advance") => {
                let t = num(1, "nanoseconds")?;
                self.ask(|r| Command::Time(Some(t), r))
            }
            Some("grow-metadata") => {
                let sectors = num(1, "the metadata device's new size in sectors")?;
                let reload = match words.get(2).copied() {
                    None => false,
                    Some("reload") => true,
                    Some(w) => return Err(format!("EINVAL `{line}`: expected `reload` or nothing after the size, not `{w}`")),
                };
                self.ask(|r| Command::GrowMetadata(sectors, reload, r))
            }
            Some("activate") => self.activate(num(1, "a thin device id")?, num(2, "its size in sectors")?),
            Some("recover") => {
                let dev_id = u32::try_from(num(3, "the ublk device id a dead engine served")?)
                    .map_err(|_| format!("EINVAL `{line}`: the ublk device id is too large"))?;
                self.recover(num(1, "a thin device id")?, num(2, "its size in sectors")?, dev_id)
            }
            Some("deactivate") => self.deactivate(num(1, "a thin device id")?),
            Some("devices") => {
                let d = self.devices.lock().map_err(|_| "poisoned")?;
                Ok(d.iter().map(|(id, (_, p))| format!("{id}:{}", p.display())).collect::<Vec<_>>().join(" "))
            }
            _ => Err(format!(
                "EINVAL unknown request `{line}` (ping, message TEXT, status [noflush], time, advance NS, commit, grow-metadata SECTORS [reload], activate ID SECTORS, recover ID SECTORS UBLK_ID, deactivate ID, devices, stop)"
            )),
        }
    }

    /// Every device stopped, the pool closed.
    fn shutdown(&self) -> Result<String, String> {
        let ids: Vec<ThinId> = self.devices.lock().map_err(|_| "poisoned")?.keys().copied().collect();
        let mut first = Ok(());
        for id in ids {
            if let Err(e) = self.deactivate(id) {
                first = first.and(Err(e));
            }
        }
        let closed = self.ask(Command::Close);
        first?;
        closed
    }
}

/// Runs the engine until a `stop` request (or a fatal error): opens the
/// pool on `config`'s devices, listens on `config.socket`, serves the
/// thin devices it is asked to activate. `ready` is called once the
/// socket accepts requests. Every ublk device it made is stopped and
/// deleted, and the pool closed, before it returns.
pub fn serve(config: &EngineConfig, ready: impl FnOnce()) -> Result<(), EngineError> {
    let wake = Arc::new(EventFd::new()?);
    let (tx, rx) = channel();
    let pool = PoolThread::open(config, rx, Arc::clone(&wake))?;
    let block_bytes = pool.pool.block_sectors() as u32 * 512;
    let _ = std::fs::remove_file(&config.socket);
    let listener = UnixListener::bind(&config.socket)
        .map_err(|e| EngineError::Io { what: format!("listen on {}", config.socket.display()), source: e })?;
    let thread = std::thread::Builder::new()
        .name("pool".into())
        .spawn(move || pool.run())
        .map_err(|e| EngineError::Io { what: "spawn the pool thread".into(), source: e })?;
    let control = Control {
        cmds: tx,
        wake: Arc::clone(&wake),
        ctl: UblkControl::open().ok(),
        devices: Mutex::new(BTreeMap::new()),
        queue_depth: config.queue_depth.max(1),
        block_bytes,
    };
    ready();
    let mut outcome = Ok(());
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        // A client that connects and says nothing does not hold the engine.
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let mut line = String::new();
        if BufReader::new(&stream).read_line(&mut line).is_err() {
            continue;
        }
        let line = line.trim();
        if line == "stop" {
            let r = control.shutdown();
            let _ = writeln!(stream, "{}", answer_line(&r));
            if let Err(e) = r {
                outcome = Err(EngineError::Ublk(format!("stopping: {e}")));
            }
            break;
        }
        let r = control.handle(line);
        let _ = writeln!(stream, "{}", answer_line(&r));
    }
    drop(listener);
    let _ = std::fs::remove_file(&config.socket);
    drop(control);
    wake.signal();
    match thread.join() {
        Ok(r) => r?,
        Err(_) => return Err(EngineError::Ublk("the pool thread panicked".into())),
    }
    outcome
}

fn answer_line(r: &Result<String, String>) -> String {
    match r {
        Ok(s) if s.is_empty() => "ok".to_string(),
        Ok(s) => format!("ok {s}"),
        Err(e) => format!("error {}", e.replace('\n', " ")),
    }
}

/// A client of an engine's control socket: one connection per request.
#[derive(Debug, Clone)]
pub struct EngineClient {
    socket: PathBuf,
}

impl EngineClient {
    /// A client of the engine listening on `socket`.
    pub fn new(socket: &Path) -> EngineClient {
        EngineClient { socket: socket.to_path_buf() }
    }

    /// Sends one request line; the answer after `ok`, or the engine's
    /// error (`Ublk("<errno> <text>")`).
    pub fn request(&self, line: &str) -> Result<String, EngineError> {
        let io = |what: &str, source| EngineError::Io {
            what: format!("engine at {}: {what}", self.socket.display()),
            source,
        };
        let mut stream = UnixStream::connect(&self.socket).map_err(|e| io("connect", e))?;
        writeln!(stream, "{line}").map_err(|e| io("send", e))?;
        let mut answer = String::new();
        BufReader::new(&stream).read_line(&mut answer).map_err(|e| io("receive", e))?;
        let answer = answer.trim_end();
        if answer == "ok" {
            return Ok(String::new());
        }
        if let Some(rest) = answer.strip_prefix("ok ") {
            return Ok(rest.to_string());
        }
        match answer.strip_prefix("error ") {
            Some(e) => {
                let (name, rest) = e.split_once(' ').unwrap_or((e, ""));
                let errno = (1..200).filter_map(Errno::from_code).find(|x| x.to_string() == name);
                Err(match errno {
                    Some(errno) => EngineError::Refused { errno, message: rest.to_string() },
                    None => EngineError::Ublk(e.to_string()),
                })
            }
            None if answer.is_empty() => Err(EngineError::Ublk(format!(
                "`{line}`: the engine closed the connection without an answer"
            ))),
            None => Err(EngineError::Ublk(format!("`{line}`: unexpected answer `{answer}`"))),
        }
    }

    /// Waits up to `wait` for the engine to answer `ping`.
    pub fn wait_ready(&self, wait: Duration) -> Result<(), EngineError> {
        let deadline = Instant::now() + wait;
        loop {
            match self.request("ping") {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}
