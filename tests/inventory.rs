//! Inventory parsing and validation: the example parses; every malformed inventory in
//! tests/fixtures/inventories/bad/ fails with its file name, position and key words.

use pgherd::inventory::{self, Role};

#[test]
fn example_inventory_parses() {
    let text = std::fs::read_to_string("inventories/example.yml").unwrap();
    let inv = inventory::parse(&text, "inventories/example.yml").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(inv.cluster, "demo");
    assert_eq!(inv.hosts.len(), 3);
    assert_eq!(inv.hosts_with(Role::Etcd).count(), 3);
    assert_eq!(inv.first_postgres().name.as_str(), "pg1");
    println!("{inv:#?}");
}

/// (fixture, expected `line:column` (None when the problem has no single position), key words).
const BAD: &[(&str, Option<&str>, &[&str])] = &[
    ("yaml_syntax.yml", Some("5:12"), &["unclosed bracket"]),
    ("wrong_type_port.yml", Some("7:9"), &["invalid u16"]),
    ("wrong_type_hosts.yml", Some("3:3"), &["expected sequence"]),
    ("wrong_type_roles.yml", Some("5:12"), &["expected sequence"]),
    (
        "unknown_key_top.yml",
        Some("2:1"),
        &["unknown field `synchronus_mode`", "synchronous_mode"],
    ),
    (
        "unknown_key_host.yml",
        Some("4:5"),
        &["unknown field `adress`", "address"],
    ),
    (
        "unknown_key_nested.yml",
        Some("8:5"),
        &["unknown field `intr`", "inter"],
    ),
    (
        "unknown_key_ssh_override.yml",
        Some("7:7"),
        &["unknown field `usr`", "user"],
    ),
    (
        "duplicate_yaml_key.yml",
        Some("5:5"),
        &["duplicate", "address"],
    ),
    (
        "missing_cluster.yml",
        Some("1:1"),
        &["missing field `cluster`"],
    ),
    (
        "duplicate_host_name.yml",
        Some("9:11"),
        &["hosts[n1].name", "duplicate host name \"n1\""],
    ),
    (
        "duplicate_address.yml",
        Some("7:14"),
        &["hosts[n2].address", "duplicate address 10.0.0.1"],
    ),
    (
        "missing_address.yml",
        Some("6:11"),
        &["hosts[n2].address", "no address"],
    ),
    (
        "bad_address.yml",
        Some("4:14"),
        &["hosts[n1].address", "10.0.0.300"],
    ),
    (
        "bad_profile.yml",
        Some("2:10"),
        &["profile", "turbo", "fast, norm, safe or wide"],
    ),
    (
        "even_etcd.yml",
        Some("3:3"),
        &["etcd needs an odd number of members (got 2"],
    ),
    (
        "no_postgres_host.yml",
        Some("3:3"),
        &["no host has the postgres role"],
    ),
    (
        "unknown_role.yml",
        Some("5:29"),
        &["hosts[n1].roles", "unknown role \"pgbouncer\""],
    ),
    (
        "port_zero.yml",
        Some("7:17"),
        &["agent.restapi_port", "out of range"],
    ),
    ("port_too_big.yml", Some("7:9"), &["invalid u16"]),
    (
        "port_conflict.yml",
        Some("3:11"),
        &["port 5432", "postgresql.port", "haproxy.primary_port"],
    ),
    (
        "timing_rule.yml",
        Some("4:3"),
        &["timing rule", "5 + 2*5 > 10"],
    ),
    ("ttl_too_small.yml", Some("3:3"), &["timing rule", "ttl 4"]),
    (
        "watchdog_margin_too_big.yml",
        Some("9:18"),
        &["hosts[n1].watchdog", "safety_margin"],
    ),
    (
        "empty_cluster.yml",
        Some("1:10"),
        &["cluster name must not be empty"],
    ),
    (
        "bad_watchdog_mode.yml",
        Some("7:13"),
        &["hosts[n1].watchdog.mode", "sometimes"],
    ),
    (
        "replicatefrom_unknown.yml",
        Some("10:7"),
        &["hosts[n2].tags.replicatefrom", "unknown host \"n9\""],
    ),
    ("no_etcd.yml", Some("3:3"), &["no etcd"]),
    (
        "external_and_embedded_etcd.yml",
        Some("7:14"),
        &["etcd.endpoints", "mutually exclusive"],
    ),
    (
        "managed_parameter.yml",
        Some("8:5"),
        &["postgresql.parameters.port", "managed by pgherd"],
    ),
    (
        "local_cluster_only_parameter.yml",
        Some("7:7"),
        &[
            "hosts[n1].parameters.max_connections",
            "same on every member",
        ],
    ),
    (
        "db_owner_unknown.yml",
        Some("11:14"),
        &["owner \"ap\"", "not a declared user"],
    ),
    (
        "bad_pg_version.yml",
        Some("7:12"),
        &["PostgreSQL 16 is not supported"],
    ),
    (
        "relative_data_dir.yml",
        Some("7:13"),
        &["postgresql.data_dir", "absolute path"],
    ),
    (
        "reserved_host_name.yml",
        Some("3:11"),
        &["hosts[postgres].name", "reserved"],
    ),
    (
        "bad_haproxy_duration.yml",
        Some("8:12"),
        &["haproxy.check.inter", "2 seconds"],
    ),
    (
        "bad_log_level.yml",
        Some("7:14"),
        &["agent.log_level", "verbose"],
    ),
    (
        "tls_ca_cert_without_key.yml",
        Some("7:12"),
        &["tls.ca_cert", "needs tls.ca_key too"],
    ),
    (
        "tls_ca_key_without_cert.yml",
        Some("7:11"),
        &["tls.ca_key", "needs tls.ca_cert too"],
    ),
    (
        "tls_same_ca_files.yml",
        Some("8:11"),
        &["tls.ca_key", "same file as tls.ca_cert"],
    ),
    (
        "tls_empty_ca_cert.yml",
        Some("7:12"),
        &["tls.ca_cert", "must not be empty"],
    ),
    (
        "tls_cert_days_too_short.yml",
        Some("7:14"),
        &["tls.cert_days", "30-day renewal window (got 30)"],
    ),
    (
        "tls_cert_days_too_long.yml",
        Some("7:14"),
        &["tls.cert_days", "at most 3650 (got 5000)"],
    ),
    (
        "tls_bad_verify_client.yml",
        Some("7:18"),
        &[
            "tls.verify_client",
            "\"always\"",
            "required, optional or none",
        ],
    ),
    (
        "tls_unknown_key.yml",
        Some("7:3"),
        &["unknown field `enable`", "enabled"],
    ),
    (
        "restapi_allowlist_host_name.yml",
        Some("7:36"),
        &[
            "agent.restapi_allowlist",
            "admin.example.com",
            "not an IP address",
        ],
    ),
    (
        "tls_enabled_not_deployed_yet.yml",
        Some("7:12"),
        &["tls.enabled", "not deployed yet", "set it to false"],
    ),
    (
        "tls_enabled_not_bool.yml",
        Some("7:12"),
        &["invalid boolean", "true/false"],
    ),
];

