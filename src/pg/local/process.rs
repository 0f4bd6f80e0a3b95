//! Running PostgreSQL's binaries and the postmaster's life. Every tool runs through
//! [`LocalPostgres::run_cmd`]: as the PostgreSQL user when the agent is root, with the
//! environment scrubbed of `PG*` variables, stdin closed, output captured and a time bound;
//! `pg_ctl start` in its own session. On top: start, stop, promote (waiting on SQL) and a
//! reload confirmed by the postmaster's configuration load time, and [`live_postmaster`], the
//! check for a running postmaster that the fence shares.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use tokio::process::Command;

use super::sql::{SQL_TIMEOUT, bounded};
use super::{LocalPostgres, failed};
use crate::dcs::HistoryLine;
use crate::pg::conf::{self, ControlData};
use crate::pg::{PgError, StartAs, StopMode};
use crate::types::Timeline;

/// How long a reload may take to be in force: the postmaster re-reads a few small files in
/// milliseconds, and the HA cycle (with the leader's lease renewal) waits for this, so a stuck
/// one is given up on quickly; the caller then does not claim the new config is in force and
/// retries next cycle.
const RELOAD_CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);
/// Poll interval while waiting for the reload: one local connection each time.
const RELOAD_CONFIRM_POLL: Duration = Duration::from_millis(50);
/// Small tools (pg_controldata, pg_ctl reload/status).
const TOOL_TIMEOUT: Duration = Duration::from_secs(15);
/// Slack added to pg_ctl's own `-t` so that its own timeout message wins over ours.
const PG_CTL_SLACK: Duration = Duration::from_secs(5);
/// How often a promotion is checked for completion (`pg_is_in_recovery()` on the local
/// socket). `pg_ctl promote -w` checks every 100 ms, which added up to 100 ms to every
/// switchover's and failover's write outage; a local query costs well under a millisecond.
const PROMOTE_POLL: Duration = Duration::from_millis(10);

/// Environment variables that would redirect PostgreSQL tools away from what we pass explicitly.
pub(super) const SCRUBBED_ENV: &[&str] = &[
    "PGDATA",
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGUSER",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGDATABASE",
    "PGOPTIONS",
    "PGSERVICE",
    "PGSERVICEFILE",
];

/// Last `max` characters of a tool's output, for error details.
pub(super) fn tail(s: &str, max: usize) -> String {
    let s = s.trim();
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &s[start..])
}

/// uid/gid of the `postgres` user from /etc/passwd (no libc getpwnam: it is not thread-safe).
fn postgres_user() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 3 && f[0] == "postgres")
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

/// Who runs PostgreSQL binaries (see module docs). `None` means "as ourselves".
pub(super) fn resolve_run_as(data_dir: &Path) -> Result<Option<(u32, u32)>, PgError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    for p in [Some(data_dir), data_dir.parent()].into_iter().flatten() {
        if let Ok(m) = std::fs::metadata(p)
            && m.uid() != 0
        {
            return Ok(Some((m.uid(), m.gid())));
        }
    }
    postgres_user().map(Some).ok_or_else(|| {
        failed(
            "choosing the PostgreSQL user",
            "running as root, the data directory's parent is owned by root and there is no \
             postgres user",
        )
    })
}

impl LocalPostgres {
    /// Runs a PostgreSQL binary from `bin_dir` (see [`Self::run_cmd`]).
    pub(super) async fn run_tool(
        &self,
        what: &str,
        tool: &str,
        args: Vec<OsString>,
        limit: Duration,
        env: &[(&str, OsString)],
    ) -> Result<String, PgError> {
        let mut cmd = Command::new(self.bin_dir.join(tool));
        cmd.args(args);
        self.run_cmd(what, cmd, limit, env, true, false).await
    }

    /// Runs `cmd` as the PostgreSQL user with a scrubbed environment, stdin from /dev/null,
    /// output captured, killed if `limit` passes. `c_locale` forces LANG=C (parsed output);
    /// `detach` puts it in its own session (pg_ctl start: the postmaster must outlive us and not
    /// receive the agent's terminal signals). Returns stdout.
    pub(super) async fn run_cmd(
        &self,
        what: &str,
        mut cmd: Command,
        limit: Duration,
        env: &[(&str, OsString)],
        c_locale: bool,
        detach: bool,
    ) -> Result<String, PgError> {
        for k in SCRUBBED_ENV {
            cmd.env_remove(k);
        }
        if c_locale {
            cmd.env("LANG", "C").env("LC_ALL", "C");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        // "/" is readable by everyone; our own cwd may not be (initdb complains about that).
        cmd.current_dir("/")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        if let Some((uid, gid)) = self.run_as {
            // std drops supplementary groups when switching from root.
            cmd.uid(uid).gid(gid);
            if let Some(home) = self.data_dir.parent() {
                cmd.env("HOME", home);
            }
        }
        if detach {
            // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
            unsafe {
                cmd.pre_exec(|| {
                    libc::setsid();
                    Ok(())
                });
            }
        }
        let out = match tokio::time::timeout(limit, cmd.output()).await {
            Err(_) => return Err(PgError::Timeout(limit, what.to_string())),
            Ok(Err(e)) => return Err(failed(what, format!("cannot run: {e}"))),
            Ok(Ok(out)) => out,
        };
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(failed(
                what,
                format!(
                    "{}: {}",
                    out.status,
                    tail(&format!("{stderr}\n{stdout}"), 2000)
                ),
            ));
        }
        Ok(stdout)
    }

