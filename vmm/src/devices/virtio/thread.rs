//! The device thread: a virtio device's queue notifications, off the vCPUs.
//!
//! For each queue, [`register`] asks KVM for an `ioeventfd` on the
//! transport's `QueueNotify` register with the queue index as datamatch: a
//! guest write of that index no longer exits to the VMM's vCPU thread; KVM
//! signals the eventfd and re-enters the guest at once. One
//! [`DeviceThread`] per device sleeps in `poll` on those eventfds and a stop
//! eventfd and, for each signalled queue, runs the transport's notify
//! handler ([`MmioTransport::handle_notify`]): validate, gather, release,
//! return used buffers, all under the transport's lock as before. Queues
//! whose registration failed (no ioeventfd support, …) are logged once and
//! keep the old path: their writes exit to the vCPU, which runs the same
//! handler through the MMIO bus; any other value written to `QueueNotify`
//! (a bad queue index) also still exits and is counted there.
//!
//! **Priority.** The thread first lowers its nice value to what the VM
//! asks for (the balloon: [`super::balloon::THREAD_NICE`], so its releases
//! yield a core to any vCPU or fault handler that wants it), then installs
//! its seccomp filter and makes itself `SCHED_BATCH`.
//!
//! **Lifetime.** The thread holds the device (and through it guest memory);
//! [`DeviceThread::stop`] (also on drop) signals the stop eventfd and joins
//! it. The VM stops it after joining the vCPUs and before guest memory is
//! released, so no release or ring access of the device overlaps teardown.
//! The registrations go with the KVM VM.
//!
//! [`MmioTransport::handle_notify`]: super::mmio::MmioTransport::handle_notify

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_ioctls::{IoEventAddress, VmFd};
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::mmio::{VirtioDevice, VirtioMmio};

/// Who runs a device's queue notifications.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum NotifyPath {
    /// Every queue's notify is an ioeventfd served by the device thread.
    DeviceThread,
    /// Some queues fell back to the vCPU (their registration failed).
    Mixed,
    /// Every notify exits to the vCPU thread, which runs the device.
    Vcpu,
}

/// The eventfds of the queues KVM accepted, by queue index.
#[derive(Debug)]
pub struct Registered {
    fds: Vec<(u32, EventFd)>,
    queues: usize,
}

impl Registered {
    /// Which path notifications take.
    pub fn path(&self) -> NotifyPath {
        match self.fds.len() {
            0 => NotifyPath::Vcpu,
            n if n == self.queues => NotifyPath::DeviceThread,
            _ => NotifyPath::Mixed,
        }
    }
}

/// Registers one ioeventfd per queue (`queues` of them) on the
/// `QueueNotify` register of the virtio-mmio window at `base`. With
/// `enabled` false, or for each queue KVM refuses, nothing is registered
/// and a line says so: that queue's notifies are run on the vCPU.
pub fn register(vm: &VmFd, name: &str, base: u64, queues: usize, enabled: bool) -> Registered {
    let mut fds = Vec::new();
    if !enabled {
        eprintln!("vmm: {name}: device thread disabled: QueueNotify is handled on the vCPU thread");
        return Registered { fds, queues };
    }
    let addr = IoEventAddress::Mmio(base + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY));
    for q in (0u32..).take(queues) {
        let r = EventFd::new(EFD_NONBLOCK).and_then(|fd| {
            vm.register_ioevent(&fd, &addr, q)
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
            Ok(fd)
        });
        match r {
            Ok(fd) => fds.push((q, fd)),
            Err(e) => eprintln!(
                "vmm: {name}: ioeventfd for queue {q} refused ({e}): its QueueNotify is \
                 handled on the vCPU thread"
            ),
        }
    }
    Registered { fds, queues }
}

