//! The API's bodies, typed: Firecracker's models (its public OpenAPI file,
//! `src/firecracker/swagger/firecracker.yaml`, is the reference for names,
//! types and which fields are required) and our own [`MemoryInfo`].
//!
//! Invariants: every body is parsed into one of these types or refused
//! (unknown fields are refused, as Firecracker does, so a misspelt field
//! cannot be silently ignored); every answer is serialized from one of them,
//! never assembled by hand.

use serde::{Deserialize, Serialize};

/// `{"fault_message": ...}`, the body of every 4xx/5xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// What went wrong and what to do.
    pub fault_message: String,
}

/// `GET /`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// Application name.
    pub app_name: String,
    /// Instance ID.
    pub id: String,
    /// `Not started`, `Running` or `Paused`.
    pub state: InstanceState,
    /// Monitor version.
    pub vmm_version: String,
}

/// The instance's life-cycle state as Firecracker names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    /// Configurable; no VM yet.
    #[serde(rename = "Not started")]
    NotStarted,
    /// vCPUs running.
    Running,
    /// vCPUs paused.
    Paused,
}

/// `GET /version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// Named as Firecracker names it, so its clients find it; our version.
    pub firecracker_version: String,
}

/// Guest RAM backing pages (`huge_pages`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum HugePages {
    /// 4 KiB pages.
    #[default]
    None,
    /// Transparent huge pages (`MADV_HUGEPAGE`).
    Transparent,
    /// hugetlbfs 2 MiB pages.
    #[serde(rename = "2M")]
    Size2M,
}

/// `GET|PUT /machine-config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// vCPUs, 1..=32.
    pub vcpu_count: u8,
    /// Guest RAM, MiB.
    pub mem_size_mib: u64,
    /// SMT: only `false` is supported.
    #[serde(default)]
    pub smt: bool,
    /// Dirty page tracking: only `false` is supported.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Backing pages.
    #[serde(default)]
    pub huge_pages: HugePages,
    /// CPU templates: only `None` (or absent) is supported. Like
    /// Firecracker, an answer leaves out the `None` template.
    #[serde(default, skip_serializing_if = "no_cpu_template")]
    pub cpu_template: Option<String>,
}

/// Whether `t` stands for no CPU template (absent or `"None"`), which
/// Firecracker's `GET /machine-config` leaves out.
fn no_cpu_template(t: &Option<String>) -> bool {
    t.as_deref().is_none_or(|t| t == "None")
}

impl Default for MachineConfig {
    /// Firecracker's defaults: 1 vCPU, 128 MiB.
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            huge_pages: HugePages::None,
            cpu_template: None,
        }
    }
}

/// `PATCH /machine-config`: the fields given replace the current ones.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    /// vCPUs.
    pub vcpu_count: Option<u8>,
    /// Guest RAM, MiB.
    pub mem_size_mib: Option<u64>,
    /// SMT.
    pub smt: Option<bool>,
    /// Dirty page tracking.
    pub track_dirty_pages: Option<bool>,
    /// Backing pages.
    pub huge_pages: Option<HugePages>,
    /// CPU template.
    pub cpu_template: Option<String>,
}

impl MachineConfigUpdate {
    /// Names no field (`{}`): Firecracker refuses it ("Empty PATCH request.").
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

impl MachineConfig {
    /// `self` with `u`'s fields applied.
    pub fn updated(&self, u: &MachineConfigUpdate) -> Self {
        Self {
            vcpu_count: u.vcpu_count.unwrap_or(self.vcpu_count),
            mem_size_mib: u.mem_size_mib.unwrap_or(self.mem_size_mib),
            smt: u.smt.unwrap_or(self.smt),
            track_dirty_pages: u.track_dirty_pages.unwrap_or(self.track_dirty_pages),
            huge_pages: u.huge_pages.unwrap_or(self.huge_pages),
            cpu_template: u.cpu_template.clone().or_else(|| self.cpu_template.clone()),
        }
    }
}

/// `PUT /boot-source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Kernel (ELF vmlinux with a PVH note, or bzImage).
    pub kernel_image_path: String,
    /// Initramfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// `PUT|GET /balloon`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Balloon {
    /// Target size, MiB.
    pub amount_mib: u32,
    /// Offer `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`.
    pub deflate_on_oom: bool,
    /// Seconds between statistics requests; 0 disables statistics.
    #[serde(default)]
    pub stats_polling_interval_s: u16,
    /// Offer `VIRTIO_BALLOON_F_FREE_PAGE_HINT` (refused: not supported).
    #[serde(default)]
    pub free_page_hinting: bool,
    /// Offer `VIRTIO_BALLOON_F_REPORTING`.
    #[serde(default)]
    pub free_page_reporting: bool,
}

