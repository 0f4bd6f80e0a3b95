//! pgherd: highly available PostgreSQL on VMs and bare metal.
//!
//! Crate map:
//! - [`types`]: newtypes (LSN, timeline, member name, lease, revision).
//! - [`files`]: atomic writes of the operator's files (secrets, inventory edits, the CA).
//! - [`config`], [`yaml`]: the agent's node config (patroni.yml-shaped), located YAML errors.
//! - [`dcs`]: the DCS trait, Patroni's key model, etcd and in-memory implementations.
//! - [`pg`]: the PostgreSQL trait and its real (pg_ctl/initdb/...) and fake implementations.
//! - [`ha`]: the pure HA core (`decide`), its `Decision`, and the observe→decide→act loop.
//! - [`status`]: what the loop publishes for the REST API and the commands the API sends back.
//! - [`api`]: the Patroni-compatible REST API (axum).
//! - [`callbacks`], [`watchdog`]: Patroni-style hooks and the watchdog driver.
//! - [`peers`]: fetching other members' `/patroni` status before the leader race.
//! - `testing`: test doubles (recording hooks, fake watchdog) for tests and the simulation;
//!   like every test double (`dcs::memory`, `pg::fake`, `transport::fake`, the peer probes') it is
//!   compiled only for tests and with the `testing` feature, never into the binaries.
//! - [`agent`]: wiring of the `pgherd-agent` daemon.
//! - [`inventory`]: the cluster inventory (validated, located errors) and its secrets.
//! - [`pki`]: the cluster CA and the node certificates it issues, and the planner that keeps,
//!   issues or reissues them.
//! - [`render`]: minijinja rendering of the per-host files (agent config, etcd, HAProxy, units).
//! - [`provision`]: playbooks as data and the provisioning planner.
//! - [`transport`]: reaching hosts for provisioning (SSH, in-memory fake).
//! - [`lab`]: a local multi-host lab built from Linux namespaces (tests and demos).
//! - [`cli`]: the `pgherd` command line (lab, plan, apply, status, check).

pub mod agent;
pub mod api;
pub mod callbacks;
pub mod cli;
pub mod config;
pub mod dcs;
pub mod files;
pub mod ha;
pub mod inventory;
pub mod lab;
pub mod peers;
pub mod pg;
pub mod pki;
pub mod provision;
pub mod render;
pub mod status;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod transport;
pub mod types;
pub mod watchdog;
pub mod yaml;
