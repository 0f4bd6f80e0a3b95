//! The etcd membership planner row by row (one test per rule), the etcdctl JSON decoders on
//! output captured from etcd 3.4, and the host planner's handling of etcd.conf around
//! membership: initial-* only changes leave an initialised member alone, and a joining host's
//! etcd.conf and start belong to the `etcd_members` step.

use std::collections::{BTreeMap, BTreeSet};

use pgherd::provision::cluster_facts::ClusterFacts;
use pgherd::provision::desired::DesiredMember;
use pgherd::provision::etcd_members::{
    EndpointStatus, EtcdFacts, Member, MemberChange, PlanOptions, Refusal, RemoveReason,
    decode_facts, differs_only_in_initial_settings, join_initial_cluster, parse_member_list,
    plan_members,
};
use pgherd::provision::facts::{FileFact, HostFacts};
use pgherd::provision::plan::{Planned, plan_with_cluster};
use pgherd::provision::services::{Service, ServiceMode};
use pgherd::provision::spec;

fn url(i: u8) -> String {
    format!("http://10.0.0.{}:2380", 10 + i)
}

fn desired(hosts: &[u8]) -> Vec<DesiredMember> {
    hosts
        .iter()
        .map(|i| DesiredMember {
            name: format!("pg{i}"),
            peer_url: url(*i),
            client_url: format!("http://10.0.0.{}:2379", 10 + i),
        })
        .collect()
}

/// A live member: host number (id = 0x1000 + i), started, learner, up.
#[derive(Clone, Copy)]
struct M {
    host: u8,
    started: bool,
    learner: bool,
    up: bool,
}

fn voter(host: u8) -> M {
    M {
        host,
        started: true,
        learner: false,
        up: true,
    }
}

fn dead(host: u8) -> M {
    M {
        up: false,
        ..voter(host)
    }
}

fn id(host: u8) -> u64 {
    0x8e9e_05c5_2164_6900 + u64::from(host)
}

fn facts(members: &[M]) -> EtcdFacts {
    let leader = members
        .iter()
        .find(|m| m.up && !m.learner)
        .map(|m| id(m.host))
        .unwrap_or(0);
    facts_with_leader(members, leader)
}

fn facts_with_leader(members: &[M], leader: u64) -> EtcdFacts {
    let mut status = BTreeMap::new();
    let mut healthy = BTreeSet::new();
    for m in members.iter().filter(|m| m.up && m.started) {
        status.insert(
            id(m.host),
            EndpointStatus {
                member_id: id(m.host),
                leader,
                raft_index: 100,
                is_learner: m.learner,
            },
        );
        if !m.learner {
            healthy.insert(id(m.host));
        }
    }
    EtcdFacts {
        via: "pg1".into(),
        members: members
            .iter()
            .map(|m| Member {
                id: id(m.host),
                name: if m.started {
                    format!("pg{}", m.host)
                } else {
                    String::new()
                },
                peer_urls: vec![url(m.host)],
                client_urls: if m.started {
                    vec![format!("http://10.0.0.{}:2379", 10 + m.host)]
                } else {
                    vec![]
                },
                is_learner: m.learner,
            })
            .collect(),
        status,
        healthy,
    }
}

fn plan(want: &[u8], live: &[M]) -> Result<Vec<MemberChange>, Refusal> {
    plan_members(&desired(want), Some(&facts(live)), PlanOptions::default()).map(|p| p.changes)
}

fn texts(changes: &[MemberChange]) -> Vec<String> {
    changes.iter().map(|c| c.to_string()).collect()
}

#[test]
fn fresh_cluster_plans_no_membership_change() {
    let p = plan_members(&desired(&[1, 2, 3]), None, PlanOptions::default()).unwrap();
    assert!(p.changes.is_empty());
    assert!(p.noops[0].1.contains("fresh cluster"), "{:?}", p.noops);
}

#[test]
fn matching_members_plan_nothing_and_say_why_for_each() {
    let p = plan_members(
        &desired(&[1, 2, 3]),
        Some(&facts(&[voter(1), voter(2), voter(3)])),
        PlanOptions::default(),
    )
    .unwrap();
    assert!(p.changes.is_empty());
    assert_eq!(p.noops.len(), 3);
    assert_eq!(p.noops[0].0, "etcd member pg1");
    assert!(p.noops[0].1.contains("a started voter"), "{:?}", p.noops);
    assert_eq!(p.final_voters, 3);
}

