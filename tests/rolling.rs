//! Table tests of the pending-restart planner (`pgherd::provision::rolling::plan_restarts`):
//! one row per ordering rule and refusal, plus the decoders the executor uses (pg_controldata,
//! HAProxy's `show servers state` and `show stat`).

use std::collections::BTreeMap;

use pgherd::provision::rolling::{
    HotParam, HotValues, MemberInput, MemberRole, PhaseKind, PrimaryUpdateMethod, RestartPlan,
    RollingInput, RollingOptions, RollingRefusal, StepAction, WriteOutage, current_sessions,
    drained_servers, hot_values_from_controldata, plan_restarts,
};

fn five(max_connections: u64) -> HotValues {
    HotValues::from([
        (HotParam::MaxConnections, max_connections),
        (HotParam::MaxPreparedTransactions, 0),
        (HotParam::MaxLocksPerTransaction, 64),
        (HotParam::MaxWalSenders, 10),
        (HotParam::MaxWorkerProcesses, 8),
    ])
}

fn member(name: &str, role: MemberRole, lag: u64) -> MemberInput {
    MemberInput {
        name: name.into(),
        role,
        state: if role == MemberRole::Leader {
            "running".into()
        } else {
            "streaming".into()
        },
        lag_bytes: (role != MemberRole::Leader).then_some(lag),
        pending_restart: false,
        pending_reason: BTreeMap::new(),
        nofailover: false,
        nosync: false,
        controldata: five(100),
        running: five(100),
    }
}

fn pending(mut m: MemberInput, reasons: &[(&str, &str, &str)]) -> MemberInput {
    m.pending_restart = true;
    m.pending_reason = reasons
        .iter()
        .map(|(k, o, n)| (k.to_string(), (o.to_string(), n.to_string())))
        .collect();
    m
}

fn input(members: Vec<MemberInput>) -> RollingInput {
    RollingInput {
        members,
        paused: false,
        maximum_lag_on_failover: 1 << 20,
    }
}

const SB: (&str, &str, &str) = ("shared_buffers", "128MB", "64MB");

fn order(p: &RestartPlan) -> Vec<String> {
    p.steps().map(|s| s.member.clone()).collect()
}

fn restart(method: PrimaryUpdateMethod) -> RollingOptions {
    RollingOptions {
        primary_update_method: method,
    }
}

#[test]
fn nothing_pending_plans_nothing_and_says_so() {
    let p = plan_restarts(
        &input(vec![
            member("n1", MemberRole::Leader, 0),
            member("n2", MemberRole::Replica, 0),
        ]),
        &RollingOptions::default(),
    )
    .unwrap();
    assert!(p.is_empty());
    assert_eq!(p.write_outage, None);
    assert_eq!(p.to_string(), "no member is pending restart\n");
}

#[test]
fn replicas_go_async_first_most_lag_first_sync_standby_last_then_the_primary_in_place() {
    let p = plan_restarts(
        &input(vec![
            pending(member("n1", MemberRole::Leader, 0), &[SB]),
            pending(member("n2", MemberRole::SyncStandby, 900), &[SB]),
            pending(member("n3", MemberRole::Replica, 10), &[SB]),
            pending(member("n4", MemberRole::Replica, 500), &[SB]),
        ]),
        &RollingOptions::default(),
    )
    .unwrap();
    assert_eq!(order(&p), ["n4", "n3", "n2", "n1"]);
    assert_eq!(p.phases.len(), 1);
    assert_eq!(p.phases[0].kind, PhaseKind::Raise);
    let last = p.steps().last().unwrap();
    assert_eq!(last.action, StepAction::RestartPrimary);
    assert_eq!(
        p.write_outage,
        Some(WriteOutage::InPlaceRestart {
            member: "n1".into()
        })
    );
    let text = p.to_string();
    assert!(
        text.contains(
            "restart replica n4: pending shared_buffers 128MB → 64MB; async replica, lag 500 B"
        ),
        "{text}"
    );
    assert!(
        text.contains("restart primary n1 in place after a CHECKPOINT"),
        "{text}"
    );
    assert!(
        text.contains("expected write outage: writes stop while n1 restarts in place"),
        "{text}"
    );
}

