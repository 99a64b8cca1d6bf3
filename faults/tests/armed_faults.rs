//! Armed faults on a `SimDisk`: each fires once, on the right request kind,
//! with the right effect.

use dmsim_faults::{CrashMode, DiskFault, FaultKind, SimDisk};
use dmsim_model::block_device::{BlockDevice, IoError, WriteFlags, SECTOR_SIZE};

const S: usize = SECTOR_SIZE as usize;

fn patterned(nr_sectors: u64) -> SimDisk {
    SimDisk::from_image((0..nr_sectors as usize * S).map(|i| (i * 7 % 251) as u8).collect::<Vec<u8>>())
}

fn read(disk: &mut SimDisk, sector: u64, sectors: usize) -> Result<Vec<u8>, IoError> {
    let mut buf = vec![0; sectors * S];
    disk.read(sector, &mut buf).map(|()| buf)
}

fn write(disk: &mut SimDisk, sector: u64, sectors: usize, byte: u8) -> Result<(), IoError> {
    disk.write(sector, &vec![byte; sectors * S], WriteFlags::default())
}

#[test]
fn a_read_error_fires_once_on_the_next_read_only() {
    let mut disk = patterned(32);
    disk.arm(DiskFault::ReadError { permanent: false });
    assert_eq!(disk.armed(), 1);
    // Writes and flushes do not fire it.
    write(&mut disk, 0, 1, 1).unwrap();
    disk.flush().unwrap();
    assert_eq!(disk.armed(), 1);
    assert!(disk.take_fired().is_empty());
    assert!(matches!(read(&mut disk, 8, 8), Err(IoError::Failed { sector: 8, .. })));
    assert_eq!(disk.armed(), 0);
    let fired = disk.take_fired();
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0].kind, FaultKind::ReadErrorTransient);
    assert_eq!(fired[0].description, "read-error sector 8 nr 8 transient");
    assert!(disk.take_fired().is_empty(), "take_fired clears");
    // Transient: the same read now succeeds.
    assert_eq!(read(&mut disk, 8, 8).unwrap(), disk.visible().range(8 * S..16 * S));
    assert!(disk.bad_sectors().next().is_none());
}

#[test]
fn a_write_error_fires_once_on_the_next_write_and_nothing_lands() {
    let mut disk = patterned(32);
    let before = disk.visible().to_vec();
    disk.arm(DiskFault::WriteError { permanent: false });
    read(&mut disk, 0, 4).unwrap();
    disk.flush().unwrap();
    assert_eq!(disk.armed(), 1, "reads and flushes do not fire a write fault");
    assert!(write(&mut disk, 4, 2, 9).is_err());
    assert_eq!(disk.visible(), &before[..]);
    assert_eq!(disk.unflushed(), 0, "a failed write is not in the cache");
    let fired = disk.take_fired();
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0].kind, FaultKind::WriteErrorTransient);
    assert_eq!(fired[0].description, "write-error sector 4 nr 2 transient");
    write(&mut disk, 4, 2, 9).unwrap();
    assert_eq!(disk.visible()[4 * S], 9);
}

#[test]
fn permanent_errors_make_bad_sectors_that_keep_failing() {
    let mut disk = patterned(64);
    disk.arm(DiskFault::ReadError { permanent: true });
    assert!(read(&mut disk, 8, 8).is_err());
    assert_eq!(disk.take_fired()[0].description, "read-error sector 8 nr 8 permanent");
    assert_eq!(disk.bad_sectors().collect::<Vec<_>>(), (8..16).collect::<Vec<_>>());
    for _ in 0..3 {
        assert!(read(&mut disk, 15, 1).is_err());
        assert!(read(&mut disk, 0, 9).is_err(), "overlapping the first bad sector");
        assert!(write(&mut disk, 12, 1, 1).is_err());
    }
    let hits = disk.take_fired();
    assert_eq!(hits.len(), 9);
    assert!(hits.iter().all(|f| f.kind == FaultKind::BadSectorHit));
    // Neighbours are fine.
    read(&mut disk, 0, 8).unwrap();
    write(&mut disk, 16, 8, 1).unwrap();

    disk.arm(DiskFault::WriteError { permanent: true });
    assert!(write(&mut disk, 32, 2, 1).is_err());
    assert_eq!(disk.take_fired()[0].kind, FaultKind::WriteErrorPermanent);
    assert!(read(&mut disk, 33, 1).is_err());
    assert!(write(&mut disk, 32, 2, 1).is_err());
    // Flushes are never faulted.
    disk.flush().unwrap();
}

