//! Wiring of the `pgherd-agent` daemon: builds the real DCS, PostgreSQL controller, hooks,
//! watchdog, peer probe and REST API around the HA loop, and owns process-level concerns
//! (logging, signals, the duplicate-name check, orderly shutdown).
//!
//! Tasks (each named, each stopped through the one `CancellationToken`):
//! - `ha-loop`: the observe → decide → act loop ([`crate::ha::HaLoop`]);
//! - `rest-api`: the axum server, stopped after the loop so that health checks keep answering
//!   while a leader shuts down;
//! - `signals`: SIGTERM/SIGINT cancel, SIGHUP sends a reload command.
//!
//! Reload (SIGHUP, `POST /reload`) is carried out by the HA loop, which owns the config: it
//! pushes a new config to PostgreSQL, the hooks and the DCS itself, and to the REST API's
//! credentials through the subscriber installed here. The peer probe keeps its start-up
//! credentials: it only reads `GET /patroni`, which Patroni never authenticates.

mod logging;

pub use logging::{JsonLines, init_logging};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::config::{AgentConfig, LoadedConfig};
use crate::dcs::Dcs;
use crate::dcs::etcd::EtcdDcs;
use crate::ha::HaLoop;
use crate::status::{Command, CommandReply};

/// Runs the agent until SIGTERM/SIGINT. `loaded` is the config read from `config_path` (its
/// digest is what `/patroni` reports until a reload replaces it).
pub async fn run(loaded: LoadedConfig, config_path: PathBuf) -> anyhow::Result<()> {
    let LoadedConfig {
        config: cfg,
        sha256,
    } = loaded;
    info!(
        "pgherd-agent {} starting: scope {}, member {}",
        env!("CARGO_PKG_VERSION"),
        cfg.scope,
        cfg.name
    );
    let timing = crate::config::Timing::from_dcs(&cfg.bootstrap.dcs);
    let credentials = match (&cfg.etcd3.username, &cfg.etcd3.password) {
        (Some(u), Some(p)) => Some((u.clone(), p.clone())),
        _ => None,
    };
    // Lazy: the agent must start (and serve /liveness) while etcd is still down.
    let dcs: Arc<dyn Dcs> = Arc::new(
        EtcdDcs::new_lazy(
            cfg.etcd3.endpoints(),
            cfg.base_path(),
            Duration::from_secs(timing.retry_timeout),
            credentials,
        )
        .map_err(|e| anyhow::anyhow!("etcd3: {e}"))?,
    );

    ensure_unique_name(&cfg, dcs.as_ref()).await?;

    let pg = Arc::new(
        crate::pg::local::LocalPostgres::new(&cfg)
            .map_err(|e| anyhow::anyhow!("postgresql: {e}"))?,
    );
    let hooks = Arc::new(crate::callbacks::CommandHooks::new(
        cfg.scope.clone(),
        cfg.postgresql.callbacks.clone(),
        cfg.postgresql.pre_promote.clone(),
        cfg.postgresql.before_stop.clone(),
    ));
    let watchdog = crate::watchdog::device_from_config(&cfg.watchdog, &cfg.postgresql.data_dir);
    let mut probe = crate::peers::HttpPeerProbe::new();
    if let Some(a) = &cfg.restapi.authentication {
        probe = probe.with_auth(a.username.clone(), a.password.clone());
    }
    let peers = Arc::new(probe);

    let mut initial = HaLoop::initial_status(&cfg);
    initial.pgherd.config_sha256 = Some(sha256.clone());
    let (status_tx, status_rx) = watch::channel(initial);
    let (cmd_tx, cmd_rx) = mpsc::channel::<Command>(32);
    let shutdown = CancellationToken::new();

    let listener = tokio::net::TcpListener::bind(&cfg.restapi.listen)
        .await
        .with_context(|| format!("restapi.listen {}: cannot bind", cfg.restapi.listen))?;
    let failsafe_board = crate::status::FailsafeBoard::default();
    let api_state = crate::api::ApiState::new(
        status_rx,
        dcs.clone(),
        cmd_tx.clone(),
        cfg.restapi.authentication.clone(),
        cfg.scope.clone(),
        cfg.name.clone(),
    )
    .with_failsafe_board(failsafe_board.clone())
    .with_access(cfg.restapi.access_list());
    let api_auth = api_state.auth_handle();
    let api_access = api_state.access_handle();
    let api_stop = CancellationToken::new();
    let api_stop2 = api_stop.clone();
    let api = tokio::spawn(
        async move {
            if let Err(e) =
                crate::api::serve(
                    listener,
                    api_state,
                    async move { api_stop2.cancelled().await },
                )
                .await
            {
                warn!("REST API stopped: {e}");
            }
        }
        .instrument(info_span!("rest-api")),
    );

    let signals = tokio::spawn(
        handle_signals(shutdown.clone(), cmd_tx.clone()).instrument(info_span!("signals")),
    );

    let ha = HaLoop::new(cfg, dcs, pg, hooks, watchdog, peers, status_tx, cmd_rx)
        .with_failsafe_board(failsafe_board)
        .with_config_path(config_path)
        .with_config_sha256(sha256)
        .with_config_subscriber(Arc::new(move |c: &AgentConfig| {
            *api_auth.write().unwrap_or_else(|p| p.into_inner()) = c.restapi.authentication.clone();
            *api_access.write().unwrap_or_else(|p| p.into_inner()) = c.restapi.access_list();
        }));
    ha.run(shutdown.clone())
        .instrument(info_span!("ha-loop"))
        .await;

    api_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), api).await;
    signals.abort();
    info!("pgherd-agent stopped");
    Ok(())
}

/// Patroni's guard against split brain from a duplicate member name (issue #1804): if a member
/// key with our name exists and its REST API answers `/liveness`, another agent with our name
/// is running, and we refuse to start.
async fn ensure_unique_name(cfg: &AgentConfig, dcs: &dyn Dcs) -> anyhow::Result<()> {
    let Ok(view) = dcs.load().await else {
        return Ok(());
    };
    let me = crate::types::MemberName::new(cfg.name.clone());
    let Some(m) = view.members.get(&me) else {
        return Ok(());
    };
    let Some(base) = m.data.api_base() else {
        return Ok(());
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    if let Ok(r) = client.get(format!("{base}/liveness")).send().await
        && r.status().is_success()
    {
        anyhow::bail!(
            "Can't start; there is already a node named '{}' running",
            cfg.name
        );
    }
    Ok(())
}

async fn handle_signals(shutdown: CancellationToken, commands: mpsc::Sender<Command>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        warn!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => { info!("received SIGTERM, shutting down"); shutdown.cancel(); return; }
            _ = int.recv() => { info!("received SIGINT, shutting down"); shutdown.cancel(); return; }
            _ = hup.recv() => {
                info!("received SIGHUP, reloading configuration");
                let (tx, _rx) = tokio::sync::oneshot::channel::<CommandReply>();
                let _ = commands.send(Command::Reload { reply: tx }).await;
            }
        }
    }
}
