//! Table tests of the pure HA core: one row per behaviour of `decide`, named after it and
//! citing the rule of ../shared/reference/patroni.md it pins down. Inputs are built with small
//! builders (`cluster().leader("n1").member("n2", lsn(100))`).

use std::time::Duration;

use chrono::{TimeZone, Utc};
use pgherd::config::WatchdogMode;
use pgherd::dcs::{
    ClusterView, DynamicConfig, Failover, HistoryLine, LeaderKey, Member, MemberData, Status,
    SyncState,
};
use pgherd::ha::candidates::{format_ssn, plan_sync, rank};
use pgherd::ha::{
    ActionKind, Decision, FailsafeRound, Finished, Inputs, LocalFacts, NotHealthiest, PeerStatus,
    RejoinMark, Renewal, Tags, WatchdogFacts, decide,
};
use pgherd::pg::{ControlState, PgStatus, ReplicationRow};
use pgherd::types::{Lsn, MemberName, Revision, Timeline};
use serde_json::{Map, Value, json};
use tokio::time::Instant;

const SYSID: &str = "7268616322854375442";

fn lsn(n: u64) -> Lsn {
    Lsn(n)
}

fn name(s: &str) -> MemberName {
    MemberName::from(s)
}

// ----------------------------------------------------------------------------- builders

struct ClusterB(ClusterView);

fn cluster() -> ClusterB {
    ClusterB(ClusterView {
        initialize: Some(SYSID.to_string()),
        config: Some((DynamicConfig::default(), Revision(1))),
        revision: 10,
        ..Default::default()
    })
}

fn member_data(state: &str, role: &str, pos: u64, port: u16) -> MemberData {
    MemberData {
        conn_url: format!("postgres://127.0.0.1:{port}/postgres"),
        api_url: format!("http://127.0.0.1:{}/patroni", port + 3000),
        state: state.into(),
        role: role.into(),
        version: "4.1.5".into(),
        xlog_location: Some(pos),
        timeline: Some(1),
        ..Default::default()
    }
}

fn port_of(n: &str) -> u16 {
    5430 + n.trim_start_matches('n').parse::<u16>().unwrap_or(9)
}

impl ClusterB {
    fn leader(mut self, n: &str) -> Self {
        self.0.leader = Some(LeaderKey {
            name: name(n),
            lease: None,
            revision: Revision(5),
        });
        if !self.0.members.contains_key(&name(n)) {
            self = self.put(n, member_data("running", "primary", 100, port_of(n)));
        }
        self
    }
    fn member(self, n: &str, pos: Lsn) -> Self {
        self.put(n, member_data("running", "replica", pos.0, port_of(n)))
    }
    fn member_tagged(self, n: &str, pos: Lsn, tags: Value) -> Self {
        let mut d = member_data("running", "replica", pos.0, port_of(n));
        d.tags = tags.as_object().cloned().unwrap_or_default();
        self.put(n, d)
    }
    fn put(mut self, n: &str, data: MemberData) -> Self {
        self.0.members.insert(
            name(n),
            Member {
                name: name(n),
                data,
                lease: None,
                revision: Revision(3),
            },
        );
        self
    }
    fn no_initialize(mut self) -> Self {
        self.0.initialize = None;
        self
    }
    fn initialize(mut self, v: &str) -> Self {
        self.0.initialize = Some(v.to_string());
        self
    }
    fn optime(mut self, n: u64) -> Self {
        self.0.status = Status {
            optime: n,
            ..Default::default()
        };
        self
    }
    fn failover(mut self, leader: Option<&str>, member: Option<&str>, at: Option<&str>) -> Self {
        let f = Failover {
            leader: leader.map(str::to_string),
            member: member.map(str::to_string),
            scheduled_at: at.map(str::to_string),
        };
        self.0.failover = Some((f, Revision(7)));
        self
    }
    fn sync(mut self, leader: &str, standbys: &[&str]) -> Self {
        let s = SyncState {
            leader: Some(leader.into()),
            quorum: 0,
            sync_standby: (!standbys.is_empty()).then(|| standbys.join(",")),
        };
        self.0.sync = Some((s, Revision(8)));
        self
    }
    fn timeline(mut self, tl: u32) -> Self {
        self.0.history = (1..tl)
            .map(|p| HistoryLine {
                parent_timeline: p,
                switchpoint: 10,
                reason: "no recovery target specified".into(),
                timestamp: None,
                new_leader: None,
            })
            .collect();
        self
    }
}

/// Builder of the whole decision input, from the point of view of node `me`.
struct Case {
    i: Inputs,
    cfg: Map<String, Value>,
}

fn node(me: &str) -> Case {
    Case {
        i: Inputs {
            me: name(me),
            cluster: None,
            renewal: Renewal::NotAttempted,
            pg: PgStatus::default(),
            local: LocalFacts {
                tags: Tags::from_map(&Map::new()),
                watchdog: WatchdogFacts {
                    mode: WatchdogMode::Off,
                    usable: false,
                },
                ..Default::default()
            },
            peers: Vec::new(),
            config: DynamicConfig::default(),
            now: Instant::now(),
            wall_now: Utc.with_ymd_and_hms(2025, 1, 1, 12, 0, 0).unwrap(),
        },
        cfg: Map::new(),
    }
}

