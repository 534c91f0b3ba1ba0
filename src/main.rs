//! The `pat` binary: parse arguments, run, print one clear error and exit non-zero on failure.
//! The commands live in `cli/` (binary-only): they parse arguments, call the `pat` library and
//! print; library errors name parameters, and `cli::flag_names` turns those into flags.

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", cli::flag_names(&e.to_string()));
            std::process::ExitCode::FAILURE
        }
    }
}
