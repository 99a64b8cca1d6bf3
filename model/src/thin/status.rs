//! The INFO and TABLE status lines of the thin-pool and thin targets (spec
//! §3.10), byte for byte as kernel 6.1 prints them (`pool_status`,
//! `thin_status`), and a parser of the pool INFO line for comparing a model
//! with a live kernel.
//!
//! Formats, as `dmsetup status` shows them after `<start> <len> <target> `:
//!
//! * pool INFO: `<transaction id> <used meta>/<total meta> <used data>/<total
//!   data> <held root|-> <rw|ro|out_of_data_space>
//!   <ignore_discard|discard_passdown|no_discard_passdown>
//!   <error_if_no_space|queue_if_no_space> <needs_check|-> <metadata low
//!   watermark> ` — every field followed by one space, so the line ends with a
//!   space. In FAIL mode the whole line is `Fail` (no space); when reading the
//!   metadata fails it is `Error`.
//! * thin INFO: `<mapped sectors> <highest mapped sector|->`, no trailing
//!   space; `Fail` when the pool is in FAIL mode.
//! * thin TABLE: `<pool> <dev id>[ <origin>]`; also `Fail` when the pool is in
//!   FAIL mode.
//! * pool TABLE: see [`crate::thin::table::PoolTable::table_status`].

use std::fmt;

use crate::thin::mode::PoolMode;
use crate::thin::table::{PoolFeatures, ThinTable};

/// What the pool and thin status lines are when the pool is in FAIL mode.
pub const STATUS_FAIL: &str = "Fail";

/// What the pool INFO line is when reading the metadata for it fails.
pub const STATUS_ERROR: &str = "Error";

/// Metadata block size in 512-byte sectors (4 KiB blocks).
pub const METADATA_BLOCK_SECTORS: u64 = 8;

/// The most metadata-device sectors the pool uses (`THIN_METADATA_MAX_SECTORS`
/// = 255 × (2^14 − 64) blocks × 8); the rest of a larger device is ignored.
pub const METADATA_MAX_SECTORS: u64 = 255 * ((1 << 14) - 64) * METADATA_BLOCK_SECTORS;

/// The discard word of the pool INFO line: the discard behaviour in effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DiscardWord {
    /// `ignore_discard`: discards disabled.
    IgnoreDiscard,
    /// `discard_passdown`: discards unmap and are passed to the data device.
    DiscardPassdown,
    /// `no_discard_passdown`: discards unmap only.
    NoDiscardPassdown,
}

impl DiscardWord {
    /// The word as printed.
    pub fn word(self) -> &'static str {
        match self {
            DiscardWord::IgnoreDiscard => "ignore_discard",
            DiscardWord::DiscardPassdown => "discard_passdown",
            DiscardWord::NoDiscardPassdown => "no_discard_passdown",
        }
    }

    /// The word in effect for the requested `features`: passdown is turned
    /// off (without changing the table) when the data device cannot take it
    /// (`passdown_supported == false`: no discard support, or a max discard
    /// size below one block).
    pub fn in_effect(features: &PoolFeatures, passdown_supported: bool) -> Self {
        if features.ignore_discard {
            DiscardWord::IgnoreDiscard
        } else if features.no_discard_passdown || !passdown_supported {
            DiscardWord::NoDiscardPassdown
        } else {
            DiscardWord::DiscardPassdown
        }
    }

    fn from_word(word: &str) -> Option<Self> {
        [DiscardWord::IgnoreDiscard, DiscardWord::DiscardPassdown, DiscardWord::NoDiscardPassdown]
            .into_iter()
            .find(|d| d.word() == word)
    }
}

