//! Provisioning: inventory → desired state → facts → plan → apply, pyinfra-style, in types.
//!
//! The submodules form layers (checked by `tests/layering.rs`); a module imports only modules
//! of lower layers. Lowest first:
//!
//! - [`services`]: systemd vs supervisor mode, run files, start/restart/reload commands;
//!   [`playbook`]: playbooks as data (the deploy step vocabulary, a step expanded for a host);
//!   [`agent_client`]: the one client of the agents' REST API; [`ctl`]: the day-2 verbs
//!   through it; [`oplock`]: the day-2 lock.
//! - [`facts`]: read-only facts of a host in one batched command, parsed purely.
//! - [`desired`]: the desired state ([`desired::DeploySpec`]): what every host and the cluster
//!   should be.
//! - [`remote`]: how hosts and agents are reached (the fleet, SSH specs, the REST client).
//! - The day-2 jobs, each a pure planner plus the step that executes it: [`dcs_config`] (the
//!   cluster-wide settings in the DCS `config` key), [`etcd_members`] (etcd membership changes:
//!   add as learner, promote, remove), [`rolling`] (restarts of members pending restart, one
//!   at a time, in a safe order), [`departed`] (PostgreSQL members that left the inventory,
//!   removed cleanly: drain, stop, key, slot).
//! - [`cluster_facts`]: what the live cluster says, made of the day-2 jobs' facts.
//! - [`plan`]: the pure planner (desired state + facts → [`plan::Plan`]).
//! - [`schedule`]: which playbook step executes each planned change; playbook order checks.
//! - [`spec`]: inventory + rendered templates → the desired state; [`report`]: plan/apply
//!   output (change table, diffs, no-change reasons).
//! - [`apply`]: executes a plan by walking the playbook's steps in order.

pub mod agent_client;
pub mod apply;
pub mod cluster_facts;
pub mod ctl;
pub mod dcs_config;
pub mod departed;
pub mod desired;
pub mod etcd_members;
pub mod facts;
pub mod oplock;
pub mod plan;
pub mod playbook;
pub mod remote;
pub mod report;
pub mod rolling;
pub mod schedule;
pub mod services;
pub mod spec;

/// An error with its `source()` chain on one line (`a: b: c`).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}
