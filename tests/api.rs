//! The REST API driven through `tower::ServiceExt::oneshot`: AgentStatus snapshots through a
//! watch channel, a small in-memory `Dcs` stub, a stub peer probe, and a task playing the HA
//! loop that answers commands.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use base64::Engine;
use pgherd::api::{ApiState, MemberProbe, router};
use pgherd::config::Credentials;
use pgherd::dcs::{
    ClusterView, Dcs, DcsError, DynamicConfig, Failover, HistoryLine, LeaderKey, Member,
    MemberData, Status, SyncState,
};
use pgherd::pg::{PgState, PgStatus, ReplicationRow, Role};
use pgherd::status::{AgentStatus, Command, CommandReply};
use pgherd::types::{LeaseId, Lsn, MemberName, Revision, Timeline};
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, watch};
use tower::ServiceExt;

// ------------------------------------------------------------------ in-test DCS stub

#[derive(Default)]
struct MemDcs {
    view: Mutex<ClusterView>,
    rev: Mutex<i64>,
    /// When set, a written (unscheduled) failover request is "executed" at once: the leader key
    /// moves to the candidate (or to this name) and the request is cleared.
    auto_switch_to: Mutex<Option<String>>,
    /// When set, a written failover request is cleared without a leader change.
    auto_fail: Mutex<bool>,
    fail_writes: Mutex<bool>,
    panic_on_load: Mutex<bool>,
}

impl MemDcs {
    fn next_rev(&self) -> Revision {
        let mut r = self.rev.lock().unwrap();
        *r += 1;
        Revision(*r)
    }
    fn with(view: ClusterView) -> Arc<MemDcs> {
        let d = MemDcs::default();
        *d.rev.lock().unwrap() = 100;
        *d.view.lock().unwrap() = view;
        Arc::new(d)
    }
}

#[async_trait]
impl Dcs for MemDcs {
    async fn load(&self) -> Result<ClusterView, DcsError> {
        if *self.panic_on_load.lock().unwrap() {
            panic!("dcs stub asked to panic");
        }
        Ok(self.view.lock().unwrap().clone())
    }
    async fn ensure_lease(&self, _ttl: Duration) -> Result<LeaseId, DcsError> {
        Ok(LeaseId(1))
    }
    async fn keepalive(&self) -> Result<(), DcsError> {
        Ok(())
    }
    async fn touch_member(&self, _n: &MemberName, _d: &MemberData) -> Result<(), DcsError> {
        Ok(())
    }
    async fn acquire_leader(&self, _n: &MemberName) -> Result<bool, DcsError> {
        Ok(false)
    }
    async fn update_leader(&self, _n: &MemberName) -> Result<bool, DcsError> {
        Ok(false)
    }
    async fn take_leader(&self, _n: &MemberName) -> Result<(), DcsError> {
        Ok(())
    }
    async fn release_leader(&self, _n: &MemberName) -> Result<bool, DcsError> {
        Ok(false)
    }
    async fn race_initialize(&self) -> Result<bool, DcsError> {
        Ok(false)
    }
    async fn set_initialize(&self, _s: &str) -> Result<(), DcsError> {
        Ok(())
    }
    async fn delete_initialize(&self) -> Result<(), DcsError> {
        Ok(())
    }
    async fn set_config(
        &self,
        c: &DynamicConfig,
        expected: Option<Revision>,
    ) -> Result<bool, DcsError> {
        if *self.fail_writes.lock().unwrap() {
            return Err(DcsError::Unavailable("down".into()));
        }
        let rev = self.next_rev();
        let mut v = self.view.lock().unwrap();
        if let Some(e) = expected
            && v.config.as_ref().map(|(_, r)| *r) != Some(e)
        {
            return Ok(false);
        }
        v.config = Some((c.clone(), rev));
        Ok(true)
    }
    async fn set_failover(
        &self,
        f: &Failover,
        expected: Option<Revision>,
    ) -> Result<bool, DcsError> {
        if *self.fail_writes.lock().unwrap() {
            return Err(DcsError::Unavailable("down".into()));
        }
        let rev = self.next_rev();
        let mut v = self.view.lock().unwrap();
        if let Some(e) = expected
            && v.failover.as_ref().map(|(_, r)| *r) != Some(e)
        {
            return Ok(false);
        }
        v.failover = Some((f.clone(), rev));
        if f.scheduled_at.is_none() && !f.is_empty() {
            if let Some(to) = self.auto_switch_to.lock().unwrap().clone() {
                let to = f.member.clone().filter(|_| to.is_empty()).unwrap_or(to);
                v.leader = Some(LeaderKey {
                    name: MemberName::new(to),
                    lease: None,
                    revision: rev,
                });
                v.failover = Some((Failover::default(), rev));
            } else if *self.auto_fail.lock().unwrap() {
                v.failover = Some((Failover::default(), rev));
            }
        }
        Ok(true)
    }
    async fn set_sync(
        &self,
        _s: Option<&SyncState>,
        _e: Option<Revision>,
    ) -> Result<bool, DcsError> {
        Ok(true)
    }
    async fn set_status(&self, _s: &Status) -> Result<(), DcsError> {
        Ok(())
    }
    async fn set_history(&self, _h: &[HistoryLine]) -> Result<(), DcsError> {
        Ok(())
    }
    async fn set_failsafe(
        &self,
        _m: &std::collections::BTreeMap<MemberName, String>,
    ) -> Result<(), DcsError> {
        Ok(())
    }
    async fn delete_cluster(&self) -> Result<(), DcsError> {
        Ok(())
    }
    async fn wait_for_change(&self, _after: i64, timeout: Duration) -> bool {
        tokio::time::sleep(timeout).await;
        false
    }
}

// ------------------------------------------------------------------ probe stub

#[derive(Default)]
struct StubProbe {
    answers: BTreeMap<String, Value>,
}

#[async_trait]
impl MemberProbe for StubProbe {
    async fn fetch_status(&self, member: &Member) -> Option<Value> {
        self.answers.get(member.name.as_str()).cloned()
    }
}

// ------------------------------------------------------------------ fixtures

fn member(
    name: &str,
    host: &str,
    xlog: u64,
    extra: impl FnOnce(&mut MemberData),
) -> (MemberName, Member) {
    let mut d = MemberData {
        conn_url: format!("postgres://{host}:5432/postgres"),
        api_url: format!("http://{host}:8008/patroni"),
        state: "running".into(),
        role: "replica".into(),
        version: "4.1.5".into(),
        xlog_location: Some(xlog),
        timeline: Some(1),
        ..Default::default()
    };
    extra(&mut d);
    (
        MemberName::new(name),
        Member {
            name: MemberName::new(name),
            data: d,
            lease: None,
            revision: Revision(1),
        },
    )
}

