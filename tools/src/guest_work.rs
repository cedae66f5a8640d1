//! The default guest's own work, done by plain host threads: the bound of
//! `gmm bench launch`.
//!
//! A launch cycle's guest (the `Verify` workload) writes `address ^ seed`
//! to every 8-byte word of its vCPU's share of RAM and then reads every
//! word back (vmm's guest image, `.Lwrite` and `.Lverify`). Its ring-3
//! code runs natively even on this shadow-paging host, so that work costs
//! what the host's memory and kernel make it cost, under any monitor: the
//! first touch of each page is a fault that zeroes it (a 2 MiB page with
//! THP), then one pass of stores and one of loads over the whole share.
//!
//! [`cycle`] does exactly that and nothing else: it maps anonymous memory
//! of the VM's size with the VM's leaf advice ([`AnonRegion`]), lets one
//! thread per vCPU run the same instructions over the same share, and
//! unmaps it. No KVM VM, no vCPU set-up, no stage-2 table, no device, no
//! teardown gather: what a launch costs beyond this is the monitor's and
//! KVM's. The VM's guest faults through KVM instead of a page fault, and
//! the low 2 MiB the monitor fills for the guest are not touched here, so
//! the bound can only be cheaper than the VM's guest doing the same work.
//!
//! Invariants: the loops are the guest's instructions (one 8-byte store or
//! load-and-compare per word, no vector code), so the compiler cannot make
//! the bound faster than the guest; [`cycle`] fails if any word reads back
//! wrong, as the guest reports it.

use anyhow::{bail, Context, Result};
use guest_mm::PageSize;

use crate::mem::AnonRegion;

/// The seed the bound's pattern is made with (any value does: the guest's
/// costs the same).
const SEED: u64 = 0x5eed_0000_0000_0001;

/// One cycle of the guest's work for a VM of `mem` bytes and `vcpus`
/// vCPUs with `leaf` leaves: map, one thread per vCPU writes and verifies
/// its share ([`vmm::guest::share`], the VM's split), unmap.
pub fn cycle(mem: u64, vcpus: u32, leaf: PageSize) -> Result<()> {
    vmm::guest::check_config(mem, vcpus).context("--mem / --vcpus")?;
    let ram = AnonRegion::new(mem, leaf).context("mapping the bound's memory")?;
    let bad: u64 = std::thread::scope(|s| {
        let workers: Vec<_> = (0..vcpus)
            .map(|i| {
                let (start, end) = vmm::guest::share(mem, vcpus, i);
                let (start, end) = (ram.base + start, ram.base + end);
                s.spawn(move || {
                    // SAFETY: [start, end) is this thread's own share of
                    // `ram`, which outlives the scope; no other thread and
                    // no reference touches it meanwhile.
                    unsafe {
                        write_pattern(start, end, SEED);
                        count_bad(start, end, SEED)
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or(u64::MAX))
            .fold(0, u64::saturating_add)
    });
    drop(ram);
    if bad != 0 {
        bail!("the bound's memory read back {bad} wrong words: the host memory is not trustworthy");
    }
    Ok(())
}

/// Writes `address ^ seed` to every 8-byte word of `[start, end)`, with the
/// guest's `.Lwrite` loop.
///
/// # Safety
///
/// `[start, end)` must be 8-byte aligned, writable memory the caller owns,
/// with no reference into it live.
pub unsafe fn write_pattern(start: u64, end: u64, seed: u64) {
    // SAFETY: the caller gives us [start, end) to write; the loop stores
    // only to 8-byte words below `end`, and touches no stack.
    unsafe {
        core::arch::asm!(
            "mov {p}, {start}",
            "2:",
            "cmp {p}, {end}",
            "jae 3f",
            "mov {v}, {p}",
            "xor {v}, {seed}",
            "mov qword ptr [{p}], {v}",
            "add {p}, 8",
            "jmp 2b",
            "3:",
            start = in(reg) start,
            end = in(reg) end,
            seed = in(reg) seed,
            p = out(reg) _,
            v = out(reg) _,
            options(nostack),
        );
    }
}

/// The 8-byte words of `[start, end)` that do not hold `address ^ seed`,
/// counted with the guest's `.Lverify` loop.
///
/// # Safety
///
/// `[start, end)` must be 8-byte aligned, readable memory the caller owns,
/// with no mutable reference into it live.
pub unsafe fn count_bad(start: u64, end: u64, seed: u64) -> u64 {
    let bad: u64;
    // SAFETY: the caller gives us [start, end) to read; the loop loads
    // only 8-byte words below `end`, writes no memory and touches no
    // stack.
    unsafe {
        core::arch::asm!(
            "xor {bad:e}, {bad:e}",
            "mov {p}, {start}",
            "2:",
            "cmp {p}, {end}",
            "jae 4f",
            "mov {v}, {p}",
            "xor {v}, {seed}",
            "cmp qword ptr [{p}], {v}",
            "je 3f",
            "inc {bad}",
            "3:",
            "add {p}, 8",
            "jmp 2b",
            "4:",
            start = in(reg) start,
            end = in(reg) end,
            seed = in(reg) seed,
            p = out(reg) _,
            v = out(reg) _,
            bad = out(reg) bad,
            options(nostack, readonly),
        );
    }
    bad
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loops_write_the_guest_pattern_and_count_what_differs() {
        let mut words = vec![0u64; 4096];
        let start = words.as_mut_ptr() as u64;
        let end = start + 8 * words.len() as u64;
        // SAFETY: `words` is ours, 8-byte aligned, and not borrowed
        // during the calls.
        unsafe { write_pattern(start, end, SEED) };
        for (i, w) in words.iter().enumerate() {
            assert_eq!(*w, vmm::guest::pattern(start + 8 * i as u64, SEED));
        }
        // SAFETY: as above.
        assert_eq!(unsafe { count_bad(start, end, SEED) }, 0);
        words[7] ^= 1;
        words[4000] = 0;
        // SAFETY: as above.
        assert_eq!(unsafe { count_bad(start, end, SEED) }, 2);
        // An empty range writes and counts nothing.
        // SAFETY: as above.
        assert_eq!(unsafe { count_bad(start, start, SEED) }, 0);
    }

    #[test]
    fn a_cycle_runs_the_work_of_every_vcpu() {
        cycle(8 << 20, 2, PageSize::Size2M).unwrap();
        cycle(4 << 20, 1, PageSize::Size4K).unwrap();
        assert!(
            cycle(2 << 20, 1, PageSize::Size2M).is_err(),
            "no room for a share"
        );
    }
}
