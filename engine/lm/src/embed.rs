//! Sentence embeddings from an encoder spec (one of task `embed`, whose
//! output is the last hidden states): tokenize with the folder's tokenizer
//! (special tokens added, no padding, truncation at the sentence-transformers
//! `max_seq_length`), run batches of similar lengths padded with a key mask,
//! then the sentence-transformers modules the folder lists, as data
//! (`st_modules`): pooling, dense layers, L2 normalisation; optionally a
//! Matryoshka truncation to fewer dimensions.
use std::path::Path;
use std::sync::Arc;

use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::Array;

use crate::st_modules::{self, l2_normalize, pool, Dense, Modules, Prompts};
use crate::tokenizer::Tokenizer;
use lmspec_engine::error::{Error, Result};
use lmspec_engine::model::{LoadOptions, Model};
use lmspec_spec::raw::Task;

pub use crate::st_modules::Pooling;

/// Told of progress over a long list: (texts done, texts in all).
pub type EmbedProgress = Arc<dyn Fn(usize, usize) + Send + Sync>;

/// Texts per forward pass, at most.
pub const DEFAULT_BATCH_SIZE: usize = 32;
/// Tokens (rows x padded width) per forward pass, at most (a batch of long
/// texts is split further).
pub const DEFAULT_BATCH_TOKENS: usize = 16_384;

/// An encoder model with its tokenizer and sentence-transformers modules.
pub struct Embedder {
    model: Model,
    tokenizer: Tokenizer,
    pub pooling: Pooling,
    pub normalize: bool,
    /// Dense layers after pooling (`2_Dense`, ...), in order.
    pub dense: Vec<Dense>,
    /// Longest input in tokens, special tokens included.
    pub max_tokens: usize,
    /// Width of the encoder's hidden states.
    pub hidden_size: usize,
    /// Keep the first this many dimensions (Matryoshka), then normalise
    /// again when the model normalises.
    pub dimensions: Option<usize>,
    /// Named prompts of `config_sentence_transformers.json`.
    pub prompts: Prompts,
    /// Prefix put before every text (the default prompt when the folder
    /// names one); see [`Embedder::set_prefix`].
    pub prefix: String,
    pub batch_size: usize,
    pub batch_tokens: usize,
    progress: Option<EmbedProgress>,
    /// See [`Modules::prompt_excluded`].
    prompt_excluded: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("spec", &self.model.spec.name)
            .field("pooling", &self.pooling)
            .field("normalize", &self.normalize)
            .field("dense", &self.dense.len())
            .field("max_tokens", &self.max_tokens)
            .field("dimensions", &self.dimensions)
            .finish()
    }
}

/// The longest input a model folder allows: `sentence_bert_config.json`'s
/// `max_seq_length` within the model's learned positions (or its config's
/// `max_position_embeddings`).
pub(crate) fn max_tokens(dir: &Path, model: &Model) -> Result<usize> {
    let st = st_modules::max_seq_length(dir)?;
    match (st, model.context_length()) {
        (Some(s), Some(p)) => Ok(s.min(p as usize)),
        (Some(s), None) => Ok(s),
        (None, Some(p)) => Ok(p as usize),
        (None, None) => Err(Error::Config {
            file: dir.join("config.json"),
            key: "max_position_embeddings".into(),
            msg: "missing, and no sentence_bert_config.json max_seq_length: the longest input is unknown".into(),
        }),
    }
}

/// The width of a model's output (its last axis), from the graph.
pub(crate) fn output_width(model: &Model) -> Option<usize> {
    model
        .graph
        .output_layout()
        .map(|l| l.dim as usize)
        .filter(|d| *d > 0)
}

