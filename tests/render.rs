//! Template rendering: every template renders for every host of the example inventory, the
//! agent config parses as an AgentConfig, the etcd config is YAML, HAProxy lines match the
//! profile, user templates override built-ins and their mistakes are located errors.

use pgherd::config::AgentConfig;
use pgherd::inventory::{self, Inventory};
use pgherd::render::{self, Renderer};

fn example() -> Inventory {
    let text = std::fs::read_to_string("inventories/example.yml").unwrap();
    inventory::parse(&text, "inventories/example.yml").unwrap()
}

fn file<'a>(files: &'a [render::RenderedFile], template: &str) -> &'a render::RenderedFile {
    files
        .iter()
        .find(|f| f.template == template)
        .unwrap_or_else(|| panic!("{template} not rendered"))
}

#[test]
fn every_template_renders_for_every_example_host() {
    let inv = example();
    for h in &inv.hosts {
        let files = render::render_all(&inv, h.name.as_str()).unwrap_or_else(|e| panic!("{e}"));
        let names: Vec<&str> = files.iter().map(|f| f.template.as_str()).collect();
        assert_eq!(
            names,
            [
                "etcd.conf.j2",
                "etcd.service.j2",
                "agent.yml.j2",
                "pgherd-agent.service.j2",
                "haproxy.cfg.j2"
            ],
            "host {}",
            h.name
        );
    }
}

#[test]
fn agent_config_parses_and_carries_the_inventory() {
    let inv = example();
    let files = render::render_all(&inv, "pg3").unwrap();
    let f = file(&files, "agent.yml.j2");
    assert_eq!(f.path.to_str(), Some("/etc/pgherd/agent.yml"));
    assert_eq!(
        (f.mode, f.owner.as_str(), f.sensitive),
        (0o600, "postgres", true)
    );
    let cfg = AgentConfig::parse(&f.content, "agent.yml")
        .unwrap_or_else(|e| panic!("{e}\n{}", f.content));
    assert_eq!(cfg.scope, "demo");
    assert_eq!(cfg.name, "pg3");
    assert_eq!(cfg.restapi.connect_address, "10.0.0.13:8008");
    assert_eq!(cfg.postgresql.connect_address, "10.0.0.13:5432");
    assert_eq!(
        cfg.etcd3.hosts,
        ["10.0.0.11:2379", "10.0.0.12:2379", "10.0.0.13:2379"]
    );
    assert_eq!(
        cfg.postgresql.authentication.superuser.password,
        inv.secrets.superuser.expose()
    );
    assert_eq!(
        cfg.postgresql.authentication.replication.username,
        "replicator"
    );
    assert_eq!(
        cfg.tags.get("datacenter").and_then(|v| v.as_str()),
        Some("dc2")
    );
    assert_eq!(
        cfg.postgresql
            .parameters
            .get("work_mem")
            .and_then(|v| v.as_str()),
        Some("8MB")
    );
    assert_eq!(
        cfg.postgresql.callbacks.on_role_change.as_deref(),
        Some("/usr/local/bin/pgherd-role-change")
    );
    // Profile "norm" seeds the DCS timing.
    let t = pgherd::config::Timing::from_dcs(&cfg.bootstrap.dcs);
    assert_eq!((t.ttl, t.loop_wait, t.retry_timeout), (20, 3, 5));
    let pg = cfg.bootstrap.dcs["postgresql"]["parameters"]
        .as_object()
        .unwrap();
    assert_eq!(pg["max_connections"], 200);
    assert_eq!(pg["hot_standby"], "on");
    // pg_hba lets every member replicate and appends the inventory's own rule.
    for addr in ["10.0.0.11/32", "10.0.0.12/32", "10.0.0.13/32"] {
        let rule = format!("host replication replicator {addr} scram-sha-256");
        assert!(cfg.postgresql.pg_hba.contains(&rule), "{rule} missing");
    }
    assert_eq!(
        cfg.postgresql.pg_hba.last().unwrap(),
        "host all all 10.0.0.0/24 scram-sha-256"
    );
    assert_eq!(cfg.bootstrap.pg_hba, cfg.postgresql.pg_hba);
}

