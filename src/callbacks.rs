//! Patroni-style user hooks: callbacks (`on_start`, `on_stop`, `on_restart`, `on_reload`,
//! `on_role_change`, argv `cmd action role scope`), `pre_promote` and `before_stop`.
//!
//! The [`Hooks`] trait is what the HA loop calls; the real implementation runs the configured
//! commands, a recording fake serves tests.

use async_trait::async_trait;

use crate::pg::Role;
use std::os::unix::process::CommandExt;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallbackAction {
    OnStart,
    OnStop,
    OnRestart,
    OnReload,
    OnRoleChange,
}

impl CallbackAction {
    pub fn as_str(self) -> &'static str {
        match self {
            CallbackAction::OnStart => "on_start",
            CallbackAction::OnStop => "on_stop",
            CallbackAction::OnRestart => "on_restart",
            CallbackAction::OnReload => "on_reload",
            CallbackAction::OnRoleChange => "on_role_change",
        }
    }
}

/// Contract of the hook runner.
///
/// - `callback` returns at once. Callbacks run one at a time: starting one kills the running
///   one (and its process group), except `on_reload`, which has its own slot. argv is
///   `shell-split(cmd) + [action, role, scope]`; `Role::Promoted` is reported as `primary`.
///   Unconfigured callbacks are no-ops.
/// - `pre_promote` runs synchronously (bounded by a timeout) with no extra args; `false` (non-zero
///   exit, failure to spawn, timeout) aborts the promotion.
/// - `before_stop` runs synchronously before PostgreSQL is signalled; its exit code is ignored.
/// - `reconfigure` takes over the commands of a reloaded config for every later call; a hook
///   already running is left alone (a callback is still killed by the next one in its slot).
#[async_trait]
pub trait Hooks: Send + Sync {
    fn callback(&self, action: CallbackAction, role: Role);
    fn reconfigure(&self, cfg: &crate::config::AgentConfig);
    async fn pre_promote(&self) -> bool;
    async fn before_stop(&self);
}

// ---------------------------------------------------------------------------------------------
// The real runner: configured shell commands.
// ---------------------------------------------------------------------------------------------

use crate::config::AgentConfig;

/// Default bound on `pre_promote`: the promotion (and with it the leader's first cycles) waits
/// for it, so a hung script must not hold the cluster leaderless for long.
pub const DEFAULT_PRE_PROMOTE_TIMEOUT: Duration = Duration::from_secs(30);

