//! The dm-cache table line, its status lines and its messages (spec §4.5;
//! `cache_ctr`, `cache_status` and `cache_message` in dm-cache-target.c),
//! with kernel 6.1's checks in the kernel's order and its error texts.
//!
//! ```text
//! cache <metadata dev> <cache dev> <origin dev> <block size>
//!       <#features> [writeback|writethrough|passthrough] [metadata2] [no_discard_passdown]
//!       <policy> <#policy args> [<key> <value>]...
//! ```
//!
//! Arguments are split as DM core splits them ([`split_args`]); device names
//! are opaque, and the two checks that need a device's size (the target may
//! not be longer than the origin; a block may not be larger than the cache
//! device) take the sizes from [`DeviceSizes`]. The checks that need the
//! metadata (passthrough only when every block is clean) are the caller's.

use crate::cache::policy::smq::ops::MQ_TUNABLES;
use crate::cache::policy::PolicyType;
use crate::errno::Errno;
use crate::thin::table::{device_name, kstrtoull, split_args, sscanf_count, TableError};

/// Smallest cache block size in sectors (32 KiB).
pub const BLOCK_SIZE_MIN_SECTORS: u64 = 64;
/// Largest cache block size in sectors (1 GiB).
pub const BLOCK_SIZE_MAX_SECTORS: u64 = 2_097_152;
/// Most feature arguments.
pub const MAX_FEATURE_ARGS: u32 = 3;
/// Most policy arguments.
pub const MAX_POLICY_ARGS: u32 = 1024;
/// `migration_threshold` when the table does not set it (sectors).
pub const DEFAULT_MIGRATION_THRESHOLD: u64 = 2048;

/// How writes are cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum IoMode {
    /// Writes to cached blocks go to the cache only (the default).
    #[default]
    Writeback,
    /// Writes go to the origin and, for cached blocks, the cache too.
    Writethrough,
    /// Everything goes to the origin; cached blocks are invalidated.
    Passthrough,
}

impl IoMode {
    /// The feature word.
    pub fn name(self) -> &'static str {
        match self {
            IoMode::Writeback => "writeback",
            IoMode::Writethrough => "writethrough",
            IoMode::Passthrough => "passthrough",
        }
    }
}

/// The sizes of the devices a table names, in sectors (the kernel reads
/// them when it opens the devices).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceSizes {
    /// The target's length (`ti->len`).
    pub target_len: u64,
    /// The cache device.
    pub cache_sectors: u64,
    /// The origin device.
    pub origin_sectors: u64,
}

/// The arguments of a `cache` table line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheTable {
    /// The metadata device, as written.
    pub metadata_dev: String,
    /// The cache (fast) device, as written.
    pub cache_dev: String,
    /// The origin (slow) device, as written.
    pub origin_dev: String,
    /// Cache block size in sectors.
    pub block_sectors: u64,
    /// Writeback, writethrough or passthrough.
    pub io_mode: IoMode,
    /// 1, or 2 with `metadata2`.
    pub metadata_version: u32,
    /// False with `no_discard_passdown`.
    pub discard_passdown: bool,
    /// The policy.
    pub policy: PolicyType,
    /// The policy arguments, as key/value pairs.
    pub policy_args: Vec<(String, String)>,
    /// `migration_threshold` in sectors.
    pub migration_threshold: u64,
    /// The arguments from the block size on, verbatim, for the TABLE status.
    pub ctr_args: Vec<String>,
}

fn at_least_one<'a>(args: &mut &'a [Vec<u8>]) -> Result<&'a [u8], TableError> {
    let (first, rest) = args.split_first().ok_or_else(|| TableError::einval("Insufficient args"))?;
    *args = rest;
    Ok(first)
}

/// DM core's `dm_read_arg_group`: a count read as `sscanf("%u%c")`, in
/// `0..=max`, and no more than the arguments left.
fn arg_group(args: &mut &[Vec<u8>], max: u32, error: &str) -> Result<usize, TableError> {
    let (first, rest) = args.split_first().ok_or_else(|| TableError::einval(error))?;
    let n = sscanf_count(first).filter(|&n| n <= max && n as usize <= rest.len());
    let n = n.ok_or_else(|| TableError::einval(error))? as usize;
    *args = rest;
    Ok(n)
}

