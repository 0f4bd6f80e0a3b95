//! Multi-agent simulation of the HA loop: several real [`HaLoop`]s over ONE in-memory DCS
//! ([`MemoryStore`]) and per-node fake PostgreSQL instances ([`FakePgNetwork`]), under paused
//! tokio time, driven by seeded random event sequences (agent crashes and restarts, PostgreSQL
//! crashes, DCS partitions, clock advances, writes, replication stalls, switchovers).
//!
//! After every event (and every half second of simulated time while the clock runs) the named
//! safety invariants are checked:
//!
//! - `at_most_one_leader_key_holder`: at most one live agent believes it holds the leader lock,
//!   and a believer is never contradicted by the DCS (the key names nobody else);
//! - `no_two_writable_primaries_that_both_think_they_lead`;
//! - `at_most_one_writable_primary`: stronger, holds thanks to the demotion deadline and the
//!   watchdog (a crashed agent's primary is reset before its lease can lapse);
//! - `primary_whose_lease_lapsed_is_demoted`: a writable primary's agent holds an unexpired
//!   lease in the DCS clock; the demotion of a node that lost the DCS must complete strictly
//!   inside the lease TTL (this is `demoted_before_ttl_when_dcs_unreachable`);
//! - `no_promotion_beyond_max_lag`: a promoted node was within `maximum_lag_on_failover` of the
//!   leader's last published optime (manual switchover candidates are exempt, as in Patroni);
//! - `acknowledged_commits_survive_promotion` (the sequences run in synchronous mode, a third
//!   of the seeds): every commit PostgreSQL acknowledged that was written while `/sync` named
//!   its primary as the leader (synchronous mode active on it) is held by every node promoted
//!   after the acknowledgement — on its timeline branch, up to its LSN. The fake PostgreSQL
//!   models synchronous commit (a commit waits for the standbys `synchronous_standby_names`
//!   requires), so this is the guarantee synchronous mode exists for: no acknowledged commit
//!   is lost by a failover or switchover.
//!
//! A failing run prints its seed and the event log; `SIM_SEED=<n> cargo test --test ha_sim
//! replay_one_seed -- --nocapture` replays one sequence with the log printed.
//!
//! Hand-written scenarios at the end pin the headline behaviours.
//!
//! Why one file: the harness (`Sim`), its invariants, the random driver and the scenarios all
//! work on the one `Sim` state; an integration test binary is one file unless it shares
//! helpers through `tests/common`, which the other suites would then compile too.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use pgherd::config::AgentConfig;
use pgherd::dcs::memory::{KEY_FAILOVER, MemoryDcs, MemoryStore};
use pgherd::dcs::{
    ClusterView, Dcs, DcsError, DynamicConfig, Failover, HistoryLine, MemberData, Status, SyncState,
};
use pgherd::ha::HaLoop;
use pgherd::peers::StatusPeerProbe;
use pgherd::pg::fake::{AckedCommit, FakePgNetwork, FakePostgres, FakeRole, PromotionRecord};
use pgherd::status::{AgentStatus, Command};
use pgherd::testing::{FakeWatchdog, RecordingHooks};
use pgherd::types::MemberName;
use pgherd::types::{LeaseId, Revision};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Patroni's default timing triple: loop_wait + 2·retry_timeout ≤ ttl.
const TTL: u64 = 30;
const LOOP_WAIT: u64 = 10;
const RETRY: u64 = 10;
const MAX_LAG: u64 = 1_048_576;
/// Streaming: every `REPL_TICK` each non-stalled replica receives up to `REPL_CHUNK` bytes.
const REPL_TICK: Duration = Duration::from_millis(250);
const REPL_CHUNK: u64 = 512 * 1024;
/// Invariants are checked at this granularity while the clock advances.
const CHECK_STEP: Duration = Duration::from_millis(500);
/// Ports: PostgreSQL 25400+i, REST 28000+i (never bound: everything is in memory).
const PG_PORT_BASE: u16 = 25400;
const API_PORT_BASE: u16 = 28000;

/// A [`Dcs`] proxy that detects a livelocked agent: one that keeps calling the DCS without
/// simulated time ever advancing (under paused time such a loop would hang the test forever;
/// in production it is a hot loop hammering etcd). It records the agent and panics inside the
/// agent's task, which ends that task so the harness can report it.
struct SpinGuard {
    inner: MemoryDcs,
    name: String,
    state: Mutex<(Instant, u32)>,
    livelocked: Arc<Mutex<BTreeSet<String>>>,
}

/// DCS calls allowed at one simulated instant before the agent counts as livelocked.
const SPIN_LIMIT: u32 = 5_000;

impl SpinGuard {
    fn tick(&self) {
        let now = Instant::now();
        let mut st = self.state.lock().unwrap();
        if st.0 == now {
            st.1 += 1;
            if st.1 > SPIN_LIMIT {
                self.livelocked.lock().unwrap().insert(self.name.clone());
                panic!(
                    "{}: livelock: {SPIN_LIMIT} DCS calls without time advancing",
                    self.name
                );
            }
        } else {
            *st = (now, 0);
        }
    }
}

