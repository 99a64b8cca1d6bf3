//! The dm-log-writes log (spec §7.2), read on the host, and the device
//! states it replays to.
//!
//! The log device starts with a super block (magic, version 1, the number
//! of entries, the sector size); entries follow from the second sector on,
//! each one sector holding `sector`, `nr_sectors`, `flags`, `data_len`
//! (little-endian u64s) and, for a MARK, the mark's text, then for a data
//! write `nr_sectors` sectors of the data written. Writes are logged when
//! they became durable: FUA writes on completion, other writes just before
//! the FLUSH entry that covered them. Replaying a prefix of the log onto
//! the device's initial content therefore gives what the device held
//! durably at that point of the log ([`Log::replay_into`]).
//!
//! The parser ([`parse`]) is clean-room, trusts `nr_entries` (entries past
//! it may be incomplete, §7.2), and reports truncated or garbage logs as a
//! [`LogError`] naming the entry and byte offset; it never panics.

use std::fmt;

/// The super block's magic.
pub const LOG_MAGIC: u64 = 0x006A_7366_7773_6872;
/// The only version there is.
pub const LOG_VERSION: u64 = 1;

/// Entry flag: an empty flush (everything logged before it was flushed).
pub const FLAG_FLUSH: u64 = 1;
/// Entry flag: a FUA write.
pub const FLAG_FUA: u64 = 2;
/// Entry flag: a discard (no data).
pub const FLAG_DISCARD: u64 = 4;
/// Entry flag: a mark (its text follows the entry header).
pub const FLAG_MARK: u64 = 8;
/// Entry flag: the bio had REQ_META.
pub const FLAG_METADATA: u64 = 16;
const KNOWN_FLAGS: u64 = FLAG_FLUSH | FLAG_FUA | FLAG_DISCARD | FLAG_MARK | FLAG_METADATA;

/// Size of an entry header (four u64s).
const ENTRY_HEADER: usize = 32;

/// Why a log could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogError {
    /// Which entry (0-based), when the problem is in one.
    pub entry: Option<u64>,
    /// Byte offset in the log where it was found.
    pub offset: u64,
    /// What is wrong.
    pub what: String,
}

impl fmt::Display for LogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.entry {
            Some(e) => write!(f, "dm-log-writes log, entry {e} at byte {}: {}", self.offset, self.what),
            None => write!(f, "dm-log-writes log at byte {}: {}", self.offset, self.what),
        }
    }
}

impl std::error::Error for LogError {}

/// What one entry records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A write of `data` at `sector` (FUA if `fua`).
    Write {
        /// REQ_FUA.
        fua: bool,
    },
    /// An empty flush.
    Flush,
    /// A discard of `nr_sectors` at `sector`.
    Discard,
    /// A mark with its text.
    Mark(String),
}

/// One log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// First sector (in the log's sector size) of the logged device.
    pub sector: u64,
    /// Length in sectors.
    pub nr_sectors: u64,
    /// The raw flags.
    pub flags: u64,
    /// What it is.
    pub kind: EntryKind,
    /// For writes: where its data sits in the log's bytes.
    pub data: std::ops::Range<usize>,
}

/// A parsed log: its sector size and entries, borrowing the bytes.
#[derive(Debug, Clone)]
pub struct Log<'a> {
    /// The logged device's logical block size in bytes.
    pub sector_size: u64,
    /// The entries, in log order (`nr_entries` of them).
    pub entries: Vec<Entry>,
    bytes: &'a [u8],
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

/// The super block: (nr_entries, sector size).
fn super_block(bytes: &[u8]) -> Result<(u64, u64), LogError> {
    let bad = |what: String| LogError { entry: None, offset: 0, what };
    if bytes.len() < 28 {
        return Err(bad(format!("{} bytes, too short for a super block", bytes.len())));
    }
    let magic = le64(bytes, 0);
    if magic != LOG_MAGIC {
        return Err(bad(format!("magic {magic:#x}, expected {LOG_MAGIC:#x} (not a log, or never written)")));
    }
    let version = le64(bytes, 8);
    if version != LOG_VERSION {
        return Err(bad(format!("version {version}, expected {LOG_VERSION}")));
    }
    let sector_size = u64::from(le32(bytes, 24));
    if !(512..=65536).contains(&sector_size) || !sector_size.is_power_of_two() {
        return Err(bad(format!("sector size {sector_size} is not a power of two in 512..=65536")));
    }
    Ok((le64(bytes, 16), sector_size))
}