impl CacheTable {
    /// Parses a parameter string as DM core hands it to `cache_ctr`.
    pub fn parse(params: &str, sizes: DeviceSizes) -> Result<Self, TableError> {
        Self::parse_split(&split_args(params), sizes)
    }

    /// Parses split arguments with the kernel's checks, in its order
    /// (`parse_cache_args`, then the policy and config checks of
    /// `cache_create`); every error is EINVAL:
    ///
    /// 1. metadata, cache and origin devices (`Insufficient args` when one
    ///    is missing); the target longer than the origin: `Device size
    ///    larger than cached device`;
    /// 2. block size: `kstrtoul`, 64..=2,097,152 and a multiple of 64, else
    ///    `Invalid data block size`; larger than the cache device: `Data
    ///    block size is larger than the cache device`;
    /// 3. features: count 0..=3 (`Invalid number of cache feature
    ///    arguments`), each one of writeback, writethrough, passthrough,
    ///    metadata2, no_discard_passdown, matched without case (`Unrecognised
    ///    cache feature requested`), at most one I/O mode (`Duplicate cache
    ///    io_mode features requested`);
    /// 4. policy name, count 0..=1024 (`Invalid number of policy
    ///    arguments`);
    /// 5. an unknown policy: `Error creating cache's policy`; an odd count,
    ///    a `migration_threshold` that is not a number, or a key the policy
    ///    refuses: `Error setting cache policy's config values`.
    pub fn parse_split(args: &[Vec<u8>], sizes: DeviceSizes) -> Result<Self, TableError> {
        let mut rest = args;
        let metadata_dev = device_name(at_least_one(&mut rest)?, "Error opening metadata device")?;
        let cache_dev = device_name(at_least_one(&mut rest)?, "Error opening cache device")?;
        let origin_dev = device_name(at_least_one(&mut rest)?, "Error opening origin device")?;
        if sizes.target_len > sizes.origin_sectors {
            return Err(TableError::einval("Device size larger than cached device"));
        }
        let ctr_start = args.len() - rest.len();
        let block = kstrtoull(at_least_one(&mut rest)?)
            .filter(|&b| {
                (BLOCK_SIZE_MIN_SECTORS..=BLOCK_SIZE_MAX_SECTORS).contains(&b)
                    && b % BLOCK_SIZE_MIN_SECTORS == 0
            })
            .ok_or_else(|| TableError::einval("Invalid data block size"))?;
        if block > sizes.cache_sectors {
            return Err(TableError::einval("Data block size is larger than the cache device"));
        }
        let n = arg_group(&mut rest, MAX_FEATURE_ARGS, "Invalid number of cache feature arguments")?;
        let (mut io_mode, mut metadata_version, mut discard_passdown, mut modes) =
            (IoMode::Writeback, 1, true, 0);
        for word in &rest[..n] {
            let w = String::from_utf8_lossy(word).to_ascii_lowercase();
            match w.as_str() {
                "writeback" | "writethrough" | "passthrough" => {
                    modes += 1;
                    io_mode = match w.as_str() {
                        "writeback" => IoMode::Writeback,
                        "writethrough" => IoMode::Writethrough,
                        _ => IoMode::Passthrough,
                    };
                }
                "metadata2" => metadata_version = 2,
                "no_discard_passdown" => discard_passdown = false,
                _ => return Err(TableError::einval("Unrecognised cache feature requested")),
            }
        }
        if modes > 1 {
            return Err(TableError::einval("Duplicate cache io_mode features requested"));
        }
        rest = &rest[n..];
        let name = String::from_utf8_lossy(at_least_one(&mut rest)?).into_owned();
        let n = arg_group(&mut rest, MAX_POLICY_ARGS, "Invalid number of policy arguments")?;
        let pargs: Vec<String> = rest[..n].iter().map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let policy = PolicyType::from_name(&name)
            .ok_or_else(|| TableError::einval("Error creating cache's policy"))?;
        let config_error = || TableError::einval("Error setting cache policy's config values");
        if n % 2 == 1 {
            return Err(config_error());
        }
        let mut migration_threshold = DEFAULT_MIGRATION_THRESHOLD;
        let mut policy_args = Vec::new();
        for kv in pargs.chunks(2) {
            let (k, v) = (&kv[0], &kv[1]);
            match config_value(policy, k, v) {
                Ok(Some(t)) => migration_threshold = t,
                Ok(None) => {}
                Err(_) => return Err(config_error()),
            }
            policy_args.push((k.clone(), v.clone()));
        }
        let ctr_args = args[ctr_start..].iter().map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        Ok(CacheTable {
            metadata_dev,
            cache_dev,
            origin_dev,
            block_sectors: block,
            io_mode,
            metadata_version,
            discard_passdown,
            policy,
            policy_args,
            migration_threshold,
            ctr_args,
        })
    }