#[test]
fn new_inventory_hosts_are_added_one_at_a_time_as_learners() {
    let c = plan(&[1, 2, 3, 4, 5], &[voter(1), voter(2), voter(3)]).unwrap();
    assert_eq!(
        texts(&c),
        [
            "add etcd member pg4 (http://10.0.0.14:2380) as a learner, then promote it",
            "add etcd member pg5 (http://10.0.0.15:2380) as a learner, then promote it",
        ]
    );
}

#[test]
fn member_not_in_the_inventory_is_removed_by_its_hex_id() {
    let c = plan(
        &[1, 2, 3],
        &[voter(1), voter(2), voter(3), voter(4), voter(5)],
    )
    .unwrap();
    assert_eq!(
        texts(&c),
        [
            "remove etcd member pg4 (id 8e9e05c521646904): not in the inventory",
            "remove etcd member pg5 (id 8e9e05c521646905): not in the inventory",
        ]
    );
}

#[test]
fn dead_member_is_removed_before_its_replacement_is_added() {
    let c = plan(&[1, 2, 6], &[voter(1), voter(2), dead(3)]).unwrap();
    assert_eq!(c.len(), 2);
    assert!(
        matches!(&c[0], MemberChange::Remove { name, dead: true, .. } if name == "pg3"),
        "{c:?}"
    );
    assert!(c[0].to_string().contains("it is down, so it goes first"));
    assert!(matches!(&c[1], MemberChange::Add { name, .. } if name == "pg6"));
}

#[test]
fn dead_removals_come_before_adds_and_live_removals_last() {
    // pg5 leaves (alive), pg4 is dead and leaves, pg6 and pg7 join.
    let c = plan(
        &[1, 2, 3, 6, 7],
        &[voter(1), voter(2), voter(3), dead(4), voter(5)],
    )
    .unwrap();
    let order: Vec<String> = c
        .iter()
        .map(|c| match c {
            MemberChange::Remove { name, .. } => format!("-{name}"),
            MemberChange::Add { name, .. } => format!("+{name}"),
            other => format!("{other}"),
        })
        .collect();
    assert_eq!(order, ["-pg4", "+pg6", "+pg7", "-pg5"]);
}

#[test]
fn member_with_our_name_but_another_peer_url_is_replaced_remove_first() {
    let mut want = desired(&[1, 2, 3]);
    want[2].peer_url = "http://10.0.0.99:2380".into();
    let c = plan_members(
        &want,
        Some(&facts(&[voter(1), voter(2), voter(3)])),
        PlanOptions::default(),
    )
    .unwrap()
    .changes;
    assert_eq!(c.len(), 2);
    assert!(matches!(
        &c[0],
        MemberChange::Remove { reason: RemoveReason::Replaced { new_peer_url }, .. }
            if new_peer_url == "http://10.0.0.99:2380"
    ));
    assert!(
        matches!(&c[1], MemberChange::Add { peer_url, .. } if peer_url == "http://10.0.0.99:2380")
    );
}

#[test]
fn listed_but_unstarted_member_with_our_url_is_started_not_added_again() {
    let pending = M {
        host: 4,
        started: false,
        learner: true,
        up: false,
    };
    let c = plan(&[1, 2, 3, 4, 5], &[voter(1), voter(2), voter(3), pending]).unwrap();
    assert!(
        matches!(&c[0], MemberChange::StartJoined { name, .. } if name == "pg4"),
        "{c:?}"
    );
    assert!(matches!(&c[1], MemberChange::Add { name, .. } if name == "pg5"));
    assert_eq!(c.len(), 2);
}

#[test]
fn started_learner_with_our_url_is_promoted() {
    let learner = M {
        host: 4,
        started: true,
        learner: true,
        up: true,
    };
    let c = plan(&[1, 2, 3, 4, 5], &[voter(1), voter(2), voter(3), learner]).unwrap();
    assert!(
        matches!(&c[0], MemberChange::Promote { name, .. } if name == "pg4"),
        "{c:?}"
    );
}

#[test]
fn an_unhealthy_remaining_member_refuses_every_change() {
    let r = plan(&[1, 2, 3, 4, 5], &[voter(1), voter(2), dead(3)]).unwrap_err();
    assert_eq!(r, Refusal::Unhealthy(vec!["pg3".into()]));
    assert!(r.to_string().contains("not healthy"), "{r}");
}

