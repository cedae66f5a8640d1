//! Table pages and their reclamation: where table pages come from and
//! when they may go back.
//!
//! - `pool`: table pages ([`TablePage`]), carved from `mmap`ed chunks,
//!   poisoned when freed and reused oldest-first; [`live_table_pages`]
//!   counts the pages in use in all tables of the process;
//! - `arena`: the leaf table pages of one table, each at a fixed place
//!   chosen by the 2 MiB it maps, so that the fast walk reaches a 4 KiB
//!   leaf entry with one load; they are never freed to another use while
//!   the table lives, so they need no grace period;
//! - `fence`: the light/heavy fence pair of the read side and the grace
//!   period (SeqCst fences, or membarrier when asked for);
//! - `rcu`: the RCU domain of one table: registered readers, pins, grace
//!   periods, deferred freeing (`call_rcu`) and the barrier (`rcu_barrier`).
//!
//! **The rule.** A table page of level 2 or above is freed only after it was unlinked from the
//! table and a grace period that *started* after the unlink has ended, so
//! no lockless reader can still hold its address. Backing follows the
//! same rule through the gather ([`crate::gather`]): it is released only
//! after the grace period of its flush.
//!
//! **Concurrency.** Readers pin and unpin with a store and a light fence,
//! take no lock and allocate nothing. Registration, grace periods and
//! deferred freeing take locks, never on a reader's path; they are taken
//! outside the table lock except the page pool's.

mod arena;
mod fence;
mod pool;
mod rcu;

pub(crate) use arena::{ArenaView, LeafArena};
pub use fence::asymmetric_fences;
pub(crate) use pool::PagePtr;
#[cfg(not(loom))]
pub use pool::{leaked_table_bytes, leaked_table_chunks, retry_leaked_table_chunks};
pub use pool::{live_table_pages, TablePage};
pub(crate) use rcu::{Rcu, ReadGuard, Reader};
