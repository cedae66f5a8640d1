//! virtio-balloon end to end on a real VM's memory, the test playing the
//! guest driver (rings in guest RAM, register accesses on the device):
//! inflate releases the backing through the gather (mincore, memfd blocks)
//! and leaves ballooned markers; deflate makes the pages discarded and they
//! read back as zeros through the userfaultfd handler; free page reporting,
//! stats, feature flags.
//!
//! The positive side of the balloon rules of `guest-mm/src/mutation.rs`:
//! valid PFNs and reports must be served (the bad-input side is
//! `balloon_bad_input.rs` and `balloon_fuzz.rs`). Every VM is destroyed
//! through `destroy_and_check` (all RAM unmapped, table freed).

use guest_mm::{Gpa, PageState};
use tests::virtio::{balloon_vm, file_bytes, pfns, resident_pages, Driver, F_WRITE, Q};
use tests::{destroy_and_check, kvm_or_skip, loud, HugePages};
use vmm::devices::virtio::balloon::{F_DEFLATE_ON_OOM, F_REPORTING, F_STATS_VQ};
use vmm::{Backing, PageSize, Vm};

const MIB: u64 = 1 << 20;
const AREA: u64 = 4 * MIB;
const AREA_BYTES: u64 = tests::virtio::AREA;

fn host_of(vm: &Vm, gpa: u64) -> usize {
    let r = vm.memory().regions()[0];
    assert!(r.contains(gpa, 1));
    r.host_addr + usize::try_from(gpa - r.gpa.0).expect("fits")
}

/// Writes a non-zero pattern over `[gpa, gpa + len)` through the fast walk.
fn fill(d: &mut Driver, gpa: u64, len: u64) {
    let mut chunk = vec![0u8; MIB as usize];
    let mut at = gpa;
    while at < gpa + len {
        for (i, w) in chunk.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&((at + i as u64 * 8) | 1).to_le_bytes());
        }
        d.mem.write(at, &chunk).expect("fill");
        at += MIB;
    }
}

fn all_zero(d: &mut Driver, gpa: u64, len: u64) -> bool {
    let mut buf = vec![0u8; MIB as usize];
    let mut at = gpa;
    while at < gpa + len {
        let n = (gpa + len - at).min(MIB);
        d.mem.read(at, &mut buf[..n as usize]).expect("read back");
        if buf[..n as usize].iter().any(|b| *b != 0) {
            return false;
        }
        at += n;
    }
    true
}

struct Inflated {
    ms: f64,
    request_ms: f64,
    resident_before: u64,
    resident_after: u64,
    rss_drop: i64,
}

/// Inflates `[gpa, gpa + len)` (shuffled PFNs, 256 per chain as Linux
/// sends them) in one notify and checks the table and the residency.
fn inflate(vm: &Vm, d: &mut Driver, gpa: u64, len: u64, per_chain: usize) -> Inflated {
    let host = host_of(vm, gpa);
    let resident_before = resident_pages(host, len);
    let rss0 = vmm::proc_stats::rss().rss;
    let mut p = pfns(gpa, len);
    // A fixed shuffle: the device must sort and coalesce.
    let n = p.len();
    for i in 0..n {
        p.swap(i, (i * 7919 + 13) % n);
    }
    let used0 = d.used_idx(Q::Inflate);
    let chains = d.send_pfns(Q::Inflate, &p, per_chain);
    assert_eq!(d.used_idx(Q::Inflate), used0.wrapping_add(chains));
    let c = d.dev().counters();
    let ms = c.last_inflate_ns as f64 / 1e6;
    let request_ms = c.last_inflate_request_ns as f64 / 1e6;
    let resident_after = resident_pages(host, len);
    let rss_drop = vmm::proc_stats::rss().rss as i64 - rss0 as i64;
    for a in (gpa..gpa + len).step_by(4096) {
        assert!(
            matches!(
                vm.stage2().table().query(Gpa(a)),
                PageState::Ballooned { .. }
            ),
            "{a:#x}: {:?}",
            vm.stage2().table().query(Gpa(a))
        );
    }
    Inflated {
        ms,
        request_ms,
        resident_before,
        resident_after,
        rss_drop: -rss_drop,
    }
}

