//! The fence: a software watchdog for hosts without a watchdog device (every namespace-lab host,
//! many VMs). Without it, a leader whose agent is killed (with its supervisor) or frozen keeps
//! PostgreSQL running and accepting writes after its lease expires and another node promotes:
//! two writable primaries (measured before this existed: 20.8 s of direct writes on both).
//!
//! Two halves, two processes:
//! - [`FenceWatchdog`], the agent's driver ([`WatchdogDevice`]): `open` makes sure a fence
//!   process runs — spawned in a session of its own, so it outlives the agent, the agent's
//!   supervisor and a SIGSTOP of either — and arms it with a deadline; every keepalive (after a
//!   successful leader-key renewal) moves the deadline to `renewal sent + timeout`; `close`
//!   disarms it.
//! - [`run`], the fence process (`pgherd-agent --fence STATE --fence-pgdata DIR`): every
//!   [`FENCE_POLL`] it reads the state file; armed and past the deadline → it stops PostgreSQL
//!   at once (SIGQUIT to the postmaster: immediate shutdown, every backend exits without
//!   committing more; SIGKILL to the postmaster and its children if any is left after
//!   [`FENCE_KILL_AFTER`]) and records `fenced`. It runs only while armed: disarmed or fenced,
//!   it exits, and the next `open` starts it again.
//!
//! Timing: the HA loop arms it for `ttl − safety_margin` (as it would a device), and the
//! deadline counts from the *send time* of the last renewal etcd acknowledged. The leader key
//! cannot expire before `that send time + ttl` (etcd refreshed it no earlier), and no replica
//! promotes before the key expires, so PostgreSQL stops at least `safety_margin −
//! FENCE_POLL − FENCE_KILL_AFTER` before any other node can promote. Deadlines are
//! CLOCK_BOOTTIME nanoseconds: one clock for every process of the host, which keeps counting
//! through a suspend (the lease expires in etcd meanwhile, so the fence must fire on resume).
//!
//! What it does not cover (a device does): the fence process itself killed together with the
//! agent (`kill -9` of every pgherd process, the OOM killer choosing it), or the host's kernel
//! hung (then PostgreSQL is hung too). `watchdog.fence: false` turns it off.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{WatchdogDevice, WatchdogError};

/// How often the fence process checks its deadline: the worst-case lateness of a fencing, on
/// top of the stop itself; 50 ms is a negligible cost (one small file read) and well inside
/// every profile's safety margin (≥ 3 s).
pub const FENCE_POLL: Duration = Duration::from_millis(50);
/// How long an immediate shutdown may take before the postmaster and its children are
/// SIGKILLed: an immediate shutdown ends in milliseconds; a postmaster that has not exited
/// after 1 s is wedged, and the margin must not be spent waiting on it.
pub const FENCE_KILL_AFTER: Duration = Duration::from_secs(1);

/// How long `open` waits for a spawned fence to write its pid file: a fork and exec of the
/// agent's own binary takes milliseconds; 2 s also covers a loaded 2-core host, and the agent
/// is not leading yet while it waits.
pub const FENCE_START_TIMEOUT: Duration = Duration::from_secs(2);

/// The fence's state, one line in the state file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceState {
    /// Not leading: nothing to do.
    Disarmed,
    /// Leading: stop PostgreSQL if CLOCK_BOOTTIME passes `deadline_ns`.
    Armed { deadline_ns: u64 },
    /// PostgreSQL was stopped at `at_ns` because the deadline passed.
    Fenced { at_ns: u64 },
}

impl FenceState {
    pub fn parse(line: &str) -> Option<FenceState> {
        let mut w = line.split_whitespace();
        let s = match (w.next()?, w.next().map(str::parse::<u64>)) {
            ("disarmed", None) => FenceState::Disarmed,
            ("armed", Some(Ok(d))) => FenceState::Armed { deadline_ns: d },
            ("fenced", Some(Ok(t))) => FenceState::Fenced { at_ns: t },
            _ => return None,
        };
        w.next().is_none().then_some(s)
    }

    pub fn line(&self) -> String {
        match self {
            FenceState::Disarmed => "disarmed\n".into(),
            FenceState::Armed { deadline_ns } => format!("armed {deadline_ns}\n"),
            FenceState::Fenced { at_ns } => format!("fenced {at_ns}\n"),
        }
    }

    /// Whether PostgreSQL must be stopped now (pure: the fence process's whole decision).
    pub fn due(&self, now_ns: u64) -> bool {
        matches!(*self, FenceState::Armed { deadline_ns } if now_ns > deadline_ns)
    }
}