/// Default bound on `before_stop`: Patroni has none, but the HA loop (and thus lease renewal)
/// waits for it, so a hung script must not stall a demotion past the lease.
pub const DEFAULT_BEFORE_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Splits a command line like a POSIX shell (and Python's `shlex.split`): whitespace separates
/// words, single quotes are literal, double quotes allow `\"`, `\\`, `\$`, `` \` `` escapes, a
/// backslash outside quotes escapes the next character. `None` on an unclosed quote or a
/// trailing backslash.
pub fn shell_split(s: &str) -> Option<Vec<String>> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next()? {
                        '\'' => break,
                        c => cur.push(c),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next()? {
                        '"' => break,
                        '\\' => match chars.next()? {
                            c @ ('"' | '\\' | '$' | '`') => cur.push(c),
                            '\n' => {}
                            c => {
                                cur.push('\\');
                                cur.push(c);
                            }
                        },
                        c => cur.push(c),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next()? {
                    '\n' => {}
                    c => cur.push(c),
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Some(words)
}

/// The role word passed to callbacks: `promoted` is reported as `primary` (Patroni does the same,
/// scripts only know the stable roles).
pub fn callback_role(role: Role) -> &'static str {
    match role {
        Role::Promoted => "primary",
        other => other.as_str(),
    }
}

/// Kills a process group with SIGKILL. The group id is the pid of a child we have not reaped
/// yet, so it cannot have been recycled for an unrelated process.
fn kill_group(pgid: u32) {
    if pgid == 0 || pgid > i32::MAX as u32 {
        return;
    }
    // SAFETY: kill(2) with a negative pid signals the process group; no memory is involved.
    unsafe {
        libc::kill(-(pgid as i32), libc::SIGKILL);
    }
}

/// One "executor" slot: at most one callback process runs in it at a time.
#[derive(Default)]
struct Slot {
    running: Mutex<Option<Child>>,
}

impl Slot {
    /// Kills the running process group (if the leader has not exited yet) and reaps it.
    fn kill_running(&self, guard: &mut Option<Child>) {
        if let Some(mut old) = guard.take() {
            match old.try_wait() {
                Ok(Some(_)) => {}
                _ => {
                    tracing::info!(
                        pid = old.id(),
                        "killing the previous callback (a newer one starts)"
                    );
                    kill_group(old.id());
                    let _ = old.wait();
                }
            }
        }
    }
}

/// Runs the commands configured in `postgresql.callbacks`, `pre_promote` and `before_stop`.
///
/// Callbacks run asynchronously in two slots (`on_reload` alone in the second one); starting a
/// callback kills the process group of the one still running in its slot, as Patroni does, so a
/// slow `on_role_change replica` can never finish *after* a newer `on_role_change primary`.
/// Each command is started in its own process group (`setpgid(0, 0)`) so that killing it also
/// kills whatever it spawned. Commands run as the agent's user with its environment.
pub struct CommandHooks {
    /// Swapped whole by [`Hooks::reconfigure`]; read (cloned) per call, never held.
    commands: std::sync::RwLock<Arc<HookCommands>>,
    pre_promote_timeout: Duration,
    before_stop_timeout: Duration,
    main: Arc<Slot>,
    reload: Arc<Slot>,
}

/// The configured commands (what a reload swaps).
#[derive(Debug, Clone)]
struct HookCommands {
    scope: String,
    callbacks: crate::config::Callbacks,
    pre_promote: Option<String>,
    before_stop: Option<String>,
}

impl CommandHooks {
    pub fn new(
        scope: impl Into<String>,
        callbacks: crate::config::Callbacks,
        pre_promote: Option<String>,
        before_stop: Option<String>,
    ) -> Self {
        CommandHooks {
            commands: std::sync::RwLock::new(Arc::new(HookCommands {
                scope: scope.into(),
                callbacks,
                pre_promote,
                before_stop,
            })),
            pre_promote_timeout: DEFAULT_PRE_PROMOTE_TIMEOUT,
            before_stop_timeout: DEFAULT_BEFORE_STOP_TIMEOUT,
            main: Arc::default(),
            reload: Arc::default(),
        }
    }

    /// From the agent config (`scope`, `postgresql.callbacks`, `.pre_promote`, `.before_stop`).
    pub fn from_config(cfg: &AgentConfig) -> Self {
        Self::new(
            cfg.scope.clone(),
            cfg.postgresql.callbacks.clone(),
            cfg.postgresql.pre_promote.clone(),
            cfg.postgresql.before_stop.clone(),
        )
    }

    pub fn with_pre_promote_timeout(mut self, t: Duration) -> Self {
        self.pre_promote_timeout = t;
        self
    }

    pub fn with_before_stop_timeout(mut self, t: Duration) -> Self {
        self.before_stop_timeout = t;
        self
    }

    fn commands(&self) -> Arc<HookCommands> {
        self.commands
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn command_for(&self, action: CallbackAction) -> Option<String> {
        let cmds = self.commands();
        let c = &cmds.callbacks;
        match action {
            CallbackAction::OnStart => c.on_start.as_deref(),
            CallbackAction::OnStop => c.on_stop.as_deref(),
            CallbackAction::OnRestart => c.on_restart.as_deref(),
            CallbackAction::OnReload => c.on_reload.as_deref(),
            CallbackAction::OnRoleChange => c.on_role_change.as_deref(),
        }
        .filter(|s| !s.trim().is_empty())
        .map(str::to_string)
    }

    /// The argv a callback runs with: `shell-split(cmd) + [action, role, scope]`.
    pub fn callback_argv(&self, action: CallbackAction, role: Role) -> Option<Vec<String>> {
        let cmd = self.command_for(action)?;
        let mut argv = match shell_split(&cmd) {
            Some(a) if !a.is_empty() => a,
            _ => {
                tracing::error!(
                    action = action.as_str(),
                    "cannot parse callback command line"
                );
                return None;
            }
        };
        argv.push(action.as_str().to_string());
        argv.push(callback_role(role).to_string());
        argv.push(self.commands().scope.clone());
        Some(argv)
    }
}

fn base_command(argv: &[String]) -> std::process::Command {
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]).stdin(Stdio::null()).process_group(0);
    cmd
}

/// `exec` of a script fails with ETXTBSY while any process still holds it open for writing —
/// e.g. a forked, not yet exec'd child of a process that had just written it (a deploy tool, or
/// another thread here). That lasts microseconds to milliseconds, so a few short retries turn a
/// lost callback into a slightly late one.
const TEXT_BUSY_RETRIES: u32 = 5;
const TEXT_BUSY_PAUSE: Duration = Duration::from_millis(20);

fn is_text_busy(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::ETXTBSY)
}

