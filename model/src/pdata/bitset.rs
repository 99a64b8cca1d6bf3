//! dm-bitset (drivers/md/persistent-data/dm-bitset.c, spec §1.16): a
//! bitset stored as a dm-array of le64 words; bit `i` is bit `i % 64` of
//! word `i / 64`.
//!
//! Like the kernel's `struct dm_disk_bitset`, a [`Bitset`] caches one word:
//! set, clear and test load the word holding the bit (writing back a
//! different, modified cached word first), and only [`Bitset::flush`] or a
//! move to another word writes it into the array. Which writes happen, and
//! when, decides which array blocks get shadowed, so the cache is part of
//! the model, not an optimisation.

use super::array::ArrayInfo;
use super::transaction::TransactionManager;
use super::{BlockNr, Result};
use crate::block_device::BlockDevice;

/// Bits per array entry.
pub const BITS_PER_WORD: u32 = 64;

/// The word array of every bitset.
pub const WORDS: ArrayInfo = ArrayInfo::new(8);

/// Words needed for `nr_bits` bits.
pub fn nr_words(nr_bits: u32) -> u32 {
    nr_bits.div_ceil(BITS_PER_WORD)
}

/// The one cached word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CachedWord {
    index: u32,
    bits: u64,
    dirty: bool,
}

/// A bitset's in-core state (the kernel's `dm_disk_bitset`): the cached word.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bitset {
    current: Option<CachedWord>,
}

impl Bitset {
    /// A bitset handle with nothing cached (`dm_disk_bitset_init`).
    pub fn new() -> Self {
        Bitset::default()
    }

    /// Whether a modified word is waiting for [`Self::flush`].
    pub fn has_unflushed_word(&self) -> bool {
        self.current.is_some_and(|c| c.dirty)
    }

    /// Forgets the cached word without writing it (reopen / abort).
    pub fn forget(&mut self) {
        self.current = None;
    }

    /// An empty bitset (`dm_bitset_empty`).
    pub fn empty<D: BlockDevice>(tm: &mut TransactionManager<D>) -> Result<BlockNr> {
        WORDS.empty(tm)
    }

    /// Builds a bitset of `nr_bits` bits from `bit` (`dm_bitset_new`); bits
    /// of the last word beyond `nr_bits` are zero.
    pub fn new_bitset<D: BlockDevice>(
        tm: &mut TransactionManager<D>,
        nr_bits: u32,
        mut bit: impl FnMut(u32) -> Result<bool>,
    ) -> Result<BlockNr> {
        WORDS.new_array(tm, nr_words(nr_bits), |index, value| {
            let nr = BITS_PER_WORD.min(nr_bits - index * BITS_PER_WORD);
            let mut word = 0u64;
            for b in 0..nr {
                if bit(index * BITS_PER_WORD + b)? {
                    word |= 1 << b;
                }
            }
            value.copy_from_slice(&word.to_le_bytes());
            Ok(())
        })
    }

    /// Resizes from `old_bits` to `new_bits` (`dm_bitset_resize`): whole
    /// words are added filled with `default` (all ones or all zeroes) or
    /// dropped; bits of a partly used last word are left as they are.
    pub fn resize<D: BlockDevice>(
        tm: &mut TransactionManager<D>,
        root: BlockNr,
        old_bits: u32,
        new_bits: u32,
        default: bool,
    ) -> Result<BlockNr> {
        let value: u64 = if default { !0 } else { 0 };
        WORDS.resize(tm, root, nr_words(old_bits), nr_words(new_bits), &value.to_le_bytes())
    }

    /// Drops the bitset (`dm_bitset_del`). The cached word is not touched,
    /// as in the kernel.
    pub fn del<D: BlockDevice>(tm: &mut TransactionManager<D>, root: BlockNr) -> Result<()> {
        WORDS.del(tm, root)
    }

    /// Writes the cached word back if it was modified (`dm_bitset_flush`).
    pub fn flush<D: BlockDevice>(
        &mut self,
        tm: &mut TransactionManager<D>,
        root: &mut BlockNr,
    ) -> Result<()> {
        let Some(c) = self.current else { return Ok(()) };
        if !c.dirty {
            return Ok(());
        }
        WORDS.set(tm, root, c.index, &c.bits.to_le_bytes())?;
        self.current = None;
        Ok(())
    }