impl Case {
    fn in_cluster(mut self, c: ClusterB) -> Self {
        self.i.cluster = Some(c.0);
        self
    }
    fn dcs_down(mut self) -> Self {
        self.i.cluster = None;
        self
    }
    fn empty_data(mut self) -> Self {
        self.i.pg = PgStatus::default();
        self
    }
    fn data(mut self) -> Self {
        self.i.pg.data_dir_initialized = true;
        self.i.pg.sysid = Some(SYSID.into());
        self.i.pg.timeline = Some(Timeline(1));
        self
    }
    fn replica(self, pos: Lsn) -> Self {
        let mut s = self.data();
        s.i.pg.running = true;
        s.i.pg.accepting_connections = true;
        s.i.pg.in_recovery = Some(true);
        s.i.pg.receive_lsn = Some(pos);
        s.i.pg.replay_lsn = Some(pos);
        s.i.pg.replication_state = Some("streaming".into());
        s.i.pg.upstream = Some("127.0.0.1:5431".into());
        s
    }
    fn primary(self, pos: Lsn) -> Self {
        let mut s = self.data();
        s.i.pg.running = true;
        s.i.pg.accepting_connections = true;
        s.i.pg.in_recovery = Some(false);
        s.i.pg.flush_lsn = Some(pos);
        s
    }
    fn stopped(self) -> Self {
        let mut s = self.data();
        s.i.pg.running = false;
        s.i.pg.control_state = Some(ControlState::ShutDownInRecovery);
        s
    }
    fn sysid(mut self, id: &str) -> Self {
        self.i.pg.sysid = Some(id.into());
        self
    }
    fn pg_timeline(mut self, tl: u32) -> Self {
        self.i.pg.timeline = Some(Timeline(tl));
        self
    }
    fn renewed(mut self) -> Self {
        self.i.renewal = Renewal::Renewed;
        self.i.local.held_lock = true;
        self
    }
    fn renewal(mut self, r: Renewal) -> Self {
        self.i.renewal = r;
        self.i.local.held_lock = true;
        self
    }
    fn tags(mut self, t: Value) -> Self {
        self.i.local.tags = Tags::from_map(t.as_object().unwrap());
        self
    }
    fn cfg(mut self, k: &str, v: Value) -> Self {
        self.cfg.insert(k.into(), v);
        self
    }
    fn peer(mut self, n: &str, pos: Lsn) -> Self {
        self.i.peers.push(PeerStatus {
            name: name(n),
            reachable: true,
            is_primary: false,
            wal_position: pos,
            timeline: Some(Timeline(1)),
            nofailover: false,
            failover_priority: 1,
            watchdog_failed: false,
        });
        self
    }
    fn peer_with(mut self, p: PeerStatus) -> Self {
        self.i.peers.push(p);
        self
    }
    fn action(mut self, a: ActionKind, started_secs_ago: u64) -> Self {
        self.i.local.action = Some(a);
        self.i.local.action_started_at = Some(self.i.now - Duration::from_secs(started_secs_ago));
        self
    }
    fn finished(mut self, kind: ActionKind, ok: bool) -> Self {
        self.i.local.finished = Some(Finished { kind, ok });
        self
    }
    fn decide(mut self) -> Decision {
        if !self.cfg.is_empty() {
            let c = DynamicConfig(self.cfg.clone());
            self.i.config = c.clone();
            if let Some(v) = self.i.cluster.as_mut() {
                v.config = Some((c, Revision(1)));
            }
        }
        decide(&self.i)
    }
}

fn peer(n: &str, pos: u64) -> PeerStatus {
    PeerStatus {
        name: name(n),
        reachable: true,
        is_primary: false,
        wal_position: Lsn(pos),
        timeline: Some(Timeline(1)),
        nofailover: false,
        failover_priority: 1,
        watchdog_failed: false,
    }
}

// ------------------------------------------------------------------ bootstrap (§3.15, §3.16)

#[test]
fn bootstrap_race_when_no_initialize_key() {
    // §3.15.1: empty data, no leader, no initialize → race for `initialize`.
    let d = node("n1")
        .empty_data()
        .in_cluster(cluster().no_initialize())
        .decide();
    assert_eq!(d, Decision::RaceBootstrap);
    assert_eq!(d.to_string(), "trying to bootstrap a new cluster");
}

#[test]
fn waits_for_leader_while_another_node_bootstraps() {
    // §1.1 initialize "": replicas do not bootstrap while the key exists.
    let d = node("n2")
        .empty_data()
        .in_cluster(cluster().initialize(""))
        .decide();
    assert_eq!(d, Decision::WaitForLeaderToBootstrap);
    assert_eq!(d.to_string(), "waiting for leader to bootstrap");
}

#[test]
fn nofailover_node_never_bootstraps_a_cluster() {
    let d = node("n1")
        .empty_data()
        .tags(json!({"nofailover": true}))
        .in_cluster(cluster().no_initialize())
        .decide();
    assert_eq!(d, Decision::WaitForLeaderToBootstrap);
}

#[test]
fn clones_from_leader_when_data_dir_empty() {
    // §3.15.5: empty data and a leader → basebackup from the leader.
    let d = node("n2")
        .empty_data()
        .in_cluster(cluster().leader("n1"))
        .decide();
    assert_eq!(
        d,
        Decision::CloneFrom {
            source: name("n1"),
            from_leader: true
        }
    );
    assert_eq!(d.to_string(), "trying to bootstrap from leader 'n1'");
}

#[test]
fn clones_from_running_clonefrom_member() {
    // §3.16: a running member tagged clonefrom is preferred over the leader.
    let d = node("n2")
        .empty_data()
        .in_cluster(
            cluster()
                .leader("n1")
                .member_tagged("n3", lsn(90), json!({"clonefrom": true})),
        )
        .decide();
    assert_eq!(
        d,
        Decision::CloneFrom {
            source: name("n3"),
            from_leader: false
        }
    );
}

#[test]
fn finishes_bootstrap_after_the_bootstrap_task_succeeded() {
    // §3.15.3: initialize=sysid, config, take_leader.
    let d = node("n1")
        .primary(lsn(10))
        .finished(ActionKind::Bootstrap, true)
        .in_cluster(cluster().initialize(""))
        .decide();
    assert_eq!(d, Decision::FinishBootstrap);
    assert_eq!(d.to_string(), "initialized a new cluster");
}

#[test]
fn gives_back_initialize_after_failed_bootstrap() {
    // §3.15.4 cancel_initialization.
    let d = node("n1")
        .empty_data()
        .finished(ActionKind::Bootstrap, false)
        .in_cluster(cluster().initialize(""))
        .decide();
    assert_eq!(d, Decision::AbortBootstrap);
}

// ------------------------------------------------------------------ existing data (§3.2.10)

#[test]
fn adopts_existing_data_without_initialize_key() {
    let d = node("n1")
        .primary(lsn(10))
        .in_cluster(cluster().no_initialize())
        .decide();
    assert_eq!(
        d,
        Decision::AdoptExistingData {
            sysid: SYSID.into()
        }
    );
}

#[test]
fn refuses_running_replica_without_initialize_key() {
    let d = node("n1")
        .replica(lsn(10))
        .in_cluster(cluster().no_initialize())
        .decide();
    assert_eq!(d, Decision::NoInitializeRunningReplica);
}

#[test]
fn refuses_data_with_a_different_system_id() {
    let d = node("n2")
        .replica(lsn(10))
        .sysid("123")
        .in_cluster(cluster().leader("n1"))
        .decide();
    assert!(matches!(d, Decision::SysidMismatch { .. }), "{d:?}");
}

// ------------------------------------------------------------------ following (§3.3)

#[test]
fn follows_the_leader_as_a_replica() {
    let d = node("n2")
        .replica(lsn(100))
        .in_cluster(cluster().leader("n1").member("n2", lsn(100)))
        .decide();
    assert_eq!(
        d.to_string(),
        "no action. I am (n2), a secondary, and following a leader (n1)"
    );
}