#[test]
fn etcd_config_is_valid_yaml_naming_every_member() {
    let inv = example();
    let files = render::render_all(&inv, "pg2").unwrap();
    let f = file(&files, "etcd.conf.j2");
    let v: serde_json::Value = pgherd::yaml::from_str(&f.content).unwrap();
    assert_eq!(v["name"], "pg2");
    assert_eq!(v["data-dir"], "/var/lib/etcd/demo");
    assert_eq!(v["advertise-client-urls"], "http://10.0.0.12:2379");
    assert_eq!(v["listen-peer-urls"], "http://10.0.0.12:2380");
    assert_eq!(
        v["initial-cluster"],
        "pg1=http://10.0.0.11:2380,pg2=http://10.0.0.12:2380,pg3=http://10.0.0.13:2380"
    );
    assert_eq!(v["initial-cluster-state"], "new");
    assert_eq!(v["initial-cluster-token"], "demo-etcd");
    let unit = file(&files, "etcd.service.j2");
    assert!(
        unit.content
            .contains("ExecStart=/usr/bin/etcd --config-file /etc/pgherd/etcd.yml\n")
    );
}

#[test]
fn haproxy_checks_follow_the_agent_api_and_the_profile() {
    let inv = example();
    let files = render::render_all(&inv, "pg1").unwrap();
    let cfg = &file(&files, "haproxy.cfg.j2").content;
    let lines: Vec<&str> = cfg.lines().map(str::trim).collect();
    let has = |l: &str| assert!(lines.contains(&l), "missing line {l:?} in\n{cfg}");
    has("bind *:5000");
    has("bind *:5001");
    has("bind *:7000");
    has("option httpchk OPTIONS /primary");
    has("option httpchk OPTIONS /replica");
    has("http-check expect status 200");
    has(
        "default-server inter 2s fastinter 1s downinter 2s rise 2 fall 2 on-marked-down shutdown-sessions",
    );
    // The write pool's faster cadence (profile norm), with its own check timeout.
    let primary = cfg.split("_primary\n").nth(1).expect("primary listen");
    let primary = primary.split("listen ").next().unwrap();
    assert!(
        primary.contains(
            "default-server inter 200ms fastinter 100ms downinter 200ms rise 1 fall 2 on-marked-down shutdown-sessions"
        ) && primary.contains("timeout check 1s")
            && primary.contains("timeout connect 500ms")
            && primary.contains("option redispatch"),
        "{primary}"
    );
    for (n, a) in [
        ("pg1", "10.0.0.11"),
        ("pg2", "10.0.0.12"),
        ("pg3", "10.0.0.13"),
    ] {
        has(&format!("server {n} {a}:5432 check port 8008"));
    }
    // Validate with the real haproxy when it is installed.
    if std::path::Path::new("/usr/sbin/haproxy").exists() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("haproxy.cfg");
        std::fs::write(&p, cfg).unwrap();
        let out = std::process::Command::new("/usr/sbin/haproxy")
            .arg("-c")
            .arg("-f")
            .arg(&p)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "haproxy -c: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn fast_profile_changes_haproxy_cadence() {
    let text = std::fs::read_to_string("inventories/example.yml")
        .unwrap()
        .replace("profile: norm", "profile: fast");
    let inv = inventory::parse(&text, "fast.yml").unwrap();
    let cfg = render::Renderer::builtin()
        .render("haproxy.cfg.j2", &inv, "pg1")
        .unwrap();
    assert!(cfg.contains("default-server inter 1s fastinter 500ms downinter 1s rise 1 fall 2 on-marked-down shutdown-sessions"));
}

#[test]
fn hosts_only_get_the_files_of_their_roles() {
    let text = "cluster: c\nhosts:\n  - name: db1\n    address: 10.1.0.1\n    roles: [postgres]\n  - name: lb1\n    address: 10.1.0.9\n    roles: [haproxy]\netcd:\n  endpoints: [10.1.0.50:2379]\n";
    let inv = inventory::parse(text, "t.yml").unwrap();
    let db: Vec<String> = render::render_all(&inv, "db1")
        .unwrap()
        .into_iter()
        .map(|f| f.template)
        .collect();
    assert_eq!(db, ["agent.yml.j2", "pgherd-agent.service.j2"]);
    let lb: Vec<String> = render::render_all(&inv, "lb1")
        .unwrap()
        .into_iter()
        .map(|f| f.template)
        .collect();
    assert_eq!(lb, ["haproxy.cfg.j2"]);
    assert!(matches!(
        render::render_all(&inv, "nope"),
        Err(render::RenderError::UnknownHost(_))
    ));
}

