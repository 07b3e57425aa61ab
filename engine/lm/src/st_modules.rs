//! The sentence-transformers files of an embedding checkpoint, read as data:
//! `modules.json` (the module pipeline), `1_Pooling/config.json` (the
//! pooling mode), `2_Dense/` (dense layers: `config.json` and
//! `model.safetensors`), `Normalize`, `sentence_bert_config.json`
//! (`max_seq_length`) and `config_sentence_transformers.json` (named
//! prompts). Every malformed file is an error naming the file and the field.
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::Array;

use lmspec_engine::error::{Error, Result};

/// How token vectors become one sentence vector (sentence-transformers'
/// pooling modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Average over real tokens.
    Mean,
    /// The first token ([CLS]).
    Cls,
    /// Elementwise maximum over real tokens.
    Max,
    /// The last real token.
    Last,
    /// Sum over real tokens divided by the square root of their count.
    MeanSqrtLen,
    /// Average weighted by position (1, 2, ... T).
    WeightedMean,
}

/// `1_Pooling/config.json` keys and the modes they switch on.
const MODE_KEYS: [(&str, Pooling); 6] = [
    ("pooling_mode_cls_token", Pooling::Cls),
    ("pooling_mode_mean_tokens", Pooling::Mean),
    ("pooling_mode_max_tokens", Pooling::Max),
    ("pooling_mode_mean_sqrt_len_tokens", Pooling::MeanSqrtLen),
    ("pooling_mode_weightedmean_tokens", Pooling::WeightedMean),
    ("pooling_mode_lasttoken", Pooling::Last),
];

impl Pooling {
    /// A mode by its sentence-transformers name (`mean`, `cls`, `max`,
    /// `lasttoken`, `mean_sqrt_len_tokens`, `weightedmean`) or its
    /// short names (`first`, `last`).
    pub fn parse(s: &str) -> Option<Pooling> {
        Some(match s {
            "mean" | "mean_tokens" => Pooling::Mean,
            "cls" | "cls_token" | "first" => Pooling::Cls,
            "max" | "max_tokens" => Pooling::Max,
            "last" | "lasttoken" => Pooling::Last,
            "mean_sqrt_len" | "mean_sqrt_len_tokens" => Pooling::MeanSqrtLen,
            "weightedmean" | "weightedmean_tokens" => Pooling::WeightedMean,
            _ => return None,
        })
    }

    /// The mode a pooling `config.json` enables: its `pooling_mode` string,
    /// or exactly one `pooling_mode_*` flag. `dim` is the encoder's width,
    /// checked against `word_embedding_dimension`.
    pub fn from_file(file: &Path, dim: Option<usize>) -> Result<Pooling> {
        let Some(cfg) = json(file)? else {
            return Err(err(
                file,
                "<document>",
                "missing (modules.json lists a Pooling module)",
            ));
        };
        let obj = cfg
            .as_object()
            .ok_or_else(|| err(file, "<document>", "not a JSON object"))?;
        if let (Some(d), Some(v)) = (dim, obj.get("word_embedding_dimension")) {
            let w = v.as_u64().ok_or_else(|| {
                err(
                    file,
                    "word_embedding_dimension",
                    format!("{v} is not a whole number"),
                )
            })?;
            if w as usize != d {
                return Err(err(
                    file,
                    "word_embedding_dimension",
                    format!("{w}, but the encoder's hidden size is {d}"),
                ));
            }
        }
        if let Some(v) = obj.get("pooling_mode") {
            let s = v
                .as_str()
                .ok_or_else(|| err(file, "pooling_mode", format!("{v} is not a string")))?;
            return Pooling::parse(s).ok_or_else(|| {
                err(
                    file,
                    "pooling_mode",
                    format!("unknown mode '{s}' (known: cls, mean, max, lasttoken, mean_sqrt_len_tokens, weightedmean)"),
                )
            });
        }
        let mut on = Vec::new();
        for (key, value) in obj {
            if !key.starts_with("pooling_mode_") {
                continue;
            }
            let flag = value
                .as_bool()
                .ok_or_else(|| err(file, key, format!("{value} is not true or false")))?;
            let Some((_, mode)) = MODE_KEYS.iter().find(|(k, _)| k == key) else {
                return Err(err(file, key, "unknown pooling mode"));
            };
            if flag {
                on.push((key.as_str(), *mode));
            }
        }
        match on.as_slice() {
            [(_, one)] => Ok(*one),
            [] => Err(err(file, "pooling_mode_*", "no pooling mode is enabled")),
            [_, (second, _), ..] => Err(err(
                file,
                *second,
                "more than one pooling mode is enabled (concatenated modes are not supported)",
            )),
        }
    }
}