impl Embedder {
    /// Loads a sentence-transformers / Hugging Face folder; the spec of
    /// task `embed` claiming its `model_type` is preferred.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Embedder> {
        let opts = opts.clone().with_task(Task::Embed);
        let model = Model::load(dir, &opts)?;
        let hidden_size = output_width(&model).ok_or_else(|| {
            Error::Usage(format!(
                "spec '{}' has no output of known width to pool",
                model.spec.name
            ))
        })?;
        let modules = Modules::load(dir, Some(hidden_size))?;
        let max_tokens = max_tokens(dir, &model)?;
        let prompts = Prompts::load(dir)?;
        let default = match &prompts.default {
            Some(name) => prompts.get(name)?.to_string(),
            None => String::new(),
        };
        let mut e = Embedder {
            tokenizer: Tokenizer::from_dir(dir)?.for_encoder(max_tokens)?,
            pooling: modules.pooling,
            normalize: modules.normalize,
            dense: modules.dense,
            max_tokens,
            hidden_size,
            dimensions: None,
            prompts,
            prefix: String::new(),
            batch_size: DEFAULT_BATCH_SIZE,
            batch_tokens: DEFAULT_BATCH_TOKENS,
            progress: None,
            prompt_excluded: modules.prompt_excluded,
            model,
        };
        e.set_prefix(&default)?;
        Ok(e)
    }

    /// Puts `text` before every text (an instruction). A pooling config
    /// with `include_prompt: false` (pooling without the prompt's tokens)
    /// is refused with a prompt, unless the pooling is the last token's.
    pub fn set_prefix(&mut self, text: &str) -> Result<()> {
        if let Some(file) = &self.prompt_excluded {
            if !text.is_empty() && self.pooling != Pooling::Last {
                return Err(st_modules::err(
                    file,
                    "include_prompt",
                    "false (pooling without the prompt's tokens) is not supported with a prompt",
                ));
            }
        }
        self.prefix = text.to_string();
        Ok(())
    }

    /// Width of the vectors [`Embedder::embed`] returns.
    pub fn dim(&self) -> usize {
        let full = self
            .dense
            .last()
            .map_or(self.hidden_size, |d| d.out_features);
        self.dimensions.map_or(full, |d| d.min(full))
    }

    /// Width before any Matryoshka truncation.
    pub fn full_dim(&self) -> usize {
        self.dense
            .last()
            .map_or(self.hidden_size, |d| d.out_features)
    }

    /// Keeps the first `n` dimensions of every vector (Matryoshka models);
    /// more than the model gives is an error.
    pub fn with_dimensions(mut self, n: Option<usize>) -> Result<Embedder> {
        self.set_dimensions(n)?;
        Ok(self)
    }

    /// See [`Embedder::with_dimensions`].
    pub fn set_dimensions(&mut self, n: Option<usize>) -> Result<()> {
        if let Some(n) = n {
            let full = self.full_dim();
            if n == 0 || n > full {
                return Err(Error::Usage(format!(
                    "--dimensions {n}: the model gives {full}-dimensional vectors (1..={full})"
                )));
            }
        }
        self.dimensions = n;
        Ok(())
    }

    /// Uses the named prompt of `config_sentence_transformers.json` as the
    /// prefix of every text (`query` for Qwen3-Embedding's instruction).
    pub fn use_prompt(&mut self, name: &str) -> Result<()> {
        let text = self.prompts.get(name)?.to_string();
        self.set_prefix(&text)
    }

    /// Tells `f` of progress after each batch.
    pub fn set_progress(&mut self, f: Option<EmbedProgress>) {
        self.progress = f;
    }

    /// The model this embedder runs.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Token ids of one text as the encoder sees it (prefix and special
    /// tokens added, truncated to `max_tokens`).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        if self.prefix.is_empty() {
            self.tokenizer.encode_with_special(text)
        } else {
            self.tokenizer
                .encode_with_special(&format!("{}{text}", self.prefix))
        }
    }

    /// One vector per text. Texts run in batches of similar lengths (at most
    /// `batch_size` texts and `batch_tokens` padded tokens each), each
    /// padded with a key mask; the result keeps the texts' order.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let ids: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| self.tokenize(t))
            .collect::<Result<_>>()?;
        self.embed_ids(&ids)
    }

    /// [`Embedder::embed`] for texts already tokenized.
    pub fn embed_ids(&self, ids: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        for (k, row) in ids.iter().enumerate() {
            if row.is_empty() {
                return Err(Error::Usage(format!("text {k}: no tokens")));
            }
            let as_i64: Vec<i64> = row.iter().map(|&t| i64::from(t)).collect();
            self.model.check_tokens(&as_i64, &format!("text {k}"))?;
        }
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); ids.len()];
        for (batch, rows) in length_batches(ids, self.batch_size, self.batch_tokens) {
            let vecs = self.embed_batch(&rows)?;
            for (k, v) in batch.into_iter().zip(vecs) {
                out[k] = v;
            }
            if let Some(p) = &self.progress {
                let done = out.iter().filter(|v| !v.is_empty()).count();
                p(done, ids.len());
            }
        }
        Ok(out)
    }

    fn embed_batch(&self, ids: &[&Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let (tokens, mask, lengths) = padded(ids);
        let hidden = self.model.forward_masked(&tokens, &mask)?;
        let mut v = pool(&hidden, &mask, &lengths, self.pooling)?;
        for d in &self.dense {
            v = d.forward(&v)?;
        }
        if let Some(n) = self.dimensions {
            v = v.try_index((.., ..n as i32))?;
        }
        if self.normalize {
            v = l2_normalize(&v)?;
        }
        rows_of(&v)
    }
}

