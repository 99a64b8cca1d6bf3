//! The thin-pool target end to end on in-memory devices: provisioning and
//! zeroing, snapshots and breaking sharing, discards with and without
//! passdown, FLUSH/FUA commits, running out of data space, messages and
//! status lines in the kernel's format.

use dmsim_model::block_device::MemDevice;
use dmsim_model::errno::Errno;
use dmsim_model::thin::check::{check_thin_metadata, CheckOptions};
use dmsim_model::thin::metadata::ThinMetadata;
use dmsim_model::thin::mode::PoolMode;
use dmsim_model::thin::pool::{BioId, BioRequest, Completion, Pool, PoolOptions};
use dmsim_model::thin::table::{PoolFeatures, PoolTable};

const BLOCK: u64 = 128;
const GARBAGE: u8 = 0xa7;

fn table(features: PoolFeatures) -> PoolTable {
    PoolTable {
        metadata_dev: "/dev/meta".into(),
        data_dev: "/dev/data".into(),
        data_block_size: BLOCK as u32,
        low_water_mark: 2,
        features,
    }
}

/// A pool of `blocks` data blocks whose data device starts full of garbage,
/// so that anything not zeroed shows.
fn pool_with(blocks: u64, features: PoolFeatures, options: PoolOptions) -> Pool<MemDevice, MemDevice> {
    let mut data = MemDevice::new(blocks * BLOCK);
    data.as_bytes_mut().fill(GARBAGE);
    Pool::create(table(features), blocks * BLOCK, MemDevice::new(8192), data, options).expect("pool loads")
}

fn pool(blocks: u64) -> Pool<MemDevice, MemDevice> {
    pool_with(blocks, PoolFeatures::default(), PoolOptions::default())
}

/// Runs the worker and completes data I/O (oldest first) until nothing is
/// left to do; returns what completed.
fn settle(pool: &Pool<MemDevice, MemDevice>) -> Vec<Completion> {
    let mut done = Vec::new();
    for _ in 0..10_000 {
        done.extend(pool.take_completions());
        if pool.worker_wanted() {
            pool.run_worker();
            continue;
        }
        match pool.in_flight_io().first() {
            Some(io) => pool.complete_io(io.id).unwrap(),
            None => {
                done.extend(pool.take_completions());
                return done;
            }
        }
    }
    panic!("the pool never settled");
}

fn io(pool: &Pool<MemDevice, MemDevice>, thin: u64, req: BioRequest) -> Completion {
    let id = pool.submit(thin, req).expect("submitted");
    let done = settle(pool);
    done.into_iter().find(|c| c.id == id).expect("request completed")
}

fn write(pool: &Pool<MemDevice, MemDevice>, thin: u64, sector: u64, sectors: u64, byte: u8) {
    let c = io(pool, thin, BioRequest::write(sector, vec![byte; (sectors * 512) as usize]));
    assert_eq!(c.result, Ok(()), "write failed");
}

fn read(pool: &Pool<MemDevice, MemDevice>, thin: u64, sector: u64, sectors: u64) -> Vec<u8> {
    let c = io(pool, thin, BioRequest::read(sector, sectors));
    assert_eq!(c.result, Ok(()), "read failed");
    c.data
}

fn with_thin(blocks: u64) -> Pool<MemDevice, MemDevice> {
    let p = pool(blocks);
    p.message("create_thin 0").unwrap();
    p.activate_thin(0, 64 * BLOCK).unwrap();
    p
}

fn assert_metadata_clean(pool: &Pool<MemDevice, MemDevice>) {
    pool.with_metadata(|md| md.commit().unwrap());
    let image =
        pool.with_metadata(|md| md.transaction_manager().block_manager().device().as_bytes().to_vec());
    let mut dev = MemDevice::from_bytes(image);
    let report = check_thin_metadata(&mut dev, &CheckOptions::default()).expect("checkable");
    assert!(report.is_clean(), "metadata not clean:\n{report:?}");
}

