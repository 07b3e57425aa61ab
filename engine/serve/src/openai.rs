//! OpenAI's API: chat completions, completions, embeddings, models.
use std::convert::Infallible;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use crate::engine::{GenJob, Logprob, Out, Prompt, Summary};
use crate::error::ApiError;
use crate::request::{self, content_text, Body, ToolChoice};
use crate::{unix_time, AppState};
use lmspec_lm::generate::Event;
use lmspec_lm::tools::ToolCall;

/// A job with the fields every generation endpoint shares, read from
/// `body`.
pub(crate) fn job(
    body: &Body,
    id: String,
    endpoint: &'static str,
    prompt: Prompt,
    max_fields: &[&str],
) -> Result<GenJob, ApiError> {
    let (sampling, processors) = body.sampling()?;
    if let Some(n) = body.integer("n", 1, i64::MAX)? {
        if n != 1 {
            return Err(ApiError::invalid(
                "n",
                "only one choice per request is supported",
            ));
        }
    }
    let (out, _) = mpsc::unbounded_channel();
    Ok(GenJob {
        id,
        endpoint,
        prompt,
        max_tokens: body.max_tokens(max_fields)?,
        sampling,
        processors,
        stop: body.stops("stop")?,
        logprobs: None,
        schema: request::response_format(body)?,
        ignore_eos: body.boolean("ignore_eos")?.unwrap_or(false),
        tool_choice: ToolChoice::Auto,
        out,
    })
}

/// OpenAI chat messages as the chat template takes them: text content,
/// tool calls with their arguments as JSON values.
fn template_messages(body: &Body) -> Result<Value, ApiError> {
    let msgs = body.nonempty_array("messages")?;
    let mut out = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        let at = format!("messages[{i}]");
        let Value::Object(m) = m else {
            return Err(ApiError::invalid(&at, "expected an object"));
        };
        let role = match m.get("role") {
            Some(Value::String(r))
                if ["system", "developer", "user", "assistant", "tool"].contains(&r.as_str()) =>
            {
                if r == "developer" {
                    "system"
                } else {
                    r.as_str()
                }
            }
            Some(Value::String(r)) => {
                return Err(ApiError::invalid(
                    &format!("{at}.role"),
                    format!("'{r}' is not system, user, assistant or tool"),
                ))
            }
            Some(v) => {
                return Err(ApiError::invalid(
                    &format!("{at}.role"),
                    format!("expected a string, got {}", request::kind(v)),
                ))
            }
            None => return Err(ApiError::invalid(&format!("{at}.role"), "missing")),
        };
        let content = content_text(m.get("content"), &format!("{at}.content"))?;
        let mut msg = json!({"role": role, "content": content});
        if let Some(calls) = m.get("tool_calls").filter(|v| !v.is_null()) {
            let Value::Array(calls) = calls else {
                return Err(ApiError::invalid(
                    &format!("{at}.tool_calls"),
                    "expected an array",
                ));
            };
            let mut list = Vec::new();
            for (k, c) in calls.iter().enumerate() {
                let cat = format!("{at}.tool_calls[{k}].function");
                let f = c
                    .get("function")
                    .ok_or_else(|| ApiError::invalid(&cat, "missing"))?;
                let name = f.get("name").and_then(Value::as_str).ok_or_else(|| {
                    ApiError::invalid(&format!("{cat}.name"), "expected a string")
                })?;
                let args = match f.get("arguments") {
                    Some(Value::String(s)) => {
                        serde_json::from_str(s).unwrap_or(Value::String(s.clone()))
                    }
                    Some(v) => v.clone(),
                    None => json!({}),
                };
                let mut call =
                    json!({"type": "function", "function": {"name": name, "arguments": args}});
                if let Some(id) = c.get("id") {
                    call["id"] = id.clone();
                }
                list.push(call);
            }
            msg["tool_calls"] = Value::Array(list);
        }
        for key in ["tool_call_id", "name"] {
            if let Some(v) = m.get(key).filter(|v| !v.is_null()) {
                if !v.is_string() {
                    return Err(ApiError::invalid(
                        &format!("{at}.{key}"),
                        "expected a string",
                    ));
                }
                msg[key] = v.clone();
            }
        }
        out.push(msg);
    }
    Ok(Value::Array(out))
}