fn inflate_then_deflate(name: &str, backing: Backing, page: PageSize) {
    if !kvm_or_skip(name) {
        return;
    }
    let vm = balloon_vm("128M", backing, page);
    let mut d = Driver::new(&vm, AREA);
    assert_eq!(d.init(F_STATS_VQ | F_DEFLATE_ON_OOM | F_REPORTING), 0xf);
    let (gpa, len) = (64 * MIB, 32 * MIB);
    fill(&mut d, gpa - 2 * MIB, len + 4 * MIB);
    // Allocate the PFN arrays' pages now, so the file's block count below
    // only moves by what the balloon frees.
    let at = d.buf(0);
    d.mem.write(at, &vec![0xa5; (MIB / 2) as usize]).unwrap();
    // guest_memfd does not count its pages in st_blocks: mincore is its
    // proof (`resident_*`).
    let files = Some(vm.memory().regions()[0].files)
        .filter(|f| f.first().is_some() && backing != Backing::GuestMemfd);
    let blocks0 = files.as_ref().map(file_bytes);
    let r = inflate(&vm, &mut d, gpa, len, 256);
    let c = d.dev().counters();
    assert_eq!(c.errors, 0, "{:?}", d.dev().lock().device().recent_errors());
    assert_eq!(c.pages_inflated, len / 4096);
    assert_eq!(c.runs, 1, "contiguous PFNs coalesce into one run");
    assert_eq!(c.bytes_released, len);
    assert_eq!(r.resident_before, len / 4096, "filled pages are resident");
    assert_eq!(r.resident_after, 0, "ballooned pages are gone");
    let t = vm.stage2().table().stats();
    assert_eq!(t.release_outside_bytes, 0);
    if let (Some(files), Some(b0)) = (files, blocks0) {
        let b1 = file_bytes(&files);
        assert!(
            b0 - b1 >= len,
            "memfd blocks dropped by {} bytes only",
            b0 - b1
        );
        loud!("{name}: memfd st_blocks drop {} MiB", (b0 - b1) / MIB);
    }
    loud!(
        "{name}: inflate {} MiB in {:.2} ms, resident pages {} -> {}, process RSS drop {} MiB",
        len / MIB,
        r.ms,
        r.resident_before,
        r.resident_after,
        r.rss_drop / MIB as i64
    );
    // Neighbours keep their data.
    let mut b = [0u8; 8];
    d.mem.read(gpa - 8, &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), (gpa - 8) | 1);
    d.mem.read(gpa + len, &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), (gpa + len) | 1);
    // A ballooned page cannot be read by the device.
    assert!(d.mem.read(gpa, &mut b).is_err());

    // Deflate half: discarded, reads zeros through the fault handler.
    let faults0 = vm.fault_stats().summary().faults;
    let used0 = d.used_idx(Q::Deflate);
    d.send_pfns(Q::Deflate, &pfns(gpa, len / 2), 256);
    assert!(d.used_idx(Q::Deflate) != used0);
    assert_eq!(d.dev().counters().pages_deflated, len / 2 / 4096);
    assert!(matches!(
        vm.stage2().table().query(Gpa(gpa)),
        PageState::Discarded { .. }
    ));
    assert!(matches!(
        vm.stage2().table().query(Gpa(gpa + len / 2)),
        PageState::Ballooned { .. }
    ));
    assert!(all_zero(&mut d, gpa, len / 2), "deflated pages read zeros");
    let faults = vm.fault_stats().summary().faults - faults0;
    if vm.memory().has_demand_faults() {
        assert!(faults > 0, "deflated pages came back through the handler");
    } else {
        assert_eq!(faults, 0, "guest_memfd pages come back without a handler");
    }
    assert!(matches!(
        vm.stage2().table().query(Gpa(gpa)),
        PageState::Present { .. }
    ));
    assert_eq!(vm.stage2().unexpected_faults(), 0);
    drop(d);
    destroy_and_check(vm);
}

#[test]
fn inflate_deflate_anon_4k() {
    inflate_then_deflate("inflate_deflate_anon_4k", Backing::Anon, PageSize::Size4K);
}

