//! Provisioning: inventory → desired state → facts → plan → apply, pyinfra-style, in types.
//!
//! - [`facts`]: read-only facts of a host in one batched command, parsed purely.
//! - [`cluster_facts`]: what the live cluster says (DCS config, agents, etcd members, DCS members).
//! - [`desired`]: the desired state ([`desired::DeploySpec`]): what every host and the cluster should be.
//! - [`plan`]: the pure planner (desired state + facts → [`plan::Plan`]).
//! - [`schedule`]: which playbook step executes each planned change; playbook order checks.
//! - [`apply`]: executes a plan by walking the playbook's steps in order.
//! - [`services`]: systemd vs supervisor mode, run files, start/restart/reload commands.
//! - [`report`]: plan/apply output (change table, diffs, no-change reasons).
//! - [`playbook`]: playbooks as data (the deploy step vocabulary).
//! - [`spec`]: inventory + rendered templates → the desired state.
//! - [`rolling`]: restarts of members pending restart, one at a time, in a safe order.
//! - [`etcd_members`]: etcd membership changes (add as learner, promote, remove) from the inventory.
//! - [`departed`]: PostgreSQL members that left the inventory, removed cleanly (drain, stop, key, slot).

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
