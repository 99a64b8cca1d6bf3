//! The binary encoding of a [`Trace`]: compact, strict, canonical.
//!
//! # Why hand-written
//!
//! The format is a few dozen lines of code, so it is written out here
//! rather than derived with serde and a binary serializer (postcard,
//! bincode). A derived format follows the Rust types: reordering enum
//! variants or fields would silently change the bytes of stored traces,
//! and its rules (varint flavour, enum tags, how `Option` and tuples are
//! laid out) belong to the serializer's version, not to this crate. Here
//! every tag and field order is fixed in one place, the decoder can be
//! strict (canonical varints only, booleans 0 or 1, no trailing bytes, so
//! every accepted input re-encodes to itself), it never allocates more
//! than the input could hold, and the crate needs no extra dependency.
//!
//! # Layout
//!
//! All integers are unsigned LEB128 varints (7 bits a byte, low first;
//! the shortest encoding only, at most 10 bytes, and within the field's
//! type), except `i32` fields, which are zigzag-encoded first
//! (`0, -1, 1, -2, …` → `0, 1, 2, 3, …`). A *string* is its length in bytes
//! (varint) and then its UTF-8 bytes. A *bool* is one byte, 0 or 1.
//!
//! ```text
//! magic     4 bytes  "DMTR"
//! version   varint   FORMAT_VERSION (1)
//! seed      varint   u64
//! workload  string
//! params    varint count, then count × (string key, string value)
//! events    varint count, then count × event
//! ```
//!
//! and nothing after. An event is a tag byte and its fields, in order:
//!
//! ```text
//! 0x01 write        dev u8, sector u32, nr u16, flags byte (bit 0 fua, bit 1 preflush; others 0)
//! 0x02 read         dev u8, sector u32, nr u16
//! 0x03 discard      dev u8, sector u32, nr u32
//! 0x04 flush        dev u8
//! 0x05 create-thin
//! 0x06 create-snap  origin u8
//! 0x07 delete       dev u8
//! 0x08 worker
//! 0x09 complete     pick u8
//! 0x0a fail-io      pick u8
//! 0x0b fault        disk byte (0 metadata, 1 data, 2 cache, 3 origin), fault byte, then:
//!                     0 read-error  permanent bool
//!                     1 write-error permanent bool
//!                     2 bit-flip    bit u32
//!                     3 misdirect   offset i32 (zigzag)
//! 0x0c tick         millis u16
//! 0x0d crash        mode byte (0 lose-all, 1 keep-all, 2 prefix, 3 subset, 4 torn), seed u32
//! 0x0e reload       mode byte (0 writeback, 1 writethrough, 2 passthrough),
//!                   policy byte (0 smq, 1 cleaner)
//! 0x0f invalidate   cblock u32, nr u16
//! 0x10 status
//! 0x11 resize       cache blocks u32, origin blocks u32
//! 0x12 grow-metadata blocks u32, reload bool
//! 0x13 aim-fault    aim byte (0 commit, 1 abort, 2 passdown), then for commit: request u8
//! 0x20 done         bio u64, dev u32, result string, read: bool present, then string if 1
//! 0x21 fault-fired  disk byte, what string
//! 0x22 crashed      metadata kept u32, unflushed u32, data kept u32, unflushed u32, torn bool
//! 0x23 mode         string
//! 0x24 violation    kind string, message string
//! ```
//!
//! Tags `0x0e`–`0x10` and disk bytes 2 and 3 are the cache ops and disks,
//! added after the first thin traces were written, `0x11` after the
//! first cache traces, and `0x12` and `0x13` (thin ops) after that; every earlier
//! encoding is unchanged, so those traces decode as before. A disk byte means the
//! same in `fault` and `fault-fired`.
//!
//! Numbers of the `u8` and `u16` fields are varints too (the format has one
//! integer encoding); a value out of the field's range is an error.
//!
//! [`from_bytes`] never panics; its errors ([`TraceError::Binary`]) name the
//! byte offset where decoding failed and what was expected there.

use crate::error::{Location, TraceError};
use crate::op::{CacheIoMode, CachePolicyKind, CrashMode, DiskFault, DiskId, FaultAim, Op};
use crate::trace::{Event, Header, Trace, FORMAT_VERSION};

/// The first four bytes of a binary trace.
pub const MAGIC: [u8; 4] = *b"DMTR";

