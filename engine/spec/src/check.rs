//! Validation of a spec without a config: every node names a known op or
//! block, parameters fit the op's schema, expressions parse and read
//! declared names, inputs exist and blocks are acyclic (petgraph). The
//! result, a [`CheckedSpec`], holds the parsed expressions and resolved
//! references that [`crate::expand`] walks.
use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use petgraph::algo::toposort;
use petgraph::graphmap::DiGraphMap;

use crate::config::{literal_or_expr, Ty};
use crate::error::{Error, Result};
use crate::expr::{Expr, Value};
use crate::graph::TOKENS;
use crate::library::{Sourced, Spec};
use crate::ops::{self, OpEntry, ParamKind};
use crate::raw::{RawBlock, RawNode, RawRule};

/// The op name of the node that runs the layer schedule.
pub const LAYERS_OP: &str = "layers";
/// The op name of a node that cuts a value into named parts.
pub const SPLIT_OP: &str = "split";

/// A spec that passed [`check`]: its blocks with parsed expressions and
/// resolved references, and its config entries in evaluation order.
#[derive(Debug, Clone)]
pub struct CheckedSpec {
    pub spec: Spec,
    pub(crate) order: Vec<String>,
    pub(crate) blocks: IndexMap<String, CheckedBlock>,
    pub(crate) layers: Option<CheckedLayers>,
}

impl CheckedSpec {
    /// Config entries in evaluation order (dependencies first).
    pub fn config_order(&self) -> &[String] {
        &self.order
    }

    /// The names read by `field` of `node` (as errors name them:
    /// `model.nodes.x`, `blocks.b.nodes.x`, `layers`); every name the node
    /// reads when that field reads none.
    pub fn names_read(&self, node: &str, field: &str) -> Vec<String> {
        let mut out = Vec::new();
        if node == "layers" || node.starts_with("layers.select") {
            if let Some(l) = &self.layers {
                l.count.names(&mut out);
                l.select
                    .iter()
                    .flat_map(|s| &s.0)
                    .for_each(|e| e.names(&mut out));
            }
            return out;
        }
        let Some((label, name)) = node.rsplit_once(".nodes.") else {
            return out;
        };
        let Some(n) = self
            .blocks
            .values()
            .find(|b| b.label == label)
            .and_then(|b| b.nodes.iter().find(|n| n.name == name))
        else {
            return out;
        };
        let exprs: Vec<(&str, &Expr)> = match &n.kind {
            NodeKind::Op { entry, params } => entry
                .schema
                .params
                .iter()
                .zip(params)
                .filter_map(|(def, p)| match p {
                    ParamSource::Expr(_, e) | ParamSource::Choice(_, e) => Some((def.name, e)),
                    _ => None,
                })
                .collect(),
            NodeKind::Split { sizes, .. } => sizes.iter().map(|e| ("sizes", e)).collect(),
            _ => Vec::new(),
        };
        if let Some((_, e)) = exprs.iter().find(|(f, _)| *f == field) {
            // The field's own expression: what it reads (a constant reads
            // nothing: then the spec, not the checkpoint, is at fault).
            e.names(&mut out);
        } else {
            // Not an expression (an input's layout, say): whatever the
            // block's nodes read may have shaped it.
            for node in self
                .blocks
                .values()
                .filter(|b| b.label == label)
                .flat_map(|b| &b.nodes)
            {
                if let NodeKind::Op { params, .. } = &node.kind {
                    for p in params {
                        if let ParamSource::Expr(Ty::Int, e) = p {
                            e.names(&mut out);
                        }
                    }
                }
            }
        }
        out
    }
}

#[derive(Debug, Clone)]
pub(crate) struct CheckedBlock {
    pub file: PathBuf,
    /// `model` or `blocks.NAME`, as errors name it.
    pub label: String,
    pub inputs: Vec<String>,
    /// Nodes in declaration order, except that a node waits for the values
    /// it reads (a stable topological order).
    pub nodes: Vec<CheckedNode>,
    pub output: String,
}