/// Runs `argv` to completion within `timeout`; on timeout kills its process group. Returns the
/// exit success, `None` when it could not be spawned or timed out.
async fn run_bounded(what: &str, argv: &[String], timeout: Duration) -> Option<bool> {
    let mut cmd = tokio::process::Command::from(base_command(argv));
    cmd.kill_on_drop(true);
    let mut attempt = 0;
    let spawned = loop {
        match cmd.spawn() {
            Err(e) if is_text_busy(&e) && attempt < TEXT_BUSY_RETRIES => {
                attempt += 1;
                tokio::time::sleep(TEXT_BUSY_PAUSE * attempt).await;
            }
            other => break other,
        }
    };
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(hook = what, error = %e, "cannot start hook");
            return None;
        }
    };
    let pid = child.id();
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => {
            tracing::info!(hook = what, %status, "hook finished");
            Some(status.success())
        }
        Ok(Err(e)) => {
            tracing::error!(hook = what, error = %e, "cannot wait for hook");
            None
        }
        Err(_) => {
            tracing::error!(hook = what, ?timeout, "hook timed out, killing it");
            if let Some(pid) = pid {
                kill_group(pid);
            }
            let _ = child.wait().await;
            None
        }
    }
}

#[async_trait]
impl Hooks for CommandHooks {
    fn reconfigure(&self, cfg: &AgentConfig) {
        let next = HookCommands {
            scope: cfg.scope.clone(),
            callbacks: cfg.postgresql.callbacks.clone(),
            pre_promote: cfg.postgresql.pre_promote.clone(),
            before_stop: cfg.postgresql.before_stop.clone(),
        };
        *self.commands.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
    }

    fn callback(&self, action: CallbackAction, role: Role) {
        let Some(argv) = self.callback_argv(action, role) else {
            return;
        };
        let slot = if action == CallbackAction::OnReload {
            &self.reload
        } else {
            &self.main
        };
        let mut guard = slot.running.lock().unwrap_or_else(|p| p.into_inner());
        // One at a time: the newest callback reflects the current state, an older one still
        // running would act on a stale role.
        slot.kill_running(&mut guard);
        let mut cmd = base_command(&argv);
        let mut attempt = 0;
        let spawned = loop {
            match cmd.spawn() {
                Err(e) if is_text_busy(&e) && attempt < TEXT_BUSY_RETRIES => {
                    attempt += 1;
                    std::thread::sleep(TEXT_BUSY_PAUSE * attempt);
                }
                other => break other,
            }
        };
        let child = match spawned {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(action = action.as_str(), error = %e, "cannot start callback");
                return;
            }
        };
        let pid = child.id();
        tracing::info!(
            action = action.as_str(),
            role = callback_role(role),
            pid,
            "callback started"
        );
        *guard = Some(child);
        drop(guard);
        // Reaper: polls the slot until our child exits or is replaced (then the replacer has
        // reaped it). A thread rather than a task so it works without (or with a paused) runtime.
        let slot = Arc::clone(slot);
        let spawned = std::thread::Builder::new()
            .name("callback-reaper".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_millis(50));
                    let mut g = slot.running.lock().unwrap_or_else(|p| p.into_inner());
                    match g.as_mut() {
                        Some(c) if c.id() == pid => {
                            if let Ok(Some(status)) = c.try_wait() {
                                tracing::info!(pid, %status, "callback finished");
                                *g = None;
                                return;
                            }
                        }
                        _ => return,
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start callback reaper thread");
        }
    }

    async fn pre_promote(&self) -> bool {
        let cmds = self.commands();
        let Some(cmd) = cmds.pre_promote.as_deref().filter(|s| !s.trim().is_empty()) else {
            return true;
        };
        let Some(argv) = shell_split(cmd).filter(|a| !a.is_empty()) else {
            tracing::error!("cannot parse pre_promote command line; refusing to promote");
            return false;
        };
        // A failing or hung pre_promote vetoes the promotion: the operator asked for a gate.
        run_bounded("pre_promote", &argv, self.pre_promote_timeout).await == Some(true)
    }

    async fn before_stop(&self) {
        let cmds = self.commands();
        let Some(cmd) = cmds.before_stop.as_deref().filter(|s| !s.trim().is_empty()) else {
            return;
        };
        let Some(argv) = shell_split(cmd).filter(|a| !a.is_empty()) else {
            tracing::error!("cannot parse before_stop command line; skipping it");
            return;
        };
        // Exit code ignored (as Patroni): the stop happens anyway.
        let _ = run_bounded("before_stop", &argv, self.before_stop_timeout).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_split_handles_quotes_and_escapes() {
        assert_eq!(shell_split("a b  c").unwrap(), ["a", "b", "c"]);
        assert_eq!(
            shell_split("'a b' \"c \\\"d\\\"\" e\\ f").unwrap(),
            ["a b", "c \"d\"", "e f"]
        );
        assert_eq!(shell_split("x''y \"\"").unwrap(), ["xy", ""]);
        assert!(shell_split("'open").is_none());
        assert!(shell_split("trailing\\").is_none());
        assert!(shell_split("   ").unwrap().is_empty());
    }

    #[test]
    fn promoted_is_reported_as_primary() {
        assert_eq!(callback_role(Role::Promoted), "primary");
        assert_eq!(callback_role(Role::StandbyLeader), "standby_leader");
    }
}