/// Template variables a request may set (`chat_template_kwargs`, as vLLM
/// and mlx-lm's server take them).
fn template_extra(body: &Body) -> Result<Map<String, Value>, ApiError> {
    match body.get("chat_template_kwargs") {
        None => Ok(Map::new()),
        Some(Value::Object(m)) => Ok(m.clone()),
        Some(v) => Err(ApiError::invalid(
            "chat_template_kwargs",
            format!("expected an object, got {}", request::kind(v)),
        )),
    }
}

pub async fn chat(State(state): State<AppState>, bytes: Bytes) -> Response {
    match chat_inner(state, bytes).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat_inner(state: AppState, bytes: Bytes) -> Result<Response, ApiError> {
    let body = request::parse(&bytes)?;
    state.check_model(body.string("model")?)?;
    let messages = template_messages(&body)?;
    let tools = request::openai_tools(&body)?;
    let tool_choice = request::openai_tool_choice(&body, &tools)?;
    let stream = body.boolean("stream")?.unwrap_or(false);
    let include_usage = body.include_usage()?;
    let logprobs = body.boolean("logprobs")?.unwrap_or(false);
    let top = body.integer("top_logprobs", 0, 20)?;
    if top.is_some() && !logprobs {
        return Err(ApiError::invalid("top_logprobs", "needs logprobs: true"));
    }
    let id = state.id("chatcmpl");
    let extra = template_extra(&body)?;
    let mut job = job(
        &body,
        id.clone(),
        "chat",
        Prompt::Chat {
            messages,
            tools,
            extra,
        },
        &["max_completion_tokens", "max_tokens"],
    )?;
    job.tool_choice = tool_choice;
    job.logprobs = logprobs.then(|| top.unwrap_or(0) as usize);
    let (rx, first) = state.start(job).await?;
    let head = Head {
        id,
        created: unix_time(),
        model: state.model_id.clone(),
    };
    if stream {
        return Ok(sse(chat_stream(head, rx, first, include_usage)));
    }
    let r = collect(rx, first).await?;
    let calls: Vec<Value> = r
        .summary
        .calls
        .iter()
        .enumerate()
        .map(|(k, c)| call_json(&head.id, k, c))
        .collect();
    let mut message = json!({
        "role": "assistant",
        "content": if r.text.is_empty() && !calls.is_empty() { Value::Null } else { Value::String(r.text.clone()) },
    });
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    if !r.reasoning.is_empty() {
        message["reasoning_content"] = Value::String(r.reasoning.clone());
    }
    let lp = logprobs
        .then(|| json!({"content": r.logprobs.iter().map(chat_logprob).collect::<Vec<_>>()}));
    Ok(axum::Json(json!({
        "id": head.id,
        "object": "chat.completion",
        "created": head.created,
        "model": head.model,
        "choices": [{"index": 0, "message": message, "logprobs": lp, "finish_reason": r.summary.finish}],
        "usage": usage(&r.summary),
    }))
    .into_response())
}

/// What every response carries.
#[derive(Debug, Clone)]
pub(crate) struct Head {
    pub id: String,
    pub created: u64,
    pub model: String,
}

pub(crate) fn usage(s: &Summary) -> Value {
    json!({
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "total_tokens": s.prompt_tokens + s.completion_tokens,
    })
}

pub(crate) fn call_id(request: &str, k: usize) -> String {
    let tail = request.rsplit('-').next().unwrap_or(request);
    format!("call_{tail}{k}")
}

fn call_json(request: &str, k: usize, c: &ToolCall) -> Value {
    json!({
        "id": c.id.clone().unwrap_or_else(|| call_id(request, k)),
        "type": "function",
        "function": {"name": c.name, "arguments": c.arguments.to_string()},
    })
}

fn chat_logprob(l: &Logprob) -> Value {
    json!({
        "token": l.token,
        "logprob": l.logprob,
        "bytes": l.token.as_bytes(),
        "top_logprobs": l.top.iter().map(|(t, p)| json!({"token": t, "logprob": p, "bytes": t.as_bytes()})).collect::<Vec<_>>(),
    })
}

/// A whole generation, gathered.
#[derive(Debug, Default)]
pub(crate) struct Collected {
    pub text: String,
    pub reasoning: String,
    pub logprobs: Vec<Logprob>,
    pub summary: Summary,
}

pub(crate) async fn collect(
    mut rx: mpsc::UnboundedReceiver<Out>,
    first: Out,
) -> Result<Collected, ApiError> {
    let mut c = Collected::default();
    let mut next = Some(first);
    loop {
        let out = match next.take() {
            Some(o) => o,
            None => rx
                .recv()
                .await
                .ok_or_else(|| ApiError::internal("the engine dropped the request"))?,
        };
        match out {
            Out::Token { events, logprob } => {
                for e in events {
                    match e {
                        Event::Text(t) => c.text.push_str(&t),
                        Event::Reasoning(r) => c.reasoning.push_str(&r),
                        Event::ToolRejected { text, .. } => c.text.push_str(&text),
                        _ => {}
                    }
                }
                c.logprobs.extend(logprob);
            }
            Out::Done(s) => {
                c.summary = s;
                return Ok(c);
            }
            Out::Failed(e) => return Err(e),
        }
    }
}

/// A server-sent-event response.
pub(crate) fn sse(s: impl Stream<Item = SseEvent> + Send + 'static) -> Response {
    Sse::new(s.map(Ok::<_, Infallible>))
        .keep_alive(KeepAlive::default())
        .into_response()
}

pub(crate) fn data(v: &Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

/// The engine's outputs as a stream (the first one already received).
pub(crate) fn outputs(
    rx: mpsc::UnboundedReceiver<Out>,
    first: Out,
) -> impl Stream<Item = Out> + Send {
    stream::once(async move { first }).chain(stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|o| (o, rx))
    }))
}

