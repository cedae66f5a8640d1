//! The fence pair of the read side and the grace period.
//!
//! A reader's pin is a store of the epoch followed by a *light* fence; a
//! grace period starts with a *heavy* fence, then bumps the epoch and
//! scans the readers. The pair must order a reader's pin against the
//! writer's unlink in at least one direction (the store-buffering pattern):
//! either the writer sees the pin, or the reader sees the unlinked entry.
//!
//! By default both fences are SeqCst fences. With `GUEST_MM_MEMBARRIER=1`,
//! where the kernel offers `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`,
//! the heavy fence is that system call and the light fence only a compiler
//! barrier (liburcu's "memb" flavour): cheaper pins, dearer grace periods.
//! The choice is made once per process and never changes afterwards (a
//! reader and a writer must agree on it). Under `cfg(loom)` only the
//! SeqCst pair exists, which loom checks.

use crate::sync::{fence, Ordering};

#[cfg(not(loom))]
mod membarrier {
    use std::sync::atomic::{AtomicU8, Ordering};

    const CMD_PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
    const CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;

    /// 0 = not probed, 1 = usable, 2 = unavailable.
    static STATE: AtomicU8 = AtomicU8::new(0);

    /// Register this process for expedited private membarrier, once.
    pub(super) fn init() {
        if STATE.load(Ordering::Acquire) != 0 {
            return;
        }
        // Symmetric SeqCst fences are the default: measured with `gmm bench
        // walk`, membarrier's IPI on every grace period cost walkers ~38%
        // under an unmap storm on a 2-core VM, while a fence per pin (pins
        // amortised over a batch of translations) cost nothing measurable.
        // GUEST_MM_MEMBARRIER=1 opts in to the asymmetric scheme.
        let off = std::env::var_os("GUEST_MM_NO_MEMBARRIER").is_some()
            || std::env::var_os("GUEST_MM_MEMBARRIER").is_none_or(|v| v != "1");
        // SAFETY: membarrier takes two ints and touches no memory of ours.
        let ok = !off
            && unsafe { libc::syscall(libc::SYS_membarrier, CMD_REGISTER_PRIVATE_EXPEDITED, 0) }
                == 0;
        STATE.store(if ok { 1 } else { 2 }, Ordering::Release);
    }

    #[inline(always)]
    pub(super) fn asymmetric() -> bool {
        STATE.load(Ordering::Relaxed) == 1
    }

    /// A full memory barrier on every thread of this process.
    pub(super) fn heavy() -> bool {
        // SAFETY: as in init; registration succeeded, so the command is valid.
        unsafe { libc::syscall(libc::SYS_membarrier, CMD_PRIVATE_EXPEDITED, 0) == 0 }
    }
}

/// Choose the fence pair for this process (once; later calls do nothing).
pub(super) fn init() {
    #[cfg(not(loom))]
    membarrier::init();
}

/// Whether readers pin with a compiler barrier only (membarrier in use).
pub fn asymmetric_fences() -> bool {
    #[cfg(not(loom))]
    {
        membarrier::init();
        membarrier::asymmetric()
    }
    #[cfg(loom)]
    false
}

#[inline(always)]
pub(super) fn light_fence() {
    #[cfg(not(loom))]
    if membarrier::asymmetric() {
        std::sync::atomic::compiler_fence(Ordering::SeqCst);
        return;
    }
    fence(Ordering::SeqCst);
}

pub(super) fn heavy_fence() {
    #[cfg(not(loom))]
    if membarrier::asymmetric() && membarrier::heavy() {
        return;
    }
    fence(Ordering::SeqCst);
}
