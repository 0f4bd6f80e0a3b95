//! Behaviour of the real hook runner with real scripts that record their argv to files.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pgherd::callbacks::{CallbackAction, CommandHooks, Hooks};
use pgherd::config::Callbacks;
use pgherd::pg::Role;

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn wait_for(mut cond: impl FnMut() -> bool, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

#[tokio::test]
async fn callback_receives_split_command_plus_action_role_scope() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("argv");
    let s = script(
        dir.path(),
        "cb.sh",
        &format!("for a in \"$@\"; do echo \"$a\" >> {}; done", out.display()),
    );
    let hooks = CommandHooks::new(
        "batman",
        Callbacks {
            on_role_change: Some(format!("{} 'two words' --flag", s.display())),
            ..Default::default()
        },
        None,
        None,
    );
    hooks.callback(CallbackAction::OnRoleChange, Role::Promoted);
    assert!(wait_for(
        || read(&out).lines().count() == 5,
        Duration::from_secs(5)
    ));
    assert_eq!(
        read(&out),
        "two words\n--flag\non_role_change\nprimary\nbatman\n"
    );
}

#[tokio::test]
async fn unconfigured_callback_is_a_noop() {
    let hooks = CommandHooks::new("batman", Callbacks::default(), None, None);
    hooks.callback(CallbackAction::OnStart, Role::Replica);
}

#[tokio::test]
async fn new_callback_kills_the_running_one_and_its_children() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("log");
    // Records start, then sleeps in a child process (same group) and records the end.
    let s = script(
        dir.path(),
        "slow.sh",
        &format!(
            "echo \"start $1 $2\" >> {o}\nif [ \"$2\" = replica ]; then sleep 3; echo \"end $1 $2\" >> {o}; fi",
            o = out.display()
        ),
    );
    let hooks = CommandHooks::new(
        "batman",
        Callbacks {
            on_start: Some(s.display().to_string()),
            on_role_change: Some(s.display().to_string()),
            ..Default::default()
        },
        None,
        None,
    );
    hooks.callback(CallbackAction::OnStart, Role::Replica);
    assert!(wait_for(
        || read(&out).contains("start on_start replica"),
        Duration::from_secs(5)
    ));
    hooks.callback(CallbackAction::OnRoleChange, Role::Primary);
    assert!(wait_for(
        || read(&out).contains("start on_role_change primary"),
        Duration::from_secs(5)
    ));
    std::thread::sleep(Duration::from_millis(3500));
    assert!(
        !read(&out).contains("end on_start"),
        "the replaced callback kept running: {}",
        read(&out)
    );
}

#[tokio::test]
async fn on_reload_has_its_own_slot() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("log");
    let s = script(
        dir.path(),
        "cb.sh",
        &format!(
            "echo \"start $1\" >> {o}\nsleep 1\necho \"end $1\" >> {o}",
            o = out.display()
        ),
    );
    let cmd = Some(s.display().to_string());
    let hooks = CommandHooks::new(
        "batman",
        Callbacks {
            on_start: cmd.clone(),
            on_reload: cmd,
            ..Default::default()
        },
        None,
        None,
    );
    hooks.callback(CallbackAction::OnStart, Role::Replica);
    assert!(wait_for(
        || read(&out).contains("start on_start"),
        Duration::from_secs(5)
    ));
    hooks.callback(CallbackAction::OnReload, Role::Replica);
    assert!(wait_for(
        || read(&out).contains("end on_start") && read(&out).contains("end on_reload"),
        Duration::from_secs(5)
    ));
}

#[tokio::test]
async fn pre_promote_follows_exit_code_and_gets_no_extra_args() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("argv");
    let ok = script(
        dir.path(),
        "ok.sh",
        &format!("echo \"$#:$*\" > {}\nexit 0", out.display()),
    );
    let bad = script(dir.path(), "bad.sh", "exit 3");
    let hooks = CommandHooks::new(
        "batman",
        Callbacks::default(),
        Some(format!("{} x", ok.display())),
        None,
    );
    assert!(hooks.pre_promote().await);
    assert_eq!(read(&out), "1:x\n");
    let hooks = CommandHooks::new(
        "batman",
        Callbacks::default(),
        Some(bad.display().to_string()),
        None,
    );
    assert!(!hooks.pre_promote().await);
    let hooks = CommandHooks::new(
        "batman",
        Callbacks::default(),
        Some("/nonexistent/prog".into()),
        None,
    );
    assert!(!hooks.pre_promote().await);
    let hooks = CommandHooks::new("batman", Callbacks::default(), None, None);
    assert!(
        hooks.pre_promote().await,
        "no pre_promote configured allows promotion"
    );
}

#[tokio::test]
async fn pre_promote_timeout_vetoes_and_kills_the_script() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("after");
    let slow = script(
        dir.path(),
        "slow.sh",
        &format!("sleep 2\necho late > {}", out.display()),
    );
    let hooks = CommandHooks::new(
        "batman",
        Callbacks::default(),
        Some(slow.display().to_string()),
        None,
    )
    .with_pre_promote_timeout(Duration::from_millis(300));
    let t = Instant::now();
    assert!(!hooks.pre_promote().await);
    assert!(t.elapsed() < Duration::from_secs(2));
    std::thread::sleep(Duration::from_millis(2200));
    assert!(!out.exists(), "timed-out pre_promote kept running");
}

#[tokio::test]
async fn before_stop_runs_synchronously_and_ignores_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ran");
    let s = script(
        dir.path(),
        "bs.sh",
        &format!("sleep 0.2\necho \"$#\" > {}\nexit 1", out.display()),
    );
    let hooks = CommandHooks::new(
        "batman",
        Callbacks::default(),
        None,
        Some(s.display().to_string()),
    );
    hooks.before_stop().await;
    assert_eq!(
        read(&out),
        "0\n",
        "before_stop must have finished, with no extra args"
    );
}
