//! Populating guest RAM host-side before the guest runs, and asking the
//! kernel which of it is resident.
//!
//! [`VmMemory::populate`] fills every region with `MADV_POPULATE_WRITE`
//! (Linux 5.14; on kernels without it, one read and write-back per 4 KiB
//! page), contents unchanged: `vmm run --populate` and `gmm bench teardown`
//! use it to start from fully resident RAM. It must run before the vCPUs
//! start (or after they finished): the fallback rewrites every byte.
//! [`VmMemory::prefault`] populates chosen ranges only, best effort and
//! without a fallback (safe at any time): the boot calls it on where the
//! kernel and initrd are about to be copied.
//!
//! [`VmMemory::resident_bytes`] is `mincore` over the mappings: for a file
//! backing it reports the file's pages (in the page cache), whether or not
//! this process maps them, which is the only per-process measure of a
//! guest_memfd's memory when KVM faults guest pages straight from the file
//! (they are in neither `VmRSS` nor `st_blocks`, which guest_memfd does not
//! count).

use super::backing::{to_usize, MemoryError, SIZE_4K};
use super::VmMemory;

impl VmMemory {
    /// Populates every guest RAM region for writing; contents unchanged.
    /// Call only while no vCPU runs.
    pub fn populate(&self) -> Result<(), MemoryError> {
        for r in self.ram.regions() {
            let len = to_usize(r.len);
            // SAFETY: [host_addr, +len) is a live guest RAM mapping owned by
            // `self`; populating it for writing does not change its contents.
            let rc = unsafe {
                libc::madvise(
                    r.host_addr as *mut libc::c_void,
                    len,
                    libc::MADV_POPULATE_WRITE,
                )
            };
            if rc == 0 {
                continue;
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINVAL) {
                return Err(MemoryError::Populate(err));
            }
            for off in (0..len).step_by(to_usize(SIZE_4K)) {
                let p = (r.host_addr + off) as *mut u8;
                // SAFETY: inside the mapping; no vCPU runs (the caller's
                // promise), so nothing else accesses guest RAM while the
                // byte is rewritten.
                unsafe { p.write_volatile(p.read_volatile()) };
            }
        }
        Ok(())
    }

    /// Populates the guest ranges `(gpa, len)` for writing, whole 4 KiB
    /// pages, before something copies into them (the boot's kernel and
    /// initrd): one `MADV_POPULATE_WRITE` per range takes the page faults
    /// the copy would take one by one (for the fixture kernel's 5.9 MiB
    /// at 4 KiB pages, a start's median 6.2 -> 5.7 ms here; with THP the
    /// copy faults the same few huge pages either way). Best effort, safe
    /// while vCPUs run:
    /// contents are unchanged, parts outside RAM are skipped, and where
    /// the kernel refuses (no `MADV_POPULATE_WRITE` before Linux 5.14, or
    /// a backing it cannot populate) the copy faults the pages in as it
    /// would have. Returns the bytes populated.
    pub fn prefault(&self, ranges: &[(u64, u64)]) -> u64 {
        let mut done = 0;
        for &(gpa, len) in ranges {
            let end = gpa.saturating_add(len);
            for r in self.ram.regions() {
                let lo = (gpa.max(r.gpa.0)) & !(SIZE_4K - 1);
                let hi = end.min(r.gpa.0 + r.len).next_multiple_of(SIZE_4K);
                if lo >= hi {
                    continue;
                }
                // SAFETY: [lo, hi) lies inside the region, so its host
                // range is part of a live guest RAM mapping owned by
                // `self`; populating it for writing does not change its
                // contents, whoever accesses it meanwhile.
                let rc = unsafe {
                    libc::madvise(
                        r.host_of(lo) as *mut libc::c_void,
                        to_usize(hi - lo),
                        libc::MADV_POPULATE_WRITE,
                    )
                };
                if rc == 0 {
                    done += hi - lo;
                }
            }
        }
        done
    }

    /// Bytes of guest RAM resident in host memory (`mincore` over every
    /// mapping: for files, the file's pages whoever maps them).
    pub fn resident_bytes(&self) -> u64 {
        self.ram
            .regions()
            .iter()
            .map(|r| resident_bytes(r.host_addr, r.len))
            .sum()
    }

    /// Bytes of `[gpa, gpa + len)` resident in host memory (0 outside RAM).
    pub fn resident_bytes_of(&self, gpa: u64, len: u64) -> u64 {
        self.ram
            .regions()
            .iter()
            .find(|r| r.contains(gpa, len))
            .map_or(0, |r| resident_bytes(r.host_of(gpa), len))
    }
}

/// Resident bytes of the mapped range `[host, host + len)`, asked 2 MiB at
/// a time.
fn resident_bytes(host: usize, len: u64) -> u64 {
    const CHUNK: usize = 512;
    let mut vec = [0u8; CHUNK];
    let pages = to_usize(len / SIZE_4K);
    let mut done = 0;
    let mut resident = 0u64;
    while done < pages {
        let n = (pages - done).min(CHUNK);
        // SAFETY: the range lies inside one of our guest RAM mappings;
        // mincore writes one byte per page into `vec`, which has room for
        // `n`.
        let r = unsafe {
            libc::mincore(
                (host + done * to_usize(SIZE_4K)) as *mut libc::c_void,
                n * to_usize(SIZE_4K),
                vec.as_mut_ptr(),
            )
        };
        if r != 0 {
            return resident * SIZE_4K;
        }
        resident += vec[..n].iter().filter(|b| *b & 1 == 1).count() as u64;
        done += n;
    }
    resident * SIZE_4K
}
