//! The cluster state kept in the DCS, in Patroni's exact wire format, and the immutable
//! [`ClusterView`] snapshot the HA core decides on.
//!
//! Every key lives under `/<namespace>/<scope>/` (see `../shared/reference/patroni.md` §1).
//! The JSON field names here are a compatibility contract with patronictl, vip-manager and
//! HAProxy checks written for Patroni: do not rename them.
//!
//! Past 800 lines only because of the decoder's table tests at the bottom (the code is ~690).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::types::{LeaseId, Lsn, MemberName, Revision, Timeline};

/// Version string pgherd advertises in member keys and `GET /patroni`. patronictl and Patroni
/// agents gate behaviour on it (§1.2 "version gates"), so it must look like Patroni 4.x.
pub const PATRONI_COMPAT_VERSION: &str = "4.1.5";

/// Value of `members/<name>` (compact JSON). Unknown fields are kept in `extra` so that a
/// pgherd agent reading a Patroni-written key loses nothing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemberData {
    pub conn_url: String,
    pub api_url: String,
    pub state: String,
    pub role: String,
    pub version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xlog_location: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay_lsn: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receive_lsn: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replication_state: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeline: Option<u32>,
    #[serde(skip_serializing_if = "Map::is_empty", default)]
    pub tags: Map<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending_restart: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending_restart_reason: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduled_restart: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pause: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_after_promote: Option<bool>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl MemberData {
    /// Host and port of `conn_url` (`postgres://host:port/db`).
    pub fn conn_host_port(&self) -> Option<(String, u16)> {
        let rest = self.conn_url.split_once("://")?.1;
        let hostport = rest.split('/').next()?;
        let hostport = hostport.rsplit('@').next()?;
        let (h, p) = hostport.rsplit_once(':')?;
        Some((h.trim_matches(['[', ']']).to_string(), p.parse().ok()?))
    }

    /// Base URL (`http://host:port`) of the member's REST API, from `api_url`.
    pub fn api_base(&self) -> Option<String> {
        let (scheme, rest) = self.api_url.split_once("://")?;
        let hostport = rest.split('/').next()?;
        Some(format!("{scheme}://{hostport}"))
    }

    /// WAL position as Patroni compares it: `xlog_location`, else max(receive, replay).
    pub fn wal_position(&self) -> Lsn {
        Lsn(self
            .xlog_location
            .unwrap_or(0)
            .max(self.receive_lsn.unwrap_or(0))
            .max(self.replay_lsn.unwrap_or(0)))
    }

    pub fn tag_bool(&self, name: &str) -> bool {
        tag_is_true(self.tags.get(name))
    }
}

/// The host of a member URL's authority (`http://10.0.0.1:8008/patroni` → `10.0.0.1`,
/// `postgres://u@[fd00::1]:5432/db` → `fd00::1`: credentials and IPv6 brackets removed);
/// `None` when there is none.
pub fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split_once(']')?.0
    } else {
        authority.split(':').next()?
    };
    (!host.is_empty()).then_some(host)
}

/// Patroni's lenient boolean parsing for tags and config values.
pub fn tag_is_true(v: Option<&Value>) -> bool {
    match v {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => {
            matches!(
                s.to_ascii_lowercase().as_str(),
                "true" | "on" | "yes" | "1" | "y"
            )
        }
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0) != 0,
        _ => false,
    }
}

/// A member key as read from etcd.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub name: MemberName,
    pub data: MemberData,
    pub lease: Option<LeaseId>,
    pub revision: Revision,
}

/// The `leader` key: a plain string member name held on the owner's lease.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaderKey {
    pub name: MemberName,
    pub lease: Option<LeaseId>,
    pub revision: Revision,
}

/// Value of the `failover` key. `{}` means "nothing requested" (Patroni clears by writing `{}`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Failover {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub leader: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub member: Option<String>,
    /// ISO 8601 with timezone.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub scheduled_at: Option<String>,
}

impl Failover {
    pub fn is_empty(&self) -> bool {
        self.leader.is_none() && self.member.is_none() && self.scheduled_at.is_none()
    }

