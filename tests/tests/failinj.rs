//! Failure injection on the monitor's guest-memory system calls (issue 13):
//! `UFFDIO_REGISTER`, `UFFDIO_ZEROPAGE` / `UFFDIO_COPY`, `UFFDIO_WAKE`,
//! `munmap` of guest RAM and `KVM_SET_USER_MEMORY_REGION` fail through
//! [`vmm::memory::MemoryFaults`], and the release calls through the
//! table's points (one test on a running VM). After each failure the test
//! checks (a) the table's state of the pages concerned, (b) the process's
//! RSS and (c) `mincore` of their host range, then clears the point and
//! shows the memory recovers.
//!
//! Real userfaultfd and real mappings; the memory-slot and VM tests need
//! `/dev/kvm` (loud SKIPPED without it). The tests run one at a time (a
//! lock), so that RSS deltas are theirs.

use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use guest_mm::{Gpa, PageState};
use tests::{kvm_or_skip, loud};
use vmm::memory::{
    MemoryConfig, MemoryError, MemoryFaults, NoHook, ReleaseError, ReleaseMode, UffdError, VmMemory,
};
use vmm::{Backing, PageSize};

const M: u64 = 1 << 20;
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn cfg(size: &str, backing: Backing) -> MemoryConfig {
    MemoryConfig {
        size: size.parse().unwrap(),
        backing,
        page_size: PageSize::Size4K,
    }
}

/// Populated memory of `size` with its own injection points.
fn memory(size: &str, backing: Backing) -> (Arc<VmMemory>, Arc<MemoryFaults>) {
    let faults = Arc::new(MemoryFaults::default());
    let m =
        VmMemory::with_faults(cfg(size, backing), Arc::new(NoHook), None, faults.clone()).unwrap();
    m.populate().unwrap();
    (Arc::new(m), faults)
}

/// The host address of guest `gpa`.
fn host(m: &VmMemory, gpa: u64) -> *mut u64 {
    m.regions()[0].host_of(gpa) as *mut u64
}

/// Reads guest `gpa` through the host mapping (a demand fault on a
/// released page).
fn read_u64(m: &VmMemory, gpa: u64) -> u64 {
    // SAFETY: inside guest RAM, mapped while `m` lives.
    unsafe { host(m, gpa).read_volatile() }
}

fn write_u64(m: &VmMemory, gpa: u64, v: u64) {
    // SAFETY: inside guest RAM, mapped while `m` lives.
    unsafe { host(m, gpa).write_volatile(v) }
}

fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap();
    let line = s.lines().find(|l| l.starts_with("Rss:")).unwrap();
    let kb: u64 = line[4..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kb * 1024
}

/// Whether host `[addr, addr + len)` is mapped at all (`mincore` fails
/// with `ENOMEM` on a hole).
fn mapped(addr: u64, len: u64) -> bool {
    let mut v = vec![0u8; (len / 4096) as usize];
    // SAFETY: mincore only reads page-table state; `v` has a byte per page.
    let rc = unsafe { libc::mincore(addr as *mut _, len as usize, v.as_mut_ptr()) };
    rc == 0
}

/// Reads the u64 at `gpa` through the host mapping on another thread (a
/// demand fault if the page was released); the value arrives on the
/// channel once the fault is resolved.
fn touch(m: &Arc<VmMemory>, gpa: u64) -> Receiver<u64> {
    let (tx, rx) = channel();
    let m = Arc::clone(m);
    std::thread::spawn(move || {
        let _ = tx.send(read_u64(&m, gpa));
    });
    rx
}