#[derive(Debug, Clone)]
pub(crate) struct CheckedNode {
    pub name: String,
    pub inputs: Vec<String>,
    pub when: Option<Expr>,
    pub otherwise: Option<String>,
    pub scope: Option<String>,
    pub kind: NodeKind,
}

#[derive(Debug, Clone)]
pub(crate) enum NodeKind {
    Op {
        entry: &'static OpEntry,
        params: Vec<ParamSource>,
    },
    Block(String),
    Layers,
    Split {
        sizes: Vec<Expr>,
        outs: Vec<String>,
    },
}

/// Where a parameter's value comes from, in schema order.
#[derive(Debug, Clone)]
pub(crate) enum ParamSource {
    /// An expression (or literal) of this type.
    Expr(Ty, Expr),
    /// One word of a choice, possibly computed (`=expr`).
    Choice(&'static [&'static str], Expr),
    /// A weight name, as written.
    Weight(Value),
    /// The schema's default.
    Default(fn() -> Value),
}

/// A piece of a layer prefix: literal text or an `{expression}`.
#[derive(Debug, Clone)]
pub(crate) enum PrefixPart {
    Text(String),
    Expr(Expr),
}

/// Splits `model.layers.{i % n}` into text and expressions, each
/// expression checked against the names the layer schedule knows.
fn parse_prefix(
    prefix: &str,
    known: &HashSet<String>,
) -> std::result::Result<Vec<PrefixPart>, String> {
    let mut out = Vec::new();
    let mut rest = prefix;
    while let Some(open) = rest.find('{') {
        if rest[..open].contains('}') {
            return Err(format!("'{prefix}': a '}}' without its '{{'"));
        }
        if open > 0 {
            out.push(PrefixPart::Text(rest[..open].to_string()));
        }
        let close = rest[open..]
            .find('}')
            .map(|c| c + open)
            .ok_or_else(|| format!("'{prefix}': a '{{' without its '}}'"))?;
        let e = parse_known(
            &serde_yaml::Value::String(rest[open + 1..close].to_string()),
            Ty::Int,
            known,
        )
        .map_err(|m| format!("'{prefix}': {m}"))?;
        out.push(PrefixPart::Expr(e));
        rest = &rest[close + 1..];
    }
    if rest.contains('}') {
        return Err(format!("'{prefix}': a '}}' without its '{{'"));
    }
    if !rest.is_empty() {
        out.push(PrefixPart::Text(rest.to_string()));
    }
    Ok(out)
}

#[derive(Debug, Clone)]
pub(crate) struct CheckedLayers {
    pub file: PathBuf,
    pub count: Expr,
    pub prefix: Vec<PrefixPart>,
    pub block: Option<String>,
    pub select: Vec<(Option<Expr>, String)>,
}

fn node_err(file: &Path, block: &str, node: &str, field: &str, msg: impl Into<String>) -> Error {
    Error::spec(file, format!("{block}.nodes.{node}"), field, msg)
}

pub(crate) fn block_label(name: &str) -> String {
    if name == "model" {
        "model".to_string()
    } else {
        format!("blocks.{name}")
    }
}

/// Parses an expression and checks that it reads only `known` names.
fn parse_known(
    v: &serde_yaml::Value,
    ty: Ty,
    known: &HashSet<String>,
) -> std::result::Result<Expr, String> {
    let e = literal_or_expr(v, ty)?;
    let mut names = Vec::new();
    e.names(&mut names);
    match names.iter().find(|n| !known.contains(*n)) {
        Some(n) => Err(format!("unknown name '{n}'")),
        None => Ok(e),
    }
}

