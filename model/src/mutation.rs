//! Deliberate bugs, off by default, that tests switch on to show that a
//! detector (the crash checker, the oracle, the equivalence checks) catches
//! a broken model. Each one breaks a rule the kernel relies on.

/// Turns one mutation on.
pub type Switch = fn(&mut Mutations);

/// The set of deliberate bugs in force.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mutations {
    /// Commit without the flush between writing the shadow blocks and
    /// writing the superblock: a crash can leave a superblock that points
    /// at blocks that never reached the disk.
    pub superblock_before_flush: bool,
    /// Reuse a block freed in the current transaction before the commit:
    /// the copy of an unshared block lands in the very block the copy frees,
    /// so a crash before the commit finds blocks of the committed trees
    /// overwritten.
    pub reuse_freed_before_commit: bool,
}

impl Mutations {
    /// Every mutation with its command-line name.
    pub const ALL: [(&'static str, Switch); 2] = [
        ("superblock-before-flush", |m| m.superblock_before_flush = true),
        ("reuse-freed-before-commit", |m| m.reuse_freed_before_commit = true),
    ];

    /// The mutation named `name` (see [`Self::ALL`]).
    pub fn by_name(name: &str) -> Option<Mutations> {
        let mut m = Mutations::default();
        let (_, set) = Self::ALL.iter().find(|(n, _)| *n == name)?;
        set(&mut m);
        Some(m)
    }

    /// Whether any mutation is on.
    pub fn any(&self) -> bool {
        *self != Mutations::default()
    }
}