/// The values of a pool INFO line.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolInfo {
    /// The metadata transaction id.
    pub transaction_id: u64,
    /// Used metadata blocks, the reserve counted as used (see
    /// [`used_metadata_blocks`]).
    pub used_metadata_blocks: u64,
    /// Metadata blocks in the metadata space map.
    pub total_metadata_blocks: u64,
    /// Used data blocks (total − free).
    pub used_data_blocks: u64,
    /// Data blocks in the data space map.
    pub total_data_blocks: u64,
    /// The held metadata snapshot root, if any. The kernel prints `-` when the
    /// root is 0, so `Some(0)` prints as `-` too (a real root is never 0: that
    /// is the superblock).
    pub held_root: Option<u64>,
    /// The pool mode. FAIL makes the whole line `Fail`; OUT_OF_METADATA_SPACE
    /// and READ_ONLY both print `ro`.
    pub mode: PoolMode,
    /// The discard behaviour in effect.
    pub discard: DiscardWord,
    /// The pool's current error_if_no_space, which the no-space timeout can
    /// switch on at run time without a table change.
    pub error_if_no_space: bool,
    /// The superblock's NEEDS_CHECK flag.
    pub needs_check: bool,
    /// See [`metadata_low_watermark`].
    pub metadata_low_watermark: u64,
}

/// The pool INFO status line exactly as the kernel prints it, trailing space
/// included; `Fail` in FAIL mode.
pub fn pool_info_line(info: &PoolInfo) -> String {
    if info.mode == PoolMode::Fail {
        return STATUS_FAIL.to_string();
    }
    let held = match info.held_root {
        Some(root) if root != 0 => root.to_string(),
        _ => "-".to_string(),
    };
    format!(
        "{} {}/{} {}/{} {} {} {} {} {} {} ",
        info.transaction_id,
        info.used_metadata_blocks,
        info.total_metadata_blocks,
        info.used_data_blocks,
        info.total_data_blocks,
        held,
        info.mode.status_word(),
        info.discard.word(),
        if info.error_if_no_space { "error_if_no_space" } else { "queue_if_no_space" },
        if info.needs_check { "needs_check" } else { "-" },
        info.metadata_low_watermark,
    )
}

/// Number of 4 KiB metadata blocks the pool uses of a metadata device of
/// `dev_sectors` sectors: `min(dev, METADATA_MAX_SECTORS) / 8`.
pub fn metadata_dev_blocks(dev_sectors: u64) -> u64 {
    dev_sectors.min(METADATA_MAX_SECTORS) / METADATA_BLOCK_SECTORS
}

/// The metadata low watermark (`calc_metadata_threshold`): `min(1024,
/// blocks / 4)`. Kernel detail: `blocks` is the metadata *device* size in
/// blocks ([`metadata_dev_blocks`]), read afresh at each status, not the space
/// map's size; the two differ while a grown metadata device waits for the
/// resize at the next resume.
pub fn metadata_low_watermark(total_metadata_blocks: u64) -> u64 {
    (total_metadata_blocks / 4).min(1024)
}

/// The metadata reserve (`__set_metadata_reserve`): `min(4096, total / 10)`
/// blocks, set when the metadata is opened and on metadata resize.
pub fn metadata_reserve(total_metadata_blocks: u64) -> u64 {
    (total_metadata_blocks / 10).min(4096)
}

/// Used metadata blocks as printed: `total − max(nr_free − reserve, 0)`
/// (`dm_pool_get_free_metadata_block_count` hides the reserve), so the
/// reserve counts as used. Wraps like the kernel's unsigned arithmetic if
/// `nr_free − reserve` exceeds `total` (never the case for real metadata).
pub fn used_metadata_blocks(total: u64, nr_free: u64, reserve: u64) -> u64 {
    total.wrapping_sub(nr_free.saturating_sub(reserve))
}

/// The thin INFO status line: `<mapped blocks × block size> <(highest + 1) ×
/// block size − 1>` or `... -` when nothing is mapped; `Fail` when the pool is
/// in FAIL mode. No trailing space. (Unsigned 64-bit arithmetic, wrapping like
/// the kernel's.)
pub fn thin_info_line(
    mapped_blocks: u64,
    highest_mapped_block: Option<u64>,
    data_block_size: u32,
    pool_failed: bool,
) -> String {
    if pool_failed {
        return STATUS_FAIL.to_string();
    }
    let bs = u64::from(data_block_size);
    let highest = match highest_mapped_block {
        Some(h) => h.wrapping_add(1).wrapping_mul(bs).wrapping_sub(1).to_string(),
        None => "-".to_string(),
    };
    format!("{} {}", mapped_blocks.wrapping_mul(bs), highest)
}

