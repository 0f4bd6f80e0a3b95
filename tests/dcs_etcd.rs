//! Contract tests of `EtcdDcs` against a real etcd 3.4 (`/usr/bin/etcd`), one private etcd per
//! test on ports 24000-24099. Each test checks one behaviour of the `Dcs` trait or one byte
//! format Patroni/patronictl depend on.

#[path = "common/etcd.rs"]
mod etcd_cluster;

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_cluster::EtcdCluster;
use pgherd::dcs::etcd::EtcdDcs;
use pgherd::dcs::{
    Dcs, DcsError, DynamicConfig, Failover, HistoryLine, MemberData, Status, SyncState,
    history_to_json,
};
use pgherd::types::{MemberName, Revision};

const BASE: &str = "/service/batman/";

/// Starts a 1-member etcd; the blocking wait runs off the async runtime.
async fn etcd1(port: u16) -> EtcdCluster {
    tokio::task::spawn_blocking(move || EtcdCluster::start(1, port))
        .await
        .unwrap()
}

async fn dcs(cluster: &EtcdCluster, retry: Duration) -> EtcdDcs {
    EtcdDcs::connect(cluster.endpoints(), BASE.to_string(), retry, None)
        .await
        .expect("connect")
}

fn member(name: &str, role: &str) -> MemberData {
    MemberData {
        conn_url: format!("postgres://127.0.0.1:5432/postgres?x={name}"),
        api_url: "http://127.0.0.1:8008/patroni".into(),
        state: "running".into(),
        role: role.into(),
        version: "4.1.5".into(),
        xlog_location: Some(67420024),
        timeline: Some(1),
        ..Default::default()
    }
}

