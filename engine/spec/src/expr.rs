//! The spec language's small typed expression language.
//!
//! Expressions appear wherever a spec needs a number, a bool or a string
//! computed from the checkpoint's config: `hidden_size / n_heads`,
//! `i % sliding_window_pattern == 0`, `rope_scaling.factor`,
//! `layer_types[i] == 'sliding_attention'`, `get(rope_scaling, 'type', 'default')`.
//!
//! Grammar (lowest precedence first):
//! `cond := or ('if' or 'else' cond)?`, `or := and ('or' and)*`,
//! `and := not ('and' not)*`, `not := 'not' not | cmp`,
//! `cmp := sum (('=='|'!='|'<'|'<='|'>'|'>='|'in') sum)?`,
//! `sum := prod (('+'|'-') prod)*`, `prod := unary (('*'|'/'|'//'|'%') unary)*`,
//! `unary := '-' unary | pow`, `pow := postfix ('**' unary)?`,
//! `postfix := atom ('.' name | '[' cond ']' | '(' args ')')*`.
use std::fmt;

use indexmap::IndexMap;

/// A value of the expression language; config values are converted to it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Value>),
    Map(IndexMap<String, Value>),
}

impl Value {
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::List(_) => "list",
            Value::Map(_) => "map",
        }
    }

    pub fn from_json(v: &serde_json::Value) -> Value {
        match v {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_json::Value::String(s) => Value::Str(s.clone()),
            serde_json::Value::Array(a) => Value::List(a.iter().map(Value::from_json).collect()),
            serde_json::Value::Object(o) => Value::Map(
                o.iter()
                    .map(|(k, v)| (k.clone(), Value::from_json(v)))
                    .collect(),
            ),
        }
    }

    pub fn from_yaml(v: &serde_yaml::Value) -> Value {
        match v {
            serde_yaml::Value::Null => Value::Null,
            serde_yaml::Value::Bool(b) => Value::Bool(*b),
            serde_yaml::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_yaml::Value::String(s) => Value::Str(s.clone()),
            serde_yaml::Value::Sequence(a) => Value::List(a.iter().map(Value::from_yaml).collect()),
            serde_yaml::Value::Mapping(m) => Value::Map(
                m.iter()
                    .map(|(k, v)| {
                        let key = match k {
                            serde_yaml::Value::String(s) => s.clone(),
                            other => serde_yaml::to_string(other)
                                .unwrap_or_default()
                                .trim()
                                .to_string(),
                        };
                        (key, Value::from_yaml(v))
                    })
                    .collect(),
            ),
            serde_yaml::Value::Tagged(t) => Value::from_yaml(&t.value),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            _ => None,
        }
    }

    /// An integer, accepting floats with no fractional part.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Float(f) if f.fract() == 0.0 && f.is_finite() => Some(*f as i64),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    fn truthy(&self) -> bool {
        match self {
            Value::Null => false,
            Value::Bool(b) => *b,
            Value::Int(i) => *i != 0,
            Value::Float(f) => *f != 0.0,
            Value::Str(s) => !s.is_empty(),
            Value::List(l) => !l.is_empty(),
            Value::Map(m) => !m.is_empty(),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => write!(f, "null"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x:?}"),
            Value::Str(s) => write!(f, "'{s}'"),
            Value::List(l) => {
                write!(f, "[")?;
                for (k, v) in l.iter().enumerate() {
                    if k > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{v}")?;
                }
                write!(f, "]")
            }
            Value::Map(m) => {
                write!(f, "{{")?;
                for (k, (key, v)) in m.iter().enumerate() {
                    if k > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{key}: {v}")?;
                }
                write!(f, "}}")
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    FloorDiv,
    Mod,
    Pow,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    In,
    And,
    Or,
}

/// A parsed expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Lit(Value),
    Name(String),
    Neg(Box<Expr>),
    Not(Box<Expr>),
    Bin(BinOp, Box<Expr>, Box<Expr>),
    Cond(Box<Expr>, Box<Expr>, Box<Expr>),
    Field(Box<Expr>, String),
    Index(Box<Expr>, Box<Expr>),
    Call(String, Vec<Expr>),
}

/// Names an expression can read.
pub trait Scope {
    fn get(&self, name: &str) -> Option<Value>;
}

impl Scope for IndexMap<String, Value> {
    fn get(&self, name: &str) -> Option<Value> {
        IndexMap::get(self, name).cloned()
    }
}

