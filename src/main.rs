//! The `lmspec` command line.
mod bench;
mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
