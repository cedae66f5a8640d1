//! Invalidation subscribers: the `mmu_notifier` analogue.
//!
//! A subscriber (the KVM side of the VMM, a vhost-user backend, a device
//! with its own mapping cache) hears about every range whose translations
//! were cleared, after the entries are cleared and **before** the backing is
//! released (`invalidate_range_start`), and again after the release
//! (`invalidate_range_end`). Callbacks run with no table lock held and may
//! block. They run under the subscriber list's read lock, so a callback must
//! not register or unregister subscribers.

use std::sync::Arc;

use thiserror::Error;

use crate::addr::Gpa;

/// What a flush invalidates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Invalidation {
    /// First guest-physical address (inclusive).
    pub start: Gpa,
    /// End (exclusive).
    pub end: Gpa,
    /// The whole table is going away: no per-range work is needed.
    pub full_mm: bool,
    /// Whether backing will be released after `start` (false for
    /// permission changes and huge-leaf splits).
    pub releases: bool,
}

/// Hears about invalidations. May block.
pub trait InvalidationSubscriber: Send + Sync {
    /// Entries in `inv` were cleared; their backing is not released yet.
    fn invalidate_range_start(&self, inv: &Invalidation);
    /// The backing of `inv` has been released.
    fn invalidate_range_end(&self, _inv: &Invalidation) {}
}

/// Identifies a registration.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct SubscriberId(pub u64);

/// Errors of (un)registering a subscriber.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SubscribeError {
    /// The same subscriber object is registered already.
    #[error("this invalidation subscriber is already registered (as {0:?}); register it once")]
    AlreadyRegistered(SubscriberId),
    /// No such registration.
    #[error("invalidation subscriber {0:?} is not registered (already unregistered?)")]
    NotRegistered(SubscriberId),
}

type Entry = (SubscriberId, Arc<dyn InvalidationSubscriber>);

pub(crate) struct Subscribers {
    list: std::sync::RwLock<Vec<Entry>>,
    /// The next id; only read and bumped under the list's write lock.
    next: std::sync::atomic::AtomicU64,
}

impl Subscribers {
    pub(crate) fn new() -> Subscribers {
        Subscribers {
            list: std::sync::RwLock::new(Vec::new()),
            next: std::sync::atomic::AtomicU64::new(1),
        }
    }

    pub(crate) fn register(
        &self,
        s: Arc<dyn InvalidationSubscriber>,
    ) -> Result<SubscriberId, SubscribeError> {
        let mut list = self.list.write().unwrap_or_else(|p| p.into_inner());
        if let Some((id, _)) = list.iter().find(|(_, x)| Arc::ptr_eq(x, &s)) {
            return Err(SubscribeError::AlreadyRegistered(*id));
        }
        let id = SubscriberId(self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        list.push((id, s));
        Ok(id)
    }

    pub(crate) fn unregister(&self, id: SubscriberId) -> Result<(), SubscribeError> {
        let mut list = self.list.write().unwrap_or_else(|p| p.into_inner());
        let pos = list
            .iter()
            .position(|(x, _)| *x == id)
            .ok_or(SubscribeError::NotRegistered(id))?;
        list.remove(pos);
        Ok(())
    }

    pub(crate) fn start(&self, inv: &Invalidation) {
        let list = self.list.read().unwrap_or_else(|p| p.into_inner());
        for (_, s) in list.iter() {
            s.invalidate_range_start(inv);
        }
    }

    pub(crate) fn end(&self, inv: &Invalidation) {
        let list = self.list.read().unwrap_or_else(|p| p.into_inner());
        for (_, s) in list.iter() {
            s.invalidate_range_end(inv);
        }
    }
}
