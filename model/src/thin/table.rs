//! Device-mapper table lines for the `thin-pool` and `thin` targets (spec §3.2).
//!
//! The parsers reproduce the validation kernel 6.1 performs when a table is
//! loaded, in the kernel's order, with its `ti->error` texts and errno values.
//! Device names are opaque strings here: nothing is looked up, so the errors
//! the kernel can only raise after opening a device (pool already in use,
//! unreadable metadata, ...) are not produced by [`PoolTable::parse_args`] or
//! [`ThinTable::parse_args`]; the few the model needs are available as
//! [`TableError`] constructors.
//!
//! # How the kernel sees the arguments
//!
//! The parameter string of a target is split by DM core (`dm_split_args`):
//!
//! * tokens are separated by runs of the kernel's `isspace` characters, which
//!   are space, `\t`, `\n`, `\v`, `\f`, `\r` **and the byte 0xA0** (Latin-1
//!   no-break space). Because the split works on bytes, a UTF-8 character whose
//!   encoding contains 0xA0 (for example `à`, `Ġ`, `ࠠ`) is cut in two; this
//!   module splits byte-wise exactly like that (see [`split_args`]);
//! * a backslash quotes the following byte (so `a\ b` is the one token `a b`
//!   and `\\` is a backslash); a backslash at the very end stays literal;
//! * the string ends at the first NUL byte (it is a C string in the ioctl).
//!
//! Numbers are read with `kstrtoul`/`kstrtoull` in base 10 (see [`kstrtoull`]):
//! an optional leading `+`, decimal digits only, at most one trailing newline,
//! no leading spaces, no `0x`, no overflow. The feature count is read with
//! `sscanf("%u%c")` instead, which has its own quirks (see
//! [`PoolTable::parse_args`]).

use std::fmt;

use thiserror::Error;

use crate::errno::Errno;
use crate::thin::message::MAX_DEV_ID;
use crate::thin::metadata::ThinId;

/// Smallest data block size, in 512-byte sectors (64 KiB).
pub const DATA_BLOCK_SIZE_MIN_SECTORS: u32 = 128;

/// Largest data block size, in 512-byte sectors (1 GiB).
pub const DATA_BLOCK_SIZE_MAX_SECTORS: u32 = 2 * 1024 * 1024;

/// Most feature arguments a thin-pool table may carry.
pub const MAX_POOL_FEATURE_ARGS: u32 = 4;

/// The largest `start + len` DM core accepts for a target, in sectors
/// (`LLONG_MAX >> SECTOR_SHIFT`).
pub const MAX_TABLE_END_SECTOR: u64 = (i64::MAX as u64) >> 9;

/// Name of the thin-pool target type (matched case-sensitively by DM core).
pub const POOL_TARGET: &str = "thin-pool";

/// Name of the thin target type (matched case-sensitively by DM core).
pub const THIN_TARGET: &str = "thin";

/// Why a table line was refused: the errno the table load returns and the
/// kernel's message (`ti->error`, or the DMERR text for the checks DM core
/// makes before the target sees the line).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{message} ({errno})")]
pub struct TableError {
    /// What the table-load ioctl returns (negated in the kernel).
    pub errno: Errno,
    /// The kernel's error text, e.g. `Invalid block size`.
    pub message: String,
}

impl TableError {
    pub(crate) fn new(errno: Errno, message: impl Into<String>) -> Self {
        TableError { errno, message: message.into() }
    }

    pub(crate) fn einval(message: impl Into<String>) -> Self {
        TableError::new(Errno::EINVAL, message)
    }

    /// A thin table load while the pool is in FAIL mode.
    pub fn pool_in_fail_mode() -> Self {
        TableError::einval("Couldn't open thin device, Pool is in fail mode")
    }

    /// A thin table load naming a device id the pool metadata does not hold
    /// (the metadata lookup's `-ENODATA` is returned as is).
    pub fn no_such_thin_device() -> Self {
        TableError::new(Errno::ENODATA, "Couldn't open thin internal device")
    }

    /// A thin table load while the pool is suspended.
    pub fn pool_suspended() -> Self {
        TableError::einval("Unable to activate thin device while pool is suspended")
    }

    /// A pool table reload whose `ignore_discard` differs from the first load.
    /// The kernel uses this text in both directions, also when the reload
    /// would *enable* discards that the first load disabled.
    pub fn discard_setting_changed() -> Self {
        TableError::einval("Discard support cannot be disabled once enabled")
    }

    /// A pool table whose metadata device already belongs to another pool
    /// device.
    pub fn metadata_dev_in_use() -> Self {
        TableError::new(Errno::EBUSY, "metadata device already in use by a pool")
    }

    /// A pool table whose metadata device belongs to this pool but whose data
    /// device differs from the pool's.
    pub fn data_dev_in_use() -> Self {
        TableError::new(Errno::EBUSY, "data device already in use by a pool")
    }

