//! The engine thread: it owns the model (MLX work stays on one thread),
//! renders and tokenizes prompts, admits requests within the memory budget
//! and the batch limit, prefills them one at a time and decodes all running
//! requests together ([`BatchGenerator`]), turning each one's tokens into
//! text events for its HTTP handler. A handler that goes away (the client
//! disconnected) ends its sequence at the next step.
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};

use crate::error::ApiError;
use crate::request::ToolChoice;
use lmspec_engine::memory::{MemoryManager, MemoryPolicy, Ticket, TicketKind};
use lmspec_lm::batch::{BatchGenerator, Finish, SeqParams, SeqToken};
use lmspec_lm::constrain::{JsonConstraint, Node, TokenTexts};
use lmspec_lm::generate::{Event, TextStream};
use lmspec_lm::sampling::{ProcessorParams, SamplingParams};
use lmspec_lm::template::ChatContext;
use lmspec_lm::tools::{OutputFormat, ToolCall, ToolFormat};
use lmspec_lm::{Embedder, LanguageModel, Reranker};

/// What the model reads.
#[derive(Debug)]
pub enum Prompt {
    /// Messages for the chat template, with tools (template `tools`) and
    /// extra template variables.
    Chat {
        messages: Value,
        tools: Vec<Value>,
        extra: Map<String, Value>,
    },
    /// Text fed as is (completions).
    Text(String),
    Tokens(Vec<u32>),
}

/// A generation request, checked.
#[derive(Debug)]
pub struct GenJob {
    /// For logs.
    pub id: String,
    pub endpoint: &'static str,
    pub prompt: Prompt,
    /// `None`: the server's default.
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub processors: ProcessorParams,
    pub stop: Vec<String>,
    /// Log-probabilities with this many alternatives.
    pub logprobs: Option<usize>,
    /// `response_format`'s schema.
    pub schema: Option<Arc<Node>>,
    /// Decode past end-of-sequence tokens (vLLM's `ignore_eos`).
    pub ignore_eos: bool,
    pub tool_choice: ToolChoice,
    pub out: mpsc::UnboundedSender<Out>,
}

/// Work for the engine thread.
#[derive(Debug)]
pub enum Work {
    Generate(Box<GenJob>),
    Embed {
        texts: Vec<String>,
        reply: oneshot::Sender<Result<Embedded, ApiError>>,
    },
    Rerank {
        query: String,
        documents: Vec<String>,
        top_n: Option<usize>,
        reply: oneshot::Sender<Result<Vec<(usize, f32)>, ApiError>>,
    },
}

/// Embedding vectors and the number of tokens they read.
pub type Embedded = (Vec<Vec<f32>>, usize);

/// A chosen token's log-probability, with the best alternatives, as text.
#[derive(Debug, Clone)]
pub struct Logprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// The end of a generation.
#[derive(Debug, Clone)]
pub struct Summary {
    /// `stop`, `length` or `tool_calls`.
    pub finish: &'static str,
    /// The stop sequence that ended the output.
    pub stop_sequence: Option<String>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub calls: Vec<ToolCall>,
}

impl Default for Summary {
    fn default() -> Self {
        Summary {
            finish: "stop",
            stop_sequence: None,
            prompt_tokens: 0,
            completion_tokens: 0,
            calls: Vec::new(),
        }
    }
}

/// What a handler receives, in order: tokens, then `Done` or `Failed`.
#[derive(Debug)]
pub enum Out {
    Token {
        events: Vec<Event>,
        logprob: Option<Logprob>,
    },
    Done(Summary),
    Failed(ApiError),
}

/// Settings of the engine thread.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Most sequences decoding at once.
    pub max_batch: usize,
    /// Bytes of KV cache all running sequences may reserve.
    pub kv_budget: u64,
    /// Completion tokens when a request gives no limit.
    pub default_max_tokens: usize,
    /// Prefilled prompts kept for reuse.
    pub prompt_cache_entries: usize,
}

struct Live {
    job: Box<GenJob>,
    text: TextStream<'static>,
    prompt_tokens: usize,
    completion: usize,
    /// The request's share of the KV budget, released when it ends.
    _ticket: Ticket,
    started: Instant,
    first: Option<Instant>,
    reused: usize,
}

