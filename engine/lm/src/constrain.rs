//! Constrained decoding: only tokens that keep the output a prefix of a
//! JSON text valid against a schema may be chosen (OpenAI's
//! `response_format` and forced tool calls). The schema compiles to
//! [`Node`]s; a character-level matcher follows the output with a set of
//! alternative parser stacks (for `anyOf`, `enum` and optional properties),
//! and a token is allowed when its text leaves at least one stack alive.
//!
//! What the matcher accepts, beyond plain JSON: properties come in the
//! schema's order (optional ones may be left out; with `properties` given,
//! others are not allowed), no whitespace comes between a key and its
//! colon, whitespace runs are at most
//! [`MAX_WHITESPACE`] characters, numbers at most [`MAX_DIGITS`] digits, and
//! free-form values nest at most [`MAX_DEPTH`] deep, so that the output
//! always ends.
use std::sync::Arc;

use serde_json::Value;

use lmspec_engine::error::{Error, Result};

/// Longest whitespace run between JSON tokens.
pub const MAX_WHITESPACE: u8 = 4;
/// Most digits in a number's integer, fraction or exponent part.
pub const MAX_DIGITS: u8 = 20;
/// Deepest nesting of free-form values.
pub const MAX_DEPTH: u8 = 3;

/// A compiled JSON schema.
#[derive(Debug, PartialEq)]
pub enum Node {
    /// Any JSON value (nested at most `MAX_DEPTH` deep).
    Any,
    Object {
        /// Declared properties in order, with whether each is required.
        props: Vec<(String, Arc<Node>, bool)>,
        /// No `properties`: any keys with any values.
        free: bool,
    },
    Array(Arc<Node>),
    /// A string, restricted to the given values when `Some`.
    String(Option<Vec<String>>),
    Number {
        integer: bool,
    },
    Boolean,
    Null,
    /// One of these JSON texts exactly (`const`, `enum` of non-strings).
    Literal(Vec<String>),
    AnyOf(Vec<Arc<Node>>),
}

impl Node {
    /// Compiles a JSON schema; `at` names where it came from in errors
    /// (e.g. `response_format.json_schema.schema`).
    pub fn compile(schema: &Value, at: &str) -> Result<Arc<Node>> {
        compile(schema, at, 0).map(Arc::new)
    }
}

fn bad(at: &str, what: impl std::fmt::Display) -> Error {
    Error::Usage(format!("{at}: {what}"))
}