mod tag {
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const DISCARD: u8 = 0x03;
    pub const FLUSH: u8 = 0x04;
    pub const CREATE_THIN: u8 = 0x05;
    pub const CREATE_SNAP: u8 = 0x06;
    pub const DELETE: u8 = 0x07;
    pub const WORKER: u8 = 0x08;
    pub const COMPLETE: u8 = 0x09;
    pub const FAIL_IO: u8 = 0x0a;
    pub const FAULT: u8 = 0x0b;
    pub const TICK: u8 = 0x0c;
    pub const CRASH: u8 = 0x0d;
    pub const RELOAD: u8 = 0x0e;
    pub const INVALIDATE: u8 = 0x0f;
    pub const STATUS: u8 = 0x10;
    pub const RESIZE: u8 = 0x11;
    pub const GROW_METADATA: u8 = 0x12;
    pub const AIM_FAULT: u8 = 0x13;
    pub const DONE: u8 = 0x20;
    pub const FAULT_FIRED: u8 = 0x21;
    pub const CRASHED: u8 = 0x22;
    pub const MODE: u8 = 0x23;
    pub const VIOLATION: u8 = 0x24;
}

// ---------------------------------------------------------------------------
// Writing

struct Writer(Vec<u8>);

impl Writer {
    fn varint(&mut self, mut v: u64) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.0.push(byte);
                return;
            }
            self.0.push(byte | 0x80);
        }
    }

    fn zigzag(&mut self, v: i32) {
        self.varint(u64::from(((v << 1) ^ (v >> 31)) as u32));
    }

    fn byte(&mut self, b: u8) {
        self.0.push(b);
    }

    fn bool(&mut self, b: bool) {
        self.0.push(u8::from(b));
    }

    fn str(&mut self, s: &str) {
        self.varint(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
    }

    fn disk(&mut self, d: DiskId) {
        self.byte(match d {
            DiskId::Metadata => 0,
            DiskId::Data => 1,
            DiskId::Cache => 2,
            DiskId::Origin => 3,
        });
    }

    fn op(&mut self, op: &Op) {
        match *op {
            Op::Write { dev, sector, nr_sectors, fua, preflush } => {
                self.byte(tag::WRITE);
                self.varint(dev.into());
                self.varint(sector.into());
                self.varint(nr_sectors.into());
                self.byte(u8::from(fua) | (u8::from(preflush) << 1));
            }
            Op::Read { dev, sector, nr_sectors } => {
                self.byte(tag::READ);
                self.varint(dev.into());
                self.varint(sector.into());
                self.varint(nr_sectors.into());
            }
            Op::Discard { dev, sector, nr_sectors } => {
                self.byte(tag::DISCARD);
                self.varint(dev.into());
                self.varint(sector.into());
                self.varint(nr_sectors.into());
            }
            Op::Flush { dev } => {
                self.byte(tag::FLUSH);
                self.varint(dev.into());
            }
            Op::CreateThin => self.byte(tag::CREATE_THIN),
            Op::CreateSnap { origin } => {
                self.byte(tag::CREATE_SNAP);
                self.varint(origin.into());
            }
            Op::Delete { dev } => {
                self.byte(tag::DELETE);
                self.varint(dev.into());
            }
            Op::Worker => self.byte(tag::WORKER),
            Op::Complete { pick } => {
                self.byte(tag::COMPLETE);
                self.varint(pick.into());
            }
            Op::FailIo { pick } => {
                self.byte(tag::FAIL_IO);
                self.varint(pick.into());
            }
            Op::Fault { disk, fault } => {
                self.byte(tag::FAULT);
                self.disk(disk);
                match fault {
                    DiskFault::ReadError { permanent } => {
                        self.byte(0);
                        self.bool(permanent);
                    }
                    DiskFault::WriteError { permanent } => {
                        self.byte(1);
                        self.bool(permanent);
                    }
                    DiskFault::BitFlip { bit } => {
                        self.byte(2);
                        self.varint(bit.into());
                    }
                    DiskFault::Misdirect { offset } => {
                        self.byte(3);
                        self.zigzag(offset);
                    }
                }
            }
            Op::Tick { millis } => {
                self.byte(tag::TICK);
                self.varint(millis.into());
            }
            Op::Crash { mode, seed } => {
                self.byte(tag::CRASH);
                let m = CrashMode::ALL.iter().position(|&m2| m2 == mode).unwrap_or(0);
                self.byte(m as u8);
                self.varint(seed.into());
            }
            Op::Reload { mode, policy } => {
                self.byte(tag::RELOAD);
                self.byte(match mode {
                    CacheIoMode::Writeback => 0,
                    CacheIoMode::Writethrough => 1,
                    CacheIoMode::Passthrough => 2,
                });
                self.byte(match policy {
                    CachePolicyKind::Smq => 0,
                    CachePolicyKind::Cleaner => 1,
                });
            }
            Op::Invalidate { cblock, nr } => {
                self.byte(tag::INVALIDATE);
                self.varint(cblock.into());
                self.varint(nr.into());
            }
            Op::Status => self.byte(tag::STATUS),
            Op::Resize { cache_blocks, origin_blocks } => {
                self.byte(tag::RESIZE);
                self.varint(cache_blocks.into());
                self.varint(origin_blocks.into());
            }
            Op::GrowMetadata { blocks, reload } => {
                self.byte(tag::GROW_METADATA);
                self.varint(blocks.into());
                self.bool(reload);
            }
            Op::AimFault { aim } => {
                self.byte(tag::AIM_FAULT);
                match aim {
                    FaultAim::Commit { request } => {
                        self.byte(0);
                        self.varint(request.into());
                    }
                    FaultAim::Abort => self.byte(1),
                    FaultAim::Passdown => self.byte(2),
                }
            }
        }
    }

    fn event(&mut self, event: &Event) {
        match event {
            Event::Op(op) => self.op(op),
            Event::Done { bio, dev, result, read } => {
                self.byte(tag::DONE);
                self.varint(*bio);
                self.varint((*dev).into());
                self.str(result);
                self.bool(read.is_some());
                if let Some(read) = read {
                    self.str(read);
                }
            }
            Event::FaultFired { disk, what } => {
                self.byte(tag::FAULT_FIRED);
                self.disk(*disk);
                self.str(what);
            }
            Event::Crashed { metadata, data, torn } => {
                self.byte(tag::CRASHED);
                for v in [metadata.0, metadata.1, data.0, data.1] {
                    self.varint(v.into());
                }
                self.bool(*torn);
            }
            Event::Mode(mode) => {
                self.byte(tag::MODE);
                self.str(mode);
            }
            Event::Violation { kind, message } => {
                self.byte(tag::VIOLATION);
                self.str(kind);
                self.str(message);
            }
        }
    }
}

