//! Request bodies read field by field: every known field is checked for
//! its type and range, and an error names the field (`messages[2].role`).
//! Unknown fields are ignored, as OpenAI-compatible servers commonly do.
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::error::ApiError;
use lmspec_lm::constrain::Node;
use lmspec_lm::sampling::{ProcessorParams, SamplingParams};

/// A JSON object body and the request it came with.
#[derive(Debug)]
pub struct Body {
    pub map: Map<String, Value>,
}

/// Parses a request body; malformed JSON and non-objects are 400s.
pub fn parse(bytes: &[u8]) -> Result<Body, ApiError> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    match v {
        Value::Object(map) => Ok(Body { map }),
        other => Err(ApiError::bad_request(format!(
            "the request body must be a JSON object, not {}",
            kind(&other)
        ))),
    }
}

/// The JSON type of a value, for messages.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong(field: &str, want: &str, got: &Value) -> ApiError {
    ApiError::invalid(field, format!("expected {want}, got {}", kind(got)))
}

impl Body {
    /// A present, non-null field.
    pub fn get(&self, field: &str) -> Option<&Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    pub fn string(&self, field: &str) -> Result<Option<&str>, ApiError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(wrong(field, "a string", v)),
        }
    }

    pub fn boolean(&self, field: &str) -> Result<Option<bool>, ApiError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(wrong(field, "a boolean", v)),
        }
    }

    /// A number within `lo..=hi`.
    pub fn number(&self, field: &str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                let x = n.as_f64().unwrap_or(f64::NAN);
                if x.is_finite() && (lo..=hi).contains(&x) {
                    Ok(Some(x))
                } else {
                    Err(ApiError::invalid(
                        field,
                        format!("{n} is not between {lo} and {hi}"),
                    ))
                }
            }
            Some(v) => Err(wrong(field, "a number", v)),
        }
    }

    /// An integer within `lo..=hi`.
    pub fn integer(&self, field: &str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_i64() {
                Some(x) if (lo..=hi).contains(&x) => Ok(Some(x)),
                Some(_) => Err(ApiError::invalid(
                    field,
                    format!("{n} is not between {lo} and {hi}"),
                )),
                None => Err(ApiError::invalid(field, format!("{n} is not an integer"))),
            },
            Some(v) => Err(wrong(field, "an integer", v)),
        }
    }

    /// `stream_options.include_usage` (a last chunk with usage).
    pub fn include_usage(&self) -> Result<bool, ApiError> {
        match self.get("stream_options") {
            None => Ok(false),
            Some(Value::Object(o)) => Ok(o
                .get("include_usage")
                .and_then(Value::as_bool)
                .unwrap_or(false)),
            Some(v) => Err(wrong("stream_options", "an object", v)),
        }
    }

    /// A field that must be a non-empty array.
    pub fn nonempty_array(&self, field: &str) -> Result<&Vec<Value>, ApiError> {
        match self.get(field) {
            Some(Value::Array(items)) if !items.is_empty() => Ok(items),
            Some(Value::Array(_)) => Err(ApiError::invalid(field, "must not be empty")),
            Some(v) => Err(wrong(field, "an array", v)),
            None => Err(ApiError::invalid(field, "missing")),
        }
    }

    /// `stop`: a string or up to 4 strings (OpenAI); `stop_sequences`: a
    /// list (Anthropic).
    pub fn stops(&self, field: &str) -> Result<Vec<String>, ApiError> {
        let list = match self.get(field) {
            None => return Ok(Vec::new()),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s.clone()),
                    v => Err(wrong(&format!("{field}[{i}]"), "a string", v)),
                })
                .collect::<Result<_, _>>()?,
            Some(v) => return Err(wrong(field, "a string or an array of strings", v)),
        };
        if list.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                field,
                "a stop sequence must not be empty",
            ));
        }
        if list.len() > 16 {
            return Err(ApiError::invalid(field, "at most 16 stop sequences"));
        }
        Ok(list)
    }

    /// `max_tokens` / `max_completion_tokens` (the first present).
    pub fn max_tokens(&self, fields: &[&str]) -> Result<Option<usize>, ApiError> {
        for f in fields {
            if let Some(n) = self.integer(f, 1, i64::from(u32::MAX))? {
                return Ok(Some(n as usize));
            }
        }
        Ok(None)
    }

    /// Sampling and penalty fields (OpenAI's plus mlx-lm's extensions).
    pub fn sampling(&self) -> Result<(SamplingParams, ProcessorParams), ApiError> {
        let mut s = SamplingParams::default();
        if let Some(t) = self.number("temperature", 0.0, 2.0)? {
            s.temperature = t as f32;
        } else {
            // OpenAI's default temperature.
            s.temperature = 1.0;
        }
        if let Some(p) = self.number("top_p", 0.0, 1.0)? {
            s.top_p = p as f32;
        }
        if let Some(k) = self.integer("top_k", 0, i64::from(u32::MAX))? {
            s.top_k = k as usize;
        }
        if let Some(m) = self.number("min_p", 0.0, 1.0)? {
            s.min_p = m as f32;
        }
        if let Some(seed) = self.integer("seed", i64::MIN, i64::MAX)? {
            s.seed = Some(seed as u64);
        }
        let mut p = ProcessorParams::default();
        if let Some(r) = self.number("repetition_penalty", 1e-6, 100.0)? {
            p.repetition_penalty = Some(r as f32);
        }
        if let Some(n) = self.integer("repetition_context_size", 1, 1 << 20)? {
            p.repetition_context = n as usize;
        }
        if let Some(x) = self.number("presence_penalty", -2.0, 2.0)? {
            p.presence_penalty = Some(x as f32);
        }
        if let Some(x) = self.number("frequency_penalty", -2.0, 2.0)? {
            p.frequency_penalty = Some(x as f32);
        }
        if let Some(bias) = self.get("logit_bias") {
            let Value::Object(m) = bias else {
                return Err(wrong(
                    "logit_bias",
                    "an object of token ids to numbers",
                    bias,
                ));
            };
            for (k, v) in m {
                let field = format!("logit_bias.{k}");
                let id: u32 = k
                    .parse()
                    .map_err(|_| ApiError::invalid(&field, "the key must be a token id"))?;
                let b = v
                    .as_f64()
                    .filter(|b| (-100.0..=100.0).contains(b))
                    .ok_or_else(|| {
                        ApiError::invalid(&field, "must be a number between -100 and 100")
                    })?;
                p.logit_bias.push((id, b as f32));
            }
        }
        Ok((s, p))
    }
}

