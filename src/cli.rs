//! Command definitions and their implementations.
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use lmspec::engine::{runtime, LoadOptions, Model, SpecLibrary, WeightPlan};
use lmspec::spec::library::SpecRoot;
use lmspec::spec::render;
use mlx_rs::Array;

#[derive(Debug, Parser)]
#[command(
    name = "lmspec",
    version,
    about = "Language-model architectures as data, run on MLX"
)]
struct Cli {
    /// Spec folder (default: $LMSPEC_SPECS, else the library built into the binary).
    #[arg(long, global = true)]
    specs: Option<PathBuf>,
    /// For a hub id of a GGUF repository: the file, or a quantization
    /// such as Q4_K_M (default: the only .gguf, else Q4_K_M, Q4_0, ...).
    #[arg(long, global = true)]
    gguf_file: Option<String>,
    /// Run the command as N ranks of a tensor-parallel run (`lmspec launch
    /// -n N -- lmspec COMMAND ...` with the default backend).
    #[arg(long, global = true, value_parser = clap::value_parser!(u32).range(1..=64))]
    world_size: Option<u32>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Report MLX, backend, BLAS, specs and the default model.
    Doctor,
    /// Work with spec files.
    #[command(subcommand)]
    Spec(SpecCommand),
    /// Run one forward pass and print the logits' shape and last-row top-5.
    #[command(allow_negative_numbers = true)]
    Logits {
        /// Model directory, .gguf file or hub id ORG/NAME[@REVISION].
        #[arg(long)]
        model: String,
        /// Comma-separated token ids.
        #[arg(long, value_delimiter = ',', required = true)]
        tokens: Vec<i32>,
        /// Spec name or file (default: chosen by the config's model_type).
        #[arg(long)]
        spec: Option<String>,
    },
    /// Generate text (chat-templated by default) with a model.
    #[command(allow_negative_numbers = true)]
    Generate {
        #[command(flatten)]
        gen: GenArgs,
        /// The prompt (a user message unless --raw; default: the model's
        /// registry entry's default prompt).
        #[arg(long, short)]
        prompt: Option<String>,
        /// Feed the prompt as is, without the chat template.
        #[arg(long)]
        raw: bool,
        /// Continue a cache `lmspec cache-prompt` or mlx-lm's
        /// `cache_prompt` wrote: the prompt is the text that follows it.
        #[arg(long)]
        prompt_cache: Option<PathBuf>,
        /// A smaller model of the same vocabulary that drafts tokens for
        /// the model to verify (speculative decoding).
        #[arg(long)]
        draft_model: Option<String>,
        /// Tokens the draft model proposes per step.
        #[arg(long, default_value_t = 2, value_parser = args::at_least_one)]
        num_draft_tokens: usize,
        /// An image (PNG or JPEG) for a vision-language model; repeat for
        /// several. Chat-templated prompts get one image entry each before
        /// the text; with --raw the prompt writes the placeholders itself.
        #[arg(long = "image", value_name = "PATH")]
        images: Vec<PathBuf>,
        /// A video for a vision-language model that takes videos: a folder
        /// of frame images (in name order) or the frame files separated by
        /// commas, already sampled; repeat for several. Chat-templated
        /// prompts get one video entry each after the images.
        #[arg(long = "video", value_name = "FRAMES", value_parser = parse_video)]
        videos: Vec<Vec<PathBuf>>,
        /// The draft model's weight representation (as --weights).
        #[arg(long, default_value = "auto", value_parser = ["auto", "quantized", "dense"])]
        draft_weights: String,
    },
    /// Process a prompt once and save its KV cache for `generate
    /// --prompt-cache` (mlx-lm's layout; mlx-lm reads it too).
    #[command(allow_negative_numbers = true)]
    CachePrompt(crate::cache_cmd::CachePromptArgs),
    /// Chat on the terminal: one user message per line, empty line or EOF ends.
    #[command(allow_negative_numbers = true)]
    Chat {
        #[command(flatten)]
        gen: GenArgs,
        /// An image (PNG or JPEG) for a vision-language model, shown with
        /// the first message; repeat for several.
        #[arg(long = "image", value_name = "PATH")]
        images: Vec<PathBuf>,
        /// A video (a folder of frame images, or frame files separated by
        /// commas) shown with the first message; repeat for several.
        #[arg(long = "video", value_name = "FRAMES", value_parser = parse_video)]
        videos: Vec<Vec<PathBuf>>,
    },
    /// Sentence embeddings from an encoder folder (one JSON array per text,
    /// or --out FILE.npy|.jsonl).
    Embed(crate::embed_cmd::EmbedArgs),
    /// Rank documents by relevance to a query with a cross-encoder (JSON
    /// lines: index, score, document; best first).
    Rerank(crate::embed_cmd::RerankArgs),
    /// Measure load, prefill and decode speed (optionally against mlx-lm).
    Bench {
        /// Model directory, .gguf file or hub id (default: the default model).
        #[arg(long)]
        model: Option<String>,
        #[arg(long, default_value_t = 128)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 64)]
        gen_tokens: usize,
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// Weight representation: auto (as stored where lmspec's CPU
        /// kernels run them, else dense float32 on CPU when memory allows),
        /// quantized (as stored) or dense.
        #[arg(long, default_value = "auto")]
        weights: String,
        /// Also run another engine on the same prompt and weights: `mlx-lm`,
        /// or `llama.cpp` (a GGUF; llama-cpp-python from
        /// `.ci/llama-cpp-env.sh`, same thread count); the two engines'
        /// repeats alternate.
        #[arg(long)]
        against: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Also report the host time each primitive takes to build its part
        /// of the graph, per forward call (`build_us_by_op`).
        #[arg(long)]
        profile_ops: bool,
    },
    /// Run a command on every rank of a tensor-parallel run (one process per rank)
    ///
    /// One process per rank (per GPU with NCCL); rank 0's output is shown,
    /// the others' errors prefixed with their rank; when one rank fails the
    /// others are stopped (`lmspec launch -n 2 -- lmspec generate --model
    /// DIR ...`).
    Launch(crate::launch_cmd::LaunchArgs),
    /// Serve a model over HTTP: OpenAI- and Anthropic-compatible APIs with
    /// continuous batching.
    Serve(crate::serve_cmd::ServeArgs),
    /// Train a LoRA or DoRA adapter (QLoRA on a quantized base), as mlx_lm.lora.
    Lora(crate::adapter_cmd::LoraArgs),
    /// Fold an adapter into its base model: a folder mlx-lm loads.
    Fuse(crate::adapter_cmd::FuseArgs),
    /// Porting tools: node-by-node diffs, spec drafts, coverage.
    #[command(subcommand)]
    Port(PortCommand),
    /// Check golden cases (default: every case under goldens/) against the engine.
    Golden {
        /// Case folders to check.
        cases: Vec<PathBuf>,
    },
    /// Fetch a model from the hub into the cache (re-checking cached files).
    Pull {
        /// Hub id ORG/NAME[@REVISION].
        id: String,
    },
    /// List the models in the hub cache: size, revisions, claiming spec.
    Ls,
    /// Remove a model (every revision) from the hub cache.
    Rm {
        /// Hub id ORG/NAME.
        id: String,
    },
}

