//! A language model ready for generation: the model, its tokenizer and chat
//! template, from a model directory or a GGUF file. [`ChatSession`] keeps a
//! conversation and reuses the KV cache across turns; [`ModelContainer`] is
//! a handle many threads can share, with cancellation.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::generate::{generate, Event, GenerateParams, Generation, GenerationInfo};
use crate::image_processor::{process_files, ProcessedImage};
use crate::registry::{ModelDefaults, Registry};
use crate::template::{ChatContext, ChatTemplate};
use crate::tokenizer::Tokenizer;
use crate::tools::response::ResponseTemplate;
use crate::tools::schema::schema_for;
use crate::tools::{OutputFormat, ToolCall, ToolEvent, ToolFormat};
use crate::video::video_frames;
use crate::vision::VisionModel;
use lmspec_engine::cache::ModelCache;
use lmspec_engine::error::{Error, Result};
use lmspec_engine::model::{is_gguf, LoadOptions, Model};
use lmspec_hub::{HubOptions, ModelSource};
use lmspec_spec::library::SpecRoot;

/// A model with its tokenizer and chat template.
#[derive(Debug)]
pub struct LanguageModel {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    pub path: PathBuf,
    /// Defaults of a known hub id (`specs/registry/`), applied by
    /// [`LanguageModel::load_source`] or [`LanguageModel::apply_defaults`].
    pub defaults: ModelDefaults,
    /// The vision tower of a vision-language checkpoint (a `vision` spec
    /// claims its type and it has a `preprocessor_config.json`).
    pub vision: Option<VisionModel>,
}

