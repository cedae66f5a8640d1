//! Where a Linux guest's boot structures live in guest-physical memory, and
//! the memory map the guest is told about.
//!
//! **Invariants.**
//! - Every fixed structure lies below [`EBDA_START`] and above the real-mode
//!   IVT/BDA (first 0x500 bytes); none overlaps another (`fixed_areas_are_disjoint`).
//! - The kernel is loaded at or above [`HIMEM_START`]; the initrd is placed
//!   page-aligned above the kernel and below both the end of RAM and the
//!   kernel's own limit.
//! - The memory map has RAM `[0, EBDA_START)`, reserved `[EBDA_START,
//!   HIMEM_START)` (EBDA, VGA hole, BIOS area: the MP table lives at its
//!   start) and RAM `[HIMEM_START, mem)`; `mem` is at most
//!   [`MAX_LINUX_MEM`], so RAM never reaches the 32-bit MMIO/APIC hole.
//!
//! The addresses are Firecracker's (`arch/src/x86_64/layout.rs`), so that
//! what a Linux guest sees matches the reference monitor.

/// GDT used for the first instructions (4 entries).
pub const BOOT_GDT: u64 = 0x500;
/// A zero IDT descriptor table (one entry) for the first instructions.
pub const BOOT_IDT: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd).
pub const MODLIST_START: u64 = 0x6040;
/// PVH memory map table (PVH boot only; shares the page with the zero page,
/// which only the 64-bit boot protocol uses).
pub const MEMMAP_START: u64 = 0x7000;
/// Linux zero page (`boot_params`), 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer (64-bit boot protocol).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables for 64-bit entry: PML4, PDPT, PD (1 GiB of 2 MiB pages).
pub const PML4_START: u64 = 0x9000;
/// The PDPT.
pub const PDPTE_START: u64 = 0xa000;
/// The PD.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line (with its NUL) the PVH protocol is given here
/// (Firecracker's limit; the bzImage limit comes from its header).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the EBDA; the MP floating pointer and table live here.
pub const EBDA_START: u64 = 0x9fc00;
/// First address above the legacy hole (where kernels load).
pub const HIMEM_START: u64 = 0x10_0000;
/// Most RAM a Linux guest may have: RAM is one region at GPA 0 and must end
/// below the 32-bit MMIO/APIC hole (IOAPIC at 0xfec00000, LAPIC at
/// 0xfee00000, KVM's TSS pages at 0xfffbd000).
pub const MAX_LINUX_MEM: u64 = 3 << 30;
/// Least RAM a Linux guest may have.
pub const MIN_LINUX_MEM: u64 = 16 << 20;
/// Most vCPUs a Linux guest may have (MP table in the EBDA, APIC ids < 255).
pub const MAX_LINUX_VCPUS: u32 = 32;

/// E820 / PVH memory type: usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 / PVH memory type: reserved.
pub const E820_RESERVED: u32 = 2;

/// One memory map entry: start, length, type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemRange {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The memory map of a guest with `mem` bytes of RAM at GPA 0: sorted,
/// disjoint, inside `[0, mem)`, RAM everywhere but the reserved legacy hole.
/// Refuses a `mem` outside `[16 MiB, MAX_LINUX_MEM]` or not a multiple of
/// 4 KiB (no such guest can be built: see [`super::prepare`]).
pub fn memory_map(mem: u64) -> Result<Vec<MemRange>, super::BootError> {
    if !(MIN_LINUX_MEM..=MAX_LINUX_MEM).contains(&mem) || !mem.is_multiple_of(4096) {
        return Err(super::BootError::BadMemSize(mem));
    }
    Ok(vec![
        MemRange {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        MemRange {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
        MemRange {
            addr: HIMEM_START,
            size: mem - HIMEM_START,
            kind: E820_RAM,
        },
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_areas_are_disjoint() {
        // (start, end) of every fixed structure; MEMMAP and the zero page
        // share a page on purpose (one protocol each).
        let mut areas = [
            (BOOT_GDT, BOOT_GDT + 32),
            (BOOT_IDT, BOOT_IDT + 8),
            (PVH_INFO_START, MODLIST_START),
            (MODLIST_START, MODLIST_START + 32),
            (ZERO_PAGE_START, ZERO_PAGE_START + 0x1000),
            (BOOT_STACK_POINTER - 0x800, BOOT_STACK_POINTER),
            (PML4_START, PDE_START + 0x1000),
            (CMDLINE_START, CMDLINE_START + CMDLINE_MAX_SIZE as u64),
            (EBDA_START, HIMEM_START),
        ];
        areas.sort_unstable();
        for w in areas.windows(2) {
            assert!(w[0].1 <= w[1].0, "{:#x?} overlaps {:#x?}", w[0], w[1]);
        }
        assert!(areas[0].0 >= 0x500);
    }

    #[test]
    fn memory_map_covers_ram_and_reserves_the_legacy_hole() {
        let m = memory_map(256 << 20).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].addr + m[0].size, m[1].addr);
        assert_eq!(m[1].addr + m[1].size, m[2].addr);
        assert_eq!(m[2].addr + m[2].size, 256 << 20);
        assert_eq!(m[1].kind, E820_RESERVED);
        assert!(m[2].addr + m[2].size <= MAX_LINUX_MEM);
        for bad in [
            0,
            HIMEM_START,
            (16 << 20) - 4096,
            MAX_LINUX_MEM + 4096,
            (64 << 20) + 1,
        ] {
            assert!(memory_map(bad).is_err(), "{bad:#x}");
        }
    }
}
