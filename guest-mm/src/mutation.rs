//! Rules that can be broken on purpose, so that every detector is seen to fire.
//!
//! Each [`Rule`] names one invariant that a test, a loom model, a stress run
//! or a fuzzer exists to guard. In a build with the test-only Cargo feature
//! `mutation`, the environment variable [`ENV`] (`GMM_BREAK_RULE=<name>`)
//! breaks exactly one of them for the whole process, and
//! `tools/mutation/run.sh` runs the detectors of each rule against the broken
//! build: a detector counts only once it has failed there.
//!
//! **Without the feature nothing of this exists at run time:** [`broken`] is a
//! `const fn` returning `false`, so every `if broken(..)` branch is removed by
//! the compiler and the normal build carries neither the check nor the broken
//! code path. With the feature, the variable is read once per process and
//! cached in an atomic (a relaxed load per check afterwards).
//!
//! The rules of the monitor's devices (balloon bounds, descriptor checks,
//! the i8042's buffer bound) live here too, so that there is one list of
//! rules and one switch.

/// The environment variable that names the rule to break (feature `mutation`).
pub const ENV: &str = "GMM_BREAK_RULE";

/// One rule that a detector guards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    /// A gather's flush waits for a grace period before it releases backing
    /// (broken: the release follows the invalidation at once).
    GracePeriod,
    /// A walker empties its translation cache at pin when the table's
    /// invalidation sequence moved (broken: the cache is kept).
    CacheShootdown,
    /// A walker forgets its cached level-2 table pages (the directory
    /// cache) at pin when the table's unlink sequence moved (broken: it
    /// keeps using them, even after they were freed).
    LeafCacheUnlink,
    /// Unmappers, mappers and faults wait for older overlapping pending
    /// flushes (broken: nobody waits, pending ranges are ignored).
    PendingWait,
    /// Backing is released outside the table lock and after the
    /// invalidation (broken: released under the lock, as entries are cleared).
    UnhookOrder,
    /// Unlinked table pages are freed after a grace period (broken: freed,
    /// and poisoned, at once).
    DeferredFree,
    /// The balloon releases only PFNs inside guest RAM (broken: a PFN past
    /// the end of RAM is accepted).
    BalloonBounds,
    /// The balloon never releases the reserved low memory (broken: it does).
    BalloonReservedLow,
    /// A descriptor's buffer must lie inside RAM for its whole, non-zero
    /// length (broken: only its first byte is checked, zero is accepted).
    DescLength,
    /// A descriptor's buffer address must be inside RAM (broken: the address
    /// is not checked at all; only the stage-2 walk stands behind it).
    DescAddress,
    /// Fault commits and writers change a discarded entry with
    /// compare-and-swap, and a fault re-validates after its swap (broken:
    /// both sides store blindly and nothing is re-checked).
    FaultCas,
    /// A grace period never holds the reader-slot lock while it waits for
    /// a reader, so registering a reader never waits for a grace period
    /// (broken: it waits with the lock held, and a fault handler that
    /// registers its first walker while a pinned reader waits for it
    /// deadlocks).
    RegisterUnblocked,
    /// A range whose release failed every attempt is recorded as
    /// unreleased (counted, reported, released again at teardown) (broken:
    /// it is forgotten: cleared in the table, still resident, unaccounted).
    UnreleasedRecord,
    /// A fault commit fails when an invalidation touched its snapshot's
    /// range since the snapshot (broken: it never does, so a fault whose
    /// page was released and discarded again in between restores it).
    FaultSeq,
    /// A leaf table page is unlinked only once every entry of it is
    /// cleared, so a present entry in the leaf arena is always one a walk
    /// from the root would find (broken: a leaf table whose whole range is
    /// removed is unhooked with its entries left in place, its leaves
    /// still invalidated and released: the fast walk's one load keeps
    /// finding them).
    LeafClear,
    /// What an unmap's visitor keeps back over a leaf table page (the
    /// invalidation range and the release run of the leaves it cleared
    /// there) reaches the gather before the page's visit returns, also
    /// when it stops early for the lock's yield or a full gather (broken:
    /// an early stop leaves it with the visitor, recorded only when the
    /// walk goes on, after the flush that should have covered those
    /// cleared leaves).
    LeafNotes,
    /// Every part of the leaf arena below its readable end is readable:
    /// opening a GiB makes the closed parts below it readable before it
    /// raises the end (broken: only the GiB itself is opened, so the fast
    /// walk's one load faults in a GiB below the end that was never
    /// opened).
    ArenaReadable,
    /// A leaf table page is never freed while its table lives, so it is
    /// never poisoned: every entry of the leaf arena is a level-1 leaf, a
    /// level-1 marker or zero, none with LARGE, and the fast walk's one
    /// load tests the needed permissions alone (broken: a leaf page given
    /// back when it became empty is poisoned, as a freed pool page is, and
    /// zeroed when taken again; the one load finds POISON, which has
    /// R|W|X, and translates it).
    LeafKept,
    /// A process the tools or the tests start (a `vmm`, a peer, a
    /// detector run) dies with the thread that started it, so a bench or
    /// test run killed outright leaves no VM running (broken: the child is
    /// not asked to die with its parent, `PR_SET_PDEATHSIG` is not set).
    ChildDiesWithParent,
    /// The i8042's output buffer holds at most 16 bytes and refuses what
    /// does not fit, so a key sequence the host sends (Ctrl-Alt-Del) is
    /// delivered whole or reported as not sent (broken: a full buffer
    /// overwrites its oldest byte and reports success, so the guest reads
    /// a cut sequence and the host never hears of it).
    KbdBufferBound,
    /// A port access wider than a byte, or a string one, to the legacy
    /// devices is split into byte accesses as a PC's bus splits it: byte
    /// `j` of each element at `port + j`, each its own register access
    /// (broken: the bytes of an `in` all take one read of `port`, those of
    /// an `out` all go to `port`, so `rep insb` duplicates one received
    /// byte and `outw` sends both bytes instead of setting the register
    /// after).
    PortSplit,
}

