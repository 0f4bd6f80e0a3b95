//! Integration tests of `LocalPostgres` against real PostgreSQL 15: initdb, start, observe,
//! clone + streaming with a slot, promotion, the divergence check and pg_rewind of a former
//! primary, dynamic configuration and synchronous_standby_names.
//!
//! Each test runs its own instances in a temp directory owned by `postgres`, on ports
//! 25000-25099 of 127.0.0.1, and stops them (immediate) when dropped.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pgherd::config::AgentConfig;
use pgherd::dcs::DynamicConfig;
use pgherd::pg::local::LocalPostgres;
use pgherd::pg::{ControlState, PgStatus, Postgres, StartAs, StopMode, Upstream};
use pgherd::types::{MemberName, Timeline};
use tokio_postgres::NoTls;

const BIN: &str = "/usr/lib/postgresql/15/bin";
const SU_PASSWORD: &str = "su pa'ss:word";
const START: Duration = Duration::from_secs(60);

fn postgres_ids() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 3 && f[0] == "postgres")
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// A temp directory owned by postgres holding the nodes' data directories; stops every
/// postmaster it started on drop, before the directory is removed.
struct Lab {
    dir: tempfile::TempDir,
    data_dirs: Vec<PathBuf>,
}

impl Lab {
    fn new() -> Lab {
        let dir = tempfile::Builder::new().prefix("pgl").tempdir().unwrap();
        if is_root() {
            let (uid, gid) = postgres_ids().expect("postgres user");
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        Lab {
            dir,
            data_dirs: Vec::new(),
        }
    }

    /// `extra` is appended to the YAML: 2-space indented lines extend `postgresql:`, unindented
    /// ones add top-level sections.
    fn node(&mut self, name: &str, port: u16, extra: &str) -> Node {
        let data_dir = self.dir.path().join(name);
        self.data_dirs.push(data_dir.clone());
        let cfg = node_config(name, port, &data_dir, 20, extra);
        let pg = LocalPostgres::new(&cfg).unwrap();
        Node {
            pg,
            port,
            name: name.to_string(),
        }
    }
}

/// The node config the tests use; `extra` is appended to the YAML: 2-space indented lines
/// extend `postgresql:`, unindented ones add top-level sections.
fn node_config(
    name: &str,
    port: u16,
    data_dir: &Path,
    max_connections: u32,
    extra: &str,
) -> AgentConfig {
    let yaml = format!(
        r#"
scope: pgl
name: {name}
restapi: {{listen: "127.0.0.1:1", connect_address: "127.0.0.1:1"}}
etcd3: {{hosts: ["127.0.0.1:2379"]}}
postgresql:
  listen: "127.0.0.1:{port}"
  connect_address: "127.0.0.1:{port}"
  data_dir: "{data_dir}"
  bin_dir: "{BIN}"
  authentication:
    superuser: {{username: postgres, password: "{SU_PASSWORD}"}}
    replication: {{username: replicator, password: "rep:li\\cator"}}
    rewind: {{username: rewinder, password: "rew ind"}}
  parameters:
    shared_buffers: 16MB
    max_connections: {max_connections}
    fsync: "off"
    log_statement: ddl
{extra}
"#,
        data_dir = data_dir.display()
    );
    AgentConfig::parse(&yaml, "test.yml").unwrap()
}

impl Drop for Lab {
    fn drop(&mut self) {
        for d in &self.data_dirs {
            if !d.join("postmaster.pid").exists() {
                continue;
            }
            let mut cmd = std::process::Command::new(Path::new(BIN).join("pg_ctl"));
            cmd.args(["stop", "-m", "immediate", "-w", "-t", "10", "-D"])
                .arg(d);
            cmd.current_dir("/")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            if is_root()
                && let Some((uid, gid)) = postgres_ids()
            {
                cmd.uid(uid).gid(gid);
            }
            let _ = cmd.status();
        }
    }
}

struct Node {
    pg: LocalPostgres,
    port: u16,
    name: String,
}

impl Node {
    fn upstream(&self) -> Upstream {
        Upstream {
            member: MemberName::new(self.name.clone()),
            host: "127.0.0.1".into(),
            port: self.port,
        }
    }