#[test]
fn unprovisioned_reads_are_zero_and_writes_read_back() {
    let p = with_thin(16);
    assert!(read(&p, 0, 0, 300).iter().all(|&b| b == 0));
    write(&p, 0, 100, 200, 0x11);
    let back = read(&p, 0, 0, 400);
    assert!(back[..100 * 512].iter().all(|&b| b == 0), "zeroed head");
    assert!(back[100 * 512..300 * 512].iter().all(|&b| b == 0x11));
    assert!(back[300 * 512..].iter().all(|&b| b == 0), "zeroed tail, never the garbage");
    // Three blocks were provisioned: 0, 1 and 2.
    assert_eq!(p.thin_status(0).unwrap(), format!("{} {}", 3 * BLOCK, 3 * BLOCK - 1));
    assert_metadata_clean(&p);
}

#[test]
fn skip_block_zeroing_shows_stale_data() {
    let p = pool_with(
        16,
        PoolFeatures { skip_block_zeroing: true, ..PoolFeatures::default() },
        PoolOptions::default(),
    );
    p.message("create_thin 0").unwrap();
    p.activate_thin(0, 16 * BLOCK).unwrap();
    write(&p, 0, 0, 1, 0x22);
    let back = read(&p, 0, 0, 2);
    assert!(back[..512].iter().all(|&b| b == 0x22));
    assert!(back[512..].iter().all(|&b| b == GARBAGE), "the rest of the block was not zeroed");
}

#[test]
fn snapshots_keep_the_old_data_and_sharing_breaks_on_write() {
    let p = with_thin(16);
    write(&p, 0, 0, 2 * BLOCK, 0x01);
    p.message("create_snap 1 0").unwrap();
    p.activate_thin(1, 64 * BLOCK).unwrap();
    // Partial write to the origin: the shared block is copied first.
    write(&p, 0, 10, 1, 0x02);
    // Whole-block write to the snapshot: no copy needed.
    write(&p, 1, BLOCK, BLOCK, 0x03);
    let origin = read(&p, 0, 0, 2 * BLOCK);
    let snap = read(&p, 1, 0, 2 * BLOCK);
    assert!(origin[10 * 512..11 * 512].iter().all(|&b| b == 0x02));
    assert!(origin[..10 * 512].iter().chain(&origin[11 * 512..]).all(|&b| b == 0x01));
    assert!(snap[..BLOCK as usize * 512].iter().all(|&b| b == 0x01));
    assert!(snap[BLOCK as usize * 512..].iter().all(|&b| b == 0x03));
    // Two shared blocks, then one copy each way: four data blocks in use.
    let used = p.with_metadata(|md| (0..16).filter(|&b| md.data_block_count(b).unwrap() > 0).count());
    assert_eq!(used, 4);
    assert_metadata_clean(&p);
}

#[test]
fn whole_block_discards_unmap_and_partial_ones_do_nothing() {
    for passdown in [true, false] {
        let features = PoolFeatures { no_discard_passdown: !passdown, ..PoolFeatures::default() };
        let p = pool_with(16, features, PoolOptions::default());
        p.message("create_thin 0").unwrap();
        p.activate_thin(0, 16 * BLOCK).unwrap();
        write(&p, 0, 0, 4 * BLOCK, 0x05);
        // Covers block 1 fully, blocks 0 and 2 partly.
        assert_eq!(io(&p, 0, BioRequest::discard(BLOCK - 1, BLOCK + 2)).result, Ok(()));
        let back = read(&p, 0, 0, 4 * BLOCK);
        let b = BLOCK as usize * 512;
        assert!(back[..b].iter().all(|&x| x == 0x05));
        assert!(back[b..2 * b].iter().all(|&x| x == 0), "block 1 unmapped");
        assert!(back[2 * b..].iter().all(|&x| x == 0x05));
        assert_eq!(p.thin_status(0).unwrap(), format!("{} {}", 3 * BLOCK, 4 * BLOCK - 1));
        // A discard inside one block is ignored.
        assert_eq!(io(&p, 0, BioRequest::discard(1, 10)).result, Ok(()));
        assert!(read(&p, 0, 0, 12).iter().all(|&x| x == 0x05));
        assert_metadata_clean(&p);
    }
}

