//! thin_dump-compatible XML output (spec §6.4), byte for byte what
//! Debian bookworm's `thin_dump` (thin-provisioning-tools 0.9.0, the C++
//! implementation) prints for the same image:
//!
//! * no XML declaration; two spaces of indentation per level;
//! * `<superblock uuid="" time=.. transaction=.. flags=.. version=..
//!   data_block_size=.. nr_data_blocks=..>` — uuid always empty, flags
//!   and version always present, no metadata_snap attribute;
//! * `nr_data_blocks` comes from the data space map root when the dumped
//!   superblock's own location field is 0; for a metadata snapshot (whose
//!   copy records its own location) it is 0, as 0.9.0 prints;
//! * devices in device-id order of the top-level mapping tree, `dev_id`
//!   truncated to 32 bits as 0.9.0 does; a device in the details tree but
//!   absent from the mapping tree is not printed; one in the mapping tree
//!   but absent from the details tree is an error;
//! * mappings in virtual-block order, merged into `range_mapping`
//!   (origin_begin, data_begin, length, time) while the next mapping
//!   continues both block numbers by one with the same time; runs of one
//!   are `single_mapping` (origin_block, data_block, time).
//!
//! Like thin_dump, the dump stops with an error at the first damaged node
//! (output already written stays written), and it does not look at the
//! space maps.

use std::io::Write;

use thiserror::Error;

use crate::block_device::BlockDevice;
use crate::pdata::checksum;
use crate::pdata::layout::thin::*;
use crate::pdata::layout::BlockKind;

use super::check::{le32, le64, scan, Reader, ScanError};

/// What to dump.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DumpOptions {
    /// Dump the metadata snapshot (held root) instead of the live
    /// superblock (`thin_dump -m`).
    pub metadata_snap: bool,
}

/// Why the dump failed.
#[derive(Debug, Error)]
pub enum DumpError {
    /// Writing the output failed.
    #[error("write failed: {0}")]
    Write(#[from] std::io::Error),
    /// The device could not be read or is too small.
    #[error("cannot read metadata block {block}: {what}")]
    Read {
        /// The block.
        block: u64,
        /// What went wrong.
        what: String,
    },
    /// A superblock's checksum is wrong.
    #[error("bad checksum in superblock at block {0}")]
    BadSuperblock(u64),
    /// `metadata_snap` was asked for but there is none.
    #[error("no current metadata snap")]
    NoMetadataSnap,
    /// A btree node is damaged.
    #[error("metadata contains errors: block {block}: {what}")]
    Damaged {
        /// The node at fault.
        block: u64,
        /// What is wrong.
        what: String,
    },
    /// The mapping tree names a device the details tree does not have.
    #[error("mappings present for device {0}, but it isn't present in device tree")]
    UnknownDevice(u64),
}

impl From<ScanError> for DumpError {
    fn from(e: ScanError) -> Self {
        DumpError::Damaged { block: e.block, what: e.what }
    }
}

/// Writes the thin_dump XML of the metadata on `dev` to `w`.
pub fn dump_xml(dev: &mut dyn BlockDevice, w: &mut dyn Write, opts: &DumpOptions) -> Result<(), DumpError> {
    let mut reader = Reader::new(dev);
    let live = read_superblock(&mut reader, SUPERBLOCK_LOCATION)?;
    let sb = if opts.metadata_snap {
        let held = le64(&live[..], SB_HELD_ROOT);
        if held == 0 {
            return Err(DumpError::NoMetadataSnap);
        }
        read_superblock(&mut reader, held)?
    } else {
        live
    };
    let sb = &sb[..];

    let mut details = std::collections::BTreeMap::new();
    scan(&mut reader, le64(sb, SB_DEVICE_DETAILS_ROOT), DEVICE_DETAILS_SIZE, true, &mut |k, v| {
        details.insert(k, DeviceDetails::decode(v));
        Ok(())
    })?;

    let nr_data_blocks =
        if le64(sb, SB_BLOCKNR) == SUPERBLOCK_LOCATION { le64(sb, SB_DATA_SM_ROOT) } else { 0 };
    writeln!(
        w,
        "<superblock uuid=\"\" time=\"{}\" transaction=\"{}\" flags=\"{}\" version=\"{}\" data_block_size=\"{}\" nr_data_blocks=\"{}\">",
        le32(sb, SB_TIME),
        le64(sb, SB_TRANS_ID),
        le32(sb, SB_FLAGS),
        le32(sb, SB_VERSION),
        le32(sb, SB_DATA_BLOCK_SIZE),
        nr_data_blocks,
    )?;

    let mut roots = Vec::new();
    scan(&mut reader, le64(sb, SB_DATA_MAPPING_ROOT), MAPPING_VALUE_SIZE, true, &mut |k, v| {
        roots.push((k, le64(v, 0)));
        Ok(())
    })?;
    for (dev_id, root) in roots {
        let Some(d) = details.get(&dev_id) else {
            return Err(DumpError::UnknownDevice(dev_id));
        };
        writeln!(
            w,
            "  <device dev_id=\"{}\" mapped_blocks=\"{}\" transaction=\"{}\" creation_time=\"{}\" snap_time=\"{}\">",
            dev_id as u32, d.mapped_blocks, d.transaction_id, d.creation_time, d.snapshotted_time
        )?;
        let mut runs = Runs { w: &mut *w, run: None };
        let scanned = scan(&mut reader, root, MAPPING_VALUE_SIZE, true, &mut |k, v| {
            let (data, time) = unpack_block_time(le64(v, 0));
            runs.add(k, data, time).map_err(|e| ScanError { block: root, what: format!("write failed: {e}") })
        });
        let flushed = runs.finish();
        // thin_dump closes the device element even when its mappings
        // could not all be read.
        writeln!(w, "  </device>")?;
        scanned?;
        flushed?;
    }
    writeln!(w, "</superblock>")?;
    Ok(())
}

/// One thin device of a metadata image as [`read_devices`] reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceMappings {
    /// Its details record.
    pub details: DeviceDetails,
    /// Its mappings: virtual block → (data block, time).
    pub mappings: std::collections::BTreeMap<u64, (u64, u32)>,
}

