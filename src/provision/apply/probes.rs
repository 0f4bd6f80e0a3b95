//! The readiness waits of a run: polling until etcd is healthy, an agent answers, leads or
//! streams, or HAProxy routes the primary port to the leader only, each bounded by its step's
//! timeout and failing with what the host reports.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use super::{Fleet, Progress, ProvisionError};
use crate::provision::agent_client::{AgentClient, AgentError};
use crate::provision::desired::DeploySpec;
use crate::provision::playbook::WaitCondition;
use crate::provision::remote::agent_client;
use crate::provision::services::Service;
use crate::transport::{Transport, shell_quote};

/// Polls `probe` every 300 ms until it returns true or `timeout` passes.
pub(super) async fn wait_until<F, Fut>(
    host: &str,
    what: &str,
    timeout: Duration,
    mut probe: F,
) -> Result<(), ProvisionError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if probe().await {
            return Ok(());
        }
        if start.elapsed() > timeout {
            return Err(ProvisionError::Wait {
                host: host.to_string(),
                what: what.to_string(),
                timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Whether the etcd cluster answers healthy on every member (asked from `t`, an etcd host).
async fn etcd_healthy(t: &dyn Transport, endpoints: &str) -> bool {
    let cmd = format!(
        "ETCDCTL_API=3 etcdctl --endpoints={} --dial-timeout=1s --command-timeout=2s endpoint health",
        shell_quote(endpoints)
    );
    matches!(t.run(&cmd, Duration::from_secs(10)).await, Ok(o) if o.success())
}

/// HAProxy's stats page: it answers from memory, 2 s covers a loaded host.
const STATS_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether `member`'s agent reports a streaming replica (`GET /patroni`).
async fn replica_streaming(agents: &AgentClient, member: &str) -> bool {
    agents
        .patroni(member)
        .await
        .is_ok_and(|d| d.streaming_replica())
}

/// What a member's agent says about itself, for errors: role, state and the last clone /
/// bootstrap / config error it reports.
async fn agent_reason(agents: &AgentClient, member: &str) -> String {
    match agents.patroni(member).await {
        Ok(d) => d.reason(),
        Err(AgentError::Decode { .. }) => "an unreadable status".into(),
        Err(_) => "no answer from its REST API".into(),
    }
}

/// Whether a PostgreSQL server answers at `addr` (directly or through a proxy): sends the
/// protocol's SSLRequest and expects the one-byte answer (`S` or `N`). A proxy with no
/// healthy backend accepts and then closes instead.
pub async fn postgres_answers(addr: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        // Length 8, code 80877103: the SSLRequest every libpq client may send first.
        s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
            .await
            .ok()?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.ok()?;
        Some(b[0] == b'N' || b[0] == b'S')
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(3), probe).await,
        Ok(Some(true))
    )
}

/// Whether HAProxy's stats CSV shows `<cluster>_primary` routing to `leader` only and
/// `<cluster>_replicas` not routing to it (and to at least one replica when there are some).
pub fn haproxy_settled(csv: &str, cluster: &str, leader: &str, has_replicas: bool) -> bool {
    let primary_px = format!("{cluster}_primary");
    let replica_px = format!("{cluster}_replica");
    let mut primary_up = Vec::new();
    let mut replica_up = Vec::new();
    for line in csv.lines().filter(|l| !l.starts_with('#')) {
        let f: Vec<&str> = line.split(',').collect();
        // pxname, svname, ... status is the 18th column (index 17).
        let (Some(px), Some(sv), Some(status)) = (f.first(), f.get(1), f.get(17)) else {
            continue;
        };
        if *sv == "FRONTEND" || *sv == "BACKEND" || !status.starts_with("UP") {
            continue;
        }
        if *px == primary_px {
            primary_up.push(sv.to_string());
        } else if px.starts_with(&replica_px) {
            replica_up.push(sv.to_string());
        }
    }
    primary_up == [leader.to_string()]
        && !replica_up.iter().any(|s| s == leader)
        && (!has_replicas || !replica_up.is_empty())
}

/// Which postgres host currently leads (asks each agent's `/primary`).
pub async fn find_leader(spec: &DeploySpec) -> Option<String> {
    agent_client(spec).find_primary().await
}

/// Waits until `svc` is healthy on `host` after a serial service step changed it there, so a
/// rolling restart never takes a second member down before the first is back.
pub(super) async fn wait_service_healthy(
    spec: &DeploySpec,
    fleet: &Fleet,
    host: &str,
    svc: Service,
    timeout: Duration,
    progress: &Progress,
) -> Result<(), ProvisionError> {
    let agents = agent_client(spec);
    progress.msg(host, &format!("waiting until {svc} is healthy"));
    match svc {
        Service::Etcd => {
            let t = fleet[host].clone();
            let endpoints = etcd_endpoints(spec);
            wait_until(host, "the etcd cluster is healthy", timeout, || {
                etcd_healthy(t.as_ref(), &endpoints)
            })
            .await
        }
        Service::Agent => {
            wait_until(host, "its agent answers (GET /health)", timeout, || {
                let agents = agents.clone();
                async move { matches!(agents.health(host, "/health").await, Ok(200)) }
            })
            .await
        }
        Service::Haproxy => {
            let addr = spec
                .host(host)
                .map(|h| format!("{}:{}", h.address, spec.primary_port))
                .unwrap_or_default();
            wait_until(host, "HAProxy's primary port answers", timeout, || {
                postgres_answers(&addr)
            })
            .await
        }
    }
}

fn etcd_endpoints(spec: &DeploySpec) -> String {
    spec.hosts
        .iter()
        .filter(|h| h.roles.etcd)
        .map(|h| spec.etcd_endpoint(h))
        .collect::<Vec<_>>()
        .join(",")
}

/// Runs `wait` on every host of `hosts` at once; all errors are collected.
async fn wait_all<F, Fut>(hosts: Vec<String>, wait: F) -> Result<(), ProvisionError>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<(), ProvisionError>> + Send + 'static,
{
    let mut set = JoinSet::new();
    for h in hosts {
        set.spawn(wait(h));
    }
    let mut errs = Vec::new();
    while let Some(j) = set.join_next().await {
        if let Err(e) = j.expect("wait task panicked") {
            errs.push(e);
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(ProvisionError::from_many(errs))
    }
}

/// A `wait_for` step: polls `condition` on the step's hosts until it holds or `timeout`.
pub(super) async fn wait_condition(
    spec: &DeploySpec,
    fleet: &Fleet,
    hosts: Vec<String>,
    condition: WaitCondition,
    timeout: Duration,
    progress: &Progress,
) -> Result<(), ProvisionError> {
    let agents = agent_client(spec);
    let spec = Arc::new(spec.clone());
    for h in &hosts {
        progress.msg(h, &format!("waiting until {}", condition_text(condition)));
    }
    match condition {
        WaitCondition::EtcdHealthy => {
            wait_all(hosts, |h| {
                let t = fleet[&h].clone();
                let endpoint = spec
                    .host(&h)
                    .map(|x| spec.etcd_endpoint(x))
                    .unwrap_or_default();
                async move {
                    wait_until(&h, "its etcd member is healthy", timeout, || {
                        etcd_healthy(t.as_ref(), &endpoint)
                    })
                    .await
                }
            })
            .await
        }
        WaitCondition::AgentApiUp => {
            wait_all(hosts, |h| {
                let agents = agents.clone();
                async move {
                    wait_until(&h, "its agent answers GET /health", timeout, || {
                        let agents = agents.clone();
                        let h = h.clone();
                        // Any status is an answer: the agent runs, whatever PostgreSQL does.
                        async move { agents.health(&h, "/health").await.is_ok() }
                    })
                    .await
                }
            })
            .await
        }
        WaitCondition::LeaderElected => {
            let first = hosts.first().cloned().unwrap_or_else(|| "-".into());
            wait_until(&first, "a member holds the leader key", timeout, || {
                let spec = spec.clone();
                async move { find_leader(&spec).await.is_some() }
            })
            .await
        }
        WaitCondition::ReplicasStreaming => {
            wait_all(hosts, |h| {
                let agents = agents.clone();
                async move {
                    let r = wait_until(
                        &h,
                        "it leads or streams from the leader as a replica",
                        timeout,
                        || {
                            let agents = agents.clone();
                            let h = h.clone();
                            async move {
                                // A member started on a cluster that lost its leader may
                                // itself lead now.
                                replica_streaming(&agents, &h).await || agents.is_primary(&h).await
                            }
                        },
                    )
                    .await;
                    // A member that never streams: say what its agent reports (e.g. the
                    // pg_basebackup error), not only that the wait ran out.
                    match r {
                        Err(ProvisionError::Wait {
                            host,
                            what,
                            timeout,
                        }) => Err(ProvisionError::Wait {
                            what: format!(
                                "{what} (its agent reports: {})",
                                agent_reason(&agents, &host).await
                            ),
                            host,
                            timeout,
                        }),
                        other => other,
                    }
                }
            })
            .await
        }
        WaitCondition::HaproxyRoutes => {
            let has_replicas = spec.hosts.iter().filter(|h| h.roles.postgres).count() > 1;
            let c = reqwest::Client::builder()
                .timeout(STATS_TIMEOUT)
                .build()
                .expect("reqwest client builds");
            wait_all(hosts, |h| {
                let c = c.clone();
                let spec = spec.clone();
                async move {
                    let addr = spec.host(&h).map(|x| x.address.clone()).unwrap_or_default();
                    // Servers start DOWN (or keep their state across a reload) thanks to the
                    // server-state file the haproxy-state script writes, so this is mostly
                    // waiting for `rise` passing checks.
                    wait_until(
                        &h,
                        "HAProxy routes the primary port to the leader only",
                        timeout,
                        || {
                            let c = c.clone();
                            let spec = spec.clone();
                            let addr = addr.clone();
                            async move { haproxy_routes(&c, &spec, &addr, has_replicas).await }
                        },
                    )
                    .await
                }
            })
            .await
        }
    }
}

fn condition_text(c: WaitCondition) -> &'static str {
    match c {
        WaitCondition::EtcdHealthy => "etcd is healthy",
        WaitCondition::AgentApiUp => "the agent answers",
        WaitCondition::LeaderElected => "a leader is elected",
        WaitCondition::ReplicasStreaming => "replicas stream",
        WaitCondition::HaproxyRoutes => "HAProxy routes to the leader",
    }
}

/// Whether HAProxy on `addr` answers on the primary port and (with a stats port) routes it to
/// the current leader only.
async fn haproxy_routes(
    c: &reqwest::Client,
    spec: &DeploySpec,
    addr: &str,
    has_replicas: bool,
) -> bool {
    if !postgres_answers(&format!("{addr}:{}", spec.primary_port)).await {
        return false;
    }
    if spec.stats_port == 0 {
        return true;
    }
    let Some(leader) = find_leader(spec).await else {
        return false;
    };
    let url = format!("http://{addr}:{}/;csv", spec.stats_port);
    let Ok(r) = c.get(&url).send().await else {
        return false;
    };
    let Ok(csv) = r.text().await else {
        return false;
    };
    haproxy_settled(&csv, &spec.cluster, &leader, has_replicas)
}

#[cfg(test)]
mod tests {
    use super::haproxy_settled;

    const HEAD: &str = "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status\n";

    fn csv(rows: &[(&str, &str, &str)]) -> String {
        let mut s = HEAD.to_string();
        for (px, sv, st) in rows {
            s.push_str(&format!("{px},{sv},0,0,0,0,,0,0,0,0,0,0,0,0,0,0,{st}\n"));
        }
        s
    }

    #[test]
    fn haproxy_is_settled_only_when_the_leader_alone_serves_the_primary_port() {
        let good = csv(&[
            ("c_primary", "FRONTEND", "OPEN"),
            ("c_primary", "n1", "UP"),
            ("c_primary", "n2", "DOWN"),
            ("c_replicas", "n1", "DOWN"),
            ("c_replicas", "n2", "UP"),
        ]);
        assert!(haproxy_settled(&good, "c", "n1", true));
        // Fresh HAProxy: every server still "UP" from startup.
        let fresh = csv(&[
            ("c_primary", "n1", "UP"),
            ("c_primary", "n2", "UP 1/2"),
            ("c_replicas", "n2", "UP"),
        ]);
        assert!(!haproxy_settled(&fresh, "c", "n1", true));
        let no_replica = csv(&[("c_primary", "n1", "UP"), ("c_replicas", "n2", "DOWN")]);
        assert!(!haproxy_settled(&no_replica, "c", "n1", true));
        assert!(haproxy_settled(&no_replica, "c", "n1", false));
    }
}