/// The engine thread's state.
#[derive(Debug)]
pub struct Engine {
    lm: LanguageModel,
    embedder: Option<Embedder>,
    reranker: Option<Reranker>,
    formats: &'static [ToolFormat],
    texts: std::cell::OnceCell<Arc<TokenTexts>>,
    opts: EngineOptions,
    /// Bytes per sequence: fixed state and per position.
    footprint: (u64, u64),
    eos: Vec<u32>,
    /// Admission: one active ticket per running request under a fixed
    /// policy of the KV budget (MLX's own limit is left alone: weights and
    /// scratch are outside the budget).
    memory: Arc<MemoryManager>,
}

/// A model's per-sequence state size, measured on one token.
pub fn measure_footprint(lm: &LanguageModel) -> lmspec_engine::Result<(u64, u64)> {
    let mut cache = lm.model.new_cache();
    let id = lm.tokenizer.bos_id.unwrap_or(0) as i32;
    let logits = lm
        .model
        .forward(&mlx_rs::Array::from_slice(&[id], &[1, 1]), Some(&mut cache))?;
    logits.eval()?;
    Ok(cache.footprint())
}

impl Engine {
    pub fn new(
        lm: LanguageModel,
        embedder: Option<Embedder>,
        reranker: Option<Reranker>,
        formats: &'static [ToolFormat],
        opts: EngineOptions,
    ) -> lmspec_engine::Result<Engine> {
        let footprint = measure_footprint(&lm)?;
        let eos = lm.tokenizer.eos_ids.clone();
        let mut opts = opts;
        if opts.max_batch > 1 && !BatchGenerator::can_batch(&lm.model) {
            eprintln!(
                "lmspec serve: this model cannot decode sequences at different positions together; serving one at a time"
            );
            opts.max_batch = 1;
        }
        let memory = MemoryManager::with_limit_fn(MemoryPolicy::Fixed(opts.kv_budget), 0, |_| {});
        Ok(Engine {
            memory,
            lm,
            embedder,
            reranker,
            formats,
            texts: std::cell::OnceCell::new(),
            opts,
            footprint,
            eos,
        })
    }

    /// Bytes a sequence of `positions` reserves.
    fn reserve(&self, positions: usize) -> u64 {
        self.footprint.0 + self.footprint.1 * positions as u64
    }

    /// Runs until every sender of `rx` is gone.
    pub fn run(self, mut rx: mpsc::UnboundedReceiver<Work>) {
        let model = &self.lm.model;
        let mut gen = BatchGenerator::new(model, self.eos.clone(), self.opts.prompt_cache_entries);
        let mut queue: VecDeque<Box<GenJob>> = VecDeque::new();
        let mut live: Vec<(u64, Live)> = Vec::new();
        let mut next_seq: u64 = 0;
        let mut released = true;
        loop {
            let idle = live.is_empty() && queue.is_empty();
            if idle && !released {
                release_memory();
                released = true;
            }
            let first = if idle {
                match rx.blocking_recv() {
                    Some(w) => Some(w),
                    None => return,
                }
            } else {
                None
            };
            let mut incoming: Vec<Work> = first.into_iter().collect();
            while let Ok(w) = rx.try_recv() {
                incoming.push(w);
            }
            for w in incoming {
                match w {
                    Work::Embed { texts, reply } => {
                        let _ = reply.send(embed(self.embedder.as_ref(), &texts));
                    }
                    Work::Rerank {
                        query,
                        documents,
                        top_n,
                        reply,
                    } => {
                        let _ =
                            reply.send(rerank(self.reranker.as_ref(), &query, &documents, top_n));
                    }
                    Work::Generate(job) => queue.push_back(job),
                }
            }
            // Admit queued requests while they fit.
            while let Some(job) = queue.front() {
                if job.out.is_closed() {
                    queue.pop_front();
                    continue;
                }
                if live.len() >= self.opts.max_batch.max(1) {
                    break;
                }
                let Some(job) = queue.pop_front() else { break };
                match self.admit(&mut gen, job, next_seq) {
                    Admitted::Live(l) => {
                        live.push((next_seq, *l));
                    }
                    Admitted::Finished => {}
                    Admitted::Wait(job) => {
                        queue.push_front(job);
                        break;
                    }
                }
                next_seq += 1;
            }
            // Requests whose client went away.
            let gone: Vec<u64> = live
                .iter()
                .filter(|(_, l)| l.job.out.is_closed())
                .map(|(s, _)| *s)
                .collect();
            for s in gone {
                if let Err(e) = gen.remove(s) {
                    eprintln!("lmspec serve: removing a sequence: {e}");
                }
                if let Some(i) = live.iter().position(|(q, _)| *q == s) {
                    let (_, l) = live.remove(i);
                    log_end(&l, "cancelled");
                }
            }
            if gen.is_empty() {
                continue;
            }
            released = false;
            match gen.step() {
                Ok(tokens) => {
                    for t in tokens {
                        let Some(i) = live.iter().position(|(q, _)| *q == t.seq) else {
                            continue;
                        };
                        let done = self.deliver(&mut live[i].1, &t);
                        if done {
                            if t.finish.is_none() {
                                let _ = gen.remove(t.seq);
                            }
                            live.remove(i);
                        }
                    }
                }
                Err(e) => {
                    // A failed step fails every running request.
                    eprintln!("lmspec serve: decode step failed: {e}");
                    for (s, l) in live.drain(..) {
                        let _ = gen.remove(s);
                        let _ = l.job.out.send(Out::Failed(ApiError::internal(format!(
                            "decoding failed: {e}"
                        ))));
                    }
                }
            }
        }
    }