    /// A pool table reload naming a different metadata device than the pool
    /// device already uses.
    pub fn different_pool() -> Self {
        TableError::einval("different pool cannot replace a pool")
    }
}

/// The optional thin-pool features. `Default` is the kernel's default: zeroing
/// on, discards on, passdown on, read-write, queue when out of data space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PoolFeatures {
    /// `skip_block_zeroing`: newly provisioned blocks are not zeroed.
    pub skip_block_zeroing: bool,
    /// `ignore_discard`: discards are not supported at all.
    pub ignore_discard: bool,
    /// `no_discard_passdown`: discards unmap blocks but are not passed to the
    /// data device.
    pub no_discard_passdown: bool,
    /// `read_only`: the pool starts in READ_ONLY mode and opens its metadata
    /// device read-only.
    pub read_only: bool,
    /// `error_if_no_space`: out of data space errors bios instead of queueing.
    pub error_if_no_space: bool,
}

impl PoolFeatures {
    /// The feature words that are set, in the kernel's fixed output order
    /// (skip_block_zeroing, ignore_discard, no_discard_passdown, read_only,
    /// error_if_no_space).
    pub fn words(&self) -> Vec<&'static str> {
        let all = [
            (self.skip_block_zeroing, "skip_block_zeroing"),
            (self.ignore_discard, "ignore_discard"),
            (self.no_discard_passdown, "no_discard_passdown"),
            (self.read_only, "read_only"),
            (self.error_if_no_space, "error_if_no_space"),
        ];
        all.into_iter().filter(|(set, _)| *set).map(|(_, word)| word).collect()
    }

    /// Sets the feature named `word` (ASCII case-insensitive, like the
    /// kernel's `strcasecmp`); `false` when the word names no feature.
    fn set_by_name(&mut self, word: &[u8]) -> bool {
        let flag = if word.eq_ignore_ascii_case(b"skip_block_zeroing") {
            &mut self.skip_block_zeroing
        } else if word.eq_ignore_ascii_case(b"ignore_discard") {
            &mut self.ignore_discard
        } else if word.eq_ignore_ascii_case(b"no_discard_passdown") {
            &mut self.no_discard_passdown
        } else if word.eq_ignore_ascii_case(b"read_only") {
            &mut self.read_only
        } else if word.eq_ignore_ascii_case(b"error_if_no_space") {
            &mut self.error_if_no_space
        } else {
            return false;
        };
        *flag = true;
        true
    }
}

/// The arguments of a `thin-pool` table line.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolTable {
    /// The metadata device, as written in the table.
    pub metadata_dev: String,
    /// The data device, as written in the table.
    pub data_dev: String,
    /// Data block size in 512-byte sectors.
    pub data_block_size: u32,
    /// Low water mark, in data blocks.
    pub low_water_mark: u64,
    /// The features requested in the table.
    pub features: PoolFeatures,
}

/// The arguments of a `thin` table line.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ThinTable {
    /// The pool's DM device, as written in the table.
    pub pool_dev: String,
    /// The thin device id inside the pool (at most [`MAX_DEV_ID`]).
    pub dev_id: ThinId,
    /// The external origin device, if any.
    pub external_origin: Option<String>,
}

/// The target-specific part of a table line.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TargetArgs {
    /// A `thin-pool` target.
    Pool(PoolTable),
    /// A `thin` target.
    Thin(ThinTable),
}

/// One table line: `<start> <len> <target type> <arguments...>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableLine {
    /// First sector of the target in the mapped device.
    pub start: u64,
    /// Length of the target in sectors.
    pub len: u64,
    /// The target type and its arguments.
    pub target: TargetArgs,
}

/// The kernel's `isspace` (lib/ctype.c): the six ASCII white-space characters
/// and the Latin-1 no-break space 0xA0.
pub fn is_kernel_space(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | 0xa0)
}

/// Splits a parameter or message string into arguments the way DM core's
/// `dm_split_args` does (see the module documentation): kernel white space
/// separates, a backslash quotes the next byte, the input ends at the first
/// NUL. The arguments are bytes because the split may cut a UTF-8 character.
pub fn split_args(input: &str) -> Vec<Vec<u8>> {
    let bytes = input.as_bytes();
    let bytes = match bytes.iter().position(|&b| b == 0) {
        Some(nul) => &bytes[..nul],
        None => bytes,
    };
    let mut args = Vec::new();
    let mut i = 0;
    loop {
        while i < bytes.len() && is_kernel_space(bytes[i]) {
            i += 1;
        }
        if i == bytes.len() {
            return args;
        }
        let mut arg = Vec::new();
        while i < bytes.len() {
            let b = bytes[i];
            if b == b'\\' && i + 1 < bytes.len() {
                arg.push(bytes[i + 1]);
                i += 2;
                continue;
            }
            if is_kernel_space(b) {
                i += 1;
                break;
            }
            arg.push(b);
            i += 1;
        }
        args.push(arg);
    }
}