#[test]
fn reconfigures_upstream_when_the_leader_changed() {
    let d = node("n2")
        .replica(lsn(100))
        .in_cluster(cluster().leader("n3").member("n2", lsn(100)))
        .decide();
    assert_eq!(
        d,
        Decision::FollowLeader {
            me: name("n2"),
            leader: name("n3"),
            reconfigure: true
        }
    );
}

#[test]
fn demotes_when_lock_lost() {
    // §3.3 follow(): a running primary that does not hold the lock demotes immediately.
    let d = node("n1")
        .primary(lsn(100))
        .renewal(Renewal::Lost)
        .in_cluster(cluster().leader("n2").member("n1", lsn(100)))
        .decide();
    assert_eq!(d, Decision::DemoteNotLeader { leader: name("n2") });
    assert_eq!(
        d.to_string(),
        "demoting self because i do not have the lock and i was a leader"
    );
    assert!(d.demotes());
}

#[test]
fn starts_stopped_ex_primary_as_replica_with_rewind_check() {
    // §3.8/§3.9: after our own demotion, check pg_rewind before streaming.
    let mut c = node("n1").stopped();
    c.i.local.rewind_check_pending = true;
    let d = c.in_cluster(cluster().leader("n2")).decide();
    assert_eq!(
        d,
        Decision::StartAsReplica {
            leader: Some(name("n2")),
            rewind_check: true
        }
    );
}

#[test]
fn starts_crashed_ex_primary_with_rewind_check() {
    let mut c = node("n1").stopped();
    c.i.pg.control_state = Some(ControlState::InProduction);
    let d = c.in_cluster(cluster().leader("n2")).decide();
    assert_eq!(
        d,
        Decision::StartAsReplica {
            leader: Some(name("n2")),
            rewind_check: true
        }
    );
}

// ------------------------------------------------------------------ rejoin (§3.9)

/// A running replica of n3 (already pointed at it) that stopped streaming, at `pos` on
/// timeline `my_tl`; leader n3 runs as primary on `leader_tl`, whose history says timeline 1
/// ended at 150.
fn diverged_replica(pos: u64, my_tl: u32, leader_tl: u32) -> Case {
    let mut leader = member_data("running", "primary", 300, port_of("n3"));
    leader.timeline = Some(leader_tl);
    let mut view = cluster()
        .put("n3", leader)
        .leader("n3")
        .member("n2", lsn(pos))
        .timeline(leader_tl);
    for h in &mut view.0.history {
        h.switchpoint = 150;
    }
    let mut c = node("n2").replica(lsn(pos)).pg_timeline(my_tl);
    c.i.pg.replication_state = Some("in archive recovery".into());
    c.i.pg.upstream = Some(format!("127.0.0.1:{}", port_of("n3")));
    c.in_cluster(view)
}

fn rejoin_of(n: &str) -> Decision {
    Decision::RejoinCheck { leader: name(n) }
}

#[test]
fn replica_past_the_switchpoint_of_the_new_timeline_is_rejoined_through_a_rewind_check() {
    // §3.9: a replica whose timeline is behind the leader's and which replayed beyond the
    // switchpoint cannot stream: stop, check, rewind.
    let d = diverged_replica(200, 1, 2).decide();
    assert_eq!(d, rejoin_of("n3"));
    assert_eq!(
        d.to_string(),
        "not streaming from leader (n3) on its timeline: restarting through a pg_rewind check \
         before following it"
    );
    assert!(!d.demotes());
}

#[test]
fn replica_on_a_sibling_timeline_is_rejoined_through_a_rewind_check() {
    // Our timeline is ahead of the leader's: we followed a primary that lost the race.
    assert_eq!(diverged_replica(100, 3, 2).decide(), rejoin_of("n3"));
}

#[test]
fn replica_behind_the_leader_timeline_that_does_not_stream_is_checked() {
    // Even before the switchpoint recorded in the DCS history: that history may describe a
    // sibling timeline with the same number, so only the check itself can tell.
    assert_eq!(diverged_replica(100, 1, 2).decide(), rejoin_of("n3"));
}

#[test]
fn streaming_replica_is_never_rejoined() {
    let mut c = diverged_replica(200, 1, 2);
    c.i.pg.replication_state = Some("streaming".into());
    assert!(matches!(c.decide(), Decision::FollowLeader { .. }));
}

#[test]
fn replica_on_the_leader_timeline_is_not_restarted_when_streaming_stalls() {
    // Same timeline: a connection problem, which a restart would not fix.
    let d = diverged_replica(200, 2, 2).decide();
    assert!(
        matches!(
            d,
            Decision::FollowLeader {
                reconfigure: false,
                ..
            }
        ),
        "{d:?}"
    );
}

#[test]
fn rejoin_check_is_not_repeated_for_the_same_leader_and_timeline() {
    let mut c = diverged_replica(200, 1, 2);
    c.i.local.rejoin_checked = Some(RejoinMark {
        leader: name("n3"),
        leader_timeline: Some(Timeline(2)),
    });
    assert!(matches!(c.decide(), Decision::FollowLeader { .. }));
}

#[test]
fn rejoin_check_runs_again_once_the_leader_timeline_changed() {
    let mut c = diverged_replica(200, 1, 3);
    c.i.local.rejoin_checked = Some(RejoinMark {
        leader: name("n3"),
        leader_timeline: Some(Timeline(2)),
    });
    assert_eq!(c.decide(), rejoin_of("n3"));
}

#[test]
fn replica_still_pointed_at_the_old_leader_is_repointed_before_any_check() {
    // The cheap fix first: maybe it only streamed from the old leader.
    let mut c = diverged_replica(200, 1, 2);
    c.i.pg.upstream = Some("127.0.0.1:5431".into());
    assert_eq!(
        c.decide(),
        Decision::FollowLeader {
            me: name("n2"),
            leader: name("n3"),
            reconfigure: true
        }
    );
}

#[test]
fn no_rejoin_check_against_a_leader_not_yet_running_as_primary() {
    // Patroni checks only against a primary: mid-promotion the timeline is not final.
    let mut c = diverged_replica(200, 1, 2);
    let v = c.i.cluster.as_mut().unwrap();
    v.members.get_mut(&name("n3")).unwrap().data.role = "replica".into();
    assert!(matches!(c.decide(), Decision::FollowLeader { .. }));
}

#[test]
fn paused_replica_is_not_rejoined() {
    let d = diverged_replica(200, 1, 2)
        .cfg("pause", json!(true))
        .decide();
    assert!(matches!(d, Decision::FollowLeader { .. }), "{d:?}");
}

// ------------------------------------------------------------------ leader race (§3.4)

fn leaderless() -> ClusterB {
    cluster()
        .member("n1", lsn(100))
        .member("n2", lsn(100))
        .member("n3", lsn(100))
        .optime(100)
}

