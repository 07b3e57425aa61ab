//! Config binding: turning a checkpoint's `config.json` into the typed values
//! a spec's expressions read.
use std::path::Path;

use indexmap::IndexMap;

use crate::error::{Error, Result};
use crate::expr::{Expr, Scope, Value};
use crate::library::Spec;

/// The choice enums config entries may be typed with (`type: act`), by
/// name: a config value of such a type is checked against the spellings
/// when it is bound, and `check` verifies that an op parameter reading it
/// (`fn: =mlp_act`) takes every one of them.
pub static CHOICES: &[(&str, &[&str])] = &[
    ("act", crate::ops::Act::SPELLINGS),
    ("routing", crate::ops::Routing::SPELLINGS),
    ("group_score", crate::ops::GroupScore::SPELLINGS),
];

/// Value types of config bindings and op parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    Int,
    Float,
    Bool,
    Str,
    List,
    Map,
    Any,
    /// One word of an op's choice enum (`act`, `routing`, `group_score`):
    /// its name and spellings.
    Choice(&'static str, &'static [&'static str]),
}

impl Ty {
    pub fn parse(s: &str) -> Option<Ty> {
        Some(match s {
            "int" => Ty::Int,
            "float" => Ty::Float,
            "bool" => Ty::Bool,
            "str" => Ty::Str,
            "list" => Ty::List,
            "map" => Ty::Map,
            "any" => Ty::Any,
            other => {
                let (name, words) = CHOICES.iter().find(|(n, _)| *n == other)?;
                Ty::Choice(name, words)
            }
        })
    }

    /// Every type name a config entry may give.
    pub fn names() -> Vec<&'static str> {
        let mut out = vec!["int", "float", "bool", "str", "list", "map", "any"];
        out.extend(CHOICES.iter().map(|(n, _)| *n));
        out
    }

    pub fn name(self) -> &'static str {
        match self {
            Ty::Int => "int",
            Ty::Float => "float",
            Ty::Bool => "bool",
            Ty::Str => "str",
            Ty::List => "list",
            Ty::Map => "map",
            Ty::Any => "any",
            Ty::Choice(name, _) => name,
        }
    }

    /// Converts `v` to this type (ints widen to floats, integral floats
    /// narrow to ints); `null` passes through.
    pub fn coerce(self, v: Value) -> std::result::Result<Value, String> {
        let bad = |v: &Value| {
            Err(format!(
                "expected {}, got {} {v}",
                self.name(),
                v.type_name()
            ))
        };
        match (self, v) {
            (_, Value::Null) => Ok(Value::Null),
            (Ty::Any, v) => Ok(v),
            (Ty::Int, v) => match v.as_i64() {
                Some(i) => Ok(Value::Int(i)),
                None => bad(&v),
            },
            (Ty::Float, v) => match v.as_f64() {
                Some(f) => Ok(Value::Float(f)),
                None => bad(&v),
            },
            (Ty::Bool, Value::Bool(b)) => Ok(Value::Bool(b)),
            (Ty::Str, Value::Str(s)) => Ok(Value::Str(s)),
            (Ty::Choice(name, words), Value::Str(s)) => match words.contains(&s.as_str()) {
                true => Ok(Value::Str(s)),
                false => Err(format!(
                    "'{s}' is not one of the {name} words ({})",
                    words.join(", ")
                )),
            },
            (Ty::List, Value::List(l)) => Ok(Value::List(l)),
            (Ty::Map, Value::Map(m)) => Ok(Value::Map(m)),
            (_, v) => bad(&v),
        }
    }
}

/// A spec value: a literal, or an expression. A YAML string is an expression
/// where the expected type is a number, bool, list, map or any; for `str` it
/// is an expression only when it starts with `=`.
pub fn literal_or_expr(v: &serde_yaml::Value, ty: Ty) -> std::result::Result<Expr, String> {
    match v {
        serde_yaml::Value::String(s) => match (ty, s.strip_prefix('=')) {
            (_, Some(e)) => Expr::parse(e),
            (Ty::Str | Ty::Choice(..), None) => Ok(Expr::Lit(Value::Str(s.clone()))),
            _ => Expr::parse(s),
        },
        other => Ok(Expr::Lit(Value::from_yaml(other))),
    }
}

fn lookup<'a>(config: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    let mut cur = config;
    for part in key.split('.') {
        cur = cur.get(part)?;
    }
    (!cur.is_null()).then_some(cur)
}

