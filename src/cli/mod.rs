//! The `pgherd` command line: argument parsing (clap) and the verbs — `lab up|down|status|crash|
//! boot`, `plan`, `apply`, `status`, `check`, and the day-2 verbs of [`ctl`] (`switchover`,
//! `failover`, `restart`, `reinit`, `pause`, `resume`) and `remove`
//! ([`crate::provision::departed`]); `completions` and `man` ([`docs`]). Each verb loads and
//! validates the inventory before touching any host; the binary only maps [`run`]'s result to
//! an exit code.
//!
//! Every verb whose output is a report (`plan`, `apply`, `replace`, `check`, `status`,
//! `remove`, `restart --pending`, `drill`, `lab up`, `lab status`) takes `--json` and then
//! prints one typed document instead ([`json`] says what holds for all of them). The day-2
//! actions (`switchover`, `failover`, `restart [M]`, `reinit`, `pause`, `resume`) print one
//! sentence saying the action is done, and take no `--json`: their exit status is the result,
//! and `pgherd status --json` shows the cluster after them.

pub use crate::provision::ctl;
pub mod check;
pub mod docs;
pub mod drill;
pub mod json;
pub mod lab;
pub mod replace;
pub mod status;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::provision::apply::{self, ApplyOptions, Fleet};
use crate::provision::desired::DeploySpec;
use crate::provision::report::{self, ReportOptions};
use crate::provision::rolling::PrimaryUpdateMethod;
use crate::provision::spec::{self, SpecError};
use crate::transport::{HostSpec, SshOptions, Transport, connect_all};
pub use check::CheckArgs;

