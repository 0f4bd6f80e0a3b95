//! The OpenSSH transport: one multiplexed `ssh` master connection per host (openssh crate,
//! native mux), reused by every command, with bounded per-host concurrency, per-command timeouts
//! enforced on the host, and errors sorted into unreachable / auth refused / host key / timeout.
//!
//! Host keys: new hosts are added to a known_hosts file owned by pgherd (by default
//! `<control_dir>/known_hosts`, i.e. in the pgherd state directory — never `~/.ssh/known_hosts`);
//! a *changed* key is refused ([`TransportError::HostKeyMismatch`]). The user's `~/.ssh/config`
//! is ignored (`-F /dev/null`) so runs are reproducible; everything comes from [`HostSpec`].

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use openssh::{ControlPersist, KnownHosts, Session, SessionBuilder};
use tokio::io::AsyncWriteExt;
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{Exec, Output, Transport, TransportError, redact_output, shell_quote};

/// Upper bound of concurrent channels on one host's connection. sshd's default `MaxSessions` is
/// 10 and every command is one session on the shared connection; staying at 8 leaves room for
/// an interactive `ssh` through the same master and keeps a slow host from being flooded. Excess
/// commands wait for a permit instead of failing.
pub const MAX_CHANNELS_PER_HOST: usize = 8;

/// How long the master connection may sit without any command before ssh closes it. Bounds the
/// life of a master leaked by a crashed pgherd process; the transport reconnects transparently
/// after an idle close (see [`IDLE_RECHECK`]).
const CONTROL_PERSIST_IDLE_SECS: usize = 600;

/// After this much idleness the master is probed before use, because it may have been closed by
/// [`CONTROL_PERSIST_IDLE_SECS`] or lost with a host reboot; probing is a local mux round trip.
const IDLE_RECHECK: Duration = Duration::from_secs(30);

/// Extra time the local side waits beyond a command's timeout: the remote `timeout -k 5` needs
/// up to 5 s to kill a command that ignores SIGTERM, and its exit must travel back to us.
const LOCAL_TIMEOUT_GRACE: Duration = Duration::from_secs(7);

/// Exit status of coreutils `timeout` when it had to stop the command.
const REMOTE_TIMEOUT_STATUS: i32 = 124;

/// How to reach one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSpec {
    /// Inventory name (named in every error).
    pub name: String,
    /// IP address or DNS name to connect to.
    pub address: String,
    pub port: u16,
    pub user: String,
    /// Private key to use (only that key, `IdentitiesOnly=yes`); `None` lets ssh use its
    /// defaults and the agent.
    pub identity_file: Option<PathBuf>,
    /// Run commands as root through `sudo -n` when `user` is not root.
    pub r#become: bool,
    /// Bound on establishing the connection (TCP + SSH handshake + authentication).
    pub connect_timeout: Duration,
    /// Timeout for the file primitives ([`Transport::default_timeout`]).
    pub command_timeout: Duration,
}

impl HostSpec {
    /// A spec with the usual defaults: port 22, user root, no sudo, 10 s to connect, 300 s per
    /// file operation.
    pub fn new(name: impl Into<String>, address: impl Into<String>) -> HostSpec {
        HostSpec {
            name: name.into(),
            address: address.into(),
            port: 22,
            user: "root".into(),
            identity_file: None,
            r#become: false,
            connect_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(300),
        }
    }

    /// Whether commands must go through sudo.
    fn needs_sudo(&self) -> bool {
        self.r#become && self.user != "root"
    }
}

/// Local settings shared by all connections.
#[derive(Debug, Clone)]
pub struct SshOptions {
    /// Directory holding the control sockets. Keep the path short: a Unix socket path is
    /// limited to 108 bytes and openssh adds about 30.
    pub control_dir: PathBuf,
    /// The known_hosts file pgherd owns (created on first use).
    pub known_hosts: PathBuf,
    /// Concurrent channels per host (at most [`MAX_CHANNELS_PER_HOST`] is advised).
    pub max_channels: usize,
}

impl SshOptions {
    /// Control sockets and `known_hosts` both in `control_dir` (the pgherd state directory).
    pub fn new(control_dir: &Path) -> SshOptions {
        SshOptions {
            control_dir: control_dir.to_path_buf(),
            known_hosts: control_dir.join("known_hosts"),
            max_channels: MAX_CHANNELS_PER_HOST,
        }
    }
}

struct Live {
    session: Arc<Session>,
    last_used: Instant,
}

