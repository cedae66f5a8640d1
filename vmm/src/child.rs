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