/// The thin TABLE status line: [`ThinTable::table_status`], or `Fail` when the
/// pool is in FAIL mode (the kernel checks FAIL before the status type, so
/// `dmsetup table` of such a thin device shows `Fail`).
pub fn thin_table_status(
    table: &ThinTable,
    pool_devnum: &str,
    origin_devnum: Option<&str>,
    pool_failed: bool,
) -> String {
    if pool_failed {
        STATUS_FAIL.to_string()
    } else {
        table.table_status(pool_devnum, origin_devnum)
    }
}

/// A pool INFO status as read back from the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PoolStatus {
    /// The line was `Fail`.
    Fail,
    /// The line was `Error`.
    Error,
    /// A full line.
    Info(PoolInfo),
}

impl fmt::Display for PoolStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolStatus::Fail => f.write_str(STATUS_FAIL),
            PoolStatus::Error => f.write_str(STATUS_ERROR),
            PoolStatus::Info(info) => f.write_str(&pool_info_line(info)),
        }
    }
}

fn number(field: &str, what: &str) -> Result<u64, String> {
    if field.is_empty() || !field.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("bad {what}: {field:?}"));
    }
    field.parse().map_err(|_| format!("bad {what}: {field:?}"))
}

fn fraction(field: &str, what: &str) -> Result<(u64, u64), String> {
    let (used, total) = field.split_once('/').ok_or_else(|| format!("bad {what}: {field:?}"))?;
    Ok((number(used, what)?, number(total, what)?))
}

/// Parses a pool INFO status (`Fail`, `Error` or a full line; surrounding
/// white space and the trailing space are ignored). `ro` is read as
/// [`PoolMode::ReadOnly`] (the line does not tell it from
/// OUT_OF_METADATA_SPACE); `-` as held root is `None`.
pub fn parse_pool_status(line: &str) -> Result<PoolStatus, String> {
    let fields: Vec<&str> = line.split_ascii_whitespace().collect();
    match fields.as_slice() {
        [STATUS_FAIL] => return Ok(PoolStatus::Fail),
        [STATUS_ERROR] => return Ok(PoolStatus::Error),
        _ => {}
    }
    let [trans, meta, data, held, mode, discard, no_space, needs_check, lwm] = fields.as_slice() else {
        return Err(format!("expected 9 fields in a pool status line, got {}: {line:?}", fields.len()));
    };
    let transaction_id = number(trans, "transaction id")?;
    let (used_metadata_blocks, total_metadata_blocks) = fraction(meta, "metadata usage")?;
    let (used_data_blocks, total_data_blocks) = fraction(data, "data usage")?;
    let held_root = match *held {
        "-" => None,
        root => Some(number(root, "held root")?),
    };
    let mode = match *mode {
        "rw" => PoolMode::Write,
        "out_of_data_space" => PoolMode::OutOfDataSpace,
        "ro" => PoolMode::ReadOnly,
        other => return Err(format!("bad mode: {other:?}")),
    };
    let discard = DiscardWord::from_word(discard).ok_or_else(|| format!("bad discard word: {discard:?}"))?;
    let error_if_no_space = match *no_space {
        "error_if_no_space" => true,
        "queue_if_no_space" => false,
        other => return Err(format!("bad no-space word: {other:?}")),
    };
    let needs_check = match *needs_check {
        "needs_check" => true,
        "-" => false,
        other => return Err(format!("bad needs_check word: {other:?}")),
    };
    let metadata_low_watermark = number(lwm, "metadata low watermark")?;
    Ok(PoolStatus::Info(PoolInfo {
        transaction_id,
        used_metadata_blocks,
        total_metadata_blocks,
        used_data_blocks,
        total_data_blocks,
        held_root,
        mode,
        discard,
        error_if_no_space,
        needs_check,
        metadata_low_watermark,
    }))
}