#[test]
fn every_bad_inventory_fails_with_file_position_and_key_words() {
    let dir = std::path::Path::new("tests/fixtures/inventories/bad");
    let mut covered = std::collections::BTreeSet::new();
    for (file, pos, words) in BAD {
        let path = dir.join(file);
        let err = match inventory::load(&path) {
            Ok(_) => panic!("{file}: expected an error, got a valid inventory"),
            Err(e) => e.to_string(),
        };
        let shown = path.display().to_string();
        let head = match pos {
            Some(p) => format!("{shown}:{p}: "),
            None => format!("{shown}: "),
        };
        assert!(
            err.starts_with(&head),
            "{file}: expected to start with {head:?}, got:\n{err}"
        );
        for w in *words {
            assert!(err.contains(w), "{file}: expected {w:?} in:\n{err}");
        }
        covered.insert(file.to_string());
    }
    // Every fixture must be in the table (and the table must be big enough to mean something).
    let on_disk: std::collections::BTreeSet<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".yml"))
        .collect();
    assert_eq!(on_disk, covered, "fixtures and table disagree");
    assert!(covered.len() >= 22);
    // Invalid inventories must never cause a secrets file to be written.
    assert!(!on_disk.iter().any(|n| n.contains("secrets")));
}

#[test]
fn all_problems_are_reported_at_once_in_file_order() {
    let text = "cluster: demo\nprofile: turbo\nhosts:\n  - name: n1\n    address: 10.0.0.300\n    roles: [postgres, etcd, bogus]\n";
    let err = inventory::parse(text, "multi.yml").unwrap_err();
    let problems = err.problems();
    assert_eq!(problems.len(), 3, "{err}");
    let lines: Vec<usize> = problems.iter().map(|p| p.pos.unwrap().line).collect();
    assert_eq!(lines, vec![2, 5, 6]);
    let shown = err.to_string();
    assert!(shown.starts_with("multi.yml: 3 problems"), "{shown}");
    assert!(shown.contains("multi.yml:2:10: profile"), "{shown}");
}

