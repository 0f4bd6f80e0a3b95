//! Helpers of the end-to-end provisioning tests on a namespace lab (`tests/deploy_lab.rs`,
//! `tests/deploy_systemd.rs`): the lab's lifetime, service PIDs from facts, SQL through
//! HAProxy, agent REST reads.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use pgherd::lab::{self, LabSpec};
use pgherd::provision::apply::{self, Fleet};
use pgherd::provision::plan::DeploySpec;
use pgherd::provision::services::Service;

/// Tears the lab down (state purged) when the test ends, unless `PGHERD_KEEP_LAB` is set.
pub struct LabGuard(pub LabSpec);

impl Drop for LabGuard {
    fn drop(&mut self) {
        if std::env::var_os("PGHERD_KEEP_LAB").is_none() {
            let _ = lab::down(&self.0, true);
        }
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// (etcd, agent, haproxy, postgres) pids per host.
pub async fn pids(s: &DeploySpec, fleet: &Fleet) -> BTreeMap<String, [Option<u32>; 4]> {
    let facts = apply::gather_all(s, fleet).await.expect("facts");
    facts
        .into_iter()
        .map(|(h, f)| {
            (
                h,
                [
                    f.service(Service::Etcd).pid,
                    f.service(Service::Agent).pid,
                    f.service(Service::Haproxy).pid,
                    f.postgres_pid,
                ],
            )
        })
        .collect()
}

/// A superuser connection to `host:port` (HAProxy's ports or PostgreSQL's).
pub async fn pg(
    host: &str,
    port: u16,
    password: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let conf = format!("host={host} port={port} user=postgres dbname=postgres connect_timeout=3");
    let mut c: tokio_postgres::Config = conf.parse().unwrap();
    c.password(password);
    let (client, conn) = c.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// GET `url` as JSON; `None` on any failure.
pub async fn get_json(url: &str) -> Option<serde_json::Value> {
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .ok()?;
    c.get(url).send().await.ok()?.json().await.ok()
}
