//! Golden cases: a folder under `goldens/` with `meta.json`, a model
//! directory and `golden.safetensors` written by
//! `porting-tools/python/make_golden.py` from mlx-lm.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use indexmap::IndexMap;
use lmspec_engine::{LoadOptions, Model};
use lmspec_lm::generate::{GenerateParams, TokenGenerator};
use mlx_rs::{Array, Dtype};

use crate::tolerance::{compare, Stats, Tolerance};

/// One golden case as stored on disk.
#[derive(Debug)]
pub struct Golden {
    pub dir: PathBuf,
    pub meta: serde_json::Value,
    pub tokens: Vec<i32>,
    pub logits: Array,
    pub prefill_decode_logits: Array,
    pub greedy: Vec<i32>,
    /// Named intermediate values (`tap.<name>` in the file), in forward
    /// order when `meta.json` lists them.
    pub taps: IndexMap<String, Array>,
}

fn ints(a: &Array) -> Result<Vec<i32>> {
    let a = a.as_dtype(Dtype::Int32)?;
    a.eval()?;
    Ok(a.as_slice::<i32>().to_vec())
}

impl Golden {
    pub fn load(dir: &Path) -> Result<Golden> {
        let meta_path = dir.join("meta.json");
        let meta: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&meta_path)
                .with_context(|| meta_path.display().to_string())?,
        )
        .with_context(|| meta_path.display().to_string())?;
        let file = dir.join("golden.safetensors");
        let mut t: HashMap<String, Array> =
            Array::load_safetensors(&file).map_err(|e| anyhow!("{}: {e}", file.display()))?;
        let mut take = |k: &str| {
            t.remove(k)
                .ok_or_else(|| anyhow!("{}: no tensor '{k}'", file.display()))
        };
        let tokens = ints(&take("tokens")?)?;
        let logits = take("logits")?;
        // An encoder's case holds its output for the whole input only.
        let (prefill_decode_logits, greedy) = if is_encoder(&meta) {
            (logits.clone(), Vec::new())
        } else {
            (take("prefill_decode_logits")?, ints(&take("greedy")?)?)
        };
        let mut found: Vec<(String, Array)> = t
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix("tap.").map(|n| (n.to_string(), v)))
            .collect();
        found.sort_by(|a, b| a.0.cmp(&b.0));
        let mut taps: IndexMap<String, Array> = IndexMap::new();
        let listed = meta
            .get("taps")
            .and_then(|t| t.as_array())
            .cloned()
            .unwrap_or_default();
        for name in listed.iter().filter_map(|n| n.as_str()) {
            if let Some(k) = found.iter().position(|(n, _)| n == name) {
                let (n, a) = found.remove(k);
                taps.insert(n, a);
            }
        }
        taps.extend(found);
        Ok(Golden {
            dir: dir.to_path_buf(),
            tokens,
            logits,
            prefill_decode_logits,
            greedy,
            taps,
            meta,
        })
    }

    /// Every case folder under `root`, sorted.
    pub fn cases(root: &Path) -> Result<Vec<PathBuf>> {
        let mut out: Vec<PathBuf> = std::fs::read_dir(root)
            .with_context(|| root.display().to_string())?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("meta.json").exists() && p.join("golden.safetensors").exists())
            .collect();
        out.sort();
        Ok(out)
    }

    /// The golden's own model folder, or the one `meta.json` names.
    pub fn model_dir(&self) -> PathBuf {
        match self.meta.get("model_dir").and_then(|d| d.as_str()) {
            Some(d) if !self.dir.join("model").exists() => PathBuf::from(d),
            _ => self.dir.join("model"),
        }
    }

    /// The tolerance the case is held to: by its weights (quantized, or
    /// their dtype), or looser where its activations are half precision
    /// (`activation_dtype`: one rounding of a half-precision value apart is
    /// already ~1e-3, e.g. a float16 embedding output on another backend).
    pub fn tolerance(&self) -> Tolerance {
        tolerance_of(&self.meta)
    }

    /// Where the prefill-then-decode run splits the tokens: the prompt's
    /// first part in one call, then one token at a time.
    pub fn prefill_split(&self) -> usize {
        self.meta
            .get("prefill_split")
            .and_then(|v| v.as_u64())
            .unwrap_or(self.tokens.len() as u64 / 2) as usize
    }
}

/// Results of running one golden case through the engine.
#[derive(Debug)]
pub struct Report {
    pub case: String,
    pub spec: String,
    pub tolerance: Tolerance,
    pub forward: Stats,
    pub prefill_decode: Stats,
    pub greedy: Vec<i32>,
    pub expected_greedy: Vec<i32>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.forward.within(self.tolerance)
            && self.prefill_decode.within(self.tolerance)
            && self.greedy == self.expected_greedy
    }
}

fn row(tokens: &[i32]) -> Array {
    Array::from_slice(tokens, &[1, tokens.len() as i32])
}