/// A running device thread (see the module docs).
#[derive(Debug)]
pub struct DeviceThread {
    stop: Arc<EventFd>,
    served: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl DeviceThread {
    /// Starts the thread serving `fds` for `dev` at nice value `nice` (0:
    /// as created; the balloon's is
    /// [`THREAD_NICE`](super::balloon::THREAD_NICE)); `None` if there is
    /// nothing to serve. If the thread cannot be spawned, the error is returned and
    /// the registrations stay (their notifies would be lost: the caller
    /// fails the VM).
    pub fn spawn<D: VirtioDevice + 'static>(
        name: &str,
        dev: Arc<VirtioMmio<D>>,
        reg: Registered,
        nice: i32,
    ) -> std::io::Result<Option<Self>> {
        if reg.fds.is_empty() {
            return Ok(None);
        }
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let served = Arc::new(AtomicU64::new(0));
        let (stop2, served2) = (Arc::clone(&stop), Arc::clone(&served));
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || serve(&dev, &reg.fds, &stop2, &served2, nice))?;
        Ok(Some(Self {
            stop,
            served,
            handle: Some(handle),
        }))
    }

    /// Notifications the thread has run the device for.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Stops the thread and joins it (idempotent).
    pub fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            // A failed write leaves the counter non-zero or the fd broken;
            // either way poll returns, and the loop ends on any stop event.
            let _ = self.stop.write(1);
            let _ = h.join();
        }
    }
}

impl Drop for DeviceThread {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sets the calling thread's nice value to `nice` when that lowers its
/// priority (0: leave it; raising it would need privilege). Best effort: a
/// refusal leaves the thread as it was.
fn lower_priority(nice: i32) {
    if nice <= 0 {
        return;
    }
    // SAFETY: PRIO_PROCESS with `who` 0 is the calling thread on Linux
    // (each thread has its own nice value); no memory is passed.
    let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
}

/// Makes the calling thread `SCHED_BATCH`: a wake-up of this thread never
/// preempts the running thread (CFS skips wake-up preemption for batch
/// tasks), so the vCPU whose `QueueNotify` woke it goes back to the guest
/// at once instead of waiting for the device's work on its own CPU; the
/// device still runs at the same weight, on an idle CPU or at the next
/// tick. Best effort: a refusal leaves the thread as it was.
fn batch_priority() {
    let p = libc::sched_param { sched_priority: 0 };
    // SAFETY: 0 is the calling thread; `p` is a valid sched_param.
    let _ = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &p) };
}

/// The thread's loop: poll the stop fd and the queues' eventfds; run the
/// notify handler once per signalled queue (a counter above 1 means the
/// guest notified again before we ran: one pass serves everything
/// published).
fn serve<D: VirtioDevice>(
    dev: &VirtioMmio<D>,
    fds: &[(u32, EventFd)],
    stop: &EventFd,
    served: &AtomicU64,
    nice: i32,
) {
    // Before the filter (which does not allow setpriority): nothing the
    // guest controls has been read yet.
    lower_priority(nice);
    crate::seccomp::install(crate::seccomp::ThreadKind::Device);
    batch_priority();
    let mut pfds: Vec<libc::pollfd> = std::iter::once(stop.as_raw_fd())
        .chain(fds.iter().map(|(_, f)| f.as_raw_fd()))
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let n = libc::nfds_t::try_from(pfds.len()).unwrap_or(libc::nfds_t::MAX);
    loop {
        // SAFETY: `pfds` is a live, exclusively borrowed array of `n`
        // pollfds whose descriptors stay open for the whole loop (`fds` and
        // `stop` outlive it).
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), n, -1) };
        if r < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            eprintln!(
                "vmm: device thread: poll failed ({}): stopping; notifies are lost",
                std::io::Error::last_os_error()
            );
            return;
        }
        if pfds[0].revents != 0 {
            return;
        }
        for (p, (q, fd)) in pfds[1..].iter_mut().zip(fds) {
            if p.revents & libc::POLLIN != 0 && fd.read().is_ok() {
                dev.lock().handle_notify(*q);
                served.fetch_add(1, Ordering::Relaxed);
            }
            p.revents = 0;
        }
    }
}