#[test]
fn passdown_does_not_discard_blocks_a_snapshot_still_maps() {
    let p = with_thin(16);
    write(&p, 0, 0, BLOCK, 0x06);
    p.message("create_snap 1 0").unwrap();
    p.activate_thin(1, 64 * BLOCK).unwrap();
    assert_eq!(io(&p, 0, BioRequest::discard(0, BLOCK)).result, Ok(()));
    assert!(read(&p, 0, 0, BLOCK).iter().all(|&b| b == 0));
    assert!(read(&p, 1, 0, BLOCK).iter().all(|&b| b == 0x06), "the snapshot keeps its data");
    assert_metadata_clean(&p);
}

#[test]
fn fua_and_flush_commit_before_completing() {
    let p = with_thin(16);
    let tid = |p: &Pool<MemDevice, MemDevice>| {
        p.with_metadata(|md| {
            let dev = md.transaction_manager().block_manager().device().as_bytes().to_vec();
            let mut md2 = ThinMetadata::open(MemDevice::from_bytes(dev), BLOCK as u32, false).unwrap();
            md2.open_thin(0).unwrap();
            md2.find_block(0, 0).unwrap()
        })
    };
    write(&p, 0, 0, 8, 0x07);
    assert_eq!(tid(&p), None, "nothing committed yet");
    let c = io(&p, 0, BioRequest::write(8, vec![0x08; 512]).with_fua());
    assert_eq!(c.result, Ok(()));
    assert!(tid(&p).is_some(), "the FUA write's completion waited for a commit");

    let p = with_thin(16);
    write(&p, 0, 0, 8, 0x07);
    assert_eq!(io(&p, 0, BioRequest::flush()).result, Ok(()));
    assert!(tid(&p).is_some(), "the flush committed");
}

#[test]
fn commits_happen_periodically() {
    let p = with_thin(16);
    write(&p, 0, 0, 8, 0x07);
    let committed = |p: &Pool<MemDevice, MemDevice>| p.with_metadata(|md| !md.changed_this_transaction());
    assert!(!committed(&p));
    p.set_time(500_000_000);
    settle(&p);
    assert!(!committed(&p), "not yet a second");
    p.set_time(1_000_000_001);
    assert!(p.worker_wanted());
    settle(&p);
    assert!(committed(&p));
}

/// With timed commits off (how a kernel replay follows the kernel's own
/// commits), the period passing commits nothing; a requested commit does,
/// once, and only a changed transaction.
#[test]
fn without_timed_commits_only_a_requested_commit_commits() {
    let p = pool_with(
        16,
        PoolFeatures::default(),
        PoolOptions { timed_commits: false, ..PoolOptions::default() },
    );
    p.message("create_thin 0").unwrap();
    p.activate_thin(0, 64 * BLOCK).unwrap();
    write(&p, 0, 0, 8, 0x07);
    let committed = |p: &Pool<MemDevice, MemDevice>| p.with_metadata(|md| !md.changed_this_transaction());
    p.set_time(5_000_000_000);
    settle(&p);
    assert!(!committed(&p), "the period passed, and the timer is off");
    p.request_commit();
    assert!(p.worker_wanted(), "a requested commit wakes the worker");
    settle(&p);
    assert!(committed(&p));
    // Turned on again, the timer commits as before.
    write(&p, 0, 8, 8, 0x08);
    p.set_timed_commits(true);
    p.set_time(10_000_000_000);
    settle(&p);
    assert!(committed(&p));
}