/// Config entries in evaluation order: declaration order, except that an
/// entry waits for the entries its `default`, `value` or `per_layer` reads
/// (so a child spec's override may read entries the child adds). An unknown
/// name, `i` outside `per_layer`, a `per_layer` entry with a value, default
/// or key, and a cycle are spec errors naming the entry and its file.
pub fn config_order(spec: &Spec) -> Result<Vec<&str>> {
    let mut deps: IndexMap<&str, Vec<String>> = IndexMap::new();
    for (name, def) in &spec.config {
        let b = &def.item;
        let err =
            |field: &str, m: String| Error::spec(&def.file, format!("config.{name}"), field, m);
        if b.per_layer.is_some() && (b.value.is_some() || b.default.is_some() || b.from.is_some()) {
            return Err(err(
                "per_layer",
                "a per-layer entry takes no value, default or from".into(),
            ));
        }
        let ty = Ty::parse(&b.ty).unwrap_or(Ty::Any);
        let mut reads = Vec::new();
        for (field, v) in [
            ("default", &b.default),
            ("value", &b.value),
            ("per_layer", &b.per_layer),
        ] {
            let Some(v) = v else { continue };
            let mut names = Vec::new();
            literal_or_expr(v, ty)
                .map_err(|m| err(field, m))?
                .names(&mut names);
            for n in names {
                if n == "i" && field == "per_layer" {
                    continue;
                }
                if n == "i" {
                    return Err(err(
                        field,
                        "reads 'i', the layer index, which only `per_layer` entries see".into(),
                    ));
                }
                if !spec.config.contains_key(&n) {
                    return Err(err(
                        field,
                        format!("reads '{n}', which is not a config entry"),
                    ));
                }
                reads.push(n);
            }
        }
        deps.insert(name.as_str(), reads);
    }
    let mut done: std::collections::HashSet<&str> = std::collections::HashSet::new();
    let mut order = Vec::with_capacity(deps.len());
    while order.len() < deps.len() {
        let next = deps.iter().find(|(name, reads)| {
            !done.contains(*name) && reads.iter().all(|r| done.contains(r.as_str()))
        });
        match next {
            Some((name, _)) => {
                done.insert(name);
                order.push(*name);
            }
            None => {
                let (stuck, def) = spec
                    .config
                    .iter()
                    .find(|(n, _)| !done.contains(n.as_str()))
                    .expect("an entry is left when the order is short");
                return Err(Error::spec(
                    &def.file,
                    format!("config.{stuck}"),
                    "value",
                    "config entries read each other in a cycle",
                ));
            }
        }
    }
    Ok(order)
}

/// Binds every config entry of `spec` in [`config_order`].
pub fn bind(
    spec: &Spec,
    config: &serde_json::Value,
    config_file: &Path,
) -> Result<IndexMap<String, Value>> {
    let order = config_order(spec)?;
    let mut out: IndexMap<String, Value> = IndexMap::new();
    for name in order {
        let def = &spec.config[name];
        let name = &name.to_string();
        let b = &def.item;
        let ty = Ty::parse(&b.ty).ok_or_else(|| {
            Error::spec(
                &def.file,
                format!("config.{name}"),
                "type",
                format!("unknown type '{}'", b.ty),
            )
        })?;
        let spec_err =
            |field: &str, msg: String| Error::spec(&def.file, format!("config.{name}"), field, msg);
        let eval = |v: &serde_yaml::Value, field: &str, out: &IndexMap<String, Value>| {
            literal_or_expr(v, ty)
                .and_then(|e| e.eval(out))
                .map_err(|m| spec_err(field, m))
        };
        let value = if b.per_layer.is_some() {
            Value::Null
        } else if let Some(v) = &b.value {
            eval(v, "value", &out)?
        } else {
            let keys = match b.from.as_ref().map(|f| f.to_vec()) {
                Some(k) if !k.is_empty() => k,
                _ => vec![name.clone()],
            };
            match keys.iter().find_map(|k| lookup(config, k)) {
                Some(found) => Value::from_json(found),
                None => match &b.default {
                    Some(d) => eval(d, "default", &out)?,
                    None if b.optional => Value::Null,
                    None => {
                        return Err(Error::Config {
                            file: config_file.to_path_buf(),
                            key: name.clone(),
                            msg: format!(
                                "missing (looked for {}) and spec {} gives no default",
                                keys.join(", "),
                                def.file.display()
                            ),
                        })
                    }
                },
            }
        };
        let value = ty.coerce(value).map_err(|msg| Error::Config {
            file: config_file.to_path_buf(),
            key: name.clone(),
            msg,
        })?;
        out.insert(name.clone(), value);
    }
    Ok(out)
}

/// The names layer `i` sees: the bound config, `i`, and every `per_layer`
/// entry, evaluated in `order` (from [`config_order`]).
pub fn layer_scope(
    spec: &Spec,
    order: &[String],
    config: &IndexMap<String, Value>,
    i: i64,
) -> Result<IndexMap<String, Value>> {
    let mut out = config.clone();
    out.insert("i".to_string(), Value::Int(i));
    for name in order {
        let Some(def) = spec.config.get(name) else {
            continue;
        };
        let Some(v) = &def.item.per_layer else {
            continue;
        };
        let ty = Ty::parse(&def.item.ty).unwrap_or(Ty::Any);
        let value = literal_or_expr(v, ty)
            .and_then(|e| e.eval(&out))
            .and_then(|v| ty.coerce(v))
            .map_err(|m| {
                Error::spec(
                    &def.file,
                    format!("config.{name}"),
                    "per_layer",
                    format!("layer {i}: {m}"),
                )
            })?;
        out.insert(name.clone(), value);
    }
    Ok(out)
}

/// Evaluates a condition written in a spec (a weight rule's `when`);
/// anything but a bool is an error.
pub fn eval_bool(v: &serde_yaml::Value, scope: &dyn Scope) -> std::result::Result<bool, String> {
    eval_cond(&literal_or_expr(v, Ty::Bool)?, scope)
}

/// Evaluates a parsed condition; anything but a bool is an error.
pub fn eval_cond(e: &Expr, scope: &dyn Scope) -> std::result::Result<bool, String> {
    match e.eval(scope)? {
        Value::Bool(b) => Ok(b),
        other => Err(format!(
            "condition gave {} {other}, expected a bool",
            other.type_name()
        )),
    }
}