    /// The TABLE status: the three devices' numbers (`maj:min`, given), then
    /// the constructor's arguments from the block size on, verbatim.
    pub fn table_status(&self, metadata: &str, cache: &str, origin: &str) -> String {
        let mut s = format!("{metadata} {cache} {origin}");
        for a in &self.ctr_args {
            s.push(' ');
            s.push_str(a);
        }
        s
    }

    /// The features as the INFO status prints them: the count, then
    /// `[metadata2] <io mode> [no_discard_passdown]`, each followed by a
    /// space (`emit_flags`).
    pub fn emit_features(&self) -> String {
        let count = 1 + u32::from(self.metadata_version == 2) + u32::from(!self.discard_passdown);
        let mut s = format!("{count} ");
        if self.metadata_version == 2 {
            s.push_str("metadata2 ");
        }
        s.push_str(self.io_mode.name());
        s.push(' ');
        if !self.discard_passdown {
            s.push_str("no_discard_passdown ");
        }
        s
    }
}

/// A config key and value (`set_config_value`): `migration_threshold` is
/// the core's (`Ok(Some(sectors))`); other keys go to the policy (`Ok(None)`
/// if it takes them). smq, cleaner and default take none; mq takes its old
/// tunables (a number each) and ignores them. Keys match without case, as
/// `strcasecmp` does.
pub fn config_value(policy: PolicyType, key: &str, value: &str) -> Result<Option<u64>, Errno> {
    if key.eq_ignore_ascii_case("migration_threshold") {
        return kstrtoull(value.as_bytes()).map(Some).ok_or(Errno::EINVAL);
    }
    let known = policy == PolicyType::Mq && MQ_TUNABLES.iter().any(|t| t.eq_ignore_ascii_case(key));
    if known && kstrtoull(value.as_bytes()).is_some_and(|v| v <= u64::from(u32::MAX)) {
        Ok(None)
    } else {
        Err(Errno::EINVAL)
    }
}

/// What the INFO status line reports (`cache_status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoStatus {
    /// Metadata blocks in use and in all.
    pub metadata_used: u64,
    /// Metadata device blocks.
    pub metadata_total: u64,
    /// Blocks the policy holds (residency).
    pub resident: u64,
    /// Cache blocks.
    pub cache_blocks: u64,
    /// read hits, read misses, write hits, write misses.
    pub hits: [u32; 4],
    /// Demotions and promotions since activation.
    pub demotions: u32,
    /// Promotions since activation.
    pub promotions: u32,
    /// Dirty cache blocks.
    pub dirty: u64,
    /// The policy's config values as it emits them (smq: `"0 "`).
    pub policy_config: String,
    /// Read-only metadata mode.
    pub read_only: bool,
    /// NEEDS_CHECK set (or unreadable).
    pub needs_check: bool,
}

/// The INFO status line; FAIL mode prints `Fail` instead.
pub fn info_status(table: &CacheTable, s: &InfoStatus) -> String {
    let mut line = format!(
        "8 {}/{} {} {}/{} {} {} {} {} {} {} {} ",
        s.metadata_used,
        s.metadata_total,
        table.block_sectors,
        s.resident,
        s.cache_blocks,
        s.hits[0],
        s.hits[1],
        s.hits[2],
        s.hits[3],
        s.demotions,
        s.promotions,
        s.dirty
    );
    line.push_str(&table.emit_features());
    line.push_str(&format!("2 migration_threshold {} ", table.migration_threshold));
    line.push_str(table.policy.name());
    line.push(' ');
    line.push_str(&s.policy_config);
    line.push_str(if s.read_only { "ro " } else { "rw " });
    line.push_str(if s.needs_check { "needs_check " } else { "- " });
    line
}

/// A cache target message (`cache_message`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheMessage {
    /// `<key> <value>`: `migration_threshold` or a policy key.
    Config {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// `invalidate_cblocks <range>...`: half-open cache block ranges.
    InvalidateCblocks(Vec<(u64, u64)>),
}