#[test]
fn a_bad_sector_hit_does_not_consume_an_armed_fault() {
    let mut disk = patterned(32);
    disk.arm(DiskFault::ReadError { permanent: true });
    assert!(read(&mut disk, 0, 1).is_err());
    disk.arm(DiskFault::ReadError { permanent: false });
    assert!(read(&mut disk, 0, 1).is_err());
    assert_eq!(disk.armed(), 1);
    assert!(read(&mut disk, 4, 1).is_err());
    assert_eq!(disk.armed(), 0);
}

#[test]
fn a_bit_flip_changes_exactly_one_bit_of_the_returned_buffer() {
    for bit in [0u32, 7, 8, 4095, 4096 * 8 - 1, 4096 * 8, u32::MAX] {
        let mut disk = patterned(16);
        let before = disk.visible().to_vec();
        disk.arm(DiskFault::BitFlip { bit });
        let got = read(&mut disk, 8, 8).unwrap();
        let want = &before[8 * S..16 * S];
        let diff: u32 = got.iter().zip(want).map(|(a, b)| (a ^ b).count_ones()).sum();
        assert_eq!(diff, 1, "bit {bit}");
        let expected = bit as usize % (got.len() * 8);
        assert_eq!(got[expected / 8] ^ want[expected / 8], 1 << (expected % 8));
        assert_eq!(disk.visible(), &before[..], "the disk is unchanged");
        let fired = disk.take_fired();
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].kind, FaultKind::BitFlip);
        // The next read is clean.
        assert_eq!(read(&mut disk, 8, 8).unwrap(), want);
    }
}

#[test]
fn a_misdirected_write_lands_elsewhere_and_is_clamped_to_the_disk() {
    let mut disk = SimDisk::new(32);
    disk.arm(DiskFault::Misdirect { offset: 5 });
    write(&mut disk, 4, 2, 7).unwrap();
    assert_eq!(disk.visible()[4 * S], 0, "nothing at the intended place");
    assert_eq!(disk.visible()[9 * S], 7);
    assert_eq!(disk.visible()[10 * S], 7);
    assert_eq!(disk.since_flush()[0].sector, 9, "the cache knows where it landed");
    let (lost, _) = disk.crash_state(CrashMode::LoseAll, 0);
    assert_eq!(lost[9 * S], 0, "and it is volatile there");
    let fired = disk.take_fired();
    assert_eq!(fired[0].kind, FaultKind::Misdirect);
    assert_eq!(fired[0].description, "misdirect sector 4 nr 2 offset 5 to 9");

    // Past the end: clamped to the last place the write fits.
    disk.arm(DiskFault::Misdirect { offset: 100 });
    write(&mut disk, 20, 4, 8).unwrap();
    assert_eq!(disk.since_flush()[1].sector, 28);
    assert_eq!(disk.visible()[31 * S], 8);
    // Before the start: clamped to sector 0.
    disk.arm(DiskFault::Misdirect { offset: -100 });
    disk.write(3, &[6; S], WriteFlags { fua: true }).unwrap();
    assert_eq!(disk.durable()[0], 6, "a FUA write is durable where it landed");
    assert_eq!(disk.durable()[3 * S], 0);
    assert_eq!(disk.take_fired().len(), 2);
    // The next write goes where it is sent.
    write(&mut disk, 12, 1, 1).unwrap();
    assert_eq!(disk.visible()[12 * S], 1);
}

