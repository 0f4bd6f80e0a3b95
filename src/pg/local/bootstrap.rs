//! A new data directory: initdb (password through a 0600 file, bootstrap.pg_hba appended),
//! then the roles and the `post_bootstrap` script once the first primary runs; or a clone of
//! another member by pg_basebackup, retried once and wiped when it fails.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::time::Duration;

use tokio::process::Command;

use super::process::{SCRUBBED_ENV, tail};
use super::sql::{SQL_CONNECT_TIMEOUT, SQL_TIMEOUT, bounded, connect};
use super::{LocalPostgres, failed};
use crate::pg::conf::{self, StandbySettings};
use crate::pg::{PgError, Upstream};

const INITDB_TIMEOUT: Duration = Duration::from_secs(300);
/// A clone copies the whole cluster; the bound only catches a hung transfer.
const BASEBACKUP_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
const POST_BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(600);

impl LocalPostgres {
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
    pub(super) fn wipe_contents(&self) -> Result<(), PgError> {
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

    /// [`Postgres::initdb`](crate::pg::Postgres::initdb).
    pub(super) async fn run_initdb(&self) -> Result<(), PgError> {
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

    /// [`Postgres::post_bootstrap`](crate::pg::Postgres::post_bootstrap): the superuser's password,
    /// the replication and rewind roles, then the `post_bootstrap` script.
    pub(super) async fn create_roles_and_run_post_bootstrap(&self) -> Result<(), PgError> {
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

    /// [`Postgres::basebackup`](crate::pg::Postgres::basebackup).
    pub(super) async fn clone_from(&self, from: &Upstream) -> Result<(), PgError> {
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
}