/// Blocks the spec can run: called from the model block or the layer
/// schedule, directly or through other blocks. Library blocks a spec never
/// uses are not its concern.
pub fn reachable_blocks(spec: &Spec) -> HashSet<&str> {
    let mut todo: Vec<&str> = Vec::new();
    if let Some(l) = &spec.layers {
        todo.extend(l.item.block.iter().map(String::as_str));
        todo.extend(l.item.select.iter().map(|s| s.block.as_str()));
    }
    let callees = |b: &RawBlock| -> Vec<String> {
        b.nodes.values().filter_map(|n| n.block.clone()).collect()
    };
    let mut pending = callees(&spec.model.item);
    let mut seen: HashSet<&str> = HashSet::new();
    loop {
        for c in pending.drain(..) {
            if let Some((k, _)) = spec.blocks.get_key_value(c.as_str()) {
                todo.push(k.as_str());
            }
        }
        let Some(name) = todo.pop() else { break };
        if seen.insert(name) {
            if let Some(b) = spec.blocks.get(name) {
                pending = callees(&b.item);
            }
        }
    }
    seen
}

/// Validates a spec without a config.
pub fn check(spec: &Spec) -> Result<CheckedSpec> {
    let mut known: HashSet<String> = HashSet::new();
    for (name, def) in &spec.config {
        let b = &def.item;
        Ty::parse(&b.ty).ok_or_else(|| {
            Error::spec(
                &def.file,
                format!("config.{name}"),
                "type",
                format!(
                    "unknown type '{}' (known: {})",
                    b.ty,
                    Ty::names().join(", ")
                ),
            )
        })?;
        known.insert(name.clone());
    }
    let order: Vec<String> = crate::config::config_order(spec)?
        .into_iter()
        .map(str::to_string)
        .collect();
    known.insert("i".to_string());

    let mut calls: DiGraphMap<&str, (), RandomState> = DiGraphMap::new();
    let used = reachable_blocks(spec);
    let mut all: Vec<(&str, &Sourced<RawBlock>)> = spec
        .blocks
        .iter()
        .filter(|(k, _)| used.contains(k.as_str()))
        .map(|(k, b)| (k.as_str(), b))
        .collect();
    all.push(("model", &spec.model));
    let mut blocks = IndexMap::new();
    for (name, block) in &all {
        calls.add_node(name);
        blocks.insert(name.to_string(), check_block(spec, name, block, &known)?);
        for node in block.item.nodes.values() {
            if let Some(callee) = &node.block {
                calls.add_edge(name, callee.as_str(), ());
            }
        }
    }
    if let Err(cycle) = toposort(&calls, None) {
        let (file, name) = all
            .iter()
            .find(|(n, _)| *n == cycle.node_id())
            .map(|(n, b)| (b.file.clone(), n.to_string()))
            .unwrap_or_default();
        return Err(Error::spec(
            file,
            block_label(&name),
            "block",
            "blocks call each other in a cycle",
        ));
    }
    let layers = match &spec.layers {
        Some(layers) => Some(check_layers(spec, layers, &known)?),
        None => None,
    };
    check_rules(spec)?;
    Ok(CheckedSpec {
        spec: spec.clone(),
        order,
        blocks,
        layers,
    })
}

fn check_layers(
    spec: &Spec,
    layers: &Sourced<crate::raw::RawLayers>,
    known: &HashSet<String>,
) -> Result<CheckedLayers> {
    let l = &layers.item;
    let file = &layers.file;
    let count = parse_known(&l.count, Ty::Int, known)
        .map_err(|m| Error::spec(file, "layers", "count", m))?;
    let mut reads = Vec::new();
    count.names(&mut reads);
    if reads.is_empty() {
        // A constant count: its value is known now, limit included.
        let empty: IndexMap<String, crate::expr::Value> = IndexMap::new();
        let n = count
            .eval(&empty)
            .map_err(|m| Error::spec(file, "layers", "count", m))?;
        let max = crate::limits::limits()?.max_layers;
        if n.as_i64().is_some_and(|n| n < 0 || n as u64 > max) {
            return Err(Error::spec(
                file,
                "layers",
                "count",
                format!("{n} layers are not within 0..={max} (LMSPEC_MAX_LAYERS)"),
            ));
        }
    }
    let mut blocks: Vec<(String, &str)> = l.block.iter().map(|b| (b.clone(), "block")).collect();
    let mut select = Vec::new();
    for (k, s) in l.select.iter().enumerate() {
        blocks.push((s.block.clone(), "select"));
        let when = match &s.when {
            Some(w) => Some(
                parse_known(w, Ty::Bool, known)
                    .map_err(|m| Error::spec(file, format!("layers.select[{k}]"), "when", m))?,
            ),
            None => None,
        };
        select.push((when, s.block.clone()));
    }
    if blocks.is_empty() {
        return Err(Error::spec(
            file,
            "layers",
            "block",
            "give `block` or `select`",
        ));
    }
    for (b, field) in blocks {
        match spec.blocks.get(&b) {
            None => {
                return Err(Error::spec(
                    file,
                    "layers",
                    field,
                    format!("unknown block '{b}'"),
                ))
            }
            Some(def) if def.item.inputs.len() != 1 => {
                return Err(Error::spec(
                    file,
                    "layers",
                    field,
                    format!("layer block '{b}' must take exactly one input"),
                ))
            }
            Some(_) => {}
        }
    }
    let prefix =
        parse_prefix(&l.prefix, known).map_err(|m| Error::spec(file, "layers", "prefix", m))?;
    Ok(CheckedLayers {
        file: file.clone(),
        count,
        prefix,
        block: l.block.clone(),
        select,
    })
}

