//! Real anonymous memory for the benchmarks: an owned `mmap` region that
//! can be populated, released with the three baseline strategies, and
//! checked with `mincore` for what is still resident.
//!
//! The region is only ever accessed through raw addresses by this module
//! and by the stage-2 table it is registered with; it is unmapped on drop,
//! after every table that refers to it is gone (callers drop tables first).

use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use guest_mm::PageSize;

/// 4 KiB.
pub const PAGE: u64 = 4096;
/// 2 MiB.
pub const HUGE: u64 = 2 << 20;

/// An anonymous private mapping, aligned to its leaf size.
pub struct AnonRegion {
    raw: u64,
    raw_len: u64,
    /// First usable byte (aligned to `align`).
    pub base: u64,
    /// Usable length.
    pub len: u64,
}

impl AnonRegion {
    /// Map `len` bytes. With [`PageSize::Size2M`] the region is 2 MiB
    /// aligned and advised `MADV_HUGEPAGE`; with 4 KiB `MADV_NOHUGEPAGE`.
    pub fn new(len: u64, leaf: PageSize) -> Result<AnonRegion> {
        let align = leaf.bytes();
        if len == 0 || !len.is_multiple_of(align) {
            bail!(
                "size {len} is not a positive multiple of the {} leaf size",
                leaf
            );
        }
        let raw_len = len + align;
        let n = usize::try_from(raw_len).context("size does not fit the address space")?;
        // SAFETY: anonymous private mapping with no address hint; the
        // result is checked against MAP_FAILED before use.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                n,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mmap of {raw_len} bytes failed"));
        }
        let raw = raw as u64;
        let base = raw.next_multiple_of(align);
        let r = AnonRegion {
            raw,
            raw_len,
            base,
            len,
        };
        let advice = if leaf == PageSize::Size4K {
            libc::MADV_NOHUGEPAGE
        } else {
            libc::MADV_HUGEPAGE
        };
        // SAFETY: [base, base + len) lies inside the mapping made above.
        let rc = unsafe { libc::madvise(r.ptr(), r.len as usize, advice) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .context("madvise(MADV_[NO]HUGEPAGE) failed");
        }
        Ok(r)
    }

    fn ptr(&self) -> *mut libc::c_void {
        self.base as usize as *mut libc::c_void
    }

    /// Write one word into every 4 KiB page, so all of it is resident.
    pub fn touch(&self) {
        for off in (0..self.len).step_by(PAGE as usize) {
            // SAFETY: inside our mapping; nothing else reads this memory
            // while the benchmark populates it.
            unsafe { ((self.base + off) as *mut u64).write_volatile(off | 1) };
        }
    }

    /// Bytes of the region resident now (`mincore`).
    pub fn resident(&self) -> u64 {
        guest_mm::stress::resident_bytes(self.base, self.len)
    }

    /// One `madvise(MADV_DONTNEED)` of `[base + off, base + off + len)`.
    /// A range not inside the region is refused.
    pub fn dontneed(&self, off: u64, len: u64) -> Result<()> {
        if off.checked_add(len).is_none_or(|end| end > self.len) {
            bail!(
                "madvise(MADV_DONTNEED) range {off:#x} + {len:#x} is outside the {:#x}-byte region",
                self.len
            );
        }
        // SAFETY: `[base + off, base + off + len)` lies inside our mapping
        // (checked above); dropping its contents is what the benchmark asks
        // for, and no reference into the memory is held across the call.
        unsafe { dontneed(self.base + off, len) }
    }

    /// The limit: one `madvise` over the whole region.
    pub fn release_whole(&self) -> Result<()> {
        self.dontneed(0, self.len)
    }

    /// Cloud Hypervisor's pattern: one `madvise` per 4 KiB page, holding
    /// a mutex (the memory map's lock) across the loop. Returns the lock
    /// hold time in nanoseconds.
    pub fn release_per_page(&self, lock: &Mutex<()>) -> Result<u64> {
        let g = lock.lock().unwrap_or_else(|e| e.into_inner());
        let t = std::time::Instant::now();
        for off in (0..self.len).step_by(PAGE as usize) {
            self.dontneed(off, PAGE)?;
        }
        let held = t.elapsed();
        drop(g);
        Ok(u64::try_from(held.as_nanos()).unwrap_or(u64::MAX))
    }

    /// Firecracker's pattern: the pages as guest frame numbers (in the
    /// order the guest reported them), sorted, de-duplicated, merged into
    /// runs, one `madvise` per run, no batching. Returns the number of runs
    /// and the time spent sorting and merging (ns).
    pub fn release_per_run(&self, pfns: Vec<u64>) -> Result<(u64, u64)> {
        let t = std::time::Instant::now();
        let runs = runs_of(pfns);
        let sort_ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        for &(p, n) in &runs {
            self.dontneed(p * PAGE, n * PAGE)?;
        }
        Ok((runs.len() as u64, sort_ns))
    }
}

/// `MADV_DONTNEED` on `[host, host + len)`.
///
/// # Safety
///
/// The range must lie inside a mapping the caller owns and no reference
/// into it may be live.
pub unsafe fn dontneed(host: u64, len: u64) -> Result<()> {
    // SAFETY: guaranteed by the caller.
    let rc = unsafe { libc::madvise(host as *mut libc::c_void, len as usize, libc::MADV_DONTNEED) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("madvise(MADV_DONTNEED) at {host:#x} + {len:#x}"));
    }
    Ok(())
}

/// Page numbers → `(first, count)` runs: sorted, de-duplicated, adjacent
/// pages merged (guest-mm's one coalescer).
pub fn runs_of(pfns: Vec<u64>) -> Vec<(u64, u64)> {
    guest_mm::runs::runs_of(pfns, 1)
}

impl Drop for AnonRegion {
    fn drop(&mut self) {
        // SAFETY: our own mapping; every table that referred to it was
        // dropped before the region (benchmark code drops tables first).
        unsafe {
            libc::munmap(
                self.raw as usize as *mut libc::c_void,
                self.raw_len as usize,
            )
        };
    }
}

/// `AnonHugePages` of this process, in bytes (`/proc/self/smaps_rollup`),
/// or `None` when the kernel does not say.
pub fn anon_huge_bytes() -> Option<u64> {
    vmm::proc_stats::smaps_rollup("AnonHugePages:")
}