/// Three members, pg0 leads, optime 0x5000000; config ttl 30 / loop_wait 10.
fn three_node_view() -> ClusterView {
    let mut members = BTreeMap::new();
    for (n, h, x) in [
        ("pg2", "10.0.0.3", 0x4FF0000u64),
        ("pg0", "10.0.0.1", 0x5000000),
        ("pg1", "10.0.0.2", 0x5000000),
    ] {
        let (k, mut m) = member(n, h, x, |_| {});
        if n == "pg0" {
            m.data.role = "primary".into();
        } else {
            m.data.replication_state = Some("streaming".into());
            m.data.replay_lsn = Some(x);
            m.data.receive_lsn = Some(x);
        }
        members.insert(k, m);
    }
    ClusterView {
        initialize: Some("7268616322854375442".into()),
        config: Some((
            DynamicConfig::parse(r#"{"ttl":30,"loop_wait":10,"retry_timeout":10}"#).unwrap(),
            Revision(7),
        )),
        leader: Some(LeaderKey {
            name: MemberName::new("pg0"),
            lease: None,
            revision: Revision(2),
        }),
        members,
        failover: None,
        sync: None,
        status: Status {
            optime: 0x5000000,
            ..Default::default()
        },
        history: vec![HistoryLine {
            parent_timeline: 1,
            switchpoint: 25623960,
            reason: "no recovery target specified".into(),
            timestamp: Some("2019-09-23T16:57:57+02:00".into()),
            new_leader: Some("pg0".into()),
        }],
        failsafe: None,
        revision: 50,
    }
}

fn primary_status(view: &ClusterView) -> AgentStatus {
    AgentStatus {
        scope: "batman".into(),
        name: "pg0".into(),
        role: Role::Primary,
        state: PgState::Running,
        pg: PgStatus {
            data_dir_initialized: true,
            sysid: Some("7268616322854375442".into()),
            running: true,
            accepting_connections: true,
            in_recovery: Some(false),
            timeline: Some(Timeline(2)),
            flush_lsn: Some(Lsn(0x5000000)),
            server_version: Some(150010),
            postmaster_start_time: Some("2024-08-28 19:39:26.352526+00".into()),
            replication: vec![ReplicationRow {
                usename: "replicator".into(),
                application_name: "pg1".into(),
                client_addr: Some("10.0.0.2".into()),
                state: "streaming".into(),
                sync_state: "async".into(),
                sync_priority: 0,
                write_lsn: None,
                flush_lsn: None,
                replay_lsn: None,
            }],
            ..Default::default()
        },
        cluster: Some(Arc::new(view.clone())),
        dcs_ok: true,
        dcs_last_seen: Some(1692356718),
        leader_until: Some(Instant::now() + Duration::from_secs(30)),
        paused: false,
        tags: Map::new(),
        pending_restart: false,
        pending_restart_reason: None,
        scheduled_restart: None,
        watchdog_failed: false,
        last_decision: String::new(),
        action_in_progress: None,
        last_cycle: Instant::now(),
        ttl: 30,
        loop_wait: 10,
        updated_at: SystemTime::now(),
        pgherd: Default::default(),
        failsafe_active: false,
    }
}

fn replica_status(view: &ClusterView, replay: u64) -> AgentStatus {
    let mut st = primary_status(view);
    st.name = "pg1".into();
    st.role = Role::Replica;
    st.leader_until = None;
    st.pg.in_recovery = Some(true);
    st.pg.flush_lsn = None;
    st.pg.replication.clear();
    st.pg.replay_lsn = Some(Lsn(replay));
    st.pg.receive_lsn = Some(Lsn(replay + 16));
    st.pg.replication_state = Some("streaming".into());
    st
}

struct Harness {
    app: axum::Router,
    tx: watch::Sender<AgentStatus>,
    dcs: Arc<MemDcs>,
    commands: Arc<Mutex<Vec<String>>>,
}

/// Builds the router; a task plays the HA loop, recording commands and replying with
/// canned answers.
fn harness(
    st: AgentStatus,
    view: ClusterView,
    auth: Option<Credentials>,
    probe: StubProbe,
) -> Harness {
    let dcs = MemDcs::with(view);
    let (tx, rx) = watch::channel(st);
    let (ctx, mut crx) = mpsc::channel::<Command>(16);
    let commands = Arc::new(Mutex::new(Vec::new()));
    let log = commands.clone();
    tokio::spawn(async move {
        while let Some(c) = crx.recv().await {
            match c {
                Command::Restart { req, reply } => {
                    log.lock().unwrap().push(format!("restart {req:?}"));
                    let r = if req.schedule.is_some() {
                        CommandReply::new(202, "Restart scheduled")
                    } else {
                        CommandReply::new(200, "restarted successfully")
                    };
                    let _ = reply.send(r);
                }
                Command::CancelScheduledRestart { reply } => {
                    log.lock().unwrap().push("cancel restart".into());
                    let _ = reply.send(CommandReply::new(404, "no restarts are scheduled"));
                }
                Command::Reinitialize {
                    force,
                    from_leader,
                    reply,
                } => {
                    log.lock()
                        .unwrap()
                        .push(format!("reinit force={force} from_leader={from_leader}"));
                    let _ = reply.send(CommandReply::new(200, "reinitialize started"));
                }
                Command::Reload { reply } => {
                    log.lock().unwrap().push("reload".into());
                    let _ = reply.send(CommandReply::new(202, "reload scheduled"));
                }
                Command::Wakeup => log.lock().unwrap().push("wakeup".into()),
            }
        }
    });
    let mut state =
        ApiState::new(rx, dcs.clone(), ctx, auth, "batman", "pg0").with_probe(Arc::new(probe));
    state.switchover_timeout = Some(Duration::from_millis(500));
    Harness {
        app: router(state),
        tx,
        dcs,
        commands,
    }
}

fn healthy_probe() -> StubProbe {
    let mut p = StubProbe::default();
    p.answers
        .insert("pg1".into(), json!({"role": "replica", "state": "running"}));
    p.answers
        .insert("pg2".into(), json!({"role": "replica", "state": "running"}));
    p
}

async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    body: Option<&str>,
) -> (StatusCode, String, axum::http::HeaderMap) {
    call_with(app, method, uri, body, None).await
}

async fn call_with(
    app: &axum::Router,
    method: &str,
    uri: &str,
    body: Option<&str>,
    auth: Option<&str>,
) -> (StatusCode, String, axum::http::HeaderMap) {
    let mut b = Request::builder().method(method).uri(uri);
    if let Some(a) = auth {
        b = b.header(header::AUTHORIZATION, a);
    }
    let req = match body {
        Some(s) => b
            .header(header::CONTENT_LENGTH, s.len())
            .body(Body::from(s.to_string()))
            .unwrap(),
        None => b.body(Body::empty()).unwrap(),
    };
    let resp = app.clone().oneshot(req).await.unwrap();
    let code = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (code, String::from_utf8_lossy(&bytes).into_owned(), headers)
}

async fn code(app: &axum::Router, method: &str, uri: &str) -> u16 {
    call(app, method, uri, None).await.0.as_u16()
}

// ------------------------------------------------------------------ health checks

#[tokio::test]
async fn leader_answers_200_on_primary_paths_and_503_on_replica_paths() {
    let view = three_node_view();
    let h = harness(primary_status(&view), view, None, StubProbe::default());
    for p in [
        "/",
        "/primary",
        "/read-write",
        "/master",
        "/leader",
        "/read-only",
        "/health",
        "/read-only-sync",
    ] {
        assert_eq!(code(&h.app, "GET", p).await, 200, "{p}");
    }
    for p in [
        "/replica",
        "/standby-leader",
        "/standby_leader",
        "/sync",
        "/synchronous",
        "/async",
        "/nonsense",
    ] {
        assert_eq!(code(&h.app, "GET", p).await, 503, "{p}");
    }
    let (_, body, headers) = call(&h.app, "GET", "/primary", None).await;
    assert_eq!(headers[header::CONTENT_TYPE], "application/json");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["state"], "running");
    assert_eq!(v["role"], "primary");
    assert_eq!(v["xlog"]["location"], 0x5000000);
    assert_eq!(v["timeline"], 2);
    assert_eq!(v["server_version"], 150010);
    assert_eq!(v["database_system_identifier"], "7268616322854375442");
    assert_eq!(v["dcs_last_seen"], 1692356718);
    assert_eq!(
        v["patroni"],
        json!({"version": "4.1.5", "scope": "batman", "name": "pg0"})
    );
    assert_eq!(v["replication"][0]["application_name"], "pg1");
    assert_eq!(v["replication"][0]["sync_state"], "async");
    assert!(v.get("cluster_unlocked").is_none());
}

#[tokio::test]
async fn primary_whose_lock_expired_fails_the_primary_check() {
    let view = three_node_view();
    let mut st = primary_status(&view);
    st.leader_until = Some(Instant::now() - Duration::from_millis(1));
    let h = harness(st, view, None, StubProbe::default());
    assert_eq!(code(&h.app, "GET", "/primary").await, 503);
    assert_eq!(code(&h.app, "GET", "/health").await, 200);
}

#[tokio::test]
async fn paused_primary_without_dcs_still_answers_primary() {
    let view = three_node_view();
    let mut st = primary_status(&view);
    st.leader_until = None;
    st.dcs_ok = false;
    st.paused = true;
    let h = harness(st, view, None, StubProbe::default());
    assert_eq!(code(&h.app, "GET", "/primary").await, 200);
}

