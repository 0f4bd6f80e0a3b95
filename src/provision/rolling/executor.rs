//! The executor of [`super::plan_restarts`]'s plans on a live cluster: gathers the input
//! (`GET /cluster`, `/config`, `pg_controldata` and `pg_settings` over SSH), re-plans before
//! every step, and runs each step — a replica drained from HAProxy's replica backend through the
//! admin socket, restarted through its agent, waited on until it streams with its flag
//! cleared, undrained; the primary checkpointed and restarted in place, or switched over.
//! Every wait is bounded by a named constant and its error names the member and what its
//! agent reported.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::task::JoinSet;

use super::haproxy::{
    current_sessions, haproxy, haproxy_hosts, replica_backend, set_state_everywhere,
    undrain_leftovers,
};
use super::{
    HotParam, HotValues, MemberInput, MemberRole, PhaseKind, RestartPlan, RollingInput,
    RollingOptions, RollingRefusal, StepAction, hot_values_from_controldata, plan_restarts,
    show_reason, show_values,
};
use crate::api::docs::{ClusterDoc, ClusterMember};
use crate::inventory::Inventory;
use crate::provision::agent_client::{AgentClient, AgentError};
use crate::provision::ctl;
use crate::provision::remote::Fleet;
use crate::transport::{Transport, TransportError, shell_quote};

/// HAProxy gives a drained replica's client sessions this long to end on their own before the
/// restart closes them (a fast shutdown disconnects them anyway; this only spares idle pools).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
pub use crate::provision::agent_client::RESTART_CALL_TIMEOUT;
/// A restarted replica reconnects to the primary and replays the WAL written meanwhile.
pub const STREAM_TIMEOUT: Duration = Duration::from_secs(180);
/// An agent refreshes its member key (and `pending_restart`) once per `loop_wait` (≤ 10 s in
/// every profile), so a cleared flag shows within a few cycles.
pub const PENDING_CLEAR_TIMEOUT: Duration = Duration::from_secs(30);
/// A replica's control file takes the primary's lowered values when it replays the restarted
/// primary's parameter-change record: right after it reconnects.
pub const CONTROLDATA_TIMEOUT: Duration = Duration::from_secs(120);
/// The restarted primary is leader and running again and every replica streams from it.
pub const PRIMARY_BACK_TIMEOUT: Duration = Duration::from_secs(180);
/// A `CHECKPOINT` writes every dirty buffer: minutes on a large `shared_buffers`.
pub const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(600);
/// One SSH read of a host's control data and settings, or one HAProxy admin command.
const SSH_READ_TIMEOUT: Duration = Duration::from_secs(20);
/// Cadence of every poll here.
const POLL: Duration = Duration::from_millis(500);
/// Restarts of one member within one phase: the planned one, plus one more when a decrease
/// had not replayed yet (day2.md §1.4 step 7).
const MAX_ATTEMPTS: u32 = 2;

