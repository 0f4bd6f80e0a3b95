//! Architecture rules, checked on the source so that CI enforces them: the HA core does no I/O
//! (it reaches etcd, PostgreSQL, peers and the watchdog only through the traits of `dcs/`,
//! `pg/`, `peers.rs` and `watchdog/`), the pure decision modules never read a clock (`now` is
//! an input, so every row of `tests/ha_decide.rs` is deterministic), and the crate's top-level
//! modules form layers: a module imports only modules of lower layers, so there is no cycle
//! and no upward import. The submodules of `provision/` are layered the same way, by a second
//! table checked with the same checker.

use std::path::Path;

fn source(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel))
        .unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every `.rs` file under `src/ha/`, sub-directories included (`ha_loop/`).
fn ha_files() -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    rust_files(&root.join("src/ha"))
        .iter()
        .map(|f| f.strip_prefix(root).unwrap().display().to_string())
        .collect()
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
        "src/ha/leader_upkeep.rs",
        "src/ha/restart.rs",
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
    &["types", "yaml", "files"],
    &["dcs", "transport"],
    &["config", "pki"],
    &["inventory", "pg"],
    &["callbacks", "render", "status", "lab", "watchdog"],
    &["peers", "testing"],
    &["ha", "api"],
    &["agent", "provision"],
    &["cli"],
];

/// The submodules of `src/provision/`, lowest layer first (a directory module such as
/// `rolling/` is one node with its `rolling.rs`), checked like [`LAYERS`]. The vocabulary
/// (services, playbooks) and the stand-alone day-2 clients at the bottom; then a host's facts,
/// the desired state (which says which facts to ask for), the ways to reach hosts and agents,
/// the day-2 jobs (each a pure planner plus its step, on the desired state), the cluster
/// facts they make up, the planner, the schedule, the inventory → desired-state builder
/// (which checks the playbook against the schedule) beside the report, and the executor on
/// top.
const PROVISION_LAYERS: &[&[&str]] = &[
    &["services", "playbook", "agent_client", "oplock"],
    &["ctl", "facts"],
    &["desired"],
    &["remote"],
    &["dcs_config", "etcd_members", "rolling", "departed"],
    &["cluster_facts"],
    &["plan"],
    &["schedule"],
    &["spec", "report"],
    &["apply"],
];

/// Imports between two modules of one layer that [`PROVISION_LAYERS`] allows, with the why.
const PROVISION_SAME_LAYER: &[(&str, &str)] = &[
    // A departing member is drained from HAProxy's replica backend the way a rolling restart
    // drains one: through rolling's admin-socket command.
    ("departed", "rolling"),
];

/// Every `.rs` file under `dir`, sub-directories included.
fn rust_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().is_dir() {
            out.extend(rust_files(&e.path()));
        } else if e.path().extension().is_some_and(|x| x == "rs") {
            out.push(e.path());
        }
    }
    out.sort();
    out
}

/// The module path of a source file relative to `src/` (`provision/rolling/executor.rs` →
/// `provision::rolling::executor`; `mod.rs` and `lib.rs` name their directory).
fn file_module(rel: &Path) -> Vec<String> {
    let mut m: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let last = m.pop().unwrap_or_default();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        m.push(stem.to_string());
    }
    m
}

