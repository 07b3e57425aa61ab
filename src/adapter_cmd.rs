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
    /// mlx-lm's YAML config (`-c lora_config.yaml`): its keys as the
    /// options below (`lora_parameters`, `optimizer_config`,
    /// `lr_schedule`); options given here win.
    #[arg(short = 'c', long)]
    config: Option<PathBuf>,
    /// Model directory, .gguf file, hub id or installed model's name
    /// (default: the default chat model).
    #[arg(long)]
    model: Option<String>,
    /// Folder with train.jsonl, valid.jsonl (and test.jsonl).
    #[arg(long)]
    data: Option<PathBuf>,
    /// lora (default) or dora.
    #[arg(long)]
    fine_tune_type: Option<String>,
    /// adam (default), adamw or sgd.
    #[arg(long)]
    optimizer: Option<String>,
    /// The optimizer's settings as JSON, e.g. '{"weight_decay": 0.1}'.
    #[arg(long)]
    optimizer_config: Option<String>,
    /// Leave the prompt out of the loss (completions and chat data).
    #[arg(long)]
    mask_prompt: bool,
    /// Layers (from the last) that take adapters; -1: all (default 16).
    #[arg(long, allow_negative_numbers = true)]
    num_layers: Option<i64>,
    /// Adapter rank (default 8).
    #[arg(long)]
    rank: Option<i32>,
    /// Scale of the low-rank update (default 20).
    #[arg(long)]
    scale: Option<f32>,
    /// Dropout on the adapter's input while training (default 0).
    #[arg(long)]
    dropout: Option<f32>,
    /// Only these linear layers (names within a layer, e.g.
    /// self_attn.q_proj); default: all of them.
    #[arg(long, value_delimiter = ',')]
    keys: Vec<String>,
    /// Default 4.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Default 1000.
    #[arg(long)]
    iters: Option<u64>,
    /// Validation batches per evaluation; -1: the whole set (default 25).
    #[arg(long, allow_negative_numbers = true)]
    val_batches: Option<i64>,
    /// Default 1e-5.
    #[arg(long)]
    learning_rate: Option<f64>,
    /// A schedule as mlx-lm writes it, JSON: '{"name": "cosine_decay",
    /// "arguments": [1e-5, 1000], "warmup": 100}'.
    #[arg(long)]
    lr_schedule: Option<String>,
    /// Default 10.
    #[arg(long)]
    steps_per_report: Option<u64>,
    /// Default 200.
    #[arg(long)]
    steps_per_eval: Option<u64>,
    /// Default 1.
    #[arg(long)]
    grad_accumulation_steps: Option<u64>,
    /// Start from these adapter weights (an adapters.safetensors).
    #[arg(long)]
    resume_adapter_file: Option<PathBuf>,
    /// Where the adapter is saved (default: adapters).
    #[arg(long)]
    adapter_path: Option<PathBuf>,
    /// Default 100.
    #[arg(long)]
    save_every: Option<u64>,
    /// Report the test set's loss and perplexity after training.
    #[arg(long)]
    test: bool,
    /// Default 500; -1: the whole set.
    #[arg(long, allow_negative_numbers = true)]
    test_batches: Option<i64>,
    /// Default 2048.
    #[arg(long)]
    max_seq_length: Option<usize>,
    /// Seed of the adapter's initialisation and the batch order (default 0).
    #[arg(long)]
    seed: Option<u64>,
    /// How quantized weights run: auto (dense on the CPU when memory
    /// allows; the default), quantized (QLoRA on the stored weights) or
    /// dense.
    #[arg(long)]
    weights: Option<String>,
}

/// The settings of a run: the command line, else the config file, else
/// mlx-lm's defaults.
struct Settings {
    model: Option<String>,
    data: PathBuf,
    fine_tune_type: String,
    optimizer: String,
    optimizer_config: serde_json::Value,
    mask_prompt: bool,
    num_layers: i64,
    rank: i32,
    scale: f32,
    dropout: f32,
    keys: Option<Vec<String>>,
    batch_size: usize,
    iters: u64,
    val_batches: i64,
    learning_rate: f64,
    lr_schedule: serde_json::Value,
    steps_per_report: u64,
    steps_per_eval: u64,
    grad_accumulation_steps: u64,
    resume_adapter_file: Option<PathBuf>,
    adapter_path: PathBuf,
    save_every: u64,
    test: bool,
    test_batches: i64,
    max_seq_length: usize,
    seed: u64,
    weights: String,
}