#[test]
fn only_replicas_pending_restart_without_a_write_outage() {
    let p = plan_restarts(
        &input(vec![
            member("n1", MemberRole::Leader, 0),
            pending(member("n2", MemberRole::Replica, 0), &[SB]),
        ]),
        &RollingOptions::default(),
    )
    .unwrap();
    assert_eq!(order(&p), ["n2"]);
    assert_eq!(p.write_outage, None);
    assert!(p.to_string().contains("expected write outage: none"));
}

#[test]
fn switchover_method_hands_over_to_the_sync_standby_after_the_replicas_restarted() {
    let p = plan_restarts(
        &input(vec![
            pending(member("n1", MemberRole::Leader, 0), &[SB]),
            pending(member("n2", MemberRole::Replica, 0), &[SB]),
            pending(member("n3", MemberRole::SyncStandby, 100), &[SB]),
        ]),
        &restart(PrimaryUpdateMethod::Switchover),
    )
    .unwrap();
    assert_eq!(order(&p), ["n2", "n3", "n1"]);
    assert_eq!(
        p.steps().last().unwrap().action,
        StepAction::Switchover {
            candidate: "n3".into()
        }
    );
    assert_eq!(
        p.write_outage,
        Some(WriteOutage::Switchover {
            from: "n1".into(),
            to: "n3".into()
        })
    );
}

#[test]
fn switchover_method_without_an_eligible_replica_restarts_the_primary_in_place() {
    let mut r = pending(member("n2", MemberRole::Replica, 0), &[SB]);
    r.nofailover = true;
    let mut lagging = member("n3", MemberRole::Replica, 50 << 20);
    lagging.state = "streaming".into();
    let p = plan_restarts(
        &input(vec![
            pending(member("n1", MemberRole::Leader, 0), &[SB]),
            r,
            lagging,
        ]),
        &restart(PrimaryUpdateMethod::Switchover),
    )
    .unwrap();
    let last = p.steps().last().unwrap();
    assert_eq!(last.action, StepAction::RestartPrimary);
    assert!(last.reason.contains("no replica can take over"), "{last}");
}

#[test]
fn a_decrease_restarts_the_primary_first_in_place_then_replicas_gated_on_controldata() {
    let mc = ("max_connections", "100", "90");
    let p = plan_restarts(
        &input(vec![
            pending(member("n1", MemberRole::Leader, 0), &[mc]),
            // pgherd's agent keeps a standby at its pg_control values: not flagged pending.
            member("n2", MemberRole::SyncStandby, 0),
            member("n3", MemberRole::Replica, 0),
        ]),
        // Even with switchover asked for: never a switchover for a decrease.
        &restart(PrimaryUpdateMethod::Switchover),
    )
    .unwrap();
    assert_eq!(order(&p), ["n1", "n3", "n2"]);
    assert_eq!(p.phases.len(), 1);
    assert_eq!(p.phases[0].kind, PhaseKind::Lower);
    let steps: Vec<_> = p.steps().collect();
    assert_eq!(steps[0].action, StepAction::RestartPrimary);
    let gate = HotValues::from([(HotParam::MaxConnections, 90)]);
    assert_eq!(
        steps[1].action,
        StepAction::RestartReplica { gate: gate.clone() }
    );
    assert_eq!(steps[2].action, StepAction::RestartReplica { gate });
    assert!(
        steps[1]
            .to_string()
            .contains("once its pg_controldata shows max_connections ≤ 90"),
        "{}",
        steps[1]
    );
    assert_eq!(
        p.write_outage,
        Some(WriteOutage::InPlaceRestart {
            member: "n1".into()
        })
    );
}

