//! A language model ready for generation: the model, its tokenizer and chat
//! template, from a model directory or a GGUF file. [`ChatSession`] keeps a
//! conversation and reuses the KV cache across turns; [`ModelContainer`] is
//! a handle many threads can share, with cancellation.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::cache::ModelCache;
use crate::error::{Error, Result};
use crate::generate::{generate, Event, GenerateParams, Generation};
use crate::model::{is_gguf, Model, WeightPlan};
use crate::spec::library::SpecLibrary;
use crate::template::{ChatContext, ChatTemplate};
use crate::tokenizer::Tokenizer;

/// A model with its tokenizer and chat template.
#[derive(Debug)]
pub struct LanguageModel {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    pub path: PathBuf,
}

impl LanguageModel {
    /// Loads with the default spec library and the device's faster weight
    /// representation ([`WeightPlan::Auto`]).
    pub fn load(path: &Path) -> Result<LanguageModel> {
        LanguageModel::load_planned(path, &SpecLibrary::open_default()?, None, WeightPlan::Auto)
    }

    /// Loads with weights as stored.
    pub fn load_with(path: &Path, lib: &SpecLibrary, spec: Option<&str>) -> Result<LanguageModel> {
        LanguageModel::load_planned(path, lib, spec, WeightPlan::AsStored)
    }

    pub fn load_planned(
        path: &Path,
        lib: &SpecLibrary,
        spec: Option<&str>,
        plan: WeightPlan,
    ) -> Result<LanguageModel> {
        let (model, tokenizer) = if is_gguf(path) {
            let (model, data) = Model::load_gguf(path, lib, spec, plan)?;
            (model, Tokenizer::from_gguf(&data, path)?)
        } else {
            (
                Model::load_planned(path, lib, spec, plan)?,
                Tokenizer::from_dir(path)?,
            )
        };
        let template = match &tokenizer.chat_template {
            Some(t) => Some(ChatTemplate::new(t, &tokenizer.source)?),
            None => None,
        };
        Ok(LanguageModel {
            model,
            tokenizer,
            template,
            path: path.to_path_buf(),
        })
    }

    /// Renders messages with the chat template.
    pub fn render(&self, messages: &serde_json::Value, ctx: &ChatContext) -> Result<String> {
        let template = self.template.as_ref().ok_or_else(|| Error::Template {
            file: self.tokenizer.source.clone(),
            msg: "missing: the model has no chat template".into(),
        })?;
        let mut ctx = ctx.clone();
        ctx.bos_token = ctx.bos_token.or_else(|| self.tokenizer.bos_token.clone());
        ctx.eos_token = ctx.eos_token.or_else(|| self.tokenizer.eos_token.clone());
        template.render(messages, &ctx)
    }

    /// Token ids of a chat prompt (template, then encoding without adding
    /// special tokens, as mlx-lm does).
    pub fn chat_prompt(&self, messages: &serde_json::Value, ctx: &ChatContext) -> Result<Vec<u32>> {
        let text = self.render(messages, ctx)?;
        let enc = self.tokenizer.encode(&text)?;
        let enc = match (self.tokenizer.add_bos, self.tokenizer.bos_id) {
            (true, Some(bos))
                if text.starts_with(self.tokenizer.bos_token.as_deref().unwrap_or("\0")) =>
            {
                // The template already wrote BOS; do not add another.
                let mut e = enc;
                if e.len() > 1 && e[0] == bos && e[1] == bos {
                    e.remove(0);
                }
                e
            }
            _ => enc,
        };
        Ok(enc)
    }