/// A host reached over one multiplexed OpenSSH connection.
pub struct SshTransport {
    spec: HostSpec,
    opts: SshOptions,
    live: Mutex<Option<Live>>,
    channels: Semaphore,
}

impl SshTransport {
    /// Connects to `host`, with control sockets and the known_hosts file in `control_dir`.
    pub async fn connect(
        host: &HostSpec,
        control_dir: &Path,
    ) -> Result<SshTransport, TransportError> {
        Self::connect_with(host, &SshOptions::new(control_dir)).await
    }

    /// Connects with explicit options.
    pub async fn connect_with(
        host: &HostSpec,
        opts: &SshOptions,
    ) -> Result<SshTransport, TransportError> {
        let session = open_session(host, opts).await?;
        Ok(SshTransport {
            spec: host.clone(),
            opts: opts.clone(),
            live: Mutex::new(Some(Live {
                session: Arc::new(session),
                last_used: Instant::now(),
            })),
            channels: Semaphore::new(opts.max_channels.max(1)),
        })
    }

    pub fn spec(&self) -> &HostSpec {
        &self.spec
    }

    /// Closes the master connection. Dropping the transport also closes it (synchronously), so
    /// this is only needed to observe errors.
    pub async fn close(self) -> Result<(), TransportError> {
        let live = self.live.into_inner();
        if let Some(live) = live
            && let Ok(session) = Arc::try_unwrap(live.session)
        {
            session.close().await.map_err(|e| TransportError::Io {
                host: self.spec.name.clone(),
                what: "closing the ssh connection".into(),
                source: std::io::Error::other(e),
            })?;
        }
        Ok(())
    }

    /// The current session, reconnecting when the previous master died (host reboot, idle
    /// close, network loss).
    async fn session(&self) -> Result<Arc<Session>, TransportError> {
        let mut live = self.live.lock().await;
        if let Some(l) = live.as_mut() {
            let stale = l.last_used.elapsed() > IDLE_RECHECK;
            if !stale || l.session.check().await.is_ok() {
                l.last_used = Instant::now();
                return Ok(l.session.clone());
            }
            tracing::debug!(host = %self.spec.name, "ssh master gone, reconnecting");
            *live = None;
        }
        let session = Arc::new(open_session(&self.spec, &self.opts).await?);
        *live = Some(Live {
            session: session.clone(),
            last_used: Instant::now(),
        });
        Ok(session)
    }

    /// Forgets a session whose master no longer answers, so the next command reconnects.
    async fn drop_if_dead(&self, session: &Arc<Session>) -> bool {
        if session.check().await.is_ok() {
            return false;
        }
        let mut live = self.live.lock().await;
        if live
            .as_ref()
            .is_some_and(|l| Arc::ptr_eq(&l.session, session))
        {
            *live = None;
        }
        true
    }

    /// The command line sent to the host: the script under `sh -c`, wrapped in `timeout` so a
    /// runaway command is killed on the host (a dropped local future would leave it running),
    /// and in `sudo -n` when becoming root (`-n`: fail instead of prompting for a password).
    fn remote_command(&self, exec: &Exec<'_>) -> String {
        let secs = exec.timeout.as_secs_f64().max(0.001);
        let inner = format!("timeout -k 5 {secs:.3} sh -c {}", shell_quote(exec.script));
        if self.spec.needs_sudo() {
            format!("sudo -n -- {inner}")
        } else {
            inner
        }
    }

    /// Starts the command on `session`. Failing here means the command never reached the host.
    async fn spawn(
        &self,
        session: &Arc<Session>,
        exec: &Exec<'_>,
    ) -> Result<openssh::Child<Arc<Session>>, openssh::Error> {
        let mut cmd = Session::to_raw_command(session.clone(), self.remote_command(exec));
        cmd.stdin(if exec.stdin.is_some() {
            openssh::Stdio::piped()
        } else {
            openssh::Stdio::null()
        })
        .stdout(openssh::Stdio::piped())
        .stderr(openssh::Stdio::piped());
        cmd.spawn().await
    }

    /// Feeds stdin and collects the output of a started command.
    async fn finish(
        mut child: openssh::Child<Arc<Session>>,
        exec: &Exec<'_>,
    ) -> Result<Output, openssh::Error> {
        let stdin = child.stdin().take();
        // Feed stdin while collecting output: a command that writes before reading all of its
        // input would otherwise deadlock on a full pipe.
        let feed = async {
            if let (Some(mut w), Some(bytes)) = (stdin, exec.stdin) {
                w.write_all(bytes).await?;
                w.shutdown().await?;
            }
            Ok::<(), std::io::Error>(())
        };
        let (fed, out) = tokio::join!(feed, child.wait_with_output());
        let out = out?;
        fed.map_err(openssh::Error::ChildIo)?;
        Ok(Output {
            status: out.status.code().unwrap_or(-1),
            stdout: out.stdout,
            stderr: out.stderr,
        })
    }