/// The activation after a dense layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenseAct {
    Identity,
    Tanh,
}

/// One sentence-transformers `Dense` module: `act(x Wᵀ + b)`.
#[derive(Debug)]
pub struct Dense {
    pub in_features: usize,
    pub out_features: usize,
    pub act: DenseAct,
    weight: Array,
    bias: Option<Array>,
}

impl Dense {
    /// Reads `dir/config.json` and `dir/model.safetensors` (`linear.weight`
    /// [out, in], `linear.bias` [out] when `bias`).
    pub fn load(dir: &Path) -> Result<Dense> {
        let file = dir.join("config.json");
        let cfg = json(&file)?.ok_or_else(|| err(&file, "<document>", "missing"))?;
        let count = |key: &str| -> Result<usize> {
            let v = cfg.get(key).ok_or_else(|| err(&file, key, "missing"))?;
            v.as_u64()
                .filter(|n| *n > 0 && *n <= i32::MAX as u64)
                .map(|n| n as usize)
                .ok_or_else(|| err(&file, key, format!("{v} is not a positive whole number")))
        };
        let (in_features, out_features) = (count("in_features")?, count("out_features")?);
        let bias = match cfg.get("bias") {
            None => true,
            Some(v) => v
                .as_bool()
                .ok_or_else(|| err(&file, "bias", format!("{v} is not true or false")))?,
        };
        let act = match cfg.get("activation_function").map(|v| (v, v.as_str())) {
            None => DenseAct::Tanh,
            Some((_, Some(s))) if s.ends_with(".Identity") => DenseAct::Identity,
            Some((_, Some(s))) if s.ends_with(".Tanh") => DenseAct::Tanh,
            Some((v, _)) => {
                return Err(err(
                    &file,
                    "activation_function",
                    format!("{v} is not supported (Identity or Tanh)"),
                ))
            }
        };
        let wfile = dir.join("model.safetensors");
        if !wfile.exists() {
            return Err(Error::Weights {
                file: wfile,
                msg: "missing (only safetensors Dense weights are read)".into(),
            });
        }
        let mut tensors: IndexMap<String, Array> =
            lmspec_engine::weights::load_safetensors_file(&wfile)?
                .into_iter()
                .collect();
        let shape_err = |name: &str, got: &[i32], want: &[usize]| Error::Weights {
            file: wfile.clone(),
            msg: format!(
                "{name}: shape {got:?}, but {} says {want:?}",
                file.display()
            ),
        };
        let weight = tensors
            .shift_remove("linear.weight")
            .ok_or_else(|| Error::Weights {
                file: wfile.clone(),
                msg: "no tensor 'linear.weight'".into(),
            })?;
        if weight.shape() != [out_features as i32, in_features as i32] {
            return Err(shape_err(
                "linear.weight",
                weight.shape(),
                &[out_features, in_features],
            ));
        }
        let bias = if bias {
            let b = tensors
                .shift_remove("linear.bias")
                .ok_or_else(|| Error::Weights {
                    file: wfile.clone(),
                    msg: "no tensor 'linear.bias' (config.json: bias is true)".into(),
                })?;
            if b.shape() != [out_features as i32] {
                return Err(shape_err("linear.bias", b.shape(), &[out_features]));
            }
            Some(b.as_dtype(mlx_rs::Dtype::Float32)?)
        } else {
            None
        };
        if let Some(extra) = tensors.keys().next() {
            return Err(Error::Weights {
                file: wfile,
                msg: format!("unused tensor '{extra}'"),
            });
        }
        Ok(Dense {
            in_features,
            out_features,
            act,
            weight: weight.as_dtype(mlx_rs::Dtype::Float32)?,
            bias,
        })
    }

