//! Block checksums: CRC-32C with a per-structure salt.
//!
//! Every persistent-data block starts with a 32-bit checksum covering bytes
//! 4..4096. The kernel runs the CRC-32C register from `!0` over those bytes
//! and, unlike the textbook CRC, does not invert the result; it then XORs a
//! salt that differs per structure, so a block of one kind never validates
//! as another. The salts are the kernel's constants (spec §1.2).

/// Salt of the thin-pool superblock.
pub const THIN_SUPERBLOCK_SALT: u32 = 160_774;
/// Salt of btree nodes.
pub const BTREE_NODE_SALT: u32 = 121_107;
/// Salt of space-map bitmap blocks.
pub const BITMAP_SALT: u32 = 240_779;
/// Salt of the metadata space map's index block.
pub const INDEX_SALT: u32 = 160_478;
/// Salt of dm-array blocks.
pub const ARRAY_SALT: u32 = 595_846_735;
/// Salt of the dm-cache superblock.
pub const CACHE_SUPERBLOCK_SALT: u32 = 9_031_977;

/// The kernel's `dm_bm_checksum`: CRC-32C register over `data`, no final
/// inversion, XORed with `salt`.
pub fn dm_checksum(data: &[u8], salt: u32) -> u32 {
    // The crc32c crate computes the textbook value (final inversion applied);
    // undo the inversion to get the raw register the kernel uses.
    crc32c::crc32c(data) ^ 0xffff_ffff ^ salt
}

/// The checksum a 4 KiB block should carry in its first four bytes.
pub fn block_checksum(block: &[u8], salt: u32) -> u32 {
    dm_checksum(&block[4..], salt)
}

/// The checksum stored in a block's first four bytes.
pub fn stored_checksum(block: &[u8]) -> u32 {
    u32::from_le_bytes(block[0..4].try_into().expect("4 bytes"))
}

/// Recomputes and stores a block's checksum.
pub fn seal(block: &mut [u8], salt: u32) {
    let csum = block_checksum(block, salt);
    block[0..4].copy_from_slice(&csum.to_le_bytes());
}

/// Which salt, if any, makes the stored checksum match: the tools identify
/// a block's kind this way.
pub fn salt_of(block: &[u8]) -> Option<u32> {
    let salt = stored_checksum(block) ^ dm_checksum(&block[4..], 0);
    [THIN_SUPERBLOCK_SALT, BTREE_NODE_SALT, BITMAP_SALT, INDEX_SALT, ARRAY_SALT, CACHE_SUPERBLOCK_SALT]
        .into_iter()
        .find(|&s| s == salt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_spec_test_vectors() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        let zeros = [0u8; 4092];
        assert_eq!(dm_checksum(&zeros, 0), 0x58CD_A791);
        assert_eq!(dm_checksum(&zeros, THIN_SUPERBLOCK_SALT), 0x58CF_D397);
        assert_eq!(dm_checksum(&zeros, BTREE_NODE_SALT), 0x58CC_7E82);
        assert_eq!(dm_checksum(&zeros, BITMAP_SALT), 0x58CE_0B1A);
        assert_eq!(dm_checksum(&zeros, INDEX_SALT), 0x58CF_D54F);
        assert_eq!(dm_checksum(&zeros, ARRAY_SALT), 0x7B4E_41DE);
    }

    #[test]
    fn salt_of_identifies_the_kind_and_rejects_damage() {
        let mut block = vec![0u8; 4096];
        block[100] = 42;
        seal(&mut block, BITMAP_SALT);
        assert_eq!(salt_of(&block), Some(BITMAP_SALT));
        block[101] ^= 1;
        assert_eq!(salt_of(&block), None);
    }
}
