//! Scratch directories of the fuzz properties, under the temporary
//! directory: `vmm-fuzz-KIND-PID` (or `...-PID-N` for one per thread).
//!
//! **Invariants.** A process removes the directories it made when it
//! exits (an `atexit` handler), and the first directory a process makes
//! first removes those of processes that are gone (a crash or a killed
//! run leaves them behind). A directory of a live process is never
//! removed by another.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// What every scratch directory's name starts with.
const PREFIX: &str = "vmm-fuzz-";

/// The directories this process made.
static MADE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// The scratch directory `kind` of this process (`thread`: one of its
/// own per thread), made on first use.
pub fn dir(kind: &str, thread: Option<u64>) -> PathBuf {
    let pid = std::process::id();
    let name = match thread {
        Some(t) => format!("{PREFIX}{kind}-{pid}-{t}"),
        None => format!("{PREFIX}{kind}-{pid}"),
    };
    let d = std::env::temp_dir().join(name);
    let mut made = MADE.lock().unwrap_or_else(|e| e.into_inner());
    if !made.contains(&d) {
        if made.is_empty() {
            sweep(&std::env::temp_dir());
            // SAFETY: `remove_made` is an `extern "C" fn()` that does not
            // unwind (it only ignores errors).
            unsafe { libc::atexit(remove_made) };
        }
        made.push(d.clone());
    }
    let _ = std::fs::create_dir_all(&d);
    d
}

/// Removes every directory this process made (at exit).
extern "C" fn remove_made() {
    // A thread that panicked holding the lock leaves it usable.
    let made = MADE.lock().unwrap_or_else(|e| e.into_inner());
    for d in made.iter() {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// The process id in a scratch directory's name, if it is one.
fn owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let mut parts = rest.split('-');
    let _kind = parts.next()?;
    parts.next()?.parse().ok()
}

/// Removes the scratch directories in `tmp` whose process is gone.
/// Returns how many it removed.
pub fn sweep(tmp: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(owner) else {
            continue;
        };
        let alive = Path::new("/proc").join(pid.to_string()).exists();
        if !alive && std::fs::remove_dir_all(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_give_their_owner() {
        assert_eq!(owner("vmm-fuzz-api-123"), Some(123));
        assert_eq!(owner("vmm-fuzz-loader-123-4"), Some(123));
        assert_eq!(owner("vmm-fuzz-api-"), None);
        assert_eq!(owner("other-api-123"), None);
    }

    #[test]
    fn sweep_removes_only_directories_of_processes_that_are_gone() {
        let tmp = std::env::temp_dir().join(format!("scratch-sweep-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        // No process has an id this large (pid_max is at most 2^22).
        let dead = tmp.join(format!("{PREFIX}api-{}", u32::MAX));
        let dead_thread = tmp.join(format!("{PREFIX}loader-{}-7", u32::MAX));
        let live = tmp.join(format!("{PREFIX}api-{}", std::process::id()));
        let other = tmp.join("unrelated-1");
        for d in [&dead, &dead_thread, &live, &other] {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join("f"), b"x").unwrap();
        }
        assert_eq!(sweep(&tmp), 2);
        assert!(!dead.exists() && !dead_thread.exists());
        assert!(live.exists() && other.exists());
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
