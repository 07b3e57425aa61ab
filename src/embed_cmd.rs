//! `lmspec embed` and `lmspec rerank`: texts from arguments or a file (one
//! per line), vectors to stdout (JSON lines) or a file (`.npy` or
//! `.jsonl`), scores best first.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use lmspec::engine::LoadOptions;
use lmspec::lm::embed::EmbedProgress;
use lmspec::lm::{Embedder, Pooling, Reranker};

#[derive(Args, Debug)]
pub struct EmbedArgs {
    /// Model directory (a sentence-transformers / Hugging Face folder) or
    /// hub id.
    #[arg(long)]
    pub model: String,
    /// The texts (or --file).
    pub texts: Vec<String>,
    /// Read the texts from this file, one per line.
    #[arg(long, conflicts_with = "texts")]
    pub file: Option<PathBuf>,
    /// Write the vectors here: `.npy` (float32 [texts, dims]) or `.jsonl`
    /// (one JSON array per line); default: JSON lines on stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Pooling: mean, cls (first), max, last, mean_sqrt_len_tokens or
    /// weightedmean (default: 1_Pooling/config.json).
    #[arg(long)]
    pub pooling: Option<String>,
    /// L2-normalise: true or false (default: whether modules.json lists Normalize).
    #[arg(long)]
    pub normalize: Option<bool>,
    /// Keep the first N dimensions (Matryoshka models), normalised again
    /// when the model normalises.
    #[arg(long)]
    pub dimensions: Option<usize>,
    /// Put the named prompt of config_sentence_transformers.json before
    /// every text (e.g. `query`).
    #[arg(long, conflicts_with = "instruction")]
    pub prompt: Option<String>,
    /// Put this text before every text (an instruction prefix).
    #[arg(long)]
    pub instruction: Option<String>,
    /// Texts per forward pass, at most (batches group similar lengths).
    #[arg(long, default_value_t = lmspec::lm::embed::DEFAULT_BATCH_SIZE)]
    pub batch_size: usize,
    /// No progress bar on stderr.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct RerankArgs {
    /// Cross-encoder directory (a *ForSequenceClassification folder) or hub id.
    #[arg(long)]
    pub model: String,
    /// The query.
    #[arg(long)]
    pub query: String,
    /// The documents (or --file).
    pub documents: Vec<String>,
    /// Read the documents from this file, one per line.
    #[arg(long, conflicts_with = "documents")]
    pub file: Option<PathBuf>,
    /// Print only the best K.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Texts per forward pass, at most.
    #[arg(long, default_value_t = lmspec::lm::embed::DEFAULT_BATCH_SIZE)]
    pub batch_size: usize,
    /// No progress bar on stderr.
    #[arg(long)]
    pub quiet: bool,
}

/// The texts of `--file` (one per line) or of the arguments; none is an
/// error naming where they were looked for.
fn texts(args: &[String], file: Option<&Path>, what: &str) -> Result<Vec<String>> {
    match file {
        Some(f) => {
            let text = std::fs::read_to_string(f).with_context(|| f.display().to_string())?;
            let lines: Vec<String> = text.lines().map(str::to_string).collect();
            if lines.is_empty() {
                bail!(
                    "{}: no lines: the file holds no {what} (one per line)",
                    f.display()
                );
            }
            Ok(lines)
        }
        None if args.is_empty() => bail!("no {what}: give them as arguments or --file"),
        None => Ok(args.to_vec()),
    }
}

/// A progress bar on stderr for lists longer than one batch.
fn progress(quiet: bool, total: usize, batch: usize, verb: &'static str) -> Option<EmbedProgress> {
    if quiet || total <= batch {
        return None;
    }
    Some(Arc::new(move |done: usize, total: usize| {
        let width = 30;
        let filled = done * width / total.max(1);
        eprint!(
            "\r{verb} [{}{}] {done}/{total}",
            "#".repeat(filled),
            "-".repeat(width - filled)
        );
        if done == total {
            eprintln!();
        }
    }))
}

pub fn embed(dir: &Path, opts: &LoadOptions, a: &EmbedArgs) -> Result<ExitCode> {
    let pooling = match &a.pooling {
        Some(p) => Some(Pooling::parse(p).ok_or_else(|| {
            anyhow!("--pooling: '{p}' is not one of mean, cls, first, max, last, mean_sqrt_len_tokens, weightedmean")
        })?),
        None => None,
    };
    let texts = texts(&a.texts, a.file.as_deref(), "texts")?;
    let mut e = Embedder::load(dir, opts)?;
    if let Some(p) = pooling {
        e.pooling = p;
    }
    if let Some(n) = a.normalize {
        e.normalize = n;
    }
    e.set_dimensions(a.dimensions)?;
    if let Some(name) = &a.prompt {
        e.use_prompt(name)?;
    }
    if let Some(text) = &a.instruction {
        e.set_prefix(text)?;
    }
    if a.batch_size == 0 {
        bail!("--batch-size: must be at least 1");
    }
    e.batch_size = a.batch_size;
    e.set_progress(progress(a.quiet, texts.len(), a.batch_size, "embedding"));
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let vectors = e.embed(&refs)?;
    match &a.out {
        Some(path) => write_vectors(path, &vectors, e.dim())?,
        None => {
            let mut out = std::io::stdout().lock();
            for v in &vectors {
                writeln!(out, "{}", serde_json::to_string(v)?)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes vectors as `.npy` (float32, C order) or `.jsonl`.
fn write_vectors(path: &Path, vectors: &[Vec<f32>], dim: usize) -> Result<()> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let mut bytes: Vec<u8> = Vec::new();
    match ext {
        "npy" => {
            let header = format!(
                "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {dim}), }}",
                vectors.len()
            );
            // Magic, version 1.0, header length; the header padded with
            // spaces and ending in a newline so the data starts at a
            // multiple of 64 bytes.
            let unpadded = 10 + header.len() + 1;
            let pad = (64 - unpadded % 64) % 64;
            let hlen = header.len() + pad + 1;
            bytes.extend_from_slice(b"\x93NUMPY\x01\x00");
            bytes.extend_from_slice(&(hlen as u16).to_le_bytes());
            bytes.extend_from_slice(header.as_bytes());
            bytes.extend(std::iter::repeat_n(b' ', pad));
            bytes.push(b'\n');
            for v in vectors {
                for x in v {
                    bytes.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
        "jsonl" => {
            for v in vectors {
                bytes.extend_from_slice(serde_json::to_string(v)?.as_bytes());
                bytes.push(b'\n');
            }
        }
        _ => bail!(
            "--out {}: the file name must end in .npy or .jsonl",
            path.display()
        ),
    }
    std::fs::write(path, bytes).with_context(|| path.display().to_string())
}

pub fn rerank(dir: &Path, opts: &LoadOptions, a: &RerankArgs) -> Result<ExitCode> {
    let docs = texts(&a.documents, a.file.as_deref(), "documents")?;
    let mut r = Reranker::load(dir, opts)?;
    if a.batch_size == 0 {
        bail!("--batch-size: must be at least 1");
    }
    r.batch_size = a.batch_size;
    r.set_progress(progress(a.quiet, docs.len(), a.batch_size, "scoring"));
    let refs: Vec<&str> = docs.iter().map(String::as_str).collect();
    let mut out = std::io::stdout().lock();
    for (index, score) in r.rerank(&a.query, &refs, a.top_k)? {
        let line = serde_json::json!({"index": index, "score": score, "document": refs[index]});
        writeln!(out, "{line}")?;
    }
    Ok(ExitCode::SUCCESS)
}
