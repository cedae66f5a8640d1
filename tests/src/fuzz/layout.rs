//! `layout`: the e820 memory map ([`vmm::boot::layout::memory_map`]) and
//! the MP table ([`vmm::boot::mptable`]) on arbitrary layouts: any RAM size
//! and vCPU count (the API allows no holes: RAM is one region at 0, the
//! legacy hole is fixed), written into guest memory of arbitrary (bounded)
//! size.
//!
//! **Properties**, checked independently of the builders:
//! - the memory map is refused, or is sorted, disjoint, non-empty entries,
//!   inside `[0, mem)`, covering all of it, typed RAM or reserved, with the
//!   reserved range exactly the legacy hole `[EBDA_START, HIMEM_START)`;
//!   it is accepted exactly for `mem` in `[16 MiB, 3 GiB]`, 4 KiB-aligned;
//! - the MP table is refused (0 or more than `MAX_LINUX_VCPUS` vCPUs) or
//!   is a floating pointer and a configuration table whose checksums hold,
//!   whose length and entry count match its entries (one processor per
//!   vCPU, APIC id = index, BSP first, one IOAPIC whose id is no CPU's, ISA
//!   IRQs 0-23 routed to pins 0-23) and which ends below `HIMEM_START`;
//! - writing it into guest memory succeeds exactly when the memory holds
//!   it, writes exactly those bytes, and never writes outside the memory.

use vm_memory::{Bytes, GuestAddress};
use vmm::boot::layout::{
    memory_map, E820_RAM, E820_RESERVED, EBDA_START, HIMEM_START, MAX_LINUX_MEM, MAX_LINUX_VCPUS,
    MIN_LINUX_MEM,
};
use vmm::boot::mptable;
use vmm::memory::GuestRam;
use vmm::{Backing, MemSize, PageSize};

use super::Input;

const MIB: u64 = 1 << 20;

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |s, &x| s.wrapping_add(x))
}

/// Checks the memory map for `mem`.
pub fn check_map(mem: u64) {
    let valid = (MIN_LINUX_MEM..=MAX_LINUX_MEM).contains(&mem) && mem.is_multiple_of(4096);
    let map = match memory_map(mem) {
        Ok(m) => m,
        Err(e) => {
            assert!(!valid, "memory map refused for {mem:#x}: {e}");
            return;
        }
    };
    assert!(valid, "memory map accepted for {mem:#x}");
    let mut at = 0;
    for r in &map {
        assert!(r.size > 0, "empty entry {r:?}");
        assert_eq!(r.addr, at, "gap or overlap at {r:?} in {map:?}");
        at = r
            .addr
            .checked_add(r.size)
            .unwrap_or_else(|| panic!("{r:?} overflows"));
        let hole = r.addr >= EBDA_START && at <= HIMEM_START;
        let want = if hole { E820_RESERVED } else { E820_RAM };
        assert_eq!(r.kind, want, "type of {r:?}");
        assert!(
            hole || at <= EBDA_START || r.addr >= HIMEM_START,
            "RAM entry {r:?} crosses the legacy hole"
        );
    }
    assert_eq!(at, mem, "map ends at {at:#x}, RAM at {mem:#x}");
    assert!(map.iter().any(|r| r.kind == E820_RESERVED));
}

/// Checks the MP table for `vcpus`; returns it if built.
pub fn check_mptable(vcpus: u32) -> Option<Vec<u8>> {
    let valid = (1..=MAX_LINUX_VCPUS).contains(&vcpus);
    let b = match mptable::build(vcpus) {
        Ok(b) => b,
        Err(e) => {
            assert!(!valid, "MP table refused for {vcpus} vCPUs: {e}");
            return None;
        }
    };
    assert!(valid, "MP table built for {vcpus} vCPUs");
    assert!(
        EBDA_START + b.len() as u64 <= HIMEM_START,
        "MP table too long"
    );
    assert_eq!(&b[..4], b"_MP_");
    assert_eq!(sum(&b[..16]), 0, "floating pointer checksum");
    let ptr = u64::from(u32::from_le_bytes([b[4], b[5], b[6], b[7]]));
    let t = &b[usize::try_from(ptr - EBDA_START).expect("small")..];
    assert_eq!(&t[..4], b"PCMP");
    let len = usize::from(u16::from_le_bytes([t[4], t[5]]));
    assert_eq!(len, t.len(), "table length");
    assert_eq!(sum(t), 0, "table checksum");
    let count = u16::from_le_bytes([t[34], t[35]]);
    let (mut off, mut n, mut cpus, mut irqs) = (44, 0u16, 0u32, 0u32);
    let mut ioapic = None;
    while off < len {
        let step = if t[off] == 0 { 20 } else { 8 };
        assert!(off + step <= len, "entry at {off} runs past the table");
        match t[off] {
            0 => {
                assert_eq!(u32::from(t[off + 1]), cpus, "APIC id");
                assert_eq!(t[off + 3] & 2 != 0, cpus == 0, "BSP flag");
                cpus += 1;
            }
            2 => ioapic = Some(t[off + 1]),
            3 => {
                assert_eq!(t[off + 5], t[off + 7], "IRQ routed to its own pin");
                assert_eq!(Some(t[off + 6]), ioapic, "IRQ routed to the IOAPIC");
                irqs += 1;
            }
            1 | 4 => {}
            k => panic!("unknown entry type {k}"),
        }
        off += step;
        n += 1;
    }
    assert_eq!(n, count, "entry count");
    assert_eq!((cpus, irqs), (vcpus, 24));
    let io = u32::from(ioapic.expect("an IOAPIC"));
    assert!(io >= vcpus, "IOAPIC id {io} is a CPU's");
    Some(b)
}

/// Runs one input; panics if a property fails.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let sel = inp.u8();
    let mem = match sel % 4 {
        0 => inp.u64(),
        1 => u64::from(inp.u32()) << 12,
        2 => MIN_LINUX_MEM + (inp.u64() % (MAX_LINUX_MEM - MIN_LINUX_MEM + 2 * MIB)),
        _ => u64::from(inp.u16()) * MIB,
    };
    check_map(mem);
    let vcpus = match (sel >> 2) % 2 {
        0 => inp.u32(),
        _ => u32::from(inp.u8() % 40),
    };
    let table = check_mptable(vcpus);
    // Write into guest memory of 2 .. 16 MiB: the table sits at the EBDA,
    // inside the first 2 MiB; the smallest RAM is all a guest could have.
    let gm_size = (1 + u64::from(inp.u8() % 8)) * 2 * MIB;
    let ram = GuestRam::new(
        MemSize::from_bytes(gm_size).expect("2 MiB multiple"),
        Backing::Anon,
        PageSize::Size4K,
        None,
    )
    .expect("guest memory");
    let gm = ram.guest_memory();
    let r = mptable::write(gm, vcpus);
    match table {
        Some(t) => {
            r.unwrap_or_else(|e| panic!("MP table write failed: {e}"));
            let mut got = vec![0u8; t.len()];
            gm.read_slice(&mut got, GuestAddress(EBDA_START))
                .expect("read it back");
            assert!(got == t, "written MP table differs");
            let mut after = [0u8; 16];
            let end = EBDA_START + t.len() as u64;
            gm.read_slice(&mut after, GuestAddress(end))
                .expect("read past it");
            assert_eq!(after, [0; 16], "bytes written past the MP table");
        }
        None => assert!(r.is_err(), "MP table written for {vcpus} vCPUs"),
    }
}