/// A scope with one extra name bound on top of another (the layer index `i`).
#[derive(Debug)]
pub struct With<'a, S: Scope + ?Sized> {
    pub name: &'a str,
    pub value: Value,
    pub base: &'a S,
}

impl<S: Scope + ?Sized> Scope for With<'_, S> {
    fn get(&self, name: &str) -> Option<Value> {
        if name == self.name {
            Some(self.value.clone())
        } else {
            self.base.get(name)
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(Value),
    Str(String),
    Ident(String),
    Sym(&'static str),
}

const SYMBOLS: [&str; 20] = [
    "**", "//", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "<", ">", "(", ")", "[", "]", ".",
    ",", "!",
];

fn lex(src: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let b = src.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if !b[i].is_ascii() {
            let c = src[i..]
                .chars()
                .next()
                .unwrap_or(char::REPLACEMENT_CHARACTER);
            return Err(format!("unexpected character '{c}'"));
        }
        let c = b[i] as char;
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_digit() {
            let start = i;
            let mut float = false;
            while i < b.len() {
                let ch = b[i] as char;
                if ch.is_ascii_digit() || ch == '_' {
                    i += 1;
                } else if ch == '.'
                    && !float
                    && i + 1 < b.len()
                    && (b[i + 1] as char).is_ascii_digit()
                {
                    float = true;
                    i += 1;
                } else if (ch == 'e' || ch == 'E') && i + 1 < b.len() {
                    float = true;
                    i += 1;
                    if b[i] == b'-' || b[i] == b'+' {
                        i += 1;
                    }
                } else {
                    break;
                }
            }
            let text: String = src[start..i].chars().filter(|c| *c != '_').collect();
            let v = if float {
                Value::Float(text.parse().map_err(|_| format!("bad number '{text}'"))?)
            } else {
                Value::Int(text.parse().map_err(|_| format!("bad number '{text}'"))?)
            };
            out.push(Tok::Num(v));
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < b.len() && ((b[i] as char).is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push(Tok::Ident(src[start..i].to_string()));
        } else if c == '\'' || c == '"' {
            let end = src[i + 1..]
                .find(c)
                .ok_or_else(|| "unterminated string".to_string())?;
            out.push(Tok::Str(src[i + 1..i + 1 + end].to_string()));
            i += end + 2;
        } else if let Some(sym) = SYMBOLS.iter().find(|s| src[i..].starts_with(**s)) {
            out.push(Tok::Sym(sym));
            i += sym.len();
        } else {
            return Err(format!("unexpected character '{c}'"));
        }
    }
    Ok(out)
}

/// Most tokens an expression may have; a spec's expressions are short, and
/// the bound keeps evaluation (recursive over the tree) shallow.
pub const MAX_TOKENS: usize = 1024;
/// Deepest nesting of parentheses, brackets, calls and unary operators.
pub const MAX_DEPTH: usize = 64;

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }
    fn is_sym(&self, s: &str) -> bool {
        matches!(self.peek(), Some(Tok::Sym(x)) if *x == s)
    }
    fn is_kw(&self, s: &str) -> bool {
        matches!(self.peek(), Some(Tok::Ident(x)) if x == s)
    }
    fn expect_sym(&mut self, s: &str) -> Result<(), String> {
        if self.is_sym(s) {
            self.pos += 1;
            Ok(())
        } else {
            Err(format!("expected '{s}'"))
        }
    }

    /// Counts one level of nesting for the duration of `f`.
    fn nested<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, String>) -> Result<T, String> {
        if self.depth >= MAX_DEPTH {
            return Err(format!("nested more than {MAX_DEPTH} levels deep"));
        }
        self.depth += 1;
        let out = f(self);
        self.depth -= 1;
        out
    }

    fn cond(&mut self) -> Result<Expr, String> {
        self.nested(Self::cond_inner)
    }
    fn cond_inner(&mut self) -> Result<Expr, String> {
        let value = self.or()?;
        if self.is_kw("if") {
            self.pos += 1;
            let test = self.or()?;
            if !self.is_kw("else") {
                return Err("expected 'else'".into());
            }
            self.pos += 1;
            let other = self.cond()?;
            return Ok(Expr::Cond(Box::new(test), Box::new(value), Box::new(other)));
        }
        Ok(value)
    }
    fn or(&mut self) -> Result<Expr, String> {
        let mut l = self.and()?;
        while self.is_kw("or") {
            self.pos += 1;
            l = Expr::Bin(BinOp::Or, Box::new(l), Box::new(self.and()?));
        }
        Ok(l)
    }
    fn and(&mut self) -> Result<Expr, String> {
        let mut l = self.not()?;
        while self.is_kw("and") {
            self.pos += 1;
            l = Expr::Bin(BinOp::And, Box::new(l), Box::new(self.not()?));
        }
        Ok(l)
    }
    fn not(&mut self) -> Result<Expr, String> {
        if self.is_kw("not") || self.is_sym("!") {
            self.pos += 1;
            return Ok(Expr::Not(Box::new(self.not()?)));
        }
        self.cmp()
    }
    fn cmp(&mut self) -> Result<Expr, String> {
        let l = self.sum()?;
        let op = match self.peek() {
            Some(Tok::Sym("==")) => BinOp::Eq,
            Some(Tok::Sym("!=")) => BinOp::Ne,
            Some(Tok::Sym("<")) => BinOp::Lt,
            Some(Tok::Sym("<=")) => BinOp::Le,
            Some(Tok::Sym(">")) => BinOp::Gt,
            Some(Tok::Sym(">=")) => BinOp::Ge,
            Some(Tok::Ident(k)) if k == "in" => BinOp::In,
            _ => return Ok(l),
        };
        self.pos += 1;
        Ok(Expr::Bin(op, Box::new(l), Box::new(self.sum()?)))
    }
    fn sum(&mut self) -> Result<Expr, String> {
        let mut l = self.prod()?;
        loop {
            let op = match self.peek() {
                Some(Tok::Sym("+")) => BinOp::Add,
                Some(Tok::Sym("-")) => BinOp::Sub,
                _ => return Ok(l),
            };
            self.pos += 1;
            l = Expr::Bin(op, Box::new(l), Box::new(self.prod()?));
        }
    }
    fn prod(&mut self) -> Result<Expr, String> {
        let mut l = self.unary()?;
        loop {
            let op = match self.peek() {
                Some(Tok::Sym("*")) => BinOp::Mul,
                Some(Tok::Sym("/")) => BinOp::Div,
                Some(Tok::Sym("//")) => BinOp::FloorDiv,
                Some(Tok::Sym("%")) => BinOp::Mod,
                _ => return Ok(l),
            };
            self.pos += 1;
            l = Expr::Bin(op, Box::new(l), Box::new(self.unary()?));
        }
    }
    fn unary(&mut self) -> Result<Expr, String> {
        self.nested(Self::unary_inner)
    }
    fn unary_inner(&mut self) -> Result<Expr, String> {
        if self.is_sym("-") {
            self.pos += 1;
            return Ok(Expr::Neg(Box::new(self.unary()?)));
        }
        let base = self.postfix()?;
        if self.is_sym("**") {
            self.pos += 1;
            return Ok(Expr::Bin(
                BinOp::Pow,
                Box::new(base),
                Box::new(self.unary()?),
            ));
        }
        Ok(base)
    }
    fn postfix(&mut self) -> Result<Expr, String> {
        let mut e = self.atom()?;
        loop {
            if self.is_sym(".") {
                self.pos += 1;
                match self.peek().cloned() {
                    Some(Tok::Ident(n)) => {
                        self.pos += 1;
                        e = Expr::Field(Box::new(e), n);
                    }
                    _ => return Err("expected a field name after '.'".into()),
                }
            } else if self.is_sym("[") {
                self.pos += 1;
                let idx = self.cond()?;
                self.expect_sym("]")?;
                e = Expr::Index(Box::new(e), Box::new(idx));
            } else {
                return Ok(e);
            }
        }
    }
    fn atom(&mut self) -> Result<Expr, String> {
        let tok = self.peek().cloned().ok_or("unexpected end of expression")?;
        self.pos += 1;
        match tok {
            Tok::Num(v) => Ok(Expr::Lit(v)),
            Tok::Str(s) => Ok(Expr::Lit(Value::Str(s))),
            Tok::Sym("(") => {
                let e = self.cond()?;
                self.expect_sym(")")?;
                Ok(e)
            }
            Tok::Sym("[") => {
                let mut items = Vec::new();
                while !self.is_sym("]") {
                    items.push(self.cond()?);
                    if !self.is_sym("]") {
                        self.expect_sym(",")?;
                    }
                }
                self.pos += 1;
                Ok(Expr::Call("list".into(), items))
            }
            Tok::Ident(name) => match name.as_str() {
                "true" | "True" => Ok(Expr::Lit(Value::Bool(true))),
                "false" | "False" => Ok(Expr::Lit(Value::Bool(false))),
                "null" | "None" => Ok(Expr::Lit(Value::Null)),
                _ if self.is_sym("(") => {
                    self.pos += 1;
                    let mut args = Vec::new();
                    while !self.is_sym(")") {
                        args.push(self.cond()?);
                        if !self.is_sym(")") {
                            self.expect_sym(",")?;
                        }
                    }
                    self.pos += 1;
                    if !FUNCTIONS.contains(&name.as_str()) {
                        return Err(format!(
                            "unknown function '{name}' (known: {})",
                            FUNCTIONS.join(", ")
                        ));
                    }
                    Ok(Expr::Call(name, args))
                }
                _ => Ok(Expr::Name(name)),
            },
            Tok::Sym(s) => Err(format!("unexpected '{s}'")),
        }
    }
}

