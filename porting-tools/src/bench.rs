//! `lmspec bench`: load time, time to first token, prefill and decode
//! tokens/s and peak memory, median and spread over repeats; optionally the
//! same measured with mlx-lm (`porting-tools/python/bench_mlx_lm.py`) on the
//! same prompt, with a ratio table. Every timing ends on a read-back of a
//! token, so MLX's lazy work is inside it.
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use indexmap::IndexMap;
use lmspec_engine::model::WeightPlan;
use lmspec_engine::{runtime, LoadOptions, Model};
use lmspec_lm::generate::{GenerateParams, TokenGenerator};
use serde::{Deserialize, Serialize};

/// Median (mean of the middle two for even counts), min and max.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(xs: &[f64]) -> Spread {
        let mut v = xs.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = if n == 0 {
            0.0
        } else if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Spread {
            median,
            min: v.first().copied().unwrap_or(0.0),
            max: v.last().copied().unwrap_or(0.0),
        }
    }
}

/// The primitives MLX runs for one decode step, by kind, with their total.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DecodeGraph {
    pub total: usize,
    pub by_kind: BTreeMap<String, usize>,
}

/// Mean host microseconds per decode step.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct StepUs {
    pub build: f64,
    pub launch: f64,
    pub wait: f64,
}

/// What an engine is and how it loaded: lmspec's, or the first line of
/// `bench_mlx_lm.py --serve`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Header {
    pub engine: String,
    pub model: String,
    pub weights: String,
    pub device: String,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub load_s: f64,
    #[serde(default)]
    pub decode_graph: DecodeGraph,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_step_us: Option<StepUs>,
    pub mlx_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlx_lm_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llama_cpp_version: Option<String>,
    /// Threads the engine computes on (llama.cpp's `n_threads`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
    /// lmspec's activations for quantized products on the CPU (`float`,
    /// `int8`, `int16`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activations: Option<String>,
    /// The prompt's token ids (lmspec's header; mlx-lm reads them from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<Vec<u32>>,
}

/// Neighbouring repeats' lmspec / mlx-lm ratios.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct PairedRatio {
    pub prefill_tps: Spread,
    pub decode_tps: Spread,
}

/// One engine's measurements (the JSON `lmspec bench --json` prints and
/// `porting-tools/python/bench_table.py` reads).
#[derive(Debug, Clone, Serialize)]
pub struct EngineReport {
    #[serde(flatten)]
    pub header: Header,
    pub repeat: usize,
    pub ttft_s: Spread,
    pub prefill_tps: Spread,
    pub decode_tps: Spread,
    pub peak_memory_mb: f64,
    /// The greedy tokens of the first repeat.
    pub tokens: Vec<u32>,
    /// Host microseconds of graph building per decode step, by primitive
    /// (`--profile-ops`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build_us_by_op: Option<IndexMap<String, f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paired_ratio: Option<PairedRatio>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_equal_every_repeat: Option<bool>,
}

/// A deterministic prompt of `n` token ids below `vocab` (SplitMix64 from 0).
pub fn prompt_tokens(n: usize, vocab: usize) -> Vec<u32> {
    let mut rng = lmspec_lm::sampling::Rng::new(Some(0));
    (0..n)
        .map(|_| (rng.next_u64() % vocab as u64) as u32)
        .collect()
}

#[derive(Debug)]
pub struct BenchArgs {
    pub model: PathBuf,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub repeat: usize,
    pub weights: WeightPlan,
    /// Also report the host time each primitive's graph building takes.
    pub profile_ops: bool,
}

/// One timed repeat of either engine.
#[derive(Debug, Clone)]
pub struct Sample {
    pub ttft_s: f64,
    pub prefill_tps: f64,
    pub decode_tps: f64,
    pub peak_memory_mb: f64,
    pub tokens: Vec<u32>,
    /// Mean host microseconds per decode step: build, launch, wait.
    pub step_us: Option<[f64; 3]>,
}

/// One repeat as `bench_mlx_lm.py --serve` reports it.
#[derive(Debug, Deserialize)]
struct RepeatLine {
    ttft_s: f64,
    prefill_tps: f64,
    decode_tps: f64,
    peak_memory_mb: f64,
    tokens: Vec<u32>,
}

