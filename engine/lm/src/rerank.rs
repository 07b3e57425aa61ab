//! Cross-encoder reranking: a spec of task `classify` (a
//! `*ForSequenceClassification` head as the spec's output, [B, T, 1] class
//! scores per position) scores each (query, document) pair, encoded with the
//! tokenizer's pair template; the score is the head's output at the first
//! position ([CLS] / `<s>`), the raw logit as transformers returns it.
use std::path::Path;

use mlx_rs::ops::indexing::TryIndexOp;

use crate::embed::{self, length_batches, padded, rows_of, EmbedProgress};
use crate::tokenizer::Tokenizer;
use lmspec_engine::error::{Error, Result};
use lmspec_engine::model::{LoadOptions, Model};
use lmspec_spec::raw::Task;

/// A cross-encoder with its tokenizer.
pub struct Reranker {
    model: Model,
    tokenizer: Tokenizer,
    /// Longest pair in tokens, special tokens included.
    pub max_tokens: usize,
    /// Whether segment ids (token types) other than 0 must be refused: the
    /// spec reads no token types, so a checkpoint with several would be
    /// run wrongly.
    segments: bool,
    pub batch_size: usize,
    pub batch_tokens: usize,
    progress: Option<EmbedProgress>,
}

impl std::fmt::Debug for Reranker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reranker")
            .field("spec", &self.model.spec.name)
            .field("max_tokens", &self.max_tokens)
            .finish()
    }
}

impl Reranker {
    /// Loads a cross-encoder folder; the spec of task `classify` claiming
    /// its `model_type` is preferred.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Reranker> {
        let opts = opts.clone().with_task(Task::Classify);
        let model = Model::load(dir, &opts)?;
        let (config_file, config) = lmspec_engine::model::read_config(dir)?;
        match embed::output_width(&model) {
            Some(1) => {}
            other => {
                return Err(Error::Config {
                    file: config_file,
                    key: "num_labels".into(),
                    msg: format!(
                        "spec '{}' gives {} scores per pair; a reranker needs one",
                        model.spec.name,
                        other.map_or("an unknown number of".to_string(), |w| w.to_string())
                    ),
                })
            }
        }
        let segments = config
            .get("type_vocab_size")
            .and_then(|v| v.as_u64())
            .is_some_and(|n| n > 1);
        let max_tokens = embed::max_tokens(dir, &model)?;
        Ok(Reranker {
            tokenizer: Tokenizer::from_dir(dir)?.for_encoder(max_tokens)?,
            max_tokens,
            segments,
            batch_size: embed::DEFAULT_BATCH_SIZE,
            batch_tokens: embed::DEFAULT_BATCH_TOKENS,
            progress: None,
            model,
        })
    }

    /// Tells `f` of progress after each batch.
    pub fn set_progress(&mut self, f: Option<EmbedProgress>) {
        self.progress = f;
    }

    /// Token ids of the pair (query, document) as the model sees it.
    pub fn tokenize_pair(&self, query: &str, document: &str) -> Result<Vec<u32>> {
        let (ids, types) = self.tokenizer.encode_pair_with_special(query, document)?;
        if self.segments && types.iter().any(|&t| t != 0) {
            return Err(Error::Usage(format!(
                "spec '{}' reads no token types, but this checkpoint's tokenizer gives the document segment id 1 (type_vocab_size > 1): not supported",
                self.model.spec.name
            )));
        }
        Ok(ids)
    }

    /// One score per document (higher: more relevant), in input order.
    pub fn score(&self, query: &str, documents: &[&str]) -> Result<Vec<f32>> {
        let ids: Vec<Vec<u32>> = documents
            .iter()
            .map(|d| self.tokenize_pair(query, d))
            .collect::<Result<_>>()?;
        for (k, row) in ids.iter().enumerate() {
            let as_i64: Vec<i64> = row.iter().map(|&t| i64::from(t)).collect();
            self.model.check_tokens(&as_i64, &format!("document {k}"))?;
        }
        let mut out = vec![f32::NAN; ids.len()];
        let mut done = 0;
        for (batch, rows) in length_batches(&ids, self.batch_size, self.batch_tokens) {
            let (tokens, mask, _) = padded(&rows);
            let logits = self.model.forward_masked(&tokens, &mask)?;
            let first = logits.try_index((.., 0, ..))?;
            for (k, v) in batch.iter().zip(rows_of(&first)?) {
                out[*k] = v[0];
            }
            done += batch.len();
            if let Some(p) = &self.progress {
                p(done, ids.len());
            }
        }
        Ok(out)
    }

    /// Documents by relevance to `query`, best first: (index, score), the
    /// best `top_k` when given.
    pub fn rerank(
        &self,
        query: &str,
        documents: &[&str],
        top_k: Option<usize>,
    ) -> Result<Vec<(usize, f32)>> {
        let scores = self.score(query, documents)?;
        let mut ranked: Vec<(usize, f32)> = scores.into_iter().enumerate().collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if let Some(k) = top_k {
            ranked.truncate(k);
        }
        Ok(ranked)
    }
}
