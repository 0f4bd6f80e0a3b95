//! `pgherd`: the provisioning CLI (thin: parse arguments, run [`pgherd::cli::run`], map the
//! result to an exit code — 0 ok, 1 failure on a host, 2 invalid inventory or usage).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = pgherd::cli::Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(pgherd::cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", pgherd::provision::error_chain(e.as_ref()));
            pgherd::cli::exit_code(&e)
        }
    }
}