    async fn sql(&self) -> tokio_postgres::Client {
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1")
            .port(self.port)
            .user("postgres")
            .password(SU_PASSWORD)
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(5));
        let (client, conn) = c.connect(NoTls).await.unwrap();
        tokio::spawn(conn);
        client
    }

    async fn rows(&self, sql: &str) -> Vec<String> {
        let c = self.sql().await;
        c.query(sql, &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect()
    }

    /// Polls observe() until `pred` holds (panics with the last status after `limit`).
    async fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&PgStatus) -> bool,
    ) -> PgStatus {
        let deadline = Instant::now() + limit;
        loop {
            let st = self.pg.observe().await;
            if pred(&st) {
                return st;
            }
            if Instant::now() > deadline {
                panic!(
                    "{}: timed out waiting for {what}; last status {st:#?}",
                    self.name
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn controldata(dir: &Path) -> String {
    let mut cmd = std::process::Command::new(Path::new(BIN).join("pg_controldata"));
    cmd.arg("-D").arg(dir).env("LC_ALL", "C").current_dir("/");
    String::from_utf8(cmd.output().unwrap().stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_promote_rewind_diverged_primary_then_clean_switchover_needs_no_rewind() {
    let mut lab = Lab::new();
    let n1 = lab.node("n1", 25001, "");
    let n2 = lab.node("n2", 25002, "");
    let n3 = lab.node("n3", 25003, "");

    // Bootstrap the first primary: checksums on by default.
    let st = n1.pg.observe().await;
    assert!(!st.data_dir_initialized && !st.running);
    n1.pg.initdb().await.unwrap();
    assert!(
        controldata(n1.pg.data_dir()).contains("Data page checksum version:           1"),
        "checksums must be on"
    );
    assert!(n1.pg.data_dir().join("postgresql.base.conf").exists());
    n1.pg.start(&StartAs::Primary, START).await.unwrap();
    n1.pg.post_bootstrap().await.unwrap();

    let st = n1.pg.observe().await;
    assert!(st.data_dir_initialized && st.running && st.accepting_connections);
    assert_eq!(st.in_recovery, Some(false));
    assert_eq!(st.timeline, Some(Timeline(1)));
    assert_eq!(st.control_state, Some(ControlState::InProduction));
    assert!(st.sysid.is_some());
    assert!(st.flush_lsn.is_some_and(|l| l.0 > 0));
    assert!(
        st.server_version
            .is_some_and(|v| (150000..160000).contains(&v))
    );
    assert!(st.postmaster_start_time.is_some());
    assert!(st.replication_state.is_none());
    assert!(st.pending_restart.is_empty(), "{:?}", st.pending_restart);

    // Slot for the replica first, so WAL is retained from before the clone.
    n1.pg
        .sync_slots(&["n2".into(), "n3".into()], &[])
        .await
        .unwrap();
    let st = n1.pg.observe().await;
    assert_eq!(
        st.slots.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        vec!["n2", "n3"]
    );
    assert!(st.slots[0].physical && !st.slots[0].active);

    n1.sql()
        .await
        .batch_execute("CREATE TABLE t (v text); INSERT INTO t VALUES ('before clone')")
        .await
        .unwrap();

    // Clone and stream (n3 too: it will have to follow the new primary later).
    n3.pg.basebackup(&n1.upstream()).await.unwrap();
    n3.pg
        .start(
            &StartAs::Replica {
                upstream: Some(n1.upstream()),
            },
            START,
        )
        .await
        .unwrap();
    n2.pg.basebackup(&n1.upstream()).await.unwrap();
    n2.pg
        .start(
            &StartAs::Replica {
                upstream: Some(n1.upstream()),
            },
            START,
        )
        .await
        .unwrap();
    n1.sql()
        .await
        .batch_execute("INSERT INTO t VALUES ('streamed')")
        .await
        .unwrap();
    let primary_flush = n1.pg.observe().await.flush_lsn.unwrap();
    let st = n2
        .wait_for("streaming", Duration::from_secs(30), |s| {
            s.replication_state.as_deref() == Some("streaming")
                && s.replay_lsn.is_some_and(|l| l >= primary_flush)
        })
        .await;
    assert_eq!(st.in_recovery, Some(true));
    assert_eq!(st.timeline, Some(Timeline(1)));
    assert!(st.receive_lsn.is_some_and(|l| l >= primary_flush));
    assert_eq!(st.upstream.as_deref(), Some("127.0.0.1:25001"));
    assert_eq!(st.sysid, n1.pg.observe().await.sysid);
    assert!(
        n2.rows("SELECT v FROM t ORDER BY v")
            .await
            .contains(&"streamed".to_string())
    );
    let st1 = n1
        .wait_for(
            "replica in pg_stat_replication",
            Duration::from_secs(10),
            |s| {
                s.replication
                    .iter()
                    .any(|r| r.application_name == "n2" && r.state == "streaming")
                    && s.slots.iter().any(|sl| sl.name == "n2" && sl.active)
            },
        )
        .await;
    assert_eq!(st1.replication[0].usename, "replicator");

    // Failover: promote the replica (timeline 2), checkpoint as the HA loop does after a
    // promotion (pg_rewind reads the source's control file).
    n2.pg
        .promote(Timeline(1), &[], Duration::from_secs(30))
        .await
        .unwrap();
    n2.pg.checkpoint().await.unwrap();
    let st = n2.pg.observe().await;
    assert_eq!(st.in_recovery, Some(false));
    assert_eq!(st.timeline, Some(Timeline(2)));
    let hist = n2.pg.timeline_history().await.unwrap();
    assert_eq!(hist.len(), 1, "{hist:?}");
    assert_eq!(hist[0].parent_timeline, 1);
    assert!(hist[0].switchpoint > 0);
    assert!(
        hist[0]
            .timestamp
            .as_deref()
            .is_some_and(|t| t.ends_with("+00:00")),
        "{hist:?}"
    );
    assert!(hist[0].new_leader.is_none());

    // A running replica follows the new primary by a config reload (no restart).
    n2.pg.sync_slots(&["n3".into()], &[]).await.unwrap();
    n3.pg.follow(Some(&n2.upstream())).await.unwrap();
    n3.wait_for("streaming from n2", Duration::from_secs(30), |s| {
        s.replication_state.as_deref() == Some("streaming")
            && s.upstream.as_deref() == Some("127.0.0.1:25002")
            && s.timeline == Some(Timeline(2))
    })
    .await;

    // The old primary keeps writing on timeline 1 (split brain), then dies.
    n1.sql()
        .await
        .batch_execute("INSERT INTO t VALUES ('divergent')")
        .await
        .unwrap();
    n1.pg
        .stop(StopMode::Immediate, Duration::from_secs(20))
        .await
        .unwrap();
    assert!(!n1.pg.observe().await.running);
    n2.sql()
        .await
        .batch_execute("INSERT INTO t VALUES ('after promotion')")
        .await
        .unwrap();
    n2.pg
        .sync_slots(&["n1".into(), "n3".into()], &[])
        .await
        .unwrap();

    // It diverged: rewind and rejoin as a replica of the new primary.
    assert!(n1.pg.needs_rewind(&n2.upstream()).await.unwrap());
    n1.pg.rewind(&n2.upstream()).await.unwrap();
    n1.pg
        .start(
            &StartAs::Replica {
                upstream: Some(n2.upstream()),
            },
            START,
        )
        .await
        .unwrap();
    let new_flush = n2.pg.observe().await.flush_lsn.unwrap();
    let st = n1
        .wait_for(
            "streaming from the new primary",
            Duration::from_secs(30),
            |s| {
                s.replication_state.as_deref() == Some("streaming")
                    && s.timeline == Some(Timeline(2))
                    && s.replay_lsn.is_some_and(|l| l >= new_flush)
            },
        )
        .await;
    assert_eq!(st.upstream.as_deref(), Some("127.0.0.1:25002"));
    assert_eq!(
        n1.rows("SELECT v FROM t ORDER BY v").await,
        vec!["after promotion", "before clone", "streamed"],
        "the divergent row must be gone"
    );
    n3.wait_for("caught up", Duration::from_secs(30), |s| {
        s.replay_lsn.is_some_and(|l| l >= new_flush)
    })
    .await;
    assert_eq!(
        n3.rows("SELECT v FROM t ORDER BY v").await,
        vec!["after promotion", "before clone", "streamed"]
    );

    // A replica stopped cleanly on the leader's timeline needs no rewind.
    n1.pg
        .stop(StopMode::Fast, Duration::from_secs(20))
        .await
        .unwrap();
    assert!(!n1.pg.needs_rewind(&n2.upstream()).await.unwrap());

    // Clean switchover back to n1: the primary stops fast (its walsender ships the shutdown
    // checkpoint first), the replica promotes (timeline 3); the old primary needs no rewind.
    n1.pg
        .start(
            &StartAs::Replica {
                upstream: Some(n2.upstream()),
            },
            START,
        )
        .await
        .unwrap();
    n1.wait_for("streaming again", Duration::from_secs(30), |s| {
        s.replication_state.as_deref() == Some("streaming")
    })
    .await;
    n2.pg
        .stop(StopMode::Fast, Duration::from_secs(20))
        .await
        .unwrap();
    n1.pg
        .promote(Timeline(2), &[], Duration::from_secs(30))
        .await
        .unwrap();
    n1.pg.checkpoint().await.unwrap();
    n1.pg.sync_slots(&["n2".into()], &[]).await.unwrap();
    assert_eq!(n1.pg.observe().await.timeline, Some(Timeline(3)));
    assert_eq!(n1.pg.timeline_history().await.unwrap().len(), 2);
    assert!(!n2.pg.needs_rewind(&n1.upstream()).await.unwrap());
    n2.pg
        .start(
            &StartAs::Replica {
                upstream: Some(n1.upstream()),
            },
            START,
        )
        .await
        .unwrap();
    n2.wait_for("following the new primary", Duration::from_secs(30), |s| {
        s.replication_state.as_deref() == Some("streaming") && s.timeline == Some(Timeline(3))
    })
    .await;
    n2.pg
        .stop(StopMode::Fast, Duration::from_secs(20))
        .await
        .unwrap();
    // stop is idempotent.
    n2.pg
        .stop(StopMode::Fast, Duration::from_secs(5))
        .await
        .unwrap();

    // n3 still replays timeline 2 and never saw n1's promotion to 3 (its upstream n2 stopped
    // first). Promoted with what the DCS knows (timeline 3 used, n1's history lines), it must
    // take a new number: a second "timeline 3" would look identical to pg_rewind and streaming.
    assert_eq!(n3.pg.observe().await.in_recovery, Some(true));
    let cluster_history = n1.pg.timeline_history().await.unwrap();
    n3.pg
        .promote(Timeline(3), &cluster_history, Duration::from_secs(30))
        .await
        .unwrap();
    n3.pg.checkpoint().await.unwrap();
    assert_eq!(n3.pg.observe().await.timeline, Some(Timeline(4)));
    let h = n3.pg.timeline_history().await.unwrap();
    assert_eq!(
        h.iter().map(|l| l.parent_timeline).collect::<Vec<_>>(),
        vec![1, 2],
        "timeline 4 forks from 2, where n3 was"
    );
    let reserved =
        std::fs::read_to_string(n3.pg.data_dir().join("pg_wal/00000003.history")).unwrap();
    assert!(
        reserved.starts_with("# timeline 3 was used elsewhere"),
        "{reserved}"
    );
    // n1 (timeline 3) and n3 (timeline 4) are told apart: n1 must rewind to follow n3.
    n1.pg
        .stop(StopMode::Fast, Duration::from_secs(20))
        .await
        .unwrap();
    assert!(n1.pg.needs_rewind(&n3.upstream()).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_config_reloads_and_reports_pending_restart() {
    let mut lab = Lab::new();
    let n = lab.node(
        "cfg",
        25010,
        &format!(
            "  pg_hba: [\"local all all scram-sha-256\", \"host all all 127.0.0.1/32 scram-sha-256\"]\n\
             bootstrap:\n  post_bootstrap: \"{BIN}/psql -qc 'CREATE TABLE made_by_script ()'\""
        ),
    );
    n.pg.initdb().await.unwrap();
    n.pg.start(&StartAs::Primary, START).await.unwrap();
    // Roles, grants, then the script (connection string argument, password via PGPASSFILE).
    n.pg.post_bootstrap().await.unwrap();
    assert_eq!(
        n.rows("SELECT relname::text FROM pg_class WHERE relname = 'made_by_script'")
            .await,
        vec!["made_by_script"]
    );
    assert_eq!(
        n.rows("SELECT rolname::text FROM pg_roles WHERE rolname IN ('replicator', 'rewinder') AND rolcanlogin ORDER BY 1").await,
        vec!["replicator", "rewinder"]
    );
    let hba = std::fs::read_to_string(n.pg.data_dir().join("pg_hba.conf")).unwrap();
    assert!(
        hba.contains("host replication replicator 0.0.0.0/0 scram-sha-256"),
        "{hba}"
    );

    // work_mem is reloadable; max_connections needs a restart. The local config sets
    // max_connections=20 and wins over the DCS, so use a DCS-only restart parameter.
    let dcs = DynamicConfig::parse(
        r#"{"postgresql":{"parameters":{"work_mem":"7MB","max_prepared_transactions":5,"max_connections":99}}}"#,
    )
    .unwrap();
    assert!(
        n.pg.apply_dynamic_config(&dcs).await.unwrap(),
        "files changed: reload needed"
    );
    assert!(
        !n.pg.apply_dynamic_config(&dcs).await.unwrap(),
        "nothing changed the second time"
    );
    n.pg.reload().await.unwrap();
    let st = n
        .wait_for("pending restart", Duration::from_secs(10), |s| {
            !s.pending_restart.is_empty()
        })
        .await;
    assert_eq!(
        st.pending_restart.get("max_prepared_transactions"),
        Some(&("0".to_string(), "5".to_string()))
    );
    assert!(!st.pending_restart.contains_key("work_mem"));
    assert!(
        !st.pending_restart.contains_key("max_connections"),
        "local value 20 is unchanged"
    );
    assert_eq!(n.rows("SHOW work_mem").await, vec!["7MB"]);
    assert_eq!(n.rows("SHOW max_connections").await, vec!["20"]);

    // synchronous_standby_names set and cleared.
    n.pg.set_synchronous_standby_names("\"n-2\"").await.unwrap();
    let st = n
        .wait_for("ssn set", Duration::from_secs(10), |s| {
            s.synchronous_standby_names.as_deref() == Some("\"n-2\"")
        })
        .await;
    assert!(st.running);
    n.pg.set_synchronous_standby_names("").await.unwrap();
    n.wait_for("ssn cleared", Duration::from_secs(10), |s| {
        s.synchronous_standby_names.as_deref() == Some("")
    })
    .await;
    // Writes do not block once cleared.
    n.sql()
        .await
        .batch_execute("CREATE TABLE x (i int); INSERT INTO x VALUES (1)")
        .await
        .unwrap();

    // A restart applies the pending change.
    n.pg.stop(StopMode::Fast, Duration::from_secs(20))
        .await
        .unwrap();
    n.pg.start(&StartAs::Primary, START).await.unwrap();
    let st = n.pg.observe().await;
    assert!(st.pending_restart.is_empty(), "{:?}", st.pending_restart);
    assert_eq!(n.rows("SHOW max_prepared_transactions").await, vec!["5"]);

    // post_bootstrap's role statements stay out of the server log despite log_statement=ddl.
    let log = std::fs::read_to_string(n.pg.log_file()).unwrap();
    assert!(log.contains("CREATE TABLE x"), "ddl is logged at all");
    for secret in [SU_PASSWORD, "rep:li\\cator", "rew ind"] {
        assert!(!log.contains(secret), "password leaked into the server log");
    }
}

#[tokio::test]
async fn uninitialized_directory_is_observed_without_errors() {
    let mut lab = Lab::new();
    let n = lab.node("empty", 25020, "");
    let st = n.pg.observe().await;
    assert_eq!(st, PgStatus::default());
    n.pg.stop(StopMode::Fast, Duration::from_secs(1))
        .await
        .unwrap();
    assert!(
        n.pg.start(&StartAs::Primary, Duration::from_secs(1))
            .await
            .is_err()
    );
    // A failed clone leaves an empty data directory behind (nothing listens on 25021).
    let nowhere = Upstream {
        member: MemberName::from("nowhere"),
        host: "127.0.0.1".into(),
        port: 25021,
    };
    assert!(n.pg.basebackup(&nowhere).await.is_err());
    assert_eq!(std::fs::read_dir(n.pg.data_dir()).unwrap().count(), 0);
    // A stale pid file (no such process) does not count as running.
    std::fs::create_dir_all(n.pg.data_dir()).unwrap();
    std::fs::write(n.pg.data_dir().join("postmaster.pid"), "999999\n").unwrap();
    assert!(!n.pg.observe().await.running);
    // Neither does a live pid that is not a postmaster of this directory (pid reuse).
    let me = std::process::id();
    std::fs::write(n.pg.data_dir().join("postmaster.pid"), format!("{me}\n")).unwrap();
    assert!(!n.pg.observe().await.running);
}

/// Connects over TCP as `user` with `password`; `Err` with the server's message.
async fn connect_as(port: u16, user: &str, password: &str) -> Result<(), String> {
    let mut c = tokio_postgres::Config::new();
    c.host("127.0.0.1")
        .port(port)
        .user(user)
        .password(password)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(5));
    match c.connect(NoTls).await {
        Ok((client, conn)) => {
            tokio::spawn(conn);
            client
                .simple_query("SELECT 1")
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_pg_hba_is_checked_before_it_is_reloaded_and_a_rejected_one_is_put_back() {
    let mut lab = Lab::new();
    let hba = |extra: &str| {
        format!(
            "  pg_hba: [\"local all all trust\", {extra}\"host all all 127.0.0.1/32 scram-sha-256\"]\n"
        )
    };
    let n = lab.node("hba", 25030, &hba(""));
    n.pg.initdb().await.unwrap();
    n.pg.start(&StartAs::Primary, START).await.unwrap();
    n.pg.post_bootstrap().await.unwrap();
    n.sql()
        .await
        .batch_execute("CREATE ROLE alice LOGIN PASSWORD 'right'")
        .await
        .unwrap();
    assert!(connect_as(25030, "alice", "wrong").await.is_err());
    let postmaster = std::fs::read_to_string(n.pg.data_dir().join("postmaster.pid")).unwrap();

    // A valid added line: written, checked, reloaded -> in force (alice needs no password).
    let cfg_with = |extra: &str| node_config("hba", 25030, n.pg.data_dir(), 20, &hba(extra));
    let good = cfg_with("\"host all alice 127.0.0.1/32 trust\", ");
    assert!(
        n.pg.set_local_config(&good).await.unwrap(),
        "pg_hba changed on a running server: reload needed"
    );
    n.pg.reload().await.unwrap();
    connect_as(25030, "alice", "wrong")
        .await
        .expect("the added trust line is in force");
    let before = std::fs::read(n.pg.data_dir().join("pg_hba.conf")).unwrap();
    let meta = std::fs::metadata(n.pg.data_dir().join("pg_hba.conf")).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600);
    if is_root() {
        assert_eq!(Some((meta.uid(), meta.gid())), postgres_ids());
    }

    // An invalid line: refused, the previous file is back byte for byte, nothing reloaded.
    let bad = cfg_with("\"host all all 127.0.0.1/33 md5\", ");
    let e = n.pg.set_local_config(&bad).await.unwrap_err().to_string();
    // (line 1 is the generated header)
    assert!(e.contains("pg_hba.conf line 3:"), "{e}");
    assert!(e.contains("127.0.0.1/33"), "{e}");
    assert!(e.ends_with("(kept the previous pg_hba.conf)"), "{e}");
    assert_eq!(
        std::fs::read(n.pg.data_dir().join("pg_hba.conf")).unwrap(),
        before
    );
    assert!(
        !n.pg.data_dir().join("pg_hba.pgherd-tmp").exists(),
        "no temp file left behind"
    );
    // The server still accepts connections, under the previous rules, also after a reload.
    n.pg.reload().await.unwrap();
    connect_as(25030, "alice", "wrong")
        .await
        .expect("previous rules still in force");
    assert_eq!(n.rows("SELECT 'up'::text").await, vec!["up"]);
    // The whole config was refused: the controller still writes the good one.
    n.pg.apply_dynamic_config(&DynamicConfig::default())
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(n.pg.data_dir().join("pg_hba.conf")).unwrap(),
        before
    );
    assert_eq!(
        std::fs::read_to_string(n.pg.data_dir().join("postmaster.pid")).unwrap(),
        postmaster,
        "PostgreSQL kept running throughout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standbys_start_with_at_least_the_hot_standby_values_in_pg_control() {
    let mut lab = Lab::new();
    let p = lab.node("p", 25033, "");
    // The replica is configured below the primary (max_connections 20 there).
    let r = lab.node("r", 25034, "");
    let r_dir = r.pg.data_dir().to_path_buf();
    let p_dir = p.pg.data_dir().to_path_buf();
    r.pg.set_local_config(&node_config("r", 25034, &r_dir, 10, ""))
        .await
        .unwrap();
    p.pg.initdb().await.unwrap();
    p.pg.start(&StartAs::Primary, START).await.unwrap();
    p.pg.post_bootstrap().await.unwrap();
    p.pg.sync_slots(&["r".into()], &[]).await.unwrap();
    r.pg.basebackup(&p.upstream()).await.unwrap();
    let as_replica = StartAs::Replica {
        upstream: Some(p.upstream()),
    };
    r.pg.start(&as_replica, START).await.unwrap();
    r.wait_for("streaming", Duration::from_secs(30), |s| {
        s.replication_state.as_deref() == Some("streaming")
    })
    .await;
    assert_eq!(
        r.rows("SHOW max_connections").await,
        vec!["20"],
        "configured 10, raised to the primary's 20 from pg_control"
    );

    // The replica stops; the primary lowers max_connections in place (restart). The stopped
    // replica's pg_control still says 20: it must still start (with 20), and stream.
    r.pg.stop(StopMode::Fast, Duration::from_secs(20))
        .await
        .unwrap();
    let has_20 = |cd: &str| {
        cd.lines()
            .any(|l| l.starts_with("max_connections setting:") && l.trim_end().ends_with(" 20"))
    };
    assert!(has_20(&controldata(&r_dir)), "{}", controldata(&r_dir));
    p.pg.set_local_config(&node_config("p", 25033, &p_dir, 12, ""))
        .await
        .unwrap();
    p.pg.stop(StopMode::Fast, Duration::from_secs(20))
        .await
        .unwrap();
    p.pg.start(&StartAs::Primary, START).await.unwrap();
    assert_eq!(p.rows("SHOW max_connections").await, vec!["12"]);
    r.pg.start(&as_replica, START).await.unwrap();
    r.wait_for("streaming again", Duration::from_secs(30), |s| {
        s.replication_state.as_deref() == Some("streaming")
    })
    .await;
    assert_eq!(r.rows("SHOW max_connections").await, vec!["20"]);
}
