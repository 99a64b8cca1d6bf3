//! Test support shared by the root crate's tests and the model crate's
//! checker tests (included with `#[path = ...] mod support;`).
//!
//! * [`require_tool`]: find an external tool (thin-provisioning-tools);
//!   skip loudly when it is missing, fail under `CI=true`.
//! * [`restore`]: build a metadata image from an XML fixture with
//!   Debian's `thin_restore`.
//! * [`Image`]: a metadata image in memory, with helpers to find its
//!   structures and to corrupt them (optionally re-sealing the checksum so
//!   that only the intended field is wrong).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use dmsim_model::pdata::layout::space_map::{bitmap_get, bitmap_set, IndexEntry, SmRoot};
use dmsim_model::pdata::layout::thin::*;
use dmsim_model::pdata::layout::{get_u32, get_u64, node, put_u32, put_u64, BlockKind, BLOCK_SIZE};

/// The path of tool `name` if it is installed. When it is not: under
/// `CI=true` this panics (CI must have it), otherwise it prints a loud
/// SKIPPED line and returns None, and the caller returns early.
pub fn require_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file());
    if found.is_none() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!(
                "{name} is not installed, and CI=true: install Debian's thin-provisioning-tools \
                 (apt-get install -y thin-provisioning-tools)"
            );
        }
        eprintln!("SKIPPED: {name} not installed (apt-get install -y thin-provisioning-tools)");
    }
    found
}

/// The directory of the XML fixtures.
pub fn fixtures_dir() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let direct = here.join("tests/fixtures");
    if direct.is_dir() {
        direct
    } else {
        here.join("../tests/fixtures")
    }
}

/// A fresh path in the temporary directory (not created).
pub fn temp_path(tag: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("dmsim-test-{}-{n}-{tag}", std::process::id()))
}

/// A file removed when dropped.
pub struct TempFile(pub PathBuf);

impl TempFile {
    /// Writes `bytes` to a new temporary file.
    pub fn with_bytes(tag: &str, bytes: &[u8]) -> Self {
        let p = temp_path(tag);
        std::fs::write(&p, bytes).expect("write temp file");
        TempFile(p)
    }
    /// The path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Builds a metadata image of `size` bytes from fixture `xml` with
/// thin_restore. None (skipped) if thin_restore is not installed.
pub fn restore(xml: &str, size: u64) -> Option<Image> {
    let tool = require_tool("thin_restore")?;
    let img = TempFile(temp_path("restore.img"));
    std::fs::File::create(img.path()).and_then(|f| f.set_len(size)).expect("create image");
    let out = Command::new(tool)
        .arg("-i")
        .arg(fixtures_dir().join(xml))
        .arg("-o")
        .arg(img.path())
        .output()
        .expect("run thin_restore");
    assert!(out.status.success(), "thin_restore {xml} failed: {}", String::from_utf8_lossy(&out.stderr));
    Some(Image(std::fs::read(img.path()).expect("read image")))
}

/// Runs an installed tool on `args`; returns its status and stdout.
/// None if the tool is missing (see [`require_tool`]).
pub fn run_tool(name: &str, args: &[&std::ffi::OsStr]) -> Option<(ExitStatus, Vec<u8>, String)> {
    let tool = require_tool(name)?;
    let out = Command::new(tool).args(args).stdin(Stdio::null()).output().expect("run tool");
    Some((out.status, out.stdout, String::from_utf8_lossy(&out.stderr).into_owned()))
}

/// thin_check's verdict on `image`: Some(true) for exit status 0.
pub fn thin_check_clean(image: &Image, extra: &[&str]) -> Option<bool> {
    let f = TempFile::with_bytes("tc.img", &image.0);
    let mut args: Vec<&std::ffi::OsStr> = extra.iter().map(std::ffi::OsStr::new).collect();
    args.push(f.path().as_os_str());
    run_tool("thin_check", &args).map(|(s, _, _)| s.success())
}

/// A metadata image in memory.
#[derive(Clone)]
pub struct Image(pub Vec<u8>);

impl Image {
    /// Block `b`.
    pub fn block(&self, b: u64) -> &[u8] {
        let s = b as usize * BLOCK_SIZE;
        &self.0[s..s + BLOCK_SIZE]
    }
    /// Block `b`, mutable.
    pub fn block_mut(&mut self, b: u64) -> &mut [u8] {
        let s = b as usize * BLOCK_SIZE;
        &mut self.0[s..s + BLOCK_SIZE]
    }
    /// Blocks in the image.
    pub fn nr_blocks(&self) -> u64 {
        (self.0.len() / BLOCK_SIZE) as u64
    }
    /// Flips bit `bit` of byte `off` of block `b` (checksum left stale).
    pub fn flip_bit(&mut self, b: u64, off: usize, bit: u8) {
        self.block_mut(b)[off] ^= 1 << bit;
    }
    /// Recomputes block `b`'s checksum as `kind` (location field kept).
    pub fn reseal(&mut self, b: u64, kind: BlockKind) {
        let blk = self.block_mut(b);
        let loc = get_u64(blk, kind.blocknr_offset());
        kind.prepare_for_write(blk, loc);
    }
    /// u64 at `off` of block `b`.
    pub fn u64_at(&self, b: u64, off: usize) -> u64 {
        get_u64(self.block(b), off)
    }