    /// Prepares and prefills a request; it starts decoding unless its first
    /// token ends it, or it waits when it does not fit the budget now.
    fn admit(&self, gen: &mut BatchGenerator<'_>, job: Box<GenJob>, seq: u64) -> Admitted {
        let prepared = match self.prepare(&job) {
            Ok(p) => p,
            Err(e) => {
                let _ = job.out.send(Out::Failed(e));
                return Admitted::Finished;
            }
        };
        let positions = prepared.ids.len() + prepared.params.max_tokens;
        let reserve = self.reserve(positions);
        if reserve > self.opts.kv_budget {
            let _ = job.out.send(Out::Failed(
                ApiError::bad_request(format!(
                    "the request needs {:.1} MB of cache ({} prompt + {} completion positions), more than the server's budget of {:.1} MB",
                    reserve as f64 / 1e6,
                    prepared.ids.len(),
                    prepared.params.max_tokens,
                    self.opts.kv_budget as f64 / 1e6
                ))
                .with_code("context_length_exceeded"),
            ));
            return Admitted::Finished;
        }
        let ticket = self.memory.ticket(reserve, TicketKind::Active);
        if ticket.start_timeout(Duration::ZERO).is_err() {
            return Admitted::Wait(job);
        }
        let started = Instant::now();
        let reused_before = gen.reused_tokens;
        let first = match gen.insert(seq, &prepared.ids, prepared.params) {
            Ok(t) => t,
            Err(e) => {
                let _ = job
                    .out
                    .send(Out::Failed(ApiError::bad_request(e.to_string())));
                return Admitted::Finished;
            }
        };
        let mut l = Live {
            text: prepared.text,
            prompt_tokens: prepared.ids.len(),
            completion: 0,
            _ticket: ticket,
            started,
            first: None,
            reused: gen.reused_tokens - reused_before,
            job,
        };
        if self.deliver(&mut l, &first) {
            return Admitted::Finished;
        }
        Admitted::Live(Box::new(l))
    }

    /// Sends a token's text to its handler; true when the request ended.
    fn deliver(&self, l: &mut Live, t: &SeqToken) -> bool {
        l.first.get_or_insert_with(Instant::now);
        let tok = &self.lm.tokenizer;
        let mut events = Vec::new();
        let mut stop_hit = false;
        let mut failed = None;
        let eos = t.finish == Some(Finish::Stop);
        l.completion += 1;
        if !eos {
            match l.text.push(tok, t.token, &mut |e| events.push(e)) {
                Ok(hit) => stop_hit = hit,
                Err(e) => failed = Some(e),
            }
        }
        // The end-of-sequence token is not part of the output (as OpenAI).
        let logprob = t.logprobs.as_ref().filter(|_| !eos).map(|lp| Logprob {
            token: tok.decode(&[t.token], false).unwrap_or_default(),
            logprob: lp.logprob,
            top: lp
                .top
                .iter()
                .map(|(id, p)| (tok.decode(&[*id], false).unwrap_or_default(), *p))
                .collect(),
        });
        if let Some(e) = failed {
            let _ = l
                .job
                .out
                .send(Out::Failed(ApiError::internal(e.to_string())));
            return true;
        }
        let ended = stop_hit || t.finish.is_some();
        if ended {
            if let Err(e) = l.text.finish(tok, stop_hit || eos, &mut |e| events.push(e)) {
                let _ = l
                    .job
                    .out
                    .send(Out::Failed(ApiError::internal(e.to_string())));
                return true;
            }
        }
        if !events.is_empty() || logprob.is_some() {
            let _ = l.job.out.send(Out::Token { events, logprob });
        }
        if !ended {
            return false;
        }
        let calls = l.text.calls().to_vec();
        let finish = if !calls.is_empty() {
            "tool_calls"
        } else if stop_hit || eos {
            "stop"
        } else {
            "length"
        };
        let stop_sequence = l.text.stop_sequence().map(String::from);
        let _ = l.job.out.send(Out::Done(Summary {
            finish,
            stop_sequence,
            prompt_tokens: l.prompt_tokens,
            completion_tokens: l.completion,
            calls,
        }));
        log_end(l, finish);
        true
    }

