//! GGUF checkpoints: tensors through MLX's GGUF reader (quantized types
//! arrive as MLX affine quantization), config and tokenizer data from the
//! metadata. Which spec serves a file, how its config is built and how its
//! tensor names map are data in the spec's `gguf` section.
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use mlx_rs::io::{GgufFile, GgufMetadataValue};
use mlx_rs::{Array, Dtype};

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
    pub merges: Vec<String>,
    pub token_types: Vec<i32>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub add_bos: bool,
    pub chat_template: Option<String>,
}

/// Tensor types MLX's GGUF reader loads (others abort inside it).
const MLX_GGUF_TYPES: [&str; 6] = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0"];

/// An open GGUF file, before a spec is chosen.
pub struct GgufReader {
    file: PathBuf,
    header: lmspec_formats::gguf::Header,
    gguf: GgufFile,
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

/// A scalar metadata array as JSON.
fn scalar_json(a: &Array) -> Option<serde_json::Value> {
    if a.size() != 1 {
        return None;
    }
    a.eval().ok()?;
    Some(match a.dtype() {
        Dtype::Bool => serde_json::Value::Bool(a.try_item_cast::<i32>().ok()? != 0),
        Dtype::Float16 | Dtype::Bfloat16 | Dtype::Float32 | Dtype::Float64 => {
            // Metadata floats are f32: keep their shortest decimal form.
            let x = a.try_item_cast::<f32>().ok()?;
            let x: f64 = x.to_string().parse().ok()?;
            serde_json::Number::from_f64(x).map(serde_json::Value::Number)?
        }
        _ => serde_json::Value::from(a.try_item_cast::<i64>().ok()?),
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
        for t in &header.tensors {
            if !MLX_GGUF_TYPES.contains(&t.type_name) {
                return Err(bad(
                    path,
                    format!(
                        "tensor '{}': type: {} is not supported by MLX's GGUF reader (supported: {})",
                        t.name,
                        t.type_name,
                        MLX_GGUF_TYPES.join(", ")
                    ),
                ));
            }
        }
        let gguf = GgufFile::load(path).map_err(|e| {
            let e = e.to_string();
            // MLX's own message carries its source location; keep the cause.
            let cause = e.split(" at /").next().unwrap_or(&e).trim_matches('"').to_string();
            if cause.contains("gguf_tensor_to_f16") {
                bad(path, format!("cannot read GGUF: a tensor type is not supported by MLX's GGUF reader ({cause})"))
            } else {
                bad(path, format!("cannot read GGUF: {cause}"))
            }
        })?;
        Ok(GgufReader {
            file: path.to_path_buf(),
            header,
            gguf,
        })
    }

    pub fn string(&self, key: &str) -> Result<Option<String>> {
        match self.gguf.get_metadata(key) {
            Ok(Some(GgufMetadataValue::String(s))) => Ok(Some(s)),
            Ok(_) => Ok(None),
            Err(e) => Err(bad(&self.file, format!("metadata '{key}': {e}"))),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        match self.gguf.get_metadata(key) {
            Ok(Some(GgufMetadataValue::Strings(s))) => Ok(s),
            Ok(_) => Ok(Vec::new()),
            Err(e) => Err(bad(&self.file, format!("metadata '{key}': {e}"))),
        }
    }

    fn array(&self, key: &str) -> Result<Option<Array>> {
        match self.gguf.get_metadata(key) {
            Ok(Some(GgufMetadataValue::Array(a))) => Ok(Some(a)),
            Ok(_) => Ok(None),
            Err(e) => Err(bad(&self.file, format!("metadata '{key}': {e}"))),
        }
    }

    /// A metadata value as JSON (scalars, strings, string lists).
    pub fn json(&self, key: &str) -> Result<Option<serde_json::Value>> {
        match self.gguf.get_metadata(key) {
            Ok(Some(GgufMetadataValue::String(s))) => Ok(Some(s.into())),
            Ok(Some(GgufMetadataValue::Strings(s))) => Ok(Some(s.into())),
            Ok(Some(GgufMetadataValue::Array(a))) => Ok(scalar_json(&a)),
            Ok(None) => Ok(None),
            Err(e) => Err(bad(&self.file, format!("metadata '{key}': {e}"))),
        }
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
            Some(lmspec_formats::gguf::Value::Array(a)) => Ok(Some(a.len())),
            Some(other) => Err(bad(
                &self.file,
                format!("metadata '{key}': expected an array, got {other:?}"),
            )),
        }
    }

    fn tokenizer_data(&self) -> Result<GgufTokenizerData> {
        let id = |k: &str| -> Result<Option<u32>> {
            Ok(self.json(k)?.and_then(|v| v.as_u64()).map(|v| v as u32))
        };
        let token_types = match self.array("tokenizer.ggml.token_type")? {
            Some(a) => {
                let a = a
                    .as_dtype(Dtype::Int32)
                    .map_err(|e| bad(&self.file, e.to_string()))?;
                a.eval().map_err(|e| bad(&self.file, e.to_string()))?;
                a.as_slice::<i32>().to_vec()
            }
            None => Vec::new(),
        };
        Ok(GgufTokenizerData {
            model: self.string("tokenizer.ggml.model")?,
            pre: self.string("tokenizer.ggml.pre")?,
            tokens: self.strings("tokenizer.ggml.tokens")?,
            merges: self.strings("tokenizer.ggml.merges")?,
            token_types,
            bos_id: id("tokenizer.ggml.bos_token_id")?,
            eos_id: id("tokenizer.ggml.eos_token_id")?,
            add_bos: self
                .json("tokenizer.ggml.add_bos_token")?
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            chat_template: self.string("tokenizer.chat_template")?,
        })
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
        let mut tensors: Vec<(String, Array)> = self
            .gguf
            .arrays()
            .map_err(|e| bad(&self.file, format!("cannot read GGUF tensors: {e}")))?
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
