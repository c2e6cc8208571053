//! Child processes of the test bed: spawned in their own process group, logging to a file,
//! and stopped by PID on drop (also while a test panics) and when the test binary exits.
//!
//! # Files
//! Everything a test binary writes lives under one directory per test process,
//! `std::env::temp_dir()/gmail-sync-testbed-<pid>/`: one sub-directory per child
//! (`<name>-<n>/`, holding the child's `<name>.log` and any data it writes) and the reaper's
//! PID list `reap.pids`. The reaper removes the directory when the test binary has exited,
//! unless `GMAIL_SYNC_TESTBED_KEEP_TMP=1` is set (then the logs stay for a post-mortem).
//!
//! # The reaper (why one watcher process)
//! Shared processes (one Redis, one Pub/Sub emulator per test binary) live in statics and are
//! never dropped, and a test binary that is SIGKILLed (timeout in CI, Ctrl-C twice, OOM) runs
//! no destructors at all. Neither `Drop` nor `atexit` can cover that, and `PR_SET_PDEATHSIG`
//! fires when the *thread* that spawned the child ends (test threads end all the time), so it
//! would kill shared servers early. So the first child spawned starts ONE watcher, a small
//! `sh` loop in its own process group (a terminal's SIGINT to the test's group doesn't reach
//! it) with stdio on `/dev/null` (it never holds a pipe open that `cargo test` or CI reads):
//!
//! 1. it polls every 0.5 s whether the test process is alive: `/proc/<pid>/stat` exists, the
//!    process is not a zombie, and its start time is still the one recorded at spawn (so a
//!    recycled PID doesn't keep it waiting forever);
//! 2. when the test process is gone, it reads `reap.pids` (one `pid starttime` line per child,
//!    appended by [`reap_on_exit`], which [`ChildGuard::spawn`] calls for EVERY child, shared
//!    or not) and sends SIGKILL to each process whose start time still matches (a PID reused
//!    by an unrelated process is never touched) and to its process group;
//! 3. it removes the per-process directory and exits.
//!
//! The only gap is the few microseconds between `fork` and the line being appended to
//! `reap.pids`: a test process SIGKILLed exactly there leaks that one child.

use anyhow::{Context, Result, bail};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// How long [`ChildGuard::stop`] waits after SIGTERM before it sends SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// Upper bound for waiting on a SIGKILLed child to be reaped (a process stuck in
/// uninterruptible sleep could otherwise hang a test forever).
const KILL_WAIT: Duration = Duration::from_secs(10);

/// A free TCP port on 127.0.0.1 (bind to port 0, read the port, close the socket).
///
/// Racy by nature (another process may take the port before the child binds it); the servers
/// of this crate retry on a fresh port when the child fails to start.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener
        .local_addr()
        .expect("local_addr of a bound socket")
        .port()
}

/// `n` distinct free TCP ports on 127.0.0.1 (all sockets are held until every port is chosen).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local_addr of a bound socket").port())
        .collect()
}

/// The per-test-process directory `temp_dir()/gmail-sync-testbed-<pid>` (created on first use;
/// a stale one left by an earlier process with the same PID is removed first).
pub fn testbed_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("gmail-sync-testbed-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create the test bed directory {dir:?}: {e}"));
        dir
    })
}

/// A fresh, empty directory `testbed_dir()/<label>-<n>` for one child process.
pub fn fresh_dir(label: &str) -> Result<PathBuf> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = testbed_dir().join(format!("{label}-{n}"));
    fs::create_dir_all(&dir).with_context(|| format!("creating {dir:?}"))?;
    Ok(dir)
}

/// Finds an executable: `$env_var` if set (must point to an executable file), else `name` on
/// `PATH`. `None` if neither exists.
pub fn find_executable(env_var: &str, name: &str) -> Option<PathBuf> {
    if let Some(v) = std::env::var_os(env_var).filter(|v| !v.is_empty()) {
        let p = PathBuf::from(v);
        return is_executable(&p).then_some(p);
    }
    find_on_path(name)
}

/// Finds `name` in the directories of `PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

pub(crate) fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The start time (field 22 of `/proc/<pid>/stat`, clock ticks since boot) of a process, used
/// to tell a process from a later one that got the same PID.
pub(crate) fn proc_start_time(pid: u32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces: split after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    // rest = " state ppid ... ": state is field 3, so the start time (field 22) is index 19.
    rest.split_whitespace().nth(19).map(str::to_owned)
}

/// True if a process with this PID exists (`kill(pid, 0)` succeeds). A zombie counts as
/// existing; use [`ChildGuard::is_running`] for children.
pub fn pid_exists(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence and permission.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

/// True if `/proc/<pid>` exists and the process is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => match stat.rfind(')') {
            Some(i) => !matches!(stat[i + 1..].split_whitespace().next(), Some("Z" | "X")),
            None => false,
        },
        Err(_) => false,
    }
}

struct Reaper {
    pids: File,
}

const REAPER_SCRIPT: &str = r#"
PATH=/usr/bin:/bin:$PATH
parent=$1; pstart=$2; pidfile=$3; dir=$4; keep=$5
alive() {
  st=$(sed -e 's/^.*) //' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$st" ] || return 1
  want=$2
  set -- $st
  [ "$1" != Z ] && [ "$1" != X ] && [ "${20}" = "$want" ]
}
while alive "$parent" "$pstart"; do sleep 0.5; done
if [ -f "$pidfile" ]; then
  while read -r pid start; do
    [ -n "$pid" ] || continue
    if alive "$pid" "$start"; then
      kill -9 -- "-$pid" 2>/dev/null
      kill -9 "$pid" 2>/dev/null
    fi
  done < "$pidfile"
fi
[ "$keep" = 1 ] || rm -rf -- "$dir"
exit 0
"#;

fn reaper() -> Result<MutexGuard<'static, Reaper>> {
    static REAPER: OnceLock<Result<Mutex<Reaper>, String>> = OnceLock::new();
    let r = REAPER.get_or_init(|| start_reaper().map(Mutex::new).map_err(|e| format!("{e:#}")));
    match r {
        Ok(m) => Ok(m.lock().unwrap_or_else(|e| e.into_inner())),
        Err(e) => bail!("the test bed reaper could not start: {e}"),
    }
}

