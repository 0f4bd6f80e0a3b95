//! Connections to PostgreSQL and the short statements the controller runs: the persistent
//! local superuser connection (dropped on any error, re-made on the next use), connections to
//! another member for the rewind checks, libpq strings for the tools, and the slot, checkpoint,
//! pg_hba and configuration-load-time statements. Every connect and statement is bounded.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use super::LocalPostgres;
use crate::pg::conf;
use crate::pg::{PgError, Upstream};

/// Connecting to the local instance: it is on the same host, so a slow connect means it is
/// not accepting connections, and observe() must not hold up the HA cycle.
pub(super) const SQL_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound for the short SQL statements of observe() and friends.
pub(super) const SQL_TIMEOUT: Duration = Duration::from_secs(2);
/// Connecting to another member (leader checks before a rewind): network round trips.
pub(super) const REMOTE_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A CHECKPOINT writes all dirty buffers; on a big shared_buffers it takes minutes.
const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(600);

/// Error text of a tokio-postgres error: the server message when there is one. Statement text
/// (which may hold a password literal) is never part of it.
fn sql_err(e: tokio_postgres::Error) -> PgError {
    match e.as_db_error() {
        Some(db) => PgError::Sql(format!("{}: {}", db.severity(), db.message())),
        None => PgError::Sql(e.to_string()),
    }
}

pub(super) async fn bounded<T>(
    limit: Duration,
    what: &str,
    fut: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, PgError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(sql_err),
        Err(_) => Err(PgError::Timeout(limit, what.to_string())),
    }
}

pub(super) async fn connect(
    cfg: &tokio_postgres::Config,
    limit: Duration,
) -> Result<Client, PgError> {
    let (client, conn) = bounded(limit, "connecting to postgres", cfg.connect(NoTls)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

impl LocalPostgres {
    pub(super) fn local_sql_config(&self, statement_timeout: &str) -> tokio_postgres::Config {
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
    pub(super) fn remote_sql_config(&self, up: &Upstream) -> tokio_postgres::Config {
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

    pub(super) fn connstring_for(&self, up: &Upstream, user: &str, dbname: Option<&str>) -> String {
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

    pub(super) async fn drop_client(&self) {
        *self.client.lock().await = None;
    }

    /// Runs `f` on the persistent connection; an error drops the connection so the next call
    /// reconnects (the server may have restarted in between).
    pub(super) async fn with_client<T, F, Fut>(&self, f: F) -> Result<T, PgError>
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

    /// `pg_conf_load_time()` as seen by a new backend (i.e. the postmaster's).
    pub(super) async fn fresh_conf_load_time(&self) -> Result<String, PgError> {
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
    pub(super) async fn hba_errors(&self) -> Result<Vec<String>, PgError> {
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

    /// [`Postgres::checkpoint`](crate::pg::Postgres::checkpoint).
    pub(super) async fn run_checkpoint(&self) -> Result<(), PgError> {
        // Own connection without statement_timeout: a checkpoint may legitimately take minutes.
        let c = connect(&self.local_sql_config("0"), SQL_CONNECT_TIMEOUT).await?;
        bounded(
            CHECKPOINT_TIMEOUT,
            "CHECKPOINT",
            c.batch_execute("CHECKPOINT"),
        )
        .await
    }

    /// [`Postgres::sync_slots`](crate::pg::Postgres::sync_slots): creates the wanted physical slots,
    /// drops inactive physical ones neither wanted nor kept.
    pub(super) async fn sync_physical_slots(
        &self,
        wanted: &[String],
        keep: &[String],
    ) -> Result<(), PgError> {
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
}
