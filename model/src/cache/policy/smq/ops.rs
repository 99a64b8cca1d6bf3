//! smq's public operations (`smq_*` and `mq_*` in dm-cache-policy-smq.c).

use super::{SmqPolicy, NR_CACHE_LEVELS};
use crate::cache::policy::background::{PolicyOp, PolicyWork};
use crate::cache::policy::hash::hash_32;
use crate::cache::policy::{CachePolicy, DataDir, Lookup, LookupWithWork, Nanos, PolicyType};
use crate::errno::Errno;

/// The old mq tunables the `mq` alias accepts and ignores.
pub const MQ_TUNABLES: [&str; 5] = [
    "random_threshold",
    "sequential_threshold",
    "discard_promote_adjustment",
    "read_promote_adjustment",
    "write_promote_adjustment",
];

/// What `mq` prints for its policy arguments (`mq_emit_config_values`).
pub const MQ_CONFIG_VALUES: &str = "10 random_threshold 0 sequential_threshold 0 \
discard_promote_adjustment 0 read_promote_adjustment 0 write_promote_adjustment 0 ";

/// The level of a loaded mapping without a valid hint (`random_level`):
/// `hash_32(cblock, 9) & 63`.
pub fn random_level(cblock: u32) -> u32 {
    hash_32(cblock, 9) & (NR_CACHE_LEVELS - 1)
}

/// The kernel's `kstrtoul(s, 10, ..)`: an optional '+', decimal digits, an
/// optional trailing newline, no overflow.
fn kstrtoul(s: &str) -> Option<u64> {
    let s = s.strip_suffix('\n').unwrap_or(s);
    let s = s.strip_prefix('+').unwrap_or(s);
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

impl CachePolicy for SmqPolicy {
    fn policy_type(&self) -> PolicyType {
        self.params.policy
    }

    fn lookup(&mut self, oblock: u64, dir: DataDir, fast_copy: bool) -> Lookup {
        let (cblock, _, background_queued) = self.lookup_inner(oblock, dir, fast_copy, false);
        Lookup { cblock, background_queued }
    }

    fn lookup_with_work(&mut self, oblock: u64, dir: DataDir, fast_copy: bool) -> LookupWithWork {
        let (cblock, work, _) = self.lookup_inner(oblock, dir, fast_copy, true);
        LookupWithWork { cblock, work }
    }

    fn get_background_work(&mut self, idle: bool) -> Option<PolicyWork> {
        if let Some(w) = self.bg_work.issue() {
            return Some(w);
        }
        if !self.clean_target_met(idle) {
            self.queue_writeback(idle);
            return self.bg_work.issue();
        }
        None
    }

    /// Panics if `work` is not an item this policy handed out.
    fn complete_background_work(&mut self, work: PolicyWork, success: bool) {
        let e = self.cache_entry(work.cblock);
        match work.op {
            PolicyOp::Promote => {
                self.clear_pending(e);
                if success {
                    let ent = self.es.get_mut(e);
                    ent.oblock = work.oblock;
                    ent.level = NR_CACHE_LEVELS - 1;
                    self.table.insert(&mut self.es, e);
                    self.push_queue(e);
                } else {
                    self.cache_alloc.free(&mut self.es, e);
                }
            }
            PolicyOp::Demote => {
                if success {
                    self.table.remove(&mut self.es, e);
                    self.cache_alloc.free(&mut self.es, e);
                } else {
                    self.clear_pending(e);
                    self.push_queue(e);
                }
            }
            PolicyOp::Writeback => {
                self.clear_pending(e);
                self.push_queue(e);
            }
        }
        self.bg_work.complete(&work);
    }

    fn set_dirty(&mut self, cblock: u32) {
        self.set_clear_dirty(cblock, true);
    }

    fn clear_dirty(&mut self, cblock: u32) {
        self.set_clear_dirty(cblock, false);
    }

    /// The entry goes to the *front* of its level, ahead of both sentinels,
    /// so that loaded blocks can be demoted or cleaned at once. The kernel
    /// BUGs on a cblock loaded twice; the model returns EINVAL.
    fn load_mapping(
        &mut self,
        oblock: u64,
        cblock: u32,
        dirty: bool,
        hint: u32,
        hint_valid: bool,
    ) -> Result<(), Errno> {
        let e = self.cache_entry(cblock);
        if self.es.get(e).allocated {
            return Err(Errno::EINVAL);
        }
        self.cache_alloc.alloc_particular(&mut self.es, cblock);
        let ent = self.es.get_mut(e);
        ent.oblock = oblock;
        ent.dirty = dirty;
        ent.level = if hint_valid { hint.min(NR_CACHE_LEVELS - 1) } else { random_level(cblock) };
        ent.pending_work = false;
        self.table.insert(&mut self.es, e);
        self.push_queue_front(e);
        Ok(())
    }

    /// An entry with pending work is on no queue; the kernel would unlink
    /// it anyway and corrupt its lists (a "FIXME" in the source). The model
    /// refuses that case with a panic rather than corrupt silently.
    fn invalidate_mapping(&mut self, cblock: u32) -> Result<(), Errno> {
        let e = self.cache_entry(cblock);
        if !self.es.get(e).allocated {
            return Err(Errno::ENODATA);
        }
        assert!(!self.es.get(e).pending_work, "invalidating cblock {cblock} with pending background work");
        self.del_queue(e);
        self.table.remove(&mut self.es, e);
        self.cache_alloc.free(&mut self.es, e);
        Ok(())
    }

    fn get_hint(&self, cblock: u32) -> u32 {
        let e = self.es.get(self.cache_entry(cblock));
        if e.allocated {
            e.level
        } else {
            0
        }
    }

    fn residency(&self) -> u32 {
        self.cache_alloc.nr_allocated
    }

    fn tick(&mut self, _can_block: bool, now: Nanos) {
        let jiffies = self.jiffies(now);
        self.ticks = self.ticks.wrapping_add(1);
        self.update_sentinels(jiffies);
        self.end_hotspot_period(jiffies);
        self.end_cache_period(jiffies);
    }

    fn set_config_value(&mut self, key: &str, value: &str) -> Result<(), Errno> {
        if self.params.policy != PolicyType::Mq {
            return Err(Errno::EINVAL);
        }
        kstrtoul(value).ok_or(Errno::EINVAL)?;
        if MQ_TUNABLES.iter().any(|t| t.eq_ignore_ascii_case(key)) {
            return Ok(()); // "tunable '%s' no longer has any effect"
        }
        Err(Errno::EINVAL)
    }

    fn emit_config_values(&self) -> String {
        match self.params.policy {
            PolicyType::Mq => MQ_CONFIG_VALUES.to_string(),
            _ => "0 ".to_string(),
        }
    }

    fn allow_migrations(&mut self, allow: bool) {
        self.migrations_allowed = allow;
    }

    fn cache_size(&self) -> u32 {
        self.params.cache_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kstrtoul_accepts_what_the_kernel_does() {
        assert_eq!(kstrtoul("12"), Some(12));
        assert_eq!(kstrtoul("+7\n"), Some(7));
        assert_eq!(kstrtoul(""), None);
        assert_eq!(kstrtoul("-1"), None);
        assert_eq!(kstrtoul(" 1"), None);
        assert_eq!(kstrtoul("18446744073709551616"), None);
    }

    #[test]
    fn random_level_is_the_kernel_hash() {
        assert_eq!(random_level(0), 0);
        assert_eq!(random_level(1), 195 & 63);
    }
}