fn raw(c: &EtcdCluster, rel: &str) -> Option<String> {
    c.raw_get(&format!("{BASE}{rel}"))
        .map(|v| String::from_utf8(v).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_are_written_in_patronis_exact_byte_format() {
    let c = etcd1(24000).await;
    let d = dcs(&c, Duration::from_secs(3)).await;
    let name = MemberName::from("node1");
    d.ensure_lease(Duration::from_secs(30)).await.unwrap();
    let m = member("node1", "primary");
    d.touch_member(&name, &m).await.unwrap();
    assert!(d.acquire_leader(&name).await.unwrap());
    assert!(d.race_initialize().await.unwrap());
    assert_eq!(
        raw(&c, "initialize").as_deref(),
        Some(""),
        "bootstrap claim is an empty string"
    );
    d.set_initialize("7268616322854375442").await.unwrap();
    let cfg =
        DynamicConfig::parse(r#"{"ttl":30,"loop_wait":10,"postgresql":{"use_pg_rewind":true}}"#)
            .unwrap();
    assert!(d.set_config(&cfg, None).await.unwrap());
    let status = Status {
        optime: 67395656,
        slots: [("postgres_1".to_string(), 67395000)].into(),
        retain_slots: vec!["postgres_1".into()],
        timeline: None,
    };
    d.set_status(&status).await.unwrap();
    let history = vec![HistoryLine {
        parent_timeline: 1,
        switchpoint: 25623960,
        reason: "no recovery target specified".into(),
        timestamp: Some("2019-09-23T16:57:57+02:00".into()),
        new_leader: Some("node1".into()),
    }];
    d.set_history(&history).await.unwrap();
    let sync = SyncState {
        leader: Some("node1".into()),
        quorum: 0,
        sync_standby: Some("node2".into()),
    };
    assert!(d.set_sync(Some(&sync), None).await.unwrap());
    let fo = Failover {
        leader: Some("node1".into()),
        member: Some("node2".into()),
        scheduled_at: None,
    };
    assert!(d.set_failover(&fo, None).await.unwrap());

    assert_eq!(
        raw(&c, "members/node1").unwrap(),
        serde_json::to_string(&m).unwrap()
    );
    assert!(
        !raw(&c, "members/node1").unwrap().contains(' '),
        "member JSON must be compact"
    );
    assert_eq!(
        raw(&c, "leader").as_deref(),
        Some("node1"),
        "leader is a plain string"
    );
    assert_eq!(
        raw(&c, "initialize").as_deref(),
        Some("7268616322854375442")
    );
    assert_eq!(
        raw(&c, "config").as_deref(),
        Some(r#"{"ttl":30,"loop_wait":10,"postgresql":{"use_pg_rewind":true}}"#)
    );
    assert_eq!(
        raw(&c, "status").as_deref(),
        Some(
            r#"{"optime":67395656,"slots":{"postgres_1":67395000},"retain_slots":["postgres_1"]}"#
        )
    );
    assert_eq!(raw(&c, "history").unwrap(), history_to_json(&history));
    assert_eq!(
        raw(&c, "history").as_deref(),
        Some(
            r#"[[1,25623960,"no recovery target specified","2019-09-23T16:57:57+02:00","node1"]]"#
        )
    );
    assert_eq!(
        raw(&c, "sync").as_deref(),
        Some(r#"{"leader":"node1","quorum":0,"sync_standby":"node2"}"#)
    );
    assert_eq!(
        raw(&c, "failover").as_deref(),
        Some(r#"{"leader":"node1","member":"node2"}"#)
    );
    assert!(d.set_failover(&Failover::default(), None).await.unwrap());
    assert_eq!(
        raw(&c, "failover").as_deref(),
        Some("{}"),
        "cleared failover is {{}}, not deleted"
    );

    // The same keys read back through load().
    let v = d.load().await.unwrap();
    let lease = d.current_lease().unwrap();
    assert_eq!(v.members[&name].data, m);
    assert_eq!(
        v.members[&name].lease,
        Some(lease),
        "member key is on our lease"
    );
    assert_eq!(
        v.leader.as_ref().unwrap().lease,
        Some(lease),
        "leader key is on our lease"
    );
    assert_eq!(v.initialize.as_deref(), Some("7268616322854375442"));
    assert_eq!(v.config.as_ref().unwrap().0, cfg);
    assert_eq!(v.status, status);
    assert_eq!(v.history, history);
    assert_eq!(v.sync.as_ref().unwrap().0, sync);
    assert!(v.failover_request().is_none());
    assert!(v.revision > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_tolerates_garbage_like_patroni() {
    let c = etcd1(24002).await;
    let d = dcs(&c, Duration::from_secs(3)).await;
    let put = |k: &str, v: &str| {
        c.etcdctl(&["put", &format!("{BASE}{k}"), v]);
    };
    put(
        "members/good",
        &serde_json::to_string(&member("good", "replica")).unwrap(),
    );
    put("members/bad", "}{ not json");
    put("members/nested/deeper", "{}");
    put("config", "not json at all");
    put("failover", "node1:node2");
    put("status", "12345");
    put("sync", "garbage");
    put("history", "[[1,100,\"r\"],\"junk\"]");
    put("leader", "good");
    c.etcdctl(&["put", "/service/batman2/leader", "other-cluster"]);

    let v = d.load().await.unwrap();
    let names: Vec<&str> = v.members.keys().map(|n| n.as_str()).collect();
    assert_eq!(
        names,
        ["bad", "good"],
        "nested keys are not members; bad JSON is a default member"
    );
    assert_eq!(
        v.members[&MemberName::from("bad")].data,
        MemberData::default()
    );
    assert!(v.config.is_none(), "unparsable config reads as no config");
    let fo = v.failover_request().unwrap();
    assert_eq!(
        (fo.leader.as_deref(), fo.member.as_deref()),
        (Some("node1"), Some("node2"))
    );
    assert_eq!(v.status.optime, 12345, "legacy bare-int status");
    let (sync, rev) = v.sync.clone().unwrap();
    assert!(
        sync.leader.is_none() && rev.0 > 0,
        "invalid sync is empty but keeps its CAS revision"
    );
    assert_eq!(v.history.len(), 1);
    assert_eq!(v.leader_name().map(|n| n.as_str()), Some("good"));
    assert_eq!(
        v.leader.as_ref().unwrap().lease,
        None,
        "a key without lease reports none"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cas_writes_succeed_only_on_the_current_revision() {
    let c = etcd1(24004).await;
    let d = dcs(&c, Duration::from_secs(3)).await;
    let cfg1 = DynamicConfig::parse(r#"{"ttl":30}"#).unwrap();
    let cfg2 = DynamicConfig::parse(r#"{"ttl":40}"#).unwrap();
    assert!(d.set_config(&cfg1, None).await.unwrap());
    let rev = d.load().await.unwrap().config.unwrap().1;
    assert!(
        !d.set_config(&cfg2, Some(Revision(rev.0 - 1)))
            .await
            .unwrap(),
        "stale revision"
    );
    assert!(d.set_config(&cfg2, Some(rev)).await.unwrap());
    assert!(
        !d.set_config(&cfg1, Some(rev)).await.unwrap(),
        "revision moved on after the write"
    );
    assert_eq!(d.load().await.unwrap().config.unwrap().0.ttl(), 40);

    let fo = Failover {
        leader: Some("a".into()),
        ..Default::default()
    };
    assert!(d.set_failover(&fo, None).await.unwrap());
    let rev = d.load().await.unwrap().failover.unwrap().1;
    assert!(
        !d.set_failover(&Failover::default(), Some(Revision(rev.0 + 100)))
            .await
            .unwrap()
    );
    assert!(
        d.set_failover(&Failover::default(), Some(rev))
            .await
            .unwrap()
    );
    // A CAS against a missing key (revision 0 = "absent") only succeeds while it is absent.
    assert!(
        !d.set_sync(Some(&SyncState::default()), Some(Revision(5)))
            .await
            .unwrap()
    );

    let s = SyncState {
        leader: Some("a".into()),
        quorum: 0,
        sync_standby: None,
    };
    assert!(d.set_sync(Some(&s), None).await.unwrap());
    let rev = d.load().await.unwrap().sync.unwrap().1;
    assert!(
        !d.set_sync(None, Some(Revision(rev.0 - 1))).await.unwrap(),
        "CAS delete with stale rev"
    );
    assert!(d.load().await.unwrap().sync.is_some());
    assert!(d.set_sync(None, Some(rev)).await.unwrap());
    assert!(d.load().await.unwrap().sync.is_none(), "sync deleted");
    assert!(
        d.set_sync(None, None).await.unwrap(),
        "plain delete of an absent key is fine"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_and_initialize_are_create_only_races_between_agents() {
    let c = etcd1(24006).await;
    let a = Arc::new(dcs(&c, Duration::from_secs(3)).await);
    let b = Arc::new(dcs(&c, Duration::from_secs(3)).await);
    let (na, nb) = (MemberName::from("a"), MemberName::from("b"));
    a.ensure_lease(Duration::from_secs(30)).await.unwrap();
    b.ensure_lease(Duration::from_secs(30)).await.unwrap();
    assert_ne!(a.current_lease(), b.current_lease(), "one lease per agent");

    // Simultaneous acquire: exactly one wins.
    let (ra, rb) = tokio::join!(a.acquire_leader(&na), b.acquire_leader(&nb));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert!(ra ^ rb, "exactly one winner (a={ra}, b={rb})");
    let (winner, wn, loser, ln) = if ra {
        (&a, &na, &b, &nb)
    } else {
        (&b, &nb, &a, &na)
    };
    assert_eq!(
        c.raw_get(&format!("{BASE}leader")).unwrap(),
        wn.as_str().as_bytes()
    );
    assert!(
        winner.acquire_leader(wn).await.unwrap(),
        "re-acquiring our own key on our lease is a win"
    );
    assert!(!loser.acquire_leader(ln).await.unwrap());
    assert!(
        !loser.update_leader(ln).await.unwrap(),
        "update_leader reports a lock named elsewhere"
    );
    assert!(winner.update_leader(wn).await.unwrap());

    // Wrong-owner release fails and leaves the key; the owner's release deletes it.
    assert!(!loser.release_leader(ln).await.unwrap());
    assert_eq!(loser.load().await.unwrap().leader_name(), Some(wn));
    assert!(winner.release_leader(wn).await.unwrap());
    assert!(winner.load().await.unwrap().leader.is_none());
    assert!(
        !winner.release_leader(wn).await.unwrap(),
        "nothing left to release"
    );

    // take_leader overwrites whoever holds the key.
    assert!(loser.acquire_leader(ln).await.unwrap());
    winner.take_leader(wn).await.unwrap();
    let v = loser.load().await.unwrap();
    assert_eq!(v.leader_name(), Some(wn));
    assert_eq!(v.leader.unwrap().lease, winner.current_lease());

    // initialize: one winner, then sysid, then a failed bootstrap gives up its claim.
    let (ia, ib) = tokio::join!(a.race_initialize(), b.race_initialize());
    assert!(ia.unwrap() ^ ib.unwrap(), "exactly one bootstrap winner");
    assert_eq!(a.load().await.unwrap().initialize.as_deref(), Some(""));
    a.delete_initialize().await.unwrap();
    assert!(a.load().await.unwrap().initialize.is_none());
    assert!(
        b.race_initialize().await.unwrap(),
        "claim is free again after delete"
    );
    b.set_initialize("123").await.unwrap();
    assert!(!a.race_initialize().await.unwrap());
    assert_eq!(a.load().await.unwrap().initialize.as_deref(), Some("123"));

    // delete_cluster removes everything under the prefix.
    a.delete_cluster().await.unwrap();
    let v = a.load().await.unwrap();
    assert!(v.leader.is_none() && v.initialize.is_none() && v.members.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expiry_removes_member_and_leader_keys_and_update_leader_recovers() {
    let c = etcd1(24008).await;
    let d = dcs(&c, Duration::from_secs(3)).await;
    let watcher = dcs(&c, Duration::from_secs(3)).await;
    let name = MemberName::from("n1");
    let old = d.ensure_lease(Duration::from_secs(2)).await.unwrap();
    d.touch_member(&name, &member("n1", "primary"))
        .await
        .unwrap();
    assert!(d.acquire_leader(&name).await.unwrap());

    // No keepalives: both keys vanish with the lease (TTL 2 s, etcd checks every 500 ms).
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let v = watcher.load().await.unwrap();
        if v.leader.is_none() && v.members.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "keys still present 6 s after lease TTL 2 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(matches!(d.keepalive().await, Err(DcsError::LeaseNotFound)));

    // update_leader grants a fresh lease and re-creates the vanished key on it.
    assert!(d.update_leader(&name).await.unwrap());
    let new = d.current_lease().unwrap();
    assert_ne!(new, old);
    let v = watcher.load().await.unwrap();
    assert_eq!(v.leader.as_ref().unwrap().lease, Some(new));
    // touch_member notices the lease changed and rewrites the member key.
    d.touch_member(&name, &member("n1", "primary"))
        .await
        .unwrap();
    assert_eq!(
        watcher.load().await.unwrap().members[&name].lease,
        Some(new)
    );
    // A TTL change grants a new lease (the old one is not revoked, keys stay until moved).
    let l3 = d.ensure_lease(Duration::from_secs(3)).await.unwrap();
    assert_ne!(l3, new);
    assert!(
        watcher.load().await.unwrap().leader.is_some(),
        "old lease not revoked"
    );
    assert!(d.update_leader(&name).await.unwrap());
    assert_eq!(
        watcher.load().await.unwrap().leader.unwrap().lease,
        Some(l3),
        "re-attached"
    );
    assert_eq!(
        d.ensure_lease(Duration::from_secs(3)).await.unwrap(),
        l3,
        "same TTL keeps the lease"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_agent_reattaches_leader_key_that_names_it() {
    let c = etcd1(24010).await;
    let name = MemberName::from("n1");
    let before = dcs(&c, Duration::from_secs(3)).await;
    before.ensure_lease(Duration::from_secs(30)).await.unwrap();
    assert!(before.acquire_leader(&name).await.unwrap());
    let old = before.current_lease();
    drop(before); // process "restart": the old lease is still alive in etcd

    let after = dcs(&c, Duration::from_secs(3)).await;
    let new = after.ensure_lease(Duration::from_secs(30)).await.unwrap();
    assert_ne!(Some(new), old);
    assert!(
        after.update_leader(&name).await.unwrap(),
        "key still names us: re-attach"
    );
    let v = after.load().await.unwrap();
    assert_eq!(
        v.leader.unwrap().lease,
        Some(new),
        "leader key moved to the new lease"
    );

    // A different agent that is not named in the key cannot take it via update_leader.
    let other = dcs(&c, Duration::from_secs(3)).await;
    other.ensure_lease(Duration::from_secs(30)).await.unwrap();
    assert!(!other.update_leader(&MemberName::from("n2")).await.unwrap());
    assert_eq!(other.load().await.unwrap().leader.unwrap().lease, Some(new));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn touch_member_skips_unchanged_writes_but_rewrites_after_removal() {
    let c = etcd1(24012).await;
    let d = dcs(&c, Duration::from_secs(3)).await;
    let name = MemberName::from("n1");
    assert!(
        matches!(
            d.touch_member(&name, &member("n1", "replica")).await,
            Err(DcsError::LeaseNotFound)
        ),
        "no lease before ensure_lease"
    );
    d.ensure_lease(Duration::from_secs(30)).await.unwrap();
    let m = member("n1", "replica");
    d.touch_member(&name, &m).await.unwrap();
    let r1 = d.load().await.unwrap().members[&name].revision;
    d.touch_member(&name, &m).await.unwrap();
    let r2 = d.load().await.unwrap().members[&name].revision;
    assert_eq!(r1, r2, "unchanged data on the same lease is not rewritten");
    d.touch_member(&name, &member("n1", "primary"))
        .await
        .unwrap();
    let v = d.load().await.unwrap();
    assert!(v.members[&name].revision > r2);
    assert_eq!(v.members[&name].data.role, "primary");

    // Someone deletes our key (patronictl remove); after the next load, touch rewrites it.
    c.etcdctl(&["del", &format!("{BASE}members/n1")]);
    assert!(d.load().await.unwrap().members.is_empty());
    d.touch_member(&name, &member("n1", "primary"))
        .await
        .unwrap();
    assert!(d.load().await.unwrap().members.contains_key(&name));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_change_wakes_within_ms_of_leader_key_expiry() {
    let c = etcd1(24014).await;
    let holder = dcs(&c, Duration::from_secs(3)).await;
    let replica = Arc::new(dcs(&c, Duration::from_secs(3)).await);
    let name = MemberName::from("leader1");
    holder.ensure_lease(Duration::from_secs(2)).await.unwrap();
    assert!(holder.acquire_leader(&name).await.unwrap());

    // Timeout path: nothing changes -> false after the timeout, not before.
    let v = replica.load().await.unwrap();
    let t = Instant::now();
    assert!(
        !replica
            .wait_for_change(v.revision, Duration::from_millis(300))
            .await
    );
    assert!(t.elapsed() >= Duration::from_millis(290));

    // A change made between load() and wait_for_change() is still reported at once.
    let v = replica.load().await.unwrap();
    holder
        .set_status(&Status {
            optime: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let t = Instant::now();
    assert!(
        replica
            .wait_for_change(v.revision, Duration::from_secs(5))
            .await
    );
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "missed change not reported promptly"
    );

    // The measurement: keepalives stopped; a poller records when `leader` is actually gone.
    let v = replica.load().await.unwrap();
    assert!(v.leader.is_some());
    let poll_dcs = dcs(&c, Duration::from_secs(3)).await;
    // The poller brackets the deletion: present at `last_present`, gone at `first_absent`.
    let poller = tokio::spawn(async move {
        let mut last_present = Instant::now();
        loop {
            let before = Instant::now();
            if poll_dcs.load().await.unwrap().leader.is_none() {
                return (last_present, Instant::now());
            }
            last_present = before;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let mut after = v.revision;
    let woke_at = loop {
        assert!(
            replica.wait_for_change(after, Duration::from_secs(6)).await,
            "no wakeup"
        );
        let now = Instant::now();
        let v2 = replica.load().await.unwrap();
        if v2.leader.is_none() {
            break now;
        }
        after = v2.revision;
    };
    let (last_present, first_absent) = poller.await.unwrap();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    // The deletion happened after `last_present` was sampled, so this bounds the latency.
    let upper = ms(woke_at.saturating_duration_since(last_present));
    let lower = ms(woke_at.saturating_duration_since(first_absent));
    eprintln!(
        "leader-expiry wakeup latency: <= {upper:.1} ms after the key was deleted \
         (poller saw it gone {:.1} ms after the wakeup; lower bound {lower:.1} ms)",
        ms(first_absent.saturating_duration_since(woke_at))
    );
    assert!(
        upper < 300.0,
        "wait_for_change woke up to {upper} ms after the key was gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_dcs_stops_its_watch_task() {
    let c = etcd1(24020).await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let baseline = metrics.num_alive_tasks();
    let d = dcs(&c, Duration::from_secs(3)).await;
    let rev = d.load().await.unwrap().revision;
    assert!(!d.wait_for_change(rev, Duration::from_millis(200)).await);
    assert!(metrics.num_alive_tasks() > baseline, "watch task running");
    drop(d);
    let deadline = Instant::now() + Duration::from_secs(3);
    while metrics.num_alive_tasks() > baseline {
        assert!(
            Instant::now() < deadline,
            "tasks still alive after drop: {}",
            metrics.num_alive_tasks()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_fail_within_retry_timeout_when_etcd_is_down_and_recover_after_restart() {
    let retry = Duration::from_secs(2);
    let slack = Duration::from_millis(600);
    // Nothing listens here at all: connect must give up in time, new_lazy must not do I/O.
    let t = Instant::now();
    let r = EtcdDcs::connect(
        vec!["http://127.0.0.1:24099".into()],
        BASE.into(),
        retry,
        None,
    )
    .await;
    assert!(
        matches!(r, Err(DcsError::Unavailable(_))),
        "connect to nothing: {:?}",
        r.err()
    );
    assert!(
        t.elapsed() < retry + slack,
        "connect took {:?}",
        t.elapsed()
    );

    let mut c = etcd1(24016).await;
    let d = Arc::new(EtcdDcs::new_lazy(c.endpoints(), BASE.into(), retry, None).unwrap());
    let name = MemberName::from("n1");
    d.ensure_lease(Duration::from_secs(30)).await.unwrap();
    d.touch_member(&name, &member("n1", "primary"))
        .await
        .unwrap();
    assert!(d.acquire_leader(&name).await.unwrap());
    let rev = d.load().await.unwrap().revision;
    assert!(
        !d.wait_for_change(rev, Duration::from_millis(100)).await,
        "starts the watch"
    );

    c = tokio::task::spawn_blocking(move || {
        c.stop_all();
        c
    })
    .await
    .unwrap();

    let checks: Vec<(&str, Result<(), DcsError>)> = vec![
        ("load", timed(retry + slack, d.load()).await.map(|_| ())),
        ("keepalive", timed(retry + slack, d.keepalive()).await),
        (
            "update_leader",
            timed(retry + slack, d.update_leader(&name))
                .await
                .map(|_| ()),
        ),
        (
            "set_status",
            timed(retry + slack, d.set_status(&Status::default())).await,
        ),
        (
            "touch_member",
            timed(retry + slack, d.touch_member(&name, &member("n1", "x"))).await,
        ),
    ];
    for (what, r) in checks {
        assert!(
            matches!(r, Err(DcsError::Unavailable(_))),
            "{what} with etcd down: {r:?}"
        );
    }
    let t = Instant::now();
    assert!(!d.wait_for_change(rev, Duration::from_millis(300)).await);
    assert!(t.elapsed() < Duration::from_millis(600));

    let _cluster = tokio::task::spawn_blocking(move || {
        c.start_all();
        c
    })
    .await
    .unwrap();

    // Recovery: the same instance works again, lease and leader key survived the restart.
    let v = d.load().await.expect("load after etcd restart");
    assert_eq!(v.leader_name(), Some(&name));
    assert!(d.update_leader(&name).await.unwrap());
    // The watch task reconnected too.
    let v = d.load().await.unwrap();
    let waiter = {
        let d = d.clone();
        tokio::spawn(async move { d.wait_for_change(v.revision, Duration::from_secs(5)).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    d.set_status(&Status {
        optime: 7,
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(waiter.await.unwrap(), "watch resumed after etcd restart");
}

/// Awaits `f`, failing the test if it does not return within `limit`.
async fn timed<T>(limit: Duration, f: impl std::future::Future<Output = T>) -> T {
    let t = Instant::now();
    let r = tokio::time::timeout(limit, f)
        .await
        .expect("call hung past retry_timeout");
    assert!(t.elapsed() <= limit);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_working_with_one_of_three_members_killed() {
    let mut c = tokio::task::spawn_blocking(|| EtcdCluster::start(3, 24040))
        .await
        .unwrap();
    let retry = Duration::from_secs(4);
    let d = Arc::new(dcs(&c, retry).await);
    let name = MemberName::from("n1");
    d.ensure_lease(Duration::from_secs(30)).await.unwrap();
    assert!(d.acquire_leader(&name).await.unwrap());
    let rev = d.load().await.unwrap().revision;
    assert!(
        !d.wait_for_change(rev, Duration::from_millis(50)).await,
        "starts the watch"
    );

    // Kill the member the client is talking to first (endpoint 0).
    let _cluster = tokio::task::spawn_blocking(move || {
        c.kill(0);
        c
    })
    .await
    .unwrap();

    for i in 0..5 {
        let t = Instant::now();
        let round = |t: Instant| eprintln!("round {i} with endpoint 0 dead: {:?}", t.elapsed());
        let v = d
            .load()
            .await
            .unwrap_or_else(|e| panic!("load #{i} with a member dead: {e}"));
        assert_eq!(v.leader_name(), Some(&name));
        assert!(d.update_leader(&name).await.unwrap());
        d.set_status(&Status {
            optime: i,
            ..Default::default()
        })
        .await
        .unwrap();
        round(t);
        // Round 0 may include a raft election (if the dead member led); later rounds must not
        // pay for the dead endpoint again.
        assert!(
            i == 0 || t.elapsed() < Duration::from_secs(1),
            "round {i} took {:?}",
            t.elapsed()
        );
    }
    // The watch moved off the dead member as well.
    let v = d.load().await.unwrap();
    let waiter = {
        let d = d.clone();
        tokio::spawn(async move { d.wait_for_change(v.revision, Duration::from_secs(5)).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    d.set_status(&Status {
        optime: 99,
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(waiter.await.unwrap(), "watch works with one member dead");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticates_with_credentials_and_never_reveals_the_password() {
    let c = etcd1(24022).await;
    let password = "s3cret-Pw-77";
    c.etcdctl(&["user", "add", &format!("root:{password}")]);
    c.etcdctl(&["auth", "enable"]);
    let retry = Duration::from_secs(2);
    let creds = Some(("root".to_string(), password.to_string()));
    let d = EtcdDcs::connect(c.endpoints(), BASE.into(), retry, creds)
        .await
        .expect("auth connect");
    let name = MemberName::from("n1");
    d.ensure_lease(Duration::from_secs(30)).await.unwrap();
    d.touch_member(&name, &member("n1", "replica"))
        .await
        .unwrap();
    let v = d.load().await.unwrap();
    assert!(v.members.contains_key(&name));
    // The watch connection authenticates too.
    let waiter = d.wait_for_change(v.revision, Duration::from_secs(5));
    let writer = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        d.set_status(&Status {
            optime: 3,
            ..Default::default()
        })
        .await
        .unwrap();
    };
    let (woke, ()) = tokio::join!(waiter, writer);
    assert!(woke, "authenticated watch delivers changes");

    let bad = Some(("root".to_string(), "wrong-Pw-88".to_string()));
    let t = Instant::now();
    let e = EtcdDcs::connect(c.endpoints(), BASE.into(), retry, bad)
        .await
        .err()
        .expect("bad password");
    assert!(t.elapsed() < retry + Duration::from_millis(600));
    eprintln!("bad password: {e}");
    assert!(
        !e.to_string().contains("wrong-Pw-88"),
        "password leaked: {e}"
    );
    let e = EtcdDcs::connect(c.endpoints(), BASE.into(), retry, None)
        .await
        .err()
        .expect("no creds");
    eprintln!("no credentials: {e}");
    assert!(!e.to_string().contains(password), "password leaked: {e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_member_costs_one_attempt_not_the_whole_budget() {
    let c = tokio::task::spawn_blocking(|| EtcdCluster::start(3, 24050))
        .await
        .unwrap();
    let retry = Duration::from_secs(4);
    let d = dcs(&c, retry).await;
    let name = MemberName::from("n1");
    d.ensure_lease(Duration::from_secs(30)).await.unwrap();
    assert!(d.acquire_leader(&name).await.unwrap());
    // Endpoint 0 stops answering without closing its sockets.
    c.freeze(0);
    let t = Instant::now();
    let first = d.load().await;
    eprintln!("first call with endpoint 0 hung: {:?}", t.elapsed());
    let first = first.expect("load with one member hung");
    assert_eq!(first.leader_name(), Some(&name));
    assert!(t.elapsed() < retry, "took {:?}", t.elapsed());
    // If the hung member was the raft leader the others need an election first; once they
    // have a leader, calls must be fast again: we stay on a healthy member after rotating.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !tokio::task::block_in_place(|| c.is_healthy(1) && c.is_healthy(2)) {
        assert!(
            Instant::now() < deadline,
            "no raft leader among the healthy members"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t = Instant::now();
    for _ in 0..3 {
        assert!(d.update_leader(&name).await.unwrap());
    }
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "sticking to the hung member: {:?}",
        t.elapsed()
    );
    c.thaw(0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_endpoints_take_over_and_the_leader_keeps_its_lease() {
    let mut c = tokio::task::spawn_blocking(|| EtcdCluster::start(3, 24070))
        .await
        .unwrap();
    let retry = Duration::from_secs(3);
    // Configured with member 0 only.
    let d = Arc::new(
        EtcdDcs::connect(vec![c.endpoint(0)], BASE.to_string(), retry, None)
            .await
            .unwrap(),
    );
    let name = MemberName::from("n1");
    d.ensure_lease(Duration::from_secs(30)).await.unwrap();
    assert!(d.acquire_leader(&name).await.unwrap());
    d.touch_member(&name, &member("n1", "primary"))
        .await
        .unwrap();
    let lease = d.current_lease().unwrap();
    let rev = d.load().await.unwrap().revision;
    assert!(
        !d.wait_for_change(rev, Duration::from_millis(50)).await,
        "starts the watch"
    );

    // A reload names members 1 and 2; then member 0 dies. Everything goes on through the
    // new list, on the same lease.
    d.set_endpoints(vec![c.endpoint(1), c.endpoint(2)]).unwrap();
    let c = tokio::task::spawn_blocking(move || {
        c.kill(0);
        c
    })
    .await
    .unwrap();
    assert!(d.update_leader(&name).await.unwrap(), "still the leader");
    d.keepalive().await.unwrap();
    assert_eq!(d.current_lease(), Some(lease));
    let v = d.load().await.unwrap();
    let leader = v.leader.as_ref().expect("leader key");
    assert_eq!(leader.name, name);
    assert_eq!(
        leader.lease,
        Some(lease),
        "the leader key is on the same lease"
    );
    let waiter = {
        let d = d.clone();
        tokio::spawn(async move { d.wait_for_change(v.revision, Duration::from_secs(10)).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    d.set_status(&Status {
        optime: 7,
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(waiter.await.unwrap(), "the watch follows the new endpoints");
    drop(c);
}