fn chat_stream(
    head: Head,
    rx: mpsc::UnboundedReceiver<Out>,
    first: Out,
    include_usage: bool,
) -> impl Stream<Item = SseEvent> + Send {
    let chunk = move |head: &Head, delta: Value, finish: Option<&str>, lp: Option<Value>| {
        json!({
            "id": head.id,
            "object": "chat.completion.chunk",
            "created": head.created,
            "model": head.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}],
        })
    };
    let opening = data(&chunk(
        &head,
        json!({"role": "assistant", "content": ""}),
        None,
        None,
    ));
    let mut calls = 0;
    let body = outputs(rx, first).flat_map(move |out| {
        let mut events = Vec::new();
        match out {
            Out::Token {
                events: evs,
                logprob,
            } => {
                let mut text = String::new();
                let mut reasoning = String::new();
                for e in evs {
                    match e {
                        Event::Text(t) => text.push_str(&t),
                        Event::ToolRejected { text: t, .. } => text.push_str(&t),
                        Event::Reasoning(r) => reasoning.push_str(&r),
                        Event::ToolCall(c) => {
                            let mut call = call_json(&head.id, calls, &c);
                            call["index"] = json!(calls);
                            calls += 1;
                            events.push(data(&chunk(
                                &head,
                                json!({"tool_calls": [call]}),
                                None,
                                None,
                            )));
                        }
                        _ => {}
                    }
                }
                let lp = logprob.map(|l| json!({"content": [chat_logprob(&l)]}));
                if !reasoning.is_empty() {
                    events.insert(
                        0,
                        data(&chunk(
                            &head,
                            json!({"reasoning_content": reasoning}),
                            None,
                            None,
                        )),
                    );
                }
                if !text.is_empty() || lp.is_some() {
                    events.push(data(&chunk(&head, json!({"content": text}), None, lp)));
                }
            }
            Out::Done(s) => {
                events.push(data(&chunk(&head, json!({}), Some(s.finish), None)));
                if include_usage {
                    events.push(data(&json!({
                        "id": head.id,
                        "object": "chat.completion.chunk",
                        "created": head.created,
                        "model": head.model,
                        "choices": [],
                        "usage": usage(&s),
                    })));
                }
                events.push(SseEvent::default().data("[DONE]"));
            }
            Out::Failed(e) => {
                events.push(data(&e.body()));
                events.push(SseEvent::default().data("[DONE]"));
            }
        }
        stream::iter(events)
    });
    stream::once(async move { opening }).chain(body)
}

pub async fn completions(State(state): State<AppState>, bytes: Bytes) -> Response {
    match completions_inner(state, bytes).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// `prompt`: a string, a list of one string, token ids, or a list of one
/// list of token ids.
fn completion_prompt(body: &Body) -> Result<Prompt, ApiError> {
    let ids = |items: &[Value], at: &str| -> Result<Vec<u32>, ApiError> {
        items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_u64()
                    .filter(|t| *t <= u64::from(u32::MAX))
                    .map(|t| t as u32)
                    .ok_or_else(|| ApiError::invalid(&format!("{at}[{i}]"), "expected a token id"))
            })
            .collect()
    };
    match body.get("prompt") {
        Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::String(s)] => Ok(Prompt::Text(s.clone())),
            [Value::Array(inner)] => Ok(Prompt::Tokens(ids(inner, "prompt[0]")?)),
            items if !items.is_empty() && items.iter().all(Value::is_number) => {
                Ok(Prompt::Tokens(ids(items, "prompt")?))
            }
            [] => Err(ApiError::invalid("prompt", "must not be empty")),
            _ => Err(ApiError::invalid(
                "prompt",
                "one prompt per request (a string or a list of token ids)",
            )),
        },
        Some(v) => Err(ApiError::invalid(
            "prompt",
            format!("expected a string or token ids, got {}", request::kind(v)),
        )),
        None => Err(ApiError::invalid("prompt", "missing")),
    }
}

