//! Leftovers of killed builds: temporary files in `<cache>/tmp/` (`<pid>-<hint>-<nonce>.tmp`) and
//! half-assembled artifact folders in the dist root (`.<local_id>.tmp-<pid>-<nonce>`). A process
//! that is killed never runs its own sweep, so the next build removes the ones whose owning
//! process is gone. Entries of live processes (a concurrent build on the same cache) are kept.

use std::path::Path;

/// The owner pid of a cache temp name: `<pid>-…`.
pub fn cache_temp_owner(name: &str) -> Option<i32> {
    name.split('-').next()?.parse().ok()
}

/// The owner pid of a dist temp folder name: `.<local_id>.tmp-<pid>-<nonce>`.
pub fn dist_temp_owner(name: &str) -> Option<i32> {
    if !name.starts_with('.') {
        return None;
    }
    let (_, rest) = name.rsplit_once(".tmp-")?;
    rest.split('-').next()?.parse().ok()
}

/// The owner pid of a damaged index moved aside by [`crate::cache::index`]: `index.corrupt-<pid>-<nonce>`.
pub fn corrupt_index_owner(name: &str) -> Option<i32> {
    name.strip_prefix("index.corrupt-")?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// Whether a process with this pid exists (ours counts as alive). Permission errors mean it
/// exists but belongs to someone else: alive.
pub fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    if pid as u32 == std::process::id() {
        return true;
    }
    // SAFETY: signal 0 only checks that the process exists; nothing is sent.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Remove entries of `dir` whose name `owner` maps to a dead pid. Returns how many were removed.
/// Names `owner` does not recognise are left alone; errors are ignored (best effort).
pub fn sweep_dead(dir: &Path, owner: impl Fn(&str) -> Option<i32>) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = owner(&name) else { continue };
        let modified = e.metadata().and_then(|m| m.modified()).ok();
        if pid_alive(pid) && !pid_reused_since(pid, modified) {
            continue;
        }
        let p = e.path();
        let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
        let ok = if is_dir {
            std::fs::remove_dir_all(&p).is_ok()
        } else {
            std::fs::remove_file(&p).is_ok()
        };
        if ok {
            tracing::info!(
                "removed {} left by a build that stopped (pid {pid})",
                p.display()
            );
            removed += 1;
        }
    }
    removed
}

/// Whether `pid` now names something other than the process that last touched an entry at
/// `modified`: a thread of another process (`kill(tid, 0)` succeeds for threads too), or a
/// process started after that moment. pids are reused quickly under load (pid_max is often
/// 32768 and every thread takes one), so a plain liveness check would keep a dead build's
/// leftovers. Without /proc the answer is "not reused" (the plain check stands).
fn pid_reused_since(pid: i32, modified: Option<std::time::SystemTime>) -> bool {
    if pid as u32 == std::process::id() {
        return false;
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    let tgid = status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse::<i32>().ok());
    if tgid.is_some_and(|t| t != pid) {
        return true;
    }
    let (Some(modified), Some(started)) = (modified, process_start(pid)) else {
        return false;
    };
    // One second of slack for clock-tick rounding of the start time.
    started > modified + std::time::Duration::from_secs(1)
}

/// When process `pid` started, from /proc (boot time + start ticks).
fn process_start(pid: i32) -> Option<std::time::SystemTime> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; starttime is field 22, i.e. the 20th here.
    let ticks: u64 = stat
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()?;
    let btime: u64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    Some(
        std::time::UNIX_EPOCH
            + std::time::Duration::from_secs(btime)
            + std::time::Duration::from_millis(ticks * 1000 / hz),
    )
}

/// Sweep both places a build leaves temporaries in.
pub fn sweep_build_leftovers(cache_root: &Path, dist_root: &Path) -> usize {
    sweep_dead(&cache_root.join("tmp"), cache_temp_owner)
        + sweep_dead(cache_root, corrupt_index_owner)
        + sweep_dead(dist_root, dist_temp_owner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_or_a_younger_process_is_not_the_owner() {
        let now = std::time::SystemTime::now();
        let me = std::process::id() as i32;
        assert!(!pid_reused_since(me, Some(now)));
        // A thread of this process: its tid passes kill(tid, 0) but is not a process.
        let (tx, rx) = std::sync::mpsc::channel();
        let h = std::thread::spawn(move || {
            tx.send(unsafe { libc::gettid() }).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(200));
        });
        let tid = rx.recv().unwrap();
        assert!(pid_alive(tid));
        assert!(pid_reused_since(tid, Some(now)));
        h.join().unwrap();
        // A process started after the entry was written is not its owner.
        let long_ago = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1);
        assert!(pid_reused_since(1, Some(long_ago)) || std::fs::metadata("/proc/1/stat").is_err());
    }

    #[test]
    fn parses_owner_pids() {
        assert_eq!(cache_temp_owner("1234-files-00ab.tmp"), Some(1234));
        assert_eq!(cache_temp_owner("index.lock"), None);
        assert_eq!(
            dist_temp_owner(".tiny-llama-q4f16_1.tmp-4321-1f2e"),
            Some(4321)
        );
        assert_eq!(dist_temp_owner("tiny-llama-q4f16_1"), None);
        assert_eq!(dist_temp_owner(".hidden"), None);
        assert_eq!(corrupt_index_owner("index.corrupt-77-abc"), Some(77));
        assert_eq!(corrupt_index_owner("index.sled"), None);
    }

    #[test]
    fn removes_only_dead_owners() {
        let d = tempfile::tempdir().unwrap();
        // A child that has exited and been reaped: its pid is dead (unless reused, very unlikely
        // within the test).
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id() as i32;
        child.wait().unwrap();
        let me = std::process::id() as i32;
        std::fs::write(d.path().join(format!("{dead}-x-1.tmp")), b"").unwrap();
        std::fs::create_dir(d.path().join(format!("{dead}-dir-2.tmp"))).unwrap();
        std::fs::write(d.path().join(format!("{me}-x-3.tmp")), b"").unwrap();
        std::fs::write(d.path().join("unrelated"), b"").unwrap();
        assert_eq!(sweep_dead(d.path(), cache_temp_owner), 2);
        let mut left: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, vec![format!("{me}-x-3.tmp"), "unrelated".to_string()]);
    }
}