fn start_reaper() -> Result<Reaper> {
    let dir = testbed_dir();
    let pidfile = dir.join("reap.pids");
    let pids = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&pidfile)
        .with_context(|| format!("creating {pidfile:?}"))?;
    let me = std::process::id();
    let my_start = proc_start_time(me).context("reading /proc/self/stat (Linux /proc required)")?;
    let keep = std::env::var("GMAIL_SYNC_TESTBED_KEEP_TMP").is_ok_and(|v| v == "1");
    let child = Command::new("/bin/sh")
        .arg("-c")
        .arg(REAPER_SCRIPT)
        .arg("gmail-sync-testbed-reaper")
        .arg(me.to_string())
        .arg(my_start)
        .arg(&pidfile)
        .arg(dir)
        .arg(if keep { "1" } else { "0" })
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .context("spawning the reaper (/bin/sh)")?;
    // The watcher outlives us by design; it is never waited for (once we exit, init reaps it).
    drop(child);
    Ok(Reaper { pids })
}

/// Registers a PID (and its current start time) with the reaper of this test binary: when the
/// test process exits, normally or by SIGKILL, the process and its process group get SIGKILL.
/// The reaper (one `sh` watcher per test process) is started on the first call. Registering a
/// PID that has already exited is harmless.
pub fn reap_on_exit(pid: u32) {
    let Some(start) = proc_start_time(pid) else {
        return; // already gone
    };
    match reaper() {
        Ok(mut r) => {
            if let Err(e) = writeln!(r.pids, "{pid} {start}") {
                eprintln!("gmail-sync-testbed: cannot register pid {pid} with the reaper: {e}");
            }
        }
        Err(e) => eprintln!("gmail-sync-testbed: {e:#} (pid {pid} is not reaped on exit)"),
    }
}

/// A child process that is killed (and waited for) when the guard is dropped, also during a
/// panic, and by the reaper when the test binary exits. Methods take `&self` so a guard can be
/// shared (e.g. in a static or an `Arc`).
pub struct ChildGuard {
    name: String,
    pid: u32,
    log: PathBuf,
    child: Mutex<Child>,
}

impl std::fmt::Debug for ChildGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildGuard")
            .field("name", &self.name)
            .field("pid", &self.pid)
            .field("log", &self.log)
            .finish()
    }
}

impl ChildGuard {
    /// Spawns `cmd` in its own process group with stdin on `/dev/null` and stdout + stderr
    /// appended to `<log_dir>/<name>.log` (appending: a restarted server keeps one log), and
    /// registers it with the reaper.
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> Result<ChildGuard> {
        let log = log_dir.join(format!("{name}.log"));
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening log file {log:?}"))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {name}: {cmd:?}"))?;
        let pid = child.id();
        reap_on_exit(pid);
        Ok(ChildGuard {
            name: name.to_owned(),
            pid,
            log,
            child: Mutex::new(child),
        })
    }

    fn child(&self) -> MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The log file (stdout and stderr of the child).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// True while the child has not exited (reaps it if it has).
    pub fn is_running(&self) -> bool {
        matches!(self.child().try_wait(), Ok(None))
    }

    /// The exit status if the child has exited (reaps it), `None` while it runs.
    pub fn try_status(&self) -> Option<ExitStatus> {
        self.child().try_wait().ok().flatten()
    }

    /// SIGKILL to the child and its process group, then wait (bounded) until it is reaped.
    pub fn kill(&self) {
        let mut child = self.child();
        kill_locked(&self.name, &mut child);
    }

    /// SIGTERM, wait up to [`STOP_GRACE`] for the child to exit, then SIGKILL.
    pub fn stop(&self) {
        let mut child = self.child();
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        // The child is not reaped while we hold it, so its PID cannot have been reused.
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        if wait_bounded(&mut child, STOP_GRACE).is_some() {
            return;
        }
        eprintln!(
            "gmail-sync-testbed: {} (pid {}) ignored SIGTERM for {STOP_GRACE:?}; sending SIGKILL",
            self.name, self.pid
        );
        kill_locked(&self.name, &mut child);
    }

    /// The last `n` lines of the child's log (lossy UTF-8; reads at most the last 256 KiB).
    pub fn log_tail(&self, n: usize) -> String {
        log_tail(&self.log, n)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

fn kill_locked(name: &str, child: &mut Child) {
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    let pid = child.id() as libc::pid_t;
    // Group first (the child is its leader and not yet reaped, so the group id is still ours),
    // then the child itself in case it left the group.
    // SAFETY: kill(2) on our own child's process group and on the child.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
        libc::kill(pid, libc::SIGKILL);
    }
    if wait_bounded(child, KILL_WAIT).is_none() {
        eprintln!("gmail-sync-testbed: {name} (pid {pid}) not reaped {KILL_WAIT:?} after SIGKILL");
    }
}

/// Polls `try_wait` until the child exits or `limit` passes.
fn wait_bounded(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(_) => return None,
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The last `n` lines of a file (lossy UTF-8; reads at most the last 256 KiB).
pub fn log_tail(path: &Path, n: usize) -> String {
    const MAX: u64 = 256 * 1024;
    let Ok(mut f) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len > MAX {
        let _ = f.seek(SeekFrom::Start(len - MAX));
    }
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