async fn completions_inner(state: AppState, bytes: Bytes) -> Result<Response, ApiError> {
    let body = request::parse(&bytes)?;
    state.check_model(body.string("model")?)?;
    let prompt = completion_prompt(&body)?;
    if body.boolean("echo")?.unwrap_or(false) {
        return Err(ApiError::invalid(
            "echo",
            "echoing the prompt is not supported",
        ));
    }
    let stream = body.boolean("stream")?.unwrap_or(false);
    let include_usage = body.include_usage()?;
    let logprobs = body.integer("logprobs", 0, 20)?;
    let id = state.id("cmpl");
    let mut job = job(&body, id.clone(), "completions", prompt, &["max_tokens"])?;
    job.logprobs = logprobs.map(|k| k as usize);
    let (rx, first) = state.start(job).await?;
    let head = Head {
        id,
        created: unix_time(),
        model: state.model_id.clone(),
    };
    let choice = |text: &str, lps: Option<Value>, finish: Option<&str>| json!({"index": 0, "text": text, "logprobs": lps, "finish_reason": finish});
    if stream {
        let h = head.clone();
        let s = outputs(rx, first).flat_map(move |out| {
            let obj = |choices: Value| json!({"id": h.id, "object": "text_completion", "created": h.created, "model": h.model, "choices": choices});
            let mut events = Vec::new();
            match out {
                Out::Token { events: evs, logprob } => {
                    let text: String = evs.into_iter().filter_map(|e| match e {
                        Event::Text(t) | Event::Reasoning(t) => Some(t),
                        _ => None,
                    }).collect();
                    let lps = logprob.map(|l| completion_logprobs(&[l]));
                    if !text.is_empty() || lps.is_some() {
                        events.push(data(&obj(json!([choice(&text, lps, None)]))));
                    }
                }
                Out::Done(s) => {
                    events.push(data(&obj(json!([choice("", None, Some(s.finish))]))));
                    if include_usage {
                        let mut u = obj(json!([]));
                        u["usage"] = usage(&s);
                        events.push(data(&u));
                    }
                    events.push(SseEvent::default().data("[DONE]"));
                }
                Out::Failed(e) => {
                    events.push(data(&e.body()));
                    events.push(SseEvent::default().data("[DONE]"));
                }
            }
            stream::iter(events)
        });
        return Ok(sse(s));
    }
    let r = collect(rx, first).await?;
    let text = r.reasoning.clone() + &r.text;
    let lps = logprobs.map(|_| completion_logprobs(&r.logprobs));
    Ok(axum::Json(json!({
        "id": head.id,
        "object": "text_completion",
        "created": head.created,
        "model": head.model,
        "choices": [choice(&text, lps, Some(r.summary.finish))],
        "usage": usage(&r.summary),
    }))
    .into_response())
}

