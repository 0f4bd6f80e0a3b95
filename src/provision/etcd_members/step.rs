//! The I/O of etcd membership: reading the facts over SSH ([`gather`]) and the `etcd_members`
//! step ([`run`]). Every decision is the pure planner's ([`super::plan_members`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::provision::desired::{DeploySpec, EtcdSpec};
use crate::provision::remote::{Fleet, REMOVED_HOST_CONNECT_TIMEOUT};
use crate::provision::services::{Service, ServiceMode, ServiceOp, op_command};
use crate::transport::{SshTransport, Transport, TransportError, shell_quote};

// ---- facts (I/O) -------------------------------------------------------------------------------

/// Why the membership step failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdMembersError {
    #[error("etcd membership change refused, nothing was changed")]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("host {host}: etcd membership facts")]
    Decode {
        host: String,
        #[source]
        source: DecodeError,
    },
    #[error("host {host}: `{what}` failed: {stderr}")]
    Etcdctl {
        host: String,
        what: String,
        stderr: String,
    },
    #[error("etcd member {name}: timed out after {timeout:?} waiting until {what}")]
    Wait {
        name: String,
        what: String,
        timeout: Duration,
    },
    #[error("the etcd membership still differs from the inventory after {changes} changes")]
    NoProgress { changes: usize },
    #[error("no etcd member answers any more (the cluster lost its quorum?)")]
    NoCluster,
    #[error("host {host}: no etcd.conf to join the cluster with (is it an etcd host?)")]
    NoJoinConfig { host: String },
    #[error("host {host} is not connected")]
    NotConnected { host: String },
}

const ETCDCTL: &str = "ETCDCTL_API=3 etcdctl --dial-timeout=1s --command-timeout=5s";

/// Reads the membership through `t` (an etcd host) asking `endpoint` first. `Ok(None)`: that
/// member does not answer.
async fn gather_via(
    t: &dyn Transport,
    endpoint: &str,
) -> Result<Option<EtcdFacts>, EtcdMembersError> {
    let cmd = format!(
        "{ETCDCTL} --endpoints={} member list -w json 2>/dev/null",
        shell_quote(endpoint)
    );
    let out = t.run(&cmd, FACTS_TIMEOUT).await?;
    if !out.success() {
        return Ok(None);
    }
    let list = out.stdout_str();
    let members = parse_member_list(&list).map_err(|source| EtcdMembersError::Decode {
        host: t.host().into(),
        source,
    })?;
    let all: Vec<String> = members
        .iter()
        .flat_map(|m| m.client_urls.iter().take(1).cloned())
        .collect();
    let voters: Vec<String> = members
        .iter()
        .filter(|m| !m.is_learner)
        .flat_map(|m| m.client_urls.iter().take(1).cloned())
        .collect();
    let (mut status, mut health) = (String::new(), String::new());
    if !all.is_empty() {
        // Unreachable endpoints are left out of the JSON (and the exit status is 1): fine.
        let cmd = format!(
            "{ETCDCTL} --endpoints={} endpoint status -w json 2>/dev/null; echo; echo @@pgherd@@; \
             {ETCDCTL} --endpoints={} endpoint health -w json 2>/dev/null; exit 0",
            shell_quote(&all.join(",")),
            shell_quote(&voters.join(","))
        );
        let out = t.run(&cmd, FACTS_TIMEOUT).await?.stdout_str();
        let (s, h) = out.split_once("@@pgherd@@").unwrap_or((&out, ""));
        status = s.to_string();
        health = h.to_string();
    }
    decode_facts(t.host(), &list, &status, &health)
        .map(Some)
        .map_err(|source| EtcdMembersError::Decode {
            host: t.host().into(),
            source,
        })
}

/// The live membership, read through the first etcd host of the inventory whose member
/// answers. `Ok(None)`: no member answers (a fresh cluster, or every member down).
///
/// A read that shows no leader is repeated for up to [`LEADER_ELECTION_WAIT`]: an election in
/// progress is not a cluster without a leader.
pub async fn gather(
    spec: &DeploySpec,
    fleet: &Fleet,
) -> Result<Option<EtcdFacts>, EtcdMembersError> {
    let start = Instant::now();
    loop {
        let f = gather_once(spec, fleet).await?;
        match &f {
            Some(x) if x.leader().is_none() && start.elapsed() < LEADER_ELECTION_WAIT => {
                tracing::debug!("etcd facts: no leader yet (an election?), reading again");
                tokio::time::sleep(LEADER_POLL).await;
            }
            _ => return Ok(f),
        }
    }
}