    /// Generates from token ids.
    pub fn generate(
        &self,
        prompt: &[u32],
        params: &GenerateParams,
        cache: Option<&mut ModelCache>,
        cancel: Option<&AtomicBool>,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Generation> {
        generate(
            &self.model,
            &self.tokenizer,
            prompt,
            params,
            cache,
            cancel,
            on_event,
        )
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// A multi-turn conversation that keeps the KV cache between turns: each
/// turn feeds only the tokens after the longest common prefix of the new
/// prompt and what the cache already holds.
#[derive(Debug)]
pub struct ChatSession<'a> {
    lm: &'a LanguageModel,
    pub instructions: Option<String>,
    pub params: GenerateParams,
    pub context: ChatContext,
    history: Vec<Message>,
    cache: ModelCache,
    /// Tokens whose keys/values the cache holds, in order.
    cached: Vec<u32>,
    /// Prompt tokens fed on the last turn (after reuse).
    pub last_fed_tokens: usize,
}

impl<'a> ChatSession<'a> {
    pub fn new(
        lm: &'a LanguageModel,
        instructions: Option<&str>,
        params: GenerateParams,
    ) -> ChatSession<'a> {
        ChatSession {
            lm,
            instructions: instructions.map(str::to_string),
            cache: lm.model.new_cache_with(params.cache),
            params,
            context: ChatContext {
                add_generation_prompt: true,
                ..Default::default()
            },
            history: Vec::new(),
            cached: Vec::new(),
            last_fed_tokens: 0,
        }
    }

    pub fn history(&self) -> &[Message] {
        &self.history
    }

    /// Forgets the conversation and the cache.
    pub fn clear(&mut self) {
        self.history.clear();
        self.cached.clear();
        self.cache = self.lm.model.new_cache_with(self.params.cache);
    }

    fn messages(&self) -> serde_json::Value {
        let mut out = Vec::new();
        if let Some(i) = &self.instructions {
            out.push(serde_json::json!({"role": "system", "content": i}));
        }
        for m in &self.history {
            out.push(serde_json::json!({"role": m.role, "content": m.content}));
        }
        serde_json::Value::Array(out)
    }

    /// Sends a user message; streams the answer to `on_event`.
    pub fn respond_stream(
        &mut self,
        user: &str,
        cancel: Option<&AtomicBool>,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<String> {
        self.history.push(Message::new("user", user));
        let prompt = self.lm.chat_prompt(&self.messages(), &self.context)?;
        let common = prompt
            .iter()
            .zip(&self.cached)
            .take_while(|(a, b)| a == b)
            .count();
        // Keep at least one token to feed.
        let common = common.min(prompt.len() - 1);
        if common < self.cached.len() && !self.cache.trim(self.cached.len() - common) {
            self.cache = self.lm.model.new_cache_with(self.params.cache);
            self.cached.clear();
        }
        let reuse = common.min(self.cached.len());
        self.cached.truncate(reuse);
        let fresh = &prompt[reuse..];
        self.last_fed_tokens = fresh.len();
        let out = self
            .lm
            .generate(fresh, &self.params, Some(&mut self.cache), cancel, on_event);
        match out {
            Ok(g) => {
                // The token loop feeds every token it returns.
                self.cached.extend_from_slice(fresh);
                self.cached.extend_from_slice(&g.tokens);
                self.history.push(Message::new("assistant", &g.text));
                Ok(g.text)
            }
            Err(e) => {
                self.history.pop();
                self.cache = self.lm.model.new_cache_with(self.params.cache);
                self.cached.clear();
                Err(e)
            }
        }
    }

    /// Sends a user message and returns the whole answer.
    pub fn respond(&mut self, user: &str) -> Result<String> {
        self.respond_stream(user, None, &mut |_| {})
    }
}

/// A shared handle to a language model: any thread may run work on it (one
/// at a time) and cancel a running generation.
#[derive(Debug, Clone)]
pub struct ModelContainer {
    inner: Arc<Mutex<LanguageModel>>,
    cancel: Arc<AtomicBool>,
}

impl ModelContainer {
    pub fn new(lm: LanguageModel) -> ModelContainer {
        ModelContainer {
            inner: Arc::new(Mutex::new(lm)),
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn load(path: &Path) -> Result<ModelContainer> {
        Ok(ModelContainer::new(LanguageModel::load(path)?))
    }

    /// Runs `f` with exclusive access to the model.
    pub fn perform<T>(&self, f: impl FnOnce(&LanguageModel) -> T) -> T {
        let guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&guard)
    }

    /// Generates with cancellation through [`ModelContainer::cancel`].
    pub fn generate(
        &self,
        prompt: &[u32],
        params: &GenerateParams,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Generation> {
        let guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        self.cancel.store(false, Ordering::Relaxed);
        guard.generate(prompt, params, None, Some(&self.cancel), on_event)
    }

    /// Asks a running generation to stop after its current token.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}
