//! Process memory figures from `/proc/self/status` (resident set size now and
//! at its peak), used to prove that teardown gives guest RAM back.

/// Resident set figures in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Rss {
    /// `VmRSS`: resident now (anonymous + file + shmem).
    pub rss: u64,
    /// `VmHWM`: peak resident.
    pub peak: u64,
}

/// Reads `VmRSS` and `VmHWM`; zeros if /proc is unavailable.
pub fn rss() -> Rss {
    let Ok(text) = std::fs::read_to_string("/proc/self/status") else {
        return Rss::default();
    };
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    Rss {
        rss: field("VmRSS:"),
        peak: field("VmHWM:"),
    }
}

/// Resets the peak (`VmHWM`) to the current RSS (writes 5 to
/// `/proc/self/clear_refs`); false if the kernel refused.
pub fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}