    /// Parses the key value, accepting the legacy `"leader:candidate"` plain string.
    pub fn parse(raw: &str) -> Failover {
        if let Ok(f) = serde_json::from_str::<Failover>(raw) {
            return f;
        }
        if let Some((l, c)) = raw.split_once(':') {
            return Failover {
                leader: (!l.is_empty()).then(|| l.to_string()),
                member: (!c.is_empty()).then(|| c.to_string()),
                scheduled_at: None,
            };
        }
        Failover::default()
    }
}

/// Value of the `sync` key.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncState {
    pub leader: Option<String>,
    #[serde(default)]
    pub quorum: i64,
    /// Comma-joined, sorted member names, or null.
    pub sync_standby: Option<String>,
}

impl SyncState {
    pub fn standbys(&self) -> Vec<String> {
        self.sync_standby
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// Case-insensitive membership test (leader or standby), as Patroni's `SyncState.matches`.
    pub fn matches(&self, name: &str, include_leader: bool) -> bool {
        let n = name.to_lowercase();
        (include_leader && self.leader.as_deref().map(str::to_lowercase) == Some(n.clone()))
            || self.standbys().iter().any(|s| s.to_lowercase() == n)
    }
}

/// Value of the `status` key, written by the leader.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub optime: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub slots: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retain_slots: Vec<String>,
    /// pgherd extension (Patroni ignores unknown fields here): the leader's timeline, written
    /// only when `history` cannot show it — a promotion that skipped timeline numbers (see
    /// [`ClusterView::timeline`]). Unlike the member keys it outlives the leader's lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<u32>,
}

impl Status {
    /// Tolerant parse: a bare int (legacy) or JSON; garbage is treated as empty.
    pub fn parse(raw: &str) -> Status {
        if let Ok(n) = raw.trim().parse::<u64>() {
            return Status {
                optime: n,
                ..Default::default()
            };
        }
        serde_json::from_str(raw).unwrap_or_default()
    }
}

/// One line of the `history` key: `[parent_tl, switchpoint_lsn, reason, timestamp, new_leader]`.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryLine {
    pub parent_timeline: u32,
    pub switchpoint: u64,
    pub reason: String,
    pub timestamp: Option<String>,
    pub new_leader: Option<String>,
}

impl HistoryLine {
    pub fn to_json(&self) -> Value {
        let mut v = vec![
            Value::from(self.parent_timeline),
            Value::from(self.switchpoint),
            Value::from(self.reason.clone()),
        ];
        if let Some(ts) = &self.timestamp {
            v.push(Value::from(ts.clone()));
            if let Some(l) = &self.new_leader {
                v.push(Value::from(l.clone()));
            }
        }
        Value::Array(v)
    }

    pub fn from_json(v: &Value) -> Option<HistoryLine> {
        let a = v.as_array()?;
        Some(HistoryLine {
            parent_timeline: a.first()?.as_u64()? as u32,
            switchpoint: a.get(1)?.as_u64()?,
            reason: a.get(2).and_then(Value::as_str).unwrap_or("").to_string(),
            timestamp: a.get(3).and_then(Value::as_str).map(str::to_string),
            new_leader: a.get(4).and_then(Value::as_str).map(str::to_string),
        })
    }
}

/// The `failsafe` key's JSON: an object `member → api_url`.
pub fn failsafe_to_json(members: &BTreeMap<MemberName, String>) -> String {
    Value::Object(
        members
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), Value::String(v.clone())))
            .collect(),
    )
    .to_string()
}

pub fn history_to_json(lines: &[HistoryLine]) -> String {
    Value::Array(lines.iter().map(HistoryLine::to_json).collect()).to_string()
}

pub fn history_from_json(raw: &str) -> Vec<HistoryLine> {
    serde_json::from_str::<Value>(raw)
        .ok()
        .and_then(|v| {
            v.as_array()
                .map(|a| a.iter().filter_map(HistoryLine::from_json).collect())
        })
        .unwrap_or_default()
}

/// The dynamic configuration (`config` key): kept as raw JSON (so keys we do not model survive
/// a PATCH round trip) with typed accessors applying Patroni's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct DynamicConfig(pub Map<String, Value>);

