//! Hugging Face's declarative `response_template` (a `tokenizer_config.json`
//! key) read as a tool-call format and reasoning markers. Its fields name
//! output keys: `tool_calls` (JSON content between two delimiters) and
//! `thinking` / `reasoning_content` (text between two delimiters). The
//! delimiters read are literals, or regex patterns that spell a literal,
//! optionally followed by `\s*`; anything else is reported as unsupported.
use std::path::Path;

use serde_json::Value;

use super::ToolFormat;
use lmspec_engine::error::{Error, Result};

/// What a `response_template` declares.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseTemplate {
    pub tools: Option<ToolFormat>,
    /// Open and close markers of reasoning.
    pub reasoning: Option<(String, String)>,
}

/// Output keys that hold reasoning.
const REASONING_FIELDS: &[&str] = &["thinking", "reasoning_content", "reasoning"];

impl ResponseTemplate {
    /// Reads a `response_template` value; `file` is where it came from.
    pub fn from_json(template: &Value, file: &Path) -> Result<ResponseTemplate> {
        let err = |node: &str, field: &str, msg: String| {
            Error::spec(file, format!("response_template{node}"), field, msg)
        };
        let fields = template
            .get("fields")
            .and_then(Value::as_object)
            .ok_or_else(|| err("", "fields", "missing or not an object".into()))?;
        let mut out = ResponseTemplate {
            tools: None,
            reasoning: None,
        };
        for (name, field) in fields {
            let node = format!(".fields.{name}");
            let delimiter = |key: &str| -> Result<Option<String>> {
                delimiter(field, key).map_err(|msg| err(&node, key, msg))
            };
            if name == "tool_calls" {
                let content = field
                    .get("content")
                    .and_then(Value::as_str)
                    .unwrap_or("text");
                if content != "json" {
                    return Err(err(
                        &node,
                        "content",
                        format!("'{content}' tool calls are not read (only json)"),
                    ));
                }
                if let Some(t) = field.get("transform") {
                    if !plain_call_transform(t) || field.get("transform_each").is_some() {
                        return Err(err(
                            &node,
                            "transform",
                            format!("{t} is not read: only {{\"type\": \"function\", \"function\": \"{{content}}\"}}"),
                        ));
                    }
                }
                let start = delimiter("open")?.ok_or_else(|| {
                    err(
                        &node,
                        "open",
                        "a tool call needs an opening delimiter".into(),
                    )
                })?;
                out.tools = Some(ToolFormat {
                    spec_version: 1,
                    name: "response_template".into(),
                    start,
                    end: delimiter("close")?,
                    payload: "json".into(),
                    options: Default::default(),
                    drop: Vec::new(),
                    template_markers: Vec::new(),
                    inline: false,
                });
            } else if REASONING_FIELDS.contains(&name.as_str()) {
                let open = delimiter("open")?;
                let close = delimiter("close")?;
                if let (Some(open), Some(close)) = (open, close) {
                    out.reasoning = Some((open, close));
                }
            }
        }
        Ok(out)
    }
}

/// `{"type": "function", "function": "{content}"}`: the content is the call.
fn plain_call_transform(t: &Value) -> bool {
    t.get("function").and_then(Value::as_str) == Some("{content}")
}

/// A field's `key` delimiter (`open` or `close`) as literal text: from
/// `key` (a string, or a list of one) or `key_pattern`.
fn delimiter(field: &Value, key: &str) -> std::result::Result<Option<String>, String> {
    match field.get(key) {
        Some(Value::String(s)) if !s.is_empty() => return Ok(Some(s.clone())),
        Some(Value::Array(list)) if list.len() == 1 => {
            if let Some(s) = list[0].as_str().filter(|s| !s.is_empty()) {
                return Ok(Some(s.to_string()));
            }
        }
        Some(other) => {
            return Err(format!(
                "{other} is not read: one non-empty literal is expected"
            ))
        }
        None => {}
    }
    let pattern_key = format!("{key}_pattern");
    match field.get(&pattern_key) {
        None => Ok(None),
        Some(Value::String(p)) => pattern_literal(p).map(Some).ok_or_else(|| {
            format!(
                "{pattern_key} {p:?} is not read: only a literal, optionally followed by \\s*, is"
            )
        }),
        Some(other) => Err(format!("{pattern_key}: {other} is not a string")),
    }
}