/// Greedy continuation through the engine's token loop, which feeds tokens
/// the way mlx-lm's generate_step does (the prompt but its last token, then
/// one token at a time).
pub fn greedy(model: &Model, prompt: &[i32], n: usize) -> Result<Vec<i32>> {
    let params = GenerateParams {
        max_tokens: n,
        ..Default::default()
    };
    let prompt: Vec<u32> = prompt.iter().map(|&t| t as u32).collect();
    let mut cache = model.new_cache();
    let mut g = TokenGenerator::new(model, &mut cache, &prompt, &params, &mut |_, _| {})?;
    let mut out = Vec::with_capacity(n);
    while let Some(t) = g.next_token() {
        out.push(t? as i32);
    }
    Ok(out)
}

/// Whether `meta.json` marks an encoder's case (`"encoder": true`): the
/// output of one whole forward, no cached path, no continuation.
pub(crate) fn is_encoder(meta: &serde_json::Value) -> bool {
    meta.get("encoder").and_then(|e| e.as_bool()) == Some(true)
}

/// Runs a golden case: a whole-prompt forward, a prefill-then-decode with
/// the cache, and the greedy continuation (an encoder's: the forward only).
/// mlx-lm's tensors are float32 numerics, held to float32 tolerances: a
/// case's quantized products take float32 activations unless `opts` names
/// others (the default for quantized weights, int16, is float32's within
/// a bound of its own, which the kernel tests check).
pub fn run(case: &Path, opts: &LoadOptions) -> Result<Report> {
    let g = Golden::load(case)?;
    let mut opts = opts.clone();
    opts.activations = opts
        .activations
        .or(Some(lmspec_engine::cpu_kernels::Activations::Float));
    let model = Model::load(&g.model_dir(), &opts)?;
    let logits = model.forward(&row(&g.tokens), None)?;
    let shape = g.logits.shape().to_vec();
    let logits = logits.reshape(&shape)?;
    let forward = compare(&logits, &g.logits).map_err(|e| anyhow!("logits: {e}"))?;
    let name = case
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if is_encoder(&g.meta) {
        return Ok(Report {
            case: name,
            spec: model.spec.name.clone(),
            tolerance: g.tolerance(),
            prefill_decode: forward,
            forward,
            greedy: Vec::new(),
            expected_greedy: Vec::new(),
        });
    }

    let split = g.prefill_split();
    let mut cache = model.new_cache();
    let mut parts = vec![model.forward(&row(&g.tokens[..split]), Some(&mut cache))?];
    for &t in &g.tokens[split..] {
        parts.push(model.forward(&row(&[t]), Some(&mut cache))?);
    }
    let stacked = mlx_rs::ops::concatenate(&parts, 1)?.reshape(&shape)?;
    let prefill_decode =
        compare(&stacked, &g.prefill_decode_logits).map_err(|e| anyhow!("prefill/decode: {e}"))?;
    if g.greedy.is_empty() {
        bail!("{}: no greedy tokens", case.display());
    }
    let greedy = greedy(&model, &g.tokens, g.greedy.len())?;
    Ok(Report {
        case: name,
        spec: model.spec.name.clone(),
        tolerance: g.tolerance(),
        forward,
        prefill_decode,
        greedy,
        expected_greedy: g.greedy,
    })
}

/// The tolerance of a case's `meta.json` (see [`Golden::tolerance`]).
fn tolerance_of(meta: &serde_json::Value) -> Tolerance {
    let half = |key: &str| match meta.get(key).and_then(|d| d.as_str()) {
        Some("bfloat16") => Some(Tolerance::Bf16),
        Some("float16") => Some(Tolerance::F16),
        _ => None,
    };
    let weights = match meta.get("quantization").is_some_and(|q| !q.is_null()) {
        true => Tolerance::Quantized,
        false => half("dtype").unwrap_or(Tolerance::F32),
    };
    match half("activation_dtype") {
        Some(h) if h.max_rel() > weights.max_rel() => h,
        _ => weights,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_activations_loosen_the_level_of_the_weights() {
        let level = |meta: serde_json::Value| tolerance_of(&meta);
        assert_eq!(
            level(serde_json::json!({"dtype": "float32"})),
            Tolerance::F32
        );
        assert_eq!(
            level(serde_json::json!({"dtype": "bfloat16"})),
            Tolerance::Bf16
        );
        let q = serde_json::json!({"bits": 2, "group_size": 128});
        assert_eq!(
            level(serde_json::json!({"dtype": "float32", "quantization": q})),
            Tolerance::Quantized
        );
        assert_eq!(
            level(
                serde_json::json!({"dtype": "float32", "quantization": q, "activation_dtype": "float16"})
            ),
            Tolerance::F16
        );
        // Never tighter than the weights' own level.
        assert_eq!(
            level(serde_json::json!({"dtype": "bfloat16", "activation_dtype": "float16"})),
            Tolerance::Bf16
        );
    }
}
