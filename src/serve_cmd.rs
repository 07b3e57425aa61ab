//! `lmspec serve`: loads the model (and an embedder), sizes the cache
//! budget and runs the HTTP server (`lmspec-serve`).
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Context, Result};
use lmspec::engine::WeightPlan;

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Model directory, .gguf file, hub id ORG/NAME[@REVISION], or an
    /// installed model's name (default: the default chat model).
    #[arg(long)]
    model: Option<String>,
    /// Attach this LoRA/DoRA adapter folder to the model.
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0 picks a free one; the listening line says which).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require this key (`Authorization: Bearer KEY` or `x-api-key: KEY`).
    #[arg(long)]
    api_key: Option<String>,
    /// Also serve embeddings from this encoder folder or hub id.
    #[arg(long)]
    embedding_model: Option<String>,
    /// Also serve `/v1/rerank` with this cross-encoder folder or hub id.
    #[arg(long)]
    rerank_model: Option<String>,
    /// Most sequences decoding together.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1024))]
    max_batch: u32,
    /// Megabytes of KV cache the running sequences may reserve (default:
    /// 80% of the memory available after loading).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    kv_budget_mb: Option<u64>,
    /// Completion tokens of a request that sets no limit.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    default_max_tokens: u32,
    /// Prefilled prompts kept for reuse by later requests.
    #[arg(long, default_value_t = 8)]
    prompt_cache_entries: usize,
    /// Weight representation: auto, quantized (as stored) or dense.
    #[arg(long, default_value = "auto", value_parser = ["auto", "quantized", "dense"])]
    weights: String,
}

/// Memory the system has available, from /proc/meminfo.
fn available_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn run(
    args: ServeArgs,
    specs: &Option<PathBuf>,
    gguf_file: &Option<String>,
) -> Result<ExitCode> {
    // The command line restores SIGPIPE's default (`main.rs`) so that a
    // closed pipe ends a listing quietly; a server must not die that way:
    // a vectored write to a client that reset its connection raises it.
    // SAFETY: setting one signal's disposition has no other effect on the
    // process.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let formats = lmspec::lm::tools::ToolFormat::load_all(&crate::cli::spec_root(specs))?;
    // The formats live as long as the server.
    let formats: &'static [lmspec::lm::tools::ToolFormat] = Box::leak(formats.into_boxed_slice());
    let engine_opts = lmspec::serve::EngineOptions {
        max_batch: args.max_batch as usize,
        kv_budget: 0,
        default_max_tokens: args.default_max_tokens as usize,
        prompt_cache_entries: args.prompt_cache_entries,
    };
    let (specs, gguf_file) = (specs.clone(), gguf_file.clone());
    let adapter = args
        .adapter
        .clone()
        .map(lmspec::engine::adapter::AdapterSource::Dir);
    let (model, weights, embedding, rerank, budget_mb) = (
        args.model.clone(),
        args.weights.clone(),
        args.embedding_model.clone(),
        args.rerank_model.clone(),
        args.kv_budget_mb,
    );
    let summary = format!(
        "lmspec serve: model '{}', batch up to {}{}",
        args.model.as_deref().unwrap_or("default"),
        args.max_batch,
        if args.api_key.is_some() {
            ", API key required"
        } else {
            ""
        }
    );
    // Everything MLX touches is made on the engine thread.
    let load = move || -> Result<lmspec::serve::engine::Engine, String> {
        let load = || -> Result<lmspec::serve::engine::Engine> {
            let lm = crate::cli::load_language_model_with(
                &model,
                &gguf_file,
                &weights,
                &specs,
                adapter.clone(),
            )?;
            let embedder = match &embedding {
                Some(m) => {
                    let dir = crate::cli::model_path(m, &gguf_file)?;
                    let opts = crate::cli::load_options(&specs, WeightPlan::AsStored)?;
                    Some(
                        lmspec::lm::Embedder::load(&dir, &opts)
                            .with_context(|| format!("--embedding-model {m}"))?,
                    )
                }
                None => None,
            };
            let reranker = match &rerank {
                Some(m) => {
                    let dir = crate::cli::model_path(m, &gguf_file)?;
                    let opts = crate::cli::load_options(&specs, WeightPlan::AsStored)?;
                    Some(
                        lmspec::lm::Reranker::load(&dir, &opts)
                            .with_context(|| format!("--rerank-model {m}"))?,
                    )
                }
                None => None,
            };
            // The budget: given, or 80% of what is available once loaded.
            let kv_budget = match budget_mb {
                Some(mb) => mb * 1_000_000,
                None => available_bytes().map_or(4_000_000_000, |b| b / 10 * 8),
            };
            eprintln!("{summary}, KV budget {:.0} MB", kv_budget as f64 / 1e6);
            let opts = lmspec::serve::EngineOptions {
                kv_budget,
                ..engine_opts
            };
            Ok(lmspec::serve::engine::Engine::new(
                lm, embedder, reranker, formats, opts,
            )?)
        };
        load().map_err(|e| format!("{e:#}"))
    };
    let opts = lmspec::serve::ServeOptions {
        host: args.host,
        port: args.port,
        api_key: args.api_key,
        model_id: args.model.unwrap_or_else(|| "default".into()),
        embedding_id: args.embedding_model,
        rerank_id: args.rerank_model,
    };
    lmspec::serve::serve(load, opts).map_err(|e| anyhow!("{e}"))?;
    Ok(ExitCode::SUCCESS)
}
