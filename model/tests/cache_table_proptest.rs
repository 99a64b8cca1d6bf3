//! The cache table line and message parsers on hostile input: never a
//! panic, and every table they accept prints a TABLE status that parses
//! back to the same table.

use dmsim_model::cache::policy::PolicyType;
use dmsim_model::cache::table::{CacheMessage, CacheTable, DeviceSizes, IoMode};
use proptest::prelude::*;

const SIZES: DeviceSizes =
    DeviceSizes { target_len: 1 << 20, cache_sectors: 1 << 16, origin_sectors: 1 << 20 };

/// Words that are likely to get far into the parser.
fn word() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("m".to_string()),
        Just("128".to_string()),
        Just("0".to_string()),
        Just("1".to_string()),
        Just("2".to_string()),
        Just("3".to_string()),
        Just("writeback".to_string()),
        Just("WriteThrough".to_string()),
        Just("passthrough".to_string()),
        Just("metadata2".to_string()),
        Just("no_discard_passdown".to_string()),
        Just("smq".to_string()),
        Just("mq".to_string()),
        Just("cleaner".to_string()),
        Just("migration_threshold".to_string()),
        Just("random_threshold".to_string()),
        Just("4294967297".to_string()),
        Just("3-7".to_string()),
        Just("\u{a0}".to_string()),
        "[ -~]{0,12}",
        ".{0,6}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn table_lines_never_panic_and_accepted_ones_round_trip(words in prop::collection::vec(word(), 0..14)) {
        let line = words.join(" ");
        if let Ok(t) = CacheTable::parse(&line, SIZES) {
            let status = t.table_status("m", "c", "o");
            let again = CacheTable::parse(&status, SIZES).expect("the TABLE status parses");
            prop_assert_eq!(&again.ctr_args, &t.ctr_args);
            prop_assert_eq!(again.io_mode, t.io_mode);
            prop_assert_eq!(again.policy, t.policy);
            prop_assert_eq!(again.migration_threshold, t.migration_threshold);
            let features = t.emit_features();
            prop_assert!(features.ends_with(' '));
        }
    }

    #[test]
    fn well_formed_lines_parse_and_round_trip(
        block in prop::sample::select(vec![64u64, 128, 192, 512, 2048]),
        features in prop::sample::subsequence(vec!["writethrough", "metadata2", "no_discard_passdown"], 0..=3),
        policy in prop::sample::select(vec!["smq", "mq", "cleaner", "default"]),
        threshold in prop::option::of(0u64..100_000),
    ) {
        let mut line = format!("m c o {block} {} {}", features.len(), features.join(" "));
        let args = threshold.map_or(String::new(), |t| format!(" migration_threshold {t}"));
        line.push_str(&format!(" {policy} {}{args}", if threshold.is_some() { 2 } else { 0 }));
        let t = CacheTable::parse(&line, SIZES).expect("well formed");
        prop_assert_eq!(t.block_sectors, block);
        prop_assert_eq!(t.metadata_version, if features.contains(&"metadata2") { 2 } else { 1 });
        prop_assert_eq!(t.discard_passdown, !features.contains(&"no_discard_passdown"));
        prop_assert_eq!(t.migration_threshold, threshold.unwrap_or(2048));
        let again = CacheTable::parse(&t.table_status("m", "c", "o"), SIZES).expect("round trip");
        prop_assert_eq!(again, t);
    }

    #[test]
    fn messages_never_panic(words in prop::collection::vec(word(), 0..6), ro: bool, n in 0u64..200) {
        let refs: Vec<&str> = words.iter().map(String::as_str).collect();
        for policy in [PolicyType::Smq, PolicyType::Mq] {
            for mode in [IoMode::Writeback, IoMode::Passthrough] {
                if let Ok(CacheMessage::InvalidateCblocks(ranges)) = CacheMessage::parse(&refs, policy, mode, ro, n) {
                    prop_assert!(ranges.iter().all(|&(b, e)| b < e && e <= n));
                }
            }
        }
    }
}