#[test]
fn running_out_of_data_space_queues_then_resumes_after_growth() {
    let p = with_thin(2);
    write(&p, 0, 0, 2 * BLOCK, 0x09);
    let events = p.events();
    let id = p.submit(0, BioRequest::write(2 * BLOCK, vec![0x0a; 512])).unwrap();
    assert!(settle(&p).is_empty(), "the write is queued, not failed");
    assert_eq!(p.mode(), PoolMode::OutOfDataSpace);
    assert!(p.status(true).contains(" out_of_data_space "), "{}", p.status(true));
    assert!(p.events() > events);
    // Grow the pool: suspend, a bigger data device, reload, resume.
    p.suspend().unwrap();
    p.with_data_device(|d| {
        let mut bytes = d.as_bytes().to_vec();
        bytes.resize((4 * BLOCK * 512) as usize, GARBAGE);
        *d = MemDevice::from_bytes(bytes);
    });
    p.reload_and_resume(4 * BLOCK).unwrap();
    assert_eq!(p.mode(), PoolMode::Write);
    let done = settle(&p);
    assert_eq!(done.iter().map(|c| (c.id, c.result)).collect::<Vec<_>>(), vec![(id, Ok(()))]);
    assert_eq!(read(&p, 0, 2 * BLOCK, 1), vec![0x0a; 512]);
    assert!(p.status(false).contains(" 3/4 "), "{}", p.status(false));
    assert_metadata_clean(&p);
}

/// A one-block pool with `error_if_no_space`, its block mapped by thin
/// device 0's block 0 (written with 1s).
fn full_pool_erroring_if_no_space() -> Pool<MemDevice, MemDevice> {
    let p = pool_with(
        1,
        PoolFeatures { error_if_no_space: true, ..PoolFeatures::default() },
        PoolOptions::default(),
    );
    p.message("create_thin 0").unwrap();
    p.activate_thin(0, 4 * BLOCK).unwrap();
    write(&p, 0, 0, BLOCK, 1);
    p
}

#[test]
fn error_if_no_space_fails_writes_with_enospc() {
    let p = full_pool_erroring_if_no_space();
    let c = io(&p, 0, BioRequest::write(BLOCK, vec![2; 512]));
    assert_eq!(c.result, Err(Errno::ENOSPC));
    // Writes to the mapped block still work; reads too.
    write(&p, 0, 0, 1, 3);
    assert_eq!(read(&p, 0, 0, 1), vec![3; 512]);
}

#[test]
fn the_no_space_timeout_fails_queued_writes() {
    let p = with_thin(1);
    write(&p, 0, 0, BLOCK, 1);
    let id = p.submit(0, BioRequest::write(BLOCK, vec![2; 512])).unwrap();
    assert!(settle(&p).is_empty());
    let deadline = p.no_space_deadline().expect("timer armed");
    p.set_time(deadline);
    let done = settle(&p);
    assert_eq!(done.len(), 1);
    assert_eq!((done[0].id, done[0].result), (id, Err(Errno::ENOSPC)));
    assert!(p.status(true).contains(" error_if_no_space "));
}

#[test]
fn messages_follow_the_kernel() {
    let p = with_thin(4);
    let errno = |r: Result<(), dmsim_model::thin::pool::TargetError>| r.unwrap_err().errno;
    assert_eq!(errno(p.message("create_thin 0")), Errno::EEXIST);
    assert_eq!(errno(p.message("create_snap 2 7")), Errno::ENODATA);
    assert_eq!(errno(p.message("delete 0")), Errno::EBUSY, "deleting an active device");
    assert_eq!(errno(p.message("delete 9")), Errno::ENODATA);
    assert_eq!(errno(p.message("set_transaction_id 5 6")), Errno::EINVAL);
    p.message("set_transaction_id 0 6").unwrap();
    assert_eq!(errno(p.message("release_metadata_snap")), Errno::EINVAL);
    p.message("reserve_metadata_snap").unwrap();
    assert_eq!(errno(p.message("reserve_metadata_snap")), Errno::EBUSY);
    assert_eq!(errno(p.message("create_thin")), Errno::EINVAL);
    assert_eq!(errno(p.message("frobnicate 1")), Errno::EINVAL);
    let status = p.status(false);
    let fields: Vec<&str> = status.split(' ').collect();
    assert_eq!(fields[0], "6", "{status}");
    assert_ne!(fields[3], "-", "held root shown: {status}");
    p.message("release_metadata_snap").unwrap();
    p.message("create_thin 1").unwrap();
    p.message("delete 1").unwrap();
    assert_metadata_clean(&p);
}