/// `PATCH /balloon`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    /// New target, MiB.
    pub amount_mib: u32,
}

/// `PATCH /balloon/statistics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    /// New interval, s (statistics cannot be switched on or off after boot).
    pub stats_polling_interval_s: u16,
}

/// `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceAction {
    /// The action.
    pub action_type: ActionType,
}

/// Firecracker's actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Boot the configured VM.
    InstanceStart,
    /// Ask the guest to stop (the i8042 sequence for Linux).
    SendCtrlAltDel,
    /// Write the metrics file now.
    FlushMetrics,
}

/// `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStateUpdate {
    /// `Paused` or `Resumed`.
    pub state: VmState,
}

/// Target states of `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// Stop the vCPUs.
    Paused,
    /// Run them again.
    Resumed,
}

/// `PUT /metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// File or named pipe the JSON metrics are appended to.
    pub metrics_path: String,
}

/// `PUT /logger`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    /// Where the log goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    /// `Error`, `Warning`, `Info`, `Debug`, `Trace` or `Off` (any case).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    /// Print the level.
    #[serde(default)]
    pub show_level: bool,
    /// Print the origin.
    #[serde(default)]
    pub show_log_origin: bool,
    /// Module filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `GET /vm/config`, and the `--config-file` format.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfigFile {
    /// The kernel; absent: the embedded guest.
    #[serde(
        rename = "boot-source",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub boot_source: Option<BootSource>,
    /// vCPUs and RAM.
    #[serde(rename = "machine-config", default)]
    pub machine_config: MachineConfig,
    /// The balloon, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<Balloon>,
    /// Metrics output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    /// Log output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<Logger>,
    /// Firecracker requires this key; we have no block devices and accept
    /// only an empty list. Always written (as Firecracker's `GET
    /// /vm/config` does), so the answer is a valid Firecracker config file.
    #[serde(default)]
    pub drives: Vec<serde_json::Value>,
}

/// `GET /memory`: what only this monitor knows about guest memory.
pub use crate::vstate::memory::MemoryReport as MemoryInfo;

/// Firecracker's `BalloonStats` (`GET /balloon/statistics`): the device's
/// target and actual size, and the guest's own figures from the
/// statistics queue (absent until the guest sent them; a tag the guest
/// did not send stays absent).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStats {
    /// Pages the device asks the guest for.
    pub target_pages: u32,
    /// Pages the guest says it gave.
    pub actual_pages: u32,
    /// `target_pages` in MiB.
    pub target_mib: u32,
    /// `actual_pages` in MiB.
    pub actual_mib: u32,
    /// Bytes swapped in (`VIRTIO_BALLOON_S_SWAP_IN`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub swap_in: Option<u64>,
    /// Bytes swapped out.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub swap_out: Option<u64>,
    /// Major page faults.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub major_faults: Option<u64>,
    /// Minor page faults.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub minor_faults: Option<u64>,
    /// Free memory, bytes.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub free_memory: Option<u64>,
    /// Total memory, bytes.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub total_memory: Option<u64>,
    /// Available memory, bytes.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub available_memory: Option<u64>,
    /// Disk caches, bytes.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub disk_caches: Option<u64>,
    /// Successful hugetlb allocations.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub hugetlb_allocations: Option<u64>,
    /// Failed hugetlb allocations.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub hugetlb_failures: Option<u64>,
    /// OOM killer invocations.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub oom_kill: Option<u64>,
    /// Allocation stalls.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub alloc_stall: Option<u64>,
    /// Memory scanned asynchronously.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub async_scan: Option<u64>,
    /// Memory scanned directly.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub direct_scan: Option<u64>,
    /// Memory reclaimed asynchronously.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub async_reclaim: Option<u64>,
    /// Memory reclaimed directly.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub direct_reclaim: Option<u64>,
}

impl BalloonStats {
    /// What `dev` holds now: its target and actual sizes and the guest's
    /// last statistics buffer.
    pub fn of(dev: &crate::devices::virtio::balloon::Balloon) -> Self {
        let guest = dev
            .last_stats()
            .unwrap_or_default()
            .iter()
            .map(|s| (s.tag, s.val));
        Self::new(dev.target_pages(), dev.actual_pages(), guest)
    }