#[async_trait]
impl Dcs for SpinGuard {
    async fn load(&self) -> Result<ClusterView, DcsError> {
        self.tick();
        self.inner.load().await
    }
    async fn ensure_lease(&self, ttl: Duration) -> Result<LeaseId, DcsError> {
        self.tick();
        self.inner.ensure_lease(ttl).await
    }
    async fn keepalive(&self) -> Result<(), DcsError> {
        self.tick();
        self.inner.keepalive().await
    }
    async fn touch_member(&self, name: &MemberName, data: &MemberData) -> Result<(), DcsError> {
        self.tick();
        self.inner.touch_member(name, data).await
    }
    async fn acquire_leader(&self, name: &MemberName) -> Result<bool, DcsError> {
        self.tick();
        self.inner.acquire_leader(name).await
    }
    async fn update_leader(&self, name: &MemberName) -> Result<bool, DcsError> {
        self.tick();
        self.inner.update_leader(name).await
    }
    async fn take_leader(&self, name: &MemberName) -> Result<(), DcsError> {
        self.tick();
        self.inner.take_leader(name).await
    }
    async fn release_leader(&self, name: &MemberName) -> Result<bool, DcsError> {
        self.tick();
        self.inner.release_leader(name).await
    }
    async fn race_initialize(&self) -> Result<bool, DcsError> {
        self.tick();
        self.inner.race_initialize().await
    }
    async fn set_initialize(&self, sysid: &str) -> Result<(), DcsError> {
        self.tick();
        self.inner.set_initialize(sysid).await
    }
    async fn delete_initialize(&self) -> Result<(), DcsError> {
        self.tick();
        self.inner.delete_initialize().await
    }
    async fn set_config(&self, c: &DynamicConfig, e: Option<Revision>) -> Result<bool, DcsError> {
        self.tick();
        self.inner.set_config(c, e).await
    }
    async fn set_failover(&self, f: &Failover, e: Option<Revision>) -> Result<bool, DcsError> {
        self.tick();
        self.inner.set_failover(f, e).await
    }
    async fn set_sync(&self, s: Option<&SyncState>, e: Option<Revision>) -> Result<bool, DcsError> {
        self.tick();
        self.inner.set_sync(s, e).await
    }
    async fn set_status(&self, status: &Status) -> Result<(), DcsError> {
        self.tick();
        self.inner.set_status(status).await
    }
    async fn set_history(&self, history: &[HistoryLine]) -> Result<(), DcsError> {
        self.tick();
        self.inner.set_history(history).await
    }
    async fn set_failsafe(
        &self,
        members: &std::collections::BTreeMap<MemberName, String>,
    ) -> Result<(), DcsError> {
        self.tick();
        self.inner.set_failsafe(members).await
    }
    async fn delete_cluster(&self) -> Result<(), DcsError> {
        self.tick();
        self.inner.delete_cluster().await
    }
    async fn wait_for_change(&self, after_revision: i64, timeout: Duration) -> bool {
        self.tick();
        self.inner.wait_for_change(after_revision, timeout).await
    }
}

fn agent_config(name: &str, idx: u16, sync_mode: bool) -> AgentConfig {
    let sync = if sync_mode {
        "\n    synchronous_mode: true"
    } else {
        ""
    };
    let yaml = format!(
        r#"
scope: sim
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
    maximum_lag_on_failover: {MAX_LAG}{sync}
postgresql:
  listen: 127.0.0.1:{pg}
  connect_address: 127.0.0.1:{pg}
  data_dir: /nonexistent/sim/{name}
  authentication:
    superuser: {{username: postgres, password: simsecret}}
    replication: {{username: replicator, password: simsecret}}
watchdog:
  mode: automatic
  safety_margin: 5
"#,
        api = API_PORT_BASE + idx,
        pg = PG_PORT_BASE + idx,
    );
    AgentConfig::parse(&yaml, "sim").expect("valid sim config")
}

/// One simulated host: its PostgreSQL, its watchdog device, and (when running) its agent.
struct Host {
    name: String,
    idx: u16,
    pg: FakePostgres,
    /// The harness's handle on the device (never opened by the harness).
    watchdog: FakeWatchdog,
    enforcer: JoinHandle<()>,
    agent: Option<Agent>,
    hooks: RecordingHooks,
}

struct Agent {
    status: watch::Receiver<AgentStatus>,
    _commands: mpsc::Sender<Command>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// The whole simulated cluster plus the event log.
struct Sim {
    seed: u64,
    store: MemoryStore,
    net: FakePgNetwork,
    probe: StatusPeerProbe,
    hosts: Vec<Host>,
    stalled: Arc<Mutex<BTreeSet<String>>>,
    replicator: JoinHandle<()>,
    start: Instant,
    log: Vec<String>,
    last_decisions: BTreeMap<String, String>,
    promotions_checked: usize,
    /// Switchover candidates and when they were requested (exempt from the lag invariant, as
    /// Patroni's manual failover skips the lag check).
    manual_candidates: Vec<(String, Instant)>,
    /// Count of checks done, for the report.
    checks: u64,
    /// Result of the final healing phase (a liveness property, reported separately).
    converged: bool,
    /// Print log lines as they happen (replay mode).
    live: bool,
    /// Agents the [`SpinGuard`] caught in a livelock.
    livelocked: Arc<Mutex<BTreeSet<String>>>,
    /// The cluster runs in synchronous mode (`synchronous_mode: true` from the bootstrap).
    sync_mode: bool,
    /// Commits written while `/sync` named their primary as the leader: (member, LSN). Once
    /// acknowledged they must survive every later promotion.
    sync_writes: BTreeSet<(String, u64)>,
}

/// Convergence after healing is a liveness property. Every sequence converges since
/// promotions take a timeline number above every one the cluster used (two sibling timelines
/// with one number made the losing branch unable to rejoin), so it is fatal by default;
/// `SIM_STRICT_LIVENESS=0` only reports non-converging seeds (while investigating one).
fn strict_liveness() -> bool {
    std::env::var("SIM_STRICT_LIVENESS").map_or(true, |v| v != "0")
}

impl Sim {
    fn new(seed: u64, n: usize) -> Sim {
        Sim::with_mode(seed, n, false)
    }

