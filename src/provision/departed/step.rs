//! The I/O of departed-member removal: reading the DCS members through the agents, and the
//! `remove_departed` step (HAProxy admin socket and the leader over SSH, the departed host over
//! SSH with the inventory's SSH defaults at the address the DCS gives, best effort).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{DcsMember, DepartedFacts, DeparturePlan, Refusal, Step};
use crate::api::docs::ClusterDoc;
use crate::inventory::Role;
use crate::provision::desired::DeploySpec;
use crate::provision::remote::{self, Fleet, REMOVED_HOST_CONNECT_TIMEOUT, agent_client};
use crate::provision::services::Service;
use crate::transport::{SshTransport, Transport, TransportError};

/// How long the departed host gets to stop its agent: the agent's SIGTERM path stops
/// PostgreSQL in fast mode, i.e. after a shutdown checkpoint, which on a busy replica can take
/// tens of seconds.
const AGENT_STOP_TIMEOUT: Duration = Duration::from_secs(120);
/// After the leader no longer sees the member in the DCS it drops its slot on its next cycle
/// (loop_wait ≤ 10 s in every profile); past this, pgherd drops an inactive slot itself.
const SLOT_DROP_WAIT: Duration = Duration::from_secs(30);
/// A switchover the departing leader hands over: one agent cycle plus a clean PostgreSQL
/// stop/promote.
const SWITCHOVER_TIMEOUT: Duration = Duration::from_secs(120);
/// One SQL call on the leader over SSH.
const SQL_TIMEOUT: Duration = Duration::from_secs(20);
/// One HAProxy admin-socket command.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(20);
/// Poll interval of every wait here.
const POLL: Duration = Duration::from_millis(500);
/// One liveness probe of a moved member's old address (REST, SSH port): a live host answers
/// in milliseconds on the cluster network, a dead one never; 3 s also covers a slow ARP
/// resolution on a loaded host.
const MOVED_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a removal stopped.
#[derive(Debug, thiserror::Error)]
pub enum DepartedError {
    #[error("removing departed members refused: {0}")]
    Refused(#[from] Refusal),
    #[error("member {member}: {what}: {message}")]
    Call {
        member: String,
        what: String,
        message: String,
    },
    #[error("member {member}: timed out after {timeout:?} waiting until {what}")]
    Wait {
        member: String,
        what: String,
        timeout: Duration,
    },
    #[error("member {member}: {what}")]
    Agent {
        member: String,
        what: String,
        #[source]
        source: crate::provision::agent_client::AgentError,
    },
    #[error("member {member}: {what}")]
    Remote {
        member: String,
        what: String,
        #[source]
        source: TransportError,
    },
    #[error("no agent of the inventory answered GET /cluster")]
    NoAgent,
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// `GET /cluster` from the first inventory agent that answers.
async fn cluster(spec: &DeploySpec) -> Option<ClusterDoc> {
    agent_client(spec).cluster().await.ok()
}

/// Reads the DCS members (`None` when no agent answers: a fresh cluster, nothing departs),
/// and probes the old address of every member the inventory moved (see [`super::Moved`]).
pub async fn gather(
    spec: &DeploySpec,
    config: Option<&serde_json::Map<String, Value>>,
) -> Option<DepartedFacts> {
    let c = cluster(spec).await?;
    let mut f = DepartedFacts::from_cluster(&c, config);
    let addresses = spec
        .hosts
        .iter()
        .filter(|h| h.roles.postgres)
        .map(|h| (h.name.clone(), h.address.clone()))
        .collect();
    let moved = super::moved_members(&f.members, &addresses);
    let mut probes = tokio::task::JoinSet::new();
    for mut mv in moved {
        let api_url = f
            .members
            .iter()
            .find(|m| m.name == mv.member)
            .and_then(|m| m.api_url.clone());
        let ssh_port = spec
            .inventory
            .as_ref()
            .and_then(|inv| inv.host(&mv.member))
            .map_or(22, |h| h.ssh.port);
        probes.spawn(async move {
            mv.alive = still_answers(&mv.old, api_url.as_deref(), ssh_port).await;
            mv
        });
    }
    while let Some(mv) = probes.join_next().await {
        f.moved.push(mv.expect("liveness probe task panicked"));
    }
    f.moved.sort_by(|a, b| a.member.cmp(&b.member));
    Some(f)
}

/// What answers at a moved member's old address: its REST API (any HTTP answer) or its SSH
/// port (a TCP connection accepted). Each probe is bounded by [`MOVED_PROBE_TIMEOUT`], so a
/// dead host costs that long once, never a wait on it.
pub async fn still_answers(old: &str, api_url: Option<&str>, ssh_port: u16) -> Vec<String> {
    let rest = async {
        // A liveness probe of whatever the DCS advertised, not a call of the agent API (the
        // host left the inventory, so `AgentClient` does not know it): any answer counts.
        let url = api_url?;
        let http = reqwest::Client::builder()
            .timeout(MOVED_PROBE_TIMEOUT)
            .build()
            .ok()?;
        let r = http.get(url).send().await.ok()?;
        Some(format!(
            "its REST API {url} answers {}",
            r.status().as_u16()
        ))
    };
    let ssh = async {
        let target = crate::inventory::endpoint(old, ssh_port);
        let conn = tokio::time::timeout(
            MOVED_PROBE_TIMEOUT,
            tokio::net::TcpStream::connect(target.clone()),
        )
        .await;
        matches!(conn, Ok(Ok(_))).then(|| format!("its SSH port {target} accepts connections"))
    };
    let (rest, ssh) = tokio::join!(rest, ssh);
    rest.into_iter().chain(ssh).collect()
}

fn members_of(c: &ClusterDoc) -> Vec<DcsMember> {
    DepartedFacts::from_cluster(c, None).members
}

/// Runs `plan`'s steps in order; `key_timeout` bounds the wait for each member key (the
/// playbook step's timeout). Appends `(member, what, detail)` to `done`.
pub async fn run(
    spec: &DeploySpec,
    fleet: &Fleet,
    plan: &DeparturePlan,
    key_timeout: Duration,
    control_dir: Option<PathBuf>,
    report: &(dyn Fn(&str, &str) + Sync),
    done: &mut Vec<(String, String, String)>,
) -> Result<(), DepartedError> {
    // The WAL each member's slot holds, read just before its agent stops (the leader usually
    // drops the slot within a cycle of the key's expiry, before the slot step looks).
    let mut held: std::collections::BTreeMap<String, i64> = Default::default();
    for s in &plan.steps {
        let m = s.member().to_string();
        report(&m, &s.to_string());
        let (kind, what) = match s {
            Step::Switchover { from, to } => ("switchover", switchover(spec, from, to).await?),
            Step::Drain { member } => ("drain", drain(spec, fleet, member).await?),
            Step::StopAgent { member, address } => {
                if let Some(slot) = plan.steps.iter().find_map(|x| match x {
                    Step::SlotGone { member: sm, slot } if sm == member => Some(slot.clone()),
                    _ => None,
                }) && let Ok(Some((_, wal))) = leader_slot(spec, fleet, &slot).await
                {
                    held.insert(member.clone(), wal);
                }
                (
                    "stop agent",
                    stop_agent(spec, member, address.as_deref(), control_dir.clone()).await?,
                )
            }
            Step::KeyGone { member } => ("member key", key_gone(spec, member, key_timeout).await?),
            Step::SlotGone { member, slot } => (
                "slot",
                slot_gone(spec, fleet, member, slot, held.get(member).copied()).await?,
            ),
            Step::MovedAway { member, old, .. } => {
                ("moved", moved_away(spec, member, old, key_timeout).await?)
            }
        };
        done.push((m, kind.into(), what));
    }
    Ok(())
}

async fn switchover(spec: &DeploySpec, from: &str, to: &str) -> Result<String, DepartedError> {
    // Asked of the candidate's agent: the departing leader may be the slow one.
    agent_client(spec)
        .switchover(to, Some(from), Some(to), false)
        .await
        .map_err(|source| DepartedError::Agent {
            member: from.into(),
            what: format!("switchover to {to}"),
            source,
        })?;
    let t0 = Instant::now();
    loop {
        if let Some(c) = cluster(spec).await
            && c.leader_name().as_deref() == Some(to)
        {
            return Ok(format!("switched over: {to} leads"));
        }
        if t0.elapsed() > SWITCHOVER_TIMEOUT {
            return Err(DepartedError::Wait {
                member: from.into(),
                what: format!("{to} leads"),
                timeout: SWITCHOVER_TIMEOUT,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn drain(spec: &DeploySpec, fleet: &Fleet, member: &str) -> Result<String, DepartedError> {
    let Some(inv) = &spec.inventory else {
        return Ok("no inventory: no HAProxy to drain".into());
    };
    let backend = format!("{}_replicas", inv.cluster);
    let mut hosts = Vec::new();
    let mut skipped = Vec::new();
    for h in inv.hosts_with(Role::Haproxy) {
        let Some(t) = fleet.get(h.name.as_str()) else {
            continue;
        };
        let cmd = crate::provision::rolling::haproxy::haproxy_admin_command(&format!(
            "set server {backend}/{member} state maint"
        ));
        let out = t.run(&cmd, ADMIN_TIMEOUT).await?;
        let text = out.stdout_str();
        if !out.success() {
            // The admin socket does not answer: HAProxy is not running there, nothing routes.
            skipped.push(h.name.as_str().to_string());
        } else if text.trim().is_empty() || text.contains("No such server") {
            // Set now, or already re-rendered without it.
            hosts.push(h.name.as_str().to_string());
        } else {
            return Err(DepartedError::Call {
                member: member.into(),
                what: format!(
                    "HAProxy on {} `set server {backend}/{member} state maint`",
                    h.name.as_str()
                ),
                message: text.trim().to_string(),
            });
        }
    }
    let mut s = format!("in maintenance in {backend} on {}", hosts.join(", "));
    if !skipped.is_empty() {
        s.push_str(&format!(
            " (HAProxy not answering on {})",
            skipped.join(", ")
        ));
    }
    Ok(s)
}

/// Decides systemd vs supervisor mode on the host itself (the departed host has no facts).
const MODE: &str = "mode=supervisor; if [ -d /run/systemd/system ] && [ \"$(cat /proc/1/comm 2>/dev/null)\" = systemd ] \
                    && command -v systemctl >/dev/null 2>&1; then mode=systemd; fi";

/// The shell stopping and disabling the agent. Supervisor mode: the run file goes first (the
/// boot hook starts only services with a run file, so a crash half-way leaves it disabled),
/// then SIGTERM to the supervisor, which passes it to the agent; the agent stops PostgreSQL.
pub fn stop_agent_script() -> String {
    let svc = Service::Agent;
    let ticks = AGENT_STOP_TIMEOUT.as_millis() / 100;
    format!(
        "{MODE}; if [ \"$mode\" = systemd ]; then systemctl disable --now {unit} >/dev/null 2>&1; \
         ! systemctl is-active --quiet {unit}; \
         else rm -f {run}; if s=$(cat {sup} 2>/dev/null) && kill -0 \"$s\" 2>/dev/null; then kill -TERM \"$s\"; \
         i=0; while [ $i -lt {ticks} ] && kill -0 \"$s\" 2>/dev/null; do sleep 0.1; i=$((i+1)); done; \
         ! kill -0 \"$s\" 2>/dev/null || exit 1; fi; \
         if p=$(cat {pid} 2>/dev/null) && kill -0 \"$p\" 2>/dev/null; then \
         i=0; while [ $i -lt {ticks} ] && kill -0 \"$p\" 2>/dev/null; do sleep 0.1; i=$((i+1)); done; \
         ! kill -0 \"$p\" 2>/dev/null || exit 1; fi; rm -f {sup} {pid}; fi",
        unit = svc.unit(),
        run = svc.run_file(),
        sup = svc.sup_file(),
        pid = svc.pid_file(),
    )
}

async fn stop_agent(
    spec: &DeploySpec,
    member: &str,
    address: Option<&str>,
    control_dir: Option<PathBuf>,
) -> Result<String, DepartedError> {
    let Some(addr) = address else {
        return Ok("no address in the DCS: its agent was not stopped".into());
    };
    let Some(inv) = &spec.inventory else {
        return Ok(format!("no inventory SSH settings: {addr} not contacted"));
    };
    let Some(mut hs) = remote::host_specs(inv)
        .into_iter()
        .find(|s| inv.host(&s.name).is_some_and(|h| h.has(Role::Postgres)))
    else {
        return Ok(format!(
            "no postgres host to copy SSH settings from: {addr} not contacted"
        ));
    };
    hs.name = format!("{addr} (departed member {member})");
    hs.address = addr.to_string();
    hs.connect_timeout = REMOVED_HOST_CONNECT_TIMEOUT;
    let dir = control_dir.unwrap_or_else(|| std::env::temp_dir().join("pgherd-ssh"));
    let _ = std::fs::create_dir_all(&dir);
    // A dead host is skipped, never waited on: its key expires with its lease anyway.
    let t: Arc<dyn Transport> = match tokio::time::timeout(
        REMOVED_HOST_CONNECT_TIMEOUT + Duration::from_secs(2),
        SshTransport::connect(&hs, &dir),
    )
    .await
    {
        Ok(Ok(t)) => Arc::new(t),
        Ok(Err(e)) => {
            return Ok(format!(
                "host {addr} unreachable ({e}): its agent was not stopped (if the host comes back, its agent rejoins; re-run apply)"
            ));
        }
        Err(_) => {
            return Ok(format!(
                "host {addr} did not answer within {REMOVED_HOST_CONNECT_TIMEOUT:?}: its agent was not stopped"
            ));
        }
    };
    t.run_ok(
        &stop_agent_script(),
        AGENT_STOP_TIMEOUT + Duration::from_secs(10),
    )
    .await
    .map_err(|source| DepartedError::Remote {
        member: member.into(),
        what: format!("stopping its agent on {addr}"),
        source,
    })?;
    Ok(format!(
        "agent stopped on {addr} (PostgreSQL with it) and disabled at boot"
    ))
}

async fn key_gone(
    spec: &DeploySpec,
    member: &str,
    timeout: Duration,
) -> Result<String, DepartedError> {
    let what = "its member key is gone from the DCS".to_string();
    let took = until_unlisted(spec, member, timeout, what, |m| m.name == member).await?;
    Ok(format!(
        "member key gone from the DCS after {:.1}s",
        took.as_secs_f64()
    ))
}

/// Waits until the DCS no longer lists `member` at `old`: its key expired (the dead agent's
/// lease), or its replacement already registered at the new address (a re-run).
async fn moved_away(
    spec: &DeploySpec,
    member: &str,
    old: &str,
    timeout: Duration,
) -> Result<String, DepartedError> {
    let what = format!("its member key at {old} expires");
    let took = until_unlisted(spec, member, timeout, what, |m| {
        m.name == member && m.address.as_deref() == Some(old)
    })
    .await?;
    Ok(format!(
        "no longer listed at {old} after {:.1}s",
        took.as_secs_f64()
    ))
}

/// Polls the DCS members every [`POLL`] until none is `listed`; how long that took. Bounded by
/// `timeout`: then `what` did not happen, or no agent answered at all.
async fn until_unlisted(
    spec: &DeploySpec,
    member: &str,
    timeout: Duration,
    what: String,
    listed: impl Fn(&DcsMember) -> bool,
) -> Result<Duration, DepartedError> {
    let t0 = Instant::now();
    loop {
        let c = cluster(spec).await;
        if let Some(c) = &c
            && !members_of(c).iter().any(&listed)
        {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > timeout {
            return Err(match c {
                None => DepartedError::NoAgent,
                Some(_) => DepartedError::Wait {
                    member: member.into(),
                    what,
                    timeout,
                },
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `active|wal bytes held` of slot `slot` on the leader, `None` when it has no such slot.
async fn read_slot(
    spec: &DeploySpec,
    t: &dyn Transport,
    leader: &str,
    slot: &str,
) -> Result<Option<(bool, i64)>, DepartedError> {
    let sql = format!(
        "select active, coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::bigint from pg_replication_slots where slot_name = '{}'",
        slot.replace('\'', "''")
    );
    let out = sql_on(spec, t, leader, &sql).await?;
    let line = out.lines().next().unwrap_or_default().trim().to_string();
    if line.is_empty() {
        return Ok(None);
    }
    let (a, w) = line.split_once('\u{1f}').unwrap_or((&line, "0"));
    Ok(Some((a == "t", w.trim().parse().unwrap_or(0))))
}

async fn sql_on(
    spec: &DeploySpec,
    t: &dyn Transport,
    leader: &str,
    sql: &str,
) -> Result<String, DepartedError> {
    let cmd = remote::psql_command(spec, leader, sql).ok_or_else(|| DepartedError::Call {
        member: leader.into(),
        what: "SQL on the leader".into(),
        message: "not a postgres host of the inventory".into(),
    })?;
    Ok(t.run_ok(&cmd, SQL_TIMEOUT).await?.stdout_str())
}

/// The leader and its transport.
async fn leader_transport(
    spec: &DeploySpec,
    fleet: &Fleet,
) -> Result<(String, Arc<dyn Transport>), DepartedError> {
    let leader = cluster(spec)
        .await
        .and_then(|c| c.leader_name())
        .ok_or(DepartedError::NoAgent)?;
    let t = fleet
        .get(&leader)
        .cloned()
        .ok_or_else(|| DepartedError::Call {
            member: leader.clone(),
            what: "reaching the leader".into(),
            message: "not connected (not a host of the inventory)".into(),
        })?;
    Ok((leader, t))
}

async fn leader_slot(
    spec: &DeploySpec,
    fleet: &Fleet,
    slot: &str,
) -> Result<Option<(bool, i64)>, DepartedError> {
    let (leader, t) = leader_transport(spec, fleet).await?;
    read_slot(spec, t.as_ref(), &leader, slot).await
}

async fn slot_gone(
    spec: &DeploySpec,
    fleet: &Fleet,
    member: &str,
    slot: &str,
    held_before_stop: Option<i64>,
) -> Result<String, DepartedError> {
    let (leader, t) = leader_transport(spec, fleet).await?;
    let t0 = Instant::now();
    let mut held: Option<i64> = held_before_stop;
    loop {
        match read_slot(spec, t.as_ref(), &leader, slot).await? {
            None => {
                return Ok(match held {
                    Some(w) => format!(
                        "slot {slot} gone from the leader {leader} (it held {w} bytes of WAL)"
                    ),
                    None => {
                        format!("the leader {leader} has no slot {slot} (none seen: no WAL held)")
                    }
                });
            }
            Some((active, wal)) => {
                held = Some(held.unwrap_or(0).max(wal));
                if t0.elapsed() > SLOT_DROP_WAIT {
                    if active {
                        return Err(DepartedError::Call {
                            member: member.into(),
                            what: format!("slot {slot} on the leader {leader}"),
                            message: format!(
                                "still active after {SLOT_DROP_WAIT:?} (something still streams with it); not dropped"
                            ),
                        });
                    }
                    sql_on(
                        spec,
                        t.as_ref(),
                        &leader,
                        &format!(
                            "select pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_name = '{}' and not active",
                            slot.replace('\'', "''")
                        ),
                    )
                    .await?;
                    if read_slot(spec, t.as_ref(), &leader, slot).await?.is_none() {
                        return Ok(format!(
                            "slot {slot} dropped on the leader {leader} by pgherd (inactive, still there after {SLOT_DROP_WAIT:?}; it held {wal} bytes of WAL)"
                        ));
                    }
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
}
