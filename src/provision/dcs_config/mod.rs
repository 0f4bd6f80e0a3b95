//! The cluster-wide configuration after bootstrap: the inventory's settings (the `bootstrap.dcs`
//! section the agent template renders: PostgreSQL parameters, `synchronous_mode`, the profile's
//! `ttl / loop_wait / retry_timeout`, `maximum_lag_on_failover`, slot and rewind settings) are
//! reconciled into the live DCS `config` key, which every agent applies on its next cycle.
//! Without this, `bootstrap.dcs` is read only while the key does not exist, so every such
//! setting would be frozen at bring-up.
//!
//! Observe → decide → act, like the host planner:
//! - facts ([`ConfigFacts`], [`gather`]): the live `config` and its mod revision (`GET /config`
//!   and its `ETag`), the leader, the leader's `pg_settings` (over SSH, `psql` on the local
//!   socket as `postgres`), and what every agent reports it has applied (`GET /patroni`
//!   `pgherd` object);
//! - the pure planner [`plan_config`]: a per-key diff, each change with its effect taken from
//!   `pg_settings.context` on the leader (reload, new sessions only, restart), units normalised
//!   the way Patroni's `compare_values` does (`128MB` and `16384` × 8kB are the same value);
//! - the write ([`write_and_wait`]): one `PATCH /config` with `If-Match` on the revision the
//!   facts showed, so a concurrent `patronictl edit-config` is never clobbered (the agent
//!   answers 412 and the run stops), then a bounded wait until every running agent reports
//!   that revision as applied.
//!
//! Managed keys: exactly the keys the inventory renders into `bootstrap.dcs`. A key set in the
//! DCS outside the inventory (e.g. by `patronictl edit-config`) is left alone and listed as
//! such: pgherd cannot tell an operator's deliberate edit from a leftover, and deleting someone
//! else's setting is the worse mistake. To remove a parameter pgherd once set, set it to
//! `null` in the inventory (the merge patch deletes it), as autobase does.
//!
//! The facts' types and the planner (pure) are this file; the I/O (reading the facts through
//! the agents and over SSH, the write and the waits) is [`step`].

use std::collections::BTreeMap;
use std::fmt;

use serde_json::{Map, Value};

use super::facts::AgentFact;

mod step;
pub use step::{ClusterConfigError, gather, wait_config_loaded, write_and_wait};

/// One row of `pg_settings` (what the planner needs of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgSetting {
    pub setting: String,
    /// `8kB`, `ms`, ... or empty.
    pub unit: String,
    /// `postmaster`, `sighup`, `superuser`, `user`, `backend`, `superuser-backend`, `internal`.
    pub context: String,
    /// `bool`, `integer`, `real`, `enum`, `string`.
    pub vartype: String,
}

/// The query whose output [`parse_pg_settings`] reads (fields separated by U+001F).
pub const PG_SETTINGS_SQL: &str =
    "select name, setting, coalesce(unit, ''), context, vartype from pg_settings";

/// Decodes `psql -XAt -F $'\x1f'` output of [`PG_SETTINGS_SQL`].
pub fn parse_pg_settings(stdout: &str) -> BTreeMap<String, PgSetting> {
    stdout
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\u{1f}').collect();
            (f.len() == 5).then(|| {
                (
                    f[0].to_string(),
                    PgSetting {
                        setting: f[1].to_string(),
                        unit: f[2].to_string(),
                        context: f[3].to_string(),
                        vartype: f[4].to_string(),
                    },
                )
            })
        })
        .collect()
}

pub use crate::provision::agent_client::LiveConfig;

/// What the agents' REST API says about the cluster-wide configuration ([`gather`]): the live
/// `config` key, the leader, the leader's `pg_settings` and each agent's own report.
#[derive(Debug, Clone, Default)]
pub struct ConfigFacts {
    /// `None`: no agent answered `GET /config` with a config (a fresh cluster, or all down).
    pub config: Option<LiveConfig>,
    /// The member holding the leader key, when an agent answered `GET /cluster`.
    pub leader: Option<String>,
    /// The leader's `pg_settings` (empty without a reachable running leader).
    pub settings: BTreeMap<String, PgSetting>,
    /// Per postgres host whose agent answered `GET /patroni`.
    pub agents: BTreeMap<String, AgentFact>,
}

/// What a change does to the running cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// `sighup` / `superuser` / `user` context: a reload applies it to every session.
    Reload,
    /// `backend` / `superuser-backend`: a reload, but only sessions opened afterwards see it.
    NewSessions,
    /// `postmaster`: each member restarts (replicas one at a time, then the primary).
    Restart,
    /// An HA setting (ttl, synchronous_mode, ...): the agents take it on their next cycle.
    Agents,
}