impl DeviceMappings {
    /// Whether a write to virtual block `vblock` can go to its data block
    /// in place: the block is mapped, and not since a snapshot that may
    /// share it. The kernel's rule (`__snapshotted_since`): a mapping
    /// whose time is before the device's last snapshot time counts as
    /// shared, whatever the reference counts say.
    pub fn writable_in_place(&self, vblock: u64) -> bool {
        self.mappings.get(&vblock).is_some_and(|&(_, time)| self.details.snapshotted_time <= time)
    }
}

/// Every device of the live superblock's trees, by id, read the way
/// [`dump_xml`] reads them (the checker's node walk, not the model's btree
/// code): a view of the committed metadata independent of the code that
/// wrote it. A device in the mapping tree without details, or a damaged
/// node, is an error, as for the dump.
pub fn read_devices(
    dev: &mut dyn BlockDevice,
) -> Result<std::collections::BTreeMap<u64, DeviceMappings>, DumpError> {
    let mut reader = Reader::new(dev);
    let sb = read_superblock(&mut reader, SUPERBLOCK_LOCATION)?;
    let mut details = std::collections::BTreeMap::new();
    scan(&mut reader, le64(&sb[..], SB_DEVICE_DETAILS_ROOT), DEVICE_DETAILS_SIZE, true, &mut |k, v| {
        details.insert(k, DeviceDetails::decode(v));
        Ok(())
    })?;
    let mut roots = Vec::new();
    scan(&mut reader, le64(&sb[..], SB_DATA_MAPPING_ROOT), MAPPING_VALUE_SIZE, true, &mut |k, v| {
        roots.push((k, le64(v, 0)));
        Ok(())
    })?;
    let mut out = std::collections::BTreeMap::new();
    for (id, root) in roots {
        let details = *details.get(&id).ok_or(DumpError::UnknownDevice(id))?;
        let mut mappings = std::collections::BTreeMap::new();
        scan(&mut reader, root, MAPPING_VALUE_SIZE, true, &mut |k, v| {
            mappings.insert(k, unpack_block_time(le64(v, 0)));
            Ok(())
        })?;
        out.insert(id, DeviceMappings { details, mappings });
    }
    Ok(out)
}

fn read_superblock(reader: &mut Reader<'_>, b: u64) -> Result<Box<[u8; 4096]>, DumpError> {
    let block = reader.read(b).map_err(|e| DumpError::Read { block: b, what: e.to_string() })?;
    // thin_dump 0.9.0 validates only the superblock checksum.
    let salt = BlockKind::ThinSuperblock.salt();
    if checksum::stored_checksum(&block[..]) != checksum::block_checksum(&block[..], salt) {
        return Err(DumpError::BadSuperblock(b));
    }
    Ok(block)
}

/// Merges consecutive mappings into runs as thin_dump does.
struct Runs<'w> {
    w: &'w mut dyn Write,
    /// (origin start, data start, time, length)
    run: Option<(u64, u64, u32, u64)>,
}

impl Runs<'_> {
    fn add(&mut self, origin: u64, data: u64, time: u32) -> std::io::Result<()> {
        if let Some((o, d, t, len)) = &mut self.run {
            if origin == o.wrapping_add(*len) && data == d.wrapping_add(*len) && time == *t {
                *len += 1;
                return Ok(());
            }
            self.finish()?;
        }
        self.run = Some((origin, data, time, 1));
        Ok(())
    }

    fn finish(&mut self) -> std::io::Result<()> {
        match self.run.take() {
            Some((o, d, t, 1)) => {
                writeln!(self.w, "    <single_mapping origin_block=\"{o}\" data_block=\"{d}\" time=\"{t}\"/>")
            }
            Some((o, d, t, len)) => writeln!(
                self.w,
                "    <range_mapping origin_begin=\"{o}\" data_begin=\"{d}\" length=\"{len}\" time=\"{t}\"/>"
            ),
            None => Ok(()),
        }
    }
}