fn minimal(extra: &str) -> String {
    format!(
        "cluster: demo\nhosts:\n  - name: n1\n    address: 10.0.0.1\n    roles: [postgres, etcd, haproxy]\n{extra}"
    )
}

#[test]
fn profile_derives_agent_timing_and_haproxy_checks() {
    let inv = inventory::parse(&minimal("profile: fast\n"), "t.yml").unwrap();
    assert_eq!(
        (
            inv.timing.ttl,
            inv.timing.loop_wait,
            inv.timing.retry_timeout
        ),
        (10, 2, 3)
    );
    assert_eq!(inv.timing.primary_start_timeout, 15);
    assert_eq!(inv.timing.safety_margin, 3);
    assert_eq!(inv.haproxy.check.fastinter_ms, 500);
    assert_eq!((inv.haproxy.check.rise, inv.haproxy.check.fall), (1, 2));
    assert_eq!(inv.haproxy.primary_check.inter_ms, 100);
    assert_eq!(inv.haproxy.primary_check.timeout_ms, 1000);
    let inv = inventory::parse(&minimal(""), "t.yml").unwrap();
    assert_eq!(inv.profile, inventory::Profile::Norm);
}

#[test]
fn haproxy_check_overrides_set_both_pools() {
    let inv = inventory::parse(
        &minimal("profile: fast\nhaproxy:\n  check:\n    inter: 3s\n"),
        "t.yml",
    )
    .unwrap();
    assert_eq!(inv.haproxy.check.inter_ms, 3000);
    assert_eq!(inv.haproxy.primary_check, inv.haproxy.check);
}

#[test]
fn timing_overrides_that_obey_the_rule_are_accepted() {
    let inv = inventory::parse(
        &minimal("timing:\n  ttl: 40\n  loop_wait: 10\n  retry_timeout: 15\n"),
        "t.yml",
    )
    .unwrap();
    assert_eq!(
        (
            inv.timing.ttl,
            inv.timing.loop_wait,
            inv.timing.retry_timeout
        ),
        (40, 10, 15)
    );
}

#[test]
fn external_etcd_endpoints_replace_embedded_members() {
    let text = "cluster: demo\nhosts:\n  - name: n1\n    address: 10.0.0.1\n    roles: [postgres]\netcd:\n  endpoints: [10.0.0.50:2379, 'etcd.example.com:2379']\n";
    let inv = inventory::parse(text, "t.yml").unwrap();
    assert_eq!(
        inv.etcd_endpoints(),
        vec!["10.0.0.50:2379", "etcd.example.com:2379"]
    );
    assert!(inv.etcd_initial_cluster().is_none());
}

#[test]
fn ssh_overrides_merge_with_defaults_and_become_follows_user() {
    let text = "cluster: demo\nssh:\n  user: admin\n  port: 2222\nhosts:\n  - name: n1\n    address: 10.0.0.1\n    roles: [postgres, etcd]\n    ssh:\n      user: root\n  - name: n2\n    address: 10.0.0.2\n    roles: [postgres]\n";
    let inv = inventory::parse(text, "t.yml").unwrap();
    let n1 = &inv.host("n1").unwrap().ssh;
    let n2 = &inv.host("n2").unwrap().ssh;
    assert_eq!(
        (n1.user.as_str(), n1.port, n1.become_),
        ("root", 2222, false)
    );
    assert_eq!(
        (n2.user.as_str(), n2.port, n2.become_),
        ("admin", 2222, true)
    );
}

