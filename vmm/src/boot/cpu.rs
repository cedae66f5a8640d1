//! vCPU state at the first Linux instruction: registers and segments for
//! the PVH (32-bit protected mode, paging off) or the 64-bit boot protocol
//! (long mode on identity page tables), the boot GDT, the MSRs, the FPU and
//! the local APIC's LINT pins. Values are Firecracker's
//! (`arch/src/x86_64/{regs,msr,interrupts}.rs`).
//!
//! **Invariants.**
//! - The segment registers are derived from the very GDT entries written to
//!   guest memory ([`gdt_table`]), so a later reload of a selector by the
//!   guest finds the same descriptor.
//! - PVH: CR0 = PE only, CR4 = 0, EFER = 0, EBX = start_info; 64-bit: CR0
//!   PE|PG, CR4 PAE, EFER LME|LMA, CR3 = PML4, RSI = zero page.
//! - Every vCPU gets the same state; the APs are then held by the in-kernel
//!   LAPIC until the BSP sends INIT/SIPI.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;

use super::layout::{
    BOOT_GDT, BOOT_IDT, BOOT_STACK_POINTER, PML4_START, PVH_INFO_START, ZERO_PAGE_START,
};
use super::{BootError, Protocol};

const X86_CR0_PE: u64 = 1;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// A GDT entry from flags, base and limit (Firecracker's `gdt_entry`).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, code, data, TSS.
pub fn gdt_table(p: Protocol) -> [u64; 4] {
    match p {
        Protocol::Pvh => [
            0,
            gdt_entry(0xc09b, 0, 0xffff_ffff),
            gdt_entry(0xc093, 0, 0xffff_ffff),
            gdt_entry(0x008b, 0, 0x67),
        ],
        Protocol::Linux64 => [
            0,
            gdt_entry(0xa09b, 0, 0xfffff),
            gdt_entry(0xc093, 0, 0xfffff),
            gdt_entry(0x808b, 0, 0xfffff),
        ],
    }
}

fn bits(e: u64, shift: u32, mask: u64) -> u8 {
    ((e >> shift) & mask) as u8
}