impl Default for DynamicConfig {
    fn default() -> Self {
        DynamicConfig(Map::new())
    }
}

fn num(v: Option<&Value>) -> Option<f64> {
    match v? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

impl DynamicConfig {
    pub fn parse(raw: &str) -> Option<DynamicConfig> {
        match serde_json::from_str::<Value>(raw).ok()? {
            Value::Object(m) => Some(DynamicConfig(m)),
            _ => None,
        }
    }

    pub fn to_json(&self) -> String {
        Value::Object(self.0.clone()).to_string()
    }

    fn u64_or(&self, key: &str, default: u64) -> u64 {
        num(self.0.get(key))
            .map(|f| f.max(0.0) as u64)
            .unwrap_or(default)
    }

    pub fn ttl(&self) -> u64 {
        self.u64_or("ttl", 30)
    }
    pub fn loop_wait(&self) -> u64 {
        self.u64_or("loop_wait", 10)
    }
    pub fn retry_timeout(&self) -> u64 {
        self.u64_or("retry_timeout", 10)
    }
    pub fn maximum_lag_on_failover(&self) -> u64 {
        self.u64_or("maximum_lag_on_failover", 1_048_576)
    }
    pub fn primary_start_timeout(&self) -> u64 {
        num(self
            .0
            .get("primary_start_timeout")
            .or_else(|| self.0.get("master_start_timeout")))
        .map(|f| f.max(0.0) as u64)
        .unwrap_or(300)
    }
    pub fn primary_stop_timeout(&self) -> u64 {
        num(self
            .0
            .get("primary_stop_timeout")
            .or_else(|| self.0.get("master_stop_timeout")))
        .map(|f| f.max(0.0) as u64)
        .unwrap_or(0)
    }
    pub fn pause(&self) -> bool {
        tag_is_true(self.0.get("pause"))
    }
    /// `failsafe_mode` (Patroni 4): on DCS loss the primary keeps running while every member
    /// of the `failsafe` key accepts its `POST /failsafe`.
    pub fn failsafe_mode(&self) -> bool {
        tag_is_true(self.0.get("failsafe_mode"))
    }
    pub fn check_timeline(&self) -> bool {
        tag_is_true(self.0.get("check_timeline"))
    }
    /// `synchronous_mode: true|on` (quorum mode is not supported yet and reads as on).
    pub fn synchronous_mode(&self) -> bool {
        match self.0.get("synchronous_mode") {
            Some(Value::String(s)) if s.eq_ignore_ascii_case("quorum") => true,
            v => tag_is_true(v),
        }
    }
    pub fn synchronous_mode_strict(&self) -> bool {
        tag_is_true(self.0.get("synchronous_mode_strict"))
    }
    pub fn synchronous_node_count(&self) -> u64 {
        self.u64_or("synchronous_node_count", 1).max(1)
    }
    pub fn postgresql(&self) -> Option<&Map<String, Value>> {
        self.0.get("postgresql").and_then(Value::as_object)
    }
    pub fn use_pg_rewind(&self) -> Option<bool> {
        self.postgresql()
            .and_then(|p| p.get("use_pg_rewind"))
            .map(|v| tag_is_true(Some(v)))
    }
    pub fn use_slots(&self) -> Option<bool> {
        self.postgresql()
            .and_then(|p| p.get("use_slots"))
            .map(|v| tag_is_true(Some(v)))
    }
    /// `postgresql.parameters` from the DCS, values as PostgreSQL text.
    pub fn parameters(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        if let Some(Value::Object(p)) = self.postgresql().and_then(|p| p.get("parameters")) {
            for (k, v) in p {
                let s = match v {
                    Value::String(s) => s.clone(),
                    Value::Bool(b) => if *b { "on" } else { "off" }.to_string(),
                    Value::Null => continue,
                    other => other.to_string(),
                };
                out.insert(k.clone(), s);
            }
        }
        out
    }
    pub fn pg_hba(&self) -> Option<Vec<String>> {
        let a = self.postgresql()?.get("pg_hba")?.as_array()?;
        Some(
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
        )
    }

    /// Applies a JSON merge patch the way Patroni's `PATCH /config` does: objects merge
    /// recursively, `null` deletes a key, anything else replaces.
    pub fn patched(&self, patch: &Map<String, Value>) -> DynamicConfig {
        fn merge(dst: &mut Map<String, Value>, patch: &Map<String, Value>) {
            for (k, v) in patch {
                match v {
                    Value::Null => {
                        dst.remove(k);
                    }
                    Value::Object(p) => {
                        let entry = dst
                            .entry(k.clone())
                            .or_insert_with(|| Value::Object(Map::new()));
                        if let Value::Object(d) = entry {
                            merge(d, p);
                        } else {
                            let mut d = Map::new();
                            merge(&mut d, p);
                            *entry = Value::Object(d);
                        }
                    }
                    other => {
                        dst.insert(k.clone(), other.clone());
                    }
                }
            }
        }
        let mut out = self.0.clone();
        merge(&mut out, patch);
        DynamicConfig(out)
    }
}

/// Key names, relative to `/<namespace>/<scope>/` (Patroni's layout, patroni.md §1.1,
/// `AbstractDCS._INITIALIZE…_FAILSAFE`). Nothing else under the prefix is read.
pub const KEY_INITIALIZE: &str = "initialize";
pub const KEY_CONFIG: &str = "config";
pub const KEY_LEADER: &str = "leader";
pub const KEY_FAILOVER: &str = "failover";
pub const KEY_SYNC: &str = "sync";
pub const KEY_STATUS: &str = "status";
/// Replaced by `status` in Patroni 2.1; read only as a fallback when `status` is absent.
pub const KEY_LEGACY_OPTIME: &str = "optime/leader";
pub const KEY_HISTORY: &str = "history";
pub const KEY_FAILSAFE: &str = "failsafe";
/// Member keys are `members/<name>`, with exactly one `/` (`Etcd3._postgresql_cluster_loader`).
pub const MEMBERS_DIR: &str = "members/";

/// Parses a member key value as Patroni does: compact JSON, or the legacy
/// `postgres://…?application_name=<api_url>` connection string. Missing or mistyped fields
/// degrade to defaults instead of dropping the member (it still counts as present).
pub fn parse_member_value(raw: &str) -> MemberData {
    match serde_json::from_str::<Value>(raw) {
        Ok(Value::Object(map)) => member_from_map(map),
        _ => {
            let raw = raw.trim();
            if raw.starts_with("postgres://") || raw.starts_with("postgresql://") {
                let (url, query) = raw.split_once('?').unwrap_or((raw, ""));
                let api_url = query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("application_name="))
                    .unwrap_or("")
                    .to_string();
                MemberData {
                    conn_url: url.to_string(),
                    api_url,
                    ..Default::default()
                }
            } else {
                MemberData::default()
            }
        }
    }
}

