//! Executing a [`Plan`] over transports, in the order a PostgreSQL HA cluster needs:
//!
//! 1. **facts** on every host (read-only; a host that cannot be read stops the run before any
//!    host is changed);
//! 2. **prepare** every host in parallel: packages, directories, files, agent binary;
//! 3. **etcd**: members that are not running are started together (a new etcd cluster only
//!    forms when a quorum of its initial members runs), members whose config changed are
//!    restarted one at a time with a health check in between (never more than one member down);
//!    then wait until the cluster is healthy;
//! 4. **agents**: on a fresh cluster the first primary first — wait until it leads — then the
//!    replicas, waiting until each streams; on an existing cluster, restarts/reloads go replicas
//!    first and the leader last, one at a time, so at most one member is ever in transition;
//! 5. **HAProxy**: start or reload (seamless), then wait until the primary port accepts.
//!
//! A phase runs on all its hosts to the end even when one host fails, and the run stops before
//! the next phase: every host is left either done with a phase or not started on it, and a
//! re-run (facts → plan again) converges from there.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tokio::task::JoinSet;

use super::facts::{self, FactsError, HostFacts};
use super::plan::{self, Action, DeploySpec, HostPlan, Plan, Planned, PlannedStep};
use super::services::{self, Service, ServiceMode, ServiceOp};
use crate::transport::{Transport, TransportError, shell_quote};

/// Connected hosts by inventory name.
pub type Fleet = BTreeMap<String, Arc<dyn Transport>>;

/// Why a run stopped. Every variant names the host(s) involved.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Facts(#[from] FactsError),
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
    /// How long to wait for etcd health, a leader, a streaming replica, the proxy.
    pub wait_timeout: Duration,
    /// Draw indicatif bars (only effective on a TTY); otherwise plain log lines on stderr.
    pub progress: bool,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            wait_timeout: Duration::from_secs(120),
            progress: true,
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