#[test]
fn no_leader_refuses() {
    let live = facts_with_leader(&[voter(1), voter(2), voter(3)], 0);
    let r = plan_members(
        &desired(&[1, 2, 3, 4, 5]),
        Some(&live),
        PlanOptions::default(),
    )
    .unwrap_err();
    assert_eq!(r, Refusal::NoLeader);
}

#[test]
fn a_pending_learner_outside_the_inventory_refuses() {
    let foreign = M {
        host: 9,
        started: true,
        learner: true,
        up: true,
    };
    let r = plan(&[1, 2, 3, 4, 5], &[voter(1), voter(2), voter(3), foreign]).unwrap_err();
    assert!(
        matches!(r, Refusal::LearnerPending { ref name, .. } if name == "pg9"),
        "{r:?}"
    );
}

#[test]
fn a_change_leaving_fewer_started_members_than_quorum_refuses() {
    // pg2 and pg3 are dead and leave: after removing pg2, 1 of 2 voters is up (quorum 2).
    let r = plan_members(
        &desired(&[1]),
        Some(&facts(&[voter(1), dead(2), dead(3)])),
        PlanOptions {
            allow_degraded_etcd: true,
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            r,
            Refusal::Quorum {
                up: 1,
                voters: 2,
                needed: 2,
                ..
            }
        ),
        "{r:?}"
    );
}

#[test]
fn an_even_or_small_final_voter_count_refuses_unless_degraded_is_allowed() {
    let r = plan(
        &[1, 2, 3, 4],
        &[voter(1), voter(2), voter(3), voter(4), voter(5)],
    )
    .unwrap_err();
    assert_eq!(r, Refusal::Degraded { voters: 4 });
    assert!(r.to_string().contains("even"), "{r}");
    let r = plan(&[1], &[voter(1), voter(2), voter(3)]).unwrap_err();
    assert_eq!(r, Refusal::Degraded { voters: 1 });
    let ok = plan_members(
        &desired(&[1, 2, 3, 4]),
        Some(&facts(&[voter(1), voter(2), voter(3), voter(4), voter(5)])),
        PlanOptions {
            allow_degraded_etcd: true,
        },
    )
    .unwrap();
    assert_eq!(ok.final_voters, 4);
}

// ---- decoders (output captured from etcd 3.4.23) ----------------------------------------------

const MEMBER_LIST: &str = r#"{"header":{"cluster_id":15875391935852295136,"member_id":7383792418829112008,"raft_term":2},"members":[{"ID":2698627247687086803,"peerURLs":["http://127.0.0.1:42390"],"isLearner":true},{"ID":7383792418829112008,"name":"a","peerURLs":["http://127.0.0.1:42380"],"clientURLs":["http://127.0.0.1:42379"]}]}"#;
const STATUS: &str = r#"[{"Endpoint":"http://127.0.0.1:42379","Status":{"header":{"cluster_id":15875391935852295136,"member_id":7383792418829112008,"revision":1,"raft_term":2},"version":"3.4.23","dbSize":20480,"leader":7383792418829112008,"raftIndex":9,"raftTerm":2,"raftAppliedIndex":9,"dbSizeInUse":16384}}]"#;
const HEALTH: &str = r#"[{"endpoint":"http://127.0.0.1:42379","health":true,"took":"9.337928ms"},{"endpoint":"http://127.0.0.1:42389","health":false,"took":"2.000875642s","error":"context deadline exceeded"}]"#;

#[test]
fn member_ids_are_read_exactly_and_printed_in_hex_like_etcdctl() {
    let m = parse_member_list(MEMBER_LIST).unwrap();
    assert_eq!(m[0].hex_id(), "2573732f0f9432d3");
    assert_eq!(m[1].hex_id(), "667880157b8812c8");
    assert!(!m[0].started() && m[0].is_learner);
    assert!(m[1].started() && !m[1].is_learner);
}

#[test]
fn status_and_health_decode_into_up_members_and_the_leader() {
    let f = decode_facts("pg1", MEMBER_LIST, STATUS, HEALTH).unwrap();
    assert_eq!(f.leader(), Some(7383792418829112008));
    assert!(f.is_up(&f.members[1]));
    assert!(!f.is_up(&f.members[0]));
    assert_eq!(f.up_voter_endpoints(None), ["http://127.0.0.1:42379"]);
}