#[test]
fn inflate_deflate_anon_2m() {
    inflate_then_deflate("inflate_deflate_anon_2m", Backing::Anon, PageSize::Size2M);
}

/// Firecracker #6167: with memfd backing the balloon must really free the
/// file's pages (punch hole), not only the mapping.
#[test]
fn inflate_deflate_memfd_frees_file_blocks() {
    inflate_then_deflate("inflate_deflate_memfd_4k", Backing::Memfd, PageSize::Size4K);
    inflate_then_deflate("inflate_deflate_memfd_2m", Backing::Memfd, PageSize::Size2M);
}

/// guest_memfd: inflate punches holes in the file (mincore sees them go),
/// deflated pages read zeros (refilled by the kernel, no handler).
#[test]
fn inflate_deflate_guest_memfd() {
    for (name, page) in [
        ("inflate_deflate_guest_memfd_4k", PageSize::Size4K),
        ("inflate_deflate_guest_memfd_2m", PageSize::Size2M),
    ] {
        if !tests::guest_memfd_or_skip(name) {
            return;
        }
        inflate_then_deflate(name, Backing::GuestMemfd, page);
    }
}

/// hugetlb: a huge page goes back only when all its 4 KiB pages are in the
/// balloon; a partly ballooned one is tracked and stays.
#[test]
fn inflate_hugetlb_whole_pages_only() {
    let name = "inflate_hugetlb_whole_pages_only";
    if !kvm_or_skip(name) {
        return;
    }
    let Some(_hp) = HugePages::reserve(name, 64) else {
        return;
    };
    let vm = balloon_vm("128M", Backing::Hugetlb, PageSize::Size2M);
    let mut d = Driver::new(&vm, AREA);
    assert_eq!(d.init(0), 0xf);
    let gpa = 64 * MIB;
    fill(&mut d, gpa, 8 * MIB);
    let free0 = vmm::memory::free_huge_pages();
    // 2 whole huge pages + half of a third.
    d.send_pfns(Q::Inflate, &pfns(gpa, 5 * MIB), 4096);
    let c = d.dev().counters();
    assert_eq!(c.errors, 0);
    let t = vm.stage2().table().stats();
    assert_eq!(t.partial_huge_pages, 1, "{t:?}");
    let freed = vmm::memory::free_huge_pages().saturating_sub(free0);
    assert_eq!(freed, 2, "two whole huge pages back with the host");
    // The rest of the half page balloons: it goes too.
    d.send_pfns(Q::Inflate, &pfns(gpa + 5 * MIB, MIB), 4096);
    assert_eq!(vm.stage2().table().stats().partial_huge_pages, 0);
    assert_eq!(vmm::memory::free_huge_pages().saturating_sub(free0), 3);
    drop(d);
    destroy_and_check(vm);
}

#[test]
fn free_page_reporting_discards_and_faults_back() {
    let name = "free_page_reporting_discards_and_faults_back";
    if !kvm_or_skip(name) {
        return;
    }
    let vm = balloon_vm("128M", Backing::Anon, PageSize::Size4K);
    let mut d = Driver::new(&vm, AREA);
    assert_eq!(d.init(F_REPORTING), 0xf);
    assert!(d.dev().lock().device().reporting());
    let (gpa, len) = (32 * MIB, 4 * MIB);
    fill(&mut d, gpa, len);
    // Two reported ranges in one chain (device-writable, as Linux sends them).
    d.desc(Q::Reporting, 0, gpa, (2 * MIB) as u32, F_WRITE | 1, 1);
    d.desc(Q::Reporting, 1, gpa + 2 * MIB, (2 * MIB) as u32, F_WRITE, 0);
    d.publish(Q::Reporting, &[0]);
    d.notify(Q::Reporting);
    assert_eq!(d.used_idx(Q::Reporting), 1);
    let c = d.dev().counters();
    assert_eq!((c.errors, c.bytes_reported), (0, len));
    assert_eq!(resident_pages(host_of(&vm, gpa), len), 0);
    assert!(matches!(
        vm.stage2().table().query(Gpa(gpa + MIB)),
        PageState::Discarded { .. }
    ));
    let faults0 = vm.fault_stats().summary().faults;
    assert!(all_zero(&mut d, gpa, len));
    assert!(vm.fault_stats().summary().faults > faults0);
    drop(d);
    destroy_and_check(vm);
}