/// mlx-lm config keys lmspec reads; others are reported and ignored.
const CONFIG_KEYS: &[&str] = &[
    "model",
    "train",
    "data",
    "fine_tune_type",
    "optimizer",
    "optimizer_config",
    "mask_prompt",
    "num_layers",
    "batch_size",
    "iters",
    "val_batches",
    "learning_rate",
    "steps_per_report",
    "steps_per_eval",
    "resume_adapter_file",
    "adapter_path",
    "save_every",
    "test",
    "test_batches",
    "max_seq_length",
    "grad_accumulation_steps",
    "lr_schedule",
    "lora_parameters",
    "seed",
    "weights",
    "grad_checkpoint",
];

fn read_config(file: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    let text = std::fs::read_to_string(file).with_context(|| format!("{}", file.display()))?;
    let yaml: serde_yaml::Value = serde_yaml::from_str(&text)
        .with_context(|| format!("{}: not valid YAML", file.display()))?;
    let json = serde_json::to_value(yaml)
        .with_context(|| format!("{}: not a plain YAML mapping", file.display()))?;
    match json {
        serde_json::Value::Object(map) => Ok(map),
        serde_json::Value::Null => Ok(serde_json::Map::new()),
        _ => bail!("{}: expected a mapping of options", file.display()),
    }
}

