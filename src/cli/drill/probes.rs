//! What a drill round writes while the fault runs, and what it remembers:
//! - the **client probe**: a new connection through the HAProxy primary ports (every HAProxy
//!   host, `target_session_attrs=read-write`) and one INSERT every 50 ms, as an application
//!   that reconnects after a fault would — the write-unavailable window;
//! - **direct writers**: one per PostgreSQL host, straight to its server, one INSERT every
//!   20 ms returning the server clock — which nodes took writes when (two primaries);
//! - every acknowledged id of both, checked on the final leader afterwards (lost writes).
//!
//! Ids are unique per drill run (`base` + a shared counter), rows go to `pgherd_drill_writes`.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::verdict::Ack;

/// The drill's table (created through HAProxy before the first round).
pub const TABLE_DDL: &str = "CREATE TABLE IF NOT EXISTS pgherd_drill_writes(id bigint PRIMARY \
                             KEY, node text NOT NULL, at timestamptz NOT NULL DEFAULT \
                             clock_timestamp())";

/// Bound of one write (connect + INSERT). Why 2 s: long enough for a loaded host, short enough
/// that a write stuck behind a lost synchronous standby or a dead server is given up and
/// counted as not acknowledged within the window it belongs to.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Cadence of the client probe (the resolution of the measured window).
const PROBE_INTERVAL: Duration = Duration::from_millis(50);
/// Cadence of each direct writer (the resolution of the two-primaries check).
const DIRECT_INTERVAL: Duration = Duration::from_millis(20);

#[derive(Default)]
pub struct Recorded {
    /// Client probe: when each acknowledged write completed.
    pub probe_ok: Vec<Instant>,
    pub probe_failed: u64,
    /// Direct writers: which node acknowledged a write at which server time.
    pub direct: Vec<Ack>,
    /// Every acknowledged id (probe and direct).
    pub acked: Vec<i64>,
}

pub struct Writers {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    pub rec: Arc<Mutex<Recorded>>,
}

/// A PostgreSQL server the direct writers reach: (member name, connection config).
pub type Target = (String, tokio_postgres::Config);

impl Writers {
    pub fn start(
        probe: tokio_postgres::Config,
        direct: Vec<Target>,
        next_id: Arc<AtomicI64>,
    ) -> Writers {
        let stop = CancellationToken::new();
        let rec = Arc::new(Mutex::new(Recorded::default()));
        let mut tasks = Vec::new();
        {
            let (stop, rec, next_id) = (stop.clone(), rec.clone(), next_id.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.is_cancelled() {
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    let ok = probe_write(&probe, id).await;
                    {
                        let mut r = rec.lock().unwrap_or_else(|p| p.into_inner());
                        if ok {
                            r.probe_ok.push(Instant::now());
                            r.acked.push(id);
                        } else {
                            r.probe_failed += 1;
                        }
                    }
                    tokio::time::sleep(PROBE_INTERVAL).await;
                }
            }));
        }
        for (node, conf) in direct {
            let (stop, rec, next_id) = (stop.clone(), rec.clone(), next_id.clone());
            tasks.push(tokio::spawn(async move {
                direct_writer(node, conf, next_id, rec, stop).await
            }));
        }
        Writers { stop, tasks, rec }
    }

    /// Stops every writer and waits for them (each ends within one write bound).
    pub async fn stop(self) -> Arc<Mutex<Recorded>> {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        self.rec
    }
}

async fn probe_write(conf: &tokio_postgres::Config, id: i64) -> bool {
    let attempt = async {
        let (c, conn) = conf.connect(tokio_postgres::NoTls).await.ok()?;
        tokio::spawn(conn);
        c.execute(
            "INSERT INTO pgherd_drill_writes(id, node) VALUES ($1, 'haproxy')",
            &[&id],
        )
        .await
        .ok()
    };
    matches!(
        tokio::time::timeout(WRITE_TIMEOUT, attempt).await,
        Ok(Some(_))
    )
}

async fn direct_writer(
    node: String,
    conf: tokio_postgres::Config,
    next_id: Arc<AtomicI64>,
    rec: Arc<Mutex<Recorded>>,
    stop: CancellationToken,
) {
    let mut client: Option<tokio_postgres::Client> = None;
    while !stop.is_cancelled() {
        if client.is_none()
            && let Ok(Ok((c, conn))) =
                tokio::time::timeout(WRITE_TIMEOUT, conf.connect(tokio_postgres::NoTls)).await
        {
            tokio::spawn(conn);
            client = Some(c);
        }
        if let Some(c) = &client {
            let id = next_id.fetch_add(1, Ordering::Relaxed);
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&id, &node];
            let q = c.query_one(
                "INSERT INTO pgherd_drill_writes(id, node) VALUES ($1, $2) \
                 RETURNING extract(epoch from clock_timestamp())::float8",
                &params,
            );
            match tokio::time::timeout(WRITE_TIMEOUT, q).await {
                Ok(Ok(row)) => {
                    let at: f64 = row.get(0);
                    let mut r = rec.lock().unwrap_or_else(|p| p.into_inner());
                    r.direct.push(Ack {
                        node: node.clone(),
                        at,
                    });
                    r.acked.push(id);
                    drop(r);
                }
                // A read-only replica refuses: normal, try again.
                Ok(Err(e)) if e.as_db_error().is_some() && !c.is_closed() => {}
                // Closed, broken or stuck (e.g. waiting for a lost synchronous standby): the
                // write's outcome is unknown, so it is not counted; reconnect.
                _ => client = None,
            }
        }
        tokio::time::sleep(DIRECT_INTERVAL).await;
    }
}