    fn with_mode(seed: u64, n: usize, sync_mode: bool) -> Sim {
        let store = MemoryStore::new(Duration::from_secs(RETRY));
        let net = FakePgNetwork::new();
        let stalled: Arc<Mutex<BTreeSet<String>>> = Arc::default();
        let (net2, stalled2) = (net.clone(), stalled.clone());
        let replicator = tokio::spawn(async move {
            loop {
                tokio::time::sleep(REPL_TICK).await;
                let stalled = stalled2.lock().unwrap().clone();
                for m in net2.members() {
                    if !stalled.contains(&m) {
                        net2.replicate_node(&m, REPL_CHUNK);
                    }
                }
            }
        });
        let mut sim = Sim {
            seed,
            store,
            net,
            probe: StatusPeerProbe::new(),
            hosts: Vec::new(),
            stalled,
            replicator,
            start: Instant::now(),
            log: Vec::new(),
            last_decisions: BTreeMap::new(),
            promotions_checked: 0,
            manual_candidates: Vec::new(),
            checks: 0,
            converged: true,
            live: false,
            livelocked: Arc::default(),
            sync_mode,
            sync_writes: BTreeSet::new(),
        };
        for i in 1..=n {
            let name = format!("n{i}");
            let pg = sim
                .net
                .add_node(&name, "127.0.0.1", PG_PORT_BASE + i as u16);
            let watchdog = FakeWatchdog::new();
            // The watchdog "resets the host": PostgreSQL dies on the spot.
            let pg2 = pg.clone();
            let enforcer = watchdog.spawn_enforcer(move || pg2.crash());
            sim.hosts.push(Host {
                name,
                idx: i as u16,
                pg,
                watchdog,
                enforcer,
                agent: None,
                hooks: RecordingHooks::new(),
            });
        }
        for i in 0..n {
            sim.start_agent(i);
        }
        sim
    }

    fn now_s(&self) -> f64 {
        (Instant::now() - self.start).as_secs_f64()
    }

    fn note(&mut self, msg: impl AsRef<str>) {
        let line = format!("t={:>8.1}s {}", self.now_s(), msg.as_ref());
        if self.live {
            println!("{line}");
        }
        self.log.push(line);
    }

    fn host(&self, name: &str) -> usize {
        self.hosts
            .iter()
            .position(|h| h.name == name)
            .expect("known host")
    }

    fn start_agent(&mut self, i: usize) {
        let h = &mut self.hosts[i];
        if h.agent.is_some() {
            return;
        }
        let cfg = agent_config(&h.name, h.idx, self.sync_mode);
        let (tx, rx) = watch::channel(HaLoop::initial_status(&cfg));
        let (ctx, crx) = mpsc::channel(8);
        self.probe
            .register(MemberName::new(h.name.clone()), rx.clone());
        let ha = HaLoop::new(
            cfg,
            Arc::new(SpinGuard {
                inner: self.store.handle(h.name.clone()),
                name: h.name.clone(),
                state: Mutex::new((Instant::now(), 0)),
                livelocked: self.livelocked.clone(),
            }),
            Arc::new(h.pg.clone()),
            Arc::new(h.hooks.clone()),
            // A fresh fd on the host's device: a restarted agent must open it again.
            Box::new(h.watchdog.clone()),
            Arc::new(self.probe.clone()),
            tx,
            crx,
        );
        let cancel = CancellationToken::new();
        // spawn_local: the loop's future is not required to be Send (its watchdog box is not
        // Sync), and a LocalSet on a current-thread runtime keeps the simulation deterministic.
        let task = tokio::task::spawn_local(ha.run(cancel.clone()));
        h.agent = Some(Agent {
            status: rx,
            _commands: ctx,
            cancel,
            task,
        });
        let name = h.name.clone();
        self.note(format!("{name}: agent started"));
    }

    /// Kills the agent abruptly (no shutdown path: the process is gone).
    fn crash_agent(&mut self, i: usize, pg_dies: bool) {
        let h = &mut self.hosts[i];
        let Some(a) = h.agent.take() else { return };
        a.task.abort();
        self.probe
            .set_reachable(&MemberName::new(h.name.clone()), false);
        if pg_dies {
            h.pg.crash();
        }
        let name = h.name.clone();
        self.note(format!(
            "{name}: agent crashed ({})",
            if pg_dies {
                "postgres died too"
            } else {
                "postgres keeps running"
            }
        ));
    }

    /// Graceful agent stop (SIGTERM): the loop runs its shutdown path to the end.
    async fn stop_agent(&mut self, i: usize) {
        let Some(a) = self.hosts[i].agent.take() else {
            return;
        };
        a.cancel.cancel();
        let name = self.hosts[i].name.clone();
        self.note(format!("{name}: agent stopping gracefully"));
        // The shutdown path may have to wait out DCS timeouts; keep checking meanwhile.
        let mut task = a.task;
        loop {
            tokio::select! {
                _ = &mut task => break,
                _ = tokio::time::sleep(CHECK_STEP) => self.check(),
            }
        }
        self.probe
            .set_reachable(&MemberName::new(name.clone()), false);
        self.note(format!("{name}: agent stopped"));
        self.check();
    }

    /// Lets simulated time run for `d`, checking the invariants every [`CHECK_STEP`].
    async fn advance(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            let step = CHECK_STEP.min(end - Instant::now());
            tokio::time::sleep(step).await;
            self.check();
        }
    }

    fn leader_name(&self) -> Option<String> {
        self.store.leader().map(|(n, _)| n.0)
    }

    /// Snapshot line of the cluster for the log.
    fn describe(&self) -> String {
        let mut s = format!("leader={:?}", self.leader_name());
        for h in &self.hosts {
            let _ = write!(
                s,
                " | {}: {:?} lsn={} tl={:?}{}{}{}",
                h.name,
                h.pg.role(),
                h.pg.lsn(),
                h.pg.timeline().map(|t| t.0),
                match h.pg.waiting_commits().len() {
                    0 => String::new(),
                    n => format!(" {n} commits waiting for sync standbys"),
                },
                if h.agent.is_none() { " agent-down" } else { "" },
                if self.store.is_partitioned(&h.name) {
                    " partitioned"
                } else {
                    ""
                },
            );
        }
        s
    }

