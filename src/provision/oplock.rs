//! One day-2 job per cluster at a time: a lock key in the cluster's etcd, outside Patroni's
//! namespace (`/pgherd-op<namespace><scope>`, so patronictl and the agents never see it), held
//! under an etcd lease that the running CLI keeps alive. Two `apply` (or `restart --pending`)
//! runs against one cluster would otherwise interleave their restarts and membership changes.
//!
//! A CLI that dies (SIGKILL, a cut SSH session to the admin host) stops renewing, so its lock
//! expires with the lease within [`LOCK_TTL`]; a run that finds the lock held waits up to
//! [`LOCK_WAIT`] (longer than the TTL) before giving up with the holder's description, so a
//! re-run right after a crash converges instead of failing. The lock records who holds it
//! (command, user, host, pid, start time) and is deleted by revoking the lease when the run
//! ends. Reconciliation itself needs no journal: every step re-reads the cluster (postconditions).

use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, PutOptions, Txn, TxnOp};
use tokio_util::sync::CancellationToken;

/// The lock's lease: a crashed holder lets go within this. Long enough that a loaded machine
/// renewing every [`KEEPALIVE_EVERY`] never loses it, short enough that a re-run after a crash
/// waits only seconds.
pub const LOCK_TTL: i64 = 30;
/// Renewal interval: three renewals per TTL, so two may fail before the lock lapses.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(10);
/// How long a run waits for a held lock: more than [`LOCK_TTL`], so a holder that died is
/// always waited out.
pub const LOCK_WAIT: Duration = Duration::from_secs(45);
/// Between two attempts to take a held lock.
const RETRY_EVERY: Duration = Duration::from_secs(2);
/// Connecting to etcd and each etcd call.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum OpLockError {
    #[error("cannot reach the cluster's etcd ({endpoints}) to take the day-2 lock")]
    Unreachable {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("timed out talking to etcd ({endpoints}) while taking the day-2 lock")]
    Timeout { endpoints: String },
    #[error(
        "another day-2 job holds the cluster's lock ({holder}); waited {waited:?}: let it finish, or if it died, run again once its lease expires (at most {LOCK_TTL} s)"
    )]
    Held { holder: String, waited: Duration },
}

/// The key of the lock for `scope` in `namespace` (Patroni's, e.g. `/service/`).
pub fn lock_key(namespace: &str, scope: &str) -> String {
    let ns = format!("/{}/", namespace.trim_matches('/'));
    let ns = if ns == "//" { "/".to_string() } else { ns };
    format!("/pgherd-op{ns}{scope}")
}

/// Who holds the lock, as stored in it.
pub fn holder_description(what: &str) -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "?".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    format!(
        "{what} by {user}@{host} pid {} since {}",
        std::process::id(),
        chrono::Utc::now().format("%Y-%m-%d %H:%M:%SZ")
    )
}

/// A held lock; dropping it stops the renewals (the lease then expires), [`OpLock::release`]
/// deletes it at once.
pub struct OpLock {
    client: Client,
    lease: i64,
    stop: CancellationToken,
}

async fn bounded<T>(
    endpoints: &str,
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, OpLockError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(OpLockError::Unreachable {
            endpoints: endpoints.to_string(),
            source,
        }),
        Err(_) => Err(OpLockError::Timeout {
            endpoints: endpoints.to_string(),
        }),
    }
}

impl OpLock {
    /// Takes the lock `key` for `holder`, waiting up to `wait` while someone else holds it
    /// (`waiting` is told who, once).
    pub async fn acquire(
        endpoints: &[String],
        key: &str,
        holder: &str,
        wait: Duration,
        waiting: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<OpLock, OpLockError> {
        let shown = endpoints.join(",");
        let opts = ConnectOptions::new().with_connect_timeout(CALL_TIMEOUT);
        let mut client = bounded(&shown, Client::connect(endpoints, Some(opts))).await?;
        let started = Instant::now();
        let mut told = false;
        loop {
            let lease = bounded(&shown, client.lease_grant(LOCK_TTL, None))
                .await?
                .id();
            let txn = Txn::new()
                .when([Compare::create_revision(key, CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key,
                    holder,
                    Some(PutOptions::new().with_lease(lease)),
                )]);
            let won = bounded(&shown, client.txn(txn)).await?.succeeded();
            if won {
                let stop = CancellationToken::new();
                tokio::spawn(renew(client.clone(), lease, stop.clone()));
                return Ok(OpLock {
                    client,
                    lease,
                    stop,
                });
            }
            let _ = bounded(&shown, client.lease_revoke(lease)).await;
            let current = bounded(&shown, client.get(key, None))
                .await?
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
                .unwrap_or_default();
            if started.elapsed() >= wait {
                return Err(OpLockError::Held {
                    holder: current,
                    waited: started.elapsed(),
                });
            }
            if !told {
                waiting(&format!(
                    "waiting for the cluster's day-2 lock, held by: {current}"
                ));
                told = true;
            }
            tokio::time::sleep(RETRY_EVERY).await;
        }
    }

    /// Deletes the lock now (revokes its lease).
    pub async fn release(mut self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(CALL_TIMEOUT, self.client.lease_revoke(self.lease)).await;
    }
}

impl Drop for OpLock {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The renewal task (named by its span in the caller's logs): one keepalive every
/// [`KEEPALIVE_EVERY`] until stopped. A failed renewal is retried on the next tick; the lease
/// outlives two failures.
async fn renew(mut client: Client, lease: i64, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(KEEPALIVE_EVERY) => {}
        }
        let _ = tokio::time::timeout(CALL_TIMEOUT, client.lease_keep_alive(lease)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::lock_key;

    #[test]
    fn the_lock_lives_outside_patronis_namespace() {
        assert_eq!(lock_key("/service/", "demo"), "/pgherd-op/service/demo");
        assert_eq!(lock_key("service", "demo"), "/pgherd-op/service/demo");
        assert_eq!(lock_key("/", "demo"), "/pgherd-op/demo");
    }
}