/// etcd elects a leader within a few election timeouts (1 s by default), and a member that
/// comes back with a higher term forces such an election (etcd 3.4, what Debian 12 ships, has
/// no pre-vote by default): a member frozen and resumed, or a partition healed. Facts read
/// during it would refuse a membership change for want of a leader seconds away; reading again
/// for this long tells an election from a cluster that really has no leader, which is then
/// still refused.
const LEADER_ELECTION_WAIT: Duration = Duration::from_secs(10);
/// How often the facts are read again while waiting for a leader.
const LEADER_POLL: Duration = Duration::from_millis(500);

async fn gather_once(
    spec: &DeploySpec,
    fleet: &Fleet,
) -> Result<Option<EtcdFacts>, EtcdMembersError> {
    let Some(es) = &spec.etcd else {
        return Ok(None);
    };
    for d in &es.members {
        let Some(t) = fleet.get(&d.name) else {
            continue;
        };
        match gather_via(t.as_ref(), &d.client_url).await {
            Ok(Some(f)) => return Ok(Some(f)),
            Ok(None) => continue,
            // An unreachable host: another one may answer.
            Err(EtcdMembersError::Transport(e)) => {
                tracing::debug!(host = %d.name, error = %e, "etcd facts: host unreachable");
                continue;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

// ---- the step (I/O) ----------------------------------------------------------------------------

/// Where `run` reports progress: `(host, message)`.
pub type ProgressFn<'a> = &'a (dyn Fn(&str, &str) + Sync);

/// Shell deciding the service mode like the facts script does, into `$mode`.
const MODE: &str = "mode=supervisor; if [ -d /run/systemd/system ] && [ \"$(cat /proc/1/comm 2>/dev/null)\" = systemd ] \
                    && command -v systemctl >/dev/null 2>&1; then mode=systemd; fi";

fn stop_etcd_script() -> String {
    let sup = Service::Etcd.sup_file();
    let pid = Service::Etcd.pid_file();
    format!(
        "{MODE}; if [ \"$mode\" = systemd ]; then systemctl stop {unit} 2>/dev/null; \
         else if s=$(cat {sup} 2>/dev/null) && kill -0 \"$s\" 2>/dev/null; then kill -TERM \"$s\"; \
         i=0; while [ $i -lt 300 ] && kill -0 \"$s\" 2>/dev/null; do sleep 0.1; i=$((i+1)); done; fi; \
         rm -f {sup} {pid}; fi",
        unit = Service::Etcd.unit(),
    )
}

fn start_etcd_script() -> String {
    format!(
        "{MODE}; if [ \"$mode\" = systemd ]; then systemctl daemon-reload && {}; else {}; fi",
        op_command(Service::Etcd, ServiceOp::Start, ServiceMode::Systemd),
        op_command(Service::Etcd, ServiceOp::Start, ServiceMode::Supervisor)
    )
}

/// Empties a data directory, keeping the directory itself (its owner and mode).
fn wipe_script(data_dir: &str) -> String {
    format!(
        "if [ -d {d} ]; then find {d} -mindepth 1 -delete; fi",
        d = shell_quote(data_dir)
    )
}

/// Runs an etcdctl member command through `t`; `Ok(Err(stderr))` when etcdctl refused. Retried
/// while etcd's strict reconfiguration check says the cluster is not ready ([`RECONFIG_RETRY`]).
async fn etcdctl(
    t: &dyn Transport,
    endpoints: &[String],
    args: &str,
) -> Result<Result<String, String>, TransportError> {
    let start = Instant::now();
    loop {
        match etcdctl_once(t, endpoints, args).await? {
            Err(e) if e.contains("unhealthy cluster") && start.elapsed() < RECONFIG_RETRY => {
                tokio::time::sleep(POLL).await;
            }
            r => return Ok(r),
        }
    }
}

async fn etcdctl_once(
    t: &dyn Transport,
    endpoints: &[String],
    args: &str,
) -> Result<Result<String, String>, TransportError> {
    let cmd = format!(
        "{ETCDCTL} --endpoints={} {args}",
        shell_quote(&endpoints.join(","))
    );
    let out = t.run(&cmd, MEMBER_CALL_TIMEOUT).await?;
    if out.success() {
        Ok(Ok(out.stdout_str()))
    } else {
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        // etcdctl logs JSON retry lines before its final `Error: ...` line.
        let last = err
            .lines()
            .rev()
            .find(|l| l.starts_with("Error:"))
            .unwrap_or_else(|| err.lines().last().unwrap_or(""))
            .to_string();
        Ok(Err(last))
    }
}

fn via_transport(fleet: &Fleet, f: &EtcdFacts) -> Result<Arc<dyn Transport>, EtcdMembersError> {
    fleet
        .get(&f.via)
        .cloned()
        .ok_or_else(|| EtcdMembersError::NotConnected {
            host: f.via.clone(),
        })
}

async fn regather(spec: &DeploySpec, fleet: &Fleet) -> Result<EtcdFacts, EtcdMembersError> {
    gather(spec, fleet)
        .await?
        .ok_or(EtcdMembersError::NoCluster)
}

/// The `etcd_members` step: until the membership matches the inventory, re-read the facts,
/// plan, and execute the first change. `control_dir`: where SSH control sockets to hosts that
/// left the inventory go (the CLI's state directory). Each change done is pushed to `done` as
/// `(host, what, summary)`. `join_timeout` (the step's `timeout`): how long a joining member may
/// take to start and catch up with the leader (it fetches the leader's snapshot and log; the
/// DCS of one PostgreSQL cluster is a few MB).
pub async fn run(
    spec: &DeploySpec,
    fleet: &Fleet,
    join_timeout: Duration,
    control_dir: Option<PathBuf>,
    progress: ProgressFn<'_>,
    done: &mut Vec<(String, String, String)>,
) -> Result<(), EtcdMembersError> {
    let Some(es) = &spec.etcd else {
        return Ok(());
    };
    let opts = PlanOptions {
        allow_degraded_etcd: es.allow_degraded,
    };
    // Every change shrinks the difference by one; the bound only guards against a loop.
    let bound = 2 * es.members.len() + 8;
    for _ in 0..bound {
        let Some(f) = gather(spec, fleet).await? else {
            return Ok(());
        };
        let plan = plan_members(&es.members, Some(&f), opts)?;
        let Some(change) = plan.changes.first().cloned() else {
            return Ok(());
        };
        let who = match &change {
            MemberChange::Add { name, .. }
            | MemberChange::StartJoined { name, .. }
            | MemberChange::Promote { name, .. } => name.clone(),
            MemberChange::Remove { name, .. } => name.clone(),
        };
        progress(&f.via, &change.to_string());
        match &change {
            MemberChange::Add { name, peer_url, .. } => {
                add(spec, fleet, &f, name, peer_url, join_timeout, progress).await?;
            }
            MemberChange::StartJoined { name, peer_url, .. } => {
                let members = f.members.clone();
                start_joining(es, fleet, name, peer_url, &members, progress).await?;
                promote(spec, fleet, name, peer_url, join_timeout, progress).await?;
            }
            MemberChange::Promote { name, peer_url, .. } => {
                promote(spec, fleet, name, peer_url, join_timeout, progress).await?;
            }
            MemberChange::Remove { id, peer_url, .. } => {
                let note = remove(spec, es, fleet, &f, *id, peer_url, control_dir.clone()).await?;
                done.push((who.clone(), "members".into(), change.to_string()));
                if let Some(note) = note {
                    progress(&f.via, &note);
                    done.push((who, "members".into(), note));
                }
                continue;
            }
        }
        done.push((who, "members".into(), change.to_string()));
    }
    Err(EtcdMembersError::NoProgress { changes: bound })
}

async fn add(
    spec: &DeploySpec,
    fleet: &Fleet,
    f: &EtcdFacts,
    name: &str,
    peer_url: &str,
    join_timeout: Duration,
    progress: ProgressFn<'_>,
) -> Result<(), EtcdMembersError> {
    let Some(es) = &spec.etcd else {
        return Ok(());
    };
    let t = via_transport(fleet, f)?;
    let endpoints = f.up_voter_endpoints(None);
    let args = format!(
        "member add {} --peer-urls={} --learner -w json",
        shell_quote(name),
        shell_quote(peer_url)
    );
    let members = match etcdctl(t.as_ref(), &endpoints, &args).await? {
        Ok(json) => parse_member_list(&json).map_err(|source| EtcdMembersError::Decode {
            host: t.host().into(),
            source,
        })?,
        // A re-run after a cut between our `member add` and the facts: the URL is listed.
        Err(e) if e.contains("Peer URLs already exists") => regather(spec, fleet).await?.members,
        Err(stderr) => {
            return Err(EtcdMembersError::Etcdctl {
                host: t.host().into(),
                what: format!("member add {name}"),
                stderr,
            });
        }
    };
    start_joining(es, fleet, name, peer_url, &members, progress).await?;
    promote(spec, fleet, name, peer_url, join_timeout, progress).await
}

/// Writes the joining host's etcd.conf (`initial-cluster` = the listed members,
/// `initial-cluster-state: existing`), empties its data directory and starts etcd there.
async fn start_joining(
    es: &EtcdSpec,
    fleet: &Fleet,
    name: &str,
    peer_url: &str,
    members: &[Member],
    progress: ProgressFn<'_>,
) -> Result<(), EtcdMembersError> {
    let t = fleet
        .get(name)
        .cloned()
        .ok_or_else(|| EtcdMembersError::NotConnected { host: name.into() })?;
    let template = es
        .join_configs
        .get(name)
        .ok_or_else(|| EtcdMembersError::NoJoinConfig { host: name.into() })?;
    let initial = join_initial_cluster(members, name, peer_url);
    let quoted = serde_json::to_string(&initial).expect("strings serialize");
    let content = template.replace(
        INITIAL_CLUSTER_PLACEHOLDER,
        quoted.trim_start_matches('"').trim_end_matches('"'),
    );
    progress(
        name,
        "joining the etcd cluster (initial-cluster-state: existing)",
    );
    // Our member is listed but not started: whatever data directory the host has belongs to
    // no started member (a failed earlier start, an old cluster), and a joining member must
    // start empty, or it would come up with another cluster's identity.
    let prep = format!("{}; {}", stop_etcd_script(), wipe_script(&es.data_dir));
    t.run_ok(&prep, MEMBER_CALL_TIMEOUT + Duration::from_secs(30))
        .await?;
    t.upload(
        &es.config_path,
        content.as_bytes(),
        es.config_mode,
        Some(&es.config_owner),
    )
    .await?;
    t.run_ok(&start_etcd_script(), MEMBER_CALL_TIMEOUT).await?;
    Ok(())
}

/// Waits until the member with `peer_url` is started and near the leader's raft index, then
/// promotes it, retrying while etcd says it is not in sync yet.
async fn promote(
    spec: &DeploySpec,
    fleet: &Fleet,
    name: &str,
    peer_url: &str,
    join_timeout: Duration,
    progress: ProgressFn<'_>,
) -> Result<(), EtcdMembersError> {
    progress(name, "waiting until the learner is started and in sync");
    let start = Instant::now();
    let (id, f) = loop {
        let f = regather(spec, fleet).await?;
        if let Some(m) = f.member_by_url(peer_url) {
            if !m.is_learner {
                return Ok(());
            }
            if m.started() && f.in_sync(m) {
                break (m.id, f);
            }
        }
        if start.elapsed() > join_timeout {
            return Err(EtcdMembersError::Wait {
                name: name.into(),
                what: "it is started and its raft index is near the leader's".into(),
                timeout: join_timeout,
            });
        }
        tokio::time::sleep(POLL).await;
    };
    let t = via_transport(fleet, &f)?;
    let endpoints = f.up_voter_endpoints(None);
    let start = Instant::now();
    loop {
        match etcdctl(t.as_ref(), &endpoints, &format!("member promote {id:x}")).await? {
            Ok(_) => return Ok(()),
            // Promoted already (a re-run after a cut).
            Err(e) if e.contains("can only promote a learner member") && !e.contains("in sync") => {
                return Ok(());
            }
            Err(e) if e.contains("in sync") && start.elapsed() < PROMOTE_TIMEOUT => {
                tokio::time::sleep(POLL).await;
            }
            Err(stderr) => {
                return Err(EtcdMembersError::Etcdctl {
                    host: t.host().into(),
                    what: format!("member promote {id:x} ({name})"),
                    stderr,
                });
            }
        }
    }
}

/// `member remove` through a healthy member other than the removed one, then the best-effort
/// cleanup of the removed host. Returns a note when the host could not be cleaned up.
async fn remove(
    spec: &DeploySpec,
    es: &EtcdSpec,
    fleet: &Fleet,
    f: &EtcdFacts,
    id: u64,
    peer_url: &str,
    control_dir: Option<PathBuf>,
) -> Result<Option<String>, EtcdMembersError> {
    let t = via_transport(fleet, f)?;
    let endpoints = f.up_voter_endpoints(Some(id));
    match etcdctl(t.as_ref(), &endpoints, &format!("member remove {id:x}")).await? {
        Ok(_) => {}
        Err(e) if e.contains("member not found") => {}
        Err(stderr) => {
            return Err(EtcdMembersError::Etcdctl {
                host: t.host().into(),
                what: format!("member remove {id:x}"),
                stderr,
            });
        }
    }
    let Some(addr) = url_host(peer_url) else {
        return Ok(Some(format!(
            "removed member {id:x}: no address in its peer URL {peer_url}; its host was not cleaned up"
        )));
    };
    // A host still in the inventory (it lost the etcd role) is in the fleet; one that left
    // the inventory is reached with the inventory's SSH defaults. Never a host that is still
    // a desired member at that address (a replacement reusing the address).
    if es
        .members
        .iter()
        .any(|d| url_host(&d.peer_url).as_deref() == Some(&addr))
    {
        return Ok(None);
    }
    let in_fleet = spec
        .hosts
        .iter()
        .find(|h| h.address == addr)
        .and_then(|h| fleet.get(&h.name).cloned());
    let target: Arc<dyn Transport> = match in_fleet {
        Some(t) => t,
        None => {
            let mut hs = es.ssh_defaults.clone();
            hs.name = format!("{addr} (removed etcd member {id:x})");
            hs.address = addr.clone();
            hs.connect_timeout = REMOVED_HOST_CONNECT_TIMEOUT;
            let dir = control_dir.unwrap_or_else(|| std::env::temp_dir().join("pgherd-ssh"));
            let _ = std::fs::create_dir_all(&dir);
            match tokio::time::timeout(
                REMOVED_HOST_CONNECT_TIMEOUT + Duration::from_secs(2),
                SshTransport::connect(&hs, &dir),
            )
            .await
            {
                Ok(Ok(t)) => Arc::new(t),
                Ok(Err(e)) => {
                    return Ok(Some(format!(
                        "removed member {id:x}; its host {addr} is unreachable ({e}): etcd there was not stopped, and it refuses to rejoin if it comes back"
                    )));
                }
                Err(_) => {
                    return Ok(Some(format!(
                        "removed member {id:x}; its host {addr} did not answer within {REMOVED_HOST_CONNECT_TIMEOUT:?}: etcd there was not stopped"
                    )));
                }
            }
        }
    };
    // Stopped and disabled (no boot start), then its data directory emptied: a removed member
    // restarted on its old data would try to rejoin as a zombie.
    let script = format!(
        "{}; {MODE}; if [ \"$mode\" = systemd ]; then systemctl disable {unit} 2>/dev/null; fi; rm -f {run}; {}",
        stop_etcd_script(),
        wipe_script(&es.data_dir),
        unit = Service::Etcd.unit(),
        run = Service::Etcd.run_file(),
    );
    match target
        .run_ok(&script, MEMBER_CALL_TIMEOUT + Duration::from_secs(30))
        .await
    {
        Ok(_) => Ok(Some(format!(
            "removed member {id:x}: etcd stopped and disabled on {addr}, data directory {} wiped",
            es.data_dir
        ))),
        Err(e) => Ok(Some(format!(
            "removed member {id:x}; cleaning up {addr} failed ({e})"
        ))),
    }
}