fn compile(schema: &Value, at: &str, depth: usize) -> Result<Node> {
    if depth > 64 {
        return Err(bad(at, "the schema nests more than 64 levels"));
    }
    let obj = match schema {
        Value::Bool(true) => return Ok(Node::Any),
        Value::Object(o) => o,
        _ => return Err(bad(at, "a schema must be an object")),
    };
    const SUPPORTED: [&str; 16] = [
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "enum",
        "const",
        "anyOf",
        "oneOf",
        "description",
        "title",
        "default",
        "$schema",
        "examples",
        "strict",
        "format",
    ];
    if let Some(k) = obj.keys().find(|k| !SUPPORTED.contains(&k.as_str())) {
        return Err(bad(
            at,
            format!(
                "the schema keyword '{k}' is not supported (supported: {})",
                SUPPORTED.join(", ")
            ),
        ));
    }
    if let Some(c) = obj.get("const") {
        return Ok(Node::Literal(vec![c.to_string()]));
    }
    if let Some(e) = obj.get("enum") {
        let Value::Array(items) = e else {
            return Err(bad(&format!("{at}.enum"), "must be an array"));
        };
        if items.is_empty() {
            return Err(bad(&format!("{at}.enum"), "must not be empty"));
        }
        if items.iter().all(Value::is_string) {
            let s = items.iter().filter_map(|v| v.as_str().map(String::from));
            return Ok(Node::String(Some(s.collect())));
        }
        return Ok(Node::Literal(items.iter().map(Value::to_string).collect()));
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(alts) = obj.get(key) {
            let Value::Array(alts) = alts else {
                return Err(bad(&format!("{at}.{key}"), "must be an array"));
            };
            if alts.is_empty() {
                return Err(bad(&format!("{at}.{key}"), "must not be empty"));
            }
            let nodes = alts
                .iter()
                .enumerate()
                .map(|(i, a)| compile(a, &format!("{at}.{key}[{i}]"), depth + 1).map(Arc::new))
                .collect::<Result<Vec<_>>>()?;
            return Ok(Node::AnyOf(nodes));
        }
    }
    let types: Vec<&str> = match obj.get("type") {
        None => return Ok(Node::Any),
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts
            .iter()
            .map(|t| {
                t.as_str()
                    .ok_or_else(|| bad(&format!("{at}.type"), "must be a string or strings"))
            })
            .collect::<Result<_>>()?,
        Some(_) => return Err(bad(&format!("{at}.type"), "must be a string or strings")),
    };
    let mut nodes = Vec::new();
    for t in types {
        nodes.push(match t {
            "object" => compile_object(obj, at, depth)?,
            "array" => Node::Array(Arc::new(match obj.get("items") {
                Some(items) => compile(items, &format!("{at}.items"), depth + 1)?,
                None => Node::Any,
            })),
            "string" => Node::String(None),
            "number" => Node::Number { integer: false },
            "integer" => Node::Number { integer: true },
            "boolean" => Node::Boolean,
            "null" => Node::Null,
            other => {
                return Err(bad(
                    &format!("{at}.type"),
                    format!("unknown type '{other}'"),
                ))
            }
        });
    }
    Ok(match nodes.len() {
        1 => nodes.remove(0),
        _ => Node::AnyOf(nodes.into_iter().map(Arc::new).collect()),
    })
}

