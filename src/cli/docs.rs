//! `pgherd completions SHELL` and `pgherd man`: shell completions and manual pages generated
//! from the clap definitions of [`super::Cli`], so they cannot drift from the verbs and flags
//! the binary really takes. Nothing here reads an inventory or touches a host.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, CommandFactory};
use clap_complete::Shell;

#[derive(Args, Debug, Clone)]
pub struct CompletionsArgs {
    /// The shell to complete for (the script goes to stdout).
    #[arg(value_enum)]
    pub shell: Shell,
}

#[derive(Args, Debug, Clone)]
pub struct ManArgs {
    /// Write pgherd.1 and one page per subcommand (pgherd-plan.1, pgherd-lab-up.1, ...) into
    /// this directory instead of printing pgherd.1 to stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The command tree both generators read: the binary's own, under the name it is installed as.
fn command() -> clap::Command {
    super::Cli::command().name("pgherd").bin_name("pgherd")
}

/// Writes `bytes` to stdout. A reader that stops early (`pgherd man | head`) is no error:
/// the output is rendered in memory first, since the generators write unbuffered and
/// `clap_complete` panics on a failed write.
fn to_stdout(bytes: &[u8], what: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).with_context(|| format!("writing {what}"))
        }
        _ => Ok(()),
    }
}

/// Prints the completion script for `a.shell`.
pub fn completions(a: &CompletionsArgs) -> anyhow::Result<()> {
    let mut script = Vec::new();
    clap_complete::generate(a.shell, &mut command(), "pgherd", &mut script);
    to_stdout(&script, "the completion script")
}

/// One page: the title is the (sub)command's display name (`pgherd-lab-up`), the source line
/// names pgherd's version on every page, not only on the top one.
fn page(cmd: clap::Command) -> clap_mangen::Man {
    clap_mangen::Man::new(cmd).source(format!("pgherd {}", env!("CARGO_PKG_VERSION")))
}

/// Prints pgherd.1, or writes every page into `--out` and lists the files written.
pub fn man(a: &ManArgs) -> anyhow::Result<()> {
    match &a.out {
        None => {
            let mut roff = Vec::new();
            page(command())
                .render(&mut roff)
                .context("rendering the manual page")?;
            to_stdout(&roff, "the manual page")?;
        }
        Some(dir) => {
            for p in write_pages(dir)? {
                println!("{}", p.display());
            }
        }
    }
    Ok(())
}

/// Writes pgherd.1 and a page for every (nested) subcommand into `dir`; returns their paths,
/// the top page last (as `clap_mangen::generate_to` orders them, whose walk this is, with the
/// paths kept).
fn write_pages(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    fn walk(cmd: clap::Command, dir: &Path, pages: &mut Vec<PathBuf>) -> std::io::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned() {
            walk(sub, dir, pages)?;
        }
        pages.push(page(cmd).generate_to(dir)?);
        Ok(())
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Built once at the top, so that every subcommand carries its full display name
    // (`pgherd-lab-up`) and the file names say where a page belongs; `help` is no page.
    let mut cmd = command().disable_help_subcommand(true);
    cmd.build();
    let mut pages = Vec::new();
    walk(cmd, dir, &mut pages)
        .with_context(|| format!("writing manual pages into {}", dir.display()))?;
    Ok(pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_subcommand_gets_its_own_page() {
        let dir = tempfile::tempdir().unwrap();
        let pages = write_pages(dir.path()).unwrap();
        let names: Vec<String> = pages
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for want in [
            "pgherd.1",
            "pgherd-plan.1",
            "pgherd-apply.1",
            "pgherd-status.1",
            "pgherd-lab-up.1",
            "pgherd-completions.1",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
        }
    }
}