/// A rule's `if_shape` condition parses and reads only `shape`.
fn check_if_shape(cond: Option<&str>) -> std::result::Result<(), String> {
    let Some(src) = cond else { return Ok(()) };
    let e = Expr::parse(src).map_err(|m| format!("if_shape: {m}"))?;
    let mut names = Vec::new();
    e.names(&mut names);
    match names.iter().find(|n| n.as_str() != "shape") {
        Some(n) => Err(format!(
            "if_shape: unknown name '{n}' (it reads only `shape`)"
        )),
        None => Ok(()),
    }
}

fn check_rules(spec: &Spec) -> Result<()> {
    use crate::pattern::Pattern;
    for rule in &spec.rules {
        let (field, patterns): (&str, Vec<&str>) = match &rule.item {
            RawRule::Drop(p) => ("drop", vec![p]),
            RawRule::DropWhen { pattern, when } => {
                literal_or_expr(when, Ty::Bool).map_err(|m| {
                    Error::spec(&rule.file, "weights.rules", "drop", format!("when: {m}"))
                })?;
                ("drop", vec![pattern])
            }
            RawRule::Rename { from, to } => ("rename", vec![from, to]),
            RawRule::Tie { target, source, .. } => ("tie", vec![target, source]),
            RawRule::SkipIfPresent(p) => ("skip_if_present", vec![p]),
            RawRule::Transpose(p) => ("transpose", vec![p]),
            RawRule::Stack { from, to, index } => {
                let caps = Pattern::parse(from)
                    .map(|p| p.captures())
                    .map_err(|m| Error::spec(&rule.file, "weights.rules", "stack", m))?;
                if !caps.iter().any(|c| c == index) {
                    return Err(Error::spec(
                        &rule.file,
                        "weights.rules",
                        "stack",
                        format!("index '{index}' is not a capture of '{from}'"),
                    ));
                }
                ("stack", vec![from, to])
            }
            RawRule::Reshape { pattern, shape } => {
                let exprs = shape.iter().map(|v| literal_or_expr(v, Ty::Int));
                if let Some(Err(m)) = exprs.into_iter().find(|e| e.is_err()) {
                    return Err(Error::spec(&rule.file, "weights.rules", "reshape", m));
                }
                let unknown = shape.iter().filter(|v| v.as_i64() == Some(-1)).count();
                if unknown > 1 {
                    return Err(Error::spec(
                        &rule.file,
                        "weights.rules",
                        "reshape",
                        "shape: at most one size may be -1",
                    ));
                }
                ("reshape", vec![pattern])
            }
            RawRule::Repeat { pattern, times, .. } => {
                literal_or_expr(times, Ty::Int)
                    .map_err(|m| Error::spec(&rule.file, "weights.rules", "repeat", m))?;
                ("repeat", vec![pattern])
            }
            RawRule::L2Normalize { pattern, eps, .. } => {
                if !(eps.is_finite() && *eps >= 0.0) {
                    return Err(Error::spec(
                        &rule.file,
                        "weights.rules",
                        "l2_normalize",
                        format!("eps: {eps} is not a finite number at least 0"),
                    ));
                }
                ("l2_normalize", vec![pattern])
            }
            RawRule::MoveAxis {
                pattern, if_shape, ..
            } => {
                check_if_shape(if_shape.as_deref())
                    .map_err(|m| Error::spec(&rule.file, "weights.rules", "moveaxis", m))?;
                ("moveaxis", vec![pattern])
            }
            RawRule::Split {
                pattern,
                to,
                sizes,
                interleaved,
                ..
            } => {
                if let Some(sizes) = sizes {
                    if sizes.len() != to.len() || *interleaved {
                        return Err(Error::spec(
                            &rule.file,
                            "weights.rules",
                            "split",
                            format!(
                                "sizes: {} size(s) for {} part(s){}",
                                sizes.len(),
                                to.len(),
                                if *interleaved {
                                    ", and interleaved parts are equal"
                                } else {
                                    ""
                                }
                            ),
                        ));
                    }
                    for v in sizes {
                        literal_or_expr(v, Ty::Int)
                            .map_err(|m| Error::spec(&rule.file, "weights.rules", "split", m))?;
                    }
                }
                if to.len() < 2 {
                    return Err(Error::spec(
                        &rule.file,
                        "weights.rules",
                        "split",
                        format!("to: {} name(s); a split makes at least 2", to.len()),
                    ));
                }
                let caps = Pattern::parse(pattern)
                    .map(|p| p.captures())
                    .map_err(|m| Error::spec(&rule.file, "weights.rules", "split", m))?;
                for t in to {
                    let p = Pattern::parse(t)
                        .map_err(|m| Error::spec(&rule.file, "weights.rules", "split", m))?;
                    if let Some(c) = p.captures().into_iter().find(|c| !caps.contains(c)) {
                        return Err(Error::spec(
                            &rule.file,
                            "weights.rules",
                            "split",
                            format!("'{t}': capture '{c}' is not set by '{pattern}'"),
                        ));
                    }
                }
                ("split", vec![pattern])
            }
            RawRule::Fp8 {
                pattern,
                scale,
                block,
            } => {
                if *block < 1 {
                    return Err(Error::spec(
                        &rule.file,
                        "weights.rules",
                        "fp8",
                        format!("block: {block} is not 1 or more"),
                    ));
                }
                let caps = Pattern::parse(pattern)
                    .map(|p| p.captures())
                    .map_err(|m| Error::spec(&rule.file, "weights.rules", "fp8", m))?;
                let p = Pattern::parse(scale)
                    .map_err(|m| Error::spec(&rule.file, "weights.rules", "fp8", m))?;
                if let Some(c) = p.captures().into_iter().find(|c| !caps.contains(c)) {
                    return Err(Error::spec(
                        &rule.file,
                        "weights.rules",
                        "fp8",
                        format!("scale '{scale}': capture '{c}' is not set by '{pattern}'"),
                    ));
                }
                ("fp8", vec![pattern])
            }
            RawRule::Ternary { pattern, scale } => {
                let bad = |m: String| Error::spec(&rule.file, "weights.rules", "ternary", m);
                let caps = Pattern::parse(pattern).map(|p| p.captures()).map_err(bad)?;
                let p = Pattern::parse(scale).map_err(bad)?;
                if let Some(c) = p.captures().into_iter().find(|c| !caps.contains(c)) {
                    return Err(bad(format!(
                        "scale '{scale}': capture '{c}' is not set by '{pattern}'"
                    )));
                }
                ("ternary", vec![pattern])
            }
            RawRule::Hadamard {
                pattern,
                manifest,
                block,
                when,
            } => {
                let bad = |m: String| Error::spec(&rule.file, "weights.rules", "hadamard", m);
                Pattern::parse(pattern).map_err(bad)?;
                literal_or_expr(manifest, Ty::List).map_err(|m| bad(format!("manifest: {m}")))?;
                if let Some(w) = when {
                    literal_or_expr(w, Ty::Bool).map_err(|m| bad(format!("when: {m}")))?;
                }
                if block.is_empty() {
                    return Err(bad(
                        "block: the name of the records' block field is empty".into()
                    ));
                }
                ("hadamard", vec![pattern])
            }
            RawRule::Add {
                pattern,
                value,
                if_shape,
                if_present,
            } => {
                if let Some(p) = if_present {
                    Pattern::parse(p)
                        .map_err(|m| Error::spec(&rule.file, "weights.rules", "add", m))?;
                }
                if !value.is_finite() {
                    return Err(Error::spec(
                        &rule.file,
                        "weights.rules",
                        "add",
                        format!("value: {value} is not a finite number"),
                    ));
                }
                check_if_shape(if_shape.as_deref())
                    .map_err(|m| Error::spec(&rule.file, "weights.rules", "add", m))?;
                ("add", vec![pattern])
            }
        };
        for p in patterns {
            Pattern::parse(p).map_err(|m| Error::spec(&rule.file, "weights.rules", field, m))?;
        }
    }
    Ok(())
}