/// Highly available PostgreSQL on VMs and bare metal.
#[derive(Parser, Debug)]
#[command(name = "pgherd", version)]
pub struct Cli {
    /// Directory for pgherd's local state (ssh control sockets, known_hosts).
    #[arg(long, global = true)]
    pub state_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// A local multi-host lab (network namespaces) to try pgherd on one machine.
    #[command(subcommand)]
    Lab(lab::LabCommand),
    /// Show what `apply` would change, host by host, with file diffs.
    Plan(DeployArgs),
    /// Converge the hosts to the inventory (etcd, agents, HAProxy).
    Apply(ApplyArgs),
    /// Cluster status from the agents, and how to connect through HAProxy.
    Status(StatusArgs),
    /// Validate the inventory and the playbook, render every file, reach every host.
    Check(CheckArgs),
    /// Hand the leader role to a healthy replica (planned, no data loss).
    Switchover(SwitchoverArgs),
    /// Promote a member even without a healthy leader (last resort).
    Failover(SwitchoverArgs),
    /// Restart PostgreSQL on one member, or on all (replicas first, the leader last); with
    /// `--pending`, only the members pending restart, in the safe order for the change.
    Restart(RestartArgs),
    /// Re-create a replica's data from the leader (its local data is discarded).
    Reinit(MemberArgs),
    /// Remove a member that left the inventory from the running cluster now (drain, stop and
    /// disable its agent, its key and slot gone); refused while the inventory lists it.
    Remove(RemoveArgs),
    /// Replace a failed host under the same name: set its address in the inventory to the new
    /// host's and apply; refused while anything still answers at the old address.
    Replace(replace::ReplaceArgs),
    /// Stop automatic failover (maintenance); the agents keep reporting.
    Pause(InvArgs),
    /// Turn automatic failover back on.
    Resume(InvArgs),
    /// Fault drill: inject a fault and measure the write-unavailable window through HAProxy.
    Drill(DrillArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(docs::CompletionsArgs),
    /// Print the manual page pgherd.1, or write it and one page per subcommand (--out DIR).
    Man(docs::ManArgs),
}

#[derive(Args, Debug, Clone)]
pub struct DrillArgs {
    #[command(flatten)]
    pub inv: InvArgs,
    /// The fault of every round; without it, each round draws one of kill-pg, kill-primary,
    /// isolate-primary, freeze-agent.
    #[arg(value_enum)]
    pub fault: Option<drill::Fault>,
    /// How many rounds (each: fault, undo, reconverge, check).
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
    /// Seed of the random faults and targets (the same seed draws the same ones).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Seconds a fault that does not move the leader stays in place.
    #[arg(long, default_value_t = drill::DEFAULT_HOLD.as_secs())]
    pub hold: u64,
    /// Do not ask for confirmation.
    #[arg(short, long)]
    pub yes: bool,
    /// Print the measurements as one JSON document.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct SwitchoverArgs {
    #[command(flatten)]
    pub inv: InvArgs,
    /// The member to promote (default: the healthiest replica; required for a failover
    /// without a leader).
    #[arg(long)]
    pub candidate: Option<String>,
    /// Do not ask for confirmation.
    #[arg(short, long)]
    pub yes: bool,
}

#[derive(Args, Debug, Clone)]
pub struct MemberArgs {
    #[command(flatten)]
    pub inv: InvArgs,
    /// Member name (restart: default all members).
    pub member: Option<String>,
    /// Do not ask for confirmation.
    #[arg(short, long)]
    pub yes: bool,
}

#[derive(Args, Debug, Clone)]
pub struct RemoveArgs {
    #[command(flatten)]
    pub deploy: DeployArgs,
    /// The member to remove (its host must already be deleted from the inventory).
    pub member: String,
    /// If it holds the leader key: switch over to the healthiest remaining replica first.
    #[arg(long)]
    pub switchover_first: bool,
    /// Do not ask for confirmation.
    #[arg(short, long)]
    pub yes: bool,
}

#[derive(Args, Debug, Clone)]
pub struct RestartArgs {
    #[command(flatten)]
    pub inv: InvArgs,
    /// Member name (default all members).
    #[arg(conflicts_with = "pending")]
    pub member: Option<String>,
    /// Only members pending restart (a restart-needing parameter changed), one at a time:
    /// replicas drained from HAProxy and restarted, the primary by --primary-update-method;
    /// decreases of max_connections & co. primary first.
    #[arg(long)]
    pub pending: bool,
    /// With --pending: how the primary restarts (decreases of the hot-standby parameters are
    /// always in place).
    /// Overrides the inventory's `postgresql.primary_update_method` (default `restart`).
    #[arg(long, value_enum, requires = "pending")]
    pub primary_update_method: Option<PrimaryUpdateMethod>,
    /// Do not ask for confirmation.
    #[arg(short, long)]
    pub yes: bool,
    /// With --pending: print the restart plan and what was done as one JSON document.
    #[arg(long, requires = "pending")]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct InvArgs {
    /// Inventory file.
    #[arg(short, long)]
    pub inventory: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    #[command(flatten)]
    pub inv: InvArgs,
    /// One JSON document (members, roles, states, timelines, lag, connection strings).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct DeployArgs {
    #[command(flatten)]
    pub inv: InvArgs,
    /// The pgherd-agent binary to install (default: the inventory's, else next to `pgherd`).
    #[arg(long)]
    pub agent_binary: Option<PathBuf>,
    /// Template directory overriding the built-in templates/.
    #[arg(long)]
    pub templates: Option<PathBuf>,
    /// Deploy playbook to run instead of the built-in playbooks/deploy.yml (same vocabulary;
    /// checked against the inventory before any host is contacted).
    #[arg(long)]
    pub playbook: Option<PathBuf>,
    /// Do not print file diffs.
    #[arg(long)]
    pub no_diff: bool,
    /// Print how long each stage took (inventory + rendering, connecting, facts per host,
    /// planning, executing) on stderr.
    #[arg(long)]
    pub timings: bool,
    /// Accept etcd membership changes that end with fewer than 3 voters (no fault tolerance).
    #[arg(long)]
    pub allow_degraded_etcd: bool,
    /// Print one JSON document (the plan, what was done) instead of the report; progress and
    /// questions stay on stderr.
    #[arg(long)]
    pub json: bool,
}

impl DeployArgs {
    fn out(&self) -> json::Out {
        json::Out { json: self.json }
    }
}

/// Stage durations for `--timings` (stderr, so stdout stays the plan/report).
struct Timings {
    on: bool,
    last: Instant,
}

impl Timings {
    fn new(on: bool) -> Timings {
        Timings {
            on,
            last: Instant::now(),
        }
    }

