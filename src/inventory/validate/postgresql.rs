//! The `postgresql` section: version and directories, the parameters pgherd manages itself or
//! that must be cluster-wide, and the application users and databases (names, ownership).
//! Users get their passwords last, once the whole inventory is valid ([`users`]).

use std::collections::BTreeSet;

use serde_saphyr::Spanned;

use super::Checker;
use crate::inventory::model::{
    Database, Postgresql, REPLICATION_USER_NAME, REWIND_USER_NAME, SUPERUSER_NAME,
    SUPPORTED_PG_VERSION, User,
};
use crate::inventory::raw::{Map, RawPostgresql};
use crate::inventory::secrets::ClusterSecrets;

/// Parameters pgherd derives from the inventory; setting them by hand would desynchronise the
/// agent's view (connect addresses, ports) from PostgreSQL's.
const MANAGED_PARAMETERS: [&str; 6] = [
    "listen_addresses",
    "port",
    "data_directory",
    "hba_file",
    "ident_file",
    "config_file",
];

/// Patroni's `CMDLINE_OPTIONS`: settings that must be the same on every member (a standby needs
/// the hot-standby ones at least at the primary's value, the rest define the cluster's WAL), so
/// Patroni takes them from the DCS only and drops local values. A per-host value here would be
/// silently ignored: refuse it instead.
const CLUSTER_ONLY_PARAMETERS: [&str; 12] = [
    "max_connections",
    "max_wal_senders",
    "max_prepared_transactions",
    "max_locks_per_transaction",
    "max_replication_slots",
    "max_worker_processes",
    "wal_level",
    "hot_standby",
    "wal_keep_size",
    "track_commit_timestamp",
    "wal_log_hints",
    "cluster_name",
];

/// The section checked and built, with no users yet: they need the secrets, see [`users`].
pub(super) fn postgresql(
    c: &mut Checker,
    rp: &RawPostgresql,
    cluster: &str,
    port: u16,
) -> Postgresql {
    let version = match &rp.version {
        Some(v) if v.value != SUPPORTED_PG_VERSION => {
            c.at(
                v,
                "postgresql.version",
                format!(
                    "PostgreSQL {} is not supported (only {SUPPORTED_PG_VERSION})",
                    v.value
                ),
            );
            SUPPORTED_PG_VERSION
        }
        _ => SUPPORTED_PG_VERSION,
    };
    let bin_dir = c.abs_path(
        &rp.bin_dir,
        format!("/usr/lib/postgresql/{version}/bin"),
        "postgresql.bin_dir",
    );
    let data_dir = c.abs_path(
        &rp.data_dir,
        format!("/var/lib/postgresql/{version}/{cluster}"),
        "postgresql.data_dir",
    );
    if let Some(p) = &rp.parameters {
        check_parameters(c, p, "postgresql.parameters");
    }
    let user_names = check_users(c, rp);
    check_databases(c, rp, &user_names);
    Postgresql {
        version,
        bin_dir,
        data_dir,
        port,
        parameters: rp
            .parameters
            .as_ref()
            .map(|p| p.value.clone())
            .unwrap_or_default(),
        pg_hba: rp.pg_hba.clone(),
        users: Vec::new(),
        databases: rp
            .databases
            .iter()
            .map(|d| Database {
                name: d.name.value.clone(),
                owner: d.owner.as_ref().map(|o| o.value.clone()),
            })
            .collect(),
        use_pg_rewind: rp.use_pg_rewind.unwrap_or(true),
        use_slots: rp.use_slots.unwrap_or(true),
        primary_update_method: rp.primary_update_method.unwrap_or_default(),
    }
}

/// The application users' names (valid, not pgherd's own roles, unique).
fn check_users(c: &mut Checker, rp: &RawPostgresql) -> BTreeSet<String> {
    let reserved_users = [SUPERUSER_NAME, REPLICATION_USER_NAME, REWIND_USER_NAME];
    let mut user_names = BTreeSet::new();
    for u in &rp.users {
        let n = &u.name.value;
        let f = format!("postgresql.users[{n}]");
        if !is_sql_identifier(n) {
            c.at(
                &u.name,
                f,
                format!("user name {n:?} must be a lowercase SQL identifier ([a-z_][a-z0-9_]*)"),
            );
        } else if reserved_users.contains(&n.as_str()) {
            c.at(&u.name, f, format!("user {n:?} is managed by pgherd"));
        } else if !user_names.insert(n.clone()) {
            c.at(&u.name, f, format!("duplicate user {n:?}"));
        }
    }
    user_names
}

/// The databases: valid, new and unique names, owned by the superuser or a declared user.
fn check_databases(c: &mut Checker, rp: &RawPostgresql, user_names: &BTreeSet<String>) {
    let mut db_names = BTreeSet::new();
    for d in &rp.databases {
        let n = &d.name.value;
        let f = format!("postgresql.databases[{n}]");
        if !is_sql_identifier(n) {
            c.at(
                &d.name,
                f.clone(),
                format!("database name {n:?} must be a lowercase SQL identifier"),
            );
        } else if ["postgres", "template0", "template1"].contains(&n.as_str()) {
            c.at(&d.name, f.clone(), format!("database {n:?} always exists"));
        } else if !db_names.insert(n.clone()) {
            c.at(&d.name, f.clone(), format!("duplicate database {n:?}"));
        }
        if let Some(o) = &d.owner
            && o.value != SUPERUSER_NAME
            && !user_names.contains(&o.value)
        {
            c.at(
                o,
                format!("{f}.owner"),
                format!("owner {:?} is not a declared user", o.value),
            );
        }
    }
}

/// Names of the users without an inline password (their passwords come from the secrets).
pub(super) fn users_without_password(rp: &RawPostgresql) -> Vec<&str> {
    rp.users
        .iter()
        .filter(|u| u.password.is_none())
        .map(|u| u.name.value.as_str())
        .collect()
}

/// The users with their passwords: inline, else from `secrets`, which has one for each user
/// named by [`users_without_password`].
pub(super) fn users(rp: &RawPostgresql, secrets: &ClusterSecrets) -> Vec<User> {
    rp.users
        .iter()
        .map(|u| User {
            name: u.name.value.clone(),
            password: u.password.clone().unwrap_or_else(|| {
                secrets
                    .users
                    .get(&u.name.value)
                    .cloned()
                    .expect("secrets resolved every user")
            }),
            options: u.options.clone(),
        })
        .collect()
}

/// Refuses the parameters pgherd derives itself (cluster-wide or per host, at `field`).
pub(super) fn check_parameters(c: &mut Checker, p: &Spanned<Map>, field: &str) {
    for k in p.value.keys() {
        if MANAGED_PARAMETERS.contains(&k.as_str()) {
            c.at(p, format!("{field}.{k}"), format!("parameter {k} is managed by pgherd (derived from the inventory's addresses and ports)"));
        }
    }
}

/// Refuses, in a host's `parameters` (at `field`), those that must be the same on every member.
pub(super) fn check_local_parameters(c: &mut Checker, p: &Spanned<Map>, field: &str) {
    for k in p.value.keys() {
        if CLUSTER_ONLY_PARAMETERS.contains(&k.as_str()) {
            c.at(p, format!("{field}.{k}"), format!("parameter {k} must be the same on every member: set it in postgresql.parameters (cluster-wide), not per host"));
        }
    }
}

fn is_sql_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && s.len() <= 63
}