#[test]
fn formatting_the_inventory_never_shows_a_password() {
    let text = std::fs::read_to_string("inventories/example.yml").unwrap();
    let inv = inventory::parse(&text, "inventories/example.yml").unwrap();
    let shown = format!("{inv:?} {inv:#?}");
    let secrets = inv.secret_values();
    assert!(secrets.len() >= 5, "cluster secrets plus the app user");
    for s in secrets {
        assert!(!shown.contains(s), "a password leaked through Debug");
        assert_eq!(inv.redact(&format!("x{s}y")), "x********y");
    }
}

#[test]
fn load_generates_a_private_secrets_file_and_reuses_it() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let inv_path = dir.path().join("prod.yml");
    std::fs::copy("inventories/example.yml", &inv_path).unwrap();
    let first = inventory::load(&inv_path).unwrap();
    let secrets_path = dir.path().join("prod.secrets.yml");
    assert_eq!(first.secrets_file, secrets_path);
    let mode = std::fs::metadata(&secrets_path)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let second = inventory::load(&inv_path).unwrap();
    assert_eq!(first.secrets.superuser, second.secrets.superuser);
    assert_eq!(
        first.postgresql.users[0].password,
        second.postgresql.users[0].password
    );
    assert!(first.secrets.superuser.expose().len() >= 24);
}

#[test]
fn tls_is_off_until_deployed_with_pgherds_ca_beside_the_secrets_file() {
    let inv = inventory::parse(&minimal(""), "inv/prod.yml").unwrap();
    assert_eq!(
        inv.tls,
        inventory::Tls {
            enabled: false,
            ca: inventory::TlsCa::Generated,
            cert_days: pgherd::pki::NODE_CERT_DAYS,
            verify_client: inventory::VerifyClient::Optional,
        }
    );
    assert_eq!(inv.tls.warning(), Some(inventory::TLS_OFF_WARNING));
    let files = inv.ca_files();
    assert_eq!(files.cert, std::path::Path::new("inv/demo-ca.crt"));
    assert_eq!(files.key, std::path::Path::new("inv/demo-ca.key"));
}

#[test]
fn tls_off_warns_that_traffic_is_in_the_clear_and_keeps_its_settings() {
    let inv = inventory::parse(
        &minimal("tls:\n  enabled: false\n  verify_client: required\n"),
        "t.yml",
    )
    .unwrap();
    assert!(!inv.tls.enabled);
    assert_eq!(inv.tls.verify_client, inventory::VerifyClient::Required);
    let warning = inv.tls.warning().unwrap();
    assert_eq!(warning, inventory::TLS_OFF_WARNING);
    for w in [
        "TLS is off",
        "etcd",
        "REST API",
        "PostgreSQL replication",
        "clear",
    ] {
        assert!(warning.contains(w), "{warning}");
    }
}

#[test]
fn the_operators_ca_paths_are_relative_to_the_inventory_and_tls_settings_apply() {
    let text = minimal(
        "tls:\n  ca_cert: ops/ca.pem\n  ca_key: /etc/pki/ca.key\n  cert_days: 90\n  verify_client: none\n",
    );
    let inv = inventory::parse(&text, "inv/prod.yml").unwrap();
    assert_eq!(
        inv.tls.ca,
        inventory::TlsCa::Operator {
            cert: "inv/ops/ca.pem".into(),
            key: "/etc/pki/ca.key".into(),
        }
    );
    let files = inv.ca_files();
    assert_eq!(
        (files.cert, files.key),
        ("inv/ops/ca.pem".into(), "/etc/pki/ca.key".into())
    );
    assert_eq!(inv.tls.cert_days, 90);
    assert_eq!(inv.tls.verify_client, inventory::VerifyClient::None);
    // The shortest and the longest lifetimes accepted.
    for days in [
        pgherd::pki::RENEWAL_WINDOW_DAYS + 1,
        pgherd::pki::MAX_CERT_DAYS,
    ] {
        let inv =
            inventory::parse(&minimal(&format!("tls:\n  cert_days: {days}\n")), "t.yml").unwrap();
        assert_eq!(inv.tls.cert_days, days);
    }
}

