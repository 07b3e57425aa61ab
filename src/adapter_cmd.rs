//! `lmspec lora` (train a LoRA/DoRA adapter, QLoRA on a quantized base)
//! and `lmspec fuse` (fold an adapter into its base), with mlx-lm's
//! options and defaults (`mlx_lm.lora`, `mlx_lm.fuse`).
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use lmspec::engine::adapter::{AdapterConfig, AdapterKind, AdapterSource};
use lmspec::engine::{LoadOptions, Model, WeightPlan};
use lmspec::lm::tune::{self, Features, Optimizer, Schedule, TrainEvent, TrainParams};

#[derive(Debug, clap::Args)]
pub struct LoraArgs {
    /// Model directory, .gguf file, hub id or installed model's name
    /// (default: the default chat model).
    #[arg(long)]
    model: Option<String>,
    /// Folder with train.jsonl, valid.jsonl (and test.jsonl).
    #[arg(long)]
    data: PathBuf,
    /// lora or dora.
    #[arg(long, default_value = "lora")]
    fine_tune_type: String,
    /// adam, adamw or sgd.
    #[arg(long, default_value = "adam")]
    optimizer: String,
    /// The optimizer's settings as JSON, e.g. '{"weight_decay": 0.1}'.
    #[arg(long)]
    optimizer_config: Option<String>,
    /// Leave the prompt out of the loss (completions and chat data).
    #[arg(long)]
    mask_prompt: bool,
    /// Layers (from the last) that take adapters; -1: all.
    #[arg(long, default_value_t = 16, allow_negative_numbers = true)]
    num_layers: i64,
    #[arg(long, default_value_t = 8)]
    rank: i32,
    #[arg(long, default_value_t = 20.0)]
    scale: f32,
    #[arg(long, default_value_t = 0.0)]
    dropout: f32,
    /// Only these linear layers (names within a layer, e.g.
    /// self_attn.q_proj); default: all of them.
    #[arg(long, value_delimiter = ',')]
    keys: Vec<String>,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    #[arg(long, default_value_t = 1000)]
    iters: u64,
    /// Validation batches per evaluation; -1: the whole set.
    #[arg(long, default_value_t = 25, allow_negative_numbers = true)]
    val_batches: i64,
    #[arg(long, default_value_t = 1e-5)]
    learning_rate: f64,
    /// A schedule as mlx-lm writes it, JSON: '{"name": "cosine_decay",
    /// "arguments": [1e-5, 1000], "warmup": 100}'.
    #[arg(long)]
    lr_schedule: Option<String>,
    #[arg(long, default_value_t = 10)]
    steps_per_report: u64,
    #[arg(long, default_value_t = 200)]
    steps_per_eval: u64,
    #[arg(long, default_value_t = 1)]
    grad_accumulation_steps: u64,
    /// Start from these adapter weights (an adapters.safetensors).
    #[arg(long)]
    resume_adapter_file: Option<PathBuf>,
    /// Where the adapter is saved.
    #[arg(long, default_value = "adapters")]
    adapter_path: PathBuf,
    #[arg(long, default_value_t = 100)]
    save_every: u64,
    /// Report the test set's loss and perplexity after training.
    #[arg(long)]
    test: bool,
    #[arg(long, default_value_t = 500, allow_negative_numbers = true)]
    test_batches: i64,
    #[arg(long, default_value_t = 2048)]
    max_seq_length: usize,
    /// Seed of the adapter's initialisation and the batch order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// How quantized weights run: auto (dense on the CPU when memory
    /// allows), quantized (QLoRA on the stored weights) or dense.
    #[arg(long, default_value = "auto")]
    weights: String,
}

#[derive(Debug, clap::Args)]
pub struct FuseArgs {
    /// The base model folder (safetensors).
    #[arg(long)]
    model: String,
    /// The adapter folder.
    #[arg(long, alias = "adapter", default_value = "adapters")]
    adapter_path: PathBuf,
    /// Where the fused model is written.
    #[arg(long, alias = "out", default_value = "fused_model")]
    save_path: PathBuf,
    /// Write every weight dense (and drop the config's quantization).
    #[arg(long)]
    dequantize: bool,
}