#[tokio::test]
async fn standby_cluster_leader_answers_standby_leader_only() {
    let mut view = three_node_view();
    view.config = Some((
        DynamicConfig::parse(r#"{"standby_cluster":{"host":"x","port":5432}}"#).unwrap(),
        Revision(3),
    ));
    let mut st = primary_status(&view);
    st.role = Role::StandbyLeader;
    st.pg.in_recovery = Some(true);
    let h = harness(st, view, None, StubProbe::default());
    assert_eq!(code(&h.app, "GET", "/standby-leader").await, 200);
    assert_eq!(code(&h.app, "GET", "/standby_leader").await, 200);
    assert_eq!(code(&h.app, "GET", "/primary").await, 503);
    assert_eq!(code(&h.app, "GET", "/leader").await, 200);
}

#[tokio::test]
async fn replica_check_honours_lag_units_tags_and_noloadbalance() {
    let view = three_node_view();
    // 64 kB behind the leader's optime.
    let mut st = replica_status(&view, 0x5000000 - 64 * 1024);
    st.tags.insert("dc".into(), json!("west"));
    st.tags.insert("clonefrom".into(), json!(true));
    let h = harness(st.clone(), view.clone(), None, StubProbe::default());
    assert_eq!(code(&h.app, "GET", "/replica").await, 200);
    assert_eq!(code(&h.app, "GET", "/replica?lag=16kB").await, 503);
    assert_eq!(code(&h.app, "GET", "/replica?lag=1MB").await, 200);
    assert_eq!(code(&h.app, "GET", "/replica?lag=65536").await, 200);
    assert_eq!(code(&h.app, "GET", "/replica?tag_dc=west").await, 200);
    assert_eq!(code(&h.app, "GET", "/replica?tag_dc=east").await, 503);
    assert_eq!(
        code(&h.app, "GET", "/replica?tag_clonefrom=true").await,
        200
    );
    assert_eq!(code(&h.app, "GET", "/replica?tag_missing=x").await, 503);
    assert_eq!(code(&h.app, "GET", "/read-only").await, 200);
    assert_eq!(code(&h.app, "GET", "/async").await, 200);
    assert_eq!(code(&h.app, "GET", "/primary").await, 503);
    let (_, body, _) = call(&h.app, "GET", "/replica", None).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["role"], "replica");
    assert_eq!(v["replication_state"], "streaming");
    assert_eq!(v["xlog"]["replayed_location"], 0x5000000 - 64 * 1024);
    assert_eq!(v["xlog"]["received_location"], 0x5000000 - 64 * 1024 + 16);
    assert_eq!(v["xlog"]["paused"], false);
    assert!(v["xlog"]["replayed_timestamp"].is_null());
    assert_eq!(v["tags"]["dc"], "west");

    st.tags.insert("noloadbalance".into(), json!(true));
    h.tx.send(st.clone()).unwrap();
    assert_eq!(code(&h.app, "GET", "/replica").await, 503);

    st.tags.remove("noloadbalance");
    st.state = PgState::Stopped;
    st.pg.accepting_connections = false;
    h.tx.send(st).unwrap();
    assert_eq!(code(&h.app, "GET", "/replica").await, 503);
    assert_eq!(code(&h.app, "GET", "/health").await, 503);
    let (_, body, _) = call(&h.app, "GET", "/patroni", None).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["state"], "stopped");
    assert!(v.get("xlog").is_none());
}

#[tokio::test]
async fn sync_and_async_checks_follow_the_sync_key() {
    let mut view = three_node_view();
    view.config = Some((
        DynamicConfig::parse(r#"{"synchronous_mode":true}"#).unwrap(),
        Revision(3),
    ));
    view.sync = Some((
        SyncState {
            leader: Some("pg0".into()),
            quorum: 0,
            sync_standby: Some("pg1".into()),
        },
        Revision(4),
    ));
    let st = replica_status(&view, 0x5000000);
    let h = harness(st.clone(), view.clone(), None, StubProbe::default());
    assert_eq!(code(&h.app, "GET", "/sync").await, 200);
    assert_eq!(code(&h.app, "GET", "/synchronous").await, 200);
    assert_eq!(code(&h.app, "GET", "/read-only-sync").await, 200);
    assert_eq!(code(&h.app, "GET", "/async").await, 503);
    let (_, body, _) = call(&h.app, "GET", "/patroni", None).await;
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["sync_standby"],
        true
    );

    let mut other = st.clone();
    other.name = "pg2".into();
    h.tx.send(other).unwrap();
    assert_eq!(code(&h.app, "GET", "/sync").await, 503);
    assert_eq!(code(&h.app, "GET", "/async").await, 200);
    assert_eq!(code(&h.app, "GET", "/read-only-sync").await, 503);

    // DCS unreachable: sync membership cannot be trusted.
    let mut down = st;
    down.dcs_ok = false;
    h.tx.send(down).unwrap();
    assert_eq!(code(&h.app, "GET", "/sync").await, 503);
    assert_eq!(code(&h.app, "GET", "/async").await, 503);
}

#[tokio::test]
async fn head_and_options_return_only_the_status() {
    let view = three_node_view();
    let h = harness(primary_status(&view), view, None, StubProbe::default());
    for m in ["HEAD", "OPTIONS"] {
        let (c, body, _) = call(&h.app, m, "/primary", None).await;
        assert_eq!((c.as_u16(), body.as_str()), (200, ""), "{m}");
        let (c, body, _) = call(&h.app, m, "/replica", None).await;
        assert_eq!((c.as_u16(), body.as_str()), (503, ""), "{m}");
        assert_eq!(code(&h.app, m, "/liveness").await, 200);
    }
}

#[tokio::test]
async fn liveness_fails_when_the_loop_stops_and_readiness_tracks_lag() {
    let view = three_node_view();
    let mut st = replica_status(&view, 0x5000000 - 2 * 1024 * 1024);
    let h = harness(st.clone(), view, None, StubProbe::default());
    let (c, body, _) = call(&h.app, "GET", "/liveness", None).await;
    assert_eq!((c.as_u16(), body.as_str()), (200, ""));
    // 2 MB behind > default maximum_lag_on_failover (1 MB).
    assert_eq!(code(&h.app, "GET", "/readiness").await, 503);
    assert_eq!(code(&h.app, "GET", "/readiness?lag=4MB").await, 200);
    st.pg.replication_state = Some("in archive recovery".into());
    st.last_cycle = Instant::now() - Duration::from_secs(71);
    h.tx.send(st.clone()).unwrap();
    assert_eq!(code(&h.app, "GET", "/readiness?lag=4MB").await, 503);
    assert_eq!(code(&h.app, "GET", "/liveness").await, 503);
    st.paused = true;
    h.tx.send(st).unwrap();
    assert_eq!(code(&h.app, "GET", "/liveness").await, 200);
}

#[tokio::test]
async fn patroni_reports_optional_fields() {
    let mut view = three_node_view();
    view.leader = None;
    let mut st = primary_status(&view);
    st.paused = true;
    st.pending_restart = true;
    st.pending_restart_reason =
        Some(json!({"max_connections": {"old_value": "100", "new_value": "101"}}));
    st.scheduled_restart =
        Some(json!({"schedule": "2999-01-01T00:00:00+00:00", "postmaster_start_time": "x"}));
    st.watchdog_failed = true;
    st.tags.insert("nofailover".into(), json!(true));
    let h = harness(st, view, None, StubProbe::default());
    let (c, body, _) = call(&h.app, "GET", "/patroni", None).await;
    assert_eq!(c, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["pause"], true);
    assert_eq!(v["cluster_unlocked"], true);
    assert_eq!(v["pending_restart"], true);
    assert_eq!(
        v["pending_restart_reason"]["max_connections"]["new_value"],
        "101"
    );
    assert_eq!(
        v["scheduled_restart"],
        json!({"schedule": "2999-01-01T00:00:00+00:00"})
    );
    assert_eq!(v["watchdog_failed"], true);
    assert_eq!(v["tags"]["nofailover"], true);
    assert_eq!(v["postmaster_start_time"], "2024-08-28 19:39:26.352526+00");
}

// ------------------------------------------------------------------ cluster, history, config, metrics

