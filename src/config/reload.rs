//! The pure rules of a reload: [`restart_required`] (what a running agent cannot take over)
//! and [`changed_settings`] (what a reload changed, for its log line).

use serde::Serialize;
use serde_json::Value;

use super::AgentConfig;

/// The dotted names of changed settings that a running agent cannot take over, so a reload
/// with any of them changed must be refused as a whole (pure; table-tested). Everything not
/// listed here is applied in place by a reload; `bootstrap.*` only matters for the very first
/// bootstrap of the cluster and is ignored afterwards, so its changes are neither.
///
/// Why each one needs a restart:
/// - `scope`, `namespace`: they make the DCS prefix; the lease, member and leader keys live
///   under the old one, so changing them in place would move the node into another cluster.
/// - `name`: the member key, the replication slot and `application_name` are named after it.
/// - `restapi.listen`: the REST socket is bound once at start-up.
/// - `postgresql.data_dir`, `postgresql.bin_dir`: they select the instance (and the binaries
///   of the running postmaster) the controller acts on.
/// - `postgresql.listen`: `listen_addresses` and `port` are restart-only PostgreSQL settings,
///   and the agent's own connections use the port.
/// - `postgresql.socket_dir`: `unix_socket_directories` is restart-only; the agent connects
///   through the socket.
/// - `postgresql.pgpass`: the running walreceiver's `primary_conninfo` names the file, and
///   moving it would leave the old file (with passwords) behind.
/// - `etcd3.username`, `etcd3.password`: the etcd client authenticates once per connection;
///   only the endpoint list is swapped in place.
/// - `watchdog`: a leader may hold the device armed; switching device or mode in place would
///   either leave the old one armed (a host reset) or drop the fencing guarantee.
/// - `log`: the log subscriber (level, file) is installed once per process.
pub fn restart_required(old: &AgentConfig, new: &AgentConfig) -> Vec<&'static str> {
    fn v<T: Serialize>(x: &T) -> Value {
        serde_json::to_value(x).unwrap_or(Value::Null)
    }
    let checks: Vec<(&'static str, Value, Value)> = vec![
        ("scope", v(&old.scope), v(&new.scope)),
        ("namespace", v(&old.namespace), v(&new.namespace)),
        ("name", v(&old.name), v(&new.name)),
        (
            "restapi.listen",
            v(&old.restapi.listen),
            v(&new.restapi.listen),
        ),
        (
            "postgresql.data_dir",
            v(&old.postgresql.data_dir),
            v(&new.postgresql.data_dir),
        ),
        (
            "postgresql.bin_dir",
            v(&old.postgresql.bin_dir),
            v(&new.postgresql.bin_dir),
        ),
        (
            "postgresql.listen",
            v(&old.postgresql.listen),
            v(&new.postgresql.listen),
        ),
        (
            "postgresql.socket_dir",
            v(&old.postgresql.socket_dir),
            v(&new.postgresql.socket_dir),
        ),
        (
            "postgresql.pgpass",
            v(&old.postgresql.pgpass),
            v(&new.postgresql.pgpass),
        ),
        (
            "etcd3.username",
            v(&old.etcd3.username),
            v(&new.etcd3.username),
        ),
        (
            "etcd3.password",
            v(&old.etcd3.password),
            v(&new.etcd3.password),
        ),
        ("watchdog", v(&old.watchdog), v(&new.watchdog)),
        ("log", v(&old.log), v(&new.log)),
    ];
    checks
        .into_iter()
        .filter(|(_, a, b)| a != b)
        .map(|(name, _, _)| name)
        .collect()
}

