//! End-to-end tests of the real `HaLoop` executor over the in-memory fakes (MemoryDcs,
//! FakePostgres, RecordingHooks, FakeWatchdog) under paused tokio time: bootstrap, failover
//! after a crash, demotion before lease expiry on a DCS partition, switchover, commands.
//! (The randomized multi-agent simulation lives in tests/ha_sim.rs.)

use std::sync::Arc;
use std::time::Duration;

use pgherd::config::AgentConfig;
use pgherd::dcs::memory::MemoryStore;
use pgherd::dcs::{Dcs, Failover};
use pgherd::ha::HaLoop;
use pgherd::peers::StatusPeerProbe;
use pgherd::pg::fake::{FakePgNetwork, FakePostgres};
use pgherd::status::{AgentStatus, Command, RestartRequest};
use pgherd::testing::{FakeWatchdog, RecordingHooks};
use pgherd::types::MemberName;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const TTL: u64 = 30;
const LOOP_WAIT: u64 = 10;
const RETRY: u64 = 10;

fn config_with(name: &str, idx: u16, extra_dcs: &str) -> AgentConfig {
    let yaml = format!(
        r#"
scope: batman
name: {name}
restapi:
  listen: 127.0.0.1:{api}
  connect_address: 127.0.0.1:{api}
etcd3:
  hosts: [127.0.0.1:2379]
bootstrap:
  dcs:
    ttl: {TTL}
    loop_wait: {LOOP_WAIT}
    retry_timeout: {RETRY}
    maximum_lag_on_failover: 1048576
{extra_dcs}
postgresql:
  listen: 127.0.0.1:{pg}
  connect_address: 127.0.0.1:{pg}
  data_dir: /tmp/fake/{name}
  authentication:
    superuser: {{username: postgres, password: secret}}
    replication: {{username: replicator, password: secret}}
watchdog:
  mode: off
"#,
        api = 18000 + idx,
        pg = 15400 + idx,
    );
    AgentConfig::parse(&yaml, "test").expect("valid test config")
}

struct Node {
    name: String,
    pg: FakePostgres,
    status: watch::Receiver<AgentStatus>,
    cmd: mpsc::Sender<Command>,
    hooks: RecordingHooks,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

struct Cluster {
    store: MemoryStore,
    net: FakePgNetwork,
    probe: StatusPeerProbe,
    nodes: Vec<Node>,
    replicator: JoinHandle<()>,
}

impl Cluster {
    async fn start(n: usize) -> Cluster {
        Cluster::start_with(n, "").await
    }

