//! Training data in mlx-lm's formats: a folder with `train.jsonl`,
//! `valid.jsonl` (and `test.jsonl`), one JSON object a line, of one of
//! three kinds (told apart by the first record's keys, as mlx-lm does):
//!
//! - completions: `{"prompt": ..., "completion": ...}`, rendered as a user
//!   and an assistant message through the chat template;
//! - chat: `{"messages": [...]}` (optionally `"tools"`);
//! - text: `{"text": ...}`, encoded with EOS appended.
//!
//! With `mask_prompt` the loss skips the prompt: the tokens of the
//! conversation up to its last message with the generation prompt.
use std::path::{Path, PathBuf};

use mlx_rs::Array;
use serde_json::Value;

use super::step::Batch;
use crate::lm::LanguageModel;
use crate::template::ChatContext;
use lmspec_engine::error::{Error, Result};

/// The kind of records a dataset holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Completions,
    Chat,
    Text,
}

/// The feature names (mlx-lm's `prompt_feature`, ... options).
#[derive(Debug, Clone)]
pub struct Features {
    pub prompt: String,
    pub completion: String,
    pub chat: String,
    pub text: String,
}

impl Default for Features {
    fn default() -> Features {
        Features {
            prompt: "prompt".into(),
            completion: "completion".into(),
            chat: "messages".into(),
            text: "text".into(),
        }
    }
}

/// A tokenized dataset: each example's ids and the offset where its loss
/// starts (0 without prompt masking).
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    pub file: PathBuf,
    pub examples: Vec<(Vec<u32>, usize)>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.examples.len()
    }
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }
    /// Tokens in all examples.
    pub fn tokens(&self) -> usize {
        self.examples.iter().map(|e| e.0.len()).sum()
    }
}

/// The splits of a data folder (a missing file: an empty split).
#[derive(Debug, Clone, Default)]
pub struct Datasets {
    pub train: Dataset,
    pub valid: Dataset,
    pub test: Dataset,
}

fn data_err(file: &Path, line: usize, msg: impl Into<String>) -> Error {
    Error::Config {
        file: file.to_path_buf(),
        key: format!("line {line}"),
        msg: msg.into(),
    }
}

/// Reads the records of a JSONL file: each non-empty line one JSON object.
pub fn read_jsonl(file: &Path) -> Result<Vec<(usize, Value)>> {
    let text = lmspec_engine::error::read_to_string(file)?;
    let mut out = Vec::new();
    for (k, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .map_err(|e| data_err(file, k + 1, format!("not valid JSON: {e}")))?;
        if !v.is_object() {
            return Err(data_err(file, k + 1, "expected a JSON object"));
        }
        out.push((k + 1, v));
    }
    Ok(out)
}

fn text_field<'v>(file: &Path, line: usize, v: &'v Value, key: &str) -> Result<&'v str> {
    v.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| data_err(file, line, format!("'{key}' is missing or not a string")))
}

/// Tokenizes the records of `file` with `lm`'s tokenizer and template.
pub fn tokenize(
    lm: &LanguageModel,
    file: &Path,
    records: &[(usize, Value)],
    features: &Features,
    mask_prompt: bool,
) -> Result<Dataset> {
    let Some((_, first)) = records.first() else {
        return Ok(Dataset {
            file: file.to_path_buf(),
            examples: Vec::new(),
        });
    };
    let format =
        if first.get(&features.prompt).is_some() && first.get(&features.completion).is_some() {
            Format::Completions
        } else if first.get(&features.chat).is_some() {
            Format::Chat
        } else if first.get(&features.text).is_some() {
            if mask_prompt {
                return Err(data_err(
                    file,
                    records[0].0,
                    "prompt masking is not possible for a text dataset",
                ));
            }
            Format::Text
        } else {
            return Err(data_err(
                file,
                records[0].0,
                format!(
                    "unknown record format: expected '{}'+'{}', '{}' or '{}' keys",
                    features.prompt, features.completion, features.chat, features.text
                ),
            ));
        };
    let eos = lm.tokenizer.eos_ids.first().copied();
    let mut examples = Vec::with_capacity(records.len());
    for (line, v) in records {
        let line = *line;
        let at = |e: Error| data_err(file, line, e.to_string());
        let tools = v.get("tools").filter(|t| !t.is_null()).cloned();
        let ctx = |gen: bool| ChatContext {
            tools: tools.clone(),
            add_generation_prompt: gen,
            ..ChatContext::default()
        };
        let example = match format {
            Format::Text => {
                let mut ids = lm
                    .tokenizer
                    .encode(text_field(file, line, v, &features.text)?)
                    .map_err(at)?;
                if let Some(e) = eos {
                    if ids.last() != Some(&e) {
                        ids.push(e);
                    }
                }
                (ids, 0)
            }
            Format::Completions | Format::Chat => {
                let messages = match format {
                    Format::Completions => serde_json::json!([
                        {"role": "user", "content": text_field(file, line, v, &features.prompt)?},
                        {"role": "assistant", "content": text_field(file, line, v, &features.completion)?},
                    ]),
                    _ => v
                        .get(&features.chat)
                        .filter(|m| m.as_array().is_some_and(|a| !a.is_empty()))
                        .cloned()
                        .ok_or_else(|| {
                            data_err(
                                file,
                                line,
                                format!("'{}' must be a non-empty list of messages", features.chat),
                            )
                        })?,
                };
                let ids = lm.chat_prompt(&messages, &ctx(false)).map_err(at)?;
                let offset = if mask_prompt {
                    let list = messages.as_array().map(Vec::as_slice).unwrap_or_default();
                    let gen = list
                        .last()
                        .and_then(|m| m.get("role"))
                        .and_then(Value::as_str)
                        == Some("assistant");
                    let prompt = Value::Array(list[..list.len() - 1].to_vec());
                    lm.chat_prompt(&prompt, &ctx(gen)).map_err(at)?.len()
                } else {
                    0
                };
                (ids, offset)
            }
        };
        if example.0.len() < 2 {
            return Err(data_err(
                file,
                line,
                "gives fewer than 2 tokens: nothing to predict",
            ));
        }
        examples.push(example);
    }
    Ok(Dataset {
        file: file.to_path_buf(),
        examples,
    })
}