/// How many bytes the log occupies, reading it piecewise with `read_at`
/// (offset, buffer): the super block, then each entry header, skipping
/// data. For finding the end of a log on a large device without reading
/// all of it.
pub fn log_length(mut read_at: impl FnMut(u64, &mut [u8]) -> std::io::Result<()>) -> Result<u64, LogError> {
    let mut sb = [0u8; 512];
    read_at(0, &mut sb).map_err(|e| LogError { entry: None, offset: 0, what: format!("read: {e}") })?;
    let (nr_entries, ss) = super_block(&sb)?;
    let mut at = ss;
    let mut header = [0u8; ENTRY_HEADER];
    for i in 0..nr_entries {
        read_at(at, &mut header).map_err(|e| LogError {
            entry: Some(i),
            offset: at,
            what: format!("read the entry header: {e}"),
        })?;
        let (nr, flags) = (le64(&header, 8), le64(&header, 16));
        let data = if flags & (FLAG_DISCARD | FLAG_MARK) != 0 { 0 } else { nr };
        at =
            data.checked_add(1).and_then(|s| s.checked_mul(ss)).and_then(|n| n.checked_add(at)).ok_or_else(
                || LogError { entry: Some(i), offset: at, what: format!("{nr} sectors overflow") },
            )?;
    }
    Ok(at)
}

/// Parses a whole log. Every one of the super block's `nr_entries` must be
/// present and well-formed; bytes after the last are ignored.
pub fn parse(bytes: &[u8]) -> Result<Log<'_>, LogError> {
    let (nr_entries, ss) = super_block(bytes)?;
    let ss_usize = ss as usize;
    let len = bytes.len() as u64;
    // Each entry takes at least one sector: a count beyond that is garbage.
    if nr_entries > len / ss {
        return Err(LogError {
            entry: None,
            offset: 16,
            what: format!("{nr_entries} entries cannot fit in {len} bytes"),
        });
    }
    let mut entries = Vec::with_capacity(nr_entries as usize);
    let mut at = ss;
    for i in 0..nr_entries {
        let bad = |what: String| LogError { entry: Some(i), offset: at, what };
        if at.checked_add(ss).is_none_or(|end| end > len) {
            return Err(bad(format!("truncated: the entry header runs past the log's {len} bytes")));
        }
        let h = &bytes[at as usize..(at + ss) as usize];
        let (sector, nr_sectors, flags, data_len) = (le64(h, 0), le64(h, 8), le64(h, 16), le64(h, 24));
        if flags & !KNOWN_FLAGS != 0 {
            return Err(bad(format!("unknown flags {flags:#x}")));
        }
        let body = at + ss;
        let (kind, data_sectors) = if flags & FLAG_MARK != 0 {
            if flags & (FLAG_DISCARD | FLAG_FLUSH | FLAG_FUA) != 0 || nr_sectors != 0 {
                return Err(bad(format!("a mark with flags {flags:#x} and {nr_sectors} sectors")));
            }
            if data_len > (ss_usize - ENTRY_HEADER) as u64 {
                return Err(bad(format!("mark text of {data_len} bytes does not fit the entry sector")));
            }
            let text = &h[ENTRY_HEADER..ENTRY_HEADER + data_len as usize];
            (EntryKind::Mark(String::from_utf8_lossy(text).into_owned()), 0)
        } else if flags & FLAG_DISCARD != 0 {
            if flags & (FLAG_FLUSH | FLAG_FUA) != 0 {
                return Err(bad(format!("a discard with flags {flags:#x}")));
            }
            (EntryKind::Discard, 0)
        } else if flags & FLAG_FLUSH != 0 && nr_sectors == 0 {
            (EntryKind::Flush, 0)
        } else {
            if nr_sectors == 0 {
                return Err(bad(format!("a write of 0 sectors with flags {flags:#x}")));
            }
            (EntryKind::Write { fua: flags & FLAG_FUA != 0 }, nr_sectors)
        };
        let data_bytes = data_sectors
            .checked_mul(ss)
            .filter(|&n| body.checked_add(n).is_some_and(|end| end <= len))
            .ok_or_else(|| {
                bad(format!("truncated: {data_sectors} sectors of data run past the log's {len} bytes"))
            })?;
        if matches!(kind, EntryKind::Write { .. }) && sector.checked_add(nr_sectors).is_none() {
            return Err(bad(format!("sector {sector} + {nr_sectors} overflows")));
        }
        entries.push(Entry {
            sector,
            nr_sectors,
            flags,
            kind,
            data: body as usize..(body + data_bytes) as usize,
        });
        at = body + data_bytes;
    }
    Ok(Log { sector_size: ss, entries, bytes })
}

