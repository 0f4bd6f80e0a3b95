//! The etcd backend and the in-memory fake decode the same key set, malformed values included,
//! into the same `ClusterView`: the simulation (memory) tests the decoder production (etcd)
//! runs. Real etcd on ports 24090-24091.

#[path = "common/etcd.rs"]
mod etcd_cluster;

use std::time::Duration;

use etcd_cluster::EtcdCluster;
use pgherd::dcs::etcd::EtcdDcs;
use pgherd::dcs::memory::MemoryStore;
use pgherd::dcs::{ClusterView, Dcs, MemberData};
use pgherd::types::{LeaseId, MemberName, Revision};

const BASE: &str = "/service/batman/";

/// Raw keys (relative to the cluster prefix), as an operator or an older Patroni could have
/// written them. Several are malformed on purpose.
const RAW_KEYS: &[(&str, &str)] = &[
    ("initialize", "7268616322854375442"),
    // Not JSON: no usable config.
    ("config", "not json"),
    // Empty leader value: Patroni reads the cluster as unlocked.
    ("leader", ""),
    // Legacy plain-string failover.
    ("failover", "node0:node2"),
    // Unparsable sync: empty state, but its revision is kept for the next CAS.
    ("sync", "{garbage"),
    // Legacy optime key, used while there is no `status` key.
    ("optime/leader", "12345"),
    (
        "history",
        r#"[[1,25623960,"no recovery target specified","2019-09-23T16:57:57+02:00","node1"]]"#,
    ),
    ("failsafe", r#"{"node1":"http://10.0.0.1:8008/patroni"}"#),
    // A member value that is not JSON: still a member, with empty data.
    ("members/garbage", "}{"),
    // Legacy connection-string member.
    (
        "members/legacy",
        "postgres://10.0.0.3:5432/postgres?application_name=http://10.0.0.3:8008/patroni",
    ),
    // A mistyped optional field: the strings survive.
    (
        "members/mistyped",
        r#"{"api_url":"http://10.0.0.4:8008/patroni","xlog_location":"x"}"#,
    ),
    // Not member keys (exactly one `/` after `members`), nor Patroni keys.
    ("members/a/b", "{}"),
    ("members/", "{}"),
    ("unknown", "1"),
];

fn good_member() -> MemberData {
    MemberData {
        conn_url: "postgres://10.0.0.1:5432/postgres".into(),
        api_url: "http://10.0.0.1:8008/patroni".into(),
        state: "running".into(),
        role: "replica".into(),
        version: "4.1.5".into(),
        xlog_location: Some(67420024),
        timeline: Some(1),
        ..Default::default()
    }
}

/// Revisions and lease ids are each store's own numbering: keep only whether a key carries
/// one, and how the revisions of the keys are ordered relative to the first write.
fn normalized(mut v: ClusterView, first_rev: i64) -> ClusterView {
    let rel = |r: Revision| Revision(r.0 - first_rev);
    let lease = |l: Option<LeaseId>| l.map(|_| LeaseId(1));
    v.revision -= first_rev;
    if let Some((_, r)) = v.config.as_mut() {
        *r = rel(*r);
    }
    if let Some((_, r)) = v.failover.as_mut() {
        *r = rel(*r);
    }
    if let Some((_, r)) = v.sync.as_mut() {
        *r = rel(*r);
    }
    if let Some(l) = v.leader.as_mut() {
        l.revision = rel(l.revision);
        l.lease = lease(l.lease);
    }
    for m in v.members.values_mut() {
        m.revision = rel(m.revision);
        m.lease = lease(m.lease);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_and_memory_decode_the_same_keys_including_malformed_ones_into_the_same_view() {
    let cluster = tokio::task::spawn_blocking(|| EtcdCluster::start(1, 24090))
        .await
        .unwrap();
    let etcd = EtcdDcs::connect(
        cluster.endpoints(),
        BASE.to_string(),
        Duration::from_secs(3),
        None,
    )
    .await
    .expect("connect");
    let mut raw = etcd_client::Client::connect(cluster.endpoints(), None)
        .await
        .expect("raw etcd client");
    let store = MemoryStore::new(Duration::from_secs(3));
    let memory = store.handle("good");

    // The same writes, in the same order, on both stores: raw keys, then one member on its
    // agent's lease through the trait.
    let etcd_first = etcd.load().await.unwrap().revision + 1;
    let memory_first = store.revision() + 1;
    for (k, v) in RAW_KEYS {
        raw.put(format!("{BASE}{k}"), *v, None).await.unwrap();
        store.put(k, v);
    }
    let good = MemberName::from("good");
    for d in [&etcd as &dyn Dcs, &memory as &dyn Dcs] {
        d.ensure_lease(Duration::from_secs(30)).await.unwrap();
        d.touch_member(&good, &good_member()).await.unwrap();
    }

    let from_etcd = normalized(etcd.load().await.unwrap(), etcd_first);
    let from_memory = normalized(memory.load().await.unwrap(), memory_first);
    assert_eq!(from_etcd, from_memory);

    // And the view is Patroni's reading of those keys.
    let v = &from_etcd;
    assert_eq!(v.initialize.as_deref(), Some("7268616322854375442"));
    assert!(v.config.is_none(), "an unparsable config is no config");
    assert!(v.leader.is_none(), "an empty leader value is unlocked");
    let f = v.failover_request().expect("legacy failover string");
    assert_eq!(
        (f.leader.as_deref(), f.member.as_deref()),
        (Some("node0"), Some("node2"))
    );
    let (sync, _) = v
        .sync
        .as_ref()
        .expect("an invalid sync key keeps its revision");
    assert_eq!(*sync, Default::default());
    assert!(v.sync_state().is_none(), "and means no sync state");
    assert_eq!(v.status.optime, 12345, "legacy optime/leader as fallback");
    assert_eq!(v.history.len(), 1);
    assert!(v.failsafe.is_some());
    let names: Vec<&str> = v.members.keys().map(MemberName::as_str).collect();
    assert_eq!(names, ["garbage", "good", "legacy", "mistyped"]);
    assert_eq!(
        v.members[&MemberName::from("garbage")].data,
        MemberData::default()
    );
    assert_eq!(
        v.members[&MemberName::from("legacy")].data.api_url,
        "http://10.0.0.3:8008/patroni"
    );
    assert_eq!(
        v.members[&MemberName::from("mistyped")].data.api_url,
        "http://10.0.0.4:8008/patroni"
    );
    let good_key = &v.members[&good];
    assert_eq!(good_key.data, good_member());
    assert!(good_key.lease.is_some(), "member keys sit on the lease");

    // Once a `status` key exists it wins over the legacy key, on both.
    raw.put(format!("{BASE}status"), r#"{"optime":5}"#, None)
        .await
        .unwrap();
    store.put("status", r#"{"optime":5}"#);
    let from_etcd = normalized(etcd.load().await.unwrap(), etcd_first);
    let from_memory = normalized(memory.load().await.unwrap(), memory_first);
    assert_eq!(from_etcd, from_memory);
    assert_eq!(from_etcd.status.optime, 5);
}