    /// Tags a failure whose signature matches a known HA-core defect.
    fn known_defect(&self, invariant: &str) -> &'static str {
        if invariant == "no_livelock" {
            return KNOWN_LIVELOCK;
        }
        // A writable primary whose agent is down and whose watchdog is not armed: nobody can
        // fence it (the loop should have armed the device while it held the lock).
        let unfenced = self
            .hosts
            .iter()
            .any(|h| h.pg.is_writable() && h.agent.is_none() && h.watchdog.deadline().is_none());
        if unfenced && invariant != "scenario" {
            KNOWN_UNFENCED
        } else {
            ""
        }
    }

    fn fail(&self, invariant: &str, detail: String) -> ! {
        panic!(
            "\nSIMULATION FAILURE (seed {seed}): invariant `{invariant}` violated at t={t:.1}s \
             {known}\n  {detail}\n  state: {state}\n\nevent log (replay with \
             SIM_SEED={seed}):\n{log}\n",
            known = self.known_defect(invariant),
            seed = self.seed,
            t = self.now_s(),
            state = self.describe(),
            log = self.log.join("\n"),
        );
    }

    /// Every safety invariant, against the current state.
    fn check(&mut self) {
        self.checks += 1;
        let now = Instant::now();
        let now_std = now.into_std();
        // Record decision changes so a failure log tells the story.
        let mut changes = Vec::new();
        for h in &self.hosts {
            if let Some(a) = &h.agent {
                let d = a.status.borrow().last_decision.clone();
                if !d.is_empty() && self.last_decisions.get(&h.name) != Some(&d) {
                    changes.push((h.name.clone(), d));
                }
            }
        }
        for (n, d) in changes {
            self.note(format!("{n}: decision: {d}"));
            self.last_decisions.insert(n, d);
        }

        let spun = self.livelocked.lock().unwrap().clone();
        if !spun.is_empty() {
            self.fail(
                "no_livelock",
                format!("agents {spun:?} looped without simulated time advancing"),
            );
        }

        let key_holder = self.leader_name();
        let believers: Vec<&str> = self
            .hosts
            .iter()
            .filter(|h| {
                h.agent
                    .as_ref()
                    .is_some_and(|a| a.status.borrow().is_leader(now_std))
            })
            .map(|h| h.name.as_str())
            .collect();
        if believers.len() > 1 {
            self.fail(
                "at_most_one_leader_key_holder",
                format!("agents {believers:?} all believe they hold the leader lock"),
            );
        }
        if let (Some(b), Some(k)) = (believers.first(), &key_holder)
            && *b != k.as_str()
        {
            self.fail(
                "at_most_one_leader_key_holder",
                format!("{b} believes it holds the lock but the DCS leader key names {k}"),
            );
        }

        let writable: Vec<&str> = self
            .hosts
            .iter()
            .filter(|h| h.pg.is_writable())
            .map(|h| h.name.as_str())
            .collect();
        let writable_believers: Vec<&&str> =
            writable.iter().filter(|w| believers.contains(w)).collect();
        if writable_believers.len() > 1 {
            self.fail(
                "no_two_writable_primaries_that_both_think_they_lead",
                format!("{writable_believers:?}"),
            );
        }
        if writable.len() > 1 {
            self.fail(
                "at_most_one_writable_primary",
                format!("writable: {writable:?}"),
            );
        }

        for w in &writable {
            let lease = self.store.last_lease_of(w);
            let alive = lease.is_some_and(|l| l.expires_at > now);
            if !alive {
                let detail = match lease {
                    Some(l) => format!(
                        "{w} is a writable primary but its last lease expired {:.1}s ago",
                        (now - l.expires_at).as_secs_f64()
                    ),
                    None => format!("{w} is a writable primary but never held a lease"),
                };
                self.fail("primary_whose_lease_lapsed_is_demoted", detail);
            }
        }

        let promotions = self.net.promotions();
        let new: Vec<_> = promotions[self.promotions_checked..].to_vec();
        self.promotions_checked = promotions.len();
        for p in new {
            let optime = self.store.status_optime_at(p.at);
            self.note(format!(
                "{}: promoted at lsn {} to timeline {} (leader optime was {optime})",
                p.member, p.lsn, p.new_timeline
            ));
            let manual = self.manual_candidates.iter().any(|(c, at)| {
                *c == p.member && p.at >= *at && p.at - *at < Duration::from_secs(120)
            });
            if !manual && optime > p.lsn.0 + MAX_LAG {
                self.fail(
                    "no_promotion_beyond_max_lag",
                    format!(
                        "{} promoted at {} while the leader's last optime was {optime} ({} bytes \
                         behind, max {MAX_LAG})",
                        p.member,
                        p.lsn.0,
                        optime - p.lsn.0
                    ),
                );
            }
            if let Some(c) = self.lost_commit(&p) {
                self.fail(
                    "acknowledged_commits_survive_promotion",
                    format!(
                        "{} promoted at lsn {} (timeline {}) without the commit at lsn {} on \
                         timeline {} that {} acknowledged at t={:.1}s in synchronous mode",
                        p.member,
                        p.lsn,
                        p.new_timeline.0,
                        c.lsn,
                        c.timeline.0,
                        c.member,
                        (c.at - self.start).as_secs_f64()
                    ),
                );
            }
        }
    }

    /// The first commit acknowledged in synchronous mode before promotion `p` that the
    /// promoted node does not hold.
    fn lost_commit(&self, p: &PromotionRecord) -> Option<AckedCommit> {
        if !self.sync_mode {
            return None;
        }
        self.net.acked().into_iter().find(|c| {
            c.at <= p.at
                && self.sync_writes.contains(&(c.member.clone(), c.lsn.0))
                && !p.wal.holds(c)
        })
    }

    /// Writes `bytes` on every node that accepts them (only a writable primary does) and, in
    /// synchronous mode, remembers the commits written while `/sync` named their primary.
    fn write_everywhere(&mut self, bytes: u64) -> Vec<String> {
        let sync_leader = self
            .store
            .view()
            .sync_state()
            .and_then(|s| s.leader.clone());
        let mut ok = Vec::new();
        for h in &self.hosts {
            if h.pg.write(bytes) {
                ok.push(h.name.clone());
                if self.sync_mode && sync_leader.as_deref() == Some(h.name.as_str()) {
                    self.sync_writes.insert((h.name.clone(), h.pg.lsn().0));
                }
            }
        }
        ok
    }

    /// One random event, logged, followed by an invariant check.
    async fn random_event(&mut self, rng: &mut StdRng) {
        let n = self.hosts.len();
        let i = rng.random_range(0..n);
        let name = self.hosts[i].name.clone();
        match rng.random_range(0..100) {
            0..=29 => {
                let d = Duration::from_millis(rng.random_range(500..45_000));
                self.note(format!("advance clock {:.1}s", d.as_secs_f64()));
                self.advance(d).await;
            }
            30..=37 => {
                let pg_dies = rng.random_bool(0.5);
                self.crash_agent(i, pg_dies);
            }
            38..=49 => {
                // Restart the agent (crash first if it runs: the supervisor restarts it).
                if self.hosts[i].agent.is_some() {
                    self.crash_agent(i, false);
                }
                self.start_agent(i);
            }
            50..=55 => {
                self.note(format!("{name}: postgres crashed"));
                self.hosts[i].pg.crash();
            }
            56..=63 => {
                let cut = !self.store.is_partitioned(&name);
                self.note(format!(
                    "{name}: {}",
                    if cut {
                        "partitioned from the DCS"
                    } else {
                        "DCS link healed"
                    }
                ));
                self.store.set_partitioned(&name, cut);
            }
            64..=77 => {
                let bytes = if rng.random_bool(0.2) {
                    rng.random_range(MAX_LAG..4 * MAX_LAG)
                } else {
                    rng.random_range(1_000..200_000)
                };
                let ok = self.write_everywhere(bytes);
                let acked = self.net.acked().len();
                self.note(format!(
                    "write {bytes} bytes → accepted by {ok:?} ({acked} commits acknowledged so far)"
                ));
            }
            78..=85 => {
                let mut st = self.stalled.lock().unwrap();
                let stall = !st.contains(&name);
                if stall {
                    st.insert(name.clone());
                } else {
                    st.remove(&name);
                }
                drop(st);
                self.note(format!(
                    "{name}: replication {}",
                    if stall { "stalled" } else { "resumed" }
                ));
            }
            86..=91 => {
                if let Some(leader) = self.leader_name() {
                    let others: Vec<String> = self
                        .hosts
                        .iter()
                        .map(|h| h.name.clone())
                        .filter(|h| *h != leader)
                        .collect();
                    let cand = &others[rng.random_range(0..others.len())];
                    let body = if rng.random_bool(0.8) {
                        format!(r#"{{"leader":"{leader}","member":"{cand}"}}"#)
                    } else {
                        format!(r#"{{"leader":"{leader}"}}"#)
                    };
                    self.note(format!("switchover requested: {body}"));
                    self.manual_candidates.push((cand.clone(), Instant::now()));
                    if !body.contains("member") {
                        for o in &others {
                            self.manual_candidates.push((o.clone(), Instant::now()));
                        }
                    }
                    self.store.put(KEY_FAILOVER, &body);
                    self.wake_all();
                } else {
                    self.note("switchover skipped: no leader");
                }
            }
            92..=95 => self.stop_agent(i).await,
            _ => {
                let d = Duration::from_secs(rng.random_range(60..180));
                self.note(format!("long quiet period {:.0}s", d.as_secs_f64()));
                self.advance(d).await;
            }
        }
        self.check();
    }

    /// Pokes every agent (what the REST API does after writing the DCS).
    fn wake_all(&self) {
        for h in &self.hosts {
            if let Some(a) = &h.agent {
                let _ = a._commands.try_send(Command::Wakeup);
            }
        }
    }

    /// Heals everything, restarts every agent and waits: the cluster must converge to one
    /// primary holding the lock with every other node running as its replica.
    async fn heal_and_converge(&mut self) {
        self.note("heal: all links restored, replication resumed, all agents started");
        for h in &self.hosts {
            self.store.set_partitioned(&h.name, false);
        }
        self.stalled.lock().unwrap().clear();
        for i in 0..self.hosts.len() {
            self.start_agent(i);
        }
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            self.advance(Duration::from_secs(5)).await;
            if self.converged() {
                self.note(format!("converged: {}", self.describe()));
                return;
            }
            if Instant::now() >= deadline {
                if strict_liveness() {
                    self.fail(
                        "converges_after_healing",
                        "no single primary with all others replicating after 600s".into(),
                    );
                }
                self.note(format!("DID NOT CONVERGE: {}", self.describe()));
                self.converged = false;
                return;
            }
        }
    }

    fn converged(&self) -> bool {
        let Some(leader) = self.leader_name() else {
            return false;
        };
        let writable = self.net.writable();
        if writable != vec![leader.clone()] {
            return false;
        }
        self.hosts.iter().filter(|h| h.name != leader).all(|h| {
            h.pg.is_streaming()
                && h.pg.role()
                    == FakeRole::Replica {
                        upstream: Some(leader.clone()),
                    }
        })
    }

    fn shutdown(self) {
        for h in &self.hosts {
            if let Some(a) = &h.agent {
                a.task.abort();
            }
            h.enforcer.abort();
        }
        self.replicator.abort();
    }
}