/// Functions callable from expressions.
pub const FUNCTIONS: [&str; 18] = [
    "min", "max", "abs", "int", "float", "sqrt", "log", "exp", "len", "get", "floor", "ceil",
    "bf16", "set", "pick", "str", "split", "rindex",
];

impl Expr {
    pub fn parse(src: &str) -> Result<Expr, String> {
        let toks = lex(src)?;
        if toks.len() > MAX_TOKENS {
            return Err(format!(
                "expression has {} tokens, more than the limit of {MAX_TOKENS}",
                toks.len()
            ));
        }
        let mut p = Parser {
            toks,
            pos: 0,
            depth: 0,
        };
        let e = p.cond()?;
        if p.pos != p.toks.len() {
            return Err(format!("unexpected trailing input in '{src}'"));
        }
        Ok(e)
    }

    /// Names the expression reads (for validation against the config schema).
    pub fn names(&self, out: &mut Vec<String>) {
        match self {
            Expr::Lit(_) => {}
            Expr::Name(n) => out.push(n.clone()),
            Expr::Neg(e) | Expr::Not(e) | Expr::Field(e, _) => e.names(out),
            Expr::Bin(_, a, b) | Expr::Index(a, b) => {
                a.names(out);
                b.names(out);
            }
            Expr::Cond(a, b, c) => {
                a.names(out);
                b.names(out);
                c.names(out);
            }
            Expr::Call(_, args) => args.iter().for_each(|a| a.names(out)),
        }
    }