/// Why a run stopped. Each variant names the member and what its agent reported.
#[derive(Debug, thiserror::Error)]
pub enum RollingError {
    #[error("refused, nothing restarted: {0}")]
    Refused(#[from] RollingRefusal),
    #[error("stopped after {steps} step(s), the cluster is left as they made it: {refusal}")]
    RefusedMidway {
        steps: usize,
        #[source]
        refusal: RollingRefusal,
    },
    #[error("reading the cluster: {0}")]
    Gather(String),
    #[error(
        "{member}: timed out after {timeout:?} waiting until {what} (its agent reports {reported})"
    )]
    Wait {
        member: String,
        what: String,
        timeout: Duration,
        reported: String,
    },
    #[error("{member}: {what}")]
    Agent {
        member: String,
        what: String,
        #[source]
        source: Box<AgentError>,
    },
    #[error("reading the cluster through the agents")]
    Cluster(#[source] Box<AgentError>),
    #[error("{member}: {what}: {message}")]
    Call {
        member: String,
        what: String,
        message: String,
    },
    #[error("{member} still needs a restart after {attempts} restart(s): {reason}")]
    StillPending {
        member: String,
        attempts: u32,
        reason: String,
    },
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// What a run did, in order: `(member, what)`.
#[derive(Debug, Clone, Default)]
pub struct RollingReport {
    /// The plan as it stood before the first step.
    pub plan: RestartPlan,
    pub done: Vec<(String, String)>,
}

/// Progress lines (what is being waited for); `apply` and the CLI print them.
pub type ProgressFn<'a> = &'a (dyn Fn(&str) + Send + Sync);

fn call_err(member: &str, what: &str, e: anyhow::Error) -> RollingError {
    RollingError::Call {
        member: member.into(),
        what: what.into(),
        message: format!("{e:#}"),
    }
}

/// What `name`'s entry in `/cluster` says, for error messages.
fn reported(c: Option<&ClusterDoc>, name: &str) -> String {
    let Some(m) = c.and_then(|c| c.member(name)) else {
        return "nothing: it is not listed in /cluster".into();
    };
    let mut s = format!(
        "role {}, state {}, lag {}",
        m.role,
        m.state,
        m.lag.as_ref().map_or("null".to_string(), |l| l.to_string())
    );
    if m.pending_restart == Some(true) {
        s.push_str(&format!(
            ", pending_restart {}",
            m.pending_restart_reason.as_ref().unwrap_or(&Value::Null)
        ));
    }
    s
}

fn reason_map(v: &Value) -> BTreeMap<String, (String, String)> {
    let text = |x: &Value| match x {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    v.as_object()
        .map(|o| {
            o.iter()
                .map(|(k, e)| (k.clone(), (text(&e["old_value"]), text(&e["new_value"]))))
                .collect()
        })
        .unwrap_or_default()
}

/// The parts of `GET /cluster` the planner needs (without the per-host values).
pub fn members_from_cluster(c: &ClusterDoc) -> Vec<MemberInput> {
    c.members.iter().map(member_input).collect()
}

fn member_input(m: &ClusterMember) -> MemberInput {
    let role = match m.role.as_str() {
        "leader" | "standby_leader" => MemberRole::Leader,
        "sync_standby" | "quorum_standby" => MemberRole::SyncStandby,
        _ => MemberRole::Replica,
    };
    // A tag counts only when literally `true`, as the planner has always read it.
    let tag = |t: &str| m.tags.get(t) == Some(&Value::Bool(true));
    MemberInput {
        name: m.name.clone(),
        role,
        state: if m.state.is_empty() {
            "unknown".into()
        } else {
            m.state.clone()
        },
        lag_bytes: m.lag.as_ref().and_then(|l| l.bytes()),
        pending_restart: m.pending_restart == Some(true),
        pending_reason: m
            .pending_restart_reason
            .as_ref()
            .map(reason_map)
            .unwrap_or_default(),
        nofailover: tag("nofailover"),
        nosync: tag("nosync"),
        controldata: HotValues::new(),
        running: HotValues::new(),
    }
}

/// `psql` as the `postgres` OS user over the local socket (peer authentication: no password
/// anywhere), on `inv`'s PostgreSQL.
fn psql(inv: &Inventory, sql: &str) -> String {
    let pg = &inv.postgresql;
    let sock = pg
        .data_dir
        .parent()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|| "/var/run/postgresql".into());
    format!(
        "cd / && runuser -u postgres -- {} -X -A -t -q -F '=' -h {} -p {} -d postgres -c {}",
        shell_quote(&pg.bin_dir.join("psql").to_string_lossy()),
        shell_quote(&sock),
        pg.port,
        shell_quote(sql)
    )
}

const SETTINGS_MARK: &str = "@@pgherd-settings";

/// The five from `pg_controldata` and from `pg_settings` on one host (unknown when unreadable).
async fn host_values(inv: &Inventory, t: &dyn Transport) -> (HotValues, HotValues) {
    let names: Vec<String> = HotParam::ALL
        .iter()
        .map(|p| format!("'{}'", p.guc()))
        .collect();
    let sql = format!(
        "SELECT name, setting FROM pg_settings WHERE name IN ({})",
        names.join(",")
    );
    let cmd = format!(
        "LANG=C LC_ALL=C {} -D {} 2>/dev/null; echo {SETTINGS_MARK}; {} 2>/dev/null; exit 0",
        shell_quote(
            &inv.postgresql
                .bin_dir
                .join("pg_controldata")
                .to_string_lossy()
        ),
        shell_quote(&inv.postgresql.data_dir.to_string_lossy()),
        psql(inv, &sql)
    );
    let Ok(out) = t.run(&cmd, SSH_READ_TIMEOUT).await else {
        return Default::default();
    };
    let text = out.stdout_str();
    let (cd, settings) = text.split_once(SETTINGS_MARK).unwrap_or((&text, ""));
    let running = settings
        .lines()
        .filter_map(|l| l.split_once('='))
        .filter_map(|(k, v)| Some((HotParam::from_guc(k.trim())?, v.trim().parse().ok()?)))
        .collect();
    (hot_values_from_controldata(cd), running)
}

/// The live input: `GET /cluster` and `/config` from the agents, `pg_controldata` and the
/// running values of the five from every member's host over SSH.
pub async fn gather_input(
    inv: &Inventory,
    agents: &AgentClient,
    fleet: &Fleet,
) -> Result<RollingInput, RollingError> {
    let c = agents
        .cluster()
        .await
        .map_err(|e| RollingError::Cluster(Box::new(e)))?;
    let mut members = members_from_cluster(&c);
    let mut lag_limit = None;
    for m in &members {
        if let Ok(cfg) = agents.config(&m.name).await {
            lag_limit = Some(
                cfg.value
                    .get("maximum_lag_on_failover")
                    .and_then(Value::as_u64),
            );
            break;
        }
    }
    let mut set = JoinSet::new();
    for m in &members {
        let Some(t) = fleet.get(&m.name).cloned() else {
            continue;
        };
        let inv = inv.clone();
        let name = m.name.clone();
        set.spawn(async move { (name, host_values(&inv, t.as_ref()).await) });
    }
    let mut values = BTreeMap::new();
    while let Some(j) = set.join_next().await {
        if let Ok((name, v)) = j {
            values.insert(name, v);
        }
    }
    for m in &mut members {
        if let Some((cd, running)) = values.remove(&m.name) {
            m.controldata = cd;
            m.running = running;
        }
    }
    Ok(RollingInput {
        members,
        paused: c.pause,
        maximum_lag_on_failover: lag_limit.flatten().unwrap_or(inv.maximum_lag_on_failover),
    })
}

/// Polls `/cluster` until `done` holds for it, bounded by `timeout`.
async fn wait_cluster(
    agents: &AgentClient,
    member: &str,
    what: &str,
    timeout: Duration,
    done: impl Fn(&ClusterDoc) -> bool,
) -> Result<ClusterDoc, RollingError> {
    let start = Instant::now();
    let mut last = None;
    loop {
        if let Ok(c) = agents.cluster().await {
            if done(&c) {
                return Ok(c);
            }
            last = Some(c);
        }
        if start.elapsed() > timeout {
            return Err(RollingError::Wait {
                member: member.into(),
                what: what.into(),
                timeout,
                reported: reported(last.as_ref(), member),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

fn pending(c: &ClusterDoc, name: &str) -> bool {
    c.member(name)
        .is_some_and(|m| m.pending_restart == Some(true))
}

struct Exec<'a> {
    inv: &'a Inventory,
    fleet: &'a Fleet,
    agents: AgentClient,
    progress: ProgressFn<'a>,
    done: Vec<(String, String)>,
}

impl Exec<'_> {
    fn say(&self, msg: &str) {
        (self.progress)(msg);
    }

    fn did(&mut self, member: &str, what: String) {
        self.say(&format!("{member}: {what}"));
        self.done.push((member.to_string(), what));
    }

    fn transport(&self, member: &str) -> Result<Arc<dyn Transport>, RollingError> {
        self.fleet
            .get(member)
            .cloned()
            .ok_or_else(|| RollingError::Gather(format!("no SSH connection to {member}")))
    }

    /// Waits until `member`'s control file shows every value of `gate` at most.
    async fn wait_gate(&self, member: &str, gate: &HotValues) -> Result<(), RollingError> {
        if gate.is_empty() {
            return Ok(());
        }
        let t = self.transport(member)?;
        let what = format!("its pg_controldata shows {}", show_values(gate, "≤"));
        self.say(&format!("{member}: waiting until {what}"));
        let start = Instant::now();
        loop {
            let (cd, _) = host_values(self.inv, t.as_ref()).await;
            if gate.iter().all(|(p, v)| cd.get(p).is_some_and(|c| c <= v)) {
                return Ok(());
            }
            if start.elapsed() > CONTROLDATA_TIMEOUT {
                return Err(RollingError::Wait {
                    member: member.into(),
                    what,
                    timeout: CONTROLDATA_TIMEOUT,
                    reported: format!("pg_controldata {}", show_values(&cd, "=")),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// `SELECT` on `member`'s own PostgreSQL over SSH: one value per line.
    async fn sql(&self, member: &str, sql: &str) -> Result<Vec<String>, RollingError> {
        let t = self.transport(member)?;
        let out = t.run_ok(&psql(self.inv, sql), SSH_READ_TIMEOUT).await?;
        Ok(out
            .stdout_str()
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect())
    }

    /// The leader's clock (epoch seconds), to tell WAL senders started after a restart from
    /// those before it without comparing two hosts' clocks.
    async fn clock(&self, leader: &str) -> Result<String, RollingError> {
        self.sql(leader, "SELECT extract(epoch FROM now())::text")
            .await?
            .pop()
            .ok_or_else(|| RollingError::Gather(format!("{leader}: no answer to SELECT now()")))
    }

    /// Waits until the leader's `pg_stat_replication` shows every one of `members` streaming
    /// (with `since`: from a WAL sender started after that leader-clock time), and `/cluster`
    /// them streaming with lag at most `max_lag` (so the next plan reads a fresh view). The leader's own view, not the member keys: a key written
    /// before the restart still says `streaming` for up to a `loop_wait`.
    async fn wait_streaming(
        &self,
        leader: &str,
        members: &[String],
        since: Option<&str>,
        max_lag: u64,
        timeout: Duration,
    ) -> Result<(), RollingError> {
        if members.is_empty() {
            return Ok(());
        }
        let mut sql = "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'"
            .to_string();
        if let Some(t) = since {
            let t: f64 = t.parse().unwrap_or(0.0);
            sql.push_str(&format!(" AND extract(epoch FROM backend_start) > {t}"));
        }
        let what = format!(
            "{} stream{} from {leader} (its pg_stat_replication) with lag ≤ {max_lag} B",
            members.join(", "),
            if members.len() == 1 { "s" } else { "" }
        );
        self.say(&format!("{}: waiting until {what}", members.join(", ")));
        let start = Instant::now();
        loop {
            let seen = self.sql(leader, &sql).await.unwrap_or_default();
            let c = self.agents.cluster().await.ok();
            let lag_ok = |m: &String| {
                c.as_ref().and_then(|c| c.member(m)).is_some_and(|x| {
                    x.state == "streaming"
                        && x.lag
                            .as_ref()
                            .and_then(|l| l.bytes())
                            .is_some_and(|l| l <= max_lag)
                })
            };
            let missing: Vec<&String> = members
                .iter()
                .filter(|m| !seen.contains(m) || !lag_ok(m))
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            if start.elapsed() > timeout {
                let first = missing[0];
                return Err(RollingError::Wait {
                    member: first.clone(),
                    what,
                    timeout,
                    reported: format!(
                        "{}; {leader}'s pg_stat_replication streams to [{}]",
                        reported(c.as_ref(), first),
                        seen.join(", ")
                    ),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn restart_call(&self, member: &str, body: Value) -> Result<(), RollingError> {
        self.agents
            .restart(member, &body)
            .await
            .map(|_| ())
            .map_err(|source| RollingError::Agent {
                member: member.into(),
                what: "POST /restart".into(),
                source: Box::new(source),
            })
    }

    async fn restart_replica(
        &mut self,
        m: &MemberInput,
        leader: &str,
        gate: &HotValues,
        max_lag: u64,
    ) -> Result<(), RollingError> {
        self.wait_gate(&m.name, gate).await?;
        let backend = replica_backend(self.inv);
        set_state_everywhere(self.inv, self.fleet, &m.name, "drain").await?;
        self.did(&m.name, format!("drained from {backend}"));
        let r = self.restart_drained(m, leader, max_lag).await;
        // Undrained also when the restart or a wait failed: a replica that is back serves
        // reads again, one that is not fails HAProxy's /replica check anyway.
        let u = set_state_everywhere(self.inv, self.fleet, &m.name, "ready").await;
        if u.is_ok() {
            self.did(&m.name, format!("put back into {backend}"));
        }
        r.and(u)
    }

    async fn restart_drained(
        &mut self,
        m: &MemberInput,
        leader: &str,
        max_lag: u64,
    ) -> Result<(), RollingError> {
        let backend = replica_backend(self.inv);
        self.say(&format!(
            "{}: waiting until its client sessions through HAProxy end (at most {DRAIN_TIMEOUT:?})",
            m.name
        ));
        let start = Instant::now();
        loop {
            let mut total = 0;
            for t in haproxy_hosts(self.inv, self.fleet) {
                let csv = haproxy(t.as_ref(), "show stat").await.unwrap_or_default();
                total += current_sessions(&csv, &backend, &m.name).unwrap_or(0);
            }
            if total == 0 {
                break;
            }
            if start.elapsed() > DRAIN_TIMEOUT {
                self.did(
                    &m.name,
                    format!("{total} client session(s) still open after {DRAIN_TIMEOUT:?}: the restart closes them"),
                );
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        // `restart_pending` when flagged (the agent skips a member that no longer is);
        // a replica that only runs above the leader's values is not flagged by pgherd's agent.
        let mut body = json!({ "role": "replica" });
        if m.pending_restart {
            body["restart_pending"] = json!(true);
        }
        self.say(&format!(
            "{}: restarting PostgreSQL (POST /restart)",
            m.name
        ));
        let since = self.clock(leader).await?;
        self.restart_call(&m.name, body).await?;
        self.did(&m.name, "PostgreSQL restarted".into());
        let name = m.name.clone();
        self.wait_streaming(
            leader,
            std::slice::from_ref(&name),
            Some(&since),
            max_lag,
            STREAM_TIMEOUT,
        )
        .await?;
        if m.pending_restart {
            self.say(&format!("{name}: waiting until its pending_restart clears"));
            let r = wait_cluster(
                &self.agents,
                &name,
                "its pending_restart clears",
                PENDING_CLEAR_TIMEOUT,
                |c| !pending(c, &name),
            )
            .await;
            if let Err(e) = r {
                // Still pending only for the five (its control file had not replayed the
                // primary's values yet): the next round waits for replay and restarts it once
                // more. Anything else a restart did not apply is an error.
                let c = self.agents.cluster().await.ok();
                let still = c
                    .as_ref()
                    .map(members_from_cluster)
                    .and_then(|v| v.into_iter().find(|x| x.name == name));
                let only_five = still.as_ref().is_some_and(|x| {
                    !x.pending_reason.is_empty()
                        && x.pending_reason
                            .keys()
                            .all(|k| HotParam::from_guc(k).is_some())
                });
                if !only_five {
                    return Err(match still {
                        Some(x) => RollingError::StillPending {
                            member: name.clone(),
                            attempts: 1,
                            reason: show_reason(&x),
                        },
                        None => e,
                    });
                }
            }
        }
        self.did(&name, format!("streams again (lag ≤ {max_lag} B)"));
        Ok(())
    }

    async fn restart_primary(&mut self, m: &MemberInput, max_lag: u64) -> Result<(), RollingError> {
        let t = self.transport(&m.name)?;
        self.say(&format!("{}: CHECKPOINT (shortens the shutdown)", m.name));
        t.run_ok(&psql(self.inv, "CHECKPOINT"), CHECKPOINT_TIMEOUT)
            .await?;
        self.did(&m.name, "CHECKPOINT done".into());
        let streaming_before: Vec<String> = self
            .agents
            .cluster()
            .await
            .ok()
            .map(|c| {
                members_from_cluster(&c)
                    .into_iter()
                    .filter(|x| x.state == "streaming")
                    .map(|x| x.name)
                    .collect()
            })
            .unwrap_or_default();
        self.say(&format!(
            "{}: restarting the primary in place (POST /restart; writes stop until it is back)",
            m.name
        ));
        let mut body = json!({ "role": "primary" });
        if m.pending_restart {
            body["restart_pending"] = json!(true);
        }
        self.restart_call(&m.name, body).await?;
        self.did(&m.name, "primary restarted in place".into());
        let name = m.name.clone();
        let what = format!("{name} leads and runs again");
        self.say(&format!("{name}: waiting until {what}"));
        wait_cluster(&self.agents, &name, &what, PRIMARY_BACK_TIMEOUT, |c| {
            c.member(&name)
                .is_some_and(|x| x.role == "leader" && x.state == "running")
        })
        .await?;
        // Every WAL sender of the restarted postmaster is new: no `since` needed.
        self.wait_streaming(
            &name,
            &streaming_before,
            None,
            max_lag,
            PRIMARY_BACK_TIMEOUT,
        )
        .await?;
        self.did(&name, "leads again, every replica streams".into());
        if m.pending_restart {
            // The member key refreshes once per loop_wait: the next plan must not see the flag
            // from before the restart (and restart the primary twice).
            self.say(&format!("{name}: waiting until its pending_restart clears"));
            wait_cluster(
                &self.agents,
                &name,
                "its pending_restart clears after the restart",
                PENDING_CLEAR_TIMEOUT,
                |c| !pending(c, &name),
            )
            .await?;
        }
        Ok(())
    }

    async fn switchover(
        &mut self,
        m: &MemberInput,
        candidate: &str,
        max_lag: u64,
    ) -> Result<(), RollingError> {
        self.say(&format!(
            "{}: switching over to {candidate} (waits until {candidate} leads)",
            m.name
        ));
        ctl::switchover(self.inv, Some(candidate), false, true)
            .await
            .map_err(|e| call_err(&m.name, "switchover", e))?;
        self.did(&m.name, format!("switched over to {candidate}"));
        let name = m.name.clone();
        self.wait_streaming(
            candidate,
            std::slice::from_ref(&name),
            None,
            max_lag,
            STREAM_TIMEOUT,
        )
        .await?;
        self.did(&name, format!("streams from {candidate}"));
        // Its demotion restarted it with the new configuration; a flag still set after a few
        // agent cycles is real, and the next plan restarts it as a replica.
        let _ = wait_cluster(
            &self.agents,
            &name,
            "its pending_restart clears after the demotion",
            PENDING_CLEAR_TIMEOUT,
            |c| !pending(c, &name),
        )
        .await;
        Ok(())
    }
}

/// Gathers the live input, plans, and executes the plan step by step, re-reading the cluster
/// and re-planning before each step (a re-run after an interruption continues where the
/// cluster is). First puts back any server an interrupted run left drained. Returns what it
/// did; with nothing pending, the plan is empty and nothing is touched.
pub async fn run_pending_restarts(
    inv: &Inventory,
    fleet: &Fleet,
    opts: &RollingOptions,
    progress: ProgressFn<'_>,
) -> Result<RollingReport, RollingError> {
    let agents = AgentClient::for_inventory(inv);
    let mut x = Exec {
        inv,
        fleet,
        agents,
        progress,
        done: Vec::new(),
    };
    for (m, what) in undrain_leftovers(inv, fleet).await? {
        x.did(&m, what);
    }
    let mut first_plan = None;
    let mut attempts: BTreeMap<(String, bool), u32> = BTreeMap::new();
    let mut steps_done = 0;
    loop {
        let input = gather_input(inv, &x.agents, fleet).await?;
        let plan = match plan_restarts(&input, opts) {
            Ok(p) => p,
            Err(refusal) if first_plan.is_some() => {
                return Err(RollingError::RefusedMidway {
                    steps: steps_done,
                    refusal,
                });
            }
            Err(r) => return Err(r.into()),
        };
        if first_plan.is_none() {
            first_plan = Some(plan.clone());
        }
        let Some((kind, step)) = plan
            .phases
            .iter()
            .find_map(|p| p.steps.first().map(|s| (p.kind, s.clone())))
        else {
            break;
        };
        let m = input
            .members
            .iter()
            .find(|m| m.name == step.member)
            .cloned()
            .expect("the planner names members of its input");
        let n = attempts
            .entry((step.member.clone(), kind == PhaseKind::Lower))
            .or_insert(0);
        if *n >= MAX_ATTEMPTS {
            let reason = if m.pending_restart {
                show_reason(&m)
            } else {
                format!("runs {}", show_values(&m.running, "="))
            };
            return Err(RollingError::StillPending {
                member: step.member,
                attempts: *n,
                reason,
            });
        }
        *n += 1;
        steps_done += 1;
        x.say(&format!("next: {step}"));
        let leader = input
            .members
            .iter()
            .find(|x| x.role == MemberRole::Leader)
            .map(|x| x.name.clone())
            .unwrap_or_default();
        let max_lag = input.maximum_lag_on_failover;
        match &step.action {
            StepAction::RestartReplica { gate } => {
                x.restart_replica(&m, &leader, gate, max_lag).await?
            }
            StepAction::RestartPrimary => x.restart_primary(&m, max_lag).await?,
            StepAction::Switchover { candidate } => x.switchover(&m, candidate, max_lag).await?,
        }
    }
    Ok(RollingReport {
        plan: first_plan.unwrap_or_default(),
        done: x.done,
    })
}
