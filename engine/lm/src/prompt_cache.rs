//! Prompt caches kept in files: a prompt processed once, saved with the
//! tokens it holds, and continued later (`lmspec cache-prompt`,
//! `generate --prompt-cache`), and chat sessions saved and restored. The
//! file layout is mlx-lm's (see `lmspec_engine::cache_file`); the token
//! ledger and a session's history ride in its metadata, which mlx-lm
//! ignores.
use std::collections::BTreeMap;
use std::path::Path;

use crate::generate::{prefill, GenerateParams};
use crate::lm::{ChatSession, LanguageModel, Message};
use crate::tools::ToolCall;
use lmspec_engine::cache::ModelCache;
use lmspec_engine::error::{Error, Result};

/// Metadata key of the token ids a cache holds (a JSON list).
pub const TOKENS_KEY: &str = "lmspec.tokens";
/// Metadata key of a saved chat session's messages (JSON).
pub const HISTORY_KEY: &str = "lmspec.history";
/// Metadata key of a saved chat session's instructions.
pub const INSTRUCTIONS_KEY: &str = "lmspec.instructions";

/// A cache read from a file.
#[derive(Debug)]
pub struct PromptCache {
    pub cache: ModelCache,
    /// The token ids the cache holds, when the file records them (files
    /// written by mlx-lm do not).
    pub tokens: Option<Vec<u32>>,
    /// The file's free-form metadata.
    pub metadata: BTreeMap<String, String>,
}

fn cache_error(path: &Path, msg: String) -> Error {
    Error::Cache {
        file: path.to_path_buf(),
        msg,
    }
}

impl LanguageModel {
    /// Processes every token of `prompt` into a fresh cache (mlx-lm's
    /// `cache_prompt`: nothing is generated), quantizing it as `params`
    /// say. `progress(done, total)` follows the chunks.
    pub fn cache_prompt(
        &self,
        prompt: &[u32],
        params: &GenerateParams,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<ModelCache> {
        if prompt.is_empty() {
            return Err(Error::Usage("the prompt has no tokens".into()));
        }
        params.validate()?;
        let ids: Vec<i64> = prompt.iter().map(|&t| i64::from(t)).collect();
        self.model.check_tokens(&ids, "the prompt")?;
        let mut cache = self.model.new_cache_with(params.cache);
        prefill(&self.model, &mut cache, prompt, params, progress)?;
        Ok(cache)
    }

    /// Writes `cache`, which holds `tokens`, to `path` with the metadata
    /// mlx-lm's `generate --prompt-cache-file` reads (`model`,
    /// `tokenizer_config`) and the token ledger.
    pub fn save_prompt_cache(
        &self,
        path: &Path,
        cache: &ModelCache,
        tokens: &[u32],
        extra: &BTreeMap<String, String>,
    ) -> Result<()> {
        if tokens.len() != cache.offset() as usize {
            return Err(Error::Usage(format!(
                "the cache holds {} positions but {} tokens were given",
                cache.offset(),
                tokens.len()
            )));
        }
        let mut meta = extra.clone();
        meta.insert("model".into(), self.path.display().to_string());
        meta.entry("tokenizer_config".into())
            .or_insert_with(|| "{}".into());
        meta.insert(
            TOKENS_KEY.into(),
            serde_json::to_string(tokens).expect("ids"),
        );
        self.model.save_cache(cache, path, &meta)
    }

    /// Reads a prompt-cache file made for this model (by lmspec or mlx-lm).
    pub fn load_prompt_cache(&self, path: &Path) -> Result<PromptCache> {
        let (cache, metadata) = self.model.load_cache(path)?;
        let tokens = match metadata.get(TOKENS_KEY) {
            None => None,
            Some(t) => {
                let ids: Vec<u32> = serde_json::from_str(t).map_err(|e| {
                    cache_error(path, format!("{TOKENS_KEY}: not a list of token ids: {e}"))
                })?;
                if ids.len() != cache.offset() as usize {
                    return Err(cache_error(
                        path,
                        format!(
                            "{TOKENS_KEY}: {} tokens for {} cached positions",
                            ids.len(),
                            cache.offset()
                        ),
                    ));
                }
                Some(ids)
            }
        };
        Ok(PromptCache {
            cache,
            tokens,
            metadata,
        })
    }
}

/// What a chat session's cache holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStatus {
    /// Tokens whose state the cache holds.
    pub cached_tokens: usize,
    /// Whether the cache can be rewound (a new turn that diverges from the
    /// cached tokens reuses their common prefix; otherwise it starts over).
    pub rewindable: bool,
}

