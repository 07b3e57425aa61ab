//! Tokenizers: `tokenizer.json` through the `tokenizers` crate, or a
//! byte-level BPE built from GGUF metadata; plus the special tokens, EOS ids
//! and chat template that generation needs.
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper};

use lmspec_engine::error::{read_to_string, Error, Result};
use lmspec_engine::gguf::GgufTokenizerData;

/// GGUF token type of control (special) tokens.
const GGUF_CONTROL: i32 = 3;

/// A tokenizer with what generation needs around it.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Where it came from (named in errors).
    pub source: PathBuf,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub bos_id: Option<u32>,
    /// Token ids that end generation.
    pub eos_ids: Vec<u32>,
    /// Whether encoding a prompt prepends BOS.
    pub add_bos: bool,
    pub chat_template: Option<String>,
    /// The file the chat template came from (named in template errors).
    pub chat_template_file: PathBuf,
    /// `tool_parser_type` from `tokenizer_config.json`, if any.
    pub tool_parser_type: Option<String>,
    /// `response_template` from `tokenizer_config.json`, with that file.
    pub response_template: Option<(PathBuf, serde_json::Value)>,
}

fn tok_err(source: &Path, msg: impl Into<String>) -> Error {
    Error::Tokenizer {
        file: source.to_path_buf(),
        msg: msg.into(),
    }
}

fn json_file(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = read_to_string(path)?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| tok_err(path, format!("invalid JSON: {e}")))
}

/// Runs `f`, a call into the tokenizers library, turning a panic inside it
/// (some malformed `tokenizer.json` files make it panic rather than fail)
/// into an error naming `file`. The panic's default report is kept quiet
/// for these calls only; every other panic reports as before.
fn guarded<T>(file: &Path, what: &str, f: impl FnOnce() -> T) -> Result<T> {
    lmspec_formats::guard::catch_quietly(f).map_err(|why| {
        tok_err(
            file,
            format!("cannot {what}: the tokenizer library failed ({why})"),
        )
    })
}

/// A token given as a string or as `{"content": ...}` (tokenizer_config.json).
fn token_text(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// Token ids given as one id or a list (`eos_token_id`); anything else,
/// a negative id or one past 32 bits, is an error naming `file` and `key`.
fn ids(v: Option<&serde_json::Value>, file: &Path, key: &str) -> Result<Vec<u32>> {
    let bad = |v: &serde_json::Value| {
        tok_err(
            file,
            format!("{key}: {v} is not a token id or a list of token ids"),
        )
    };
    let one = |x: &serde_json::Value| {
        x.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| bad(x))
    };
    match v {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(serde_json::Value::Array(a)) => a.iter().map(one).collect(),
        Some(x) => Ok(vec![one(x)?]),
    }
}