impl fmt::Display for Effect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Effect::Reload => "reload",
            Effect::NewSessions => "reload, new sessions only",
            Effect::Restart => "restart needed",
            Effect::Agents => "agents apply it on their next cycle",
        })
    }
}

/// One key that changes.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyChange {
    /// Dotted path (`postgresql.parameters.work_mem`, `ttl`).
    pub key: String,
    pub old: Option<Value>,
    /// `Null`: deleted.
    pub new: Value,
    pub effect: Effect,
}

fn show(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "(not set)".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

impl fmt::Display for KeyChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} → {} ({})",
            self.key,
            show(self.old.as_ref()),
            show(Some(&self.new)),
            self.effect
        )
    }
}

/// The planned DCS config change.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigPlan {
    /// The revision the write is conditioned on.
    pub revision: Option<i64>,
    pub changes: Vec<KeyChange>,
    /// Keys that stay: (key, why).
    pub noops: Vec<(String, String)>,
    /// The merge patch `PATCH /config` sends (only the changed keys).
    pub patch: Map<String, Value>,
}

impl ConfigPlan {
    pub fn is_noop(&self) -> bool {
        self.changes.is_empty()
    }

    /// Whether any change needs PostgreSQL restarts.
    pub fn needs_restart(&self) -> bool {
        self.changes.iter().any(|c| c.effect == Effect::Restart)
    }
}

/// Why the config cannot be planned. Nothing is written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigRefusal {
    #[error(
        "postgresql.parameters.{0}: PostgreSQL has no such parameter (not in pg_settings on the leader {1})"
    )]
    UnknownParameter(String, String),
    #[error("postgresql.parameters.{0}: an internal parameter, it cannot be changed")]
    Internal(String),
    #[error(
        "adding {adding} member(s) needs {setting} >= {need} on the leader {leader} (it runs {have}: one WAL sender per replica plus two for a clone's pg_basebackup, one slot per replica): raise postgresql.parameters.{setting} and apply that first, then add the members"
    )]
    NoHeadroom {
        adding: usize,
        setting: &'static str,
        need: u64,
        have: u64,
        leader: String,
    },
    #[error(
        "the DCS config must change ({0}) but no running leader answered, so the effect of the change cannot be read from pg_settings; start the cluster first"
    )]
    NoLeader(String),
}

/// Before new members clone: the leader must have a WAL sender for every replica after the
/// add plus the two a streaming pg_basebackup uses, and a replication slot for every replica
/// (day2.md §2.3 pre-checks). Pure; `settings` are the leader's `pg_settings`. Without a leader
/// (nothing running yet) there is nothing to check.
pub fn add_headroom(
    settings: &BTreeMap<String, PgSetting>,
    leader: Option<&str>,
    members_after: usize,
    adding: usize,
) -> Result<(), ConfigRefusal> {
    let Some(leader) = leader else { return Ok(()) };
    if adding == 0 || settings.is_empty() {
        return Ok(());
    }
    let replicas = members_after.saturating_sub(1) as u64;
    for (setting, need) in [
        ("max_wal_senders", replicas + 2),
        ("max_replication_slots", replicas),
    ] {
        let Some(have) = settings
            .get(setting)
            .and_then(|s| s.setting.trim().parse::<u64>().ok())
        else {
            continue;
        };
        if have < need {
            return Err(ConfigRefusal::NoHeadroom {
                adding,
                setting,
                need,
                have,
                leader: leader.to_string(),
            });
        }
    }
    Ok(())
}

/// Memory units in bytes and time units in microseconds, as PostgreSQL spells them.
fn unit_factor(unit: &str) -> Option<(char, f64)> {
    let (n, u) = match unit.find(|c: char| !c.is_ascii_digit()) {
        Some(0) | None => (1.0, unit),
        Some(i) => (unit[..i].parse::<f64>().ok()?, &unit[i..]),
    };
    let (kind, f) = match u {
        "B" => ('m', 1.0),
        "kB" => ('m', 1024.0),
        "MB" => ('m', 1024.0 * 1024.0),
        "GB" => ('m', 1024.0 * 1024.0 * 1024.0),
        "TB" => ('m', 1024.0 * 1024.0 * 1024.0 * 1024.0),
        "us" => ('t', 1.0),
        "ms" => ('t', 1000.0),
        "s" => ('t', 1_000_000.0),
        "min" => ('t', 60_000_000.0),
        "h" => ('t', 3_600_000_000.0),
        "d" => ('t', 86_400_000_000.0),
        _ => return None,
    };
    Some((kind, n * f))
}

fn as_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.trim().to_string(),
        Value::Bool(b) => if *b { "on" } else { "off" }.into(),
        other => other.to_string(),
    }
}