fn compile_object(obj: &serde_json::Map<String, Value>, at: &str, depth: usize) -> Result<Node> {
    let required: Vec<&str> = match obj.get("required") {
        None => Vec::new(),
        Some(Value::Array(r)) => r
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| bad(&format!("{at}.required"), "must be an array of strings"))
            })
            .collect::<Result<_>>()?,
        Some(_) => {
            return Err(bad(
                &format!("{at}.required"),
                "must be an array of strings",
            ))
        }
    };
    let Some(props) = obj.get("properties") else {
        return Ok(Node::Object {
            props: Vec::new(),
            free: true,
        });
    };
    let Value::Object(props) = props else {
        return Err(bad(&format!("{at}.properties"), "must be an object"));
    };
    if let Some(r) = required.iter().find(|r| !props.contains_key(**r)) {
        return Err(bad(
            &format!("{at}.required"),
            format!("'{r}' is not among the properties"),
        ));
    }
    let props = props
        .iter()
        .map(|(k, v)| {
            let node = compile(v, &format!("{at}.properties.{k}"), depth + 1)?;
            Ok((k.clone(), Arc::new(node), required.contains(&k.as_str())))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Node::Object { props, free: false })
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    E,
    ESign,
    Exp,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ObjPhase {
    /// After `{` (a key or `}`).
    Open,
    /// After `,` (a key).
    NeedKey,
    /// The key string is on top.
    InKey,
    /// After the key (`:`).
    Colon,
    /// The value is on top.
    InValue,
    /// After a value (`,` or `}`).
    AfterValue,
}

#[derive(Debug, Clone)]
enum Frame {
    /// A value of `node` (after at most `ws` whitespace so far).
    Value {
        node: Arc<Node>,
        depth: u8,
        ws: u8,
    },
    Lit(Arc<str>, usize),
    Str {
        allowed: Option<Arc<Vec<String>>>,
        buf: String,
        escape: u8,
    },
    Num {
        integer: bool,
        state: Num,
        digits: u8,
    },
    Obj {
        node: Arc<Node>,
        depth: u8,
        phase: ObjPhase,
        /// Index of the next declared property that may come.
        next: usize,
        key: usize,
        ws: u8,
    },
    Arr {
        item: Arc<Node>,
        depth: u8,
        open: bool,
        ws: u8,
    },
}

type Stack = Vec<Frame>;

fn is_ws(c: char) -> bool {
    matches!(c, ' ' | '\n' | '\t' | '\r')
}

/// Feeds `c` to `stack`, pushing every stack that survives onto `out`.
fn feed(mut stack: Stack, c: char, out: &mut Vec<Stack>) {
    let Some(top) = stack.pop() else { return };
    match top {
        Frame::Value { node, depth, ws } => {
            if is_ws(c) {
                if ws < MAX_WHITESPACE {
                    stack.push(Frame::Value {
                        node,
                        depth,
                        ws: ws + 1,
                    });
                    out.push(stack);
                }
                return;
            }
            start_value(stack, &node, depth, c, out);
        }
        Frame::Lit(text, pos) => {
            if text[pos..].starts_with(c) {
                let pos = pos + c.len_utf8();
                if pos < text.len() {
                    stack.push(Frame::Lit(text, pos));
                } else {
                    complete(&mut stack, None);
                }
                out.push(stack);
            }
        }
        Frame::Str {
            allowed,
            mut buf,
            escape,
        } => {
            let mut next_escape = 0;
            if escape == 1 {
                match c {
                    '"' | '\\' | '/' | 'b' | 'f' | 'n' | 'r' | 't' => {}
                    'u' => next_escape = 5,
                    _ => return,
                }
            } else if escape > 1 {
                if !c.is_ascii_hexdigit() {
                    return;
                }
                next_escape = if escape == 2 { 0 } else { escape - 1 };
            } else if c == '"' {
                if let Some(a) = &allowed {
                    if !a.contains(&buf) {
                        return;
                    }
                }
                complete(&mut stack, Some(buf));
                out.push(stack);
                return;
            } else if c == '\\' {
                next_escape = 1;
            } else if (c as u32) < 0x20 {
                return;
            }
            if let Some(a) = &allowed {
                // Allowed values are matched on their JSON spelling.
                buf.push(c);
                if !a.iter().any(|s| s.starts_with(buf.as_str())) {
                    return;
                }
            }
            stack.push(Frame::Str {
                allowed,
                buf,
                escape: next_escape,
            });
            out.push(stack);
        }
        Frame::Num {
            integer,
            state,
            digits,
        } => {
            let digit = c.is_ascii_digit();
            let next = match (state, c) {
                (Num::Minus, '0') => Some((Num::Zero, 1)),
                (Num::Minus, _) if digit => Some((Num::Int, 1)),
                (Num::Int, _) if digit => Some((Num::Int, digits + 1)),
                (Num::Zero | Num::Int, '.') if !integer => Some((Num::Dot, 0)),
                (Num::Zero | Num::Int | Num::Frac, 'e' | 'E') if !integer => Some((Num::E, 0)),
                (Num::Dot | Num::Frac, _) if digit => Some((Num::Frac, digits + 1)),
                (Num::E, '+' | '-') => Some((Num::ESign, 0)),
                (Num::E | Num::ESign | Num::Exp, _) if digit => Some((Num::Exp, digits + 1)),
                _ => None,
            };
            match next {
                Some((state, digits)) if digits <= MAX_DIGITS => {
                    stack.push(Frame::Num {
                        integer,
                        state,
                        digits,
                    });
                    out.push(stack);
                }
                Some(_) => {}
                None if matches!(state, Num::Zero | Num::Int | Num::Frac | Num::Exp) => {
                    // The number ended before `c`: its container reads `c`.
                    complete(&mut stack, None);
                    feed(stack, c, out);
                }
                None => {}
            }
        }
        Frame::Obj {
            node,
            depth,
            phase,
            next,
            key,
            ws,
        } => {
            let Node::Object { props, free } = &*node else {
                return;
            };
            let frame = |phase, next, key, ws| Frame::Obj {
                node: node.clone(),
                depth,
                phase,
                next,
                key,
                ws,
            };
            // Whitespace goes around structure, not between a key and
            // its colon.
            if is_ws(c) && !matches!(phase, ObjPhase::InKey | ObjPhase::InValue | ObjPhase::Colon) {
                if ws < MAX_WHITESPACE {
                    stack.push(frame(phase, next, key, ws + 1));
                    out.push(stack);
                }
                return;
            }
            let rest_optional = props[next.min(props.len())..].iter().all(|p| !p.2);
            match (phase, c) {
                (ObjPhase::Open | ObjPhase::NeedKey, '"') => {
                    let allowed = if *free {
                        None
                    } else {
                        // Declared order: any later property up to the
                        // first required one still missing.
                        let mut names = Vec::new();
                        for p in &props[next.min(props.len())..] {
                            names.push(json_spelling(&p.0));
                            if p.2 {
                                break;
                            }
                        }
                        if names.is_empty() {
                            return;
                        }
                        Some(Arc::new(names))
                    };
                    stack.push(frame(ObjPhase::InKey, next, key, 0));
                    stack.push(Frame::Str {
                        allowed,
                        buf: String::new(),
                        escape: 0,
                    });
                    out.push(stack);
                }
                (ObjPhase::Open, '}') | (ObjPhase::AfterValue, '}') if *free || rest_optional => {
                    complete(&mut stack, None);
                    out.push(stack);
                }
                (ObjPhase::Colon, ':') => {
                    let value = if *free {
                        Arc::new(Node::Any)
                    } else {
                        props[key].1.clone()
                    };
                    stack.push(frame(ObjPhase::InValue, next, key, 0));
                    stack.push(Frame::Value {
                        node: value,
                        depth: depth + 1,
                        ws: 0,
                    });
                    out.push(stack);
                }
                (ObjPhase::AfterValue, ',') if *free || next < props.len() => {
                    stack.push(frame(ObjPhase::NeedKey, next, key, 0));
                    out.push(stack);
                }
                _ => {}
            }
        }
        Frame::Arr {
            item,
            depth,
            open,
            ws,
        } => {
            if is_ws(c) {
                if ws < MAX_WHITESPACE {
                    stack.push(Frame::Arr {
                        item,
                        depth,
                        open,
                        ws: ws + 1,
                    });
                    out.push(stack);
                }
                return;
            }
            match c {
                ']' => {
                    complete(&mut stack, None);
                    out.push(stack);
                }
                ',' if !open => {
                    stack.push(Frame::Arr {
                        item: item.clone(),
                        depth,
                        open: false,
                        ws: 0,
                    });
                    stack.push(Frame::Value {
                        node: item,
                        depth: depth + 1,
                        ws: 0,
                    });
                    out.push(stack);
                }
                _ if open => {
                    stack.push(Frame::Arr {
                        item: item.clone(),
                        depth,
                        open: false,
                        ws: 0,
                    });
                    start_value(stack, &item, depth + 1, c, out);
                }
                _ => {}
            }
        }
    }
}

/// A string as it appears between the quotes of its JSON text.
fn json_spelling(s: &str) -> String {
    let q = Value::String(s.to_string()).to_string();
    q[1..q.len() - 1].to_string()
}

/// The first character `c` of a value of `node`.
fn start_value(mut stack: Stack, node: &Arc<Node>, depth: u8, c: char, out: &mut Vec<Stack>) {
    let lit = |mut stack: Stack, text: &str, out: &mut Vec<Stack>| {
        if text.starts_with(c) {
            stack.push(Frame::Lit(Arc::from(text), 0));
            feed(stack, c, out);
        }
    };
    match &**node {
        Node::Any => {
            if depth > MAX_DEPTH && matches!(c, '{' | '[') {
                return;
            }
            let free = match c {
                '{' => Node::Object {
                    props: Vec::new(),
                    free: true,
                },
                '[' => Node::Array(Arc::new(Node::Any)),
                '"' => Node::String(None),
                't' | 'f' => Node::Boolean,
                'n' => Node::Null,
                _ => Node::Number { integer: false },
            };
            start_value(stack, &Arc::new(free), depth, c, out);
        }
        Node::Object { .. } if c == '{' => {
            stack.push(Frame::Obj {
                node: node.clone(),
                depth,
                phase: ObjPhase::Open,
                next: 0,
                key: 0,
                ws: 0,
            });
            out.push(stack);
        }
        Node::Array(item) if c == '[' => {
            stack.push(Frame::Arr {
                item: item.clone(),
                depth,
                open: true,
                ws: 0,
            });
            out.push(stack);
        }
        Node::String(allowed) if c == '"' => {
            stack.push(Frame::Str {
                allowed: allowed
                    .as_ref()
                    .map(|a| Arc::new(a.iter().map(|s| json_spelling(s)).collect())),
                buf: String::new(),
                escape: 0,
            });
            out.push(stack);
        }
        Node::Number { integer } if c == '-' || c.is_ascii_digit() => {
            let (state, digits) = match c {
                '-' => (Num::Minus, 0),
                '0' => (Num::Zero, 1),
                _ => (Num::Int, 1),
            };
            stack.push(Frame::Num {
                integer: *integer,
                state,
                digits,
            });
            out.push(stack);
        }
        Node::Boolean => {
            lit(stack.clone(), "true", out);
            lit(stack, "false", out);
        }
        Node::Null => lit(stack, "null", out),
        Node::Literal(texts) => {
            for t in texts {
                lit(stack.clone(), t, out);
            }
        }
        Node::AnyOf(alts) => {
            for a in alts {
                start_value(stack.clone(), a, depth, c, out);
            }
        }
        _ => {}
    }
}

/// The frame on top has finished (`key`: the string it read); its
/// container moves on.
fn complete(stack: &mut Stack, key: Option<String>) {
    if let Some(Frame::Obj {
        node,
        phase,
        next,
        key: k,
        ..
    }) = stack.last_mut()
    {
        match phase {
            ObjPhase::InKey => {
                if let (Node::Object { props, free: false }, Some(name)) = (&**node, key) {
                    if let Some(i) = props.iter().position(|p| json_spelling(&p.0) == name) {
                        *k = i;
                        *next = i + 1;
                    }
                }
                *phase = ObjPhase::Colon;
            }
            ObjPhase::InValue => *phase = ObjPhase::AfterValue,
            _ => {}
        }
    }
}

/// Tokens allowed next, given the text so far; see the module docs.
#[derive(Debug, Clone)]
pub struct JsonConstraint {
    stacks: Vec<Stack>,
    texts: Arc<TokenTexts>,
    eos: Vec<u32>,
}

/// Each token's text, `None` for special tokens and for tokens that are not
/// whole UTF-8 characters on their own.
#[derive(Debug)]
pub struct TokenTexts(pub Vec<Option<String>>);

impl TokenTexts {
    pub fn new(tok: &crate::tokenizer::Tokenizer) -> Result<TokenTexts> {
        let n = tok.vocab_size() as u32;
        let mut texts = Vec::with_capacity(n as usize);
        for id in 0..n {
            let raw = tok.decode(&[id], false)?;
            let plain = tok.decode(&[id], true)?;
            let usable = !raw.is_empty() && raw == plain && !raw.contains('\u{FFFD}');
            texts.push(usable.then_some(raw));
        }
        Ok(TokenTexts(texts))
    }
}

impl JsonConstraint {
    /// Output `prefix`, a value of `schema`, then `suffix`, then an end of
    /// sequence (one of `eos`).
    pub fn new(
        schema: Arc<Node>,
        prefix: &str,
        suffix: &str,
        texts: Arc<TokenTexts>,
        eos: Vec<u32>,
    ) -> JsonConstraint {
        let mut stack = Vec::new();
        if !suffix.is_empty() {
            stack.push(Frame::Lit(Arc::from(suffix), 0));
        }
        stack.push(Frame::Value {
            node: schema,
            depth: 0,
            ws: 0,
        });
        if !prefix.is_empty() {
            stack.push(Frame::Lit(Arc::from(prefix), 0));
        }
        JsonConstraint {
            stacks: vec![stack],
            texts,
            eos,
        }
    }

    fn after(stacks: &[Stack], text: &str) -> Vec<Stack> {
        let mut cur: Vec<Stack> = stacks.to_vec();
        for c in text.chars() {
            let mut next = Vec::new();
            for s in cur {
                feed(s, c, &mut next);
            }
            if next.is_empty() {
                return next;
            }
            next.truncate(64);
            cur = next;
        }
        cur
    }

    /// Whether the output may end here.
    pub fn can_end(&self) -> bool {
        self.stacks.iter().any(|s| match s.as_slice() {
            [] => true,
            // A number at the very end needs no terminator.
            [Frame::Num { state, .. }] => {
                matches!(state, Num::Zero | Num::Int | Num::Frac | Num::Exp)
            }
            _ => false,
        })
    }

    /// Whether `token` may come next.
    pub fn allows(&self, token: u32) -> bool {
        if self.eos.contains(&token) {
            return self.can_end();
        }
        match self.texts.0.get(token as usize) {
            Some(Some(text)) => !Self::after(&self.stacks, text).is_empty(),
            _ => false,
        }
    }

    /// Sets the logits of every token not allowed next to -inf.
    pub fn mask(&self, logits: &mut [f32]) {
        for (i, x) in logits.iter_mut().enumerate() {
            if *x != f32::NEG_INFINITY && !self.allows(i as u32) {
                *x = f32::NEG_INFINITY;
            }
        }
    }

    /// The best allowed token by `logits` (for greedy decoding: checks
    /// candidates from the best down and stops at the first allowed).
    pub fn best(&self, logits: &[f32]) -> Option<u32> {
        // The best few first (usually one of them is allowed), then all.
        const FEW: usize = 64;
        let by_logit = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        if order.len() > FEW {
            order.select_nth_unstable_by(FEW - 1, by_logit);
            order.truncate(FEW);
        }
        order.sort_by(by_logit);
        if let Some(t) = order.into_iter().find(|&t| self.allows(t)) {
            return Some(t);
        }
        (0..logits.len() as u32)
            .filter(|&t| logits[t as usize] != f32::NEG_INFINITY && self.allows(t))
            .min_by(by_logit)
    }

    /// Records that `token` was chosen.
    pub fn advance(&mut self, token: u32) {
        if self.eos.contains(&token) {
            self.stacks.clear();
            return;
        }
        if let Some(Some(text)) = self.texts.0.get(token as usize) {
            self.stacks = Self::after(&self.stacks, text);
        }
    }

    /// Whether the output is complete (only an end of sequence may follow).
    pub fn is_complete(&self) -> bool {
        self.stacks.iter().any(Vec::is_empty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepts(schema: &Value, text: &str) -> bool {
        let node = Node::compile(schema, "schema").expect("compile");
        let texts = Arc::new(TokenTexts(Vec::new()));
        let c = JsonConstraint::new(node, "", "", texts, vec![]);
        let after = JsonConstraint {
            stacks: JsonConstraint::after(&c.stacks, text),
            ..c
        };
        after.can_end()
    }

    fn prefix_ok(schema: &Value, text: &str) -> bool {
        let node = Node::compile(schema, "schema").expect("compile");
        let c = JsonConstraint::new(node, "", "", Arc::new(TokenTexts(Vec::new())), vec![]);
        !JsonConstraint::after(&c.stacks, text).is_empty()
    }

    #[test]
    fn objects_follow_the_schema() {
        let s = serde_json::json!({
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "unit": {"enum": ["c", "f"]}
            },
            "required": ["city"]
        });
        assert!(accepts(&s, r#"{"city": "Paris"}"#));
        assert!(accepts(&s, r#"{"city":"Paris","days":3,"unit":"f"}"#));
        assert!(accepts(
            &s,
            "{\n  \"city\": \"P\\\"aris\",\n  \"unit\": \"c\"\n}"
        ));
        assert!(!accepts(&s, r#"{"days": 3}"#), "required city missing");
        assert!(!accepts(&s, r#"{"city": "Paris""#), "unfinished");
        assert!(!prefix_ok(&s, r#"{"city": 3"#), "city is a string");
        assert!(
            !prefix_ok(&s, r#"{"city": "a", "days": 1.5"#),
            "days is an integer"
        );
        assert!(!prefix_ok(&s, r#"{"city": "a", "unit": "k"#));
        assert!(!prefix_ok(&s, r#"{"town"#), "undeclared key");
        assert!(!prefix_ok(&s, "{       \"city\""), "long whitespace run");
        assert!(!prefix_ok(&s, "{\"city\" :"), "whitespace before a colon");
    }

    #[test]
    fn free_values_numbers_and_alternatives() {
        let any = serde_json::json!({"type": "object"});
        assert!(accepts(
            &any,
            r#"{"a": [1, -2.5e3, true, null, {"b": "c"}]}"#
        ));
        assert!(!prefix_ok(&any, r#"{"a": 01"#));
        assert!(!prefix_ok(&any, "[1]"), "json_object wants an object");
        let alt = serde_json::json!({"anyOf": [{"type": "integer"}, {"type": "null"}]});
        assert!(accepts(&alt, "42"));
        assert!(accepts(&alt, "null"));
        assert!(!prefix_ok(&alt, "4.2"));
        let c = serde_json::json!({"const": {"k": 1}});
        assert!(accepts(&c, r#"{"k":1}"#));
        assert!(!prefix_ok(&c, r#"{"k":2"#));
    }

    #[test]
    fn unsupported_or_malformed_schemas_are_refused_by_field() {
        let e = Node::compile(
            &serde_json::json!({"type": "string", "pattern": "a+"}),
            "rf",
        )
        .expect_err("pattern");
        assert!(
            e.to_string().contains("rf: the schema keyword 'pattern'"),
            "{e}"
        );
        let e = Node::compile(
            &serde_json::json!({"type": "object", "properties": {"a": {"type": "strin"}}}),
            "rf",
        )
        .expect_err("bad type");
        assert!(
            e.to_string()
                .contains("rf.properties.a.type: unknown type 'strin'"),
            "{e}"
        );
        let e = Node::compile(
            &serde_json::json!({"type": "object", "properties": {}, "required": ["x"]}),
            "rf",
        )
        .expect_err("required");
        assert!(
            e.to_string().contains("'x' is not among the properties"),
            "{e}"
        );
    }

    #[test]
    fn prefix_and_suffix_frame_the_value() {
        let node = Node::compile(&serde_json::json!({"type": "boolean"}), "s").expect("compile");
        let texts = Arc::new(TokenTexts(vec![
            Some("<a>".into()),
            Some("true".into()),
            Some("</a>".into()),
            None,
        ]));
        let mut c = JsonConstraint::new(node, "<a>", "</a>", texts, vec![3]);
        assert!(c.allows(0) && !c.allows(1) && !c.allows(3));
        c.advance(0);
        assert!(c.allows(1) && !c.allows(2));
        c.advance(1);
        assert!(c.allows(2) && !c.can_end());
        c.advance(2);
        assert!(c.is_complete() && c.allows(3) && !c.allows(1));
    }
}
