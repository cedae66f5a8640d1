//! The RCU domain of one table: readers, epochs, grace periods and
//! deferred freeing.
//!
//! **Readers.** A lockless reader registers once ([`Rcu::register`]) and
//! then *pins* its slot around each read section: it stores the current
//! epoch in its slot and issues a light fence ([`super::fence`]). The
//! section ends when the [`ReadGuard`] drops (a Release store of 0).
//! Pinning takes no lock and allocates nothing.
//!
//! **Grace periods.** A writer that unlinked something calls
//! [`Rcu::synchronize`]: a heavy fence, an epoch bump, then it waits until
//! every slot is idle or carries the new epoch. Every read section that
//! was running when the call started has then ended.
//!
//! **Deferred freeing.** [`Rcu::retire`] hands unlinked table pages over
//! (the `call_rcu` analogue); they are freed at the end of the next grace
//! period that *starts* after the hand-over. If the list cannot grow, the
//! caller waits for a grace period itself and frees synchronously (the
//! kernel's `tlb_remove_table_one` fallback). A writer that unlinks a
//! table page of level 2 or above bumps the *unlink sequence*
//! ([`Rcu::note_unlinked`]) right after the unhook, before it can be
//! retired: walkers that keep such pages across read sections (the fast
//! walk's directory cache) compare it at every pin. [`Rcu::barrier`] is the
//! `rcu_barrier` analogue: it returns when everything retired before the
//! call has been freed. The `mutation` rule `deferred_free` makes
//! `retire` free at once.
//!
//! **Concurrency.** A grace period takes the reader-slot lock only to look
//! each slot up, never while it waits for a reader, so registering a reader
//! never waits for a grace period: the userfaultfd handler may make its
//! first walker while it serves a fault that a pinned reader is blocked in
//! (rule `register_unblocked`). The slot and retired-list locks are taken
//! only outside the table lock.

use super::fence::{heavy_fence, light_fence};
use super::pool::{PagePool, PagePtr};
use crate::fault::FailPoint;
use crate::mutation::{broken, Rule};
use crate::sync::{backoff, lock, AtomicU64, Mutex, Ordering};

/// One reader's slot: 0 when idle, else the epoch it pinned at.
#[repr(align(64))]
pub(crate) struct ReaderSlot {
    state: AtomicU64,
    in_use: crate::sync::AtomicBool,
}

/// The reclamation domain of one table: readers, epochs, retired pages.
pub(crate) struct Rcu {
    epoch: AtomicU64,
    /// Bumped by [`Rcu::note_unlinked`] whenever a table page of level 2
    /// or above is unlinked: walkers that keep such pages across read
    /// sections drop them at pin when it moved.
    unlink_seq: AtomicU64,
    slots: Mutex<Vec<crate::sync::Arc<ReaderSlot>>>,
    retired: Mutex<Vec<PagePtr>>,
    grace_periods: AtomicU64,
    sync_fallbacks: AtomicU64,
    pub(crate) pool: PagePool,
}

/// A registered reader. Not `Sync`: one thread pins it at a time.
pub(crate) struct Reader {
    slot: crate::sync::Arc<ReaderSlot>,
    _not_sync: std::marker::PhantomData<std::cell::Cell<()>>,
}

/// A read section; table pages read inside it stay allocated until it ends.
pub(crate) struct ReadGuard<'r> {
    slot: &'r ReaderSlot,
}

impl Drop for ReadGuard<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        // Release: our reads of table pages happen-before a writer's
        // Acquire load that sees the slot idle, and so before its free.
        self.slot.state.store(0, Ordering::Release);
    }
}

impl Reader {
    /// Enter a read section.
    #[inline(always)]
    pub(crate) fn pin(&mut self, rcu: &Rcu) -> ReadGuard<'_> {
        let e = rcu.epoch.load(Ordering::Relaxed);
        self.slot.state.store(e, Ordering::Relaxed);
        light_fence();
        ReadGuard { slot: &self.slot }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.slot.state.store(0, Ordering::Release);
        self.slot.in_use.store(false, Ordering::Release);
    }
}

impl Rcu {
    pub(crate) fn new() -> Rcu {
        super::fence::init();
        Rcu {
            epoch: AtomicU64::new(1),
            unlink_seq: AtomicU64::new(0),
            slots: Mutex::new(Vec::new()),
            retired: Mutex::new(Vec::new()),
            grace_periods: AtomicU64::new(0),
            sync_fallbacks: AtomicU64::new(0),
            pool: PagePool::new(),
        }
    }

    /// Register a reader (takes a lock; not for hot paths).
    pub(crate) fn register(&self) -> Reader {
        let mut slots = lock(&self.slots);
        let slot = match slots.iter().find(|s| {
            s.in_use
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        }) {
            Some(s) => s.clone(),
            None => {
                let s = crate::sync::Arc::new(ReaderSlot {
                    state: AtomicU64::new(0),
                    in_use: crate::sync::AtomicBool::new(true),
                });
                slots.push(s.clone());
                s
            }
        };
        Reader {
            slot,
            _not_sync: std::marker::PhantomData,
        }
    }