#[test]
fn user_template_dir_overrides_builtins_and_typos_are_located() {
    let inv = example();
    let dir = tempfile::tempdir().unwrap();
    // A user copy of haproxy.cfg.j2 with a typo on line 3.
    std::fs::write(
        dir.path().join("haproxy.cfg.j2"),
        "global\n    maxconn {{ haproxy.maxconn }}\n    # {{ haproxy.stat_port }}\n",
    )
    .unwrap();
    let r = Renderer::with_dir(dir.path()).unwrap();
    let err = r.render_all(&inv, "pg1").unwrap_err().to_string();
    let expected = format!(
        "{}:3: undefined value",
        dir.path().join("haproxy.cfg.j2").display()
    );
    assert!(err.starts_with(&expected), "{err}");
    assert!(err.contains("stat_port"), "{err}");
    assert!(
        err.contains("# {{ haproxy.stat_port }}"),
        "source line shown: {err}"
    );
    // Files the user did not copy still come from the built-ins.
    std::fs::write(
        dir.path().join("haproxy.cfg.j2"),
        "# custom {{ cluster }}\n",
    )
    .unwrap();
    let r = Renderer::with_dir(dir.path()).unwrap();
    let files = r.render_all(&inv, "pg1").unwrap();
    assert_eq!(file(&files, "haproxy.cfg.j2").content, "# custom demo\n");
    assert!(
        file(&files, "agent.yml.j2")
            .content
            .contains("scope: \"demo\"")
    );
}

#[test]
fn a_user_agent_template_that_breaks_the_config_is_refused_without_leaking_secrets() {
    let inv = example();
    let dir = tempfile::tempdir().unwrap();
    let builtin = render::builtin_source("agent.yml.j2").unwrap();
    // Drop the scope line: the output no longer parses as an agent config.
    let broken: String = builtin
        .lines()
        .filter(|l| !l.starts_with("scope:"))
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.path().join("agent.yml.j2"), broken).unwrap();
    let err = Renderer::with_dir(dir.path())
        .unwrap()
        .render_all(&inv, "pg1")
        .unwrap_err();
    assert!(
        matches!(err, render::RenderError::InvalidOutput { .. }),
        "{err}"
    );
    let shown = err.to_string();
    assert!(shown.contains("scope"), "{shown}");
    for s in inv.secret_values() {
        assert!(!shown.contains(s), "secret leaked: {shown}");
    }
}

#[test]
fn debug_of_rendered_files_hides_sensitive_content() {
    let inv = example();
    let files = render::render_all(&inv, "pg1").unwrap();
    let shown = format!("{files:?}");
    for s in inv.secret_values() {
        assert!(
            !shown.contains(s),
            "a password leaked through Debug of RenderedFile"
        );
    }
    assert!(shown.contains("haproxy.cfg.j2"));
    let agent = file(&files, "agent.yml.j2");
    assert!(
        !inv.redact(&agent.content)
            .contains(inv.secrets.restapi.expose())
    );
}

#[test]
fn rendering_is_deterministic() {
    let inv = example();
    let a = render::render_all(&inv, "pg2").unwrap();
    let b = render::render_all(&inv, "pg2").unwrap();
    assert_eq!(a, b);
    assert_eq!(a[0].sha256().len(), 64);
}

#[test]
fn a_restapi_allowlist_reaches_every_agent_with_the_cluster_hosts_added() {
    let text = std::fs::read_to_string("inventories/example.yml")
        .unwrap()
        .replacen(
            "agent:\n",
            "agent:\n  restapi_allowlist: [192.0.2.0/24, \"2001:db8::7\"]\n",
            1,
        );
    let inv = inventory::parse(&text, "inventories/example.yml").unwrap();
    let files = render::render_all(&inv, "pg1").unwrap();
    let f = file(&files, "agent.yml.j2");
    let cfg = AgentConfig::parse(&f.content, "agent.yml")
        .unwrap_or_else(|e| panic!("{e}\n{}", f.content));
    assert_eq!(
        cfg.restapi.allowlist,
        [
            "192.0.2.0/24",
            "2001:db8::7",
            "10.0.0.11",
            "10.0.0.12",
            "10.0.0.13"
        ]
    );
    assert!(cfg.restapi.allowlist_include_members);
    // Without one, no address restriction at all (the agent's default).
    let plain = render::render_all(&example(), "pg1").unwrap();
    let cfg = AgentConfig::parse(&file(&plain, "agent.yml.j2").content, "agent.yml").unwrap();
    assert!(cfg.restapi.allowlist.is_empty() && !cfg.restapi.allowlist_include_members);
}