    /// Prints the time since the previous mark as `stage`.
    fn mark(&mut self, stage: &str) {
        if self.on {
            eprintln!(
                "timing: {stage:<34} {:>7.3}s",
                self.last.elapsed().as_secs_f64()
            );
        }
        self.last = Instant::now();
    }

    fn facts(&mut self, per_host: &std::collections::BTreeMap<String, Duration>) {
        if self.on {
            for (h, d) in per_host {
                eprintln!("timing:   facts {h:<28} {:>7.3}s", d.as_secs_f64());
            }
        }
        self.mark("facts (all hosts, parallel)");
    }
}

#[derive(Args, Debug, Clone)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub deploy: DeployArgs,
    /// Do not ask for confirmation.
    #[arg(short, long)]
    pub yes: bool,
    /// Seconds a `serial` service step waits for the service to be healthy again on each
    /// host before the next (the playbook's wait steps carry their own timeouts).
    #[arg(long, default_value_t = 180)]
    pub wait_timeout: u64,
    /// At most this many hosts work at once within a step.
    #[arg(long, default_value_t = apply::DEFAULT_MAX_PARALLEL, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    pub forks: usize,
}

/// Exit codes: 0 success, 1 a host/run failure, 2 bad usage or invalid inventory.
pub fn exit_code(e: &anyhow::Error) -> ExitCode {
    let input = e
        .downcast_ref::<SpecError>()
        .is_some_and(SpecError::is_input_error)
        || e.downcast_ref::<crate::inventory::InventoryError>()
            .is_some()
        || e.downcast_ref::<crate::inventory::edit::EditError>()
            .is_some();
    if input {
        ExitCode::from(2)
    } else {
        ExitCode::FAILURE
    }
}

/// Runs the CLI.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let state_dir = cli.state_dir.clone().unwrap_or_else(default_state_dir);
    match cli.command {
        Command::Lab(c) => lab::lab_cmd(c, &state_dir),
        Command::Plan(a) => plan_cmd(&a, &state_dir).await,
        Command::Apply(a) => apply_cmd(&a, &state_dir).await,
        Command::Status(a) => status_cmd(&a).await,
        Command::Check(a) => check::check_cmd(&a, &state_dir).await,
        Command::Switchover(a) => switchover_cmd(&a, false).await,
        Command::Failover(a) => switchover_cmd(&a, true).await,
        Command::Restart(a) if a.pending => restart_pending_cmd(&a, &state_dir).await,
        Command::Restart(a) => {
            let inv = crate::inventory::load(&a.inv.inventory)?;
            println!("{}", ctl::restart(&inv, a.member.as_deref(), a.yes).await?);
            Ok(())
        }
        Command::Reinit(a) => {
            let inv = crate::inventory::load(&a.inv.inventory)?;
            let Some(member) = a.member.as_deref() else {
                anyhow::bail!("reinit needs the member to re-create");
            };
            println!("{}", ctl::reinit(&inv, member, a.yes).await?);
            Ok(())
        }
        Command::Remove(a) => remove_cmd(&a, &state_dir).await,
        Command::Replace(a) => replace::replace_cmd(&a, &state_dir).await,
        Command::Drill(a) => {
            let inv = crate::inventory::load(&a.inv.inventory)?;
            let opts = drill::DrillOptions {
                fault: a.fault,
                rounds: a.rounds.max(1),
                seed: a.seed,
                hold: Duration::from_secs(a.hold),
                yes: a.yes,
            };
            let report = drill::run(&inv, &state_dir, &opts).await?;
            if a.json {
                json::print(&report)?;
            } else {
                println!("{report}");
            }
            if !report.ok {
                let why: Vec<String> = report
                    .rounds
                    .iter()
                    .filter_map(|r| {
                        r.failure(report.synchronous_mode)
                            .map(|f| format!("round {}: {f}", r.round))
                    })
                    .collect();
                anyhow::bail!("the drill failed: {}", why.join("; "));
            }
            Ok(())
        }
        Command::Pause(a) => pause_cmd(&a, true).await,
        Command::Resume(a) => pause_cmd(&a, false).await,
        Command::Completions(a) => docs::completions(&a),
        Command::Man(a) => docs::man(&a),
    }
}

