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

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::inventory::{Inventory, Role};

/// How long a verb waits for the cluster to show its effect.
const EFFECT_TIMEOUT: Duration = Duration::from_secs(120);
/// A read of `/cluster`: an agent that does not answer within this is skipped for the next.
const READ_TIMEOUT: Duration = Duration::from_secs(3);
/// A mutating call.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The agent answers `POST /restart` once PostgreSQL is back: its stop (≤ 60 s) plus its start
/// (≤ `primary_start_timeout`, 300 s by default), plus margin for the HTTP round trip. With
/// [`CALL_TIMEOUT`] a restart slower than 10 s was reported as failed although it went on.
pub const RESTART_CALL_TIMEOUT: Duration = Duration::from_secs(420);

/// The agents of one inventory.
pub struct Agents<'a> {
    inv: &'a Inventory,
    http: reqwest::Client,
}

impl<'a> Agents<'a> {
    pub fn new(inv: &'a Inventory) -> anyhow::Result<Agents<'a>> {
        let http = reqwest::Client::builder().build()?;
        Ok(Agents { inv, http })
    }

    fn base(&self, member: &str) -> anyhow::Result<String> {
        let h = self
            .inv
            .host(member)
            .filter(|h| h.has(Role::Postgres))
            .with_context(|| format!("{member:?} is not a postgres host of the inventory"))?;
        Ok(format!(
            "http://{}",
            h.endpoint(self.inv.agent.restapi_port)
        ))
    }

    /// `GET /cluster` from the first agent that answers.
    pub async fn cluster(&self) -> anyhow::Result<Value> {
        let mut tried = Vec::new();
        for h in self.inv.hosts_with(Role::Postgres) {
            let url = format!("{}/cluster", self.base(h.name.as_str())?);
            match self.http.get(&url).timeout(READ_TIMEOUT).send().await {
                Ok(r) if r.status().is_success() => {
                    if let Ok(v) = r.json::<Value>().await {
                        return Ok(v);
                    }
                }
                Ok(r) => tried.push(format!("{}: HTTP {}", h.name.as_str(), r.status())),
                Err(_) => tried.push(format!("{}: agent not reachable", h.name.as_str())),
            }
        }
        bail!("no agent answered GET /cluster ({})", tried.join("; "))
    }

    /// `GET path` on `member`'s agent as JSON (read timeout as for `/cluster`).
    pub async fn get_json(&self, member: &str, path: &str) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base(member)?);
        let r = self
            .http
            .get(&url)
            .timeout(READ_TIMEOUT)
            .send()
            .await
            .with_context(|| format!("GET {path} on {member}: agent not reachable"))?;
        let status = r.status();
        if !status.is_success() {
            bail!("GET {path} on {member}: HTTP {status}");
        }
        r.json::<Value>()
            .await
            .with_context(|| format!("GET {path} on {member}: not JSON"))
    }

    /// A mutating call on `member`'s agent; returns the body of a 2xx answer.
    async fn send(
        &self,
        method: reqwest::Method,
        member: &str,
        path: &str,
        body: Value,
    ) -> anyhow::Result<String> {
        self.send_with_timeout(method, member, path, body, CALL_TIMEOUT)
            .await
    }

    /// [`Agents::send`] with its own timeout, for calls the agent answers only when the work
    /// is done (`POST /restart` answers once PostgreSQL is up again).
    pub async fn send_with_timeout(
        &self,
        method: reqwest::Method,
        member: &str,
        path: &str,
        body: Value,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let url = format!("{}{path}", self.base(member)?);
        let r = self
            .http
            .request(method.clone(), &url)
            .timeout(timeout)
            .basic_auth(
                &self.inv.agent.restapi_username,
                Some(self.inv.secrets.restapi.expose()),
            )
            .json(&body)
            .send()
            .await
            .with_context(|| format!("{method} {path} on {member}: agent not reachable"))?;
        let status = r.status();
        let text = r.text().await.unwrap_or_default();
        if !status.is_success() {
            bail!(
                "{method} {path} on {member}: HTTP {status}: {}",
                text.trim()
            );
        }
        Ok(text)
    }
}

/// The current leader's name in a `/cluster` answer.
pub fn leader_of(cluster: &Value) -> Option<String> {
    members(cluster)
        .into_iter()
        .find(|m| m["role"] == "leader")
        .and_then(|m| m["name"].as_str().map(str::to_string))
}