    /// Loads the word holding bit `index` (`get_array_entry`).
    fn word<D: BlockDevice>(
        &mut self,
        tm: &mut TransactionManager<D>,
        root: &mut BlockNr,
        index: u32,
    ) -> Result<&mut CachedWord> {
        let array_index = index / BITS_PER_WORD;
        if let Some(c) = self.current {
            if c.index == array_index {
                return Ok(self.current.as_mut().expect("cached"));
            }
            self.flush(tm, root)?;
        }
        let mut v = [0u8; 8];
        WORDS.get(tm, *root, array_index, &mut v)?;
        Ok(self.current.insert(CachedWord { index: array_index, bits: u64::from_le_bytes(v), dirty: false }))
    }

    /// Sets bit `index` in the cached word (`dm_bitset_set_bit`).
    pub fn set_bit<D: BlockDevice>(
        &mut self,
        tm: &mut TransactionManager<D>,
        root: &mut BlockNr,
        index: u32,
    ) -> Result<()> {
        let c = self.word(tm, root, index)?;
        c.bits |= 1 << (index % BITS_PER_WORD);
        c.dirty = true;
        Ok(())
    }

    /// Clears bit `index` in the cached word (`dm_bitset_clear_bit`).
    pub fn clear_bit<D: BlockDevice>(
        &mut self,
        tm: &mut TransactionManager<D>,
        root: &mut BlockNr,
        index: u32,
    ) -> Result<()> {
        let c = self.word(tm, root, index)?;
        c.bits &= !(1 << (index % BITS_PER_WORD));
        c.dirty = true;
        Ok(())
    }

    /// Tests bit `index` (`dm_bitset_test_bit`); may write back a different
    /// modified word first.
    pub fn test_bit<D: BlockDevice>(
        &mut self,
        tm: &mut TransactionManager<D>,
        root: &mut BlockNr,
        index: u32,
    ) -> Result<bool> {
        let c = self.word(tm, root, index)?;
        Ok(c.bits & (1 << (index % BITS_PER_WORD)) != 0)
    }

    /// The first `nr_bits` bits as stored (read-only: ignores any cached
    /// word; for checkers and dumps).
    pub fn read_bits<D: BlockDevice>(
        tm: &mut TransactionManager<D>,
        root: BlockNr,
        nr_bits: u32,
    ) -> Result<Vec<bool>> {
        let mut out = Vec::with_capacity(nr_bits as usize);
        WORDS.walk(tm, root, &mut |_, v| {
            let w = u64::from_le_bytes(v.try_into().expect("8 bytes"));
            for b in 0..BITS_PER_WORD {
                if out.len() < nr_bits as usize {
                    out.push(w & (1 << b) != 0);
                }
            }
            Ok(())
        })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block_device::MemDevice;

    #[test]
    fn bits_live_in_le64_words_and_the_cached_word_needs_a_flush() {
        let mut tm = TransactionManager::create(MemDevice::new(8 * 1024), 0).unwrap();
        let mut root = Bitset::new_bitset(&mut tm, 130, |i| Ok(i == 3 || i == 129)).unwrap();
        assert_eq!(WORDS.values(&mut tm, root).unwrap()[0], (1u64 << 3).to_le_bytes());
        assert_eq!(WORDS.values(&mut tm, root).unwrap()[2], 2u64.to_le_bytes());
        let mut bs = Bitset::new();
        bs.set_bit(&mut tm, &mut root, 70).unwrap();
        assert!(bs.has_unflushed_word());
        assert!(!Bitset::read_bits(&mut tm, root, 130).unwrap()[70]);
        assert!(bs.test_bit(&mut tm, &mut root, 70).unwrap());
        // Moving to another word writes the cached one back.
        assert!(bs.test_bit(&mut tm, &mut root, 3).unwrap());
        assert!(Bitset::read_bits(&mut tm, root, 130).unwrap()[70]);
        bs.clear_bit(&mut tm, &mut root, 3).unwrap();
        bs.flush(&mut tm, &mut root).unwrap();
        let bits = Bitset::read_bits(&mut tm, root, 130).unwrap();
        let set: Vec<usize> = (0..130).filter(|&i| bits[i]).collect();
        assert_eq!(set, vec![70, 129]);
        root = Bitset::resize(&mut tm, root, 130, 300, true).unwrap();
        let bits = Bitset::read_bits(&mut tm, root, 300).unwrap();
        assert!(!bits[130] && bits[192] && bits[299]);
    }
}
