//! Architecture rules, checked on the source so that CI enforces them: the HA core does no I/O
//! (it reaches etcd, PostgreSQL, peers and the watchdog only through the traits of `dcs/`,
//! `pg/`, `peers.rs` and `watchdog.rs`), and the pure decision modules never read a clock
//! (`now` is an input, so every row of `tests/ha_decide.rs` is deterministic).

use std::path::Path;

fn source(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel))
        .unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every `.rs` file under `src/ha/`, sub-directories included (`ha_loop/`).
fn ha_files() -> Vec<String> {
    fn walk(dir: &Path, rel: &str, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let rel = format!("{rel}/{name}");
            if e.path().is_dir() {
                walk(&e.path(), &rel, out);
            } else if name.ends_with(".rs") {
                out.push(rel);
            }
        }
    }
    let mut v = vec![];
    walk(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src/ha"),
        "src/ha",
        &mut v,
    );
    v.sort();
    v
}

#[test]
fn the_ha_core_imports_no_io_crates() {
    let files = ha_files();
    assert!(files.len() >= 5, "{files:?}");
    for f in files {
        let text = source(&f);
        for banned in [
            "tokio::net",
            "tokio::fs",
            "tokio::process",
            "std::fs",
            "std::process",
            "std::net",
            "etcd_client",
            "tokio_postgres",
            "openssh",
            "reqwest",
        ] {
            assert!(
                !text.contains(banned),
                "{f} uses {banned}: go through a trait"
            );
        }
    }
}

#[test]
fn the_pure_decision_modules_read_no_clock() {
    for f in [
        "src/ha/decide.rs",
        "src/ha/decision.rs",
        "src/ha/candidates.rs",
        "src/ha/inputs.rs",
        "src/ha/timing.rs",
    ] {
        let text = source(f);
        for banned in ["Instant::now", "SystemTime::now", "Utc::now", "thread_rng"] {
            assert!(
                !text.contains(banned),
                "{f} calls {banned}: take `now` as an input"
            );
        }
    }
}
