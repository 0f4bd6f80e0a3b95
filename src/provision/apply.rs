//! Executing a [`Plan`] over transports by walking the playbook (`playbooks/deploy.yml`):
//!
//! 1. **facts** on every host (read-only; a host that cannot be read stops the run before any
//!    host is changed);
//! 2. the plan is split into the playbook's steps ([`schedule`]): the playbook decides *when*,
//!    the planner decides *what*;
//! 3. each step runs on its hosts — all at once, or in batches with `serial` — and waits where
//!    its kind says: `bootstrap_primary` until the first primary leads, `start_replicas` until
//!    each started member streams, `wait_for` until its condition holds (skipped while nothing
//!    has changed in the run), a `serial` service step until the service is healthy on each
//!    batch before the next (rolling: never two etcd members or two PostgreSQL members in
//!    transition). For the agent's service steps the current leader goes last.
//!
//! With the built-in deploy playbook this is: packages and files everywhere; etcd members
//! started together (a new etcd cluster only forms when a quorum starts), changed members
//! restarted one at a time; the first primary alone, then the replicas; changed agents
//! restarted or reloaded replicas first; HAProxy started or reloaded (seamless), then waited
//! on until it routes the primary port to the leader only.
//!
//! A step runs on all its hosts to the end even when one host fails, and the run stops before
//! the next step: every host is left either done with a step or not started on it, and a
//! re-run (facts → plan again) converges from there.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::cluster_facts::ClusterFacts;
use super::dcs_config;
use super::desired::{DeploySpec, DesiredFile};
use super::facts::{self, FactsError, HostFacts};
use super::plan::{self, Action, Plan, Planned, PlannedStep};
use super::playbook::{Parallelism, PlaybookError, StepKind, WaitCondition};
use super::remote::api_base;
use super::schedule::{self, Stage};
use super::services::{self, Service, ServiceMode, ServiceOp};
use crate::transport::{Transport, TransportError, shell_quote};

pub use super::remote::Fleet;

/// Why a run stopped. Every variant names the host(s) involved.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Facts(#[from] FactsError),
    #[error(transparent)]
    Playbook(#[from] PlaybookError),
    #[error("host {host}: step `{step}` failed")]
    Step {
        host: String,
        step: String,
        #[source]
        source: TransportError,
    },
    #[error("host {host}: timed out after {timeout:?} waiting until {what}")]
    Wait {
        host: String,
        what: String,
        timeout: Duration,
    },
    #[error("{}", join_errors(.0))]
    Several(Vec<ProvisionError>),
    #[error("cluster configuration")]
    Cluster(#[from] super::dcs_config::ClusterConfigError),
    #[error("rolling restart")]
    Rolling(#[from] super::rolling::executor::RollingError),
    #[error("etcd membership")]
    EtcdMembers(#[from] super::etcd_members::EtcdMembersError),
    #[error("departed members")]
    Departed(#[from] super::departed::DepartedError),
}

fn join_errors(errs: &[ProvisionError]) -> String {
    let mut s = format!("{} host(s) failed:", errs.len());
    for e in errs {
        s.push_str("\n  - ");
        s.push_str(&crate::provision::error_chain(e));
    }
    s
}

impl ProvisionError {
    /// One error, or [`ProvisionError::Several`].
    pub fn from_many(mut errs: Vec<ProvisionError>) -> ProvisionError {
        if errs.len() == 1 {
            errs.remove(0)
        } else {
            ProvisionError::Several(errs)
        }
    }
}

/// Tuning of `apply`.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// How long a `serial` service step waits for the service to be healthy again on each
    /// host before the next (the playbook's `wait_for`, `bootstrap_primary` and
    /// `start_replicas` steps carry their own timeouts).
    pub wait_timeout: Duration,
    /// Draw indicatif bars (only effective on a TTY); otherwise plain log lines on stderr.
    pub progress: bool,
    /// At most this many hosts work at once within a step (uploads of the agent binary to a
    /// large fleet would otherwise all start together).
    pub max_parallel: usize,
    /// Where SSH control sockets to hosts that left the inventory go (the `etcd_members` step
    /// cleans up removed etcd members there); `None`: a directory under the system temp dir.
    pub ssh_control_dir: Option<std::path::PathBuf>,
}

/// Default of [`ApplyOptions::max_parallel`].
pub const DEFAULT_MAX_PARALLEL: usize = 16;

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            wait_timeout: Duration::from_secs(120),
            progress: true,
            max_parallel: DEFAULT_MAX_PARALLEL,
            ssh_control_dir: None,
        }
    }
}

/// What `apply` did.
#[derive(Debug, Clone)]
pub struct ApplyReport {
    /// The plan that was executed.
    pub plan: Plan,
    /// `(host, step, summary)` of every change made, in order.
    pub done: Vec<(String, String, String)>,
    pub elapsed: Duration,
}

