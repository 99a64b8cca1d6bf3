//! Stamped payloads: every 512-byte sector a write puts down names the run,
//! the write, the thin device and the sector it was meant for, so a read tells
//! exactly which write's data came back — with no stored data at all. Lost
//! writes, stale data, misdirected writes and leaks between thin devices all
//! show up as "wrong stamp", torn or damaged sectors as [`SectorContent::Foreign`].
//!
//! # On-sector layout, format version 1
//!
//! All integers little-endian. Offsets in bytes within the 512-byte sector.
//!
//! | offset | len | field                                                     |
//! |-------:|----:|-----------------------------------------------------------|
//! |      0 |   8 | [`MAGIC`] `b"dmSTAMP\xa5"`                                 |
//! |      8 |   1 | [`FORMAT_VERSION`] (1)                                     |
//! |      9 |   7 | reserved, zero                                            |
//! |     16 |   8 | run id                                                    |
//! |     24 |   8 | write sequence number                                     |
//! |     32 |   8 | virtual sector                                            |
//! |     40 |   4 | thin device id                                            |
//! |     44 |   4 | crc32c of bytes `0..44` then `48..512` (the whole sector but the crc itself) |
//! |     48 | 464 | filler: 58 `u64` words of splitmix64 seeded from the fields |
//!
//! The checksum covers the whole sector, and decoding also regenerates and
//! compares the filler: the crc makes the format checkable by tools that do not
//! know the generator, the filler comparison makes the verdict on a sector torn
//! between two stamps exact rather than 1 − 2⁻³² likely.
//!
//! Changing any of this (magic, field order, generator, what the crc covers)
//! changes the bytes pinned by the unit test below and needs a
//! [`FORMAT_VERSION`] bump: traces recorded by older code must not be misread.

use std::fmt;

/// Size of the sector every stamp fills: the block layer's logical sector.
pub const SECTOR_SIZE: usize = 512;
/// First eight bytes of every stamped sector. Mixed-case ASCII plus a high byte
/// so that neither text nor zeroed or 0xff-filled media looks like a stamp.
pub const MAGIC: [u8; 8] = *b"dmSTAMP\xa5";
/// Version of the on-sector layout described in the module documentation.
pub const FORMAT_VERSION: u8 = 1;
/// Bytes of the header (magic, version, fields, crc); the filler follows.
pub const HEADER_LEN: usize = 48;

const CRC_AT: usize = 44;

/// What one sector was written as: which write of which run, for which sector
/// of which thin device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Stamp {
    /// The run the write belongs to (e.g. derived from the seed), so data left
    /// over from an earlier run on reused media is never taken for this run's.
    pub run: u64,
    /// Sequence number of the write within the run.
    pub write: u64,
    /// Thin device id the write was submitted to.
    pub device: u32,
    /// The sector's own address on the thin device (virtual, not pool data).
    pub sector: u64,
}

/// What [`decode_sector`] found in a sector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SectorContent {
    /// All 512 bytes are zero: never written, discarded, or zeroed on provision.
    Zeroes,
    /// An intact stamp, checksum and filler verified.
    Stamp(Stamp),
    /// Neither zero nor an intact stamp: garbage, torn, damaged, or a partial
    /// trailing sector.
    Foreign,
}

impl fmt::Display for Stamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "w{}@dev{}:s{} (run {:#x})", self.write, self.device, self.sector, self.run)
    }
}

impl fmt::Display for SectorContent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SectorContent::Zeroes => f.write_str("zeroes"),
            SectorContent::Stamp(s) => s.fmt(f),
            SectorContent::Foreign => f.write_str("foreign"),
        }
    }
}

/// What one splitmix64 step adds to its state.
const SPLITMIX_STEP: u64 = 0x9e37_79b9_7f4a_7c15;

/// splitmix64 step: tiny, well mixed, and trivially reimplemented by any tool
/// that has to read these sectors.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(SPLITMIX_STEP);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The filler's generator state: every field folded in through a mixing step,
/// so stamps differing in any one field get unrelated filler.
fn filler_seed(stamp: &Stamp) -> u64 {
    let mut state = 0;
    for field in [stamp.run, stamp.write, u64::from(stamp.device), stamp.sector] {
        state ^= field;
        state = splitmix64(&mut state);
    }
    state
}

/// Word `i` of the filler of generator seed `seed`: the generator's output
/// after `i + 1` steps. A step only adds a constant, so each word comes
/// from the seed directly and the words of a sector are independent (the
/// loops over them vectorize; every write stamps and every read checks).
fn filler_word(seed: u64, i: usize) -> u64 {
    let mut state = seed.wrapping_add((i as u64).wrapping_mul(SPLITMIX_STEP));
    splitmix64(&mut state)
}

fn write_filler(stamp: &Stamp, filler: &mut [u8]) {
    let seed = filler_seed(stamp);
    for (i, word) in filler.chunks_exact_mut(8).enumerate() {
        word.copy_from_slice(&filler_word(seed, i).to_le_bytes());
    }
}

/// Whether `filler` is `stamp`'s: every word's difference folded into one
/// value, without a branch a word.
fn filler_matches(stamp: &Stamp, filler: &[u8]) -> bool {
    let seed = filler_seed(stamp);
    let mut diff = 0;
    for (i, word) in filler.chunks_exact(8).enumerate() {
        diff |= u64::from_le_bytes(word.try_into().expect("8-byte word")) ^ filler_word(seed, i);
    }
    diff == 0
}

fn sector_crc(buf: &[u8; SECTOR_SIZE]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&buf[..CRC_AT]), &buf[CRC_AT + 4..])
}

fn le_u64(buf: &[u8; SECTOR_SIZE], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().expect("8-byte field"))
}