async fn switchover_cmd(a: &SwitchoverArgs, failover: bool) -> anyhow::Result<()> {
    let inv = crate::inventory::load(&a.inv.inventory)?;
    let out = ctl::switchover(&inv, a.candidate.as_deref(), failover, a.yes).await?;
    println!("{out}");
    Ok(())
}

/// Takes the cluster's day-2 lock (see [`crate::provision::oplock`]) for `what`, waiting for a
/// holder that is still running or died recently. Without a reachable etcd (a first bring-up,
/// before etcd runs; an admin host that cannot reach etcd) the run goes on without the lock and
/// says so.
async fn day2_lock(
    inv: &crate::inventory::Inventory,
    what: &str,
) -> anyhow::Result<Option<crate::provision::oplock::OpLock>> {
    use crate::provision::oplock::{self, OpLock, OpLockError};
    let endpoints: Vec<String> = inv
        .etcd_endpoints()
        .into_iter()
        .map(|e| format!("http://{e}"))
        .collect();
    let key = oplock::lock_key(&inv.namespace, &inv.cluster);
    let waiting = |m: &str| eprintln!("{m}");
    match OpLock::acquire(
        &endpoints,
        &key,
        &oplock::holder_description(what),
        oplock::LOCK_WAIT,
        &waiting,
    )
    .await
    {
        Ok(l) => Ok(Some(l)),
        Err(e @ OpLockError::Held { .. }) => Err(e.into()),
        Err(e) => {
            eprintln!(
                "note: running without the day-2 lock: {}",
                crate::provision::error_chain(&e)
            );
            Ok(None)
        }
    }
}

/// `restart --pending`: plan, print the order with reasons and the write outage, confirm, run.
async fn restart_pending_cmd(a: &RestartArgs, state_dir: &Path) -> anyhow::Result<()> {
    use crate::provision::rolling;
    let inv = crate::inventory::load(&a.inv.inventory)?;
    let fleet = connect(&inv, state_dir).await?;
    let agents = crate::provision::agent_client::AgentClient::for_inventory(&inv);
    let opts = rolling::RollingOptions {
        primary_update_method: a
            .primary_update_method
            .unwrap_or(inv.postgresql.primary_update_method),
    };
    let out = json::Out { json: a.json };
    let input = rolling::gather_input(&inv, &agents, &fleet).await?;
    let plan = rolling::plan_restarts(&input, &opts)?;
    if plan.is_empty() {
        // Nothing pending; only a server an interrupted run left drained is put back.
        let undrained = rolling::undrain_leftovers(&inv, &fleet).await?;
        for (m, what) in &undrained {
            out.line(format_args!("[{m}] {what}"));
        }
        out.line("no member is pending restart");
        return pending_doc(out, &plan, &undrained, &[], Duration::ZERO);
    }
    out.report(&plan.to_string(), a.yes);
    ctl::confirm("run these restarts", a.yes)?;
    let t0 = Instant::now();
    let progress = |m: &str| eprintln!("restart: {m}");
    let lock = day2_lock(&inv, "pgherd restart --pending").await?;
    let report = rolling::run_pending_restarts(&inv, &fleet, &opts, &progress).await;
    if let Some(l) = lock {
        l.release().await;
    }
    let report = report?;
    for (m, what) in &report.done {
        out.line(format_args!("[{m}] {what}"));
    }
    out.line(format_args!(
        "pending restarts done in {:.1}s: no member is pending restart",
        t0.elapsed().as_secs_f64()
    ));
    pending_doc(out, &report.plan, &[], &report.done, t0.elapsed())
}