/// Runs `fut` on a fresh current-thread runtime with paused time, inside a `LocalSet`.
fn run_local<F: std::future::Future>(fut: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(tokio::task::LocalSet::new().run_until(fut))
}

/// What one random sequence produced.
struct SeqOutcome {
    checks: u64,
    promotions: usize,
    converged: bool,
    /// In synchronous mode: promotions checked against acknowledged commits, and how many
    /// acknowledged commits were guarded.
    sync_promotions: usize,
    guarded_commits: usize,
}

/// Runs one random sequence on a fresh paused-time runtime.
fn run_sequence(seed: u64, events: usize, print: bool) -> SeqOutcome {
    run_local(async move {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = if rng.random_bool(0.3) { 5 } else { 3 };
        // Synchronous mode for every third seed (derived from the seed, not drawn from `rng`,
        // so the other seeds replay the same events as before).
        let sync_mode = seed % 3 == 2;
        let mut sim = Sim::with_mode(seed, n, sync_mode);
        sim.live = print;
        sim.note(format!(
            "seed {seed}: {n} nodes{}",
            if sync_mode { ", synchronous mode" } else { "" }
        ));
        // Faults may hit before the first primary is up: the warm-up is random, maybe zero.
        let warmup = Duration::from_secs(rng.random_range(0..40));
        sim.advance(warmup).await;
        for _ in 0..events {
            sim.random_event(&mut rng).await;
        }
        sim.heal_and_converge().await;
        let guarded = |s: &Sim| {
            s.net
                .acked()
                .iter()
                .filter(|c| s.sync_writes.contains(&(c.member.clone(), c.lsn.0)))
                .count()
        };
        let out = SeqOutcome {
            checks: sim.checks,
            promotions: sim.net.promotions().len(),
            converged: sim.converged,
            sync_promotions: if sim.sync_mode {
                sim.net.promotions().len()
            } else {
                0
            },
            guarded_commits: guarded(&sim),
        };
        sim.shutdown();
        out
    })
}