/// The legacy completions `logprobs` object.
fn completion_logprobs(lps: &[Logprob]) -> Value {
    let mut offset = 0;
    let mut offsets = Vec::new();
    for l in lps {
        offsets.push(offset);
        offset += l.token.len();
    }
    json!({
        "tokens": lps.iter().map(|l| l.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
        "top_logprobs": lps.iter().map(|l| {
            let m: Map<String, Value> = l.top.iter().map(|(t, p)| (t.clone(), json!(p))).collect();
            Value::Object(m)
        }).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

pub async fn embeddings(State(state): State<AppState>, bytes: Bytes) -> Response {
    match embeddings_inner(state, bytes).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn embeddings_inner(state: AppState, bytes: Bytes) -> Result<Response, ApiError> {
    let body = request::parse(&bytes)?;
    let Some(served) = state.embedding_id.clone() else {
        return Err(ApiError::not_found(
            "this server has no embedding model (start it with --embedding-model)",
            Some("model"),
            "model_not_found",
        ));
    };
    match body.string("model")? {
        Some(m) if m != served => {
            return Err(ApiError::not_found(
                format!("the embedding model '{m}' is not served here (serving '{served}')"),
                Some("model"),
                "model_not_found",
            ))
        }
        _ => {}
    }
    let texts: Vec<String> = match body.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .map(String::from)
                    .ok_or_else(|| ApiError::invalid(&format!("input[{i}]"), "expected a string"))
            })
            .collect::<Result<_, _>>()?,
        Some(Value::Array(_)) => return Err(ApiError::invalid("input", "must not be empty")),
        Some(v) => {
            return Err(ApiError::invalid(
                "input",
                format!("expected a string or strings, got {}", request::kind(v)),
            ))
        }
        None => return Err(ApiError::invalid("input", "missing")),
    };
    let base64 = match body.string("encoding_format")? {
        None | Some("float") => false,
        Some("base64") => true,
        Some(f) => {
            return Err(ApiError::invalid(
                "encoding_format",
                format!("'{f}' is not float or base64"),
            ))
        }
    };
    let dims = body.integer("dimensions", 1, i64::from(u32::MAX))?;
    let (mut vectors, tokens) = state.embed(texts).await?;
    if let Some(d) = dims {
        let d = d as usize;
        let width = vectors.first().map_or(0, Vec::len);
        if d > width {
            return Err(ApiError::invalid(
                "dimensions",
                format!("{d} is more than the model's {width}"),
            ));
        }
        for v in &mut vectors {
            v.truncate(d);
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            if norm > 0.0 {
                v.iter_mut().for_each(|x| *x /= norm);
            }
        }
    }
    let data: Vec<Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(encode_base64(&bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(axum::Json(json!({
        "object": "list",
        "data": data,
        "model": served,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response())
}

pub async fn models(State(state): State<AppState>) -> Response {
    let mut data =
        vec![json!({"id": state.model_id, "object": "model", "created": 0, "owned_by": "lmspec"})];
    if let Some(e) = &state.embedding_id {
        data.push(json!({"id": e, "object": "model", "created": 0, "owned_by": "lmspec"}));
    }
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// `POST /v1/rerank` (the shape of Cohere's and Jina's rerank APIs, which
/// vLLM and llama.cpp's server also take): `query`, `documents` (strings),
/// `top_n`, `return_documents`.
pub async fn rerank(State(state): State<AppState>, bytes: Bytes) -> Response {
    match rerank_inner(state, bytes).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn rerank_inner(state: AppState, bytes: Bytes) -> Result<Response, ApiError> {
    let body = request::parse(&bytes)?;
    let Some(served) = state.rerank_id.clone() else {
        return Err(ApiError::not_found(
            "this server has no reranking model (start it with --rerank-model)",
            Some("model"),
            "model_not_found",
        ));
    };
    if let Some(m) = body.string("model")?.filter(|m| *m != served) {
        return Err(ApiError::not_found(
            format!("the reranking model '{m}' is not served here (serving '{served}')"),
            Some("model"),
            "model_not_found",
        ));
    }
    let query = body
        .string("query")?
        .ok_or_else(|| ApiError::invalid("query", "missing"))?
        .to_string();
    let documents: Vec<String> = body
        .nonempty_array("documents")?
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str()
                .or_else(|| v.get("text").and_then(Value::as_str))
                .map(String::from)
                .ok_or_else(|| ApiError::invalid(&format!("documents[{i}]"), "expected a string"))
        })
        .collect::<Result<_, _>>()?;
    let top_n = body
        .integer("top_n", 1, i64::from(u32::MAX))?
        .map(|n| n as usize);
    let with_docs = body.boolean("return_documents")?.unwrap_or(false);
    let id = state.id("rerank");
    let ranked = state.rerank(query, documents.clone(), top_n).await?;
    let results: Vec<Value> = ranked
        .into_iter()
        .map(|(i, score)| {
            let mut r = json!({"index": i, "relevance_score": score});
            if with_docs {
                r["document"] = json!({"text": documents[i]});
            }
            r
        })
        .collect();
    Ok(axum::Json(json!({"id": id, "model": served, "results": results})).into_response())
}

/// Standard base64 with padding (OpenAI's `encoding_format: base64`: the
/// little-endian float32 bytes).
fn encode_base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        assert_eq!(super::encode_base64(b""), "");
        assert_eq!(super::encode_base64(b"f"), "Zg==");
        assert_eq!(super::encode_base64(b"fo"), "Zm8=");
        assert_eq!(super::encode_base64(b"foo"), "Zm9v");
        assert_eq!(super::encode_base64(&[0xff, 0xfe, 0x00, 0x01]), "//4AAQ==");
    }
}
