//! The I/O of the cluster configuration: reading its facts ([`gather`]: every agent's
//! `GET /patroni`, the live `config` and leader from the first agent that answers, the leader's
//! `pg_settings` over SSH), the compare-and-swap write ([`write_and_wait`]) and the waits until
//! the agents apply a config revision or load a new agent.yml. Every decision is the pure
//! planner's ([`super::plan_config`]).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::{
    ConfigFacts, ConfigPlan, ConfigRefusal, LiveConfig, PG_SETTINGS_SQL, PgSetting,
    parse_pg_settings,
};
use crate::provision::agent_client::AgentError;
use crate::provision::desired::DeploySpec;
use crate::provision::facts::AgentFact;
use crate::provision::remote::{Fleet, agent_client, psql_command};
use crate::transport::Transport;

/// Reading `pg_settings` over SSH: one local `psql`.
const SETTINGS_TIMEOUT: Duration = Duration::from_secs(20);
/// Poll interval while waiting for the agents to apply a config revision.
const POLL: Duration = Duration::from_millis(250);

/// Why gathering or writing the cluster config failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterConfigError {
    #[error(transparent)]
    Refused(#[from] ConfigRefusal),
    #[error(
        "the DCS config changed since this run read it at revision {revision} (someone ran patronictl edit-config or PATCH /config?): nothing written; run apply again to plan against the new config"
    )]
    Conflict { revision: i64 },
    #[error("writing the DCS config through {member}'s agent")]
    Write {
        member: String,
        #[source]
        source: AgentError,
    },
    #[error("no running agent to write the DCS config through")]
    NoRunningAgent,
    #[error("{member}: {what} (waited {waited:?}; its agent reports: {reported})")]
    Stuck {
        member: String,
        what: String,
        waited: Duration,
        reported: String,
    },
    #[error("{member}: the agent refused its new configuration: {reason}")]
    AgentRefused { member: String, reason: String },
    #[error("reading pg_settings on the leader {host}: {detail}")]
    Settings { host: String, detail: String },
    #[error("reading pg_settings on the leader {host}")]
    SettingsUnreachable {
        host: String,
        #[source]
        source: crate::transport::TransportError,
    },
}

/// Reads the cluster facts: config + ETag and the leader from the first agent that answers,
/// every agent's `/patroni`, and the leader's `pg_settings` over SSH.
pub async fn gather(spec: &DeploySpec, fleet: &Fleet) -> Result<ConfigFacts, ClusterConfigError> {
    let agents = agent_client(spec);
    let mut facts = ConfigFacts::default();
    let mut set = tokio::task::JoinSet::new();
    for name in agents.members() {
        let (agents, name) = (agents.clone(), name.to_string());
        set.spawn(async move {
            let a = agents.patroni(&name).await;
            (name, a)
        });
    }
    while let Some(j) = set.join_next().await {
        let (name, a) = j.expect("agent status task panicked");
        if let Ok(doc) = a {
            facts.agents.insert(name, AgentFact::from(doc));
        }
    }
    for name in agents.members() {
        if !facts.agents.contains_key(name) {
            continue;
        }
        if facts.config.is_none()
            && let Ok(c) = agents.config(name).await
        {
            facts.config = Some(c);
        }
        if facts.leader.is_none()
            && let Ok(c) = agents.cluster_from(name).await
        {
            facts.leader = c.leader_name();
        }
        if facts.config.is_some() && facts.leader.is_some() {
            break;
        }
    }
    if let Some(leader) = facts.leader.clone()
        && let (Some(t), Some(cmd)) = (
            fleet.get(&leader),
            psql_command(spec, &leader, PG_SETTINGS_SQL),
        )
    {
        facts.settings = read_settings(t.as_ref(), &leader, &cmd).await?;
    }
    Ok(facts)
}

async fn read_settings(
    t: &dyn Transport,
    host: &str,
    cmd: &str,
) -> Result<BTreeMap<String, PgSetting>, ClusterConfigError> {
    let out = t.run(cmd, SETTINGS_TIMEOUT).await.map_err(|source| {
        ClusterConfigError::SettingsUnreachable {
            host: host.into(),
            source,
        }
    })?;
    if !out.success() {
        return Err(ClusterConfigError::Settings {
            host: host.into(),
            detail: out.stderr_tail(),
        });
    }
    Ok(parse_pg_settings(&out.stdout_str()))
}

