//! The engine as a server ([`serve`], [`EngineClient`]), natively on the
//! host: the pool on files, its control socket, pool messages and status,
//! refusals with the kernel's errnos, hostile request lines, a clean stop
//! whose metadata the checker accepts. Serving thin devices needs ublk,
//! which this host does not have: that runs in the VM (kernel-shim's
//! engine tests); here an activation must fail with a clear error.

use std::path::PathBuf;
use std::time::Duration;

use dmsim_engine::{serve, EngineClient, EngineConfig, EngineError, UringDevice};
use dmsim_model::block_device::MemDevice;
use dmsim_model::errno::Errno;
use dmsim_model::thin::check::{check_thin_metadata, CheckOptions};
use dmsim_model::thin::dump::read_devices;
use proptest::prelude::*;

/// Files of one engine under Cargo's scratch folder, removed on drop.
struct Files {
    metadata: PathBuf,
    data: PathBuf,
    socket: PathBuf,
}

impl Files {
    fn new(name: &str) -> Files {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let p = |what: &str| dir.join(format!("engine-{}-{name}.{what}", std::process::id()));
        let f = Files { metadata: p("meta"), data: p("data"), socket: p("sock") };
        drop(UringDevice::create(&f.metadata, 8192).expect("metadata file"));
        drop(UringDevice::create(&f.data, 64 * 128).expect("data file"));
        f
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        for p in [&self.metadata, &self.data, &self.socket] {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Starts an engine on `files` (a new pool) on a thread; its client.
fn start(files: &Files) -> (EngineClient, std::thread::JoinHandle<Result<(), EngineError>>) {
    start_with(files, |_| {})
}

/// [`start`], `tweak` changing the configuration first.
fn start_with(
    files: &Files,
    tweak: impl FnOnce(&mut EngineConfig),
) -> (EngineClient, std::thread::JoinHandle<Result<(), EngineError>>) {
    let mut config = EngineConfig::new(&files.metadata, &files.data, "128 0 0", &files.socket);
    config.format = true;
    tweak(&mut config);
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || serve(&config, move || tx.send(()).expect("ready")));
    rx.recv_timeout(Duration::from_secs(30)).expect("the engine comes up");
    (EngineClient::new(&files.socket), thread)
}

fn refused(r: Result<String, EngineError>) -> (Errno, String) {
    match r {
        Err(EngineError::Refused { errno, message }) => (errno, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn messages_status_and_a_clean_stop_leave_metadata_the_checker_accepts() {
    let files = Files::new("messages");
    let (client, thread) = start(&files);
    assert_eq!(client.request("ping").expect("ping"), std::process::id().to_string());
    client.request("message create_thin 0").expect("create 0");
    client.request("message create_snap 1 0").expect("snapshot 1 of 0");
    // The kernel's errnos for what the pool refuses.
    assert_eq!(refused(client.request("message create_thin 0")).0, Errno::EEXIST);
    assert_eq!(refused(client.request("message delete 7")).0, Errno::ENODATA);
    assert_eq!(refused(client.request("message frobnicate")).0, Errno::EINVAL);
    // The status line of a thin-pool: transaction 0, metadata and data
    // used/total, held root, rw.
    let status = client.request("status noflush").expect("status");
    let words: Vec<&str> = status.split_whitespace().collect();
    assert_eq!(words[0], "0", "{status}");
    assert!(words[1].contains('/') && words[2] == "0/64", "{status}");
    assert!(words.contains(&"rw"), "{status}");
    client.request("message set_transaction_id 0 5").expect("transaction id");
    assert!(client.request("status").expect("status").starts_with("5 "));
    // Activation needs ublk; this host has none: a clear error, no device.
    if !std::path::Path::new("/dev/ublk-control").exists() {
        let e = client.request("activate 0 8192").expect_err("no ublk here");
        assert!(e.to_string().contains("ublk_drv"), "{e}");
        assert_eq!(client.request("devices").expect("devices"), "");
    }
    assert_eq!(client.request("stop").expect("stop"), "closed");
    thread.join().expect("the engine thread").expect("the engine stops cleanly");
    assert!(!files.socket.exists(), "the socket is removed");
    assert!(client.request("ping").is_err(), "nobody answers after the stop");
    assert_checks_clean_with_devices(&files, &[0, 1]);
}

/// The engine's metadata file after its stop: the checker finds it
/// clean, and it holds exactly the thin devices `ids`.
fn assert_checks_clean_with_devices(files: &Files, ids: &[u64]) {
    let image = std::fs::read(&files.metadata).expect("metadata");
    let report = check_thin_metadata(&mut MemDevice::from_bytes(image.clone()), &CheckOptions::default())
        .expect("the checker runs");
    assert!(report.is_clean(), "{:?}", report.problems);
    let devices = read_devices(&mut MemDevice::from_bytes(image)).expect("dump");
    assert_eq!(devices.keys().copied().collect::<Vec<_>>(), ids);
}

/// The status line's metadata blocks: (used, total).
fn metadata_blocks(status: &str) -> (u64, u64) {
    let word = status.split_whitespace().nth(1).expect("a metadata word");
    let (used, total) = word.split_once('/').expect("used/total");
    (used.parse().expect("used"), total.parse().expect("total"))
}

#[test]
fn the_metadata_device_grows_on_request_and_checks_clean() {
    // The file has 8,192 sectors; the pool is shown 4,096 of them.
    let files = Files::new("grow");
    let (client, thread) = start_with(&files, |c| c.metadata_sectors = Some(4096));
    client.request("message create_thin 0").expect("create 0");
    let before = metadata_blocks(&client.request("status noflush").expect("status"));
    assert_eq!(before.1, 512, "4,096 sectors are 512 metadata blocks");
    assert_eq!(client.request("grow-metadata 6144").expect("grow"), "");
    let after = metadata_blocks(&client.request("status noflush").expect("status"));
    assert_eq!(after.1, 768, "the space map grew with the device");
    assert_eq!(client.request("grow-metadata 8192 reload").expect("grow and reload"), "");
    assert_eq!(metadata_blocks(&client.request("status").expect("status")).1, 1024);
    // Past the file, or a word too many: refused, and the pool serves on.
    let (errno, message) = refused(client.request("grow-metadata 16384"));
    assert_eq!(errno, Errno::EINVAL, "{message}");
    assert!(message.contains("16384"), "{message}");
    assert_eq!(refused(client.request("grow-metadata 8192 frob")).0, Errno::EINVAL);
    client.request("message create_thin 1").expect("the pool still takes messages");
    assert_eq!(client.request("stop").expect("stop"), "closed");
    thread.join().expect("the engine's thread").expect("a clean stop");
    assert_checks_clean_with_devices(&files, &[0, 1]);
}

#[test]
fn the_trace_clock_moves_only_when_told() {
    let files = Files::new("trace-clock");
    let (client, thread) = start_with(&files, |c| c.trace_clock = Some(2_000_000_000));
    client.request("message create_thin 0").expect("create 0");
    assert_eq!(client.request("time").expect("time"), "2000000000");
    assert_eq!(client.request("advance 3000000000").expect("advance"), "5000000000");
    // Real time passing moves nothing.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(client.request("advance 0").expect("advance"), "5000000000");
    assert_eq!(client.request("time").expect("time"), "5000000000");
    // A commit asked of a pool with nothing to commit changes nothing:
    // answered with the time, which it does not move.
    let before = std::fs::read(&files.metadata).expect("the metadata");
    assert_eq!(client.request("commit").expect("commit"), "5000000000");
    assert_eq!(std::fs::read(&files.metadata).expect("the metadata"), before);
    for bad in ["advance soon", "advance", "advance -1", "time 5", "commit now"] {
        assert_eq!(refused(client.request(bad)).0, Errno::EINVAL, "{bad}");
    }
    client.request("stop").expect("stop");
    thread.join().expect("the engine's thread").expect("a clean stop");

    // An engine on real time refuses to be told the time.
    let files = Files::new("real-clock");
    let (client, thread) = start(&files);
    let (errno, message) = refused(client.request("advance 5000000000"));
    assert_eq!(errno, Errno::EINVAL);
    assert!(message.contains("real time"), "{message}");
    client.request("stop").expect("stop");
    thread.join().expect("the engine's thread").expect("a clean stop");
}

#[test]
fn malformed_requests_get_errors_and_the_engine_keeps_serving() {
    let files = Files::new("malformed");
    let (client, thread) = start(&files);
    for line in
        ["", "status loudly", "activate", "activate x 8", "activate 0", "deactivate 3", "message", "launch"]
    {
        let e = client.request(line).expect_err(line);
        let text = e.to_string();
        assert!(!text.is_empty(), "{line:?}");
    }
    assert!(client.request("deactivate 3").expect_err("not served").to_string().contains("not served"));
    client.request("ping").expect("still serving");
    client.request("stop").expect("stop");
    thread.join().expect("thread").expect("clean stop");
}

#[test]
fn a_missing_device_or_a_bad_table_is_a_clear_error() {
    let files = Files::new("bad");
    let missing = files.metadata.with_extension("missing");
    let config = EngineConfig::new(&missing, &files.data, "128 0 0", &files.socket);
    let e = serve(&config, || panic!("never ready")).expect_err("no metadata file");
    assert!(e.to_string().contains("missing"), "{e}");
    let config = EngineConfig::new(&files.metadata, &files.data, "128 zero 0", &files.socket);
    let e = serve(&config, || panic!("never ready")).expect_err("a bad table");
    assert!(e.to_string().contains("table"), "{e}");
    assert!(!files.socket.exists());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Hostile request lines: each gets an answer, none stops or breaks
    /// the engine.
    #[test]
    fn hostile_request_lines_never_break_the_engine(lines in prop::collection::vec("[ -~]{0,40}", 1..12)) {
        let files = Files::new("hostile");
        let (client, thread) = start(&files);
        for line in lines.iter().filter(|l| l.trim() != "stop") {
            let _ = client.request(line);
        }
        prop_assert!(client.request("ping").is_ok());
        prop_assert_eq!(client.request("stop").expect("stop"), "closed");
        prop_assert!(thread.join().expect("thread").is_ok());
    }
}