impl From<RepeatLine> for Sample {
    fn from(r: RepeatLine) -> Sample {
        Sample {
            ttft_s: r.ttft_s,
            prefill_tps: r.prefill_tps,
            decode_tps: r.decode_tps,
            peak_memory_mb: r.peak_memory_mb,
            tokens: r.tokens,
            step_us: None,
        }
    }
}

/// An engine's report from its header and repeats; the step split of the
/// repeats (lmspec's) replaces the header's (mlx-lm measures its own once).
fn summarise(mut header: Header, samples: &[Sample]) -> EngineReport {
    let pick = |f: fn(&Sample) -> f64| Spread::of(&samples.iter().map(f).collect::<Vec<_>>());
    let steps: Vec<[f64; 3]> = samples.iter().filter_map(|s| s.step_us).collect();
    if !steps.is_empty() {
        let part = |i: usize| Spread::of(&steps.iter().map(|s| s[i]).collect::<Vec<_>>()).median;
        header.decode_step_us = Some(StepUs {
            build: part(0),
            launch: part(1),
            wait: part(2),
        });
    }
    EngineReport {
        header,
        repeat: samples.len(),
        ttft_s: pick(|s| s.ttft_s),
        prefill_tps: pick(|s| s.prefill_tps),
        decode_tps: pick(|s| s.decode_tps),
        peak_memory_mb: samples.iter().map(|s| s.peak_memory_mb).fold(0.0, f64::max),
        tokens: samples
            .first()
            .map(|s| s.tokens.clone())
            .unwrap_or_default(),
        build_us_by_op: None,
        paired_ratio: None,
        tokens_equal_every_repeat: None,
    }
}

/// The lmspec side: a loaded model and its prompt.
struct Ours {
    model: Model,
    prompt: Vec<u32>,
    params: GenerateParams,
    header: Header,
}

impl Ours {
    fn load(opts: &LoadOptions, a: &BenchArgs) -> Result<Ours> {
        if a.gen_tokens < 2 || a.repeat == 0 {
            bail!("--gen-tokens must be at least 2 and --repeat at least 1");
        }
        let start = Instant::now();
        let model = Model::load(&a.model, &opts.clone().with_weights(a.weights))?;
        // Materialise the weights with one single-token forward.
        let warm = model.forward(&mlx_rs::Array::from_slice(&[0i32], &[1, 1]), None)?;
        warm.eval()?;
        let load_s = start.elapsed().as_secs_f64();
        let vocab = match model.config.get("vocab_size") {
            Some(lmspec_spec::expr::Value::Int(v)) if *v > 1 => *v as usize,
            _ => bail!("the model's config has no vocab_size"),
        };
        if let Some(context) = model.context_length() {
            let wanted = (a.prompt_tokens + a.gen_tokens) as u64;
            if wanted > context {
                bail!(
                    "{}: --prompt-tokens {} plus --gen-tokens {} need {wanted} positions; \
                     the model's context has {context}",
                    a.model.display(),
                    a.prompt_tokens,
                    a.gen_tokens
                );
            }
        }
        let prompt = prompt_tokens(a.prompt_tokens, vocab);
        let graph = decode_graph(&model, &prompt)?;
        let header = Header {
            engine: "lmspec".into(),
            model: a.model.display().to_string(),
            weights: if model.dequantized {
                "dense"
            } else {
                "quantized"
            }
            .into(),
            device: runtime::default_device().to_string(),
            prompt_tokens: prompt.len(),
            gen_tokens: a.gen_tokens,
            load_s,
            decode_graph: graph,
            decode_step_us: None,
            mlx_version: runtime::mlx_version(),
            mlx_lm_version: None,
            llama_cpp_version: None,
            threads: Some(lmspec_engine::cpu_kernels::threads()),
            activations: Some(model.activations.name().to_string()),
            prompt: Some(prompt.clone()),
        };
        let params = GenerateParams {
            max_tokens: a.gen_tokens,
            ..Default::default()
        };
        Ok(Ours {
            model,
            prompt,
            params,
            header,
        })
    }