    pub fn eval(&self, scope: &dyn Scope) -> Result<Value, String> {
        match self {
            Expr::Lit(v) => Ok(v.clone()),
            Expr::Name(n) => scope.get(n).ok_or_else(|| format!("unknown name '{n}'")),
            Expr::Neg(e) => match e.eval(scope)? {
                Value::Int(i) => i
                    .checked_neg()
                    .map(Value::Int)
                    .ok_or_else(|| format!("integer overflow in -({i})")),
                Value::Float(f) => Ok(Value::Float(-f)),
                v => Err(format!("cannot negate {}", v.type_name())),
            },
            Expr::Not(e) => Ok(Value::Bool(!e.eval(scope)?.truthy())),
            Expr::Cond(t, a, b) => {
                if t.eval(scope)?.truthy() {
                    a.eval(scope)
                } else {
                    b.eval(scope)
                }
            }
            Expr::Field(e, name) => match e.eval(scope)? {
                Value::Map(m) => Ok(m.get(name).cloned().unwrap_or(Value::Null)),
                Value::Null => Ok(Value::Null),
                v => Err(format!("cannot read field '{name}' of {}", v.type_name())),
            },
            Expr::Index(e, i) => {
                let base = e.eval(scope)?;
                let idx = i.eval(scope)?;
                match (&base, &idx) {
                    (Value::List(l), Value::Int(k)) => {
                        let k = if *k < 0 { l.len() as i64 + k } else { *k };
                        l.get(k as usize)
                            .cloned()
                            .ok_or_else(|| format!("index {k} out of range (len {})", l.len()))
                    }
                    (Value::Map(m), Value::Str(k)) => Ok(m.get(k).cloned().unwrap_or(Value::Null)),
                    (Value::Str(s), Value::Int(k)) => {
                        let n = s.chars().count() as i64;
                        let k = if *k < 0 { n + k } else { *k };
                        usize::try_from(k)
                            .ok()
                            .and_then(|k| s.chars().nth(k))
                            .map(|c| Value::Str(c.to_string()))
                            .ok_or_else(|| format!("index {k} out of range (len {n})"))
                    }
                    _ => Err(format!(
                        "cannot index {} with {}",
                        base.type_name(),
                        idx.type_name()
                    )),
                }
            }
            Expr::Bin(BinOp::And, a, b) => {
                let l = a.eval(scope)?;
                if !l.truthy() {
                    return Ok(Value::Bool(false));
                }
                Ok(Value::Bool(b.eval(scope)?.truthy()))
            }
            Expr::Bin(BinOp::Or, a, b) => {
                let l = a.eval(scope)?;
                if l.truthy() {
                    return Ok(l);
                }
                b.eval(scope)
            }
            Expr::Bin(op, a, b) => binary(*op, a.eval(scope)?, b.eval(scope)?),
            Expr::Call(f, args) => {
                let vals = args
                    .iter()
                    .map(|a| a.eval(scope))
                    .collect::<Result<Vec<_>, _>>()?;
                call(f, vals)
            }
        }
    }
}