#[derive(Debug, clap::Args)]
pub(crate) struct GenArgs {
    /// Model directory, .gguf file, hub id ORG/NAME[@REVISION], or an
    /// installed model's name: smollm2-135m (the default), gemma3-270m.
    #[arg(long)]
    model: Option<String>,
    /// Attach this LoRA/DoRA adapter folder (mlx-lm's or PEFT's files).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Offer these tools (a JSON list of OpenAI-style tool specs); calls
    /// the model makes are shown, not executed.
    #[arg(long)]
    tools: Option<PathBuf>,
    /// Tool-call format (default: resolved from the tokenizer config,
    /// the chat template, the spec, else json).
    #[arg(long)]
    tool_format: Option<String>,
    /// System instructions.
    #[arg(long)]
    pub(crate) system: Option<String>,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, value_parser = args::non_negative)]
    temp: f32,
    #[arg(long, default_value_t = 0.0, value_parser = args::unit)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0.0, value_parser = args::unit)]
    min_p: f32,
    #[arg(long, value_parser = args::positive)]
    repetition_penalty: Option<f32>,
    /// XTC: the probability per token of removing the most likely choices
    /// (0 turns it off).
    #[arg(long, default_value_t = 0.0, value_parser = args::unit)]
    xtc_probability: f32,
    /// XTC: tokens above this probability (0 to 0.5) are the choices it
    /// removes, all but the least likely of them.
    #[arg(long, default_value_t = 0.1)]
    xtc_threshold: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// Keep at most this many positions in the KV cache (rotating).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    max_kv_size: Option<i32>,
    /// Quantize the KV cache to this many bits (2, 3, 4, 5, 6 or 8).
    #[arg(long, value_parser = args::kv_bits)]
    kv_bits: Option<i32>,
    /// Values per quantization group of the KV cache (32, 64 or 128).
    #[arg(long, default_value_t = 64, value_parser = args::group_size)]
    kv_group_size: i32,
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(i32).range(0..))]
    quantized_kv_start: i32,
    #[arg(long, default_value_t = 2048, value_parser = args::at_least_one)]
    prefill_step_size: usize,
    /// Extra text that ends generation (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Enable the template's thinking mode (`enable_thinking`).
    #[arg(long)]
    thinking: Option<bool>,
    /// Weight representation: auto (as stored where lmspec's CPU kernels
    /// run them, else dense float32 on CPU when memory allows), quantized
    /// (as stored) or dense.
    #[arg(long, default_value = "auto", value_parser = ["auto", "quantized", "dense"])]
    weights: String,
    /// The global `--gguf-file`.
    #[arg(skip)]
    gguf_file: Option<String>,
}

/// The language model of a `--model` value (a path, a hub id, an installed
/// model's name; none: the default model) with the `--weights` plan.
pub(crate) fn load_language_model(
    model: &Option<String>,
    gguf_file: &Option<String>,
    weights: &str,
    specs: &Option<PathBuf>,
) -> Result<lmspec::lm::LanguageModel> {
    load_language_model_with(model, gguf_file, weights, specs, None)
}

/// [`load_language_model`] with an adapter attached (`--adapter`, `lora`).
pub(crate) fn load_language_model_with(
    model: &Option<String>,
    gguf_file: &Option<String>,
    weights: &str,
    specs: &Option<PathBuf>,
    adapter: Option<lmspec::engine::adapter::AdapterSource>,
) -> Result<lmspec::lm::LanguageModel> {
    let plan = WeightPlan::parse(weights)
        .ok_or_else(|| anyhow!("--weights must be auto, quantized or dense"))?;
    let mut opts = load_options(specs, plan)?;
    opts.adapter = adapter;
    let source = match model {
        Some(m) if Path::new(m).exists() || lmspec::installed_model(m).is_none() => {
            lmspec::hub::ModelSource::parse(m)
        }
        Some(m) => lmspec::hub::ModelSource::Path(model_path(m, gguf_file)?),
        None => lmspec::hub::ModelSource::Path(lmspec::default_model().filter(|p| p.exists()).ok_or_else(
            || anyhow!("no --model given and the default model is not installed (run `make setup`)"),
        )?),
    };
    let mut hub = lmspec::hub::HubOptions::from_env();
    hub.gguf_file = gguf_file.clone();
    Ok(lmspec::lm::LanguageModel::load_source(
        &source, &hub, &opts,
    )?)
}

/// A `--model` value as a local path: a path as given; a hub id
/// (`ORG/NAME[@REVISION]`) as its folder or `.gguf` file in the hub cache,
/// fetched first when the cache lacks a file the model needs.
pub(crate) fn model_path(text: &str, gguf_file: &Option<String>) -> Result<PathBuf> {
    if !Path::new(text).exists() {
        if let Some(p) = lmspec::installed_model(text) {
            return Ok(p);
        }
    }
    let source = lmspec::hub::ModelSource::parse(text);
    let mut opts = lmspec::hub::HubOptions::from_env();
    opts.gguf_file = gguf_file.clone();
    Ok(lmspec::hub::resolve(&source, &opts)?)
}

/// Hub commands: `pull`, `ls`, `rm`.
fn hub_command(
    specs: &Option<PathBuf>,
    gguf_file: &Option<String>,
    cmd: Command,
) -> Result<ExitCode> {
    let mut opts = lmspec::hub::HubOptions::from_env();
    opts.gguf_file = gguf_file.clone();
    let cache = lmspec::hub::HubCache::new(&opts.cache);
    match cmd {
        Command::Pull { id } => {
            let id = lmspec::hub::HubId::parse(&id)?;
            let path = lmspec::hub::pull(&id.repo, &id.revision, &opts)?;
            println!("{}", path.display());
        }
        Command::Rm { id } => {
            let id = lmspec::hub::HubId::parse(&id)?;
            if !cache.remove(&id.repo)? {
                bail!(
                    "{}: not in the hub cache at {}",
                    id.repo,
                    opts.cache.display()
                );
            }
            println!("removed {}", id.repo);
        }
        Command::Ls => {
            let lib = library(specs)?;
            let repos = cache.list()?;
            if repos.is_empty() {
                println!("no models in {}", opts.cache.display());
            }
            for r in repos {
                let refs: Vec<String> = r
                    .refs
                    .iter()
                    .map(|(name, commit)| format!("{name}={}", &commit[..commit.len().min(7)]))
                    .collect();
                let spec = r
                    .snapshots
                    .last()
                    .map(|snap| claiming_spec(&lib, snap))
                    .unwrap_or_else(|| "-".into());
                println!(
                    "{:<48} {:>10}  {:<24} {}",
                    r.repo,
                    human_bytes(r.size),
                    spec,
                    refs.join(" ")
                );
            }
        }
        _ => unreachable!("hub_command is called for hub commands only"),
    }
    Ok(ExitCode::SUCCESS)
}