/// Failure signatures of HA-core defects found by this simulation (see the ignored scenario
/// tests below). A sequence that fails with one of them is reported but does not fail the
/// suite unless `SIM_STRICT=1`, so the rest of the suite stays a regression gate. Matching is
/// by signature, not by seed: `tokio::select!` polls branches in a random order, so a seed
/// replays the same events but not always the same interleaving. Remove an entry once fixed.
// Failure signatures that are tolerated (reported, not failed) unless SIM_STRICT=1. Empty: the
// livelock and the unfenced-primary defects the simulation found are fixed, so any recurrence
// fails the suite; the signatures below still label a failure to speed up diagnosis.
const KNOWN_DEFECTS: &[&str] = &[];
const KNOWN_LIVELOCK: &str = "[signature: livelock]";
const KNOWN_UNFENCED: &str = "[signature: unfenced primary (watchdog not armed)]";

fn run_seeds(range: std::ops::Range<u64>) {
    let strict = std::env::var("SIM_STRICT").is_ok_and(|v| v != "0");
    let mut known = Vec::new();
    let mut checks = 0;
    let mut promotions = 0;
    let mut sync_promotions = 0;
    let mut guarded = 0;
    let mut stuck = Vec::new();
    let mut violations = Vec::new();
    for seed in range.clone() {
        // Keep going after a violation so one run reports every failing seed.
        match std::panic::catch_unwind(|| run_sequence(seed, 30, false)) {
            Ok(o) => {
                checks += o.checks;
                promotions += o.promotions;
                sync_promotions += o.sync_promotions;
                guarded += o.guarded_commits;
                if !o.converged {
                    stuck.push(seed);
                }
            }
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                let headline = msg.lines().find(|l| l.contains("invariant")).unwrap_or("");
                let line = format!("seed {seed}: {}", headline.trim());
                if !strict && KNOWN_DEFECTS.iter().any(|k| msg.contains(k)) {
                    known.push(line);
                } else {
                    violations.push(line);
                }
            }
        }
    }
    if !known.is_empty() {
        println!(
            "KNOWN HA-CORE DEFECTS hit in {} sequence(s) (fatal with SIM_STRICT=1):\n{}",
            known.len(),
            known.join("\n")
        );
    }
    assert!(
        violations.is_empty(),
        "safety violations in {} of {} sequences (full log: SIM_SEED=<seed> cargo test --test \
         ha_sim replay_one_seed -- --nocapture):\n{}",
        violations.len(),
        range.end - range.start,
        violations.join("\n")
    );
    println!(
        "seeds {range:?}: {checks} invariant checks, {promotions} promotions ({sync_promotions} \
         in synchronous mode, checked against {guarded} acknowledged commits), no new safety \
         violation"
    );
    if !stuck.is_empty() {
        println!(
            "LIVENESS: {} sequence(s) did not converge after healing, seeds {stuck:?} (replay \
             with SIM_SEED=<seed>)",
            stuck.len()
        );
    }
    assert!(promotions > 0, "the sequences never exercised a failover");
    assert!(
        sync_promotions > 0 && guarded > 0,
        "the synchronous-mode sequences never promoted after acknowledged commits"
    );
}

// 4 × 50 = 200 random sequences of 30 events each (plus warm-up and healing).
#[test]
fn random_sequences_hold_invariants_seeds_0_to_49() {
    run_seeds(0..50);
}

#[test]
fn random_sequences_hold_invariants_seeds_50_to_99() {
    run_seeds(50..100);
}

#[test]
fn random_sequences_hold_invariants_seeds_100_to_149() {
    run_seeds(100..150);
}

#[test]
fn random_sequences_hold_invariants_seeds_150_to_199() {
    run_seeds(150..200);
}

/// `SIM_SEED=<n>` replays one sequence and prints its event log.
#[test]
fn replay_one_seed() {
    if let Ok(s) = std::env::var("SIM_SEED") {
        // Agent logs too, filtered by RUST_LOG (e.g. RUST_LOG=pgherd=info).
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let seed: u64 = s.parse().expect("SIM_SEED is a number");
        run_sequence(seed, 30, true);
    }
}

// ---------------------------------------------------------------------------------------------
// Hand-written scenarios.
// ---------------------------------------------------------------------------------------------

impl Sim {
    /// Waits (checking invariants) until `cond` holds, failing after `limit`.
    async fn wait_for(&mut self, what: &str, limit: Duration, cond: impl Fn(&Sim) -> bool) {
        let deadline = Instant::now() + limit;
        while !cond(self) {
            if Instant::now() >= deadline {
                self.fail(
                    "scenario",
                    format!("timed out after {limit:?} waiting for {what}"),
                );
            }
            self.advance(CHECK_STEP).await;
        }
        self.note(format!("reached: {what}"));
    }

    /// The standbys the DCS `/sync` key names.
    fn sync_standbys(&self) -> Vec<String> {
        self.store
            .view()
            .sync_state()
            .map(|s| s.standbys())
            .unwrap_or_default()
    }

    fn pg(&self, name: &str) -> &FakePostgres {
        &self.hosts[self.host(name)].pg
    }
}

