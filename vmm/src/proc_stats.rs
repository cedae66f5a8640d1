//! The `/proc` figures this workspace reads, in one place: process memory
//! (`VmRSS`, `VmHWM`, smaps totals) of this or another process, host memory
//! (`/proc/meminfo`, huge pages), and what the benchmark reports say about
//! the machine (CPU, kernel, load). The monitor, the tools and the tests
//! all read `/proc` through here.
//!
//! Every reader returns `None` (or zero / empty, where documented) when the
//! file or field is missing: these figures are evidence and context, never
//! needed to run a VM.

use std::path::Path;

/// Resident set figures in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Rss {
    /// `VmRSS`: resident now (anonymous + file + shmem).
    pub rss: u64,
    /// `VmHWM`: peak resident.
    pub peak: u64,
}

/// The value of the `key:` line of a `/proc` file of `kB` figures, in
/// bytes (`/proc/meminfo`, `/proc/PID/status`, `/proc/self/smaps_rollup`).
/// `key` is given with its colon, e.g. `"VmRSS:"`.
pub fn kib_field(path: impl AsRef<Path>, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    parse_kib(&text, key)
}

/// The `key:` line of `text` in bytes (a count in kB, or a bare number for
/// fields such as `HugePages_Free:` is returned as it is).
fn parse_kib(text: &str, key: &str) -> Option<u64> {
    let rest = text.lines().find_map(|l| l.strip_prefix(key))?;
    let mut words = rest.split_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    Some(match words.next() {
        Some("kB") => n * 1024,
        _ => n,
    })
}

/// This process's `VmRSS` and `VmHWM`; zeros if /proc is unavailable.
pub fn rss() -> Rss {
    let Ok(text) = std::fs::read_to_string("/proc/self/status") else {
        return Rss::default();
    };
    Rss {
        rss: parse_kib(&text, "VmRSS:").unwrap_or(0),
        peak: parse_kib(&text, "VmHWM:").unwrap_or(0),
    }
}

/// `VmRSS` of process `pid` in bytes; `None` once it is gone.
pub fn rss_of(pid: u32) -> Option<u64> {
    kib_field(format!("/proc/{pid}/status"), "VmRSS:")
}

/// Resets the peak (`VmHWM`) to the current RSS (writes 5 to
/// `/proc/self/clear_refs`); false if the kernel refused.
pub fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// A `/proc/self/smaps_rollup` total in bytes, e.g. `"AnonHugePages:"`.
pub fn smaps_rollup(key: &str) -> Option<u64> {
    kib_field("/proc/self/smaps_rollup", key)
}

/// A `/proc/meminfo` line in bytes, e.g. `"MemTotal:"`, `"Shmem:"`,
/// `"Unevictable:"` (a bare count for the `HugePages_*` lines).
pub fn meminfo(key: &str) -> Option<u64> {
    kib_field("/proc/meminfo", key)
}

/// Free 2 MiB huge pages of the host (0 if unknown).
pub fn free_huge_pages() -> u64 {
    meminfo("HugePages_Free:").unwrap_or(0)
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// `vm.nr_hugepages`: the size of the default huge page pool.
pub fn nr_hugepages() -> Option<u64> {
    std::fs::read_to_string(NR_HUGEPAGES)
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Sets `vm.nr_hugepages` (root only).
pub fn set_nr_hugepages(pages: u64) -> std::io::Result<()> {
    std::fs::write(NR_HUGEPAGES, pages.to_string())
}

/// The fields of the `stat` file at `path` from field 3 on (index 0 is
/// field 3 of proc(5)), or `None` if it cannot be read.
fn stat_fields(path: &str) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(path).ok()?;
    Some(
        split_stat(&stat)?
            .1
            .into_iter()
            .map(str::to_string)
            .collect(),
    )
}

/// The command name (field 2, without its parentheses) and the fields
/// from field 3 on of a `stat` line.
fn split_stat(stat: &str) -> Option<(&str, Vec<&str>)> {
    // The command name may hold spaces and ')': it ends at the last ')'.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?;
    Some((comm, stat.get(close + 1..)?.split_whitespace().collect()))
}

/// Who a process is, from `/proc/PID/stat`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessId {
    /// Its command name (field 2).
    pub comm: String,
    /// Its state letter (field 3): `R`, `S`, `Z` for a zombie, ...
    pub state: char,
    /// Its parent's pid (field 4).
    pub ppid: u32,
    /// When it started, in clock ticks after boot (field 22): with the
    /// pid, it names one process even once the pid is reused.
    pub start_ticks: u64,
}

