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
    ("group_fill", crate::ops::GroupFill::SPELLINGS),
    ("gqa", crate::ops::Gqa::SPELLINGS),
    ("moe_shard", crate::ops::MoeShard::SPELLINGS),
    ("glu", crate::ops::ExpertGlu::SPELLINGS),
];

/// Value types of config bindings and op parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    Int,
    Float,
    /// A size: an int from 1 to 2^31-1 (MLX shapes are 32-bit).
    Dim,
    /// How many of something: an int from 0 to 2^31-1.
    Count,
    /// A finite float above zero (epsilons, rotary bases, scales).
    Positive,
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
            "dim" => Ty::Dim,
            "count" => Ty::Count,
            "positive" => Ty::Positive,
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
        let mut out = vec![
            "int", "float", "dim", "count", "positive", "bool", "str", "list", "map", "any",
        ];
        out.extend(CHOICES.iter().map(|(n, _)| *n));
        out
    }

    pub fn name(self) -> &'static str {
        match self {
            Ty::Int => "int",
            Ty::Float => "float",
            Ty::Dim => "dim",
            Ty::Count => "count",
            Ty::Positive => "positive",
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
            (Ty::Dim | Ty::Count, v) => {
                let low = i64::from(self == Ty::Dim);
                match v.as_i64() {
                    Some(i) if (low..=i64::from(i32::MAX)).contains(&i) => Ok(Value::Int(i)),
                    Some(i) => Err(format!(
                        "{i} is outside {low}..={} (a {})",
                        i32::MAX,
                        self.name()
                    )),
                    None => bad(&v),
                }
            }
            (Ty::Positive, v) => match v.as_f64() {
                Some(f) if f.is_finite() && f > 0.0 => Ok(Value::Float(f)),
                Some(f) => Err(format!("{f} is not a finite number above zero")),
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
            let e = literal_or_expr(v, ty).map_err(|m| err(field, m))?;
            e.names(&mut names);
            if names.is_empty() && field != "per_layer" {
                // A constant: its value (or its error) is known now.
                let empty: IndexMap<String, Value> = IndexMap::new();
                e.eval(&empty)
                    .and_then(|v| ty.coerce(v))
                    .map_err(|m| err(field, m))?;
            }
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

/// Where bound config values came from: for each entry, the checkpoint
/// keys it was read or computed from, with their values as written.
pub type Provenance = IndexMap<String, Vec<(String, String)>>;

/// Binds every config entry of `spec` in [`config_order`].
pub fn bind(
    spec: &Spec,
    config: &serde_json::Value,
    config_file: &Path,
) -> Result<IndexMap<String, Value>> {
    Ok(bind_traced(spec, config, config_file)?.0)
}

/// The checkpoint keys (with values) behind `names`, without repeats.
pub fn sources_of(prov: &Provenance, names: &[String]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for n in names {
        for kv in prov.get(n).into_iter().flatten() {
            if !out.contains(kv) {
                out.push(kv.clone());
            }
        }
    }
    out
}

/// An error caused by checkpoint values: blamed on the config file and
/// the keys, with the spec's own words after them.
pub fn blame(config_file: &Path, sources: &[(String, String)], spec_error: &Error) -> Error {
    let keys: Vec<&str> = sources.iter().map(|(k, _)| k.as_str()).collect();
    let values: Vec<String> = sources.iter().map(|(k, v)| format!("{k} = {v}")).collect();
    Error::Config {
        file: config_file.to_path_buf(),
        key: keys.join(", "),
        msg: format!("{} is not supported: {spec_error}", values.join(", ")),
    }
}

/// [`bind`], also saying which checkpoint keys each entry came from. An
/// entry computed from checkpoint values that fails (a division by zero, a
/// range) is blamed on those keys.
pub fn bind_traced(
    spec: &Spec,
    config: &serde_json::Value,
    config_file: &Path,
) -> Result<(IndexMap<String, Value>, Provenance)> {
    let order = config_order(spec)?;
    let mut out: IndexMap<String, Value> = IndexMap::new();
    let mut prov: Provenance = IndexMap::new();
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
        // The checkpoint keys behind an expression of this entry.
        let reads = |v: &serde_yaml::Value| {
            let mut names = Vec::new();
            if let Ok(e) = literal_or_expr(v, ty) {
                e.names(&mut names);
            }
            sources_of(&prov, &names)
        };
        let eval = |v: &serde_yaml::Value, field: &str, out: &IndexMap<String, Value>| {
            literal_or_expr(v, ty)
                .and_then(|e| e.eval(out))
                .map_err(|m| {
                    let err = spec_err(field, m);
                    match reads(v) {
                        s if s.is_empty() => err,
                        s => blame(config_file, &s, &err),
                    }
                })
        };
        let mut sources = Vec::new();
        let mut direct = None;
        let value = if b.per_layer.is_some() {
            Value::Null
        } else if let Some(v) = &b.value {
            sources = reads(v);
            eval(v, "value", &out)?
        } else {
            let keys = match b.from.as_ref().map(|f| f.to_vec()) {
                Some(k) if !k.is_empty() => k,
                _ => vec![name.clone()],
            };
            match keys.iter().find_map(|k| lookup(config, k).map(|v| (k, v))) {
                Some((k, found)) => {
                    sources = vec![(k.clone(), found.to_string())];
                    direct = Some(k.clone());
                    Value::from_json(found)
                }
                None => match &b.default {
                    Some(d) => {
                        sources = reads(d);
                        eval(d, "default", &out)?
                    }
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
        let value = ty.coerce(value).map_err(|msg| match &direct {
            Some(k) => Error::Config {
                file: config_file.to_path_buf(),
                key: k.clone(),
                msg,
            },
            None if sources.is_empty() => spec_err("value", msg),
            None => blame(config_file, &sources, &spec_err("value", msg)),
        })?;
        out.insert(name.clone(), value);
        prov.insert(name.clone(), sources);
    }
    check_only_keys(spec, config, config_file)?;
    Ok((out, prov))
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

/// Evaluates the expressions of a spec's weight rules against a bound
/// config; with a layer index, in the scope that layer's blocks see
/// ([`layer_scope`]).
#[derive(Debug)]
pub struct RuleScope<'a> {
    spec: &'a Spec,
    order: Vec<String>,
    config: &'a IndexMap<String, Value>,
}

impl<'a> RuleScope<'a> {
    pub fn new(spec: &'a Spec, config: &'a IndexMap<String, Value>) -> Result<RuleScope<'a>> {
        let order = config_order(spec)?.into_iter().map(String::from).collect();
        Ok(RuleScope {
            spec,
            order,
            config,
        })
    }

    /// `v` (a literal or an expression) as a value of type `ty`.
    pub fn eval(
        &self,
        v: &serde_yaml::Value,
        ty: Ty,
        layer: Option<i64>,
    ) -> std::result::Result<Value, String> {
        let e = literal_or_expr(v, ty)?;
        let value = match layer {
            Some(i) => {
                let scope = layer_scope(self.spec, &self.order, self.config, i)
                    .map_err(|e| e.to_string())?;
                e.eval(&scope)?
            }
            None => e.eval(self.config)?,
        };
        ty.coerce(value)
    }
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

/// Refuses a checkpoint that sets a key of `config_keys.only` to another
/// value than the one the spec supports.
fn check_only_keys(spec: &Spec, config: &serde_json::Value, config_file: &Path) -> Result<()> {
    for (key, allowed) in &spec.only_keys {
        let Some(found) = lookup(config, key) else {
            continue;
        };
        let want = Value::from_yaml(&allowed.item);
        if !crate::expr::values_eq(&Value::from_json(found), &want) {
            return Err(Error::Config {
                file: config_file.to_path_buf(),
                key: key.clone(),
                msg: format!(
                    "{found} is not supported by spec '{}' ({}): only {want} is",
                    spec.name,
                    allowed.file.display()
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranged_types_refuse_values_outside_their_range() {
        let ok = |ty: Ty, v: Value| ty.coerce(v).is_ok();
        assert!(ok(Ty::Dim, Value::Int(1)) && !ok(Ty::Dim, Value::Int(0)));
        assert!(!ok(Ty::Dim, Value::Int(1 << 31)) && ok(Ty::Dim, Value::Float(4.0)));
        assert!(ok(Ty::Count, Value::Int(0)) && !ok(Ty::Count, Value::Int(-1)));
        assert!(ok(Ty::Positive, Value::Float(1e-6)) && ok(Ty::Positive, Value::Int(2)));
        for bad in [0.0, -1.0, f64::INFINITY, f64::NAN] {
            assert!(!ok(Ty::Positive, Value::Float(bad)), "{bad}");
        }
        assert!(!ok(Ty::Dim, Value::Str("4".into())) && ok(Ty::Dim, Value::Null));
    }
}