impl<'a> Log<'a> {
    /// The data an entry wrote (empty for everything but writes).
    pub fn data(&self, entry: &Entry) -> &'a [u8] {
        &self.bytes[entry.data.clone()]
    }

    /// The index of the first mark with this text.
    pub fn mark(&self, text: &str) -> Option<usize> {
        self.entries.iter().position(|e| matches!(&e.kind, EntryKind::Mark(t) if t == text))
    }

    /// Every mark's text and index, in order.
    pub fn marks(&self) -> impl Iterator<Item = (usize, &str)> {
        self.entries.iter().enumerate().filter_map(|(i, e)| match &e.kind {
            EntryKind::Mark(t) => Some((i, t.as_str())),
            _ => None,
        })
    }

    /// Applies entries `range` to `device` (the logged device's content):
    /// writes are copied in, discards leave the bytes as they are (the
    /// VM's disks ignore discards; see docs/kernel-shim.md), flushes and marks do
    /// nothing. A write past the end of `device` is an error.
    pub fn replay_into(&self, device: &mut [u8], range: std::ops::Range<usize>) -> Result<(), LogError> {
        for (i, e) in self.entries.iter().enumerate().take(range.end).skip(range.start) {
            if let EntryKind::Write { .. } = e.kind {
                let start = e.sector.checked_mul(self.sector_size);
                let end = start.and_then(|s| s.checked_add(e.data.len() as u64));
                match (start, end) {
                    (Some(s), Some(end)) if end <= device.len() as u64 => {
                        device[s as usize..end as usize].copy_from_slice(self.data(e));
                    }
                    _ => {
                        return Err(LogError {
                            entry: Some(i as u64),
                            offset: e.data.start as u64,
                            what: format!(
                                "a write of {} sectors at sector {} runs past the device's {} bytes",
                                e.nr_sectors,
                                e.sector,
                                device.len()
                            ),
                        })
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a log the way dm-log-writes lays it out (512-byte sectors).
    pub(crate) fn build(entries: &[(u64, u64, u64, Vec<u8>)]) -> Vec<u8> {
        let mut out = vec![0u8; 512];
        out[0..8].copy_from_slice(&LOG_MAGIC.to_le_bytes());
        out[8..16].copy_from_slice(&LOG_VERSION.to_le_bytes());
        out[16..24].copy_from_slice(&(entries.len() as u64).to_le_bytes());
        out[24..28].copy_from_slice(&512u32.to_le_bytes());
        out[28..32].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]); // undefined padding
        for (sector, nr, flags, payload) in entries {
            let mut h = vec![0u8; 512];
            h[0..8].copy_from_slice(&sector.to_le_bytes());
            h[8..16].copy_from_slice(&nr.to_le_bytes());
            h[16..24].copy_from_slice(&flags.to_le_bytes());
            if flags & FLAG_MARK != 0 {
                h[24..32].copy_from_slice(&(payload.len() as u64).to_le_bytes());
                h[32..32 + payload.len()].copy_from_slice(payload);
                out.extend_from_slice(&h);
            } else {
                out.extend_from_slice(&h);
                out.extend_from_slice(payload);
            }
        }
        out
    }

    fn sample() -> Vec<u8> {
        build(&[
            (2, 1, 0, vec![1u8; 512]),
            (0, 0, FLAG_FLUSH, vec![]),
            (0, 0, FLAG_MARK, b"op0".to_vec()),
            (1, 2, FLAG_FUA | FLAG_METADATA, vec![2u8; 1024]),
            (0, 3, FLAG_DISCARD, vec![]),
            (0, 0, FLAG_MARK, b"op1".to_vec()),
        ])
    }

    #[test]
    fn parses_and_replays_prefixes() {
        let bytes = sample();
        let log = parse(&bytes).unwrap();
        assert_eq!(log.sector_size, 512);
        assert_eq!(log.entries.len(), 6);
        assert_eq!(log.entries[3].kind, EntryKind::Write { fua: true });
        assert_eq!(
            log.marks().map(|(i, t)| (i, t.to_string())).collect::<Vec<_>>(),
            [(2, "op0".to_string()), (5, "op1".to_string())]
        );
        let mut dev = vec![9u8; 512 * 4];
        log.replay_into(&mut dev, 0..log.mark("op0").unwrap()).unwrap();
        assert_eq!(&dev[1024..1536], &[1u8; 512][..]);
        assert_eq!(dev[512], 9);
        log.replay_into(&mut dev, 3..6).unwrap();
        assert_eq!(&dev[512..1536], &[2u8; 1024][..], "the FUA write lands over the earlier one");
        assert_eq!(dev[0], 9, "discards leave the bytes");
        let len = log_length(|at, buf| {
            let s =
                bytes.get(at as usize..at as usize + buf.len()).ok_or(std::io::ErrorKind::UnexpectedEof)?;
            buf.copy_from_slice(s);
            Ok(())
        })
        .unwrap();
        assert_eq!(len, bytes.len() as u64);
    }

    #[test]
    fn rejects_truncated_and_garbage_logs_with_context() {
        let bytes = sample();
        let e = parse(&bytes[..bytes.len() - 512]).unwrap_err();
        assert_eq!(e.entry, Some(5), "{e}");
        let e = parse(&bytes[..3600]).unwrap_err();
        assert_eq!(e.entry, Some(3), "{e}");
        assert!(e.to_string().contains("truncated"), "{e}");
        assert!(parse(&[0u8; 4096]).unwrap_err().to_string().contains("magic"));
        assert!(parse(&bytes[..10]).is_err());
        let mut bad = bytes.clone();
        bad[512 + 16] = 0x40;
        assert!(parse(&bad).unwrap_err().to_string().contains("unknown flags"));
        let mut bad = bytes.clone();
        bad[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse(&bad).is_err());
        let mut dev = vec![0u8; 1024];
        let log = parse(&bytes).unwrap();
        assert!(log.replay_into(&mut dev, 0..6).unwrap_err().to_string().contains("past the device"));
    }

    mod hostile {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

            /// Any bytes: an error or a log whose every entry lies inside
            /// the bytes, never a panic.
            #[test]
            fn hostile_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..4096), valid_header in any::<bool>(), n in 0u64..16) {
                if valid_header && bytes.len() >= 32 {
                    bytes[0..8].copy_from_slice(&LOG_MAGIC.to_le_bytes());
                    bytes[8..16].copy_from_slice(&LOG_VERSION.to_le_bytes());
                    bytes[16..24].copy_from_slice(&n.to_le_bytes());
                    bytes[24..28].copy_from_slice(&512u32.to_le_bytes());
                }
                if let Ok(log) = parse(&bytes) {
                    for e in &log.entries {
                        prop_assert!(e.data.end <= bytes.len());
                    }
                    let mut dev = vec![0u8; 8192];
                    let _ = log.replay_into(&mut dev, 0..log.entries.len());
                }
                let _ = log_length(|at, buf| {
                    let s = bytes.get(at as usize..(at as usize).saturating_add(buf.len())).ok_or(std::io::ErrorKind::UnexpectedEof)?;
                    buf.copy_from_slice(s);
                    Ok(())
                });
            }

            /// Well-formed logs with flipped bytes: never a panic.
            #[test]
            fn damaged_logs_never_panic(at in 0usize..6000, byte in any::<u8>(), cut in 0usize..7000) {
                let mut bytes = super::sample();
                if at < bytes.len() {
                    bytes[at] = byte;
                }
                bytes.truncate(cut.max(1));
                if let Ok(log) = parse(&bytes) {
                    let mut dev = vec![0u8; 4096];
                    let _ = log.replay_into(&mut dev, 0..log.entries.len());
                }
            }
        }
    }
}