fn member_from_map(mut map: Map<String, Value>) -> MemberData {
    for f in ["conn_url", "api_url", "state", "role", "version"] {
        map.entry(f).or_insert_with(|| Value::String(String::new()));
    }
    match serde_json::from_value::<MemberData>(Value::Object(map.clone())) {
        Ok(m) => m,
        Err(_) => {
            // Some optional field has a foreign type: keep the strings we can use and carry
            // everything else verbatim in `extra`.
            let s = |m: &mut Map<String, Value>, k: &str| match m.remove(k) {
                Some(Value::String(s)) => s,
                _ => String::new(),
            };
            MemberData {
                conn_url: s(&mut map, "conn_url"),
                api_url: s(&mut map, "api_url"),
                state: s(&mut map, "state"),
                role: s(&mut map, "role"),
                version: s(&mut map, "version"),
                extra: map,
                ..Default::default()
            }
        }
    }
}

/// The one decoder from Patroni's key layout to a [`ClusterView`], shared by every [`Dcs`]
/// implementation (etcd and the in-memory fake) so that the simulation tests the decoding
/// production runs. Input: each key under the cluster prefix, *relative* to it (the caller
/// strips `/<namespace>/<scope>/`), with its value as text, its etcd `mod_revision` and its
/// lease (`None` for an unleased key); `revision` is the header revision of the read.
///
/// Where a value is malformed it follows Patroni's `Cluster` loading
/// (`Etcd3._cluster_from_nodes` and the `from_node` parsers), never failing the whole load:
/// - an **empty `leader` value** means "unlocked" (`Cluster.is_unlocked` is true when the
///   leader has no name): no [`LeaderKey`] is returned;
/// - an **unparsable `sync` value** is an empty sync state that keeps the key's revision
///   (`SyncState.from_node` → `SyncState.empty(version)`): the next CAS write needs it;
/// - the **legacy `optime/leader`** key gives `status.optime` only when there is no `status`
///   key (Patroni < 2.1 writers);
/// - a **member key whose value does not parse** still makes a member, with default data
///   (`Member.from_node` falls back to `{}`): the member is present (it holds a lease), it just
///   tells us nothing. A key `members/a/b` or `members/` is not a member key and is ignored.
///
/// [`Dcs`]: super::Dcs
pub fn view_from_kvs<K, V>(
    kvs: impl IntoIterator<Item = (K, V, i64, Option<LeaseId>)>,
    revision: i64,
) -> ClusterView
where
    K: AsRef<str>,
    V: AsRef<str>,
{
    let mut view = ClusterView {
        revision,
        ..Default::default()
    };
    let mut status: Option<Status> = None;
    let mut legacy_optime: Option<u64> = None;
    for (key, value, mod_revision, lease) in kvs {
        let raw = value.as_ref();
        let rev = Revision(mod_revision);
        match key.as_ref() {
            KEY_INITIALIZE => view.initialize = Some(raw.to_string()),
            KEY_CONFIG => view.config = DynamicConfig::parse(raw).map(|c| (c, rev)),
            KEY_LEADER => {
                view.leader = (!raw.is_empty()).then(|| LeaderKey {
                    name: MemberName::new(raw),
                    lease,
                    revision: rev,
                })
            }
            KEY_FAILOVER => view.failover = Some((Failover::parse(raw), rev)),
            KEY_SYNC => {
                let s = serde_json::from_str::<SyncState>(raw).unwrap_or_default();
                view.sync = Some((s, rev));
            }
            KEY_STATUS => status = Some(Status::parse(raw)),
            KEY_LEGACY_OPTIME => legacy_optime = raw.trim().parse().ok(),
            KEY_HISTORY => view.history = history_from_json(raw),
            KEY_FAILSAFE => view.failsafe = serde_json::from_str::<Value>(raw).ok(),
            k => {
                if let Some(name) = k.strip_prefix(MEMBERS_DIR)
                    && !name.is_empty()
                    && !name.contains('/')
                {
                    let name = MemberName::new(name);
                    view.members.insert(
                        name.clone(),
                        Member {
                            name,
                            data: parse_member_value(raw),
                            lease,
                            revision: rev,
                        },
                    );
                }
            }
        }
    }
    view.status = status
        .or_else(|| {
            legacy_optime.map(|o| Status {
                optime: o,
                ..Default::default()
            })
        })
        .unwrap_or_default();
    view
}