    /// Runs the command, reconnecting once when the master turns out to be dead *before* the
    /// command started (host rebooted, idle close): then it provably did not run, so starting it
    /// on a new connection is safe. A failure after the start is never retried.
    async fn run_once(&self, exec: &Exec<'_>) -> Result<Output, TransportError> {
        let host = &self.spec.name;
        let mut reconnected = false;
        let (session, child) = loop {
            let session = self.session().await?;
            match self.spawn(&session, exec).await {
                Ok(child) => break (session, child),
                Err(e) => {
                    let dead = self.drop_if_dead(&session).await;
                    if dead && !reconnected {
                        tracing::debug!(host = %host, "ssh master gone before start, reconnecting");
                        reconnected = true;
                        continue;
                    }
                    return Err(self.channel_error(dead, e, exec));
                }
            }
        };
        match Self::finish(child, exec).await {
            Ok(out) => Ok(out),
            Err(e) => {
                // The mux protocol cannot tell a dead connection from a killed remote process:
                // ask the master whether it is still alive.
                let dead = self.drop_if_dead(&session).await;
                Err(self.channel_error(dead, e, exec))
            }
        }
    }

    fn channel_error(&self, dead: bool, e: openssh::Error, exec: &Exec<'_>) -> TransportError {
        if dead {
            TransportError::Unreachable {
                host: self.spec.name.clone(),
                reason: format!("connection lost ({e})"),
            }
        } else {
            TransportError::Io {
                host: self.spec.name.clone(),
                what: format!("running {}", exec.shown()),
                source: std::io::Error::other(e),
            }
        }
    }
}

#[async_trait]
impl Transport for SshTransport {
    fn host(&self) -> &str {
        &self.spec.name
    }

    fn default_timeout(&self) -> Duration {
        self.spec.command_timeout
    }

    async fn exec(&self, exec: Exec<'_>) -> Result<Output, TransportError> {
        let host = &self.spec.name;
        let _permit = self
            .channels
            .acquire()
            .await
            .expect("the channel semaphore is never closed");
        tracing::debug!(host = %host, cmd = %exec.shown(), "run");
        let timed_out = || TransportError::Timeout {
            host: host.clone(),
            cmd: exec.shown(),
            timeout: exec.timeout,
        };
        let started = Instant::now();
        let res =
            tokio::time::timeout(exec.timeout + LOCAL_TIMEOUT_GRACE, self.run_once(&exec)).await;
        match res {
            Err(_elapsed) => Err(timed_out()),
            // 124 is also an ordinary exit status (e.g. of a `timeout` inside the script): it
            // means *our* timeout only when the deadline has actually passed.
            Ok(Ok(out))
                if out.status == REMOTE_TIMEOUT_STATUS && started.elapsed() >= exec.timeout =>
            {
                Err(timed_out())
            }
            Ok(Ok(out)) => Ok(redact_output(out, exec.secrets)),
            Ok(Err(e)) => Err(e),
        }
    }
}

/// Starts the ssh master for `host`, sorting failures into the [`TransportError`] variants.
async fn open_session(host: &HostSpec, opts: &SshOptions) -> Result<Session, TransportError> {
    let io = |what: &str, source| TransportError::Io {
        host: host.name.clone(),
        what: what.to_string(),
        source,
    };
    std::fs::create_dir_all(&opts.control_dir)
        .map_err(|e| io("creating the ssh control directory", e))?;
    if let Some(parent) = opts.known_hosts.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io("creating the known_hosts directory", e))?;
    }
    let mut b = SessionBuilder::default();
    b.user(host.user.clone())
        .port(host.port)
        .known_hosts_check(KnownHosts::Add)
        .user_known_hosts_file(&opts.known_hosts)
        .config_file("/dev/null")
        .control_directory(&opts.control_dir)
        .control_persist(ControlPersist::IdleFor(
            NonZeroUsize::new(CONTROL_PERSIST_IDLE_SECS).expect("non-zero"),
        ))
        // ssh's ConnectTimeout bounds the TCP connect and the banner exchange.
        .connect_timeout(host.connect_timeout)
        // Notice a vanished host within ~15 s (3 missed probes) instead of TCP's minutes.
        .server_alive_interval(Duration::from_secs(5));
    if let Some(key) = &host.identity_file {
        b.keyfile(key);
    }
    // Our own bound covers authentication too, which ConnectTimeout does not.
    let limit = host.connect_timeout + Duration::from_millis(500);
    match tokio::time::timeout(limit, b.connect_mux(&host.address)).await {
        Err(_) => Err(TransportError::Unreachable {
            host: host.name.clone(),
            reason: format!("no ssh connection to {} within {limit:?}", host.address),
        }),
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(classify_connect_error(host, opts, e)),
    }
}