/// The value in a form where equal settings compare equal: numbers with units in the base
/// unit of their kind (a bare number is in the parameter's own unit), booleans as on/off, enums
/// lower-cased. Without a `pg_settings` row the text itself (trimmed).
pub fn normalize(v: &Value, s: Option<&PgSetting>) -> String {
    let text = as_text(v);
    let Some(s) = s else { return text };
    match s.vartype.as_str() {
        "bool" => match text.to_ascii_lowercase().as_str() {
            "on" | "true" | "yes" | "1" | "t" | "y" => "on".into(),
            "off" | "false" | "no" | "0" | "f" | "n" => "off".into(),
            other => other.into(),
        },
        "integer" | "real" => {
            let split = text
                .find(|c: char| !(c.is_ascii_digit() || "+-.eE".contains(c)))
                .unwrap_or(text.len());
            let (num, unit) = text.split_at(split);
            let Ok(n) = num.trim().parse::<f64>() else {
                return text;
            };
            let unit = unit.trim();
            let own = unit_factor(&s.unit);
            let factor = if unit.is_empty() {
                own.map(|(_, f)| f).unwrap_or(1.0)
            } else {
                match (unit_factor(unit), own) {
                    (Some((k, f)), Some((ko, _))) if k == ko => f,
                    _ => return text,
                }
            };
            // -1 and 0 are sentinels ("disabled", "default") in every unit.
            if n == -1.0 || n == 0.0 {
                return format!("{n}");
            }
            format!("{}", n * factor)
        }
        "enum" => text.to_ascii_lowercase(),
        _ => text,
    }
}

/// Loose JSON equality for the HA keys: `10` and `"10"`, `true` and `"on"` are the same.
fn same_scalar(a: &Value, b: &Value) -> bool {
    let norm = |v: &Value| match v {
        Value::Bool(b) => if *b { "true" } else { "false" }.to_string(),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "on" | "yes" => "true".into(),
            "off" | "no" => "false".into(),
            t => t.to_string(),
        },
        Value::Number(n) => n
            .as_f64()
            .map(|f| f.to_string())
            .unwrap_or_else(|| n.to_string()),
        other => other.to_string(),
    };
    a == b || norm(a) == norm(b)
}

fn effect_of(
    name: &str,
    settings: &BTreeMap<String, PgSetting>,
    leader: &str,
) -> Result<Effect, ConfigRefusal> {
    match settings.get(name).map(|s| s.context.as_str()) {
        Some("postmaster") => Ok(Effect::Restart),
        Some("backend" | "superuser-backend") => Ok(Effect::NewSessions),
        Some("internal") => Err(ConfigRefusal::Internal(name.into())),
        Some(_) => Ok(Effect::Reload),
        // A dotted name is a custom (extension) setting: PostgreSQL accepts placeholders.
        None if name.contains('.') => Ok(Effect::Reload),
        None => Err(ConfigRefusal::UnknownParameter(name.into(), leader.into())),
    }
}