    fn repeat(&self) -> Result<Sample> {
        lmspec_engine::memory::reset_peak()?;
        let mut cache = self.model.new_cache_with(self.params.cache);
        let t0 = Instant::now();
        let mut g = TokenGenerator::new(
            &self.model,
            &mut cache,
            &self.prompt,
            &self.params,
            &mut |_, _| {},
        )?;
        let mut tokens = Vec::with_capacity(self.params.max_tokens);
        tokens.push(g.next_token().ok_or_else(|| anyhow!("no first token"))??);
        let t1 = Instant::now();
        while let Some(t) = g.next_token() {
            tokens.push(t?);
        }
        let t2 = Instant::now();
        let times = g.step_times();
        drop(g);
        let per_step = |d: std::time::Duration| d.as_secs_f64() * 1e6 / times.steps.max(1) as f64;
        let first = (t1 - t0).as_secs_f64();
        Ok(Sample {
            ttft_s: first,
            prefill_tps: self.prompt.len() as f64 / first,
            decode_tps: (tokens.len() - 1) as f64 / (t2 - t1).as_secs_f64(),
            peak_memory_mb: lmspec_engine::memory::peak_bytes()? as f64 / 1e6,
            tokens,
            step_us: Some([
                per_step(times.build),
                per_step(times.launch),
                per_step(times.wait),
            ]),
        })
    }
}

/// The primitives MLX runs for one decode step (a one-token forward after
/// the prompt, and the greedy choice), by kind, with their total. Of the
/// first two steps after the prompt the smaller is reported: the KV cache
/// grows every 256 positions, and a step that grows it records more (at
/// most one of two neighbouring steps does).
fn decode_graph(model: &Model, prompt: &[u32]) -> Result<DecodeGraph> {
    let mut cache = model.new_cache();
    let ids: Vec<i32> = prompt.iter().map(|&t| t as i32).collect();
    let n = ids.len() as i32;
    // The prompt's cache only: its logits (every row through the head) are
    // not needed.
    model.forward(&mlx_rs::Array::from_slice(&ids, &[1, n]), Some(&mut cache))?;
    mlx_rs::transforms::eval(cache.arrays())?;
    let mut best: Option<DecodeGraph> = None;
    for _ in 0..2 {
        let logits = model.forward(
            &mlx_rs::Array::from_slice(&ids[..1], &[1, 1]),
            Some(&mut cache),
        )?;
        let v = *logits.shape().last().unwrap_or(&0);
        let id = mlx_rs::ops::indexing::argmax_axis(&logits.reshape(&[-1, v])?, -1, None)?;
        let by_kind = runtime::primitive_census(&runtime::graph_dot(&[&id])?);
        id.eval()?;
        mlx_rs::transforms::eval(cache.arrays())?;
        let step = DecodeGraph {
            total: by_kind.values().sum(),
            by_kind,
        };
        if best.as_ref().is_none_or(|b| step.total < b.total) {
            best = Some(step);
        }
    }
    best.ok_or_else(|| anyhow::anyhow!("no decode step"))
}

/// The engine a benchmark compares lmspec with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reference {
    /// Python mlx-lm on the same libmlx: `bench_mlx_lm.py --serve` run by
    /// `$LMSPEC_PYTHON` (default: the setup's `.venv/bin/python`).
    MlxLm,
    /// llama.cpp through llama-cpp-python: `bench_llama_cpp.py --serve` run
    /// by `$LMSPEC_LLAMA_CPP_PYTHON` (default: `.venv-llama-cpp/bin/python`,
    /// which `.ci/llama-cpp-env.sh` builds), on the same GGUF with as many
    /// threads as lmspec's CPU kernels use.
    LlamaCpp,
}

impl Reference {
    pub fn parse(s: &str) -> Option<Reference> {
        match s {
            "mlx-lm" => Some(Reference::MlxLm),
            "llama.cpp" => Some(Reference::LlamaCpp),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Reference::MlxLm => "mlx-lm",
            Reference::LlamaCpp => "llama.cpp",
        }
    }
}

/// The other engine's side, one repeat per request.
struct Theirs {
    child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
    header: Header,
    _dir: tempfile::TempDir,
}