#[test]
fn a_decrease_whose_primary_already_restarted_continues_with_the_replicas() {
    // An interrupted run: the leader runs 90 and is no longer pending, n2 already came down,
    // n3 still runs 100.
    let mut l = member("n1", MemberRole::Leader, 0);
    l.running = five(90);
    l.controldata = five(90);
    let mut done = member("n2", MemberRole::Replica, 0);
    done.running = five(90);
    done.controldata = five(90);
    let mut todo = member("n3", MemberRole::Replica, 0);
    todo.controldata = five(90);
    let p = plan_restarts(&input(vec![l, done, todo]), &RollingOptions::default()).unwrap();
    assert_eq!(order(&p), ["n3"]);
    assert_eq!(p.write_outage, None);
    assert!(
        p.to_string()
            .contains("runs max_connections = 100 above the leader's max_connections = 90"),
        "{p}"
    );
}

#[test]
fn raises_and_decreases_together_run_as_two_phases_raises_first() {
    let up = ("max_worker_processes", "8", "16");
    let down = ("max_connections", "100", "90");
    let p = plan_restarts(
        &input(vec![
            pending(member("n1", MemberRole::Leader, 0), &[up, down]),
            pending(member("n2", MemberRole::Replica, 0), &[up]),
            pending(member("n3", MemberRole::SyncStandby, 0), &[up]),
        ]),
        &restart(PrimaryUpdateMethod::Switchover),
    )
    .unwrap();
    assert_eq!(p.phases.len(), 2, "{p}");
    assert_eq!(p.phases[0].kind, PhaseKind::Raise);
    assert_eq!(p.phases[1].kind, PhaseKind::Lower);
    let names = |i: usize| -> Vec<&str> {
        p.phases[i]
            .steps
            .iter()
            .map(|s| s.member.as_str())
            .collect()
    };
    assert_eq!(names(0), ["n2", "n3", "n1"]);
    // The primary's one restart applies the decrease too: in place, never a switchover.
    assert_eq!(p.phases[0].steps[2].action, StepAction::RestartPrimary);
    assert_eq!(names(1), ["n2", "n3"]);
    for s in &p.phases[1].steps {
        assert_eq!(
            s.action,
            StepAction::RestartReplica {
                gate: HotValues::from([(HotParam::MaxConnections, 90)])
            }
        );
    }
}

#[test]
fn a_raise_of_a_hot_standby_parameter_restarts_replicas_before_the_primary() {
    let up = ("max_connections", "100", "200");
    let p = plan_restarts(
        &input(vec![
            pending(member("n1", MemberRole::Leader, 0), &[up]),
            pending(member("n2", MemberRole::Replica, 0), &[up]),
        ]),
        &RollingOptions::default(),
    )
    .unwrap();
    assert_eq!(order(&p), ["n2", "n1"]);
    assert_eq!(p.phases[0].kind, PhaseKind::Raise);
}

#[test]
fn an_interrupted_raise_whose_replicas_already_run_the_new_value_goes_on_with_the_primary_only() {
    let up = ("max_connections", "100", "200");
    let mut r = member("n2", MemberRole::Replica, 0);
    r.running = five(200);
    let p = plan_restarts(
        &input(vec![pending(member("n1", MemberRole::Leader, 0), &[up]), r]),
        &restart(PrimaryUpdateMethod::Switchover),
    )
    .unwrap();
    assert_eq!(order(&p), ["n1"]);
    assert_eq!(p.phases[0].kind, PhaseKind::Raise);
    assert_eq!(
        p.steps().next().unwrap().action,
        StepAction::Switchover {
            candidate: "n2".into()
        }
    );
}

#[test]
fn refuses_without_a_leader() {
    let p = plan_restarts(
        &input(vec![
            pending(member("n2", MemberRole::Replica, 0), &[SB]),
            pending(member("n3", MemberRole::Replica, 0), &[SB]),
        ]),
        &RollingOptions::default(),
    );
    assert_eq!(p, Err(RollingRefusal::NoLeader));
}

#[test]
fn refuses_while_paused() {
    let mut i = input(vec![
        pending(member("n1", MemberRole::Leader, 0), &[SB]),
        member("n2", MemberRole::Replica, 0),
    ]);
    i.paused = true;
    let e = plan_restarts(&i, &RollingOptions::default()).unwrap_err();
    assert_eq!(e, RollingRefusal::Paused);
    assert!(e.to_string().contains("paused"), "{e}");
}