impl Rule {
    /// Every rule, in a stable order.
    pub const ALL: [Rule; 21] = [
        Rule::GracePeriod,
        Rule::CacheShootdown,
        Rule::LeafCacheUnlink,
        Rule::PendingWait,
        Rule::UnhookOrder,
        Rule::DeferredFree,
        Rule::BalloonBounds,
        Rule::BalloonReservedLow,
        Rule::DescLength,
        Rule::DescAddress,
        Rule::FaultCas,
        Rule::RegisterUnblocked,
        Rule::UnreleasedRecord,
        Rule::FaultSeq,
        Rule::LeafClear,
        Rule::LeafNotes,
        Rule::ArenaReadable,
        Rule::LeafKept,
        Rule::ChildDiesWithParent,
        Rule::KbdBufferBound,
        Rule::PortSplit,
    ];

    /// The name used in [`ENV`] and in the mutation runner's output.
    pub const fn name(self) -> &'static str {
        match self {
            Rule::GracePeriod => "grace_period",
            Rule::CacheShootdown => "cache_shootdown",
            Rule::LeafCacheUnlink => "leaf_cache_unlink",
            Rule::PendingWait => "pending_wait",
            Rule::UnhookOrder => "unhook_order",
            Rule::DeferredFree => "deferred_free",
            Rule::BalloonBounds => "balloon_bounds",
            Rule::BalloonReservedLow => "balloon_reserved_low",
            Rule::DescLength => "desc_length",
            Rule::DescAddress => "desc_address",
            Rule::FaultCas => "fault_cas",
            Rule::RegisterUnblocked => "register_unblocked",
            Rule::UnreleasedRecord => "unreleased_record",
            Rule::FaultSeq => "fault_seq",
            Rule::LeafClear => "leaf_clear",
            Rule::LeafNotes => "leaf_notes",
            Rule::ArenaReadable => "arena_readable",
            Rule::LeafKept => "leaf_kept",
            Rule::ChildDiesWithParent => "child_dies_with_parent",
            Rule::KbdBufferBound => "kbd_buffer_bound",
            Rule::PortSplit => "port_split",
        }
    }

    /// The rule called `name`, if any.
    pub fn from_name(name: &str) -> Option<Rule> {
        Rule::ALL.into_iter().find(|r| r.name() == name)
    }
}

/// Whether `rule` is broken in this process. Always `false` without the
/// `mutation` feature.
#[cfg(not(feature = "mutation"))]
#[inline(always)]
pub const fn broken(_rule: Rule) -> bool {
    false
}

/// Whether `rule` is broken in this process ([`ENV`], read once).
#[cfg(feature = "mutation")]
#[inline]
pub fn broken(rule: Rule) -> bool {
    active::get() == Some(rule)
}

/// Whether this build can break rules at all (feature `mutation`).
pub const fn enabled() -> bool {
    cfg!(feature = "mutation")
}

/// The rule this process breaks, if any (always `None` without the feature).
pub fn active() -> Option<Rule> {
    #[cfg(feature = "mutation")]
    {
        active::get()
    }
    #[cfg(not(feature = "mutation"))]
    {
        None
    }
}

#[cfg(feature = "mutation")]
mod active {
    use std::sync::atomic::{AtomicU8, Ordering};

    use super::{Rule, ENV};

    /// 0: not read yet; 1: no rule; 2 + i: `Rule::ALL[i]`.
    static STATE: AtomicU8 = AtomicU8::new(0);

    pub(super) fn get() -> Option<Rule> {
        let mut s = STATE.load(Ordering::Relaxed);
        if s == 0 {
            s = read();
            STATE.store(s, Ordering::Relaxed);
        }
        (s >= 2).then(|| Rule::ALL[usize::from(s - 2)])
    }

    fn read() -> u8 {
        let Ok(name) = std::env::var(ENV) else {
            return 1;
        };
        if name.is_empty() || name == "none" {
            return 1;
        }
        match Rule::ALL.iter().position(|r| r.name() == name) {
            Some(i) => {
                eprintln!("guest-mm: mutation build, rule '{name}' is BROKEN in this process");
                u8::try_from(i + 2).unwrap_or(1)
            }
            None => {
                // A misspelt rule must not pass as "nothing broken, detector
                // silent": refuse to run at all.
                let names: Vec<_> = Rule::ALL.iter().map(|r| r.name()).collect();
                eprintln!("guest-mm: {ENV}={name:?} names no rule (rules: {names:?})");
                std::process::exit(2);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_unique() {
        for r in Rule::ALL {
            assert_eq!(Rule::from_name(r.name()), Some(r));
        }
        let mut names: Vec<_> = Rule::ALL.iter().map(|r| r.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Rule::ALL.len());
        assert_eq!(Rule::from_name("no_such_rule"), None);
    }

    #[cfg(not(feature = "mutation"))]
    #[test]
    fn nothing_is_broken_without_the_feature() {
        assert!(!enabled());
        assert_eq!(active(), None);
        assert!(Rule::ALL.iter().all(|&r| !broken(r)));
    }
}
