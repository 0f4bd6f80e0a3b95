//! Playbooks as data: deploy.yml parses into typed steps and checks against the example
//! inventory; typos and misuse are located errors.

use pgherd::inventory::{self, Role};
use pgherd::provision::playbook::{
    HostSelector, Notify, Parallelism, Playbook, ServiceAction, StepKind, WaitCondition,
};
use pgherd::render::Renderer;

fn example() -> inventory::Inventory {
    let text = std::fs::read_to_string("inventories/example.yml").unwrap();
    inventory::parse(&text, "inventories/example.yml").unwrap()
}

#[test]
fn deploy_playbook_parses_into_typed_steps() {
    let pb = Playbook::load(std::path::Path::new("playbooks/deploy.yml"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(pb, Playbook::deploy(), "the compiled-in copy is the file");
    assert_eq!(pb.name, "deploy");
    let words: Vec<&str> = pb.steps.iter().map(|s| s.kind.word()).collect();
    for w in [
        "ensure_packages",
        "ensure_directory",
        "render",
        "upload_binary",
        "service",
        "wait_for",
        "bootstrap_primary",
        "start_replicas",
    ] {
        assert!(words.contains(&w), "deploy.yml has no {w} step");
    }
    let etcd_cfg = pb.steps.iter().find(|s| s.name == "etcd config").unwrap();
    assert_eq!(etcd_cfg.hosts, HostSelector::Role(Role::Etcd));
    assert_eq!(etcd_cfg.parallelism, Parallelism::Parallel);
    match &etcd_cfg.kind {
        StepKind::Render {
            template,
            dest,
            mode,
            notify,
            ..
        } => {
            assert_eq!(template, "etcd.conf.j2");
            assert_eq!(dest, "/etc/pgherd/etcd.yml");
            assert_eq!(*mode, 0o644);
            assert_eq!(
                notify,
                &Some(Notify {
                    action: ServiceAction::Restart,
                    service: "etcd".into()
                })
            );
        }
        other => panic!("{other:?}"),
    }
    let boot = pb
        .steps
        .iter()
        .find(|s| s.kind.word() == "bootstrap_primary")
        .unwrap();
    assert_eq!(boot.hosts, HostSelector::First(Role::Postgres));
    let rolling = pb
        .steps
        .iter()
        .find(|s| s.name == "restart changed agents")
        .unwrap();
    assert!(matches!(rolling.parallelism, Parallelism::Serial(n) if n.get() == 1));
    assert!(matches!(
        rolling.kind,
        StepKind::Service {
            only_if_changed: true,
            action: ServiceAction::Restart,
            ..
        }
    ));
    assert!(pb.steps.iter().any(|s| matches!(
        s.kind,
        StepKind::WaitFor {
            condition: WaitCondition::ReplicasStreaming,
            ..
        }
    )));
    // Bootstrap comes after etcd is healthy and before replicas start.
    let idx = |w: &str| words.iter().position(|x| *x == w).unwrap();
    assert!(idx("wait_for") < idx("bootstrap_primary"));
    assert!(idx("bootstrap_primary") < idx("start_replicas"));
}

#[test]
fn deploy_playbook_checks_against_the_example_and_expands_per_host() {
    let inv = example();
    let r = Renderer::builtin();
    let pb = Playbook::deploy();
    pb.check_against(&inv, &r, "playbooks/deploy.yml")
        .unwrap_or_else(|e| panic!("{e}"));
    let step = pb
        .steps
        .iter()
        .find(|s| s.name == "etcd data directory")
        .unwrap();
    let k = step.kind.expand(|s| r.render_str(s, &inv, "pg1")).unwrap();
    assert!(
        matches!(k, StepKind::EnsureDirectory { ref path, mode: 0o700, .. } if path == "/var/lib/etcd/demo")
    );
    let pkgs = pb.steps[0]
        .kind
        .expand(|s| r.render_str(s, &inv, "pg1"))
        .unwrap();
    assert_eq!(
        pkgs,
        StepKind::EnsurePackages {
            packages: vec!["postgresql-15".into()]
        }
    );
    assert_eq!(pb.steps[0].hosts.resolve(&inv).len(), 3);
    assert_eq!(
        HostSelector::First(Role::Postgres).resolve(&inv)[0]
            .name
            .as_str(),
        "pg1"
    );
}

fn err(text: &str) -> String {
    match Playbook::parse(text, "pb.yml") {
        Ok(p) => panic!("expected an error, got {p:?}"),
        Err(e) => e.to_string(),
    }
}

const HEAD: &str = "name: t\nsteps:\n";

#[test]
fn unknown_step_kind_is_located() {
    let e = err(&format!(
        "{HEAD}  - name: x\n    hosts: all\n    rendr:\n      template: etcd.conf.j2\n"
    ));
    assert!(e.starts_with("pb.yml:5:5: "), "{e}");
    assert!(
        e.contains("unknown field `rendr`") && e.contains("render"),
        "{e}"
    );
}

#[test]
fn typo_inside_step_arguments_is_located() {
    let e = err(&format!(
        "{HEAD}  - name: x\n    hosts: etcd\n    render:\n      templat: etcd.conf.j2\n"
    ));
    assert!(e.starts_with("pb.yml:6:7: "), "{e}");
    assert!(e.contains("unknown field `templat`"), "{e}");
}

#[test]
fn bad_enum_values_are_located() {
    let e = err(&format!(
        "{HEAD}  - name: x\n    hosts: all\n    service:\n      name: etcd\n      action: bounce\n"
    ));
    assert!(e.starts_with("pb.yml:7:15: "), "{e}");
    assert!(e.contains("bounce"), "{e}");
    let e = err(&format!(
        "{HEAD}  - name: x\n    hosts: all\n    wait_for:\n      condition: etcd_happy\n"
    ));
    assert!(e.starts_with("pb.yml:6:18: "), "{e}");
}

#[test]
fn unknown_top_level_key_is_located() {
    let e = err("name: t\nstep:\n  - name: x\n");
    assert!(e.starts_with("pb.yml:2:1: "), "{e}");
}

#[test]
fn a_step_needs_exactly_one_action() {
    let e = err(&format!("{HEAD}  - name: nothing\n    hosts: all\n"));
    assert!(
        e.starts_with("pb.yml:3:5: steps[1]: step \"nothing\" has no action"),
        "{e}"
    );
    let e = err(&format!(
        "{HEAD}  - name: two\n    hosts: all\n    ensure_packages:\n      packages: [a]\n    wait_for:\n      condition: etcd_healthy\n"
    ));
    assert!(
        e.contains(
            "pb.yml:3:5: steps[1]: step \"two\" has several actions (ensure_packages, wait_for)"
        ),
        "{e}"
    );
}

#[test]
fn bad_selector_serial_mode_and_notify_are_located() {
    let e = err(&format!(
        "{HEAD}  - name: x\n    hosts: first:pgbouncer\n    wait_for:\n      condition: agent_api_up\n"
    ));
    assert!(
        e.starts_with("pb.yml:4:12: steps[1].hosts: unknown role \"pgbouncer\""),
        "{e}"
    );
    let e = err(&format!(
        "{HEAD}  - name: x\n    hosts: all\n    serial: 0\n    wait_for:\n      condition: agent_api_up\n"
    ));
    assert!(e.starts_with("pb.yml:5:13: steps[1].serial"), "{e}");
    let e = err(&format!(
        "{HEAD}  - name: x\n    hosts: all\n    ensure_directory:\n      path: /x\n      owner: root\n      mode: \"0999\"\n"
    ));
    assert!(
        e.starts_with("pb.yml:8:13: steps[1].ensure_directory.mode: bad mode"),
        "{e}"
    );
    let e = err(&format!(
        "{HEAD}  - name: x\n    hosts: etcd\n    render:\n      template: etcd.conf.j2\n      notify: bounce etcd\n"
    ));
    assert!(e.starts_with("pb.yml:7:15: steps[1].render.notify"), "{e}");
}

#[test]
fn unknown_template_and_orphan_only_if_changed_are_refused() {
    let e = err(&format!(
        "{HEAD}  - name: x\n    hosts: all\n    render:\n      template: motd.j2\n"
    ));
    assert!(
        e.starts_with("pb.yml:6:17: steps[1].render.template: unknown template \"motd.j2\""),
        "{e}"
    );
    let e = err(&format!(
        "{HEAD}  - name: x\n    hosts: all\n    service:\n      name: etcd\n      action: restart\n      only_if_changed: true\n"
    ));
    assert!(
        e.contains("no earlier step notifies service \"etcd\""),
        "{e}"
    );
}

#[test]
fn bootstrap_primary_needs_a_single_host() {
    let e = err(&format!(
        "{HEAD}  - name: boot\n    hosts: postgres\n    bootstrap_primary: {{}}\n"
    ));
    assert!(
        e.starts_with("pb.yml:4:12: steps[1].hosts: bootstrap_primary needs exactly one host"),
        "{e}"
    );
}

#[test]
fn check_against_names_unknown_hosts_wrong_roles_and_bad_expressions() {
    let inv = inventory::parse(
        "cluster: c\nhosts:\n  - name: db1\n    address: 10.1.0.1\n    roles: [postgres, etcd]\n  - name: lb1\n    address: 10.1.0.9\n    roles: [haproxy]\n",
        "inv.yml",
    )
    .unwrap();
    let r = Renderer::builtin();
    let pb = Playbook::parse(
        &format!("{HEAD}  - name: a\n    hosts: db9\n    wait_for:\n      condition: agent_api_up\n  - name: b\n    hosts: all\n    render:\n      template: haproxy.cfg.j2\n  - name: c\n    hosts: postgres\n    ensure_directory:\n      path: \"{{{{ postgresql.data_dri }}}}\"\n      owner: postgres\n      mode: \"0700\"\n"),
        "pb.yml",
    )
    .unwrap();
    let e = pb
        .check_against(&inv, &r, "pb.yml")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("pb.yml:3:5: steps[1]: step \"a\": unknown host \"db9\""),
        "{e}"
    );
    assert!(e.contains("pb.yml:7:5: steps[2]: step \"b\": template haproxy.cfg.j2 needs the haproxy role but host db1"), "{e}");
    assert!(
        e.contains("pb.yml:11:5: steps[3]: step \"c\" on host db1") && e.contains("data_dri"),
        "{e}"
    );
}
