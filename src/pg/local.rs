//! The real PostgreSQL controller: [`LocalPostgres`] implements [`Postgres`] by running the
//! PostgreSQL 15 binaries (`initdb`, `pg_ctl`, `pg_controldata`, `pg_basebackup`, `pg_rewind`,
//! single-user `postgres`) through `tokio::process`, and by SQL over the unix socket with
//! tokio-postgres. It owns the generated files in the data directory (see [`super::conf`] for
//! their content and the parameter precedence) and the pgpass file next to it.
//!
//! Process rules:
//! - When the agent runs as root, every PostgreSQL binary runs as the owner of the data
//!   directory (or of its parent before it exists; falling back to the `postgres` user), since
//!   PostgreSQL refuses to run as root. Otherwise binaries run as the agent's user.
//! - Every call is bounded in time (see the `*_TIMEOUT` constants) so the HA loop, which renews
//!   the leader lease between calls, is never stuck behind PostgreSQL.
//! - The postmaster is started detached (own session, output to a log file next to the data
//!   directory), so it survives agent restarts and never writes into the agent's pipes.
//! - Passwords travel only through the pgpass file (mode 0600, `PGPASSFILE` / `passfile=`), the
//!   initdb pwfile (0600, removed afterwards) and tokio-postgres' in-memory config; they are
//!   never put on a command line, in postgresql.conf, or in error messages.
//! - Every generated file is replaced atomically (temp file in the same directory, fsync,
//!   rename, owned by the PostgreSQL user, 0600); a changed pg_hba.conf is checked against
//!   `pg_hba_file_rules` while the server runs and put back when PostgreSQL rejects it.
//! - One long file: every tool invocation shares the run-as, environment and timeout rules
//!   above; the pure file formats live in [`super::conf`].
//! - `synchronous_standby_names` is managed in the generated postgresql.conf (not ALTER SYSTEM):
//!   `postgresql.auto.conf` is copied by pg_basebackup and pg_rewind, so a value stored there
//!   would follow a clone and could make a freshly promoted replica wait for itself.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::process::Command;
use tokio_postgres::{Client, NoTls};

use crate::config::AgentConfig;
use crate::dcs::{DynamicConfig, HistoryLine};
use crate::pg::conf::{self, ControlData, StandbySettings};
use crate::pg::{
    ControlState, PgError, PgStatus, Postgres, ReplicationRow, SlotInfo, StartAs, StopMode,
    Upstream,
};
use crate::types::{Lsn, MemberName, Timeline};

/// Connecting to the local instance: it is on the same host, so a slow connect means it is
/// not accepting connections, and observe() must not hold up the HA cycle.
const SQL_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound for the short SQL statements of observe() and friends.
const SQL_TIMEOUT: Duration = Duration::from_secs(2);
/// Connecting to another member (leader checks before a rewind): network round trips.
const REMOTE_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a reload may take to be in force: the postmaster re-reads a few small files in
/// milliseconds, and the HA cycle (with the leader's lease renewal) waits for this, so a stuck
/// one is given up on quickly; the caller then does not claim the new config is in force and
/// retries next cycle.
const RELOAD_CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);
/// Poll interval while waiting for the reload: one local connection each time.
const RELOAD_CONFIRM_POLL: Duration = Duration::from_millis(50);
/// Small tools (pg_controldata, pg_ctl reload/status).
const TOOL_TIMEOUT: Duration = Duration::from_secs(15);
const INITDB_TIMEOUT: Duration = Duration::from_secs(300);
/// A clone copies the whole cluster; the bound only catches a hung transfer.
const BASEBACKUP_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
const REWIND_TIMEOUT: Duration = Duration::from_secs(3600);
const CRASH_RECOVERY_TIMEOUT: Duration = Duration::from_secs(3600);
/// A CHECKPOINT writes all dirty buffers; on a big shared_buffers it takes minutes.
const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(600);
const POST_BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(600);
/// Slack added to pg_ctl's own `-t` so that its own timeout message wins over ours.
const PG_CTL_SLACK: Duration = Duration::from_secs(5);
/// How often a promotion is checked for completion (`pg_is_in_recovery()` on the local
/// socket). `pg_ctl promote -w` checks every 100 ms, which added up to 100 ms to every
/// switchover's and failover's write outage; a local query costs well under a millisecond.
const PROMOTE_POLL: Duration = Duration::from_millis(10);

/// Environment variables that would redirect PostgreSQL tools away from what we pass explicitly.
const SCRUBBED_ENV: &[&str] = &[
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

/// Mutable state shared by the methods (they take `&self`).
#[derive(Debug, Default)]
struct Shared {
    /// Last DCS `config` given to apply_dynamic_config.
    dynamic: DynamicConfig,
    /// `None`: run as primary; `Some`: standby settings written into postgresql.conf.
    standby: Option<StandbySettings>,
    /// `synchronous_standby_names` once the HA loop set it.
    synchronous_standby_names: Option<String>,
    /// Standby only: hot-standby parameters raised to the values recorded in pg_control (see
    /// [`conf::hot_standby_minimums`]).
    standby_minimums: BTreeMap<String, String>,
}

/// The real PostgreSQL controller for one node (see module docs).
pub struct LocalPostgres {
    /// The node config in force; swapped whole by [`Postgres::set_local_config`] (readers take
    /// the `Arc`, never hold the lock).
    cfg: std::sync::RwLock<Arc<AgentConfig>>,
    name: MemberName,
    data_dir: PathBuf,
    bin_dir: PathBuf,
    socket_dir: PathBuf,
    pgpass: PathBuf,
    log_file: PathBuf,
    /// uid/gid to run PostgreSQL binaries as (only when the agent is root).
    run_as: Option<(u32, u32)>,
    shared: Mutex<Shared>,
    /// Serialises config-file generation: the loop's `apply_dynamic_config` and an action's
    /// `start` may both write; unserialised, both could move the initdb postgresql.conf aside
    /// and the second would move our generated file onto postgresql.base.conf (which then
    /// includes itself).
    config_write: Mutex<()>,
    /// Persistent superuser connection for observe(); dropped and re-made on any error.
    client: tokio::sync::Mutex<Option<Arc<Client>>>,
}

impl std::fmt::Debug for LocalPostgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalPostgres")
            .field("name", &self.name)
            .field("data_dir", &self.data_dir)
            .field("run_as", &self.run_as)
            .finish_non_exhaustive()
    }
}

fn failed(what: &str, detail: impl Into<String>) -> PgError {
    PgError::CommandFailed {
        what: what.to_string(),
        detail: detail.into(),
    }
}