/// `restart --pending --json`'s document (nothing printed without `--json`).
fn pending_doc(
    out: json::Out,
    plan: &crate::provision::rolling::RestartPlan,
    undrained: &[(String, String)],
    done: &[(String, String)],
    elapsed: Duration,
) -> anyhow::Result<()> {
    json_if(out, || json::RestartPendingDoc {
        plan: json::RestartPlanDoc::new(plan),
        undrained: json::member_done(undrained),
        done: json::member_done(done),
        elapsed_s: json::secs(elapsed),
    })
}

/// `remove NAME`: the departed-member removal for one member, now, with `--switchover-first`
/// for a leader. Refused while the inventory still lists NAME as a postgres host: the next
/// `apply` would start its agent again and re-clone it, so the removal would not stick (the
/// inventory is the source of truth; deleting the host there is the decision, this verb only
/// carries it out sooner, or with a switchover).
async fn remove_cmd(a: &RemoveArgs, state_dir: &Path) -> anyhow::Result<()> {
    use crate::provision::departed;
    let (inv, spec) = load_spec(&a.deploy)?;
    if inv
        .host(&a.member)
        .is_some_and(|h| h.has(crate::inventory::Role::Postgres))
    {
        anyhow::bail!(
            "{} is still a postgres host of {}: delete it from the inventory first, then run `pgherd remove {}` (or `pgherd apply`, which removes it too); nothing changed",
            a.member,
            a.deploy.inv.inventory.display(),
            a.member
        );
    }
    let fleet = connect(&inv, state_dir).await?;
    let mut facts = apply::gather_all(&spec, &fleet).await?;
    let cluster = apply::gather_cluster(&spec, &fleet, &mut facts).await?;
    let Some(d) = &cluster.departed else {
        anyhow::bail!("no agent of the inventory answered GET /cluster; nothing changed");
    };
    let out = a.deploy.out();
    let doc =
        |plan: Option<json::DepartedDoc>, done: &[(String, String, String)]| json::RemoveDoc {
            member: a.member.clone(),
            in_dcs: plan.is_some(),
            plan,
            done: done
                .iter()
                .map(|(member, step, what)| json::RemovedStep {
                    member: member.clone(),
                    step: step.clone(),
                    what: what.clone(),
                })
                .collect(),
        };
    if !d.members.iter().any(|m| m.name == a.member) {
        out.line(format_args!(
            "{} is not a member in the DCS: nothing to remove",
            a.member
        ));
        return json_if(out, || doc(None, &[]));
    }
    let inventory = spec
        .hosts
        .iter()
        .filter(|h| h.roles.postgres)
        .map(|h| h.name.clone())
        .collect();
    let opts = departed::PlanOptions {
        switchover_first: a.switchover_first,
        only: Some(a.member.clone()),
    };
    let plan =
        departed::plan_departures(d, &inventory, &opts).map_err(departed::DepartedError::from)?;
    let planned = Ok(plan.clone());
    out.report(&departed::render(&planned, false), a.yes);
    ctl::confirm(&format!("remove {}", a.member), a.yes)?;
    let timeout = spec
        .playbook
        .steps
        .iter()
        .find_map(|s| match s.kind {
            crate::provision::playbook::StepKind::RemoveDeparted { timeout_secs } => {
                Some(Duration::from_secs(timeout_secs))
            }
            _ => None,
        })
        .unwrap_or(Duration::from_secs(120));
    let mut done = Vec::new();
    let report = |m: &str, what: &str| eprintln!("[{m}] {what}");
    departed::run(
        &spec,
        &fleet,
        &plan,
        timeout,
        Some(state_dir.to_path_buf()),
        &report,
        &mut done,
    )
    .await?;
    for (m, step, what) in &done {
        out.line(format_args!("[{m}] {step}: {what}"));
    }
    out.note(format_args!(
        "{} removed from the cluster; run `pgherd apply -i {}` to re-render HAProxy and pg_hba without it (and to remove its etcd member, if it was one)",
        a.member,
        a.deploy.inv.inventory.display()
    ));
    json_if(out, || doc(Some(json::DepartedDoc::new(&planned)), &done))
}

