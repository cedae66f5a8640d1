//! The CPUID a Linux vCPU sees: KVM_GET_SUPPORTED_CPUID, with the APIC id,
//! the hypervisor bit, the KVM signature leaves and a topology of `vcpus`
//! single-thread cores in one package.
//!
//! **Invariants.**
//! - Leaf 1 EBX bits 31-24, leaf 0xb/0x1f EDX and the MP table agree on the
//!   APIC id of every vCPU (its index).
//! - Leaves 4, 0xb and 0x1f describe the same topology: `vcpus` cores of one
//!   thread each, in one package (so `NPROC` in the guest is `vcpus`).
//! - 0x40000000 says "KVMKVMKVM" and 0x40000001 carries the features KVM
//!   reported (kvm-clock etc.); if KVM did not report them they are added
//!   with no features.
//! - Leaf 1 ECX bit 24 (TSC-deadline timer) is set exactly when KVM has
//!   `KVM_CAP_TSC_DEADLINE_TIMER` (the mode lives in the in-kernel LAPIC,
//!   which a Linux guest always gets). Older kernels' (before 6.x)
//!   `KVM_GET_SUPPORTED_CPUID` always reports the bit clear, and a monitor
//!   that does not add it leaves the guest on the LAPIC's count-down timer;
//!   QEMU and Firecracker add it the same way. This host's KVM already
//!   reports it.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

use super::BootError;

/// Hypervisor present (leaf 1 ECX bit 31).
const ECX_HYPERVISOR: u32 = 1 << 31;
/// TSC-deadline mode of the LAPIC timer (leaf 1 ECX bit 24).
const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Multi-threading / several logical processors (leaf 1 EDX bit 28).
const EDX_HTT: u32 = 1 << 28;
const KVM_SIGNATURE: &[u8; 12] = b"KVMKVMKVM\0\0\0";

/// Smallest `s` with `1 << s >= n`.
fn shift_for(n: u32) -> u32 {
    n.next_power_of_two().trailing_zeros()
}

fn topology_leaf(function: u32, index: u32, vcpus: u32, apic_id: u32) -> kvm_cpuid_entry2 {
    let (eax, ebx, ecx) = match index {
        // SMT level: one thread per core.
        0 => (0, 1, (1 << 8) | index),
        // Core level: `vcpus` logical processors in the package.
        1 => (shift_for(vcpus), vcpus, (2 << 8) | index),
        _ => (0, 0, index),
    };
    kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx,
        edx: apic_id,
        ..Default::default()
    }
}

/// The CPUID of vCPU `index` of `vcpus`, from KVM's supported set;
/// `tsc_deadline`: KVM has `KVM_CAP_TSC_DEADLINE_TIMER`.
pub fn for_vcpu(
    supported: &CpuId,
    index: u32,
    vcpus: u32,
    tsc_deadline: bool,
) -> Result<CpuId, BootError> {
    let mut out: Vec<kvm_cpuid_entry2> = Vec::new();
    let mut has_sig = false;
    let mut has_feat = false;
    for e in supported.as_slice() {
        let mut e = *e;
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (index << 24) | ((vcpus.min(255)) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if tsc_deadline {
                    e.ecx |= ECX_TSC_DEADLINE;
                } else {
                    e.ecx &= !ECX_TSC_DEADLINE;
                }
                if vcpus > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            4 => {
                // EAX[31:26] cores per package - 1, EAX[25:14] threads
                // sharing this cache - 1 (one per core; the last level is
                // shared by all).
                let level = (e.eax >> 5) & 7;
                let sharing = if level >= 3 { vcpus - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((vcpus - 1).min(63) << 26) | (sharing.min(0xfff) << 14);
            }
            0xb | 0x1f => continue, // rewritten below
            0x4000_0000 => {
                has_sig = true;
                e.eax = e.eax.max(0x4000_0001);
                sig_regs(&mut e);
            }
            0x4000_0001 => has_feat = true,
            _ => {}
        }
        out.push(e);
    }
    // Leaf 0xb (and 0x1f, which Linux prefers when present) for the topology.
    let max_basic = supported
        .as_slice()
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax);
    for function in [0xb, 0x1f] {
        if max_basic >= function {
            for sub in 0..3 {
                out.push(topology_leaf(function, sub, vcpus, index));
            }
        }
    }
    if !has_sig {
        let mut e = kvm_cpuid_entry2 {
            function: 0x4000_0000,
            eax: 0x4000_0001,
            ..Default::default()
        };
        sig_regs(&mut e);
        out.push(e);
    }
    if !has_feat {
        out.push(kvm_cpuid_entry2 {
            function: 0x4000_0001,
            ..Default::default()
        });
    }
    CpuId::from_entries(&out).map_err(|_| BootError::Cpuid(out.len()))
}

fn sig_regs(e: &mut kvm_cpuid_entry2) {
    let w = |i: usize| u32::from_le_bytes(KVM_SIGNATURE[i..i + 4].try_into().unwrap_or([0; 4]));
    e.ebx = w(0);
    e.ecx = w(4);
    e.edx = w(8);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supported() -> CpuId {
        let e = |function, eax| kvm_cpuid_entry2 {
            function,
            eax,
            ..Default::default()
        };
        let mut l4 = e(4, 0x121); // L1 data
        l4.flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
        let mut l4b = e(4, 0x163); // L3
        l4b.index = 3;
        l4b.flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
        CpuId::from_entries(&[e(0, 0x1f), e(1, 0), l4, l4b, e(0xb, 0)]).unwrap()
    }

    #[test]
    fn apic_ids_topology_and_signature() {
        for vcpus in [1u32, 2, 5] {
            for idx in 0..vcpus {
                let c = for_vcpu(&supported(), idx, vcpus, true).unwrap();
                let s = c.as_slice();
                let l1 = s.iter().find(|e| e.function == 1).unwrap();
                assert_eq!(l1.ebx >> 24, idx);
                assert_eq!((l1.ebx >> 16) & 0xff, vcpus);
                assert!(l1.ecx & ECX_HYPERVISOR != 0);
                assert!(l1.ecx & ECX_TSC_DEADLINE != 0);
                let without = for_vcpu(&supported(), idx, vcpus, false).unwrap();
                let l1 = without.as_slice().iter().find(|e| e.function == 1).unwrap();
                assert_eq!(l1.ecx & ECX_TSC_DEADLINE, 0);
                for f in [0xb, 0x1f] {
                    let core = s.iter().find(|e| e.function == f && e.index == 1).unwrap();
                    assert_eq!((core.ebx, core.edx), (vcpus, idx));
                    assert!(1 << core.eax >= vcpus);
                }
                let l4: Vec<_> = s.iter().filter(|e| e.function == 4).collect();
                assert!(l4.iter().all(|e| (e.eax >> 26) + 1 == vcpus));
                assert_eq!((l4[1].eax >> 14) & 0xfff, vcpus - 1);
                let sig = s.iter().find(|e| e.function == 0x4000_0000).unwrap();
                let mut b = Vec::new();
                for r in [sig.ebx, sig.ecx, sig.edx] {
                    b.extend_from_slice(&r.to_le_bytes());
                }
                assert_eq!(&b[..9], b"KVMKVMKVM");
                assert!(s.iter().any(|e| e.function == 0x4000_0001));
            }
        }
    }
}