#[test]
fn status_line_has_the_kernel_shape() {
    let p = with_thin(16);
    write(&p, 0, 0, BLOCK, 1);
    let s = p.status(false);
    // 0 <used>/<total> 1/16 - rw discard_passdown queue_if_no_space - <lowat>
    let f: Vec<&str> = s.split(' ').collect();
    assert_eq!(f.len(), 10, "{s:?}");
    assert_eq!(
        (f[0], f[2], f[3], f[4], f[5], f[6], f[7]),
        ("0", "1/16", "-", "rw", "discard_passdown", "queue_if_no_space", "-")
    );
    assert!(s.ends_with(' '));
}

#[test]
fn close_commits_and_the_metadata_reopens() {
    let p = with_thin(16);
    write(&p, 0, 0, BLOCK, 1);
    let (meta, _data) = p.close().expect("closes");
    let mut md = ThinMetadata::open(meta, BLOCK as u32, false).unwrap();
    md.open_thin(0).unwrap();
    assert!(md.find_block(0, 0).unwrap().is_some());
}

#[test]
fn requests_are_validated() {
    let p = with_thin(4);
    assert!(p.submit(0, BioRequest::read(64 * BLOCK, 1)).is_err());
    assert!(p.submit(5, BioRequest::read(0, 1)).is_err());
    assert!(p.submit(0, BioRequest::read(0, 0)).is_err());
    let _: Option<BioId> = None;
}

/// Metadata space runs out in the middle of a mapping insert: with a 32
/// block device the reserve (a tenth) is 3 blocks, less than an insert that
/// splits nodes needs, so the insert fails before the "free metadata is at
/// the reserve" commit can switch to out-of-metadata-space mode. As in the
/// kernel, the failed operation aborts the transaction, sets needs_check and
/// makes the pool read-only; growing the device does not bring it back.
#[test]
fn a_metadata_failure_makes_the_pool_read_only_with_needs_check() {
    let mut data = MemDevice::new(4096 * BLOCK);
    data.as_bytes_mut().fill(GARBAGE);
    let meta = MemDevice::new(32 * 8);
    let p = Pool::create(table(PoolFeatures::default()), 4096 * BLOCK, meta, data, PoolOptions::default())
        .unwrap();
    p.message("create_thin 0").unwrap();
    p.activate_thin(0, 4096 * BLOCK).unwrap();
    write(&p, 0, 0, 1, 1);
    p.message("set_transaction_id 0 1").unwrap(); // commits block 0's mapping
    let mut failed = None;
    for b in 1..4096 {
        let c = io(&p, 0, BioRequest::write(b * BLOCK, vec![1; 512]));
        if c.result.is_err() {
            failed = Some((b, c.result));
            break;
        }
    }
    let (b, result) = failed.expect("metadata space runs out");
    assert_eq!(result, Err(Errno::EIO), "block {b}");
    assert_eq!(p.mode(), PoolMode::ReadOnly);
    let status = p.status(true);
    assert!(status.contains(" ro ") && status.contains(" needs_check "), "{status}");
    assert_eq!(p.message("create_thin 1").unwrap_err().errno, Errno::EOPNOTSUPP);
    // The committed mapping still reads and writes; unprovisioned blocks
    // read zeroes and refuse writes.
    write(&p, 0, 0, 1, 2);
    assert_eq!(read(&p, 0, 0, 1), vec![2; 512]);
    assert_eq!(read(&p, 0, b * BLOCK, 1), vec![0; 512]);
    assert_eq!(io(&p, 0, BioRequest::write(b * BLOCK, vec![3; 512])).result, Err(Errno::EIO));
    // Needs_check keeps it read-only across a reload.
    p.suspend().unwrap();
    p.reload_and_resume(4096 * BLOCK).unwrap();
    assert_eq!(p.mode(), PoolMode::ReadOnly);
}