#[test]
fn stats_are_kept_and_buffer_returned_on_request() {
    let name = "stats_are_kept_and_buffer_returned_on_request";
    if !kvm_or_skip(name) {
        return;
    }
    let vm = balloon_vm("64M", Backing::Anon, PageSize::Size4K);
    let mut d = Driver::new(&vm, AREA);
    assert_eq!(d.init(F_STATS_VQ), 0xf);
    let mut buf = Vec::new();
    for (tag, val) in [(0u16, 11u64), (4, 1 << 30), (5, 7 << 20)] {
        buf.extend_from_slice(&tag.to_le_bytes());
        buf.extend_from_slice(&val.to_le_bytes());
    }
    let at = d.buf(0);
    d.mem.write(at, &buf).unwrap();
    d.desc(Q::Stats, 0, at, buf.len() as u32, 0, 0);
    d.publish(Q::Stats, &[0]);
    d.notify(Q::Stats);
    // Held by the device until the host asks.
    assert_eq!(d.used_idx(Q::Stats), 0);
    let s = d.dev().lock().device().last_stats().map(<[_]>::to_vec);
    let s = s.expect("stats kept");
    assert_eq!(s.len(), 3);
    assert_eq!((s[1].tag, s[1].val), (4, 1 << 30));
    d.dev().request_stats();
    assert_eq!(d.used_idx(Q::Stats), 1);
    assert_eq!(d.dev().counters().stats_updates, 1);
    drop(d);
    destroy_and_check(vm);
}

#[test]
fn target_and_feature_flags() {
    let name = "target_and_feature_flags";
    if !kvm_or_skip(name) {
        return;
    }
    let vm = balloon_vm("64M", Backing::Anon, PageSize::Size4K);
    let mut d = Driver::new(&vm, AREA);
    assert_eq!(d.init(0), 0xf);
    assert!(!d.dev().lock().device().deflate_on_oom());
    d.dev().set_target_pages(1024);
    assert_eq!(d.config(0), 1024);
    assert_ne!(d.r32(0x60) & 2, 0, "config change interrupt bit");
    // The driver writes `actual`.
    d.w32(0x104, 512);
    assert_eq!(d.config(4), 512);
    // Inflate 512 pages and deflate them without DEFLATE_ON_OOM: counted.
    d.send_pfns(Q::Inflate, &pfns(16 * MIB, 2 * MIB), 256);
    d.send_pfns(Q::Deflate, &pfns(16 * MIB, 2 * MIB), 256);
    assert_eq!(d.dev().counters().deflated_below_target, 512);
    assert_eq!(d.init(F_DEFLATE_ON_OOM), 0xf);
    assert!(d.dev().lock().device().deflate_on_oom());
    d.send_pfns(Q::Inflate, &pfns(16 * MIB, 2 * MIB), 256);
    d.send_pfns(Q::Deflate, &pfns(16 * MIB, 2 * MIB), 256);
    assert_eq!(d.dev().counters().deflated_below_target, 512, "allowed now");
    drop(d);
    destroy_and_check(vm);
}