/// Parses a full pool INFO line into its values; `Fail` and `Error` are
/// errors here (use [`parse_pool_status`] to accept them).
pub fn parse_pool_info_line(line: &str) -> Result<PoolInfo, String> {
    match parse_pool_status(line)? {
        PoolStatus::Info(info) => Ok(info),
        other => Err(format!("pool status is {other}, not a full line")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> PoolInfo {
        PoolInfo {
            transaction_id: 3,
            used_metadata_blocks: 280,
            total_metadata_blocks: 1024,
            used_data_blocks: 10,
            total_data_blocks: 160,
            held_root: None,
            mode: PoolMode::Write,
            discard: DiscardWord::DiscardPassdown,
            error_if_no_space: false,
            needs_check: false,
            metadata_low_watermark: 256,
        }
    }

    #[test]
    fn pool_info_exact_strings() {
        let info = sample();
        assert_eq!(pool_info_line(&info), "3 280/1024 10/160 - rw discard_passdown queue_if_no_space - 256 ");
        let info = PoolInfo {
            held_root: Some(17),
            mode: PoolMode::OutOfDataSpace,
            discard: DiscardWord::IgnoreDiscard,
            error_if_no_space: true,
            needs_check: true,
            ..sample()
        };
        assert_eq!(
            pool_info_line(&info),
            "3 280/1024 10/160 17 out_of_data_space ignore_discard error_if_no_space needs_check 256 "
        );
        for mode in [PoolMode::ReadOnly, PoolMode::OutOfMetadataSpace] {
            let info = PoolInfo { mode, discard: DiscardWord::NoDiscardPassdown, ..sample() };
            assert_eq!(
                pool_info_line(&info),
                "3 280/1024 10/160 - ro no_discard_passdown queue_if_no_space - 256 "
            );
        }
        assert_eq!(pool_info_line(&PoolInfo { mode: PoolMode::Fail, ..sample() }), "Fail");
        assert_eq!(pool_info_line(&PoolInfo { held_root: Some(0), ..sample() }), pool_info_line(&sample()));
    }

    #[test]
    fn metadata_arithmetic() {
        assert_eq!(metadata_low_watermark(0), 0);
        assert_eq!(metadata_low_watermark(1023), 255);
        assert_eq!(metadata_low_watermark(4096), 1024);
        assert_eq!(metadata_low_watermark(1 << 30), 1024);
        assert_eq!(metadata_reserve(1000), 100);
        assert_eq!(metadata_reserve(1 << 20), 4096);
        assert_eq!(metadata_dev_blocks(8192), 1024);
        assert_eq!(metadata_dev_blocks(8199), 1024);
        assert_eq!(METADATA_MAX_SECTORS, 33_292_800);
        assert_eq!(metadata_dev_blocks(u64::MAX), 4_161_600);
        // nr_free above the reserve: used = total - (free - reserve).
        assert_eq!(used_metadata_blocks(1024, 900, 102), 1024 - 798);
        // nr_free at or below the reserve: everything counts as used.
        assert_eq!(used_metadata_blocks(1024, 102, 102), 1024);
        assert_eq!(used_metadata_blocks(1024, 50, 102), 1024);
    }

    #[test]
    fn thin_lines() {
        assert_eq!(thin_info_line(0, None, 128, false), "0 -");
        assert_eq!(thin_info_line(3, Some(9), 128, false), "384 1279");
        assert_eq!(thin_info_line(1, Some(0), 2097152, false), "2097152 2097151");
        assert_eq!(thin_info_line(3, Some(9), 128, true), "Fail");
        let table = ThinTable { pool_dev: "p".into(), dev_id: 4, external_origin: Some("o".into()) };
        assert_eq!(thin_table_status(&table, "253:0", Some("8:16"), false), "253:0 4 8:16");
        assert_eq!(thin_table_status(&table, "253:0", Some("8:16"), true), "Fail");
    }

    #[test]
    fn discard_in_effect() {
        let mut f = PoolFeatures::default();
        assert_eq!(DiscardWord::in_effect(&f, true), DiscardWord::DiscardPassdown);
        assert_eq!(DiscardWord::in_effect(&f, false), DiscardWord::NoDiscardPassdown);
        f.no_discard_passdown = true;
        assert_eq!(DiscardWord::in_effect(&f, true), DiscardWord::NoDiscardPassdown);
        f.ignore_discard = true;
        assert_eq!(DiscardWord::in_effect(&f, true), DiscardWord::IgnoreDiscard);
    }

    #[test]
    fn parse_pool_lines() {
        assert_eq!(parse_pool_status("Fail"), Ok(PoolStatus::Fail));
        assert_eq!(parse_pool_status("Error"), Ok(PoolStatus::Error));
        assert!(parse_pool_info_line("Fail").is_err());
        let line = pool_info_line(&sample());
        assert_eq!(parse_pool_info_line(&line), Ok(sample()));
        assert_eq!(parse_pool_info_line(line.trim_end()), Ok(sample()));
        let ro = PoolInfo { mode: PoolMode::OutOfMetadataSpace, ..sample() };
        assert_eq!(parse_pool_info_line(&pool_info_line(&ro)).unwrap().mode, PoolMode::ReadOnly);
        for bad in [
            "",
            "x 1/2 3/4 - rw discard_passdown queue_if_no_space - 1",
            "1 1-2 3/4 - rw discard_passdown queue_if_no_space - 1",
            "1 1/2 3/4 x rw discard_passdown queue_if_no_space - 1",
            "1 1/2 3/4 - RW discard_passdown queue_if_no_space - 1",
            "1 1/2 3/4 - rw discard queue_if_no_space - 1",
            "1 1/2 3/4 - rw discard_passdown queue - 1",
            "1 1/2 3/4 - rw discard_passdown queue_if_no_space x 1",
            "1 1/2 3/4 - rw discard_passdown queue_if_no_space - +1",
            "1 1/2 3/4 - rw discard_passdown queue_if_no_space -",
            "1 1/2 3/4 - rw discard_passdown queue_if_no_space - 1 2",
            "1 1/2/3 3/4 - rw discard_passdown queue_if_no_space - 1",
        ] {
            assert!(parse_pool_status(bad).is_err(), "{bad}");
        }
    }

    fn info_strategy() -> impl Strategy<Value = PoolInfo> {
        (
            any::<[u64; 6]>(),
            proptest::option::of(1u64..),
            prop_oneof![Just(PoolMode::Write), Just(PoolMode::OutOfDataSpace), Just(PoolMode::ReadOnly)],
            prop_oneof![
                Just(DiscardWord::IgnoreDiscard),
                Just(DiscardWord::DiscardPassdown),
                Just(DiscardWord::NoDiscardPassdown)
            ],
            any::<(bool, bool)>(),
        )
            .prop_map(|(n, held_root, mode, discard, (error_if_no_space, needs_check))| PoolInfo {
                transaction_id: n[0],
                used_metadata_blocks: n[1],
                total_metadata_blocks: n[2],
                used_data_blocks: n[3],
                total_data_blocks: n[4],
                held_root,
                mode,
                discard,
                error_if_no_space,
                needs_check,
                metadata_low_watermark: n[5],
            })
    }

    proptest! {
        #[test]
        fn parse_never_panics(line in "\\PC*") {
            let _ = parse_pool_status(&line);
        }

        #[test]
        fn info_round_trips(info in info_strategy()) {
            let line = pool_info_line(&info);
            prop_assert!(line.ends_with(' '));
            prop_assert_eq!(parse_pool_info_line(&line), Ok(info.clone()));
            prop_assert_eq!(PoolStatus::Info(info).to_string(), line);
        }
    }
}
