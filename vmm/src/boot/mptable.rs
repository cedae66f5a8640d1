//! The Intel MultiProcessor Specification 1.4 tables through which Linux
//! (without ACPI) finds every vCPU, the ISA bus and the IOAPIC: a floating
//! pointer at [`EBDA_START`] (one of the places Linux scans) followed by the
//! configuration table. Modelled on Firecracker's `mptable.rs`; no crate
//! writes these.
//!
//! **Invariants.**
//! - One processor entry per vCPU, APIC id = vCPU index, vCPU 0 the BSP; the
//!   IOAPIC's id is `vcpus + 1` (never a CPU's).
//! - Interrupt entries route ISA IRQ 0-23 to IOAPIC pins 0-23 (the pins the
//!   irqfds of the devices raise); LINT0 is ExtINT on the BSP, LINT1 NMI on all.
//! - Both checksums make their structure's bytes sum to 0 (mod 256), and the
//!   whole thing fits below [`HIMEM_START`] for up to [`MAX_LINUX_VCPUS`].

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{EBDA_START, HIMEM_START, MAX_LINUX_VCPUS};
use super::BootError;

/// Physical address of the IOAPIC.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Physical address of the local APICs.
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// Highest IOAPIC pin routed (KVM's IOAPIC has 24).
pub const IRQ_MAX: u8 = 23;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const BUS_ISA: u8 = 0;
// Entry types.
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
// Interrupt types.
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
// Processor flags.
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
/// Family 6, model 1, stepping 1 (as Firecracker).
const CPU_SIGNATURE: u32 = (6 << 8) | (1 << 4) | 1;
/// FPU and APIC present.
const CPU_FEATURES: u32 = 1 | (1 << 9);

fn checksum(b: &[u8]) -> u8 {
    0u8.wrapping_sub(b.iter().fold(0u8, |s, &x| s.wrapping_add(x)))
}

/// The floating pointer and the configuration table for `vcpus` vCPUs, as
/// they are laid out from [`EBDA_START`].
pub fn build(vcpus: u32) -> Result<Vec<u8>, BootError> {
    if vcpus == 0 || vcpus > MAX_LINUX_VCPUS {
        return Err(BootError::TooManyVcpus(vcpus));
    }
    let n = vcpus as u8; // <= 32
    let ioapic_id = n + 1;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for i in 0..n {
        let mut e = [0u8; 20];
        e[0] = MP_PROCESSOR;
        e[1] = i;
        e[2] = APIC_VERSION;
        e[3] = CPU_ENABLED | if i == 0 { CPU_BSP } else { 0 };
        e[4..8].copy_from_slice(&CPU_SIGNATURE.to_le_bytes());
        e[8..12].copy_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&e);
        count += 1;
    }
    entries.extend_from_slice(&[MP_BUS, BUS_ISA, b'I', b'S', b'A', b' ', b' ', b' ']);
    let mut io = [MP_IOAPIC, ioapic_id, IOAPIC_VERSION, 1, 0, 0, 0, 0];
    io[4..8].copy_from_slice(&IOAPIC_ADDR.to_le_bytes());
    entries.extend_from_slice(&io);
    count += 2;
    for irq in 0..=IRQ_MAX {
        // type, irqtype, irqflag (2, conforming), srcbus, srcbusirq, dstapic, dstirq
        entries.extend_from_slice(&[MP_INTSRC, MP_INT, 0, 0, BUS_ISA, irq, ioapic_id, irq]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_LINTSRC, MP_EXTINT, 0, 0, BUS_ISA, 0, 0, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_NMI, 0, 0, BUS_ISA, 0, 0xff, 1]);
    count += 2;

    let table_addr = u32::try_from(EBDA_START + 16).unwrap_or(0);
    let mut table = vec![0u8; 44];
    let len = u16::try_from(44 + entries.len()).unwrap_or(u16::MAX);
    table[..4].copy_from_slice(b"PCMP");
    table[4..6].copy_from_slice(&len.to_le_bytes());
    table[6] = 4; // spec 1.4
    table[8..16].copy_from_slice(b"GMM-VMM ");
    table[16..28].copy_from_slice(b"microVM     ");
    table[34..36].copy_from_slice(&count.to_le_bytes());
    table[36..40].copy_from_slice(&APIC_ADDR.to_le_bytes());
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = [0u8; 16];
    fp[..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&table_addr.to_le_bytes());
    fp[8] = 1; // length in 16-byte units
    fp[9] = 4; // spec 1.4
    fp[10] = checksum(&fp);
    let mut out = fp.to_vec();
    out.extend_from_slice(&table);
    if EBDA_START + out.len() as u64 > HIMEM_START {
        return Err(BootError::TooManyVcpus(vcpus));
    }
    Ok(out)
}

/// Writes the tables for `vcpus` vCPUs at [`EBDA_START`].
pub fn write(gm: &GuestMemoryMmap, vcpus: u32) -> Result<(), BootError> {
    let b = build(vcpus)?;
    gm.write_slice(&b, GuestAddress(EBDA_START))
        .map_err(|e| BootError::Write("the MP table", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, &x| s.wrapping_add(x))
    }

    #[test]
    fn checksums_and_entries() {
        for vcpus in [1, 2, 7, MAX_LINUX_VCPUS] {
            let b = build(vcpus).unwrap();
            assert_eq!(&b[..4], b"_MP_");
            assert_eq!(sum(&b[..16]), 0);
            let ptr = u32::from_le_bytes(b[4..8].try_into().unwrap()) as u64;
            assert_eq!(ptr, EBDA_START + 16);
            let t = &b[16..];
            assert_eq!(&t[..4], b"PCMP");
            let len = u16::from_le_bytes([t[4], t[5]]) as usize;
            assert_eq!(len, t.len());
            assert_eq!(sum(t), 0, "table checksum");
            let count = u16::from_le_bytes([t[34], t[35]]) as u32;
            assert_eq!(count, vcpus + 2 + 24 + 2);
            // Walk the entries: processors first, APIC id = index, BSP first.
            let mut off = 44;
            let mut cpus = 0;
            let mut irqs = 0;
            while off < len {
                let step = if t[off] == MP_PROCESSOR { 20 } else { 8 };
                match t[off] {
                    MP_PROCESSOR => {
                        assert_eq!(t[off + 1] as u32, cpus);
                        assert_eq!(t[off + 3] & CPU_BSP != 0, cpus == 0);
                        cpus += 1;
                    }
                    MP_IOAPIC => assert_eq!(t[off + 1] as u32, vcpus + 1),
                    MP_INTSRC => {
                        assert_eq!(t[off + 5], t[off + 7]);
                        irqs += 1;
                    }
                    _ => {}
                }
                off += step;
            }
            assert_eq!((cpus, irqs), (vcpus, 24));
            assert!(EBDA_START + b.len() as u64 <= HIMEM_START);
        }
    }

    #[test]
    fn refuses_zero_and_too_many_vcpus() {
        assert!(build(0).is_err());
        assert!(build(MAX_LINUX_VCPUS + 1).is_err());
    }
}
