//! Tool calls as data: a format file (`specs/tool-formats/*.yaml`) names the
//! start and end markers of a call and the payload syntax between them; one
//! streaming parser turns generated text into ordered events (text, calls,
//! rejected calls), whatever the chunking.
mod payload;
pub mod reasoning;
pub mod response;
pub mod schema;

use std::path::Path;

use serde::Deserialize;

use lmspec_engine::error::{read_to_string, Error, Result};
use lmspec_spec::library::SpecRoot;

/// A tool-call format, as written in a format file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolFormat {
    pub spec_version: u32,
    pub name: String,
    /// Text that opens a call.
    pub start: String,
    /// Text that closes a call; absent: the call runs to the end of output.
    #[serde(default)]
    pub end: Option<String>,
    /// Payload syntax (see [`payload::KINDS`]).
    pub payload: String,
    /// Payload options (e.g. the string escape of `call_braces` payloads).
    #[serde(default)]
    pub options: serde_json::Map<String, serde_json::Value>,
    /// Marker texts removed from the output (section wrappers).
    #[serde(default)]
    pub drop: Vec<String>,
    /// Texts whose presence in a chat template selects this format.
    #[serde(default)]
    pub template_markers: Vec<String>,
    /// A JSON payload may also stand alone, without the start marker, at
    /// the start of the output: a whole JSON object (or list) that reads as
    /// calls is taken as calls, anything else stays text. Consecutive inline
    /// calls may be separated by `;`.
    #[serde(default)]
    pub inline: bool,
}

/// What to take out of generated text besides the answer: reasoning
/// blocks between two markers and tool calls in a format. The default
/// takes nothing out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutputFormat {
    /// Open and close markers of reasoning (`<think>`, `</think>`).
    pub reasoning: Option<(String, String)>,
    pub tools: Option<ToolFormat>,
    /// Declared tools with their JSON-schema parameters (empty: any name).
    pub schemas: Vec<(String, serde_json::Value)>,
}

impl OutputFormat {
    /// `<think>` ... `</think>` reasoning and, when given, tool calls.
    pub fn think(tools: Option<(&ToolFormat, Vec<(String, serde_json::Value)>)>) -> OutputFormat {
        let (tools, schemas) = match tools {
            Some((f, s)) => (Some(f.clone()), s),
            None => (None, Vec::new()),
        };
        OutputFormat {
            reasoning: Some(("<think>".into(), "</think>".into())),
            tools,
            schemas,
        }
    }
}

/// One parsed call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: serde_json::Value,
    pub id: Option<String>,
}

/// Why a call was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    Malformed,
    Incomplete,
    UndeclaredTool,
    /// The arguments do not fit the tool's JSON schema.
    InvalidArguments,
}

/// What the parser emits, in output order.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolEvent {
    Text(String),
    Call(ToolCall),
    Rejected {
        reason: RejectReason,
        text: String,
        detail: String,
    },
}

impl ToolFormat {
    pub fn load(path: &Path) -> Result<ToolFormat> {
        ToolFormat::parse(&read_to_string(path)?, path)
    }

    /// Every format of a spec library root (`tool-formats/`), by file order.
    pub fn load_all(root: &SpecRoot) -> Result<Vec<ToolFormat>> {
        let mut out = Vec::new();
        for path in root.files("tool-formats")? {
            out.push(ToolFormat::parse(&root.read(&path)?, &path)?);
        }
        Ok(out)
    }