impl Theirs {
    fn start(root: &Path, a: &BenchArgs, ours: &Header, reference: Reference) -> Result<Theirs> {
        let (var, default, script) = match reference {
            Reference::MlxLm => ("LMSPEC_PYTHON", ".venv/bin/python", "bench_mlx_lm.py"),
            Reference::LlamaCpp => (
                "LMSPEC_LLAMA_CPP_PYTHON",
                ".venv-llama-cpp/bin/python",
                "bench_llama_cpp.py",
            ),
        };
        let python = std::env::var_os(var)
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join(default));
        if !python.exists() {
            bail!(
                "{}: no Python for the {} benchmark (set {var}{})",
                python.display(),
                reference.name(),
                match reference {
                    Reference::LlamaCpp => ", or run `bash .ci/llama-cpp-env.sh`",
                    Reference::MlxLm => ", or run `make setup`",
                }
            );
        }
        if reference == Reference::LlamaCpp && a.model.extension().is_none_or(|e| e != "gguf") {
            bail!(
                "--against llama.cpp needs a .gguf model, not {}",
                a.model.display()
            );
        }
        let script = root.join("porting-tools/python").join(script);
        let dir = tempfile::tempdir()?;
        let tokens = dir.path().join("prompt.json");
        std::fs::write(&tokens, serde_json::to_string(&ours.prompt)?)?;
        let weights = ours.weights.as_str();
        let mut cmd = Command::new(&python);
        // Same libmlx, same BLAS: give the Python process the BLAS this one uses.
        if let Some(blas) = runtime::blas_library() {
            if runtime::blas_kind(&blas) != "reference BLAS (netlib)" {
                cmd.env("LD_PRELOAD", &blas);
            }
        }
        let mut child = cmd
            .arg(&script)
            .arg("--serve")
            .arg("--model")
            .arg(&a.model)
            .arg("--tokens-file")
            .arg(&tokens)
            .args(["--gen-tokens", &a.gen_tokens.to_string()])
            .args(["--weights", weights])
            .args(match reference {
                Reference::LlamaCpp => vec![
                    "--threads".to_string(),
                    lmspec_engine::cpu_kernels::threads().to_string(),
                ],
                Reference::MlxLm => vec![],
            })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("running {}", python.display()))?;
        let input = child
            .stdin
            .take()
            .context("reference benchmark: no stdin")?;
        let output = BufReader::new(
            child
                .stdout
                .take()
                .context("reference benchmark: no stdout")?,
        );
        let mut output = output;
        let header = read_line(&mut child, &mut output)?;
        Ok(Theirs {
            child,
            input,
            output,
            header,
            _dir: dir,
        })
    }

    fn repeat(&mut self) -> Result<Sample> {
        writeln!(self.input, "repeat")?;
        self.input.flush()?;
        let line: RepeatLine = read_line(&mut self.child, &mut self.output)?;
        Ok(line.into())
    }

    fn finish(self) -> Result<Header> {
        let Theirs {
            mut child,
            input,
            header,
            ..
        } = self;
        drop(input);
        let status = child.wait()?;
        if !status.success() {
            bail!("the reference benchmark failed ({status}); its messages are above");
        }
        Ok(header)
    }
}

/// The next JSON line of the reference benchmark.
fn read_line<T: serde::de::DeserializeOwned>(
    child: &mut Child,
    output: &mut BufReader<ChildStdout>,
) -> Result<T> {
    let mut line = String::new();
    if output.read_line(&mut line)? == 0 {
        let status = child.wait()?;
        bail!("the reference benchmark ended early ({status}); its messages are above");
    }
    serde_json::from_str(&line)
        .with_context(|| format!("reference benchmark output is not what lmspec reads: {line}"))
}

/// What one `lmspec bench` run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    #[serde(rename = "lmspec")]
    pub ours: EngineReport,
    #[serde(rename = "mlx_lm")]
    pub theirs: Option<EngineReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub llama_cpp: Option<EngineReport>,
}

impl Report {
    /// The other engine's report and name, if there was one.
    pub fn reference(&self) -> Option<(&EngineReport, &'static str)> {
        match (&self.theirs, &self.llama_cpp) {
            (Some(t), _) => Some((t, Reference::MlxLm.name())),
            (None, Some(t)) => Some((t, Reference::LlamaCpp.name())),
            _ => None,
        }
    }
}