/// Prints the document `doc` makes under `--json` (nothing otherwise: the text is out).
fn json_if<T: serde::Serialize>(out: json::Out, doc: impl FnOnce() -> T) -> anyhow::Result<()> {
    if out.json {
        json::print(&doc())
    } else {
        Ok(())
    }
}

async fn pause_cmd(a: &InvArgs, on: bool) -> anyhow::Result<()> {
    let inv = crate::inventory::load(&a.inventory)?;
    println!("{}", ctl::pause(&inv, on).await?);
    Ok(())
}

/// `$PGHERD_STATE_DIR`, else `$XDG_STATE_HOME/pgherd`, else `~/.local/state/pgherd` (short enough for control sockets).
pub fn default_state_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("PGHERD_STATE_DIR") {
        return PathBuf::from(x);
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME") {
        return PathBuf::from(x).join("pgherd");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".local/state/pgherd")
}

/// Loads the inventory and builds the desired state (no host touched).
pub fn load_spec(a: &DeployArgs) -> Result<(crate::inventory::Inventory, DeploySpec), SpecError> {
    let inv = crate::inventory::load(&a.inv.inventory)?;
    let spec = spec_for(a, &inv)?;
    Ok((inv, spec))
}

/// The deploy spec of a loaded inventory, with the flags of `a`.
pub fn spec_for(
    a: &DeployArgs,
    inv: &crate::inventory::Inventory,
) -> Result<DeploySpec, SpecError> {
    let mut spec = spec::build_with(
        inv,
        a.agent_binary.as_deref(),
        a.templates.as_deref(),
        a.playbook.as_deref(),
    )?;
    if let Some(e) = &mut spec.etcd {
        e.allow_degraded = a.allow_degraded_etcd;
    }
    Ok(spec)
}

/// Connects to every host of the inventory; all must succeed (else an error naming each
/// unreachable host, before anything is changed).
pub async fn connect(inv: &crate::inventory::Inventory, state_dir: &Path) -> anyhow::Result<Fleet> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating the state directory {}", state_dir.display()))?;
    let specs: Vec<HostSpec> = crate::provision::remote::host_specs(inv);
    let results = connect_all(&specs, &SshOptions::new(state_dir), 16).await;
    let mut fleet = Fleet::new();
    let mut errs = Vec::new();
    for (name, r) in results {
        match r {
            Ok(t) => {
                fleet.insert(name, Arc::new(t) as Arc<dyn Transport>);
            }
            Err(e) => errs.push(e.to_string()),
        }
    }
    if !errs.is_empty() {
        anyhow::bail!(
            "cannot connect to {} host(s), nothing was changed:\n  - {}",
            errs.len(),
            errs.join("\n  - ")
        );
    }
    Ok(fleet)
}

async fn plan_cmd(a: &DeployArgs, state_dir: &Path) -> anyhow::Result<()> {
    let mut tm = Timings::new(a.timings);
    let (inv, spec) = load_spec(a)?;
    tm.mark("inventory, templates, agent binary");
    let fleet = connect(&inv, state_dir).await?;
    tm.mark("connect (ssh)");
    let (mut facts, took) = apply::gather_all_timed(&spec, &fleet).await?;
    tm.facts(&took);
    let cluster = apply::gather_cluster(&spec, &fleet, &mut facts).await?;
    tm.mark("cluster facts (agents, DCS config, pg_settings)");
    let plan = crate::provision::plan::plan_with_cluster(&spec, &facts, &cluster)
        .map_err(crate::provision::dcs_config::ClusterConfigError::from)?;
    let stages = apply::stages(&spec, &plan, &facts)?;
    tm.mark("plan");
    if a.json {
        return json::print(&json::PlanDoc::new(
            &plan,
            &stages,
            &spec.playbook_origin,
            !a.no_diff,
        ));
    }
    print!(
        "{}",
        report::render_plan(
            &plan,
            ReportOptions {
                show_noops: true,
                diffs: !a.no_diff
            }
        )
    );
    print!("{}", report::render_order(&stages, &spec.playbook_origin));
    Ok(())
}