#[test]
fn refuses_when_a_member_to_restart_is_not_running_naming_it() {
    let mut down = pending(member("n2", MemberRole::Replica, 0), &[SB]);
    down.state = "stopped".into();
    let e = plan_restarts(
        &input(vec![
            pending(member("n1", MemberRole::Leader, 0), &[SB]),
            down,
        ]),
        &RollingOptions::default(),
    )
    .unwrap_err();
    assert_eq!(
        e,
        RollingRefusal::NotRunning {
            member: "n2".into(),
            state: "stopped".into()
        }
    );
    assert!(e.to_string().contains("n2"), "{e}");
}

#[test]
fn a_stopped_member_that_needs_nothing_does_not_block_the_others() {
    let mut down = member("n3", MemberRole::Replica, 0);
    down.state = "stopped".into();
    down.running = HotValues::new();
    let p = plan_restarts(
        &input(vec![
            member("n1", MemberRole::Leader, 0),
            pending(member("n2", MemberRole::Replica, 0), &[SB]),
            down,
        ]),
        &RollingOptions::default(),
    )
    .unwrap();
    assert_eq!(order(&p), ["n2"]);
}

#[test]
fn controldata_hot_standby_values_are_decoded_by_the_pg_conf_parser() {
    let text = "pg_control version number:            1300\n\
                max_connections setting:              100\n\
                max_worker_processes setting:         8\n\
                max_wal_senders setting:              10\n\
                max_prepared_xacts setting:           0\n\
                max_locks_per_xact setting:           64\n";
    assert_eq!(hot_values_from_controldata(text), five(100));
}

#[test]
fn haproxy_drained_servers_and_sessions_are_read_from_the_admin_socket_output() {
    let state = "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state ...\n\
                 3 c_replicas 1 n1 10.0.0.1 2 0 1 1 5 6 3 4 6 0 0 0 - 5432 - 0 0 - - 0\n\
                 3 c_replicas 2 n2 10.0.0.2 2 8 1 1 5 6 3 4 6 0 0 0 - 5432 - 0 0 - - 0\n\
                 3 c_replicas 3 n3 10.0.0.3 0 1 1 1 5 6 3 4 6 0 0 0 - 5432 - 0 0 - - 0\n\
                 2 c_primary 2 n2 10.0.0.2 2 8 1 1 5 6 3 4 6 0 0 0 - 5432 - 0 0 - - 0\n";
    assert_eq!(drained_servers(state, "c_replicas"), ["n2", "n3"]);
    let csv = "# pxname,svname,qcur,qmax,scur,smax\nc_replicas,n2,0,0,3,4\nc_primary,n2,0,0,0,0\n";
    assert_eq!(current_sessions(csv, "c_replicas", "n2"), Some(3));
    assert_eq!(current_sessions(csv, "c_replicas", "n9"), None);
}

#[test]
fn cluster_members_are_read_with_roles_lag_tags_and_pending_reasons() {
    let c = serde_json::json!({"members": [
        {"name": "n1", "role": "leader", "state": "running", "pending_restart": true,
         "pending_restart_reason": {"max_connections": {"old_value": "100", "new_value": "90"}}},
        {"name": "n2", "role": "sync_standby", "state": "streaming", "lag": 42,
         "tags": {"nofailover": true}},
        {"name": "n3", "role": "replica", "state": "in archive recovery", "lag": "unknown",
         "tags": {"nosync": true}}
    ]});
    let c = serde_json::from_value(c).expect("a /cluster document");
    let m = pgherd::provision::rolling::members_from_cluster(&c);
    assert_eq!(m.len(), 3);
    assert_eq!(m[0].role, MemberRole::Leader);
    assert!(m[0].pending_restart);
    assert_eq!(
        m[0].pending_reason["max_connections"],
        ("100".to_string(), "90".to_string())
    );
    assert_eq!(
        (m[1].role, m[1].lag_bytes, m[1].nofailover, m[1].nosync),
        (MemberRole::SyncStandby, Some(42), true, false)
    );
    assert_eq!(
        (m[2].role, m[2].lag_bytes, m[2].nosync, m[2].state.as_str()),
        (MemberRole::Replica, None, true, "in archive recovery")
    );
}