/// The absolute paths a path expression starting at `code[i..]` names, as segments from the
/// crate root: `crate::a::b`, `super::x` (relative to `module`), `self::y`, with `{..}` groups
/// expanded (`super::{a::X, b}` names `a::X` and `b`). Stops at the first non-path token.
fn paths_at(code: &str, i: usize, module: &[String]) -> Vec<Vec<String>> {
    fn ident(s: &str) -> (&str, &str) {
        let n = s
            .char_indices()
            .find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '_'))
            .map_or(s.len(), |(n, _)| n);
        (&s[..n], &s[n..])
    }
    /// Segments of `s` (after a `::`) appended to `base`, groups expanded.
    fn tail(s: &str, base: Vec<String>, out: &mut Vec<Vec<String>>) {
        let s = s.trim_start();
        if let Some(group) = s.strip_prefix('{') {
            // Split the group at its top-level commas.
            let (mut depth, mut from) = (0usize, 0usize);
            for (n, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        tail(&group[from..n], base.clone(), out);
                        return;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        tail(&group[from..n], base.clone(), out);
                        from = n + 1;
                    }
                    _ => {}
                }
            }
            return;
        }
        let (name, rest) = ident(s);
        if name.is_empty() || name == "self" {
            out.push(base);
            return;
        }
        let mut path = base;
        path.push(name.to_string());
        match rest.trim_start().strip_prefix("::") {
            Some(more) => tail(more, path, out),
            None => out.push(path),
        }
    }
    let code = &code[i..];
    let (base, s) = if let Some(rest) = code.strip_prefix("crate::") {
        (vec![], rest)
    } else if let Some(rest) = code.strip_prefix("self::") {
        (module.to_vec(), rest)
    } else {
        let (mut base, mut s) = (module.to_vec(), code);
        while let Some(rest) = s.strip_prefix("super::") {
            base.pop();
            s = rest;
        }
        (base, s)
    };
    let mut out = vec![];
    tail(s, base, &mut out);
    out
}

/// Imports between the submodules of `src/<root>` (`root` empty: the crate's top-level
/// modules), comments left out: (from, to). A path counts when it is spelled from the crate
/// (`crate::provision::plan::Plan`) or relative to the file (`super::plan`, `super::super::x`;
/// an inline `mod tests {` block is one module deeper until its closing brace, as rustfmt
/// indents it). Only paths naming a submodule of `root` count (`super::helper` in a test
/// module names an item, not a module).
fn module_edges(root: &[&str]) -> Vec<(String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let dir = root.iter().fold(src.clone(), |d, r| d.join(r));
    let nodes: std::collections::BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.trim_end_matches(".rs").to_string()
        })
        .filter(|n| !["lib", "mod", "bin"].contains(&n.as_str()))
        .collect();
    let mut edges = std::collections::BTreeSet::new();
    for f in rust_files(&dir) {
        let file = file_module(f.strip_prefix(&src).unwrap());
        let Some(from) = file.get(root.len()).filter(|n| nodes.contains(*n)) else {
            continue;
        };
        let text = std::fs::read_to_string(&f).unwrap();
        // (indent of the `mod x {` line, x) for the inline modules open at each line.
        let mut inline: Vec<(usize, String)> = vec![];
        let lines: Vec<&str> = text.lines().collect();
        for (n, line) in lines.iter().enumerate() {
            let indent = line.len() - line.trim_start().len();
            if inline
                .last()
                .is_some_and(|(i, _)| *i == indent && line.trim() == "}")
            {
                inline.pop();
            }
            let code = line.split("//").next().unwrap_or("");
            let mut module = file.clone();
            module.extend(inline.iter().map(|(_, m)| m.clone()));
            // A path may continue on the following lines (a multi-line `use a::{..}`).
            let rest: String = std::iter::once(code.to_string())
                .chain(
                    lines[n + 1..]
                        .iter()
                        .take(40)
                        .map(|l| l.split("//").next().unwrap_or("").to_string()),
                )
                .collect::<Vec<_>>()
                .join("\n");
            for (i, _) in code.match_indices(['c', 's']) {
                let before = code[..i].chars().next_back();
                if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
                    continue;
                }
                if !["crate::", "super::", "self::"]
                    .iter()
                    .any(|p| code[i..].starts_with(p))
                {
                    continue;
                }
                for path in paths_at(&rest, i, &module) {
                    if path.len() > root.len()
                        && path.iter().zip(root).all(|(a, b)| a == b)
                        && nodes.contains(&path[root.len()])
                        && &path[root.len()] != from
                    {
                        edges.insert((from.clone(), path[root.len()].clone()));
                    }
                }
            }
            let t = code.trim_start();
            let t = ["pub(crate) ", "pub "]
                .iter()
                .find_map(|p| t.strip_prefix(p))
                .unwrap_or(t);
            if let Some(m) = t.strip_prefix("mod ")
                && let Some(name) = m.strip_suffix(" {")
            {
                inline.push((indent, name.trim().to_string()));
            }
        }
    }
    edges.into_iter().collect()
}

