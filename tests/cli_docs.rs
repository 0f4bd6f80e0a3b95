//! `pgherd completions` and `pgherd man`, run as the built binary: every shell's script and
//! every manual page is there, names the real subcommands (read from the clap definitions,
//! so a new verb is checked without editing this file), and the pages are roff that starts
//! with `.TH`. Nothing here starts a service or reads an inventory.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use clap::CommandFactory;

fn pgherd(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_pgherd"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pgherd {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The top-level verbs, as clap defines them.
fn top_verbs() -> Vec<String> {
    let v: Vec<String> = pgherd::cli::Cli::command()
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    assert!(v.len() > 15, "{v:?}");
    v
}

/// The top-level verbs and `lab`'s.
fn verbs() -> Vec<String> {
    let mut v = top_verbs();
    let cli = pgherd::cli::Cli::command();
    let lab = cli.find_subcommand("lab").expect("a lab subcommand");
    v.extend(lab.get_subcommands().map(|c| c.get_name().to_string()));
    v
}

/// A page's first request after the apostrophe preamble every roff page from clap_mangen
/// opens with (`.ie \n(.g .ds Aq \(aq` / `.el .ds Aq '`, defining the `\*(Aq` string).
fn first_request(page: &str) -> &str {
    page.lines()
        .find(|l| !l.starts_with(".ie ") && !l.starts_with(".el "))
        .unwrap_or("")
}

/// groff's own check of the page, where groff is installed: no warning, no error.
fn groff_accepts(page: &[u8], name: &str) {
    if !Path::new("/usr/bin/groff").exists() {
        return;
    }
    let mut child = Command::new("/usr/bin/groff")
        .args(["-man", "-ww", "-z", "-Tutf8"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), page).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.is_empty(), "{name}: {err}");
}

#[test]
fn completion_scripts_for_bash_zsh_and_fish_name_every_verb() {
    let verbs = verbs();
    for shell in ["bash", "zsh", "fish"] {
        let script = String::from_utf8(pgherd(&["completions", shell]).stdout).unwrap();
        assert!(script.len() > 1000, "{shell}: {script}");
        for v in &verbs {
            assert!(script.contains(v.as_str()), "{shell}: no {v}");
        }
        // The flags too (fish spells them `-l inventory`).
        assert!(script.contains("inventory"), "{shell}: no --inventory");
    }
    // The bash script is valid bash.
    let bash = pgherd(&["completions", "bash"]).stdout;
    let mut child = Command::new("bash")
        .arg("-n")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), &bash).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_unknown_shell_is_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_pgherd"))
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
}

#[test]
fn the_man_page_is_roff_with_a_title_and_lists_every_verb() {
    let raw = pgherd(&["man"]).stdout;
    let page = String::from_utf8(raw.clone()).unwrap();
    assert!(
        first_request(&page).starts_with(".TH pgherd 1 "),
        "{}",
        first_request(&page)
    );
    assert!(page.contains(".SH NAME") && page.contains(".SH SUBCOMMANDS"));
    for v in top_verbs() {
        // roff escapes the hyphen: pgherd\-plan(1).
        assert!(
            page.contains(&format!("pgherd\\-{}(1)", v.replace('-', "\\-"))),
            "no {v}"
        );
    }
    groff_accepts(&raw, "pgherd.1");
}

#[test]
fn man_out_writes_one_page_per_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let out = pgherd(&["man", "--out", dir.path().to_str().unwrap()]);
    let listed = String::from_utf8(out.stdout).unwrap();
    let mut want = vec!["pgherd.1".to_string(), "pgherd-lab.1".to_string()];
    let cli = pgherd::cli::Cli::command();
    want.extend(
        cli.get_subcommands()
            .map(|c| format!("pgherd-{}.1", c.get_name())),
    );
    want.extend(
        cli.find_subcommand("lab")
            .unwrap()
            .get_subcommands()
            .map(|c| format!("pgherd-lab-{}.1", c.get_name())),
    );
    for name in &want {
        let path = dir.path().join(name);
        assert!(
            listed.contains(&path.display().to_string()),
            "{name} not listed"
        );
        let raw = std::fs::read(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let page = String::from_utf8(raw.clone()).unwrap();
        let title = name.trim_end_matches(".1");
        assert!(
            first_request(&page).starts_with(&format!(".TH {title} 1 ")),
            "{name}: {}",
            first_request(&page)
        );
        groff_accepts(&raw, name);
    }
    // No page for clap's `help`.
    assert!(!dir.path().join("pgherd-help.1").exists());
}