/// The segment register of GDT entry `index` (Firecracker's `kvm_segment_from_gdt`).
pub fn segment(e: u64, index: u16) -> kvm_segment {
    let g = bits(e, 55, 1);
    let raw_limit = (((e & 0x000f_0000_0000_0000) >> 32) | (e & 0xffff)) as u32;
    let present = bits(e, 47, 1);
    kvm_segment {
        base: ((e & 0xff00_0000_0000_0000) >> 32)
            | ((e & 0x0000_00ff_0000_0000) >> 16)
            | ((e & 0x0000_0000_ffff_0000) >> 16),
        limit: if g == 0 {
            raw_limit
        } else {
            (raw_limit << 12) | 0xfff
        },
        selector: index * 8,
        type_: bits(e, 40, 0xf),
        present,
        dpl: bits(e, 45, 3),
        db: bits(e, 54, 1),
        s: bits(e, 44, 1),
        l: bits(e, 53, 1),
        g,
        avl: bits(e, 52, 1),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Sets segments, descriptor tables and control registers for `p`.
pub fn init_sregs(sregs: &mut kvm_sregs, p: Protocol) {
    let gdt = gdt_table(p);
    let code = segment(gdt[1], 1);
    let data = segment(gdt[2], 2);
    let tss = segment(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match p {
        Protocol::Pvh => {
            sregs.cr0 = X86_CR0_PE;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        Protocol::Linux64 => {
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
}

/// General registers at the entry point.
pub fn init_regs(p: Protocol, entry: u64) -> kvm_regs {
    match p {
        Protocol::Pvh => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rbx: PVH_INFO_START,
            ..Default::default()
        },
        Protocol::Linux64 => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
    }
}

/// The MSRs Firecracker sets at boot: SYSENTER/SYSCALL targets 0, TSC 0,
/// fast strings on, MTRRs on with write-back default.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    const MTRR_ENABLE: u64 = 1 << 11;
    const MTRR_MEM_TYPE_WB: u64 = 6;
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        e(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

/// LINT0 as ExtINT, LINT1 as NMI in a `KVM_GET_LAPIC` register page.
pub fn set_lint(regs: &mut [std::os::raw::c_char]) {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_NMI: u32 = 0x4;
    const APIC_MODE_EXTINT: u32 = 0x7;
    for (off, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let Some(r) = regs.get_mut(off..off + 4) else {
            continue;
        };
        let mut b = [0u8; 4];
        for (d, s) in b.iter_mut().zip(r.iter()) {
            *d = *s as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (d, s) in r.iter_mut().zip(v.to_le_bytes()) {
            *d = s as std::os::raw::c_char;
        }
    }
}

/// Puts vCPU `fd` in the boot state of `p` at `entry` (CPUID set by the caller).
pub fn setup_vcpu(fd: &VcpuFd, p: Protocol, entry: u64) -> Result<(), BootError> {
    let ioctl = |what: &'static str| move |e: kvm_ioctls::Error| BootError::Vcpu(what, e);
    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(|_| BootError::Cpuid(entries.len()))?;
    let n = fd.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
    if n != entries.len() {
        let idx = entries.get(n).map_or(0, |e| e.index);
        return Err(BootError::Msr(idx));
    }
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    fd.set_fpu(&fpu).map_err(ioctl("KVM_SET_FPU"))?;
    let mut lapic = fd.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
    set_lint(&mut lapic.regs);
    fd.set_lapic(&lapic).map_err(ioctl("KVM_SET_LAPIC"))?;
    let mut sregs = fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
    init_sregs(&mut sregs, p);
    fd.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;
    fd.set_regs(&init_regs(p, entry))
        .map_err(ioctl("KVM_SET_REGS"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_round_trip() {
        let pvh = gdt_table(Protocol::Pvh);
        let cs = segment(pvh[1], 1);
        assert_eq!((cs.base, cs.limit, cs.selector), (0, 0xffff_ffff, 8));
        assert_eq!((cs.type_, cs.db, cs.l, cs.g, cs.present), (0xb, 1, 0, 1, 1));
        let ds = segment(pvh[2], 2);
        assert_eq!((ds.type_, ds.db, ds.selector), (3, 1, 16));
        let l = gdt_table(Protocol::Linux64);
        let cs = segment(l[1], 1);
        assert_eq!((cs.l, cs.db, cs.type_), (1, 0, 0xb));
        assert_eq!(segment(0, 0).unusable, 1);
    }

    #[test]
    fn sregs_per_protocol() {
        let mut s = kvm_sregs::default();
        init_sregs(&mut s, Protocol::Pvh);
        assert_eq!((s.cr0, s.cr4, s.efer), (X86_CR0_PE, 0, 0));
        let mut s = kvm_sregs::default();
        init_sregs(&mut s, Protocol::Linux64);
        assert_eq!(s.cr3, PML4_START);
        assert!(s.cr0 & X86_CR0_PG != 0 && s.efer & EFER_LMA != 0);
        assert_eq!(init_regs(Protocol::Pvh, 0x1000).rbx, PVH_INFO_START);
        assert_eq!(init_regs(Protocol::Linux64, 0x1000).rsi, ZERO_PAGE_START);
    }

    #[test]
    fn lint_modes() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        // Vector and mask bits survive; only the delivery mode changes.
        regs[0x350] = 0x30;
        regs[0x352] = 0x01;
        regs[0x351] = 0x05;
        set_lint(&mut regs);
        assert_eq!(
            (regs[0x350], regs[0x351] as u8, regs[0x352]),
            (0x30, 0x07, 0x01)
        );
        assert_eq!(regs[0x361] as u8 & 0x7, 4);
    }
}
