//! `lmspec bench`: load time, time to first token, prefill and decode
//! tokens/s and peak memory, median and spread over repeats; optionally the
//! same measured with mlx-lm (`porting-tools/python/bench_mlx_lm.py`) on the
//! same prompt, with a ratio table. Every timing ends on a read-back of a
//! token, so MLX's lazy work is inside it.
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use lmspec::engine::model::WeightPlan;
use lmspec::engine::{runtime, LoadOptions, Model};
use lmspec::lm::generate::{GenerateParams, TokenGenerator};
use serde_json::{json, Value};

/// Median (mean of the middle two for even counts), min and max.
pub fn spread(xs: &[f64]) -> Value {
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
    json!({"median": median, "min": v.first().copied().unwrap_or(0.0), "max": v.last().copied().unwrap_or(0.0)})
}

/// A deterministic prompt of `n` token ids below `vocab` (SplitMix64 from 0).
pub fn prompt_tokens(n: usize, vocab: usize) -> Vec<u32> {
    let mut rng = lmspec::lm::sampling::Rng::new(Some(0));
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

impl Sample {
    fn from_json(v: &Value) -> Result<Sample> {
        let num = |k: &str| {
            v[k].as_f64()
                .ok_or_else(|| anyhow!("mlx-lm repeat has no number `{k}`: {v}"))
        };
        let tokens = v["tokens"]
            .as_array()
            .ok_or_else(|| anyhow!("mlx-lm repeat has no `tokens`: {v}"))?
            .iter()
            .map(|t| t.as_u64().map(|t| t as u32))
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| anyhow!("mlx-lm repeat has a non-integer token: {v}"))?;
        Ok(Sample {
            ttft_s: num("ttft_s")?,
            prefill_tps: num("prefill_tps")?,
            decode_tps: num("decode_tps")?,
            peak_memory_mb: num("peak_memory_mb")?,
            tokens,
            step_us: None,
        })
    }
}

/// Fills the per-repeat fields of `report` from `samples`.
fn summarise(mut report: Value, samples: &[Sample]) -> Value {
    let pick = |f: fn(&Sample) -> f64| spread(&samples.iter().map(f).collect::<Vec<_>>());
    report["repeat"] = json!(samples.len());
    report["ttft_s"] = pick(|s| s.ttft_s);
    report["prefill_tps"] = pick(|s| s.prefill_tps);
    report["decode_tps"] = pick(|s| s.decode_tps);
    report["peak_memory_mb"] = json!(samples.iter().map(|s| s.peak_memory_mb).fold(0.0, f64::max));
    report["tokens"] = json!(samples
        .first()
        .map(|s| s.tokens.clone())
        .unwrap_or_default());
    let steps: Vec<[f64; 3]> = samples.iter().filter_map(|s| s.step_us).collect();
    if !steps.is_empty() {
        let part =
            |i: usize| spread(&steps.iter().map(|s| s[i]).collect::<Vec<_>>())["median"].clone();
        report["decode_step_us"] = json!({"build": part(0), "launch": part(1), "wait": part(2)});
    }
    report
}

/// The lmspec side: a loaded model and its prompt.
struct Ours {
    model: Model,
    prompt: Vec<u32>,
    params: GenerateParams,
    header: Value,
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
            Some(lmspec::spec::expr::Value::Int(v)) if *v > 1 => *v as usize,
            _ => bail!("the model's config has no vocab_size"),
        };
        let prompt = prompt_tokens(a.prompt_tokens, vocab);
        let graph = decode_graph(&model, &prompt)?;
        let header = json!({
            "engine": "lmspec",
            "model": a.model.display().to_string(),
            "weights": if model.dequantized { "dense" } else { "quantized" },
            "device": runtime::default_device(),
            "prompt_tokens": prompt.len(),
            "gen_tokens": a.gen_tokens,
            "load_s": load_s,
            "decode_graph": graph,
            "mlx_version": runtime::mlx_version(),
            "prompt": prompt,
        });
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
        mlx_rs::memory::reset_peak_memory()?;
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
            peak_memory_mb: mlx_rs::memory::peak_memory()? as f64 / 1e6,
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
/// the prompt, and the greedy choice), by kind, with their total.
fn decode_graph(model: &Model, prompt: &[u32]) -> Result<Value> {
    let mut cache = model.new_cache();
    let ids: Vec<i32> = prompt.iter().map(|&t| t as i32).collect();
    let n = ids.len() as i32;
    model
        .forward(&mlx_rs::Array::from_slice(&ids, &[1, n]), Some(&mut cache))?
        .eval()?;
    mlx_rs::transforms::eval(cache.arrays())?;
    let logits = model.forward(
        &mlx_rs::Array::from_slice(&ids[..1], &[1, 1]),
        Some(&mut cache),
    )?;
    let v = *logits.shape().last().unwrap_or(&0);
    let id = mlx_rs::ops::indexing::argmax_axis(&logits.reshape(&[-1, v])?, -1, None)?;
    let census = runtime::primitive_census(&runtime::graph_dot(&[&id])?);
    let total: usize = census.values().sum();
    Ok(json!({"total": total, "by_kind": census}))
}