/// The values a node defines: its own name, or a split's parts.
fn defines(name: &str, node: &RawNode) -> Vec<String> {
    match split_outs(node) {
        Some(Ok(outs)) => outs,
        _ => vec![name.to_string()],
    }
}

fn split_outs(node: &RawNode) -> Option<std::result::Result<Vec<String>, String>> {
    if node.op.as_deref() != Some(SPLIT_OP) {
        return None;
    }
    Some(match node.params.get("out") {
        Some(serde_yaml::Value::Sequence(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| "expected a list of value names".to_string())
            })
            .collect(),
        _ => Err("expected a list of value names".to_string()),
    })
}

fn check_block(
    spec: &Spec,
    name: &str,
    block: &Sourced<RawBlock>,
    known: &HashSet<String>,
) -> Result<CheckedBlock> {
    let file = &block.file;
    let label = block_label(name);
    let b = &block.item;
    if name == "model" && b.inputs.iter().any(|i| i != TOKENS) {
        return Err(Error::spec(
            file,
            "model",
            "inputs",
            format!("the model's only input is '{TOKENS}'"),
        ));
    }
    let inputs: Vec<String> = if name == "model" {
        vec![TOKENS.to_string()]
    } else {
        b.inputs.clone()
    };
    // Which node defines each value name.
    let mut producer: IndexMap<String, &str> = IndexMap::new();
    for (node_name, node) in &b.nodes {
        for v in defines(node_name, node) {
            if inputs.contains(&v) {
                let field = if v == *node_name { "name" } else { "out" };
                return Err(node_err(
                    file,
                    &label,
                    node_name,
                    field,
                    "shadows a block input",
                ));
            }
            if let Some(prev) = producer.insert(v.clone(), node_name) {
                return Err(node_err(
                    file,
                    &label,
                    node_name,
                    "out",
                    format!("value '{v}' is also defined by node '{prev}'"),
                ));
            }
        }
    }
    let mut graph: DiGraphMap<&str, (), RandomState> = DiGraphMap::new();
    for node_name in b.nodes.keys() {
        graph.add_node(node_name);
    }
    let mut checked: IndexMap<&str, CheckedNode> = IndexMap::new();
    for (node_name, node) in &b.nodes {
        let err = |field: &str, msg: String| node_err(file, &label, node_name, field, msg);
        let ins = node.inputs.to_vec();
        if node.otherwise.is_some() && node.when.is_none() {
            return Err(err("else", "`else` needs a `when`".into()));
        }
        for i in &node.reads() {
            if inputs.contains(i) {
                continue;
            }
            let Some(src) = producer.get(i) else {
                let field = if ins.contains(i) { "in" } else { "else" };
                return Err(err(
                    field,
                    format!("unknown value '{i}' (not an input or node of this block)"),
                ));
            };
            graph.add_edge(src, node_name.as_str(), ());
        }
        let when = match &node.when {
            Some(w) => {
                let e = parse_known(w, Ty::Bool, known).map_err(|m| err("when", m))?;
                if ins.is_empty() {
                    return Err(err(
                        "when",
                        "a conditional node needs an input to pass through".into(),
                    ));
                }
                Some(e)
            }
            None => None,
        };
        let kind = match (&node.op, &node.block) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(err("op", "give exactly one of `op` or `block`".into()))
            }
            (None, Some(callee)) => {
                let Some(def) = spec.blocks.get(callee) else {
                    return Err(err("block", format!("unknown block '{callee}'")));
                };
                if def.item.inputs.len() != ins.len() {
                    return Err(err(
                        "in",
                        format!(
                            "block '{callee}' takes {} input(s), got {}",
                            def.item.inputs.len(),
                            ins.len()
                        ),
                    ));
                }
                if let Some(p) = node.params.keys().next() {
                    return Err(err(p, "a block call takes no parameters".into()));
                }
                NodeKind::Block(callee.clone())
            }
            (Some(op), None) if op == LAYERS_OP => {
                if name != "model" {
                    return Err(err(
                        "op",
                        "`layers` may only appear in the model block".into(),
                    ));
                }
                if spec.layers.is_none() {
                    return Err(err(
                        "op",
                        "`layers` needs a top-level `layers` schedule".into(),
                    ));
                }
                if ins.len() != 1 {
                    return Err(err("in", "`layers` takes one input".into()));
                }
                NodeKind::Layers
            }
            (Some(op), None) if op == SPLIT_OP => {
                check_split(node, known).map_err(|(f, m)| err(&f, m))?
            }
            (Some(op), None) => {
                let entry = ops::lookup(op).ok_or_else(|| {
                    err(
                        "op",
                        format!(
                            "unknown primitive '{op}' (known: {}, {LAYERS_OP}, {SPLIT_OP})",
                            ops::names().join(", ")
                        ),
                    )
                })?;
                let (lo, hi) = entry.schema.arity;
                if ins.len() < lo || ins.len() > hi {
                    return Err(err(
                        "in",
                        format!("'{op}' takes {lo}..={hi} inputs, got {}", ins.len()),
                    ));
                }
                let params = check_params(spec, entry, node, known).map_err(|(f, m)| err(&f, m))?;
                NodeKind::Op { entry, params }
            }
        };
        checked.insert(
            node_name,
            CheckedNode {
                name: node_name.clone(),
                inputs: ins,
                when,
                otherwise: node.otherwise.clone(),
                scope: node.scope.clone(),
                kind,
            },
        );
    }
    let order = match toposort(&graph, None) {
        Ok(_) => declaration_order(b, &producer),
        Err(cycle) => {
            return Err(node_err(
                file,
                &label,
                cycle.node_id(),
                "in",
                "the node depends on itself (cycle)",
            ))
        }
    };
    if !inputs.contains(&b.output) && !producer.contains_key(&b.output) {
        return Err(Error::spec(
            file,
            &label,
            "output",
            format!("unknown value '{}'", b.output),
        ));
    }
    let nodes = order
        .into_iter()
        .filter_map(|n| checked.swap_remove(n))
        .collect();
    Ok(CheckedBlock {
        file: file.clone(),
        label,
        inputs,
        nodes,
        output: b.output.clone(),
    })
}