/// Error text of a tokio-postgres error: the server message when there is one. Statement text
/// (which may hold a password literal) is never part of it.
fn sql_err(e: tokio_postgres::Error) -> PgError {
    match e.as_db_error() {
        Some(db) => PgError::Sql(format!("{}: {}", db.severity(), db.message())),
        None => PgError::Sql(e.to_string()),
    }
}

async fn bounded<T>(
    limit: Duration,
    what: &str,
    fut: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, PgError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(sql_err),
        Err(_) => Err(PgError::Timeout(limit, what.to_string())),
    }
}

async fn connect(cfg: &tokio_postgres::Config, limit: Duration) -> Result<Client, PgError> {
    let (client, conn) = bounded(limit, "connecting to postgres", cfg.connect(NoTls)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Last `max` characters of a tool's output, for error details.
fn tail(s: &str, max: usize) -> String {
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

fn lsn(s: Option<String>) -> Option<Lsn> {
    s.as_deref().and_then(Lsn::parse_pg)
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
fn resolve_run_as(data_dir: &Path) -> Result<Option<(u32, u32)>, PgError> {
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

/// Replaces `path` atomically with `content` when it differs: a temp file in the same
/// directory (mode 0600, owned by `owner` when given), fsynced, renamed over the target, then
/// the directory fsynced. A reader (PostgreSQL on SIGHUP) sees the old or the new file, never
/// a partial one. `true` when the content changed.
fn write_if_changed(
    path: &Path,
    content: &[u8],
    owner: Option<(u32, u32)>,
) -> std::io::Result<bool> {
    if std::fs::read(path).is_ok_and(|old| old == content) {
        return Ok(false);
    }
    let tmp = path.with_extension("pgherd-tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(content)?;
        f.sync_all()?;
    }
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::lchown(&tmp, Some(uid), Some(gid))?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(true)
}

impl LocalPostgres {
    /// Builds the controller from the node config. Touches nothing but reads the current
    /// standby settings back from a generated postgresql.conf when `standby.signal` exists, so an
    /// agent restart does not cut a running replica off its upstream.
    pub fn new(cfg: &AgentConfig) -> Result<LocalPostgres, PgError> {
        let data_dir = cfg.postgresql.data_dir.clone();
        let parent = data_dir
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| data_dir.clone());
        let dir_name = data_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "pgdata".into());
        let socket_dir = cfg
            .postgresql
            .socket_dir
            .clone()
            .unwrap_or_else(|| parent.clone());
        let pgpass = cfg
            .postgresql
            .pgpass
            .clone()
            .unwrap_or_else(|| parent.join(format!(".pgpass.pgherd.{}", cfg.name)));
        let log_file = parent.join(format!("{dir_name}.log"));
        let run_as = resolve_run_as(&data_dir)?;
        let mut shared = Shared::default();
        if data_dir.join("standby.signal").exists() {
            let text =
                std::fs::read_to_string(data_dir.join("postgresql.conf")).unwrap_or_default();
            shared.standby = Some(conf::parse_standby_settings(&text));
        }
        Ok(LocalPostgres {
            cfg: std::sync::RwLock::new(Arc::new(cfg.clone())),
            name: MemberName::new(cfg.name.clone()),
            data_dir,
            bin_dir: cfg.postgresql.bin_dir.clone(),
            socket_dir,
            pgpass,
            log_file,
            run_as,
            shared: Mutex::new(shared),
            config_write: Mutex::new(()),
            client: tokio::sync::Mutex::new(None),
        })
    }

    /// The node config in force.
    fn cfg(&self) -> Arc<AgentConfig> {
        self.cfg.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Where pg_ctl writes the postmaster's output.
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn port(&self) -> u16 {
        self.cfg().pg_listen_host_port().1
    }

    fn use_slots(&self) -> bool {
        self.shared()
            .dynamic
            .use_slots()
            .unwrap_or(self.cfg().postgresql.use_slots)
    }

    fn chown(&self, path: &Path) -> std::io::Result<()> {
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
        }
        Ok(())
    }

    /// Writes a file owned by the PostgreSQL user, mode 0600; `true` when the content changed.
    fn write_owned(&self, path: &Path, content: &str) -> Result<bool, PgError> {
        self.write_owned_bytes_changed(path, content.as_bytes())
    }

    fn write_owned_bytes_changed(&self, path: &Path, content: &[u8]) -> Result<bool, PgError> {
        Ok(write_if_changed(path, content, self.run_as)?)
    }

    /// Puts `content` back into `path` (atomically, see [`write_if_changed`]).
    fn write_owned_bytes(&self, path: &Path, content: &[u8]) -> Result<(), PgError> {
        self.write_owned_bytes_changed(path, content).map(|_| ())
    }

    fn initialized(&self) -> bool {
        self.data_dir.join("PG_VERSION").exists()
    }

    /// Runs a PostgreSQL binary from `bin_dir` (see [`Self::run_cmd`]).
    async fn run_tool(
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
    async fn run_cmd(
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

    async fn controldata(&self) -> Result<ControlData, PgError> {
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
    fn postmaster_pid(&self) -> Option<i32> {
        live_postmaster(&self.data_dir)
    }

    fn local_sql_config(&self, statement_timeout: &str) -> tokio_postgres::Config {
        let cfg = self.cfg();
        let su = &cfg.postgresql.authentication.superuser;
        let mut c = tokio_postgres::Config::new();
        c.host_path(&self.socket_dir)
            .port(self.port())
            .user(&su.username)
            .password(su.password.as_bytes())
            .dbname(&self.cfg().postgresql.database)
            .application_name("pgherd")
            .connect_timeout(SQL_CONNECT_TIMEOUT)
            .options(format!("-c statement_timeout={statement_timeout}"));
        c
    }

    /// Config for connecting to another member as the rewind user (superuser when none).
    fn remote_sql_config(&self, up: &Upstream) -> tokio_postgres::Config {
        let cfg = self.cfg();
        let auth = &cfg.postgresql.authentication;
        let creds = auth.rewind.as_ref().unwrap_or(&auth.superuser);
        let mut c = tokio_postgres::Config::new();
        c.host(&up.host)
            .port(up.port)
            .user(&creds.username)
            .password(creds.password.as_bytes())
            .dbname(&self.cfg().postgresql.database)
            .application_name("pgherd")
            .connect_timeout(REMOTE_CONNECT_TIMEOUT);
        c
    }

    /// The persistent local superuser connection (re-made when closed).
    async fn client(&self) -> Result<Arc<Client>, PgError> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref()
            && !c.is_closed()
        {
            return Ok(c.clone());
        }
        *slot = None;
        let c = Arc::new(connect(&self.local_sql_config("10s"), SQL_CONNECT_TIMEOUT).await?);
        *slot = Some(c.clone());
        Ok(c)
    }

    async fn drop_client(&self) {
        *self.client.lock().await = None;
    }

    /// Runs `f` on the persistent connection; an error drops the connection so the next call
    /// reconnects (the server may have restarted in between).
    async fn with_client<T, F, Fut>(&self, f: F) -> Result<T, PgError>
    where
        F: FnOnce(Arc<Client>) -> Fut,
        Fut: Future<Output = Result<T, PgError>>,
    {
        let c = self.client().await?;
        let r = f(c).await;
        if r.is_err() {
            self.drop_client().await;
        }
        r
    }

    fn passfile_str(&self) -> String {
        self.pgpass.to_string_lossy().into_owned()
    }

    /// The pgpass file: replication, rewind and superuser credentials, owned by the PostgreSQL
    /// user (the walreceiver, pg_basebackup and pg_rewind read it), mode 0600.
    fn write_pgpass(&self) -> Result<(), PgError> {
        let cfg = self.cfg();
        let a = &cfg.postgresql.authentication;
        let mut entries = vec![(
            a.replication.username.as_str(),
            a.replication.password.as_str(),
        )];
        if let Some(r) = &a.rewind {
            entries.push((r.username.as_str(), r.password.as_str()));
        }
        entries.push((a.superuser.username.as_str(), a.superuser.password.as_str()));
        self.write_owned(&self.pgpass, &conf::render_pgpass(&entries))?;
        Ok(())
    }

    fn standby_settings(&self, upstream: Option<&Upstream>) -> StandbySettings {
        let cfg = self.cfg();
        let repl = &cfg.postgresql.authentication.replication.username;
        StandbySettings {
            primary_conninfo: upstream
                .map(|u| conf::primary_conninfo(u, repl, self.name.as_str(), &self.passfile_str())),
            primary_slot_name: (upstream.is_some() && self.use_slots())
                .then(|| self.name.slot_name()),
        }
    }

    /// pg_hba lines we manage: local config, else DCS, else built-in defaults. `None` when
    /// only `bootstrap.pg_hba` is set: Patroni then appends those lines to initdb's file at
    /// bootstrap and leaves the file alone afterwards (initdb's `local` lines, which the
    /// superuser's socket connection needs, stay), and so do we.
    fn hba_lines(cfg: &AgentConfig, dynamic: &DynamicConfig) -> Option<Vec<String>> {
        if !cfg.postgresql.pg_hba.is_empty() {
            return Some(cfg.postgresql.pg_hba.clone());
        }
        if let Some(l) = dynamic.pg_hba().filter(|l| !l.is_empty()) {
            return Some(l);
        }
        if !cfg.bootstrap.pg_hba.is_empty() {
            return None;
        }
        Some(Vec::new())
    }

    /// The pg_hba.conf we would write for `cfg` + `dynamic` (`None`: leave the file alone).
    fn render_hba(cfg: &AgentConfig, dynamic: &DynamicConfig) -> Option<String> {
        let repl = &cfg.postgresql.authentication.replication.username;
        Self::hba_lines(cfg, dynamic).map(|l| conf::render_pg_hba(&l, repl))
    }

    /// The parameters we would write now (also the "configured value" of pending_restart).
    fn merged_parameters(&self) -> BTreeMap<String, String> {
        let cfg = self.cfg();
        let sh = self.shared();
        let (listen_host, port) = cfg.pg_listen_host_port();
        let owned = conf::OwnedParameters {
            listen_addresses: listen_host,
            port,
            socket_dir: self.socket_dir.to_string_lossy().into_owned(),
            hba_file: self
                .data_dir
                .join("pg_hba.conf")
                .to_string_lossy()
                .into_owned(),
            synchronous_standby_names: sh.synchronous_standby_names.clone(),
        };
        let mut params = conf::merged_parameters(
            &cfg.scope,
            &sh.dynamic.parameters(),
            &cfg.local_parameters(),
            &owned,
        );
        // Every standby start (a clone, a restart, a demoted primary's restart) recomputes the
        // minimums from pg_control in `start`; a standby below them refuses to start.
        if sh.standby.is_some() {
            conf::raise_to_minimums(&mut params, &sh.standby_minimums);
        }
        params
    }

    /// Regenerates postgresql.conf, pg_hba.conf (when we manage it, see [`Self::hba_lines`])
    /// and the pgpass file; `true` when postgresql.conf or pg_hba.conf changed (the server
    /// needs a reload). Before the first write the initdb postgresql.conf is kept as
    /// postgresql.base.conf. Unchecked: config changes that may alter pg_hba.conf go through
    /// [`Self::write_config_checked`] first.
    fn write_config(&self) -> Result<bool, PgError> {
        let _serial = self.config_write.lock().unwrap_or_else(|e| e.into_inner());
        if !self.initialized() {
            // Nothing to configure yet (the parent directory may not even exist before the
            // first initdb/clone); initdb/basebackup/start write everything when it exists.
            return Ok(false);
        }
        self.write_pgpass()?;
        let conf_path = self.data_dir.join("postgresql.conf");
        let base = self.data_dir.join(conf::BASE_CONF);
        if let Ok(text) = std::fs::read_to_string(&conf_path)
            && !text.starts_with(conf::GENERATED_HEADER)
            && !base.exists()
        {
            std::fs::rename(&conf_path, &base)?;
        }
        let params = self.merged_parameters();
        let cfg = self.cfg();
        let (standby, hba) = {
            let sh = self.shared();
            (sh.standby.clone(), Self::render_hba(&cfg, &sh.dynamic))
        };
        let text = conf::render_postgresql_conf(&params, standby.as_ref());
        let mut changed = self.write_owned(&conf_path, &text)?;
        if let Some(hba) = hba {
            changed |= self.write_owned(&self.data_dir.join("pg_hba.conf"), &hba)?;
        }
        Ok(changed)
    }

    /// Takes over `cfg` and `dynamic` as the config in force and writes the files, checking a
    /// changed pg_hba.conf first while PostgreSQL runs: the candidate file is put in place
    /// (atomically), `pg_hba_file_rules` is asked for error rows, and on any the previous file
    /// goes back (atomically, byte-identical) and nothing is taken over. Returns whether the
    /// running server needs a reload.
    ///
    /// Known window: a concurrent unchecked [`Self::write_config`] (an action's start) during
    /// the check would put the previous file back early; the check then passes on it and the
    /// new file is written right after, unchecked. Both writers run only around starts.
    async fn write_config_checked(
        &self,
        cfg: &AgentConfig,
        dynamic: &DynamicConfig,
    ) -> Result<bool, PgError> {
        let hba_path = self.data_dir.join("pg_hba.conf");
        let candidate = Self::render_hba(cfg, dynamic);
        let previous = std::fs::read(&hba_path).ok();
        let hba_changes = self.initialized()
            && candidate
                .as_ref()
                .is_some_and(|c| previous.as_deref() != Some(c.as_bytes()));
        if hba_changes && self.postmaster_pid().is_some() {
            let text = candidate.as_deref().unwrap_or_default();
            {
                let _serial = self.config_write.lock().unwrap_or_else(|e| e.into_inner());
                self.write_owned(&hba_path, text)?;
            }
            let rejected = match self.hba_errors().await {
                Ok(errors) if errors.is_empty() => None,
                Ok(errors) => Some(PgError::HbaRejected(format!(
                    "{} (kept the previous pg_hba.conf)",
                    errors.join("; ")
                ))),
                Err(e) => Some(PgError::HbaRejected(format!(
                    "cannot check the new pg_hba.conf: {e} (kept the previous pg_hba.conf)"
                ))),
            };
            if let Some(e) = rejected {
                let _serial = self.config_write.lock().unwrap_or_else(|e| e.into_inner());
                match &previous {
                    Some(old) => self.write_owned_bytes(&hba_path, old)?,
                    None => {
                        let _ = std::fs::remove_file(&hba_path);
                    }
                }
                return Err(e);
            }
        }
        *self.cfg.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(cfg.clone());
        self.shared().dynamic = dynamic.clone();
        let changed = self.write_config()? || hba_changes;
        Ok(changed && self.postmaster_pid().is_some())
    }

    /// `pg_conf_load_time()` as seen by a new backend (i.e. the postmaster's).
    async fn fresh_conf_load_time(&self) -> Result<String, PgError> {
        let c = connect(&self.local_sql_config("2s"), SQL_CONNECT_TIMEOUT).await?;
        let row = bounded(
            SQL_TIMEOUT,
            "reading pg_conf_load_time",
            c.query_one("SELECT pg_conf_load_time()::text", &[]),
        )
        .await?;
        Ok(row.get(0))
    }

    /// `pg_hba_file_rules` error rows of the pg_hba.conf on disk, as `pg_hba.conf line N: ...`.
    async fn hba_errors(&self) -> Result<Vec<String>, PgError> {
        self.with_client(|c| async move {
            let rows = bounded(
                SQL_TIMEOUT,
                "checking pg_hba.conf",
                c.query(
                    "SELECT line_number, error FROM pg_hba_file_rules \
                     WHERE error IS NOT NULL ORDER BY line_number",
                    &[],
                ),
            )
            .await?;
            Ok(rows
                .iter()
                .map(|r| {
                    let line: Option<i32> = r.get(0);
                    let error: String = r.get(1);
                    match line {
                        Some(n) => format!("pg_hba.conf line {n}: {error}"),
                        None => format!("pg_hba.conf: {error}"),
                    }
                })
                .collect())
        })
        .await
    }

    /// standby.signal present iff we start as a standby; recovery.signal never (we do not do
    /// targeted recovery, and a leftover one would make a primary start in recovery).
    fn write_signals(&self, standby: bool) -> Result<(), PgError> {
        let sig = self.data_dir.join("standby.signal");
        if standby {
            if !sig.exists() {
                self.write_owned(&sig, "")?;
            }
        } else if sig.exists() {
            std::fs::remove_file(&sig)?;
        }
        let rec = self.data_dir.join("recovery.signal");
        if rec.exists() {
            std::fs::remove_file(rec)?;
        }
        Ok(())
    }

    fn pg_ctl_secs(timeout: Duration) -> OsString {
        timeout.as_secs().max(1).to_string().into()
    }

    /// Makes the data directory exist, empty, 0700, owned by the PostgreSQL user.
    fn prepare_empty_data_dir(&self) -> Result<(), PgError> {
        if self.data_dir.exists() {
            self.wipe_contents()?;
        } else {
            std::fs::create_dir_all(&self.data_dir)?;
        }
        std::fs::set_permissions(&self.data_dir, std::fs::Permissions::from_mode(0o700))?;
        self.chown(&self.data_dir)?;
        Ok(())
    }

    /// Removes everything inside the data directory (not the directory: it may be a mount
    /// point). Symlinks (a moved pg_wal) are removed as links.
    fn wipe_contents(&self) -> Result<(), PgError> {
        let entries = match std::fs::read_dir(&self.data_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        for e in entries {
            let e = e?;
            let p = e.path();
            if e.file_type()?.is_dir() {
                std::fs::remove_dir_all(&p)?;
            } else {
                std::fs::remove_file(&p)?;
            }
        }
        Ok(())
    }

    /// Single-user crash recovery, so that pg_controldata shows a clean shutdown whose
    /// checkpoint is the true end of the local WAL (the divergence check and pg_rewind both need
    /// that). archive_mode=on + a failing archive_command keep every WAL segment, which pg_rewind
    /// may need to read back to the common checkpoint. Signal files are removed: single-user
    /// mode cannot run as a standby.
    async fn crash_recovery(&self) -> Result<(), PgError> {
        self.write_signals(false)?;
        let args: Vec<OsString> = [
            "--single",
            "-D",
            &self.data_dir.to_string_lossy(),
            "-c",
            "archive_mode=on",
            "-c",
            "archive_command=false",
            "-c",
            "listen_addresses=",
            "template1",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        self.run_tool(
            "crash recovery (postgres --single)",
            "postgres",
            args,
            CRASH_RECOVERY_TIMEOUT,
            &[],
        )
        .await?;
        Ok(())
    }

    fn require_stopped(&self, what: &str) -> Result<(), PgError> {
        if self.postmaster_pid().is_some() {
            return Err(failed(what, "postgres is running; stop it first"));
        }
        Ok(())
    }

    /// Writes `pg_wal/<tl>.history` for every timeline up to `used` that has none, so that
    /// the next promotion picks a number above `used` (see [`Postgres::promote`]). Each file
    /// holds the cluster's history lines leading to that timeline, as a replica on it would
    /// have fetched them, after a comment saying why it is there.
    fn reserve_timelines(&self, used: Timeline, history: &[HistoryLine]) -> Result<(), PgError> {
        let wal = self.data_dir.join("pg_wal");
        for tl in 2..=used.0 {
            let path = wal.join(format!("{tl:08X}.history"));
            if path.exists() {
                continue;
            }
            let text = conf::reserved_history(Timeline(tl), history);
            std::fs::write(&path, text)?;
            tracing::info!(
                timeline = tl,
                "reserved a timeline the cluster already used"
            );
        }
        Ok(())
    }

    /// Leader facts for the divergence check: current timeline and its history file.
    async fn leader_timeline(
        &self,
        leader: &Upstream,
    ) -> Result<(Timeline, Vec<conf::HistoryEntry>), PgError> {
        let c = connect(&self.remote_sql_config(leader), REMOTE_CONNECT_TIMEOUT).await?;
        let row = bounded(
            SQL_TIMEOUT,
            "reading the leader's timeline",
            c.query_one(
                "SELECT pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() THEN NULL \
                 ELSE pg_walfile_name(pg_current_wal_lsn()) END",
                &[],
            ),
        )
        .await?;
        let in_recovery: bool = row.get(0);
        if in_recovery {
            // A standby's timeline and history can still move: deciding now could be wrong.
            return Err(failed(
                "checking the leader's timeline",
                "leader is in recovery",
            ));
        }
        let walfile: String = row.get(1);
        let tl = conf::timeline_from_walfile(&walfile)
            .ok_or_else(|| failed("checking the leader's timeline", "bad WAL file name"))?;
        if tl.0 <= 1 {
            return Ok((tl, Vec::new()));
        }
        let path = format!("pg_wal/{:08X}.history", tl.0);
        let row = bounded(
            SQL_TIMEOUT,
            "reading the leader's timeline history",
            c.query_one("SELECT pg_read_binary_file($1)", &[&path]),
        )
        .await?;
        let bytes: Vec<u8> = row.get(0);
        Ok((tl, conf::parse_history(&String::from_utf8_lossy(&bytes))))
    }

    /// pg_rewind takes the source's timeline from its control file, which a promoted server
    /// only updates at its first checkpoint. Rewinding before that would find "same timeline,
    /// nothing to do" and leave the diverged data in place, so refuse until it happened (the
    /// HA loop checkpoints right after promoting; the caller retries next cycle).
    async fn ensure_leader_checkpointed(&self, leader: &Upstream) -> Result<(), PgError> {
        let c = connect(&self.remote_sql_config(leader), REMOTE_CONNECT_TIMEOUT).await?;
        let row = bounded(
            SQL_TIMEOUT,
            "checking the leader's checkpoint",
            c.query_one(
                "SELECT pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() THEN NULL \
                 ELSE pg_walfile_name(pg_current_wal_lsn()) END, \
                 (SELECT timeline_id FROM pg_control_checkpoint())::int4",
                &[],
            ),
        )
        .await?;
        let in_recovery: bool = row.get(0);
        let current = row
            .get::<_, Option<String>>(1)
            .as_deref()
            .and_then(conf::timeline_from_walfile);
        let checkpoint: Option<i32> = row.get(2);
        if in_recovery {
            return Err(failed("pg_rewind", "the source is in recovery"));
        }
        if current.map(|t| t.0 as i32) != checkpoint {
            return Err(failed(
                "pg_rewind",
                "the leader has not checkpointed since its promotion yet; retry later",
            ));
        }
        Ok(())
    }

    fn connstring_for(&self, up: &Upstream, user: &str, dbname: Option<&str>) -> String {
        let mut parts = vec![
            format!("host={}", conf::libpq_quote(&up.host)),
            format!("port={}", up.port),
            format!("user={}", conf::libpq_quote(user)),
            format!("application_name={}", conf::libpq_quote(self.name.as_str())),
            "connect_timeout=5".to_string(),
        ];
        if let Some(db) = dbname {
            parts.push(format!("dbname={}", conf::libpq_quote(db)));
        }
        parts.join(" ")
    }

    /// Gathers the SQL part of observe() into `st`.
    async fn observe_sql(&self, c: Arc<Client>, st: &mut PgStatus) -> Result<(), PgError> {
        let row = bounded(
            SQL_TIMEOUT,
            "observing postgres",
            c.query_one(
                "SELECT pg_is_in_recovery(), \
                 current_setting('server_version_num')::int4, \
                 pg_postmaster_start_time()::text, \
                 current_setting('synchronous_standby_names'), \
                 CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_flush_lsn()::text END, \
                 CASE WHEN pg_is_in_recovery() THEN NULL \
                      ELSE pg_walfile_name(pg_current_wal_lsn()) END, \
                 CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn()::text END, \
                 CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()::text END, \
                 CASE WHEN pg_is_in_recovery() THEN pg_last_xact_replay_timestamp()::text END, \
                 CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() ELSE false END, \
                 (SELECT timeline_id FROM pg_control_checkpoint())::int4",
                &[],
            ),
        )
        .await?;
        let in_recovery: bool = row.get(0);
        st.accepting_connections = true;
        st.in_recovery = Some(in_recovery);
        st.server_version = row.get::<_, Option<i32>>(1).map(|v| v as u32);
        st.postmaster_start_time = row.get(2);
        st.synchronous_standby_names = row.get(3);
        st.flush_lsn = lsn(row.get(4));
        let walfile: Option<String> = row.get(5);
        st.receive_lsn = lsn(row.get(6));
        st.replay_lsn = lsn(row.get(7));
        st.replay_timestamp = row.get(8);
        st.replay_paused = row.get::<_, Option<bool>>(9).unwrap_or(false);
        let checkpoint_tl: Option<i32> = row.get(10);

        if in_recovery {
            let rows = bounded(
                SQL_TIMEOUT,
                "reading pg_stat_wal_receiver",
                c.query(
                    "SELECT status, received_tli::int4, written_lsn::text, sender_host, \
                     sender_port::int4 FROM pg_stat_wal_receiver",
                    &[],
                ),
            )
            .await?;
            let receiver = rows.first();
            let status: Option<String> = receiver.and_then(|r| r.get(0));
            let received_tli: Option<i32> = receiver.and_then(|r| r.get(1));
            let written = lsn(receiver.and_then(|r| r.get(2)));
            st.receive_lsn = match (st.receive_lsn, written) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            st.replication_state = Some(if status.as_deref() == Some("streaming") {
                "streaming".to_string()
            } else {
                "in archive recovery".to_string()
            });
            if let Some(r) = receiver {
                let host: Option<String> = r.get(3);
                let port: Option<i32> = r.get(4);
                if let (Some(h), Some(p)) = (host, port) {
                    st.upstream = Some(format!("{h}:{p}"));
                }
            }
            st.timeline = received_tli
                .filter(|t| *t > 0)
                .or(checkpoint_tl)
                .map(|t| Timeline(t as u32))
                .or(st.control_timeline);
        } else {
            st.timeline = walfile.as_deref().and_then(conf::timeline_from_walfile);
        }

        let rows = bounded(
            SQL_TIMEOUT,
            "reading pg_stat_replication",
            c.query(
                "SELECT usename::text, application_name, client_addr::text, state, sync_state, \
                 sync_priority, write_lsn::text, flush_lsn::text, replay_lsn::text \
                 FROM pg_stat_replication",
                &[],
            ),
        )
        .await?;
        st.replication = rows
            .iter()
            .map(|r| ReplicationRow {
                usename: r.get::<_, Option<String>>(0).unwrap_or_default(),
                application_name: r.get::<_, Option<String>>(1).unwrap_or_default(),
                client_addr: r.get(2),
                state: r.get::<_, Option<String>>(3).unwrap_or_default(),
                sync_state: r.get::<_, Option<String>>(4).unwrap_or_default(),
                sync_priority: r.get::<_, Option<i32>>(5).unwrap_or_default(),
                write_lsn: lsn(r.get(6)),
                flush_lsn: lsn(r.get(7)),
                replay_lsn: lsn(r.get(8)),
            })
            .collect();

        let rows = bounded(
            SQL_TIMEOUT,
            "reading pg_replication_slots",
            c.query(
                "SELECT slot_name::text, slot_type, active, restart_lsn::text \
                 FROM pg_replication_slots ORDER BY slot_name",
                &[],
            ),
        )
        .await?;
        st.slots = rows
            .iter()
            .map(|r| SlotInfo {
                name: r.get(0),
                physical: r.get::<_, String>(1) == "physical",
                active: r.get(2),
                restart_lsn: lsn(r.get(3)),
            })
            .collect();

        // Restart-only parameters changed in the files: running value vs. the last value in
        // the config files (what a restart would apply), else what we generated.
        let rows = bounded(
            SQL_TIMEOUT,
            "reading pending restarts",
            c.query(
                "SELECT s.name, s.setting, (SELECT f.setting FROM pg_file_settings f \
                 WHERE f.name = s.name ORDER BY f.seqno DESC LIMIT 1) \
                 FROM pg_settings s WHERE s.pending_restart",
                &[],
            ),
        )
        .await?;
        let configured = self.merged_parameters();
        st.pending_restart = rows
            .iter()
            .map(|r| {
                let name: String = r.get(0);
                let old: Option<String> = r.get(1);
                let new: Option<String> = r
                    .get::<_, Option<String>>(2)
                    .or_else(|| configured.get(&name).cloned());
                (name, (old.unwrap_or_default(), new.unwrap_or_default()))
            })
            .collect();
        Ok(())
    }

    /// Local timeline for timeline_history(): SQL on a running primary, else pg_controldata.
    async fn current_timeline(&self) -> Result<Timeline, PgError> {
        if self.postmaster_pid().is_some()
            && let Ok(Some(tl)) = self
                .with_client(|c| async move {
                    let row = bounded(
                        SQL_TIMEOUT,
                        "reading the timeline",
                        c.query_one(
                            "SELECT CASE WHEN pg_is_in_recovery() THEN NULL \
                             ELSE pg_walfile_name(pg_current_wal_lsn()) END",
                            &[],
                        ),
                    )
                    .await?;
                    Ok(row
                        .get::<_, Option<String>>(0)
                        .as_deref()
                        .and_then(conf::timeline_from_walfile))
                })
                .await
        {
            return Ok(tl);
        }
        self.controldata()
            .await?
            .checkpoint_timeline()
            .ok_or_else(|| failed("reading the timeline", "pg_controldata has no timeline"))
    }
}

/// File mtime as ISO 8601 in UTC with an explicit `+00:00`, as Patroni writes history stamps.
fn mtime_iso(path: &Path) -> Option<String> {
    let t = std::fs::metadata(path).ok()?.modified().ok()?;
    let dt: chrono::DateTime<chrono::Utc> = t.into();
    Some(dt.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string())
}

#[async_trait]
impl Postgres for LocalPostgres {
    async fn observe(&self) -> PgStatus {
        let mut st = PgStatus {
            data_dir_initialized: self.initialized(),
            ..Default::default()
        };
        if st.data_dir_initialized
            && let Ok(cd) = self.controldata().await
        {
            st.sysid = cd.sysid();
            st.control_state = cd.state();
            st.control_timeline = cd.checkpoint_timeline();
        }
        st.running = self.postmaster_pid().is_some();
        if st.running {
            let mut sql = st.clone();
            let mut r = self
                .with_client(|c| async { self.observe_sql(c, &mut sql).await })
                .await;
            if matches!(r, Err(PgError::Sql(_))) {
                // The cached connection may predate a server restart: one fresh attempt, so a
                // healthy server is not reported as "not accepting connections" for a cycle.
                // Timeouts are not retried (observe must stay short).
                sql = st.clone();
                r = self
                    .with_client(|c| async { self.observe_sql(c, &mut sql).await })
                    .await;
            }
            if r.is_ok() {
                st = sql;
            }
        } else {
            self.drop_client().await;
        }
        st
    }

    async fn apply_dynamic_config(&self, config: &DynamicConfig) -> Result<bool, PgError> {
        let cfg = self.cfg();
        self.write_config_checked(&cfg, config).await
    }

    async fn set_local_config(&self, cfg: &AgentConfig) -> Result<bool, PgError> {
        let dynamic = self.shared().dynamic.clone();
        let needs_reload = self.write_config_checked(cfg, &dynamic).await?;
        // Credentials may have changed: the next observation connects with the new ones.
        self.drop_client().await;
        Ok(needs_reload)
    }

    async fn initdb(&self) -> Result<(), PgError> {
        if self.initialized() {
            return Err(failed("initdb", "data directory already holds a cluster"));
        }
        let user_args = conf::initdb_args(&self.cfg().bootstrap.initdb)
            .map_err(|e| failed("initdb options", e))?;
        // Never wipe something we did not create: a non-empty directory is refused here, so
        // the cleanup after a failed initdb below only removes initdb's own leftovers.
        if std::fs::read_dir(&self.data_dir).is_ok_and(|mut d| d.next().is_some()) {
            return Err(failed("initdb", "data directory is not empty"));
        }
        self.prepare_empty_data_dir()?;
        let parent = self.data_dir.parent().unwrap_or(&self.data_dir);
        let pwfile = parent.join(format!(".pgherd-initdb-pw.{}", std::process::id()));
        {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&pwfile)?;
            f.write_all(
                self.cfg()
                    .postgresql
                    .authentication
                    .superuser
                    .password
                    .as_bytes(),
            )?;
            f.write_all(b"\n")?;
        }
        self.chown(&pwfile)?;
        let mut args: Vec<OsString> = vec![
            "-D".into(),
            self.data_dir.clone().into(),
            format!(
                "--username={}",
                self.cfg().postgresql.authentication.superuser.username
            )
            .into(),
            {
                let mut s = OsString::from("--pwfile=");
                s.push(&pwfile);
                s
            },
        ];
        args.extend(user_args.into_iter().map(OsString::from));
        let mut cmd = Command::new(self.bin_dir.join("initdb"));
        cmd.args(args);
        // initdb takes the locale from the environment unless told: keep the agent's locale.
        let r = self
            .run_cmd("initdb", cmd, INITDB_TIMEOUT, &[], false, false)
            .await;
        let _ = std::fs::remove_file(&pwfile);
        if let Err(e) = r {
            // A half-initialised directory would make the next attempt refuse to start.
            let _ = self.wipe_contents();
            return Err(e);
        }
        // Add bootstrap.pg_hba to initdb's pg_hba.conf (it also serves as the fallback for the
        // generated one, see hba_lines). initdb's postgresql.conf becomes the base file inside
        // write_config, under its lock: renaming it here too raced with the HA loop's
        // apply_dynamic_config and could move our generated file onto the base file.
        if !self.cfg().bootstrap.pg_hba.is_empty() {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(self.data_dir.join("pg_hba.conf"))?;
            for l in &self.cfg().bootstrap.pg_hba {
                writeln!(f, "{l}")?;
            }
        }
        self.shared().standby = None;
        self.write_config()?;
        Ok(())
    }

    async fn post_bootstrap(&self) -> Result<(), PgError> {
        let a = self.cfg().postgresql.authentication.clone();
        let c = connect(&self.local_sql_config("0"), SQL_CONNECT_TIMEOUT * 5).await?;
        let role_exists = |name: String| {
            let c = &c;
            async move {
                let row = bounded(
                    SQL_TIMEOUT,
                    "looking up a role",
                    c.query_one("SELECT count(*) FROM pg_roles WHERE rolname = $1", &[&name]),
                )
                .await?;
                Ok::<bool, PgError>(row.get::<_, i64>(0) > 0)
            }
        };
        let exec = |sql: String, what: &'static str| {
            let c = &c;
            async move { bounded(SQL_TIMEOUT * 5, what, c.batch_execute(&sql)).await }
        };
        // Keep the password statements below out of the server log and pg_stat_statements,
        // whatever logging the user configured.
        exec(
            "SET log_statement TO 'none'; SET log_min_duration_statement TO -1; \
             SET log_min_error_statement TO 'log'; SET pg_stat_statements.track_utility TO off"
                .to_string(),
            "silencing statement logging",
        )
        .await?;
        exec(
            format!(
                "ALTER ROLE {} WITH SUPERUSER LOGIN PASSWORD {}",
                conf::quote_ident(&a.superuser.username),
                conf::quote_literal(&a.superuser.password)
            ),
            "setting the superuser password",
        )
        .await?;
        let mut roles = vec![(&a.replication, "REPLICATION LOGIN", "the replication role")];
        if let Some(r) = &a.rewind {
            roles.push((r, "LOGIN", "the rewind role"));
        }
        for (creds, attrs, what) in roles {
            if creds.username == a.superuser.username {
                continue;
            }
            let verb = if role_exists(creds.username.clone()).await? {
                "ALTER"
            } else {
                "CREATE"
            };
            exec(
                format!(
                    "{verb} ROLE {} WITH {attrs} PASSWORD {}",
                    conf::quote_ident(&creds.username),
                    conf::quote_literal(&creds.password)
                ),
                what,
            )
            .await?;
        }
        if let Some(r) = &a.rewind
            && r.username != a.superuser.username
        {
            // What pg_rewind reads on the source, and what needs_rewind reads (history file).
            exec(
                format!(
                    "GRANT EXECUTE ON FUNCTION pg_catalog.pg_ls_dir(text, boolean, boolean), \
                     pg_catalog.pg_stat_file(text, boolean), \
                     pg_catalog.pg_read_binary_file(text), \
                     pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean) TO {}",
                    conf::quote_ident(&r.username)
                ),
                "granting rewind functions",
            )
            .await?;
        }
        drop(c);
        if let Some(script) = self
            .cfg()
            .bootstrap
            .post_bootstrap
            .clone()
            .filter(|s| !s.trim().is_empty())
        {
            self.write_pgpass()?;
            let connstr = format!(
                "dbname={} user={} host={} port={}",
                conf::libpq_quote(&self.cfg().postgresql.database),
                conf::libpq_quote(&a.superuser.username),
                conf::libpq_quote(&self.socket_dir.to_string_lossy()),
                self.port()
            );
            // Patroni calls the script with the connection string as its only argument; the
            // password comes from PGPASSFILE. It runs as the agent's user, not as postgres.
            let mut cmd = Command::new("/bin/sh");
            cmd.arg("-c")
                .arg(format!("{script} \"$1\""))
                .arg("post_bootstrap")
                .arg(connstr);
            for k in SCRUBBED_ENV {
                cmd.env_remove(k);
            }
            cmd.env("PGPASSFILE", &self.pgpass)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true);
            let out = tokio::time::timeout(POST_BOOTSTRAP_TIMEOUT, cmd.output())
                .await
                .map_err(|_| PgError::Timeout(POST_BOOTSTRAP_TIMEOUT, "post_bootstrap".into()))??;
            if !out.status.success() {
                return Err(failed(
                    "post_bootstrap script",
                    format!(
                        "{}: {}",
                        out.status,
                        tail(&String::from_utf8_lossy(&out.stderr), 2000)
                    ),
                ));
            }
        }
        Ok(())
    }

    async fn basebackup(&self, from: &Upstream) -> Result<(), PgError> {
        self.require_stopped("basebackup")?;
        if self.initialized() {
            // Replacing a cluster is a decision for the caller (wipe_data_dir first).
            return Err(failed(
                "basebackup",
                "data directory holds a cluster; wipe it first",
            ));
        }
        let user_args = conf::basebackup_args(self.cfg().postgresql.basebackup.as_ref())
            .map_err(|e| failed("basebackup options", e))?;
        self.write_pgpass()?;
        let cfg = self.cfg();
        let repl = &cfg.postgresql.authentication.replication.username;
        let dsn = self.connstring_for(from, repl, None);
        let mut last = None;
        // Two attempts: a clone often fails on a transient (upstream restarting, network).
        for attempt in 1..=2 {
            self.prepare_empty_data_dir()?;
            let mut args: Vec<OsString> = vec![
                {
                    let mut s = OsString::from("--pgdata=");
                    s.push(&self.data_dir);
                    s
                },
                "--wal-method=stream".into(),
                format!("--dbname={dsn}").into(),
                "--no-password".into(),
            ];
            args.extend(user_args.iter().map(OsString::from));
            let r = self
                .run_tool(
                    "pg_basebackup",
                    "pg_basebackup",
                    args,
                    BASEBACKUP_TIMEOUT,
                    &[("PGPASSFILE", self.pgpass.clone().into())],
                )
                .await;
            match r {
                Ok(_) => {
                    let mut sh = self.shared();
                    sh.standby = Some(StandbySettings::default());
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(attempt, error = %e, "pg_basebackup failed; wiping the partial copy");
                    // A partial copy must never be started: wipe it.
                    self.wipe_contents()?;
                    last = Some(e);
                    if attempt == 1 {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| failed("pg_basebackup", "no attempt made")))
    }

    async fn wipe_data_dir(&self) -> Result<(), PgError> {
        self.require_stopped("wiping the data directory")?;
        self.drop_client().await;
        self.wipe_contents()
    }

    async fn start(&self, start_as: &StartAs, timeout: Duration) -> Result<(), PgError> {
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

    async fn stop(&self, mode: StopMode, timeout: Duration) -> Result<(), PgError> {
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

    async fn promote(
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

    async fn follow(&self, upstream: Option<&Upstream>) -> Result<(), PgError> {
        let settings = self.standby_settings(upstream);
        self.shared().standby = Some(settings);
        let changed = self.write_config()?;
        if !self.initialized() {
            // Remembered for the first start after a clone.
        } else if self.postmaster_pid().is_none() {
            // Next start comes up as a standby of `upstream`.
            self.write_signals(true)?;
        } else if changed {
            // primary_conninfo / primary_slot_name are reloadable since PG 13: the walreceiver
            // restarts with the new source without a server restart.
            self.reload().await?;
        }
        Ok(())
    }

    async fn reload(&self) -> Result<(), PgError> {
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

    async fn checkpoint(&self) -> Result<(), PgError> {
        // Own connection without statement_timeout: a checkpoint may legitimately take minutes.
        let c = connect(&self.local_sql_config("0"), SQL_CONNECT_TIMEOUT).await?;
        bounded(
            CHECKPOINT_TIMEOUT,
            "CHECKPOINT",
            c.batch_execute("CHECKPOINT"),
        )
        .await
    }

    async fn needs_rewind(&self, leader: &Upstream) -> Result<bool, PgError> {
        self.require_stopped("checking for divergence")?;
        let mut cd = self.controldata().await?;
        if matches!(
            cd.state(),
            Some(
                ControlState::InProduction
                    | ControlState::InCrashRecovery
                    | ControlState::ShuttingDown
            )
        ) {
            // A crashed/killed primary: its checkpoint says nothing about how far its WAL goes.
            // Recover locally first so the shutdown checkpoint marks the real end of WAL.
            self.crash_recovery().await?;
            cd = self.controldata().await?;
        }
        let clean_primary = cd.state() == Some(ControlState::ShutDown);
        let local = cd
            .reached()
            .ok_or_else(|| failed("checking for divergence", "pg_controldata lacks positions"))?;
        let (leader_tl, history) = self.leader_timeline(leader).await?;
        let need = conf::rewind_needed(local, leader_tl, &history, clean_primary);
        tracing::info!(
            local_timeline = %local.0, local_lsn = %local.1, leader_timeline = %leader_tl, need,
            "divergence check"
        );
        Ok(need)
    }

    async fn rewind(&self, leader: &Upstream) -> Result<(), PgError> {
        self.require_stopped("pg_rewind")?;
        let cd = self.controldata().await?;
        if !matches!(
            cd.state(),
            Some(ControlState::ShutDown | ControlState::ShutDownInRecovery)
        ) {
            // pg_rewind refuses a target that was not shut down cleanly.
            self.crash_recovery().await?;
        }
        self.ensure_leader_checkpointed(leader).await?;
        self.write_pgpass()?;
        let cfg = self.cfg();
        let auth = &cfg.postgresql.authentication;
        let user = &auth.rewind.as_ref().unwrap_or(&auth.superuser).username;
        let dsn = self.connstring_for(leader, user, Some(&self.cfg().postgresql.database));
        let args: Vec<OsString> = vec![
            "-D".into(),
            self.data_dir.clone().into(),
            format!("--source-server={dsn}").into(),
        ];
        self.run_tool(
            "pg_rewind",
            "pg_rewind",
            args,
            REWIND_TIMEOUT,
            &[
                ("PGPASSFILE", self.pgpass.clone().into()),
                // Copying big relations must not hit a statement_timeout set on the source.
                ("PGOPTIONS", "-c statement_timeout=0".into()),
            ],
        )
        .await?;
        // pg_rewind copied the leader's config files: put ours back, as a standby of the leader.
        self.shared().standby = Some(self.standby_settings(Some(leader)));
        self.write_config()?;
        self.write_signals(true)?;
        Ok(())
    }

    async fn sync_slots(&self, wanted: &[String], keep: &[String]) -> Result<(), PgError> {
        let wanted: Vec<String> = wanted.to_vec();
        let keep: Vec<String> = keep.to_vec();
        self.with_client(|c| async move {
            let rows = bounded(
                SQL_TIMEOUT,
                "listing slots",
                c.query(
                    "SELECT slot_name::text, slot_type, active FROM pg_replication_slots",
                    &[],
                ),
            )
            .await?;
            let existing: Vec<(String, bool, bool)> = rows
                .iter()
                .map(|r| (r.get(0), r.get::<_, String>(1) == "physical", r.get(2)))
                .collect();
            for name in &wanted {
                if !existing.iter().any(|(n, _, _)| n == name) {
                    // immediately_reserve=true: WAL is kept from now on, before the replica
                    // connects, so it can stream from where its clone ended.
                    bounded(
                        SQL_TIMEOUT,
                        "creating a slot",
                        c.execute(
                            "SELECT pg_create_physical_replication_slot($1, true)",
                            &[name],
                        ),
                    )
                    .await?;
                }
            }
            for (name, physical, active) in &existing {
                if *physical && !*active && !wanted.contains(name) && !keep.contains(name) {
                    // An unknown inactive slot retains WAL forever and can fill the disk.
                    bounded(
                        SQL_TIMEOUT,
                        "dropping a slot",
                        c.execute("SELECT pg_drop_replication_slot($1)", &[name]),
                    )
                    .await?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn set_synchronous_standby_names(&self, value: &str) -> Result<(), PgError> {
        self.shared().synchronous_standby_names = Some(value.to_string());
        if self.write_config()? {
            self.reload().await?;
        }
        Ok(())
    }

    async fn timeline_history(&self) -> Result<Vec<HistoryLine>, PgError> {
        let tl = self.current_timeline().await?;
        if tl.0 <= 1 {
            return Ok(Vec::new());
        }
        let wal = self.data_dir.join("pg_wal");
        let path = wal.join(format!("{:08X}.history", tl.0));
        let entries = conf::parse_history(&std::fs::read_to_string(&path)?);
        // Each line records the birth of the next timeline; its `.history` file was written
        // then, so that file's mtime stamps the line.
        let lines = entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let child = entries.get(i + 1).map(|n| n.parent).unwrap_or(tl);
                HistoryLine {
                    parent_timeline: e.parent.0,
                    switchpoint: e.switchpoint.0,
                    reason: e.reason.clone(),
                    timestamp: mtime_iso(&wal.join(format!("{:08X}.history", child.0))),
                    new_leader: None,
                }
            })
            .collect();
        Ok(lines)
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