    /// A format from its YAML text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<ToolFormat> {
        let f: ToolFormat = lmspec_spec::library::parse_yaml(text, path)?;
        if !payload::KINDS.contains(&f.payload.as_str()) {
            return Err(Error::spec(
                path,
                "<document>",
                "payload",
                format!(
                    "unknown payload '{}' (known: {})",
                    f.payload,
                    payload::KINDS.join(", ")
                ),
            ));
        }
        if f.inline && f.payload != "json" {
            return Err(Error::spec(
                path,
                "<document>",
                "inline",
                format!("inline calls need the json payload, not '{}'", f.payload),
            ));
        }
        if f.start.is_empty() {
            return Err(Error::spec(
                path,
                "<document>",
                "start",
                "must not be empty",
            ));
        }
        Ok(f)
    }

    /// Picks the format in this order: `explicit`; the checkpoint's
    /// declared format (its `response_template`); the tokenizer config's
    /// `tool_parser_type`; the chat template's markers; the spec's default;
    /// `json`.
    pub fn resolve<'a>(
        formats: &'a [ToolFormat],
        explicit: Option<&str>,
        declared: Option<&'a ToolFormat>,
        tool_parser_type: Option<&str>,
        template: Option<&str>,
        spec_default: Option<&str>,
    ) -> Option<&'a ToolFormat> {
        let by_name = |n: &str| formats.iter().find(|f| f.name == n);
        explicit
            .and_then(by_name)
            .or(declared)
            .or_else(|| tool_parser_type.and_then(by_name))
            .or_else(|| template.and_then(|t| ToolFormat::infer(formats, t)))
            .or_else(|| spec_default.and_then(by_name))
            .or_else(|| by_name("json"))
    }

    /// The format a chat template implies: the first whose markers all occur.
    pub fn infer<'a>(formats: &'a [ToolFormat], template: &str) -> Option<&'a ToolFormat> {
        let mut best: Option<&ToolFormat> = None;
        for f in formats {
            let hits = !f.template_markers.is_empty()
                && f.template_markers
                    .iter()
                    .all(|m| template.contains(m.as_str()));
            let specific = best.is_none_or(|b| f.template_markers.len() > b.template_markers.len());
            if hits && specific {
                best = Some(f);
            }
        }
        best
    }
}

#[derive(Debug, PartialEq)]
enum State {
    Text,
    Call,
}

/// The streaming parser: feed chunks, then `finish` at the end of output.
#[derive(Debug)]
pub struct ToolParser<'a> {
    format: &'a ToolFormat,
    /// Declared tool names; empty accepts any.
    tools: Vec<String>,
    /// JSON-schema `parameters` by tool name, for typing arguments.
    schemas: Vec<(String, serde_json::Value)>,
    state: State,
    buf: String,
    /// Nothing but whitespace and inline calls came out yet: an inline
    /// call may still start (formats with `inline`).
    inline_ok: bool,
}

/// Length of the longest suffix of `s` that is a proper prefix of `marker`.
pub(crate) fn partial_suffix(s: &str, marker: &str) -> usize {
    (1..marker.len().min(s.len() + 1))
        .rev()
        .find(|k| marker.is_char_boundary(*k) && s.ends_with(&marker[..*k]))
        .unwrap_or(0)
}

impl<'a> ToolParser<'a> {
    pub fn new(format: &'a ToolFormat, tools: &[String]) -> ToolParser<'a> {
        ToolParser {
            format,
            tools: tools.to_vec(),
            schemas: Vec::new(),
            state: State::Text,
            buf: String::new(),
            inline_ok: format.inline,
        }
    }

    /// Declares tools with their JSON-schema parameters: string arguments
    /// are typed by the schema and calls missing required ones rejected.
    pub fn with_schemas(mut self, schemas: &[(String, serde_json::Value)]) -> ToolParser<'a> {
        self.tools = schemas.iter().map(|(n, _)| n.clone()).collect();
        self.schemas = schemas.to_vec();
        self
    }

    fn strip_drops(&self, s: &str) -> String {
        let mut out = s.to_string();
        for d in &self.format.drop {
            out = out.replace(d.as_str(), "");
        }
        out
    }

    fn emit_text(&self, text: &str, out: &mut Vec<ToolEvent>) {
        let text = self.strip_drops(text);
        if text.is_empty() {
            return;
        }
        match out.last_mut() {
            Some(ToolEvent::Text(t)) => t.push_str(&text),
            _ => out.push(ToolEvent::Text(text)),
        }
    }

    fn emit_call(&self, body: &str, out: &mut Vec<ToolEvent>) {
        let raw = format!(
            "{}{}{}",
            self.format.start,
            body,
            self.format.end.as_deref().unwrap_or("")
        );
        self.emit_calls(payload::parse(self.format, body), raw, out);
    }