/// Writes `plan.patch` with `If-Match: plan.revision` through the first agent that answers,
/// then waits until every agent in `running` reports the new revision applied. Returns the new
/// revision.
pub async fn write_and_wait(
    spec: &DeploySpec,
    plan: &ConfigPlan,
    running: &[String],
    timeout: Duration,
) -> Result<Option<i64>, ClusterConfigError> {
    let agents = agent_client(spec);
    let running_members: Vec<&str> = agents
        .members()
        .filter(|n| running.iter().any(|r| r == n))
        .collect();
    let mut last_err = None;
    let mut written = false;
    for name in &running_members {
        match agents.patch_config(name, &plan.patch, plan.revision).await {
            Ok(_) => {
                written = true;
                break;
            }
            // If-Match failed: the config moved on since this run read it.
            Err(AgentError::Refused { status: 412, .. }) => {
                return Err(ClusterConfigError::Conflict {
                    revision: plan.revision.unwrap_or_default(),
                });
            }
            Err(e) => {
                last_err = Some(ClusterConfigError::Write {
                    member: name.to_string(),
                    source: e,
                })
            }
        }
    }
    if !written {
        return Err(last_err.unwrap_or(ClusterConfigError::NoRunningAgent));
    }
    // The revision the write produced.
    let mut new_rev = None;
    for name in &running_members {
        if let Ok(LiveConfig {
            revision: Some(r), ..
        }) = agents.config(name).await
        {
            new_rev = Some(r);
            break;
        }
    }
    let Some(want) = new_rev else {
        return Ok(None);
    };
    for name in running_members {
        let started = Instant::now();
        loop {
            let fact = agents.patroni(name).await.ok().map(AgentFact::from);
            if let Some(f) = &fact
                && f.dcs_config_revision.is_some_and(|r| r >= want)
            {
                break;
            }
            if let Some(reason) = fact.as_ref().and_then(|f| f.dcs_config_error.clone()) {
                return Err(ClusterConfigError::AgentRefused {
                    member: name.to_string(),
                    reason,
                });
            }
            if started.elapsed() > timeout {
                let reported = match fact {
                    Some(f) => format!(
                        "state {}, applied DCS config revision {}",
                        f.state,
                        f.dcs_config_revision
                            .map(|r| r.to_string())
                            .unwrap_or_else(|| "none".into())
                    ),
                    None => "no answer".into(),
                };
                return Err(ClusterConfigError::Stuck {
                    member: name.to_string(),
                    what: format!("its agent did not apply DCS config revision {want}"),
                    waited: timeout,
                    reported,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }
    Ok(Some(want))
}

/// Waits until `host`'s agent runs with the config file whose sha256 is `sha`; an agent that
/// refused it (its `config_error`) fails at once with its reason.
pub async fn wait_config_loaded(
    spec: &DeploySpec,
    host: &str,
    sha: &str,
    timeout: Duration,
) -> Result<(), ClusterConfigError> {
    let agents = agent_client(spec);
    if agents.base(host).is_err() {
        return Ok(());
    }
    let started = Instant::now();
    loop {
        let fact = agents.patroni(host).await.ok().map(AgentFact::from);
        if let Some(f) = &fact {
            if f.config_sha256.as_deref() == Some(sha) {
                return Ok(());
            }
            if let Some(reason) = &f.config_error {
                return Err(ClusterConfigError::AgentRefused {
                    member: host.into(),
                    reason: reason.clone(),
                });
            }
        }
        if started.elapsed() > timeout {
            return Err(ClusterConfigError::Stuck {
                member: host.into(),
                what: "its agent did not load the new agent.yml".into(),
                waited: timeout,
                reported: match fact {
                    Some(f) => format!(
                        "config sha256 {}",
                        f.config_sha256.as_deref().unwrap_or("(none reported)")
                    ),
                    None => "no answer".into(),
                },
            });
        }
        tokio::time::sleep(POLL).await;
    }
}