/// The mlx-lm side: `porting-tools/python/bench_mlx_lm.py --serve` run by
/// `$LMSPEC_PYTHON` (default: the setup's `.venv/bin/python`), one repeat
/// per request.
struct Theirs {
    child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
    header: Value,
    _dir: tempfile::TempDir,
}

impl Theirs {
    fn start(root: &Path, a: &BenchArgs, ours: &Value) -> Result<Theirs> {
        let python = std::env::var_os("LMSPEC_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join(".venv/bin/python"));
        let script = root.join("porting-tools/python/bench_mlx_lm.py");
        let dir = tempfile::tempdir()?;
        let tokens = dir.path().join("prompt.json");
        std::fs::write(&tokens, ours["prompt"].to_string())?;
        let weights = ours["weights"].as_str().unwrap_or("quantized");
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
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("running {}", python.display()))?;
        let input = child.stdin.take().context("mlx-lm benchmark: no stdin")?;
        let output = BufReader::new(child.stdout.take().context("mlx-lm benchmark: no stdout")?);
        let mut theirs = Theirs {
            child,
            input,
            output,
            header: Value::Null,
            _dir: dir,
        };
        theirs.header = theirs.read_line()?;
        Ok(theirs)
    }

    fn read_line(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.output.read_line(&mut line)? == 0 {
            let status = self.child.wait()?;
            bail!("the mlx-lm benchmark ended early ({status}); its messages are above");
        }
        serde_json::from_str(&line)
            .with_context(|| format!("mlx-lm benchmark output is not JSON: {line}"))
    }

    fn repeat(&mut self) -> Result<Sample> {
        writeln!(self.input, "repeat")?;
        self.input.flush()?;
        Sample::from_json(&self.read_line()?)
    }

    fn finish(self) -> Result<Value> {
        let Theirs {
            mut child,
            input,
            header,
            ..
        } = self;
        drop(input);
        let status = child.wait()?;
        if !status.success() {
            bail!("the mlx-lm benchmark failed ({status}); its messages are above");
        }
        Ok(header)
    }
}

/// What one `lmspec bench` run measured.
#[derive(Debug)]
pub struct Report {
    pub ours: Value,
    pub theirs: Option<Value>,
}