fn check_split(
    node: &RawNode,
    known: &HashSet<String>,
) -> std::result::Result<NodeKind, (String, String)> {
    if let Some(k) = node.params.keys().find(|k| *k != "sizes" && *k != "out") {
        return Err((
            k.clone(),
            format!("'{SPLIT_OP}' has no parameter '{k}' (known: sizes, out)"),
        ));
    }
    if node.inputs.to_vec().len() != 1 {
        return Err(("in".into(), format!("'{SPLIT_OP}' takes one input")));
    }
    let outs = split_outs(node)
        .unwrap_or_else(|| Err("missing".into()))
        .map_err(|m| ("out".to_string(), m))?;
    let sizes = match node.params.get("sizes") {
        Some(serde_yaml::Value::Sequence(items)) => items
            .iter()
            .map(|v| parse_known(v, Ty::Int, known))
            .collect::<std::result::Result<Vec<Expr>, String>>()
            .map_err(|m| ("sizes".to_string(), m))?,
        _ => return Err(("sizes".into(), "expected a list of sizes".into())),
    };
    if sizes.len() != outs.len() || outs.is_empty() {
        return Err((
            "out".into(),
            format!("{} names for {} sizes", outs.len(), sizes.len()),
        ));
    }
    Ok(NodeKind::Split { sizes, outs })
}