    /// The prompt's ids, the sequence's settings and its text stream.
    fn prepare(&self, job: &GenJob) -> Result<Prepared, ApiError> {
        let lm = &self.lm;
        let (ids, format, tools_offered) = match &job.prompt {
            Prompt::Chat {
                messages,
                tools,
                extra,
            } => {
                let offered = if job.tool_choice == ToolChoice::None {
                    Vec::new()
                } else {
                    tools.clone()
                };
                let ctx = ChatContext {
                    tools: (!offered.is_empty()).then(|| Value::Array(offered.clone())),
                    add_generation_prompt: true,
                    extra: extra.clone(),
                    ..Default::default()
                };
                let ids = lm
                    .chat_prompt(messages, &ctx)
                    .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
                let tool_objs: Vec<lmspec_lm::Tool> = offered
                    .iter()
                    .filter_map(|t| lmspec_lm::Tool::from_openai_json(t, |_| Ok(Value::Null)).ok())
                    .collect();
                let declared = lm.response_template().and_then(Result::ok);
                let format = lm
                    .output_format(self.formats, declared.as_ref(), &tool_objs, None)
                    .map_err(|e| ApiError::internal(e.to_string()))?;
                (ids, format, offered)
            }
            Prompt::Text(t) => {
                let ids = lm
                    .tokenizer
                    .encode(t)
                    .map_err(|e| ApiError::invalid("prompt", e.to_string()))?;
                (ids, OutputFormat::default(), Vec::new())
            }
            Prompt::Tokens(ids) => (ids.clone(), OutputFormat::default(), Vec::new()),
        };
        if ids.is_empty() {
            return Err(ApiError::invalid("prompt", "the prompt has no tokens"));
        }
        let vocab = lm.tokenizer.vocab_size() as u32;
        if let Some(bad) = ids.iter().find(|&&t| t >= vocab) {
            return Err(ApiError::invalid(
                "prompt",
                format!("token id {bad} is past the vocabulary of {vocab}"),
            ));
        }
        let context = lm.model.context_length().map_or(usize::MAX, |c| c as usize);
        if ids.len() >= context {
            return Err(ApiError::invalid(
                if matches!(job.prompt, Prompt::Chat { .. }) {
                    "messages"
                } else {
                    "prompt"
                },
                format!(
                    "the prompt is {} tokens; this model's context is {context} positions",
                    ids.len()
                ),
            )
            .with_code("context_length_exceeded"));
        }
        let room = context - ids.len();
        let max_tokens = match job.max_tokens {
            Some(n) => n.min(room),
            None => self.opts.default_max_tokens.min(room),
        };
        let tools: Option<&'static ToolFormat> = format
            .tools
            .as_ref()
            .and_then(|f| self.formats.iter().find(|k| k.name == f.name));
        let constraint = self.constraint(job, &format, tools, &tools_offered)?;
        let text = TextStream::new(&lm.tokenizer, &ids, &job.stop, &format, tools)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(Prepared {
            ids,
            params: SeqParams {
                max_tokens,
                sampling: job.sampling.clone(),
                processors: job.processors.clone(),
                constraint,
                logprobs: job.logprobs,
                ignore_eos: job.ignore_eos,
            },
            text,
        })
    }