/// The target: inflating 512 MiB of a 1 GiB guest gives at least
/// 480 MiB back to the host, for anonymous and for memfd backing.
fn inflate_half_of_1g(name: &str, backing: Backing) {
    if !kvm_or_skip(name) {
        return;
    }
    let vm = balloon_vm("1G", backing, PageSize::Size2M);
    let mut d = Driver::new(&vm, AREA);
    assert_eq!(d.init(0), 0xf);
    let (gpa, len) = (256 * MIB, 512 * MIB);
    fill(&mut d, gpa, len);
    let at = d.buf(0);
    d.mem
        .write(at, &vec![0xa5; (AREA_BYTES / 2) as usize])
        .unwrap();
    let files = Some(vm.memory().regions()[0].files).filter(|f| f.first().is_some());
    let blocks0 = files.as_ref().map(file_bytes);
    let r = inflate(&vm, &mut d, gpa, len, 1024);
    let dropped = (r.resident_before - r.resident_after) * 4096;
    assert!(dropped >= 480 * MIB, "resident drop {} MiB", dropped / MIB);
    let mut line = format!(
        "{name}: inflate 512 MiB of 1 GiB: release {:.2} ms, whole request {:.2} ms, resident drop {} MiB, process RSS drop {} MiB",
        r.ms,
        r.request_ms,
        dropped / MIB,
        r.rss_drop / MIB as i64
    );
    if let (Some(files), Some(b0)) = (files, blocks0) {
        let freed = b0 - file_bytes(&files);
        assert!(
            freed >= 480 * MIB,
            "memfd blocks dropped {} MiB",
            freed / MIB
        );
        line += &format!(", memfd st_blocks drop {} MiB", freed / MIB);
    }
    loud!("{line}");
    drop(d);
    destroy_and_check(vm);
}

#[test]
fn inflate_512m_of_1g_anon() {
    inflate_half_of_1g("inflate_512m_of_1g_anon", Backing::Anon);
}

#[test]
fn inflate_512m_of_1g_memfd() {
    inflate_half_of_1g("inflate_512m_of_1g_memfd", Backing::Memfd);
}

/// Scattered PFNs (every other page) still make one gather: one flush of
/// the table, one fault-handler registration for the merged 2 MiB windows.
#[test]
fn scattered_pfns_take_one_gather() {
    let name = "scattered_pfns_take_one_gather";
    if !kvm_or_skip(name) {
        return;
    }
    let vm = balloon_vm("128M", Backing::Anon, PageSize::Size4K);
    let mut d = Driver::new(&vm, AREA);
    assert_eq!(d.init(0), 0xf);
    let (gpa, len) = (64 * MIB, 8 * MIB);
    fill(&mut d, gpa, len);
    let p: Vec<u32> = pfns(gpa, len).into_iter().step_by(2).rev().collect();
    let flushes0 = vm.stage2().table().stats().flushes;
    let regs0 = vm.fault_stats().summary().releases;
    d.send_pfns(Q::Inflate, &p, 256);
    let c = d.dev().counters();
    assert_eq!((c.errors, c.runs, c.pages_inflated), (0, 1024, 1024));
    assert_eq!(
        vm.stage2().table().stats().flushes - flushes0,
        1,
        "one gather"
    );
    assert_eq!(vm.fault_stats().summary().releases - regs0, 1, "one window");
    assert_eq!(resident_pages(host_of(&vm, gpa), len), 1024);
    for (i, a) in (gpa..gpa + len).step_by(4096).enumerate() {
        let s = vm.stage2().table().query(Gpa(a));
        let ballooned = matches!(s, PageState::Ballooned { .. });
        assert_eq!(ballooned, i % 2 == 0, "{a:#x}: {s:?}");
    }
    loud!(
        "{name}: 1024 scattered pages: release {:.2} ms, whole request {:.2} ms",
        c.last_inflate_ns as f64 / 1e6,
        c.last_inflate_request_ns as f64 / 1e6
    );
    drop(d);
    destroy_and_check(vm);
}

/// A VM with a balloon tears down like any other: the device's references
/// to the fault handler and RAM are gone before the reclaim unmaps RAM.
#[test]
fn teardown_with_balloon_unmaps_ram() {
    let name = "teardown_with_balloon_unmaps_ram";
    if !kvm_or_skip(name) {
        return;
    }
    let vm = balloon_vm("64M", Backing::Memfd, PageSize::Size4K);
    {
        let mut d = Driver::new(&vm, AREA);
        assert_eq!(d.init(0), 0xf);
        d.send_pfns(Q::Inflate, &pfns(32 * MIB, MIB), 256);
        assert_eq!(d.dev().counters().pages_inflated, 256);
    }
    let mut t = vm.destroy();
    let r = t.wait_reclaim();
    assert_eq!(r.unmapped_bytes, 64 * MIB, "{r:?}");
    assert_eq!(r.stage2.table_pages_left, 1, "{r:?}");
}
