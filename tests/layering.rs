//! Architecture rules, checked on the source so that CI enforces them: the HA core does no I/O
//! (it reaches etcd, PostgreSQL, peers and the watchdog only through the traits of `dcs/`,
//! `pg/`, `peers.rs` and `watchdog.rs`), and the pure decision modules never read a clock
//! (`now` is an input, so every row of `tests/ha_decide.rs` is deterministic).

use std::path::Path;

fn source(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel))
        .unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn ha_files() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/ha");
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| format!("src/ha/{}", e.file_name().to_string_lossy()))
        .filter(|p| p.ends_with(".rs"))
        .collect();
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