    async fn start_with(n: usize, extra_dcs: &str) -> Cluster {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .with_test_writer()
            .try_init();
        let store = MemoryStore::new(Duration::from_secs(RETRY));
        let net = FakePgNetwork::new();
        let probe = StatusPeerProbe::new();
        // Streaming: replicas catch up every 100 ms of simulated time.
        let net2 = net.clone();
        let replicator = tokio::spawn(async move {
            loop {
                net2.replicate();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let mut c = Cluster {
            store,
            net,
            probe,
            nodes: Vec::new(),
            replicator,
        };
        for i in 1..=n {
            c.spawn(&format!("n{i}"), i as u16, extra_dcs);
        }
        c
    }

    fn spawn(&mut self, name: &str, idx: u16, extra_dcs: &str) {
        let cfg = config_with(name, idx, extra_dcs);
        let pg = self.net.add_node(name, "127.0.0.1", 15400 + idx);
        let (tx, rx) = watch::channel(HaLoop::initial_status(&cfg));
        let (ctx, crx) = mpsc::channel(8);
        let hooks = RecordingHooks::new();
        self.probe.register(MemberName::from(name), rx.clone());
        let ha = HaLoop::new(
            cfg,
            Arc::new(self.store.handle(name)),
            Arc::new(pg.clone()),
            Arc::new(hooks.clone()),
            Box::new(FakeWatchdog::new()),
            Arc::new(self.probe.clone()),
            tx,
            crx,
        );
        let cancel = CancellationToken::new();
        let task = tokio::spawn(ha.run(cancel.clone()));
        self.nodes.push(Node {
            name: name.into(),
            pg,
            status: rx,
            cmd: ctx,
            hooks,
            cancel,
            task,
        });
    }

    fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|n| n.name == name).expect("node")
    }

    fn leader(&self) -> Option<String> {
        self.store.leader().map(|(n, _)| n.to_string())
    }

    async fn shutdown(self) {
        for n in &self.nodes {
            n.cancel.cancel();
        }
        for n in self.nodes {
            let _ = n.task.await;
        }
        self.replicator.abort();
    }
}

async fn advance(secs: u64) {
    tokio::time::sleep(Duration::from_secs(secs)).await;
}

/// Waits (in simulated time, 1 s steps) until `f` holds; panics after `limit` seconds.
async fn eventually(limit: u64, what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..limit {
        if f() {
            return;
        }
        advance(1).await;
    }
    assert!(f(), "timed out waiting for: {what}");
}

#[tokio::test(start_paused = true)]
async fn three_nodes_bootstrap_into_one_primary_and_two_replicas() {
    let c = Cluster::start(3).await;
    eventually(120, "one leader and two streaming replicas", || {
        let w = c.net.writable();
        w.len() == 1
            && c.leader().as_deref() == Some(w[0].as_str())
            && c.nodes.iter().filter(|n| n.pg.is_streaming()).count() == 2
    })
    .await;
    let leader = c.leader().unwrap();
    let view = c.store.view();
    assert_eq!(
        view.initialize.as_deref(),
        c.node(&leader).pg.sysid().as_deref()
    );
    assert!(view.config.is_some(), "leader publishes the config key");
    assert_eq!(view.members.len(), 3);
    let st = c.node(&leader).status.borrow().clone();
    assert_eq!(
        st.last_decision,
        format!("no action. I am ({leader}), the leader with the lock")
    );
    // Member slots exist for both replicas on the primary.
    advance(LOOP_WAIT + 1).await;
    let mut slots = c.node(&leader).pg.slots();
    slots.sort();
    let mut want: Vec<String> = c
        .nodes
        .iter()
        .filter(|n| n.name != leader)
        .map(|n| n.name.clone())
        .collect();
    want.sort();
    assert_eq!(slots, want);
    c.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn replica_is_promoted_when_the_primary_host_dies() {
    let c = Cluster::start(3).await;
    eventually(120, "bootstrap", || {
        c.leader().is_some() && c.nodes.iter().filter(|n| n.pg.is_streaming()).count() == 2
    })
    .await;
    let old = c.leader().unwrap();
    let n = c.node(&old);
    // Host death: the agent stops without cleanup and PostgreSQL dies with it.
    n.task.abort();
    n.pg.crash();
    c.probe
        .set_reachable(&MemberName::from(old.as_str()), false);
    eventually(TTL + 3 * LOOP_WAIT, "a new leader", || {
        c.leader().is_some_and(|l| l != old) && c.net.writable().len() == 1
    })
    .await;
    let new = c.leader().unwrap();
    assert_eq!(c.net.writable(), vec![new.clone()]);
    let d = c.node(&new).status.borrow().last_decision.clone();
    assert!(d.contains("leader"), "{d}");
    c.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn partitioned_leader_demotes_before_its_lease_expires() {
    let c = Cluster::start(3).await;
    eventually(120, "bootstrap", || {
        c.leader().is_some() && c.nodes.iter().filter(|n| n.pg.is_streaming()).count() == 2
    })
    .await;
    let old = c.leader().unwrap();
    c.store.set_partitioned(&old, true);
    // Every 100 ms: as long as the old leader's PostgreSQL is writable, its lease must be
    // alive in the DCS clock (otherwise another node could already have promoted).
    for _ in 0..((TTL + 3 * LOOP_WAIT) * 10) {
        if c.node(&old).pg.is_writable() {
            assert!(
                c.store.has_live_lease(&old),
                "writable primary outlived its lease"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !c.node(&old).pg.is_writable(),
        "partitioned leader must have demoted"
    );
    assert!(
        c.leader().is_some_and(|l| l != old),
        "another node took over"
    );
    assert_eq!(c.net.writable().len(), 1);
    c.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn leader_rides_out_a_dcs_outage_longer_than_retry_timeout_but_shorter_than_its_lease() {
    let c = Cluster::start(3).await;
    eventually(120, "bootstrap", || {
        c.leader().is_some() && c.nodes.iter().filter(|n| n.pg.is_streaming()).count() == 2
    })
    .await;
    let old = c.leader().unwrap();
    let stops = |c: &Cluster| {
        c.node(&old)
            .pg
            .calls()
            .iter()
            .filter(|call| call.starts_with("stop"))
            .count()
    };
    let stops_before = stops(&c);
    // Start the outage just before the leader's next renewal (the lease says when the last
    // one was sent), so that renewal fails after the whole retry_timeout — where Patroni
    // demotes — and the outage ends while the leader retries.
    let sent = c.store.last_lease_of(&old).unwrap().expires_at - Duration::from_secs(TTL);
    let next = sent + Duration::from_secs(LOOP_WAIT);
    tokio::time::sleep_until(next - Duration::from_millis(500)).await;
    c.store.set_partitioned(&old, true);
    let heal = next + Duration::from_secs(RETRY) - Duration::from_secs(4);
    tokio::time::sleep_until(heal).await;
    c.store.set_partitioned(&old, false);
    for _ in 0..(TTL * 10) {
        assert_eq!(c.leader().as_ref(), Some(&old), "leadership moved");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // PostgreSQL was never stopped (a demotion and re-promotion can fall within one instant
    // of paused time, so writability alone would not show it), and the renewal that failed
    // during the outage was retried and succeeded after the first attempt gave up.
    assert_eq!(
        stops(&c),
        stops_before,
        "the leader's PostgreSQL was stopped"
    );
    assert!(c.node(&old).pg.is_writable());
    let expires = c.store.last_lease_of(&old).unwrap().expires_at;
    assert!(
        expires > next + Duration::from_secs(RETRY + TTL),
        "lease not renewed"
    );
    assert_eq!(c.net.writable(), vec![old]);
    c.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn switchover_via_failover_key_moves_the_leader_to_the_candidate() {
    let c = Cluster::start(3).await;
    eventually(120, "bootstrap", || {
        c.leader().is_some() && c.nodes.iter().filter(|n| n.pg.is_streaming()).count() == 2
    })
    .await;
    let old = c.leader().unwrap();
    let cand = c.nodes.iter().find(|n| n.name != old).unwrap().name.clone();
    let f = Failover {
        leader: Some(old.clone()),
        member: Some(cand.clone()),
        scheduled_at: None,
    };
    c.store.put("failover", &serde_json::to_string(&f).unwrap());
    eventually(4 * LOOP_WAIT, "candidate leads", || {
        c.leader().as_deref() == Some(cand.as_str()) && c.net.writable() == vec![cand.clone()]
    })
    .await;
    eventually(4 * LOOP_WAIT, "old leader follows", || {
        c.node(&old).pg.is_streaming()
    })
    .await;
    assert!(
        c.store.view().failover_request().is_none(),
        "failover key cleared"
    );
    c.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn restart_command_is_answered_after_the_restart() {
    let c = Cluster::start(2).await;
    eventually(120, "bootstrap", || {
        c.leader().is_some() && c.nodes.iter().filter(|n| n.pg.is_streaming()).count() == 1
    })
    .await;
    let replica = c
        .nodes
        .iter()
        .find(|n| Some(&n.name) != c.leader().as_ref())
        .unwrap();
    let (tx, rx) = oneshot::channel();
    replica
        .cmd
        .send(Command::Restart {
            req: RestartRequest::default(),
            reply: tx,
        })
        .await
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(60), rx)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (reply.code, reply.body.as_str()),
        (200, "restarted successfully")
    );
    // Reinitializing the leader is refused with Patroni's message.
    let leader = c.node(&c.leader().unwrap());
    let (tx, rx) = oneshot::channel();
    leader
        .cmd
        .send(Command::Reinitialize {
            force: false,
            from_leader: false,
            reply: tx,
        })
        .await
        .unwrap();
    let reply = rx.await.unwrap();
    assert_eq!(
        (reply.code, reply.body.as_str()),
        (503, "I am the leader, can not reinitialize")
    );
    assert!(!replica.hooks.events().is_empty());
    c.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn graceful_shutdown_of_the_leader_hands_over() {
    let c = Cluster::start(3).await;
    eventually(120, "bootstrap", || {
        c.leader().is_some() && c.nodes.iter().filter(|n| n.pg.is_streaming()).count() == 2
    })
    .await;
    let old = c.leader().unwrap();
    c.node(&old).cancel.cancel();
    eventually(3 * LOOP_WAIT, "new leader after graceful stop", || {
        c.leader().is_some_and(|l| l != old) && c.net.writable().len() == 1
    })
    .await;
    assert!(!c.node(&old).pg.is_running());
    c.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn dcs_writes_through_the_trait_are_seen_by_the_loop() {
    // PATCH /config {"pause": true} path: the loop stops automatic actions.
    let c = Cluster::start(2).await;
    eventually(120, "bootstrap", || {
        c.leader().is_some() && c.nodes.iter().filter(|n| n.pg.is_streaming()).count() == 1
    })
    .await;
    let h = c.store.handle("operator");
    let (cfg, rev) = c.store.view().config.unwrap();
    let paused = cfg.patched(serde_json::json!({"pause": true}).as_object().unwrap());
    assert!(h.set_config(&paused, Some(rev)).await.unwrap());
    let old = c.leader().unwrap();
    advance(2 * LOOP_WAIT).await;
    // Paused: a crashed primary is not restarted and nobody is promoted.
    c.node(&old).pg.crash();
    advance(TTL + 2 * LOOP_WAIT).await;
    assert!(
        c.net.writable().is_empty(),
        "no automatic promotion while paused"
    );
    let st = c.node(&old).status.borrow().clone();
    assert!(st.paused);
    c.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn sync_mode_sets_ssn_before_publishing_the_sync_standby() {
    let c = Cluster::start_with(3, "    synchronous_mode: true").await;
    eventually(120, "a published sync standby", || {
        c.store
            .view()
            .sync_state()
            .is_some_and(|s| !s.standbys().is_empty())
    })
    .await;
    let leader = c.leader().unwrap();
    let s = c.store.view().sync_state().cloned().unwrap();
    assert_eq!(s.leader.as_deref(), Some(leader.as_str()));
    let standby = s.standbys()[0].clone();
    // PostgreSQL already waits for the published standby.
    assert_eq!(c.node(&leader).pg.synchronous_standby_names(), standby);
    // Kill the leader's host: only the sync standby may take over.
    let n = c.node(&leader);
    n.task.abort();
    n.pg.crash();
    c.probe
        .set_reachable(&MemberName::from(leader.as_str()), false);
    eventually(TTL + 3 * LOOP_WAIT, "the sync standby leads", || {
        c.leader().as_deref() == Some(standby.as_str())
    })
    .await;
    c.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_failing_bootstrap_reports_its_cause_until_a_bootstrap_succeeds() {
    let c = Cluster::start(1).await;
    let n = c.node("n1");
    n.pg.set_faults(pgherd::pg::fake::FakeFaults {
        fail_initdb: true,
        ..Default::default()
    });
    let status = n.status.clone();
    eventually(120, "the bootstrap error in the status", || {
        status
            .borrow()
            .pgherd
            .bootstrap_error
            .as_deref()
            .is_some_and(|e| e.contains("initdb") && e.contains("simulated failure"))
    })
    .await;
    assert!(c.leader().is_none());
    n.pg.set_faults(Default::default());
    eventually(120, "a leader, and the error gone", || {
        c.leader().as_deref() == Some("n1") && status.borrow().pgherd.bootstrap_error.is_none()
    })
    .await;
    c.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_failing_clone_reports_its_cause_until_a_clone_succeeds() {
    let c = Cluster::start(2).await;
    eventually(120, "a leader", || c.leader().is_some()).await;
    let leader = c.leader().unwrap();
    let replica = if leader == "n1" { "n2" } else { "n1" };
    let n = c.node(replica);
    // Wipe the replica and make its clones fail: it retries, and says why.
    n.pg.set_faults(pgherd::pg::fake::FakeFaults {
        fail_basebackup: true,
        ..Default::default()
    });
    n.pg.crash();
    pgherd::pg::Postgres::wipe_data_dir(&n.pg).await.unwrap();
    let status = n.status.clone();
    eventually(120, "the clone error in the status", || {
        status
            .borrow()
            .pgherd
            .clone_error
            .as_deref()
            .is_some_and(|e| e.contains("simulated failure"))
    })
    .await;
    n.pg.set_faults(Default::default());
    eventually(120, "the replica cloned, and the error gone", || {
        status.borrow().pgherd.clone_error.is_none() && status.borrow().pg.running
    })
    .await;
    c.shutdown().await;
}
