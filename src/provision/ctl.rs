//! Day-2 verbs against a running cluster, through the agents' Patroni-compatible REST API (what
//! patronictl does, without a second tool or a DCS client): `switchover`, `failover`,
//! `restart`, `reinit`, `pause`, `resume`. Mutating calls use Basic auth with the inventory's
//! REST credentials; the password comes from the secrets file and is never printed.
//!
//! Every verb first reads `GET /cluster` from the first agent that answers (the members, the
//! leader, whether the cluster is paused), checks the request against it (a candidate that is
//! no member, a switchover without a leader...), asks for confirmation unless `--yes`, and
//! then waits until the cluster shows the result, so the exit status means "done", not "asked".

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::json;

use super::agent_client::AgentClient;
use crate::api::docs::ClusterDoc;
use crate::inventory::Inventory;

/// How long a verb waits for the cluster to show its effect.
const EFFECT_TIMEOUT: Duration = Duration::from_secs(120);
/// How often a wait reads `/cluster` again: a few times per agent cycle (loop_wait ≥ 1 s).
const POLL: Duration = Duration::from_millis(300);

/// Asks on a terminal; without one, `--yes` is required (a script must say it means it).
pub(crate) fn confirm(question: &str, yes: bool) -> anyhow::Result<()> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        bail!("{question}: not confirmed (no terminal; pass --yes)");
    }
    eprint!("{question} [y/N] ");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    if matches!(line.trim(), "y" | "Y" | "yes") {
        Ok(())
    } else {
        bail!("aborted, nothing changed")
    }
}

/// Polls `/cluster` until `done` holds.
pub async fn wait_until(
    agents: &AgentClient,
    what: &str,
    done: impl Fn(&ClusterDoc) -> bool,
) -> anyhow::Result<ClusterDoc> {
    let start = Instant::now();
    loop {
        if let Ok(c) = agents.cluster().await
            && done(&c)
        {
            return Ok(c);
        }
        if start.elapsed() > EFFECT_TIMEOUT {
            bail!("timed out after {EFFECT_TIMEOUT:?} waiting until {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `switchover` (a leader exists) or `failover` (`force`: also without a healthy leader).
pub async fn switchover(
    inv: &Inventory,
    candidate: Option<&str>,
    force: bool,
    yes: bool,
) -> anyhow::Result<String> {
    let agents = AgentClient::for_inventory(inv);
    let c = agents.cluster().await?;
    let leader = c.leader_name();
    if let Some(cand) = candidate {
        if !c.is_member(cand) {
            bail!("candidate {cand:?} is not a member of the cluster");
        }
        if leader.as_deref() == Some(cand) {
            bail!("{cand} already leads the cluster");
        }
    }
    let verb = if force { "failover" } else { "switchover" };
    // Asked of the leader (it hands over); without one, of the candidate (it takes over).
    let target = match (&leader, candidate, force) {
        (Some(l), _, _) => l.clone(),
        (None, Some(cand), true) => cand.to_string(),
        (None, None, true) => bail!("failover without a leader needs --candidate"),
        (None, _, false) => bail!("the cluster has no leader: use failover --candidate"),
    };
    confirm(
        &format!(
            "{verb}: {} → {}",
            leader.as_deref().unwrap_or("(no leader)"),
            candidate.unwrap_or("the healthiest replica")
        ),
        yes,
    )?;
    agents
        .switchover(&target, leader.as_deref(), candidate, force)
        .await?;
    let old = leader.clone();
    let want = candidate.map(str::to_string);
    let c = wait_until(&agents, "a new leader leads", |c| {
        let now = c.leader_name();
        now.is_some() && now != old && want.as_ref().is_none_or(|w| now.as_ref() == Some(w))
    })
    .await?;
    Ok(format!(
        "{verb} done: {} leads",
        c.leader_name().unwrap_or_default()
    ))
}

/// Restarts PostgreSQL on `member`, or on every member (replicas first, the leader last, each
/// back before the next).
pub async fn restart(inv: &Inventory, member: Option<&str>, yes: bool) -> anyhow::Result<String> {
    let agents = AgentClient::for_inventory(inv);
    let c = agents.cluster().await?;
    let leader = c.leader_name();
    let mut order: Vec<String> = match member {
        Some(m) if !c.is_member(m) => bail!("{m:?} is not a member of the cluster"),
        Some(m) => vec![m.to_string()],
        None => c.members.iter().map(|m| m.name.clone()).collect(),
    };
    order.sort_by_key(|m| Some(m) == leader.as_ref());
    confirm(&format!("restart PostgreSQL on {}", order.join(", ")), yes)?;
    for m in &order {
        agents.restart(m, &json!({})).await?;
        let is_leader = Some(m) == leader.as_ref();
        wait_until(&agents, &format!("{m} runs again"), |c| {
            c.member(m).is_some_and(|x| {
                (x.state == "running" && (x.role == "leader" || !is_leader))
                    || (!is_leader && x.is_streaming())
            })
        })
        .await?;
    }
    Ok(format!("restarted {}", order.join(", ")))
}

/// After `POST /reinitialize` the member still shows `streaming` until its agent stopped
/// PostgreSQL for the clone (the agent answers before it begins); the wait for "streams
/// again" starts this long after, one agent cycle, so it does not see the old state.
const REINIT_SETTLE: Duration = Duration::from_secs(1);

/// Re-creates `member`'s data from the leader (its local data is discarded).
pub async fn reinit(inv: &Inventory, member: &str, yes: bool) -> anyhow::Result<String> {
    let agents = AgentClient::for_inventory(inv);
    let c = agents.cluster().await?;
    if !c.is_member(member) {
        bail!("{member:?} is not a member of the cluster");
    }
    if c.leader_name().as_deref() == Some(member) {
        bail!("{member} is the leader: switch over first");
    }
    confirm(
        &format!("reinitialize {member} (its data directory is discarded)"),
        yes,
    )?;
    agents.reinitialize(member, true).await?;
    tokio::time::sleep(REINIT_SETTLE).await;
    wait_until(&agents, &format!("{member} streams again"), |c| {
        c.streaming(member)
    })
    .await?;
    Ok(format!("{member} reinitialized and streaming"))
}

/// Pauses (or resumes) automatic failover: `PATCH /config {"pause": …}`.
pub async fn pause(inv: &Inventory, on: bool) -> anyhow::Result<String> {
    let agents = AgentClient::for_inventory(inv);
    let c = agents.cluster().await?;
    let Some(target) = c
        .leader_name()
        .or_else(|| c.members.first().map(|m| m.name.clone()))
    else {
        bail!("the cluster has no members");
    };
    let mut patch = serde_json::Map::new();
    patch.insert("pause".into(), on.into());
    agents.patch_config(&target, &patch, None).await?;
    wait_until(
        &agents,
        if on {
            "the cluster is paused"
        } else {
            "the cluster is resumed"
        },
        |c| c.pause == on,
    )
    .await?;
    Ok(if on {
        "paused: no automatic failover until `pgherd resume`".into()
    } else {
        "resumed: automatic failover is on".into()
    })
}