/// Runs the benchmark. With `against_mlx_lm`, both engines stay loaded
/// and their repeats alternate (lmspec, mlx-lm, mlx-lm, lmspec, ...), so
/// slow drifts of the machine meet both alike; the per-repeat ratios of
/// neighbouring repeats are reported besides the medians.
pub fn run(opts: &LoadOptions, root: &Path, a: &BenchArgs, against_mlx_lm: bool) -> Result<Report> {
    let ours = Ours::load(opts, a)?;
    lmspec::engine::plan::profile_ops(a.profile_ops);
    let mut theirs = match against_mlx_lm {
        true => Some(Theirs::start(root, a, &ours.header)?),
        false => None,
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
        lmspec::engine::plan::profile_ops(false);
        let times = lmspec::engine::plan::op_times();
        let forwards = times.forwards.max(1) as f64;
        let mut by_op: Vec<(&str, f64)> = times
            .by_op
            .into_iter()
            .map(|(k, d)| (k, d.as_secs_f64() * 1e6 / forwards))
            .collect();
        by_op.sort_by(|x, y| y.1.total_cmp(&x.1));
        let by_op: serde_json::Map<String, Value> = by_op
            .into_iter()
            .map(|(k, us)| (k.to_string(), json!(us)))
            .collect();
        ours_report["build_us_by_op"] = Value::Object(by_op);
    }
    let theirs_report = match theirs {
        Some(t) => {
            let report = summarise(t.finish()?, &other);
            let paired = |f: fn(&Sample) -> f64| {
                spread(
                    &mine
                        .iter()
                        .zip(&other)
                        .map(|(m, o)| f(m) / f(o))
                        .collect::<Vec<_>>(),
                )
            };
            ours_report["paired_ratio"] = json!({
                "prefill_tps": paired(|s| s.prefill_tps),
                "decode_tps": paired(|s| s.decode_tps),
            });
            ours_report["tokens_equal_every_repeat"] =
                json!(mine.iter().zip(&other).all(|(m, o)| m.tokens == o.tokens));
            Some(report)
        }
        None => None,
    };
    Ok(Report {
        ours: ours_report,
        theirs: theirs_report,
    })
}

fn med(v: &Value, key: &str) -> f64 {
    v[key]["median"].as_f64().unwrap_or(f64::NAN)
}

/// A side-by-side table of two reports.
pub fn ratio_table(ours: &Value, theirs: &Value) -> String {
    let mut s = format!(
        "model {}  weights lmspec={} mlx-lm={}  device {}  prompt {} tokens, {} generated, {} repeats\n",
        ours["model"].as_str().unwrap_or(""),
        ours["weights"].as_str().unwrap_or(""),
        theirs["weights"].as_str().unwrap_or(""),
        ours["device"].as_str().unwrap_or(""),
        ours["prompt_tokens"],
        ours["gen_tokens"],
        ours["repeat"]
    );
    s.push_str(&format!(
        "{:<22} {:>12} {:>12} {:>8}\n",
        "metric", "lmspec", "mlx-lm", "ratio"
    ));
    let rows = [
        (
            "prefill tokens/s",
            med(ours, "prefill_tps"),
            med(theirs, "prefill_tps"),
            false,
        ),
        (
            "decode tokens/s",
            med(ours, "decode_tps"),
            med(theirs, "decode_tps"),
            false,
        ),
        (
            "time to first token s",
            med(ours, "ttft_s"),
            med(theirs, "ttft_s"),
            true,
        ),
        (
            "load s",
            ours["load_s"].as_f64().unwrap_or(f64::NAN),
            theirs["load_s"].as_f64().unwrap_or(f64::NAN),
            true,
        ),
        (
            "peak memory MB",
            ours["peak_memory_mb"].as_f64().unwrap_or(f64::NAN),
            theirs["peak_memory_mb"].as_f64().unwrap_or(f64::NAN),
            true,
        ),
        (
            "primitives per decode",
            ours["decode_graph"]["total"].as_f64().unwrap_or(f64::NAN),
            theirs["decode_graph"]["total"].as_f64().unwrap_or(f64::NAN),
            true,
        ),
    ];
    for (name, a, b, lower_better) in rows {
        let ratio = if lower_better { b / a } else { a / b };
        s.push_str(&format!("{name:<22} {a:>12.3} {b:>12.3} {ratio:>7.2}x\n"));
    }
    for (name, key) in [("prefill", "prefill_tps"), ("decode", "decode_tps")] {
        let p = &ours["paired_ratio"][key];
        if let (Some(m), Some(lo), Some(hi)) =
            (p["median"].as_f64(), p["min"].as_f64(), p["max"].as_f64())
        {
            s.push_str(&format!(
                "{name} ratio of neighbouring repeats: median {m:.2}x (range {lo:.2}x-{hi:.2}x)\n"
            ));
        }
    }
    let same = ours["tokens"] == theirs["tokens"];
    s.push_str(&format!(
        "greedy tokens identical: {}\n(ratio > 1 means lmspec is better)\n",
        if same { "yes" } else { "NO" }
    ));
    s
}