/// The binary encoding of `trace` (see the [module documentation](self)).
pub fn to_bytes(trace: &Trace) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(32 + trace.events.len() * 6));
    w.0.extend_from_slice(&MAGIC);
    w.varint(FORMAT_VERSION.into());
    w.varint(trace.header.seed);
    w.str(&trace.header.workload);
    w.varint(trace.header.params.len() as u64);
    for (k, v) in &trace.header.params {
        w.str(k);
        w.str(v);
    }
    w.varint(trace.events.len() as u64);
    for e in &trace.events {
        w.event(e);
    }
    w.0
}

// ---------------------------------------------------------------------------
// Reading

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn err(&self, at: usize, expected: impl Into<String>) -> TraceError {
        TraceError::Binary { offset: at, expected: expected.into() }
    }

    fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }

    fn byte(&mut self, what: &str) -> Result<u8, TraceError> {
        match self.b.get(self.pos) {
            Some(&b) => {
                self.pos += 1;
                Ok(b)
            }
            None => Err(self.err(self.pos, format!("{what} (the input ended)"))),
        }
    }

    fn varint(&mut self, what: &str) -> Result<u64, TraceError> {
        let start = self.pos;
        let mut v: u64 = 0;
        for i in 0..10 {
            let b = self.byte(what)?;
            let bits = u64::from(b & 0x7f);
            if i == 9 && bits > 1 {
                return Err(self.err(start, format!("{what}: a varint of at most 64 bits")));
            }
            v |= bits << (7 * i);
            if b & 0x80 == 0 {
                if b == 0 && i > 0 {
                    return Err(self.err(start, format!("{what}: a varint in its shortest form")));
                }
                return Ok(v);
            }
        }
        Err(self.err(start, format!("{what}: a varint of at most 10 bytes")))
    }

    fn num<T: TryFrom<u64>>(&mut self, what: &str, range: &str) -> Result<T, TraceError> {
        let start = self.pos;
        let v = self.varint(what)?;
        T::try_from(v).map_err(|_| self.err(start, format!("{what} in {range}, not {v}")))
    }

    fn u8(&mut self, what: &str) -> Result<u8, TraceError> {
        self.num(what, "0..=255")
    }

    fn u16(&mut self, what: &str) -> Result<u16, TraceError> {
        self.num(what, "0..=65535")
    }

    fn u32(&mut self, what: &str) -> Result<u32, TraceError> {
        self.num(what, "0..=4294967295")
    }

    fn i32(&mut self, what: &str) -> Result<i32, TraceError> {
        let z: u32 = self.num(what, "the zigzag encoding of an i32")?;
        Ok(((z >> 1) as i32) ^ -((z & 1) as i32))
    }

    fn bool(&mut self, what: &str) -> Result<bool, TraceError> {
        let at = self.pos;
        match self.byte(what)? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(self.err(at, format!("{what}: a bool byte 0 or 1, not {b}"))),
        }
    }

    fn str(&mut self, what: &str) -> Result<String, TraceError> {
        let start = self.pos;
        let len = self.varint(what)?;
        if len > self.remaining() as u64 {
            return Err(self.err(
                start,
                format!("{what}: a string of {len} bytes, but only {} bytes remain", self.remaining()),
            ));
        }
        let len = len as usize;
        let bytes = &self.b[self.pos..self.pos + len];
        let s = std::str::from_utf8(bytes)
            .map_err(|e| self.err(self.pos + e.valid_up_to(), format!("{what}: valid UTF-8")))?;
        self.pos += len;
        Ok(s.to_string())
    }

    fn disk(&mut self, what: &str) -> Result<DiskId, TraceError> {
        let at = self.pos;
        match self.byte(what)? {
            0 => Ok(DiskId::Metadata),
            1 => Ok(DiskId::Data),
            2 => Ok(DiskId::Cache),
            3 => Ok(DiskId::Origin),
            b => {
                Err(self.err(at, format!("{what}: 0 (metadata), 1 (data), 2 (cache) or 3 (origin), not {b}")))
            }
        }
    }

    /// A count of items at least `min_size` bytes each, checked against the
    /// input left, so that preallocating `count` items is safe.
    fn count(&mut self, what: &str, min_size: usize) -> Result<usize, TraceError> {
        let start = self.pos;
        let n = self.varint(what)?;
        let fits = (self.remaining() / min_size) as u64;
        if n > fits {
            return Err(self.err(
                start,
                format!("{what}: {n} items do not fit in the {} bytes that remain", self.remaining()),
            ));
        }
        Ok(n as usize)
    }

    fn event(&mut self) -> Result<Event, TraceError> {
        let at = self.pos;
        let t = self.byte("an event tag")?;
        let op = match t {
            tag::WRITE => {
                let (dev, sector, nr_sectors) =
                    (self.u8("dev")?, self.u32("sector")?, self.u16("nr_sectors")?);
                let fat = self.pos;
                let flags = self.byte("write flags")?;
                if flags & !3 != 0 {
                    return Err(self.err(fat, format!("write flags: only bits 0 and 1, not {flags:#04x}")));
                }
                Op::Write { dev, sector, nr_sectors, fua: flags & 1 != 0, preflush: flags & 2 != 0 }
            }
            tag::READ => {
                Op::Read { dev: self.u8("dev")?, sector: self.u32("sector")?, nr_sectors: self.u16("nr")? }
            }
            tag::DISCARD => {
                Op::Discard { dev: self.u8("dev")?, sector: self.u32("sector")?, nr_sectors: self.u32("nr")? }
            }
            tag::FLUSH => Op::Flush { dev: self.u8("dev")? },
            tag::CREATE_THIN => Op::CreateThin,
            tag::CREATE_SNAP => Op::CreateSnap { origin: self.u8("origin")? },
            tag::DELETE => Op::Delete { dev: self.u8("dev")? },
            tag::WORKER => Op::Worker,
            tag::COMPLETE => Op::Complete { pick: self.u8("pick")? },
            tag::FAIL_IO => Op::FailIo { pick: self.u8("pick")? },
            tag::FAULT => {
                let disk = self.disk("a disk")?;
                let kat = self.pos;
                let fault = match self.byte("a fault kind")? {
                    0 => DiskFault::ReadError { permanent: self.bool("permanent")? },
                    1 => DiskFault::WriteError { permanent: self.bool("permanent")? },
                    2 => DiskFault::BitFlip { bit: self.u32("bit")? },
                    3 => DiskFault::Misdirect { offset: self.i32("offset")? },
                    k => return Err(self.err(kat, format!("a fault kind 0..=3, not {k}"))),
                };
                Op::Fault { disk, fault }
            }
            tag::TICK => Op::Tick { millis: self.u16("millis")? },
            tag::CRASH => {
                let mat = self.pos;
                let m = self.byte("a crash mode")?;
                let mode = *CrashMode::ALL
                    .get(usize::from(m))
                    .ok_or_else(|| self.err(mat, format!("a crash mode 0..=4, not {m}")))?;
                Op::Crash { mode, seed: self.u32("seed")? }
            }
            tag::RELOAD => {
                let mat = self.pos;
                let mode = match self.byte("a cache I/O mode")? {
                    0 => CacheIoMode::Writeback,
                    1 => CacheIoMode::Writethrough,
                    2 => CacheIoMode::Passthrough,
                    m => {
                        return Err(self.err(
                            mat,
                            format!(
                            "a cache I/O mode 0 (writeback), 1 (writethrough) or 2 (passthrough), not {m}"
                        ),
                        ))
                    }
                };
                let pat = self.pos;
                let policy = match self.byte("a cache policy")? {
                    0 => CachePolicyKind::Smq,
                    1 => CachePolicyKind::Cleaner,
                    p => return Err(self.err(pat, format!("a cache policy 0 (smq) or 1 (cleaner), not {p}"))),
                };
                Op::Reload { mode, policy }
            }
            tag::INVALIDATE => Op::Invalidate { cblock: self.u32("cblock")?, nr: self.u16("nr")? },
            tag::STATUS => Op::Status,
            tag::RESIZE => Op::Resize {
                cache_blocks: self.u32("cache blocks")?,
                origin_blocks: self.u32("origin blocks")?,
            },
            tag::GROW_METADATA => {
                Op::GrowMetadata { blocks: self.u32("blocks")?, reload: self.bool("reload")? }
            }
            tag::AIM_FAULT => {
                let at = self.pos;
                let aim = match self.byte("an aim")? {
                    0 => FaultAim::Commit { request: self.u8("request")? },
                    1 => FaultAim::Abort,
                    2 => FaultAim::Passdown,
                    other => {
                        return Err(
                            self.err(at, format!("an aim byte (0 commit, 1 abort, 2 passdown), not {other}"))
                        )
                    }
                };
                Op::AimFault { aim }
            }
            tag::DONE => {
                let bio = self.varint("bio")?;
                let dev = self.u32("dev")?;
                let result = self.str("result")?;
                let read = if self.bool("read present")? { Some(self.str("read")?) } else { None };
                return Ok(Event::Done { bio, dev, result, read });
            }
            tag::FAULT_FIRED => {
                return Ok(Event::FaultFired { disk: self.disk("a disk")?, what: self.str("what")? });
            }
            tag::CRASHED => {
                let metadata = (self.u32("metadata kept")?, self.u32("metadata unflushed")?);
                let data = (self.u32("data kept")?, self.u32("data unflushed")?);
                return Ok(Event::Crashed { metadata, data, torn: self.bool("torn")? });
            }
            tag::MODE => return Ok(Event::Mode(self.str("mode")?)),
            tag::VIOLATION => {
                return Ok(Event::Violation { kind: self.str("kind")?, message: self.str("message")? });
            }
            t => return Err(self.err(at, format!("an event tag (0x01..=0x13, 0x20..=0x24), not {t:#04x}"))),
        };
        Ok(Event::Op(op))
    }
}

