//! Child processes the benches measure: peers (QEMU, Firecracker) and our
//! own `vmm` binary, started, waited for with their exit time stamped,
//! killed if the bench gives up on them; QMP for QEMU; small `/proc` and
//! environment look-ups the reports share.
//!
//! Invariant: no child outlives its [`Waited`] (dropped unreaped = killed),
//! so a failing bench never leaves a populated VM behind; nor the thread
//! that spawned it ([`vmm::child::die_with_parent`]), so neither does a
//! bench killed outright, which runs no `Drop`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::units::human_bytes;

/// Where a command is: as given if it has a '/', else the first match in
/// PATH.
pub(crate) fn which(cmd: &str) -> Option<PathBuf> {
    if cmd.contains('/') {
        let p = PathBuf::from(cmd);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
}

/// A fresh socket path in the temporary directory.
pub(crate) fn sock_path(what: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("gmm-{what}-{}-{n}.sock", std::process::id()))
}

/// Removes a socket file on drop.
pub(crate) struct SockFile(pub(crate) PathBuf);

impl Drop for SockFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A spawned child whose exit a thread waits for (so the exit time is
/// stamped as soon as `waitpid` returns, with no polling). Killed on drop
/// if it has not exited, so no populated peer outlives the bench.
pub(crate) struct Waited {
    pub(crate) pid: u32,
    rx: Receiver<(Instant, std::io::Result<Output>)>,
    reaped: bool,
}

impl Waited {
    pub(crate) fn spawn(cmd: Command) -> Result<Waited> {
        Ok(Self::spawn_inner(cmd, false)?.0)
    }

    /// Spawns `cmd` with stdout piped and read line by line on a thread:
    /// each line arrives stamped with when it was read. The `Output` of
    /// the exit then has no stdout.
    pub(crate) fn spawn_lines(cmd: Command) -> Result<(Waited, Lines)> {
        let (w, lines) = Self::spawn_inner(cmd, true)?;
        Ok((w, lines.context("no stdout")?))
    }

    fn spawn_inner(mut cmd: Command, lines: bool) -> Result<(Waited, Option<Lines>)> {
        if lines {
            cmd.stdout(Stdio::piped());
        }
        vmm::child::die_with_parent(&mut cmd);
        let mut child = cmd
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {:?}", cmd.get_program()))?;
        let pid = child.id();
        let mut line_rx = None;
        if let Some(out) = lines.then(|| child.stdout.take()).flatten() {
            let (tx, rx) = std::sync::mpsc::channel();
            line_rx = Some(rx);
            // Ends at EOF (the child exited and closed its stdout).
            std::thread::Builder::new()
                .name("child-stdout".into())
                .spawn(move || {
                    for l in BufReader::new(out).lines() {
                        let Ok(l) = l else { break };
                        if tx.send((Instant::now(), l)).is_err() {
                            break;
                        }
                    }
                })
                .context("spawning the stdout reader")?;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("waitpid".into())
            .spawn(move || {
                let out = child.wait_with_output();
                let _ = tx.send((Instant::now(), out));
            });
        let w = Waited {
            pid,
            rx,
            reaped: false,
        };
        // Without a waiter, `w` is dropped here and kills the child.
        spawned.context("spawning the waiter thread")?;
        Ok((w, line_rx))
    }

    /// The exit, if it has already happened.
    pub(crate) fn exited(&mut self) -> Option<Output> {
        match self.rx.try_recv() {
            Ok((_, out)) => {
                self.reaped = true;
                Some(out.unwrap_or_else(|e| Output {
                    status: std::os::unix::process::ExitStatusExt::from_raw(-1),
                    stdout: Vec::new(),
                    stderr: e.to_string().into_bytes(),
                }))
            }
            Err(_) => None,
        }
    }

    /// Waits up to `timeout` for the exit: (when waitpid returned, output).
    pub(crate) fn wait(&mut self, timeout: Duration) -> Result<(Instant, Output)> {
        match self.rx.recv_timeout(timeout) {
            Ok((t, out)) => {
                self.reaped = true;
                Ok((t, out.context("waiting for the child")?))
            }
            Err(RecvTimeoutError::Timeout) => bail!(
                "pid {} did not exit within {} s (killed)",
                self.pid,
                timeout.as_secs()
            ),
            Err(RecvTimeoutError::Disconnected) => bail!("the waiter thread died"),
        }
    }
}

impl Drop for Waited {
    fn drop(&mut self) {
        if self.reaped || self.rx.try_recv().is_ok() {
            return;
        }
        if let Ok(pid) = libc::pid_t::try_from(self.pid) {
            // SAFETY: signalling our own child, which has not been reaped
            // (its waiter has not reported), so the pid is still ours.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// The last lines of a child's output, for error messages.
pub(crate) fn tail(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

/// A child's stdout, line by line, each stamped with when it was read.
pub(crate) type Lines = Receiver<(Instant, String)>;

/// Whether something listens on the Unix socket at `path` (the file alone
/// is not enough: it appears at `bind`, before `listen`).
pub(crate) fn listening(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}

/// Waits until the child `w` listens on `sock` (fails if it exits first or
/// `deadline` passes).
pub(crate) fn wait_listening(
    w: &mut Waited,
    sock: &Path,
    deadline: Instant,
    who: &str,
) -> Result<()> {
    while !listening(sock) {
        if let Some(o) = w.exited() {
            bail!("{who} exited early ({}): {}", o.status, tail(&o.stderr));
        }
        if Instant::now() > deadline {
            bail!("{who} did not listen on {} in time", sock.display());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(())
}

/// A QMP connection.
pub(crate) struct Qmp {
    r: BufReader<UnixStream>,
}

impl Qmp {
    pub(crate) fn connect(path: &Path) -> std::io::Result<Qmp> {
        let s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        Ok(Qmp {
            r: BufReader::new(s),
        })
    }

    pub(crate) fn line(&mut self) -> Result<String> {
        let mut l = String::new();
        if self.r.read_line(&mut l).context("reading QMP")? == 0 {
            bail!("QMP connection closed");
        }
        Ok(l)
    }

    /// Sends one command line in one write (QEMU acts on a complete JSON
    /// object at once: after `quit`, a second write would find the socket
    /// closed).
    pub(crate) fn send(&mut self, cmd: &str) -> Result<()> {
        self.r.get_mut().write_all(format!("{cmd}\n").as_bytes())?;
        Ok(())
    }

    /// Sends `cmd` and reads until its `return` (skipping events): the
    /// answer's line.
    pub(crate) fn execute(&mut self, cmd: &str) -> Result<String> {
        self.send(cmd)?;
        loop {
            let l = self.line()?;
            if l.contains("\"return\"") {
                return Ok(l);
            }
            if l.contains("\"error\"") {
                bail!("QMP refused {cmd}: {}", l.trim());
            }
        }
    }
}

/// Connects to the QMP socket the child creates and negotiates
/// capabilities (answered only once QEMU runs its main loop, i.e. after
/// the RAM was preallocated).
pub(crate) fn qmp_ready(w: &mut Waited, sock: &Path, deadline: Instant) -> Result<Qmp> {
    loop {
        if let Some(o) = w.exited() {
            bail!("QEMU exited early ({}): {}", o.status, tail(&o.stderr));
        }
        if let Ok(mut q) = Qmp::connect(sock) {
            let greet = q.line()?;
            if !greet.contains("QMP") {
                bail!("unexpected QMP greeting {:?}", greet.trim());
            }
            q.execute("{\"execute\":\"qmp_capabilities\"}")?;
            return Ok(q);
        }
        if Instant::now() > deadline {
            bail!("QEMU did not open its QMP socket in time");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until the RSS of `pid` reaches `size` (or `deadline`).
pub(crate) fn wait_rss(pid: u32, size: u64, deadline: Instant, who: &str) -> Result<u64> {
    loop {
        let rss = rss_of(pid);
        if rss >= size {
            return Ok(rss);
        }
        if Instant::now() > deadline {
            bail!(
                "{who}'s RSS reached only {} of {}: not populated in time",
                human_bytes(rss),
                human_bytes(size)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// VmRSS of another process, bytes (0 if it is gone).
pub(crate) fn rss_of(pid: u32) -> u64 {
    vmm::proc_stats::rss_of(pid).unwrap_or(0)
}

/// The `vmm` binary next to this executable.
pub(crate) fn vmm_binary() -> Result<PathBuf> {
    let p = std::env::current_exe()
        .context("locating the gmm executable")?
        .with_file_name("vmm");
    if !p.is_file() {
        bail!(
            "the vmm binary is not at {} (next to gmm): build it with \
             `cargo build --release -p vmm`, or pass --no-process",
            p.display()
        );
    }
    Ok(p)
}

pub(crate) fn kernel() -> String {
    vmm::proc_stats::kernel_release().unwrap_or_default()
}

pub(crate) fn kvm_modules() -> Vec<String> {
    ["kvm_intel", "kvm_amd", "kvm_pvm"]
        .iter()
        .filter(|m| Path::new("/sys/module").join(m).exists())
        .map(|m| (*m).to_string())
        .collect()
}

/// A `vmm --api-sock --populate` process, configured and started through
/// its API and populated (its RSS reached its RAM size).
pub(crate) struct ServiceVm {
    pub(crate) w: Waited,
    pub(crate) sock: SockFile,
}

/// What [`start_service_vm`] asks the service for: one vCPU, `mem` bytes of
/// RAM (THP if `huge`) and a balloon at 0 (the default guest waits for a
/// target once it verified its RAM, instead of ending the VM), with its
/// statistics polled every `stats_polling_s` seconds (0: off).
pub(crate) struct ServiceSpec<'a> {
    pub(crate) vmm: &'a Path,
    /// Socket name tag (see [`sock_path`]).
    pub(crate) tag: &'a str,
    pub(crate) mem: u64,
    pub(crate) huge: bool,
    pub(crate) stats_polling_s: u32,
    /// Who it is, in errors.
    pub(crate) who: &'a str,
}

/// Starts the service VM of `spec`; fails if it is not listening and
/// populated by `deadline`.
pub(crate) fn start_service_vm(spec: &ServiceSpec<'_>, deadline: Instant) -> Result<ServiceVm> {
    let sock = SockFile(sock_path(spec.tag));
    let _ = std::fs::remove_file(&sock.0);
    let mut cmd = Command::new(spec.vmm);
    cmd.arg("--api-sock")
        .arg(&sock.0)
        .arg("--populate")
        .stdout(Stdio::null());
    let mut w = Waited::spawn(cmd)?;
    let who = spec.who;
    wait_listening(&mut w, &sock.0, deadline, who)?;
    let put = |uri: &str, body: serde_json::Value| {
        vmm::api::call(&sock.0, "PUT", uri, Some(&body))
            .with_context(|| format!("{who}: PUT {uri}"))
    };
    put(
        "/machine-config",
        serde_json::json!({"vcpu_count": 1, "mem_size_mib": spec.mem >> 20,
               "huge_pages": if spec.huge { "Transparent" } else { "None" }}),
    )?;
    put(
        "/balloon",
        serde_json::json!({"amount_mib": 0, "deflate_on_oom": false,
               "stats_polling_interval_s": spec.stats_polling_s}),
    )?;
    // InstanceStart populates all RAM before it answers, which may take
    // longer than the client's 30 s read timeout on a loaded host: a
    // timeout is not a failure while the process lives and its RSS grows.
    if let Err(e) = put(
        "/actions",
        serde_json::json!({"action_type": "InstanceStart"}),
    ) {
        if let Some(o) = w.exited() {
            bail!(
                "{who} exited at its start ({}): {}",
                o.status,
                tail(&o.stderr)
            );
        }
        let timed_out = e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::WouldBlock)
        });
        if !timed_out {
            return Err(e);
        }
    }
    wait_rss(w.pid, spec.mem, deadline, who)?;
    Ok(ServiceVm { w, sock })
}

/// Sends SIGTERM to a child that has not exited (`who` in errors).
pub(crate) fn sigterm(w: &mut Waited, who: &str) -> Result<()> {
    signal(w, libc::SIGTERM, who)
}

/// Sends `sig` to `w`, which must not have exited yet.
pub(crate) fn signal(w: &mut Waited, sig: libc::c_int, who: &str) -> Result<()> {
    let pid = libc::pid_t::try_from(w.pid)?;
    // SAFETY: our own child, not reaped (its waiter has not reported).
    if unsafe { libc::kill(pid, sig) } != 0 {
        let why = std::io::Error::last_os_error();
        match w.exited() {
            Some(o) => bail!(
                "{who} exited before the stop ({}): {}",
                o.status,
                tail(&o.stderr)
            ),
            None => bail!("signal {sig} to {who} failed: {why}"),
        }
    }
    Ok(())
}