fn check_params(
    spec: &Spec,
    entry: &OpEntry,
    node: &RawNode,
    known: &HashSet<String>,
) -> std::result::Result<Vec<ParamSource>, (String, String)> {
    let schema = entry.schema;
    for key in node.params.keys() {
        if !schema.params.iter().any(|p| p.name == key) {
            let list: Vec<&str> = schema.params.iter().map(|p| p.name).collect();
            return Err((
                key.clone(),
                format!(
                    "'{}' has no parameter '{key}' (known: {})",
                    schema.name,
                    list.join(", ")
                ),
            ));
        }
    }
    let mut out = Vec::with_capacity(schema.params.len());
    for def in schema.params {
        let field = || def.name.to_string();
        let Some(v) = node.params.get(def.name) else {
            match def.default {
                Some(d) => out.push(ParamSource::Default(d)),
                None => return Err((field(), "required parameter missing".into())),
            }
            continue;
        };
        out.push(match def.kind {
            ParamKind::Expr(ty) => {
                ParamSource::Expr(ty, parse_known(v, ty, known).map_err(|m| (field(), m))?)
            }
            ParamKind::Weight => {
                if !v.is_string() {
                    return Err((field(), "expected a weight name".into()));
                }
                ParamSource::Weight(Value::from_yaml(v))
            }
            ParamKind::Choice(options) if v.as_str().is_some_and(|s| s.starts_with('=')) => {
                let e = parse_known(v, Ty::Str, known).map_err(|m| (field(), m))?;
                check_choice_entry(spec, &e, options).map_err(|m| (field(), m))?;
                ParamSource::Choice(options, e)
            }
            ParamKind::Choice(options) => match v.as_str() {
                Some(s) if options.contains(&s) => {
                    ParamSource::Choice(options, Expr::Lit(Value::Str(s.to_string())))
                }
                _ => return Err((field(), format!("expected one of: {}", options.join(", ")))),
            },
        });
    }
    Ok(out)
}

