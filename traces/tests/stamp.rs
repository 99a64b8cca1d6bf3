//! Properties of the stamped-payload codec: round trips, and that every kind
//! of damage a disk can do to a stamped sector decodes as Foreign.

use dmsim_traces::stamp::{
    decode, decode_sector, fill, stamp_sector, SectorContent, Stamp, FORMAT_VERSION, HEADER_LEN, MAGIC,
    SECTOR_SIZE,
};
use proptest::prelude::*;

fn stamped(stamp: Stamp) -> [u8; SECTOR_SIZE] {
    let mut buf = [0u8; SECTOR_SIZE];
    stamp_sector(&stamp, &mut buf);
    buf
}

/// A spread of stamps including the extremes of every field.
fn stamps() -> Vec<Stamp> {
    let mut out = Vec::new();
    for run in [0, 1, 0x5eed, u64::MAX] {
        for write in [0, 1, 17, u64::MAX] {
            for device in [0, 3, u32::MAX] {
                for sector in [0, 4095, 4096, u64::MAX] {
                    out.push(Stamp { run, write, device, sector });
                }
            }
        }
    }
    out
}

const A: Stamp = Stamp { run: 0x1111, write: 1, device: 1, sector: 100 };
const B: Stamp = Stamp { run: 0x2222, write: 2, device: 2, sector: 200 };

#[test]
fn round_trip_many_stamps() {
    for s in stamps() {
        assert_eq!(decode_sector(&stamped(s)), SectorContent::Stamp(s), "{s}");
    }
}

#[test]
fn multi_sector_fill_decodes_per_sector() {
    for sectors in [1usize, 2, 8, 128] {
        let mut buf = vec![0u8; sectors * SECTOR_SIZE];
        fill(&mut buf, 0xabc, 42, 7, 1000);
        let want: Vec<_> = (0..sectors as u64)
            .map(|i| SectorContent::Stamp(Stamp { run: 0xabc, write: 42, device: 7, sector: 1000 + i }))
            .collect();
        assert_eq!(decode(&buf), want);
    }
}

#[test]
fn zeroes_decode_as_zeroes() {
    assert_eq!(decode_sector(&[0; SECTOR_SIZE]), SectorContent::Zeroes);
    assert_eq!(decode(&[0; 4 * SECTOR_SIZE]), vec![SectorContent::Zeroes; 4]);
    assert_eq!(decode(&[]), vec![]);
}

#[test]
fn trailing_partial_sector_is_foreign() {
    let mut buf = vec![0u8; SECTOR_SIZE + 100];
    fill(&mut buf[..SECTOR_SIZE], 1, 2, 3, 4);
    let want =
        vec![SectorContent::Stamp(Stamp { run: 1, write: 2, device: 3, sector: 4 }), SectorContent::Foreign];
    assert_eq!(decode(&buf), want);
}