    /// The `i`-th registered slot, looked up under the slot lock.
    fn slot_at(&self, i: usize) -> Option<crate::sync::Arc<ReaderSlot>> {
        lock(&self.slots).get(i).cloned()
    }

    /// Wait for a grace period: every read section that was running when
    /// this call started has ended. Frees what was retired before the call.
    pub(crate) fn synchronize(&self) {
        let stolen = std::mem::take(&mut *lock(&self.retired));
        // Everything this thread unlinked or cleared, and everything
        // retired above, is visible to all readers after this fence; a
        // reader whose pin is not yet visible to us will see it.
        heavy_fence();
        let target = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        // The slot lock is held only to look a slot up, never while waiting
        // for it: a reader blocked inside its section on something that
        // registers a reader (a page fault whose handler makes its first
        // walker) would otherwise wait for us while we wait for it. Slots
        // are only ever appended, so index `i` names the same slot on every
        // look-up; one registered after the bump pins a section that began
        // after this call and need not be waited for.
        let wait = |s: &ReaderSlot| {
            let mut spins = 0;
            loop {
                let v = s.state.load(Ordering::Acquire);
                if v == 0 || v >= target {
                    break;
                }
                backoff(&mut spins);
            }
        };
        if broken(Rule::RegisterUnblocked) {
            // The bug the switch injects: wait with the slot lock held, so
            // registering a reader waits for the grace period.
            lock(&self.slots).iter().for_each(|s| wait(s));
        } else {
            let mut i = 0;
            while let Some(s) = self.slot_at(i) {
                wait(&s);
                i += 1;
            }
        }
        self.grace_periods.fetch_add(1, Ordering::Relaxed);
        for p in stolen {
            // SAFETY: p was unlinked before it was retired, and the grace
            // period above started after it was retired.
            unsafe { self.pool.free(p) };
        }
    }

    /// Hand unlinked pages over for freeing after a grace period. If the
    /// deferred list cannot grow, wait for a grace period now and free them
    /// synchronously.
    ///
    /// # Safety
    /// Every page must already be unlinked from the table (no new reader
    /// can reach it), and must be handed over only once.
    pub(crate) unsafe fn retire(&self, pages: &[PagePtr], fail: &FailPoint) {
        if pages.is_empty() {
            return;
        }
        if broken(Rule::DeferredFree) {
            for &p in pages {
                // SAFETY: this is the bug the `DeferredFree` switch injects
                // (mutation builds only): the pages are unlinked (contract),
                // but a reader may still be inside one when it is poisoned.
                unsafe { self.pool.free(p) };
            }
            return;
        }
        {
            let mut r = lock(&self.retired);
            if !fail.should_fail() && r.try_reserve(pages.len()).is_ok() {
                r.extend_from_slice(pages);
                return;
            }
        }
        self.sync_fallbacks.fetch_add(1, Ordering::Relaxed);
        self.synchronize();
        for &p in pages {
            // SAFETY: unlinked before this call (contract), and a full
            // grace period started after that.
            unsafe { self.pool.free(p) };
        }
    }

    /// Tell walkers that table pages they may cache were unlinked: bumps
    /// the unlink sequence, which every pin of a [`crate::Walker`] compares
    /// with the one its directory cache was filled under. The writer that
    /// unlinks a page of level 2 or above calls it right after the unhook,
    /// under the table lock, so before the grace period that frees the
    /// page starts: a reader that pinned before the bump is waited for,
    /// and one that pins after it sees the new sequence. Leaf tables are
    /// never cached across read sections and move nothing.
    #[inline]
    pub(crate) fn note_unlinked(&self) {
        self.unlink_seq.fetch_add(1, Ordering::SeqCst);
    }

    /// The unlink sequence (see [`Rcu::note_unlinked`]); read by walkers
    /// after their pin's fence.
    #[inline(always)]
    pub(crate) fn unlink_seq(&self) -> u64 {
        self.unlink_seq.load(Ordering::Acquire)
    }

    /// Pages waiting for a grace period.
    pub(crate) fn retired_len(&self) -> usize {
        lock(&self.retired).len()
    }

    /// The `rcu_barrier` analogue: everything retired before this call is freed.
    pub(crate) fn barrier(&self) {
        self.synchronize();
    }

    pub(crate) fn grace_periods(&self) -> u64 {
        self.grace_periods.load(Ordering::Relaxed)
    }
    pub(crate) fn sync_fallbacks(&self) -> u64 {
        self.sync_fallbacks.load(Ordering::Relaxed)
    }
}

impl Drop for Rcu {
    fn drop(&mut self) {
        let stolen = std::mem::take(&mut *lock(&self.retired));
        for p in stolen {
            // SAFETY: the domain is being dropped: no reader exists (readers
            // hold the table alive), and each page was unlinked when retired.
            unsafe { self.pool.free(p) };
        }
    }
}