/// The spec that claims a cached snapshot (by config.json's model_type or
/// a GGUF file's architecture), or why none does.
fn claiming_spec(lib: &SpecLibrary, snap: &Path) -> String {
    let config = snap.join("config.json");
    let found = if config.is_file() {
        std::fs::read_to_string(&config)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("model_type")?.as_str().map(str::to_string))
            .map(|mt| {
                lib.for_model_type(&mt, &config)
                    .map(|s| s.name)
                    .map_err(|_| mt)
            })
    } else {
        let gguf = std::fs::read_dir(snap).ok().and_then(|d| {
            d.flatten()
                .map(|e| e.path())
                .find(|p| lmspec::engine::model::is_gguf(p))
        });
        gguf.and_then(|p| {
            let arch = gguf_architecture(&p)?;
            Some(
                lib.for_gguf_architecture(&arch, &p)
                    .map(|s| s.name)
                    .map_err(|_| arch),
            )
        })
    };
    match found {
        Some(Ok(name)) => format!("spec {name}"),
        Some(Err(kind)) => format!("unclaimed ({kind})"),
        None => "no config".into(),
    }
}

fn gguf_architecture(path: &Path) -> Option<String> {
    let limits = lmspec::engine::weights::format_limits().ok()?;
    let header = lmspec_formats::gguf::check_file(path, &limits).ok()?;
    header
        .get("general.architecture")?
        .as_str()
        .map(str::to_string)
}

