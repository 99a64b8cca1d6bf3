//! The durable disks of a cache job on controlled disks, as the agent
//! ships them: after every op that must leave something durable (a FLUSH,
//! a FUA write, a PREFLUSH write) and every op that commits the cache's
//! metadata without a flush of its data devices (a status query, a reload:
//! see [`is_mark`]), what a power cut that loses every volatile write
//! would keep of the metadata, cache and origin devices
//! (`faults::SimDisk::durable`), taken at one instant with all three disks
//! locked ([`crate::ublk::UblkDevice::with_disks`]).
//!
//! Each mark holds only what changed since the previous one (the first:
//! since the images the host supplied): metadata sectors as packed bytes
//! ([`pack`]), cache and origin blocks as read summaries
//! ([`crate::protocol::summarize`]), which rebuild stamped data exactly.
//! `crate::cache_crash` replays the marks onto the job's images on the host.

use std::fmt::Write as _;

use crate::protocol::summarize;
use dmsim_faults::{Image, CHUNK};

/// Whether a cache job on controlled disks records its disks' durable
/// state after `op`: a FLUSH, a FUA write or a PREFLUSH write (after which
/// something must be durable), or a commit without a data flush — a
/// status query (6.1's `cache_status` commits unless told not to) or a
/// reload (the suspend's clean shutdown commits).
pub fn is_mark(op: &dmsim_traces::Op) -> bool {
    use dmsim_traces::Op;
    crate::crash::is_durability_point(op) || matches!(op, Op::Status | Op::Reload { .. })
}

/// What changed on the three durable disks up to one op.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DurableMark {
    /// The op's index among the job's ops.
    pub op: usize,
    /// Metadata sectors whose durable bytes changed, each packed
    /// ([`pack`]).
    pub metadata: Vec<(u64, String)>,
    /// Cache device blocks whose durable bytes changed, each a read
    /// summary of the block (first sector: the block's on the cache
    /// device).
    pub cache: Vec<(u64, String)>,
    /// Origin blocks whose durable bytes changed, each a read summary.
    pub origin: Vec<(u64, String)>,
}

/// Packs bytes as text: runs of three or more zero bytes as `z<n>.`, every
/// other byte as two hex digits.
pub fn pack(bytes: &[u8]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < bytes.len() {
        let zeros = bytes[i..].iter().take_while(|&&b| b == 0).count();
        if zeros >= 3 {
            let _ = write!(out, "z{zeros}.");
            i += zeros;
        } else {
            let _ = write!(out, "{:02x}", bytes[i]);
            i += 1;
        }
    }
    out
}

/// The bytes [`pack`] packed; an error for text it cannot have made, or
/// more than `max` bytes.
pub fn unpack(text: &str, max: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'z' {
            let end =
                text[i..].find('.').ok_or_else(|| format!("packed bytes: unterminated run at {i}"))? + i;
            let n: usize = text[i + 1..end].parse().map_err(|_| format!("packed bytes: bad run at {i}"))?;
            if out.len() + n > max {
                return Err(format!("packed bytes: more than {max}"));
            }
            out.resize(out.len() + n, 0);
            i = end + 1;
        } else {
            let pair = text.get(i..i + 2).ok_or_else(|| format!("packed bytes: odd hex at {i}"))?;
            let v = u8::from_str_radix(pair, 16).map_err(|_| format!("packed bytes: bad hex {pair:?}"))?;
            if out.len() >= max {
                return Err(format!("packed bytes: more than {max}"));
            }
            out.push(v);
            i += 2;
        }
    }
    Ok(out)
}

/// The durable images a job's marks are taken against (agent side): the
/// previous mark's, to ship only what changed.
#[derive(Debug, Clone)]
pub struct MarkTaker {
    /// The stamps' run.
    pub run: u64,
    /// Sectors per cache block.
    pub block_sectors: u64,
    last: [Image; 3],
}

impl MarkTaker {
    /// Marks against the images the job started from: metadata, cache
    /// device, origin.
    pub fn new(run: u64, block_sectors: u64, images: [Image; 3]) -> MarkTaker {
        MarkTaker { run, block_sectors, last: images }
    }

    /// The mark of op `op` for the durable images now (metadata, cache,
    /// origin); they become the base of the next mark.
    pub fn take(&mut self, op: usize, now: [&Image; 3]) -> DurableMark {
        let mut mark = DurableMark { op, ..DurableMark::default() };
        // A block of at least a sector (a header's zero block size cannot
        // make the pieces empty).
        let block = (self.block_sectors.max(1) * 512) as usize;
        let piece_len = [512, block, block];
        for (k, (last, now)) in self.last.iter_mut().zip(now).enumerate() {
            // Only pieces over a chunk whose bytes changed can differ.
            let changed = if last.len() == now.len() {
                now.differing_chunks(last)
            } else {
                (0..now.len().div_ceil(CHUNK) as u64).collect()
            };
            let mut pieces = std::collections::BTreeSet::new();
            for c in changed {
                let (start, end) = (c as usize * CHUNK, (c as usize * CHUNK + CHUNK).min(now.len()));
                pieces.extend(start / piece_len[k]..end.div_ceil(piece_len[k]));
            }
            for i in pieces {
                let at = i * piece_len[k];
                let piece = now.range(at..(at + piece_len[k]).min(now.len()));
                if at + piece.len() <= last.len() && last.range(at..at + piece.len()) == piece {
                    continue;
                }
                let i = i as u64;
                match k {
                    0 => mark.metadata.push((i, pack(&piece))),
                    1 => mark.cache.push((i, summarize(&piece, self.run, i * self.block_sectors))),
                    _ => mark.origin.push((i, summarize(&piece, self.run, i * self.block_sectors))),
                }
            }
            *last = now.clone();
        }
        mark
    }
}