impl ApplyReport {
    /// Service operations performed on `host`.
    pub fn service_ops(&self, host: &str) -> Vec<(Service, ServiceOp)> {
        self.plan
            .host(host)
            .map(|h| {
                Service::ALL
                    .into_iter()
                    .filter_map(|s| h.service_op(s).map(|op| (s, op)))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Per-host progress: indicatif spinners on a TTY, `[host] message` lines otherwise.
#[derive(Clone)]
pub struct Progress {
    mp: Option<MultiProgress>,
    bars: BTreeMap<String, ProgressBar>,
}

impl Progress {
    pub fn new(hosts: &[String], enabled: bool) -> Progress {
        let mp = MultiProgress::new();
        if !enabled || mp.is_hidden() {
            return Progress {
                mp: None,
                bars: BTreeMap::new(),
            };
        }
        let style = ProgressStyle::with_template("{spinner} {prefix:>12} {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let bars = hosts
            .iter()
            .map(|h| {
                let b = mp.add(ProgressBar::new_spinner());
                b.set_style(style.clone());
                b.set_prefix(h.clone());
                b.enable_steady_tick(Duration::from_millis(120));
                (h.clone(), b)
            })
            .collect();
        Progress { mp: Some(mp), bars }
    }

    pub fn msg(&self, host: &str, msg: &str) {
        match (self.mp.is_some(), self.bars.get(host)) {
            (true, Some(b)) => b.set_message(msg.to_string()),
            _ => eprintln!("[{host}] {msg}"),
        }
    }

    pub fn finish(&self) {
        for b in self.bars.values() {
            b.finish_and_clear();
        }
    }
}

/// Reads facts of all hosts in parallel. Any failure is returned (naming the hosts) before
/// anything is changed.
pub async fn gather_all(
    spec: &DeploySpec,
    fleet: &Fleet,
) -> Result<BTreeMap<String, HostFacts>, ProvisionError> {
    Ok(gather_all_timed(spec, fleet).await?.0)
}

/// [`gather_all`], also returning how long each host took (for `--timings`).
pub async fn gather_all_timed(
    spec: &DeploySpec,
    fleet: &Fleet,
) -> Result<(BTreeMap<String, HostFacts>, BTreeMap<String, Duration>), ProvisionError> {
    let mut set = JoinSet::new();
    for h in &spec.hosts {
        let Some(t) = fleet.get(&h.name).cloned() else {
            continue;
        };
        let q = spec.fact_query(h);
        let wanted = spec.wanted_sha(h);
        let name = h.name.clone();
        set.spawn(async move {
            let t0 = Instant::now();
            let r = facts::gather(t.as_ref(), &q, &wanted).await;
            (name, r, t0.elapsed())
        });
    }
    let mut out = BTreeMap::new();
    let mut took = BTreeMap::new();
    let mut errs = Vec::new();
    while let Some(j) = set.join_next().await {
        let (name, r, elapsed) = j.expect("facts task panicked");
        tracing::debug!(host = %name, ms = elapsed.as_millis() as u64, "facts gathered");
        took.insert(name.clone(), elapsed);
        match r {
            Ok(f) => {
                out.insert(name, f);
            }
            Err(e) => errs.push(ProvisionError::Facts(e)),
        }
    }
    if errs.is_empty() {
        Ok((out, took))
    } else {
        Err(ProvisionError::from_many(errs))
    }
}

/// Reads the cluster facts (live DCS config, leader, the leader's pg_settings, what each agent
/// reports) and records each agent's report in its host's facts.
pub async fn gather_cluster(
    spec: &DeploySpec,
    fleet: &Fleet,
    facts: &mut BTreeMap<String, HostFacts>,
) -> Result<ClusterFacts, ProvisionError> {
    let mut cluster = ClusterFacts {
        dcs: dcs_config::gather(spec, fleet).await?,
        ..ClusterFacts::default()
    };
    cluster.etcd = super::etcd_members::gather(spec, fleet).await?;
    cluster.departed =
        super::departed::gather(spec, cluster.dcs.config.as_ref().map(|c| &c.value)).await;
    // A moved member's old etcd peer still healthy is life at the old address, too.
    if let (Some(d), Some(e)) = (&mut cluster.departed, &cluster.etcd) {
        for mv in &mut d.moved {
            for m in e.members.iter().filter(|m| e.is_up(m)) {
                if m.peer_urls
                    .iter()
                    .any(|u| super::departed::url_host(u).as_deref() == Some(mv.old.as_str()))
                {
                    mv.alive
                        .push(format!("its etcd member {} is healthy", m.label()));
                }
            }
        }
    }
    for (host, a) in &cluster.dcs.agents {
        if let Some(f) = facts.get_mut(host) {
            f.agent = Some(a.clone());
        }
    }
    if let Some(inv) = &spec.inventory {
        cluster.drained = super::rolling::haproxy::drained_now(inv, fleet).await;
    }
    Ok(cluster)
}

/// Host facts, cluster facts, then the pure planner: what `plan` shows and `apply` runs.
pub async fn facts_and_plan(
    spec: &DeploySpec,
    fleet: &Fleet,
) -> Result<(BTreeMap<String, HostFacts>, Plan), ProvisionError> {
    let mut facts = gather_all(spec, fleet).await?;
    let cluster = gather_cluster(spec, fleet, &mut facts).await?;
    let plan = plan::plan_with_cluster(spec, &facts, &cluster)
        .map_err(dcs_config::ClusterConfigError::from)?;
    if let Some(e) = refusal(spec, &plan) {
        return Err(e);
    }
    Ok((facts, plan))
}

/// Why `plan` must not run, checked before any host is touched: a refused departure or move
/// (see [`departure_refusal`]), or a refused etcd membership change.
pub fn refusal(spec: &DeploySpec, plan: &Plan) -> Option<ProvisionError> {
    if let Some(e) = departure_refusal(spec, plan) {
        return Some(e);
    }
    match &plan.cluster.etcd {
        Some(Err(r)) => Some(super::etcd_members::EtcdMembersError::Refused(r.clone()).into()),
        _ => None,
    }
}

/// A refused departure (the departing member leads, sync capacity, paused, several at once)
/// stops the run before any host is touched; planned departures need the step that makes them.
fn departure_refusal(spec: &DeploySpec, plan: &Plan) -> Option<ProvisionError> {
    match &plan.cluster.departed {
        Some(Err(r)) => Some(super::departed::DepartedError::Refused(r.clone()).into()),
        Some(Ok(p))
            if !p.is_empty()
                && !spec
                    .playbook
                    .steps
                    .iter()
                    .any(|s| matches!(s.kind, StepKind::RemoveDeparted { .. })) =>
        {
            Some(PlaybookError::Invalid {
                path: spec.playbook_origin.clone(),
                problems: vec![crate::inventory::Problem {
                    pos: None,
                    field: "steps".into(),
                    message: format!(
                        "members left the inventory or moved ({}) but no step of the playbook is a remove_departed step (put one before the etcd membership and HAProxy config steps)",
                        {
                            let mut who: Vec<&str> = p.steps.iter().map(|s| s.member()).collect();
                            who.dedup();
                            who.join(", ")
                        }
                    ),
                }],
            }
            .into())
        }
        _ => None,
    }
}

/// facts → plan (pure planner).
pub async fn make_plan(spec: &DeploySpec, fleet: &Fleet) -> Result<Plan, ProvisionError> {
    Ok(facts_and_plan(spec, fleet).await?.1)
}

async fn run_action(
    t: &dyn Transport,
    mode: ServiceMode,
    action: &Action,
) -> Result<(), TransportError> {
    let long = Duration::from_secs(600);
    match action {
        Action::InstallPackages(pkgs) => {
            let list: Vec<String> = pkgs.iter().map(|p| shell_quote(p)).collect();
            let cmd = format!(
                "export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q {l} || {{ apt-get update -q && apt-get install -y -q {l}; }}",
                l = list.join(" ")
            );
            t.run_ok(&cmd, long).await?;
        }
        Action::CreateUser(u) => {
            let mut cmd = String::from("useradd");
            if u.system {
                cmd.push_str(" --system --shell /usr/sbin/nologin");
            }
            if let Some(h) = &u.home {
                cmd.push_str(&format!(" --home-dir {} --create-home", shell_quote(h)));
            }
            if !u.groups.is_empty() {
                cmd.push_str(&format!(" --groups {}", shell_quote(&u.groups.join(","))));
            }
            // Only when still absent: a concurrent creation is not an error.
            let q = shell_quote(&u.name);
            let cmd = format!("id -u {q} >/dev/null 2>&1 || {cmd} {q}");
            t.run_ok(&cmd, Duration::from_secs(60)).await?;
        }
        Action::MakeDirs(dirs) => {
            let cmd: Vec<String> = dirs
                .iter()
                .map(|d| {
                    let (u, g) = d.owner.split_once(':').unwrap_or((&d.owner, &d.owner));
                    format!(
                        "install -d -m {:o} -o {} -g {} {}",
                        d.mode,
                        shell_quote(u),
                        shell_quote(g),
                        shell_quote(&d.path)
                    )
                })
                .collect();
            t.run_ok(&cmd.join(" && "), Duration::from_secs(60)).await?;
        }
        Action::Upload(f) if f.content.len() >= facts::SIDECAR_MIN_BYTES => {
            upload_with_sidecar(t, f).await?;
        }
        Action::FixMetadata(f) if f.content.len() >= facts::SIDECAR_MIN_BYTES => {
            t.upload(&f.path, &f.content, f.mode, Some(&f.owner))
                .await?;
            // chmod/chown changed the file's ctime: record its checksum again, or every later
            // `plan` would hash it.
            let cmd = format!("{}; exit 0", facts::checksum_sidecar(&f.path, &f.sha, ""));
            t.run_ok(&cmd, Duration::from_secs(30)).await?;
        }
        Action::Upload(f) | Action::FixMetadata(f) => {
            t.upload(&f.path, &f.content, f.mode, Some(&f.owner))
                .await?;
        }
        Action::DaemonReload => {
            t.run_ok("systemctl daemon-reload", Duration::from_secs(60))
                .await?;
        }
        Action::StopUnit(u) => {
            let cmd = format!("systemctl disable --now {}", shell_quote(u));
            t.run_ok(&cmd, Duration::from_secs(90)).await?;
        }
        Action::Service(svc, op) => {
            t.run_ok(
                &services::op_command(*svc, *op, mode),
                Duration::from_secs(90),
            )
            .await?;
        }
    }
    Ok(())
}

/// Uploads a large file (the agent binary) and records its checksum sidecar in the same
/// command, so the next `plan` reads the checksum instead of hashing the file on the host.
/// Like [`Transport::upload`]: a temporary file in the target directory, mode and owner set,
/// then renamed over the target (atomic). Unlike it, no checksum of the old file is taken first
/// — the plan already knows the content differs. The sidecar is only written while the file
/// is still the inode pgherd renamed into place.
async fn upload_with_sidecar(t: &dyn Transport, f: &DesiredFile) -> Result<(), TransportError> {
    let q = shell_quote(&f.path);
    let (u, g) = f.owner.split_once(':').unwrap_or((&f.owner, &f.owner));
    let script = format!(
        "set -e; d=$(dirname -- {q}); b=$(basename -- {q}); \
         t=$(mktemp \"$d/.$b.pgherd-XXXXXX\"); trap 'rm -f \"$t\"' EXIT; \
         cat > \"$t\"; chmod {mode:o} \"$t\"; chown {owner} \"$t\"; i=$(stat -c %i \"$t\"); \
         mv -f \"$t\" {q}; trap - EXIT; set +e; {side}; exit 0",
        mode = f.mode,
        owner = shell_quote(&format!("{u}:{g}")),
        side = facts::checksum_sidecar(&f.path, &f.sha, "$i"),
    );
    let exec = crate::transport::Exec {
        script: &script,
        stdin: Some(&f.content),
        secrets: &[],
        timeout: Duration::from_secs(600),
    };
    t.exec(exec).await?.check(t.host(), &script)?;
    Ok(())
}

fn summary(s: &PlannedStep) -> String {
    match &s.planned {
        Planned::Change { summary, .. } => summary.clone(),
        Planned::Noop(r) => r.clone(),
    }
}

/// Runs `steps` of each host (host name → steps), hosts in parallel (at most `limit`'s permits
/// at once), steps in order. All hosts run to the end of their list; errors are collected.
async fn run_parallel(
    fleet: &Fleet,
    work: Vec<(String, ServiceMode, Vec<PlannedStep>)>,
    progress: &Progress,
    limit: &Arc<Semaphore>,
    done: &mut Vec<(String, String, String)>,
) -> Result<(), ProvisionError> {
    let mut set = JoinSet::new();
    for (host, mode, steps) in work {
        if steps.is_empty() {
            continue;
        }
        let t = fleet.get(&host).cloned().expect("fleet covers the plan");
        let p = progress.clone();
        let limit = limit.clone();
        set.spawn(async move {
            let _permit = limit.acquire_owned().await.expect("semaphore never closed");
            let mut ok = Vec::new();
            for s in steps {
                let Planned::Change { action, .. } = &s.planned else {
                    continue;
                };
                p.msg(&host, &format!("{}: {}", s.name, summary(&s)));
                if let Err(source) = run_action(t.as_ref(), mode, action).await {
                    return (
                        ok,
                        Some(ProvisionError::Step {
                            host: host.clone(),
                            step: s.name.clone(),
                            source,
                        }),
                    );
                }
                ok.push((host.clone(), s.name.clone(), summary(&s)));
            }
            (ok, None)
        });
    }
    let mut errs = Vec::new();
    while let Some(j) = set.join_next().await {
        let (ok, err) = j.expect("apply task panicked");
        done.extend(ok);
        errs.extend(err);
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(ProvisionError::from_many(errs))
    }
}

/// Polls `probe` every 300 ms until it returns true or `timeout` passes.
async fn wait_until<F, Fut>(
    host: &str,
    what: &str,
    timeout: Duration,
    mut probe: F,
) -> Result<(), ProvisionError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if probe().await {
            return Ok(());
        }
        if start.elapsed() > timeout {
            return Err(ProvisionError::Wait {
                host: host.to_string(),
                what: what.to_string(),
                timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Whether the etcd cluster answers healthy on every member (asked from `t`, an etcd host).
async fn etcd_healthy(t: &dyn Transport, endpoints: &str) -> bool {
    let cmd = format!(
        "ETCDCTL_API=3 etcdctl --endpoints={} --dial-timeout=1s --command-timeout=2s endpoint health",
        shell_quote(endpoints)
    );
    matches!(t.run(&cmd, Duration::from_secs(10)).await, Ok(o) if o.success())
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("reqwest client")
}

/// GET `url`: status code, or `None` when unreachable.
async fn http_status(c: &reqwest::Client, url: &str) -> Option<u16> {
    c.get(url).send().await.ok().map(|r| r.status().as_u16())
}

/// Whether the agent at `addr` reports a streaming replica (`GET /patroni`).
async fn replica_streaming(c: &reqwest::Client, base: &str) -> bool {
    let Ok(r) = c.get(format!("{base}/patroni")).send().await else {
        return false;
    };
    let Ok(v) = r.json::<serde_json::Value>().await else {
        return false;
    };
    v["role"] == "replica" && v["state"] == "running" && v["replication_state"] == "streaming"
}

/// What a member's agent says about itself, for errors: role, state and the last clone /
/// bootstrap / config error it reports.
async fn agent_reason(c: &reqwest::Client, base: &str) -> String {
    let Ok(r) = c.get(format!("{base}/patroni")).send().await else {
        return "no answer from its REST API".into();
    };
    let Ok(v) = r.json::<serde_json::Value>().await else {
        return "an unreadable status".into();
    };
    let mut out = format!(
        "role {}, state {}",
        v["role"].as_str().unwrap_or("?"),
        v["state"].as_str().unwrap_or("?")
    );
    for (key, what) in [
        ("clone_error", "clone failed"),
        ("bootstrap_error", "bootstrap failed"),
        ("config_error", "config refused"),
        ("dcs_config_error", "DCS config refused"),
    ] {
        if let Some(e) = v["pgherd"][key].as_str() {
            out.push_str(&format!("; {what}: {e}"));
        }
    }
    out
}

/// Whether a PostgreSQL server answers at `addr` (directly or through a proxy): sends the
/// protocol's SSLRequest and expects the one-byte answer (`S` or `N`). A proxy with no
/// healthy backend accepts and then closes instead.
pub async fn postgres_answers(addr: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        // Length 8, code 80877103: the SSLRequest every libpq client may send first.
        s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
            .await
            .ok()?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.ok()?;
        Some(b[0] == b'N' || b[0] == b'S')
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(3), probe).await,
        Ok(Some(true))
    )
}

/// Whether HAProxy's stats CSV shows `<cluster>_primary` routing to `leader` only and
/// `<cluster>_replicas` not routing to it (and to at least one replica when there are some).
pub fn haproxy_settled(csv: &str, cluster: &str, leader: &str, has_replicas: bool) -> bool {
    let primary_px = format!("{cluster}_primary");
    let replica_px = format!("{cluster}_replica");
    let mut primary_up = Vec::new();
    let mut replica_up = Vec::new();
    for line in csv.lines().filter(|l| !l.starts_with('#')) {
        let f: Vec<&str> = line.split(',').collect();
        // pxname, svname, ... status is the 18th column (index 17).
        let (Some(px), Some(sv), Some(status)) = (f.first(), f.get(1), f.get(17)) else {
            continue;
        };
        if *sv == "FRONTEND" || *sv == "BACKEND" || !status.starts_with("UP") {
            continue;
        }
        if *px == primary_px {
            primary_up.push(sv.to_string());
        } else if px.starts_with(&replica_px) {
            replica_up.push(sv.to_string());
        }
    }
    primary_up == [leader.to_string()]
        && !replica_up.iter().any(|s| s == leader)
        && (!has_replicas || !replica_up.is_empty())
}

/// Which postgres host currently leads (asks each agent's `/primary`).
pub async fn find_leader(spec: &DeploySpec) -> Option<String> {
    let c = http();
    for h in spec.hosts.iter().filter(|h| h.roles.postgres) {
        if http_status(&c, &format!("{}/primary", api_base(spec, &h.name))).await == Some(200) {
            return Some(h.name.clone());
        }
    }
    None
}

/// Executes `plan` (normally fresh from [`make_plan`]).
pub async fn execute(
    spec: &DeploySpec,
    fleet: &Fleet,
    plan: Plan,
    facts: &BTreeMap<String, HostFacts>,
    opts: &ApplyOptions,
) -> Result<ApplyReport, ProvisionError> {
    let started = Instant::now();
    if let Some(e) = refusal(spec, &plan) {
        return Err(e);
    }
    // Planned membership changes need the step that makes them (a joining host's etcd.conf
    // and start are left to it), or the run would report success for what it did not do.
    if matches!(&plan.cluster.etcd, Some(Ok(p)) if !p.changes.is_empty())
        && !spec
            .playbook
            .steps
            .iter()
            .any(|s| matches!(s.kind, StepKind::EtcdMembers { .. }))
    {
        return Err(PlaybookError::Invalid {
            path: spec.playbook_origin.clone(),
            problems: vec![crate::inventory::Problem {
                pos: None,
                field: "steps".into(),
                message: "etcd membership must change (see the plan) but no step of the playbook is an etcd_members step (put one after the etcd config and unit steps, before the step starting etcd)".into(),
            }],
        }
        .into());
    }
    let names: Vec<String> = plan.hosts.iter().map(|h| h.host.clone()).collect();
    let progress = Progress::new(&names, opts.progress);
    let mut done = Vec::new();
    let r = execute_stages(spec, fleet, &plan, facts, opts, &progress, &mut done).await;
    progress.finish();
    r?;
    Ok(ApplyReport {
        plan,
        done,
        elapsed: started.elapsed(),
    })
}

/// Hosts with work in `stage`, in the order they run: inventory order, except that for the
/// agent's `service` steps the current leader goes last (a rolling restart moves the leader
/// once, when every replica already runs the new inputs).
fn run_order(
    stage: &Stage,
    svc: Option<Service>,
    leader: Option<&str>,
) -> Vec<(String, ServiceMode, Vec<PlannedStep>)> {
    let mut hosts: Vec<_> = stage
        .hosts
        .iter()
        .filter(|(_, _, s)| !s.is_empty())
        .cloned()
        .collect();
    if svc == Some(Service::Agent) {
        hosts.sort_by_key(|(h, _, _)| Some(h.as_str()) == leader);
    }
    hosts
}

/// Splits hosts into the batches a step's `serial` setting allows at once.
fn batches<T>(hosts: Vec<T>, p: Parallelism) -> Vec<Vec<T>> {
    let n = match p {
        Parallelism::Parallel => usize::MAX,
        Parallelism::Serial(n) => n.get(),
    };
    let mut out: Vec<Vec<T>> = Vec::new();
    for h in hosts {
        match out.last_mut() {
            Some(b) if b.len() < n => b.push(h),
            _ => out.push(vec![h]),
        }
    }
    out
}

fn is_unit_upload(s: &PlannedStep) -> bool {
    matches!(&s.planned, Planned::Change { action: Action::Upload(f) | Action::FixMetadata(f), .. } if services::is_unit_file(&f.path))
}

fn is_service_action(s: &PlannedStep) -> bool {
    matches!(
        &s.planned,
        Planned::Change {
            action: Action::Service(..) | Action::StopUnit(_),
            ..
        }
    )
}

fn daemon_reload_step() -> PlannedStep {
    PlannedStep {
        name: "systemd".into(),
        planned: Planned::Change {
            action: Action::DaemonReload,
            summary: "daemon-reload (unit files changed)".into(),
            diff: None,
        },
    }
}

/// systemd mode: a changed unit takes effect at the host's next service action only after
/// `systemctl daemon-reload`, so one is inserted before that action (after the uploads of the
/// same batch). `dirty` holds the hosts with units written since their last daemon-reload.
fn insert_daemon_reloads(
    batch: &mut [(String, ServiceMode, Vec<PlannedStep>)],
    dirty: &mut BTreeSet<String>,
) {
    for (host, mode, steps) in batch.iter_mut() {
        if *mode != ServiceMode::Systemd {
            continue;
        }
        let wrote_units = dirty.contains(host.as_str()) || steps.iter().any(is_unit_upload);
        if wrote_units && steps.iter().any(is_service_action) {
            let at = steps
                .iter()
                .position(is_service_action)
                .unwrap_or(steps.len());
            steps.insert(at, daemon_reload_step());
            dirty.remove(host.as_str());
        } else if wrote_units {
            dirty.insert(host.clone());
        }
    }
}

/// Runs one batch of a step: daemon-reloads inserted where units changed, then the hosts'
/// changes in parallel (bounded by `limit`).
async fn run_batch(
    fleet: &Fleet,
    mut batch: Vec<(String, ServiceMode, Vec<PlannedStep>)>,
    dirty: &mut BTreeSet<String>,
    progress: &Progress,
    limit: &Arc<Semaphore>,
    done: &mut Vec<(String, String, String)>,
) -> Result<(), ProvisionError> {
    insert_daemon_reloads(&mut batch, dirty);
    run_parallel(fleet, batch, progress, limit, done).await
}

/// Waits until `svc` is healthy on `host` after a serial service step changed it there, so a
/// rolling restart never takes a second member down before the first is back.
async fn wait_service_healthy(
    spec: &DeploySpec,
    fleet: &Fleet,
    host: &str,
    svc: Service,
    timeout: Duration,
    progress: &Progress,
) -> Result<(), ProvisionError> {
    let c = http();
    progress.msg(host, &format!("waiting until {svc} is healthy"));
    match svc {
        Service::Etcd => {
            let t = fleet[host].clone();
            let endpoints = etcd_endpoints(spec);
            wait_until(host, "the etcd cluster is healthy", timeout, || {
                etcd_healthy(t.as_ref(), &endpoints)
            })
            .await
        }
        Service::Agent => {
            let url = format!("{}/health", api_base(spec, host));
            wait_until(host, "its agent answers (GET /health)", timeout, || {
                let c = c.clone();
                let url = url.clone();
                async move { http_status(&c, &url).await == Some(200) }
            })
            .await
        }
        Service::Haproxy => {
            let addr = spec
                .host(host)
                .map(|h| format!("{}:{}", h.address, spec.primary_port))
                .unwrap_or_default();
            wait_until(host, "HAProxy's primary port answers", timeout, || {
                postgres_answers(&addr)
            })
            .await
        }
    }
}

fn etcd_endpoints(spec: &DeploySpec) -> String {
    spec.hosts
        .iter()
        .filter(|h| h.roles.etcd)
        .map(|h| spec.etcd_endpoint(h))
        .collect::<Vec<_>>()
        .join(",")
}

/// Runs `wait` on every host of `hosts` at once; all errors are collected.
async fn wait_all<F, Fut>(hosts: Vec<String>, wait: F) -> Result<(), ProvisionError>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<(), ProvisionError>> + Send + 'static,
{
    let mut set = JoinSet::new();
    for h in hosts {
        set.spawn(wait(h));
    }
    let mut errs = Vec::new();
    while let Some(j) = set.join_next().await {
        if let Err(e) = j.expect("wait task panicked") {
            errs.push(e);
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(ProvisionError::from_many(errs))
    }
}

/// A `wait_for` step: polls `condition` on the step's hosts until it holds or `timeout`.
async fn wait_condition(
    spec: &DeploySpec,
    fleet: &Fleet,
    hosts: Vec<String>,
    condition: WaitCondition,
    timeout: Duration,
    progress: &Progress,
) -> Result<(), ProvisionError> {
    let c = http();
    let spec = Arc::new(spec.clone());
    for h in &hosts {
        progress.msg(h, &format!("waiting until {}", condition_text(condition)));
    }
    match condition {
        WaitCondition::EtcdHealthy => {
            wait_all(hosts, |h| {
                let t = fleet[&h].clone();
                let endpoint = spec
                    .host(&h)
                    .map(|x| spec.etcd_endpoint(x))
                    .unwrap_or_default();
                async move {
                    wait_until(&h, "its etcd member is healthy", timeout, || {
                        etcd_healthy(t.as_ref(), &endpoint)
                    })
                    .await
                }
            })
            .await
        }
        WaitCondition::AgentApiUp => {
            wait_all(hosts, |h| {
                let c = c.clone();
                let url = format!("{}/health", api_base(&spec, &h));
                async move {
                    wait_until(&h, "its agent answers GET /health", timeout, || {
                        let c = c.clone();
                        let url = url.clone();
                        async move { http_status(&c, &url).await.is_some() }
                    })
                    .await
                }
            })
            .await
        }
        WaitCondition::LeaderElected => {
            let first = hosts.first().cloned().unwrap_or_else(|| "-".into());
            wait_until(&first, "a member holds the leader key", timeout, || {
                let spec = spec.clone();
                async move { find_leader(&spec).await.is_some() }
            })
            .await
        }
        WaitCondition::ReplicasStreaming => {
            wait_all(hosts, |h| {
                let c = c.clone();
                let base = api_base(&spec, &h);
                async move {
                    let r = wait_until(
                        &h,
                        "it leads or streams from the leader as a replica",
                        timeout,
                        || {
                            let c = c.clone();
                            let base = base.clone();
                            async move {
                                // A member started on a cluster that lost its leader may
                                // itself lead now.
                                replica_streaming(&c, &base).await
                                    || http_status(&c, &format!("{base}/primary")).await
                                        == Some(200)
                            }
                        },
                    )
                    .await;
                    // A member that never streams: say what its agent reports (e.g. the
                    // pg_basebackup error), not only that the wait ran out.
                    match r {
                        Err(ProvisionError::Wait {
                            host,
                            what,
                            timeout,
                        }) => Err(ProvisionError::Wait {
                            what: format!(
                                "{what} (its agent reports: {})",
                                agent_reason(&c, &base).await
                            ),
                            host,
                            timeout,
                        }),
                        other => other,
                    }
                }
            })
            .await
        }
        WaitCondition::HaproxyRoutes => {
            let has_replicas = spec.hosts.iter().filter(|h| h.roles.postgres).count() > 1;
            wait_all(hosts, |h| {
                let c = c.clone();
                let spec = spec.clone();
                async move {
                    let addr = spec.host(&h).map(|x| x.address.clone()).unwrap_or_default();
                    // Servers start DOWN (or keep their state across a reload) thanks to the
                    // server-state file the haproxy-state script writes, so this is mostly
                    // waiting for `rise` passing checks.
                    wait_until(
                        &h,
                        "HAProxy routes the primary port to the leader only",
                        timeout,
                        || {
                            let c = c.clone();
                            let spec = spec.clone();
                            let addr = addr.clone();
                            async move { haproxy_routes(&c, &spec, &addr, has_replicas).await }
                        },
                    )
                    .await
                }
            })
            .await
        }
    }
}

fn condition_text(c: WaitCondition) -> &'static str {
    match c {
        WaitCondition::EtcdHealthy => "etcd is healthy",
        WaitCondition::AgentApiUp => "the agent answers",
        WaitCondition::LeaderElected => "a leader is elected",
        WaitCondition::ReplicasStreaming => "replicas stream",
        WaitCondition::HaproxyRoutes => "HAProxy routes to the leader",
    }
}

/// Whether HAProxy on `addr` answers on the primary port and (with a stats port) routes it to
/// the current leader only.
async fn haproxy_routes(
    c: &reqwest::Client,
    spec: &DeploySpec,
    addr: &str,
    has_replicas: bool,
) -> bool {
    if !postgres_answers(&format!("{addr}:{}", spec.primary_port)).await {
        return false;
    }
    if spec.stats_port == 0 {
        return true;
    }
    let Some(leader) = find_leader(spec).await else {
        return false;
    };
    let url = format!("http://{addr}:{}/;csv", spec.stats_port);
    let Ok(r) = c.get(&url).send().await else {
        return false;
    };
    let Ok(csv) = r.text().await else {
        return false;
    };
    haproxy_settled(&csv, &spec.cluster, &leader, has_replicas)
}

/// Whether no agent runs on any postgres host: then the bootstrap step starts the first
/// primary alone (it, not a racing replica with an empty data dir, runs initdb and takes the
/// leader key).
pub fn fresh_cluster(spec: &DeploySpec, facts: &BTreeMap<String, HostFacts>) -> bool {
    !spec.hosts.iter().filter(|h| h.roles.postgres).any(|h| {
        facts
            .get(&h.name)
            .is_some_and(|f| f.service(Service::Agent).running())
    })
}

/// The stages a run of `plan` would execute (for `plan`'s run-order listing).
pub fn stages(
    spec: &DeploySpec,
    plan: &Plan,
    facts: &BTreeMap<String, HostFacts>,
) -> Result<Vec<Stage>, PlaybookError> {
    schedule::build(spec, plan, fresh_cluster(spec, facts))
}

/// Walks the playbook: each step runs its scheduled changes (see [`schedule`]) on its hosts,
/// in the batches its `serial` setting allows, and the run stops after a step in which any
/// host failed.
async fn execute_stages(
    spec: &DeploySpec,
    fleet: &Fleet,
    plan: &Plan,
    facts: &BTreeMap<String, HostFacts>,
    opts: &ApplyOptions,
    progress: &Progress,
    done: &mut Vec<(String, String, String)>,
) -> Result<(), ProvisionError> {
    let stages = stages(spec, plan, facts)?;
    let limit = Arc::new(Semaphore::new(opts.max_parallel.max(1)));
    let c = http();
    let mut dirty_units: BTreeSet<String> = BTreeSet::new();
    for stage in &stages {
        let step = &stage.step;
        let before = done.len();
        match &step.kind {
            StepKind::WaitFor {
                condition,
                timeout_secs,
            } => {
                // Nothing changed yet in this run: the state the facts showed stands, and a
                // wait would only cost round trips.
                if done.is_empty() {
                    continue;
                }
                let hosts = stage.hosts.iter().map(|(h, _, _)| h.clone()).collect();
                wait_condition(
                    spec,
                    fleet,
                    hosts,
                    *condition,
                    Duration::from_secs(*timeout_secs),
                    progress,
                )
                .await?;
            }
            StepKind::BootstrapPrimary { timeout_secs } => {
                let work = run_order(stage, None, None);
                let hosts: Vec<String> = work.iter().map(|(h, _, _)| h.clone()).collect();
                run_batch(fleet, work, &mut dirty_units, progress, &limit, done).await?;
                for h in hosts {
                    progress.msg(&h, "waiting until it leads");
                    let url = format!("{}/primary", api_base(spec, &h));
                    wait_until(
                        &h,
                        "its agent leads the cluster (GET /primary = 200)",
                        Duration::from_secs(*timeout_secs),
                        || {
                            let c = c.clone();
                            let url = url.clone();
                            async move { http_status(&c, &url).await == Some(200) }
                        },
                    )
                    .await?;
                }
            }
            StepKind::StartReplicas { timeout_secs } => {
                let work = run_order(stage, None, None);
                let hosts: Vec<String> = work.iter().map(|(h, _, _)| h.clone()).collect();
                for batch in batches(work, step.parallelism) {
                    run_batch(fleet, batch, &mut dirty_units, progress, &limit, done).await?;
                }
                // Newly started members must stream before the proxy routes to them.
                wait_condition(
                    spec,
                    fleet,
                    hosts,
                    WaitCondition::ReplicasStreaming,
                    Duration::from_secs(*timeout_secs),
                    progress,
                )
                .await?;
            }
            StepKind::Service { name, .. } => {
                let svc = Service::ALL.into_iter().find(|s| s.name() == name);
                let leader = if svc == Some(Service::Agent) && stage.has_work() {
                    find_leader(spec).await
                } else {
                    None
                };
                let work = run_order(stage, svc, leader.as_deref());
                let serial = matches!(step.parallelism, Parallelism::Serial(_));
                for batch in batches(work, step.parallelism) {
                    let hosts: Vec<String> = batch.iter().map(|(h, _, _)| h.clone()).collect();
                    let signalled = agents_signalled(&batch);
                    run_batch(fleet, batch, &mut dirty_units, progress, &limit, done).await?;
                    // A reload is done when the agent says it runs the new file, not when the
                    // signal was sent; one that refused it fails the run with its reason.
                    for h in signalled {
                        if let Some(sha) = spec.host(&h).and_then(|t| {
                            t.files
                                .iter()
                                .find(|f| f.path == crate::render::AGENT_CONFIG_PATH)
                                .map(|f| f.sha256())
                        }) {
                            progress.msg(&h, "waiting until the agent runs the new agent.yml");
                            dcs_config::wait_config_loaded(spec, &h, &sha, opts.wait_timeout)
                                .await?;
                        }
                    }
                    // Rolling: the next batch only when this one is healthy again.
                    if let (true, Some(svc)) = (serial, svc) {
                        for h in hosts {
                            wait_service_healthy(spec, fleet, &h, svc, opts.wait_timeout, progress)
                                .await?;
                        }
                    }
                }
            }
            StepKind::DcsConfig { timeout_secs } => {
                // Nothing planned and nothing changed in this run: the live config matched.
                let planned = plan.cluster.config.as_ref().is_some_and(|c| !c.is_noop());
                if !planned && done.is_empty() {
                    continue;
                }
                let hosts: Vec<String> = stage.hosts.iter().map(|(h, _, _)| h.clone()).collect();
                run_dcs_config(spec, fleet, plan, &hosts, *timeout_secs, progress, done).await?;
            }
            StepKind::EtcdMembers { timeout_secs } => {
                // Planned against the facts of this run: nothing to change, nothing to re-read.
                let planned = matches!(&plan.cluster.etcd, Some(Ok(p)) if !p.changes.is_empty());
                if planned {
                    let report = |h: &str, m: &str| progress.msg(h, m);
                    super::etcd_members::run(
                        spec,
                        fleet,
                        Duration::from_secs(*timeout_secs),
                        opts.ssh_control_dir.clone(),
                        &report,
                        done,
                    )
                    .await?;
                }
            }
            StepKind::RemoveDeparted { timeout_secs } => {
                // Planned against the facts of this run; a re-run re-plans from fresh facts.
                if let Some(Ok(p)) = &plan.cluster.departed
                    && !p.is_empty()
                {
                    let report = |h: &str, m: &str| progress.msg(h, m);
                    super::departed::run(
                        spec,
                        fleet,
                        p,
                        Duration::from_secs(*timeout_secs),
                        opts.ssh_control_dir.clone(),
                        &report,
                        done,
                    )
                    .await?;
                }
            }
            StepKind::RestartPending { .. } => {
                run_restart_pending(spec, fleet, plan, progress, done).await?;
            }
            StepKind::EnsurePackages { .. }
            | StepKind::EnsureDirectory { .. }
            | StepKind::EnsureUser { .. }
            | StepKind::Render { .. }
            | StepKind::UploadBinary { .. } => {
                let work = run_order(stage, None, None);
                for batch in batches(work, step.parallelism) {
                    run_batch(fleet, batch, &mut dirty_units, progress, &limit, done).await?;
                }
            }
        }
        // Report what this step did under the step's name.
        for d in done.iter_mut().skip(before) {
            d.1 = format!("{}: {}", step.name, d.1);
        }
    }
    // Units written but no service action after them on the host: reload systemd anyway, so
    // the next start (boot, operator) sees them.
    if !dirty_units.is_empty() {
        let work = plan
            .hosts
            .iter()
            .filter(|hp| dirty_units.contains(&hp.host))
            .map(|hp| (hp.host.clone(), hp.mode, vec![daemon_reload_step()]))
            .collect();
        run_parallel(fleet, work, progress, &limit, done).await?;
    }
    for h in &plan.hosts {
        progress.msg(&h.host, "done");
    }
    Ok(())
}

/// Hosts of `batch` whose agent is reloaded or restarted.
fn agents_signalled(batch: &[(String, ServiceMode, Vec<PlannedStep>)]) -> Vec<String> {
    batch
        .iter()
        .filter(|(_, _, steps)| {
            steps.iter().any(|s| {
                matches!(
                    s.planned,
                    Planned::Change {
                        action: Action::Service(
                            Service::Agent,
                            ServiceOp::Reload | ServiceOp::Restart
                        ),
                        ..
                    }
                )
            })
        })
        .map(|(h, _, _)| h.clone())
        .collect()
}

/// How the `dcs_config` step labels what it did (the restart step looks for it).
const DCS_CONFIG_STEP: &str = "DCS config";

/// The `dcs_config` step: re-reads the live config (the run may have bootstrapped or changed
/// the cluster), refuses when it moved since the plan was shown (an operator's concurrent
/// edit), writes the inventory's keys with a compare-and-swap and waits until every running
/// selected agent applied them.
async fn run_dcs_config(
    spec: &DeploySpec,
    fleet: &Fleet,
    plan: &Plan,
    hosts: &[String],
    timeout_secs: u64,
    progress: &Progress,
    done: &mut Vec<(String, String, String)>,
) -> Result<(), ProvisionError> {
    let Some(desired) = &spec.dcs_config else {
        return Ok(());
    };
    let cluster = dcs_config::gather(spec, fleet).await?;
    let Some(live) = &cluster.config else {
        return Ok(());
    };
    if let Some(shown) = plan.cluster.config.as_ref().and_then(|c| c.revision)
        && live.revision != Some(shown)
    {
        return Err(dcs_config::ClusterConfigError::Conflict { revision: shown }.into());
    }
    let cp = dcs_config::plan_config(
        desired,
        Some(live),
        cluster.leader.as_deref(),
        &cluster.settings,
    )
    .map_err(dcs_config::ClusterConfigError::from)?;
    if cp.is_noop() {
        return Ok(());
    }
    let running: Vec<String> = hosts
        .iter()
        .filter(|h| cluster.agents.get(*h).is_some_and(|a| a.state == "running"))
        .cloned()
        .collect();
    for h in &running {
        progress.msg(h, "applying the cluster configuration");
    }
    dcs_config::write_and_wait(spec, &cp, &running, Duration::from_secs(timeout_secs)).await?;
    let who = cluster.leader.clone().unwrap_or_else(|| "cluster".into());
    for c in &cp.changes {
        done.push((who.clone(), DCS_CONFIG_STEP.into(), c.to_string()));
    }
    Ok(())
}

/// The `restart_pending` step: the rolling restart of the members pending restart (see
/// [`super::rolling`]). Runs when the plan expected restarts (a restart-needing config change,
/// members pending already, servers left drained) or when this run wrote the DCS config.
async fn run_restart_pending(
    spec: &DeploySpec,
    fleet: &Fleet,
    plan: &Plan,
    progress: &Progress,
    done: &mut Vec<(String, String, String)>,
) -> Result<(), ProvisionError> {
    let wrote_config = done.iter().any(|d| d.1 == DCS_CONFIG_STEP);
    if !plan.cluster.restarts_expected() && !wrote_config {
        return Ok(());
    }
    let Some(inv) = &spec.inventory else {
        return Ok(());
    };
    let say = |line: &str| progress.msg("cluster", line);
    let opts = super::rolling::RollingOptions {
        primary_update_method: inv.postgresql.primary_update_method,
    };
    let report = super::rolling::run_pending_restarts(inv, fleet, &opts, &say).await?;
    for (member, what) in report.done {
        done.push((member, "rolling restart".into(), what));
    }
    Ok(())
}

/// facts → plan → execute.
pub async fn apply(
    spec: &DeploySpec,
    fleet: &Fleet,
    opts: &ApplyOptions,
) -> Result<ApplyReport, ProvisionError> {
    let started = Instant::now();
    let (facts, plan) = facts_and_plan(spec, fleet).await?;
    let mut report = execute(spec, fleet, plan, &facts, opts).await?;
    report.elapsed = started.elapsed();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::haproxy_settled;

    const HEAD: &str = "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status\n";

    fn csv(rows: &[(&str, &str, &str)]) -> String {
        let mut s = HEAD.to_string();
        for (px, sv, st) in rows {
            s.push_str(&format!("{px},{sv},0,0,0,0,,0,0,0,0,0,0,0,0,0,0,{st}\n"));
        }
        s
    }

    #[test]
    fn haproxy_is_settled_only_when_the_leader_alone_serves_the_primary_port() {
        let good = csv(&[
            ("c_primary", "FRONTEND", "OPEN"),
            ("c_primary", "n1", "UP"),
            ("c_primary", "n2", "DOWN"),
            ("c_replicas", "n1", "DOWN"),
            ("c_replicas", "n2", "UP"),
        ]);
        assert!(haproxy_settled(&good, "c", "n1", true));
        // Fresh HAProxy: every server still "UP" from startup.
        let fresh = csv(&[
            ("c_primary", "n1", "UP"),
            ("c_primary", "n2", "UP 1/2"),
            ("c_replicas", "n2", "UP"),
        ]);
        assert!(!haproxy_settled(&fresh, "c", "n1", true));
        let no_replica = csv(&[("c_primary", "n1", "UP"), ("c_replicas", "n2", "DOWN")]);
        assert!(!haproxy_settled(&no_replica, "c", "n1", true));
        assert!(haproxy_settled(&no_replica, "c", "n1", false));
    }
}