/// Why a message was refused: the errno the message ioctl returns.
pub type MessageError = Errno;

/// `sscanf(s, "%llu-%llu%c")` then `sscanf(s, "%llu%c")`: a range or one
/// block (`parse_cblock_range`). Digits only after optional leading white
/// space; overflow wraps as the kernel's `simple_strtoull` does.
fn parse_cblock_range(s: &str) -> Option<(u64, u64)> {
    fn number(s: &str) -> Option<(u64, &str)> {
        let s = s.trim_start_matches(|c: char| c.is_ascii() && crate::thin::table::is_kernel_space(c as u8));
        let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        if end == 0 {
            return None;
        }
        let v = s[..end].bytes().fold(0u64, |a, d| a.wrapping_mul(10).wrapping_add(u64::from(d - b'0')));
        Some((v, &s[end..]))
    }
    let (b, rest) = number(s)?;
    if let Some(after) = rest.strip_prefix('-') {
        if let Some((e, "")) = number(after) {
            return Some((b, e));
        }
    }
    rest.is_empty().then(|| (b, b.wrapping_add(1)))
}

impl CacheMessage {
    /// Parses a message's words with the kernel's checks for the cache's
    /// state: no words, or a key without exactly one value: EINVAL; any
    /// message in read-only or fail mode: EOPNOTSUPP; `invalidate_cblocks`
    /// outside passthrough mode: EPERM; a range that does not parse, or
    /// whose begin is past the cache, end past it, or begin not below end:
    /// EINVAL (`validate_cblock_range`). A config key is checked by
    /// [`config_value`].
    pub fn parse(
        words: &[&str],
        policy: PolicyType,
        io_mode: IoMode,
        read_only_or_fail: bool,
        cache_blocks: u64,
    ) -> Result<CacheMessage, MessageError> {
        let Some((&first, rest)) = words.split_first() else { return Err(Errno::EINVAL) };
        if read_only_or_fail {
            return Err(Errno::EOPNOTSUPP);
        }
        if first.eq_ignore_ascii_case("invalidate_cblocks") {
            if io_mode != IoMode::Passthrough {
                return Err(Errno::EPERM);
            }
            let mut ranges = Vec::new();
            for r in rest {
                let (b, e) = parse_cblock_range(r).ok_or(Errno::EINVAL)?;
                if b >= cache_blocks || e > cache_blocks || b >= e {
                    return Err(Errno::EINVAL);
                }
                ranges.push((b, e));
            }
            return Ok(CacheMessage::InvalidateCblocks(ranges));
        }
        if words.len() != 2 {
            return Err(Errno::EINVAL);
        }
        config_value(policy, first, rest[0])?;
        Ok(CacheMessage::Config { key: first.to_string(), value: rest[0].to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZES: DeviceSizes =
        DeviceSizes { target_len: 1 << 20, cache_sectors: 1 << 16, origin_sectors: 1 << 20 };

    fn err(params: &str) -> String {
        CacheTable::parse(params, SIZES).unwrap_err().message
    }

    #[test]
    fn a_plain_table_and_its_status_lines() {
        let t = CacheTable::parse("/dev/m /dev/c /dev/o 128 0 smq 0", SIZES).unwrap();
        assert_eq!(
            (t.block_sectors, t.io_mode, t.metadata_version, t.discard_passdown),
            (128, IoMode::Writeback, 1, true)
        );
        assert_eq!(t.migration_threshold, DEFAULT_MIGRATION_THRESHOLD);
        assert_eq!(t.table_status("254:1", "254:2", "254:3"), "254:1 254:2 254:3 128 0 smq 0");
        // The line the real kernel printed for the model's metadata
        // (kernel-shim/tests/kernel_cache_metadata.rs), spaces as DMEMIT
        // leaves them.
        let t = CacheTable::parse("m c o 128 1 writeback smq 2 migration_threshold 64", SIZES).unwrap();
        let s = InfoStatus {
            metadata_used: 10,
            metadata_total: 1024,
            resident: 10,
            cache_blocks: 64,
            hits: [11, 22, 33, 44],
            demotions: 0,
            promotions: 0,
            dirty: 3,
            policy_config: "0 ".into(),
            read_only: false,
            needs_check: false,
        };
        assert_eq!(
            info_status(&t, &s),
            "8 10/1024 128 10/64 11 22 33 44 0 0 3 1 writeback 2 migration_threshold 64 smq 0 rw - "
        );
        let t = CacheTable::parse("m c o 64 3 metadata2 PASSTHROUGH no_discard_passdown default 0", SIZES)
            .unwrap();
        assert_eq!(t.emit_features(), "3 metadata2 passthrough no_discard_passdown ");
        assert_eq!(t.policy.name(), "smq", "default reports smq");
    }

    #[test]
    fn the_kernels_errors_in_the_kernels_order() {
        assert_eq!(err("m c"), "Insufficient args");
        let long = DeviceSizes { target_len: (1 << 20) + 1, ..SIZES };
        assert_eq!(
            CacheTable::parse("m c o 128 0 smq 0", long).unwrap_err().message,
            "Device size larger than cached device"
        );
        for bad in ["0", "63", "96", "4194304", "+", "0x80", "-128"] {
            assert_eq!(err(&format!("m c o {bad} 0 smq 0")), "Invalid data block size", "{bad:?}");
        }
        let small = DeviceSizes { cache_sectors: 64, ..SIZES };
        assert_eq!(
            CacheTable::parse("m c o 128 0 smq 0", small).unwrap_err().message,
            "Data block size is larger than the cache device"
        );
        assert_eq!(err("m c o 128 4 a b c d smq 0"), "Invalid number of cache feature arguments");
        assert_eq!(
            err("m c o 128 3 writeback smq"),
            "Invalid number of cache feature arguments",
            "a count past the end"
        );
        assert_eq!(
            err("m c o 128 2 writeback smq 0"),
            "Unrecognised cache feature requested",
            "the policy read as a feature"
        );
        assert_eq!(err("m c o 128 1 writearound smq 0"), "Unrecognised cache feature requested");
        assert_eq!(
            err("m c o 128 2 writeback writethrough smq 0"),
            "Duplicate cache io_mode features requested"
        );
        assert_eq!(err("m c o 128 0"), "Insufficient args");
        assert_eq!(err("m c o 128 0 smq 2 migration_threshold"), "Invalid number of policy arguments");
        assert_eq!(err("m c o 128 0 lru 0"), "Error creating cache's policy");
        assert_eq!(err("m c o 128 0 smq 1 x"), "Error setting cache policy's config values");
        assert_eq!(
            err("m c o 128 0 smq 2 migration_threshold lots"),
            "Error setting cache policy's config values"
        );
        assert_eq!(err("m c o 128 0 smq 2 random_threshold 4"), "Error setting cache policy's config values");
        let t = CacheTable::parse("m c o 128 0 mq 2 random_threshold 4", SIZES).unwrap();
        assert_eq!(t.policy_args, vec![("random_threshold".to_string(), "4".to_string())]);
        assert!(
            CacheTable::parse("m c o 128 0 smq 0 trailing words", SIZES).is_ok(),
            "extra words are ignored"
        );
    }

    #[test]
    fn messages() {
        let p = |w: &[&str], mode, ro| CacheMessage::parse(w, PolicyType::Smq, mode, ro, 100);
        assert_eq!(p(&[], IoMode::Writeback, false), Err(Errno::EINVAL));
        assert_eq!(p(&["migration_threshold", "10"], IoMode::Writeback, true), Err(Errno::EOPNOTSUPP));
        assert_eq!(
            p(&["Migration_Threshold", "10"], IoMode::Writeback, false),
            Ok(CacheMessage::Config { key: "Migration_Threshold".into(), value: "10".into() })
        );
        assert_eq!(p(&["migration_threshold"], IoMode::Writeback, false), Err(Errno::EINVAL));
        assert_eq!(p(&["invalidate_cblocks", "3"], IoMode::Writeback, false), Err(Errno::EPERM));
        assert_eq!(
            p(&["invalidate_cblocks", "3", "10-20", " 7"], IoMode::Passthrough, false),
            Ok(CacheMessage::InvalidateCblocks(vec![(3, 4), (10, 20), (7, 8)]))
        );
        for bad in ["100", "5-101", "9-9", "12-", "x", "3x", "-4", "1-2-3"] {
            assert_eq!(
                p(&["invalidate_cblocks", bad], IoMode::Passthrough, false),
                Err(Errno::EINVAL),
                "{bad:?}"
            );
        }
    }
}