fn num(v: &Value, what: &str) -> Result<f64, String> {
    v.as_f64()
        .ok_or_else(|| format!("{what} needs a number, got {}", v.type_name()))
}

fn binary(op: BinOp, l: Value, r: Value) -> Result<Value, String> {
    use BinOp::*;
    match op {
        Eq => return Ok(Value::Bool(values_eq(&l, &r))),
        Ne => return Ok(Value::Bool(!values_eq(&l, &r))),
        In => {
            return match &r {
                Value::List(items) => Ok(Value::Bool(items.iter().any(|x| values_eq(x, &l)))),
                Value::Map(m) => Ok(Value::Bool(l.as_str().is_some_and(|k| m.contains_key(k)))),
                Value::Str(s) => Ok(Value::Bool(l.as_str().is_some_and(|k| s.contains(k)))),
                Value::Null => Ok(Value::Bool(false)),
                _ => Err(format!(
                    "'in' needs a list, map or str, got {}",
                    r.type_name()
                )),
            }
        }
        _ => {}
    }
    if let (Add, Value::Str(a), Value::Str(b)) = (op, &l, &r) {
        return Ok(Value::Str(format!("{a}{b}")));
    }
    if let (Value::Int(a), Value::Int(b)) = (&l, &r) {
        let (a, b) = (*a, *b);
        let zero = || format!("division by zero in {a} {op:?} {b}");
        let overflow = || format!("integer overflow in {a} {op:?} {b}");
        return Ok(match op {
            Add => Value::Int(a.checked_add(b).ok_or_else(overflow)?),
            Sub => Value::Int(a.checked_sub(b).ok_or_else(overflow)?),
            Mul => Value::Int(a.checked_mul(b).ok_or_else(overflow)?),
            Div => {
                if b == 0 {
                    return Err(zero());
                }
                if a.checked_rem(b) == Some(0) {
                    Value::Int(a.checked_div(b).ok_or_else(overflow)?)
                } else {
                    Value::Float(a as f64 / b as f64)
                }
            }
            FloorDiv => {
                if b == 0 {
                    return Err(zero());
                }
                Value::Int(floor_div(a, b).ok_or_else(overflow)?)
            }
            Mod => {
                if b == 0 {
                    return Err(zero());
                }
                // Python's sign convention: the remainder takes the divisor's sign.
                let r = a.checked_rem(b).ok_or_else(overflow)?;
                Value::Int(if r != 0 && (r < 0) != (b < 0) {
                    r + b
                } else {
                    r
                })
            }
            Pow if b >= 0 => Value::Int(
                u32::try_from(b)
                    .ok()
                    .and_then(|e| a.checked_pow(e))
                    .ok_or_else(overflow)?,
            ),
            Pow => Value::Float((a as f64).powf(b as f64)),
            Lt => Value::Bool(a < b),
            Le => Value::Bool(a <= b),
            Gt => Value::Bool(a > b),
            Ge => Value::Bool(a >= b),
            Eq | Ne | In | And | Or => unreachable!("handled above"),
        });
    }
    let what = format!("{op:?}");
    let (a, b) = (num(&l, &what)?, num(&r, &what)?);
    Ok(match op {
        Add => Value::Float(a + b),
        Sub => Value::Float(a - b),
        Mul => Value::Float(a * b),
        Div => Value::Float(a / b),
        FloorDiv => Value::Float((a / b).floor()),
        Mod => Value::Float(a - b * (a / b).floor()),
        Pow => Value::Float(a.powf(b)),
        Lt => Value::Bool(a < b),
        Le => Value::Bool(a <= b),
        Gt => Value::Bool(a > b),
        Ge => Value::Bool(a >= b),
        Eq | Ne | In | And | Or => unreachable!("handled above"),
    })
}