/// facts → plan (pure planner).
pub async fn make_plan(spec: &DeploySpec, fleet: &Fleet) -> Result<Plan, ProvisionError> {
    let facts = gather_all(spec, fleet).await?;
    Ok(plan::plan(spec, &facts))
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
async fn upload_with_sidecar(
    t: &dyn Transport,
    f: &plan::DesiredFile,
) -> Result<(), TransportError> {
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

/// Runs `steps` of each host (host name → steps), hosts in parallel, steps in order. All hosts
/// run to the end of their list; errors are collected.
async fn run_parallel(
    fleet: &Fleet,
    work: Vec<(String, ServiceMode, Vec<PlannedStep>)>,
    progress: &Progress,
    done: &mut Vec<(String, String, String)>,
) -> Result<(), ProvisionError> {
    let mut set = JoinSet::new();
    for (host, mode, steps) in work {
        if steps.is_empty() {
            continue;
        }
        let t = fleet.get(&host).cloned().expect("fleet covers the plan");
        let p = progress.clone();
        set.spawn(async move {
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

fn service_steps(hp: &HostPlan, svc: Service) -> Vec<PlannedStep> {
    hp.steps
        .iter()
        .filter(|s| matches!(&s.planned, Planned::Change { action: Action::Service(x, _), .. } if *x == svc))
        .cloned()
        .collect()
}

/// `svc`'s planned service changes on `hp`, split into the starts (service not running yet)
/// and the rest (restarts / reloads of a running service), which the phases order differently.
fn split_service_steps(hp: &HostPlan, svc: Service) -> (Vec<PlannedStep>, Vec<PlannedStep>) {
    service_steps(hp, svc).into_iter().partition(|s| {
        matches!(
            &s.planned,
            Planned::Change {
                action: Action::Service(_, ServiceOp::Start),
                ..
            }
        )
    })
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

fn api_base(spec: &DeploySpec, host: &str) -> String {
    let addr = spec.host(host).map(|h| h.address.as_str()).unwrap_or(host);
    format!("http://{addr}:{}", spec.restapi_port)
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
    let names: Vec<String> = plan.hosts.iter().map(|h| h.host.clone()).collect();
    let progress = Progress::new(&names, opts.progress);
    let mut done = Vec::new();
    let r = execute_phases(spec, fleet, &plan, facts, opts, &progress, &mut done).await;
    progress.finish();
    r?;
    Ok(ApplyReport {
        plan,
        done,
        elapsed: started.elapsed(),
    })
}

async fn execute_phases(
    spec: &DeploySpec,
    fleet: &Fleet,
    plan: &Plan,
    facts: &BTreeMap<String, HostFacts>,
    opts: &ApplyOptions,
    progress: &Progress,
    done: &mut Vec<(String, String, String)>,
) -> Result<(), ProvisionError> {
    let c = http();
    // Phase 2: prepare (everything but services).
    let prepare = plan
        .hosts
        .iter()
        .map(|hp| {
            let steps = hp
                .steps
                .iter()
                .filter(|s| {
                    !matches!(
                        &s.planned,
                        Planned::Change {
                            action: Action::Service(..),
                            ..
                        }
                    )
                })
                .cloned()
                .collect();
            (hp.host.clone(), hp.mode, steps)
        })
        .collect();
    run_parallel(fleet, prepare, progress, done).await?;

    // Phase 3: etcd.
    let etcd_hosts: Vec<&HostPlan> = plan
        .hosts
        .iter()
        .filter(|hp| spec.host(&hp.host).is_some_and(|h| h.roles.etcd))
        .collect();
    if !etcd_hosts.is_empty() {
        let endpoints = spec
            .hosts
            .iter()
            .filter(|h| h.roles.etcd)
            .map(|h| format!("http://{}:{}", h.address, spec.etcd_client_port))
            .collect::<Vec<_>>()
            .join(",");
        let probe_host = etcd_hosts[0].host.clone();
        let probe_t = fleet[&probe_host].clone();
        // Start every stopped member at once: a fresh cluster needs a quorum to form.
        let starts = etcd_hosts
            .iter()
            .map(|hp| {
                let s = split_service_steps(hp, Service::Etcd).0;
                (hp.host.clone(), hp.mode, s)
            })
            .collect();
        run_parallel(fleet, starts, progress, done).await?;
        // Restarts one member at a time, healthy in between, so quorum is never lost.
        for hp in &etcd_hosts {
            let restarts: Vec<PlannedStep> = split_service_steps(hp, Service::Etcd).1;
            if restarts.is_empty() {
                continue;
            }
            run_parallel(
                fleet,
                vec![(hp.host.clone(), hp.mode, restarts)],
                progress,
                done,
            )
            .await?;
            progress.msg(&hp.host, "waiting for etcd health");
            wait_until(&hp.host, "etcd is healthy", opts.wait_timeout, || {
                etcd_healthy(probe_t.as_ref(), &endpoints)
            })
            .await?;
        }
        let all_healthy = etcd_hosts
            .iter()
            .all(|hp| facts.get(&hp.host).and_then(|f| f.etcd_healthy) == Some(true));
        let any_etcd_change = etcd_hosts
            .iter()
            .any(|hp| hp.service_op(Service::Etcd).is_some());
        if any_etcd_change || !all_healthy {
            progress.msg(&probe_host, "waiting for etcd cluster health");
            wait_until(
                &probe_host,
                "the etcd cluster is healthy",
                opts.wait_timeout,
                || etcd_healthy(probe_t.as_ref(), &endpoints),
            )
            .await?;
        }
    }

    // Phase 4: agents.
    let pg_hosts: Vec<&HostPlan> = plan
        .hosts
        .iter()
        .filter(|hp| spec.host(&hp.host).is_some_and(|h| h.roles.postgres))
        .collect();
    let any_agent_running = pg_hosts.iter().any(|hp| {
        facts
            .get(&hp.host)
            .is_some_and(|f| f.service(Service::Agent).running())
    });
    let starts_of =
        |hp: &HostPlan| -> Vec<PlannedStep> { split_service_steps(hp, Service::Agent).0 };
    let mut started_replicas: Vec<String> = Vec::new();
    if !any_agent_running && !pg_hosts.is_empty() {
        // Fresh cluster: the first primary bootstraps alone, so that it (and not a racing
        // replica with an empty data dir) runs initdb and takes the leader key.
        let first = spec
            .first_primary()
            .map(|h| h.name.clone())
            .unwrap_or_default();
        if let Some(hp) = pg_hosts.iter().find(|hp| hp.host == first) {
            run_parallel(
                fleet,
                vec![(hp.host.clone(), hp.mode, starts_of(hp))],
                progress,
                done,
            )
            .await?;
            progress.msg(&first, "waiting until it leads");
            let url = format!("{}/primary", api_base(spec, &first));
            wait_until(
                &first,
                "its agent leads the cluster (GET /primary = 200)",
                opts.wait_timeout,
                || {
                    let c = c.clone();
                    let url = url.clone();
                    async move { http_status(&c, &url).await == Some(200) }
                },
            )
            .await?;
        }
        let rest = pg_hosts
            .iter()
            .filter(|hp| hp.host != first)
            .map(|hp| (hp.host.clone(), hp.mode, starts_of(hp)));
        let rest: Vec<_> = rest.collect();
        started_replicas.extend(
            rest.iter()
                .filter(|(_, _, s)| !s.is_empty())
                .map(|(h, _, _)| h.clone()),
        );
        run_parallel(fleet, rest, progress, done).await?;
    } else {
        // Existing cluster: agents that are not running join as replicas (or take over if no
        // one leads; the agents decide that, not us).
        let work: Vec<_> = pg_hosts
            .iter()
            .map(|hp| (hp.host.clone(), hp.mode, starts_of(hp)))
            .collect();
        started_replicas.extend(
            work.iter()
                .filter(|(_, _, s)| !s.is_empty())
                .map(|(h, _, _)| h.clone()),
        );
        run_parallel(fleet, work, progress, done).await?;
    }
    // Restarts/reloads: replicas first, the leader last, one at a time, so at most one member
    // is in transition and the leader's own restart (a possible failover) comes when every
    // replica is already on the new inputs.
    let leader = find_leader(spec).await;
    let mut order: Vec<&HostPlan> = pg_hosts
        .iter()
        .copied()
        .filter(|hp| Some(&hp.host) != leader.as_ref())
        .collect();
    order.extend(
        pg_hosts
            .iter()
            .copied()
            .filter(|hp| Some(&hp.host) == leader.as_ref()),
    );
    for hp in order {
        let steps: Vec<PlannedStep> = split_service_steps(hp, Service::Agent).1;
        if steps.is_empty() {
            continue;
        }
        run_parallel(
            fleet,
            vec![(hp.host.clone(), hp.mode, steps)],
            progress,
            done,
        )
        .await?;
        let base = api_base(spec, &hp.host);
        progress.msg(&hp.host, "waiting for the agent's REST API");
        wait_until(
            &hp.host,
            "its agent answers (GET /health)",
            opts.wait_timeout,
            || {
                let c = c.clone();
                let url = format!("{base}/health");
                async move { http_status(&c, &url).await == Some(200) }
            },
        )
        .await?;
    }
    // Newly started replicas must stream before the proxy routes to them.
    let mut waits = JoinSet::new();
    for host in started_replicas {
        let base = api_base(spec, &host);
        let c = c.clone();
        let timeout = opts.wait_timeout;
        progress.msg(&host, "waiting until streaming from the leader");
        waits.spawn(async move {
            wait_until(
                &host,
                "it streams from the leader as a replica",
                timeout,
                || {
                    let c = c.clone();
                    let base = base.clone();
                    async move {
                        // A replica started on a cluster that lost its leader may itself lead now.
                        replica_streaming(&c, &base).await
                            || http_status(&c, &format!("{base}/primary")).await == Some(200)
                    }
                },
            )
            .await
        });
    }
    let mut errs = Vec::new();
    while let Some(j) = waits.join_next().await {
        if let Err(e) = j.expect("wait task panicked") {
            errs.push(e);
        }
    }
    if !errs.is_empty() {
        return Err(ProvisionError::from_many(errs));
    }

    // Phase 5: HAProxy.
    let work: Vec<_> = plan
        .hosts
        .iter()
        .map(|hp| {
            (
                hp.host.clone(),
                hp.mode,
                service_steps(hp, Service::Haproxy),
            )
        })
        .collect();
    let touched: Vec<String> = work
        .iter()
        .filter(|(_, _, s)| !s.is_empty())
        .map(|(h, _, _)| h.clone())
        .collect();
    run_parallel(fleet, work, progress, done).await?;
    // Wait until each touched HAProxy routes correctly, not merely listens. Servers start
    // DOWN (or keep their state across a reload) thanks to the server-state file written by
    // the haproxy-state script, so this is mostly waiting for `rise` passing checks; the stats
    // must show the leader as the only server up in the primary proxy, and no leader in the
    // replica proxy.
    let leader = find_leader(spec).await;
    let has_replicas = spec.hosts.iter().filter(|h| h.roles.postgres).count() > 1;
    for host in touched {
        let addr = spec
            .host(&host)
            .map(|h| h.address.clone())
            .unwrap_or_default();
        let port = spec.primary_port;
        progress.msg(&host, "waiting until HAProxy routes to the leader");
        wait_until(
            &host,
            "HAProxy routes the primary port to the leader only",
            opts.wait_timeout,
            || {
                let a = format!("{addr}:{port}");
                let c = c.clone();
                let stats = (spec.stats_port != 0)
                    .then(|| format!("http://{addr}:{}/;csv", spec.stats_port));
                let leader = leader.clone();
                async move {
                    if !postgres_answers(&a).await {
                        return false;
                    }
                    match (stats, leader) {
                        (Some(url), Some(l)) => {
                            let Ok(r) = c.get(&url).send().await else {
                                return false;
                            };
                            let Ok(csv) = r.text().await else {
                                return false;
                            };
                            haproxy_settled(&csv, &spec.cluster, &l, has_replicas)
                        }
                        _ => true,
                    }
                }
            },
        )
        .await?;
    }
    for h in &plan.hosts {
        progress.msg(&h.host, "done");
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
    let facts = gather_all(spec, fleet).await?;
    let plan = plan::plan(spec, &facts);
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