/// Decodes a binary trace (see the [module documentation](self)). Never
/// panics and allocates at most in proportion to the input; rejects
/// truncated input, unknown tags, out-of-range values, non-canonical
/// varints and trailing bytes, so that an accepted input is exactly
/// `to_bytes` of the result.
pub fn from_bytes(b: &[u8]) -> Result<Trace, TraceError> {
    let mut r = Reader { b, pos: 0 };
    if b.len() < MAGIC.len() || b[..MAGIC.len()] != MAGIC {
        return Err(r.err(0, format!("the magic bytes {:?}", std::str::from_utf8(&MAGIC).unwrap_or(""))));
    }
    r.pos = MAGIC.len();
    let vat = r.pos;
    let version = r.varint("the format version")?;
    if version != u64::from(FORMAT_VERSION) {
        return Err(TraceError::UnsupportedVersion {
            at: Location::Offset(vat),
            found: version.to_string(),
            supported: FORMAT_VERSION,
        });
    }
    let seed = r.varint("the seed")?;
    let workload = r.str("the workload")?;
    let n = r.count("the number of params", 2)?;
    let mut params = Vec::with_capacity(n);
    for _ in 0..n {
        params.push((r.str("a param name")?, r.str("a param value")?));
    }
    let n = r.count("the number of events", 1)?;
    let mut events = Vec::with_capacity(n);
    for _ in 0..n {
        events.push(r.event()?);
    }
    if r.remaining() != 0 {
        return Err(r.err(r.pos, format!("the end of the trace, not {} more bytes", r.remaining())));
    }
    Ok(Trace { header: Header { seed, workload, params }, events })
}