/// Quotes an argument so that [`split_args`] reads it back as one argument:
/// a backslash goes before every backslash and every kernel white-space byte.
/// An argument containing NUL, or a character whose UTF-8 encoding contains
/// the byte 0xA0, cannot be written in a table line at all (the kernel cuts
/// there); such characters are emitted unchanged.
pub fn quote_arg(arg: &str) -> String {
    let mut out = String::with_capacity(arg.len());
    for c in arg.chars() {
        if c == '\\' || (c.is_ascii() && is_kernel_space(c as u8)) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The kernel's `kstrtoull(s, 10, ...)`: an optional `+`, one or more decimal
/// digits, optionally a single trailing `\n`, nothing else; overflow of `u64`
/// fails. `None` for every failure (the kernel's -EINVAL and -ERANGE alike,
/// which all callers here treat the same).
pub fn kstrtoull(arg: &[u8]) -> Option<u64> {
    let digits = arg.strip_prefix(b"+").unwrap_or(arg);
    let digits = digits.strip_suffix(b"\n").unwrap_or(digits);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &d| acc.checked_mul(10)?.checked_add(u64::from(d - b'0')))
}

/// DM core's `sscanf(arg, "%u%c", ...) == 1` check for a count argument:
/// leading kernel white space is skipped, then the rest must be decimal
/// digits only (no sign, no trailing newline). Overflow is not detected: the
/// value wraps modulo 2^64 and is then truncated to 32 bits, so
/// `"4294967297"` reads as 1.
pub(crate) fn sscanf_count(arg: &[u8]) -> Option<u32> {
    let start = arg.iter().position(|&b| !is_kernel_space(b))?;
    let digits = &arg[start..];
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let wide = digits.iter().fold(0u64, |acc, &d| acc.wrapping_mul(10).wrapping_add(u64::from(d - b'0')));
    Some(wide as u32)
}

/// Reads a device name argument. The model does not open devices; a name that
/// is not valid UTF-8 (only possible when the split cut a character) cannot
/// name any device the model knows, so it fails where the kernel's device
/// lookup would, with the kernel's message. The kernel's errno there comes
/// from the lookup (typically ENODEV or ENOENT, not in [`Errno`]); EINVAL is
/// used instead.
pub(crate) fn device_name(arg: &[u8], error: &str) -> Result<String, TableError> {
    String::from_utf8(arg.to_vec()).map_err(|_| TableError::einval(error))
}

impl PoolTable {
    /// Parses the thin-pool arguments (already split) with the kernel's checks
    /// in the kernel's order (`pool_ctr`):
    ///
    /// 1. fewer than 4 arguments: `Invalid argument count`;
    /// 2. metadata and data device byte-identical: `Error setting metadata or
    ///    data device`;
    /// 3. features, only if a fifth argument exists: the count must satisfy
    ///    `sscanf("%u%c")` (leading white space allowed, then digits only: no
    ///    `+`, no newline; overflow wraps and is truncated to 32 bits, so
    ///    `4294967297` counts as 1), be at most 4 and at most the number of
    ///    arguments left, else `Invalid number of pool feature
    ///    arguments`; each of the next `count` words must name a feature
    ///    (case-insensitive, repeats allowed), else `Unrecognised pool feature
    ///    requested`. Arguments after the counted features are **ignored**;
    /// 4. (the devices are opened here);
    /// 5. block size: `kstrtoul`, non-zero, 128 ..= 2,097,152 and a multiple
    ///    of 128, else `Invalid block size`;
    /// 6. low water mark: `kstrtoull`, else `Invalid low water mark`.
    ///
    /// All of these are EINVAL.
    pub fn parse_args(args: &[&str]) -> Result<Self, TableError> {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        Self::parse_arg_bytes(&args)
    }

    fn parse_arg_bytes(args: &[&[u8]]) -> Result<Self, TableError> {
        if args.len() < 4 {
            return Err(TableError::einval("Invalid argument count"));
        }
        if args[0] == args[1] {
            return Err(TableError::einval("Error setting metadata or data device"));
        }
        let features = parse_pool_features(&args[4..])?;
        let metadata_dev = device_name(args[0], "Error opening metadata block device")?;
        let data_dev = device_name(args[1], "Error getting data device")?;
        let data_block_size = kstrtoull(args[2])
            .filter(|&bs| {
                (u64::from(DATA_BLOCK_SIZE_MIN_SECTORS)..=u64::from(DATA_BLOCK_SIZE_MAX_SECTORS))
                    .contains(&bs)
                    && bs % u64::from(DATA_BLOCK_SIZE_MIN_SECTORS) == 0
            })
            .ok_or_else(|| TableError::einval("Invalid block size"))? as u32;
        let low_water_mark =
            kstrtoull(args[3]).ok_or_else(|| TableError::einval("Invalid low water mark"))?;
        Ok(PoolTable { metadata_dev, data_dev, data_block_size, low_water_mark, features })
    }

    /// The TABLE status the kernel prints for this pool (what `dmsetup table`
    /// shows after the target name), given the devices as `major:minor`:
    /// `<meta> <data> <block size> <low water mark> <#features> <features...>`
    /// with **a space after every field, including the last** (so `... 0 ` with
    /// no features). The features are the requested ones in the fixed order.
    ///
    /// Kernel detail: the block size printed is the pool object's, which a
    /// reload does not change (a reload naming another block size is accepted
    /// and the new size ignored); this prints the table's own.
    pub fn table_status(&self, metadata_devnum: &str, data_devnum: &str) -> String {
        let words = self.features.words();
        let mut out = format!(
            "{} {} {} {} {} ",
            metadata_devnum,
            data_devnum,
            self.data_block_size,
            self.low_water_mark,
            words.len()
        );
        for word in words {
            out.push_str(word);
            out.push(' ');
        }
        out
    }

    /// Number of data blocks a pool target of `len_sectors` sectors has:
    /// `floor(len / block size)` (the data device may be larger). 0 when the
    /// block size is 0 (never the case for a parsed table).
    pub fn data_blocks(&self, len_sectors: u64) -> u64 {
        len_sectors.checked_div(u64::from(self.data_block_size)).unwrap_or(0)
    }
}

/// The feature part of a thin-pool line (`parse_pool_features`).
fn parse_pool_features(args: &[&[u8]]) -> Result<PoolFeatures, TableError> {
    let mut features = PoolFeatures::default();
    let Some((count_arg, rest)) = args.split_first() else {
        return Ok(features);
    };
    let count = sscanf_count(count_arg)
        .filter(|&n| n <= MAX_POOL_FEATURE_ARGS && n as usize <= rest.len())
        .ok_or_else(|| TableError::einval("Invalid number of pool feature arguments"))?;
    for word in &rest[..count as usize] {
        if !features.set_by_name(word) {
            return Err(TableError::einval("Unrecognised pool feature requested"));
        }
    }
    Ok(features)
}

impl ThinTable {
    /// Parses the thin arguments (already split) with the kernel's checks in
    /// the kernel's order (`thin_ctr`):
    ///
    /// 1. not 2 or 3 arguments: `Invalid argument count`;
    /// 2. with 3, origin byte-identical to the pool device: `Error setting
    ///    origin device`;
    /// 3. (origin and pool devices are opened here);
    /// 4. device id: `kstrtoull` and at most 2^24 − 1, else `Invalid device
    ///    id` (the thin table path does not log the message-path warning).
    ///
    /// All of these are EINVAL. The checks against the live pool (FAIL mode,
    /// unknown id, suspended pool) are the [`TableError`] constructors.
    pub fn parse_args(args: &[&str]) -> Result<Self, TableError> {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        Self::parse_arg_bytes(&args)
    }

    fn parse_arg_bytes(args: &[&[u8]]) -> Result<Self, TableError> {
        if args.len() != 2 && args.len() != 3 {
            return Err(TableError::einval("Invalid argument count"));
        }
        let external_origin = match args.get(2) {
            Some(origin) => {
                if *origin == args[0] {
                    return Err(TableError::einval("Error setting origin device"));
                }
                Some(device_name(origin, "Error opening origin device")?)
            }
            None => None,
        };
        let pool_dev = device_name(args[0], "Error opening pool device")?;
        let dev_id = kstrtoull(args[1])
            .filter(|&id| id <= MAX_DEV_ID)
            .ok_or_else(|| TableError::einval("Invalid device id"))?;
        Ok(ThinTable { pool_dev, dev_id, external_origin })
    }

    /// The TABLE status the kernel prints for this thin device, given the
    /// devices as `major:minor`: `<pool> <dev id>[ <origin>]`, no trailing
    /// space. The origin is printed when the table has one; `origin_devnum`
    /// gives its number and, when `None`, the name in the table is used.
    ///
    /// Kernel detail: when the pool is in FAIL mode the thin target prints
    /// `Fail` for the TABLE status too (see `status::thin_table_status`).
    pub fn table_status(&self, pool_devnum: &str, origin_devnum: Option<&str>) -> String {
        let mut out = format!("{} {}", pool_devnum, self.dev_id);
        if let Some(origin) = &self.external_origin {
            out.push(' ');
            out.push_str(origin_devnum.unwrap_or(origin));
        }
        out
    }
}

/// The C locale's `isspace`, which userland (dmsetup/libdevmapper) uses to
/// find the start, length and target type of a table line.
fn is_c_space(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// Splits off the next userland-white-space-separated word of `s`.
fn next_word(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start_matches(|c: char| c.is_ascii() && is_c_space(c as u8));
    if s.is_empty() {
        return None;
    }
    let end = s.find(|c: char| c.is_ascii() && is_c_space(c as u8)).unwrap_or(s.len());
    Some((&s[..end], &s[end..]))
}

/// A strict unsigned decimal (userland's start and length fields).
fn parse_sectors(word: &str) -> Option<u64> {
    if word.is_empty() || !word.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    word.parse().ok()
}

impl TableLine {
    /// Parses `<start> <len> thin-pool <args...>` or `<start> <len> thin
    /// <args...>`.
    ///
    /// The first three fields are split by userland (dmsetup), which the
    /// model takes as C-locale white space and plain decimal numbers (errors:
    /// `Invalid format: ...`, EINVAL; glibc's `sscanf` is laxer). The rest is
    /// the parameter string, split by [`split_args`]. Then DM core's checks,
    /// all EINVAL: zero length (`zero-length target`), `start + len` past
    /// [`MAX_TABLE_END_SECTOR`] (`too large device`), a type other than
    /// `thin-pool`/`thin`, case-sensitive (`<type>: unknown target type`; the
    /// model knows no other targets), and a thin-pool line not starting at 0
    /// (`Gap in table`: thin-pool must be the only target, so it is the first).
    /// A thin line may start anywhere, as one line of a longer table. Finally
    /// the target's own checks ([`PoolTable::parse_args`],
    /// [`ThinTable::parse_args`]).
    pub fn parse(line: &str) -> Result<Self, TableError> {
        let (start, rest) =
            next_word(line).ok_or_else(|| TableError::einval("Invalid format: empty line"))?;
        let start =
            parse_sectors(start).ok_or_else(|| TableError::einval("Invalid format: bad start sector"))?;
        let (len, rest) =
            next_word(rest).ok_or_else(|| TableError::einval("Invalid format: missing length"))?;
        let len = parse_sectors(len).ok_or_else(|| TableError::einval("Invalid format: bad length"))?;
        let (kind, params) =
            next_word(rest).ok_or_else(|| TableError::einval("Invalid format: missing target type"))?;

        if len == 0 {
            return Err(TableError::einval("zero-length target"));
        }
        if start.checked_add(len).is_none_or(|end| end > MAX_TABLE_END_SECTOR) {
            return Err(TableError::einval("too large device"));
        }
        if kind != POOL_TARGET && kind != THIN_TARGET {
            return Err(TableError::einval(format!("{kind}: unknown target type")));
        }
        if kind == POOL_TARGET && start != 0 {
            return Err(TableError::einval("Gap in table"));
        }

        let args = split_args(params);
        let args: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        let target = if kind == POOL_TARGET {
            TargetArgs::Pool(PoolTable::parse_arg_bytes(&args)?)
        } else {
            TargetArgs::Thin(ThinTable::parse_arg_bytes(&args)?)
        };
        Ok(TableLine { start, len, target })
    }
}

/// The canonical line: single spaces, device names quoted with
/// [`quote_arg`], the pool's feature count always written (as `dmsetup table`
/// shows it) and the features in the kernel's order, no trailing space.
///
/// Every line [`TableLine::parse`] accepts re-emits to one that parses back to
/// the same value. A hand-built value may not: one with all five pool
/// features (the count is limited to 4), equal pool devices, an id above
/// [`MAX_DEV_ID`], an empty device name, or one containing NUL or a character
/// whose UTF-8 encoding contains 0xA0.
impl fmt::Display for TableLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} ", self.start, self.len)?;
        match &self.target {
            TargetArgs::Pool(pool) => {
                let words = pool.features.words();
                write!(
                    f,
                    "{POOL_TARGET} {} {} {} {} {}",
                    quote_arg(&pool.metadata_dev),
                    quote_arg(&pool.data_dev),
                    pool.data_block_size,
                    pool.low_water_mark,
                    words.len()
                )?;
                for word in words {
                    write!(f, " {word}")?;
                }
                Ok(())
            }
            TargetArgs::Thin(thin) => {
                write!(f, "{THIN_TARGET} {} {}", quote_arg(&thin.pool_dev), thin.dev_id)?;
                if let Some(origin) = &thin.external_origin {
                    write!(f, " {}", quote_arg(origin))?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pool_err(args: &[&str]) -> TableError {
        PoolTable::parse_args(args).unwrap_err()
    }

    fn thin_err(args: &[&str]) -> TableError {
        ThinTable::parse_args(args).unwrap_err()
    }

    fn einval(message: &str) -> TableError {
        TableError { errno: Errno::EINVAL, message: message.to_string() }
    }

    #[test]
    fn split_matches_dm_split_args() {
        let s = |v: &[&str]| v.iter().map(|a| a.as_bytes().to_vec()).collect::<Vec<_>>();
        assert_eq!(split_args("  a \t b\n"), s(&["a", "b"]));
        assert_eq!(split_args(""), s(&[]));
        assert_eq!(split_args(" \x0b\x0c\r "), s(&[]));
        assert_eq!(split_args(r"a\ b c\\d e\"), s(&["a b", r"c\d", r"e\"]));
        assert_eq!(split_args("a\0 b"), s(&["a"]));
        // 0xA0 is kernel white space: 'à' (C3 A0) is cut after its first byte.
        assert_eq!(split_args("xày"), vec![b"x\xc3".to_vec(), b"y".to_vec()]);
        assert_eq!(split_args("é"), s(&["é"]));
    }

    #[test]
    fn kstrtoull_semantics() {
        assert_eq!(kstrtoull(b"0"), Some(0));
        assert_eq!(kstrtoull(b"+5"), Some(5));
        assert_eq!(kstrtoull(b"007"), Some(7));
        assert_eq!(kstrtoull(b"5\n"), Some(5));
        assert_eq!(kstrtoull(b"18446744073709551615"), Some(u64::MAX));
        for bad in
            [&b""[..], b"+", b"-1", b"0x10", b" 5", b"5 ", b"5\n\n", b"++5", b"18446744073709551616", b"1a"]
        {
            assert_eq!(kstrtoull(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn sscanf_count_semantics() {
        assert_eq!(sscanf_count(b"3"), Some(3));
        assert_eq!(sscanf_count(b" 3"), Some(3));
        assert_eq!(sscanf_count(b"003"), Some(3));
        assert_eq!(sscanf_count(b"4294967297"), Some(1));
        for bad in [&b"+3"[..], b"-1", b"3\n", b"3 ", b"x", b" "] {
            assert_eq!(sscanf_count(bad), None);
        }
    }

    #[test]
    fn pool_minimal_and_features() {
        let t = PoolTable::parse_args(&["/dev/m", "/dev/d", "128", "0"]).unwrap();
        assert_eq!(
            t,
            PoolTable {
                metadata_dev: "/dev/m".into(),
                data_dev: "/dev/d".into(),
                data_block_size: 128,
                low_water_mark: 0,
                features: PoolFeatures::default(),
            }
        );
        let t = PoolTable::parse_args(&[
            "m",
            "d",
            "2097152",
            "+18446744073709551615",
            "4",
            "SKIP_block_zeroing",
            "Ignore_Discard",
            "no_discard_passdown",
            "ERROR_IF_NO_SPACE",
        ])
        .unwrap();
        assert_eq!(t.data_block_size, 2097152);
        assert_eq!(t.low_water_mark, u64::MAX);
        assert_eq!(
            t.features,
            PoolFeatures {
                skip_block_zeroing: true,
                ignore_discard: true,
                no_discard_passdown: true,
                read_only: false,
                error_if_no_space: true
            }
        );
        // All five features cannot be requested together: the count is at
        // most 4 (harmless: ignore_discard makes no_discard_passdown moot).
        assert_eq!(
            pool_err(&[
                "m",
                "d",
                "128",
                "0",
                "5",
                "skip_block_zeroing",
                "ignore_discard",
                "no_discard_passdown",
                "read_only",
                "error_if_no_space"
            ]),
            einval("Invalid number of pool feature arguments")
        );
        let t = PoolTable::parse_args(&["m", "d", "256", "10", "2", "read_only", "read_only"]).unwrap();
        assert!(t.features.read_only);
        assert_eq!(t.features.words(), vec!["read_only"]);
    }

    #[test]
    fn pool_extra_arguments_after_features_are_ignored() {
        let t = PoolTable::parse_args(&["m", "d", "128", "0", "1", "read_only", "bogus", "more"]).unwrap();
        assert!(t.features.read_only);
        let t = PoolTable::parse_args(&["m", "d", "128", "0", "0", "bogus"]).unwrap();
        assert_eq!(t.features, PoolFeatures::default());
    }

    #[test]
    fn pool_errors() {
        assert_eq!(pool_err(&[]), einval("Invalid argument count"));
        assert_eq!(pool_err(&["m", "d", "128"]), einval("Invalid argument count"));
        assert_eq!(pool_err(&["m", "m", "128", "0"]), einval("Error setting metadata or data device"));
        // Device check precedes the block size check.
        assert_eq!(pool_err(&["m", "m", "x", "x"]), einval("Error setting metadata or data device"));
        let count = einval("Invalid number of pool feature arguments");
        assert_eq!(pool_err(&["m", "d", "128", "0", "x"]), count);
        assert_eq!(pool_err(&["m", "d", "128", "0", "5", "a", "b", "c", "d", "e"]), count);
        assert_eq!(pool_err(&["m", "d", "128", "0", "2", "read_only"]), count);
        assert_eq!(pool_err(&["m", "d", "128", "0", "+1", "read_only"]), count);
        assert_eq!(pool_err(&["m", "d", "128", "0", "-1"]), count);
        let unknown = einval("Unrecognised pool feature requested");
        assert_eq!(pool_err(&["m", "d", "128", "0", "1", "zero"]), unknown);
        assert_eq!(pool_err(&["m", "d", "128", "0", "2", "read_only", "readonly"]), unknown);
        // Features are checked before the block size.
        assert_eq!(pool_err(&["m", "d", "1", "0", "1", "zero"]), unknown);
        let bs = einval("Invalid block size");
        for bad in ["0", "64", "127", "129", "192", "2097280", "4194304", "x", "-128", "0x80", " 128"] {
            assert_eq!(pool_err(&["m", "d", bad, "0"]), bs, "{bad}");
        }
        for good in ["128", "+128", "128\n", "0128", "384", "2097152"] {
            assert!(PoolTable::parse_args(&["m", "d", good, "0"]).is_ok(), "{good}");
        }
        let lwm = einval("Invalid low water mark");
        for bad in ["-1", "x", "18446744073709551616", "0x1", ""] {
            assert_eq!(pool_err(&["m", "d", "128", bad]), lwm, "{bad}");
        }
        // The block size is checked before the low water mark.
        assert_eq!(pool_err(&["m", "d", "1", "x"]), bs);
        assert_eq!(bs.to_string(), "Invalid block size (EINVAL)");
    }

    #[test]
    fn thin_parse_and_errors() {
        assert_eq!(
            ThinTable::parse_args(&["/dev/mapper/pool", "+16777215\n"]).unwrap(),
            ThinTable { pool_dev: "/dev/mapper/pool".into(), dev_id: MAX_DEV_ID, external_origin: None }
        );
        assert_eq!(
            ThinTable::parse_args(&["p", "0", "o"]).unwrap(),
            ThinTable { pool_dev: "p".into(), dev_id: 0, external_origin: Some("o".into()) }
        );
        let count = einval("Invalid argument count");
        assert_eq!(thin_err(&["p"]), count);
        assert_eq!(thin_err(&["p", "1", "o", "x"]), count);
        assert_eq!(thin_err(&["p", "1", "p"]), einval("Error setting origin device"));
        assert_eq!(thin_err(&["p", "x", "p"]), einval("Error setting origin device"));
        let id = einval("Invalid device id");
        for bad in ["16777216", "-1", "0x1", "x", " 1", "1 ", "18446744073709551616"] {
            assert_eq!(thin_err(&["p", bad]), id, "{bad}");
        }
    }

    #[test]
    fn runtime_errors() {
        assert_eq!(TableError::no_such_thin_device().errno, Errno::ENODATA);
        assert_eq!(TableError::metadata_dev_in_use().errno, Errno::EBUSY);
        assert_eq!(TableError::data_dev_in_use().errno, Errno::EBUSY);
        assert_eq!(
            TableError::pool_in_fail_mode().to_string(),
            "Couldn't open thin device, Pool is in fail mode (EINVAL)"
        );
        assert_eq!(TableError::pool_suspended().errno, Errno::EINVAL);
        assert_eq!(TableError::discard_setting_changed().errno, Errno::EINVAL);
        assert_eq!(TableError::different_pool().errno, Errno::EINVAL);
    }

    #[test]
    fn table_status_strings() {
        let mut t = PoolTable::parse_args(&["m", "d", "128", "7"]).unwrap();
        assert_eq!(t.table_status("253:0", "253:1"), "253:0 253:1 128 7 0 ");
        t.features = PoolFeatures {
            skip_block_zeroing: true,
            ignore_discard: true,
            no_discard_passdown: true,
            read_only: true,
            error_if_no_space: true,
        };
        assert_eq!(
            t.table_status("253:0", "253:1"),
            "253:0 253:1 128 7 5 skip_block_zeroing ignore_discard no_discard_passdown read_only \
             error_if_no_space "
        );
        let thin = ThinTable::parse_args(&["p", "5"]).unwrap();
        assert_eq!(thin.table_status("253:2", Some("8:1")), "253:2 5");
        let thin = ThinTable::parse_args(&["p", "5", "/dev/o"]).unwrap();
        assert_eq!(thin.table_status("253:2", Some("8:1")), "253:2 5 8:1");
        assert_eq!(thin.table_status("253:2", None), "253:2 5 /dev/o");
    }

    #[test]
    fn data_blocks_rounds_down() {
        let t = PoolTable::parse_args(&["m", "d", "128", "0"]).unwrap();
        assert_eq!(t.data_blocks(0), 0);
        assert_eq!(t.data_blocks(127), 0);
        assert_eq!(t.data_blocks(128 * 10 + 127), 10);
        let zero = PoolTable { data_block_size: 0, ..t };
        assert_eq!(zero.data_blocks(1000), 0);
    }

    #[test]
    fn table_lines() {
        let line = TableLine::parse(" 0  2048 thin-pool /dev/m /dev/d 128 16 1 READ_ONLY ").unwrap();
        assert_eq!(line.start, 0);
        assert_eq!(line.len, 2048);
        let TargetArgs::Pool(pool) = &line.target else { panic!() };
        assert!(pool.features.read_only);
        assert_eq!(line.to_string(), "0 2048 thin-pool /dev/m /dev/d 128 16 1 read_only");

        let line = TableLine::parse("100 2048 thin /dev/mapper/p 3 /dev/my\\ origin").unwrap();
        assert_eq!(line.to_string(), "100 2048 thin /dev/mapper/p 3 /dev/my\\ origin");
        let TargetArgs::Thin(thin) = &line.target else { panic!() };
        assert_eq!(thin.external_origin.as_deref(), Some("/dev/my origin"));

        let e = |l: &str| TableLine::parse(l).unwrap_err();
        assert_eq!(e(""), einval("Invalid format: empty line"));
        assert_eq!(e("x 1 thin p 1"), einval("Invalid format: bad start sector"));
        assert_eq!(e("0"), einval("Invalid format: missing length"));
        assert_eq!(e("0 -1 thin p 1"), einval("Invalid format: bad length"));
        assert_eq!(e("0 1"), einval("Invalid format: missing target type"));
        assert_eq!(e("0 0 thin p 1"), einval("zero-length target"));
        assert_eq!(e("0 0 bogus"), einval("zero-length target"));
        assert_eq!(e("1 18014398509481983 thin p 1"), einval("too large device"));
        assert!(TableLine::parse("0 18014398509481983 thin p 1").is_ok());
        assert_eq!(e("0 1 linear /dev/sda 0"), einval("linear: unknown target type"));
        assert_eq!(e("0 1 THIN p 1"), einval("THIN: unknown target type"));
        assert_eq!(e("8 1 thin-pool m d 128 0"), einval("Gap in table"));
        assert_eq!(e("0 1 thin-pool m d 128"), einval("Invalid argument count"));
        assert_eq!(e("0 1 thin p"), einval("Invalid argument count"));
        // A non-UTF-8 device name (cut at 0xA0) cannot be opened.
        assert_eq!(e("0 1 thin-pool mà d 128 0"), einval("Error opening metadata block device"));
        assert_eq!(e("0 1 thin-pool m dà 128 0"), einval("Error getting data device"));
        assert_eq!(e("0 1 thin pà 1"), einval("Error opening pool device"));
        assert_eq!(e("0 1 thin p 1 oà"), einval("Error opening origin device"));
    }

    fn device_name_strategy() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![
                proptest::char::range('a', 'z'),
                Just('/'),
                Just(' '),
                Just('\t'),
                Just('\n'),
                Just('\\'),
                Just(':'),
                Just('é'),
                Just('\u{0b}'),
            ],
            1..12,
        )
        .prop_map(|v| v.into_iter().collect())
    }

    fn features_strategy() -> impl Strategy<Value = PoolFeatures> {
        // At most 4 features: a table with all five cannot be loaded.
        any::<[bool; 5]>()
            .prop_filter("at most 4 features", |b| b.iter().filter(|&&x| x).count() <= 4)
            .prop_map(|b| PoolFeatures {
                skip_block_zeroing: b[0],
                ignore_discard: b[1],
                no_discard_passdown: b[2],
                read_only: b[3],
                error_if_no_space: b[4],
            })
    }

    fn line_strategy() -> impl Strategy<Value = TableLine> {
        let pool = (
            device_name_strategy(),
            device_name_strategy(),
            1u32..=(DATA_BLOCK_SIZE_MAX_SECTORS / DATA_BLOCK_SIZE_MIN_SECTORS),
            any::<u64>(),
            features_strategy(),
            1u64..=MAX_TABLE_END_SECTOR,
        )
            .prop_filter("devices differ", |(m, d, ..)| m != d)
            .prop_map(|(metadata_dev, data_dev, mult, low_water_mark, features, len)| TableLine {
                start: 0,
                len,
                target: TargetArgs::Pool(PoolTable {
                    metadata_dev,
                    data_dev,
                    data_block_size: mult * DATA_BLOCK_SIZE_MIN_SECTORS,
                    low_water_mark,
                    features,
                }),
            });
        let thin = (
            device_name_strategy(),
            0..=MAX_DEV_ID,
            proptest::option::of(device_name_strategy()),
            0u64..1 << 40,
            1u64..1 << 40,
        )
            .prop_filter("origin differs from pool", |(p, _, o, ..)| o.as_ref() != Some(p))
            .prop_map(|(pool_dev, dev_id, external_origin, start, len)| TableLine {
                start,
                len,
                target: TargetArgs::Thin(ThinTable { pool_dev, dev_id, external_origin }),
            });
        prop_oneof![pool, thin]
    }

    proptest! {
        #[test]
        fn parsers_never_panic(line in "\\PC*", args in proptest::collection::vec("\\PC*", 0..8)) {
            let _ = TableLine::parse(&line);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let _ = PoolTable::parse_args(&args);
            let _ = ThinTable::parse_args(&args);
        }

        #[test]
        fn table_token_soup_never_panics(
            tokens in proptest::collection::vec(
                prop_oneof![
                    Just("thin-pool".to_string()),
                    Just("thin".to_string()),
                    "[0-9]{1,21}",
                    Just("read_only".to_string()),
                    "[a-z\\\\ ]{0,4}",
                ],
                0..10,
            )
        ) {
            let _ = TableLine::parse(&tokens.join(" "));
        }

        #[test]
        fn display_round_trips(line in line_strategy()) {
            let text = line.to_string();
            prop_assert_eq!(TableLine::parse(&text), Ok(line), "{}", text);
        }
    }
}