fn wait_for(what: &str, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(10), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn state(m: &VmMemory, gpa: u64) -> PageState {
    m.stage2().table().query(Gpa(gpa))
}

#[test]
fn uffd_register_failure_fails_the_release_before_anything_is_released() {
    let _s = serial();
    let (m, faults) = memory("32M", Backing::Anon);
    let (gpa, len) = (8 * M, 16 * M);
    write_u64(&m, gpa + 4096, 0x1234);
    let rss0 = rss();
    faults.uffd_register.fail_always();
    let e = m.release(&[(gpa, len)], ReleaseMode::Discard).unwrap_err();
    assert!(
        matches!(e, ReleaseError::Arm(UffdError::Register(..))),
        "{e:?}"
    );
    assert!(e.to_string().contains("nothing was released"), "{e}");
    assert_eq!(faults.uffd_register.injected(), 3, "tried 3 times");
    // (a) every page still present, (c) resident, (b) RSS kept, contents too.
    for p in (gpa..gpa + len).step_by(4096) {
        assert!(matches!(state(&m, p), PageState::Present { .. }), "{p:#x}");
    }
    assert_eq!(m.resident_bytes_of(gpa, len), len);
    assert!(rss() + M >= rss0, "RSS fell: nothing was to be released");
    assert_eq!(read_u64(&m, gpa + 4096), 0x1234);
    // Cleared: the release goes through, the memory goes back.
    faults.uffd_register.clear();
    m.release(&[(gpa, len)], ReleaseMode::Discard).unwrap();
    assert!(matches!(state(&m, gpa), PageState::Discarded { .. }));
    assert_eq!(m.resident_bytes_of(gpa, len), 0);
    assert!(rss() + len <= rss0 + M, "RSS did not fall by the release");
    assert_eq!(read_u64(&m, gpa + 4096), 0, "faults back in as zeros");
}

/// Releases the 4 KiB page at `gpa` (its contents made non-zero first).
fn release_page(m: &VmMemory, gpa: u64) {
    write_u64(m, gpa, 0x55);
    m.release(&[(gpa, 4096)], ReleaseMode::Discard).unwrap();
    assert!(matches!(state(m, gpa), PageState::Discarded { .. }));
    assert_eq!(m.resident_bytes_of(gpa, 4096), 0);
}

#[test]
fn uffd_zeropage_failure_is_resolved_by_a_copy() {
    let _s = serial();
    for backing in [Backing::Anon, Backing::Memfd] {
        let (m, faults) = memory("8M", backing);
        let gpa = 4 * M;
        release_page(&m, gpa);
        faults.uffd_zeropage.fail_always();
        let rx = touch(&m, gpa);
        let v = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the fault was not resolved");
        assert_eq!(v, 0, "{backing}");
        assert!(faults.uffd_zeropage.injected() >= 1);
        let s = m.fault_stats().summary();
        assert!(s.fill_fallbacks >= 1, "{backing}: {s:?}");
        assert_eq!(s.errors, 0, "{backing}: {s:?}");
        assert!(matches!(state(&m, gpa), PageState::Present { .. }));
        assert_eq!(m.resident_bytes_of(gpa, 4096), 4096);
    }
}

#[test]
fn uffd_fill_failure_commits_nothing_and_the_fault_is_retried() {
    let _s = serial();
    let (m, faults) = memory("8M", Backing::Anon);
    let gpa = 4 * M;
    release_page(&m, gpa);
    faults.uffd_zeropage.fail_always();
    faults.uffd_copy.fail_always();
    let rx = touch(&m, gpa);
    wait_for("failed fills", || m.fault_stats().summary().errors >= 3);
    // Nothing installed, so nothing committed: the table keeps its marker,
    // the page is not resident, the thread still waits.
    assert!(
        matches!(state(&m, gpa), PageState::Discarded { .. }),
        "{:?}",
        state(&m, gpa)
    );
    assert_eq!(m.resident_bytes_of(gpa, 4096), 0);
    assert!(
        rx.try_recv().is_err(),
        "the access completed without a page"
    );
    faults.uffd_zeropage.clear();
    faults.uffd_copy.clear();
    let v = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the fault was lost");
    assert_eq!(v, 0);
    assert!(matches!(state(&m, gpa), PageState::Present { .. }));
    assert_eq!(m.resident_bytes_of(gpa, 4096), 4096);
}

#[test]
fn uffd_wake_failure_is_retried_until_the_thread_wakes() {
    let _s = serial();
    let (m, faults) = memory("8M", Backing::Anon);
    let gpa = 4 * M;
    release_page(&m, gpa);
    faults.uffd_wake.fail_always();
    let rx = touch(&m, gpa);
    wait_for("failed wakes", || {
        m.fault_stats().summary().wake_retries >= 3
    });
    std::thread::sleep(Duration::from_millis(20));
    // The page is there and committed; only the wake-up is missing.
    assert!(matches!(state(&m, gpa), PageState::Present { .. }));
    assert_eq!(m.resident_bytes_of(gpa, 4096), 4096);
    assert!(rx.try_recv().is_err(), "woken although every wake failed");
    faults.uffd_wake.clear();
    let v = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the faulting thread was never woken");
    assert_eq!(v, 0);
}

#[test]
fn munmap_failure_keeps_the_mapping_until_closed_again() {
    let _s = serial();
    let (m, faults) = memory("16M", Backing::Memfd);
    let r = m.regions()[0];
    let (host, len) = (r.host_addr as u64, r.len);
    m.release_all().unwrap();
    assert_eq!(m.resident_bytes(), 0);
    let m = Arc::try_unwrap(m).unwrap();
    faults.munmap.fail_always();
    let e = m.try_close().expect_err("every munmap failed");
    assert_eq!((e.still_mapped, e.unmapped), (len, 0), "{e}");
    let m = *e.memory;
    assert_eq!(faults.munmap.injected(), 3);
    // Still mapped (and so not reusable by anyone else), holding nothing.
    assert!(mapped(host, len));
    assert_eq!(m.resident_bytes(), 0);
    assert!(m.stage2().table().is_dying());
    faults.munmap.clear();
    assert_eq!(m.try_close().expect("unmapped"), len);
    assert!(!mapped(host, len), "still mapped after a successful close");
    assert_eq!(vmm::memory::leaked_ram_bytes(), 0);
}

/// Mappings of exactly `len` bytes in this process.
fn mappings_of(len: u64) -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| {
            let r = l.split(' ').next().unwrap();
            let (s, e) = r.split_once('-').unwrap();
            u64::from_str_radix(e, 16).unwrap() - u64::from_str_radix(s, 16).unwrap() == len
        })
        .count()
}

