//! Anthropic's Messages API (`POST /v1/messages`): content blocks, tool
//! use, and its named streaming events.
use axum::body::Bytes;
use axum::extract::State;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Map, Value};

use crate::engine::{Out, Prompt, Summary};
use crate::error::{Api, ApiError};
use crate::openai::{call_id, collect, job, outputs, sse};
use crate::request::{self, content_text, Body, ToolChoice};
use crate::AppState;
use lmspec_lm::generate::Event;

pub async fn messages(State(state): State<AppState>, bytes: Bytes) -> Response {
    match inner(state, bytes).await {
        Ok(r) => r,
        Err(e) => e.for_api(Api::Anthropic).into_response(),
    }
}

fn named(name: &str, v: Value) -> SseEvent {
    SseEvent::default().event(name).data(v.to_string())
}

/// Anthropic messages (and `system`) as the chat template takes them.
fn template_messages(body: &Body) -> Result<Value, ApiError> {
    let mut out = Vec::new();
    match body.get("system") {
        None => {}
        Some(s) => {
            let text = content_text(Some(s), "system")?;
            out.push(json!({"role": "system", "content": text}));
        }
    }
    let msgs = body.nonempty_array("messages")?;
    for (i, m) in msgs.iter().enumerate() {
        let at = format!("messages[{i}]");
        let role = match m.get("role").and_then(Value::as_str) {
            Some(r @ ("user" | "assistant")) => r,
            Some(r) => {
                return Err(ApiError::invalid(
                    &format!("{at}.role"),
                    format!("'{r}' is not user or assistant"),
                ))
            }
            None => {
                return Err(ApiError::invalid(
                    &format!("{at}.role"),
                    "missing or not a string",
                ))
            }
        };
        let blocks = match m.get("content") {
            Some(Value::String(s)) => {
                out.push(json!({"role": role, "content": s}));
                continue;
            }
            Some(Value::Array(b)) => b,
            Some(v) => {
                return Err(ApiError::invalid(
                    &format!("{at}.content"),
                    format!(
                        "expected a string or content blocks, got {}",
                        request::kind(v)
                    ),
                ))
            }
            None => return Err(ApiError::invalid(&format!("{at}.content"), "missing")),
        };
        let mut text = String::new();
        let mut calls = Vec::new();
        for (k, b) in blocks.iter().enumerate() {
            let bat = format!("{at}.content[{k}]");
            match b.get("type").and_then(Value::as_str) {
                Some("text") => {
                    text.push_str(b.get("text").and_then(Value::as_str).ok_or_else(|| {
                        ApiError::invalid(&format!("{bat}.text"), "expected a string")
                    })?)
                }
                Some("tool_use") => {
                    let name = b.get("name").and_then(Value::as_str).ok_or_else(|| {
                        ApiError::invalid(&format!("{bat}.name"), "expected a string")
                    })?;
                    calls.push(json!({"id": b.get("id"), "type": "function", "function": {"name": name, "arguments": b.get("input").cloned().unwrap_or(json!({}))}}));
                }
                Some("tool_result") => {
                    let content = content_text(b.get("content"), &format!("{bat}.content"))?;
                    out.push(json!({"role": "tool", "tool_call_id": b.get("tool_use_id"), "content": content}));
                }
                Some("thinking" | "redacted_thinking") => {}
                Some(t) => {
                    return Err(ApiError::invalid(
                        &format!("{bat}.type"),
                        format!("content blocks of type '{t}' are not supported by this model"),
                    ))
                }
                None => return Err(ApiError::invalid(&format!("{bat}.type"), "missing")),
            }
        }
        if !text.is_empty() || !calls.is_empty() {
            let mut msg = json!({"role": role, "content": text});
            if !calls.is_empty() {
                msg["tool_calls"] = Value::Array(calls);
            }
            out.push(msg);
        }
    }
    Ok(Value::Array(out))
}

/// Anthropic tools as OpenAI function specs, and the tool choice.
fn tools(body: &Body) -> Result<(Vec<Value>, ToolChoice), ApiError> {
    let mut list = Vec::new();
    match body.get("tools") {
        None => {}
        Some(Value::Array(ts)) => {
            for (i, t) in ts.iter().enumerate() {
                let at = format!("tools[{i}]");
                let name = t
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| ApiError::invalid(&format!("{at}.name"), "expected a string"))?;
                let spec = json!({"type": "function", "function": {
                    "name": name,
                    "description": t.get("description").cloned().unwrap_or(json!("")),
                    "parameters": t.get("input_schema").cloned().unwrap_or(json!({"type": "object"})),
                }});
                lmspec_lm::Tool::from_openai_json(&spec, |_| Ok(Value::Null))
                    .map_err(|e| ApiError::invalid(&at, e))?;
                list.push(spec);
            }
        }
        Some(v) => {
            return Err(ApiError::invalid(
                "tools",
                format!("expected an array, got {}", request::kind(v)),
            ))
        }
    }
    let choice = match body.get("tool_choice") {
        None => ToolChoice::Auto,
        Some(c) => match c.get("type").and_then(Value::as_str) {
            Some("auto") => ToolChoice::Auto,
            Some("none") => ToolChoice::None,
            Some("any") => ToolChoice::Required,
            Some("tool") => ToolChoice::Named(
                c.get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| ApiError::invalid("tool_choice.name", "expected a string"))?
                    .to_string(),
            ),
            _ => {
                return Err(ApiError::invalid(
                    "tool_choice.type",
                    "expected auto, any, tool or none",
                ))
            }
        },
    };
    request::check_choice(&choice, &list, "tool_choice")?;
    Ok((list, choice))
}

