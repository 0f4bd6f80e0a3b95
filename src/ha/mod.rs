//! The HA core: the pure [`decide`] function and its [`Decision`], the [`Inputs`] it decides
//! on, the candidate rules (leader race, switchover, clone source, sync plan), and the
//! observe → decide → act loop [`HaLoop`] that drives the DCS, PostgreSQL, hooks and watchdog
//! through their traits.
//!
//! - [`inputs`]: plain-data observations (no I/O).
//! - [`decision`]: the `Decision` enum and its operator-facing sentences.
//! - [`decide`](mod@decide): the decision function (no I/O; enforced by a test).
//! - [`candidates`]: who may lead / be cloned from / be a sync standby.
//! - [`conditions`]: persistent conditions, logged when they start and end.
//! - [`timing`]: pure timing rules of the leader lock (the renewal budget).
//! - [`leader_upkeep`]: what the leader wants each cycle (slots, `status`, `history`,
//!   `failsafe`).
//! - [`restart`]: when a requested or scheduled restart may run.
//! - [`ha_loop`]: the executor and loop.

pub mod candidates;
pub mod conditions;
pub mod decide;
pub mod decision;
pub mod ha_loop;
pub mod inputs;
pub mod leader_upkeep;
pub mod restart;
pub mod timing;

pub use decide::decide;
pub use decision::{Decision, NotHealthiest};
pub use ha_loop::HaLoop;
pub use inputs::{
    ActionKind, FailsafeRound, Finished, Inputs, LocalFacts, PeerStatus, RejoinMark, Renewal, Tags,
    WatchdogFacts,
};