#[test]
fn races_for_the_lock_when_healthiest() {
    let d = node("n2")
        .replica(lsn(100))
        .peer("n3", lsn(90))
        .in_cluster(leaderless())
        .decide();
    assert_eq!(d, Decision::AcquireLock);
}

#[test]
fn does_not_race_while_a_primary_is_alive() {
    let mut p = peer("n1", 100);
    p.is_primary = true;
    let d = node("n2")
        .replica(lsn(100))
        .peer_with(p)
        .in_cluster(leaderless())
        .decide();
    assert_eq!(
        d,
        Decision::NotHealthiest {
            reason: NotHealthiest::PrimaryAlive(name("n1"))
        }
    );
    assert_eq!(
        d.to_string(),
        "following a different leader because i am not the healthiest node"
    );
}

#[test]
fn does_not_race_when_a_peer_has_more_wal() {
    let d = node("n2")
        .replica(lsn(100))
        .peer("n3", lsn(120))
        .in_cluster(leaderless())
        .decide();
    assert_eq!(
        d,
        Decision::NotHealthiest {
            reason: NotHealthiest::Ahead(name("n3"))
        }
    );
}

#[test]
fn does_not_race_against_equal_wal_and_higher_failover_priority() {
    let mut p = peer("n3", 100);
    p.failover_priority = 5;
    let d = node("n2")
        .replica(lsn(100))
        .peer_with(p)
        .in_cluster(leaderless())
        .decide();
    assert_eq!(
        d,
        Decision::NotHealthiest {
            reason: NotHealthiest::HigherPriority(name("n3"))
        }
    );
}

#[test]
fn ignores_unreachable_and_nofailover_peers() {
    let mut far = peer("n3", 500);
    far.nofailover = true;
    let d = node("n2")
        .replica(lsn(100))
        .peer_with(far)
        .peer_with(PeerStatus::unreachable(name("n1")))
        .in_cluster(leaderless())
        .decide();
    assert_eq!(d, Decision::AcquireLock);
}

#[test]
fn does_not_race_when_lagging_beyond_maximum_lag_on_failover() {
    let d = node("n2")
        .replica(lsn(100))
        .cfg("maximum_lag_on_failover", json!(50))
        .in_cluster(leaderless().optime(1000))
        .decide();
    assert_eq!(
        d,
        Decision::NotHealthiest {
            reason: NotHealthiest::Lagging { lag: 900, max: 50 }
        }
    );
}

#[test]
fn nofailover_never_races() {
    let d = node("n2")
        .replica(lsn(100))
        .tags(json!({"nofailover": true}))
        .in_cluster(leaderless())
        .decide();
    assert_eq!(d, Decision::NotAllowedToPromote);
    assert_eq!(
        d.to_string(),
        "following a different leader because I am not allowed to promote"
    );
}

#[test]
fn failover_priority_zero_never_races() {
    let d = node("n2")
        .replica(lsn(100))
        .tags(json!({"failover_priority": 0}))
        .in_cluster(leaderless())
        .decide();
    assert_eq!(d, Decision::NotAllowedToPromote);
}

#[test]
fn check_timeline_blocks_a_replica_on_an_old_timeline() {
    let d = node("n2")
        .replica(lsn(100))
        .cfg("check_timeline", json!(true))
        .in_cluster(leaderless().timeline(3))
        .decide();
    assert_eq!(
        d,
        Decision::NotHealthiest {
            reason: NotHealthiest::TimelineBehind
        }
    );
}

#[test]
fn watchdog_required_and_unusable_never_races() {
    let mut c = node("n2").replica(lsn(100));
    c.i.local.watchdog = WatchdogFacts {
        mode: WatchdogMode::Required,
        usable: false,
    };
    let d = c.in_cluster(leaderless()).decide();
    assert_eq!(
        d,
        Decision::NotHealthiest {
            reason: NotHealthiest::WatchdogUnusable
        }
    );
}

#[test]
fn running_primary_without_its_required_watchdog_does_not_retake_the_lock() {
    // Stricter than Patroni: a running primary without a usable required watchdog stays out
    // of the race (Patroni would take the lock, then demote when activation fails).
    let mut c = node("n1").primary(lsn(100));
    c.i.local.watchdog = WatchdogFacts {
        mode: WatchdogMode::Required,
        usable: false,
    };
    let d = c.in_cluster(leaderless()).decide();
    assert_eq!(
        d,
        Decision::NotHealthiest {
            reason: NotHealthiest::WatchdogUnusable
        }
    );
}

#[test]
fn node_whose_required_watchdog_failed_never_bootstraps() {
    let mut c = node("n1").empty_data();
    c.i.local.watchdog = WatchdogFacts {
        mode: WatchdogMode::Required,
        usable: false,
    };
    let d = c.in_cluster(cluster().no_initialize()).decide();
    assert_eq!(d, Decision::WaitForLeaderToBootstrap);
}

#[test]
fn pre_promote_failure_blocks_racing_for_ttl() {
    let mut c = node("n2").replica(lsn(100));
    c.i.local.pre_promote_failed_at = Some(c.i.now - Duration::from_secs(5));
    let d = c.in_cluster(leaderless()).decide();
    assert_eq!(
        d,
        Decision::NotHealthiest {
            reason: NotHealthiest::PrePromoteBackoff
        }
    );
    let mut c = node("n2").replica(lsn(100));
    c.i.local.pre_promote_failed_at = Some(c.i.now - Duration::from_secs(31));
    assert_eq!(c.in_cluster(leaderless()).decide(), Decision::AcquireLock);
}

#[test]
fn sync_mode_only_a_sync_standby_may_race() {
    // §3.10 failure semantics: only the /sync leader or a listed standby auto-promotes.
    let d = node("n3")
        .replica(lsn(100))
        .cfg("synchronous_mode", json!(true))
        .in_cluster(leaderless().sync("n1", &["n2"]))
        .decide();
    assert_eq!(
        d,
        Decision::NotHealthiest {
            reason: NotHealthiest::NotSyncStandby
        }
    );
}

#[test]
fn sync_standby_races_and_ignores_async_peers_ahead() {
    let d = node("n2")
        .replica(lsn(100))
        .peer("n3", lsn(200))
        .cfg("synchronous_mode", json!(true))
        .in_cluster(leaderless().sync("n1", &["n2"]))
        .decide();
    assert_eq!(d, Decision::AcquireLock);
}

#[test]
fn running_primary_retakes_a_free_lock() {
    // The agent restarted after its key expired; its PostgreSQL is still the primary.
    let d = node("n1")
        .primary(lsn(100))
        .in_cluster(leaderless())
        .decide();
    assert_eq!(d, Decision::AcquireLock);
}

