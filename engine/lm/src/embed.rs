//! Sentence embeddings from an encoder spec (one whose output is the last
//! hidden states): tokenize with the folder's tokenizer (special tokens
//! added, no padding, truncation at the sentence-transformers
//! `max_seq_length`), run a padded batch with a key mask, pool as
//! `1_Pooling/config.json` says and L2-normalise when `modules.json` lists a
//! `Normalize` module.
use std::path::Path;

use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::Array;

use crate::tokenizer::Tokenizer;
use lmspec_engine::error::{Error, Result};
use lmspec_engine::model::{LoadOptions, Model};

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
}

impl Pooling {
    pub fn parse(s: &str) -> Option<Pooling> {
        Some(match s {
            "mean" => Pooling::Mean,
            "cls" => Pooling::Cls,
            "max" => Pooling::Max,
            "last" | "lasttoken" => Pooling::Last,
            _ => return None,
        })
    }

    /// The mode a `1_Pooling/config.json` enables (mean when the folder has
    /// none); more than one enabled mode is an error.
    fn from_config(dir: &Path) -> Result<Pooling> {
        let file = dir.join("1_Pooling").join("config.json");
        let Some(cfg) = json(&file)? else {
            return Ok(Pooling::Mean);
        };
        let modes = [
            ("pooling_mode_mean_tokens", Pooling::Mean),
            ("pooling_mode_cls_token", Pooling::Cls),
            ("pooling_mode_max_tokens", Pooling::Max),
            ("pooling_mode_lasttoken", Pooling::Last),
        ];
        let on: Vec<Pooling> = modes
            .iter()
            .filter(|(k, _)| cfg.get(*k).and_then(|v| v.as_bool()) == Some(true))
            .map(|(_, p)| *p)
            .collect();
        match on.as_slice() {
            [one] => Ok(*one),
            [] => Err(config_err(&file, "no pooling mode is enabled")),
            _ => Err(config_err(
                &file,
                "more than one pooling mode is enabled (concatenated modes are not supported)",
            )),
        }
    }
}

fn config_err(file: &Path, msg: &str) -> Error {
    Error::Config {
        file: file.to_path_buf(),
        key: "pooling".into(),
        msg: msg.into(),
    }
}

fn json(file: &Path) -> Result<Option<serde_json::Value>> {
    if !file.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::Config {
            file: file.to_path_buf(),
            key: "<document>".into(),
            msg: format!("invalid JSON: {e}"),
        })
}

/// An encoder model with its tokenizer and pooling.
#[derive(Debug)]
pub struct Embedder {
    model: Model,
    tokenizer: Tokenizer,
    pub pooling: Pooling,
    pub normalize: bool,
    /// Longest input in tokens, special tokens included.
    pub max_tokens: usize,
}

impl Embedder {
    /// Loads a sentence-transformers / Hugging Face folder.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Embedder> {
        let model = Model::load(dir, opts)?;
        let (config_file, config) = lmspec_engine::model::read_config(dir)?;
        let positions = config
            .get("max_position_embeddings")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| Error::Config {
                file: config_file,
                key: "max_position_embeddings".into(),
                msg: "missing: an encoder needs its position count".into(),
            })? as usize;
        let st = json(&dir.join("sentence_bert_config.json"))?;
        let max_tokens = st
            .as_ref()
            .and_then(|c| c.get("max_seq_length"))
            .and_then(|v| v.as_u64())
            .map_or(positions, |n| (n as usize).min(positions));
        let normalize = json(&dir.join("modules.json"))?
            .and_then(|m| m.as_array().cloned())
            .is_some_and(|mods| {
                mods.iter().any(|m| {
                    m.get("type")
                        .and_then(|t| t.as_str())
                        .is_some_and(|t| t.ends_with(".Normalize"))
                })
            });
        Ok(Embedder {
            tokenizer: Tokenizer::from_dir(dir)?.for_encoder(max_tokens)?,
            pooling: Pooling::from_config(dir)?,
            normalize,
            max_tokens,
            model,
        })
    }

    /// Token ids of one text as the encoder sees it (special tokens added,
    /// truncated to `max_tokens`).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode_with_special(text)
    }

    /// One vector per text; the texts run as one padded batch.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| self.tokenize(t))
            .collect::<Result<_>>()?;
        let width = ids.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let (b, t) = (ids.len() as i32, width as i32);
        let mut flat = Vec::with_capacity(ids.len() * width);
        let mut mask = Vec::with_capacity(ids.len() * width);
        for row in &ids {
            for k in 0..width {
                flat.push(row.get(k).map_or(0, |&id| id as i32));
                mask.push(k < row.len());
            }
        }
        let tokens = Array::from_slice(&flat, &[b, t]);
        let mask = Array::from_slice(&mask, &[b, t]);
        let hidden = self.model.forward_masked(&tokens, &mask)?;
        let lengths: Vec<i32> = ids.iter().map(|r| r.len() as i32).collect();
        let pooled = pool(&hidden, &mask, &lengths, self.pooling)?;
        let pooled = if self.normalize {
            l2_normalize(&pooled)?
        } else {
            pooled
        };
        let pooled = pooled.as_dtype(mlx_rs::Dtype::Float32)?.contiguous()?;
        pooled.eval()?;
        let d = pooled.shape()[1] as usize;
        Ok(pooled
            .as_slice::<f32>()
            .chunks(d)
            .map(<[f32]>::to_vec)
            .collect())
    }
}

/// Pools hidden states [B, T, D] over the real tokens of each row.
fn pool(hidden: &Array, mask: &Array, lengths: &[i32], mode: Pooling) -> Result<Array> {
    let m = mask.as_dtype(hidden.dtype())?.expand_dims(-1)?;
    Ok(match mode {
        Pooling::Mean => {
            let sum = mlx_rs::ops::sum_axis(&mlx_rs::ops::multiply(hidden, &m)?, 1, false)?;
            let count = mlx_rs::ops::sum_axis(&m, 1, false)?;
            mlx_rs::ops::divide(&sum, &count)?
        }
        Pooling::Cls => hidden.try_index((.., 0, ..))?,
        Pooling::Max => {
            let floor = Array::from_f32(f32::MIN).as_dtype(hidden.dtype())?;
            let masked = mlx_rs::ops::select(&mask.expand_dims(-1)?, hidden, &floor)?;
            mlx_rs::ops::max_axis(&masked, 1, false)?
        }
        Pooling::Last => {
            let last: Vec<i32> = lengths.iter().map(|n| n - 1).collect();
            let idx = Array::from_slice(&last, &[lengths.len() as i32, 1, 1]);
            mlx_rs::ops::indexing::take_along_axis(hidden, &idx, 1)?.squeeze_axes(&[1])?
        }
    })
}

fn l2_normalize(x: &Array) -> Result<Array> {
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

/// Cosine similarity of two vectors (for comparing embeddings).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}
