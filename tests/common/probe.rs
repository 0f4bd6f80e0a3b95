//! A write probe for end-to-end tests: inserts a unique id every [`PROBE_INTERVAL`] through
//! HAProxy's primary port, each on a new connection (as an application reconnecting after a
//! fault would), and remembers which inserts were acknowledged, so a test can measure the
//! write-unavailable window and check that no acknowledged row was lost.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::deploy::pg;

/// How often the probe writes (the resolution of the measured outage).
pub const PROBE_INTERVAL: Duration = Duration::from_millis(50);

#[derive(Default)]
struct Record {
    acked: Vec<i64>,
    last_ok: Option<Instant>,
    max_gap: Duration,
    failures: usize,
}

/// A running probe; [`WriteProbe::stop`] ends it and reports.
pub struct WriteProbe {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    rec: Arc<Mutex<Record>>,
}

/// What a probe saw.
#[derive(Debug, Clone)]
pub struct ProbeReport {
    pub acked: Vec<i64>,
    /// Longest time between two acknowledged writes.
    pub max_gap: Duration,
    pub failures: usize,
}

impl WriteProbe {
    /// Creates table `probe` through `addr:port` and starts writing.
    pub async fn start(addr: &str, port: u16, password: &str) -> WriteProbe {
        let c = pg(addr, port, password)
            .await
            .expect("probe: connect through HAProxy");
        c.batch_execute(
            "CREATE TABLE IF NOT EXISTS probe(id bigint primary key, at timestamptz default now())",
        )
        .await
        .expect("probe: create table");
        let stop = CancellationToken::new();
        let rec = Arc::new(Mutex::new(Record::default()));
        let (addr, password) = (addr.to_string(), password.to_string());
        let (stop2, rec2) = (stop.clone(), rec.clone());
        let base = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
            * 1000;
        let task = tokio::spawn(async move {
            let mut id = base;
            while !stop2.is_cancelled() {
                id += 1;
                let ok = matches!(
                    tokio::time::timeout(Duration::from_secs(5), async {
                        let c = pg(&addr, port, &password).await.ok()?;
                        c.execute("INSERT INTO probe(id) VALUES ($1)", &[&id])
                            .await
                            .ok()
                    })
                    .await,
                    Ok(Some(_))
                );
                {
                    let mut r = rec2.lock().unwrap();
                    let now = Instant::now();
                    if ok {
                        if let Some(prev) = r.last_ok {
                            r.max_gap = r.max_gap.max(now - prev);
                        }
                        r.last_ok = Some(now);
                        r.acked.push(id);
                    } else {
                        r.failures += 1;
                    }
                }
                tokio::select! {
                    _ = stop2.cancelled() => break,
                    _ = tokio::time::sleep(PROBE_INTERVAL) => {}
                }
            }
        });
        WriteProbe { stop, task, rec }
    }

    /// The longest gap so far, and resets it (to measure one phase at a time).
    pub fn take_max_gap(&self) -> Duration {
        let mut r = self.rec.lock().unwrap();
        std::mem::take(&mut r.max_gap)
    }

    pub async fn stop(self) -> ProbeReport {
        self.stop.cancel();
        let _ = self.task.await;
        let r = self.rec.lock().unwrap();
        ProbeReport {
            acked: r.acked.clone(),
            max_gap: r.max_gap,
            failures: r.failures,
        }
    }
}

/// Acknowledged ids missing from table `probe` on the server at `addr:port` (the leader).
pub async fn lost_writes(addr: &str, port: u16, password: &str, acked: &[i64]) -> Vec<i64> {
    let c = pg(addr, port, password)
        .await
        .expect("connect to the leader");
    let rows = c
        .query("SELECT id FROM probe", &[])
        .await
        .expect("read probe");
    let have: std::collections::BTreeSet<i64> = rows.iter().map(|r| r.get(0)).collect();
    acked
        .iter()
        .filter(|id| !have.contains(id))
        .copied()
        .collect()
}