/// Right-padded ids [B, T], the key mask [B, T] and each row's length.
pub(crate) fn padded(ids: &[&Vec<u32>]) -> (Array, Array, Vec<i32>) {
    let width = ids.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
    let mut flat = Vec::with_capacity(ids.len() * width);
    let mut mask = Vec::with_capacity(ids.len() * width);
    for row in ids {
        for k in 0..width {
            flat.push(row.get(k).map_or(0, |&id| id as i32));
            mask.push(k < row.len());
        }
    }
    let shape = [ids.len() as i32, width as i32];
    let lengths = ids.iter().map(|r| r.len() as i32).collect();
    (
        Array::from_slice(&flat, &shape),
        Array::from_slice(&mask, &shape),
        lengths,
    )
}

/// The rows of a [B, D] array as float32 vectors.
pub(crate) fn rows_of(v: &Array) -> Result<Vec<Vec<f32>>> {
    let v = v.as_dtype(mlx_rs::Dtype::Float32)?.contiguous()?;
    v.eval()?;
    let d = v.shape()[1] as usize;
    Ok(v.as_slice::<f32>()
        .chunks(d.max(1))
        .map(<[f32]>::to_vec)
        .collect())
}

/// One batch: the indices of its texts and their ids.
pub(crate) type Batch<'a> = (Vec<usize>, Vec<&'a Vec<u32>>);

/// Indices of `ids` grouped into batches of similar length: sorted by
/// length (longest first), cut at `max_rows` rows or when rows x the
/// batch's width would pass `max_tokens`.
pub(crate) fn length_batches(
    ids: &[Vec<u32>],
    max_rows: usize,
    max_tokens: usize,
) -> Vec<Batch<'_>> {
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&k| std::cmp::Reverse(ids[k].len()));
    let mut out = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut width = 0;
    for k in order {
        let w = width.max(ids[k].len());
        if !cur.is_empty() && (cur.len() >= max_rows.max(1) || (cur.len() + 1) * w > max_tokens) {
            out.push(std::mem::take(&mut cur));
            width = 0;
        }
        width = width.max(ids[k].len());
        cur.push(k);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out.into_iter()
        .map(|b| {
            let rows = b.iter().map(|&k| &ids[k]).collect();
            (b, rows)
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::length_batches;

    #[test]
    fn batches_group_similar_lengths_within_limits() {
        let ids: Vec<Vec<u32>> = [3usize, 10, 4, 9, 1, 10]
            .iter()
            .map(|&n| vec![1; n])
            .collect();
        let b = length_batches(&ids, 2, 1000);
        let idx: Vec<Vec<usize>> = b.iter().map(|(k, _)| k.clone()).collect();
        assert_eq!(idx, vec![vec![1, 5], vec![3, 2], vec![0, 4]]);
        // 10-token rows: at most 2 per 25-token batch.
        let b = length_batches(&ids, 8, 25);
        assert!(b.iter().all(|(_, rows)| {
            rows.len() * rows.iter().map(|r| r.len()).max().unwrap_or(0) <= 25
        }));
        assert_eq!(b.iter().map(|(k, _)| k.len()).sum::<usize>(), 6);
    }
}