#[tokio::test]
async fn cluster_lists_members_sorted_with_lag_and_scheduled_switchover() {
    let mut view = three_node_view();
    view.config = Some((
        DynamicConfig::parse(r#"{"synchronous_mode":true,"pause":true}"#).unwrap(),
        Revision(3),
    ));
    view.sync = Some((
        SyncState {
            leader: Some("pg0".into()),
            quorum: 0,
            sync_standby: Some("pg2".into()),
        },
        Revision(4),
    ));
    view.failover = Some((
        Failover {
            leader: Some("pg0".into()),
            member: Some("pg1".into()),
            scheduled_at: Some("2999-09-24T10:36:00+02:00".into()),
        },
        Revision(5),
    ));
    let h = harness(primary_status(&view), view, None, StubProbe::default());
    let (c, body, _) = call(&h.app, "GET", "/cluster", None).await;
    assert_eq!(c, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    let names: Vec<&str> = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["pg0", "pg1", "pg2"]);
    let m0 = &v["members"][0];
    assert_eq!(
        (m0["role"].as_str(), m0["state"].as_str()),
        (Some("leader"), Some("running"))
    );
    assert_eq!(m0["host"], "10.0.0.1");
    assert_eq!(m0["port"], 5432);
    assert!(m0.get("lag").is_none());
    assert_eq!(v["members"][1]["role"], "replica");
    assert_eq!(v["members"][1]["state"], "streaming");
    assert_eq!(v["members"][1]["lag"], 0);
    assert_eq!(v["members"][2]["role"], "sync_standby");
    assert_eq!(v["members"][2]["lag"], 0x10000);
    assert_eq!(v["members"][2]["lsn"], "0/4FF0000");
    assert_eq!(v["members"][2]["replay_lsn"], "0/4FF0000");
    assert_eq!(v["scope"], "batman");
    assert_eq!(v["pause"], true);
    assert_eq!(
        v["scheduled_switchover"],
        json!({"at": "2999-09-24T10:36:00+02:00", "from": "pg0", "to": "pg1"})
    );
}

#[tokio::test]
async fn history_and_config_come_from_the_dcs() {
    let view = three_node_view();
    let h = harness(primary_status(&view), view, None, StubProbe::default());
    let (c, body, _) = call(&h.app, "GET", "/history", None).await;
    assert_eq!(c, 200);
    assert_eq!(
        body,
        r#"[[1,25623960,"no recovery target specified","2019-09-23T16:57:57+02:00","pg0"]]"#
    );
    let (c, body, _) = call(&h.app, "GET", "/config", None).await;
    assert_eq!(c, 200);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["ttl"], 30);
    h.dcs.view.lock().unwrap().config = None;
    assert_eq!(code(&h.app, "GET", "/config").await, 502);
}