#[test]
fn stale_ex_primary_on_old_timeline_does_not_retake_the_lock() {
    let d = node("n1")
        .primary(lsn(100))
        .in_cluster(leaderless().timeline(2))
        .decide();
    assert_eq!(
        d,
        Decision::NotHealthiest {
            reason: NotHealthiest::TimelineBehind
        }
    );
    let d = node("n1")
        .primary(lsn(100))
        .pg_timeline(2)
        .in_cluster(leaderless().timeline(2))
        .decide();
    assert_eq!(d, Decision::AcquireLock);
}

// ------------------------------------------------------------------ leader (§3.3)

fn led_by_n1() -> ClusterB {
    cluster()
        .leader("n1")
        .member("n2", lsn(100))
        .member("n3", lsn(100))
        .optime(100)
}

#[test]
fn renews_lock_as_leader() {
    let d = node("n1")
        .primary(lsn(100))
        .renewed()
        .in_cluster(led_by_n1())
        .decide();
    assert_eq!(
        d.to_string(),
        "no action. I am (n1), the leader with the lock"
    );
}

#[test]
fn promotes_a_replica_that_holds_the_lock() {
    let d = node("n1")
        .replica(lsn(100))
        .renewed()
        .in_cluster(led_by_n1())
        .decide();
    assert_eq!(d, Decision::PromoteWithLock);
}

#[test]
fn demotes_when_renewal_failed() {
    // §3.3 update_lock failure on a primary → demote.
    let d = node("n1")
        .primary(lsn(100))
        .renewal(Renewal::Failed)
        .in_cluster(led_by_n1())
        .decide();
    assert_eq!(d, Decision::DemoteRenewalFailed);
    assert_eq!(
        d.to_string(),
        "demoted self because failed to update leader lock in DCS"
    );
}

#[test]
fn stays_primary_when_the_lock_was_renewed_but_the_cluster_read_failed() {
    // The acknowledged renewal keeps the lease (and the leader key on it) alive for ttl: no
    // other node can lead, so a failed read after it is no reason to demote.
    let d = node("n1").primary(lsn(100)).renewed().dcs_down().decide();
    assert_eq!(d, Decision::PrimaryOnRenewedLease);
    assert_eq!(
        d.to_string(),
        "renewed the leader lock but could not read the cluster: staying primary on the \
         renewed lease"
    );
}

#[test]
fn a_replica_with_an_unreadable_cluster_keeps_replicating_even_after_a_renewal() {
    // Only a running primary rides on the renewed lease; anything else is the ordinary
    // unreachable-DCS case.
    let d = node("n1").replica(lsn(100)).renewed().dcs_down().decide();
    assert_eq!(d, Decision::DcsUnreachableSecondary);
}

#[test]
fn demotes_when_dcs_unreachable() {
    // §3.7: no failsafe → demote offline.
    let d = node("n1")
        .primary(lsn(100))
        .renewal(Renewal::Failed)
        .dcs_down()
        .decide();
    assert_eq!(d, Decision::DemoteDcsUnreachable);
    assert_eq!(
        d.to_string(),
        "demoted self because DCS is not accessible and I was a leader"
    );
}

#[test]
fn secondary_keeps_running_when_dcs_unreachable() {
    let d = node("n2").replica(lsn(100)).dcs_down().decide();
    assert_eq!(d, Decision::DcsUnreachableSecondary);
}

#[test]
fn paused_leader_is_not_demoted_when_dcs_unreachable() {
    let mut c = node("n1")
        .primary(lsn(100))
        .renewal(Renewal::Failed)
        .dcs_down();
    c.i.config = DynamicConfig(json!({"pause": true}).as_object().unwrap().clone());
    assert_eq!(c.decide(), Decision::DcsUnreachablePaused);
}

#[test]
fn restarts_crashed_primary_in_place_while_holding_the_lock() {
    // §3.8: start as primary, failover only after primary_start_timeout.
    let d = node("n1")
        .stopped()
        .renewed()
        .in_cluster(led_by_n1())
        .decide();
    assert_eq!(d.to_string(), "starting primary after failure");
}

#[test]
fn releases_lock_when_crash_restart_exceeds_primary_start_timeout() {
    let d = node("n1")
        .stopped()
        .renewed()
        .action(ActionKind::StartPrimary, 301)
        .in_cluster(led_by_n1())
        .decide();
    assert_eq!(d, Decision::ReleaseAfterStartTimeout);
    let d = node("n1")
        .stopped()
        .renewed()
        .action(ActionKind::StartPrimary, 10)
        .in_cluster(led_by_n1())
        .decide();
    assert_eq!(
        d,
        Decision::LeaderDuringAction {
            action: ActionKind::StartPrimary
        }
    );
}

#[test]
fn primary_start_timeout_zero_fails_over_immediately() {
    let d = node("n1")
        .stopped()
        .renewed()
        .peer("n2", lsn(100))
        .cfg("primary_start_timeout", json!(0))
        .in_cluster(led_by_n1())
        .decide();
    assert_eq!(d, Decision::FailoverAfterCrash);
}

#[test]
fn releases_lock_after_failing_to_restart_the_primary() {
    let d = node("n1")
        .stopped()
        .renewed()
        .finished(ActionKind::StartPrimary, false)
        .in_cluster(led_by_n1())
        .decide();
    assert_eq!(
        d.to_string(),
        "removed leader key after trying and failing to start postgres"
    );
}

#[test]
fn cancels_promotion_when_the_lock_is_lost() {
    let d = node("n1")
        .replica(lsn(100))
        .renewal(Renewal::Lost)
        .action(ActionKind::Promote, 1)
        .in_cluster(cluster().leader("n2"))
        .decide();
    assert_eq!(d, Decision::CancelPromoteLostLock);
}

#[test]
fn leader_keeps_renewing_during_a_long_action() {
    let d = node("n1")
        .primary(lsn(100))
        .renewed()
        .action(ActionKind::Restart, 5)
        .in_cluster(led_by_n1())
        .decide();
    assert_eq!(d.to_string(), "updated leader lock during restart");
}

#[test]
fn releases_lock_when_data_dir_is_empty() {
    let d = node("n1")
        .empty_data()
        .renewed()
        .in_cluster(led_by_n1())
        .decide();
    assert_eq!(d, Decision::ReleaseLockDataDirEmpty);
}

// ------------------------------------------------------------------ switchover (§3.5)

#[test]
fn switchover_demotes_leader_to_healthy_candidate() {
    let d = node("n1")
        .primary(lsn(100))
        .renewed()
        .peer("n2", lsn(100))
        .in_cluster(led_by_n1().failover(Some("n1"), Some("n2"), None))
        .decide();
    assert_eq!(
        d,
        Decision::SwitchoverDemote {
            candidate: Some(name("n2"))
        }
    );
    assert_eq!(d.to_string(), "manual failover: demoting myself");
}