    fn emit_calls(
        &self,
        parsed: std::result::Result<Vec<ToolCall>, String>,
        raw: String,
        out: &mut Vec<ToolEvent>,
    ) {
        match parsed {
            Ok(calls) if calls.is_empty() => out.push(ToolEvent::Rejected {
                reason: RejectReason::Malformed,
                text: raw,
                detail: "no call in the payload".into(),
            }),
            Ok(calls) => {
                for mut c in calls {
                    if !self.tools.is_empty() && !self.tools.contains(&c.name) {
                        out.push(ToolEvent::Rejected {
                            reason: RejectReason::UndeclaredTool,
                            text: raw.clone(),
                            detail: format!("tool '{}' is not declared", c.name),
                        });
                        continue;
                    }
                    let schema = self
                        .schemas
                        .iter()
                        .find(|(n, _)| *n == c.name)
                        .map(|(_, s)| s);
                    match schema.map(|s| type_arguments(&mut c.arguments, s)) {
                        Some(Err(detail)) => out.push(ToolEvent::Rejected {
                            reason: RejectReason::InvalidArguments,
                            text: raw.clone(),
                            detail,
                        }),
                        _ => out.push(ToolEvent::Call(c)),
                    }
                }
            }
            Err(detail) => out.push(ToolEvent::Rejected {
                reason: RejectReason::Malformed,
                text: raw,
                detail,
            }),
        }
    }

    /// Feeds a chunk of generated text.
    pub fn push(&mut self, chunk: &str) -> Vec<ToolEvent> {
        self.buf.push_str(chunk);
        let mut out = Vec::new();
        loop {
            match self.state {
                State::Text => {
                    if self.inline_ok {
                        match self.inline_call(&mut out) {
                            Inline::Wait => return out,
                            Inline::Took => continue,
                            Inline::NotACall => self.inline_ok = false,
                        }
                    }
                    let start = self.format.start.as_str();
                    if let Some(pos) = self.buf.find(start) {
                        let before = self.buf[..pos].to_string();
                        self.emit_text(&before, &mut out);
                        self.buf.drain(..pos + start.len());
                        self.state = State::Call;
                        continue;
                    }
                    let mut keep = partial_suffix(&self.buf, start);
                    for d in &self.format.drop {
                        keep = keep.max(partial_suffix(&self.buf, d));
                    }
                    let cut = self.buf.len() - keep;
                    let text = self.buf[..cut].to_string();
                    self.emit_text(&text, &mut out);
                    self.buf.drain(..cut);
                    return out;
                }
                State::Call => {
                    let Some(end) = self.format.end.as_deref() else {
                        return out;
                    };
                    match self.buf.find(end) {
                        Some(pos) => {
                            let body = self.buf[..pos].to_string();
                            self.emit_call(&body, &mut out);
                            self.buf.drain(..pos + end.len());
                            self.state = State::Text;
                        }
                        None => return out,
                    }
                }
            }
        }
    }

    /// At the start of the output: takes one inline call off the buffer,
    /// or says that more text is needed to decide, or that none starts here.
    fn inline_call(&mut self, out: &mut Vec<ToolEvent>) -> Inline {
        let lead = self.buf.len()
            - self
                .buf
                .trim_start_matches([' ', '\t', '\r', '\n', ';'])
                .len();
        let rest = &self.buf[lead..];
        if rest.is_empty() {
            return Inline::Wait;
        }
        if !rest.starts_with(['{', '[']) {
            return Inline::NotACall;
        }
        let Some(end) = json_value_end(rest) else {
            return Inline::Wait;
        };
        let shaped = serde_json::from_str(&rest[..end]).is_ok_and(|v| inline_shaped(&v));
        let calls = match payload::parse(self.format, &rest[..end]) {
            Ok(calls) if shaped && !calls.is_empty() => calls,
            _ => return Inline::NotACall,
        };
        let raw = rest[..end].to_string();
        let before: String = self.buf[..lead].chars().filter(|c| *c != ';').collect();
        self.emit_text(&before, out);
        self.buf.drain(..lead + end);
        self.emit_calls(Ok(calls), raw, out);
        Inline::Took
    }