impl LoraArgs {
    fn settings(&self) -> Result<Settings> {
        let map = match &self.config {
            Some(f) => read_config(f)?,
            None => serde_json::Map::new(),
        };
        let file = self.config.as_deref().unwrap_or(Path::new("-c"));
        for k in map.keys() {
            if !CONFIG_KEYS.contains(&k.as_str()) {
                eprintln!(
                    "{}: {k}: not an option lmspec reads; ignored",
                    file.display()
                );
            }
        }
        if map.get("grad_checkpoint").and_then(|v| v.as_bool()) == Some(true) {
            bail!(
                "{}: grad_checkpoint: not supported by lmspec",
                file.display()
            );
        }
        let lp = map.get("lora_parameters").cloned().unwrap_or_default();
        fn get<T: serde::de::DeserializeOwned>(
            file: &Path,
            v: Option<&serde_json::Value>,
            key: &str,
        ) -> Result<Option<T>> {
            match v {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => serde_json::from_value(v.clone())
                    .map(Some)
                    .with_context(|| format!("{}: {key}: {v} has the wrong type", file.display())),
            }
        }
        let cfg = |key: &str| map.get(key);
        macro_rules! pick {
            ($cli:expr, $key:expr, $default:expr) => {
                match $cli.clone() {
                    Some(v) => v,
                    None => get(file, cfg($key), $key)?.unwrap_or($default),
                }
            };
        }
        macro_rules! pick_lp {
            ($cli:expr, $key:expr, $default:expr) => {
                match $cli.clone() {
                    Some(v) => v,
                    None => get(file, lp.get($key), &format!("lora_parameters.{}", $key))?
                        .unwrap_or($default),
                }
            };
        }
        let optimizer: String = pick!(self.optimizer, "optimizer", "adam".to_string());
        let optimizer_config = match &self.optimizer_config {
            Some(_) => parse_json("--optimizer-config", &self.optimizer_config)?,
            // mlx-lm's config keys the settings by optimizer name.
            None => cfg("optimizer_config")
                .and_then(|o| o.get(optimizer.to_lowercase()))
                .cloned()
                .unwrap_or(serde_json::Value::Null),
        };
        let lr_schedule = match &self.lr_schedule {
            Some(_) => parse_json("--lr-schedule", &self.lr_schedule)?,
            None => cfg("lr_schedule")
                .cloned()
                .unwrap_or(serde_json::Value::Null),
        };
        let keys = if self.keys.is_empty() {
            get::<Vec<String>>(file, lp.get("keys"), "lora_parameters.keys")?
        } else {
            Some(self.keys.clone())
        };
        let flag = |cli: bool, key: &str| -> Result<bool> {
            Ok(cli || get::<bool>(file, cfg(key), key)?.unwrap_or(false))
        };
        Ok(Settings {
            model: match &self.model {
                Some(m) => Some(m.clone()),
                None => get(file, cfg("model"), "model")?,
            },
            data: match &self.data {
                Some(d) => d.clone(),
                None => get(file, cfg("data"), "data")?.ok_or_else(|| {
                    anyhow!("--data: a folder with train.jsonl and valid.jsonl is needed")
                })?,
            },
            fine_tune_type: pick!(self.fine_tune_type, "fine_tune_type", "lora".to_string()),
            optimizer,
            optimizer_config,
            mask_prompt: flag(self.mask_prompt, "mask_prompt")?,
            num_layers: pick!(self.num_layers, "num_layers", 16),
            rank: pick_lp!(self.rank, "rank", 8),
            scale: pick_lp!(self.scale, "scale", 20.0),
            dropout: pick_lp!(self.dropout, "dropout", 0.0),
            keys,
            batch_size: pick!(self.batch_size, "batch_size", 4),
            iters: pick!(self.iters, "iters", 1000),
            val_batches: pick!(self.val_batches, "val_batches", 25),
            learning_rate: pick!(self.learning_rate, "learning_rate", 1e-5),
            lr_schedule,
            steps_per_report: pick!(self.steps_per_report, "steps_per_report", 10),
            steps_per_eval: pick!(self.steps_per_eval, "steps_per_eval", 200),
            grad_accumulation_steps: pick!(
                self.grad_accumulation_steps,
                "grad_accumulation_steps",
                1
            ),
            resume_adapter_file: match &self.resume_adapter_file {
                Some(f) => Some(f.clone()),
                None => get(file, cfg("resume_adapter_file"), "resume_adapter_file")?,
            },
            adapter_path: pick!(self.adapter_path, "adapter_path", PathBuf::from("adapters")),
            save_every: pick!(self.save_every, "save_every", 100),
            test: flag(self.test, "test")?,
            test_batches: pick!(self.test_batches, "test_batches", 500),
            max_seq_length: pick!(self.max_seq_length, "max_seq_length", 2048),
            seed: pick!(self.seed, "seed", 0),
            weights: pick!(self.weights, "weights", "auto".to_string()),
        })
    }
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
    let args = args.settings()?;
    let kind = AdapterKind::parse(&args.fine_tune_type).ok_or_else(|| {
        anyhow!(
            "fine_tune_type must be lora or dora, not {}",
            args.fine_tune_type
        )
    })?;
    let optimizer = Optimizer::from_name(&args.optimizer.to_lowercase(), &args.optimizer_config)
        .map_err(|e| anyhow!("optimizer_config: {e}"))?;
    let schedule = match &args.lr_schedule {
        serde_json::Value::Null => Schedule::Constant(args.learning_rate as f32),
        s => Schedule::from_json(s).map_err(|e| anyhow!("lr_schedule: {e}"))?,
    };
    if args.rank < 1 {
        bail!("rank must be at least 1");
    }
    if !(0.0..1.0).contains(&args.dropout) {
        bail!("dropout must be in [0, 1)");
    }
    let config = AdapterConfig {
        kind,
        rank: args.rank,
        scale: args.scale,
        dropout: args.dropout,
        num_layers: args.num_layers,
        keys: args.keys.clone(),
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
        "Trainable parameters: {:.3}M in {} layers ({}); base weights {}",
        trainable as f64 / 1e6,
        adapter.slots.len(),
        kind.name(),
        if lm.model.dequantized {
            "dequantized to float32 (--weights auto/dense)"
        } else {
            "as stored"
        }
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
        "optimizer_config": args.optimizer_config,
        "learning_rate": args.learning_rate,
        "lr_schedule": args.lr_schedule,
        "batch_size": args.batch_size,
        "iters": args.iters,
        "max_seq_length": args.max_seq_length,
        "grad_accumulation_steps": args.grad_accumulation_steps,
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
    if lmspec::engine::model::is_gguf(&base) {
        bail!(
            "fuse: {} is a GGUF file; fusing writes an mlx-lm model folder and needs a safetensors model folder as the base",
            base.display()
        );
    }
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