#[test]
fn bootstrap_of_three_nodes_gives_one_primary_and_two_streaming_replicas() {
    run_local(async {
        let mut sim = Sim::new(1000, 3);
        sim.wait_for(
            "one primary, two streaming replicas",
            Duration::from_secs(120),
            |s| s.converged(),
        )
        .await;
        let leader = sim.leader_name().unwrap();
        let sysids: BTreeSet<_> = sim.hosts.iter().map(|h| h.pg.sysid()).collect();
        assert_eq!(
            sysids.len(),
            1,
            "every node carries the bootstrap system id"
        );
        assert_eq!(
            sim.store.view().initialize,
            sim.pg(&leader).sysid(),
            "initialize holds the sysid of the bootstrapped cluster"
        );
        assert!(
            sim.net.promotions().is_empty(),
            "bootstrap is not a promotion"
        );
        sim.shutdown();
    })
}

#[test]
fn killing_the_primary_promotes_a_replica_and_the_other_follows_it() {
    run_local(async {
        let mut sim = Sim::new(1001, 3);
        sim.wait_for("bootstrap", Duration::from_secs(120), |s| s.converged())
            .await;
        let old = sim.leader_name().unwrap();
        let writer = sim.host(&old);
        sim.hosts[writer].pg.write(10_000);
        sim.advance(Duration::from_secs(12)).await;
        let i = sim.host(&old);
        sim.crash_agent(i, true);
        let t0 = Instant::now();
        sim.wait_for("a replica leads", Duration::from_secs(90), |s| {
            s.leader_name().is_some_and(|l| l != old) && s.net.writable().len() == 1
        })
        .await;
        // The old leader's lease had to expire first: ≤ ttl (+ one loop for the race).
        assert!(Instant::now() - t0 <= Duration::from_secs(TTL + LOOP_WAIT + 2));
        let new = sim.leader_name().unwrap();
        assert_eq!(sim.net.promotions().last().unwrap().member, new);
        let third: Vec<String> = sim
            .hosts
            .iter()
            .map(|h| h.name.clone())
            .filter(|n| *n != old && *n != new)
            .collect();
        sim.wait_for(
            "the third node streams from the new leader",
            Duration::from_secs(60),
            |s| s.pg(&third[0]).is_streaming(),
        )
        .await;
        // The old node comes back as a replica of the new leader.
        sim.start_agent(i);
        sim.wait_for(
            "cluster converged with the old primary as replica",
            Duration::from_secs(180),
            |s| s.converged(),
        )
        .await;
        assert_eq!(sim.leader_name().unwrap(), new);
        sim.shutdown();
    })
}

#[test]
fn primary_partitioned_from_the_dcs_demotes_before_its_lease_expires() {
    run_local(async {
        let mut sim = Sim::new(1002, 3);
        sim.wait_for("bootstrap", Duration::from_secs(120), |s| s.converged())
            .await;
        let old = sim.leader_name().unwrap();
        sim.store.set_partitioned(&old, true);
        sim.note(format!("{old}: partitioned from the DCS"));
        // No renewal can succeed from now on: the lease ends at this instant at the latest.
        let lease_end = sim.store.last_lease_of(&old).unwrap().expires_at;
        sim.wait_for("old primary demoted", Duration::from_secs(TTL), |s| {
            !s.pg(&old).is_writable()
        })
        .await;
        let demoted_at = Instant::now();
        assert!(
            demoted_at < lease_end,
            "demoted {:.1}s after the lease expired",
            (demoted_at - lease_end).as_secs_f64()
        );
        sim.wait_for("another node leads", Duration::from_secs(90), |s| {
            s.leader_name().is_some_and(|l| l != old) && s.net.writable().len() == 1
        })
        .await;
        sim.store.set_partitioned(&old, false);
        sim.wait_for(
            "old primary rejoins as replica",
            Duration::from_secs(180),
            |s| s.converged(),
        )
        .await;
        assert_ne!(sim.leader_name().unwrap(), old);
        sim.shutdown();
    })
}

