//! What the checker found: problems, their severity and the structure
//! they belong to, plus summary facts about the pool.

use std::fmt;

/// How bad a problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// Harmless for the kernel but not what a correct writer leaves behind:
    /// leaked blocks (counted but unreferenced), under-filled nodes, a
    /// max_entries that is not a multiple of three, a wrong allocation hint.
    /// thin_check 0.9.0 still exits 1 on these unless told to ignore them.
    NonFatal,
    /// The kernel could read wrong data, lose mappings or corrupt the pool.
    Damage,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::NonFatal => "non-fatal",
            Severity::Damage => "damage",
        })
    }
}

/// Which on-disk structure a problem was found in.
///
/// `snap` is true for the copy reachable from the metadata snapshot
/// (held root) rather than from the live superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Structure {
    /// The superblock in block 0.
    Superblock,
    /// The metadata snapshot's superblock copy.
    SnapshotSuperblock,
    /// The device details tree.
    DetailsTree {
        /// Reached from the metadata snapshot.
        snap: bool,
    },
    /// The top level of the mapping tree (device id → subtree root).
    TopLevelMappingTree {
        /// Reached from the metadata snapshot.
        snap: bool,
    },
    /// One device's bottom-level mapping tree.
    MappingTree {
        /// The thin device id (the first device whose tree reached it).
        dev: u64,
        /// Reached from the metadata snapshot.
        snap: bool,
    },
    /// A thin device as a whole (details vs. mappings).
    Device {
        /// The thin device id.
        dev: u64,
        /// Reached from the metadata snapshot.
        snap: bool,
    },
    /// The data space map's root, or its counts as a whole.
    DataSpaceMap,
    /// The data space map's bitmap index tree.
    DataIndexTree,
    /// A data space map bitmap block.
    DataBitmap {
        /// Which bitmap (block number / 16320).
        index: u64,
    },
    /// The data space map's overflow reference count tree.
    DataOverflowTree,
    /// The metadata space map's root, or its counts as a whole.
    MetadataSpaceMap,
    /// The metadata space map's index block.
    MetadataIndex,
    /// A metadata space map bitmap block.
    MetadataBitmap {
        /// Which bitmap (block number / 16320).
        index: u64,
    },
    /// The metadata space map's overflow reference count tree.
    MetadataOverflowTree,
    /// The dm-cache superblock in block 0.
    CacheSuperblock,
    /// The dm-cache mapping array (its btree and array blocks, and the
    /// mappings it holds).
    MappingArray,
    /// The dm-cache hint array.
    HintArray,
    /// The dm-cache discard bitset.
    DiscardBitset,
    /// The dm-cache dirty bitset (metadata version 2).
    DirtyBitset,
}

impl fmt::Display for Structure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let snap = |s: bool| if s { " (metadata snapshot)" } else { "" };
        match *self {
            Structure::Superblock => write!(f, "superblock"),
            Structure::SnapshotSuperblock => write!(f, "metadata snapshot superblock"),
            Structure::DetailsTree { snap: s } => write!(f, "device details tree{}", snap(s)),
            Structure::TopLevelMappingTree { snap: s } => {
                write!(f, "top-level mapping tree{}", snap(s))
            }
            Structure::MappingTree { dev, snap: s } => {
                write!(f, "mapping tree of device {dev}{}", snap(s))
            }
            Structure::Device { dev, snap: s } => write!(f, "device {dev}{}", snap(s)),
            Structure::DataSpaceMap => write!(f, "data space map"),
            Structure::DataIndexTree => write!(f, "data space map index tree"),
            Structure::DataBitmap { index } => write!(f, "data space map bitmap {index}"),
            Structure::DataOverflowTree => write!(f, "data space map overflow tree"),
            Structure::MetadataSpaceMap => write!(f, "metadata space map"),
            Structure::MetadataIndex => write!(f, "metadata space map index"),
            Structure::MetadataBitmap { index } => write!(f, "metadata space map bitmap {index}"),
            Structure::MetadataOverflowTree => write!(f, "metadata space map overflow tree"),
            Structure::CacheSuperblock => write!(f, "cache superblock"),
            Structure::MappingArray => write!(f, "mapping array"),
            Structure::HintArray => write!(f, "hint array"),
            Structure::DiscardBitset => write!(f, "discard bitset"),
            Structure::DirtyBitset => write!(f, "dirty bitset"),
        }
    }
}

/// One thing wrong with the metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// How bad it is.
    pub severity: Severity,
    /// The structure it was found in.
    pub structure: Structure,
    /// The block concerned, when there is one: a metadata block, except
    /// for reference-count problems of the data space map, where it is
    /// the data block whose count is wrong.
    pub block: Option<u64>,
    /// What is wrong, in words.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {}", self.severity, self.structure)?;
        if let Some(b) = self.block {
            write!(f, ", block {b}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// What the checker learned about one thin device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceSummary {
    /// The thin device id.
    pub dev: u64,
    /// `mapped_blocks` from the details record (None: no details record).
    pub mapped_blocks: Option<u64>,
    /// Mappings found in the device's tree (None: no tree, or the tree is
    /// too damaged to count).
    pub counted_mappings: Option<u64>,
    /// Whether the device was found through the metadata snapshot only.
    pub snapshot_only: bool,
}

/// The checker's findings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Everything found wrong, in the order found (deterministic).
    pub problems: Vec<Problem>,
    /// Remarks that are not problems (e.g. a comparison that was skipped
    /// because the trees it depends on are damaged).
    pub notes: Vec<String>,
    /// The superblock's transaction id.
    pub transaction_id: u64,
    /// The superblock's time counter.
    pub time: u32,
    /// Blocks tracked by the metadata space map (its root's nr_blocks).
    pub metadata_nr_blocks: u64,
    /// Metadata blocks free according to the space map root
    /// (nr_blocks − nr_allocated).
    pub metadata_free_blocks: u64,
    /// Blocks tracked by the data space map.
    pub data_nr_blocks: u64,
    /// Data blocks free according to the data space map root.
    pub data_free_blocks: u64,
    /// Block of the metadata snapshot superblock, 0 if none.
    pub held_root: u64,
    /// The devices of the live superblock, then those only in the metadata
    /// snapshot, each in id order.
    pub devices: Vec<DeviceSummary>,
    /// Distinct mapping leaf entries found (shared leaves counted once);
    /// equals the sum of all data block reference counts.
    pub mapping_entries: u64,
}

impl CheckReport {
    /// No problems at all (thin_check 0.9.0's exit status 0).
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    /// At least one problem of [`Severity::Damage`].
    pub fn has_damage(&self) -> bool {
        self.problems.iter().any(|p| p.severity == Severity::Damage)
    }

    /// The problems found in `structure`.
    pub fn problems_in(&self, structure: Structure) -> impl Iterator<Item = &Problem> {
        self.problems.iter().filter(move |p| p.structure == structure)
    }
}