/// A JSON schema the output must follow (`response_format`).
pub fn response_format(body: &Body) -> Result<Option<Arc<Node>>, ApiError> {
    let Some(rf) = body.get("response_format") else {
        return Ok(None);
    };
    let Value::Object(rf) = rf else {
        return Err(wrong("response_format", "an object", rf));
    };
    let compile = |schema: &Value, at: &str| {
        Node::compile(schema, at)
            .map_err(|e| ApiError::invalid(at, strip_prefix(&e.to_string(), at)))
    };
    match rf.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => {
            compile(&serde_json::json!({"type": "object"}), "response_format").map(Some)
        }
        Some("json_schema") => {
            let schema = rf
                .get("json_schema")
                .and_then(|j| j.get("schema"))
                .ok_or_else(|| {
                    ApiError::invalid("response_format.json_schema.schema", "missing")
                })?;
            compile(schema, "response_format.json_schema.schema").map(Some)
        }
        Some(other) => Err(ApiError::invalid(
            "response_format.type",
            format!("'{other}' is not one of text, json_object, json_schema"),
        )),
        None => Err(ApiError::invalid("response_format.type", "missing")),
    }
}

/// An error message without its leading `at: ` (the API error adds the
/// field itself).
fn strip_prefix(msg: &str, at: &str) -> String {
    msg.strip_prefix("usage: ")
        .unwrap_or(msg)
        .strip_prefix(&format!("{at}: "))
        .unwrap_or(msg)
        .to_string()
}

/// Text of a message `content`: a string, or text parts.
pub fn content_text(v: Option<&Value>, field: &str) -> Result<String, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for (i, p) in parts.iter().enumerate() {
                let at = format!("{field}[{i}]");
                match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => out.push_str(t),
                    (Some("text"), _) => {
                        return Err(ApiError::invalid(
                            &format!("{at}.text"),
                            "expected a string",
                        ))
                    }
                    (Some(t), _) => {
                        return Err(ApiError::invalid(
                            &format!("{at}.type"),
                            format!("content parts of type '{t}' are not supported by this model"),
                        ))
                    }
                    (None, _) => return Err(ApiError::invalid(&format!("{at}.type"), "missing")),
                }
            }
            Ok(out)
        }
        Some(v) => Err(wrong(field, "a string or an array of content parts", v)),
    }
}

/// Which tool the model must call.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    Auto,
    None,
    /// Some tool.
    Required,
    Named(String),
}

/// OpenAI `tools` (function specs) as the template and the output reader
/// take them, checked.
pub fn openai_tools(body: &Body) -> Result<Vec<Value>, ApiError> {
    let Some(tools) = body.get("tools") else {
        return Ok(Vec::new());
    };
    let Value::Array(list) = tools else {
        return Err(wrong("tools", "an array", tools));
    };
    let mut out: Vec<Value> = Vec::new();
    for (i, t) in list.iter().enumerate() {
        let at = format!("tools[{i}]");
        let tool = lmspec_lm::Tool::from_openai_json(t, |_| Ok(Value::Null))
            .map_err(|e| ApiError::invalid(&at, e))?;
        if out
            .iter()
            .any(|o| o["function"]["name"] == tool.name.as_str())
        {
            return Err(ApiError::invalid(
                &at,
                format!("the name '{}' is offered twice", tool.name),
            ));
        }
        out.push(tool.spec());
    }
    Ok(out)
}

pub fn openai_tool_choice(body: &Body, tools: &[Value]) -> Result<ToolChoice, ApiError> {
    let choice = match body.get("tool_choice") {
        None => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            other => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!("'{other}' is not auto, none, required or a function"),
                ))
            }
        },
        Some(v) => match v
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
        {
            Some(name) => ToolChoice::Named(name.to_string()),
            None => return Err(ApiError::invalid("tool_choice.function.name", "missing")),
        },
    };
    check_choice(&choice, tools, "tool_choice")?;
    Ok(choice)
}

/// A forced tool must be among the tools offered.
pub fn check_choice(choice: &ToolChoice, tools: &[Value], field: &str) -> Result<(), ApiError> {
    match choice {
        ToolChoice::Required if tools.is_empty() => Err(ApiError::invalid(
            field,
            "a tool call is required but no tools are offered",
        )),
        ToolChoice::Named(n) if !tools.iter().any(|t| t["function"]["name"] == n.as_str()) => Err(
            ApiError::invalid(field, format!("no tool named '{n}' is offered")),
        ),
        _ => Ok(()),
    }
}