#[test]
fn switchover_via_failover_key_moves_leadership_to_the_named_member() {
    run_local(async {
        let mut sim = Sim::new(1003, 3);
        sim.wait_for("bootstrap", Duration::from_secs(120), |s| s.converged())
            .await;
        sim.advance(Duration::from_secs(15)).await;
        let old = sim.leader_name().unwrap();
        let cand = sim
            .hosts
            .iter()
            .map(|h| h.name.clone())
            .find(|n| *n != old)
            .unwrap();
        sim.store.put(
            KEY_FAILOVER,
            &format!(r#"{{"leader":"{old}","member":"{cand}"}}"#),
        );
        sim.manual_candidates.push((cand.clone(), Instant::now()));
        sim.wake_all();
        sim.wait_for("candidate leads", Duration::from_secs(90), |s| {
            s.leader_name().as_deref() == Some(cand.as_str()) && s.pg(&cand).is_writable()
        })
        .await;
        sim.wait_for(
            "old leader follows the candidate",
            Duration::from_secs(120),
            |s| s.converged(),
        )
        .await;
        assert_eq!(sim.leader_name().as_deref(), Some(cand.as_str()));
        assert!(
            sim.store.view().failover_request().is_none(),
            "the failover key is cleared after the switchover"
        );
        sim.shutdown();
    })
}

#[test]
fn crashed_agent_with_running_primary_is_fenced_by_the_watchdog_before_lease_expiry() {
    run_local(async {
        let mut sim = Sim::new(1004, 3);
        sim.wait_for("bootstrap", Duration::from_secs(120), |s| s.converged())
            .await;
        let old = sim.leader_name().unwrap();
        let i = sim.host(&old);
        sim.crash_agent(i, false);
        let lease_end = sim.store.last_lease_of(&old).unwrap().expires_at;
        sim.wait_for("watchdog reset the host", Duration::from_secs(TTL), |s| {
            !s.pg(&old).is_writable()
        })
        .await;
        assert!(Instant::now() < lease_end);
        assert_eq!(sim.hosts[i].watchdog.fired(), 1);
        sim.wait_for("another node leads", Duration::from_secs(90), |s| {
            s.leader_name().is_some_and(|l| l != old) && s.net.writable().len() == 1
        })
        .await;
        sim.shutdown();
    })
}

#[test]
fn lagging_replicas_are_not_promoted_beyond_maximum_lag() {
    run_local(async {
        let mut sim = Sim::new(1005, 3);
        sim.wait_for("bootstrap", Duration::from_secs(120), |s| s.converged())
            .await;
        let old = sim.leader_name().unwrap();
        for h in &sim.hosts {
            if h.name != old {
                sim.stalled.lock().unwrap().insert(h.name.clone());
            }
        }
        sim.pg(&old).write(3 * MAX_LAG);
        // Let the leader publish its optime, then lose it for good.
        sim.advance(Duration::from_secs(LOOP_WAIT + 2)).await;
        assert!(sim.store.view().status.optime >= sim.pg(&old).lsn().0);
        let i = sim.host(&old);
        sim.crash_agent(i, true);
        sim.advance(Duration::from_secs(3 * TTL)).await;
        assert!(
            sim.net.promotions().is_empty(),
            "nobody within maximum_lag_on_failover"
        );
        assert!(sim.net.writable().is_empty());
        sim.shutdown();
    })
}

/// A replica that is *ahead* of the node that won the race (its agent was down, so the race
/// ignored it) has diverged from the new timeline. When its agent comes back it must notice
/// (Patroni: `trigger_check_diverged_lsn` on the first cycle of a running replica, patroni.md
/// §3.2 step 13), rewind and stream from the new leader.
#[test]
fn replica_ahead_of_the_new_primary_is_rewound_when_its_agent_returns() {
    run_local(async {
        let mut sim = Sim::new(1006, 3);
        sim.wait_for("bootstrap", Duration::from_secs(120), |s| s.converged())
            .await;
        let old = sim.leader_name().unwrap();
        let others: Vec<String> = sim
            .hosts
            .iter()
            .map(|h| h.name.clone())
            .filter(|n| *n != old)
            .collect();
        let (behind, ahead) = (others[0].clone(), others[1].clone());
        sim.stalled.lock().unwrap().insert(behind.clone());
        sim.pg(&old).write(100_000);
        sim.advance(Duration::from_secs(2)).await;
        assert!(sim.pg(&ahead).lsn() > sim.pg(&behind).lsn());
        let ia = sim.host(&ahead);
        sim.crash_agent(ia, false);
        let io = sim.host(&old);
        sim.crash_agent(io, true);
        sim.stalled.lock().unwrap().clear();
        sim.wait_for("the lagging replica leads", Duration::from_secs(90), |s| {
            s.leader_name().as_deref() == Some(behind.as_str()) && s.pg(&behind).is_writable()
        })
        .await;
        assert!(!sim.pg(&ahead).is_streaming(), "the ahead replica diverged");
        sim.start_agent(ia);
        sim.start_agent(io);
        sim.wait_for(
            "everyone streams from the new leader",
            Duration::from_secs(300),
            |s| s.converged(),
        )
        .await;
        sim.shutdown();
    })
}

/// An agent restarted while its PostgreSQL runs as primary re-attaches the leader key; it must
/// also (re)open the watchdog (Patroni activates it in `enforce_primary_role` every cycle), or a
/// second agent crash leaves a primary nobody fences once the lease lapses — split brain.
#[test]
fn restarted_leader_agent_rearms_the_watchdog() {
    run_local(async {
        let mut sim = Sim::new(1007, 3);
        sim.wait_for("bootstrap", Duration::from_secs(120), |s| s.converged())
            .await;
        let old = sim.leader_name().unwrap();
        let i = sim.host(&old);
        // First crash + immediate restart: the new agent keeps the lock, PG never stopped.
        sim.crash_agent(i, false);
        sim.start_agent(i);
        sim.advance(Duration::from_secs(60)).await;
        assert_eq!(sim.leader_name().as_deref(), Some(old.as_str()));
        assert!(sim.pg(&old).is_writable());
        // Second crash: the device must be armed by the restarted agent.
        sim.crash_agent(i, false);
        let lease_end = sim.store.last_lease_of(&old).unwrap().expires_at;
        sim.wait_for(
            "watchdog fences the primary",
            Duration::from_secs(TTL),
            |s| !s.pg(&old).is_writable(),
        )
        .await;
        assert!(Instant::now() < lease_end);
        sim.shutdown();
    })
}

/// Synchronous mode: a standby PostgreSQL calls `sync` the moment it is listed, however far
/// behind it is. Published in `/sync` at once, it could be promoted without commits the primary
/// acknowledged before listing it (asynchronously, or confirmed by the standby it replaced).
/// It is published only once it caught up (patroni.md §3.10 `_process_replica_readiness`), so a
/// stalled replacement is never promoted and `acknowledged_commits_survive_promotion` holds.
#[test]
fn a_lagging_replacement_sync_standby_is_not_promoted_without_acknowledged_commits() {
    run_local(async {
        let mut sim = Sim::with_mode(1008, 3, true);
        sim.wait_for(
            "converged with a synchronous standby",
            Duration::from_secs(180),
            |s| s.converged() && s.sync_standbys().len() == 1,
        )
        .await;
        let leader = sim.leader_name().unwrap();
        let sync = sim.sync_standbys()[0].clone();
        let other = sim
            .hosts
            .iter()
            .map(|h| h.name.clone())
            .find(|n| *n != leader && *n != sync)
            .unwrap();
        sim.stalled.lock().unwrap().insert(other.clone());
        sim.write_everywhere(100_000);
        sim.advance(Duration::from_secs(1)).await;
        let acked = sim.net.acked();
        assert!(
            acked
                .last()
                .is_some_and(|c| c.synchronous && c.member == leader),
            "the sync standby confirmed the commit"
        );
        // The sync standby dies; the stalled replica is the only replacement.
        let i = sim.host(&sync);
        sim.crash_agent(i, true);
        sim.advance(Duration::from_secs(3 * LOOP_WAIT)).await;
        assert!(
            !sim.sync_standbys().contains(&other),
            "the stalled replica has not caught up: it must not be published"
        );
        // The primary dies too: nobody holds the commit but the dead nodes.
        let i = sim.host(&leader);
        sim.crash_agent(i, true);
        sim.advance(Duration::from_secs(3 * TTL)).await;
        assert!(
            sim.net.promotions().iter().all(|p| p.member != other),
            "the stalled replica was promoted without an acknowledged commit"
        );
        sim.shutdown();
    })
}