#[test]
fn faults_fire_in_fifo_order_per_request_kind() {
    let mut disk = patterned(32);
    disk.arm(DiskFault::WriteError { permanent: false });
    disk.arm(DiskFault::BitFlip { bit: 3 });
    disk.arm(DiskFault::ReadError { permanent: false });
    disk.arm(DiskFault::Misdirect { offset: 1 });
    // The first read takes the bit flip, not the read error behind it.
    assert!(read(&mut disk, 0, 1).is_ok());
    assert!(read(&mut disk, 0, 1).is_err());
    assert!(read(&mut disk, 0, 1).is_ok());
    // The first write takes the write error, the second the misdirect.
    assert!(write(&mut disk, 0, 1, 1).is_err());
    write(&mut disk, 0, 1, 1).unwrap();
    assert_eq!(disk.visible()[S], 1);
    assert_eq!(disk.armed(), 0);
    let kinds: Vec<FaultKind> = disk.take_fired().iter().map(|f| f.kind).collect();
    assert_eq!(
        kinds,
        [
            FaultKind::BitFlip,
            FaultKind::ReadErrorTransient,
            FaultKind::WriteErrorTransient,
            FaultKind::Misdirect
        ]
    );
}

#[test]
fn out_of_range_requests_do_not_fire_faults() {
    let mut disk = SimDisk::new(8);
    disk.arm(DiskFault::ReadError { permanent: true });
    disk.arm(DiskFault::WriteError { permanent: true });
    assert!(matches!(read(&mut disk, 7, 2), Err(IoError::OutOfRange { .. })));
    assert!(matches!(write(&mut disk, 8, 1, 0), Err(IoError::OutOfRange { .. })));
    assert_eq!(disk.armed(), 2);
    assert!(disk.take_fired().is_empty());
}

#[test]
fn a_disk_rebuilt_from_a_crash_state_forgets_bad_sectors_and_armed_faults() {
    let mut disk = patterned(16);
    disk.arm(DiskFault::WriteError { permanent: true });
    assert!(write(&mut disk, 2, 1, 1).is_err());
    disk.arm(DiskFault::ReadError { permanent: false });
    let (image, _) = disk.crash_state(CrashMode::KeepAll, 0);
    let mut fresh = SimDisk::from_image(image);
    assert_eq!(fresh.armed(), 0);
    assert!(fresh.bad_sectors().next().is_none());
    write(&mut fresh, 2, 1, 1).unwrap();
}

#[test]
fn an_aimed_write_fault_lets_the_first_writes_pass() {
    let mut disk = patterned(32);
    disk.arm_after_writes(2, DiskFault::WriteError { permanent: false });
    // Reads do not count, nor fire it.
    read(&mut disk, 0, 1).unwrap();
    write(&mut disk, 0, 1, 1).unwrap();
    write(&mut disk, 1, 1, 2).unwrap();
    assert_eq!(disk.armed(), 1);
    assert!(write(&mut disk, 2, 1, 3).is_err(), "the third write fails");
    assert_eq!(disk.armed(), 0);
    write(&mut disk, 2, 1, 3).unwrap();
    // Disarming forgets the count too.
    disk.arm_after_writes(5, DiskFault::WriteError { permanent: false });
    disk.disarm_all();
    disk.arm(DiskFault::WriteError { permanent: false });
    assert!(write(&mut disk, 3, 1, 4).is_err(), "a plain arm fires at once");
}

#[test]
fn a_fault_armed_after_a_write_error_waits_for_it() {
    let mut disk = patterned(32);
    disk.arm_after_write_error(DiskFault::ReadError { permanent: false });
    assert_eq!(disk.armed(), 1);
    // Reads before the write error pass; so do writes while none is armed.
    read(&mut disk, 0, 1).unwrap();
    write(&mut disk, 0, 1, 1).unwrap();
    read(&mut disk, 0, 1).unwrap();
    disk.arm_after_writes(1, DiskFault::WriteError { permanent: false });
    write(&mut disk, 1, 1, 2).unwrap();
    assert!(write(&mut disk, 2, 1, 3).is_err(), "the aimed write error");
    assert_eq!(disk.armed(), 1, "the read error is armed now");
    assert!(read(&mut disk, 0, 1).is_err(), "the first read after the write error fails");
    read(&mut disk, 0, 1).unwrap();
    assert_eq!(disk.armed(), 0);
    let kinds: Vec<FaultKind> = disk.take_fired().iter().map(|f| f.kind).collect();
    assert_eq!(kinds, [FaultKind::WriteErrorTransient, FaultKind::ReadErrorTransient]);
    // Disarming forgets it.
    disk.arm_after_write_error(DiskFault::ReadError { permanent: false });
    disk.disarm_all();
    assert_eq!(disk.armed(), 0);
}