/// A pool of 64 data blocks on a metadata device of `metadata_blocks`
/// blocks of 4 KiB, with thin device 0 (64 blocks) active.
fn with_small_metadata(metadata_blocks: u64) -> Pool<MemDevice, MemDevice> {
    let mut data = MemDevice::new(64 * BLOCK);
    data.as_bytes_mut().fill(GARBAGE);
    let meta = MemDevice::new(metadata_blocks * 8);
    let p = Pool::create(table(PoolFeatures::default()), 64 * BLOCK, meta, data, PoolOptions::default())
        .expect("pool loads");
    p.message("create_thin 0").unwrap();
    p.activate_thin(0, 64 * BLOCK).unwrap();
    p
}

/// Creates thin devices (each has a mapping tree of its own, and each
/// message commits) until the pool leaves write mode.
fn fill_metadata(p: &Pool<MemDevice, MemDevice>) {
    for id in 1..1000 {
        if p.mode() != PoolMode::Write {
            return;
        }
        let _ = p.message(&format!("create_thin {id}"));
    }
    panic!("the metadata never filled");
}

/// Adds `blocks` zeroed 4 KiB blocks to the pool's metadata device (the
/// administrator's lvextend; the pool must be suspended).
fn grow_metadata(p: &Pool<MemDevice, MemDevice>, blocks: u64) {
    p.with_metadata(|md| {
        let dev = md.transaction_manager().block_manager().device_mut();
        let mut bytes = dev.as_bytes().to_vec();
        bytes.resize(bytes.len() + (blocks * 4096) as usize, 0);
        *dev = MemDevice::from_bytes(bytes);
    });
}

/// The metadata field of the status line: used/total blocks.
fn metadata_usage(p: &Pool<MemDevice, MemDevice>) -> String {
    p.status(true).split(' ').nth(1).unwrap().to_string()
}

/// A commit that leaves no free metadata block beyond the reserve (a tenth
/// of 64 blocks: 6) puts the pool in out-of-metadata-space mode: no
/// metadata changes, nothing rolled back. Reads and writes into mapped,
/// unshared blocks go on (FUA too: no device has changes to commit);
/// writes that need a new block fail with EIO; messages are refused. A
/// resume without a new table keeps the mode until the metadata device has
/// grown; then the kernel leaves the mode first and grows the space map.
#[test]
fn out_of_metadata_space_keeps_in_place_writes_and_a_grown_device_ends_it() {
    let p = with_small_metadata(64);
    write(&p, 0, 0, 1, 1);
    fill_metadata(&p);
    assert_eq!(p.mode(), PoolMode::OutOfMetadataSpace);
    let status = p.status(true);
    assert!(status.contains(" ro ") && status.contains(" - "), "{status}");
    assert_eq!(p.message("create_thin 5000").unwrap_err().errno, Errno::EOPNOTSUPP);
    write(&p, 0, 0, 1, 2);
    assert_eq!(read(&p, 0, 0, 1), vec![2; 512]);
    let fua = io(&p, 0, BioRequest::write(1, vec![3; 512]).with_fua());
    assert_eq!(fua.result, Ok(()));
    assert_eq!(io(&p, 0, BioRequest::flush()).result, Ok(()));
    assert_eq!(io(&p, 0, BioRequest::write(5 * BLOCK, vec![4; 512])).result, Err(Errno::EIO));
    assert_eq!(read(&p, 0, 5 * BLOCK, 1), vec![0; 512]);
    assert_eq!(io(&p, 0, BioRequest::discard(0, BLOCK)).result, Ok(()));
    assert_eq!(read(&p, 0, 0, 1), vec![2; 512], "the discard unmapped nothing");
    // Suspend and resume on the same device: nothing changes.
    let before = metadata_usage(&p);
    assert!(before.ends_with("/64"), "{before}");
    p.suspend().unwrap();
    p.resume_same_table(64 * BLOCK).unwrap();
    assert_eq!(p.mode(), PoolMode::OutOfMetadataSpace);
    // Grown by 16 blocks: write mode, a larger space map, a new reserve.
    p.suspend().unwrap();
    grow_metadata(&p, 16);
    p.resume_same_table(64 * BLOCK).unwrap();
    assert_eq!(p.mode(), PoolMode::Write);
    assert!(metadata_usage(&p).ends_with("/80"), "{}", p.status(true));
    write(&p, 0, 5 * BLOCK, 1, 4);
    assert_eq!(read(&p, 0, 5 * BLOCK, 1), vec![4; 512]);
    assert_metadata_clean(&p);
}

