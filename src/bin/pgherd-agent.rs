//! `pgherd-agent`: the HA daemon run on every PostgreSQL node (thin: parse args, load the config,
//! hand over to `pgherd::agent::run`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Patroni-compatible HA agent for PostgreSQL.
#[derive(Parser, Debug)]
#[command(name = "pgherd-agent", version)]
struct Args {
    /// Node configuration file (patroni.yml-shaped).
    config: Option<PathBuf>,
    /// Only check the configuration file and exit (0 when valid).
    #[arg(long, value_name = "FILE")]
    validate_config: Option<PathBuf>,
    /// Run as the fence process on state file STATE (started by the agent itself when the
    /// host has no watchdog device; see `pgherd::watchdog::fence`).
    #[arg(long, value_name = "STATE", requires = "fence_pgdata", hide = true)]
    fence: Option<PathBuf>,
    /// The data directory the fence guards.
    #[arg(long, value_name = "DIR", hide = true)]
    fence_pgdata: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let (Some(state), Some(pgdata)) = (&args.fence, &args.fence_pgdata) {
        return match pgherd::watchdog::fence::run(state, pgdata) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: fence {}: {e}", state.display());
                ExitCode::FAILURE
            }
        };
    }
    if let Some(path) = args.validate_config {
        return match pgherd::config::AgentConfig::load(&path) {
            Ok(_) => {
                println!("{}: configuration is valid", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        };
    }
    let Some(path) = args.config else {
        eprintln!("error: a configuration file is required (pgherd-agent CONFIG)");
        return ExitCode::from(2);
    };
    let loaded = match pgherd::config::AgentConfig::load_file(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // glibc gives every thread that allocates its own malloc arena (64 MiB reserved, a few
    // hundred KiB touched each); the agent's work is light, so two arenas keep the idle RSS
    // down without contention that matters.
    // SAFETY: called before any other thread exists; mallopt only tunes the allocator.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    pgherd::agent::init_logging(&loaded.config);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("pgherd-agent")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(pgherd::agent::run(loaded, path)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
