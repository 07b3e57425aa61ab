//! Payload syntaxes between a format's markers. A new format reuses one of
//! these; a new syntax is a new function here.
use serde_json::{Map, Value};

use super::{ToolCall, ToolFormat};

/// Known payload kinds.
pub const KINDS: &[&str] = &[
    "json",
    "xml_function",
    "pythonic",
    "key_value_tags",
    "call_braces",
    "indexed_name",
    "invoke_xml",
    "args_marker",
];

pub fn parse(format: &ToolFormat, body: &str) -> Result<Vec<ToolCall>, String> {
    match format.payload.as_str() {
        "json" => json_calls(body),
        "xml_function" => xml_function(body),
        "pythonic" => pythonic(body),
        "key_value_tags" => key_value_tags(body),
        "call_braces" => {
            let esc = format
                .options
                .get("escape")
                .and_then(|e| e.as_str())
                .unwrap_or("\"");
            call_braces(body, esc)
        }
        "indexed_name" => indexed_name(body),
        "invoke_xml" => invoke_xml(body),
        "args_marker" => args_marker(body),
        other => Err(format!("unknown payload '{other}'")),
    }
}

/// A call from a JSON object: `{"name", "arguments"|"parameters"}`, also
/// wrapped as `{"function": {...}}`, arguments possibly a JSON string.
fn call_from_object(v: &Value) -> Result<ToolCall, String> {
    let obj = v.as_object().ok_or("a call must be a JSON object")?;
    let inner = obj
        .get("function")
        .and_then(|f| f.as_object())
        .unwrap_or(obj);
    let name = inner
        .get("name")
        .and_then(|n| n.as_str())
        .ok_or("missing \"name\"")?
        .to_string();
    let args = inner
        .get("arguments")
        .or_else(|| inner.get("parameters"))
        .cloned()
        .unwrap_or(Value::Object(Map::new()));
    let arguments = match args {
        Value::String(s) => {
            serde_json::from_str(&s).map_err(|e| format!("arguments string is not JSON: {e}"))?
        }
        other => other,
    };
    Ok(ToolCall {
        name,
        arguments,
        id: obj.get("id").and_then(|i| i.as_str()).map(str::to_string),
    })
}

fn json_calls(body: &str) -> Result<Vec<ToolCall>, String> {
    let v: Value = serde_json::from_str(body.trim()).map_err(|e| format!("invalid JSON: {e}"))?;
    match &v {
        Value::Array(items) => items.iter().map(call_from_object).collect(),
        _ => Ok(vec![call_from_object(&v)?]),
    }
}

/// A value as written between tags: JSON when it parses, else the text.
fn loose_value(text: &str) -> Value {
    let t = text.trim_matches('\n');
    serde_json::from_str(t.trim()).unwrap_or_else(|_| Value::String(t.to_string()))
}

/// Text between `open` and the next `close`, and what follows.
fn between<'s>(s: &'s str, open: &str, close: &str) -> Option<(&'s str, &'s str)> {
    let a = s.find(open)? + open.len();
    let b = s[a..].find(close)? + a;
    Some((&s[a..b], &s[b + close.len()..]))
}

fn xml_function(body: &str) -> Result<Vec<ToolCall>, String> {
    let mut calls = Vec::new();
    let mut rest = body;
    while let Some((name, after)) = between(rest, "<function=", ">") {
        let (inner, after) = match after.find("</function>") {
            Some(e) => (&after[..e], &after[e + "</function>".len()..]),
            None => return Err("missing </function>".into()),
        };
        let mut args = Map::new();
        let mut p = inner;
        while let Some((key, after_key)) = between(p, "<parameter=", ">") {
            let end = after_key
                .find("</parameter>")
                .ok_or("missing </parameter>")?;
            args.insert(key.trim().to_string(), loose_value(&after_key[..end]));
            p = &after_key[end + "</parameter>".len()..];
        }
        calls.push(ToolCall {
            name: name.trim().to_string(),
            arguments: Value::Object(args),
            id: None,
        });
        rest = after;
    }
    if calls.is_empty() {
        return Err("no <function=...> element".into());
    }
    Ok(calls)
}

fn key_value_tags(body: &str) -> Result<Vec<ToolCall>, String> {
    let body = body.trim();
    let name_end = body.find("<arg_key>").unwrap_or(body.len());
    let name = body[..name_end].trim();
    if name.is_empty() {
        return Err("missing tool name".into());
    }
    let mut args = Map::new();
    let mut rest = &body[name_end..];
    while let Some((key, after)) = between(rest, "<arg_key>", "</arg_key>") {
        let (value, after) =
            between(after, "<arg_value>", "</arg_value>").ok_or("<arg_key> without <arg_value>")?;
        args.insert(key.trim().to_string(), loose_value(value));
        rest = after;
    }
    Ok(vec![ToolCall {
        name: name.to_string(),
        arguments: Value::Object(args),
        id: None,
    }])
}

