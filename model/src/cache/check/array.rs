//! A dm-array read from untrusted blocks: its btree (through the shared
//! checking walk, which counts and validates the nodes), then each array
//! block (checksum, location, header), the keys' contiguity and the
//! array's length.

use crate::pdata::layout::array::{self as ab, max_entries_for};
use crate::pdata::layout::BlockKind;
use crate::thin::check::block::{le32, Block};
use crate::thin::check::walk::{Ctx, TreeKind, Use};
use crate::thin::check::{Severity, Structure};

/// What the walk of one array found.
pub(crate) struct ArrayContents {
    /// Array block locations by array block index, as far as the keys
    /// were contiguous from 0 (the blocks that could be trusted or not).
    pub ablocks: Vec<u64>,
    /// The values, in index order, of the valid array blocks before the
    /// first fault; `complete` says whether that is the whole array.
    pub values: Vec<u8>,
    /// Values in `values`.
    pub len: u64,
    /// Whether the btree and every array block were valid, so that
    /// `values` is the whole array.
    pub complete: bool,
}

/// Walks the array rooted at `root` whose values are `value_size` bytes
/// (8 or 4; never trusted from disk), collecting the values when
/// `collect` is set. Memory stays bounded by the device: each distinct
/// array block is read once per array (a block named at two indices of
/// one array is damage and read once). Every fault is reported in `st`,
/// naming the block.
pub(crate) fn walk_array(
    ctx: &mut Ctx<'_>,
    root: u64,
    value_size: usize,
    st: Structure,
    collect: bool,
) -> ArrayContents {
    ctx.pending_ablocks.clear();
    let summary = ctx.walk_root(root, TreeKind::ArrayIndex, st);
    let pending = std::mem::take(&mut ctx.pending_ablocks);
    let mut out = ArrayContents { ablocks: Vec::new(), values: Vec::new(), len: 0, complete: summary.ok };
    let max = max_entries_for(value_size) as usize;
    let mut values_ok = summary.ok;
    let last = pending.len().saturating_sub(1);
    let mut seen = std::collections::BTreeSet::new();
    for (i, &(key, b)) in pending.iter().enumerate() {
        if key != i as u64 {
            ctx.problem(
                Severity::Damage,
                st,
                Some(b),
                format!(
                    "array btree keys are not contiguous: array block {i} is missing (next key is {key})"
                ),
            );
            out.complete = false;
            break;
        }
        out.ablocks.push(b);
        if !seen.insert(b) {
            ctx.problem(
                Severity::Damage,
                st,
                Some(b),
                format!("array block {i} is the same block as an earlier index of this array"),
            );
            out.complete = false;
            values_ok = false;
            continue;
        }
        if !ctx.claim(b, Use::ArrayBlock, st) {
            out.complete = false;
            values_ok = false;
            continue;
        }
        let block = match ctx.reader.read_as(b, BlockKind::Array) {
            Ok(block) => block,
            Err(e) => {
                ctx.problem(Severity::Damage, st, Some(b), format!("array block {i}: {e}"));
                out.complete = false;
                values_ok = false;
                continue;
            }
        };
        let Some(nr) = check_header(ctx, &block, b, i, value_size, max, i == last, st) else {
            out.complete = false;
            values_ok = false;
            continue;
        };
        out.len = out.len.saturating_add(nr as u64);
        if values_ok && collect {
            let start = ab::HEADER_SIZE;
            if let Some(v) = block.get(start..start + nr * value_size) {
                out.values.extend_from_slice(v);
            }
        }
    }
    if !values_ok {
        out.values.clear();
    }
    out
}

/// Validates an array block header; returns its nr_entries.
#[allow(clippy::too_many_arguments)]
fn check_header(
    ctx: &mut Ctx<'_>,
    block: &Block,
    b: u64,
    i: usize,
    value_size: usize,
    max: usize,
    is_last: bool,
    st: Structure,
) -> Option<usize> {
    let b_ = &block[..];
    let vs = le32(b_, ab::VALUE_SIZE) as usize;
    let me = le32(b_, ab::MAX_ENTRIES) as usize;
    let nr = le32(b_, ab::NR_ENTRIES) as usize;
    let bad = |ctx: &mut Ctx<'_>, what: String| {
        ctx.problem(Severity::Damage, st, Some(b), format!("array block {i}: {what}"));
        None
    };
    if vs != value_size {
        return bad(ctx, format!("value size {vs}, expected {value_size}"));
    }
    if me != max {
        return bad(ctx, format!("max_entries {me}, expected {max} for {value_size}-byte values"));
    }
    if nr > me {
        return bad(ctx, format!("nr_entries {nr} exceeds max_entries {me}"));
    }
    if !is_last && nr != me {
        return bad(ctx, format!("only {nr} of {me} entries, but it is not the last array block"));
    }
    if is_last && nr == 0 {
        return bad(ctx, "the last array block is empty".to_string());
    }
    Some(nr)
}