    /// The constraint of a forced tool call or a `response_format`.
    fn constraint(
        &self,
        job: &GenJob,
        format: &OutputFormat,
        tools: Option<&'static ToolFormat>,
        offered: &[Value],
    ) -> Result<Option<JsonConstraint>, ApiError> {
        let forced: Vec<&Value> = match &job.tool_choice {
            ToolChoice::Required => offered.iter().collect(),
            ToolChoice::Named(n) => offered
                .iter()
                .filter(|t| t["function"]["name"] == n.as_str())
                .collect(),
            _ => Vec::new(),
        };
        let (schema, prefix, suffix) = if !forced.is_empty() {
            let Some(f) = tools.filter(|f| f.payload == "json") else {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!(
                        "forcing a call needs a JSON tool-call format; this model's is '{}'",
                        format.tools.as_ref().map_or("none", |f| f.name.as_str())
                    ),
                ));
            };
            let alts: Vec<Value> = forced
                .iter()
                .map(|t| {
                    serde_json::json!({
                        "type": "object",
                        "properties": {
                            "name": {"const": t["function"]["name"]},
                            "arguments": t["function"]["parameters"],
                        },
                        "required": ["name", "arguments"],
                    })
                })
                .collect();
            let schema = if alts.len() == 1 {
                alts[0].clone()
            } else {
                serde_json::json!({"anyOf": alts})
            };
            let node = Node::compile(&schema, "tools")
                .map_err(|e| ApiError::invalid("tools", e.to_string()))?;
            (node, f.start.clone(), f.end.clone().unwrap_or_default())
        } else if let Some(s) = &job.schema {
            (s.clone(), String::new(), String::new())
        } else {
            return Ok(None);
        };
        let texts = match self.texts.get() {
            Some(t) => t.clone(),
            None => {
                let t = Arc::new(
                    TokenTexts::new(&self.lm.tokenizer)
                        .map_err(|e| ApiError::internal(e.to_string()))?,
                );
                let _ = self.texts.set(t.clone());
                t
            }
        };
        Ok(Some(JsonConstraint::new(
            schema,
            &prefix,
            &suffix,
            texts,
            self.eos.clone(),
        )))
    }
}

struct Prepared {
    ids: Vec<u32>,
    params: SeqParams,
    text: TextStream<'static>,
}

enum Admitted {
    Live(Box<Live>),
    Finished,
    Wait(Box<GenJob>),
}

/// Gives memory freed by finished requests back to the system: MLX's
/// buffer cache, then the allocator's free pages.
fn release_memory() {
    let _ = mlx_rs::memory::clear_cache();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn log_end(l: &Live, finish: &str) {
    let now = Instant::now();
    let first = l.first.unwrap_or(now);
    let ttft = (first - l.started).as_secs_f64();
    let decode = (now - first).as_secs_f64();
    let tps = l.completion.saturating_sub(1) as f64 / decode.max(1e-9);
    eprintln!(
        "lmspec serve: {} {} prompt {} tokens ({} reused), completion {} tokens, first token {:.3} s, {:.1} tok/s, {}",
        l.job.id, l.job.endpoint, l.prompt_tokens, l.reused, l.completion, ttft, tps, finish
    );
}

fn embed(
    embedder: Option<&Embedder>,
    texts: &[String],
) -> Result<(Vec<Vec<f32>>, usize), ApiError> {
    let e = embedder.ok_or_else(|| {
        ApiError::not_found(
            "this server has no embedding model (start it with --embedding-model)",
            Some("model"),
            "model_not_found",
        )
    })?;
    let mut tokens = 0;
    for (i, t) in texts.iter().enumerate() {
        tokens += e
            .tokenize(t)
            .map_err(|err| ApiError::invalid(&format!("input[{i}]"), err.to_string()))?
            .len();
    }
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let vectors = e
        .embed(&refs)
        .map_err(|err| ApiError::internal(err.to_string()))?;
    Ok((vectors, tokens))
}

fn rerank(
    reranker: Option<&Reranker>,
    query: &str,
    documents: &[String],
    top_n: Option<usize>,
) -> Result<Vec<(usize, f32)>, ApiError> {
    let r = reranker.ok_or_else(|| {
        ApiError::not_found(
            "this server has no reranking model (start it with --rerank-model)",
            Some("model"),
            "model_not_found",
        )
    })?;
    let docs: Vec<&str> = documents.iter().map(String::as_str).collect();
    r.rerank(query, &docs, top_n)
        .map_err(|e| ApiError::invalid("documents", e.to_string()))
}