#[test]
fn switchover_to_any_healthy_member() {
    let d = node("n1")
        .primary(lsn(100))
        .renewed()
        .peer("n3", lsn(100))
        .in_cluster(led_by_n1().failover(Some("n1"), None, None))
        .decide();
    assert_eq!(d, Decision::SwitchoverDemote { candidate: None });
}

#[test]
fn switchover_to_unhealthy_candidate_is_cleared() {
    let d = node("n1")
        .primary(lsn(100))
        .renewed()
        .peer_with(PeerStatus::unreachable(name("n2")))
        .in_cluster(led_by_n1().failover(Some("n1"), Some("n2"), None))
        .decide();
    assert!(matches!(d, Decision::ClearFailover { .. }), "{d:?}");
}

#[test]
fn switchover_to_lagging_candidate_is_cleared() {
    let d = node("n1")
        .primary(lsn(10_000_000))
        .renewed()
        .peer("n2", lsn(100))
        .in_cluster(led_by_n1().failover(Some("n1"), Some("n2"), None))
        .decide();
    assert!(matches!(d, Decision::ClearFailover { .. }), "{d:?}");
}

#[test]
fn switchover_naming_another_leader_is_cleared() {
    let d = node("n1")
        .primary(lsn(100))
        .renewed()
        .peer("n2", lsn(100))
        .in_cluster(led_by_n1().failover(Some("n9"), Some("n2"), None))
        .decide();
    assert_eq!(
        d,
        Decision::ClearFailover {
            reason: "leader name does not match".into()
        }
    );
}

#[test]
fn scheduled_switchover_in_the_future_waits() {
    let d = node("n1")
        .primary(lsn(100))
        .renewed()
        .peer("n2", lsn(100))
        .in_cluster(led_by_n1().failover(Some("n1"), Some("n2"), Some("2025-01-01T12:10:00+00:00")))
        .decide();
    assert_eq!(
        d,
        Decision::AwaitScheduledSwitchover {
            at: "2025-01-01T12:10:00+00:00".into(),
            in_secs: 600
        }
    );
}

#[test]
fn stale_scheduled_switchover_is_cleared() {
    let d = node("n1")
        .primary(lsn(100))
        .renewed()
        .peer("n2", lsn(100))
        .in_cluster(led_by_n1().failover(Some("n1"), Some("n2"), Some("2025-01-01T11:00:00+00:00")))
        .decide();
    assert!(matches!(d, Decision::ClearFailover { .. }), "{d:?}");
}

#[test]
fn due_scheduled_switchover_demotes() {
    let d = node("n1")
        .primary(lsn(100))
        .renewed()
        .peer("n2", lsn(100))
        .in_cluster(led_by_n1().failover(Some("n1"), Some("n2"), Some("2025-01-01T11:59:55+00:00")))
        .decide();
    assert_eq!(
        d,
        Decision::SwitchoverDemote {
            candidate: Some(name("n2"))
        }
    );
}

#[test]
fn releases_lock_once_the_switchover_stop_finished() {
    let d = node("n1")
        .stopped()
        .renewed()
        .finished(ActionKind::SwitchoverDemote, true)
        .in_cluster(led_by_n1().failover(Some("n1"), Some("n2"), None))
        .decide();
    assert_eq!(d, Decision::ReleaseAfterSwitchover);
}

#[test]
fn named_candidate_races_without_lag_check_when_leader_key_is_gone() {
    let d = node("n2")
        .replica(lsn(100))
        .peer("n3", lsn(500))
        .in_cluster(
            leaderless()
                .optime(99_000_000)
                .failover(Some("n1"), Some("n2"), None),
        )
        .decide();
    assert_eq!(d, Decision::AcquireLock);
}

#[test]
fn non_candidate_defers_to_a_healthy_named_candidate() {
    let d = node("n3")
        .replica(lsn(500))
        .peer("n2", lsn(100))
        .in_cluster(leaderless().failover(Some("n1"), Some("n2"), None))
        .decide();
    assert_eq!(
        d,
        Decision::NotHealthiest {
            reason: NotHealthiest::DeferToCandidate(name("n2"))
        }
    );
}

#[test]
fn others_race_when_the_named_candidate_is_unhealthy() {
    let d = node("n3")
        .replica(lsn(100))
        .peer_with(PeerStatus::unreachable(name("n2")))
        .in_cluster(leaderless().failover(Some("n1"), Some("n2"), None))
        .decide();
    assert_eq!(d, Decision::AcquireLock);
}

#[test]
fn former_leader_races_only_if_no_one_else_is_healthy() {
    let d = node("n1")
        .replica(lsn(100))
        .peer("n3", lsn(100))
        .in_cluster(leaderless().failover(Some("n1"), None, None))
        .decide();
    assert_eq!(
        d,
        Decision::NotHealthiest {
            reason: NotHealthiest::FormerLeader
        }
    );
    let d = node("n1")
        .replica(lsn(100))
        .peer_with(PeerStatus::unreachable(name("n3")))
        .in_cluster(leaderless().failover(Some("n1"), None, None))
        .decide();
    assert_eq!(d, Decision::AcquireLock);
}

#[test]
fn sync_mode_switchover_refuses_async_candidate_in_race() {
    let d = node("n3")
        .replica(lsn(100))
        .cfg("synchronous_mode", json!(true))
        .in_cluster(
            leaderless()
                .sync("n1", &["n2"])
                .failover(Some("n1"), Some("n3"), None),
        )
        .decide();
    assert_eq!(
        d,
        Decision::NotHealthiest {
            reason: NotHealthiest::NotSyncStandby
        }
    );
}

/// Found by the simulation (a sync-mode sequence never converged): every replica deferred to a
/// healthy switchover candidate that was not in `/sync`, which itself may not promote.
#[test]
fn sync_mode_replicas_defer_to_a_switchover_candidate_only_if_it_is_in_sync() {
    type Row = (
        &'static str,
        Option<&'static str>,
        &'static [&'static str],
        Decision,
    );
    let defer = Decision::NotHealthiest {
        reason: NotHealthiest::DeferToCandidate(name("n3")),
    };
    let rows: &[Row] = &[
        (
            "switchover candidate outside /sync: the sync standby races instead",
            Some("n1"),
            &["n2"],
            Decision::AcquireLock,
        ),
        (
            "switchover candidate in /sync: defer to it",
            Some("n1"),
            &["n2", "n3"],
            defer.clone(),
        ),
        (
            "manual failover (no leader named) may pick an async node: defer to it",
            None,
            &["n2"],
            defer.clone(),
        ),
    ];
    for (what, leader, standbys, want) in rows {
        let d = node("n2")
            .replica(lsn(100))
            .peer("n3", lsn(100))
            .cfg("synchronous_mode", json!(true))
            .in_cluster(
                leaderless()
                    .sync("n1", standbys)
                    .failover(*leader, Some("n3"), None),
            )
            .decide();
        assert_eq!(d, *want, "{what}");
    }
}