fn parse_json(what: &str, text: &Option<String>) -> Result<serde_json::Value> {
    match text {
        None => Ok(serde_json::Value::Null),
        Some(t) => serde_json::from_str(t).with_context(|| format!("{what}: not valid JSON")),
    }
}

fn gb(bytes: usize) -> f64 {
    bytes as f64 / 1e9
}

/// `lmspec lora`.
pub fn lora(
    args: LoraArgs,
    specs: &Option<PathBuf>,
    gguf_file: &Option<String>,
) -> Result<ExitCode> {
    let kind = AdapterKind::parse(&args.fine_tune_type)
        .ok_or_else(|| anyhow!("--fine-tune-type must be lora or dora"))?;
    let optimizer = Optimizer::from_name(
        &args.optimizer,
        &parse_json("--optimizer-config", &args.optimizer_config)?,
    )
    .map_err(|e| anyhow!("--optimizer-config: {e}"))?;
    let schedule = match &args.lr_schedule {
        None => Schedule::Constant(args.learning_rate as f32),
        Some(_) => Schedule::from_json(&parse_json("--lr-schedule", &args.lr_schedule)?)
            .map_err(|e| anyhow!("--lr-schedule: {e}"))?,
    };
    if args.rank < 1 {
        bail!("--rank must be at least 1");
    }
    if !(0.0..1.0).contains(&args.dropout) {
        bail!("--dropout must be in [0, 1)");
    }
    let config = AdapterConfig {
        kind,
        rank: args.rank,
        scale: args.scale,
        dropout: args.dropout,
        num_layers: args.num_layers,
        keys: (!args.keys.is_empty()).then(|| args.keys.clone()),
    };
    let source = AdapterSource::New {
        config,
        seed: args.seed,
    };
    eprintln!("Loading pretrained model");
    let lm = crate::cli::load_language_model_with(
        &args.model,
        gguf_file,
        &args.weights,
        specs,
        Some(source),
    )?;
    let adapter = lm
        .model
        .adapter
        .as_ref()
        .ok_or_else(|| anyhow!("no adapter attached"))?;
    if let Some(file) = &args.resume_adapter_file {
        resume(adapter, file)?;
        eprintln!("Loading fine-tuned weights from {}", file.display());
    }
    let trainable: usize = adapter.params().iter().map(|a| a.size()).sum();
    eprintln!(
        "Trainable parameters: {:.3}M in {} linear layers ({})",
        trainable as f64 / 1e6,
        adapter.slots.len(),
        kind.name()
    );
    eprintln!("Loading datasets");
    let data = tune::data::load(&lm, &args.data, &Features::default(), args.mask_prompt)?;
    eprintln!(
        "train: {} examples ({} tokens), valid: {}, test: {}",
        data.train.len(),
        data.train.tokens(),
        data.valid.len(),
        data.test.len()
    );
    let record = serde_json::json!({
        "model": args.model,
        "data": args.data,
        "optimizer": args.optimizer,
        "learning_rate": args.learning_rate,
        "lr_schedule": parse_json("--lr-schedule", &args.lr_schedule)?,
        "batch_size": args.batch_size,
        "iters": args.iters,
        "max_seq_length": args.max_seq_length,
        "mask_prompt": args.mask_prompt,
        "seed": args.seed,
        "trainer": "lmspec",
    });
    let params = TrainParams {
        optimizer,
        schedule,
        batch_size: args.batch_size,
        iters: args.iters,
        val_batches: args.val_batches,
        steps_per_report: args.steps_per_report,
        steps_per_eval: args.steps_per_eval,
        save_every: args.save_every,
        max_seq_length: args.max_seq_length,
        grad_accumulation_steps: args.grad_accumulation_steps,
        seed: args.seed,
        adapter_path: Some(args.adapter_path.clone()),
        record,
    };
    let iters = args.iters;
    let started = std::time::Instant::now();
    let mut on_event = |e: &TrainEvent| {
        match e {
        TrainEvent::Step { iteration, loss } => {
            eprint!("\r[{iteration}/{iters}] loss {loss:.3}   ");
        }
        TrainEvent::Report(r) => eprintln!(
            "\rIter {}: train loss {:.3}, learning rate {:.3e}, it/s {:.3}, tokens/s {:.1}, trained tokens {}, peak memory {:.3} GB",
            r.iteration,
            r.loss,
            r.learning_rate,
            r.iterations_per_second,
            r.tokens_per_second,
            r.trained_tokens,
            gb(r.peak_memory_bytes)
        ),
        TrainEvent::Validation { iteration, loss, seconds } => {
            eprintln!("\rIter {iteration}: val loss {loss:.3}, val took {seconds:.3}s")
        }
        TrainEvent::Saved(p) => eprintln!("\rSaved adapter weights to {}", p.display()),
    }
    };
    tune::train(&lm.model, &data, &params, &mut on_event)?;
    eprintln!(
        "Trained in {:.1}s; adapter and loss_curve.svg in {}",
        started.elapsed().as_secs_f64(),
        args.adapter_path.display()
    );
    if args.test {
        if data.test.is_empty() {
            bail!("--test: {} is empty or missing", data.test.file.display());
        }
        let loss = tune::evaluate(
            &lm.model,
            &data.test,
            args.batch_size,
            args.test_batches,
            args.max_seq_length,
        )?;
        println!("Test loss {loss:.3}, Test ppl {:.3}.", loss.exp());
    }
    Ok(ExitCode::SUCCESS)
}