/// Integer division rounding toward negative infinity, as Python's `//`
/// (`None` on overflow; `b` is not zero).
fn floor_div(a: i64, b: i64) -> Option<i64> {
    let q = a.checked_div(b)?;
    if a % b != 0 && ((a < 0) != (b < 0)) {
        q.checked_sub(1)
    } else {
        Some(q)
    }
}

/// Equality of values, numbers compared by value (`1 == 1.0`).
pub(crate) fn values_eq(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// `x` rounded to the nearest bfloat16 (ties to even), as a constant
/// created in bfloat16 and cast back.
fn round_bf16(x: f64) -> f64 {
    let bits = (x as f32).to_bits();
    if (x as f32).is_nan() {
        return x;
    }
    let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) & 0xFFFF_0000;
    f64::from(f32::from_bits(rounded))
}

fn call(f: &str, args: Vec<Value>) -> Result<Value, String> {
    let arity = |n: usize| {
        if args.len() == n {
            Ok(())
        } else {
            Err(format!("{f}() takes {n} argument(s), got {}", args.len()))
        }
    };
    match f {
        "list" => Ok(Value::List(args)),
        "min" | "max" => {
            if args.is_empty() {
                return Err(format!("{f}() needs arguments"));
            }
            let mut best = args[0].clone();
            for a in &args[1..] {
                let better = if f == "min" {
                    num(a, f)? < num(&best, f)?
                } else {
                    num(a, f)? > num(&best, f)?
                };
                if better {
                    best = a.clone();
                }
            }
            Ok(best)
        }
        "abs" => {
            arity(1)?;
            match &args[0] {
                Value::Int(i) => i
                    .checked_abs()
                    .map(Value::Int)
                    .ok_or_else(|| format!("integer overflow in abs({i})")),
                v => Ok(Value::Float(num(v, f)?.abs())),
            }
        }
        "int" | "floor" | "ceil" => {
            arity(1)?;
            let x = num(&args[0], f)?;
            let r = match f {
                "int" => x.trunc(),
                "floor" => x.floor(),
                _ => x.ceil(),
            };
            // i64's range is [-2^63, 2^63); beyond it (or NaN) there is no integer.
            const TWO_63: f64 = 9_223_372_036_854_775_808.0;
            if !(-TWO_63..TWO_63).contains(&r) {
                return Err(format!("{f}({x}) has no 64-bit integer value"));
            }
            Ok(Value::Int(r as i64))
        }
        "float" => {
            arity(1)?;
            Ok(Value::Float(num(&args[0], f)?))
        }
        "sqrt" | "log" | "exp" => {
            arity(1)?;
            let x = num(&args[0], f)?;
            Ok(Value::Float(match f {
                "sqrt" => x.sqrt(),
                "log" => x.ln(),
                _ => x.exp(),
            }))
        }
        "bf16" => {
            arity(1)?;
            Ok(Value::Float(round_bf16(num(&args[0], f)?)))
        }
        "len" => {
            arity(1)?;
            match &args[0] {
                Value::List(l) => Ok(Value::Int(l.len() as i64)),
                Value::Map(m) => Ok(Value::Int(m.len() as i64)),
                Value::Str(s) => Ok(Value::Int(s.chars().count() as i64)),
                v => Err(format!("len() of {}", v.type_name())),
            }
        }
        "str" => {
            // An int or a str as text (layer indices against lists in strings).
            arity(1)?;
            match &args[0] {
                Value::Int(k) => Ok(Value::Str(k.to_string())),
                Value::Str(t) => Ok(Value::Str(t.clone())),
                v => Err(format!("str() of {}", v.type_name())),
            }
        }
        "split" => {
            // "1, 3,5" -> ['1', '3', '5']: the pieces between separators, trimmed.
            arity(2)?;
            match (&args[0], &args[1]) {
                (Value::Str(t), Value::Str(sep)) if !sep.is_empty() => Ok(Value::List(
                    t.split(sep.as_str())
                        .map(|p| Value::Str(p.trim().to_string()))
                        .collect(),
                )),
                (a, b) => Err(format!(
                    "split({}, {}): a str and a non-empty str separator",
                    a.type_name(),
                    b.type_name()
                )),
            }
        }
        "rindex" => {
            // The last index before `end` where the list holds `value`.
            arity(3)?;
            match (&args[0], &args[2]) {
                (Value::List(l), Value::Int(end)) => {
                    let end = (*end).clamp(0, l.len() as i64) as usize;
                    Ok(l[..end]
                        .iter()
                        .rposition(|v| *v == args[1])
                        .map_or(Value::Null, |k| Value::Int(k as i64)))
                }
                (a, b) => Err(format!("rindex({}, _, {})", a.type_name(), b.type_name())),
            }
        }
        "pick" => {
            // One value for every layer, or a list with one per layer.
            arity(2)?;
            match (&args[0], &args[1]) {
                (Value::List(l), Value::Int(k)) => usize::try_from(*k)
                    .ok()
                    .and_then(|k| l.get(k).cloned())
                    .ok_or_else(|| format!("pick: index {k} of a list of {}", l.len())),
                (Value::List(_), k) => Err(format!(
                    "pick(list, {}): the index must be an int",
                    k.type_name()
                )),
                (v, _) => Ok(v.clone()),
            }
        }
        "get" => {
            if args.len() != 3 {
                return Err("get(map, key, default) takes 3 arguments".into());
            }
            match (&args[0], &args[1]) {
                (Value::Map(m), Value::Str(k)) => Ok(match m.get(k) {
                    Some(Value::Null) | None => args[2].clone(),
                    Some(v) => v.clone(),
                }),
                (Value::Null, _) => Ok(args[2].clone()),
                (a, b) => Err(format!("get({}, {}, _)", a.type_name(), b.type_name())),
            }
        }
        "set" => {
            let [m, k, v]: [Value; 3] = args
                .try_into()
                .map_err(|_| "set(map, key, value) takes 3 arguments".to_string())?;
            let mut m = match m {
                Value::Map(m) => m,
                Value::Null => IndexMap::new(),
                other => return Err(format!("set({}, _, _)", other.type_name())),
            };
            match k {
                Value::Str(k) => {
                    m.insert(k, v);
                    Ok(Value::Map(m))
                }
                other => Err(format!(
                    "set(_, {}, _): the key must be a str",
                    other.type_name()
                )),
            }
        }
        _ => Err(format!("unknown function '{f}'")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(src: &str) -> Value {
        let mut s = IndexMap::new();
        s.insert("hidden_size".to_string(), Value::Int(64));
        s.insert("n_heads".to_string(), Value::Int(4));
        s.insert(
            "types".to_string(),
            Value::List(vec![Value::Str("a".into()), Value::Str("b".into())]),
        );
        let mut m = IndexMap::new();
        m.insert("factor".to_string(), Value::Float(8.0));
        s.insert("scaling".to_string(), Value::Map(m));
        Expr::parse(src).and_then(|e| e.eval(&s)).expect(src)
    }

    #[test]
    fn arithmetic_and_precedence() {
        assert_eq!(eval("hidden_size / n_heads"), Value::Int(16));
        assert_eq!(eval("1 + 2 * 3 ** 2"), Value::Int(19));
        assert_eq!(eval("7 // 2"), Value::Int(3));
        assert_eq!(eval("7 / 2"), Value::Float(3.5));
        assert_eq!(eval("16 ** -0.5"), Value::Float(0.25));
        assert_eq!(eval("-3 % 4"), Value::Int(1));
        assert_eq!(eval("7 // -2"), Value::Int(-4));
        assert_eq!(eval("7 % -2"), Value::Int(-1));
        assert_eq!(eval("7.5 % -2"), Value::Float(-0.5));
        assert_eq!(eval("1e-5 * 2"), Value::Float(2e-5));
    }

    #[test]
    fn logic_fields_and_functions() {
        assert_eq!(eval("scaling.factor"), Value::Float(8.0));
        assert_eq!(eval("scaling.missing"), Value::Null);
        assert_eq!(eval("types[1] == 'b'"), Value::Bool(true));
        assert_eq!(eval("'a' in types and not 'c' in types"), Value::Bool(true));
        assert_eq!(
            eval("get(scaling, 'type', 'default')"),
            Value::Str("default".into())
        );
        assert_eq!(eval("1 if n_heads > 2 else 2"), Value::Int(1));
        assert_eq!(eval("max(1, 2.5, 2)"), Value::Float(2.5));
        assert_eq!(eval("[1, 2][0]"), Value::Int(1));
        // Strings index by character, negative from the end (a layer
        // pattern such as 'LLLG').
        assert_eq!(eval("'LLLG'[3]"), Value::Str("G".into()));
        assert_eq!(eval("'LLLG'[5 % len('LLLG')] == 'L'"), Value::Bool(true));
        assert_eq!(eval("'LG'[-1]"), Value::Str("G".into()));
        assert_eq!(eval("len('Zü')"), Value::Int(2));
        // bfloat16 keeps 8 significant bits: 32..64 in steps of 0.25.
        assert_eq!(eval("bf16(2048 ** 0.5)"), Value::Float(45.25));
        assert_eq!(eval("bf16(1152 ** 0.5)"), Value::Float(34.0));
        assert_eq!(eval("bf16(8)"), Value::Float(8.0));
        assert_eq!(eval("set(scaling, 'factor', 2).factor"), Value::Int(2));
        assert_eq!(eval("set(null, 'k', 'v').k"), Value::Str("v".into()));
        // One value for all layers, or one per layer.
        assert_eq!(eval("pick([4, 8], 1)"), Value::Int(8));
        assert_eq!(eval("pick(3, 1)"), Value::Int(3));
        assert_eq!(eval("rindex(['a', 'b', 'a', 'b'], 'a', 3)"), Value::Int(2));
        assert_eq!(eval("rindex(['a', 'b', 'a'], 'b', 1)"), Value::Null);
        let err = Expr::parse("pick([4], 2)")
            .and_then(|e| e.eval(&IndexMap::<String, Value>::new()))
            .expect_err("out of range");
        assert!(err.contains("index 2 of a list of 1"), "{err}");
        // Layer lists written as comma strings (step3p5's moe_layers_enum).
        assert_eq!(eval("str(3) in split('1, 3,5', ',')"), Value::Bool(true));
        assert_eq!(eval("str(2) in split('1, 3,5', ',')"), Value::Bool(false));
        assert_eq!(eval("len(split('7', ','))"), Value::Int(1));
        let err = Expr::parse("split('a', '')")
            .and_then(|e| e.eval(&IndexMap::<String, Value>::new()))
            .expect_err("empty separator");
        assert!(err.contains("non-empty"), "{err}");
    }

    #[test]
    fn errors_are_reported() {
        assert!(Expr::parse("1 +").is_err());
        assert!(Expr::parse("frobnicate(1)").is_err());
        assert!(Expr::parse("(1").is_err());
        let s: IndexMap<String, Value> = IndexMap::new();
        let err = Expr::parse("nope + 1")
            .and_then(|e| e.eval(&s))
            .unwrap_err();
        assert!(err.contains("unknown name 'nope'"), "{err}");
        assert!(Expr::parse("1 / 0").and_then(|e| e.eval(&s)).is_err());
        for src in ["'LG'[2]", "'LG'[-3]", "'LG'['a']"] {
            assert!(Expr::parse(src).and_then(|e| e.eval(&s)).is_err(), "{src}");
        }
        assert!(Expr::parse("9223372036854775807 + 1")
            .and_then(|e| e.eval(&s))
            .is_err());
        assert!(Expr::parse("2 ** 100").and_then(|e| e.eval(&s)).is_err());
    }

    #[test]
    fn hostile_expressions_are_errors() {
        let s: IndexMap<String, Value> = IndexMap::new();
        let run = |src: &str| Expr::parse(src).and_then(|e| e.eval(&s));
        let min = "(-9223372036854775807 - 1)";
        for src in [
            format!("{min} // -1"),
            format!("{min} % -1"),
            format!("-{min}"),
            format!("abs({min})"),
            "int(1e300)".to_string(),
            "floor(-1e19)".to_string(),
            "int(float('nan'))".to_string(),
            "é + 1".to_string(),
            "1 \u{85} 2".to_string(),
        ] {
            assert!(run(&src).is_err(), "{src} should be an error");
        }
        let deep = format!("{}1{}", "(".repeat(100_000), ")".repeat(100_000));
        assert!(run(&deep).unwrap_err().contains("tokens"));
        let nested = format!("{}1{}", "(".repeat(200), ")".repeat(200));
        assert!(run(&nested).unwrap_err().contains("nested"));
        assert!(run(&"-".repeat(500)).unwrap_err().contains("nested"));
        let long = vec!["1"; 600].join(" + ");
        assert!(run(&long).unwrap_err().contains("tokens"));
        // Python's signs for % and //.
        assert_eq!(run("-7 % 2"), Ok(Value::Int(1)));
        assert_eq!(run("7 % -2"), Ok(Value::Int(-1)));
        assert_eq!(run("-7 // 2"), Ok(Value::Int(-4)));
    }
}