    /// `act(x Wᵀ + b)` for x [B, in].
    pub fn forward(&self, x: &Array) -> Result<Array> {
        let y = mlx_rs::ops::matmul(x, self.weight.t())?;
        let y = match &self.bias {
            Some(b) => mlx_rs::ops::add(&y, b)?,
            None => y,
        };
        Ok(match self.act {
            DenseAct::Identity => y,
            DenseAct::Tanh => mlx_rs::ops::tanh(&y)?,
        })
    }
}

/// What `modules.json` asks for after the encoder.
#[derive(Debug)]
pub struct Modules {
    pub pooling: Pooling,
    pub dense: Vec<Dense>,
    pub normalize: bool,
    /// The pooling config, when it sets `include_prompt: false` (prompt
    /// tokens left out of the pooling: not supported with a prompt).
    pub prompt_excluded: Option<PathBuf>,
}

impl Modules {
    /// Reads `dir/modules.json` and the folders it names; a folder without
    /// one pools by mean and does not normalise. `dim` is the encoder width.
    pub fn load(dir: &Path, dim: Option<usize>) -> Result<Modules> {
        let file = dir.join("modules.json");
        let Some(doc) = json(&file)? else {
            return Ok(Modules {
                pooling: Pooling::Mean,
                dense: Vec::new(),
                normalize: false,
                prompt_excluded: None,
            });
        };
        let list = doc
            .as_array()
            .ok_or_else(|| err(&file, "<document>", "not a JSON list of modules"))?;
        let mut pooling = None;
        let mut dense: Vec<Dense> = Vec::new();
        let mut normalize = false;
        let mut prompt_excluded = None;
        let mut width = dim;
        for (k, m) in list.iter().enumerate() {
            let field = |f: &str| format!("[{k}].{f}");
            let ty = m
                .get("type")
                .and_then(|t| t.as_str())
                .ok_or_else(|| err(&file, field("type"), "missing or not a string"))?;
            let path = match m.get("path") {
                None => "",
                Some(p) => p
                    .as_str()
                    .ok_or_else(|| err(&file, field("path"), format!("{p} is not a string")))?,
            };
            let sub = module_dir(dir, path).ok_or_else(|| {
                err(
                    &file,
                    field("path"),
                    format!("'{path}' is not a folder inside the model folder"),
                )
            })?;
            let kind = ty.rsplit('.').next().unwrap_or(ty);
            if normalize && kind != "Normalize" {
                return Err(err(
                    &file,
                    field("type"),
                    format!("{kind} after Normalize is not supported"),
                ));
            }
            match kind {
                "Transformer" if k == 0 => {}
                "Pooling" if pooling.is_none() && k > 0 => {
                    let cfg = sub.join("config.json");
                    pooling = Some(Pooling::from_file(&cfg, width)?);
                    let include = json(&cfg)?.and_then(|c| c.get("include_prompt").cloned());
                    match include {
                        None | Some(serde_json::Value::Bool(true)) => {}
                        Some(serde_json::Value::Bool(false)) => prompt_excluded = Some(cfg),
                        Some(v) => {
                            return Err(err(&cfg, "include_prompt", format!("{v} is not true or false")))
                        }
                    }
                }
                "Dense" if pooling.is_some() => {
                    let d = Dense::load(&sub)?;
                    if let Some(w) = width {
                        if d.in_features != w {
                            return Err(err(
                                &sub.join("config.json"),
                                "in_features",
                                format!("{}, but the vector before it has {w} dimensions", d.in_features),
                            ));
                        }
                    }
                    width = Some(d.out_features);
                    dense.push(d);
                }
                "Normalize" if pooling.is_some() => normalize = true,
                "Transformer" | "Pooling" | "Dense" | "Normalize" => {
                    return Err(err(
                        &file,
                        field("type"),
                        format!("{ty} is out of place (expected Transformer, Pooling, then Dense and Normalize modules)"),
                    ))
                }
                _ => {
                    return Err(err(
                        &file,
                        field("type"),
                        format!("module '{ty}' is not supported (Transformer, Pooling, Dense, Normalize)"),
                    ))
                }
            }
        }
        let pooling = pooling.ok_or_else(|| err(&file, "<document>", "no Pooling module"))?;
        Ok(Modules {
            pooling,
            dense,
            normalize,
            prompt_excluded,
        })
    }