fn stop_reason(s: &Summary) -> &'static str {
    match s.finish {
        "tool_calls" => "tool_use",
        "length" => "max_tokens",
        _ if s.stop_sequence.is_some() => "stop_sequence",
        _ => "end_turn",
    }
}

async fn inner(state: AppState, bytes: Bytes) -> Result<Response, ApiError> {
    let body = request::parse(&bytes)?;
    state.check_model(body.string("model")?)?;
    if body.get("max_tokens").is_none() {
        return Err(ApiError::invalid("max_tokens", "missing"));
    }
    let messages = template_messages(&body)?;
    let (tools, choice) = tools(&body)?;
    let stream = body.boolean("stream")?.unwrap_or(false);
    let id = state.id("msg");
    // Anthropic's default temperature is 1.0 and its stops are
    // `stop_sequences`: read them into the shared fields.
    let mut map = body.map.clone();
    if let Some(s) = map.remove("stop_sequences") {
        map.insert("stop".into(), s);
    }
    let body = Body { map };
    let mut job = job(
        &body,
        id.clone(),
        "messages",
        Prompt::Chat {
            messages,
            tools,
            extra: Map::new(),
        },
        &["max_tokens"],
    )?;
    job.tool_choice = choice;
    job.schema = None;
    let (rx, first) = state.start(job).await?;
    let model = state.model_id.clone();
    if !stream {
        let r = collect(rx, first).await?;
        let mut content = Vec::new();
        if !r.reasoning.is_empty() {
            content.push(json!({"type": "thinking", "thinking": r.reasoning, "signature": ""}));
        }
        if !r.text.is_empty() || r.summary.calls.is_empty() {
            content.push(json!({"type": "text", "text": r.text}));
        }
        for (k, c) in r.summary.calls.iter().enumerate() {
            content.push(json!({"type": "tool_use", "id": c.id.clone().unwrap_or_else(|| call_id(&id, k)).replace("call_", "toolu_"), "name": c.name, "input": c.arguments}));
        }
        return Ok(axum::Json(json!({
            "id": id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop_reason(&r.summary),
            "stop_sequence": r.summary.stop_sequence,
            "usage": {"input_tokens": r.summary.prompt_tokens, "output_tokens": r.summary.completion_tokens},
        }))
        .into_response());
    }
    let start = named(
        "message_start",
        json!({"type": "message_start", "message": {
            "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }}),
    );
    let mut blocks = Blocks::default();
    let mut calls = 0usize;
    let body = outputs(rx, first).flat_map(move |out| {
        let mut ev = Vec::new();
        match out {
            Out::Token { events, .. } => {
                for e in events {
                    match e {
                        Event::Text(t) | Event::ToolRejected { text: t, .. } => {
                            let i = blocks.switch("text", &mut ev);
                            ev.push(named("content_block_delta", json!({"type": "content_block_delta", "index": i, "delta": {"type": "text_delta", "text": t}})));
                        }
                        Event::Reasoning(r) => {
                            let i = blocks.switch("thinking", &mut ev);
                            ev.push(named("content_block_delta", json!({"type": "content_block_delta", "index": i, "delta": {"type": "thinking_delta", "thinking": r}})));
                        }
                        Event::ToolCall(c) => {
                            blocks.close(&mut ev);
                            let i = blocks.count;
                            blocks.count += 1;
                            let tid = c.id.clone().unwrap_or_else(|| call_id(&id, calls)).replace("call_", "toolu_");
                            calls += 1;
                            ev.push(named("content_block_start", json!({"type": "content_block_start", "index": i, "content_block": {"type": "tool_use", "id": tid, "name": c.name, "input": {}}})));
                            ev.push(named("content_block_delta", json!({"type": "content_block_delta", "index": i, "delta": {"type": "input_json_delta", "partial_json": c.arguments.to_string()}})));
                            ev.push(named("content_block_stop", json!({"type": "content_block_stop", "index": i})));
                        }
                        _ => {}
                    }
                }
            }
            Out::Done(s) => {
                if blocks.count == 0 {
                    blocks.switch("text", &mut ev);
                }
                blocks.close(&mut ev);
                ev.push(named("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": stop_reason(&s), "stop_sequence": s.stop_sequence}, "usage": {"input_tokens": s.prompt_tokens, "output_tokens": s.completion_tokens}})));
                ev.push(named("message_stop", json!({"type": "message_stop"})));
            }
            Out::Failed(e) => {
                ev.push(named("error", e.for_api(Api::Anthropic).body()));
            }
        }
        stream::iter(ev)
    });
    Ok(sse(stream::once(async move { start }).chain(body)))
}

/// Content blocks of a streamed message: how many were started and the
/// open one (index, `text` or `thinking`).
#[derive(Debug, Default)]
struct Blocks {
    count: usize,
    open: Option<(usize, &'static str)>,
}

impl Blocks {
    /// The open block of `kind`, closing another kind's and starting one
    /// when needed; returns its index.
    fn switch(&mut self, kind: &'static str, ev: &mut Vec<SseEvent>) -> usize {
        if let Some((i, k)) = self.open {
            if k == kind {
                return i;
            }
        }
        self.close(ev);
        let i = self.count;
        self.count += 1;
        let block = if kind == "text" {
            json!({"type": "text", "text": ""})
        } else {
            json!({"type": "thinking", "thinking": "", "signature": ""})
        };
        ev.push(named(
            "content_block_start",
            json!({"type": "content_block_start", "index": i, "content_block": block}),
        ));
        self.open = Some((i, kind));
        i
    }

    fn close(&mut self, ev: &mut Vec<SseEvent>) {
        if let Some((i, _)) = self.open.take() {
            ev.push(named(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": i}),
            ));
        }
    }
}
