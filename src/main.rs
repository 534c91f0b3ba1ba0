//! The `pat` binary: parse arguments, run, print one clear error and exit non-zero on failure.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = pat::cli::Cli::parse();
    match pat::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