    /// Width of the final vectors (`dim` when there is no dense layer).
    pub fn output_dim(&self, dim: usize) -> usize {
        self.dense.last().map_or(dim, |d| d.out_features)
    }
}

/// `dir/path` when `path` is relative and has no `..` component.
fn module_dir(dir: &Path, path: &str) -> Option<PathBuf> {
    let p = Path::new(path);
    let plain = p.components().all(|c| {
        matches!(
            c,
            std::path::Component::Normal(_) | std::path::Component::CurDir
        )
    });
    plain.then(|| dir.join(p))
}

/// `config_sentence_transformers.json`: named prompts (instruction
/// prefixes) and the one used by default.
#[derive(Debug, Clone, Default)]
pub struct Prompts {
    pub file: PathBuf,
    pub prompts: IndexMap<String, String>,
    pub default: Option<String>,
}

impl Prompts {
    pub fn load(dir: &Path) -> Result<Prompts> {
        let file = dir.join("config_sentence_transformers.json");
        let mut out = Prompts {
            file: file.clone(),
            ..Prompts::default()
        };
        let Some(doc) = json(&file)? else {
            return Ok(out);
        };
        if let Some(p) = doc.get("prompts").filter(|p| !p.is_null()) {
            let map = p
                .as_object()
                .ok_or_else(|| err(&file, "prompts", "not an object of name: text"))?;
            for (name, text) in map {
                let text = text.as_str().ok_or_else(|| {
                    err(
                        &file,
                        format!("prompts.{name}"),
                        format!("{text} is not a string"),
                    )
                })?;
                out.prompts.insert(name.clone(), text.to_string());
            }
        }
        if let Some(d) = doc.get("default_prompt_name").filter(|d| !d.is_null()) {
            let name = d
                .as_str()
                .ok_or_else(|| err(&file, "default_prompt_name", format!("{d} is not a string")))?;
            if !out.prompts.contains_key(name) {
                return Err(err(
                    &file,
                    "default_prompt_name",
                    format!("'{name}' is not one of the prompts"),
                ));
            }
            out.default = Some(name.to_string());
        }
        Ok(out)
    }

    /// The text of the prompt `name`.
    pub fn get(&self, name: &str) -> Result<&str> {
        self.prompts.get(name).map(String::as_str).ok_or_else(|| {
            let known: Vec<&str> = self.prompts.keys().map(String::as_str).collect();
            err(
                &self.file,
                "prompts",
                format!("no prompt named '{name}' (known: {})", known.join(", ")),
            )
        })
    }
}