impl Tokenizer {
    /// From a Hugging Face model folder: `tokenizer.json`, with special
    /// tokens and the chat template from `tokenizer_config.json` (or
    /// `chat_template.jinja`), and EOS ids as mlx-lm gathers them:
    /// `generation_config.json`'s when present, else `config.json`'s, plus the
    /// tokenizer's EOS token.
    pub fn from_dir(dir: &Path) -> Result<Tokenizer> {
        let file = dir.join("tokenizer.json");
        if !file.exists() {
            return Err(tok_err(
                &file,
                "missing: the model folder has no tokenizer.json",
            ));
        }
        let inner = guarded(&file, "load", || tokenizers::Tokenizer::from_file(&file))?
            .map_err(|e| tok_err(&file, format!("cannot load: {e}")))?;
        let cfg = json_file(&dir.join("tokenizer_config.json"))?.unwrap_or_default();
        let bos_token = token_text(cfg.get("bos_token"));
        let eos_token = token_text(cfg.get("eos_token"));
        let mut chat_template = match cfg.get("chat_template") {
            Some(serde_json::Value::String(t)) => Some(t.clone()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        };
        let mut chat_template_file = dir.join("tokenizer_config.json");
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            chat_template = Some(read_to_string(&jinja)?);
            chat_template_file = jinja;
        }
        let gen = json_file(&dir.join("generation_config.json"))?;
        let model_cfg = json_file(&dir.join("config.json"))?.unwrap_or_default();
        let gen_file = dir.join("generation_config.json");
        let gen_ids = match &gen {
            Some(g) => ids(g.get("eos_token_id"), &gen_file, "eos_token_id")?,
            None => Vec::new(),
        };
        let cfg_ids = ids(
            model_cfg.get("eos_token_id"),
            &dir.join("config.json"),
            "eos_token_id",
        )?;
        let mut eos_ids = if gen_ids.is_empty() { cfg_ids } else { gen_ids };
        if let Some(id) = eos_token.as_ref().and_then(|t| inner.token_to_id(t)) {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        let bos_id = bos_token.as_ref().and_then(|t| inner.token_to_id(t));
        let add_bos = cfg
            .get("add_bos_token")
            .and_then(|b| b.as_bool())
            .unwrap_or(false);
        let tool_parser_type = cfg
            .get("tool_parser_type")
            .and_then(|t| t.as_str())
            .map(str::to_string);
        let response_template = cfg
            .get("response_template")
            .map(|t| (dir.join("tokenizer_config.json"), t.clone()));
        Ok(Tokenizer {
            inner,
            source: file,
            bos_token,
            eos_token,
            bos_id,
            eos_ids,
            add_bos,
            chat_template,
            chat_template_file,
            tool_parser_type,
            response_template,
        })
    }

    /// A byte-level BPE from GGUF metadata (`tokenizer.ggml.model = gpt2`):
    /// vocab and merges, pre-tokenizer Digits(individual) + ByteLevel (no
    /// prefix space, GPT-2 regex), ByteLevel decoder, control tokens matched
    /// whole as special tokens.
    pub fn from_gguf(data: &GgufTokenizerData, file: &Path) -> Result<Tokenizer> {
        match data.model.as_deref() {
            Some("gpt2") => {}
            Some(other) => {
                return Err(tok_err(
                    file,
                    format!("GGUF tokenizer model '{other}' is not supported (supported: gpt2)"),
                ))
            }
            None => {
                return Err(tok_err(
                    file,
                    "missing: no tokenizer.ggml.model in the metadata",
                ))
            }
        }
        if data.tokens.is_empty() {
            return Err(tok_err(file, "missing: tokenizer.ggml.tokens is empty"));
        }
        let vocab: tokenizers::models::bpe::Vocab = data
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut merges = Vec::with_capacity(data.merges.len());
        for (k, m) in data.merges.iter().enumerate() {
            let (a, b) = m.split_once(' ').ok_or_else(|| {
                tok_err(
                    file,
                    format!("tokenizer.ggml.merges[{k}] = {m:?} is not 'a b'"),
                )
            })?;
            merges.push((a.to_string(), b.to_string()));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| tok_err(file, format!("cannot build BPE: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let pre = Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        ]);
        inner.with_pre_tokenizer(Some(pre));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let specials: Vec<AddedToken> = data
            .tokens
            .iter()
            .zip(&data.token_types)
            .filter(|(_, t)| **t == GGUF_CONTROL)
            .map(|(tok, _)| AddedToken::from(tok.clone(), true))
            .collect();
        inner.add_special_tokens(&specials);
        let name = |id: Option<u32>| id.and_then(|i| data.tokens.get(i as usize).cloned());
        Ok(Tokenizer {
            inner,
            source: file.to_path_buf(),
            bos_token: name(data.bos_id),
            eos_token: name(data.eos_id),
            bos_id: data.bos_id,
            eos_ids: data.eos_id.into_iter().collect(),
            add_bos: data.add_bos,
            chat_template: data.chat_template.clone(),
            chat_template_file: file.to_path_buf(),
            tool_parser_type: None,
            response_template: None,
        })
    }

    /// A bare tokenizer from the text of a `tokenizer.json` (`file` names
    /// it in errors): no chat template, no EOS ids beyond what the caller
    /// adds.
    pub fn from_json(json: &[u8], file: &Path) -> Result<Tokenizer> {
        let inner = guarded(file, "load", || tokenizers::Tokenizer::from_bytes(json))?
            .map_err(|e| tok_err(file, format!("cannot load: {e}")))?;
        Ok(Tokenizer {
            inner,
            source: file.to_path_buf(),
            bos_token: None,
            eos_token: None,
            bos_id: None,
            eos_ids: Vec::new(),
            add_bos: false,
            chat_template: None,
            chat_template_file: file.to_path_buf(),
            tool_parser_type: None,
            response_template: None,
        })
    }

    /// Token ids of `text`; special tokens in the text are matched whole.
    /// BOS is prepended when the tokenizer asks for it and the text does not
    /// already start with it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = guarded(&self.source, "encode", || self.inner.encode(text, false))?
            .map_err(|e| tok_err(&self.source, format!("cannot encode: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        if let (true, Some(bos)) = (self.add_bos, self.bos_id) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// This tokenizer set up for an encoder: no padding (batches are padded
    /// by the caller) and truncation to `max_tokens`, whatever the file says.
    pub fn for_encoder(mut self, max_tokens: usize) -> Result<Tokenizer> {
        self.inner.with_padding(None);
        self.inner
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: max_tokens,
                ..Default::default()
            }))
            .map_err(|e| tok_err(&self.source, format!("cannot set truncation: {e}")))?;
        Ok(self)
    }

    /// Token ids of `text` with the tokenizer's special tokens added by its
    /// post-processor (e.g. `[CLS] ... [SEP]`), truncated as configured.
    pub fn encode_with_special(&self, text: &str) -> Result<Vec<u32>> {
        guarded(&self.source, "encode", || self.inner.encode(text, true))?
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| tok_err(&self.source, format!("cannot encode: {e}")))
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        guarded(&self.source, "decode", || {
            self.inner.decode(ids, skip_special)
        })?
        .map_err(|e| tok_err(&self.source, format!("cannot decode: {e}")))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Special tokens by text (for the chat template context).
    pub fn special_tokens(&self) -> IndexMap<&'static str, String> {
        let mut m = IndexMap::new();
        if let Some(b) = &self.bos_token {
            m.insert("bos_token", b.clone());
        }
        if let Some(e) = &self.eos_token {
            m.insert("eos_token", e.clone());
        }
        m
    }
}

/// Turns generated token ids into text as they arrive, emitting only
/// complete characters and keeping word boundaries right (the decode of a
/// token is taken in the context of the tokens before it, so SentencePiece
/// leading spaces and multi-byte UTF-8 split over tokens come out right).
#[derive(Debug, Default)]
pub struct StreamingDetokenizer {
    tokens: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl StreamingDetokenizer {
    pub fn new() -> StreamingDetokenizer {
        StreamingDetokenizer::default()
    }

    /// Adds a token; returns newly completed text (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.tokens.push(id);
        let before = tok.decode(&self.tokens[self.prefix..self.read], false)?;
        let now = tok.decode(&self.tokens[self.prefix..], false)?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') && now.starts_with(&before) {
            let out = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.tokens.len();
            Ok(out)
        } else {
            Ok(String::new())
        }
    }

    /// Whatever is left (an incomplete character decodes to U+FFFD).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String> {
        let before = tok.decode(&self.tokens[self.prefix..self.read], false)?;
        let now = tok.decode(&self.tokens[self.prefix..], false)?;
        self.prefix = self.tokens.len();
        self.read = self.tokens.len();
        Ok(now.get(before.len()..).unwrap_or_default().to_string())
    }
}