/// An immutable snapshot of everything under `/<namespace>/<scope>/`, built once per HA cycle.
/// Revisions double as CAS tokens for the keys that Patroni updates with compare-and-swap.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterView {
    /// `initialize`: `None` = absent, `Some("")` = bootstrap in progress, else the sysid.
    pub initialize: Option<String>,
    pub config: Option<(DynamicConfig, Revision)>,
    pub leader: Option<LeaderKey>,
    pub members: BTreeMap<MemberName, Member>,
    pub failover: Option<(Failover, Revision)>,
    pub sync: Option<(SyncState, Revision)>,
    pub status: Status,
    pub history: Vec<HistoryLine>,
    pub failsafe: Option<Value>,
    /// etcd header revision of the read that built this view.
    pub revision: i64,
}

impl ClusterView {
    /// The `failsafe` key as `member → REST API url` (Patroni writes `.../patroni` urls);
    /// entries whose value is not a string are skipped. `None` when the key is absent or not an
    /// object.
    pub fn failsafe_members(&self) -> Option<BTreeMap<MemberName, String>> {
        let o = self.failsafe.as_ref()?.as_object()?;
        Some(
            o.iter()
                .filter_map(|(k, v)| Some((MemberName::from(k.as_str()), v.as_str()?.to_string())))
                .collect(),
        )
    }