impl ProcessId {
    /// Whether this is a zombie waiting for its reaper.
    pub fn is_zombie(&self) -> bool {
        self.state == 'Z'
    }
}

/// Process `pid` as `/proc/PID/stat` shows it now; `None` once it is gone.
pub fn process(pid: u32) -> Option<ProcessId> {
    parse_process_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_process_stat(stat: &str) -> Option<ProcessId> {
    let (comm, f) = split_stat(stat)?;
    let field = |n: usize| f.get(n - 3).copied();
    Some(ProcessId {
        comm: comm.to_string(),
        state: field(3)?.chars().next()?,
        ppid: field(4)?.parse().ok()?,
        start_ticks: field(22)?.parse().ok()?,
    })
}

/// Whether process `pid`, which started at `start_ticks`
/// ([`ProcessId::start_ticks`]), has ended: gone, a zombie waiting for its
/// reaper, or its pid reused by a process that started later.
pub fn is_gone(pid: u32, start_ticks: u64) -> bool {
    process(pid).is_none_or(|p| p.start_ticks != start_ticks || p.is_zombie())
}

/// Waits up to `timeout` for [`is_gone`]; whether it ended in time.
pub fn wait_gone(pid: u32, start_ticks: u64, timeout: std::time::Duration) -> bool {
    let t = std::time::Instant::now();
    while !is_gone(pid, start_ticks) {
        if t.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    true
}

/// Every process whose parent is `pid` now, with its pid. Processes that
/// end while `/proc` is read are left out.
pub fn children_of(pid: u32) -> Vec<(u32, ProcessId)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let child: u32 = e.file_name().to_str()?.parse().ok()?;
            let p = process(child)?;
            (p.ppid == pid).then_some((child, p))
        })
        .collect()
}

/// The nice value of thread `tid` of this process (`/proc/self/task/TID/stat`
/// field 19).
pub fn thread_nice(tid: u32) -> Option<i32> {
    stat_fields(&format!("/proc/self/task/{tid}/stat"))?
        .get(19 - 3)?
        .parse()
        .ok()
}

/// User + system CPU time of process `pid` so far (`/proc/PID/stat`
/// fields 14 and 15, in clock ticks), or `None` if it is gone.
pub fn cpu_time_of(pid: u32) -> Option<std::time::Duration> {
    let f = stat_fields(&format!("/proc/{pid}/stat"))?;
    ticks_as_time(cpu_ticks(&f)?)
}

/// User + system clock ticks (fields 14 and 15) of a `stat` line's fields
/// from field 3 on.
fn cpu_ticks<S: AsRef<str>>(f: &[S]) -> Option<u64> {
    let field = |n: usize| f.get(n - 3)?.as_ref().parse::<u64>().ok();
    Some(field(14)? + field(15)?)
}

/// `ticks` clock ticks as time (`None` if the tick rate cannot be read).
fn ticks_as_time(ticks: u64) -> Option<std::time::Duration> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|&h| h > 0)?;
    Some(std::time::Duration::from_nanos(
        ticks.saturating_mul(1_000_000_000 / hz),
    ))
}

/// Every thread of process `pid` now: its name (`comm`, as
/// `/proc/PID/task/TID/stat` gives it) and its user + system CPU time so
/// far, by tid. Threads that end while the directory is read are left
/// out; empty if the process is gone.
pub fn thread_cpu_times(pid: u32) -> Vec<(u32, String, std::time::Duration)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let tid = e.file_name().to_str()?.parse::<u32>().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let (name, ticks) = parse_thread_stat(&stat)?;
            Some((tid, name, ticks_as_time(ticks)?))
        })
        .collect()
}

/// A thread's `stat` line: its name (between the first `(` and the last
/// `)`: the name may hold both) and utime + stime in clock ticks.
fn parse_thread_stat(stat: &str) -> Option<(String, u64)> {
    let (name, f) = split_stat(stat)?;
    Some((name.to_string(), cpu_ticks(&f)?))
}

