//! Architecture rules, checked on the source so that CI enforces them: the HA core does no I/O
//! (it reaches etcd, PostgreSQL, peers and the watchdog only through the traits of `dcs/`,
//! `pg/`, `peers.rs` and `watchdog/`), the pure decision modules never read a clock (`now` is
//! an input, so every row of `tests/ha_decide.rs` is deterministic), and the crate's top-level
//! modules form layers: a module imports only modules of lower layers, so there is no cycle
//! and no upward import (the submodules of `provision/` still import each other: a known gap,
//! see README "Known gaps").

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

/// The crate's top-level modules, lowest layer first. A module may import (`crate::x`) only
/// modules of lower layers; two modules of one layer never import each other.
const LAYERS: &[&[&str]] = &[
    &["types", "yaml"],
    &["dcs", "transport"],
    &["config"],
    &["inventory", "pg"],
    &["callbacks", "render", "status", "lab", "watchdog"],
    &["peers", "testing"],
    &["ha", "api"],
    &["agent", "provision"],
    &["cli"],
];

/// `crate::x` imports between top-level modules of `src/`, comments left out: (from, to).
fn module_edges() -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            if e.path().is_dir() {
                walk(&e.path(), out);
            } else if e.path().extension().is_some_and(|x| x == "rs") {
                out.push(e.path());
            }
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![];
    walk(&src, &mut files);
    let mut edges = std::collections::BTreeSet::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "lib" || module == "bin" {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        for line in text.lines() {
            let code = line.split("//").next().unwrap_or("");
            for (i, _) in code.match_indices("crate::") {
                let name: String = code[i + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != module {
                    edges.insert((module.clone(), name));
                }
            }
        }
    }
    edges.into_iter().collect()
}

/// Every edge that breaks the layering, as a sentence.
fn layering_violations(edges: &[(String, String)], layers: &[&[&str]]) -> Vec<String> {
    let rank = |m: &str| layers.iter().position(|l| l.contains(&m));
    let mut v = vec![];
    for (from, to) in edges {
        match (rank(from), rank(to)) {
            (Some(a), Some(b)) if a > b => {}
            (Some(a), Some(b)) if a == b => {
                v.push(format!("{from} imports {to}, a module of its own layer"))
            }
            (Some(_), Some(_)) => v.push(format!(
                "{from} imports {to}, a module of a higher layer (an upward import)"
            )),
            (None, _) => v.push(format!("module {from} has no layer: add it to LAYERS")),
            (_, None) => v.push(format!("module {to} has no layer: add it to LAYERS")),
        }
    }
    v
}

/// A cycle in the graph, as `a -> b -> ... -> a`, if there is one.
fn find_cycle(edges: &[(String, String)]) -> Option<String> {
    fn visit(
        n: &str,
        edges: &[(String, String)],
        path: &mut Vec<String>,
        done: &mut std::collections::BTreeSet<String>,
    ) -> Option<String> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut c = path[i..].to_vec();
            c.push(n.to_string());
            return Some(c.join(" -> "));
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for (_, to) in edges.iter().filter(|(f, _)| f == n) {
            if let Some(c) = visit(to, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = std::collections::BTreeSet::new();
    edges
        .iter()
        .find_map(|(f, _)| visit(f, edges, &mut vec![], &mut done))
}

#[test]
fn top_level_modules_import_only_lower_layers_and_form_no_cycle() {
    let edges = module_edges();
    assert!(edges.len() > 20, "{edges:?}");
    assert_eq!(find_cycle(&edges), None);
    let v = layering_violations(&edges, LAYERS);
    assert!(v.is_empty(), "{}", v.join("\n"));
}

#[test]
fn the_layering_check_rejects_a_cycle_and_an_upward_import() {
    let e = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    };
    let layers: &[&[&str]] = &[&["low"], &["mid", "side"], &["high"]];
    assert!(layering_violations(&e(&[("high", "mid"), ("mid", "low")]), layers).is_empty());
    assert_eq!(
        layering_violations(&e(&[("low", "high")]), layers),
        ["low imports high, a module of a higher layer (an upward import)"]
    );
    assert_eq!(
        layering_violations(&e(&[("mid", "side")]), layers),
        ["mid imports side, a module of its own layer"]
    );
    let cycle = e(&[("high", "mid"), ("mid", "low"), ("low", "high")]);
    assert_eq!(
        find_cycle(&cycle).as_deref(),
        Some("high -> mid -> low -> high")
    );
    assert!(!layering_violations(&cycle, layers).is_empty());
    assert_eq!(
        layering_violations(&e(&[("new", "low")]), layers),
        ["module new has no layer: add it to LAYERS"]
    );
}