/// A choice parameter read from a config entry typed with a choice enum
/// (`fn: =mlp_act` with `mlp_act: {type: act}`): every word of that enum
/// must be one the parameter takes, so no config can make it fail later.
fn check_choice_entry(spec: &Spec, e: &Expr, options: &[&str]) -> std::result::Result<(), String> {
    let Expr::Name(n) = e else { return Ok(()) };
    let Some(Ty::Choice(name, words)) = spec.config.get(n).and_then(|d| Ty::parse(&d.item.ty))
    else {
        return Ok(());
    };
    match words.iter().find(|w| !options.contains(w)) {
        Some(w) => Err(format!(
            "config entry '{n}' is of type {name}, which allows '{w}'; this parameter takes: {}",
            options.join(", ")
        )),
        None => Ok(()),
    }
}

/// Nodes in declaration order, except that a node waits for the nodes it
/// reads (a stable topological order; `check` ruled out cycles).
fn declaration_order<'a>(b: &'a RawBlock, producer: &IndexMap<String, &'a str>) -> Vec<&'a str> {
    let mut done: HashSet<&str> = HashSet::new();
    let mut order = Vec::with_capacity(b.nodes.len());
    while order.len() < b.nodes.len() {
        let next = b.nodes.iter().find(|(name, node)| {
            !done.contains(name.as_str())
                && node
                    .reads()
                    .iter()
                    .all(|i| producer.get(i).is_none_or(|p| done.contains(p)))
        });
        match next {
            Some((name, _)) => {
                done.insert(name);
                order.push(name.as_str());
            }
            None => break,
        }
    }
    order
}
