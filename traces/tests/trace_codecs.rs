//! The text and binary encodings of traces: a pinned example of every
//! event (insta snapshots), round trips of arbitrary traces, hostile and
//! damaged input (never a panic), and the wording of specific errors.

use dmsim_traces::binary::{self, from_bytes, to_bytes};
use dmsim_traces::text::{self, event_from_line, from_text, to_text};
use dmsim_traces::{
    CacheIoMode, CachePolicyKind, CrashMode, DiskFault, DiskId, Event, FaultAim, Header, Location, Op, Trace,
    TraceError,
};
use proptest::prelude::*;
use proptest::test_runner::RngSeed;

/// A trace with every op and event variant, and strings that need quoting.
fn every_event() -> Trace {
    let ops = [
        Op::Write { dev: 0, sector: 257, nr_sectors: 256, fua: true, preflush: true },
        Op::Write { dev: 1, sector: 0, nr_sectors: 8, fua: false, preflush: true },
        Op::Write { dev: 255, sector: u32::MAX, nr_sectors: u16::MAX, fua: false, preflush: false },
        Op::Read { dev: 0, sector: 0, nr_sectors: 8 },
        Op::Discard { dev: 2, sector: 128, nr_sectors: 1024 },
        Op::Flush { dev: 0 },
        Op::CreateThin,
        Op::CreateSnap { origin: 0 },
        Op::Delete { dev: 1 },
        Op::Worker,
        Op::Complete { pick: 3 },
        Op::FailIo { pick: 1 },
        Op::Fault { disk: DiskId::Metadata, fault: DiskFault::ReadError { permanent: true } },
        Op::Fault { disk: DiskId::Data, fault: DiskFault::ReadError { permanent: false } },
        Op::Fault { disk: DiskId::Data, fault: DiskFault::WriteError { permanent: true } },
        Op::Fault { disk: DiskId::Metadata, fault: DiskFault::WriteError { permanent: false } },
        Op::Fault { disk: DiskId::Data, fault: DiskFault::BitFlip { bit: 77 } },
        Op::Fault { disk: DiskId::Metadata, fault: DiskFault::Misdirect { offset: -8 } },
        Op::Fault { disk: DiskId::Data, fault: DiskFault::Misdirect { offset: i32::MAX } },
        Op::Tick { millis: 1000 },
    ];
    let mut events: Vec<Event> = ops.into_iter().map(Event::Op).collect();
    events.extend(
        CrashMode::ALL
            .into_iter()
            .enumerate()
            .map(|(i, mode)| Event::Op(Op::Crash { mode, seed: i as u32 * 17 })),
    );
    events.extend([
        Event::Done { bio: 5, dev: 0, result: "ok".into(), read: None },
        Event::Done { bio: 6, dev: 0, result: "EIO".into(), read: Some("w3x4 zero x4".into()) },
        Event::Done { bio: u64::MAX, dev: u32::MAX, result: "".into(), read: Some("".into()) },
        Event::FaultFired { disk: DiskId::Metadata, what: "read-error sector 8 permanent".into() },
        Event::FaultFired { disk: DiskId::Data, what: "bit-flip".into() },
        Event::Crashed { metadata: (2, 5), data: (0, 3), torn: true },
        Event::Crashed { metadata: (0, 0), data: (0, 0), torn: false },
        Event::Mode("read-only".into()),
        Event::Mode("a=b #c".into()),
        Event::Violation { kind: "oracle".into(), message: "dev 0 sector 256: wrong data".into() },
        Event::Violation {
            kind: "thin_check".into(),
            message:
                "quote \" backslash \\ newline \n tab \t cr \r nul \0 bell \u{7} ls \u{2028} bom \u{feff} é ✓"
                    .into(),
        },
    ]);
    Trace {
        header: Header {
            seed: 42,
            workload: "snapshot-heavy".into(),
            params: vec![
                ("block-size".into(), "128".into()),
                ("features".into(), "skip_block_zeroing, no_discard_passdown".into()),
                ("empty".into(), "".into()),
                ("with space".into(), "=".into()),
            ],
        },
        events,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .map(|row| row.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn text_snapshot_of_every_event() {
    let trace = every_event();
    let text = to_text(&trace);
    insta::assert_snapshot!("every_event_text", text);
    assert_eq!(from_text(&text).unwrap(), trace);
}

#[test]
fn binary_snapshot_of_every_event() {
    let trace = every_event();
    let bytes = to_bytes(&trace);
    insta::assert_snapshot!("every_event_binary", hex(&bytes));
    assert_eq!(from_bytes(&bytes).unwrap(), trace);
}

/// A cache trace: every cache op, mode, policy and disk.
fn every_cache_event() -> Trace {
    let mut events = Vec::new();
    for mode in CacheIoMode::ALL {
        for policy in CachePolicyKind::ALL {
            events.push(Event::Op(Op::Reload { mode, policy }));
        }
    }
    events.extend(
        [
            Op::Invalidate { cblock: 0, nr: 1 },
            Op::Invalidate { cblock: 300, nr: 200 },
            Op::Invalidate { cblock: u32::MAX, nr: u16::MAX },
            Op::Status,
            Op::Resize { cache_blocks: 1, origin_blocks: 300 },
            Op::Resize { cache_blocks: u32::MAX, origin_blocks: 0 },
            Op::Fault { disk: DiskId::Cache, fault: DiskFault::ReadError { permanent: true } },
            Op::Fault { disk: DiskId::Origin, fault: DiskFault::WriteError { permanent: false } },
            Op::Fault { disk: DiskId::Metadata, fault: DiskFault::BitFlip { bit: 3 } },
        ]
        .map(Event::Op),
    );
    events.extend([
        Event::FaultFired { disk: DiskId::Cache, what: "read-error".into() },
        Event::FaultFired { disk: DiskId::Origin, what: "write-error".into() },
    ]);
    Trace { header: Header { seed: 9, workload: "cache".into(), params: vec![] }, events }
}

#[test]
fn cache_ops_text_encoding() {
    let trace = every_cache_event();
    let text = to_text(&trace);
    assert_eq!(
        text,
        "dmsim-trace 1\nseed 9\nworkload cache\n\
         reload mode=writeback policy=smq\n\
         reload mode=writeback policy=cleaner\n\
         reload mode=writethrough policy=smq\n\
         reload mode=writethrough policy=cleaner\n\
         reload mode=passthrough policy=smq\n\
         reload mode=passthrough policy=cleaner\n\
         invalidate cblock=0 nr=1\n\
         invalidate cblock=300 nr=200\n\
         invalidate cblock=4294967295 nr=65535\n\
         status\n\
         resize cache=1 origin=300\n\
         resize cache=4294967295 origin=0\n\
         fault cache read-error permanent\n\
         fault origin write-error transient\n\
         fault metadata bit-flip bit=3\n\
         fault-fired cache read-error\n\
         fault-fired origin write-error\n"
    );
    assert_eq!(from_text(&text).unwrap(), trace);
    // Keys in any order, quoted values, comments.
    assert_eq!(
        event_from_line("reload policy=\"cleaner\" mode=writethrough # x").unwrap(),
        Some(Event::Op(Op::Reload { mode: CacheIoMode::Writethrough, policy: CachePolicyKind::Cleaner }))
    );
    assert_eq!(
        event_from_line("invalidate nr=2 cblock=7").unwrap(),
        Some(Event::Op(Op::Invalidate { cblock: 7, nr: 2 }))
    );
    assert_eq!(event_from_line("status").unwrap(), Some(Event::Op(Op::Status)));
    assert_eq!(
        event_from_line("resize origin=64 cache=\"8\"").unwrap(),
        Some(Event::Op(Op::Resize { cache_blocks: 8, origin_blocks: 64 }))
    );
    for bad in ["resize cache=8", "resize origin=8", "resize cache=-1 origin=2", "resize cache=1 origin=2 x"]
    {
        let e = event_from_line(bad).unwrap_err().to_string();
        assert!(e.contains("resize cache=N origin=N"), "{bad}: {e}");
    }
}

#[test]
fn cache_ops_binary_encoding() {
    let trace = every_cache_event();
    let bytes = to_bytes(&trace);
    let mut expected = b"DMTR\x01\x09\x05cache\x00".to_vec();
    expected.push(trace.events.len() as u8);
    for (m, p) in [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)] {
        expected.extend([0x0e, m, p]);
    }
    expected.extend([0x0f, 0x00, 0x01]);
    expected.extend([0x0f, 0xac, 0x02, 0xc8, 0x01]);
    expected.extend([0x0f, 0xff, 0xff, 0xff, 0xff, 0x0f, 0xff, 0xff, 0x03]);
    expected.push(0x10);
    expected.extend([0x11, 0x01, 0xac, 0x02]);
    expected.extend([0x11, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x00]);
    expected.extend([0x0b, 0x02, 0x00, 0x01]);
    expected.extend([0x0b, 0x03, 0x01, 0x00]);
    expected.extend([0x0b, 0x00, 0x02, 0x03]);
    expected.extend([0x21, 0x02, 0x0a]);
    expected.extend(b"read-error");
    expected.extend([0x21, 0x03, 0x0b]);
    expected.extend(b"write-error");
    assert_eq!(hex(&bytes), hex(&expected));
    assert_eq!(from_bytes(&bytes).unwrap(), trace);
}

#[test]
fn new_names_and_all_lists() {
    for d in DiskId::ALL {
        assert_eq!(DiskId::from_name(d.name()), Some(d));
    }
    assert_eq!(DiskId::from_name("cache"), Some(DiskId::Cache));
    assert_eq!(DiskId::from_name("origin"), Some(DiskId::Origin));
    assert_eq!(DiskId::from_name("Cache"), None);
    for m in CacheIoMode::ALL {
        assert_eq!(CacheIoMode::from_name(m.name()), Some(m));
    }
    assert_eq!(CacheIoMode::ALL.map(CacheIoMode::name), ["writeback", "writethrough", "passthrough"]);
    assert_eq!(CacheIoMode::from_name("writearound"), None);
    for p in CachePolicyKind::ALL {
        assert_eq!(CachePolicyKind::from_name(p.name()), Some(p));
    }
    assert_eq!(CachePolicyKind::ALL.map(CachePolicyKind::name), ["smq", "cleaner"]);
    assert_eq!(CachePolicyKind::from_name("mq"), None);
}

#[test]
fn thin_errors_name_the_cache_ops_and_disks() {
    let reload = Op::Reload { mode: CacheIoMode::Writeback, policy: CachePolicyKind::Smq };
    assert_eq!(reload.thin_error().unwrap(), "op `reload` belongs to cache traces; this is a thin trace");
    assert!(Op::Invalidate { cblock: 0, nr: 1 }.thin_error().unwrap().contains("`invalidate`"));
    assert!(Op::Status.thin_error().unwrap().contains("`status`"));
    assert!(Op::Resize { cache_blocks: 1, origin_blocks: 1 }.thin_error().unwrap().contains("`resize`"));
    let f = |disk| Op::Fault { disk, fault: DiskFault::BitFlip { bit: 0 } };
    assert!(f(DiskId::Cache).thin_error().unwrap().contains("disk `cache`"));
    assert!(f(DiskId::Origin).thin_error().unwrap().contains("disk `origin`"));
    assert_eq!(f(DiskId::Metadata).thin_error(), None);
    assert_eq!(f(DiskId::Data).thin_error(), None);
    for op in every_event().ops() {
        assert_eq!(op.thin_error(), None, "{op:?}");
        assert_eq!(text::op_to_line(&op).split(' ').next(), Some(op.name()));
    }
    for op in every_cache_event().ops() {
        assert_eq!(text::op_to_line(&op).split(' ').next(), Some(op.name()));
    }
}

/// The thin op added after the cache ops: `grow-metadata`, text and binary
/// (tag 0x12), pinned byte for byte; the thin ops' older encodings are
/// pinned by the snapshots of [`every_event`], which do not change.
#[test]
fn grow_metadata_encodings() {
    let ops = [
        Op::GrowMetadata { blocks: 0, reload: false },
        Op::GrowMetadata { blocks: 7, reload: true },
        Op::GrowMetadata { blocks: u32::MAX, reload: false },
    ];
    let trace = Trace {
        header: Header { seed: 3, workload: "metadata-pressure".into(), params: vec![] },
        events: ops.into_iter().map(Event::Op).collect(),
    };
    let text = to_text(&trace);
    assert_eq!(
        text,
        "dmsim-trace 1\nseed 3\nworkload metadata-pressure\n\
         grow-metadata blocks=0\n\
         grow-metadata blocks=7 reload\n\
         grow-metadata blocks=4294967295\n"
    );
    assert_eq!(from_text(&text).unwrap(), trace);
    let mut expected = b"DMTR\x01\x03\x11metadata-pressure\x00\x03".to_vec();
    expected.extend([0x12, 0x00, 0x00]);
    expected.extend([0x12, 0x07, 0x01]);
    expected.extend([0x12, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x00]);
    let bytes = to_bytes(&trace);
    assert_eq!(hex(&bytes), hex(&expected));
    assert_eq!(from_bytes(&bytes).unwrap(), trace);
    // Keys in any order, the flag anywhere, quoted numbers.
    assert_eq!(
        event_from_line("grow-metadata reload blocks=\"5\" # more room").unwrap(),
        Some(Event::Op(Op::GrowMetadata { blocks: 5, reload: true }))
    );
    for bad in [
        "grow-metadata",
        "grow-metadata blocks=-1",
        "grow-metadata blocks=4294967296",
        "grow-metadata blocks=1 reload=1",
        "grow-metadata blocks=1 x",
    ] {
        let e = event_from_line(bad).unwrap_err().to_string();
        assert!(e.contains("grow-metadata blocks=N [reload]"), "{bad}: {e}");
    }
    // It belongs to thin traces: a thin run takes it, a cache run does not.
    let op = Op::GrowMetadata { blocks: 1, reload: false };
    assert_eq!(op.name(), "grow-metadata");
    assert_eq!(op.thin_error(), None);
    assert!(op.is_thin_only() && !op.is_cache_only());
    assert!(every_cache_event().ops().all(|op| !op.is_thin_only()));
}

/// The aimed faults (tag 0x13), text and binary, pinned byte for byte,
/// and their errors.
/// A binary trace with an empty header and `event` as its one event.
fn one(event: &[u8]) -> Vec<u8> {
    let mut b = b"DMTR\x01\x00\x00\x00\x01".to_vec();
    b.extend(event);
    b
}

#[test]
fn aim_fault_encodings() {
    let ops = [
        Op::AimFault { aim: FaultAim::Commit { request: 0 } },
        Op::AimFault { aim: FaultAim::Commit { request: 200 } },
        Op::AimFault { aim: FaultAim::Abort },
        Op::AimFault { aim: FaultAim::Passdown },
    ];
    let trace = Trace {
        header: Header { seed: 3, workload: "random".into(), params: vec![] },
        events: ops.into_iter().map(Event::Op).collect(),
    };
    let text = to_text(&trace);
    assert_eq!(
        text,
        "dmsim-trace 1\nseed 3\nworkload random\n\
         aim-fault commit request=0\n\
         aim-fault commit request=200\n\
         aim-fault abort\n\
         aim-fault passdown\n"
    );
    assert_eq!(from_text(&text).unwrap(), trace);
    let mut expected = b"DMTR\x01\x03\x06random\x00\x04".to_vec();
    expected.extend([0x13, 0x00, 0x00]);
    expected.extend([0x13, 0x00, 0xc8, 0x01]);
    expected.extend([0x13, 0x01]);
    expected.extend([0x13, 0x02]);
    let bytes = to_bytes(&trace);
    assert_eq!(hex(&bytes), hex(&expected));
    assert_eq!(from_bytes(&bytes).unwrap(), trace);
    for bad in [
        "aim-fault",
        "aim-fault commit",
        "aim-fault commit request=256",
        "aim-fault abort x",
        "aim-fault passdown x",
        "aim-fault passdown request=0",
        "aim-fault data",
        "aim-fault Passdown",
    ] {
        let e = event_from_line(bad).unwrap_err().to_string();
        assert!(
            e.contains("aim-fault commit request=N | aim-fault abort | aim-fault passdown"),
            "{bad}: {e}"
        );
    }
    let e = event_from_line("aim-fault discard").unwrap_err().to_string();
    assert!(e.contains("an aim: `commit`, `abort` or `passdown`, not \"discard\""), "{e}");
    for (event, expected) in [
        (&[0x13][..], "an aim (the input ended)"),
        (&[0x13, 0x03][..], "an aim byte (0 commit, 1 abort, 2 passdown), not 3"),
        (&[0x13, 0xff][..], "an aim byte (0 commit, 1 abort, 2 passdown), not 255"),
        (&[0x13, 0x00][..], "request (the input ended)"),
        (&[0x13, 0x00, 0x80, 0x02][..], "request in 0..=255"),
    ] {
        let msg = bin_err(&one(event)).to_string();
        assert!(msg.contains(expected), "{event:02x?}: {msg} should mention {expected:?}");
    }
    for aim in [FaultAim::Abort, FaultAim::Passdown] {
        let op = Op::AimFault { aim };
        assert_eq!(op.name(), "aim-fault");
        assert!(op.is_thin_only() && op.thin_error().is_none());
    }
    assert_eq!(FaultAim::Passdown.name(), "passdown");
    // A binary passdown aim carries nothing after its aim byte: the next
    // byte is the next event.
    let two = from_bytes(&one(&[0x13, 0x02])).unwrap();
    assert_eq!(two.events, vec![Event::Op(Op::AimFault { aim: FaultAim::Passdown })]);
}

#[test]
fn grow_metadata_binary_errors() {
    let cases: &[(&[u8], usize, &str)] = &[
        (&[0x12], 10, "blocks (the input ended)"),
        (&[0x12, 0x01], 11, "reload (the input ended)"),
        (&[0x12, 0x01, 0x02], 11, "reload: a bool byte 0 or 1, not 2"),
        (&[0x12, 0x80, 0x80, 0x80, 0x80, 0x10, 0x00], 10, "blocks in 0..=4294967295"),
        (&[0x12, 0x81, 0x00, 0x00], 10, "shortest form"),
    ];
    for &(event, offset, expected) in cases {
        let e = bin_err(&one(event));
        let msg = e.to_string();
        assert_eq!(e.location(), Location::Offset(offset), "{event:02x?}: {msg}");
        assert!(msg.contains(expected), "{event:02x?}: {msg} should mention {expected:?}");
    }
    for b in 0..=255u8 {
        let ev = [0x12, 0x01, b];
        match from_bytes(&one(&ev)) {
            Ok(t) => {
                assert!(b <= 1);
                assert_eq!(to_bytes(&t), one(&ev));
            }
            Err(_) => assert!(b > 1),
        }
    }
}

#[test]
fn empty_trace_round_trips() {
    let t = Trace::default();
    assert_eq!(to_text(&t), "dmsim-trace 1\nseed 0\nworkload \"\"\n");
    assert_eq!(from_text(&to_text(&t)).unwrap(), t);
    assert_eq!(from_bytes(&to_bytes(&t)).unwrap(), t);
}

#[test]
fn reader_accepts_comments_blank_lines_crlf_any_key_order_and_quoted_words() {
    let s = "# a trace\r\n\r\n  dmsim-trace 1   # version\r\nseed 7\r\nworkload \"random\"\r\n\
             param \"k\" v\r\n# ops\r\n\twrite preflush nr=8 fua sector=3 dev=1\r\ntick ms=\"5\"\r\n\
             done dev=2 read=\"\\u{48}i\" bio=1 \"ok\"";
    let t = from_text(s).unwrap();
    assert_eq!(
        t.header,
        Header { seed: 7, workload: "random".into(), params: vec![("k".into(), "v".into())] }
    );
    assert_eq!(
        t.events,
        vec![
            Event::Op(Op::Write { dev: 1, sector: 3, nr_sectors: 8, fua: true, preflush: true }),
            Event::Op(Op::Tick { millis: 5 }),
            Event::Done { bio: 1, dev: 2, result: "ok".into(), read: Some("Hi".into()) },
        ]
    );
    assert_eq!(event_from_line("   # nothing").unwrap(), None);
    assert_eq!(
        event_from_line("crash torn seed=9").unwrap(),
        Some(Event::Op(Op::Crash { mode: CrashMode::Torn, seed: 9 }))
    );
}

#[test]
fn lines_of_events() {
    let e = Event::Op(Op::Fault { disk: DiskId::Metadata, fault: DiskFault::Misdirect { offset: -8 } });
    assert_eq!(text::event_to_line(&e), "fault metadata misdirect offset=-8");
    assert_eq!(text::op_to_line(&Op::Crash { mode: CrashMode::Subset, seed: 17 }), "crash subset seed=17");
    assert_eq!(
        text::op_to_line(&Op::Reload { mode: CacheIoMode::Passthrough, policy: CachePolicyKind::Cleaner }),
        "reload mode=passthrough policy=cleaner"
    );
    assert_eq!(text::op_to_line(&Op::Invalidate { cblock: 12, nr: 3 }), "invalidate cblock=12 nr=3");
    assert_eq!(text::op_to_line(&Op::Status), "status");
    assert_eq!(
        text::op_to_line(&Op::Resize { cache_blocks: 16, origin_blocks: 200 }),
        "resize cache=16 origin=200"
    );
    let e = Event::FaultFired { disk: DiskId::Origin, what: "misdirect".into() };
    assert_eq!(text::event_to_line(&e), "fault-fired origin misdirect");
}

// --- errors -------------------------------------------------------------

fn text_err(s: &str) -> TraceError {
    from_text(s).expect_err("should not parse")
}

#[test]
fn unsupported_text_version_names_the_supported_one() {
    let e = text_err("# header\ndmsim-trace 2\nseed 0\nworkload x\n");
    assert_eq!(e, TraceError::UnsupportedVersion { at: Location::Line(2), found: "2".into(), supported: 1 });
    let msg = e.to_string();
    assert!(msg.contains("line 2") && msg.contains("version 2") && msg.contains("version 1"), "{msg}");
}

#[test]
fn unknown_event_names_its_line() {
    let e = text_err("dmsim-trace 1\nseed 0\nworkload x\nworker\nfrobnicate now\n");
    let msg = e.to_string();
    assert!(matches!(e, TraceError::Text { line: 5, .. }), "{e:?}");
    assert!(msg.contains("line 5") && msg.contains("frobnicate now") && msg.contains("an event"), "{msg}");
}

#[test]
fn specific_text_errors() {
    let h = "dmsim-trace 1\nseed 0\nworkload x\n";
    let cases: &[(&str, usize, &str)] = &[
        ("", 1, "dmsim-trace 1"),
        ("hello", 1, "dmsim-trace 1"),
        ("dmsim-trace 1\nworkload x\n", 2, "seed N"),
        ("dmsim-trace 1\nseed -1\n", 2, "a seed in"),
        ("dmsim-trace 1\nseed 1\n", 3, "workload"),
        ("dmsim-trace 1 extra\n", 1, "nothing more"),
        (&format!("{h}write dev=0 sector=1\n"), 4, "`nr=N`"),
        (&format!("{h}write dev=256 sector=1 nr=1\n"), 4, "0..=255"),
        (&format!("{h}write dev=0 dev=0 sector=1 nr=1\n"), 4, "only once"),
        (&format!("{h}write dev=0 sector=1 nr=1 fsync\n"), 4, "nothing more"),
        (&format!("{h}worker\nparam a b\n"), 5, "header"),
        (&format!("{h}mode \"unterminated\n"), 4, "closing"),
        (&format!("{h}mode \"bad \\q escape\"\n"), 4, "escape"),
        (&format!("{h}mode \"\\u{{d800}}\"\n"), 4, "unicode escape"),
        (&format!("{h}mode a\"b\"\n"), 4, "whitespace between tokens"),
        (&format!("{h}mode\n"), 4, "a pool mode"),
        (&format!("{h}tick ms=\n"), 4, "a value after `ms=`"),
        (&format!("{h}crash sometimes seed=1\n"), 4, "crash mode"),
        (&format!("{h}fault floppy read-error permanent\n"), 4, "`metadata` or `data`"),
        (&format!("{h}fault data read-error forever\n"), 4, "`permanent` or `transient`"),
        (&format!("{h}fault data misdirect offset=+-1\n"), 4, "offset="),
        (&format!("{h}crashed metadata=1 data=0/0\n"), 4, "separated by `/`"),
        (&format!("{h}dev=3\n"), 4, "an event"),
        (&format!("{h}fault cachedev read-error permanent\n"), 4, "`cache` or `origin`"),
        (&format!("{h}reload mode=writearound policy=smq\n"), 4, "not \"writearound\""),
        (&format!("{h}reload mode=writearound policy=smq\n"), 4, "a cache I/O mode: `writeback`"),
        (
            &format!("{h}reload mode=writeback policy=lru\n"),
            4,
            "a cache policy: `smq`, `cleaner`; not \"lru\"",
        ),
        (&format!("{h}reload mode=Writeback policy=smq\n"), 4, "not \"Writeback\""),
        (&format!("{h}reload policy=smq\n"), 4, "`mode=` a cache I/O mode"),
        (&format!("{h}reload mode=writeback\n"), 4, "`policy=` a cache policy"),
        (&format!("{h}reload writeback smq\n"), 4, "`mode=`"),
        (&format!("{h}reload mode=writeback policy=smq policy=smq\n"), 4, "only once"),
        (&format!("{h}reload mode=writeback policy=smq now\n"), 4, "nothing more"),
        (&format!("{h}invalidate cblock=1\n"), 4, "`nr=N`"),
        (&format!("{h}invalidate nr=1\n"), 4, "`cblock=N`"),
        (&format!("{h}invalidate cblock=1 nr=65536\n"), 4, "`nr=` a number in 0..=65535"),
        (&format!("{h}invalidate cblock=-1 nr=1\n"), 4, "`cblock=` a number in 0..=4294967295"),
        (&format!("{h}invalidate cblock=1 nr=1 dev=0\n"), 4, "nothing more, not `dev=`"),
        (&format!("{h}status now\n"), 4, "nothing more"),
        (&format!("{h}status x=1\n"), 4, "nothing more"),
        (&format!("{h}invalidate-cblocks cblock=1 nr=1\n"), 4, "reload, invalidate, status"),
        (&format!("{h}worker \u{7}\n"), 4, "not the character"),
    ];
    for &(input, line, expected) in cases {
        let e = text_err(input);
        let msg = e.to_string();
        assert_eq!(e.location(), Location::Line(line), "{input:?}: {msg}");
        assert!(msg.contains(&format!("line {line}")), "{input:?}: {msg}");
        assert!(msg.contains(expected), "{input:?}: {msg} should mention {expected:?}");
    }
}

fn bin_err(b: &[u8]) -> TraceError {
    from_bytes(b).expect_err("should not decode")
}

#[test]
fn specific_binary_errors() {
    let good = to_bytes(&every_event());
    // Truncated anywhere: the error is at (or before) the end of the input.
    for len in 0..good.len() {
        let e = bin_err(&good[..len]);
        match e.location() {
            Location::Offset(o) => assert!(o <= len, "{len}: {e}"),
            Location::Line(_) => panic!("{e}"),
        }
    }
    // The last string is one byte short: reported at its length.
    let e = bin_err(&good[..good.len() - 1]);
    assert!(
        e.to_string().contains("byte offset 373") && e.to_string().contains("only 74 bytes remain"),
        "{e}"
    );
    // A varint cut short: reported at the end of the input.
    let e = bin_err(b"DMTR\x01\x80");
    assert_eq!(e, TraceError::Binary { offset: 6, expected: "the seed (the input ended)".into() });
    assert_eq!(e.to_string(), "byte offset 6: expected the seed (the input ended)");

    let e = bin_err(b"JUNKJUNK");
    assert!(e.to_string().contains("byte offset 0") && e.to_string().contains("magic"), "{e}");

    let e = bin_err(b"DMTR\x02");
    assert_eq!(
        e,
        TraceError::UnsupportedVersion { at: Location::Offset(4), found: "2".into(), supported: 1 }
    );
    assert!(e.to_string().contains("version 1"), "{e}");

    let mut trailing = to_bytes(&Trace::default());
    trailing.push(0);
    let e = bin_err(&trailing);
    assert!(e.to_string().contains(&format!("byte offset {}", trailing.len() - 1)), "{e}");
    assert!(e.to_string().contains("end of the trace"), "{e}");

    // Hostile counts and lengths: rejected before any allocation.
    let mut huge = b"DMTR\x01\x00\x00".to_vec();
    huge.extend([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
    let e = bin_err(&huge);
    assert!(e.to_string().contains("byte offset 7") && e.to_string().contains("params"), "{e}");
    let e = bin_err(b"DMTR\x01\x00\xff\xff\xff\xff\x0f");
    assert!(e.to_string().contains("byte offset 6") && e.to_string().contains("string"), "{e}");

    // Non-canonical varint, bad tag, bad bool, out-of-range u8.
    let e = bin_err(b"DMTR\x81\x00");
    assert!(e.to_string().contains("shortest form"), "{e}");
    let e = bin_err(b"DMTR\x01\x00\x00\x00\x01\x7e");
    assert!(e.to_string().contains("byte offset 9") && e.to_string().contains("0x7e"), "{e}");
    let e = bin_err(b"DMTR\x01\x00\x00\x00\x01\x22\x00\x00\x00\x00\x02");
    assert!(e.to_string().contains("byte offset 14") && e.to_string().contains("bool"), "{e}");
    let e = bin_err(b"DMTR\x01\x00\x00\x00\x01\x04\x80\x02");
    assert!(e.to_string().contains("byte offset 10") && e.to_string().contains("0..=255"), "{e}");
    let e = bin_err(b"DMTR\x01\x00\x02\xc3\x28\x00\x00");
    assert!(e.to_string().contains("byte offset 7") && e.to_string().contains("UTF-8"), "{e}");
    assert_eq!(binary::MAGIC, *b"DMTR");
}

#[test]
fn cache_binary_errors() {
    // The header of a trace of one event, then the event.
    let cases: &[(&[u8], usize, &str)] = &[
        (
            &[0x0e, 0x03, 0x00],
            10,
            "a cache I/O mode 0 (writeback), 1 (writethrough) or 2 (passthrough), not 3",
        ),
        (&[0x0e, 0xff, 0x00], 10, "not 255"),
        (&[0x0e, 0x00, 0x02], 11, "a cache policy 0 (smq) or 1 (cleaner), not 2"),
        (&[0x0e], 10, "a cache I/O mode (the input ended)"),
        (&[0x0e, 0x01], 11, "a cache policy (the input ended)"),
        (&[0x0f, 0x80, 0x80, 0x80, 0x80, 0x10, 0x01], 10, "cblock in 0..=4294967295"),
        (&[0x0f, 0x01, 0x80, 0x80, 0x04], 11, "nr in 0..=65535, not 65536"),
        (&[0x0f, 0x01], 11, "nr (the input ended)"),
        (&[0x0f, 0x81, 0x00, 0x01], 10, "shortest form"),
        (&[0x0b, 0x04, 0x00, 0x00], 10, "0 (metadata), 1 (data), 2 (cache) or 3 (origin), not 4"),
        (&[0x21, 0x04, 0x00], 10, "2 (cache) or 3 (origin), not 4"),
        (&[0x11], 10, "cache blocks (the input ended)"),
        (&[0x11, 0x01], 11, "origin blocks (the input ended)"),
        (&[0x11, 0x80, 0x80, 0x80, 0x80, 0x10, 0x01], 10, "cache blocks in 0..=4294967295"),
        (&[0x14], 9, "an event tag (0x01..=0x13, 0x20..=0x24), not 0x14"),
        (&[0x1f], 9, "not 0x1f"),
        (&[0x25], 9, "not 0x25"),
        (&[0x10, 0x10], 10, "the end of the trace"),
    ];
    for &(event, offset, expected) in cases {
        let e = bin_err(&one(event));
        let msg = e.to_string();
        assert_eq!(e.location(), Location::Offset(offset), "{event:02x?}: {msg}");
        assert!(msg.contains(expected), "{event:02x?}: {msg} should mention {expected:?}");
    }
    // Every byte of the reload's mode and policy and of a disk: valid or an
    // error, never a panic, and what decodes re-encodes to itself.
    for b in 0..=255u8 {
        for ev in [[0x0e, b, 0x00], [0x0e, 0x00, b], [0x21, b, 0x00]] {
            if let Ok(t) = from_bytes(&one(&ev)) {
                assert_eq!(to_bytes(&t), one(&ev));
            }
        }
    }
    assert_eq!(from_bytes(&one(&[0x10])).unwrap().events, vec![Event::Op(Op::Status)]);
    assert_eq!(
        from_bytes(&one(&[0x11, 0x03, 0x80, 0x01])).unwrap().events,
        vec![Event::Op(Op::Resize { cache_blocks: 3, origin_blocks: 128 })]
    );
    // A size past u32, a truncated resize: errors, never panics.
    assert!(from_bytes(&one(&[0x11, 0x80, 0x80, 0x80, 0x80, 0x10, 0x00])).is_err());
    assert!(from_bytes(&one(&[0x11, 0x03])).is_err());
}

#[test]
fn unknown_cache_names_are_clipped() {
    let h = "dmsim-trace 1\nseed 0\nworkload x\n";
    let long = "w".repeat(10_000);
    for line in [
        format!("reload mode={long} policy=smq"),
        format!("reload mode=writeback policy={long}"),
        format!("fault {long} read-error permanent"),
    ] {
        let msg = text_err(&format!("{h}{line}\n")).to_string();
        assert!(msg.contains("(10000 bytes in all)"), "{}", &msg[..200]);
        // The message quotes the line clipped too: far shorter than the input.
        assert!(msg.len() < 1000, "{}", msg.len());
    }
}

// --- strategies ---------------------------------------------------------

fn tricky_char() -> impl Strategy<Value = char> {
    prop_oneof![
        prop::sample::select(vec![
            '"',
            '\\',
            '\n',
            '\r',
            '\t',
            ' ',
            '#',
            '=',
            '\0',
            '{',
            '}',
            'u',
            'a',
            '-',
            '/',
            'é',
            '✓',
            '\u{7}',
            '\u{85}',
            '\u{a0}',
            '\u{ad}',
            '\u{2028}',
            '\u{200b}',
            '\u{feff}',
            '\u{10ffff}',
        ]),
        any::<char>(),
    ]
}

fn string() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9_-]{0,10}",
        any::<String>(),
        prop::collection::vec(tricky_char(), 0..12).prop_map(|v| v.into_iter().collect()),
    ]
}

fn disk() -> impl Strategy<Value = DiskId> {
    prop::sample::select(DiskId::ALL.to_vec())
}

fn op() -> impl Strategy<Value = Op> {
    let fault = prop_oneof![
        any::<bool>().prop_map(|permanent| DiskFault::ReadError { permanent }),
        any::<bool>().prop_map(|permanent| DiskFault::WriteError { permanent }),
        any::<u32>().prop_map(|bit| DiskFault::BitFlip { bit }),
        any::<i32>().prop_map(|offset| DiskFault::Misdirect { offset }),
    ];
    prop_oneof![
        (any::<u8>(), any::<u32>(), any::<u16>(), any::<bool>(), any::<bool>()).prop_map(
            |(dev, sector, nr_sectors, fua, preflush)| Op::Write { dev, sector, nr_sectors, fua, preflush }
        ),
        (any::<u8>(), any::<u32>(), any::<u16>()).prop_map(|(dev, sector, nr_sectors)| Op::Read {
            dev,
            sector,
            nr_sectors
        }),
        (any::<u8>(), any::<u32>(), any::<u32>()).prop_map(|(dev, sector, nr_sectors)| Op::Discard {
            dev,
            sector,
            nr_sectors
        }),
        any::<u8>().prop_map(|dev| Op::Flush { dev }),
        Just(Op::CreateThin),
        any::<u8>().prop_map(|origin| Op::CreateSnap { origin }),
        any::<u8>().prop_map(|dev| Op::Delete { dev }),
        Just(Op::Worker),
        any::<u8>().prop_map(|pick| Op::Complete { pick }),
        any::<u8>().prop_map(|pick| Op::FailIo { pick }),
        (disk(), fault).prop_map(|(disk, fault)| Op::Fault { disk, fault }),
        any::<u16>().prop_map(|millis| Op::Tick { millis }),
        (prop::sample::select(CrashMode::ALL.to_vec()), any::<u32>())
            .prop_map(|(mode, seed)| Op::Crash { mode, seed }),
        (
            prop::sample::select(CacheIoMode::ALL.to_vec()),
            prop::sample::select(CachePolicyKind::ALL.to_vec())
        )
            .prop_map(|(mode, policy)| Op::Reload { mode, policy }),
        (any::<u32>(), any::<u16>()).prop_map(|(cblock, nr)| Op::Invalidate { cblock, nr }),
        Just(Op::Status),
        (any::<u32>(), any::<u32>())
            .prop_map(|(cache_blocks, origin_blocks)| Op::Resize { cache_blocks, origin_blocks }),
        (any::<u32>(), any::<bool>()).prop_map(|(blocks, reload)| Op::GrowMetadata { blocks, reload }),
        any::<u8>().prop_map(|request| Op::AimFault { aim: FaultAim::Commit { request } }),
        Just(Op::AimFault { aim: FaultAim::Abort }),
        Just(Op::AimFault { aim: FaultAim::Passdown }),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        4 => op().prop_map(Event::Op),
        1 => (any::<u64>(), any::<u32>(), string(), prop::option::of(string()))
            .prop_map(|(bio, dev, result, read)| Event::Done { bio, dev, result, read }),
        1 => (disk(), string()).prop_map(|(disk, what)| Event::FaultFired { disk, what }),
        1 => (any::<(u32, u32)>(), any::<(u32, u32)>(), any::<bool>())
            .prop_map(|(metadata, data, torn)| Event::Crashed { metadata, data, torn }),
        1 => string().prop_map(Event::Mode),
        1 => (string(), string()).prop_map(|(kind, message)| Event::Violation { kind, message }),
    ]
}

fn trace() -> impl Strategy<Value = Trace> {
    (
        any::<u64>(),
        string(),
        prop::collection::vec((string(), string()), 0..4),
        prop::collection::vec(event(), 0..24),
    )
        .prop_map(|(seed, workload, params, events)| Trace {
            header: Header { seed, workload, params },
            events,
        })
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, rng_seed: RngSeed::Fixed(0), ..ProptestConfig::default() }
}

