//! Where a benchmark's threads run: pinning to one CPU, and a guard that
//! keeps the calling thread on the CPU it is on for a timed section; and
//! how much CPU the process used.
//!
//! Pinning is best effort everywhere: a refusal (a cpuset, one CPU)
//! leaves the thread where the scheduler puts it, and the measurement
//! stands, only noisier.

/// Pins the calling thread (`tid` 0) or thread `tid` to `cpu`; false if
/// the kernel refused (fewer CPUs, a cpuset).
pub(crate) fn pin(tid: libc::pid_t, cpu: usize) -> bool {
    if cpu >= libc::CPU_SETSIZE as usize {
        return false;
    }
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit of `set`; `cpu` < CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a live cpu_set_t of the size passed.
    unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0 }
}

/// Keeps the calling thread on the CPU it runs on until dropped, then
/// gives it back the CPUs it was allowed before.
///
/// For a section that touches memory and then times its release: the
/// release runs where the touch ran, with the page structures in that
/// CPU's caches, for every strategy alike (a thread that slept in between
/// otherwise wakes on either CPU, and a release on the other one took
/// 5-25 % longer on the 2-core development VM).
pub(crate) struct StayOnCpu {
    /// The affinity to restore (`None`: nothing was changed).
    before: Option<libc::cpu_set_t>,
}

impl StayOnCpu {
    /// Pins the calling thread to its current CPU (best effort).
    pub(crate) fn here() -> Self {
        // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
        let mut before: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: 0 is the calling thread; `before` is a live cpu_set_t
        // of the size passed, which the kernel fills.
        if unsafe { libc::sched_getaffinity(0, size, &mut before) } != 0 {
            return Self { before: None };
        }
        // SAFETY: sched_getcpu has no preconditions.
        let pinned = usize::try_from(unsafe { libc::sched_getcpu() }).is_ok_and(|cpu| pin(0, cpu));
        Self {
            before: pinned.then_some(before),
        }
    }
}

impl Drop for StayOnCpu {
    fn drop(&mut self) {
        if let Some(set) = self.before.take() {
            // SAFETY: `set` is the calling thread's own earlier affinity,
            // a live cpu_set_t of the size passed.
            let _ =
                unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
        }
    }
}

/// User + system CPU time of this process (all threads, finished ones
/// included).
pub(crate) fn process_cpu_time() -> std::time::Duration {
    // SAFETY: getrusage writes one rusage struct, which we own.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| {
        std::time::Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + std::time::Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed() -> Vec<usize> {
        // SAFETY: as in `StayOnCpu::here`.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: 0 is the calling thread; `set` is live and of that size.
        let rc =
            unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
        assert_eq!(rc, 0, "sched_getaffinity failed");
        (0..libc::CPU_SETSIZE as usize)
            // SAFETY: `i` < CPU_SETSIZE.
            .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
            .collect()
    }

    #[test]
    fn stays_on_one_cpu_and_gives_the_others_back() {
        let before = allowed();
        {
            let _stay = StayOnCpu::here();
            let now = allowed();
            assert_eq!(now.len(), 1, "pinned to one CPU, got {now:?}");
            // SAFETY: no preconditions.
            let cpu = usize::try_from(unsafe { libc::sched_getcpu() }).unwrap();
            assert_eq!(now, vec![cpu], "pinned to the CPU it runs on");
        }
        assert_eq!(allowed(), before, "the earlier affinity is restored");
    }
}