/// Reads and tokenizes a data folder's `train.jsonl`, `valid.jsonl` and
/// `test.jsonl` (each optional).
pub fn load(
    lm: &LanguageModel,
    dir: &Path,
    features: &Features,
    mask_prompt: bool,
) -> Result<Datasets> {
    if !dir.is_dir() {
        return Err(Error::Usage(format!(
            "--data {}: not a folder (it should hold train.jsonl and valid.jsonl)",
            dir.display()
        )));
    }
    let split = |name: &str| -> Result<Dataset> {
        let file = dir.join(format!("{name}.jsonl"));
        if !file.exists() {
            return Ok(Dataset {
                file,
                examples: Vec::new(),
            });
        }
        let records = read_jsonl(&file)?;
        tokenize(lm, &file, &records, features, mask_prompt)
    };
    Ok(Datasets {
        train: split("train")?,
        valid: split("valid")?,
        test: split("test")?,
    })
}

/// mlx-lm's padded length: one more than the longest example rounded up
/// to a multiple of 32, at most `max_seq_length`.
pub fn padded_length(longest: usize, max_seq_length: usize) -> usize {
    let pad_to = 32;
    (1 + pad_to * longest.div_ceil(pad_to)).min(max_seq_length)
}

/// One padded batch of `examples` (truncated to `max_seq_length`), as
/// mlx-lm's `iterate_batches` makes it.
pub fn make_batch(examples: &[&(Vec<u32>, usize)], max_seq_length: usize) -> Result<Batch> {
    let longest = examples.iter().map(|e| e.0.len()).max().unwrap_or(0);
    let width = padded_length(longest, max_seq_length);
    let mut ids = vec![0i32; examples.len() * width];
    let mut lengths = Vec::with_capacity(examples.len() * 2);
    for (row, (toks, offset)) in examples.iter().enumerate() {
        let n = toks.len().min(max_seq_length);
        for (j, &t) in toks[..n].iter().enumerate() {
            ids[row * width + j] = t as i32;
        }
        lengths.push(*offset as i32);
        lengths.push(n as i32);
    }
    Ok(Batch {
        tokens: Array::from_slice(&ids, &[examples.len() as i32, width as i32]),
        lengths: Array::from_slice(&lengths, &[examples.len() as i32, 2]),
    })
}

/// The batches of one pass: examples sorted by length (stable), grouped
/// `batch_size` at a time (a last partial group is dropped, as mlx-lm
/// does); `order` gives the order of the groups.
pub fn batch_groups(data: &Dataset, batch_size: usize) -> Result<Vec<Vec<usize>>> {
    if batch_size == 0 {
        return Err(Error::Usage("batch_size must be at least 1".into()));
    }
    if data.len() < batch_size {
        return Err(Error::Usage(format!(
            "{}: the dataset must have at least batch_size={batch_size} examples, it has {}",
            data.file.display(),
            data.len()
        )));
    }
    let mut idx: Vec<usize> = (0..data.len()).collect();
    idx.sort_by_key(|&i| data.examples[i].0.len());
    Ok(idx
        .chunks_exact(batch_size)
        .map(<[usize]>::to_vec)
        .collect())
}

/// A small deterministic generator (SplitMix64) for the batch order.
#[derive(Debug, Clone)]
pub struct Shuffler(u64);

impl Shuffler {
    pub fn new(seed: u64) -> Shuffler {
        Shuffler(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// A permutation of `0..n` (Fisher-Yates).
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            p.swap(i, j);
        }
        p
    }
}