/// CLOCK_BOOTTIME in nanoseconds.
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the duration of the call.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Replaces `path` with `text` through a rename, so the other process never reads half a
/// line. The temporary name carries the writer's pid: the agent and the fence both write the
/// state file. Not synced: these files matter only while the host runs (a reboot ends the
/// lease).
fn replace(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = beside(path, &format!(".tmp{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

fn write_state(path: &Path, s: FenceState) -> std::io::Result<()> {
    replace(path, &s.line())
}

fn read_state(path: &Path) -> Option<FenceState> {
    FenceState::parse(&std::fs::read_to_string(path).ok()?)
}

/// `<state><suffix>`: the fence's other files, beside its state file.
fn beside(state: &Path, suffix: &str) -> PathBuf {
    let mut s = state.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The fence process's pid file, next to the state file.
fn pid_file(state: &Path) -> PathBuf {
    beside(state, ".pid")
}

/// Whether `pid` is a live fence process (its command line names `--fence`: a recycled pid
/// of another program does not count).
fn is_fence(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"--fence"))
}

fn running_fence(state: &Path) -> Option<u32> {
    let pid = std::fs::read_to_string(pid_file(state))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    is_fence(pid).then_some(pid)
}

/// The agent's side (see the module doc).
#[derive(Debug)]
pub struct FenceWatchdog {
    state: PathBuf,
    pgdata: PathBuf,
    timeout: Option<Duration>,
}

impl FenceWatchdog {
    /// A fence for the PostgreSQL instance at `pgdata`, its state in `state`.
    pub fn new(state: impl Into<PathBuf>, pgdata: impl Into<PathBuf>) -> Self {
        FenceWatchdog {
            state: state.into(),
            pgdata: pgdata.into(),
            timeout: None,
        }
    }

    /// The default state file of the instance at `pgdata`: `<pgdata>.fence`, beside the data
    /// directory (written by the same user, not inside it: pg_basebackup and pg_rewind own it).
    pub fn default_state(pgdata: &Path) -> PathBuf {
        let mut s = pgdata.as_os_str().to_owned();
        s.push(".fence");
        PathBuf::from(s)
    }

    fn unusable(&self, why: impl std::fmt::Display) -> WatchdogError {
        WatchdogError::Unusable(format!("fence {}", self.state.display()), why.to_string())
    }

    /// Starts the fence process unless one runs: the same executable, in a new session
    /// (`setsid`), with no inherited descriptors but /dev/null.
    fn ensure_running(&self) -> Result<(), WatchdogError> {
        if running_fence(&self.state).is_some() {
            return Ok(());
        }
        use std::os::unix::process::CommandExt;
        let exe = std::env::current_exe().map_err(|e| self.unusable(e))?;
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("--fence")
            .arg(&self.state)
            .arg("--fence-pgdata")
            .arg(&self.pgdata)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| self.unusable(e))?;
        // The fence writes its own pid file; it guards from then on. The child is never
        // waited for: it outlives us on purpose.
        drop(child);
        let t0 = Instant::now();
        while t0.elapsed() < FENCE_START_TIMEOUT {
            if running_fence(&self.state).is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(self.unusable(format!(
            "the fence process did not start within {FENCE_START_TIMEOUT:?} (see {})",
            beside(&self.state, ".log").display()
        )))
    }

    fn arm(&mut self, since: Instant, timeout: Duration) -> Result<(), String> {
        let now = boottime_ns();
        let deadline_ns = now
            .saturating_sub(since.elapsed().as_nanos() as u64)
            .saturating_add(timeout.as_nanos() as u64);
        write_state(&self.state, FenceState::Armed { deadline_ns }).map_err(|e| e.to_string())
    }
}

impl WatchdogDevice for FenceWatchdog {
    fn open(&mut self, timeout: Duration) -> Result<(), WatchdogError> {
        // Armed first, then the process checked: a fence about to exit (it saw `disarmed`)
        // re-reads the state after giving up its pid file, finds it armed and stays.
        self.arm(Instant::now(), timeout)
            .map_err(|e| self.unusable(e))?;
        if let Err(e) = self.ensure_running() {
            let _ = write_state(&self.state, FenceState::Disarmed);
            return Err(e);
        }
        self.timeout = Some(timeout);
        Ok(())
    }

    fn keepalive(&mut self) -> Result<(), WatchdogError> {
        self.keepalive_since(Instant::now())
    }

    fn keepalive_since(&mut self, since: Instant) -> Result<(), WatchdogError> {
        let timeout = self
            .timeout
            .ok_or_else(|| WatchdogError::Keepalive("fence not armed".into()))?;
        let previous = read_state(&self.state);
        self.arm(since, timeout).map_err(WatchdogError::Keepalive)?;
        // A fence that is gone (it fenced while this agent was frozen, or it was killed) is
        // started again.
        if running_fence(&self.state).is_none() {
            tracing::warn!(
                state = ?previous,
                "the fence process was not running: starting it again"
            );
            self.ensure_running()
                .map_err(|e| WatchdogError::Keepalive(e.to_string()))?;
        }
        Ok(())
    }

    fn close(&mut self) {
        if self.timeout.take().is_some()
            && let Err(e) = write_state(&self.state, FenceState::Disarmed)
        {
            tracing::error!(error = %e, state = %self.state.display(), "cannot disarm the fence");
        }
    }

    fn is_open(&self) -> bool {
        self.timeout.is_some()
    }
}

/// The pids whose parent is `parent` (from /proc).
fn children(parent: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                // `pid (comm) state ppid ...`: comm may hold spaces, so split after the ')'.
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok())
                    == Some(parent)
            })
        })
        .collect()
}

