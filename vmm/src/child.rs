//! Child processes started by the tools and the tests around the monitor
//! (`vmm` binaries, QEMU, Firecracker): tied to the life of the thread
//! that starts them.
//!
//! Invariant: a child started through [`die_with_parent`] never outlives
//! the thread that spawned it, however that thread's process ends: a
//! process killed outright (`SIGKILL`, a CI timeout, the terminal closed)
//! runs no `Drop`, so only the kernel can stop what it started.

use std::os::unix::process::CommandExt as _;
use std::process::Command;

use guest_mm::mutation::{broken, Rule};

/// Makes the child of `cmd` get `SIGKILL` when the thread that spawns it
/// exits (`PR_SET_PDEATHSIG`). Without this, the VMs and peers of a killed
/// bench or test run would keep running, holding their memory and their
/// vCPUs' CPU time, and skew every measurement made after them. Spawn
/// only from a thread that outlives the child (a bench's main thread, a
/// test's own thread, which waits for or kills what it spawned): the
/// signal follows the spawning *thread*, not the process.
///
/// The spawn fails (`ESRCH`) if the parent died before the child could
/// ask for the signal.
pub fn die_with_parent(cmd: &mut Command) {
    // Broken (rule `child_dies_with_parent`): the child outlives a killed
    // parent.
    if broken(Rule::ChildDiesWithParent) {
        return;
    }
    let parent = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
    // SAFETY: the closure runs in the forked child before `execve`; it makes
    // two async-signal-safe system calls, touches no memory the parent's
    // other threads may have left locked, and allocates nothing (an OS
    // error code is stored inline in `io::Error`).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent died before the prctl: no signal would come.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// What became of the first child named `comm` of a process that was
/// killed outright ([`kill_and_check_orphan`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Orphan {
    /// It ended with its parent.
    Ended,
    /// It was still running `grace` after its parent was killed (it has
    /// been killed now): this pid.
    Outlived(u32),
    /// The parent never had such a child (ended first, or none within the
    /// wait): why.
    NeverSeen(String),
}

/// Waits up to `wait` for `parent` to have a child named `comm`, kills
/// `parent` with `SIGKILL` (no `Drop`, no handler runs: what a CI timeout
/// does) and reaps it, then waits up to `grace` for that child to end.
/// A child that outlives the grace is killed, so a failing check leaves
/// nothing running either. For the tests that hold [`die_with_parent`] to
/// its word.
pub fn kill_and_check_orphan(
    parent: &mut std::process::Child,
    comm: &str,
    wait: std::time::Duration,
    grace: std::time::Duration,
) -> Orphan {
    use crate::proc_stats::{children_of, wait_gone};
    let t = std::time::Instant::now();
    let (pid, start) = loop {
        if let Some((p, c)) = children_of(parent.id())
            .into_iter()
            .find(|(_, c)| c.comm == comm)
        {
            break (p, c.start_ticks);
        }
        if let Ok(Some(st)) = parent.try_wait() {
            return Orphan::NeverSeen(format!("the parent ended ({st}) before a {comm} child"));
        }
        if t.elapsed() > wait {
            let _ = parent.kill();
            let _ = parent.wait();
            return Orphan::NeverSeen(format!("no {comm} child within {wait:?}"));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let _ = parent.kill();
    let _ = parent.wait();
    if wait_gone(pid, start, grace) {
        return Orphan::Ended;
    }
    if let Ok(p) = libc::pid_t::try_from(pid) {
        // SAFETY: signals one process by pid, the one seen above as the
        // parent's child (same pid and start time a moment ago); no memory
        // is involved.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    Orphan::Outlived(pid)
}
