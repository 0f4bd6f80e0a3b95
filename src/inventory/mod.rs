//! The cluster inventory: one YAML file describing the hosts, their roles and every knob the
//! provisioning needs. Parsing is two-stage (ripgrep's LowArgs→HiArgs idea): [`raw`] is the file
//! as written (strict serde, unknown keys are errors), [`model`] the validated [`Inventory`],
//! built by [`validate`].
//! All checks run here, before any host is touched; errors carry `file:line:column`.
//!
//! Passwords are not in the inventory: they live in a secrets file next to it (see
//! [`secrets`]), generated on first use.

pub mod edit;
pub mod error;
pub mod model;
pub mod profile;
pub mod raw;
pub mod secrets;
pub mod validate;

use std::path::{Path, PathBuf};

pub use error::{InventoryError, Pos, Problem};
pub use model::{
    Agent, Callbacks, Database, EmbeddedEtcd, Etcd, Haproxy, Host, Inventory, Postgresql,
    PrimaryUpdateMethod, Role, Ssh, TLS_OFF_WARNING, Tls, TlsCa, User, VerifyClient, Watchdog,
    endpoint,
};
pub use profile::{HaTiming, HaproxyCheck, Profile};
pub use secrets::{ClusterSecrets, OVERRIDE_PREFIX, Overrides, Secret, SecretsFile};

/// Reads, validates and completes the inventory at `path`: the secrets file (`secrets_file`,
/// default `<stem>.secrets.yml` next to the inventory) is read, missing passwords are generated
/// and written back with mode 0600.
pub fn load(path: &Path) -> Result<Inventory, InventoryError> {
    let text = std::fs::read_to_string(path).map_err(|source| InventoryError::Read {
        path: path.display().to_string(),
        source,
    })?;
    load_text(path, &text)
}

/// Like [`load`], with the inventory's text given (an edit not yet written to `path`, see
/// [`edit`]); errors and the secrets file are those of `path`.
pub fn load_text(path: &Path, text: &str) -> Result<Inventory, InventoryError> {
    load_text_with_env(path, text, &|k| std::env::var(k).ok())
}

/// Like [`load_text`], with the environment that [`secrets::Overrides`] reads given (tests).
pub fn load_text_with_env(
    path: &Path,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Inventory, InventoryError> {
    let shown = path.display().to_string();
    let raw = parse_raw(text, &shown)?;
    let secrets_path = secrets_path(path, raw.secrets_file.as_deref());
    let sp = secrets_path.clone();
    validate::build(raw, &shown, secrets_path, move |users| {
        let overrides = secrets::Overrides::from_env(env, users.iter().copied())?;
        let mut file = SecretsFile::read(&sp)?;
        let (secrets, generated) = file.resolve_with(users.iter().copied(), &overrides);
        if generated {
            file.write(&sp)?;
        }
        Ok(secrets)
    })
}

/// Parses and validates inventory text. `origin` names it in errors. Secrets are generated in
/// memory and not persisted: use this for checks and tests, [`load`] for real runs.
pub fn parse(text: &str, origin: &str) -> Result<Inventory, InventoryError> {
    parse_with_secrets(text, origin, SecretsFile::default())
}

/// Like [`parse`], with the secrets taken from `secrets` (missing ones generated in memory).
pub fn parse_with_secrets(
    text: &str,
    origin: &str,
    mut secrets: SecretsFile,
) -> Result<Inventory, InventoryError> {
    let raw = parse_raw(text, origin)?;
    let secrets_path = secrets_path(Path::new(origin), raw.secrets_file.as_deref());
    validate::build(raw, origin, secrets_path, move |users| {
        Ok(secrets.resolve(users.iter().copied()).0)
    })
}

/// Stage one only: the file as written.
pub fn parse_raw(text: &str, origin: &str) -> Result<raw::RawInventory, InventoryError> {
    crate::yaml::from_str(text).map_err(|e| InventoryError::Syntax {
        path: origin.to_string(),
        line: e.line,
        column: e.column,
        message: strip_position_prefix(&e.message).to_string(),
    })
}

/// serde-saphyr prefixes its message with `error: line L column C: `; we already print the
/// position as `file:L:C:`, so drop the repetition.
fn strip_position_prefix(m: &str) -> &str {
    let Some(rest) = m.strip_prefix("error: line ") else {
        return m;
    };
    match rest.split_once(": ") {
        Some((pos, tail)) if pos.contains(" column ") => tail,
        _ => m,
    }
}

/// Where the secrets of the inventory at `inventory` live: `explicit` (relative to the
/// inventory's directory) or `<stem>.secrets.yml` next to it.
pub fn secrets_path(inventory: &Path, explicit: Option<&str>) -> PathBuf {
    let dir = inventory.parent().unwrap_or(Path::new(""));
    match explicit {
        Some(p) => dir.join(p),
        None => {
            let stem = inventory
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_else(|| "inventory".into());
            dir.join(format!("{stem}.secrets.yml"))
        }
    }
}

/// Replaces `path` with `text` atomically: a temporary file beside it, created with `mode`
/// (so a secrets file is never briefly world-readable), synced, then renamed over `path`, so a
/// crash leaves the old or the new file, never half of one. The temporary file is removed
/// when a step fails.
pub fn replace_file(path: &Path, text: &str, mode: u32) -> std::io::Result<()> {
    crate::files::write_atomic(path, text, mode, crate::files::Place::Replace)
}
