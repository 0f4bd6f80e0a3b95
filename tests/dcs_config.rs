//! The cluster-config planner (pure): the inventory's `bootstrap.dcs` against the live DCS
//! `config`, one row per behaviour, and the `plan` text an operator reads for each case.

use std::collections::BTreeMap;

use pgherd::provision::dcs_config::{
    ConfigRefusal, Effect, LiveConfig, PgSetting, add_headroom, parse_pg_settings, plan_config,
};
use pgherd::provision::plan::{ClusterPlan, Plan};
use pgherd::provision::report::{self, ReportOptions};
use serde_json::{Map, Value, json};

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => panic!("not an object"),
    }
}

/// The rows of the leader's pg_settings these tests need (as the real query returns them).
fn settings() -> BTreeMap<String, PgSetting> {
    parse_pg_settings(
        [
            "shared_buffers\u{1f}4096\u{1f}8kB\u{1f}postmaster\u{1f}integer",
            "work_mem\u{1f}4096\u{1f}kB\u{1f}user\u{1f}integer",
            "max_connections\u{1f}100\u{1f}\u{1f}postmaster\u{1f}integer",
            "log_min_duration_statement\u{1f}-1\u{1f}ms\u{1f}superuser\u{1f}integer",
            "log_connections\u{1f}off\u{1f}\u{1f}superuser-backend\u{1f}bool",
            "block_size\u{1f}8192\u{1f}\u{1f}internal\u{1f}integer",
            "hot_standby_feedback\u{1f}off\u{1f}\u{1f}sighup\u{1f}bool",
        ]
        .join("\n")
        .as_str(),
    )
}

fn base() -> Value {
    json!({
        "ttl": 10, "loop_wait": 2, "retry_timeout": 3,
        "maximum_lag_on_failover": 1048576, "synchronous_mode": false,
        "postgresql": {
            "use_pg_rewind": true, "use_slots": true,
            "parameters": {"max_connections": 100, "shared_buffers": "32MB", "work_mem": "4MB"}
        }
    })
}

fn with_params(extra: Value) -> Map<String, Value> {
    let mut v = base();
    for (k, x) in obj(extra) {
        v["postgresql"]["parameters"][k] = x;
    }
    obj(v)
}

fn live(v: Map<String, Value>) -> LiveConfig {
    LiveConfig {
        value: v,
        revision: Some(42),
    }
}

#[test]
fn an_unchanged_inventory_plans_no_change_and_no_write() {
    let p = plan_config(
        &obj(base()),
        Some(&live(obj(base()))),
        Some("pg1"),
        &settings(),
    )
    .unwrap();
    assert!(p.is_noop(), "{:?}", p.changes);
    assert!(p.patch.is_empty());
}

#[test]
fn the_same_memory_value_in_other_units_is_no_change() {
    let want = with_params(json!({"shared_buffers": "32MB"}));
    let have = with_params(json!({"shared_buffers": 4096}));
    let p = plan_config(&want, Some(&live(have)), Some("pg1"), &settings()).unwrap();
    assert!(p.is_noop(), "{:?}", p.changes);
    let why = &p
        .noops
        .iter()
        .find(|(k, _)| k == "postgresql.parameters.shared_buffers")
        .unwrap()
        .1;
    assert!(why.contains("same value"), "{why}");
}

#[test]
fn a_user_context_parameter_is_a_reload() {
    let want = with_params(json!({"work_mem": "8MB"}));
    let p = plan_config(&want, Some(&live(obj(base()))), Some("pg1"), &settings()).unwrap();
    assert_eq!(p.changes.len(), 1);
    assert_eq!(p.changes[0].key, "postgresql.parameters.work_mem");
    assert_eq!(p.changes[0].effect, Effect::Reload);
    assert!(!p.needs_restart());
    assert_eq!(
        Value::Object(p.patch.clone()),
        json!({"postgresql": {"parameters": {"work_mem": "8MB"}}})
    );
    assert_eq!(
        p.changes[0].to_string(),
        "postgresql.parameters.work_mem: 4MB → 8MB (reload)"
    );
}