/// A table reload requests the new table's mode first
/// (`bind_control_target`): write mode, even without a larger metadata
/// device; the next commit finds the space short again.
#[test]
fn a_table_reload_leaves_out_of_metadata_space_mode_without_growth() {
    let p = with_small_metadata(64);
    write(&p, 0, 0, 1, 1);
    fill_metadata(&p);
    assert_eq!(p.mode(), PoolMode::OutOfMetadataSpace);
    p.suspend().unwrap();
    p.reload_and_resume(64 * BLOCK).unwrap();
    assert_eq!(p.mode(), PoolMode::Write);
    p.message("set_transaction_id 0 1").unwrap();
    assert_eq!(p.mode(), PoolMode::OutOfMetadataSpace);
}

/// A suspend cancels the no-space timeout (`pool_postsuspend`); resuming
/// in out-of-data-space mode arms it again, so the queued write still
/// fails in the end instead of waiting for ever.
#[test]
fn a_resume_in_out_of_data_space_mode_arms_the_no_space_timeout_again() {
    let p = with_thin(1);
    write(&p, 0, 0, BLOCK, 1);
    let id = p.submit(0, BioRequest::write(BLOCK, vec![2; 512])).unwrap();
    assert!(settle(&p).is_empty());
    assert!(p.no_space_deadline().is_some());
    p.suspend().unwrap();
    assert_eq!(p.no_space_deadline(), None);
    p.resume_same_table(BLOCK).unwrap();
    assert_eq!(p.mode(), PoolMode::OutOfDataSpace);
    let deadline = p.no_space_deadline().expect("timer armed again");
    assert!(settle(&p).is_empty(), "still queued");
    p.set_time(deadline);
    let done = settle(&p);
    assert_eq!(done.iter().map(|c| (c.id, c.result)).collect::<Vec<_>>(), vec![(id, Err(Errno::ENOSPC))]);
}

/// Read-only metadata refuses every change (the kernel's block manager
/// refuses write locks), and takes them again once writable.
#[test]
fn read_only_metadata_refuses_changes() {
    let mut md = ThinMetadata::format(MemDevice::new(1024 * 8), BLOCK as u32).unwrap();
    md.set_read_only(true);
    let e = md.create_thin(0).unwrap_err();
    assert_eq!(e.to_string(), "the metadata is read-only");
    assert_eq!(dmsim_model::thin::pool::errno_of(&e), Errno::EPERM);
    assert!(md.set_needs_check().is_err());
    md.set_read_only(false);
    md.create_thin(0).unwrap();
    md.commit().unwrap();
}

/// A request cut into pieces that fail with different errors ends with the
/// error of the piece that completed last, as DM core does
/// (`dm_io_set_error` overwrites the status for every failing piece):
/// here a write over a mapped block whose data write fails (EIO) and an
/// unprovisioned block the full pool cannot provision (ENOSPC). The
/// real kernel shows the same (`kernel-shim/tests/kernel_last_error.rs`).
#[test]
fn a_request_whose_pieces_fail_differently_ends_with_the_last_error() {
    for worker_first in [true, false] {
        let p = full_pool_erroring_if_no_space();
        // Sectors BLOCK-8..BLOCK+8: the mapped block 0's piece goes to the
        // data device at once, block 1's waits for the worker.
        let id = p.submit(0, BioRequest::write(BLOCK - 8, vec![2; 16 * 512])).unwrap();
        let io = p.in_flight_io();
        assert_eq!(io.len(), 1, "block 0's piece in flight");
        if worker_first {
            p.run_worker();
            p.fail_io(io[0].id, Errno::EIO).unwrap();
        } else {
            p.fail_io(io[0].id, Errno::EIO).unwrap();
        }
        let done = settle(&p);
        let c = done.iter().find(|c| c.id == id).expect("completed");
        let last = if worker_first { Errno::EIO } else { Errno::ENOSPC };
        assert_eq!(c.result, Err(last), "worker first: {worker_first}");
    }
}