/// Sorts an ssh connection failure by what ssh printed.
fn classify_connect_error(host: &HostSpec, opts: &SshOptions, e: openssh::Error) -> TransportError {
    let text = match &e {
        openssh::Error::Connect(io) => io.to_string(),
        other => other.to_string(),
    };
    let reason = last_line(&text);
    if text.contains("Permission denied") || text.contains("Too many authentication failures") {
        TransportError::AuthRefused {
            host: host.name.clone(),
            reason,
        }
    } else if text.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
        || text.contains("Host key verification failed")
    {
        TransportError::HostKeyMismatch {
            host: host.name.clone(),
            known_hosts: opts.known_hosts.display().to_string(),
        }
    } else if let openssh::Error::Master(io) = e {
        TransportError::Io {
            host: host.name.clone(),
            what: "starting the ssh master".into(),
            source: io,
        }
    } else {
        TransportError::Unreachable {
            host: host.name.clone(),
            reason,
        }
    }
}

fn last_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("unknown ssh error")
        .to_string()
}

/// Connects to all `hosts`, at most `limit` at a time, and returns one result per host in the
/// order given (a host that fails does not stop the others).
pub async fn connect_all(
    hosts: &[HostSpec],
    opts: &SshOptions,
    limit: usize,
) -> Vec<(String, Result<SshTransport, TransportError>)> {
    let gate = Arc::new(Semaphore::new(limit.max(1)));
    let mut set = JoinSet::new();
    for (i, h) in hosts.iter().cloned().enumerate() {
        let gate = gate.clone();
        let opts = opts.clone();
        set.spawn(async move {
            let _permit = gate.acquire_owned().await.expect("never closed");
            (i, SshTransport::connect_with(&h, &opts).await)
        });
    }
    let mut results: Vec<Option<Result<SshTransport, TransportError>>> =
        hosts.iter().map(|_| None).collect();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((i, r)) => results[i] = Some(r),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    hosts
        .iter()
        .zip(results)
        .map(|(h, r)| (h.name.clone(), r.expect("every task reported")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> HostSpec {
        HostSpec::new("n1", "10.0.0.1")
    }

    #[test]
    fn classifies_permission_denied_as_auth_refused() {
        let e = openssh::Error::Connect(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "root@10.0.0.1: Permission denied (publickey).",
        ));
        let opts = SshOptions::new(Path::new("/tmp/x"));
        assert!(matches!(
            classify_connect_error(&spec(), &opts, e),
            TransportError::AuthRefused { ref host, .. } if host == "n1"
        ));
    }

    #[test]
    fn classifies_changed_host_key_as_mismatch() {
        let e = openssh::Error::Connect(std::io::Error::other(
            "@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@\nHost key verification failed.",
        ));
        let opts = SshOptions::new(Path::new("/tmp/x"));
        assert!(matches!(
            classify_connect_error(&spec(), &opts, e),
            TransportError::HostKeyMismatch { .. }
        ));
    }

    #[test]
    fn classifies_refused_connection_as_unreachable() {
        let e = openssh::Error::Connect(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connect to host 10.0.0.1 port 22: Connection refused",
        ));
        let opts = SshOptions::new(Path::new("/tmp/x"));
        let err = classify_connect_error(&spec(), &opts, e);
        assert!(matches!(err, TransportError::Unreachable { .. }));
        assert!(err.to_string().contains("Connection refused"));
    }

    #[test]
    fn becomes_root_through_sudo_only_for_other_users() {
        let mut s = spec();
        s.r#become = true;
        let t = |s: &HostSpec| {
            let x = SshTransport {
                spec: s.clone(),
                opts: SshOptions::new(Path::new("/tmp/x")),
                live: Mutex::new(None),
                channels: Semaphore::new(1),
            };
            x.remote_command(&Exec::new("id -u", Duration::from_secs(2)))
        };
        assert_eq!(t(&s), "timeout -k 5 2.000 sh -c 'id -u'");
        s.user = "deploy".into();
        assert_eq!(t(&s), "sudo -n -- timeout -k 5 2.000 sh -c 'id -u'");
    }
}