    pub(super) async fn controldata(&self) -> Result<ControlData, PgError> {
        let out = self
            .run_tool(
                "pg_controldata",
                "pg_controldata",
                vec!["-D".into(), self.data_dir.clone().into()],
                TOOL_TIMEOUT,
                &[],
            )
            .await?;
        Ok(ControlData::parse(&out))
    }

    /// PID of a live postmaster for our data directory (see [`live_postmaster`]).
    pub(super) fn postmaster_pid(&self) -> Option<i32> {
        live_postmaster(&self.data_dir)
    }

    fn pg_ctl_secs(timeout: Duration) -> OsString {
        timeout.as_secs().max(1).to_string().into()
    }

    pub(super) fn require_stopped(&self, what: &str) -> Result<(), PgError> {
        if self.postmaster_pid().is_some() {
            return Err(failed(what, "postgres is running; stop it first"));
        }
        Ok(())
    }

    /// [`Postgres::start`](crate::pg::Postgres::start): the files for `start_as`, then `pg_ctl start`.
    pub(super) async fn start_postmaster(
        &self,
        start_as: &StartAs,
        timeout: Duration,
    ) -> Result<(), PgError> {
        if !self.initialized() {
            return Err(failed(
                "starting postgres",
                "data directory is not initialized",
            ));
        }
        let standby = match start_as {
            StartAs::Primary => None,
            StartAs::Replica { upstream } => Some(self.standby_settings(upstream.as_ref())),
        };
        let is_standby = standby.is_some();
        // A standby refuses to start when max_connections & co. are below the values its
        // primary ran with (recorded in pg_control): e.g. a node whose settings were lowered in
        // the DCS while the primary still awaits the restart that applies them.
        let minimums = if is_standby {
            match self.controldata().await {
                Ok(cd) => conf::hot_standby_minimums(&cd),
                Err(_) => BTreeMap::new(),
            }
        } else {
            BTreeMap::new()
        };
        {
            let mut sh = self.shared();
            sh.standby = standby;
            sh.standby_minimums = minimums;
        }
        self.write_config()?;
        if self.postmaster_pid().is_some() {
            // Already up (e.g. the agent restarted): the files are current, nothing to start.
            return Ok(());
        }
        self.write_signals(is_standby)?;
        let mut log = OsString::from("--log=");
        log.push(&self.log_file);
        let args: Vec<OsString> = vec![
            "start".into(),
            "-D".into(),
            self.data_dir.clone().into(),
            "-w".into(),
            "-t".into(),
            Self::pg_ctl_secs(timeout),
            log,
        ];
        let mut cmd = Command::new(self.bin_dir.join("pg_ctl"));
        cmd.args(args);
        match self
            .run_cmd("pg_ctl start", cmd, timeout + PG_CTL_SLACK, &[], true, true)
            .await
        {
            Err(PgError::CommandFailed { detail, .. })
                if detail.contains("did not start in time") =>
            {
                Err(PgError::Timeout(
                    timeout,
                    "waiting for postgres to start".into(),
                ))
            }
            Err(PgError::CommandFailed { what, detail }) => {
                let log = std::fs::read_to_string(&self.log_file).unwrap_or_default();
                Err(PgError::CommandFailed {
                    what,
                    detail: format!("{detail}; log: {}", tail(&log, 1500)),
                })
            }
            other => other.map(|_| ()),
        }
    }

    /// [`Postgres::stop`](crate::pg::Postgres::stop) by `pg_ctl stop`.
    pub(super) async fn stop_postmaster(
        &self,
        mode: StopMode,
        timeout: Duration,
    ) -> Result<(), PgError> {
        self.drop_client().await;
        if self.postmaster_pid().is_none() {
            return Ok(());
        }
        let m = match mode {
            StopMode::Smart => "smart",
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        };
        let args: Vec<OsString> = vec![
            "stop".into(),
            "-D".into(),
            self.data_dir.clone().into(),
            "-m".into(),
            m.into(),
            "-w".into(),
            "-t".into(),
            Self::pg_ctl_secs(timeout),
        ];
        match self
            .run_tool("pg_ctl stop", "pg_ctl", args, timeout + PG_CTL_SLACK, &[])
            .await
        {
            Ok(_) => Ok(()),
            // It went away between our check and pg_ctl's.
            Err(_) if self.postmaster_pid().is_none() => Ok(()),
            Err(PgError::CommandFailed { detail, .. }) if detail.contains("does not shut down") => {
                Err(PgError::Timeout(
                    timeout,
                    "waiting for postgres to stop".into(),
                ))
            }
            Err(e) => Err(e),
        }
    }