impl Message {
    /// A message from its OpenAI JSON shape (what [`Message::to_json`]
    /// writes); `at` names it in errors.
    pub fn from_json(v: &serde_json::Value, at: &str) -> Result<Message> {
        let text = |field: &str| -> Result<Option<String>> {
            match v.get(field) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(Error::Usage(format!("{at}.{field}: not a string"))),
            }
        };
        let role = text("role")?.ok_or_else(|| Error::Usage(format!("{at}.role: missing")))?;
        let mut m = Message::new(&role, &text("content")?.unwrap_or_default());
        m.name = text("name")?;
        if let Some(calls) = v.get("tool_calls").and_then(|c| c.as_array()) {
            for (k, c) in calls.iter().enumerate() {
                let f = c.get("function").unwrap_or(c);
                let name = f.get("name").and_then(|n| n.as_str()).ok_or_else(|| {
                    Error::Usage(format!("{at}.tool_calls[{k}].function.name: missing"))
                })?;
                m.tool_calls.push(ToolCall {
                    name: name.to_string(),
                    arguments: f.get("arguments").cloned().unwrap_or_default(),
                    id: c.get("id").and_then(|i| i.as_str()).map(str::to_string),
                });
            }
        }
        Ok(m)
    }
}

impl<'a> ChatSession<'a> {
    /// A session that continues `history` (mlx-swift-lm's
    /// `init(history:)`): nothing is processed now; the next turn feeds
    /// the whole conversation once and keeps its cache from then on.
    pub fn with_history(
        lm: &'a LanguageModel,
        instructions: Option<&str>,
        params: GenerateParams,
        history: Vec<Message>,
    ) -> ChatSession<'a> {
        let mut s = ChatSession::new(lm, instructions, params);
        s.history = history;
        s
    }

    /// What the session's cache holds now.
    pub fn cache_status(&self) -> CacheStatus {
        CacheStatus {
            cached_tokens: self.cached.len(),
            rewindable: self.cached.is_empty() || self.cache.can_rewind(),
        }
    }

    /// Writes the session (its cache, the tokens it holds, the history and
    /// the instructions) to `path`.
    pub fn save_cache(&self, path: &Path) -> Result<()> {
        let mut extra = BTreeMap::new();
        let history: Vec<serde_json::Value> = self.history.iter().map(Message::to_json).collect();
        extra.insert(
            HISTORY_KEY.to_string(),
            serde_json::Value::Array(history).to_string(),
        );
        if let Some(i) = &self.instructions {
            extra.insert(INSTRUCTIONS_KEY.to_string(), i.clone());
        }
        self.lm
            .save_prompt_cache(path, &self.cache, &self.cached, &extra)
    }

    /// A session restored from a file [`ChatSession::save_cache`] wrote:
    /// the next turn feeds only what follows the cached tokens.
    pub fn restore(
        lm: &'a LanguageModel,
        path: &Path,
        params: GenerateParams,
    ) -> Result<ChatSession<'a>> {
        let loaded = lm.load_prompt_cache(path)?;
        let tokens = loaded.tokens.ok_or_else(|| {
            cache_error(
                path,
                format!("{TOKENS_KEY}: missing (not a saved chat session)"),
            )
        })?;
        let raw = loaded.metadata.get(HISTORY_KEY).ok_or_else(|| {
            cache_error(
                path,
                format!("{HISTORY_KEY}: missing (not a saved chat session)"),
            )
        })?;
        let parsed: serde_json::Value = serde_json::from_str(raw)
            .map_err(|e| cache_error(path, format!("{HISTORY_KEY}: {e}")))?;
        let items = parsed
            .as_array()
            .ok_or_else(|| cache_error(path, format!("{HISTORY_KEY}: not a list")))?;
        let history = items
            .iter()
            .enumerate()
            .map(|(k, m)| Message::from_json(m, &format!("{HISTORY_KEY}[{k}]")))
            .collect::<Result<Vec<_>>>()
            .map_err(|e| cache_error(path, e.to_string()))?;
        let instructions = loaded.metadata.get(INSTRUCTIONS_KEY).cloned();
        let mut s = ChatSession::with_history(lm, instructions.as_deref(), params, history);
        s.cache = loaded.cache;
        s.cached = tokens;
        Ok(s)
    }
}