/// Plans the DCS config: `desired` (the rendered `bootstrap.dcs`) against the live config.
/// Pure. `live` `None` means there is no config key yet: the bootstrap writes `desired` itself,
/// so there is nothing to plan.
pub fn plan_config(
    desired: &Map<String, Value>,
    live: Option<&LiveConfig>,
    leader: Option<&str>,
    settings: &BTreeMap<String, PgSetting>,
) -> Result<ConfigPlan, ConfigRefusal> {
    let Some(live) = live else {
        return Ok(ConfigPlan {
            noops: vec![(
                "config".into(),
                "no DCS config yet: the bootstrap writes the inventory's".into(),
            )],
            ..ConfigPlan::default()
        });
    };
    let mut plan = ConfigPlan {
        revision: live.revision,
        ..ConfigPlan::default()
    };
    let mut param_changes = Vec::new();
    // Top-level HA keys and postgresql.* scalars.
    let mut ha = |key: String, want: &Value, have: Option<&Value>, path: &[&str]| {
        if have.is_some_and(|h| same_scalar(h, want)) || (want.is_null() && have.is_none()) {
            plan.noops.push((key, format!("{} as wanted", show(have))));
            return;
        }
        set_path(&mut plan.patch, path, want.clone());
        plan.changes.push(KeyChange {
            key,
            old: have.cloned(),
            new: want.clone(),
            effect: Effect::Agents,
        });
    };
    let empty = Map::new();
    for (k, want) in desired {
        if k == "postgresql" {
            continue;
        }
        ha(k.clone(), want, live.value.get(k), &[k.as_str()]);
    }
    let want_pg = desired
        .get("postgresql")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let have_pg = live
        .value
        .get("postgresql")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    for (k, want) in want_pg {
        if k == "parameters" {
            continue;
        }
        ha(
            format!("postgresql.{k}"),
            want,
            have_pg.get(k),
            &["postgresql", k.as_str()],
        );
    }
    let want_params = want_pg
        .get("parameters")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let have_params = have_pg
        .get("parameters")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    for (name, want) in want_params {
        let key = format!("postgresql.parameters.{name}");
        let have = have_params.get(name).filter(|v| !v.is_null());
        let s = settings.get(name);
        let same = match (have, want.is_null()) {
            (None, true) => true,
            (Some(h), false) => normalize(h, s) == normalize(want, s),
            _ => false,
        };
        if same {
            let why = match have {
                None => "not set, as wanted".to_string(),
                Some(h) if as_text(h) == as_text(want) => format!("{} as wanted", as_text(h)),
                Some(h) => format!(
                    "{} is the same value as {} (units normalised)",
                    as_text(h),
                    as_text(want)
                ),
            };
            plan.noops.push((key, why));
            continue;
        }
        param_changes.push((name.clone(), key, have.cloned(), want.clone()));
    }
    for (name, v) in have_params {
        if !want_params.contains_key(name) && !v.is_null() {
            plan.noops.push((
                format!("postgresql.parameters.{name}"),
                format!(
                    "{} set outside the inventory: left alone (set it to null in the inventory to remove it)",
                    as_text(v)
                ),
            ));
        }
    }
    for (k, v) in &live.value {
        if k != "postgresql" && !desired.contains_key(k) {
            plan.noops.push((
                k.clone(),
                format!("{} set outside the inventory: left alone", show(Some(v))),
            ));
        }
    }
    if !param_changes.is_empty() {
        if settings.is_empty() {
            let names: Vec<&str> = param_changes.iter().map(|p| p.0.as_str()).collect();
            return Err(ConfigRefusal::NoLeader(names.join(", ")));
        }
        let leader = leader.unwrap_or("?");
        for (name, key, old, new) in param_changes {
            let effect = effect_of(&name, settings, leader)?;
            set_path(
                &mut plan.patch,
                &["postgresql", "parameters", name.as_str()],
                new.clone(),
            );
            plan.changes.push(KeyChange {
                key,
                old,
                new,
                effect,
            });
        }
    }
    Ok(plan)
}

fn set_path(m: &mut Map<String, Value>, path: &[&str], v: Value) {
    let (last, dirs) = path.split_last().expect("non-empty path");
    let mut cur = m;
    for d in dirs {
        cur = cur
            .entry(d.to_string())
            .or_insert_with(|| Value::Object(Map::new()))
            .as_object_mut()
            .expect("patch paths are objects");
    }
    cur.insert(last.to_string(), v);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn setting(unit: &str, context: &str, vartype: &str) -> PgSetting {
        PgSetting {
            setting: String::new(),
            unit: unit.into(),
            context: context.into(),
            vartype: vartype.into(),
        }
    }

    #[test]
    fn memory_values_in_other_units_are_the_same_value() {
        let sb = setting("8kB", "postmaster", "integer");
        assert_eq!(
            normalize(&json!("128MB"), Some(&sb)),
            normalize(&json!(16384), Some(&sb))
        );
        assert_eq!(
            normalize(&json!("1GB"), Some(&sb)),
            normalize(&json!("1024MB"), Some(&sb))
        );
        assert_ne!(
            normalize(&json!("64MB"), Some(&sb)),
            normalize(&json!("32MB"), Some(&sb))
        );
        let wm = setting("kB", "user", "integer");
        assert_eq!(
            normalize(&json!("4MB"), Some(&wm)),
            normalize(&json!("4096"), Some(&wm))
        );
    }

    #[test]
    fn time_values_and_booleans_normalise() {
        let t = setting("ms", "sighup", "integer");
        assert_eq!(
            normalize(&json!("1s"), Some(&t)),
            normalize(&json!(1000), Some(&t))
        );
        assert_eq!(
            normalize(&json!("-1"), Some(&t)),
            normalize(&json!(-1), Some(&t))
        );
        let b = setting("", "sighup", "bool");
        assert_eq!(
            normalize(&json!(true), Some(&b)),
            normalize(&json!("on"), Some(&b))
        );
        assert_eq!(
            normalize(&json!("off"), Some(&b)),
            normalize(&json!("false"), Some(&b))
        );
    }

    #[test]
    fn pg_settings_output_is_decoded() {
        let s = parse_pg_settings(
            "shared_buffers\u{1f}4096\u{1f}8kB\u{1f}postmaster\u{1f}integer\nwork_mem\u{1f}4096\u{1f}kB\u{1f}user\u{1f}integer\nbroken line\n",
        );
        assert_eq!(s.len(), 2);
        assert_eq!(s["shared_buffers"].context, "postmaster");
        assert_eq!(s["work_mem"].unit, "kB");
    }
}
