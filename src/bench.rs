//! `lmspec bench`: load time, time to first token, prefill and decode
//! tokens/s and peak memory, median and spread over repeats; optionally the
//! same measured with mlx-lm (`porting-tools/python/bench_mlx_lm.py`) on the
//! same prompt, with a ratio table. Every timing ends on a read-back of a
//! token, so MLX's lazy work is inside it.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use lmspec::engine::generate::{GenerateParams, TokenGenerator};
use lmspec::engine::model::WeightPlan;
use lmspec::engine::{runtime, Model, SpecLibrary};
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
    let mut rng = lmspec::engine::sampling::Rng::new(Some(0));
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
}

/// Runs the lmspec side and returns its JSON report.
pub fn run_lmspec(lib: &SpecLibrary, a: &BenchArgs) -> Result<Value> {
    if a.gen_tokens < 2 || a.repeat == 0 {
        bail!("--gen-tokens must be at least 2 and --repeat at least 1");
    }
    let start = Instant::now();
    let model = Model::load_planned(&a.model, lib, None, a.weights)?;
    // Materialise the weights with one single-token forward.
    let warm = model.forward(&mlx_rs::Array::from_slice(&[0i32], &[1, 1]), None)?;
    warm.eval()?;
    let load_s = start.elapsed().as_secs_f64();
    let vocab = match model.config.get("vocab_size") {
        Some(lmspec::engine::spec::expr::Value::Int(v)) if *v > 1 => *v as usize,
        _ => bail!("the model's config has no vocab_size"),
    };
    let prompt = prompt_tokens(a.prompt_tokens, vocab);
    let params = GenerateParams {
        max_tokens: a.gen_tokens,
        ..Default::default()
    };
    let (mut ttft, mut prefill, mut decode, mut peak) =
        (Vec::new(), Vec::new(), Vec::new(), 0usize);
    let mut first_tokens = Vec::new();
    for r in 0..a.repeat {
        mlx_rs::memory::reset_peak_memory()?;
        let mut cache = model.new_cache_with(params.cache);
        let t0 = Instant::now();
        let mut g = TokenGenerator::new(&model, &mut cache, &prompt, &params, &mut |_, _| {})?;
        let mut tokens = Vec::with_capacity(a.gen_tokens);
        tokens.push(g.next_token().ok_or_else(|| anyhow!("no first token"))??);
        let t1 = Instant::now();
        while let Some(t) = g.next_token() {
            tokens.push(t?);
        }
        let t2 = Instant::now();
        drop(g);
        let first = (t1 - t0).as_secs_f64();
        ttft.push(first);
        prefill.push(prompt.len() as f64 / first);
        decode.push((tokens.len() - 1) as f64 / (t2 - t1).as_secs_f64());
        peak = peak.max(mlx_rs::memory::peak_memory()?);
        if r == 0 {
            first_tokens = tokens;
        }
    }
    Ok(json!({
        "engine": "lmspec",
        "model": a.model.display().to_string(),
                "weights": if model.dequantized { "dense" } else { "quantized" },
        "device": runtime::default_device(),
        "prompt_tokens": prompt.len(),
        "gen_tokens": a.gen_tokens,
        "repeat": a.repeat,
        "load_s": load_s,
        "ttft_s": spread(&ttft),
        "prefill_tps": spread(&prefill),
        "decode_tps": spread(&decode),
        "peak_memory_mb": peak as f64 / 1e6,
        "tokens": first_tokens,
        "mlx_version": runtime::mlx_version(),
        "prompt": prompt,
    }))
}

/// Runs the mlx-lm side on the same prompt and representation, with
/// `$LMSPEC_PYTHON` (default: the setup's `.venv/bin/python`).
pub fn run_mlx_lm(root: &Path, a: &BenchArgs, ours: &Value) -> Result<Value> {
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
    let out = cmd
        .arg(&script)
        .arg("--model")
        .arg(&a.model)
        .arg("--tokens-file")
        .arg(&tokens)
        .args(["--gen-tokens", &a.gen_tokens.to_string()])
        .args(["--repeat", &a.repeat.to_string()])
        .args(["--weights", weights])
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !out.status.success() {
        bail!(
            "mlx-lm benchmark failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("mlx-lm benchmark output is not JSON")
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
    ];
    for (name, a, b, lower_better) in rows {
        let ratio = if lower_better { b / a } else { a / b };
        s.push_str(&format!("{name:<22} {a:>12.3} {b:>12.3} {ratio:>7.2}x\n"));
    }
    let same = ours["tokens"] == theirs["tokens"];
    s.push_str(&format!(
        "greedy tokens identical: {}\n(ratio > 1 means lmspec is better)\n",
        if same { "yes" } else { "NO" }
    ));
    s
}
