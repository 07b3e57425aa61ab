//! `lmspec launch`: one process per rank of a tensor-parallel run, with the
//! environment MLX's distributed layer reads; rank 0 owns the output.
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use lmspec::engine::distributed::{BACKEND_ENV, RANK_ENV, WORLD_ENV};

#[derive(Debug, clap::Args)]
pub(crate) struct LaunchArgs {
    /// Ranks (processes): one per GPU with NCCL.
    #[arg(short = 'n', long, value_parser = clap::value_parser!(u32).range(1..=64))]
    ranks: u32,
    /// MLX's distributed backend: `ring` (TCP between processes of this
    /// machine; the CPU), `nccl` (one GPU per rank) or `auto` (nccl when
    /// MLX's default device is a GPU, else ring).
    #[arg(long, default_value = "auto", value_parser = ["auto", "ring", "nccl"])]
    backend: String,
    /// Stop every rank after this many seconds (default: no limit).
    #[arg(long)]
    timeout: Option<u64>,
    /// The command each rank runs, after `--` (`lmspec` is this binary).
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// A port on the loopback interface that was free a moment ago.
fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(l.local_addr()?.port())
}

/// Environment entries, name and value.
type Env = Vec<(String, String)>;

/// The environment of every rank (rank-specific entries are added per
/// process), and the folder holding the ring's host file.
fn shared_env(ranks: u32, backend: &str) -> Result<(Env, Option<tempfile::TempDir>)> {
    // Every rank samples with the same seed unless the command sets one.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut env = vec![
        (WORLD_ENV.to_string(), ranks.to_string()),
        (BACKEND_ENV.to_string(), backend.to_string()),
        ("LMSPEC_SEED".to_string(), seed.to_string()),
    ];
    let mut dir = None;
    match backend {
        "ring" => {
            // Ranks on one machine share its cores.
            if std::env::var_os("LMSPEC_THREADS").is_none() {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                let per_rank = (cores / ranks as usize).max(1);
                env.push(("LMSPEC_THREADS".into(), per_rank.to_string()));
            }
            let d = tempfile::tempdir().context("creating the ring's host file folder")?;
            let hosts: Vec<serde_json::Value> = (0..ranks)
                .map(|_| Ok(serde_json::json!([format!("127.0.0.1:{}", free_port()?)])))
                .collect::<Result<_>>()?;
            let file = d.path().join("hosts.json");
            std::fs::write(&file, serde_json::Value::Array(hosts).to_string())?;
            env.push(("MLX_HOSTFILE".into(), file.display().to_string()));
            dir = Some(d);
        }
        _ => {
            env.push(("NCCL_HOST_IP".into(), "127.0.0.1".into()));
            env.push(("NCCL_PORT".into(), free_port()?.to_string()));
        }
    }
    Ok((env, dir))
}

/// The GPU a rank sees under NCCL: the rank-th of `CUDA_VISIBLE_DEVICES`
/// when it is set, else the rank-th device.
fn visible_device(rank: u32) -> Result<String> {
    match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(list) => list
            .split(',')
            .nth(rank as usize)
            .map(|s| s.trim().to_string())
            .ok_or_else(|| {
                anyhow!("CUDA_VISIBLE_DEVICES={list} lists fewer devices than the ranks")
            }),
        Err(_) => Ok(rank.to_string()),
    }
}

fn program(command: &[String]) -> Result<PathBuf> {
    let first = command
        .first()
        .ok_or_else(|| anyhow!("no command to launch"))?;
    if first == "lmspec" {
        return std::env::current_exe().context("finding this lmspec binary");
    }
    Ok(PathBuf::from(first))
}

/// Copies a rank's standard error line by line, each line prefixed with
/// the rank.
fn prefix_lines(rank: u32, from: impl std::io::Read + Send + 'static) {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(|l| l.ok()) {
            let _ = writeln!(std::io::stderr(), "[rank {rank}] {line}");
        }
    });
}

/// How long the other ranks get to end by themselves (and print their own
/// errors) once one has failed.
const GRACE: Duration = Duration::from_secs(3);

/// Stops every rank still running, after `grace` for them to end alone.
fn stop_all(children: &mut [(u32, Child)], grace: Duration) {
    let until = Instant::now() + grace;
    while Instant::now() < until
        && children
            .iter_mut()
            .any(|(_, c)| matches!(c.try_wait(), Ok(None)))
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    for (_, c) in children.iter_mut() {
        let _ = c.kill();
    }
    for (_, c) in children.iter_mut() {
        let _ = c.wait();
    }
}

/// `lmspec ARGS` as `ranks` ranks: ARGS without `--world-size`.
pub(crate) fn relaunch(ranks: u32, args: impl Iterator<Item = String>) -> Result<ExitCode> {
    let mut command = vec!["lmspec".to_string()];
    let mut args = args.peekable();
    while let Some(a) = args.next() {
        if a == "--world-size" {
            args.next();
        } else if !a.starts_with("--world-size=") {
            command.push(a);
        }
    }
    run(LaunchArgs {
        ranks,
        backend: "auto".into(),
        timeout: None,
        command,
    })
}

pub(crate) fn run(args: LaunchArgs) -> Result<ExitCode> {
    let backend = match args.backend.as_str() {
        "auto" if lmspec::engine::runtime::default_device() == "gpu" => "nccl",
        "auto" => "ring",
        b => b,
    };
    let prog = program(&args.command)?;
    let (env, _hosts) = shared_env(args.ranks, backend)?;
    let mut children: Vec<(u32, Child)> = Vec::new();
    for rank in 0..args.ranks {
        let mut cmd = Command::new(&prog);
        cmd.args(&args.command[1..])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env(RANK_ENV, rank.to_string());
        if backend == "nccl" {
            cmd.env("CUDA_VISIBLE_DEVICES", visible_device(rank)?);
        }
        // Rank 0 owns the terminal; the others' output is dropped, their
        // errors kept with their rank.
        if rank > 0 {
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                stop_all(&mut children, Duration::ZERO);
                bail!("cannot start rank {rank} ({}): {e}", prog.display());
            }
        };
        if let Some(err) = child.stderr.take() {
            prefix_lines(rank, err);
        }
        children.push((rank, child));
    }
    let start = Instant::now();
    let mut running: Vec<bool> = vec![true; children.len()];
    loop {
        for (k, (rank, child)) in children.iter_mut().enumerate() {
            if !running[k] {
                continue;
            }
            if let Some(status) = child.try_wait()? {
                running[k] = false;
                if !status.success() {
                    let rank = *rank;
                    stop_all(&mut children, GRACE);
                    bail!(
                        "rank {rank} of {} exited with {status}; the other ranks were stopped",
                        args.ranks
                    );
                }
            }
        }
        if running.iter().all(|r| !r) {
            return Ok(ExitCode::SUCCESS);
        }
        if let Some(t) = args.timeout {
            if start.elapsed() > Duration::from_secs(t) {
                stop_all(&mut children, Duration::ZERO);
                bail!("ranks still running after --timeout {t} s; all were stopped");
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