#[test]
fn every_single_bit_flip_is_foreign() {
    for s in [A, B, Stamp { run: 0, write: 0, device: 0, sector: 0 }] {
        let good = stamped(s);
        for bit in 0..SECTOR_SIZE * 8 {
            let mut bad = good;
            bad[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(decode_sector(&bad), SectorContent::Foreign, "{s}: bit {bit}");
        }
    }
}

#[test]
fn torn_at_every_8_byte_boundary_is_foreign() {
    let (a, b) = (stamped(A), stamped(B));
    for (first, second) in [(a, b), (b, a)] {
        for cut in (8..SECTOR_SIZE).step_by(8) {
            let mut torn = second;
            torn[..cut].copy_from_slice(&first[..cut]);
            // Magic, version and reserved bytes are the same in every stamp, so
            // a cut inside them leaves the second stamp whole: nothing was torn.
            if torn == second {
                assert!(cut <= 16, "cut {cut}");
                continue;
            }
            assert_eq!(decode_sector(&torn), SectorContent::Foreign, "cut at {cut}");
        }
    }
}

#[test]
fn header_of_one_write_on_filler_of_another_is_foreign() {
    // Same device and sector, consecutive writes: the likeliest real mix-up.
    let older = Stamp { run: 9, write: 5, device: 1, sector: 64 };
    let newer = Stamp { write: 6, ..older };
    let mut mixed = stamped(older);
    mixed[..HEADER_LEN].copy_from_slice(&stamped(newer)[..HEADER_LEN]);
    assert_eq!(decode_sector(&mixed), SectorContent::Foreign);
}

#[test]
fn stamp_shifted_within_the_sector_is_foreign() {
    let good = stamped(A);
    for shift in [1, 8, 64, 256, 511] {
        let mut left = good;
        left.rotate_left(shift);
        let mut right = good;
        right.rotate_right(shift);
        assert_eq!(decode_sector(&left), SectorContent::Foreign, "left {shift}");
        assert_eq!(decode_sector(&right), SectorContent::Foreign, "right {shift}");
    }
}

#[test]
fn misdirected_sector_names_where_it_was_meant_to_go() {
    // A sector landing at the wrong address decodes fine (it is intact), but
    // it names its own sector, so the reader sees the mismatch.
    let mut buf = vec![0u8; 2 * SECTOR_SIZE];
    fill(&mut buf, 1, 1, 0, 10);
    buf.copy_within(..SECTOR_SIZE, SECTOR_SIZE);
    let got = decode(&buf);
    assert_eq!(got[1], SectorContent::Stamp(Stamp { run: 1, write: 1, device: 0, sector: 10 }));
}

#[test]
fn other_version_is_foreign_even_with_a_valid_crc() {
    let mut buf = stamped(A);
    buf[8] = FORMAT_VERSION + 1;
    let crc = crc32c::crc32c_append(crc32c::crc32c(&buf[..44]), &buf[48..]);
    buf[44..48].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(decode_sector(&buf), SectorContent::Foreign);
}

#[test]
fn display_is_compact() {
    let s = Stamp { run: 0xbeef, write: 17, device: 3, sector: 4096 };
    assert_eq!(s.to_string(), "w17@dev3:s4096 (run 0xbeef)");
    assert_eq!(SectorContent::Stamp(s).to_string(), "w17@dev3:s4096 (run 0xbeef)");
    assert_eq!(SectorContent::Zeroes.to_string(), "zeroes");
    assert_eq!(SectorContent::Foreign.to_string(), "foreign");
}

proptest! {
    #[test]
    fn random_bytes_never_panic_and_never_stamp(bytes in prop::collection::vec(any::<u8>(), 0..3000)) {
        let got = decode(&bytes);
        prop_assert_eq!(got.len(), bytes.len().div_ceil(SECTOR_SIZE));
        prop_assert!(!got.iter().any(|c| matches!(c, SectorContent::Stamp(_))));
    }

    /// Random sectors behind a valid magic and version, so the crc and filler
    /// checks are what rejects them.
    #[test]
    fn random_sectors_with_valid_prefix_are_foreign(tail in prop::collection::vec(any::<u8>(), SECTOR_SIZE - 16)) {
        let mut buf = [0u8; SECTOR_SIZE];
        buf[..8].copy_from_slice(&MAGIC);
        buf[8] = FORMAT_VERSION;
        buf[16..].copy_from_slice(&tail);
        prop_assert_eq!(decode_sector(&buf), SectorContent::Foreign);
    }

    #[test]
    fn any_stamp_round_trips_and_any_flip_breaks_it(
        run in any::<u64>(), write in any::<u64>(), device in any::<u32>(), sector in any::<u64>(),
        bit in 0..SECTOR_SIZE * 8,
    ) {
        let s = Stamp { run, write, device, sector };
        let mut buf = stamped(s);
        prop_assert_eq!(decode_sector(&buf), SectorContent::Stamp(s));
        buf[bit / 8] ^= 1 << (bit % 8);
        prop_assert_eq!(decode_sector(&buf), SectorContent::Foreign);
    }
}