    /// [`Postgres::promote`](crate::pg::Postgres::promote): reserve the used timelines, signal,
    /// then wait on SQL until recovery ended.
    pub(super) async fn promote_and_wait(
        &self,
        used: Timeline,
        history: &[HistoryLine],
        timeout: Duration,
    ) -> Result<(), PgError> {
        self.reserve_timelines(used, history)?;
        // `-W`: pg_ctl only signals; we wait ourselves (see PROMOTE_POLL).
        let args: Vec<OsString> = vec![
            "promote".into(),
            "-D".into(),
            self.data_dir.clone().into(),
            "-W".into(),
        ];
        self.run_tool("pg_ctl promote", "pg_ctl", args, TOOL_TIMEOUT, &[])
            .await?;
        let t0 = tokio::time::Instant::now();
        loop {
            // The persistent connection (reconnected after an error): a session survives the
            // promotion, so polling costs one query, not one connection, per PROMOTE_POLL.
            let probe = self.with_client(|c| async move {
                let row = bounded(
                    SQL_TIMEOUT,
                    "waiting for promotion",
                    c.query_one("SELECT pg_is_in_recovery()", &[]),
                )
                .await?;
                Ok(row.get::<_, bool>(0))
            });
            let last = match probe.await {
                Ok(false) => break,
                Ok(true) => "still in recovery".to_string(),
                // Without hot_standby no connection is accepted until the promotion is done.
                Err(e) => e.to_string(),
            };
            if t0.elapsed() > timeout {
                return Err(PgError::Timeout(
                    timeout,
                    format!("waiting for promotion ({last})"),
                ));
            }
            tokio::time::sleep(PROMOTE_POLL).await;
        }
        // PostgreSQL removed standby.signal; drop the standby section too so a later restart
        // by anyone (not only start(Primary)) comes up as primary.
        self.shared().standby = None;
        self.write_config()?;
        Ok(())
    }

    /// [`Postgres::reload`](crate::pg::Postgres::reload), returning once the postmaster loaded
    /// the files.
    pub(super) async fn reload_and_confirm(&self) -> Result<(), PgError> {
        if self.postmaster_pid().is_none() {
            return Ok(());
        }
        // PostgreSQL applies SIGHUP asynchronously: remember when the postmaster last loaded
        // its files, signal, and wait until a new backend (forked from the postmaster, so it
        // carries the postmaster's state) shows a later load time. Without SQL (still starting
        // up) there is nothing an observation could report from the old files anyway.
        let before = self.fresh_conf_load_time().await.ok();
        let args: Vec<OsString> = vec!["reload".into(), "-D".into(), self.data_dir.clone().into()];
        self.run_tool("pg_ctl reload", "pg_ctl", args, TOOL_TIMEOUT, &[])
            .await?;
        if let Some(before) = before {
            let deadline = tokio::time::Instant::now() + RELOAD_CONFIRM_TIMEOUT;
            loop {
                if self
                    .fresh_conf_load_time()
                    .await
                    .is_ok_and(|now| now != before)
                {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(PgError::Timeout(
                        RELOAD_CONFIRM_TIMEOUT,
                        "waiting for postgres to load the reloaded configuration".into(),
                    ));
                }
                tokio::time::sleep(RELOAD_CONFIRM_POLL).await;
            }
        }
        // The persistent connection's backend applies the reload at its next command; a fresh
        // one is certain to run with it.
        self.drop_client().await;
        Ok(())
    }
}

/// PID of a live postmaster for the data directory `data_dir`. A pid file whose process is
/// gone, or whose pid now belongs to something that is not a postgres process (pid reuse after
/// a crash/reboot), is stale and ignored. Shared by the controller and the fence (which must
/// never signal a process that merely inherited the pid).
pub fn live_postmaster(data_dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    if pid <= 0 {
        return None;
    }
    // SAFETY: kill with signal 0 only checks for existence/permission.
    let alive = unsafe { libc::kill(pid, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    if !alive {
        return None;
    }
    // The postmaster chdirs into its data directory: when we may read its cwd, that tells
    // a reused pid (even another cluster's postmaster) from ours.
    if let (Ok(cwd), Ok(ours)) = (
        std::fs::read_link(format!("/proc/{pid}/cwd")),
        std::fs::canonicalize(data_dir),
    ) {
        return (cwd == ours).then_some(pid);
    }
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => {
            let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
            let argv0 = String::from_utf8_lossy(argv0);
            (argv0.contains("postgres") || argv0.contains("postmaster")).then_some(pid)
        }
        // No /proc: trust kill(0).
        Err(_) => Some(pid),
    }
}