impl DurableMark {
    /// The mark's lines in a kernel result's text.
    pub fn write_text(&self, s: &mut String) {
        let _ = writeln!(s, "durable {}", self.op);
        for (i, p) in &self.metadata {
            let _ = writeln!(s, "durable-m {i} {p}");
        }
        for (key, list) in [("durable-c", &self.cache), ("durable-o", &self.origin)] {
            for (i, summary) in list {
                let _ = writeln!(s, "{key} {i} {summary}");
            }
        }
    }

    /// Parses one line [`Self::write_text`] wrote (its key and the rest)
    /// into `marks`; `Ok(false)` when the key is not one of its.
    pub fn parse_line(key: &str, rest: &str, marks: &mut Vec<DurableMark>) -> Result<bool, String> {
        if key == "durable" {
            let op = rest.parse().map_err(|_| format!("bad durable op {rest:?}"))?;
            marks.push(DurableMark { op, ..DurableMark::default() });
            return Ok(true);
        }
        if !matches!(key, "durable-m" | "durable-c" | "durable-o") {
            return Ok(false);
        }
        let mark = marks.last_mut().ok_or_else(|| format!("{key} before any durable mark"))?;
        let (i, what) = rest.split_once(' ').unwrap_or((rest, ""));
        let i: u64 = i.parse().map_err(|_| format!("bad {key} index {i:?}"))?;
        let list = match key {
            "durable-m" => &mut mark.metadata,
            "durable-c" => &mut mark.cache,
            _ => &mut mark.origin,
        };
        list.push((i, what.to_string()));
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_follow_flushes_and_commits() {
        use dmsim_traces::op::{CacheIoMode, CachePolicyKind};
        use dmsim_traces::Op;
        let w = |fua, preflush| Op::Write { dev: 0, sector: 0, nr_sectors: 8, fua, preflush };
        assert!(is_mark(&w(true, false)) && is_mark(&w(false, true)) && !is_mark(&w(false, false)));
        assert!(is_mark(&Op::Flush { dev: 0 }) && is_mark(&Op::Status));
        assert!(is_mark(&Op::Reload { mode: CacheIoMode::Writeback, policy: CachePolicyKind::Smq }));
        assert!(
            !is_mark(&Op::Read { dev: 0, sector: 0, nr_sectors: 8 }) && !is_mark(&Op::Tick { millis: 5 })
        );
    }

    #[test]
    fn packed_bytes_unpack() {
        let mut b = vec![0u8; 512];
        b[0] = 7;
        b[3] = 0xff;
        b[100..110].fill(0x42);
        let p = pack(&b);
        assert!(p.len() < 80, "{p}");
        assert_eq!(unpack(&p, 512).unwrap(), b);
        assert!(unpack(&p, 511).is_err());
        for bad in ["z12", "zq.", "0", "gg"] {
            assert!(unpack(bad, 512).is_err(), "{bad}");
        }
    }

    #[test]
    fn marks_hold_what_changed_and_survive_text() {
        let meta = vec![0u8; 2048];
        let cache = vec![0xa5u8; 4 * 1024];
        let origin = vec![0u8; 8 * 1024];
        let image = |v: &Vec<u8>| Image::from_bytes(v);
        let mut t = MarkTaker::new(9, 2, [image(&meta), image(&cache), image(&origin)]);
        let mut m2 = meta.clone();
        m2[1500] = 1;
        let mut o2 = origin.clone();
        dmsim_traces::stamp::fill(&mut o2[2048..3072], 9, 4, 0, 4);
        let (m2, cache, o2) = (image(&m2), image(&cache), image(&o2));
        let mark = t.take(3, [&m2, &cache, &o2]);
        assert_eq!(mark.metadata.len(), 1);
        assert_eq!(mark.metadata[0].0, 2);
        assert!(mark.cache.is_empty());
        assert_eq!(mark.origin, vec![(2, "w4*2".to_string())]);
        let again = t.take(4, [&m2, &cache, &o2]);
        assert!(again.metadata.is_empty() && again.origin.is_empty(), "nothing changed since");
        let mut s = String::new();
        mark.write_text(&mut s);
        again.write_text(&mut s);
        let mut back = Vec::new();
        for line in s.lines() {
            let (k, r) = line.split_once(' ').unwrap();
            assert!(DurableMark::parse_line(k, r, &mut back).unwrap());
        }
        assert_eq!(back, vec![mark, again]);
        assert!(DurableMark::parse_line("durable-c", "1 w1*1", &mut Vec::new()).is_err());
        assert!(!DurableMark::parse_line("crash", "1", &mut back).unwrap());
    }
}