    pub fn leader_name(&self) -> Option<&MemberName> {
        self.leader.as_ref().map(|l| &l.name)
    }

    pub fn leader_member(&self) -> Option<&Member> {
        self.members.get(self.leader_name()?)
    }

    pub fn config(&self) -> DynamicConfig {
        self.config
            .as_ref()
            .map(|(c, _)| c.clone())
            .unwrap_or_default()
    }

    pub fn is_paused(&self) -> bool {
        self.config.as_ref().is_some_and(|(c, _)| c.pause())
    }

    /// Cluster timeline: from `history` (last line's parent + 1, or 1), or the leader's own
    /// when its member key or the `status` key shows a higher one. History lines only name parents, so a leader
    /// whose promotion skipped timeline numbers (PostgreSQL takes one above every history file
    /// it sees; pgherd reserves the numbers other nodes used) is on a higher timeline than the
    /// lines alone say.
    pub fn timeline(&self) -> Timeline {
        let from_history = self
            .history
            .last()
            .map(|h| h.parent_timeline + 1)
            .unwrap_or(1);
        let leader = self
            .leader_member()
            .and_then(|m| m.data.timeline)
            .unwrap_or(0);
        let status = self.status.timeline.unwrap_or(0);
        Timeline(from_history.max(leader).max(status))
    }

    /// The non-empty failover request, if any.
    pub fn failover_request(&self) -> Option<&Failover> {
        self.failover
            .as_ref()
            .map(|(f, _)| f)
            .filter(|f| !f.is_empty())
    }

    /// The sync key when synchronous mode is active (has a leader).
    pub fn sync_state(&self) -> Option<&SyncState> {
        self.sync
            .as_ref()
            .map(|(s, _)| s)
            .filter(|s| s.leader.is_some())
    }
}

/// The effective tags of this node (patroni.md §3.18), parsed once.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Tags {
    pub nofailover: bool,
    /// Default 1; ≤ 0 acts as nofailover.
    pub failover_priority: i64,
    pub clonefrom: bool,
    pub nosync: bool,
    pub nostream: bool,
    pub replicatefrom: Option<String>,
}

impl Tags {
    /// Parses Patroni tags. An explicit `nofailover` bool wins over `failover_priority`.
    pub fn from_map(m: &Map<String, Value>) -> Tags {
        let prio = m
            .get("failover_priority")
            .and_then(|v| match v {
                Value::Number(n) => n.as_i64(),
                Value::String(s) => s.trim().parse().ok(),
                _ => None,
            })
            .unwrap_or(1);
        let nofailover = match m.get("nofailover") {
            Some(v) => tag_is_true(Some(v)),
            None => prio <= 0,
        };
        let sync_prio = m.get("sync_priority").and_then(Value::as_i64).unwrap_or(1);
        Tags {
            nofailover,
            failover_priority: if nofailover { prio.min(0) } else { prio },
            clonefrom: tag_is_true(m.get("clonefrom")),
            nosync: tag_is_true(m.get("nosync")) || sync_prio <= 0,
            nostream: tag_is_true(m.get("nostream")),
            replicatefrom: m
                .get("replicatefrom")
                .and_then(Value::as_str)
                .map(str::to_string),
        }
    }