// ------------------------------------------------------------------ pause (§3.11)

#[test]
fn paused_replica_does_not_race() {
    let d = node("n2")
        .replica(lsn(100))
        .cfg("pause", json!(true))
        .in_cluster(leaderless())
        .decide();
    assert_eq!(
        d,
        Decision::NotHealthiest {
            reason: NotHealthiest::Paused
        }
    );
}

#[test]
fn paused_named_failover_candidate_may_race() {
    let d = node("n2")
        .replica(lsn(100))
        .cfg("pause", json!(true))
        .in_cluster(leaderless().failover(None, Some("n2"), None))
        .decide();
    assert_eq!(d, Decision::AcquireLock);
}

#[test]
fn paused_node_does_not_start_a_stopped_postgres() {
    let d = node("n2")
        .stopped()
        .cfg("pause", json!(true))
        .in_cluster(led_by_n1())
        .decide();
    assert_eq!(
        d,
        Decision::PausedStopped {
            release_lock: false
        }
    );
}

#[test]
fn paused_leader_releases_lock_when_not_primary() {
    let d = node("n1")
        .replica(lsn(100))
        .renewed()
        .cfg("pause", json!(true))
        .in_cluster(led_by_n1())
        .decide();
    assert_eq!(d, Decision::PausedReleaseNotPrimary);
}

#[test]
fn paused_primary_without_lock_keeps_running() {
    let d = node("n1")
        .primary(lsn(100))
        .cfg("pause", json!(true))
        .in_cluster(cluster().leader("n2"))
        .decide();
    assert_eq!(d, Decision::PausedPrimaryWithoutLock { leader: name("n2") });
}

// ------------------------------------------------------------------ sync plan (§3.10)

fn row(app: &str, sync_state: &str, flush: u64) -> ReplicationRow {
    ReplicationRow {
        usename: "replicator".into(),
        application_name: app.into(),
        client_addr: None,
        state: "streaming".into(),
        sync_state: sync_state.into(),
        sync_priority: 0,
        write_lsn: Some(Lsn(flush)),
        flush_lsn: Some(Lsn(flush)),
        replay_lsn: Some(Lsn(flush)),
    }
}

fn sync_inputs(
    c: ClusterB,
    rows: Vec<ReplicationRow>,
    ssn: &str,
    strict: bool,
) -> (Inputs, ClusterView) {
    let mut case = node("n1").primary(lsn(100)).renewed();
    case.i.pg.replication = rows;
    case.i.pg.synchronous_standby_names = Some(ssn.into());
    case.i.config = DynamicConfig(
        json!({"synchronous_mode": true, "synchronous_mode_strict": strict})
            .as_object()
            .unwrap()
            .clone(),
    );
    let v = c.0;
    case.i.cluster = Some(v.clone());
    (case.i, v)
}

#[test]
fn sync_new_standby_goes_into_ssn_before_it_is_published() {
    let (i, v) = sync_inputs(
        led_by_n1().sync("n1", &[]),
        vec![row("n2", "async", 100)],
        "",
        false,
    );
    let p = plan_sync(&i, &v);
    assert_eq!(p.ssn.as_deref(), Some("n2"));
    assert_eq!(
        p.publish, None,
        "must not publish before PostgreSQL reports it sync"
    );
    let (i, v) = sync_inputs(
        led_by_n1().sync("n1", &[]),
        vec![row("n2", "sync", 100)],
        "n2",
        false,
    );
    let p = plan_sync(&i, &v);
    assert_eq!(p.ssn, None);
    assert_eq!(p.publish, Some(vec!["n2".to_string()]));
}