#[tokio::test]
async fn metrics_use_patroni_names_and_labels() {
    let view = three_node_view();
    let h = harness(primary_status(&view), view, None, StubProbe::default());
    let (c, body, headers) = call(&h.app, "GET", "/metrics", None).await;
    assert_eq!(c, 200);
    assert!(
        headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let l = r#"{scope="batman",name="pg0"}"#;
    for line in [
        format!("patroni_version{l} 040105"),
        format!("patroni_postgres_running{l} 1"),
        format!("patroni_postmaster_start_time{l} 1724873966.352526"),
        format!("patroni_primary{l} 1"),
        format!("patroni_xlog_location{l} {}", 0x5000000),
        format!("patroni_replica{l} 0"),
        format!("patroni_postgres_server_version{l} 150010"),
        format!("patroni_cluster_unlocked{l} 0"),
        format!("patroni_postgres_timeline{l} 2"),
        format!("patroni_dcs_last_seen{l} 1692356718"),
        format!("patroni_is_paused{l} 0"),
        format!("patroni_postgres_state{l} 5"),
    ] {
        assert!(
            body.lines().any(|x| x == line),
            "missing {line:?} in\n{body}"
        );
    }
    assert!(body.contains("# TYPE patroni_xlog_location counter"));
    assert!(body.contains("# TYPE patroni_postgres_timeline gauge"));
    for name in [
        "patroni_standby_leader",
        "patroni_sync_standby",
        "patroni_quorum_standby",
        "patroni_xlog_received_location",
        "patroni_xlog_replayed_location",
        "patroni_xlog_replayed_timestamp",
        "patroni_xlog_paused",
        "patroni_postgres_streaming",
        "patroni_postgres_in_archive_recovery",
        "patroni_failsafe_mode_is_active",
        "patroni_pending_restart",
    ] {
        assert!(body.contains(&format!("{name}{l} ")), "missing {name}");
    }
}

// ------------------------------------------------------------------ switchover / failover

async fn post(h: &Harness, uri: &str, body: &str) -> (u16, String) {
    let (c, b, _) = call(&h.app, "POST", uri, Some(body)).await;
    (c.as_u16(), b)
}

#[tokio::test]
async fn switchover_validation_messages_in_patroni_order() {
    let view = three_node_view();
    let h = harness(primary_status(&view), view.clone(), None, healthy_probe());
    assert_eq!(
        post(&h, "/switchover", r#"{"candidate":"pg1"}"#).await,
        (
            400,
            "Switchover could be performed only from a specific leader".into()
        )
    );
    assert_eq!(
        post(&h, "/switchover", r#"{"leader":"pg0","candidate":"pg0"}"#).await,
        (400, "Switchover target and source are the same".into())
    );
    assert_eq!(
        post(&h, "/failover", r#"{"foo":"bar"}"#).await,
        (
            400,
            "Failover could be performed only to a specific candidate".into()
        )
    );
    assert_eq!(
        post(
            &h,
            "/failover",
            r#"{"candidate":"pg1","scheduled_at":"2999-01-01T00:00:00+00:00"}"#
        )
        .await,
        (400, "Failover can't be scheduled".into())
    );
    assert_eq!(
        post(
            &h,
            "/switchover",
            r#"{"leader":"pg0","scheduled_at":"2999-01-01T00:00:00"}"#
        )
        .await
        .0,
        400
    );
    assert_eq!(
        post(
            &h,
            "/switchover",
            r#"{"leader":"pg0","scheduled_at":"2000-01-01T00:00:00+00:00"}"#
        )
        .await
        .0,
        422
    );
    assert_eq!(
        post(
            &h,
            "/switchover",
            r#"{"leader":"pg0","scheduled_at":"soon"}"#
        )
        .await
        .0,
        422
    );
    assert_eq!(
        post(&h, "/switchover", r#"{"leader":"pgX"}"#).await,
        (412, "leader name does not match".into())
    );
    assert_eq!(
        post(&h, "/switchover", r#"{"leader":"pg0","candidate":"nope"}"#).await,
        (412, "candidate does not exists".into())
    );

    // Paused cluster.
    h.dcs.view.lock().unwrap().config = Some((
        DynamicConfig::parse(r#"{"pause":true}"#).unwrap(),
        Revision(8),
    ));
    assert_eq!(
        post(&h, "/switchover", r#"{"leader":"pg0"}"#).await,
        (
            400,
            "Switchover is possible only to a specific candidate in a paused state".into()
        )
    );
    assert_eq!(
        post(
            &h,
            "/switchover",
            r#"{"leader":"pg0","candidate":"pg1","scheduled_at":"2999-01-01T00:00:00+00:00"}"#
        )
        .await,
        (400, "Can't schedule switchover in the paused state".into())
    );

    // Sync mode: the candidate must be the sync standby.
    {
        let mut v = h.dcs.view.lock().unwrap();
        v.config = Some((
            DynamicConfig::parse(r#"{"synchronous_mode":true}"#).unwrap(),
            Revision(9),
        ));
        v.sync = Some((
            SyncState {
                leader: Some("pg0".into()),
                quorum: 0,
                sync_standby: Some("pg2".into()),
            },
            Revision(4),
        ));
    }
    assert_eq!(
        post(&h, "/switchover", r#"{"leader":"pg0","candidate":"pg1"}"#).await,
        (
            412,
            "candidate name does not match with sync_standby".into()
        )
    );
    h.dcs.view.lock().unwrap().sync = None;
    assert_eq!(
        post(&h, "/switchover", r#"{"leader":"pg0"}"#).await,
        (
            412,
            "switchover is not possible: can not find sync_standby".into()
        )
    );
    assert!(
        h.dcs.view.lock().unwrap().failover.is_none(),
        "no check failure may write the key"
    );
}

#[tokio::test]
async fn switchover_needs_a_healthy_reachable_candidate() {
    let mut view = three_node_view();
    let only_leader: BTreeMap<_, _> = view
        .members
        .iter()
        .filter(|(k, _)| k.as_str() == "pg0")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let full = view.members.clone();
    view.members = only_leader;
    let mut probe = StubProbe::default();
    probe.answers.insert(
        "pg1".into(),
        json!({"role": "replica", "tags": {"nofailover": true}}),
    );
    probe.answers.insert(
        "pg2".into(),
        json!({"role": "replica", "watchdog_failed": true}),
    );
    let h = harness(primary_status(&view), view, None, probe);
    assert_eq!(
        post(&h, "/switchover", r#"{"leader":"pg0"}"#).await,
        (
            412,
            "switchover is not possible: cluster does not have members except leader".into()
        )
    );
    h.dcs.view.lock().unwrap().members = full;
    assert_eq!(
        post(&h, "/switchover", r#"{"leader":"pg0"}"#).await,
        (
            412,
            "switchover is not possible: no good candidates have been found".into()
        )
    );
    assert_eq!(
        post(&h, "/failover", r#"{"candidate":"pg1"}"#).await,
        (
            412,
            "failover is not possible: no good candidates have been found".into()
        )
    );
}

#[tokio::test]
async fn switchover_writes_the_key_wakes_the_loop_and_reports_success() {
    let view = three_node_view();
    let h = harness(primary_status(&view), view, None, healthy_probe());
    *h.dcs.auto_switch_to.lock().unwrap() = Some(String::new());
    let t = Instant::now();
    assert_eq!(
        post(&h, "/switchover", r#"{"leader":"pg0","candidate":"pg1"}"#).await,
        (200, "Successfully switched over to \"pg1\"".into())
    );
    assert!(
        t.elapsed() < Duration::from_millis(450),
        "polling must be fast"
    );
    assert!(h.commands.lock().unwrap().contains(&"wakeup".to_string()));
    // Another node won instead of the requested one.
    {
        let mut v = h.dcs.view.lock().unwrap();
        v.leader = Some(LeaderKey {
            name: MemberName::new("pg0"),
            lease: None,
            revision: Revision(2),
        });
    }
    *h.dcs.auto_switch_to.lock().unwrap() = Some("pg2".into());
    assert_eq!(
        post(&h, "/switchover", r#"{"leader":"pg0","candidate":"pg1"}"#).await,
        (200, "Switched over to \"pg2\" instead of \"pg1\"".into())
    );
    {
        let mut v = h.dcs.view.lock().unwrap();
        v.leader = Some(LeaderKey {
            name: MemberName::new("pg0"),
            lease: None,
            revision: Revision(2),
        });
    }
    *h.dcs.auto_switch_to.lock().unwrap() = Some(String::new());
    assert_eq!(
        post(&h, "/failover", r#"{"candidate":"pg2"}"#).await,
        (200, "Successfully failed over to \"pg2\"".into())
    );
}

#[tokio::test]
async fn switchover_reports_failure_unknown_and_dcs_errors() {
    let view = three_node_view();
    let h = harness(primary_status(&view), view, None, healthy_probe());
    *h.dcs.auto_fail.lock().unwrap() = true;
    assert_eq!(
        post(&h, "/switchover", r#"{"leader":"pg0"}"#).await,
        (503, "Switchover failed".into())
    );
    *h.dcs.auto_fail.lock().unwrap() = false;
    assert_eq!(
        post(&h, "/switchover", r#"{"leader":"pg0"}"#).await,
        (503, "Switchover status unknown".into())
    );
    let f = h.dcs.view.lock().unwrap().failover.clone().unwrap().0;
    assert_eq!(
        f,
        Failover {
            leader: Some("pg0".into()),
            member: None,
            scheduled_at: None
        }
    );
    *h.dcs.fail_writes.lock().unwrap() = true;
    assert_eq!(
        post(&h, "/switchover", r#"{"leader":"pg0"}"#).await,
        (503, "failed to write failover key into DCS".into())
    );
}

#[tokio::test]
async fn scheduled_switchover_is_accepted_then_deletable() {
    let view = three_node_view();
    let h = harness(primary_status(&view), view, None, healthy_probe());
    assert_eq!(code(&h.app, "DELETE", "/switchover").await, 404);
    assert_eq!(
        post(
            &h,
            "/switchover",
            r#"{"leader":"pg0","candidate":"pg1","scheduled_at":"2999-01-01T10:00:00+02:00"}"#
        )
        .await,
        (202, "Switchover scheduled".into())
    );
    let f = h.dcs.view.lock().unwrap().failover.clone().unwrap().0;
    assert_eq!(f.member.as_deref(), Some("pg1"));
    assert!(
        f.scheduled_at
            .as_deref()
            .unwrap()
            .starts_with("2999-01-01T10:00:00")
    );
    let (c, body, _) = call(&h.app, "DELETE", "/switchover", None).await;
    assert_eq!(
        (c.as_u16(), body.as_str()),
        (200, "scheduled switchover deleted")
    );
    assert!(
        h.dcs
            .view
            .lock()
            .unwrap()
            .failover
            .as_ref()
            .unwrap()
            .0
            .is_empty()
    );
}

// ------------------------------------------------------------------ restart, reinitialize, reload

#[tokio::test]
async fn restart_validates_the_body_and_forwards_to_the_loop() {
    let view = three_node_view();
    let h = harness(primary_status(&view), view, None, StubProbe::default());
    assert_eq!(
        post(&h, "/restart", r#"{"role":"master2"}"#).await,
        (
            400,
            "PostgreSQL role should be either primary, standby_leader, or replica".into()
        )
    );
    assert_eq!(
        post(&h, "/restart", r#"{"timeout":0}"#).await,
        (400, "Timeout should be a positive number of seconds".into())
    );
    assert_eq!(post(&h, "/restart", r#"{"timeout":"abc"}"#).await.0, 400);
    assert_eq!(
        post(&h, "/restart", r#"{"postgres_version":"fifteen"}"#)
            .await
            .0,
        400
    );
    assert_eq!(
        post(&h, "/restart", r#"{"bogus":1}"#).await,
        (
            400,
            "Unknown filter for the scheduled restart: bogus".into()
        )
    );
    assert_eq!(
        post(
            &h,
            "/restart",
            r#"{"schedule":"2000-01-01T00:00:00+00:00"}"#
        )
        .await
        .0,
        422
    );
    assert!(
        h.commands.lock().unwrap().is_empty(),
        "invalid requests must not reach the loop"
    );

    assert_eq!(post(&h, "/restart", r#"{"role":"primary","timeout":"30s","restart_pending":"True","postgres_version":"15.4"}"#).await, (200, "restarted successfully".into()));
    // No body at all is a plain immediate restart.
    assert_eq!(code(&h.app, "POST", "/restart").await, 200);
    assert_eq!(
        post(
            &h,
            "/restart",
            r#"{"schedule":"2999-01-01T00:00:00+00:00"}"#
        )
        .await,
        (202, "Restart scheduled".into())
    );
    let log = h.commands.lock().unwrap().clone();
    assert!(
        log[0].contains("role: Some(\"primary\")")
            && log[0].contains("timeout: Some(30.0)")
            && log[0].contains("restart_pending: Some(true)"),
        "{log:?}"
    );
    assert!(
        log[2].contains("schedule: Some(\"2999-01-01T00:00:00+00:00\")"),
        "{log:?}"
    );
    assert_eq!(code(&h.app, "DELETE", "/restart").await, 404);

    let mut st = primary_status(&three_node_view());
    st.paused = true;
    h.tx.send(st).unwrap();
    assert_eq!(
        post(
            &h,
            "/restart",
            r#"{"schedule":"2999-01-01T00:00:00+00:00"}"#
        )
        .await,
        (500, "Can't schedule restart in the paused state".into())
    );
}

#[tokio::test]
async fn reinitialize_is_refused_on_the_leader_and_forwarded_on_replicas() {
    let view = three_node_view();
    let h = harness(
        primary_status(&view),
        view.clone(),
        None,
        StubProbe::default(),
    );
    assert_eq!(
        post(&h, "/reinitialize", r#"{"force":true}"#).await,
        (503, "I am the leader, can not reinitialize".into())
    );
    h.tx.send(replica_status(&view, 1)).unwrap();
    assert_eq!(
        post(&h, "/reinitialize", r#"{"force":true,"from_leader":true}"#).await,
        (200, "reinitialize started".into())
    );
    assert_eq!(
        h.commands.lock().unwrap().last().unwrap(),
        "reinit force=true from_leader=true"
    );
    let mut unlocked = view.clone();
    unlocked.leader = None;
    h.tx.send(replica_status(&unlocked, 1)).unwrap();
    assert_eq!(
        post(&h, "/reinitialize", "{}").await,
        (503, "Cluster has no leader, can not reinitialize".into())
    );
}

#[tokio::test]
async fn reload_is_always_202() {
    let view = three_node_view();
    let h = harness(primary_status(&view), view, None, StubProbe::default());
    assert_eq!(code(&h.app, "POST", "/reload").await, 202);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(h.commands.lock().unwrap().contains(&"reload".to_string()));
}

// ------------------------------------------------------------------ config

#[tokio::test]
async fn patch_config_merges_with_cas_and_wakes_the_loop() {
    let view = three_node_view();
    let h = harness(primary_status(&view), view, None, StubProbe::default());
    let (c, body, _) = call(
        &h.app,
        "PATCH",
        "/config",
        Some(r#"{"ttl":20,"loop_wait":null,"postgresql":{"parameters":{"max_connections":101}}}"#),
    )
    .await;
    assert_eq!(c, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v,
        json!({"ttl":20,"retry_timeout":10,"postgresql":{"parameters":{"max_connections":101}}})
    );
    let stored = h.dcs.view.lock().unwrap().config.clone().unwrap();
    assert_eq!(stored.0.ttl(), 20);
    assert!(h.commands.lock().unwrap().contains(&"wakeup".to_string()));

    h.dcs.view.lock().unwrap().config = Some((DynamicConfig::default(), Revision(0)));
    assert_eq!(
        call(&h.app, "PATCH", "/config", Some(r#"{"ttl":25}"#))
            .await
            .0,
        503,
        "revision 0 is no valid config"
    );
    h.dcs.view.lock().unwrap().config = None;
    assert_eq!(
        call(&h.app, "PATCH", "/config", Some(r#"{"ttl":25}"#))
            .await
            .0,
        503
    );
}

#[tokio::test]
async fn patch_config_conflict_is_409() {
    // A DCS whose CAS always fails (someone else wrote in between).
    struct Conflicting(Arc<MemDcs>);
    #[async_trait]
    impl Dcs for Conflicting {
        async fn load(&self) -> Result<ClusterView, DcsError> {
            self.0.load().await
        }
        async fn ensure_lease(&self, t: Duration) -> Result<LeaseId, DcsError> {
            self.0.ensure_lease(t).await
        }
        async fn keepalive(&self) -> Result<(), DcsError> {
            Ok(())
        }
        async fn touch_member(&self, _n: &MemberName, _d: &MemberData) -> Result<(), DcsError> {
            Ok(())
        }
        async fn acquire_leader(&self, _n: &MemberName) -> Result<bool, DcsError> {
            Ok(false)
        }
        async fn update_leader(&self, _n: &MemberName) -> Result<bool, DcsError> {
            Ok(false)
        }
        async fn take_leader(&self, _n: &MemberName) -> Result<(), DcsError> {
            Ok(())
        }
        async fn release_leader(&self, _n: &MemberName) -> Result<bool, DcsError> {
            Ok(false)
        }
        async fn race_initialize(&self) -> Result<bool, DcsError> {
            Ok(false)
        }
        async fn set_initialize(&self, _s: &str) -> Result<(), DcsError> {
            Ok(())
        }
        async fn delete_initialize(&self) -> Result<(), DcsError> {
            Ok(())
        }
        async fn set_config(
            &self,
            _c: &DynamicConfig,
            e: Option<Revision>,
        ) -> Result<bool, DcsError> {
            Ok(e.is_none())
        }
        async fn set_failover(
            &self,
            _f: &Failover,
            _e: Option<Revision>,
        ) -> Result<bool, DcsError> {
            Ok(false)
        }
        async fn set_sync(
            &self,
            _s: Option<&SyncState>,
            _e: Option<Revision>,
        ) -> Result<bool, DcsError> {
            Ok(true)
        }
        async fn set_status(&self, _s: &Status) -> Result<(), DcsError> {
            Ok(())
        }
        async fn set_history(&self, _h: &[HistoryLine]) -> Result<(), DcsError> {
            Ok(())
        }
        async fn set_failsafe(
            &self,
            _m: &std::collections::BTreeMap<MemberName, String>,
        ) -> Result<(), DcsError> {
            Ok(())
        }
        async fn delete_cluster(&self) -> Result<(), DcsError> {
            Ok(())
        }
        async fn wait_for_change(&self, _a: i64, _t: Duration) -> bool {
            false
        }
    }
    let view = three_node_view();
    let mut sched = view.clone();
    sched.failover = Some((
        Failover {
            leader: Some("pg0".into()),
            member: None,
            scheduled_at: Some("2999-01-01T00:00:00+00:00".into()),
        },
        Revision(3),
    ));
    let (_tx, rx) = watch::channel(primary_status(&view));
    let (ctx, _crx) = mpsc::channel(4);
    let state = ApiState::new(
        rx,
        Arc::new(Conflicting(MemDcs::with(sched))),
        ctx,
        None,
        "batman",
        "pg0",
    );
    let app = router(state);
    assert_eq!(
        call(&app, "PATCH", "/config", Some(r#"{"ttl":25}"#))
            .await
            .0,
        409
    );
    assert_eq!(call(&app, "DELETE", "/switchover", None).await.0, 409);
}

#[tokio::test]
async fn put_config_replaces_and_reports_dcs_failure() {
    let view = three_node_view();
    let h = harness(primary_status(&view), view, None, StubProbe::default());
    let (c, body, _) = call(
        &h.app,
        "PUT",
        "/config",
        Some(r#"{"ttl":40,"loop_wait":5}"#),
    )
    .await;
    assert_eq!(c, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"ttl":40,"loop_wait":5})
    );
    assert_eq!(
        h.dcs
            .view
            .lock()
            .unwrap()
            .config
            .clone()
            .unwrap()
            .0
            .loop_wait(),
        5
    );
    *h.dcs.fail_writes.lock().unwrap() = true;
    assert_eq!(
        call(&h.app, "PUT", "/config", Some(r#"{"ttl":41}"#))
            .await
            .0,
        502
    );
}

// ------------------------------------------------------------------ auth, malformed bodies, unknown verbs

#[tokio::test]
async fn mutating_verbs_require_basic_auth_when_configured() {
    let view = three_node_view();
    let creds = Credentials {
        username: "admin".into(),
        password: "s3cret".into(),
    };
    let h = harness(
        primary_status(&view),
        view,
        Some(creds),
        StubProbe::default(),
    );
    for (m, uri) in [
        ("POST", "/switchover"),
        ("POST", "/failover"),
        ("POST", "/restart"),
        ("POST", "/reinitialize"),
        ("POST", "/reload"),
        ("DELETE", "/switchover"),
        ("DELETE", "/restart"),
        ("PATCH", "/config"),
        ("PUT", "/config"),
    ] {
        let (c, body, headers) = call(&h.app, m, uri, Some("{}")).await;
        assert_eq!(c, 401, "{m} {uri}");
        assert_eq!(body, "no auth header received");
        assert_eq!(headers[header::WWW_AUTHENTICATE], "Basic realm=\"Patroni\"");
        assert!(!body.contains("s3cret"));
    }
    let wrong = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("admin:nope")
    );
    let (c, body, _) = call_with(&h.app, "POST", "/reload", None, Some(&wrong)).await;
    assert_eq!((c.as_u16(), body.as_str()), (401, "not authenticated"));
    let (c, _, _) = call_with(&h.app, "POST", "/reload", None, Some("Bearer xyz")).await;
    assert_eq!(c, 401);
    let right = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("admin:s3cret")
    );
    let (c, _, _) = call_with(&h.app, "POST", "/reload", None, Some(&right)).await;
    assert_eq!(c, 202);
    // Reads stay open.
    assert_eq!(code(&h.app, "GET", "/patroni").await, 200);
}

#[tokio::test]
async fn bodies_without_length_are_411_and_malformed_json_is_400() {
    let view = three_node_view();
    let h = harness(primary_status(&view), view, None, healthy_probe());
    assert_eq!(code(&h.app, "POST", "/switchover").await, 411);
    assert_eq!(code(&h.app, "POST", "/failover").await, 411);
    assert_eq!(code(&h.app, "PATCH", "/config").await, 411);
    assert_eq!(code(&h.app, "PUT", "/config").await, 411);
    assert_eq!(post(&h, "/switchover", "{not json").await.0, 400);
    assert_eq!(post(&h, "/switchover", "[1,2]").await.0, 400);
    assert_eq!(post(&h, "/failover", "{}").await.0, 400);
    assert_eq!(post(&h, "/restart", "\"x\"").await.0, 400);
    assert_eq!(
        call(&h.app, "PATCH", "/config", Some("{}"))
            .await
            .0
            .as_u16(),
        400
    );
    assert_eq!(
        call(&h.app, "PATCH", "/config", Some("nope"))
            .await
            .0
            .as_u16(),
        400
    );
    assert!(h.dcs.view.lock().unwrap().failover.is_none());
}

#[tokio::test]
async fn unknown_verbs_answer_501() {
    let view = three_node_view();
    let h = harness(primary_status(&view), view, None, StubProbe::default());
    assert_eq!(post(&h, "/nothing", "{}").await.0, 501);
    assert_eq!(code(&h.app, "DELETE", "/config").await, 501);
}

// ------------------------------------------------------------------ real socket

#[tokio::test]
async fn options_primary_over_a_real_tcp_socket() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let view = three_node_view();
    let dcs = MemDcs::with(view.clone());
    let (_tx, rx) = watch::channel(primary_status(&view));
    let (ctx, _crx) = mpsc::channel(4);
    let state = ApiState::new(rx, dcs, ctx, None, "batman", "pg0");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:26001")
        .await
        .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(pgherd::api::serve(listener, state, async move {
        let _ = stop_rx.await;
    }));
    for (path, want) in [("/primary", "200"), ("/replica", "503")] {
        let mut s = tokio::net::TcpStream::connect("127.0.0.1:26001")
            .await
            .unwrap();
        s.write_all(format!("OPTIONS {path} HTTP/1.0\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let resp = String::from_utf8_lossy(&buf);
        assert!(
            resp.starts_with(&format!("HTTP/1.0 {want}")),
            "{path}: {resp}"
        );
    }
    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_panicking_handler_becomes_a_500_not_a_dropped_connection() {
    let view = three_node_view();
    let h = harness(primary_status(&view), view, None, StubProbe::default());
    *h.dcs.panic_on_load.lock().unwrap() = true;
    assert_eq!(code(&h.app, "GET", "/cluster").await, 500);
    // The router keeps serving (health checks never touch the DCS).
    assert_eq!(code(&h.app, "GET", "/primary").await, 200);
}

// ------------------------------------------------------------------ pgherd extensions

async fn call_if_match(
    app: &axum::Router,
    method: &str,
    body: &str,
    if_match: &str,
) -> (StatusCode, String) {
    let req = Request::builder()
        .method(method)
        .uri("/config")
        .header(header::IF_MATCH, if_match)
        .header(header::CONTENT_LENGTH, body.len())
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let code = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (code, String::from_utf8_lossy(&bytes).into_owned())
}

fn stored_config(h: &Harness) -> (DynamicConfig, Revision) {
    h.dcs.view.lock().unwrap().config.clone().unwrap()
}

#[tokio::test]
async fn get_config_carries_the_revision_as_etag() {
    let view = three_node_view();
    let h = harness(primary_status(&view), view, None, StubProbe::default());
    let (_, rev) = stored_config(&h);
    let (c, _, headers) = call(&h.app, "GET", "/config", None).await;
    assert_eq!(c, 200);
    assert_eq!(headers[header::ETAG], format!("\"{}\"", rev.0));
}

#[tokio::test]
async fn patch_config_with_if_match_writes_only_at_that_revision() {
    let view = three_node_view();
    let h = harness(primary_status(&view), view, None, StubProbe::default());
    let (before, rev) = stored_config(&h);
    // A stale revision: 412, nothing written.
    let (c, body) = call_if_match(
        &h.app,
        "PATCH",
        r#"{"ttl":21}"#,
        &format!("\"{}\"", rev.0 - 1),
    )
    .await;
    assert_eq!(c, 412, "{body}");
    assert!(body.contains("config changed since revision"), "{body}");
    assert_eq!(stored_config(&h), (before.clone(), rev));
    // The current revision: written.
    let (c, body) =
        call_if_match(&h.app, "PATCH", r#"{"ttl":21}"#, &format!("\"{}\"", rev.0)).await;
    assert_eq!(c, 200, "{body}");
    let (after, rev2) = stored_config(&h);
    assert_eq!(after.ttl(), 21);
    assert_ne!(rev2, rev);
    // The revision just used is stale now.
    let (c, _) = call_if_match(&h.app, "PATCH", r#"{"ttl":22}"#, &format!("\"{}\"", rev.0)).await;
    assert_eq!(c, 412);
    assert_eq!(stored_config(&h).0.ttl(), 21);
    // A malformed precondition is a client error, not an unconditional write.
    let (c, _) = call_if_match(&h.app, "PATCH", r#"{"ttl":23}"#, "yesterday").await;
    assert_eq!(c, 400);
    assert_eq!(stored_config(&h).0.ttl(), 21);
}

#[tokio::test]
async fn put_config_with_if_match_writes_only_at_that_revision() {
    let view = three_node_view();
    let h = harness(primary_status(&view), view, None, StubProbe::default());
    let (_, rev) = stored_config(&h);
    let (c, body) = call_if_match(
        &h.app,
        "PUT",
        r#"{"ttl":40,"loop_wait":5}"#,
        &format!("\"{}\"", rev.0 + 7),
    )
    .await;
    assert_eq!(c, 412, "{body}");
    assert_ne!(stored_config(&h).0.loop_wait(), 5);
    let (c, body) = call_if_match(
        &h.app,
        "PUT",
        r#"{"ttl":40,"loop_wait":5}"#,
        &format!("\"{}\"", rev.0),
    )
    .await;
    assert_eq!(c, 200, "{body}");
    assert_eq!(stored_config(&h).0.loop_wait(), 5);
}

#[tokio::test]
async fn patroni_reports_the_pgherd_object_and_leaves_out_absent_fields() {
    let view = three_node_view();
    let mut st = primary_status(&view);
    let h = harness(st.clone(), view, None, StubProbe::default());
    let (_, body, _) = call(&h.app, "GET", "/patroni", None).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["pgherd"], json!({}));
    st.pgherd = pgherd::status::PgherdStatus {
        config_sha256: Some("ab".repeat(32)),
        config_error: Some("restart required: restapi.listen".into()),
        dcs_config_revision: Some(123),
        ..Default::default()
    };
    h.tx.send_replace(st);
    let (_, body, _) = call(&h.app, "GET", "/patroni", None).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["pgherd"],
        json!({
            "config_sha256": "ab".repeat(32),
            "config_error": "restart required: restapi.listen",
            "dcs_config_revision": 123,
        })
    );
    // Patroni's fields are untouched.
    assert_eq!(v["role"], "primary");
    assert_eq!(v["patroni"]["version"], "4.1.5");
}

#[tokio::test]
async fn swapped_rest_credentials_apply_to_the_next_request() {
    let view = three_node_view();
    let (tx, rx) = watch::channel(primary_status(&view));
    let (ctx, mut crx) = mpsc::channel::<Command>(16);
    tokio::spawn(async move {
        while let Some(c) = crx.recv().await {
            if let Command::Reload { reply } = c {
                let _ = reply.send(CommandReply::new(202, "reload scheduled"));
            }
        }
    });
    let old = Credentials {
        username: "admin".into(),
        password: "old".into(),
    };
    let state = ApiState::new(rx, MemDcs::with(view), ctx, Some(old), "batman", "pg0");
    let handle = state.auth_handle();
    let app = router(state);
    let basic = |u: &str, p: &str| {
        use base64::Engine;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        )
    };
    let post = |a: String| {
        let app = app.clone();
        async move {
            call_with(&app, "POST", "/reload", None, Some(&a))
                .await
                .0
                .as_u16()
        }
    };
    assert_eq!(post(basic("admin", "old")).await, 202);
    *handle.write().unwrap() = Some(Credentials {
        username: "admin".into(),
        password: "new".into(),
    });
    assert_eq!(post(basic("admin", "old")).await, 401);
    assert_eq!(post(basic("admin", "new")).await, 202);
    drop(tx);
}

// ------------------------------------------------------------------ the CLI's agent client

/// Serves `app` on a loopback port; the base URL.
async fn serve(app: axum::Router) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    format!("http://{addr}")
}

/// A base URL where nothing listens (a port bound, then released).
fn dead_base() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", l.local_addr().unwrap())
}

fn client_creds() -> Option<Credentials> {
    Some(Credentials {
        username: "admin".into(),
        password: "client_pw_7".into(),
    })
}

#[tokio::test]
async fn the_agent_client_reads_the_cluster_the_api_serialises_skipping_a_dead_agent() {
    use pgherd::provision::agent_client::{AgentClient, AgentError};
    let view = three_node_view();
    let h = harness(primary_status(&view), view, client_creds(), healthy_probe());
    let base = serve(h.app.clone()).await;
    let client = AgentClient::new(
        vec![("pg9".into(), dead_base()), ("pg0".into(), base)],
        None,
    );
    // The first agent is down: the next one answers, decoded into the API's own type.
    let c = client.cluster().await.unwrap();
    assert_eq!(c.leader_name().as_deref(), Some("pg0"));
    assert_eq!(c.streaming_count(), 2);
    let pg2 = c.member("pg2").unwrap();
    assert_eq!(pg2.lag.as_ref().and_then(|l| l.bytes()), Some(0x10000));
    assert_eq!(pg2.host.as_deref(), Some("10.0.0.3"));
    // The same document as the handler's own JSON, field for field.
    let (_, body, _) = call(&h.app, "GET", "/cluster", None).await;
    assert_eq!(
        serde_json::to_value(&c).unwrap(),
        serde_json::from_str::<Value>(&body).unwrap()
    );
    // /patroni: the agent's own account.
    let p = client.patroni("pg0").await.unwrap();
    assert_eq!((p.role.as_str(), p.state.as_str()), ("primary", "running"));
    // A health path: the code is the answer.
    assert_eq!(client.health("pg0", "/replica").await.unwrap(), 503);
    assert_eq!(client.find_primary().await.as_deref(), Some("pg0"));
    // The dead agent: which member, which call, and the transport error as the source.
    let e = client.patroni("pg9").await.unwrap_err();
    assert!(matches!(e, AgentError::Unreachable { .. }), "{e:?}");
    assert_eq!(e.to_string(), "GET /patroni on pg9: agent not reachable");
    assert!(std::error::Error::source(&e).is_some());
    let e = client.patroni("nobody").await.unwrap_err();
    assert!(matches!(e, AgentError::UnknownMember { .. }), "{e}");
}

#[tokio::test]
async fn the_agent_client_patches_the_config_with_if_match_and_names_a_conflict() {
    use pgherd::inventory::Secret;
    use pgherd::provision::agent_client::{AgentClient, AgentError};
    let view = three_node_view();
    let h = harness(primary_status(&view), view, client_creds(), healthy_probe());
    let base = serve(h.app.clone()).await;
    let client = AgentClient::new(
        vec![("pg0".into(), base.clone())],
        Some(("admin".into(), Secret::new("client_pw_7"))),
    );
    let live = client.config("pg0").await.unwrap();
    assert_eq!(live.revision, Some(7));
    assert_eq!(live.value["ttl"], 30);
    let mut patch = Map::new();
    patch.insert("loop_wait".into(), 5.into());
    // A stale revision: 412, told apart by its status.
    let e = client
        .patch_config("pg0", &patch, Some(6))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(412), "{e}");
    // The current one: written.
    client.patch_config("pg0", &patch, Some(7)).await.unwrap();
    assert_eq!(client.config("pg0").await.unwrap().value["loop_wait"], 5);
    // Without the password the agent refuses; the error carries its answer, never a secret.
    let anonymous = AgentClient::new(vec![("pg0".into(), base)], None);
    let e = anonymous
        .patch_config("pg0", &patch, None)
        .await
        .unwrap_err();
    assert!(matches!(e, AgentError::Refused { status: 401, .. }), "{e}");
    assert!(!format!("{e:?}{e}").contains("client_pw_7"));
    assert!(!format!("{client:?}").contains("client_pw_7"));
}

// ------------------------------------------------------------------ allowlist over TCP

/// Serves `state` with the peer address on every request (as the agent does); the base URL.
async fn serve_state(state: ApiState) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(pgherd::api::serve(l, state, std::future::pending()));
    format!("http://{addr}")
}

/// `POST /reload` from the loopback address `from` (127.0.0.0/8 is all local).
async fn reload_from(base: &str, from: &str, auth: Option<(&str, &str)>) -> u16 {
    let c = reqwest::Client::builder()
        .local_address(from.parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    let mut r = c.post(format!("{base}/reload"));
    if let Some((u, p)) = auth {
        r = r.basic_auth(u, Some(p));
    }
    r.send().await.unwrap().status().as_u16()
}

fn state_for(
    view: &ClusterView,
    auth: Option<Credentials>,
) -> (ApiState, watch::Sender<AgentStatus>) {
    let (tx, rx) = watch::channel(primary_status(view));
    let (ctx, mut crx) = mpsc::channel::<Command>(16);
    tokio::spawn(async move {
        while let Some(c) = crx.recv().await {
            if let Command::Reload { reply } = c {
                let _ = reply.send(CommandReply::new(202, "reload scheduled"));
            }
        }
    });
    let st = ApiState::new(rx, MemDcs::with(view.clone()), ctx, auth, "batman", "pg0");
    (st, tx)
}

#[tokio::test]
async fn an_address_outside_the_allowlist_gets_403_before_its_credentials_are_checked() {
    use pgherd::config::access::AccessList;
    let view = three_node_view();
    let (st, _tx) = state_for(&view, client_creds());
    let handle = st.access_handle();
    let st = st.with_access(AccessList::parse(&["127.0.0.2/32".into()], false).unwrap());
    let base = serve_state(st).await;
    let good = Some(("admin", "client_pw_7"));
    assert_eq!(reload_from(&base, "127.0.0.2", good).await, 202);
    // Wrong credentials from the allowed address: the auth check still runs.
    assert_eq!(
        reload_from(&base, "127.0.0.2", Some(("admin", "x"))).await,
        401
    );
    // Outside the list: 403 with or without the right password.
    assert_eq!(reload_from(&base, "127.0.0.3", good).await, 403);
    assert_eq!(reload_from(&base, "127.0.0.3", None).await, 403);
    // Reads stay open to everyone (HAProxy checks, monitoring).
    let c = reqwest::Client::builder()
        .local_address("127.0.0.3".parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    let r = c.get(format!("{base}/primary")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // A reloaded allowlist takes effect on the next request.
    *handle.write().unwrap() = AccessList::parse(&["127.0.0.3".into()], false).unwrap();
    assert_eq!(reload_from(&base, "127.0.0.3", good).await, 202);
    assert_eq!(reload_from(&base, "127.0.0.2", good).await, 403);
}

#[tokio::test]
async fn allowlist_include_members_admits_the_hosts_registered_in_the_dcs() {
    use pgherd::config::access::AccessList;
    let mut view = three_node_view();
    // pg2 registered from 127.0.0.4 (its api_url's host).
    view.members
        .get_mut(&MemberName::new("pg2"))
        .unwrap()
        .data
        .api_url = "http://127.0.0.4:8008/patroni".into();
    let (st, _tx) = state_for(&view, None);
    let st = st.with_access(AccessList::parse(&[], true).unwrap());
    let base = serve_state(st).await;
    assert_eq!(reload_from(&base, "127.0.0.4", None).await, 202);
    assert_eq!(reload_from(&base, "127.0.0.5", None).await, 403);
}