#[test]
fn a_postmaster_parameter_needs_a_restart() {
    let want = with_params(json!({"shared_buffers": "64MB"}));
    let p = plan_config(&want, Some(&live(obj(base()))), Some("pg1"), &settings()).unwrap();
    assert_eq!(p.changes[0].effect, Effect::Restart);
    assert!(p.needs_restart());
}

#[test]
fn a_backend_parameter_reaches_new_sessions_only() {
    let want = with_params(json!({"log_connections": "on"}));
    let p = plan_config(&want, Some(&live(obj(base()))), Some("pg1"), &settings()).unwrap();
    assert_eq!(p.changes[0].effect, Effect::NewSessions);
}

#[test]
fn an_ha_setting_is_applied_by_the_agents() {
    let mut want = obj(base());
    want.insert("ttl".into(), json!(20));
    let p = plan_config(&want, Some(&live(obj(base()))), Some("pg1"), &settings()).unwrap();
    assert_eq!(p.changes[0].key, "ttl");
    assert_eq!(p.changes[0].effect, Effect::Agents);
    assert_eq!(Value::Object(p.patch), json!({"ttl": 20}));
}

#[test]
fn numbers_and_strings_of_the_same_ha_value_are_no_change() {
    let mut have = obj(base());
    have.insert("ttl".into(), json!("10"));
    have.insert("synchronous_mode".into(), json!("off"));
    let p = plan_config(&obj(base()), Some(&live(have)), Some("pg1"), &settings()).unwrap();
    assert!(p.is_noop(), "{:?}", p.changes);
}

#[test]
fn a_parameter_set_outside_the_inventory_is_left_alone_and_said_so() {
    let have = with_params(json!({"log_min_duration_statement": "1s"}));
    let p = plan_config(&obj(base()), Some(&live(have)), Some("pg1"), &settings()).unwrap();
    assert!(p.is_noop());
    assert!(
        p.noops.iter().any(
            |(k, why)| k == "postgresql.parameters.log_min_duration_statement"
                && why.contains("outside the inventory")
        ),
        "{:?}",
        p.noops
    );
}

#[test]
fn a_null_parameter_in_the_inventory_deletes_it() {
    let have = with_params(json!({"log_min_duration_statement": "1s"}));
    let want = with_params(json!({"log_min_duration_statement": null}));
    let p = plan_config(&want, Some(&live(have)), Some("pg1"), &settings()).unwrap();
    assert_eq!(p.changes.len(), 1);
    assert_eq!(
        Value::Object(p.patch),
        json!({"postgresql": {"parameters": {"log_min_duration_statement": null}}})
    );
}

#[test]
fn a_misspelt_parameter_is_refused_before_anything_is_written() {
    let want = with_params(json!({"work_mme": "8MB"}));
    let e = plan_config(&want, Some(&live(obj(base()))), Some("pg1"), &settings()).unwrap_err();
    assert_eq!(
        e,
        ConfigRefusal::UnknownParameter("work_mme".into(), "pg1".into())
    );
    assert!(e.to_string().contains("postgresql.parameters.work_mme"));
}

#[test]
fn an_extension_setting_is_a_reload() {
    let want = with_params(json!({"pg_stat_statements.max": 5000}));
    let p = plan_config(&want, Some(&live(obj(base()))), Some("pg1"), &settings()).unwrap();
    assert_eq!(p.changes[0].effect, Effect::Reload);
}

#[test]
fn an_internal_parameter_is_refused() {
    let want = with_params(json!({"block_size": 16384}));
    let e = plan_config(&want, Some(&live(obj(base()))), Some("pg1"), &settings()).unwrap_err();
    assert_eq!(e, ConfigRefusal::Internal("block_size".into()));
}

#[test]
fn a_parameter_change_without_a_running_leader_is_refused() {
    let want = with_params(json!({"work_mem": "8MB"}));
    let e = plan_config(&want, Some(&live(obj(base()))), None, &BTreeMap::new()).unwrap_err();
    assert!(matches!(e, ConfigRefusal::NoLeader(_)), "{e}");
}

#[test]
fn without_a_dcs_config_the_bootstrap_writes_it() {
    let p = plan_config(&obj(base()), None, None, &BTreeMap::new()).unwrap();
    assert!(p.is_noop());
}