fn human_bytes(n: u64) -> String {
    let units = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1000.0 && i + 1 < units.len() {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

/// Parsers of numeric arguments: a value out of range is refused by clap,
/// naming the argument.
mod args {
    fn float(s: &str) -> Result<f32, String> {
        s.parse::<f32>()
            .ok()
            .filter(|x| x.is_finite())
            .ok_or_else(|| format!("'{s}' is not a finite number"))
    }

    pub fn non_negative(s: &str) -> Result<f32, String> {
        float(s).and_then(|x| {
            if x >= 0.0 {
                Ok(x)
            } else {
                Err("must be 0 or more".into())
            }
        })
    }

    pub fn positive(s: &str) -> Result<f32, String> {
        float(s).and_then(|x| {
            if x > 0.0 {
                Ok(x)
            } else {
                Err("must be above 0".into())
            }
        })
    }

    pub fn unit(s: &str) -> Result<f32, String> {
        float(s).and_then(|x| {
            if (0.0..=1.0).contains(&x) {
                Ok(x)
            } else {
                Err("must be between 0 and 1".into())
            }
        })
    }

    fn one_of(s: &str, allowed: &[i32]) -> Result<i32, String> {
        s.parse::<i32>()
            .ok()
            .filter(|v| allowed.contains(v))
            .ok_or_else(|| format!("must be one of {allowed:?}"))
    }

    pub fn kv_bits(s: &str) -> Result<i32, String> {
        one_of(s, &lmspec::engine::weights::QUANT_BITS)
    }

    pub fn group_size(s: &str) -> Result<i32, String> {
        one_of(s, &lmspec::engine::weights::QUANT_GROUP_SIZES)
    }

    pub fn at_least_one(s: &str) -> Result<usize, String> {
        match s.parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err("must be a whole number of 1 or more".into()),
        }
    }
}

impl GenArgs {
    pub(crate) fn params(&self) -> lmspec::lm::generate::GenerateParams {
        use lmspec::lm::generate::GenerateParams;
        use lmspec::lm::sampling::{ProcessorParams, SamplingParams};
        GenerateParams {
            max_tokens: self.max_tokens,
            sampling: SamplingParams {
                temperature: self.temp,
                top_p: self.top_p,
                top_k: self.top_k,
                min_p: self.min_p,
                seed: self.seed,
                xtc_probability: self.xtc_probability,
                xtc_threshold: self.xtc_threshold,
                ..Default::default()
            },
            processors: ProcessorParams {
                repetition_penalty: self.repetition_penalty,
                ..Default::default()
            },
            prefill_step_size: self.prefill_step_size,
            cache: lmspec::engine::cache::CacheOptions {
                max_kv_size: self.max_kv_size,
            },
            kv_bits: self.kv_bits,
            kv_group_size: self.kv_group_size,
            quantized_kv_start: self.quantized_kv_start,
            stop_strings: self.stop.clone(),
            ..Default::default()
        }
    }

    pub(crate) fn load(&self, specs: &Option<PathBuf>) -> Result<lmspec::lm::LanguageModel> {
        let adapter = self
            .adapter
            .clone()
            .map(lmspec::engine::adapter::AdapterSource::Dir);
        load_language_model_with(&self.model, &self.gguf_file, &self.weights, specs, adapter)
    }

    fn context(&self) -> lmspec::lm::template::ChatContext {
        let mut ctx = lmspec::lm::template::ChatContext {
            add_generation_prompt: true,
            ..Default::default()
        };
        if let Some(t) = self.thinking {
            ctx.extra.insert("enable_thinking".into(), t.into());
        }
        ctx
    }
}

/// Prints a generation event; `step` is the prefill chunk size (prompts of
/// more than one chunk report their prefill).
fn print_event(e: lmspec::lm::generate::Event, step: usize) {
    use std::io::Write;
    match e {
        lmspec::lm::generate::Event::Text(t) => {
            print!("{t}");
            let _ = std::io::stdout().flush();
        }
        lmspec::lm::generate::Event::Info(i) => eprintln!(
            "\n[prompt {} tokens, {:.1} tok/s | generated {} tokens, {:.1} tok/s | peak memory {:.1} MB | stop: {:?}{}]",
            i.prompt_tokens,
            i.prompt_tps,
            i.generated_tokens,
            i.generation_tps,
            i.peak_memory_bytes as f64 / 1e6,
            i.stop,
            i.draft
                .map(|d| format!(
                    " | draft accepted {}/{} ({:.0}%)",
                    d.accepted,
                    d.drafted,
                    100.0 * d.acceptance_rate()
                ))
                .unwrap_or_default()
        ),
        lmspec::lm::generate::Event::Reasoning(r) => eprint!("{r}"),
        lmspec::lm::generate::Event::ToolCall(c) => {
            println!("[tool call] {}({})", c.name, c.arguments)
        }
        lmspec::lm::generate::Event::ToolRejected { reason, detail, .. } => {
            println!("[rejected tool call: {reason:?}] {detail}")
        }
        lmspec::lm::generate::Event::PromptProgress(done, total) => {
            if total > step + 1 {
                progress_line("prefill", done, total, "tokens");
            }
        }
    }
}

/// Progress of long local work on stderr: one line rewritten in place on a
/// terminal, a line per step otherwise.
fn progress_line(what: &str, done: usize, total: usize, unit: &str) {
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() {
        eprint!("\r\x1b[K{what}: {done}/{total} {unit}");
        if done >= total {
            eprint!("\r\x1b[K");
        }
    } else {
        eprintln!("{what}: {done}/{total} {unit}");
    }
}

/// Reasoning is reported apart from the answer (to stderr); with `--tools`,
/// the tools are offered to the template and calls reported.
/// The tokens XTC never removes, as mlx-lm's CLI picks them: a newline's
/// ids and the end-of-sequence ids.
fn xtc_special_tokens(
    lm: &lmspec::lm::LanguageModel,
    params: &mut lmspec::lm::generate::GenerateParams,
) -> Result<()> {
    if params.sampling.xtc_probability > 0.0 {
        let mut ids = lm.tokenizer.tokenize("\n", false, true)?;
        ids.extend(&lm.tokenizer.eos_ids);
        params.sampling.xtc_special_tokens = ids;
    }
    Ok(())
}

/// `generate`'s options beyond those `chat` shares.
struct GenerateExtras {
    prompt_cache: Option<PathBuf>,
    draft_model: Option<String>,
    num_draft_tokens: usize,
    draft_weights: String,
    images: Vec<PathBuf>,
    videos: Vec<Vec<PathBuf>>,
}

/// A `--video` value: a folder, or frame files separated by commas.
fn parse_video(s: &str) -> std::result::Result<Vec<PathBuf>, String> {
    let frames: Vec<PathBuf> = s
        .split(',')
        .filter(|f| !f.is_empty())
        .map(PathBuf::from)
        .collect();
    match frames.is_empty() {
        true => Err("a video needs at least one frame (a folder or FRAME,FRAME,...)".into()),
        false => Ok(frames),
    }
}

fn generate(
    specs: &Option<PathBuf>,
    gen: &GenArgs,
    prompt: Option<&str>,
    raw: bool,
    extra: &GenerateExtras,
) -> Result<ExitCode> {
    let lm = gen.load(specs)?;
    let prompt = match prompt.or(lm.defaults.default_prompt.as_deref()) {
        Some(p) => p.to_string(),
        None => bail!("give a prompt with -p (the model has no default prompt in the registry)"),
    };
    let prompt = prompt.as_str();
    let (tools, output) = gen.output(specs, &lm)?;
    let mut params = gen.params();
    xtc_special_tokens(&lm, &mut params)?;
    params.output = output;
    let mut context = gen.context();
    if !tools.is_empty() {
        context.tools = Some(tools.iter().map(lmspec::lm::Tool::spec).collect());
    }
    if !extra.images.is_empty() || !extra.videos.is_empty() {
        return generate_with_images(gen, &lm, prompt, raw, &params, &context, extra);
    }
    let mut cached = match &extra.prompt_cache {
        Some(path) => Some(crate::cache_cmd::load(&lm, path)?),
        None => None,
    };
    let ids = if cached.is_some() {
        crate::cache_cmd::continuation_ids(&lm, &context, prompt, raw)?
    } else if raw {
        lm.tokenizer.encode(prompt)?
    } else {
        let mut messages = Vec::new();
        if let Some(s) = &gen.system {
            messages.push(serde_json::json!({"role": "system", "content": s}));
        }
        messages.push(serde_json::json!({"role": "user", "content": prompt}));
        lm.chat_prompt(&serde_json::Value::Array(messages), &context)?
    };
    let step = gen.prefill_step_size;
    let cache = cached.as_mut().map(|c| &mut c.cache);
    match &extra.draft_model {
        None => {
            lm.generate(&ids, &params, cache, None, &mut |e| print_event(e, step))?;
        }
        Some(draft) => {
            let draft =
                load_language_model(&Some(draft.clone()), &None, &extra.draft_weights, specs)?;
            let spec = lmspec::lm::speculative::Draft {
                model: &draft.model,
                num_draft_tokens: extra.num_draft_tokens,
            };
            lm.generate_speculative(&ids, &params, &spec, cache, None, &mut |e| {
                print_event(e, step)
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `generate --image`: the images processed as the checkpoint's processor
/// says, one image entry per image in the user message (or the
/// placeholders of a raw prompt), then generation with the images spliced in.
#[allow(clippy::too_many_arguments)]
fn generate_with_images(
    gen: &GenArgs,
    lm: &lmspec::lm::LanguageModel,
    prompt: &str,
    raw: bool,
    params: &lmspec::lm::generate::GenerateParams,
    context: &lmspec::lm::template::ChatContext,
    extra: &GenerateExtras,
) -> Result<ExitCode> {
    if extra.prompt_cache.is_some() || extra.draft_model.is_some() {
        bail!("--image, --video: not with --prompt-cache or --draft-model");
    }
    let images = &extra.images;
    let mut processed = lm.load_images(images)?;
    if !extra.videos.is_empty() {
        processed.extend(lm.load_videos(&extra.videos)?);
    }
    let ids = if raw {
        lm.tokenizer.encode(prompt)?
    } else {
        let mut messages = Vec::new();
        if let Some(s) = &gen.system {
            messages.push(serde_json::json!({"role": "system", "content": s}));
        }
        let mut content: Vec<serde_json::Value> = processed
            .iter()
            .map(|i| match i.video {
                true => serde_json::json!({"type": "video"}),
                false => serde_json::json!({"type": "image"}),
            })
            .collect();
        content.push(serde_json::json!({"type": "text", "text": prompt}));
        messages.push(serde_json::json!({"role": "user", "content": content}));
        lm.chat_prompt(&serde_json::Value::Array(messages), context)?
    };
    let step = gen.prefill_step_size;
    lm.generate_with_images(&ids, &processed, params, None, None, &mut |e| {
        print_event(e, step)
    })?;
    Ok(ExitCode::SUCCESS)
}

impl GenArgs {
    /// The tools of `--tools` (offered, not run) and how the model's output
    /// is read ([`lmspec::lm::LanguageModel::output_format`]): the same for
    /// `generate` and `chat`.
    fn output(
        &self,
        specs: &Option<PathBuf>,
        lm: &lmspec::lm::LanguageModel,
    ) -> Result<(Vec<lmspec::lm::Tool>, lmspec::lm::tools::OutputFormat)> {
        let declared = match lm.response_template() {
            Some(Ok(r)) => Some(r),
            Some(Err(e)) => {
                eprintln!("note: not using the response_template: {e}");
                None
            }
            None => None,
        };
        let tools = match &self.tools {
            Some(file) => read_tools(file)?,
            None => Vec::new(),
        };
        let formats = lmspec::lm::tools::ToolFormat::load_all(&spec_root(specs))?;
        if let Some(f) = &self.tool_format {
            if !formats.iter().any(|k| &k.name == f) {
                let known: Vec<&str> = formats.iter().map(|k| k.name.as_str()).collect();
                bail!(
                    "--tool-format: no tool format is named '{f}' (known: {})",
                    known.join(", ")
                );
            }
        }
        let output = lm.output_format(
            &formats,
            declared.as_ref(),
            &tools,
            self.tool_format.as_deref(),
        )?;
        Ok((tools, output))
    }
}

/// The tools of an OpenAI-style JSON list; the CLI shows their calls but
/// does not run them.
fn read_tools(file: &Path) -> Result<Vec<lmspec::lm::Tool>> {
    let text = std::fs::read_to_string(file).with_context(|| file.display().to_string())?;
    let list: Vec<serde_json::Value> = serde_json::from_str(&text)
        .with_context(|| format!("{}: expected a JSON list of tool specs", file.display()))?;
    let tools: Vec<lmspec::lm::Tool> = list
        .iter()
        .enumerate()
        .map(|(k, spec)| {
            lmspec::lm::Tool::from_openai_json(spec, |_| {
                Ok(serde_json::json!({"error": "lmspec chat shows tool calls but does not run them"}))
            })
            .map_err(|e| anyhow!("{}: tool {k}: {e}", file.display()))
        })
        .collect::<Result<_>>()?;
    for (k, t) in tools.iter().enumerate() {
        if tools[..k].iter().any(|u| u.name == t.name) {
            bail!(
                "{}: tool {k}: the name '{}' is offered twice",
                file.display(),
                t.name
            );
        }
    }
    Ok(tools)
}

/// One line of `input` without its end (`None` at the end of input); a
/// line longer than `max` bytes or not UTF-8 is an error naming stdin.
fn read_line(input: &mut impl std::io::BufRead, max: u64) -> Result<Option<String>> {
    use std::io::{BufRead, Read};
    let mut buf = Vec::new();
    let n = input
        .by_ref()
        .take(max + 1)
        .read_until(b'\n', &mut buf)
        .context("stdin")?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() as u64 > max {
        bail!("stdin: a line is longer than {max} bytes (LMSPEC_MAX_LINE_BYTES)");
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| anyhow!("stdin: a line is not UTF-8"))
}

fn chat(
    specs: &Option<PathBuf>,
    gen: &GenArgs,
    images: &[PathBuf],
    videos: &[Vec<PathBuf>],
) -> Result<ExitCode> {
    let lm = gen.load(specs)?;
    let (tools, output) = gen.output(specs, &lm)?;
    let format = output.tools.clone();
    if (!images.is_empty() || !videos.is_empty()) && format.is_some() {
        bail!("--image, --video: not with tools (--tools or a tool format)");
    }
    // The images and videos go with the first message.
    let mut pending = match images.is_empty() {
        true => Vec::new(),
        false => lm.load_images(images)?,
    };
    if !videos.is_empty() {
        pending.extend(lm.load_videos(videos)?);
    }
    let mut params = gen.params();
    xtc_special_tokens(&lm, &mut params)?;
    params.output = output;
    let mut session = lmspec::lm::ChatSession::new(&lm, gen.system.as_deref(), params);
    session.context = gen.context();
    eprintln!("chatting with {} (empty line to quit)", lm.path.display());
    let max = lmspec::spec::limits::limits()?.max_line_bytes;
    let mut input = std::io::stdin().lock();
    while let Some(line) = read_line(&mut input, max)? {
        if line.trim().is_empty() {
            break;
        }
        match &format {
            Some(format) => {
                let answer = session.respond_with_tools(&line, &tools, format, 3, &mut |e| {
                    use lmspec::lm::tools::ToolEvent;
                    match e {
                        ToolEvent::Call(c) => println!("[tool call] {}({})", c.name, c.arguments),
                        ToolEvent::Rejected { reason, detail, .. } => {
                            println!("[rejected tool call: {reason:?}] {detail}")
                        }
                        _ => {}
                    }
                })?;
                println!("{answer}");
            }
            None if !pending.is_empty() => {
                let images = std::mem::take(&mut pending);
                session.respond_with_images(&line, images, &mut |e| {
                    print_event(e, gen.prefill_step_size)
                })?;
                println!();
            }
            None => {
                session
                    .respond_stream(&line, None, &mut |e| print_event(e, gen.prefill_step_size))?;
                println!();
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Subcommand)]
enum SpecCommand {
    /// List architecture specs and the model types they claim.
    List,
    /// Validate spec files (names or paths), or every spec with --all.
    Check {
        #[arg(value_name = "SPEC")]
        names: Vec<String>,
        #[arg(long)]
        all: bool,
    },
    /// Print the resolved layer graph for a config as Graphviz DOT.
    Graph {
        spec: String,
        #[arg(long)]
        config: PathBuf,
    },
    /// List the tap names of a spec for a config, in execution order.
    Taps {
        spec: String,
        #[arg(long)]
        config: PathBuf,
    },
    /// Dump the validated, expanded graph for a config (ops, layouts, weights).
    Dump {
        spec: String,
        #[arg(long)]
        config: PathBuf,
        /// Also name each node's spec file and node, and list the skipped
        /// nodes with the value that stands for each.
        #[arg(long)]
        explain: bool,
    },
}

#[derive(Debug, Subcommand)]
enum PortCommand {
    /// Compare the engine with a golden case node by node; exit 1 on divergence.
    Diff {
        /// Golden case folder (meta.json, golden.safetensors).
        #[arg(long)]
        golden: PathBuf,
        /// Model directory (default: the golden's own model/).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Spec name or file (default: chosen by the config's model_type).
        #[arg(long)]
        spec: Option<String>,
        /// Also write a self-contained HTML report here.
        #[arg(long)]
        html: Option<PathBuf>,
    },
    /// Draft a spec for a checkpoint from its config and weight names.
    Scaffold {
        #[arg(long)]
        model: PathBuf,
        /// Write the draft here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Record every node of a golden case's prefill and cached decode steps
    /// (`--out`), or compare such a recording with this run (`--against`):
    /// per step, the first node whose values part (e.g. a GPU run against a
    /// CPU one: `LMSPEC_DEVICE=cpu` for the latter).
    Trace {
        /// Golden case folder (meta.json, golden.safetensors).
        #[arg(long)]
        golden: PathBuf,
        /// Write the recording here (safetensors, float32).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Compare this run with a recording written before.
        #[arg(long)]
        against: Option<PathBuf>,
    },
    /// Table of mlx-lm model types: claimed by a spec? golden passing?
    Coverage {
        /// Write Markdown here (e.g. docs/coverage.md) instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// The installed mlx_lm package folder (default: found in .venv).
        #[arg(long)]
        mlx_lm: Option<PathBuf>,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // The causes, each once: an error that already quotes its
            // cause (`path: reason`) is not followed by it again.
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !msg.contains(&c) {
                    msg.push_str(": ");
                    msg.push_str(&c);
                }
            }
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// Load options of every command that loads a model: the spec library
/// ([`library`]), `weights`, and `$LMSPEC_FUSE_PROJECTIONS` (`1` or `0`)
/// forcing fused projections on or off (default: on for the CPU; on a GPU
/// for models with quantized weights).
pub(crate) fn load_options(specs: &Option<PathBuf>, weights: WeightPlan) -> Result<LoadOptions> {
    let mut opts = LoadOptions::default()
        .with_library(library(specs)?)
        .with_weights(weights);
    // Sharded checkpoints report each file read.
    opts.progress = Some(lmspec::engine::weights::LoadProgress(std::sync::Arc::new(
        |done, total, _file| {
            if total > 1 {
                progress_line("loading weights", done, total, "files");
            }
        },
    )));
    opts.fuse_projections = match std::env::var("LMSPEC_FUSE_PROJECTIONS").as_deref() {
        Ok("0") => Some(false),
        Ok("1") => Some(true),
        _ => None,
    };
    // A rank of a tensor-parallel run (`lmspec launch`) loads its share.
    if let Some(group) = lmspec::engine::distributed::Group::from_env()? {
        opts = opts.with_parallel(group);
    }
    // Where lmspec's GPU kernels run (read by the plan; checked here).
    if let Ok(v) = std::env::var("LMSPEC_GPU_KERNELS") {
        if !lmspec::engine::gpu_kernels::SETTINGS.contains(&v.as_str()) {
            bail!(
                "LMSPEC_GPU_KERNELS={v}: expected {}",
                lmspec::engine::gpu_kernels::SETTINGS.join(", ")
            );
        }
    }
    // How quantized products on the CPU treat activations: `float` (MLX's
    // numerics), `int8` (llama.cpp's) or `int16` (float32's within a bound;
    // the default for quantized weights: see `LoadOptions::activations`).
    if let Ok(a) = std::env::var("LMSPEC_ACTIVATIONS") {
        let a = lmspec::engine::cpu_kernels::Activations::parse(&a).ok_or_else(|| {
            anyhow!("LMSPEC_ACTIVATIONS={a}: expected `float`, `int8` or `int16`")
        })?;
        opts = opts.with_activations(a);
    }
    Ok(opts)
}

/// Refuses a command that reads its input interactively or over the
/// network on a rank of a tensor-parallel run: only rank 0 would see it.
fn single_rank(command: &str) -> Result<()> {
    let world = std::env::var(lmspec::engine::distributed::WORLD_ENV).unwrap_or_default();
    if world.trim().parse::<usize>().is_ok_and(|n| n > 1) {
        bail!("`lmspec {command}` runs on one rank only, not under `lmspec launch` (generate, logits, golden and bench run on several)");
    }
    Ok(())
}

/// `--specs` when given, else `$LMSPEC_SPECS`, else the built-in library.
pub(crate) fn spec_root(cli_specs: &Option<PathBuf>) -> SpecRoot {
    match cli_specs {
        Some(root) => SpecRoot::Dir(root.clone()),
        None => SpecRoot::from_env(),
    }
}

fn library(cli_specs: &Option<PathBuf>) -> Result<SpecLibrary> {
    Ok(SpecLibrary::from_root(spec_root(cli_specs))?)
}

fn run(cli: Cli) -> Result<ExitCode> {
    runtime::use_device_from_env().map_err(|e| anyhow!(e))?;
    // `--world-size N` outside a run: start the N ranks, each running this
    // command line without the flag.
    let rank = std::env::var_os(lmspec::engine::distributed::RANK_ENV).is_some();
    if let Some(n) = cli.world_size.filter(|&n| n > 1 && !rank) {
        return crate::launch_cmd::relaunch(n, std::env::args().skip(1));
    }
    match cli.command {
        Command::Doctor => doctor(&cli.specs),
        Command::Launch(args) => crate::launch_cmd::run(args),
        Command::Serve(args) => {
            single_rank("serve")?;
            crate::serve_cmd::run(args, &cli.specs, &cli.gguf_file)
        }
        Command::Lora(args) => crate::adapter_cmd::lora(args, &cli.specs, &cli.gguf_file),
        Command::Fuse(args) => crate::adapter_cmd::fuse(args, &cli.specs, &cli.gguf_file),
        Command::Spec(SpecCommand::List) => {
            let lib = library(&cli.specs)?;
            for name in lib.names() {
                let spec = lib.load(name)?;
                println!(
                    "{:<12} {:<28} {}",
                    name,
                    spec.model_types.join(", "),
                    spec.description.unwrap_or_default()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Spec(SpecCommand::Check { names, all }) => {
            let lib = library(&cli.specs)?;
            let names: Vec<String> = if all {
                lib.names().map(str::to_string).collect()
            } else if names.is_empty() {
                bail!("name spec files to check, or pass --all");
            } else {
                names
            };
            let mut failed = 0;
            for name in &names {
                match lib
                    .load(name)
                    .and_then(|s| lmspec::spec::check(&s).map(|_| s))
                {
                    Ok(s) => println!("ok    {} ({})", s.name, s.file.display()),
                    Err(e) => {
                        failed += 1;
                        eprintln!("FAIL  {e}");
                    }
                }
            }
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Spec(SpecCommand::Graph { spec, config }) => {
            let (s, g) = expand(&cli.specs, &spec, &config)?;
            print!("{}", render::to_dot(&g, &s));
            Ok(ExitCode::SUCCESS)
        }
        Command::Spec(SpecCommand::Dump {
            spec,
            config,
            explain,
        }) => {
            let (_, g) = expand(&cli.specs, &spec, &config)?;
            print!("{}", render::dump(&g, explain));
            Ok(ExitCode::SUCCESS)
        }
        Command::Port(cmd) => port(&cli.specs, cmd),
        Command::Generate {
            mut gen,
            prompt,
            raw,
            prompt_cache,
            draft_model,
            num_draft_tokens,
            draft_weights,
            images,
            videos,
        } => {
            gen.gguf_file = cli.gguf_file.clone();
            let extra = GenerateExtras {
                prompt_cache,
                draft_model,
                num_draft_tokens,
                draft_weights,
                images,
                videos,
            };
            generate(&cli.specs, &gen, prompt.as_deref(), raw, &extra)
        }
        Command::CachePrompt(mut args) => {
            args.gen.gguf_file = cli.gguf_file.clone();
            crate::cache_cmd::cache_prompt(&cli.specs, &args)
        }
        Command::Chat {
            mut gen,
            images,
            videos,
        } => {
            single_rank("chat")?;
            gen.gguf_file = cli.gguf_file.clone();
            chat(&cli.specs, &gen, &images, &videos)
        }
        cmd @ (Command::Pull { .. } | Command::Ls | Command::Rm { .. }) => {
            hub_command(&cli.specs, &cli.gguf_file, cmd)
        }
        Command::Bench {
            model,
            prompt_tokens,
            gen_tokens,
            repeat,
            weights,
            against,
            json,
            profile_ops,
        } => {
            let model = match model {
                Some(m) => model_path(&m, &cli.gguf_file)?,
                None => lmspec::default_model()
                    .filter(|p| p.exists())
                    .ok_or_else(|| anyhow!("no --model and the default model is not installed"))?,
            };
            let weights = WeightPlan::parse(&weights)
                .ok_or_else(|| anyhow!("--weights must be auto, quantized or dense"))?;
            let args = lmspec::port::bench::BenchArgs {
                model,
                prompt_tokens,
                gen_tokens,
                repeat,
                weights,
                profile_ops,
            };
            let against = match against.as_deref() {
                None => None,
                Some(name) => {
                    Some(lmspec::port::bench::Reference::parse(name).ok_or_else(|| {
                        anyhow!("--against {name}: expected `mlx-lm` or `llama.cpp`")
                    })?)
                }
            };
            let report = lmspec::port::bench::run(
                &load_options(&cli.specs, weights)?,
                &repo_root(),
                &args,
                against,
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                match report.reference() {
                    Some((t, name)) => {
                        print!(
                            "{}",
                            lmspec::port::bench::ratio_table(&report.ours, t, name)
                        )
                    }
                    None => println!("{}", serde_json::to_string_pretty(&report.ours)?),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Spec(SpecCommand::Taps { spec, config }) => {
            let (_, g) = expand(&cli.specs, &spec, &config)?;
            for name in g.tap_names() {
                println!("{name}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Logits {
            model,
            tokens,
            spec,
        } => logits(
            &cli.specs,
            &model_path(&model, &cli.gguf_file)?,
            &tokens,
            spec.as_deref(),
        ),
        Command::Golden { cases } => golden(&cli.specs, cases),
        Command::Embed(args) => crate::embed_cmd::embed(
            &model_path(&args.model, &cli.gguf_file)?,
            &load_options(&cli.specs, WeightPlan::AsStored)?,
            &args,
        ),
        Command::Rerank(args) => crate::embed_cmd::rerank(
            &model_path(&args.model, &cli.gguf_file)?,
            &load_options(&cli.specs, WeightPlan::AsStored)?,
            &args,
        ),
    }
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn port(specs: &Option<PathBuf>, cmd: PortCommand) -> Result<ExitCode> {
    let lib = library(specs)?;
    match cmd {
        PortCommand::Diff {
            golden,
            model,
            spec,
            html,
        } => {
            let vision = lmspec::port::diff::is_vision_golden(&golden);
            let model = match model {
                Some(m) => m,
                None if vision => golden.join("model"),
                None => lmspec::port::golden::Golden::load(&golden)?.model_dir(),
            };
            let mut opts = load_options(specs, WeightPlan::AsStored)?;
            opts.spec = spec;
            let report = match vision {
                true => lmspec::port::diff::diff_tower(&model, &golden, &opts, None)?,
                false => lmspec::port::diff::diff(&model, &golden, &opts, None)?,
            };
            print!("{}", report.table());
            if let Some(path) = html {
                std::fs::write(&path, lmspec::port::report::html(&report))
                    .with_context(|| path.display().to_string())?;
                println!("report written to {}", path.display());
            }
            Ok(if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        PortCommand::Scaffold { model, out } => {
            let draft = lmspec::port::scaffold::scaffold(&model, &lib)?;
            eprintln!("spec ranking by weight-inventory fit:");
            for f in &draft.ranking {
                match &f.error {
                    Some(e) => eprintln!("  {:<10} cannot expand: {e}", f.spec),
                    None => eprintln!(
                        "  {:<10} weights {:.3}, config keys {:.0}%",
                        f.spec,
                        f.score,
                        f.config_fit * 100.0
                    ),
                }
            }
            match out {
                Some(path) => {
                    std::fs::write(&path, &draft.yaml)
                        .with_context(|| path.display().to_string())?;
                    eprintln!("draft written to {}", path.display());
                }
                None => print!("{}", draft.yaml),
            }
            Ok(ExitCode::SUCCESS)
        }
        PortCommand::Trace {
            golden,
            out,
            against,
        } => {
            if out.is_none() && against.is_none() {
                bail!("port trace: give --out, --against or both");
            }
            float32_matmuls_on_gpu();
            let opts = load_options(specs, WeightPlan::AsStored)?;
            let case = lmspec::port::golden::Golden::load(&golden)?;
            let tolerance = case.tolerance();
            let ours = lmspec::port::trace::record(&case, &opts)?;
            if let Some(path) = out {
                lmspec::port::trace::save(&ours, &path)?;
                println!("{} values written to {}", ours.len(), path.display());
            }
            if let Some(path) = against {
                let theirs = lmspec::port::trace::load(&path)?;
                let steps = lmspec::port::trace::compare_runs(&ours, &theirs, tolerance)?;
                print!("{}", lmspec::port::trace::table(&steps, tolerance));
                if steps.iter().any(|s| s.first.is_some()) {
                    return Ok(ExitCode::FAILURE);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        PortCommand::Coverage { out, mlx_lm } => {
            let mlx_lm = match mlx_lm {
                Some(p) => p,
                None => lmspec::port::coverage::find_mlx_lm(&repo_root().join(".venv"))
                    .ok_or_else(|| {
                        anyhow!("mlx_lm not found in .venv; run `make setup` or pass --mlx-lm")
                    })?,
            };
            let rows =
                lmspec::port::coverage::coverage(&lib, &mlx_lm, &repo_root().join("goldens"))?;
            let md = lmspec::port::coverage::markdown(&rows);
            match out {
                Some(path) => {
                    std::fs::write(&path, &md).with_context(|| path.display().to_string())?;
                    println!("coverage written to {}", path.display());
                }
                None => print!("{md}"),
            }
            let mut undeclared = 0;
            for r in rows.iter().filter(|r| r.spec.is_some()) {
                if let Some((_, keys)) = r.keys.as_ref().filter(|(_, k)| !k.is_empty()) {
                    undeclared += keys.len();
                    eprintln!(
                        "{}: undeclared config keys: {}",
                        r.model_type,
                        keys.join(", ")
                    );
                }
            }
            Ok(if undeclared == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

fn expand(
    specs: &Option<PathBuf>,
    spec: &str,
    config: &Path,
) -> Result<(String, lmspec::spec::Graph)> {
    let lib = library(specs)?;
    let s = lib.load(spec)?;
    let text = std::fs::read_to_string(config).with_context(|| config.display().to_string())?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid JSON", config.display()))?;
    let (_, g) = lmspec::spec::expand_for(&s, &json, config)?;
    Ok((s.name, g))
}

fn logits(
    specs: &Option<PathBuf>,
    dir: &Path,
    tokens: &[i32],
    spec: Option<&str>,
) -> Result<ExitCode> {
    let mut opts = load_options(specs, WeightPlan::AsStored)?;
    opts.spec = spec.map(str::to_string);
    let model = Model::load(dir, &opts)?;
    let wide: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
    model.check_tokens(&wide, "--tokens")?;
    let ids = Array::from_slice(tokens, &[1, tokens.len() as i32]);
    let logits = model.forward(&ids, None)?;
    logits.eval()?;
    let shape = logits.shape().to_vec();
    let vocab = *shape.last().ok_or_else(|| anyhow!("logits have no axes"))?;
    let last = logits
        .reshape(&[-1, vocab])?
        .as_dtype(mlx_rs::Dtype::Float32)?
        .contiguous()?;
    last.eval()?;
    let rows = last.as_slice::<f32>();
    let row = &rows[rows.len() - vocab as usize..];
    let mut order: Vec<usize> = (0..row.len()).collect();
    order.sort_by(|a, b| row[*b].total_cmp(&row[*a]));
    println!("spec: {}", model.spec.name);
    println!("logits shape: {shape:?}");
    println!("last row top-5:");
    for &k in order.iter().take(5) {
        println!("  {k:>8}  {:>12.6}", row[k]);
    }
    Ok(ExitCode::SUCCESS)
}

/// Golden references are float32 runs; on a GPU, MLX runs float32 matmuls
/// in TF32 (10-bit mantissa) unless told not to before its first one.
fn float32_matmuls_on_gpu() {
    if runtime::default_device() == "gpu" && std::env::var_os("MLX_ENABLE_TF32").is_none() {
        std::env::set_var("MLX_ENABLE_TF32", "0");
        println!("(on the GPU: float32 matmuls in float32, MLX_ENABLE_TF32=0)");
    }
}

fn golden(specs: &Option<PathBuf>, cases: Vec<PathBuf>) -> Result<ExitCode> {
    float32_matmuls_on_gpu();
    let opts = load_options(specs, WeightPlan::AsStored)?;
    if let Some(g) = &opts.parallel {
        println!("(tensor parallel: {} ranks)", g.size());
    }
    let cases = if cases.is_empty() {
        lmspec::port::golden::Golden::cases(&Path::new(env!("CARGO_MANIFEST_DIR")).join("goldens"))?
    } else {
        cases
    };
    let mut failed = 0;
    println!(
        "{:<22} {:<8} {:<10} {:>12} {:>12} {:>8}  result",
        "case", "spec", "tolerance", "fwd max_rel", "p/d max_rel", "greedy"
    );
    let total = cases.len();
    for case in cases {
        // A case that cannot run is a failure of its own; the rest still run.
        let r = match lmspec::port::golden::run(&case, &opts) {
            Ok(r) => r,
            Err(e) => {
                failed += 1;
                println!("{:<22} ERROR: {e:#}", display_name(&case));
                continue;
            }
        };
        let ok = r.passed();
        failed += usize::from(!ok);
        println!(
            "{:<22} {:<8} {:<10} {:>12.2e} {:>12.2e} {:>8}  {}",
            r.case,
            r.spec,
            r.tolerance.name(),
            r.forward.max_rel(),
            r.prefill_decode.max_rel(),
            if r.greedy == r.expected_greedy {
                "same"
            } else {
                "differs"
            },
            if ok { "pass" } else { "FAIL" }
        );
    }
    println!("{total} cases: {} pass, {failed} fail", total - failed);
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn display_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| path.display().to_string())
}

fn doctor(specs: &Option<PathBuf>) -> Result<ExitCode> {
    println!("lmspec {}", env!("CARGO_PKG_VERSION"));
    let binding = runtime::smoke()
        .map(|v| v == [11.0, 22.0, 33.0])
        .unwrap_or(false);
    println!(
        "MLX:            {} ({})",
        runtime::mlx_version(),
        runtime::loaded_library("libmlx").unwrap_or_else(|| "libmlx not found".into())
    );
    let cuda = runtime::cuda_available();
    println!(
        "backend:        {} (GPUs visible: {})",
        if cuda { "cuda" } else { "cpu" },
        runtime::gpu_count()
    );
    println!("default device: {}", runtime::default_device());
    match runtime::blas_library() {
        Some(path) => println!("BLAS:           {} ({path})", runtime::blas_kind(&path)),
        None => println!("BLAS:           none found"),
    }
    match runtime::matmul_gflops(512, 10) {
        Ok(g) => println!(
            "matmul:         512x512 f32 on {}: {g:.1} GFLOP/s",
            runtime::default_device()
        ),
        Err(e) => println!("matmul:         failed: {e}"),
    }
    if cuda {
        match runtime::matmul_gflops(4096, 10) {
            Ok(g) => println!("matmul:         4096x4096 f32 on gpu: {g:.1} GFLOP/s"),
            Err(e) => println!("matmul:         4096 failed: {e}"),
        }
    }
    println!(
        "binding test:   {}",
        if binding {
            "ok (1+10, 2+20, 3+30)"
        } else {
            "FAILED"
        }
    );
    match library(specs) {
        Ok(lib) => {
            let types: Vec<String> = lib.model_types().into_iter().map(|(m, _)| m).collect();
            println!(
                "specs:          {} architectures in {} (model types: {})",
                lib.names().count(),
                lib.root,
                types.join(", ")
            );
        }
        Err(e) => println!("specs:          error: {e}"),
    }
    match lmspec::default_model() {
        Some(p) if p.exists() => println!("default model:  found {}", p.display()),
        Some(p) => println!("default model:  missing ({})", p.display()),
        None => println!("default model:  missing (run the setup: make setup)"),
    }
    // lmspec's GPU kernels against the ops they replace, on a GPU.
    let mut kernels_ok = true;
    if runtime::default_device() == "gpu" {
        match lmspec::engine::gpu_kernels::check() {
            Ok((rows, notes)) => {
                for n in notes {
                    println!("mlx rope:       gpu against cpu, {n}");
                }
                for r in rows {
                    let ok = r.max_rel <= r.bound;
                    kernels_ok &= ok;
                    println!(
                        "gpu kernel:     {:<44} max_rel {:.2e} (bound {:.0e}) {}",
                        r.case,
                        r.max_rel,
                        r.bound,
                        if ok { "ok" } else { "FAILED" }
                    );
                }
            }
            Err(e) => {
                kernels_ok = false;
                println!("gpu kernel:     failed: {e}");
            }
        }
    }
    Ok(if binding && kernels_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn command_line_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