fn invoke_xml(body: &str) -> Result<Vec<ToolCall>, String> {
    let mut calls = Vec::new();
    let mut rest = body;
    while let Some((name, after)) = between(rest, "<invoke name=\"", "\">") {
        let end = after.find("</invoke>").ok_or("missing </invoke>")?;
        let mut args = Map::new();
        let mut p = &after[..end];
        while let Some((key, after_key)) = between(p, "<parameter name=\"", "\">") {
            let e = after_key
                .find("</parameter>")
                .ok_or("missing </parameter>")?;
            args.insert(key.to_string(), loose_value(&after_key[..e]));
            p = &after_key[e + "</parameter>".len()..];
        }
        calls.push(ToolCall {
            name: name.to_string(),
            arguments: Value::Object(args),
            id: None,
        });
        rest = &after[end + "</invoke>".len()..];
    }
    if calls.is_empty() {
        return Err("no <invoke name=...> element".into());
    }
    Ok(calls)
}

fn indexed_name(body: &str) -> Result<Vec<ToolCall>, String> {
    let (head, args) = body
        .split_once("<|tool_call_argument_begin|>")
        .ok_or("missing <|tool_call_argument_begin|>")?;
    let head = head.trim();
    let id = head.to_string();
    let name = head.strip_prefix("functions.").unwrap_or(head);
    let name = name.rsplit_once(':').map_or(name, |(n, _)| n);
    let arguments: Value =
        serde_json::from_str(args.trim()).map_err(|e| format!("invalid JSON arguments: {e}"))?;
    Ok(vec![ToolCall {
        name: name.to_string(),
        arguments,
        id: Some(id),
    }])
}

fn args_marker(body: &str) -> Result<Vec<ToolCall>, String> {
    let body = body.trim();
    if body.starts_with('[') || body.starts_with('{') {
        return json_calls(body);
    }
    let mut calls = Vec::new();
    for part in body.split("[TOOL_CALLS]") {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let (name, args) = part
            .split_once("[ARGS]")
            .ok_or("expected NAME[ARGS]{json}")?;
        let (name, id) = match name.split_once("[CALL_ID]") {
            Some((n, i)) => (n, Some(i.trim().to_string())),
            None => (name, None),
        };
        let arguments: Value = serde_json::from_str(args.trim())
            .map_err(|e| format!("invalid JSON arguments: {e}"))?;
        calls.push(ToolCall {
            name: name.trim().to_string(),
            arguments,
            id,
        });
    }
    Ok(calls)
}

/// Deepest nesting of lists and dicts inside a call's arguments (as
/// serde_json's own limit for JSON payloads).
const MAX_NESTING: usize = 128;

/// A small reader for Python literals and call syntax.
struct Py<'s> {
    s: &'s [u8],
    i: usize,
    depth: usize,
}