#[test]
fn the_write_is_conditioned_on_the_revision_that_was_read() {
    let want = with_params(json!({"work_mem": "8MB"}));
    let p = plan_config(&want, Some(&live(obj(base()))), Some("pg1"), &settings()).unwrap();
    assert_eq!(p.revision, Some(42));
}

fn cluster_plan(want: Map<String, Value>) -> Plan {
    let cp = plan_config(&want, Some(&live(obj(base()))), Some("pg1"), &settings()).unwrap();
    Plan {
        hosts: vec![],
        cluster: ClusterPlan {
            config: Some(cp),
            pending_restart: vec![],
            drained: vec![],
            leader: Some("pg1".into()),
            replicas: vec!["pg2".into(), "pg3".into()],
            ..Default::default()
        },
    }
}

fn text(plan: &Plan) -> String {
    report::render_plan(
        plan,
        ReportOptions {
            show_noops: true,
            diffs: true,
        },
    )
}

#[test]
fn plan_shows_a_reload_only_change_with_its_effect_and_no_restart() {
    let t = text(&cluster_plan(with_params(json!({"work_mem": "8MB"}))));
    assert!(
        t.contains("cluster: DCS config (revision 42): 1 change(s)"),
        "{t}"
    );
    assert!(
        t.contains("  change     postgresql.parameters.work_mem: 4MB → 8MB (reload)"),
        "{t}"
    );
    assert!(
        t.contains("  no change  postgresql.parameters.shared_buffers: 32MB as wanted"),
        "{t}"
    );
    assert!(!t.contains("restart:"), "{t}");
}

#[test]
fn plan_shows_the_restart_order_replicas_first_and_the_outage() {
    let t = text(&cluster_plan(with_params(
        json!({"shared_buffers": "64MB"}),
    )));
    assert!(
        t.contains("postgresql.parameters.shared_buffers: 32MB → 64MB (restart needed)"),
        "{t}"
    );
    assert!(
        t.contains("restart: replicas one at a time, each drained from HAProxy first (pg2, pg3), then pg1 in place after a CHECKPOINT; expected write outage: one PostgreSQL restart of pg1"),
        "{t}"
    );
}

#[test]
fn plan_shows_the_primary_first_for_a_lowered_max_connections() {
    let t = text(&cluster_plan(with_params(json!({"max_connections": 90}))));
    assert!(
        t.contains("postgresql.parameters.max_connections: 100 → 90 (restart needed)"),
        "{t}"
    );
    assert!(
        t.contains("restart: pg1 first, in place (max_connections lowered"),
        "{t}"
    );
}

fn senders_and_slots(senders: u64, slots: u64) -> BTreeMap<String, PgSetting> {
    parse_pg_settings(&format!(
        "max_wal_senders\u{1f}{senders}\u{1f}\u{1f}postmaster\u{1f}integer\nmax_replication_slots\u{1f}{slots}\u{1f}\u{1f}postmaster\u{1f}integer"
    ))
}

#[test]
fn adding_members_needs_wal_senders_for_every_replica_plus_a_clone() {
    // 5 members after the add: 4 replicas + 2 for pg_basebackup = 6 senders, 4 slots.
    assert_eq!(
        add_headroom(&senders_and_slots(6, 4), Some("pg1"), 5, 2),
        Ok(())
    );
    let e = add_headroom(&senders_and_slots(5, 10), Some("pg1"), 5, 2).unwrap_err();
    assert!(matches!(
        e,
        ConfigRefusal::NoHeadroom {
            setting: "max_wal_senders",
            need: 6,
            have: 5,
            ..
        }
    ));
    assert!(
        e.to_string()
            .contains("raise postgresql.parameters.max_wal_senders"),
        "{e}"
    );
    let e = add_headroom(&senders_and_slots(10, 3), Some("pg1"), 5, 2).unwrap_err();
    assert!(matches!(
        e,
        ConfigRefusal::NoHeadroom {
            setting: "max_replication_slots",
            ..
        }
    ));
}

#[test]
fn nothing_added_or_no_leader_needs_no_headroom() {
    assert_eq!(
        add_headroom(&senders_and_slots(1, 1), Some("pg1"), 5, 0),
        Ok(())
    );
    assert_eq!(add_headroom(&senders_and_slots(1, 1), None, 5, 2), Ok(()));
}
