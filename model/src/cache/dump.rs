//! The `cache_dump` XML of a cache metadata image (spec §6.5), byte for
//! byte what Debian's `cache_dump` 0.9.0 prints: the superblock line, the
//! valid mappings in cache block order, the hints of valid cache blocks
//! (whenever a hint array exists), two-space indentation, no discards
//! section (0.9.0 never writes one), and its idea of the hint width
//! ([`tools_hint_width`]).
//!
//! One deliberate difference: `dirty` is what is on disk — the M_DIRTY flag
//! in metadata version 1, **the dirty bitset in version 2**. Debian's 0.9.0
//! does not read metadata2's dirty bitset and prints every block of a
//! version 2 image clean, so its output equals this one only on version 1
//! images and on version 2 images without dirty blocks.

use std::io::Write;

use super::inspect::{read_image, CacheImage};
use super::metadata::Result;
use super::superblock::policy_name_str;
use crate::block_device::BlockDevice;

/// Writes the XML dump of the image on `dev`.
pub fn dump<D: BlockDevice>(dev: &mut D, out: &mut dyn Write) -> Result<()> {
    let img = read_image(dev)?;
    write_xml(&img, out).map_err(|e| super::CacheError::BadSuperblock(format!("writing the dump: {e}")))
}

/// The XML dump of the image on `dev` as a string.
pub fn dump_string<D: BlockDevice>(dev: &mut D) -> Result<String> {
    let mut out = Vec::new();
    dump(dev, &mut out)?;
    Ok(String::from_utf8(out).expect("the dump is ASCII"))
}

/// Writes the XML of an already decoded image.
pub fn write_xml(img: &CacheImage, out: &mut dyn Write) -> std::io::Result<()> {
    let sb = &img.superblock;
    writeln!(
        out,
        "<superblock uuid=\"{}\" block_size=\"{}\" nr_cache_blocks=\"{}\" policy=\"{}\" hint_width=\"{}\">",
        policy_name_str(&sb.uuid),
        sb.data_block_size,
        sb.cache_blocks,
        sb.policy_name_str(),
        tools_hint_width(sb)
    )?;
    writeln!(out, "  <mappings>")?;
    for (cblock, m) in img.mappings.iter().enumerate() {
        if m.valid() {
            writeln!(
                out,
                "    <mapping cache_block=\"{cblock}\" origin_block=\"{}\" dirty=\"{}\"/>",
                m.oblock,
                img.is_dirty(cblock)
            )?;
        }
    }
    writeln!(out, "  </mappings>")?;
    writeln!(out, "  <hints>")?;
    if let Some(hints) = &img.hints {
        for (cblock, h) in hints.iter().enumerate() {
            if img.mappings.get(cblock).is_some_and(|m| m.valid()) {
                writeln!(out, "    <hint cache_block=\"{cblock}\" data=\"{}\"/>", base64(h))?;
            }
        }
    }
    writeln!(out, "  </hints>")?;
    writeln!(out, "</superblock>")
}

/// The hint width the tools print: 0.9.0 reads the superblock's
/// `policy_hint_size` only when incompat bit 0 (its VARIABLE_HINT_SIZE) is
/// set, and takes 4 otherwise — its `cache_restore` writes 0 there for
/// 4-byte hints, the kernel writes 4.
pub fn tools_hint_width(sb: &super::superblock::CacheSuperblock) -> u32 {
    if sb.incompat_flags & 1 != 0 {
        sb.policy_hint_size
    } else {
        4
    }
}

/// Standard base64 with padding.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                s.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_the_tools() {
        assert_eq!(super::base64(&[1, 0, 0, 0]), "AQAAAA==");
        assert_eq!(super::base64(&[2, 0, 0, 0]), "AgAAAA==");
        assert_eq!(super::base64(b"abc"), "YWJj");
        assert_eq!(super::base64(b"ab"), "YWI=");
    }
}