impl Py<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && (self.s[self.i] as char).is_whitespace() {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn ident(&mut self) -> Option<String> {
        self.ws();
        let start = self.i;
        while self.i < self.s.len()
            && ((self.s[self.i] as char).is_alphanumeric() || b"_.-".contains(&self.s[self.i]))
        {
            self.i += 1;
        }
        (self.i > start).then(|| String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }
    fn value(&mut self) -> Result<Value, String> {
        if self.depth >= MAX_NESTING {
            return Err(format!(
                "arguments nested more than {MAX_NESTING} levels deep"
            ));
        }
        self.depth += 1;
        let v = self.value_inner();
        self.depth -= 1;
        v
    }
    fn value_inner(&mut self) -> Result<Value, String> {
        self.ws();
        match self.s.get(self.i) {
            Some(b'\'') | Some(b'"') => {
                let q = self.s[self.i];
                self.i += 1;
                let mut out = Vec::new();
                while self.i < self.s.len() && self.s[self.i] != q {
                    if self.s[self.i] == b'\\' && self.i + 1 < self.s.len() {
                        self.i += 1;
                        out.push(match self.s[self.i] {
                            b'n' => b'\n',
                            b't' => b'\t',
                            c => c,
                        });
                    } else {
                        out.push(self.s[self.i]);
                    }
                    self.i += 1;
                }
                if !self.eat(q) {
                    return Err("unterminated string".into());
                }
                Ok(Value::String(String::from_utf8_lossy(&out).into_owned()))
            }
            Some(b'[') | Some(b'(') => {
                let close = if self.s[self.i] == b'[' { b']' } else { b')' };
                self.i += 1;
                let mut items = Vec::new();
                while !self.eat(close) {
                    items.push(self.value()?);
                    if !self.eat(b',') && !self.eat(close) {
                        return Err("expected ',' in a list".into());
                    } else if self.s.get(self.i - 1) == Some(&close) {
                        break;
                    }
                }
                Ok(Value::Array(items))
            }
            Some(b'{') => {
                self.i += 1;
                let mut map = Map::new();
                while !self.eat(b'}') {
                    let k = match self.value()? {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    if !self.eat(b':') {
                        return Err("expected ':' in a dict".into());
                    }
                    map.insert(k, self.value()?);
                    if !self.eat(b',') && !self.eat(b'}') {
                        return Err("expected ',' in a dict".into());
                    } else if self.s.get(self.i - 1) == Some(&b'}') {
                        break;
                    }
                }
                Ok(Value::Object(map))
            }
            _ => {
                let word = self.ident().ok_or("expected a value")?;
                Ok(match word.as_str() {
                    "True" | "true" => Value::Bool(true),
                    "False" | "false" => Value::Bool(false),
                    "None" | "null" => Value::Null,
                    w => serde_json::from_str::<Value>(w).unwrap_or(Value::String(w.to_string())),
                })
            }
        }
    }
    fn call(&mut self) -> Result<ToolCall, String> {
        let name = self.ident().ok_or("expected a function name")?;
        if !self.eat(b'(') {
            return Err(format!("expected '(' after {name}"));
        }
        let mut args = Map::new();
        while !self.eat(b')') {
            let key = self.ident().ok_or("expected an argument name")?;
            if !self.eat(b'=') {
                return Err(format!("expected '=' after argument {key}"));
            }
            args.insert(key, self.value()?);
            if !self.eat(b',') && !self.eat(b')') {
                return Err("expected ',' between arguments".into());
            } else if self.s.get(self.i - 1) == Some(&b')') {
                break;
            }
        }
        Ok(ToolCall {
            name,
            arguments: Value::Object(args),
            id: None,
        })
    }
}

fn pythonic(body: &str) -> Result<Vec<ToolCall>, String> {
    let mut p = Py {
        s: body.trim().as_bytes(),
        i: 0,
        depth: 0,
    };
    let listed = p.eat(b'[');
    let mut calls = vec![p.call()?];
    while p.eat(b',') {
        calls.push(p.call()?);
    }
    if listed && !p.eat(b']') {
        return Err("expected ']' after the calls".into());
    }
    p.ws();
    if p.i != p.s.len() {
        return Err("unexpected text after the calls".into());
    }
    Ok(calls)
}

/// `call:NAME{k:v,...}` with strings delimited by `esc`, bare keys, nested
/// braces for objects and brackets for lists.
fn call_braces(body: &str, esc: &str) -> Result<Vec<ToolCall>, String> {
    let body = body.trim();
    let rest = body
        .strip_prefix("call:")
        .ok_or("expected call:NAME{...}")?;
    let open = rest.find('{').ok_or("expected '{' after the name")?;
    let name = rest[..open].trim().to_string();
    let mut pos = open;
    let v = gemma_value(rest, &mut pos, esc, 0)?;
    if rest[pos..].trim() != "" {
        return Err("unexpected text after the arguments".into());
    }
    Ok(vec![ToolCall {
        name,
        arguments: v,
        id: None,
    }])
}

fn gemma_value(s: &str, pos: &mut usize, esc: &str, depth: usize) -> Result<Value, String> {
    if depth >= MAX_NESTING {
        return Err(format!(
            "arguments nested more than {MAX_NESTING} levels deep"
        ));
    }
    let skip_ws = |pos: &mut usize| {
        while s[*pos..].starts_with(char::is_whitespace) {
            *pos += s[*pos..].chars().next().map_or(1, char::len_utf8);
        }
    };
    skip_ws(pos);
    if s[*pos..].starts_with(esc) {
        let start = *pos + esc.len();
        let end = s[start..].find(esc).ok_or("unterminated escaped string")? + start;
        *pos = end + esc.len();
        return Ok(Value::String(s[start..end].to_string()));
    }
    if s[*pos..].starts_with('{') {
        *pos += 1;
        let mut map = Map::new();
        loop {
            skip_ws(pos);
            if s[*pos..].starts_with('}') {
                *pos += 1;
                return Ok(Value::Object(map));
            }
            let colon = s[*pos..].find(':').ok_or("expected key:value")? + *pos;
            let key = s[*pos..colon].trim().to_string();
            *pos = colon + 1;
            map.insert(key, gemma_value(s, pos, esc, depth + 1)?);
            skip_ws(pos);
            if s[*pos..].starts_with(',') {
                *pos += 1;
            }
        }
    }
    if s[*pos..].starts_with('[') {
        *pos += 1;
        let mut items = Vec::new();
        loop {
            skip_ws(pos);
            if s[*pos..].starts_with(']') {
                *pos += 1;
                return Ok(Value::Array(items));
            }
            items.push(gemma_value(s, pos, esc, depth + 1)?);
            skip_ws(pos);
            if s[*pos..].starts_with(',') {
                *pos += 1;
            }
        }
    }
    let end = s[*pos..]
        .find([',', '}', ']'])
        .map_or(s.len(), |e| e + *pos);
    let word = s[*pos..end].trim();
    *pos = end;
    if word.is_empty() {
        return Err("expected a value".into());
    }
    Ok(serde_json::from_str(word).unwrap_or_else(|_| Value::String(word.to_string())))
}