async fn apply_cmd(a: &ApplyArgs, state_dir: &Path) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let mut tm = Timings::new(a.deploy.timings);
    let (inv, spec) = load_spec(&a.deploy)?;
    tm.mark("inventory, templates, agent binary");
    let doc = apply_loaded(a, state_dir, &inv, &spec, (t0, tm), || Ok(())).await?;
    json_if(a.deploy.out(), || doc)
}

/// `apply` from a loaded inventory: facts, plan (printed), the refusals, confirmation, then
/// `before_writes` (the one point where a verb that edits the inventory writes it: after
/// every gate passed, before any host is changed), the day-2 lock and the run. Returns the
/// run's document; the caller prints it under `--json`.
async fn apply_loaded(
    a: &ApplyArgs,
    state_dir: &Path,
    inv: &crate::inventory::Inventory,
    spec: &DeploySpec,
    (t0, mut tm): (Instant, Timings),
    before_writes: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<json::ApplyDoc> {
    let out = a.deploy.out();
    let fleet = connect(inv, state_dir).await?;
    tm.mark("connect (ssh)");
    let (mut facts, took) = apply::gather_all_timed(spec, &fleet).await?;
    tm.facts(&took);
    let cluster = apply::gather_cluster(spec, &fleet, &mut facts).await?;
    tm.mark("cluster facts (agents, DCS config, pg_settings)");
    let plan = crate::provision::plan::plan_with_cluster(spec, &facts, &cluster)
        .map_err(crate::provision::dcs_config::ClusterConfigError::from)?;
    let stages = apply::stages(spec, &plan, &facts)?;
    tm.mark("plan");
    let plan_doc = json::PlanDoc::new(&plan, &stages, &spec.playbook_origin, !a.deploy.no_diff);
    let text = report::render_plan(
        &plan,
        ReportOptions {
            show_noops: false,
            diffs: !a.deploy.no_diff,
        },
    ) + &report::render_order(&stages, &spec.playbook_origin);
    out.report(&text, a.yes || plan.is_noop());
    if let Some(e) = apply::refusal(spec, &plan) {
        return Err(e.into());
    }
    if plan.is_noop() {
        before_writes()?;
        out.line(format_args!(
            "nothing to do ({:.1}s)",
            t0.elapsed().as_secs_f64()
        ));
        return Ok(json::ApplyDoc::new(plan_doc, &[], t0.elapsed()));
    }
    if !a.yes && std::io::stdin().is_terminal() {
        eprint!("apply these changes? [y/N] ");
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        if !matches!(line.trim(), "y" | "Y" | "yes") {
            anyhow::bail!("aborted, nothing changed");
        }
    }
    before_writes()?;
    let opts = ApplyOptions {
        wait_timeout: Duration::from_secs(a.wait_timeout),
        progress: true,
        max_parallel: a.forks,
        ssh_control_dir: Some(state_dir.to_path_buf()),
    };
    let lock = day2_lock(inv, "pgherd apply").await?;
    let report = apply::execute(spec, &fleet, plan, &facts, &opts).await;
    if let Some(l) = lock {
        l.release().await;
    }
    let report = report?;
    tm.mark("execute");
    for (host, step, what) in &report.done {
        out.line(format_args!("[{host}] {step}: {what}"));
    }
    out.line(format_args!(
        "applied {} change(s) in {:.1}s",
        report.done.len(),
        t0.elapsed().as_secs_f64()
    ));
    Ok(json::ApplyDoc::new(plan_doc, &report.done, t0.elapsed()))
}

async fn status_cmd(a: &StatusArgs) -> anyhow::Result<()> {
    let inv = crate::inventory::load(&a.inv.inventory)?;
    let st = status::cluster_status(&inv).await?;
    if a.json {
        json::print(&st)?;
    } else {
        print!("{st}");
    }
    Ok(())
}