/// Loads `file`'s arrays into the new adapter (names and shapes must
/// match).
fn resume(adapter: &lmspec::engine::adapter::Attached, file: &Path) -> Result<()> {
    let loaded: std::collections::HashMap<String, mlx_rs::Array> =
        lmspec::engine::weights::load_safetensors_file(file)?
            .into_iter()
            .collect();
    let names = adapter.param_names();
    let current = adapter.params();
    let mut arrays = Vec::with_capacity(names.len());
    for (name, now) in names.iter().zip(&current) {
        let a = loaded
            .get(name)
            .ok_or_else(|| anyhow!("{}: has no {name}", file.display()))?;
        if a.shape() != now.shape() {
            bail!(
                "{}: {name} has shape {:?}, the adapter {:?} (check --rank, --num-layers, --fine-tune-type)",
                file.display(),
                a.shape(),
                now.shape()
            );
        }
        arrays.push(a.clone());
    }
    if let Some(extra) = loaded.keys().find(|k| !names.contains(k)) {
        bail!(
            "{}: {extra} is not a parameter of this adapter",
            file.display()
        );
    }
    adapter.set_params(&arrays);
    Ok(())
}

/// `lmspec fuse`.
pub fn fuse(
    args: FuseArgs,
    specs: &Option<PathBuf>,
    gguf_file: &Option<String>,
) -> Result<ExitCode> {
    let base = crate::cli::model_path(&args.model, gguf_file)?;
    let opts: LoadOptions =
        crate::cli::load_options(specs, WeightPlan::AsStored)?.with_adapter(&args.adapter_path);
    let model = Model::load(&base, &opts)?;
    let adapter = model
        .adapter
        .as_ref()
        .ok_or_else(|| anyhow!("no adapter attached"))?;
    lmspec::engine::adapter::fuse::fuse_into(&base, adapter, &args.save_path, args.dequantize)?;
    eprintln!(
        "Fused {} layers of {} into {}",
        adapter.slots.len(),
        args.adapter_path.display(),
        args.save_path.display()
    );
    Ok(ExitCode::SUCCESS)
}