/// Every edge that breaks the layering, as a sentence. `same_layer` lists the `(from, to)`
/// imports allowed between two modules of one layer.
fn layering_violations(
    edges: &[(String, String)],
    layers: &[&[&str]],
    same_layer: &[(&str, &str)],
) -> Vec<String> {
    let rank = |m: &str| layers.iter().position(|l| l.contains(&m));
    let mut v = vec![];
    for (from, to) in edges {
        match (rank(from), rank(to)) {
            (Some(a), Some(b)) if a > b => {}
            (Some(a), Some(b)) if a == b && same_layer.contains(&(from.as_str(), to.as_str())) => {}
            (Some(a), Some(b)) if a == b => {
                v.push(format!("{from} imports {to}, a module of its own layer"))
            }
            (Some(_), Some(_)) => v.push(format!(
                "{from} imports {to}, a module of a higher layer (an upward import)"
            )),
            (None, _) => v.push(format!("module {from} has no layer: add it to the layers")),
            (_, None) => v.push(format!("module {to} has no layer: add it to the layers")),
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
    let edges = module_edges(&[]);
    assert!(edges.len() > 20, "{edges:?}");
    assert_eq!(find_cycle(&edges), None);
    let v = layering_violations(&edges, LAYERS, &[]);
    assert!(v.is_empty(), "{}", v.join("\n"));
}

#[test]
fn provision_submodules_import_only_lower_layers_and_form_no_cycle() {
    let edges = module_edges(&["provision"]);
    assert!(edges.len() > 20, "{edges:?}");
    assert_eq!(find_cycle(&edges), None, "{edges:?}");
    let v = layering_violations(&edges, PROVISION_LAYERS, PROVISION_SAME_LAYER);
    assert!(v.is_empty(), "{}", v.join("\n"));
    // Every allowance is used: a stale one would hide nothing but mislead the reader.
    for (from, to) in PROVISION_SAME_LAYER {
        assert!(
            edges.iter().any(|(f, t)| f == from && t == to),
            "{from} no longer imports {to}: drop the allowance"
        );
    }
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
    assert!(layering_violations(&e(&[("high", "mid"), ("mid", "low")]), layers, &[]).is_empty());
    assert_eq!(
        layering_violations(&e(&[("low", "high")]), layers, &[]),
        ["low imports high, a module of a higher layer (an upward import)"]
    );
    assert_eq!(
        layering_violations(&e(&[("mid", "side")]), layers, &[]),
        ["mid imports side, a module of its own layer"]
    );
    // An allowed same-layer import passes in its direction only.
    assert!(layering_violations(&e(&[("mid", "side")]), layers, &[("mid", "side")]).is_empty());
    assert_eq!(
        layering_violations(&e(&[("side", "mid")]), layers, &[("mid", "side")]),
        ["side imports mid, a module of its own layer"]
    );
    let cycle = e(&[("high", "mid"), ("mid", "low"), ("low", "high")]);
    assert_eq!(
        find_cycle(&cycle).as_deref(),
        Some("high -> mid -> low -> high")
    );
    assert!(!layering_violations(&cycle, layers, &[]).is_empty());
    // Two allowed same-layer imports in both directions are still a cycle.
    let both = e(&[("mid", "side"), ("side", "mid")]);
    assert_eq!(find_cycle(&both).as_deref(), Some("mid -> side -> mid"));
    assert_eq!(
        layering_violations(&e(&[("new", "low")]), layers, &[]),
        ["module new has no layer: add it to the layers"]
    );
}

#[test]
fn the_edge_reader_resolves_relative_and_grouped_paths() {
    let m = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let file = m(&["provision", "rolling", "executor"]);
    let code = "use super::super::{ctl::Agents, remote::Fleet};";
    let i = code.find("super").unwrap();
    assert_eq!(
        paths_at(code, i, &file),
        [
            m(&["provision", "ctl", "Agents"]),
            m(&["provision", "remote", "Fleet"])
        ]
    );
    let code = "use crate::provision::plan::{self, Plan};";
    let i = code.find("crate").unwrap();
    assert_eq!(
        paths_at(code, i, &file),
        [m(&["provision", "plan"]), m(&["provision", "plan", "Plan"])]
    );
    assert_eq!(
        file_module(Path::new("provision/rolling/mod.rs")),
        m(&["provision", "rolling"])
    );
}