    /// Ends the output: a call without its end marker is parsed when the
    /// format ends at the end of output, else rejected as incomplete.
    pub fn finish(&mut self) -> Vec<ToolEvent> {
        let mut out = Vec::new();
        let rest = std::mem::take(&mut self.buf);
        match self.state {
            State::Text => self.emit_text(&rest, &mut out),
            State::Call if self.format.end.is_none() => self.emit_call(&rest, &mut out),
            State::Call => out.push(ToolEvent::Rejected {
                reason: RejectReason::Incomplete,
                text: format!("{}{rest}", self.format.start),
                detail: "the output ended inside a call".into(),
            }),
        }
        self.state = State::Text;
        out
    }
}

/// What [`ToolParser::inline_call`] found.
enum Inline {
    Wait,
    Took,
    NotACall,
}

/// Whether a JSON value reads as calls rather than as an answer that
/// happens to be JSON: objects with a `name` and `parameters` or
/// `arguments` (or a `function` holding those), alone or in a list.
fn inline_shaped(v: &serde_json::Value) -> bool {
    let call = |o: &serde_json::Value| {
        let f = o.get("function").unwrap_or(o);
        f.get("name").is_some_and(|n| n.is_string())
            && (f.get("parameters").is_some() || f.get("arguments").is_some())
    };
    match v {
        serde_json::Value::Array(items) => !items.is_empty() && items.iter().all(call),
        o => call(o),
    }
}

/// The length of the JSON object or array `s` starts with, once its closing
/// bracket is there (brackets inside strings do not count).
fn json_value_end(s: &str) -> Option<usize> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, c) in s.char_indices() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' | '[' => depth += 1,
            '}' | ']' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
    }
    None
}

/// Types argument values by a JSON schema's `properties` (formats that
/// carry every value as text give `"3"` for an integer, `3` for a string
/// that looks numeric) and checks `required`.
pub fn type_arguments(
    args: &mut serde_json::Value,
    schema: &serde_json::Value,
) -> std::result::Result<(), String> {
    use serde_json::Value;
    let Some(obj) = args.as_object_mut() else {
        return Err("arguments must be an object".into());
    };
    if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
        for (key, prop) in props {
            let Some(v) = obj.get_mut(key) else { continue };
            let ty = prop.get("type").and_then(|t| t.as_str()).unwrap_or("");
            let typed = match (ty, &*v) {
                ("string", Value::String(_)) => None,
                ("string", other) => Some(Value::String(match other {
                    Value::Number(n) => n.to_string(),
                    o => o.to_string(),
                })),
                ("integer" | "number" | "boolean" | "object" | "array", Value::String(s)) => {
                    let parsed: Value = serde_json::from_str(s.trim())
                        .map_err(|_| format!("argument '{key}' = {s:?} is not a {ty}"))?;
                    Some(parsed)
                }
                _ => None,
            };
            if let Some(t) = typed {
                *v = t;
            }
        }
    }
    if let Some(required) = schema.get("required").and_then(|r| r.as_array()) {
        for r in required.iter().filter_map(|r| r.as_str()) {
            if !obj.contains_key(r) {
                return Err(format!("required argument '{r}' is missing"));
            }
        }
    }
    Ok(())
}

/// Parses a whole output at once.
pub fn parse_all(format: &ToolFormat, tools: &[String], text: &str) -> Vec<ToolEvent> {
    let mut p = ToolParser::new(format, tools);
    let mut events = p.push(text);
    events.extend(p.finish());
    merge_text(events)
}

/// Joins adjacent text events (chunking splits text arbitrarily).
pub fn merge_text(events: Vec<ToolEvent>) -> Vec<ToolEvent> {
    let mut out: Vec<ToolEvent> = Vec::new();
    for e in events {
        match (out.last_mut(), e) {
            (Some(ToolEvent::Text(a)), ToolEvent::Text(b)) => a.push_str(&b),
            (_, e) => out.push(e),
        }
    }
    out
}