    /// May this node ever take the leader lock automatically?
    pub fn may_promote(&self) -> bool {
        !self.nofailover && self.failover_priority > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_timeline_counts_a_promotion_that_skipped_numbers() {
        let line = |parent| HistoryLine {
            parent_timeline: parent,
            switchpoint: 0x3000000,
            reason: String::new(),
            timestamp: None,
            new_leader: None,
        };
        let mut v = ClusterView {
            history: vec![line(1)],
            ..Default::default()
        };
        assert_eq!(v.timeline(), Timeline(2), "history alone");
        // Timeline 3 forked from 1 (2 was reserved): the lines still end with parent 1.
        v.status.timeline = Some(3);
        assert_eq!(v.timeline(), Timeline(3));
        // The status key is only written when needed; normal JSON stays Patroni's.
        assert_eq!(
            serde_json::to_string(&Status {
                optime: 5,
                ..Default::default()
            })
            .unwrap(),
            r#"{"optime":5}"#
        );
        assert_eq!(
            Status::parse(r#"{"optime":5,"timeline":3}"#).timeline,
            Some(3)
        );
    }

    #[test]
    fn member_json_is_compact_and_omits_absent_fields() {
        let m = MemberData {
            conn_url: "postgres://10.0.0.1:5432/postgres".into(),
            api_url: "http://10.0.0.1:8008/patroni".into(),
            state: "running".into(),
            role: "primary".into(),
            version: PATRONI_COMPAT_VERSION.into(),
            xlog_location: Some(67420024),
            timeline: Some(1),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"conn_url":"postgres://10.0.0.1:5432/postgres","api_url":"http://10.0.0.1:8008/patroni","state":"running","role":"primary","version":"4.1.5","xlog_location":67420024,"timeline":1}"#
        );
        assert_eq!(m.conn_host_port(), Some(("10.0.0.1".into(), 5432)));
        assert_eq!(m.api_base().as_deref(), Some("http://10.0.0.1:8008"));
    }

    #[test]
    fn failover_accepts_legacy_plain_string_and_empty_object() {
        assert!(Failover::parse("{}").is_empty());
        let f = Failover::parse("a:b");
        assert_eq!(f.leader.as_deref(), Some("a"));
        assert_eq!(f.member.as_deref(), Some("b"));
        assert_eq!(serde_json::to_string(&Failover::default()).unwrap(), "{}");
    }

    #[test]
    fn history_lines_round_trip_with_five_fields() {
        let raw =
            r#"[[1,25623960,"no recovery target specified","2019-09-23T16:57:57+02:00","node1"]]"#;
        let h = history_from_json(raw);
        assert_eq!(h[0].new_leader.as_deref(), Some("node1"));
        assert_eq!(history_to_json(&h), raw);
    }

    #[test]
    fn patch_with_null_deletes_and_objects_merge() {
        let c = DynamicConfig::parse(
            r#"{"ttl":30,"pause":true,"postgresql":{"parameters":{"a":"1"}}}"#,
        )
        .unwrap();
        let p: Map<String, Value> =
            serde_json::from_str(r#"{"pause":null,"postgresql":{"parameters":{"b":2}}}"#).unwrap();
        let n = c.patched(&p);
        assert!(!n.pause());
        assert_eq!(n.parameters().get("a").map(String::as_str), Some("1"));
        assert_eq!(n.parameters().get("b").map(String::as_str), Some("2"));
    }

    #[test]
    fn status_parse_tolerates_legacy_int_and_garbage() {
        assert_eq!(Status::parse("123").optime, 123);
        assert_eq!(Status::parse("not json").optime, 0);
    }

    #[test]
    fn member_with_missing_fields_defaults_instead_of_vanishing() {
        let m = parse_member_value(r#"{"conn_url":"postgres://h:5432/postgres","foo":1}"#);
        assert_eq!(m.conn_url, "postgres://h:5432/postgres");
        assert_eq!(m.state, "");
        assert_eq!(m.extra.get("foo"), Some(&Value::from(1)));
    }

    #[test]
    fn member_with_mistyped_field_keeps_strings() {
        let m = parse_member_value(r#"{"api_url":"http://h:8008/patroni","xlog_location":"x"}"#);
        assert_eq!(m.api_url, "http://h:8008/patroni");
        assert_eq!(m.xlog_location, None);
        assert_eq!(m.extra.get("xlog_location"), Some(&Value::from("x")));
    }

    #[test]
    fn legacy_connection_string_member_is_understood() {
        let m = parse_member_value(
            "postgres://10.0.0.1:5432/postgres?application_name=http://10.0.0.1:8008/patroni",
        );
        assert_eq!(m.conn_url, "postgres://10.0.0.1:5432/postgres");
        assert_eq!(m.api_url, "http://10.0.0.1:8008/patroni");
    }

    #[test]
    fn garbage_member_value_is_an_empty_member() {
        assert_eq!(parse_member_value("}{"), MemberData::default());
    }
}