/// Stops the PostgreSQL instance at `pgdata` at once; returns what was done.
fn stop_postgres(pgdata: &Path) -> String {
    let Some(pid) = crate::pg::local::live_postmaster(pgdata) else {
        return "PostgreSQL was not running".into();
    };
    // SAFETY: plain signals to a process we just checked exists.
    unsafe { libc::kill(pid, libc::SIGQUIT) };
    let t0 = Instant::now();
    while t0.elapsed() < FENCE_KILL_AFTER {
        if crate::pg::local::live_postmaster(pgdata).is_none() {
            return format!("postmaster {pid} stopped (immediate shutdown)");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let kids = children(pid);
    for k in kids.iter().copied().chain([pid]) {
        // SAFETY: as above.
        unsafe { libc::kill(k, libc::SIGKILL) };
    }
    format!(
        "postmaster {pid} and {} children SIGKILLed (no immediate shutdown within {FENCE_KILL_AFTER:?})",
        kids.len()
    )
}

/// The fence process: runs while its state is armed and its pid file names it; exits once
/// disarmed or fenced (unless re-armed meanwhile), when a newer fence took the pid file, or
/// when the instance's directories are gone.
pub fn run(state: &Path, pgdata: &Path) -> std::io::Result<()> {
    let me = std::process::id();
    // `pgherd-fence` in ps and pgrep: operators (and scripts counting agents) tell it apart.
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"pgherd-fence".as_ptr()) };
    let log_path = beside(state, ".log");
    let log = |msg: &str| {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
        {
            let _ = writeln!(f, "{} pid {me}: {msg}", super::unix_millis());
        }
    };
    let claim = || replace(&pid_file(state), &format!("{me}\n"));
    claim()?;
    log(&format!("fence started for {}", pgdata.display()));
    loop {
        std::thread::sleep(FENCE_POLL);
        // Two agents' opens racing can start two fences: the one the pid file names stays.
        let named = std::fs::read_to_string(pid_file(state))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok());
        match named {
            // The instance is gone (its directories deleted): nothing left to guard.
            None if !pgdata.exists() => return Ok(()),
            // A newer fence (two opens raced) guards it.
            Some(other) if other != me && is_fence(other) => {
                log(&format!("fence {other} guards this instance: exiting"));
                return Ok(());
            }
            _ => {}
        }
        let Some(s) = read_state(state) else {
            continue;
        };
        let now = boottime_ns();
        if s.due(now) {
            let what = stop_postgres(pgdata);
            write_state(state, FenceState::Fenced { at_ns: now })?;
            log(&format!(
                "the agent stopped renewing its leadership: {what} before the leader key could expire"
            ));
        }
        // The fence runs only while a leader is armed (none lingers on replicas or removed
        // hosts): disarmed or fenced, it gives up its pid file, and exits unless an agent
        // armed it again meanwhile (see `FenceWatchdog::open`).
        if !matches!(s, FenceState::Armed { .. }) {
            let _ = std::fs::remove_file(pid_file(state));
            if matches!(read_state(state), Some(FenceState::Armed { .. })) {
                claim()?;
                continue;
            }
            log("disarmed: exiting");
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_line_round_trips_and_junk_is_no_state() {
        for s in [
            FenceState::Disarmed,
            FenceState::Armed { deadline_ns: 42 },
            FenceState::Fenced { at_ns: 7 },
        ] {
            assert_eq!(FenceState::parse(&s.line()), Some(s));
        }
        for junk in ["", "armed", "armed x", "armed 1 2", "disarmed 3", "open 1"] {
            assert_eq!(FenceState::parse(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn only_an_armed_fence_past_its_deadline_fires() {
        let armed = FenceState::Armed { deadline_ns: 100 };
        assert!(!armed.due(99));
        assert!(!armed.due(100));
        assert!(armed.due(101));
        assert!(!FenceState::Disarmed.due(u64::MAX));
        assert!(!FenceState::Fenced { at_ns: 1 }.due(u64::MAX));
    }

    #[test]
    fn the_deadline_counts_from_the_renewals_send_time() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("f.fence");
        let mut f = FenceWatchdog::new(&state, dir.path().join("data"));
        let sent = Instant::now();
        std::thread::sleep(Duration::from_millis(20));
        let before = boottime_ns();
        f.arm(sent, Duration::from_secs(3)).unwrap();
        let Some(FenceState::Armed { deadline_ns }) = read_state(&state) else {
            panic!("not armed");
        };
        // At least the 20 ms since `sent` are taken off the 3 s.
        assert!(
            deadline_ns <= before + 3_000_000_000 - 20_000_000,
            "{deadline_ns} {before}"
        );
        assert!(deadline_ns > before);
    }

    #[test]
    fn the_default_state_file_sits_beside_the_data_directory() {
        assert_eq!(
            FenceWatchdog::default_state(Path::new("/var/lib/postgresql/15/main")),
            PathBuf::from("/var/lib/postgresql/15/main.fence")
        );
    }
}
