//! Direct writes to every node of a loopback cluster, each acknowledged one recorded with the
//! server's clock: the evidence for "never two writable primaries" (compare the nodes' ranges)
//! and for write outages (gaps between acknowledged writes).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::cluster::{Cluster, SUPERUSER_PW, eventually};

/// Direct writes to every node, each acknowledged one recorded as (node, server clock).
pub struct Writers {
    pub acked: Arc<Mutex<Vec<(usize, f64)>>>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    /// Starts one writer per node, each inserting `(node)` into `table` every 20 ms.
    pub fn start(c: &Cluster, table: &str) -> Writers {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let (stop, rx) = tokio::sync::watch::channel(false);
        let tasks = c
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let conn = format!(
                    "host=127.0.0.1 port={} user=postgres password={SUPERUSER_PW} dbname=postgres connect_timeout=1",
                    n.pg_port
                );
                let (acked, rx, table) = (acked.clone(), rx.clone(), table.to_string());
                tokio::spawn(async move {
                    let mut client = None;
                    while !*rx.borrow() {
                        if client.is_none()
                            && let Ok((cl, conn)) =
                                tokio_postgres::connect(&conn, tokio_postgres::NoTls).await
                        {
                            tokio::spawn(conn);
                            client = Some(cl);
                        }
                        if let Some(cl) = &client {
                            let q = format!(
                                "INSERT INTO {table}(node) VALUES ({i}) RETURNING extract(epoch from clock_timestamp())::float8"
                            );
                            match cl.query_one(&q, &[]).await {
                                Ok(row) => acked.lock().unwrap().push((i, row.get::<_, f64>(0))),
                                Err(e) if e.is_closed() || e.as_db_error().is_none() => {
                                    client = None
                                }
                                Err(_) => {} // read-only (a replica): try again
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                })
            })
            .collect();
        Writers { acked, stop, tasks }
    }

    /// Waits (bounded) until node `i` acknowledged a write.
    pub async fn wait_writable(&self, i: usize, what: &str) {
        eventually(Duration::from_secs(90), what, || async {
            self.acked
                .lock()
                .unwrap()
                .iter()
                .any(|(n, _)| *n == i)
                .then_some(())
        })
        .await;
    }

    pub async fn stop(self) -> Vec<(usize, f64)> {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        Arc::try_unwrap(self.acked).unwrap().into_inner().unwrap()
    }
}

/// The old primary's last acknowledged write came before the new one's first.
pub fn assert_no_overlap(acked: &[(usize, f64)], old: usize, new: usize) {
    let last_old = acked
        .iter()
        .filter(|(n, _)| *n == old)
        .map(|(_, t)| *t)
        .fold(f64::MIN, f64::max);
    let first_new = acked
        .iter()
        .filter(|(n, _)| *n == new)
        .map(|(_, t)| *t)
        .fold(f64::MAX, f64::min);
    assert!(
        last_old > f64::MIN,
        "node{old} acknowledged no write before the fault"
    );
    assert!(
        last_old < first_new,
        "two writable primaries: node{old} accepted a write at {last_old}, node{new} already at {first_new}"
    );
    eprintln!(
        "MEASURED node{old} fenced {:.2}s before node{new} took its first write",
        first_new - last_old
    );
}