fn members(cluster: &Value) -> Vec<&Value> {
    cluster["members"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default()
}

/// How many members a `/cluster` answer lists.
pub fn member_count(cluster: &Value) -> usize {
    members(cluster).len()
}

/// How many members stream from an upstream.
pub fn streaming_count(cluster: &Value) -> usize {
    members(cluster)
        .iter()
        .filter_map(|m| m["name"].as_str())
        .filter(|n| streaming(cluster, n))
        .count()
}

fn is_member(cluster: &Value, name: &str) -> bool {
    members(cluster).iter().any(|m| m["name"] == name)
}

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
    agents: &Agents<'_>,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
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
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A replica (also a synchronous one) streaming from the leader.
fn streaming(cluster: &Value, name: &str) -> bool {
    members(cluster).iter().any(|m| {
        m["name"] == name
            && matches!(
                m["role"].as_str(),
                Some("replica" | "sync_standby" | "quorum_standby")
            )
            && m["state"] == "streaming"
    })
}

/// `switchover` (a leader exists) or `failover` (`force`: also without a healthy leader).
pub async fn switchover(
    inv: &Inventory,
    candidate: Option<&str>,
    force: bool,
    yes: bool,
) -> anyhow::Result<String> {
    let agents = Agents::new(inv)?;
    let c = agents.cluster().await?;
    let leader = leader_of(&c);
    if let Some(cand) = candidate {
        if !is_member(&c, cand) {
            bail!("candidate {cand:?} is not a member of the cluster");
        }
        if leader.as_deref() == Some(cand) {
            bail!("{cand} already leads the cluster");
        }
    }
    let verb = if force { "failover" } else { "switchover" };
    let (target, body) = match (&leader, candidate, force) {
        (Some(l), cand, _) => {
            let mut b = json!({ "leader": l });
            if let Some(cand) = cand {
                b["candidate"] = json!(cand);
            }
            (l.clone(), b)
        }
        (None, Some(cand), true) => (cand.to_string(), json!({ "candidate": cand })),
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
        .send(reqwest::Method::POST, &target, &format!("/{verb}"), body)
        .await?;
    let old = leader.clone();
    let want = candidate.map(str::to_string);
    let c = wait_until(&agents, "a new leader leads", |c| {
        let now = leader_of(c);
        now.is_some() && now != old && want.as_ref().is_none_or(|w| now.as_ref() == Some(w))
    })
    .await?;
    Ok(format!(
        "{verb} done: {} leads",
        leader_of(&c).unwrap_or_default()
    ))
}

/// Restarts PostgreSQL on `member`, or on every member (replicas first, the leader last, each
/// back before the next).
pub async fn restart(inv: &Inventory, member: Option<&str>, yes: bool) -> anyhow::Result<String> {
    let agents = Agents::new(inv)?;
    let c = agents.cluster().await?;
    let leader = leader_of(&c);
    let mut order: Vec<String> = match member {
        Some(m) if !is_member(&c, m) => bail!("{m:?} is not a member of the cluster"),
        Some(m) => vec![m.to_string()],
        None => members(&c)
            .iter()
            .filter_map(|m| m["name"].as_str().map(str::to_string))
            .collect(),
    };
    order.sort_by_key(|m| Some(m) == leader.as_ref());
    confirm(&format!("restart PostgreSQL on {}", order.join(", ")), yes)?;
    for m in &order {
        agents
            .send_with_timeout(
                reqwest::Method::POST,
                m,
                "/restart",
                json!({}),
                RESTART_CALL_TIMEOUT,
            )
            .await?;
        let is_leader = Some(m) == leader.as_ref();
        wait_until(&agents, &format!("{m} runs again"), |c| {
            members(c).iter().any(|x| {
                x["name"] == m.as_str()
                    && x["state"] == "running"
                    && (x["role"] == "leader" || !is_leader)
            }) || (!is_leader && streaming(c, m))
        })
        .await?;
    }
    Ok(format!("restarted {}", order.join(", ")))
}

/// Re-creates `member`'s data from the leader (its local data is discarded).
pub async fn reinit(inv: &Inventory, member: &str, yes: bool) -> anyhow::Result<String> {
    let agents = Agents::new(inv)?;
    let c = agents.cluster().await?;
    if !is_member(&c, member) {
        bail!("{member:?} is not a member of the cluster");
    }
    if leader_of(&c).as_deref() == Some(member) {
        bail!("{member} is the leader: switch over first");
    }
    confirm(
        &format!("reinitialize {member} (its data directory is discarded)"),
        yes,
    )?;
    agents
        .send(
            reqwest::Method::POST,
            member,
            "/reinitialize",
            json!({ "force": true }),
        )
        .await?;
    // Give the agent a moment to stop streaming, then wait until it streams again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    wait_until(&agents, &format!("{member} streams again"), |c| {
        streaming(c, member)
    })
    .await?;
    Ok(format!("{member} reinitialized and streaming"))
}

/// Pauses (or resumes) automatic failover: `PATCH /config {"pause": …}`.
pub async fn pause(inv: &Inventory, on: bool) -> anyhow::Result<String> {
    let agents = Agents::new(inv)?;
    let c = agents.cluster().await?;
    let target = leader_of(&c)
        .or_else(|| {
            members(&c)
                .first()
                .and_then(|m| m["name"].as_str().map(str::to_string))
        })
        .context("the cluster has no members")?;
    agents
        .send(
            reqwest::Method::PATCH,
            &target,
            "/config",
            json!({ "pause": on }),
        )
        .await?;
    wait_until(
        &agents,
        if on {
            "the cluster is paused"
        } else {
            "the cluster is resumed"
        },
        |c| c["pause"].as_bool().unwrap_or(false) == on,
    )
    .await?;
    Ok(if on {
        "paused: no automatic failover until `pgherd resume`".into()
    } else {
        "resumed: automatic failover is on".into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_leader_is_read_from_the_members() {
        let c = json!({"members": [
            {"name": "n1", "role": "replica", "state": "streaming"},
            {"name": "n2", "role": "leader", "state": "running"}
        ]});
        assert_eq!(leader_of(&c).as_deref(), Some("n2"));
        assert!(is_member(&c, "n1") && !is_member(&c, "n9"));
        assert!(streaming(&c, "n1") && !streaming(&c, "n2"));
        assert_eq!(leader_of(&json!({"members": []})), None);
    }
}