/// Every line of a written trace is a single line and shows no raw control
/// or invisible characters.
fn assert_printable(text: &str) {
    for line in text.lines() {
        assert!(
            line.chars().all(|c| c == ' ' || !(c.is_control() || c.is_whitespace() || c == '\u{feff}')),
            "{line:?}"
        );
    }
}

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn text_round_trips(t in trace()) {
        let text = to_text(&t);
        assert_printable(&text);
        prop_assert_eq!(text.lines().count(), 3 + t.header.params.len() + t.events.len());
        prop_assert_eq!(from_text(&text).unwrap(), t.clone());
        // CRLF line ends read the same.
        prop_assert_eq!(from_text(&text.replace('\n', "\r\n")).unwrap(), t);
    }

    #[test]
    fn binary_round_trips(t in trace()) {
        let bytes = to_bytes(&t);
        prop_assert_eq!(from_bytes(&bytes).unwrap(), t);
    }

    #[test]
    fn arbitrary_text_never_panics(s in string(), body in prop::collection::vec(string(), 0..6)) {
        let _ = from_text(&s);
        let with_header = format!("dmsim-trace 1\nseed 1\nworkload w\n{}", body.join("\n"));
        let _ = from_text(&with_header);
        let _ = event_from_line(&s);
    }

    #[test]
    fn arbitrary_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = from_bytes(&b);
        let mut prefixed = b"DMTR\x01".to_vec();
        prefixed.extend(&b);
        if let Ok(t) = from_bytes(&prefixed) {
            prop_assert_eq!(to_bytes(&t), prefixed);
        }
    }

    #[test]
    fn damaged_text_never_panics(t in trace(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let text = to_text(&t);
        // Truncated at any character boundary.
        let cut = at.index(text.len() + 1);
        let cut = (0..=cut).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
        let _ = from_text(&text[..cut]);
        // One byte changed.
        let mut bytes = text.clone().into_bytes();
        if !bytes.is_empty() {
            let i = at.index(bytes.len());
            bytes[i] ^= byte | 1;
        }
        let _ = from_text(&String::from_utf8_lossy(&bytes));
        // One line deleted, or duplicated.
        let lines: Vec<&str> = text.lines().collect();
        let i = at.index(lines.len());
        let mut deleted = lines.clone();
        deleted.remove(i);
        let r = from_text(&deleted.join("\n"));
        if i < 3 {
            prop_assert!(r.is_err(), "removing header line {} should fail", i + 1);
        }
        let mut doubled = lines.clone();
        doubled.insert(i, lines[i]);
        let _ = from_text(&doubled.join("\n"));
    }

    #[test]
    fn damaged_binary_never_panics(t in trace(), at in any::<prop::sample::Index>(), byte in 1u8..=255) {
        let bytes = to_bytes(&t);
        // Any truncation is an error (counts and lengths are explicit).
        let cut = at.index(bytes.len());
        prop_assert!(from_bytes(&bytes[..cut]).is_err());
        // One byte changed or deleted: an error, or a trace that re-encodes
        // to exactly the damaged bytes (the decoder accepts canonical input
        // only).
        let mut flipped = bytes.clone();
        flipped[cut] ^= byte;
        if let Ok(t2) = from_bytes(&flipped) {
            prop_assert_eq!(to_bytes(&t2), flipped);
        }
        let mut deleted = bytes.clone();
        deleted.remove(cut);
        if let Ok(t2) = from_bytes(&deleted) {
            prop_assert_eq!(to_bytes(&t2), deleted);
        }
    }
}

/// The example at the top of the format's reference (the text module's
/// documentation) parses.
#[test]
fn module_doc_example_parses() {
    let src = include_str!("../src/text.rs");
    let example: String = src
        .lines()
        .skip_while(|l| *l != "//! ```text")
        .skip(1)
        .take_while(|l| *l != "//! ```")
        .map(|l| format!("{}\n", l.strip_prefix("//! ").unwrap_or("")))
        .collect();
    let t = from_text(&example).unwrap();
    assert_eq!(t.header.param("note"), Some("two words, and a \"quote\""));
    assert_eq!(t.events.len(), 10);
    assert_eq!(t.violation(), Some(("oracle", "dev 0 sector 256: wrong data")));
}