    /// From the device's sizes and the guest's `(tag, value)` pairs
    /// (virtio 1.2 §5.5.6.3 tags 0..=15; unknown tags are ignored, a
    /// repeated tag keeps its last value).
    pub fn new(
        target_pages: u32,
        actual_pages: u32,
        guest: impl IntoIterator<Item = (u16, u64)>,
    ) -> Self {
        let mut s = Self {
            target_pages,
            actual_pages,
            target_mib: target_pages >> 8,
            actual_mib: actual_pages >> 8,
            ..Self::default()
        };
        for (tag, val) in guest {
            let slot = match tag {
                0 => &mut s.swap_in,
                1 => &mut s.swap_out,
                2 => &mut s.major_faults,
                3 => &mut s.minor_faults,
                4 => &mut s.free_memory,
                5 => &mut s.total_memory,
                6 => &mut s.available_memory,
                7 => &mut s.disk_caches,
                8 => &mut s.hugetlb_allocations,
                9 => &mut s.hugetlb_failures,
                10 => &mut s.oom_kill,
                11 => &mut s.alloc_stall,
                12 => &mut s.async_scan,
                13 => &mut s.direct_scan,
                14 => &mut s.async_reclaim,
                15 => &mut s.direct_reclaim,
                _ => continue,
            };
            *slot = Some(val);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balloon_stats_map_tags_to_firecracker_fields() {
        let s = BalloonStats::new(
            8192,
            4096,
            [(4, 100 << 20), (5, 256 << 20), (99, 1), (4, 7)],
        );
        assert_eq!((s.target_mib, s.actual_mib), (32, 16));
        assert_eq!(s.free_memory, Some(7));
        assert_eq!(s.total_memory, Some(256 << 20));
        assert_eq!(s.swap_in, None);
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["actual_pages"], 4096);
        assert!(
            v.get("swap_in").is_none(),
            "absent figures are left out: {v}"
        );
    }

    #[test]
    fn names_and_defaults_follow_firecracker() {
        let m: MachineConfig =
            serde_json::from_str(r#"{"vcpu_count": 2, "mem_size_mib": 256, "huge_pages": "2M"}"#)
                .unwrap();
        assert_eq!(m.huge_pages, HugePages::Size2M);
        assert!(!m.smt);
        let s = serde_json::to_value(InstanceInfo {
            app_name: "vmm".into(),
            id: "x".into(),
            state: InstanceState::NotStarted,
            vmm_version: "0".into(),
        })
        .unwrap();
        assert_eq!(s["state"], "Not started");
        let a: InstanceAction =
            serde_json::from_str(r#"{"action_type": "SendCtrlAltDel"}"#).unwrap();
        assert_eq!(a.action_type, ActionType::SendCtrlAltDel);
        let f: VmConfigFile = serde_json::from_str(
            r#"{"boot-source": {"kernel_image_path": "k"}, "machine-config": {"vcpu_count": 1, "mem_size_mib": 64}, "drives": []}"#,
        )
        .unwrap();
        assert_eq!(f.machine_config.mem_size_mib, 64);
    }

    #[test]
    fn unknown_fields_and_bad_enums_are_refused() {
        assert!(serde_json::from_str::<BalloonUpdate>(r#"{"amount_mb": 1}"#).is_err());
        assert!(serde_json::from_str::<MachineConfig>(
            r#"{"vcpu_count": 1, "mem_size_mib": 1, "huge_pages": "1G"}"#
        )
        .is_err());
        assert!(serde_json::from_str::<VmStateUpdate>(r#"{"state": "Stopped"}"#).is_err());
        assert!(serde_json::from_str::<BalloonUpdate>(r#"{"amount_mib": -1}"#).is_err());
    }

    #[test]
    fn answers_look_like_firecracker_s() {
        // No `cpu_template` for the `None` template; `drives` always there.
        let m: MachineConfig = serde_json::from_str(
            r#"{"vcpu_count": 1, "mem_size_mib": 64, "cpu_template": "None"}"#,
        )
        .unwrap();
        assert!(serde_json::to_value(&m)
            .unwrap()
            .get("cpu_template")
            .is_none());
        let v = serde_json::to_value(VmConfigFile::default()).unwrap();
        assert_eq!(v["drives"], serde_json::json!([]));
        assert!(MachineConfigUpdate::default().is_empty());
    }

    #[test]
    fn machine_config_patch_keeps_what_it_does_not_name() {
        let m = MachineConfig::default().updated(&MachineConfigUpdate {
            mem_size_mib: Some(512),
            ..Default::default()
        });
        assert_eq!((m.vcpu_count, m.mem_size_mib), (1, 512));
    }
}
