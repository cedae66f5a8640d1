//! Who runs a virtio queue notification: the device thread, woken by a KVM
//! ioeventfd on `QueueNotify` (the default), or, when that is off or KVM
//! refuses the ioeventfd, the vCPU that wrote the register. The guest's
//! own balloon driver ([`Workload::Balloon`]) inflates and deflates 32 MiB
//! either way. The device thread's own count tells which path ran each
//! notify (all of them, or none); the transport's count and the guest's own
//! timing of its notify writes (`balloon_notify_times`) see every one. On
//! the device thread's path the driver waits for each request in the VMM
//! (`OP_IDLE`) and the device's return of the buffer wakes it.

use std::sync::Mutex;

use tests::{
    balloon_driver_config, destroy_and_check, kvm_or_skip, start_balloon_driver, GUEST_TIMEOUT,
};
use vmm::devices::virtio::thread::NotifyPath;
use vmm::guest::balloon::MAX_PFNS;
use vmm::Backing;

const PAGES: u64 = 2 * MAX_PFNS;

static SERIAL: Mutex<()> = Mutex::new(());

/// The nice values of this process's `virtio-balloon` threads.
fn balloon_thread_nice() -> Vec<Option<i32>> {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.trim() == "virtio-balloon")
        })
        .map(|t| {
            let tid = t.file_name().to_string_lossy().parse().ok()?;
            vmm::proc_stats::thread_nice(tid)
        })
        .collect()
}

fn inflate_deflate(name: &str, device_threads: bool) {
    if !kvm_or_skip(name) {
        return;
    }
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (mut c, console) = balloon_driver_config("256M", 1, Backing::Anon);
    c.device_threads = device_threads;
    let (vm, _) = start_balloon_driver(c, &console);
    let want = if device_threads {
        NotifyPath::DeviceThread
    } else {
        NotifyPath::Vcpu
    };
    assert_eq!(vm.balloon_notify_path(), want);
    let dev = vm.balloon().expect("balloon configured").clone();
    let before = vm.balloon_notify_times().expect("timing block");
    let st0 = vm.balloon_driver_status().expect("status");
    let (_, backstops0) = vm.idle_waits();
    let vcpu_notifies0 = dev.lock().notifies();
    let thread0 = vm.balloon_thread_notifies();

    vm.set_balloon_target(u32::try_from(PAGES).expect("fits"))
        .expect("balloon target");
    let (st, ok) = vm
        .wait_balloon_driver(GUEST_TIMEOUT, |s| s.pages == PAGES)
        .expect("status");
    assert!(ok, "inflate did not finish: {st:?} {:?}", vm.outcomes());
    vm.set_balloon_target(0).expect("balloon target");
    let (st, ok) = vm
        .wait_balloon_driver(GUEST_TIMEOUT, |s| s.pages == 0 && s.reverified == PAGES)
        .expect("status");
    assert!(ok, "deflate did not finish: {st:?} {:?}", vm.outcomes());
    assert_eq!((st.bad_words, st.error), (0, None), "{st:?}");

    let c = dev.counters();
    assert_eq!((c.pages_inflated, c.errors), (PAGES, 0));
    assert_eq!(dev.lock().errors(), 0, "{:?}", dev.lock().recent_errors());
    let after = vm.balloon_notify_times().expect("timing block");
    // MAX_PFNS per request each way.
    let sent = (after[0].count - before[0].count) + (after[1].count - before[1].count);
    assert_eq!(sent, 2 * PAGES / MAX_PFNS, "{before:?} {after:?}");
    assert!(after[0].since(before[0].count).iter().all(|&c| c > 0));
    assert!(after[0].max_cycles > 0);
    // Every notify ran the device once, on either path.
    let served = dev.lock().notifies() - vcpu_notifies0;
    assert_eq!(served, sent, "notifies served by the transport");
    let on_thread = vm.balloon_thread_notifies() - thread0;
    assert_eq!(on_thread, if device_threads { sent } else { 0 });
    // The driver waits for the device in the VMM (OP_IDLE) instead of
    // spinning, and the device wakes it when it returns the buffer: no
    // wait ends on the backstop (without the wake-up each would). On the
    // vCPU path the buffer is back when the notify write returns.
    let backstops = vm.idle_waits().1 - backstops0;
    if device_threads {
        // Its releases yield the CPU to vCPUs and fault handlers.
        assert_eq!(
            balloon_thread_nice(),
            vec![Some(vmm::devices::virtio::balloon::THREAD_NICE)]
        );
        assert!(st.send_waits > st0.send_waits, "{st0:?} {st:?}");
        assert!(
            backstops < sent,
            "{backstops} waits of {sent} requests ended on the backstop: the device did not wake the driver"
        );
    } else {
        assert_eq!(st.send_waits, st0.send_waits, "{st:?}");
    }
    drop(dev);
    destroy_and_check(vm);
}

#[test]
fn guest_notifies_run_on_the_device_thread() {
    inflate_deflate("guest_notifies_run_on_the_device_thread", true);
}

#[test]
fn guest_notifies_fall_back_to_the_vcpu() {
    inflate_deflate("guest_notifies_fall_back_to_the_vcpu", false);
}
