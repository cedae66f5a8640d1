//! `gmm bench service`: our monitor as a service, from outside: how fast VMs
//! launch through the API, and what idle VMs cost.
//!
//! `--vms N` processes `vmm --api-sock` are started one after the other,
//! each configured through Firecracker's API (1 vCPU, `--mem`, a balloon at
//! 0 so the default guest's driver waits for a target) and started with
//! `InstanceStart`:
//! - **launch**: process spawn → API socket up → `InstanceStart` answered
//!   (`launch_ms`, per VM), and the monitor's own figures from its log:
//!   `InstanceStart` received → first `KVM_RUN` (`monitor_setup_ms`) and →
//!   the guest's first report from ring 3 (`first_guest_report_ms`);
//!   `launches_per_s` is N over the whole sequence;
//! - **idle**: once all run and their guests wait (a settle second), every
//!   process's user + system CPU time is sampled over `--seconds`
//!   (`/proc/PID/stat`): `idle_cpu_pct_per_vm` (mean, % of one core) and
//!   `idle_cpu_pct_max_vm`. Then SIGTERM ends them all; each must exit 0.
//!
//! No baseline of another monitor here: Firecracker cannot boot without a
//! kernel, and its idle cost is that of its Linux guest (`bench linux`).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::peer::{sock_path, tail, vmm_binary, wait_listening, SockFile, Waited};
use crate::rng::{median, ms, round};
use crate::schema::ServiceResult;
use crate::units::{human_bytes, parse_size};
use crate::{emit_json, say};

/// Options of `gmm bench service`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// How many VMs.
    #[arg(long, default_value_t = 4)]
    pub vms: usize,
    /// Guest RAM of each.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub mem: u64,
    /// Length of the idle window (CPU time is counted in clock ticks, 10 ms
    /// here: the resolution is 1 tick over the window).
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

struct Running {
    child: Waited,
    _sock: SockFile,
}

fn launch(vmm: &Path, mem: u64) -> Result<(Running, f64)> {
    let sock = SockFile(sock_path("svcbench"));
    let _ = std::fs::remove_file(&sock.0);
    let t = Instant::now();
    let mut cmd = Command::new(vmm);
    cmd.arg("--api-sock").arg(&sock.0).stdout(Stdio::null());
    let mut child = Waited::spawn(cmd)?;
    wait_listening(&mut child, &sock.0, t + Duration::from_secs(10), "vmm")?;
    let put = |uri: &str, body: serde_json::Value| {
        vmm::api::call(&sock.0, "PUT", uri, Some(&body)).with_context(|| format!("PUT {uri}"))
    };
    put(
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": mem >> 20}),
    )?;
    put(
        "/balloon",
        json!({"amount_mib": 0, "deflate_on_oom": false}),
    )?;
    put("/actions", json!({"action_type": "InstanceStart"}))?;
    let took = ms(t.elapsed());
    Ok((Running { child, _sock: sock }, took))
}

fn field(stderr: &str, key: &str) -> Option<f64> {
    stderr
        .lines()
        .find_map(|l| l.split(&format!("{key}=")).nth(1))
        .and_then(|v| v.trim().parse().ok())
}

/// Run the command.
pub fn cmd(a: &Args) -> Result<()> {
    let vmm = vmm_binary()?;
    if a.vms == 0 {
        bail!("--vms must be at least 1");
    }
    say(
        a.json,
        &format!(
            "bench service: {} VMs of {}, idle window {:.1} s\n",
            a.vms,
            human_bytes(a.mem),
            a.seconds
        ),
    );
    let t0 = Instant::now();
    let mut vms = Vec::new();
    let mut launch_ms = Vec::new();
    for _ in 0..a.vms {
        let (r, took) = launch(&vmm, a.mem)?;
        vms.push(r);
        launch_ms.push(round(took, 3));
    }
    let launches_per_s = a.vms as f64 / t0.elapsed().as_secs_f64();
    // Let the guests verify their RAM and reach their idle wait.
    std::thread::sleep(Duration::from_secs(1));
    let cpu = |v: &Running| vmm::proc_stats::cpu_time_of(v.child.pid).unwrap_or_default();
    let before: Vec<Duration> = vms.iter().map(cpu).collect();
    let w = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(a.seconds));
    let window = w.elapsed().as_secs_f64();
    let pct: Vec<f64> = vms
        .iter()
        .zip(&before)
        .map(|(v, b)| round(cpu(v).saturating_sub(*b).as_secs_f64() / window * 100.0, 3))
        .collect();
    let mut setup = Vec::new();
    let mut first = Vec::new();
    let mut stop = Vec::new();
    for mut v in vms {
        let pid = libc::pid_t::try_from(v.child.pid)?;
        let t = Instant::now();
        // SAFETY: our own child, not reaped yet.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            bail!("SIGTERM failed");
        }
        let (end, out) = v.child.wait(Duration::from_secs(30))?;
        stop.push(ms(end.saturating_duration_since(t)));
        let err = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!("a VM exited with {}: {}", out.status, tail(&out.stderr));
        }
        setup.extend(field(&err, "monitor_setup_ms"));
        first.extend(field(&err, "first_guest_report_ms"));
    }
    let med = |v: &[f64]| (!v.is_empty()).then(|| round(median(v), 3));
    let r = ServiceResult {
        vms: a.vms,
        mem_bytes: a.mem,
        idle_seconds: round(window, 3),
        launches_per_s: round(launches_per_s, 3),
        launch_ms_p50: round(median(&launch_ms), 3),
        launch_ms,
        monitor_setup_ms_p50: med(&setup),
        first_guest_report_ms_p50: med(&first),
        idle_cpu_pct_per_vm: round(pct.iter().sum::<f64>() / pct.len() as f64, 3),
        idle_cpu_pct_max_vm: pct.iter().copied().fold(0.0, f64::max),
        idle_cpu_pct_all: pct,
        // SAFETY: sysconf has no preconditions.
        idle_cpu_resolution_pct: round(
            100.0 / (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64) / window,
            3,
        ),
        stop_to_exit_ms_p50: round(median(&stop), 3),
    };
    say(
        a.json,
        &format!(
            "  launch (spawn -> InstanceStart answered) p50 {:.1} ms, {:.1} launches/s; \
             InstanceStart -> first KVM_RUN p50 {:?} ms, -> first guest report p50 {:?} ms\n  \
             idle: {:.3} % of a core per VM (max {:.3} %; resolution {:.3} %)\n  \
             SIGTERM -> exit p50 {:.1} ms\n",
            r.launch_ms_p50,
            r.launches_per_s,
            r.monitor_setup_ms_p50,
            r.first_guest_report_ms_p50,
            r.idle_cpu_pct_per_vm,
            r.idle_cpu_pct_max_vm,
            r.idle_cpu_resolution_pct,
            r.stop_to_exit_ms_p50
        ),
    );
    emit_json(a.json, &r)
}
