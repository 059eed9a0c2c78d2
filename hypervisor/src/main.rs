//! `snapvisor`: the command-line front end.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = hypervisor::cli::Cli::parse();
    hypervisor::cli::init_logging(cli.verbose);
    match hypervisor::cli::dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("snapvisor: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
