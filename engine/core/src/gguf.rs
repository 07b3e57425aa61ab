//! GGUF checkpoints: tensors through our own reader ([`crate::gguf_tensors`]:
//! floats as stored, the types that map onto MLX affine quantization as
//! such, the others dequantized to float32), config and tokenizer data from
//! the metadata of our own header parse. Which spec serves a file, how its config is built and how its
//! tensor names map are data in the spec's `gguf` section.
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use lmspec_formats::gguf::Value;
use mlx_rs::Array;

use crate::error::{Error, Result};
use lmspec_spec::library::Spec;
use lmspec_spec::raw::GgufSource;

/// Everything read from a GGUF file.
#[derive(Debug)]
pub struct GgufCheckpoint {
    pub file: PathBuf,
    pub architecture: String,
    /// A `config.json` equivalent built by the spec's `gguf.config`.
    pub config: serde_json::Value,
    pub tensors: IndexMap<String, Array>,
    pub tokenizer: GgufTokenizerData,
}

/// Tokenizer and chat data of a GGUF file (`tokenizer.*` metadata).
#[derive(Debug, Clone, Default)]
pub struct GgufTokenizerData {
    pub model: Option<String>,
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.scores` (SentencePiece vocabularies); `None` when absent.
    pub scores: Option<Vec<f32>>,
    pub merges: Vec<String>,
    pub token_types: Vec<i32>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub unk_id: Option<u32>,
    pub pad_id: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    /// `tokenizer.ggml.add_space_prefix`; `None` when absent.
    pub add_space_prefix: Option<bool>,
    pub chat_template: Option<String>,
}

impl GgufTokenizerData {
    /// The tokenizer data of a GGUF file, from its checked header alone (no
    /// tensor is read).
    pub fn read(path: &Path) -> Result<GgufTokenizerData> {
        let header = lmspec_formats::gguf::check_file(path, &crate::weights::format_limits()?)
            .map_err(|e| bad(path, e.to_string()))?;
        GgufTokenizerData::from_header(&header, path)
    }

    /// The `tokenizer.*` metadata of a checked GGUF header; a value of the
    /// wrong type is an error naming `file` and the key.
    pub fn from_header(h: &lmspec_formats::gguf::Header, file: &Path) -> Result<GgufTokenizerData> {
        use lmspec_formats::gguf::Value;
        let err = |key: &str, what: String| Error::Tokenizer {
            file: file.to_path_buf(),
            msg: format!("{key}: {what}"),
        };
        let string = |key: &str| match h.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(err(key, format!("expected a string, got {v:?}"))),
        };
        let list = |key: &str| match h.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(_) => Err(err(key, "expected an array".into())),
        };
        let strings = |key: &str| -> Result<Vec<String>> {
            let Some(a) = list(key)? else {
                return Ok(Vec::new());
            };
            a.iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s.clone()),
                    v => Err(err(
                        &format!("{key}[{i}]"),
                        format!("expected a string, got {v:?}"),
                    )),
                })
                .collect()
        };
        let id = |key: &str| match h.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
                Some(n) => Ok(Some(n)),
                None => Err(err(key, format!("{v:?} is not a token id"))),
            },
        };
        let flag = |key: &str| match h.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(err(key, format!("expected a bool, got {v:?}"))),
        };
        let key = "tokenizer.ggml.scores";
        let scores = match list(key)? {
            None => None,
            Some(a) => Some(
                a.iter()
                    .enumerate()
                    .map(|(i, v)| match *v {
                        Value::F32(x) => Ok(x),
                        Value::F64(x) => Ok(x as f32),
                        Value::I32(x) => Ok(x as f32),
                        ref v => Err(err(
                            &format!("{key}[{i}]"),
                            format!("expected a number, got {v:?}"),
                        )),
                    })
                    .collect::<Result<Vec<f32>>>()?,
            ),
        };
        let key = "tokenizer.ggml.token_type";
        let token_types = match list(key)? {
            None => Vec::new(),
            Some(a) => a
                .iter()
                .enumerate()
                .map(|(i, v)| match v.as_u64().map(i32::try_from) {
                    Some(Ok(t)) => Ok(t),
                    _ => Err(err(
                        &format!("{key}[{i}]"),
                        format!("{v:?} is not a token type"),
                    )),
                })
                .collect::<Result<Vec<i32>>>()?,
        };
        let model = string("tokenizer.ggml.model")?;
        let pre = string("tokenizer.ggml.pre")?;
        // Without the key, llama.cpp adds BOS for SentencePiece vocabularies
        // and for the BPE pre-tokenizers of Llama 3, Tekken and Chameleon.
        let bos_by_default = model.as_deref() == Some("llama")
            || matches!(
                pre.as_deref(),
                Some(
                    "llama3"
                        | "llama-v3"
                        | "llama-bpe"
                        | "falcon3"
                        | "falcon-h1"
                        | "pixtral"
                        | "midm-2.0"
                        | "lfm2"
                        | "jina-v5-nano"
                        | "tekken"
                        | "chameleon"
                )
            );
        Ok(GgufTokenizerData {
            model,
            pre,
            tokens: strings("tokenizer.ggml.tokens")?,
            scores,
            merges: strings("tokenizer.ggml.merges")?,
            token_types,
            bos_id: id("tokenizer.ggml.bos_token_id")?,
            eos_id: id("tokenizer.ggml.eos_token_id")?,
            unk_id: id("tokenizer.ggml.unknown_token_id")?,
            pad_id: id("tokenizer.ggml.padding_token_id")?,
            add_bos: flag("tokenizer.ggml.add_bos_token")?.unwrap_or(bos_by_default),
            add_eos: flag("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
            add_space_prefix: flag("tokenizer.ggml.add_space_prefix")?,
            chat_template: string("tokenizer.chat_template")?,
        })
    }
}

/// An open GGUF file, before a spec is chosen.
pub struct GgufReader {
    file: PathBuf,
    header: lmspec_formats::gguf::Header,
}

impl std::fmt::Debug for GgufReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GgufReader({})", self.file.display())
    }
}

fn bad(file: &Path, msg: impl Into<String>) -> Error {
    Error::Weights {
        file: file.to_path_buf(),
        msg: msg.into(),
    }
}

/// A metadata value as JSON: strings, string lists, scalars (and, as
/// MLX's reader showed them, one-element arrays of numbers as scalars).
fn value_json(v: &Value) -> Option<serde_json::Value> {
    use serde_json::Value as J;
    Some(match v {
        Value::String(s) => J::from(s.as_str()),
        Value::Bool(b) => J::Bool(*b),
        // Metadata floats are f32: keep their shortest decimal form.
        Value::F32(x) => J::Number(serde_json::Number::from_f64(x.to_string().parse().ok()?)?),
        Value::F64(x) => J::Number(serde_json::Number::from_f64(*x)?),
        Value::Array(a) if !a.is_empty() && a.iter().all(|x| matches!(x, Value::String(_))) => {
            J::Array(a.iter().filter_map(value_json).collect())
        }
        Value::Array(a) => match a.as_slice() {
            [x] if !matches!(x, Value::String(_) | Value::Array(_)) => value_json(x)?,
            _ => return None,
        },
        Value::I8(x) => J::from(*x),
        Value::I16(x) => J::from(*x),
        Value::I32(x) => J::from(*x),
        Value::I64(x) => J::from(*x),
        other => J::from(other.as_u64()?),
    })
}

impl GgufReader {
    pub fn open(path: &Path) -> Result<GgufReader> {
        if !path.exists() {
            return Err(Error::io(
                path,
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        }
        // Our own bounds-checked read of the header first: MLX's reader
        // trusts counts and lengths and crashes on a lying file.
        let header = lmspec_formats::gguf::check_file(path, &crate::weights::format_limits()?)
            .map_err(|e| bad(path, e.to_string()))?;
        // Every tensor's type and size, before anything is read.
        for t in &header.tensors {
            lmspec_formats::gguf_data::Decoder::new(t).map_err(|e| bad(path, e.to_string()))?;
        }
        Ok(GgufReader {
            file: path.to_path_buf(),
            header,
        })
    }

    pub fn string(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .header
            .get(key)
            .and_then(Value::as_str)
            .map(str::to_string))
    }

    /// A metadata value as JSON (scalars, strings, string lists).
    pub fn json(&self, key: &str) -> Result<Option<serde_json::Value>> {
        Ok(self.header.get(key).and_then(value_json))
    }

    pub fn architecture(&self) -> Result<String> {
        self.string("general.architecture")?
            .ok_or_else(|| bad(&self.file, "no general.architecture in the metadata"))
    }

    /// The length of an array in the metadata (read from our own header
    /// parse: MLX shows a scalar and a one-element array alike).
    fn len_of(&self, key: &str) -> Result<Option<usize>> {
        match self.header.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a.len())),
            Some(other) => Err(bad(
                &self.file,
                format!("metadata '{key}': expected an array, got {other:?}"),
            )),
        }
    }

    fn tokenizer_data(&self) -> Result<GgufTokenizerData> {
        GgufTokenizerData::from_header(&self.header, &self.file)
    }

    /// Reads tensors and builds the config the spec's `gguf` section asks for.
    pub fn read(self, spec: &Spec) -> Result<GgufCheckpoint> {
        let arch = self.architecture()?;
        let section = spec.gguf.as_ref().ok_or_else(|| {
            bad(
                &self.file,
                format!("spec '{}' has no `gguf` section", spec.name),
            )
        })?;
        let mut tensors: Vec<(String, Array)> =
            crate::gguf_tensors::read_tensors(&self.file, &self.header)?
                .into_iter()
                .collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let tensors: IndexMap<String, Array> = tensors.into_iter().collect();
        let mut config = serde_json::Map::new();
        if let Some(mt) = spec.model_types.first() {
            config.insert("model_type".into(), mt.clone().into());
        }
        for (key, source) in &section.item.config {
            let value = match source {
                GgufSource::Key(k) => self.json(&k.replace("{arch}", &arch))?,
                GgufSource::Len { len } => self
                    .len_of(&len.replace("{arch}", &arch))?
                    .map(serde_json::Value::from),
                GgufSource::Absent { absent } => Some(serde_json::Value::Bool(
                    !tensors.contains_key(absent.as_str()),
                )),
                GgufSource::Value { value } => serde_json::to_value(value).ok(),
            };
            if let Some(v) = value {
                config.insert(key.clone(), v);
            }
        }
        Ok(GgufCheckpoint {
            tokenizer: self.tokenizer_data()?,
            file: self.file,
            architecture: arch,
            config: serde_json::Value::Object(config),
            tensors,
        })
    }
}