    // --- superblock ---

    /// A superblock field (u64).
    pub fn sb_u64(&self, off: usize) -> u64 {
        self.u64_at(0, off)
    }
    /// Root of the device details tree.
    pub fn details_root(&self) -> u64 {
        self.sb_u64(SB_DEVICE_DETAILS_ROOT)
    }
    /// Root of the mapping tree.
    pub fn mapping_root(&self) -> u64 {
        self.sb_u64(SB_DATA_MAPPING_ROOT)
    }
    /// The data space map root.
    pub fn data_sm(&self) -> SmRoot {
        SmRoot::decode(&self.block(0)[SB_DATA_SM_ROOT..SB_DATA_SM_ROOT + 32])
    }
    /// The metadata space map root.
    pub fn metadata_sm(&self) -> SmRoot {
        SmRoot::decode(&self.block(0)[SB_METADATA_SM_ROOT..SB_METADATA_SM_ROOT + 32])
    }

    // --- btree nodes ---

    /// Entries in node `b`.
    pub fn nr_entries(&self, b: u64) -> usize {
        get_u32(self.block(b), node::NR_ENTRIES) as usize
    }
    /// Whether node `b` is internal.
    pub fn is_internal(&self, b: u64) -> bool {
        get_u32(self.block(b), node::FLAGS) == node::INTERNAL
    }
    /// Key `i` of node `b`.
    pub fn key(&self, b: u64, i: usize) -> u64 {
        self.u64_at(b, node::key_offset(i))
    }
    /// Offset of value `i` in node `b`.
    pub fn value_offset(&self, b: u64, i: usize) -> usize {
        let blk = self.block(b);
        let max = get_u32(blk, node::MAX_ENTRIES) as usize;
        let vs = get_u32(blk, node::VALUE_SIZE) as usize;
        node::value_offset(max, vs, i)
    }
    /// Value `i` of node `b` as a u64.
    pub fn value_u64(&self, b: u64, i: usize) -> u64 {
        self.u64_at(b, self.value_offset(b, i))
    }
    /// The leaf holding `key` in the tree at `root` and the entry's index.
    pub fn find(&self, root: u64, key: u64) -> Option<(u64, usize)> {
        let mut b = root;
        for _ in 0..16 {
            let n = self.nr_entries(b);
            if self.is_internal(b) {
                let i = (0..n).rev().find(|&i| self.key(b, i) <= key)?;
                b = self.value_u64(b, i);
            } else {
                return (0..n).find(|&i| self.key(b, i) == key).map(|i| (b, i));
            }
        }
        None
    }
    /// All nodes of the tree at `root`, internal ones first on each path.
    pub fn nodes(&self, root: u64) -> Vec<u64> {
        let mut out = vec![root];
        if self.is_internal(root) {
            for i in 0..self.nr_entries(root) {
                out.extend(self.nodes(self.value_u64(root, i)));
            }
        }
        out
    }
    /// Bottom-level root of device `dev`.
    pub fn device_root(&self, dev: u64) -> u64 {
        let (leaf, i) = self.find(self.mapping_root(), dev).expect("device in top-level tree");
        self.value_u64(leaf, i)
    }