/// The example inventory loaded from a temporary directory with `env` as the environment.
fn load_with_env(
    dir: &std::path::Path,
    env: &[(&str, &str)],
) -> Result<inventory::Inventory, String> {
    let path = dir.join("prod.yml");
    let text = std::fs::read_to_string("inventories/example.yml").unwrap();
    std::fs::write(&path, &text).unwrap();
    let env: std::collections::BTreeMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    inventory::load_text_with_env(&path, &text, &|k| env.get(k).cloned()).map_err(|e| {
        let mut s = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(c) = src {
            s.push_str(&format!(": {c}"));
            src = c.source();
        }
        s
    })
}

#[test]
fn a_secret_from_the_environment_wins_and_is_never_written_to_the_secrets_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let pwfile = dir.path().join("restapi.pw");
    std::fs::write(&pwfile, "from_file_pw_9\n").unwrap();
    std::fs::set_permissions(&pwfile, std::fs::Permissions::from_mode(0o600)).unwrap();
    let inv = load_with_env(
        dir.path(),
        &[
            ("PGHERD_SECRET_SUPERUSER", "from_env_pw_8"),
            ("PGHERD_SECRET_RESTAPI_FILE", pwfile.to_str().unwrap()),
            ("PGHERD_SECRET_USER_APP", "app_env_pw_7"),
        ],
    )
    .unwrap();
    assert_eq!(inv.secrets.superuser.expose(), "from_env_pw_8");
    // One trailing newline dropped, as `echo pw > file` writes it.
    assert_eq!(inv.secrets.restapi.expose(), "from_file_pw_9");
    assert_eq!(inv.secrets.users["app"].expose(), "app_env_pw_7");
    // The others generated and kept in the file; the overridden ones never stored.
    let file = std::fs::read_to_string(&inv.secrets_file).unwrap();
    assert!(file.contains(inv.secrets.replication.expose()));
    for pw in ["from_env_pw_8", "from_file_pw_9", "app_env_pw_7"] {
        assert!(!file.contains(pw), "{pw} written to the secrets file");
    }
    assert!(
        !file.contains("superuser:") && !file.contains("restapi:"),
        "{file}"
    );
}

#[test]
fn a_bad_secret_override_names_the_variable_and_never_the_value() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let open = dir.path().join("open.pw");
    std::fs::write(&open, "world_readable_pw_6").unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let open = open.to_str().unwrap().to_string();
    type Env<'a> = Vec<(&'a str, &'a str)>;
    let rows: Vec<(Env, &[&str])> = vec![
        (
            vec![
                ("PGHERD_SECRET_REWIND", "both_forms_pw_5"),
                ("PGHERD_SECRET_REWIND_FILE", "/nonexistent"),
            ],
            &[
                "PGHERD_SECRET_REWIND",
                "PGHERD_SECRET_REWIND_FILE",
                "give one",
            ],
        ),
        (
            vec![("PGHERD_SECRET_REPLICATION", "")],
            &["PGHERD_SECRET_REPLICATION", "is empty"],
        ),
        (
            vec![("PGHERD_SECRET_SUPERUSER_FILE", "/nonexistent/pw")],
            &[
                "PGHERD_SECRET_SUPERUSER_FILE",
                "cannot read /nonexistent/pw",
            ],
        ),
        (
            vec![("PGHERD_SECRET_SUPERUSER_FILE", open.as_str())],
            &["PGHERD_SECRET_SUPERUSER_FILE", "group/others", "chmod 600"],
        ),
    ];
    for (env, words) in rows {
        let e = load_with_env(dir.path(), &env).expect_err("refused");
        for w in words {
            assert!(e.contains(w), "{e:?} lacks {w:?}");
        }
        for pw in ["both_forms_pw_5", "world_readable_pw_6"] {
            assert!(!e.contains(pw), "{e}");
        }
    }
}