/// Dotted names of every setting that differs between `old` and `new` (sections `restapi`,
/// `etcd3`, `postgresql` and `bootstrap` by their keys, the others whole), for the log line of
/// a reload. Names only: values (passwords) never appear.
pub fn changed_settings(old: &AgentConfig, new: &AgentConfig) -> Vec<String> {
    let (Ok(Value::Object(a)), Ok(Value::Object(b))) =
        (serde_json::to_value(old), serde_json::to_value(new))
    else {
        return Vec::new();
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut out = Vec::new();
    for k in keys {
        let (x, y) = (a.get(k), b.get(k));
        if x == y {
            continue;
        }
        match (x, y) {
            (Some(Value::Object(x)), Some(Value::Object(y)))
                if matches!(k.as_str(), "restapi" | "etcd3" | "postgresql" | "bootstrap") =>
            {
                let mut sub: Vec<&String> = x.keys().chain(y.keys()).collect();
                sub.sort();
                sub.dedup();
                for s in sub {
                    if x.get(s) != y.get(s) {
                        out.push(format!("{k}.{s}"));
                    }
                }
            }
            _ => out.push(k.clone()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::VALID;
    use super::*;

    #[test]
    fn restart_required_names_only_settings_a_running_agent_cannot_change() {
        let old = AgentConfig::parse(VALID, "v").unwrap();
        let with = |from: &str, to: &str| {
            assert!(VALID.contains(from), "fixture lacks {from:?}");
            AgentConfig::parse(&VALID.replacen(from, to, 1), "v").unwrap()
        };
        let none: Vec<&str> = vec![];
        let table: Vec<(&str, AgentConfig, Vec<&str>)> = vec![
            ("identical", old.clone(), none.clone()),
            (
                "scope",
                with("scope: batman", "scope: robin"),
                vec!["scope"],
            ),
            (
                "namespace",
                with("namespace: /service/", "namespace: /other/"),
                vec!["namespace"],
            ),
            ("name", with("name: node1", "name: node9"), vec!["name"]),
            (
                "rest listen",
                with("listen: 127.0.0.1:8008", "listen: 0.0.0.0:8008"),
                vec!["restapi.listen"],
            ),
            (
                "pg listen",
                with("listen: 127.0.0.1:5432", "listen: 127.0.0.1:5433"),
                vec!["postgresql.listen"],
            ),
            (
                "data_dir",
                with("data_dir: /var/lib/pgherd/node1", "data_dir: /srv/pg"),
                vec!["postgresql.data_dir"],
            ),
            (
                "bin_dir",
                with(
                    "bin_dir: /usr/lib/postgresql/15/bin",
                    "bin_dir: /opt/pg/bin",
                ),
                vec!["postgresql.bin_dir"],
            ),
            (
                "watchdog mode",
                with("mode: automatic", "mode: off"),
                vec!["watchdog"],
            ),
            (
                "watchdog margin",
                with("safety_margin: 5", "safety_margin: 2"),
                vec!["watchdog"],
            ),
            (
                "socket_dir",
                with(
                    "  use_slots: true",
                    "  use_slots: true\n  socket_dir: /run/pg",
                ),
                vec!["postgresql.socket_dir"],
            ),
            (
                "log",
                with("tags:\n", "log: {level: debug}\ntags:\n"),
                vec!["log"],
            ),
            (
                "two at once",
                with("scope: batman", "scope: robin").with_name("node9"),
                vec!["scope", "name"],
            ),
            // Applied in place by a reload:
            (
                "rest password",
                with("password: s3cret", "password: other"),
                none.clone(),
            ),
            (
                "rest connect_address",
                with(
                    "connect_address: 127.0.0.1:8008",
                    "connect_address: 10.0.0.1:8008",
                ),
                none.clone(),
            ),
            (
                "etcd hosts",
                with("127.0.0.1:2383]", "127.0.0.1:2385]"),
                none.clone(),
            ),
            (
                "pg parameters",
                with("shared_buffers: 32MB", "shared_buffers: 64MB"),
                none.clone(),
            ),
            (
                "pg_hba",
                with("- local all all trust", "- local all all peer"),
                none.clone(),
            ),
            (
                "callbacks",
                with("/usr/local/bin/cb.sh", "/usr/local/bin/other.sh"),
                none.clone(),
            ),
            (
                "superuser password",
                with("password: pw_1", "password: pw_9"),
                none.clone(),
            ),
            (
                "tags",
                with("nofailover: false", "nofailover: true"),
                none.clone(),
            ),
            // bootstrap.* only matters for the first bootstrap: no restart, nothing to apply.
            (
                "bootstrap.dcs",
                with(
                    "maximum_lag_on_failover: 1048576",
                    "maximum_lag_on_failover: 1",
                ),
                none.clone(),
            ),
            (
                "bootstrap.pg_hba",
                with(
                    "host replication replicator 127.0.0.1/32 md5",
                    "host replication replicator 10.0.0.0/8 md5",
                ),
                none.clone(),
            ),
        ];
        for (case, new, want) in table {
            assert_eq!(restart_required(&old, &new), want, "case {case}");
        }
    }

    #[test]
    fn changed_settings_names_what_differs_without_values() {
        let old = AgentConfig::parse(VALID, "v").unwrap();
        let new = AgentConfig::parse(
            &VALID
                .replace("password: s3cret", "password: other")
                .replace("shared_buffers: 32MB", "shared_buffers: 64MB")
                .replace("clonefrom: true", "clonefrom: false"),
            "v",
        )
        .unwrap();
        let c = changed_settings(&old, &new);
        assert_eq!(
            c,
            ["postgresql.parameters", "restapi.authentication", "tags"]
        );
        assert!(changed_settings(&old, &old).is_empty());
    }

    impl AgentConfig {
        fn with_name(mut self, n: &str) -> AgentConfig {
            self.name = n.into();
            self
        }
    }
}