/// `sentence_bert_config.json`'s `max_seq_length`, when the file sets it.
pub fn max_seq_length(dir: &Path) -> Result<Option<usize>> {
    let file = dir.join("sentence_bert_config.json");
    let Some(doc) = json(&file)? else {
        return Ok(None);
    };
    match doc.get("max_seq_length") {
        None => Ok(None),
        Some(v) if v.is_null() => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|n| *n > 0)
            .map(|n| Some(n as usize))
            .ok_or_else(|| {
                err(
                    &file,
                    "max_seq_length",
                    format!("{v} is not a positive whole number"),
                )
            }),
    }
}

pub(crate) fn err(file: &Path, key: impl Into<String>, msg: impl Into<String>) -> Error {
    Error::Config {
        file: file.to_path_buf(),
        key: key.into(),
        msg: msg.into(),
    }
}

/// A JSON file, or `None` when it does not exist.
pub(crate) fn json(file: &Path) -> Result<Option<serde_json::Value>> {
    if !file.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| err(file, "<document>", format!("invalid JSON: {e}")))
}

/// Pools hidden states [B, T, D] over the real tokens of each row (`mask`
/// [B, T], true for real tokens; `lengths` the real tokens of each row,
/// right-padded).
pub fn pool(hidden: &Array, mask: &Array, lengths: &[i32], mode: Pooling) -> Result<Array> {
    let hidden = hidden.as_dtype(mlx_rs::Dtype::Float32)?;
    let m = mask.as_dtype(mlx_rs::Dtype::Float32)?.expand_dims(-1)?;
    let masked_sum = |weights: &Array| -> Result<(Array, Array)> {
        let sum = mlx_rs::ops::sum_axis(&mlx_rs::ops::multiply(&hidden, weights)?, 1, false)?;
        let count = mlx_rs::ops::sum_axis(weights, 1, false)?;
        Ok((sum, count))
    };
    Ok(match mode {
        Pooling::Mean => {
            let (sum, count) = masked_sum(&m)?;
            let floor = Array::from_f32(1e-9);
            mlx_rs::ops::divide(&sum, &mlx_rs::ops::maximum(&count, &floor)?)?
        }
        Pooling::MeanSqrtLen => {
            let (sum, count) = masked_sum(&m)?;
            mlx_rs::ops::divide(&sum, &mlx_rs::ops::sqrt(&count)?)?
        }
        Pooling::WeightedMean => {
            let t = hidden.shape()[1];
            let pos =
                mlx_rs::ops::arange::<_, f32>(1.0, t as f32 + 1.0, None)?.reshape(&[1, t, 1])?;
            let (sum, count) = masked_sum(&mlx_rs::ops::multiply(&m, &pos)?)?;
            let floor = Array::from_f32(1e-9);
            mlx_rs::ops::divide(&sum, &mlx_rs::ops::maximum(&count, &floor)?)?
        }
        Pooling::Cls => hidden.try_index((.., 0, ..))?,
        Pooling::Max => {
            let floor = Array::from_f32(-1e9);
            let masked = mlx_rs::ops::select(&mask.expand_dims(-1)?, &hidden, &floor)?;
            mlx_rs::ops::max_axis(&masked, 1, false)?
        }
        Pooling::Last => {
            let last: Vec<i32> = lengths.iter().map(|n| n - 1).collect();
            let idx = Array::from_slice(&last, &[lengths.len() as i32, 1, 1]);
            mlx_rs::ops::indexing::take_along_axis(&hidden, &idx, 1)?.squeeze_axes(&[1])?
        }
    })
}

/// `x / max(‖x‖₂, 1e-12)` over the last axis.
pub fn l2_normalize(x: &Array) -> Result<Array> {
    let norm = mlx_rs::ops::sqrt(&mlx_rs::ops::sum_axis(
        &mlx_rs::ops::multiply(x, x)?,
        -1,
        true,
    )?)?;
    let floor = Array::from_f32(1e-12).as_dtype(x.dtype())?;
    Ok(mlx_rs::ops::divide(
        x,
        &mlx_rs::ops::maximum(&norm, &floor)?,
    )?)
}
