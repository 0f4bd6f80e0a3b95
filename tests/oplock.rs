//! The day-2 lock on real etcd: a second run waits for and then reports the holder; a holder
//! that died without releasing (its renewals stopped) lets go within the lease TTL, so a
//! re-run converges; a released lock is free at once.

use std::time::Duration;

use pgherd::provision::oplock::{LOCK_TTL, OpLock, OpLockError, lock_key};

mod common;
use common::etcd::EtcdCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_day2_job_at_a_time_and_a_dead_holder_lets_go_within_the_ttl() {
    let c = tokio::task::spawn_blocking(|| EtcdCluster::start(1, 24110))
        .await
        .unwrap();
    let eps = c.endpoints();
    let key = lock_key("/service/", "locktest");
    let quiet = |_: &str| {};

    let first = OpLock::acquire(&eps, &key, "apply by alice", Duration::ZERO, &quiet)
        .await
        .expect("a free lock is taken");
    // The key is outside Patroni's namespace.
    assert!(c.raw_get(&key).is_some());
    assert!(!key.starts_with("/service/"));

    match OpLock::acquire(&eps, &key, "apply by bob", Duration::from_secs(3), &quiet).await {
        Err(OpLockError::Held { holder, .. }) => assert_eq!(holder, "apply by alice"),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("two holders of one day-2 lock"),
    }

    // Released: free at once.
    first.release().await;
    let second = OpLock::acquire(&eps, &key, "apply by bob", Duration::ZERO, &quiet)
        .await
        .expect("a released lock is free");

    // Dropped without release, like a CLI killed mid-run: renewals stop and the lease expires.
    drop(second);
    let third = OpLock::acquire(
        &eps,
        &key,
        "apply by carol",
        Duration::from_secs(LOCK_TTL as u64 + 15),
        &quiet,
    )
    .await
    .expect("a dead holder's lock expires and is taken");
    third.release().await;
}