/// Registers slot 1 over guest `[0, len)` with a mapping of our own:
/// `Ok` only if no other slot covers that range (KVM refuses overlaps).
fn probe_slot(vm: &kvm_ioctls::VmFd, len: u64) -> Result<(), kvm_ioctls::Error> {
    // SAFETY: a fresh anonymous mapping, checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    let mut region = kvm_bindings::kvm_userspace_memory_region {
        slot: 1,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: len,
        userspace_addr: p as u64,
    };
    // SAFETY: our mapping outlives the slot: deleted below before unmapping.
    let r = unsafe { vm.set_user_memory_region(region) };
    if r.is_ok() {
        region.memory_size = 0;
        // SAFETY: deletes the slot just made.
        unsafe { vm.set_user_memory_region(region) }.unwrap();
    }
    // SAFETY: our mapping, no slot refers to it any more.
    unsafe { libc::munmap(p, len as usize) };
    r
}

#[test]
fn memslot_failure_leaves_no_slot_and_nothing_mapped() {
    if !kvm_or_skip("memslot_failure_leaves_no_slot_and_nothing_mapped") {
        return;
    }
    let _s = serial();
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    let len = 38 * M; // a size nothing else maps
    let before = mappings_of(len);
    let faults = Arc::new(MemoryFaults::default());
    faults.memslot.fail_always();
    let e = VmMemory::with_faults(
        cfg("38M", Backing::Anon),
        Arc::new(NoHook),
        Some(&vm),
        faults.clone(),
    )
    .unwrap_err();
    assert!(matches!(e, MemoryError::Slot(..)), "{e:?}");
    assert_eq!(faults.memslot.injected(), 1);
    // No slot left in KVM over guest RAM, no RAM left mapped.
    probe_slot(&vm, len).expect("a slot was left behind");
    assert_eq!(mappings_of(len), before, "guest RAM still mapped");
    // Cleared: the same VM takes the memory, and KVM now has its slot.
    faults.memslot.clear();
    let m = VmMemory::with_faults(
        cfg("38M", Backing::Anon),
        Arc::new(NoHook),
        Some(&vm),
        faults,
    )
    .unwrap();
    assert!(
        probe_slot(&vm, len).is_err(),
        "KVM has no slot for guest RAM"
    );
    drop(vm);
    let host = m.regions()[0].host_addr as u64;
    assert_eq!(m.close(), len);
    assert!(!mapped(host, len));
}

#[test]
fn a_failed_release_on_a_running_vm_is_reported_and_freed_at_teardown() {
    if !kvm_or_skip("a_failed_release_on_a_running_vm_is_reported_and_freed_at_teardown") {
        return;
    }
    let _s = serial();
    let (c, _) = tests::config(
        "64M",
        1,
        Backing::Anon,
        PageSize::Size4K,
        vmm::Workload::Verify,
    );
    let mut vm = vmm::Vm::new(c).unwrap();
    vm.start().unwrap();
    let m = Arc::clone(vm.memory());
    m.populate().unwrap();
    let (gpa, len) = (32 * M, 8 * M);
    let table = Arc::clone(m.stage2().table());
    table.faults.madvise.fail_always();
    table.faults.batch_release.fail_always();
    let e = vm.release_range(gpa, len).unwrap_err();
    loud!("failinj: release_range with madvise failing: {e:#}");
    assert!(format!("{e:#}").contains("unreleased_bytes"), "{e:#}");
    // (a) the table discarded the range, (b, c) it is still resident and
    // every byte of it is on the unreleased list.
    for p in (gpa..gpa + len).step_by(4096) {
        assert!(
            matches!(state(&m, p), PageState::Discarded { .. }),
            "{p:#x}"
        );
    }
    assert_eq!(m.resident_bytes_of(gpa, len), len);
    let host = m.regions()[0].host_of(gpa) as u64;
    assert_eq!(table.unreleased(), vec![(guest_mm::Hva(host), len)]);
    assert_eq!(table.stats().unreleased_bytes, len);
    table.faults.madvise.clear();
    table.faults.batch_release.clear();
    drop(m);
    let rss0 = rss();
    let mut td = vm.destroy();
    let r = td.wait_reclaim();
    assert!(table.unreleased().is_empty(), "{:?}", table.unreleased());
    assert_eq!(table.stats().unreleased_bytes, 0);
    assert!(r.unmapped_bytes >= 64 * M, "{r:?}");
    assert!(
        rss() + 60 * M <= rss0 + 4 * M,
        "RSS did not fall: {rss0} -> {}",
        rss()
    );
}