/// Runs the benchmark. With `against_mlx_lm`, both engines stay loaded
/// and their repeats alternate (lmspec, mlx-lm, mlx-lm, lmspec, ...), so
/// slow drifts of the machine meet both alike; the per-repeat ratios of
/// neighbouring repeats are reported besides the medians.
pub fn run(
    opts: &LoadOptions,
    root: &Path,
    a: &BenchArgs,
    against: Option<Reference>,
) -> Result<Report> {
    let ours = Ours::load(opts, a)?;
    // One untimed repeat, as the reference scripts take: kernels compiled
    // for the prompt's shapes (on a GPU, at first use), memory pools filled.
    ours.repeat()?;
    lmspec_engine::plan::profile_ops(a.profile_ops);
    let mut theirs = match against {
        Some(r) => Some(Theirs::start(root, a, &ours.header, r)?),
        None => None,
    };
    let (mut mine, mut other) = (Vec::new(), Vec::new());
    for r in 0..a.repeat {
        match theirs.as_mut() {
            Some(t) if r % 2 == 1 => {
                other.push(t.repeat()?);
                mine.push(ours.repeat()?);
            }
            Some(t) => {
                mine.push(ours.repeat()?);
                other.push(t.repeat()?);
            }
            None => mine.push(ours.repeat()?),
        }
    }
    let mut ours_report = summarise(ours.header.clone(), &mine);
    if a.profile_ops {
        lmspec_engine::plan::profile_ops(false);
        let times = lmspec_engine::plan::op_times();
        let forwards = times.forwards.max(1) as f64;
        let mut by_op: Vec<(&str, f64)> = times
            .by_op
            .into_iter()
            .map(|(k, d)| (k, d.as_secs_f64() * 1e6 / forwards))
            .collect();
        by_op.sort_by(|x, y| y.1.total_cmp(&x.1));
        ours_report.build_us_by_op = Some(
            by_op
                .into_iter()
                .map(|(k, us)| (k.to_string(), us))
                .collect(),
        );
    }
    let theirs_report = match theirs {
        Some(t) => {
            let report = summarise(t.finish()?, &other);
            let paired = |f: fn(&Sample) -> f64| {
                Spread::of(
                    &mine
                        .iter()
                        .zip(&other)
                        .map(|(m, o)| f(m) / f(o))
                        .collect::<Vec<_>>(),
                )
            };
            ours_report.paired_ratio = Some(PairedRatio {
                prefill_tps: paired(|s| s.prefill_tps),
                decode_tps: paired(|s| s.decode_tps),
            });
            ours_report.tokens_equal_every_repeat =
                Some(mine.iter().zip(&other).all(|(m, o)| m.tokens == o.tokens));
            Some(report)
        }
        None => None,
    };
    let (theirs, llama_cpp) = match against {
        Some(Reference::LlamaCpp) => (None, theirs_report),
        _ => (theirs_report, None),
    };
    Ok(Report {
        ours: ours_report,
        theirs,
        llama_cpp,
    })
}

/// A side-by-side table of two reports.
pub fn ratio_table(ours: &EngineReport, theirs: &EngineReport, name: &str) -> String {
    let (h, t) = (&ours.header, &theirs.header);
    let activations = h
        .activations
        .as_ref()
        .map(|a| format!(" ({a} activations)"))
        .unwrap_or_default();
    let mut s = format!(
        "model {}  weights lmspec={}{activations} {name}={}  device {}  prompt {} tokens, {} generated, {} repeats\n",
        h.model, h.weights, t.weights, h.device, h.prompt_tokens, h.gen_tokens, ours.repeat
    );
    s.push_str(&format!(
        "{:<22} {:>12} {:>12} {:>8}\n",
        "metric", "lmspec", name, "ratio"
    ));
    let rows = [
        (
            "prefill tokens/s",
            ours.prefill_tps.median,
            theirs.prefill_tps.median,
            false,
        ),
        (
            "decode tokens/s",
            ours.decode_tps.median,
            theirs.decode_tps.median,
            false,
        ),
        (
            "time to first token s",
            ours.ttft_s.median,
            theirs.ttft_s.median,
            true,
        ),
        ("load s", h.load_s, t.load_s, true),
        (
            "peak memory MB",
            ours.peak_memory_mb,
            theirs.peak_memory_mb,
            true,
        ),
        (
            "primitives per decode",
            h.decode_graph.total as f64,
            t.decode_graph.total as f64,
            true,
        ),
    ];
    for (name, a, b, lower_better) in rows {
        let ratio = if lower_better { b / a } else { a / b };
        s.push_str(&format!("{name:<22} {a:>12.3} {b:>12.3} {ratio:>7.2}x\n"));
    }
    if let Some(p) = &ours.paired_ratio {
        for (name, r) in [("prefill", p.prefill_tps), ("decode", p.decode_tps)] {
            s.push_str(&format!(
                "{name} ratio of neighbouring repeats: median {:.2}x (range {:.2}x-{:.2}x)\n",
                r.median, r.min, r.max
            ));
        }
    }
    let same = ours.tokens == theirs.tokens;
    s.push_str(&format!(
        "greedy tokens identical: {}\n(ratio > 1 means lmspec is better)\n",
        if same { "yes" } else { "NO" }
    ));
    s
}