/// Writes `stamp` into `out` in the layout of [`FORMAT_VERSION`].
pub fn stamp_sector(stamp: &Stamp, out: &mut [u8; SECTOR_SIZE]) {
    out[..8].copy_from_slice(&MAGIC);
    out[8] = FORMAT_VERSION;
    out[9..16].fill(0);
    out[16..24].copy_from_slice(&stamp.run.to_le_bytes());
    out[24..32].copy_from_slice(&stamp.write.to_le_bytes());
    out[32..40].copy_from_slice(&stamp.sector.to_le_bytes());
    out[40..44].copy_from_slice(&stamp.device.to_le_bytes());
    write_filler(stamp, &mut out[HEADER_LEN..]);
    let crc = sector_crc(out);
    out[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Stamps every sector of `buf` as written by `write` of `run` to `device`;
/// sector `i` of the buffer is stamped as sector `first_sector + i`.
///
/// # Panics
///
/// If `buf.len()` is not a multiple of [`SECTOR_SIZE`]: writes are whole
/// sectors, so anything else is a bug in the caller.
pub fn fill(buf: &mut [u8], run: u64, write: u64, device: u32, first_sector: u64) {
    assert!(buf.len().is_multiple_of(SECTOR_SIZE), "stamp::fill: {} bytes is not whole sectors", buf.len());
    for (i, chunk) in buf.chunks_exact_mut(SECTOR_SIZE).enumerate() {
        let stamp = Stamp { run, write, device, sector: first_sector + i as u64 };
        stamp_sector(&stamp, chunk.try_into().expect("chunk of SECTOR_SIZE"));
    }
}

/// Tells what one sector holds. Never panics; anything that is not all zero and
/// not an intact stamp of a known version is [`SectorContent::Foreign`].
pub fn decode_sector(buf: &[u8; SECTOR_SIZE]) -> SectorContent {
    if buf[..8] != MAGIC && is_zero(buf) {
        return SectorContent::Zeroes;
    }
    if buf[..8] != MAGIC || buf[8] != FORMAT_VERSION || buf[9..16].iter().any(|&b| b != 0) {
        return SectorContent::Foreign;
    }
    let crc = u32::from_le_bytes(buf[CRC_AT..CRC_AT + 4].try_into().expect("4-byte crc"));
    if crc != sector_crc(buf) {
        return SectorContent::Foreign;
    }
    let device = u32::from_le_bytes(buf[40..44].try_into().expect("4-byte field"));
    let stamp = Stamp { run: le_u64(buf, 16), write: le_u64(buf, 24), device, sector: le_u64(buf, 32) };
    if !filler_matches(&stamp, &buf[HEADER_LEN..]) {
        return SectorContent::Foreign;
    }
    SectorContent::Stamp(stamp)
}

/// Whether every byte of `buf` is zero: the words OR-ed together, with no
/// branch a byte (this runs for every sector every read returns).
fn is_zero(buf: &[u8; SECTOR_SIZE]) -> bool {
    buf.chunks_exact(8).fold(0, |acc, word| acc | u64::from_ne_bytes(word.try_into().expect("8-byte word")))
        == 0
}

/// Decodes every sector of `buf`, in order. A trailing partial sector (a length
/// that is not a multiple of [`SECTOR_SIZE`]) cannot hold a stamp and is
/// reported as one final [`SectorContent::Foreign`], even if it is all zero:
/// reads are whole sectors, so a partial one is itself a sign of damage.
pub fn decode(buf: &[u8]) -> Vec<SectorContent> {
    let chunks = buf.chunks_exact(SECTOR_SIZE);
    let partial = !chunks.remainder().is_empty();
    let mut out: Vec<SectorContent> =
        chunks.map(|c| decode_sector(c.try_into().expect("chunk of SECTOR_SIZE"))).collect();
    if partial {
        out.push(SectorContent::Foreign);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The filler check on its own: a sector whose crc was made to match a
    /// changed filler word (first, middle, last) still decodes as foreign.
    #[test]
    fn a_wrong_filler_under_a_valid_crc_is_foreign() {
        let stamp = Stamp { run: 1, write: 2, device: 3, sector: 4 };
        let words = (SECTOR_SIZE - HEADER_LEN) / 8;
        for word in [0, words / 2, words - 1] {
            let mut buf = [0u8; SECTOR_SIZE];
            stamp_sector(&stamp, &mut buf);
            assert_eq!(decode_sector(&buf), SectorContent::Stamp(stamp));
            buf[HEADER_LEN + word * 8] ^= 1;
            let crc = sector_crc(&buf);
            buf[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
            assert_eq!(decode_sector(&buf), SectorContent::Foreign, "filler word {word}");
        }
    }

    /// Pins the format: if this fails, the on-sector layout changed, and that
    /// needs a FORMAT_VERSION bump (and then a new pinned value), never just a
    /// new pinned value.
    #[test]
    fn pinned_bytes_of_one_stamp() {
        let mut buf = [0u8; SECTOR_SIZE];
        stamp_sector(&Stamp { run: 0xdead_beef_0bad_f00d, write: 17, device: 3, sector: 4096 }, &mut buf);
        assert_eq!(
            hex(&buf[..64]),
            concat!(
                "646d5354414d50a5",                 // magic
                "01",                               // version
                "00000000000000",                   // reserved
                "0df0ad0befbeadde",                 // run
                "1100000000000000",                 // write 17
                "0010000000000000",                 // sector 4096
                "03000000",                         // device 3
                "1e8650d2",                         // crc32c
                "bdc77f08475d671eb59ac16416de9e99", // filler starts
            )
        );
    }
}
