//! Patroni-style user hooks: callbacks (`on_start`, `on_stop`, `on_restart`, `on_reload`,
//! `on_role_change`, argv `cmd action role scope`), `pre_promote` and `before_stop`.
//!
//! The [`Hooks`] trait is what the HA loop calls; the real implementation runs the configured
//! commands, a recording fake serves tests.

use async_trait::async_trait;

use crate::pg::Role;

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
#[async_trait]
pub trait Hooks: Send + Sync {
    fn callback(&self, action: CallbackAction, role: Role);
    async fn pre_promote(&self) -> bool;
    async fn before_stop(&self);
}