impl LanguageModel {
    /// Loads a model directory or GGUF file with its tokenizer and chat
    /// template.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<LanguageModel> {
        let (model, tokenizer) = if is_gguf(path) {
            let (model, data) = Model::load_gguf(path, opts)?;
            (model, Tokenizer::from_gguf(&data, path)?)
        } else {
            (Model::load(path, opts)?, Tokenizer::from_dir(path)?)
        };
        let template = match &tokenizer.chat_template {
            Some(t) => Some(ChatTemplate::new(t, &tokenizer.chat_template_file)?),
            None => None,
        };
        let vision = if !is_gguf(path)
            && path.join("preprocessor_config.json").exists()
            && crate::vision::has_tower(path, opts)?
        {
            let mut v = VisionModel::load(path, opts, &model)?;
            v.expansion = crate::vision::image_expansion(&model, &tokenizer)?;
            Some(v)
        } else {
            None
        };
        Ok(LanguageModel {
            model,
            tokenizer,
            template,
            path: path.to_path_buf(),
            defaults: ModelDefaults::default(),
            vision,
        })
    }

    /// Loads a model from a local path or a hub id (fetched into the hub
    /// cache when missing, see [`lmspec_hub::resolve`]); a hub id listed in
    /// the spec library's registry gets its defaults.
    pub fn load_source(
        source: &ModelSource,
        hub: &HubOptions,
        opts: &LoadOptions,
    ) -> Result<LanguageModel> {
        let path = lmspec_hub::resolve(source, hub).map_err(|e| Error::Usage(e.to_string()))?;
        let mut lm = LanguageModel::load(&path, opts)?;
        if let ModelSource::Hub { repo, .. } = source {
            let root = match &opts.library {
                Some(lib) => lib.root().clone(),
                None => SpecRoot::from_env(),
            };
            let registry = Registry::load(&root, &ToolFormat::load_all(&root)?)?;
            if let Some(d) = registry.lookup(repo) {
                lm.apply_defaults(d);
            }
        }
        Ok(lm)
    }

    /// Takes a registry entry's defaults: its extra end tokens (those in
    /// the vocabulary) end generation; its tool format and reasoning
    /// markers apply unless asked otherwise.
    pub fn apply_defaults(&mut self, defaults: &ModelDefaults) {
        for token in &defaults.extra_eos {
            if let Some(id) = self.tokenizer.token_to_id(token) {
                if !self.tokenizer.eos_ids.contains(&id) {
                    self.tokenizer.eos_ids.push(id);
                }
            }
        }
        self.defaults = defaults.clone();
    }

    /// What the checkpoint's `response_template` declares (tool-call
    /// format, reasoning markers), if it has one.
    pub fn response_template(&self) -> Option<Result<ResponseTemplate>> {
        self.tokenizer
            .response_template
            .as_ref()
            .map(|(file, t)| ResponseTemplate::from_json(t, file))
    }

    /// How this model's output is read: reasoning between the markers the
    /// checkpoint declares (`declared`, its `response_template`), else
    /// `<think>`...`</think>`; with `tools` (none: no calls are read), calls in the format
    /// [`ToolFormat::resolve`] picks among `formats` (`explicit` first),
    /// checked against the tools' schemas. `generate`, chat sessions and the
    /// CLI read output through this one description.
    pub fn output_format(
        &self,
        formats: &[ToolFormat],
        declared: Option<&ResponseTemplate>,
        tools: &[Tool],
        explicit: Option<&str>,
    ) -> Result<OutputFormat> {
        let mut out = OutputFormat::think(None);
        if let Some(markers) = declared
            .and_then(|r| r.reasoning.clone())
            .or_else(|| self.defaults.reasoning.clone())
        {
            out.reasoning = Some(markers);
        }
        let explicit = explicit.or(self.defaults.tool_format.as_deref());
        if tools.is_empty() {
            return Ok(out);
        }
        let format = ToolFormat::resolve(
            formats,
            explicit,
            declared.and_then(|r| r.tools.as_ref()),
            self.tokenizer.tool_parser_type.as_deref(),
            self.tokenizer.chat_template.as_deref(),
            self.model.spec.tool_format.as_deref(),
        )
        .ok_or_else(|| Error::Usage("no tool-call format found in the spec library".into()))?;
        if let Some(e) = explicit.filter(|e| *e != format.name) {
            return Err(Error::Usage(format!("unknown tool format '{e}'")));
        }
        out.tools = Some(format.clone());
        out.schemas = tools
            .iter()
            .map(|t| (t.name.clone(), t.parameters.clone()))
            .collect();
        Ok(out)
    }

    /// Renders messages with the chat template.
    pub fn render(&self, messages: &serde_json::Value, ctx: &ChatContext) -> Result<String> {
        let template = self.template.as_ref().ok_or_else(|| Error::Template {
            file: self.tokenizer.chat_template_file.clone(),
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
        // `encode` adds BOS only when the rendered text does not start with it.
        self.tokenizer.encode(&self.render(messages, ctx)?)
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

impl LanguageModel {
    /// The vision tower, or an error saying the model takes no images.
    pub fn vision(&self) -> Result<&VisionModel> {
        self.vision.as_ref().ok_or_else(|| {
            Error::Usage(format!(
                "{}: the model takes no images (no vision tower)",
                self.path.display()
            ))
        })
    }

    /// Reads and processes image files with the checkpoint's processor
    /// (errors name the file).
    pub fn load_images(&self, paths: &[PathBuf]) -> Result<Vec<ProcessedImage>> {
        let vision = self.vision()?;
        let proc = vision.processor.as_ref().ok_or_else(|| {
            Error::Usage(format!(
                "{}: no preprocessor_config.json: images cannot be processed",
                self.path.display()
            ))
        })?;
        process_files(proc, paths)
    }

    /// Reads and processes videos, each a list of frame files in order (an
    /// entry that is a directory stands for its files in name order), with
    /// the checkpoint's processor (errors name the file).
    pub fn load_videos(&self, videos: &[Vec<PathBuf>]) -> Result<Vec<ProcessedImage>> {
        let vision = self.vision()?;
        if vision.video_token.is_none() {
            return Err(Error::Usage(format!(
                "{}: the model takes no videos (its tower spec binds no takes_videos, or its text spec no video_token_id)",
                self.path.display()
            )));
        }
        let proc = vision.processor.as_ref().ok_or_else(|| {
            Error::Usage(format!(
                "{}: no preprocessor_config.json: videos cannot be processed",
                self.path.display()
            ))
        })?;
        videos
            .iter()
            .map(|frames| proc.process_video_files(&video_frames(frames)?))
            .collect()
    }

    /// Generates from token ids whose image placeholders (one per image,
    /// as the chat template writes them) stand for `images`: each
    /// placeholder is expanded to its image's token count, the prompt runs
    /// with the image features spliced in, and generation continues.
    pub fn generate_with_images(
        &self,
        prompt: &[u32],
        images: &[ProcessedImage],
        params: &GenerateParams,
        cache: Option<&mut ModelCache>,
        cancel: Option<&AtomicBool>,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Generation> {
        let vision = self.vision()?;
        let (ids, images) = vision.expand_visuals(prompt, images)?;
        let images = &images[..];
        let mut fresh;
        let cache = match cache {
            Some(c) => c,
            None => {
                fresh = self.model.new_cache();
                &mut fresh
            }
        };
        let started = std::time::Instant::now();
        let last = vision.prefill_for_generation(&self.model, &ids, 0, images, cache)?;
        let prefill = started.elapsed().as_secs_f64();
        // The statistics count the whole prompt (the images' prefill too).
        let whole = |info: &mut GenerationInfo| {
            info.prompt_tokens = ids.len();
            info.prompt_seconds += prefill;
            if info.prompt_seconds > 0.0 {
                info.prompt_tps = ids.len() as f64 / info.prompt_seconds;
            }
        };
        let mut g = generate(
            &self.model,
            &self.tokenizer,
            &[last],
            params,
            Some(cache),
            cancel,
            &mut |e| match e {
                Event::Info(mut info) => {
                    whole(&mut info);
                    on_event(Event::Info(info))
                }
                e => on_event(e),
            },
        )?;
        whole(&mut g.info);
        Ok(g)
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
    /// Calls an assistant message made.
    pub tool_calls: Vec<ToolCall>,
    /// The tool a `tool` message answers for.
    pub name: Option<String>,
    /// Images of a user message, shown to the chat template as image
    /// entries before the text.
    pub images: Vec<ProcessedImage>,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message {
            role: role.to_string(),
            content: content.to_string(),
            tool_calls: Vec::new(),
            name: None,
            images: Vec::new(),
        }
    }

    /// A user message with images.
    pub fn with_images(content: &str, images: Vec<ProcessedImage>) -> Message {
        Message {
            images,
            ..Message::new("user", content)
        }
    }

    /// The message as chat templates see it (OpenAI shape).
    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::json!({"role": self.role, "content": self.content});
        if !self.images.is_empty() {
            let mut parts: Vec<serde_json::Value> = self
                .images
                .iter()
                .map(|i| match i.video {
                    true => serde_json::json!({"type": "video"}),
                    false => serde_json::json!({"type": "image"}),
                })
                .collect();
            parts.push(serde_json::json!({"type": "text", "text": self.content}));
            m["content"] = serde_json::Value::Array(parts);
        }
        if !self.tool_calls.is_empty() {
            m["tool_calls"] = self
                .tool_calls
                .iter()
                .map(|c| serde_json::json!({"type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
                .collect();
        }
        if let Some(n) = &self.name {
            m["name"] = n.clone().into();
        }
        m
    }
}

/// A tool the model may call: a name, a description, JSON-schema parameters
/// and a handler from arguments to a JSON result.
pub struct Tool {
    pub name: String,
    pub description: String,
    pub parameters: serde_json::Value,
    #[allow(clippy::type_complexity)]
    pub handler: Box<
        dyn Fn(&serde_json::Value) -> std::result::Result<serde_json::Value, String> + Send + Sync,
    >,
}

impl std::fmt::Debug for Tool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tool({})", self.name)
    }
}

impl Tool {
    pub fn new(
        name: &str,
        description: &str,
        parameters: serde_json::Value,
        handler: impl Fn(&serde_json::Value) -> std::result::Result<serde_json::Value, String>
            + Send
            + Sync
            + 'static,
    ) -> Tool {
        Tool {
            name: name.to_string(),
            description: description.to_string(),
            parameters,
            handler: Box::new(handler),
        }
    }

    /// A tool whose parameters are a Rust type: the JSON schema is derived
    /// from `A`'s serde shape ([`schema_for`]), the arguments of a call are
    /// deserialized into `A` and the handler's result serialized back.
    pub fn typed<A, R>(
        name: &str,
        description: &str,
        handler: impl Fn(A) -> std::result::Result<R, String> + Send + Sync + 'static,
    ) -> Result<Tool>
    where
        A: serde::de::DeserializeOwned,
        R: serde::Serialize,
    {
        let parameters =
            schema_for::<A>().map_err(|e| Error::Usage(format!("tool '{name}': {e}")))?;
        Ok(Tool::new(name, description, parameters, move |args| {
            let args: A = serde_json::from_value(args.clone())
                .map_err(|e| format!("invalid arguments: {e}"))?;
            let out = handler(args)?;
            serde_json::to_value(out).map_err(|e| format!("result: {e}"))
        }))
    }

    /// A tool from an OpenAI tool spec (`{"type": "function", "function":
    /// {"name", "description", "parameters"}}`, or the inner object alone).
    pub fn from_openai_json(
        spec: &serde_json::Value,
        handler: impl Fn(&serde_json::Value) -> std::result::Result<serde_json::Value, String>
            + Send
            + Sync
            + 'static,
    ) -> std::result::Result<Tool, String> {
        if !spec.is_object() {
            return Err(format!("expected an object, got {spec}"));
        }
        if let Some(t) = spec.get("type").filter(|t| t.as_str() != Some("function")) {
            return Err(format!("type: {t} is not supported (only \"function\")"));
        }
        let f = spec.get("function").unwrap_or(spec);
        let name = match f.get("name") {
            Some(serde_json::Value::String(n)) if !n.trim().is_empty() => n.as_str(),
            Some(other) => return Err(format!("function.name: {other} is not a tool name")),
            None => return Err("function.name: missing".into()),
        };
        let description = match f.get("description") {
            None | Some(serde_json::Value::Null) => "",
            Some(serde_json::Value::String(d)) => d.as_str(),
            Some(other) => return Err(format!("function.description: {other} is not a string")),
        };
        let parameters = match f.get("parameters") {
            None | Some(serde_json::Value::Null) => serde_json::json!({"type": "object"}),
            Some(p @ serde_json::Value::Object(_)) => p.clone(),
            Some(other) => {
                return Err(format!(
                    "function.parameters: {other} is not a JSON schema object"
                ))
            }
        };
        Ok(Tool::new(name, description, parameters, handler))
    }

    /// The tool as chat templates expect it in `tools`.
    pub fn spec(&self) -> serde_json::Value {
        serde_json::json!({"type": "function", "function": {
            "name": self.name, "description": self.description, "parameters": self.parameters}})
    }
}

/// The tool loop: generate, parse calls in `format`, run the handlers, add
/// the results as `tool` messages, and generate again, until an answer has no
/// call or `max_rounds` generations were made. `generate` produces the raw
/// output for the conversation so far.
pub fn run_tool_loop(
    history: &mut Vec<Message>,
    tools: &[Tool],
    format: &ToolFormat,
    max_rounds: usize,
    generate: &mut dyn FnMut(&[Message]) -> Result<String>,
    on_event: &mut dyn FnMut(ToolEvent),
) -> Result<String> {
    let schemas: Vec<(String, serde_json::Value)> = tools
        .iter()
        .map(|t| (t.name.clone(), t.parameters.clone()))
        .collect();
    for _ in 0..max_rounds {
        let raw = generate(history)?;
        let mut text = String::new();
        let mut calls = Vec::new();
        let mut parser = crate::tools::ToolParser::new(format, &[]).with_schemas(&schemas);
        let mut events = parser.push(&raw);
        events.extend(parser.finish());
        for e in crate::tools::merge_text(events) {
            match &e {
                ToolEvent::Text(t) => text.push_str(t),
                ToolEvent::Call(c) => calls.push(c.clone()),
                _ => {}
            }
            on_event(e);
        }
        let mut reply = Message::new("assistant", text.trim());
        reply.tool_calls = calls.clone();
        history.push(reply);
        if calls.is_empty() {
            return Ok(text.trim().to_string());
        }
        for c in calls {
            let result = match tools.iter().find(|t| t.name == c.name) {
                Some(tool) => match (tool.handler)(&c.arguments) {
                    Ok(v) => v,
                    Err(e) => serde_json::json!({"error": e}),
                },
                None => serde_json::json!({"error": format!("no tool named '{}'", c.name)}),
            };
            let mut msg = Message::new("tool", &result.to_string());
            msg.name = Some(c.name.clone());
            history.push(msg);
        }
    }
    Err(Error::Usage(format!(
        "the tool loop did not end within {max_rounds} rounds"
    )))
}

/// A multi-turn conversation that keeps the KV cache between turns: each
/// turn feeds only the tokens after the longest common prefix of the new
/// prompt and what the cache already holds.
#[derive(Debug)]
pub struct ChatSession<'a> {
    pub(crate) lm: &'a LanguageModel,
    pub instructions: Option<String>,
    pub params: GenerateParams,
    pub context: ChatContext,
    pub(crate) history: Vec<Message>,
    pub(crate) cache: ModelCache,
    /// Tokens whose keys/values the cache holds, in order.
    pub(crate) cached: Vec<u32>,
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
        out.extend(self.history.iter().map(Message::to_json));
        serde_json::Value::Array(out)
    }

    /// Generates the assistant's next message for the conversation so far,
    /// feeding only the prompt tokens the cache does not hold yet.
    fn generate_turn(
        &mut self,
        cancel: Option<&AtomicBool>,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<String> {
        let prompt = self.lm.chat_prompt(&self.messages(), &self.context)?;
        let images: Vec<ProcessedImage> = self
            .history
            .iter()
            .flat_map(|m| m.images.iter().cloned())
            .collect();
        let (prompt, images) = match images.is_empty() {
            true => (prompt, images),
            false => self.lm.vision()?.expand_visuals(&prompt, &images)?,
        };
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
        let result = match &self.lm.vision {
            // New image placeholders: prefill them with the images spliced
            // in, then continue from the last prompt token.
            Some(v) if fresh.contains(&(v.image_token as u32)) => {
                let started = std::time::Instant::now();
                let fed = fresh.len();
                v.prefill_for_generation(&self.lm.model, &prompt, reuse, &images, &mut self.cache)
                    .and_then(|last| {
                        let prefill = started.elapsed().as_secs_f64();
                        // The statistics count every token fed this turn.
                        let whole = |info: &mut GenerationInfo| {
                            info.prompt_tokens = fed;
                            info.prompt_seconds += prefill;
                            if info.prompt_seconds > 0.0 {
                                info.prompt_tps = fed as f64 / info.prompt_seconds;
                            }
                        };
                        let mut wrapped = |e: Event| match e {
                            Event::Info(mut info) => {
                                whole(&mut info);
                                on_event(Event::Info(info))
                            }
                            e => on_event(e),
                        };
                        let mut g = self.lm.generate(
                            &[last],
                            &self.params,
                            Some(&mut self.cache),
                            cancel,
                            &mut wrapped,
                        )?;
                        whole(&mut g.info);
                        Ok(g)
                    })
            }
            _ => self
                .lm
                .generate(fresh, &self.params, Some(&mut self.cache), cancel, on_event),
        };
        match result {
            Ok(g) => {
                // The token loop feeds every token it returns.
                self.cached.extend_from_slice(fresh);
                self.cached.extend_from_slice(&g.tokens);
                Ok(g.text)
            }
            Err(e) => {
                self.cache = self.lm.model.new_cache_with(self.params.cache);
                self.cached.clear();
                Err(e)
            }
        }
    }

    /// Sends a user message; streams the answer to `on_event`.
    pub fn respond_stream(
        &mut self,
        user: &str,
        cancel: Option<&AtomicBool>,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<String> {
        self.history.push(Message::new("user", user));
        match self.generate_turn(cancel, on_event) {
            Ok(text) => {
                self.history.push(Message::new("assistant", &text));
                Ok(text)
            }
            Err(e) => {
                self.history.pop();
                Err(e)
            }
        }
    }

    /// Sends a user message with `tools` offered (passed to the chat
    /// template) and runs the tool loop: calls in `format` go to the tools'
    /// handlers and their results back to the model, for at most
    /// `max_rounds` generations. Parsed events go to `on_event`.
    pub fn respond_with_tools(
        &mut self,
        user: &str,
        tools: &[Tool],
        format: &ToolFormat,
        max_rounds: usize,
        on_event: &mut dyn FnMut(ToolEvent),
    ) -> Result<String> {
        self.history.push(Message::new("user", user));
        self.context.tools = Some(tools.iter().map(Tool::spec).collect());
        let mut history = std::mem::take(&mut self.history);
        let out = run_tool_loop(
            &mut history,
            tools,
            format,
            max_rounds,
            &mut |h| {
                self.history = h.to_vec();
                self.generate_turn(None, &mut |_| {})
            },
            on_event,
        );
        self.history = history;
        self.context.tools = None;
        out
    }

    /// Sends a user message and returns the whole answer.
    pub fn respond(&mut self, user: &str) -> Result<String> {
        self.respond_stream(user, None, &mut |_| {})
    }

    /// Sends a user message with images (a vision-language model's); the
    /// images stay in the conversation, the cache keeps their tokens.
    pub fn respond_with_images(
        &mut self,
        user: &str,
        images: Vec<ProcessedImage>,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<String> {
        if !images.is_empty() {
            self.lm.vision()?;
        }
        self.history.push(Message::with_images(user, images));
        match self.generate_turn(None, on_event) {
            Ok(text) => {
                self.history.push(Message::new("assistant", &text));
                Ok(text)
            }
            Err(e) => {
                self.history.pop();
                Err(e)
            }
        }
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

    pub fn load(path: &Path, opts: &LoadOptions) -> Result<ModelContainer> {
        Ok(ModelContainer::new(LanguageModel::load(path, opts)?))
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

    /// [`LanguageModel::generate_with_images`] with cancellation through
    /// [`ModelContainer::cancel`].
    pub fn generate_with_images(
        &self,
        prompt: &[u32],
        images: &[ProcessedImage],
        params: &GenerateParams,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Generation> {
        let guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        self.cancel.store(false, Ordering::Relaxed);
        guard.generate_with_images(prompt, images, params, None, Some(&self.cancel), on_event)
    }

    /// Asks a running generation to stop after its current token.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

/// A generation running on its own thread ([`ModelContainer::generate_task`]):
/// iterate it for the events; stopping early cancels it. Dropping the
/// handle cancels the generation and waits for its thread, so the container
/// is free again as soon as the handle is gone.
#[derive(Debug)]
pub struct GenerationHandle {
    events: std::sync::mpsc::Receiver<Event>,
    cancel: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<Generation>>>,
}

impl GenerationHandle {
    /// Asks the generation to stop after its current token.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// Waits for the generation to end and returns it (events not yet
    /// read are dropped).
    pub fn join(mut self) -> Result<Generation> {
        self.finish()
    }

    fn finish(&mut self) -> Result<Generation> {
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(Error::Usage("the generation thread panicked".into()))),
            None => Err(Error::Usage("the generation was already joined".into())),
        }
    }
}

impl Iterator for GenerationHandle {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        self.events.recv().ok()
    }
}

impl Drop for GenerationHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.cancel();
            let _ = self.finish();
        }
    }
}

impl ModelContainer {
    /// Starts a generation on a thread of its own (mlx-swift-lm's
    /// `generateTask`); with `ticket`, the generation runs inside it.
    pub fn generate_task(
        &self,
        prompt: Vec<u32>,
        params: GenerateParams,
        ticket: Option<lmspec_engine::memory::Ticket>,
    ) -> GenerationHandle {
        let (tx, rx) = std::sync::mpsc::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&cancel);
        let inner = Arc::clone(&self.inner);
        let thread = std::thread::spawn(move || {
            let run = || {
                let guard = inner.lock().unwrap_or_else(|e| e.into_inner());
                guard.generate(&prompt, &params, None, Some(&flag), &mut |e| {
                    // A consumer that went away cancels the generation.
                    if tx.send(e).is_err() {
                        flag.store(true, Ordering::Relaxed);
                    }
                })
            };
            match &ticket {
                Some(t) => t.run(run)?,
                None => run(),
            }
        });
        GenerationHandle {
            events: rx,
            cancel,
            thread: Some(thread),
        }
    }
}