/// The running kernel's release (`/proc/sys/kernel/osrelease`).
pub fn kernel_release() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_string())
}

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` prints them.
pub fn loadavg() -> Option<String> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

/// What `/proc/cpuinfo` says about the CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuInfo {
    /// The first `model name`.
    pub model: Option<String>,
    /// `processor` entries.
    pub processors: usize,
    /// Whether the `hypervisor` flag is set (`None`: no `flags` line).
    pub virtualized: Option<bool>,
}

/// `/proc/cpuinfo`, summarised (empty if unreadable).
pub fn cpu_info() -> CpuInfo {
    parse_cpuinfo(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default())
}

fn parse_cpuinfo(text: &str) -> CpuInfo {
    let field = |k: &str| {
        text.lines().find_map(|l| {
            let (a, b) = l.split_once(':')?;
            (a.trim() == k).then(|| b.trim().to_string())
        })
    };
    CpuInfo {
        model: field("model name"),
        processors: text.lines().filter(|l| l.starts_with("processor")).count(),
        virtualized: field("flags").map(|f| f.split_whitespace().any(|x| x == "hypervisor")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A name with spaces and parentheses (QEMU's `CPU 0/KVM`, any
    /// `prctl` name) is read whole; a truncated line is refused.
    #[test]
    fn thread_stat_names_and_ticks() {
        let l = "4242 (CPU 0/KVM (x)) S 1 2 3 4 5 6 7 8 9 10 70 30 0 0 20 0 1 0";
        assert_eq!(parse_thread_stat(l), Some(("CPU 0/KVM (x)".into(), 100)));
        assert_eq!(parse_thread_stat("4242 (vcpu0) S 1 2 3"), None);
        assert_eq!(parse_thread_stat("no parentheses"), None);
    }

    /// A process's identity: its name whole, state, parent and start time;
    /// a line cut before field 22 is refused; this process is found with
    /// its real parent, and is not a zombie.
    #[test]
    fn process_identity() {
        let l = "77 (a b) c)) Z 5 77 77 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 123456 0";
        let p = parse_process_stat(l).expect("parsed");
        assert_eq!(
            p,
            ProcessId {
                comm: "a b) c)".into(),
                state: 'Z',
                ppid: 5,
                start_ticks: 123_456,
            }
        );
        assert!(p.is_zombie());
        assert_eq!(parse_process_stat("77 (x) S 5 77 77 0"), None);
        let me = process(std::process::id()).expect("this process");
        // SAFETY: getppid has no preconditions.
        let parent = unsafe { libc::getppid() };
        assert_eq!(i64::from(me.ppid), i64::from(parent));
        assert!(!me.is_zombie());
        assert!(children_of(me.ppid)
            .iter()
            .any(|(pid, c)| *pid == std::process::id() && c.start_ticks == me.start_ticks));
    }

    /// This process's threads are listed by name, the caller's among them.
    #[test]
    fn thread_cpu_times_lists_named_threads() {
        let h = std::thread::Builder::new()
            .name("stat-probe".into())
            .spawn(|| {
                let me = std::process::id();
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() } as u32;
                let all = thread_cpu_times(me);
                assert!(
                    all.iter().any(|(t, n, _)| *t == tid && n == "stat-probe"),
                    "{all:?}"
                );
            })
            .expect("spawn");
        h.join().expect("the probe thread");
        assert!(thread_cpu_times(u32::MAX).is_empty());
    }

    #[test]
    fn parses_kib_and_counts() {
        let t = "MemTotal:       24531328 kB\nHugePages_Free:        3\nShmem:  0 kB\n";
        assert_eq!(parse_kib(t, "MemTotal:"), Some(24_531_328 * 1024));
        assert_eq!(parse_kib(t, "HugePages_Free:"), Some(3));
        assert_eq!(parse_kib(t, "Shmem:"), Some(0));
        assert_eq!(parse_kib(t, "Missing:"), None);
        assert_eq!(parse_kib("VmRSS:\tx kB", "VmRSS:"), None);
    }

    #[test]
    fn parses_cpuinfo() {
        let t = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu hypervisor\n\
                 processor\t: 1\nmodel name\t: Some CPU\n";
        let c = parse_cpuinfo(t);
        assert_eq!(c.model.as_deref(), Some("Some CPU"));
        assert_eq!(c.processors, 2);
        assert_eq!(c.virtualized, Some(true));
        assert_eq!(parse_cpuinfo(""), CpuInfo::default());
    }

    #[test]
    fn reads_this_process() {
        let r = rss();
        assert!(r.rss > 0 && r.peak >= r.rss, "{r:?}");
        let me = rss_of(std::process::id()).expect("own status");
        assert!(me > 0);
        assert!(meminfo("MemTotal:").is_some_and(|m| m > 0));
        assert!(kernel_release().is_some_and(|k| !k.is_empty()));
    }
}