/// Patroni's `_process_replica_readiness` (§3.10): PostgreSQL reports a listed standby `sync`
/// as soon as it streams, however far behind; it holds the commits acknowledged before it was
/// listed only once it flushed our position from when SSN last changed. Found by the
/// simulation's `acknowledged_commits_survive_promotion`: a stalled standby was published and
/// promoted without commits the old primary had acknowledged.
#[test]
fn sync_standby_is_published_only_once_it_caught_up_to_the_ssn_change() {
    type Row = (&'static str, Option<u64>, u64, Option<Vec<String>>);
    let rows: &[Row] = &[
        (
            "behind the catch-up point: not yet published",
            Some(100),
            90,
            None,
        ),
        (
            "exactly at the catch-up point: published (boundary)",
            Some(100),
            100,
            Some(vec!["n2".to_string()]),
        ),
        (
            "past the catch-up point: published",
            Some(80),
            90,
            Some(vec!["n2".to_string()]),
        ),
        (
            "no point captured yet: our current position (100) stands in",
            None,
            90,
            None,
        ),
    ];
    for (what, catchup, flush, publish) in rows {
        let (mut i, v) = sync_inputs(
            led_by_n1().sync("n1", &[]),
            vec![row("n2", "sync", *flush)],
            "n2",
            false,
        );
        i.local.sync_catchup_lsn = catchup.map(Lsn);
        let p = plan_sync(&i, &v);
        assert_eq!(p.ssn, None, "{what}");
        assert_eq!(p.shrink, None, "{what}");
        assert_eq!(p.publish, *publish, "{what}");
    }
}

#[test]
fn sync_standby_already_in_the_sync_key_stays_while_behind_the_catch_up_point() {
    // It was confirmed before; PostgreSQL has waited for it ever since, so it holds every
    // acknowledged commit even though it is behind our current position.
    let (mut i, v) = sync_inputs(
        led_by_n1().sync("n1", &["n2"]),
        vec![row("n2", "sync", 50)],
        "n2",
        false,
    );
    i.local.sync_catchup_lsn = Some(Lsn(100));
    let p = plan_sync(&i, &v);
    assert_eq!((p.shrink, p.ssn, p.publish), (None, None, None));
}

#[test]
fn sync_standby_leaves_sync_key_before_ssn() {
    // n2 disappeared from pg_stat_replication: shrink /sync first, then change SSN.
    let (i, v) = sync_inputs(
        led_by_n1().sync("n1", &["n2"]),
        vec![row("n3", "async", 90)],
        "n2",
        false,
    );
    let p = plan_sync(&i, &v);
    assert_eq!(p.shrink, Some(vec![]));
    assert_eq!(p.ssn.as_deref(), Some("n3"));
    assert_eq!(p.publish, None);
}

#[test]
fn strict_sync_mode_blocks_with_star_when_no_standby() {
    let (i, v) = sync_inputs(led_by_n1().sync("n1", &[]), vec![], "", true);
    assert_eq!(plan_sync(&i, &v).ssn.as_deref(), Some("*"));
    assert_eq!(
        format_ssn(&["b-2".into(), "a1".into()], false),
        "2 (\"b-2\",a1)"
    );
}

#[test]
fn sync_key_written_when_leader_starts_sync_mode() {
    let (i, v) = sync_inputs(led_by_n1(), vec![], "", false);
    assert_eq!(plan_sync(&i, &v).shrink, Some(vec![]));
}

// ------------------------------------------------------------------ misc

#[test]
fn candidates_are_totally_ordered() {
    let mut a = peer("a", 100);
    a.failover_priority = 2;
    let b = peer("b", 100);
    let c = peer("c", 200);
    let d = PeerStatus::unreachable(name("d"));
    let order: Vec<_> = rank(&[d, b, a, c])
        .into_iter()
        .map(|p| p.name.to_string())
        .collect();
    assert_eq!(order, ["c", "a", "b", "d"]);
}

#[test]
fn decide_has_no_io_imports() {
    // architecture.md §10: nothing in the pure core imports network or database crates.
    for f in [
        "src/ha/decide.rs",
        "src/ha/inputs.rs",
        "src/ha/decision.rs",
        "src/ha/candidates.rs",
    ] {
        let src = std::fs::read_to_string(f).unwrap();
        for banned in [
            "tokio::net",
            "etcd_client",
            "tokio_postgres",
            "reqwest",
            "openssh",
            "std::fs",
            "tokio::fs",
            "Instant::now",
            "Utc::now",
            "SystemTime::now",
        ] {
            assert!(!src.contains(banned), "{f} must not use {banned}");
        }
    }
}

#[test]
fn cancels_in_place_primary_restart_when_the_lock_is_lost() {
    let d = node("n1")
        .stopped()
        .renewal(Renewal::Lost)
        .action(ActionKind::StartPrimary, 3)
        .in_cluster(cluster().leader("n2"))
        .decide();
    assert_eq!(d, Decision::CancelPromoteLostLock);
}

#[test]
fn bootstrap_continues_while_the_dcs_is_unreachable() {
    let d = node("n1")
        .primary(lsn(10))
        .action(ActionKind::Bootstrap, 3)
        .dcs_down()
        .decide();
    assert_eq!(
        d,
        Decision::ActionInProgress {
            action: ActionKind::Bootstrap
        }
    );
}

#[test]
fn stopped_replica_starts_read_only_while_the_dcs_is_unreachable() {
    let d = node("n2").stopped().dcs_down().decide();
    assert_eq!(
        d,
        Decision::StartAsReplica {
            leader: None,
            rewind_check: false
        }
    );
}

#[test]
fn ex_primary_restarts_through_rewind_check_before_following_new_leader() {
    let mut c = node("n1").replica(lsn(100));
    c.i.pg.upstream = None;
    c.i.local.rewind_check_pending = true;
    let d = c
        .in_cluster(cluster().leader("n2").member("n1", lsn(100)))
        .decide();
    assert_eq!(
        d,
        Decision::StartAsReplica {
            leader: Some(name("n2")),
            rewind_check: true
        }
    );
}

// ----------------------------------------------------------------------------- failsafe mode

fn failsafe_listing(c: ClusterB, members: &[&str]) -> ClusterB {
    let mut c = c;
    let m: Map<String, Value> = members
        .iter()
        .map(|n| (n.to_string(), json!(format!("http://{n}:8008/patroni"))))
        .collect();
    c.0.failsafe = Some(Value::Object(m));
    c
}

#[test]
fn failsafe_keeps_the_primary_running_when_every_member_accepted() {
    // §3.7: DCS lost, failsafe_mode on, all members answered POST /failsafe → stay primary.
    let mut c = node("n1")
        .primary(lsn(100))
        .renewal(Renewal::Failed)
        .cfg("failsafe_mode", json!(true))
        .dcs_down();
    c.i.local.held_lock = true;
    c.i.local.failsafe_round = Some(FailsafeRound::Accepted);
    let d = c.decide();
    assert_eq!(d, Decision::FailsafeKeepPrimary);
    assert_eq!(
        d.to_string(),
        "continue to run as a leader because failsafe mode is enabled and all members are \
         accessible"
    );
}

#[test]
fn failsafe_demotes_the_primary_when_a_member_did_not_accept() {
    let mut c = node("n1")
        .primary(lsn(100))
        .renewal(Renewal::Failed)
        .cfg("failsafe_mode", json!(true))
        .dcs_down();
    c.i.local.held_lock = true;
    c.i.local.failsafe_round = Some(FailsafeRound::Refused {
        member: name("n3"),
        reason: "unreachable: connection refused".into(),
    });
    let d = c.decide();
    assert!(matches!(d, Decision::DemoteFailsafeRefused { .. }), "{d:?}");
    assert_eq!(
        d.to_string(),
        "demoted self because DCS is not accessible and I was a leader (failsafe: n3 \
         unreachable: connection refused)"
    );
}

#[test]
fn a_replica_does_not_race_while_a_failsafe_leader_announced_itself_within_ttl() {
    // The leader's key expired (it cannot reach etcd, we can), but it told us it runs on.
    let mut c = node("n2")
        .replica(lsn(100))
        .peer("n3", lsn(90))
        .cfg("failsafe_mode", json!(true))
        .in_cluster(failsafe_listing(leaderless(), &["n1", "n2", "n3"]));
    c.i.local.failsafe_leader = Some(name("n1"));
    let d = c.decide();
    assert_eq!(d, Decision::FailsafeLeaderAnnounced { leader: name("n1") });
}

#[test]
fn an_old_failsafe_announcement_is_ignored_when_failsafe_mode_is_off() {
    let mut c = node("n2")
        .replica(lsn(100))
        .peer("n3", lsn(90))
        .in_cluster(leaderless());
    c.i.local.failsafe_leader = Some(name("n1"));
    assert_eq!(c.decide(), Decision::AcquireLock);
}

#[test]
fn a_member_missing_from_the_failsafe_key_never_races() {
    // Patroni: only members of /failsafe may win the race; n2 was never asked to stay out.
    let d = node("n2")
        .replica(lsn(100))
        .peer("n3", lsn(90))
        .cfg("failsafe_mode", json!(true))
        .in_cluster(failsafe_listing(leaderless(), &["n1", "n3"]))
        .decide();
    assert_eq!(
        d,
        Decision::NotHealthiest {
            reason: NotHealthiest::NotInFailsafe
        }
    );
}