    // --- space maps ---

    /// The metadata space map's index block.
    pub fn metadata_index(&self) -> u64 {
        self.metadata_sm().bitmap_root
    }
    /// Index entry `i` of the metadata space map.
    pub fn metadata_index_entry(&self, i: usize) -> IndexEntry {
        let off = 16 + 16 * i;
        IndexEntry::decode(&self.block(self.metadata_index())[off..off + 16])
    }
    /// Index entry `i` of the data space map (from its index tree).
    pub fn data_index_entry(&self, i: u64) -> IndexEntry {
        let (leaf, j) = self.find(self.data_sm().bitmap_root, i).expect("data index entry");
        let off = self.value_offset(leaf, j);
        IndexEntry::decode(&self.block(leaf)[off..off + 16])
    }
    /// Two-bit count of `entry` in bitmap block `bm`.
    pub fn bitmap_count(&self, bm: u64, entry: u64) -> u32 {
        bitmap_get(&self.block(bm)[16..], entry)
    }
    /// Sets the two-bit count of `entry` in bitmap `bm` and re-seals it.
    pub fn set_bitmap_count(&mut self, bm: u64, entry: u64, v: u32) {
        bitmap_set(&mut self.block_mut(bm)[16..], entry, v);
        self.reseal(bm, BlockKind::Bitmap);
    }
    /// The metadata space map's two-bit count of block `b` (< 16320).
    pub fn metadata_count(&self, b: u64) -> u32 {
        self.bitmap_count(self.metadata_index_entry(0).blocknr, b)
    }
    /// Sets the metadata space map's count of block `b` (< 16320, v < 3).
    pub fn set_metadata_count(&mut self, b: u64, v: u32) {
        let bm = self.metadata_index_entry(0).blocknr;
        self.set_bitmap_count(bm, b, v);
    }
    /// Sets the data space map's count of data block `b` (< 16320, v < 3).
    pub fn set_data_count(&mut self, b: u64, v: u32) {
        let bm = self.data_index_entry(0).blocknr;
        self.set_bitmap_count(bm, b, v);
    }
    /// First metadata block with count 0 at or after `from`.
    pub fn free_metadata_block(&self, from: u64) -> u64 {
        (from..self.nr_blocks()).find(|&b| self.metadata_count(b) == 0).expect("a free block")
    }

    /// Takes a metadata snapshot the way the kernel does
    /// (`__reserve_metadata_snap`): copies the superblock to a free block
    /// with its space-map roots wiped, counts the copy and one more
    /// reference to each tree root, and records the copy as held_root.
    /// Returns the copy's block.
    pub fn take_metadata_snapshot(&mut self) -> u64 {
        let copy = self.free_metadata_block(1);
        let mut sb = self.block(0).to_vec();
        sb[SB_DATA_SM_ROOT..SB_DATA_SM_ROOT + 128].fill(0);
        sb[SB_METADATA_SM_ROOT..SB_METADATA_SM_ROOT + 128].fill(0);
        BlockKind::ThinSuperblock.prepare_for_write(&mut sb, copy);
        self.block_mut(copy).copy_from_slice(&sb);
        self.set_metadata_count(copy, 1);
        for root in [self.details_root(), self.mapping_root()] {
            let c = self.metadata_count(root);
            assert!(c < 2, "test helper handles counts below 3 only");
            self.set_metadata_count(root, c + 1);
        }
        // Keep the space map's totals as (in)consistent as they were.
        let idx = self.metadata_index();
        let e = self.metadata_index_entry(0);
        put_u32(self.block_mut(idx), 16 + 8, e.nr_free - 1);
        self.reseal(idx, BlockKind::MetadataIndex);
        let alloc = self.metadata_sm().nr_allocated;
        put_u64(self.block_mut(0), SB_METADATA_SM_ROOT + 8, alloc + 1);
        put_u64(self.block_mut(0), SB_HELD_ROOT, copy);
        self.reseal(0, BlockKind::ThinSuperblock);
        copy
    }
}