#[test]
fn garbage_member_list_is_an_error_naming_the_command() {
    let e = parse_member_list("Error: context deadline exceeded").unwrap_err();
    assert!(e.to_string().contains("member list"), "{e}");
}

#[test]
fn a_joining_member_is_named_in_initial_cluster_before_it_has_a_name() {
    let m = parse_member_list(MEMBER_LIST).unwrap();
    assert_eq!(
        join_initial_cluster(&m, "b", "http://127.0.0.1:42390"),
        "b=http://127.0.0.1:42390,a=http://127.0.0.1:42380"
    );
}

#[test]
fn etcd_conf_differing_only_in_initial_settings_is_recognised() {
    let old = "name: \"pg1\"\ninitial-cluster: \"pg1=a,pg2=b\"\ninitial-cluster-state: \"new\"\nenable-v2: false\n";
    let new = "name: \"pg1\"\ninitial-cluster: \"pg1=a,pg2=b,pg4=d\"\ninitial-cluster-state: \"new\"\nenable-v2: false\n";
    assert!(differs_only_in_initial_settings(old, new));
    let other = new.replace("enable-v2: false", "enable-v2: true");
    assert!(!differs_only_in_initial_settings(old, &other));
    assert!(!differs_only_in_initial_settings(old, old));
}

// ---- the host planner around membership -------------------------------------------------------

fn inventory(hosts: &[u8]) -> String {
    let mut y = String::from("cluster: demo\nhosts:\n");
    for i in hosts {
        let roles = if *i <= 3 {
            "[postgres, etcd, haproxy]"
        } else {
            "[etcd]"
        };
        y.push_str(&format!(
            "  - name: pg{i}\n    address: 10.0.0.{}\n    roles: {roles}\n",
            10 + i
        ));
    }
    y
}

/// Facts of a host running etcd whose files are `files` (path → old content).
fn running_etcd(files: &[(&str, &[u8])], initialised: bool, member_dir: &str) -> HostFacts {
    let mut f = HostFacts::blank(ServiceMode::Supervisor);
    for (path, content) in files {
        f.files.insert(
            path.to_string(),
            Some(FileFact {
                sha256: pgherd::transport::sha256_hex(content),
                mode: "644".into(),
                owner: "root:root".into(),
            }),
        );
        f.old_contents.insert(path.to_string(), content.to_vec());
    }
    if initialised {
        f.dirs
            .insert(member_dir.to_string(), Some("etcd:etcd".into()));
    }
    f.services.insert(
        Service::Etcd,
        pgherd::provision::facts::ServiceFact {
            manager_pid: Some(10),
            pid: Some(11),
        },
    );
    f
}

#[test]
fn initialised_member_keeps_an_etcd_conf_that_differs_only_in_initial_settings() {
    let old_inv = pgherd::inventory::parse(&inventory(&[1, 2, 3]), "old.yml").unwrap();
    let new_inv = pgherd::inventory::parse(&inventory(&[1, 2, 3, 4, 5]), "new.yml").unwrap();
    let old = spec::build(&old_inv, None, None).unwrap();
    let new = spec::build(&new_inv, None, None).unwrap();
    let es = new.etcd.as_ref().unwrap();
    let path = es.config_path.clone();
    let old_conf = old
        .host("pg1")
        .unwrap()
        .files
        .iter()
        .find(|f| f.path == path)
        .unwrap();
    let mut facts = BTreeMap::new();
    facts.insert(
        "pg1".to_string(),
        running_etcd(&[(&path, &old_conf.content)], true, &es.member_dir()),
    );
    let cluster = ClusterFacts::default();
    let p = plan_with_cluster(&new, &facts, &cluster).unwrap();
    let step = p.hosts[0]
        .steps
        .iter()
        .find(|s| s.name == format!("file {path}"))
        .unwrap();
    assert!(
        matches!(&step.planned, Planned::Noop(why) if why == "differs only in initial-* settings, which etcd reads only when it first starts"),
        "{step:?}"
    );
    // An uninitialised data directory: the new initial-cluster is written.
    facts.insert(
        "pg1".to_string(),
        running_etcd(&[(&path, &old_conf.content)], false, &es.member_dir()),
    );
    let p = plan_with_cluster(&new, &facts, &cluster).unwrap();
    let step = p.hosts[0]
        .steps
        .iter()
        .find(|s| s.name == format!("file {path}"))
        .unwrap();
    assert!(step.is_change(), "{step:?}");
}

