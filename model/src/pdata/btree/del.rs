//! Deleting a whole tree (`dm_btree_del`, spec §1.8): an explicit-stack
//! walk that drops one reference from every node and, for nodes this tree
//! held alone, from everything they reference.

use super::node::Node;
use super::{BtreeInfo, ValueType, MAX_DEPTH};
use crate::block_device::BlockDevice;
use crate::pdata::layout::BlockKind;
use crate::pdata::transaction::TransactionManager;
use crate::pdata::{BlockNr, Result};

struct Frame {
    block: BlockNr,
    level: usize,
    data: Box<[u8; 4096]>,
    current_child: usize,
}

impl<D: BlockDevice> TransactionManager<D> {
    /// Drops the tree rooted at `root`.
    pub fn btree_del(&mut self, info: &BtreeInfo, root: BlockNr) -> Result<()> {
        let mut stack: Vec<Frame> = Vec::new();
        self.push_del_frame(&mut stack, info, root, 0)?;
        while let Some(f) = stack.last_mut() {
            let n = Node::new(&f.data[..]);
            if f.current_child >= n.nr_entries() {
                let b = f.block;
                stack.pop();
                self.dec(b)?;
                continue;
            }
            let (level, i) = (f.level, f.current_child);
            if n.is_internal() {
                f.current_child += 1;
                let child = n.value64(i);
                self.push_del_frame(&mut stack, info, child, level)?;
            } else if level + 1 < info.levels {
                f.current_child += 1;
                let child = n.value64(i);
                self.push_del_frame(&mut stack, info, child, level + 1)?;
            } else {
                let (nr, off) = (n.nr_entries(), n.value_offset(0));
                let values = f.data[off..].to_vec();
                let b = f.block;
                stack.pop();
                self.value_dec(info.value_type, &values, nr)?;
                self.dec(b)?;
            }
        }
        Ok(())
    }

    fn push_del_frame(
        &mut self,
        stack: &mut Vec<Frame>,
        info: &BtreeInfo,
        b: BlockNr,
        level: usize,
    ) -> Result<()> {
        if stack.len() >= MAX_DEPTH - 1 {
            // The kernel's -ENOMEM: its deletion stack is this deep.
            return Err(self.runaway(
                BlockKind::BtreeNode,
                b,
                "btree deletion stack out of memory (tree too deep: a cycle?)",
            ));
        }
        if self.ref_count(b)? > 1 {
            // Shared with another tree: just drop this tree's reference.
            return self.dec(b);
        }
        let vt: ValueType = info.level_type(level);
        let data = Box::new(*self.read_node(b, vt)?);
        stack.push(Frame { block: b, level, data, current_child: 0 });
        Ok(())
    }
}
