//! Tokenizers: `tokenizer.json` through the `tokenizers` crate, or one
//! built from GGUF metadata (a byte-level BPE, or a SentencePiece vocabulary
//! tokenized as llama.cpp does); plus the special tokens, EOS ids and chat
//! template that generation needs.
use std::collections::{BinaryHeap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use indexmap::IndexMap;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use lmspec_engine::error::{read_to_string, Error, Result};
use lmspec_engine::gguf::GgufTokenizerData;

/// GGUF token types (llama.cpp's `llama_token_type`).
const GGUF_NORMAL: i32 = 1;
const GGUF_UNKNOWN: i32 = 2;
const GGUF_CONTROL: i32 = 3;
const GGUF_USER_DEFINED: i32 = 4;
const GGUF_BYTE: i32 = 6;

/// The tokenizer proper.
#[derive(Debug, Clone)]
enum Inner {
    /// The `tokenizers` crate (`tokenizer.json`, GGUF byte-level BPE).
    Hf(Box<tokenizers::Tokenizer>),
    /// A SentencePiece vocabulary from GGUF, with an optional truncation
    /// (set by [`Tokenizer::for_encoder`]).
    Spm {
        spm: Arc<Spm>,
        truncate: Option<usize>,
    },
}

/// A tokenizer with what generation needs around it.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: Inner,
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
            inner: Inner::Hf(Box::new(inner)),
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

    /// A tokenizer from GGUF metadata, by `tokenizer.ggml.model`:
    /// - `gpt2`: a byte-level BPE: vocab and merges, the pre-tokenizer
    ///   llama.cpp uses for `tokenizer.ggml.pre` (see `bpe_pre_tokenizer`)
    ///   then byte-level mapping, ByteLevel decoder, control tokens matched
    ///   whole as special tokens, user-defined ones as added tokens;
    /// - `llama`: a SentencePiece vocabulary (tokens, scores, token types,
    ///   byte fallback), tokenized and detokenized as llama.cpp's SPM
    ///   tokenizer does (see `Spm`).
    pub fn from_gguf(data: &GgufTokenizerData, file: &Path) -> Result<Tokenizer> {
        match data.model.as_deref() {
            Some("gpt2") => {}
            Some("llama") => return Tokenizer::from_gguf_spm(data, file),
            Some(other) => {
                return Err(tok_err(
                    file,
                    format!(
                        "GGUF tokenizer model '{other}' is not supported (supported: gpt2, llama)"
                    ),
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
        let (pre, ignore_merges) = bpe_pre_tokenizer(data.pre.as_deref(), file)?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(|e| tok_err(file, format!("cannot build BPE: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        // As llama.cpp: control tokens matched whole as special tokens,
        // user-defined ones matched whole in any text.
        let added = |ty: i32, special: bool| -> Vec<AddedToken> {
            data.tokens
                .iter()
                .zip(&data.token_types)
                .filter(|(_, t)| **t == ty)
                .map(|(tok, _)| AddedToken::from(tok.clone(), special))
                .collect()
        };
        inner.add_special_tokens(&added(GGUF_CONTROL, true));
        inner.add_tokens(&added(GGUF_USER_DEFINED, false));
        let name = |id: Option<u32>| id.and_then(|i| data.tokens.get(i as usize).cloned());
        Ok(Tokenizer {
            inner: Inner::Hf(Box::new(inner)),
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
            inner: Inner::Hf(Box::new(inner)),
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

    /// A SentencePiece tokenizer from GGUF metadata (`tokenizer.ggml.model
    /// = llama`). EOS ids: the EOS token, then the end-of-generation tokens
    /// llama.cpp recognises by their text (`<end_of_turn>`, `<|eot_id|>`, ...).
    fn from_gguf_spm(data: &GgufTokenizerData, file: &Path) -> Result<Tokenizer> {
        let spm = Spm::new(data).map_err(|m| tok_err(file, m))?;
        let name = |id: Option<u32>| id.map(|i| spm.tokens[i as usize].clone());
        let mut eos_ids: Vec<u32> = spm.eos_id.into_iter().collect();
        for &id in &spm.eog {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        Ok(Tokenizer {
            source: file.to_path_buf(),
            bos_token: name(spm.bos_id),
            eos_token: name(spm.eos_id),
            bos_id: spm.bos_id,
            eos_ids,
            add_bos: spm.add_bos,
            chat_template: data.chat_template.clone(),
            chat_template_file: file.to_path_buf(),
            tool_parser_type: None,
            response_template: None,
            inner: Inner::Spm {
                spm: Arc::new(spm),
                truncate: None,
            },
        })
    }

    /// Token ids of `text`; special tokens in the text are matched whole.
    /// BOS is prepended when the tokenizer asks for it and the text does not
    /// already start with it (a SentencePiece vocabulary from GGUF also gets
    /// EOS appended when `tokenizer.ggml.add_eos_token` asks for it, as
    /// llama.cpp does).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenize(text, true, true)
    }

    /// Token ids of `text` as llama.cpp's `llama_tokenize(text, add_special,
    /// parse_special)` gives them: `add_special` adds BOS (and EOS) as the
    /// tokenizer asks; `parse_special` matches control tokens (`<bos>`,
    /// `<start_of_turn>`, ...) written in the text, which are otherwise
    /// tokenized as plain text (user-defined tokens are matched either way;
    /// for a `tokenizers`-crate tokenizer, `parse_special = false` works on a
    /// copy of it, which costs a copy per call).
    pub fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<u32>> {
        let mut ids = match &self.inner {
            Inner::Hf(t) => {
                let enc = if parse_special {
                    guarded(&self.source, "encode", || t.encode(text, false))?
                } else {
                    let mut t = t.clone();
                    t.set_encode_special_tokens(true);
                    guarded(&self.source, "encode", || t.encode(text, false))?
                };
                enc.map_err(|e| tok_err(&self.source, format!("cannot encode: {e}")))?
                    .get_ids()
                    .to_vec()
            }
            Inner::Spm { spm, .. } => {
                let mut ids = Vec::new();
                spm.encode(text, parse_special, &mut ids)
                    .map_err(|m| tok_err(&self.source, format!("cannot encode: {m}")))?;
                if let (true, true, Some(eos)) = (add_special, spm.add_eos, spm.eos_id) {
                    ids.push(eos);
                }
                ids
            }
        };
        if let (true, true, Some(bos)) = (add_special, self.add_bos, self.bos_id) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// This tokenizer set up for an encoder: no padding (batches are padded
    /// by the caller) and truncation to `max_tokens`, whatever the file says.
    pub fn for_encoder(mut self, max_tokens: usize) -> Result<Tokenizer> {
        match &mut self.inner {
            Inner::Hf(t) => {
                t.with_padding(None);
                t.with_truncation(Some(tokenizers::TruncationParams {
                    max_length: max_tokens,
                    ..Default::default()
                }))
                .map_err(|e| tok_err(&self.source, format!("cannot set truncation: {e}")))?;
            }
            Inner::Spm { truncate, .. } => *truncate = Some(max_tokens),
        }
        Ok(self)
    }

    /// Token ids of `text` with the tokenizer's special tokens added by its
    /// post-processor (e.g. `[CLS] ... [SEP]`; BOS/EOS as a GGUF
    /// SentencePiece vocabulary asks), truncated as configured.
    pub fn encode_with_special(&self, text: &str) -> Result<Vec<u32>> {
        match &self.inner {
            Inner::Hf(t) => guarded(&self.source, "encode", || t.encode(text, true))?
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| tok_err(&self.source, format!("cannot encode: {e}"))),
            Inner::Spm { truncate, .. } => {
                let mut ids = self.tokenize(text, true, true)?;
                if let Some(n) = truncate {
                    ids.truncate(*n);
                }
                Ok(ids)
            }
        }
    }

    /// Token ids and token-type (segment) ids of a text pair with the
    /// post-processor's pair template (`[CLS] a [SEP] b [SEP]`, `<s> a </s></s>
    /// b </s>`), truncated longest-first as configured.
    pub fn encode_pair_with_special(&self, a: &str, b: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        match &self.inner {
            Inner::Hf(t) => guarded(&self.source, "encode", || t.encode((a, b), true))?
                .map(|e| (e.get_ids().to_vec(), e.get_type_ids().to_vec()))
                .map_err(|e| tok_err(&self.source, format!("cannot encode a pair: {e}"))),
            Inner::Spm { .. } => Err(tok_err(
                &self.source,
                "text pairs need a tokenizer.json with a pair template",
            )),
        }
    }

    /// Text of `ids`; `skip_special` leaves out special tokens (for a GGUF
    /// SentencePiece vocabulary: control and unknown tokens, as llama.cpp's
    /// `llama_detokenize(remove_special, !unparse_special)`).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        match &self.inner {
            Inner::Hf(t) => guarded(&self.source, "decode", || t.decode(ids, skip_special))?
                .map_err(|e| tok_err(&self.source, format!("cannot decode: {e}"))),
            Inner::Spm { spm, .. } => spm
                .decode(ids, skip_special)
                .map_err(|m| tok_err(&self.source, format!("cannot decode: {m}"))),
        }
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match &self.inner {
            Inner::Hf(t) => t.token_to_id(token),
            Inner::Spm { spm, .. } => spm.ids.get(token).copied(),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match &self.inner {
            Inner::Hf(t) => t.get_vocab_size(true),
            Inner::Spm { spm, .. } => spm.tokens.len(),
        }
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

/// llama.cpp's GPT-2 split regex.
const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// llama.cpp's Llama 3 split regex (3-digit groups).
const RE_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's Qwen2 split regex (single digits).
const RE_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's DeepSeek-V3 split regexes.
const RE_DEEPSEEK3: &[&str] = &[
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];
/// llama.cpp's DeepSeek Coder split regexes.
const RE_DEEPSEEK_CODER: &[&str] = &[
    r"[\r\n]",
    r"\s?\p{L}+",
    r"\s?\p{P}+",
    r"[一-龥ࠀ-一가-퟿]+",
    r"\p{N}",
];
/// llama.cpp's Tekken (Mistral Nemo) split regex.
const RE_TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's GPT-4o (Llama 4) split regex.
const RE_GPT4O: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's split regexes for a missing or `default` pre-tokenizer.
const RE_DEFAULT: &[&str] = &[
    r"[\p{P}\$\+<=>\^~\|]+",
    RE_GPT2,
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
];
/// llama.cpp's Falcon split regexes.
const RE_FALCON: &[&str] = &[r"[\p{P}\$\+<=>\^~\|`]+", RE_GPT2, r"[0-9][0-9][0-9]"];
/// llama.cpp's Bloom / Poro / GPT3-Finnish split regex.
const RE_BLOOM: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";

/// The `tokenizer.ggml.pre` values handled, by the split llama.cpp applies
/// (`llm_tokenizer_bpe`; `llama_vocab::impl::load` for the names), and
/// whether llama.cpp ignores merges for a word that is already a token.
fn bpe_pre_regexes(pre: &str) -> Option<(Vec<&'static str>, bool)> {
    Some(match pre {
        "default" => (RE_DEFAULT.to_vec(), false),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => (vec![RE_LLAMA3], true),
        "dbrx" | "smaug-bpe" | "glm4" | "chatglm-bpe" => (vec![RE_LLAMA3], false),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" | "stablelm2" | "hunyuan"
        | "solar-open" => (vec![RE_QWEN2], false),
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de"
        | "a.x-4.0" | "mellum" | "modern-bert" | "jina-v1-en" | "jina-v2-code" | "roberta-bpe"
        | "mpt" | "olmo" | "jais" | "trillion" | "granite-docling" | "exaone4" => {
            (vec![RE_GPT2], false)
        }
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b"
        | "mellum2" => (vec![r"\p{N}", RE_GPT2], false),
        "deepseek-v3" | "hunyuan-dense" | "joyai-llm" | "hy_v4" => (RE_DEEPSEEK3.to_vec(), false),
        "deepseek-coder" => (RE_DEEPSEEK_CODER.to_vec(), false),
        "falcon" => (RE_FALCON.to_vec(), false),
        "tekken" => (vec![RE_TEKKEN], true),
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => (vec![RE_GPT4O], false),
        "bloom" | "poro-chat" | "gpt3-finnish" => (vec![RE_BLOOM], false),
        "viking" => (vec![RE_BLOOM, r"\p{N}"], false),
        _ => return None,
    })
}

/// The pre-tokenizer of a GGUF byte-level BPE for `tokenizer.ggml.pre`
/// (none: llama.cpp's `default`): llama.cpp's split regexes in order, each
/// match and each gap between matches a piece, then the byte-level mapping;
/// and whether merges are skipped for a piece that is already a token.
/// `smollm` and its kin keep the digits + ByteLevel(GPT-2 regex) sequence
/// they had, which splits alike. Another value is an error naming the key.
fn bpe_pre_tokenizer(pre: Option<&str>, file: &Path) -> Result<(PreTokenizerWrapper, bool)> {
    let (regexes, ignore_merges) = bpe_pre_regexes(pre.unwrap_or("default")).ok_or_else(|| {
        tok_err(
            file,
            format!(
                "tokenizer.ggml.pre = '{}' is not a supported pre-tokenizer",
                pre.unwrap_or_default()
            ),
        )
    })?;
    let byte_level = |regex| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, regex));
    let steps = if regexes == [r"\p{N}", RE_GPT2] {
        vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            byte_level(true),
        ]
    } else if regexes == [RE_GPT2] {
        vec![byte_level(true)]
    } else {
        let mut steps = Vec::with_capacity(regexes.len() + 1);
        for re in regexes {
            let split = Split::new(
                SplitPattern::Regex(re.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| tok_err(file, format!("tokenizer.ggml.pre: regex {re:?}: {e}")))?;
            steps.push(PreTokenizerWrapper::Split(split));
        }
        steps.push(byte_level(false));
        steps
    };
    Ok((Sequence::new(steps).into(), ignore_merges))
}

/// Texts of the tokens llama.cpp takes as ending generation
/// (`llama_vocab::impl::load`: `special_eog_ids`, found by text); they are
/// made control tokens when the file says otherwise.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<\u{ff5c}end\u{2581}of\u{2581}sentence\u{ff5c}>",
    "[e~[",
];

/// Texts of fill-in-the-middle tokens, which llama.cpp also makes control
/// tokens; the pad, repo and file-separator ones end generation.
const FIM_TEXTS: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<\u{ff5c}fim\u{2581}begin\u{ff5c}>",
    "<PRE>",
    "\u{2581}<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<\u{ff5c}fim\u{2581}hole\u{ff5c}>",
    "<SUF>",
    "\u{2581}<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<\u{ff5c}fim\u{2581}end\u{ff5c}>",
    "<MID>",
    "\u{2581}<MID>",
    "<|code_middle|>",
    "<|middle|>",
];

/// Fill-in-the-middle texts that end generation (pad, repo, file separator).
const FIM_EOG_TEXTS: &[&str] = &[
    "<|fim_pad|>",
    "<fim-pad>",
    "<fim_pad>",
    "<PAD>",
    "[PAD]",
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
    "<|file_sep|>",
];

/// A SentencePiece vocabulary from GGUF, tokenized as llama.cpp's
/// `llm_tokenizer_spm` does:
///
/// 1. the text is split around special tokens, longest first: user-defined
///    tokens always, control and unknown tokens only when asked to parse
///    special text (`tokenizer_st_partition`);
/// 2. each remaining piece of text gets spaces replaced by `▁` (U+2581),
///    after a `▁` prefix when `add_space_prefix` is set and the piece starts
///    the text or follows a special token;
/// 3. the piece is split into characters, and the adjacent pair whose
///    concatenation is a vocabulary token with the highest score is merged
///    (leftmost first on a tie), again and again;
/// 4. a symbol left that is not a token becomes its bytes' `<0xXX>` tokens.
///
/// Decoding (`token_to_piece`): normal tokens with `▁` as a space, byte
/// tokens as their byte, user-defined tokens as written, control and
/// unknown tokens as written or left out, other types left out.
struct Spm {
    tokens: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
    /// Token text to id (a text written twice is an error, as in llama.cpp).
    ids: HashMap<String, u32>,
    /// The token of each byte value (`<0xXX>`, else the one-byte text).
    bytes: [Option<u32>; 256],
    /// Byte values of the byte tokens.
    byte_of: HashMap<u32, u8>,
    /// Control, user-defined and unknown tokens with a text, longest first.
    specials: Vec<u32>,
    /// End-of-generation tokens other than EOS, by id.
    eog: Vec<u32>,
    /// For each first byte, the distinct byte lengths of the specials that
    /// start with it (to find the specials a text holds in one pass).
    special_lens: Vec<Vec<usize>>,
    add_space_prefix: bool,
    add_bos: bool,
    add_eos: bool,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    unk_id: Option<u32>,
}

impl std::fmt::Debug for Spm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Spm({} tokens, add_space_prefix {})",
            self.tokens.len(),
            self.add_space_prefix
        )
    }
}

/// A candidate merge of two adjacent symbols; the heap's greatest is the
/// highest score, then the leftmost.
#[derive(PartialEq)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl Eq for Bigram {}

impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// A symbol of the merge: a byte range of the text, linked to its live
/// neighbours (`usize::MAX`: none).
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: usize,
    next: usize,
}

const NONE: usize = usize::MAX;

impl Spm {
    /// The vocabulary of `data`; errors name the metadata key at fault.
    fn new(data: &GgufTokenizerData) -> std::result::Result<Spm, String> {
        let n = data.tokens.len();
        if n == 0 {
            return Err("missing: tokenizer.ggml.tokens is empty".into());
        }
        if u32::try_from(n).is_err() {
            return Err(format!("tokenizer.ggml.tokens: {n} tokens are too many"));
        }
        let scores = data.scores.as_ref().ok_or(
            "missing: tokenizer.ggml.scores (a SentencePiece vocabulary needs a score per token)",
        )?;
        if scores.len() != n {
            return Err(format!(
                "tokenizer.ggml.scores has {} entries for {n} tokens",
                scores.len()
            ));
        }
        let mut scores = scores.clone();
        for (i, s) in scores.iter_mut().enumerate() {
            if s.is_nan() {
                return Err(format!("tokenizer.ggml.scores[{i}] is not a number"));
            }
            // -0.0 and 0.0 compare equal, as in llama.cpp.
            *s += 0.0;
        }
        let mut types = if data.token_types.is_empty() {
            vec![GGUF_NORMAL; n]
        } else if data.token_types.len() != n {
            return Err(format!(
                "tokenizer.ggml.token_type has {} entries for {n} tokens",
                data.token_types.len()
            ));
        } else {
            data.token_types.clone()
        };
        // As llama.cpp: an empty token gets a placeholder text, a token
        // written twice is an error.
        let mut tokens = data.tokens.clone();
        for (i, t) in tokens.iter_mut().enumerate() {
            if t.is_empty() {
                *t = format!("[EMPTY_{i}]");
            }
        }
        let mut ids = HashMap::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            if let Some(first) = ids.insert(t.clone(), i as u32) {
                return Err(format!(
                    "tokenizer.ggml.tokens[{i}] = {t:?} is also token {first}"
                ));
            }
        }
        // Tokens llama.cpp recognises by their text.
        let mut eog = Vec::new();
        for t in EOG_TEXTS.iter().chain(FIM_TEXTS).chain(FIM_EOG_TEXTS) {
            if let Some(&id) = ids.get(*t) {
                types[id as usize] = GGUF_CONTROL;
                if !FIM_TEXTS.contains(t) {
                    eog.push(id);
                }
            }
        }
        for t in ["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"] {
            if let Some(&id) = ids.get(t) {
                types[id as usize] = GGUF_USER_DEFINED;
            }
        }
        // o200k_harmony and solar-open: `<|end|>` does not end generation.
        // (All these texts are in EOG_TEXTS: present means ending generation.)
        let has = |t: &str| ids.contains_key(t);
        let end_not_eog = has("<|end|>")
            && ((has("<|return|>") && has("<|call|>")) || (has("<|calls|>") && has("<|flush|>")));
        let s_not_eog = has("<|tool_response>") && has("</s>");
        if end_not_eog {
            let end = ids["<|end|>"];
            eog.retain(|&i| i != end);
            types[end as usize] = GGUF_USER_DEFINED;
        }
        // gemma4 and paddleocr: `</s>` does not end generation.
        if s_not_eog {
            let s = ids["</s>"];
            eog.retain(|&i| i != s);
            types[s as usize] = GGUF_NORMAL;
        }
        eog.sort_unstable();
        eog.dedup();
        // llama.cpp's defaults for a SentencePiece vocabulary.
        let check = |key: &str, id: Option<u32>, default: Option<u32>| match id {
            Some(i) if i as usize >= n => Err(format!(
                "tokenizer.ggml.{key} = {i} is past the vocabulary ({n} tokens)"
            )),
            Some(i) => Ok(Some(i)),
            None => Ok(default.filter(|&d| (d as usize) < n)),
        };
        let bos_id = check("bos_token_id", data.bos_id, Some(1))?;
        let eos_id = check("eos_token_id", data.eos_id, Some(2))?;
        let unk_id = check("unknown_token_id", data.unk_id, Some(0))?;
        check("padding_token_id", data.pad_id, None)?;
        let mut byte_of = HashMap::new();
        for (i, (t, &ty)) in tokens.iter().zip(&types).enumerate() {
            if ty == GGUF_BYTE {
                let b = t
                    .strip_prefix("<0x")
                    .and_then(|h| h.strip_suffix('>'))
                    .filter(|h| h.len() == 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| {
                        format!("tokenizer.ggml.tokens[{i}] = {t:?} is a byte token but not <0xXX>")
                    })?;
                byte_of.insert(i as u32, b);
            }
        }
        let mut bytes = [None; 256];
        for (b, slot) in bytes.iter_mut().enumerate() {
            *slot = ids.get(&format!("<0x{b:02X}>")).copied().or_else(|| {
                char::from_u32(b as u32)
                    .filter(|c| c.is_ascii())
                    .and_then(|c| ids.get(c.to_string().as_str()).copied())
            });
        }
        let mut specials: Vec<u32> = (0..n as u32)
            .filter(|&i| {
                matches!(
                    types[i as usize],
                    GGUF_CONTROL | GGUF_USER_DEFINED | GGUF_UNKNOWN
                )
            })
            .collect();
        specials.sort_by_key(|&i| std::cmp::Reverse(tokens[i as usize].len()));
        let mut special_lens = vec![Vec::new(); 256];
        for &i in &specials {
            let t = tokens[i as usize].as_bytes();
            let lens: &mut Vec<usize> = &mut special_lens[t[0] as usize];
            if !lens.contains(&t.len()) {
                lens.push(t.len());
            }
        }
        Ok(Spm {
            tokens,
            scores,
            types,
            ids,
            bytes,
            byte_of,
            specials,
            eog,
            special_lens,
            add_space_prefix: data.add_space_prefix.unwrap_or(true),
            add_bos: data.add_bos,
            add_eos: data.add_eos,
            bos_id,
            eos_id,
            unk_id,
        })
    }

    /// Appends the ids of `text` (no BOS/EOS) to `out`.
    fn encode(
        &self,
        text: &str,
        parse_special: bool,
        out: &mut Vec<u32>,
    ) -> std::result::Result<(), String> {
        enum Frag {
            Text(usize, usize),
            Token(u32),
        }
        let mut frags = if text.is_empty() {
            Vec::new()
        } else {
            vec![Frag::Text(0, text.len())]
        };
        let wanted = |id: u32| {
            let ty = self.types[id as usize];
            matches!(ty, GGUF_CONTROL | GGUF_UNKNOWN | GGUF_USER_DEFINED)
                && (parse_special || ty == GGUF_USER_DEFINED)
        };
        // The specials that occur in the text (one pass, a lookup per
        // position and length), then the split, longest token first.
        let mut present = std::collections::HashSet::new();
        for (i, &b) in text.as_bytes().iter().enumerate() {
            for &len in &self.special_lens[b as usize] {
                if let Some(&id) = text.get(i..i + len).and_then(|t| self.ids.get(t)) {
                    if wanted(id) {
                        present.insert(id);
                    }
                }
            }
        }
        for &id in &self.specials {
            if !present.contains(&id) {
                continue;
            }
            let tok = self.tokens[id as usize].as_str();
            let mut next = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                match f {
                    Frag::Text(mut a, b) => {
                        while let Some(pos) = text[a..b].find(tok) {
                            if pos > 0 {
                                next.push(Frag::Text(a, a + pos));
                            }
                            next.push(Frag::Token(id));
                            a += pos + tok.len();
                        }
                        if a < b {
                            next.push(Frag::Text(a, b));
                        }
                    }
                    t => next.push(t),
                }
            }
            frags = next;
        }
        let mut prev_special = true;
        for f in frags {
            match f {
                Frag::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Frag::Text(a, b) => {
                    let mut piece = String::with_capacity(3 * (b - a) + 3);
                    if self.add_space_prefix && prev_special {
                        piece.push('\u{2581}');
                    }
                    for c in text[a..b].chars() {
                        piece.push(if c == ' ' { '\u{2581}' } else { c });
                    }
                    self.merge(&piece, out)?;
                    prev_special = false;
                }
            }
        }
        Ok(())
    }

    /// The merge of one escaped piece of text (llama.cpp's
    /// `llm_tokenizer_spm_session::tokenize`).
    fn merge(&self, text: &str, out: &mut Vec<u32>) -> std::result::Result<(), String> {
        let mut syms: Vec<Symbol> = Vec::with_capacity(text.len());
        for (k, (start, c)) in text.char_indices().enumerate() {
            syms.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: if k == 0 { NONE } else { k - 1 },
                next: k + 1,
            });
        }
        let Some(last) = syms.last_mut() else {
            return Ok(());
        };
        last.next = NONE;
        let mut heap = BinaryHeap::new();
        let add = |heap: &mut BinaryHeap<Bigram>, syms: &[Symbol], left: usize, right: usize| {
            if left == NONE || right == NONE {
                return;
            }
            let size = syms[left].len + syms[right].len;
            let start = syms[left].start;
            if let Some(&id) = self.ids.get(&text[start..start + size]) {
                heap.push(Bigram {
                    score: self.scores[id as usize],
                    left,
                    right,
                    size,
                });
            }
        };
        for i in 1..syms.len() {
            add(&mut heap, &syms, i - 1, i);
        }
        while let Some(bg) = heap.pop() {
            let (l, r) = (bg.left, bg.right);
            if syms[l].len == 0 || syms[r].len == 0 || syms[l].len + syms[r].len != bg.size {
                continue;
            }
            syms[l].len += syms[r].len;
            syms[r].len = 0;
            syms[l].next = syms[r].next;
            if syms[r].next != NONE {
                let n = syms[r].next;
                syms[n].prev = l;
            }
            add(&mut heap, &syms, syms[l].prev, l);
            add(&mut heap, &syms, l, syms[l].next);
        }
        let mut i = 0;
        while i != NONE {
            let s = syms[i];
            let piece = &text[s.start..s.start + s.len];
            match self.ids.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for &b in piece.as_bytes() {
                        match self.bytes[b as usize].or(self.unk_id) {
                            Some(id) => out.push(id),
                            None => {
                                return Err(format!(
                                    "no token for byte 0x{b:02X} (no <0x{b:02X}> token and no unknown token)"
                                ))
                            }
                        }
                    }
                }
            }
            i = s.next;
        }
        Ok(())
    }

    /// The bytes of one token (`special`: control and unknown tokens as
    /// written, else left out).
    fn piece(&self, id: u32, special: bool, out: &mut Vec<u8>) -> std::result::Result<(), String> {
        let text = self.tokens.get(id as usize).ok_or_else(|| {
            format!(
                "token id {id} is past the vocabulary ({} tokens)",
                self.tokens.len()
            )
        })?;
        match self.types[id as usize] {
            GGUF_CONTROL | GGUF_UNKNOWN if !special => {}
            GGUF_CONTROL | GGUF_UNKNOWN | GGUF_USER_DEFINED => {
                out.extend_from_slice(text.as_bytes())
            }
            GGUF_NORMAL => out.extend_from_slice(text.replace('\u{2581}', " ").as_bytes()),
            GGUF_BYTE => out.extend(self.byte_of.get(&id)),
            _ => {}
        }
        Ok(())
    }

    /// llama.cpp's `llama_detokenize(ids, remove_special = skip_special,
    /// unparse_special = !skip_special)`, invalid UTF-8 as U+FFFD.
    fn decode(&self, ids: &[u32], skip_special: bool) -> std::result::Result<String, String> {
        let mut ids = ids;
        let mut remove_space = self.add_space_prefix;
        if skip_special
            && self.add_bos
            && self.bos_id.is_some()
            && ids.first() == self.bos_id.as_ref()
        {
            remove_space = false;
            ids = &ids[1..];
        }
        if skip_special
            && self.add_eos
            && self.eos_id.is_some()
            && ids.last() == self.eos_id.as_ref()
        {
            ids = &ids[..ids.len() - 1];
        }
        let mut out = Vec::new();
        for &id in ids {
            let at = out.len();
            self.piece(id, !skip_special, &mut out)?;
            if remove_space && out.get(at) == Some(&b' ') {
                out.remove(at);
            }
            remove_space = false;
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
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
