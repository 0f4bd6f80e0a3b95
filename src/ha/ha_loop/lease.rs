//! The leader lock and our lease: renewing the lock (inside the renewal budget of
//! [`crate::ha::timing`]), refreshing the lease of a non-leader, the leader race, giving the
//! lock up, and the deadline every DCS call of the loop runs under.

use super::*;
use crate::ha::FailsafeRound;
use crate::ha::timing::{
    FAILSAFE_POST_TIMEOUT, RENEWAL_RETRY_PAUSE, RenewalBudget, renewal_budget,
};

impl HaLoop {
    /// Wraps a DCS call in a retry_timeout deadline (belt and braces: the trait promises it).
    pub(super) async fn bounded<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, DcsError>>,
    ) -> Result<T, DcsError> {
        match tokio::time::timeout(self.retry_timeout(), fut).await {
            Ok(r) => r,
            Err(_) => Err(DcsError::Unavailable("timed out".into())),
        }
    }

    /// Renews the leader lock, retrying a failed attempt (the DCS client has already moved on
    /// to the other endpoints inside it) until the renewal succeeds, the lock turns out to be
    /// somebody else's, or the [`demotion_deadline`](crate::ha::timing::demotion_deadline)
    /// passes — the whole lease, not one `retry_timeout` (see `ha::timing` for why that is
    /// safe). `cycle_start` is when the cycle began; each attempt counts its lease from its
    /// own send instant.
    pub(super) async fn renew(&mut self, cycle_start: Instant) -> Renewal {
        let ttl = self.ttl();
        let retry = self.retry_timeout();
        let mut sent = cycle_start;
        loop {
            let fence = self.fence_timeout();
            let failsafe = self.config.failsafe_mode();
            let budget = match renewal_budget(
                self.held_lock,
                self.lease_ok_sent,
                sent,
                ttl,
                retry,
                fence,
                failsafe,
            ) {
                RenewalBudget::Attempt(b) => b,
                RenewalBudget::TooLate { lock_expired } => {
                    warn!("leader lease too close to expiry to risk a renewal");
                    // Past the lease deadline the lock may already belong to someone else:
                    // stop counting it as ours (the decision demotes a primary on this
                    // failed renewal), so later cycles go through the normal,
                    // time-consuming lease refresh instead of retrying this instant refusal
                    // in a hot loop.
                    if lock_expired {
                        self.held_lock = false;
                    }
                    return Renewal::Failed;
                }
            };
            match self.renew_once(budget).await {
                Ok(true) => {
                    self.renewed(sent);
                    return Renewal::Renewed;
                }
                Ok(false) => {
                    self.held_lock = false;
                    return Renewal::Lost;
                }
                Err(e) => {
                    // Raised once per episode: the log says when renewals started failing and
                    // (on the clear) when they recovered, not every attempt.
                    self.conditions.raise(Condition::LeaderRenewalFailing, &e);
                    if !self.held_lock || self.failsafe_active {
                        // A re-attach of a key that names us (no lease of ours yet), or a
                        // primary already running in failsafe mode (its lease is the members'
                        // acceptance, renewed by the round that follows): one attempt, the
                        // normal cycle retries.
                        return Renewal::Failed;
                    }
                    tokio::time::sleep(RENEWAL_RETRY_PAUSE).await;
                    sent = Instant::now();
                }
            }
        }
    }

    /// One attempt of the renewal, bounded by `budget`.
    async fn renew_once(&self, budget: Duration) -> Result<bool, DcsError> {
        let dcs = self.dcs.clone();
        let me = self.me.clone();
        let ttl = self.ttl();
        let attempt = async {
            match dcs.update_leader(&me).await {
                Err(DcsError::LeaseNotFound) => {
                    // Our lease expired (e.g. a long pause of the process): take a new one; the
                    // update re-attaches the key if it still names us.
                    dcs.ensure_lease(ttl).await?;
                    dcs.update_leader(&me).await
                }
                r => r,
            }
        };
        match tokio::time::timeout(budget, attempt).await {
            Ok(r) => r,
            Err(_) => Err(DcsError::Unavailable("renewal timed out".into())),
        }
    }

    /// Bookkeeping of a successful renewal sent at `sent`.
    fn renewed(&mut self, sent: Instant) {
        if self.failsafe_active {
            info!("leader lock updated again: failsafe mode no longer active");
            self.failsafe_active = false;
        }
        self.lease_alive_since(sent);
        self.conditions.clear(Condition::LeaderRenewalFailing);
    }

    /// No other node can lead before `sent + ttl` (an acknowledged renewal, or a failsafe round
    /// every member accepted, sent at `sent`): count the lease from there and pet the fence.
    pub(super) fn lease_alive_since(&mut self, sent: Instant) {
        self.lease_ok_sent = Some(sent);
        self.held_lock = true;
        // Pet the watchdog only after a successful renewal: a hung loop then cannot keep the
        // host alive past its lease.
        let pet = {
            let mut wd = self.wd();
            if wd.is_open() {
                Some(wd.keepalive_since(sent.into_std()))
            } else {
                None
            }
        };
        match pet {
            Some(Err(e)) => {
                self.conditions
                    .raise(Condition::WatchdogKeepaliveFailing, &e);
            }
            Some(Ok(())) => {
                self.conditions.clear(Condition::WatchdogKeepaliveFailing);
            }
            None => {}
        }
    }

    /// The leader's failsafe round (Patroni's `check_failsafe_topology`): `POST /failsafe` to
    /// every other member of the last `failsafe` key we read; accepted only when all answer 200.
    /// An accepted round counts as a renewal sent when the round was sent: each member that
    /// accepted stays out of any race for ttl from receiving it, which is later.
    pub(super) async fn failsafe_round(&mut self) -> FailsafeRound {
        let sent = Instant::now();
        let refused = |member: &MemberName, reason: &str| FailsafeRound::Refused {
            member: member.clone(),
            reason: reason.to_string(),
        };
        let Some(listed) = self.last_view.as_ref().and_then(|v| v.failsafe_members()) else {
            return refused(&self.me, "no failsafe key was read before the DCS was lost");
        };
        if !listed.contains_key(&self.me) {
            return refused(&self.me, "is not listed in the failsafe key");
        }
        let others: Vec<(MemberName, String)> =
            listed.into_iter().filter(|(n, _)| *n != self.me).collect();
        let me = self.member_data(&self.last_pg, false);
        let body = serde_json::json!({
            "name": self.me.as_str(),
            "conn_url": me.conn_url,
            "api_url": me.api_url,
        });
        let answers = self
            .peers
            .announce_failsafe(&others, &body, FAILSAFE_POST_TIMEOUT)
            .await;
        if let Some((m, Err(e))) = answers.into_iter().find(|(_, r)| r.is_err()) {
            return refused(&m, &e);
        }
        if !self.failsafe_active {
            warn!("DCS lost: running as the leader in failsafe mode, all members accepted");
            self.failsafe_active = true;
        }
        self.lease_alive_since(sent);
        FailsafeRound::Accepted
    }

    /// Keeps a non-leader's lease (and with it the member key) alive.
    pub(super) async fn refresh_lease(&mut self, sent: Instant) {
        let ttl = self.ttl();
        let dcs = self.dcs.clone();
        let r = self
            .bounded(async {
                dcs.ensure_lease(ttl).await?;
                match dcs.keepalive().await {
                    Err(DcsError::LeaseNotFound) => {
                        dcs.ensure_lease(ttl).await?;
                        Ok(())
                    }
                    r => r,
                }
            })
            .await;
        match r {
            Ok(()) => self.lease_ok_sent = Some(sent),
            Err(e) => debug!(error = %e, "lease refresh failed"),
        }
    }

    /// The race: create the leader key; on success clear the failover request and promote.
    pub(super) async fn acquire(&mut self, i: &Inputs) -> (Decision, bool) {
        let ttl = self.ttl();
        let dcs = self.dcs.clone();
        let me = self.me.clone();
        let sent = Instant::now();
        let r = self
            .bounded(async {
                dcs.ensure_lease(ttl).await?;
                dcs.acquire_leader(&me).await
            })
            .await;
        match r {
            Ok(true) => {
                self.held_lock = true;
                self.lease_ok_sent = Some(sent);
                // An announcement from the previous leader no longer matters: we lead.
                self.failsafe_board.clear();
                if let Some(v) = &i.cluster
                    && let Some((f, rev)) = &v.failover
                    && !f.is_empty()
                {
                    // Paused with leader+candidate: keep the candidate request alive as
                    // a plain failover (Patroni).
                    let next = if i.paused() && f.leader.is_some() && f.member.is_some() {
                        Failover {
                            member: f.member.clone(),
                            ..Default::default()
                        }
                    } else {
                        Failover::default()
                    };
                    let _ = self.bounded(self.dcs.set_failover(&next, Some(*rev))).await;
                }
                if !i.pg.is_running_primary() {
                    self.promote(i).await;
                }
                (Decision::PromotedByLock, false)
            }
            Ok(false) => (Decision::FollowAfterFailedRace, true),
            Err(e) => {
                warn!(error = %e, "leader race failed");
                (Decision::FollowAfterFailedRace, false)
            }
        }
    }

    /// Gives up the lock. `release`: delete the key (CAS on our name); otherwise it is left to
    /// expire or is already someone else's.
    pub(super) async fn lose_lock(&mut self, release: bool) {
        if release
            && (self.held_lock
                || self.last_view.as_ref().and_then(|v| v.leader_name()) == Some(&self.me))
            && let Err(e) = self.bounded(self.dcs.release_leader(&self.me)).await
        {
            warn!(error = %e, "failed to release the leader key");
        }
        self.held_lock = false;
        self.failsafe_active = false;
        self.watchdog_close();
    }
}
