//! The `pat` binary: parse arguments, run, print one clear error and exit non-zero on failure.
//! The commands live in `cli/` (binary-only): they parse arguments, call the `pat` library and
//! print; library errors name parameters, and `cli::flag_names` turns those into flags.

#[macro_use]
mod cli;

use std::process::ExitCode;

/// The exit status of a process whose reader closed the pipe (as if killed by SIGPIPE).
const CLOSED_PIPE: u8 = 141;

/// The exit status of a usage error (clap's).
const USAGE: u8 = 2;

fn main() -> ExitCode {
    let parsed = cli::command()
        .try_get_matches()
        .and_then(|m| <cli::Cli as clap::FromArgMatches>::from_arg_matches(&m).map(|a| (a, m)));
    let (args, matches) = match parsed {
        Ok(a) => a,
        // --help, --version and usage errors: clap's text, but a closed or full stdout is not a
        // panic.
        Err(e) => {
            return match e.print() {
                Err(io) if io.kind() == std::io::ErrorKind::BrokenPipe => {
                    ExitCode::from(CLOSED_PIPE)
                }
                Err(io) => {
                    errln!("error: <stdout>: {io}");
                    ExitCode::FAILURE
                }
                Ok(()) => ExitCode::from(e.exit_code().clamp(0, 255) as u8),
            };
        }
    };
    if let Some(msg) = cli::moot_flags(&matches) {
        errln!("error: {msg}\n\nFor more information, try '--help'.");
        return ExitCode::from(USAGE);
    }
    cli::interrupt::install();
    if let Err(e) = cli::check_env() {
        errln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let result = cli::run(args);
    // A signal arrived: its handler removes the scratch (perhaps what just failed) and ends the
    // process by the signal; neither an error nor a status of ours is to race it.
    while cli::interrupt::interrupted() {
        std::thread::park();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of our stdout went away (`pat ... | head -1`): stop quietly.
        Err(e) if cli::common::is_closed_pipe(&e) => ExitCode::from(CLOSED_PIPE),
        // A file's content names its own keys: only argument errors get their flag names.
        Err(e) if e.kind() == pat::error::ErrorKind::BadFile => {
            errln!("error: {e}");
            ExitCode::FAILURE
        }
        // The command line alone is wrong: a usage error, as clap's own.
        Err(pat::Error::Usage(m)) => {
            errln!(
                "error: {}\n\nFor more information, try '--help'.",
                cli::flag_names(&m)
            );
            ExitCode::from(USAGE)
        }
        Err(e) => {
            errln!("error: {}", cli::flag_names(&e.to_string()));
            ExitCode::FAILURE
        }
    }
}
