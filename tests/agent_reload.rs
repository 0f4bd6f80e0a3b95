//! A running pgherd-agent takes a changed agent.yml over on reload (SIGHUP / `POST /reload`):
//! on real etcd (3 members) and real PostgreSQL 15, three agents on loopback ports. The new
//! hook scripts, pg_hba, parameters and REST credentials are in force without a PostgreSQL
//! restart, `/patroni` reports the digest of the file in force, and a change that needs an
//! agent restart is refused whole with the reason in `pgherd.config_error`.
//!
//! Also: a Patroni-style config with only `bootstrap.pg_hba` bootstraps and its replicas
//! stream (initdb's `local` lines stay, as under Patroni).

mod common;

use std::time::Duration;

use common::cluster::{
    API_PW, API_USER, Cluster, ClusterOpts, SUPERUSER_PW, eventually, postmaster_pid,
};
use serde_json::{Value, json};

fn step(s: &str) {
    eprintln!("\n=== step: {s} ===");
}

fn sighup(c: &Cluster, i: usize) {
    let pid = c.nodes[i].agent.as_ref().expect("agent runs").id();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGHUP) }, 0);
}

fn file_sha256(p: &std::path::Path) -> String {
    pgherd::config::sha256_hex(&std::fs::read(p).unwrap())
}

async fn pgherd_status(c: &Cluster, i: usize) -> Option<Value> {
    let (code, v) = c.get(i, "/patroni").await?;
    (code == 200).then(|| v["pgherd"].clone())
}

/// Connects over TCP to node `i` as `user`/`password` and runs `query` (one text value).
async fn query_as(
    c: &Cluster,
    i: usize,
    user: &str,
    password: &str,
    query: &str,
) -> Result<String, String> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(c.nodes[i].pg_port)
        .user(user)
        .password(password)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(3));
    let (client, conn) = cfg
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let row = client
        .query_one(query, &[])
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get::<_, String>(0))
}

