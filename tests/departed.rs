//! The departed-member planner (`provision::departed`), table-tested: which DCS members depart,
//! the steps of a removal, and every refusal.

use std::collections::{BTreeMap, BTreeSet};

use pgherd::provision::departed::{
    DcsMember, DepartedFacts, Moved, PlanOptions, Refusal, Step, SyncSettings, moved_members,
    plan_departures, url_host,
};
use serde_json::json;

fn m(name: &str, role: &str, state: &str, lag: u64) -> DcsMember {
    DcsMember {
        name: name.into(),
        role: role.into(),
        state: state.into(),
        address: Some(format!("10.0.0.{}", name.trim_start_matches('n'))),
        lag: Some(lag),
        nofailover: false,
        nosync: false,
        api_url: None,
    }
}

fn inv(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn facts(members: Vec<DcsMember>) -> DepartedFacts {
    DepartedFacts {
        members,
        ..Default::default()
    }
}

fn three() -> Vec<DcsMember> {
    vec![
        m("n1", "leader", "running", 0),
        m("n2", "replica", "streaming", 0),
        m("n3", "replica", "streaming", 0),
    ]
}

fn sync(node_count: u64, strict: bool) -> SyncSettings {
    SyncSettings {
        mode: true,
        strict,
        node_count,
    }
}

#[test]
fn nothing_departs_when_every_member_is_in_the_inventory() {
    let p = plan_departures(
        &facts(three()),
        &inv(&["n1", "n2", "n3"]),
        &Default::default(),
    )
    .unwrap();
    assert!(p.is_empty());
    assert_eq!(p.noops.len(), 1);
    assert!(p.noops[0].1.contains("every member"), "{:?}", p.noops);
}

#[test]
fn a_departed_replica_is_drained_stopped_then_its_key_and_slot_awaited() {
    let mut ms = three();
    ms[2].name = "node-3".into();
    let p = plan_departures(&facts(ms), &inv(&["n1", "n2"]), &Default::default()).unwrap();
    assert_eq!(p.departing, ["node-3"]);
    assert_eq!(
        p.steps,
        vec![
            Step::Drain {
                member: "node-3".into()
            },
            Step::StopAgent {
                member: "node-3".into(),
                address: Some("10.0.0.3".into())
            },
            Step::KeyGone {
                member: "node-3".into()
            },
            Step::SlotGone {
                member: "node-3".into(),
                slot: "node_3".into()
            },
        ]
    );
    let text: Vec<String> = p.steps.iter().map(|s| s.to_string()).collect();
    assert!(text[1].contains("stop its agent on 10.0.0.3"), "{text:?}");
    assert!(text[3].contains("slot node_3"), "{text:?}");
}

#[test]
fn refusals_and_their_reasons() {
    let leader_gone = facts(three());
    let mut nosync_left = three();
    nosync_left[1].nosync = true;
    let mut lagging = three();
    lagging.push(m("n4", "replica", "starting", 0));
    let mut paused = facts(three());
    paused.paused = true;
    let cases: Vec<(&str, DepartedFacts, Vec<&str>, Refusal)> = vec![
        (
            "the leader departs",
            leader_gone.clone(),
            vec!["n2", "n3"],
            Refusal::Leader {
                member: "n1".into(),
            },
        ),
        (
            "sync standbys would fall below synchronous_node_count",
            DepartedFacts {
                sync: sync(2, false),
                ..facts(three())
            },
            vec!["n1", "n2"],
            Refusal::SyncCapacity {
                departing: "n3".into(),
                needed: 2,
                left: 1,
            },
        ),
        (
            "strict mode: the last sync-eligible replica departs",
            DepartedFacts {
                sync: sync(1, true),
                ..facts(nosync_left)
            },
            vec!["n1", "n2"],
            Refusal::StrictNoStandby {
                departing: "n3".into(),
            },
        ),
        (
            "paused",
            paused,
            vec!["n1", "n2"],
            Refusal::Paused {
                departing: "n3".into(),
            },
        ),
        (
            "two depart while another is not streaming",
            facts(lagging),
            vec!["n1", "n4"],
            Refusal::SeveralWhileNotStreaming {
                departing: "n2, n3".into(),
                not_streaming: "n4".into(),
            },
        ),
    ];
    for (what, f, keep, want) in cases {
        let got = plan_departures(&f, &inv(&keep), &Default::default());
        assert_eq!(got, Err(want.clone()), "{what}");
        let text = want.to_string();
        assert!(!text.is_empty(), "{what}");
    }
    let e = plan_departures(&leader_gone, &inv(&["n2", "n3"]), &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("n1") && e.contains("leader key") && e.contains("--switchover-first"),
        "{e}"
    );
}

#[test]
fn one_sync_standby_departing_is_fine_when_enough_remain() {
    let f = DepartedFacts {
        sync: sync(1, true),
        ..facts(three())
    };
    let p = plan_departures(&f, &inv(&["n1", "n2"]), &Default::default()).unwrap();
    assert_eq!(p.departing, ["n3"]);
}

#[test]
fn two_depart_at_once_when_every_remaining_replica_streams() {
    let mut ms = three();
    ms.push(m("n4", "replica", "streaming", 0));
    let p = plan_departures(&facts(ms), &inv(&["n1", "n2"]), &Default::default()).unwrap();
    assert_eq!(p.departing, ["n3", "n4"]);
    assert_eq!(p.steps.len(), 8);
}

#[test]
fn switchover_first_hands_the_leader_to_the_healthiest_replica() {
    let mut ms = three();
    ms[1].lag = Some(5000);
    ms[2].lag = Some(10);
    let mut nofail = ms.clone();
    nofail[2].nofailover = true;
    let opts = PlanOptions {
        switchover_first: true,
        only: None,
    };
    let p = plan_departures(&facts(ms), &inv(&["n2", "n3"]), &opts).unwrap();
    assert_eq!(
        p.steps[0],
        Step::Switchover {
            from: "n1".into(),
            to: "n3".into()
        }
    );
    assert_eq!(
        p.steps[1],
        Step::Drain {
            member: "n1".into()
        }
    );
    // nofailover excludes the least-lagging one.
    let p = plan_departures(&facts(nofail), &inv(&["n2", "n3"]), &opts).unwrap();
    assert_eq!(
        p.steps[0],
        Step::Switchover {
            from: "n1".into(),
            to: "n2".into()
        }
    );
    // In synchronous mode only the sync standby may take over.
    let mut s = three();
    s[2].role = "sync_standby".into();
    s[1].lag = Some(0);
    s[2].lag = Some(100);
    let f = DepartedFacts {
        sync: sync(1, false),
        ..facts(s)
    };
    let p = plan_departures(&f, &inv(&["n2", "n3"]), &opts).unwrap();
    assert_eq!(
        p.steps[0],
        Step::Switchover {
            from: "n1".into(),
            to: "n3".into()
        }
    );
    // No candidate at all.
    let lone = facts(vec![m("n1", "leader", "running", 0)]);
    assert_eq!(
        plan_departures(&lone, &inv(&[]), &opts),
        Err(Refusal::NoCandidate {
            member: "n1".into()
        })
    );
}

#[test]
fn only_restricts_the_plan_to_the_named_member() {
    let mut ms = three();
    ms.push(m("n4", "replica", "streaming", 0));
    let opts = PlanOptions {
        switchover_first: false,
        only: Some("n4".into()),
    };
    let p = plan_departures(&facts(ms), &inv(&["n1", "n2"]), &opts).unwrap();
    assert_eq!(p.departing, ["n4"]);
}

#[test]
fn cluster_json_decodes_members_pause_and_sync_settings() {
    let c = json!({
        "members": [
            {"name": "a", "role": "leader", "state": "running", "host": "10.1.1.1",
             "api_url": "http://10.1.1.1:8008/patroni", "timeline": 2},
            {"name": "b", "role": "sync_standby", "state": "streaming",
             "api_url": "http://[fd00::2]:8008/patroni", "lag": 42, "tags": {"nosync": true}},
        ],
        "pause": true
    });
    let cfg = json!({"synchronous_mode": "on", "synchronous_node_count": 2, "ttl": 20});
    let c = serde_json::from_value(c).expect("a /cluster document");
    let f = DepartedFacts::from_cluster(&c, cfg.as_object());
    assert!(f.paused);
    assert_eq!(f.sync, sync(2, false));
    assert_eq!(f.ttl_secs, Some(20));
    assert_eq!(f.members[0].address.as_deref(), Some("10.1.1.1"));
    assert_eq!(f.members[1].address.as_deref(), Some("fd00::2"));
    assert_eq!(f.members[1].lag, Some(42));
    assert!(f.members[1].nosync && !f.members[1].nofailover);
    assert_eq!(
        url_host("http://u:p@h.example:8008/x").as_deref(),
        Some("h.example")
    );
}

mod playbook_order {
    use std::path::PathBuf;

    use pgherd::inventory;
    use pgherd::provision::spec;

    const DEPLOY: &str = include_str!("../playbooks/deploy.yml");

    fn tmp(name: &str, content: &[u8]) -> PathBuf {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("pgherd-departed-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        p
    }

    fn build(playbook: &str) -> Result<(), String> {
        let text = std::fs::read_to_string("inventories/example.yml").unwrap();
        let inv = inventory::parse(&text, "inventories/example.yml").unwrap();
        let agent = tmp("agent", b"pgherd-agent test binary");
        let pb = tmp("deploy.yml", playbook.as_bytes());
        spec::build_with(&inv, Some(&agent), None, Some(&pb))
            .map(|_| ())
            .map_err(|e| pgherd::provision::error_chain(&e))
    }

    /// The shipped playbook with the `remove departed members` step moved before `before`.
    fn moved_before(before: &str) -> String {
        let start = DEPLOY.find("  - name: remove departed members\n").unwrap();
        let end = start + DEPLOY[start..].find("\n\n").unwrap() + 2;
        let block = &DEPLOY[start..end];
        let rest = format!("{}{}", &DEPLOY[..start], &DEPLOY[end..]);
        let at = rest.find(&format!("  - name: {before}\n")).unwrap();
        format!("{}{block}{}", &rest[..at], &rest[at..])
    }

    #[test]
    fn the_shipped_playbook_removes_departed_members_before_etcd_membership_and_haproxy() {
        assert!(build(DEPLOY).is_ok());
    }

    #[test]
    fn removing_departed_members_after_the_haproxy_config_is_a_located_error() {
        let e = build(&moved_before("HAProxy running")).unwrap_err();
        assert!(
            e.contains("re-renders HAProxy before") && e.contains("remove departed members"),
            "{e}"
        );
    }

    #[test]
    fn removing_departed_members_after_the_etcd_membership_change_is_a_located_error() {
        let e = build(&moved_before("start etcd")).unwrap_err();
        assert!(
            e.contains("changes etcd membership before")
                && e.contains("stops the departed members' agents"),
            "{e}"
        );
    }
}

#[test]
fn the_agent_stop_disables_it_at_boot_before_stopping_it() {
    let s = pgherd::provision::departed::step::stop_agent_script();
    assert!(s.contains("systemctl disable --now pgherd-agent"), "{s}");
    let rm = s
        .find("rm -f /etc/pgherd/services/pgherd-agent.run")
        .expect(&s);
    let kill = s.find("kill -TERM").expect(&s);
    assert!(
        rm < kill,
        "the run file (boot hook) must go before the stop: {s}"
    );
}

fn moved(member: &str, old: &str, new: &str, alive: &[&str]) -> Moved {
    Moved {
        member: member.into(),
        old: old.into(),
        new: new.into(),
        alive: alive.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn a_member_whose_inventory_address_differs_from_the_dcs_is_moved() {
    let addrs: BTreeMap<String, String> =
        [("n1", "10.0.0.1"), ("n2", "10.0.0.22"), ("n4", "10.0.0.4")]
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
    // n1: same address (not moved); n2: moved; n3: not in the inventory (departs, not moved);
    // n4: in the inventory but not yet in the DCS (an addition, not a move).
    assert_eq!(
        moved_members(&three(), &addrs),
        vec![moved("n2", "10.0.0.2", "10.0.0.22", &[])]
    );
}

#[test]
fn a_moved_member_whose_old_host_still_answers_is_refused_with_the_evidence() {
    let f = DepartedFacts {
        moved: vec![moved(
            "n2",
            "10.0.0.2",
            "10.0.0.22",
            &[
                "REST API http://10.0.0.2:8008 answered",
                "SSH port 22 accepts connections",
            ],
        )],
        ..facts(three())
    };
    let e = plan_departures(&f, &inv(&["n1", "n2", "n3"]), &Default::default()).unwrap_err();
    assert!(
        matches!(&e, Refusal::MovedAlive { member, .. } if member == "n2"),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(msg.contains("10.0.0.2 still answers"), "{msg}");
    assert!(msg.contains("REST API"), "{msg}");
    assert!(msg.contains("SSH port"), "{msg}");
}

#[test]
fn a_moved_member_that_still_holds_the_leader_key_waits_for_failover() {
    let f = DepartedFacts {
        moved: vec![moved("n1", "10.0.0.1", "10.0.0.11", &[])],
        ttl_secs: Some(30),
        ..facts(three())
    };
    let e = plan_departures(&f, &inv(&["n1", "n2", "n3"]), &Default::default()).unwrap_err();
    assert_eq!(
        e,
        Refusal::MovedLeader {
            member: "n1".into(),
            old: "10.0.0.1".into(),
            new: "10.0.0.11".into(),
            ttl: " 30 s".into(),
        }
    );
}

#[test]
fn a_moved_member_whose_old_host_is_silent_waits_for_its_key_then_keeps_its_name() {
    let f = DepartedFacts {
        moved: vec![moved("n3", "10.0.0.3", "10.0.0.33", &[])],
        ..facts(three())
    };
    let p = plan_departures(&f, &inv(&["n1", "n2", "n3"]), &Default::default()).unwrap();
    assert!(p.departing.is_empty(), "{:?}", p.departing);
    assert_eq!(
        p.steps,
        vec![Step::MovedAway {
            member: "n3".into(),
            old: "10.0.0.3".into(),
            new: "10.0.0.33".into(),
        }]
    );
    assert!(
        p.noops.is_empty(),
        "a move is a change, not a no-op: {:?}",
        p.noops
    );
    assert!(p.steps[0].to_string().contains("its slot kept"));
}

#[test]
fn a_move_plans_alongside_a_departure_in_one_run() {
    let f = DepartedFacts {
        moved: vec![moved("n2", "10.0.0.2", "10.0.0.22", &[])],
        ..facts(three())
    };
    let p = plan_departures(&f, &inv(&["n1", "n2"]), &Default::default()).unwrap();
    assert_eq!(p.departing, ["n3"]);
    assert!(
        matches!(p.steps[0], Step::MovedAway { .. }),
        "{:?}",
        p.steps
    );
    assert!(
        p.steps
            .iter()
            .any(|s| matches!(s, Step::StopAgent { member, .. } if member == "n3"))
    );
}
