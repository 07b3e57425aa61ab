//! The `lmspec` command line.
mod adapter_cmd;
mod cache_cmd;
mod cli;
mod embed_cmd;
mod launch_cmd;
mod serve_cmd;

fn main() -> std::process::ExitCode {
    // A reader that stops early (`lmspec spec list | head -1`) ends the
    // process the way it ends other command-line tools, by SIGPIPE, instead
    // of a panic in `println!` (Rust starts programs with SIGPIPE ignored).
    // SAFETY: restoring the default disposition of one signal before any
    // thread is started has no other effect on the process.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    cli::main()
}