#[test]
fn a_joining_hosts_etcd_conf_and_start_belong_to_the_membership_step() {
    let inv = pgherd::inventory::parse(&inventory(&[1, 2, 3, 4, 5]), "new.yml").unwrap();
    let s = spec::build(&inv, None, None).unwrap();
    let es = s.etcd.as_ref().unwrap();
    // The join config: existing state, the member list left for `member add` to fill in.
    let join = &es.join_configs["pg4"];
    assert!(
        join.contains("initial-cluster-state: \"existing\""),
        "{join}"
    );
    assert!(join.contains(pgherd::provision::etcd_members::INITIAL_CLUSTER_PLACEHOLDER));
    let mut facts = BTreeMap::new();
    facts.insert("pg4".to_string(), HostFacts::blank(ServiceMode::Supervisor));
    let live = EtcdFacts {
        via: "pg1".into(),
        ..facts_like(&[voter(1), voter(2), voter(3)], &es.members)
    };
    let cluster = ClusterFacts {
        etcd: Some(live),
        ..Default::default()
    };
    let p = plan_with_cluster(&s, &facts, &cluster).unwrap();
    let members = p.cluster.etcd.clone().unwrap().unwrap();
    assert_eq!(members.changes.len(), 2, "{:?}", members.changes);
    let pg4 = p.host("pg4").unwrap();
    let conf = pg4
        .steps
        .iter()
        .find(|s| s.name == format!("file {}", es.config_path))
        .unwrap();
    assert!(
        matches!(&conf.planned, Planned::Noop(why) if why.contains("etcd_members step")),
        "{conf:?}"
    );
    let start = pg4.steps.iter().find(|s| s.name == "service etcd").unwrap();
    assert!(
        matches!(&start.planned, Planned::Noop(why) if why.contains("etcd_members step")),
        "{start:?}"
    );
    let text = pgherd::provision::report::render_plan(&p, Default::default());
    assert!(
        text.contains("add etcd member pg4 (http://10.0.0.14:2380) as a learner, then promote it"),
        "{text}"
    );
}

/// Live facts for members numbered like [`voter`] but with the URLs of `desired`.
fn facts_like(members: &[M], desired: &[DesiredMember]) -> EtcdFacts {
    let mut f = facts(members);
    for m in &mut f.members {
        if let Some(d) = desired.iter().find(|d| d.name == m.name) {
            m.peer_urls = vec![d.peer_url.clone()];
            m.client_urls = vec![d.client_url.clone()];
        }
    }
    f
}

#[test]
fn a_refused_membership_change_is_shown_in_the_plan_and_counts_as_work() {
    let inv = pgherd::inventory::parse(&inventory(&[1, 2, 3, 4, 5]), "new.yml").unwrap();
    let s = spec::build(&inv, None, None).unwrap();
    let cluster = ClusterFacts {
        etcd: Some(facts(&[voter(1), voter(2), dead(3)])),
        ..Default::default()
    };
    let p = plan_with_cluster(&s, &BTreeMap::new(), &cluster).unwrap();
    assert!(matches!(&p.cluster.etcd, Some(Err(Refusal::Unhealthy(_)))));
    assert!(!p.is_noop());
    let text = pgherd::provision::report::render_plan(&p, Default::default());
    assert!(
        text.contains("cluster: etcd membership: refused: etcd members pg3 are not healthy"),
        "{text}"
    );
}

#[test]
fn a_playbook_changing_membership_after_etcd_starts_is_refused_with_its_line() {
    let shipped = include_str!("../playbooks/deploy.yml");
    let block =
        "  - name: etcd membership\n    hosts: etcd\n    etcd_members:\n      timeout: 120\n\n";
    assert!(shipped.contains(block));
    let moved = shipped.replace(block, "").replace(
        "  # A changed config on a running cluster",
        &format!("{block}  # A changed config on a running cluster"),
    );
    let dir = tempfile::tempdir().unwrap();
    let pb = dir.path().join("deploy.yml");
    std::fs::write(&pb, moved).unwrap();
    let inv = pgherd::inventory::parse(&inventory(&[1, 2, 3]), "t.yml").unwrap();
    let e = spec::build_with(&inv, None, None, Some(&pb)).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("starts etcd before") && msg.contains("changes etcd membership"),
        "{msg}"
    );
    assert!(
        msg.contains("deploy.yml:") && msg.contains("(line "),
        "{msg}"
    );
}
