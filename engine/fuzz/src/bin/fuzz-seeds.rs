//! Writes every target's seeds into `DIR/<target>/` (the corpus folders
//! `make fuzz` starts from).
use std::path::PathBuf;

fn main() -> std::process::ExitCode {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: fuzz-seeds DIR");
        return std::process::ExitCode::from(2);
    };
    for (name, _) in lmspec_fuzz::TARGETS {
        let sub = dir.join(name);
        let written = std::fs::create_dir_all(&sub).and_then(|_| {
            for (k, seed) in lmspec_fuzz::seeds(name).iter().enumerate() {
                std::fs::write(sub.join(format!("seed-{k:03}")), seed)?;
            }
            Ok(())
        });
        if let Err(e) = written {
            eprintln!("{}: {e}", sub.display());
            return std::process::ExitCode::FAILURE;
        }
    }
    std::process::ExitCode::SUCCESS
}
