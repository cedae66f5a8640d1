//! Bad configurations fail with errors that say what to do.

use std::sync::Arc;

use tests::{config, loud};
use vmm::memory::{free_huge_pages, MemoryConfig, MemoryError, NoHook, VmMemory};
use vmm::{Backing, MemSize, PageSize, Vm, VmError, Workload};

/// Guest memory without a VM: the checks that come before KVM.
fn memory(size: &str, backing: Backing, page_size: PageSize) -> Result<VmMemory, MemoryError> {
    let cfg = MemoryConfig {
        size: size.parse().unwrap(),
        backing,
        page_size,
    };
    VmMemory::new(cfg, Arc::new(NoHook), None)
}

#[test]
fn size_zero_is_rejected() {
    let e = "0".parse::<MemSize>().unwrap_err();
    assert!(matches!(e, MemoryError::ZeroSize));
    assert!(e.to_string().contains("must not be 0"), "{e}");
    assert!(matches!(
        "0M".parse::<MemSize>(),
        Err(MemoryError::ZeroSize)
    ));
}

#[test]
fn unaligned_size_is_rejected() {
    for s in ["3M", "1000K", "257M", "12345"] {
        let e = s.parse::<MemSize>().unwrap_err();
        assert!(matches!(e, MemoryError::Unaligned(_)), "{s}: {e}");
        assert!(e.to_string().contains("multiple of 2 MiB"), "{e}");
    }
}

#[test]
fn absurd_and_garbage_sizes_are_rejected() {
    assert!(matches!(
        "128G".parse::<MemSize>(),
        Err(MemoryError::TooBig(_))
    ));
    for s in ["", "M", "12Q", "-2M", "1.5G", "99999999999999G"] {
        let e = s.parse::<MemSize>().unwrap_err();
        assert!(matches!(e, MemoryError::BadSize(_)), "{s}: {e}");
    }
    assert!(matches!(
        "huge".parse::<Backing>(),
        Err(MemoryError::BadBacking(_))
    ));
    assert!(matches!(
        "1G".parse::<PageSize>(),
        Err(MemoryError::BadPageSize(_))
    ));
}

#[test]
fn too_many_vcpus() {
    for n in [0, 65, 1000] {
        let (mut c, _) = config("256M", 1, Backing::Anon, PageSize::Size2M, Workload::Verify);
        c.vcpus = n;
        let e = Vm::new(c).expect_err("accepted a bad vCPU count");
        assert!(matches!(e, VmError::Guest(_)), "{n}: {e:?}");
        assert!(e.to_string().contains("--vcpus"), "{e}");
    }
}

#[test]
fn too_little_memory_for_vcpus() {
    let (mut c, _) = config("8M", 1, Backing::Anon, PageSize::Size2M, Workload::Verify);
    c.vcpus = 4;
    let e = Vm::new(c).expect_err("accepted 8M for 4 vCPUs");
    assert!(e.to_string().contains("at least 10 MiB"), "{e}");
}

#[test]
fn missing_huge_pages() {
    // 32 GiB of 2 MiB pages is more than this host has free.
    let needed = 16384;
    let free = free_huge_pages();
    if free >= needed {
        loud!("SKIPPED: missing_huge_pages: the host has {free} free huge pages, cannot run out");
        return;
    }
    let e = memory("32G", Backing::Hugetlb, PageSize::Size2M).unwrap_err();
    assert!(matches!(e, MemoryError::NoHugePages { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("vm.nr_hugepages"), "{msg}");
    // Through the VM too: checked before KVM is opened.
    let (c, _) = config(
        "32G",
        1,
        Backing::Hugetlb,
        PageSize::Size2M,
        Workload::Verify,
    );
    let e = Vm::new(c).expect_err("hugetlb without pages accepted");
    assert!(e.to_string().contains("vm.nr_hugepages"), "{e}");
}

#[test]
fn hugetlb_with_4k_pages() {
    let e = memory("64M", Backing::Hugetlb, PageSize::Size4K).unwrap_err();
    assert!(matches!(e, MemoryError::HugetlbNeeds2M), "{e:?}");
}

#[test]
fn guest_memfd_needs_a_vm() {
    let e = memory("64M", Backing::GuestMemfd, PageSize::Size4K).unwrap_err();
    assert!(matches!(e, MemoryError::GuestMemfdNeedsVm), "{e:?}");
    assert!(e.to_string().contains("KVM VM"), "{e}");
}