/// The literal a regex spells: escaped metacharacters become themselves, a
/// trailing `\s*` is dropped; any other regex syntax gives `None`.
fn pattern_literal(p: &str) -> Option<String> {
    let p = p.strip_suffix("\\s*").unwrap_or(p);
    let mut out = String::new();
    let mut chars = p.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                let e = chars.next()?;
                match e {
                    'n' => out.push('\n'),
                    't' => out.push('\t'),
                    e if e.is_ascii_alphanumeric() => return None,
                    e => out.push(e),
                }
            }
            '.' | '^' | '$' | '*' | '+' | '?' | '(' | ')' | '[' | ']' | '{' | '}' | '|' => {
                return None
            }
            c => out.push(c),
        }
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn literal_patterns_are_read_and_other_regexes_refused() {
        assert_eq!(pattern_literal("</think>\\s*").as_deref(), Some("</think>"));
        assert_eq!(
            pattern_literal("<\\|im_end\\|>\\s*").as_deref(),
            Some("<|im_end|>")
        );
        assert_eq!(pattern_literal("a\\nb").as_deref(), Some("a\nb"));
        assert_eq!(
            pattern_literal("<tool_call>\\s*<function=(?P<name>\\w+)>"),
            None
        );
        assert_eq!(pattern_literal("\\w+"), None);
        assert_eq!(pattern_literal("x|y"), None);
    }

    #[test]
    fn a_hermes_template_gives_the_format_and_reasoning_markers() {
        let t = json!({"defaults": {"role": "assistant"},
            "start_anchor": "<|im_start|>assistant\n",
            "fields": {
                "reasoning_content": {"open": "<think>", "close_pattern": "</think>\\s*", "content": "text"},
                "tool_calls": {"open": "<tool_call>", "close_pattern": "</tool_call>\\s*", "repeats": true,
                    "content": "json", "transform": {"type": "function", "function": "{content}"}},
                "content": {"close_pattern": "<\\|im_end\\|>\\s*", "content": "text"}}});
        let r = ResponseTemplate::from_json(&t, Path::new("tokenizer_config.json")).expect("reads");
        let f = r.tools.expect("tool format");
        assert_eq!(
            (f.start.as_str(), f.end.as_deref()),
            ("<tool_call>", Some("</tool_call>"))
        );
        assert_eq!(r.reasoning, Some(("<think>".into(), "</think>".into())));
    }

    #[test]
    fn unsupported_templates_name_the_field() {
        let t = json!({"fields": {"tool_calls": {
            "open_pattern": "<tool_call>\\s*<function=(?P<name>\\w+)>", "close": "</tool_call>",
            "content": "json", "transform": {"type": "function", "function": "{content}"}}}});
        let e =
            ResponseTemplate::from_json(&t, Path::new("dir/tokenizer_config.json")).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with(
                "dir/tokenizer_config.json: response_template.fields.tool_calls: open:"
            ),
            "{msg}"
        );
        let t = json!({"fields": {"tool_calls": {"open": "<a>", "content": "xml-inline"}}});
        let e = ResponseTemplate::from_json(&t, Path::new("c.json")).unwrap_err();
        assert!(e.to_string().contains("content: 'xml-inline'"), "{e}");
        let e =
            ResponseTemplate::from_json(&json!({"version": 1}), Path::new("c.json")).unwrap_err();
        assert!(
            e.to_string().contains("response_template: fields: missing"),
            "{e}"
        );
    }
}