/// `POST /reload` with the given REST password; the status code.
async fn reload_with(c: &Cluster, i: usize, password: &str) -> u16 {
    c.http
        .post(format!("{}/reload", c.nodes[i].api()))
        .basic_auth(API_USER, Some(password))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_yml_change_takes_effect_after_reload() {
    let mut c = Cluster::new(ClusterOpts::new("reload", 28000));
    c.start_all();
    let p = c.wait_healthy(Duration::from_secs(90)).await;
    let r = (0..3).find(|i| *i != p).unwrap();
    let r_name = c.nodes[r].name.clone();
    let cfg_path = c.nodes[r].config.clone();
    let original = std::fs::read_to_string(&cfg_path).unwrap();
    assert_eq!(
        pgherd_status(&c, r).await.unwrap()["config_sha256"],
        file_sha256(&cfg_path),
        "the start-up file's digest is reported"
    );
    c.sql(p, "CREATE ROLE alice LOGIN PASSWORD 'right'")
        .await
        .unwrap();
    // alice replicates to r; the md5 line there wants her password.
    eventually(Duration::from_secs(20), "alice on the replica", || async {
        query_as(&c, r, "alice", "right", "SELECT current_user::text")
            .await
            .ok()
    })
    .await;
    assert!(
        query_as(&c, r, "alice", "wrong", "SELECT 1::text")
            .await
            .is_err()
    );
    let pid_before = postmaster_pid(&c.nodes[r].data_dir()).unwrap();

    step("edit the replica's agent.yml: callback script, pg_hba, a parameter, REST password");
    let marker = c.nodes[r].dir.join("new-callback.marker");
    let script = c.nodes[r].dir.join("new-callback.sh");
    std::fs::write(
        &script,
        format!("#!/bin/sh\necho \"$*\" >> {}\n", marker.display()),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    common::cluster::chown_postgres(&script);
    let old_script = c.nodes[r].dir.join("callback.sh");
    let edited = original
        .replace(
            &format!("on_role_change: {}", old_script.display()),
            &format!("on_role_change: {}", script.display()),
        )
        .replace(
            "  pg_hba:\n    - local all all trust\n",
            "  pg_hba:\n    - local all all trust\n    - host all alice 127.0.0.1/32 trust\n",
        )
        .replace(
            "  use_pg_rewind: true\n  use_slots: true\n",
            "  use_pg_rewind: true\n  use_slots: true\n  parameters:\n    work_mem: 7MB\n",
        )
        .replace(
            &format!("    password: {API_PW}\n"),
            "    password: new-api-pass\n",
        );
    for needle in [
        "new-callback.sh",
        "alice 127.0.0.1/32 trust",
        "work_mem: 7MB",
        "new-api-pass",
    ] {
        assert!(edited.contains(needle), "edit of {needle} did not apply");
    }
    std::fs::write(&cfg_path, &edited).unwrap();
    let new_sha = file_sha256(&cfg_path);
    sighup(&c, r);

    step("the new config is reported in force, without a PostgreSQL restart");
    eventually(Duration::from_secs(20), "the new config digest", || async {
        let s = pgherd_status(&c, r).await?;
        (s["config_sha256"] == new_sha.as_str()).then_some(())
    })
    .await;
    let s = pgherd_status(&c, r).await.unwrap();
    assert!(s.get("config_error").is_none(), "{s}");
    assert_eq!(postmaster_pid(&c.nodes[r].data_dir()), Some(pid_before));

    step("pg_hba line and parameter in force");
    assert_eq!(
        query_as(&c, r, "alice", "wrong", "SELECT current_user::text")
            .await
            .expect("the added trust line admits alice without her password"),
        "alice"
    );
    assert_eq!(
        query_as(&c, r, "postgres", SUPERUSER_PW, "SHOW work_mem")
            .await
            .unwrap(),
        "7MB"
    );

    step("REST credentials swapped");
    assert_eq!(
        reload_with(&c, r, API_PW).await,
        401,
        "old password refused"
    );
    assert_eq!(
        reload_with(&c, r, "new-api-pass").await,
        202,
        "new password accepted"
    );

    step("after a role change the new callback script runs");
    let (code, body) = c
        .call(
            p,
            "POST",
            "/switchover",
            Some(json!({"leader": c.nodes[p].name, "candidate": r_name})),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let p2 = c.wait_healthy(Duration::from_secs(60)).await;
    assert_eq!(p2, r);
    let ran = eventually(
        Duration::from_secs(20),
        "the new on_role_change",
        || async {
            let m = std::fs::read_to_string(&marker).ok()?;
            m.contains("on_role_change primary reload").then_some(m)
        },
    )
    .await;
    assert!(ran.lines().all(|l| l.contains("reload")), "{ran}");
    let old_log = std::fs::read_to_string(c.nodes[r].callback_log()).unwrap_or_default();
    assert!(
        !old_log.contains("on_role_change primary"),
        "the old script ran for the promotion: {old_log}"
    );

    step("a change that needs a restart is refused whole");
    let before_refusal = file_sha256(&cfg_path);
    let port = c.nodes[r].api_port;
    let refused = std::fs::read_to_string(&cfg_path)
        .unwrap()
        .replace(
            &format!("  listen: 127.0.0.1:{port}\n"),
            &format!("  listen: 127.0.0.1:{}\n", port + 50),
        )
        .replace("work_mem: 7MB", "work_mem: 9MB");
    std::fs::write(&cfg_path, refused).unwrap();
    sighup(&c, r);
    let s = eventually(Duration::from_secs(20), "config_error", || async {
        let s = pgherd_status(&c, r).await?;
        s.get("config_error").is_some().then_some(s)
    })
    .await;
    assert_eq!(s["config_error"], "restart required: restapi.listen");
    assert_eq!(s["config_sha256"], before_refusal.as_str());
    assert_eq!(
        query_as(&c, r, "postgres", SUPERUSER_PW, "SHOW work_mem")
            .await
            .unwrap(),
        "7MB",
        "nothing of the refused file was applied"
    );
    assert_eq!(reload_with(&c, r, "new-api-pass").await, 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_with_only_bootstrap_pg_hba_bootstraps_and_replicas_stream() {
    let mut opts = ClusterOpts::new("boothba", 28500);
    opts.bootstrap_pg_hba_only = true;
    let mut c = Cluster::new(opts);
    c.start_all();
    let p = c.wait_healthy(Duration::from_secs(120)).await;
    let hba = std::fs::read_to_string(c.nodes[p].data_dir().join("pg_hba.conf")).unwrap();
    // initdb's socket line stays and the bootstrap lines follow initdb's: Patroni's semantics.
    let local = hba
        .lines()
        .position(|l| l.starts_with("local") && l.contains("all"))
        .expect("initdb's local line kept");
    let boot = hba
        .lines()
        .position(|l| l.trim() == "host replication replicator 127.0.0.1/32 md5")
        .expect("bootstrap line appended");
    assert!(local < boot, "{hba}");
    assert!(!hba.starts_with("# Generated by pgherd-agent"), "{hba}");
    for i in 0..3 {
        let s = pgherd_status(&c, i).await.unwrap();
        assert!(s.get("bootstrap_error").is_none(), "{s}");
    }
    assert_eq!(c.streaming_replicas(p).await.len(), 2);
}
