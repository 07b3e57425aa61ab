//! Validation and expansion of a spec.
//!
//! [`check`] validates a spec on its own (no config): every node names a
//! known op or block, parameters fit the op's schema, expressions parse and
//! read declared names, inputs exist and blocks are acyclic (petgraph).
//! [`expand`] then binds config values and unrolls the layer schedule into a
//! flat [`Graph`] of resolved nodes: parameters evaluated, layouts and weight
//! needs known. Still no MLX call happens here.
use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use petgraph::algo::toposort;
use petgraph::graphmap::DiGraphMap;

use crate::error::{Error, Result};
use crate::ops::{self, OpKind, ParamKind, Params, Resolved, ValueInfo};
use crate::spec::config::{literal_or_expr, Ty};
use crate::spec::expr::{Expr, Scope, Value, With};
use crate::spec::library::{Sourced, Spec};
use crate::spec::raw::{RawBlock, RawNode, RawRule};

/// The op name of the node that runs the layer schedule.
pub const LAYERS_OP: &str = "layers";
/// The model's input value.
pub const TOKENS: &str = "tokens";

/// Where a value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Src {
    Tokens,
    Node(usize),
}

/// A node of the expanded graph.
#[derive(Debug, Clone)]
pub struct GNode {
    /// Tap name, e.g. `layers.3.attn.q`.
    pub path: String,
    pub op: &'static dyn OpKind,
    pub params: Params,
    pub inputs: Vec<Src>,
    pub resolved: Resolved,
    /// The spec file and node that produced it (for errors).
    pub file: PathBuf,
    pub origin: String,
}

impl std::fmt::Debug for dyn OpKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.name())
    }
}

/// A spec expanded for one config.
#[derive(Debug, Clone)]
pub struct Graph {
    pub nodes: Vec<GNode>,
    pub output: Src,
    /// Tap names that stand for another node's value (block calls, layers).
    pub aliases: IndexMap<String, Src>,
    /// Block kind of each layer.
    pub layer_blocks: Vec<String>,
}

impl Graph {
    /// The value a tap name refers to.
    pub fn find(&self, name: &str) -> Option<Src> {
        if let Some(s) = self.aliases.get(name) {
            return Some(*s);
        }
        self.nodes
            .iter()
            .position(|n| n.path == name)
            .map(Src::Node)
    }

    /// Every tap name, in execution order.
    pub fn tap_names(&self) -> Vec<String> {
        let mut names: Vec<(usize, String)> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(k, n)| (k, n.path.clone()))
            .collect();
        for (name, src) in &self.aliases {
            if let Src::Node(k) = src {
                names.push((*k, name.clone()));
            }
        }
        names.sort_by_key(|(k, _)| *k);
        names.into_iter().map(|(_, n)| n).collect()
    }
}

fn node_err(file: &Path, block: &str, node: &str, field: &str, msg: impl Into<String>) -> Error {
    Error::spec(file, format!("{block}.nodes.{node}"), field, msg)
}

fn block_label(name: &str) -> String {
    if name == "model" {
        "model".to_string()
    } else {
        format!("blocks.{name}")
    }
}

/// Evaluates a condition; anything but a bool is an error.
pub fn eval_bool(v: &serde_yaml::Value, scope: &dyn Scope) -> std::result::Result<bool, String> {
    match literal_or_expr(v, Ty::Bool)?.eval(scope)? {
        Value::Bool(b) => Ok(b),
        other => Err(format!(
            "condition gave {} {other}, expected a bool",
            other.type_name()
        )),
    }
}

fn expr_names(v: &serde_yaml::Value, ty: Ty) -> std::result::Result<Vec<String>, String> {
    let e = literal_or_expr(v, ty)?;
    let mut names = Vec::new();
    e.names(&mut names);
    Ok(names)
}

/// Blocks the spec can run: called from the model block or the layer
/// schedule, directly or through other blocks. Library blocks a spec never
/// uses are not its concern.
fn reachable_blocks(spec: &Spec) -> HashSet<&str> {
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
pub fn check(spec: &Spec) -> Result<()> {
    let mut known: HashSet<String> = HashSet::new();
    for (name, def) in &spec.config {
        let b = &def.item;
        let here = format!("config.{name}");
        Ty::parse(&b.ty).ok_or_else(|| {
            Error::spec(
                &def.file,
                &here,
                "type",
                format!(
                    "unknown type '{}' (known: int, float, bool, str, list, map, any)",
                    b.ty
                ),
            )
        })?;
        known.insert(name.clone());
    }
    crate::spec::config::config_order(spec)?;
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
    for (name, block) in &all {
        calls.add_node(name);
        check_block(spec, name, block, &known)?;
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
    if let Some(layers) = &spec.layers {
        let l = &layers.item;
        let names = expr_names(&l.count, Ty::Int)
            .map_err(|m| Error::spec(&layers.file, "layers", "count", m))?;
        if let Some(n) = names.iter().find(|n| !known.contains(*n)) {
            return Err(Error::spec(
                &layers.file,
                "layers",
                "count",
                format!("unknown name '{n}'"),
            ));
        }
        let mut blocks: Vec<(String, &str)> =
            l.block.iter().map(|b| (b.clone(), "block")).collect();
        for (k, s) in l.select.iter().enumerate() {
            blocks.push((s.block.clone(), "select"));
            if let Some(w) = &s.when {
                let at = format!("layers.select[{k}]");
                let names = expr_names(w, Ty::Bool)
                    .map_err(|m| Error::spec(&layers.file, &at, "when", m))?;
                if let Some(n) = names.iter().find(|n| !known.contains(*n)) {
                    return Err(Error::spec(
                        &layers.file,
                        &at,
                        "when",
                        format!("unknown name '{n}'"),
                    ));
                }
            }
        }
        if blocks.is_empty() {
            return Err(Error::spec(
                &layers.file,
                "layers",
                "block",
                "give `block` or `select`",
            ));
        }
        for (b, field) in blocks {
            match spec.blocks.get(&b) {
                None => {
                    return Err(Error::spec(
                        &layers.file,
                        "layers",
                        field,
                        format!("unknown block '{b}'"),
                    ))
                }
                Some(def) if def.item.inputs.len() != 1 => {
                    return Err(Error::spec(
                        &layers.file,
                        "layers",
                        field,
                        format!("layer block '{b}' must take exactly one input"),
                    ))
                }
                Some(_) => {}
            }
        }
    }
    for rule in &spec.rules {
        let (field, patterns): (&str, Vec<&str>) = match &rule.item {
            RawRule::Drop(p) => ("drop", vec![p]),
            RawRule::Rename { from, to } => ("rename", vec![from, to]),
            RawRule::Tie { target, source, .. } => ("tie", vec![target, source]),
            RawRule::SkipIfPresent(p) => ("skip_if_present", vec![p]),
            RawRule::Transpose(p) => ("transpose", vec![p]),
            RawRule::Stack { from, to, index } => {
                let caps = crate::weights::rules::Pattern::parse(from)
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
        };
        for p in patterns {
            crate::weights::rules::Pattern::parse(p)
                .map_err(|m| Error::spec(&rule.file, "weights.rules", field, m))?;
        }
    }
    Ok(())
}

fn check_block(
    spec: &Spec,
    name: &str,
    block: &Sourced<RawBlock>,
    known: &HashSet<String>,
) -> Result<()> {
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
    let inputs: Vec<&str> = if name == "model" {
        vec![TOKENS]
    } else {
        b.inputs.iter().map(String::as_str).collect()
    };
    let mut graph: DiGraphMap<&str, (), RandomState> = DiGraphMap::new();
    for node_name in b.nodes.keys() {
        if inputs.contains(&node_name.as_str()) {
            return Err(node_err(
                file,
                &label,
                node_name,
                "name",
                "shadows a block input",
            ));
        }
        graph.add_node(node_name);
    }
    for (node_name, node) in &b.nodes {
        let err = |field: &str, msg: String| node_err(file, &label, node_name, field, msg);
        let ins = node.inputs.to_vec();
        if node.otherwise.is_some() && node.when.is_none() {
            return Err(err("else", "`else` needs a `when`".into()));
        }
        for i in &node.reads() {
            if inputs.contains(&i.as_str()) {
                continue;
            }
            if !b.nodes.contains_key(i) {
                let field = if ins.contains(i) { "in" } else { "else" };
                return Err(err(
                    field,
                    format!("unknown value '{i}' (not an input or node of this block)"),
                ));
            }
            let (src, _) = b.nodes.get_key_value(i).expect("checked above");
            graph.add_edge(src.as_str(), node_name.as_str(), ());
        }
        if let Some(w) = &node.when {
            let names = expr_names(w, Ty::Bool).map_err(|m| err("when", m))?;
            if let Some(n) = names.iter().find(|n| !known.contains(*n)) {
                return Err(err("when", format!("unknown name '{n}'")));
            }
            if ins.is_empty() {
                return Err(err(
                    "when",
                    "a conditional node needs an input to pass through".into(),
                ));
            }
        }
        match (&node.op, &node.block) {
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
            }
            (Some(op), None) => {
                let kind = ops::lookup(op).ok_or_else(|| {
                    err(
                        "op",
                        format!(
                            "unknown primitive '{op}' (known: {}, {LAYERS_OP})",
                            ops::names().join(", ")
                        ),
                    )
                })?;
                let (lo, hi) = kind.arity();
                if ins.len() < lo || ins.len() > hi {
                    return Err(err(
                        "in",
                        format!("'{op}' takes {lo}..={hi} inputs, got {}", ins.len()),
                    ));
                }
                check_params(kind, node, known).map_err(|(f, m)| err(&f, m))?;
            }
        }
    }
    if let Err(cycle) = toposort(&graph, None) {
        return Err(node_err(
            file,
            &label,
            cycle.node_id(),
            "in",
            "the node depends on itself (cycle)",
        ));
    }
    if !inputs.contains(&b.output.as_str()) && !b.nodes.contains_key(&b.output) {
        return Err(Error::spec(
            file,
            &label,
            "output",
            format!("unknown value '{}'", b.output),
        ));
    }
    Ok(())
}

fn check_params(
    kind: &dyn OpKind,
    node: &RawNode,
    known: &HashSet<String>,
) -> std::result::Result<(), (String, String)> {
    for key in node.params.keys() {
        if !kind.params().iter().any(|p| p.name == key) {
            let list: Vec<&str> = kind.params().iter().map(|p| p.name).collect();
            return Err((
                key.clone(),
                format!(
                    "'{}' has no parameter '{key}' (known: {})",
                    kind.name(),
                    list.join(", ")
                ),
            ));
        }
    }
    for def in kind.params() {
        let Some(v) = node.params.get(def.name) else {
            if def.default.is_none() {
                return Err((def.name.to_string(), "required parameter missing".into()));
            }
            continue;
        };
        match def.kind {
            ParamKind::Expr(ty) => {
                let names = expr_names(v, ty).map_err(|m| (def.name.to_string(), m))?;
                if let Some(n) = names.iter().find(|n| !known.contains(*n)) {
                    return Err((def.name.to_string(), format!("unknown name '{n}'")));
                }
            }
            ParamKind::Weight => {
                if !v.is_string() {
                    return Err((def.name.to_string(), "expected a weight name".into()));
                }
            }
            ParamKind::Choice(_) if v.as_str().is_some_and(|s| s.starts_with('=')) => {
                let names = expr_names(v, Ty::Str).map_err(|m| (def.name.to_string(), m))?;
                if let Some(n) = names.iter().find(|n| !known.contains(*n)) {
                    return Err((def.name.to_string(), format!("unknown name '{n}'")));
                }
            }
            ParamKind::Choice(options) => match v.as_str() {
                Some(s) if options.contains(&s) => {}
                _ => {
                    return Err((
                        def.name.to_string(),
                        format!("expected one of: {}", options.join(", ")),
                    ))
                }
            },
        }
    }
    Ok(())
}

fn eval_params(
    kind: &dyn OpKind,
    node: &RawNode,
    scope: &dyn Scope,
) -> std::result::Result<Params, (String, String)> {
    let mut values = IndexMap::new();
    for def in kind.params() {
        let field = || def.name.to_string();
        let value = match (node.params.get(def.name), def.kind) {
            (Some(v), ParamKind::Expr(ty)) => literal_or_expr(v, ty)
                .and_then(|e| e.eval(scope))
                .and_then(|v| ty.coerce(v))
                .map_err(|m| (field(), m))?,
            (None, ParamKind::Expr(ty)) => {
                let text = def
                    .default
                    .ok_or_else(|| (field(), "required parameter missing".to_string()))?;
                Expr::parse(text)
                    .and_then(|e| e.eval(scope))
                    .and_then(|v| ty.coerce(v))
                    .map_err(|m| (field(), m))?
            }
            (Some(v), ParamKind::Choice(options)) => {
                let value = literal_or_expr(v, Ty::Str)
                    .and_then(|e| e.eval(scope))
                    .map_err(|m| (field(), m))?;
                match value.as_str() {
                    Some(s) if options.contains(&s) => value,
                    _ => {
                        return Err((
                            field(),
                            format!("{value} is not one of: {}", options.join(", ")),
                        ))
                    }
                }
            }
            (Some(v), _) => Value::from_yaml(v),
            (None, _) => match def.default {
                Some(d) => Value::Str(d.to_string()),
                None => return Err((field(), "required parameter missing".into())),
            },
        };
        values.insert(def.name.to_string(), value);
    }
    Ok(Params { values })
}

/// Nodes in declaration order, except that a node waits for the nodes it
/// reads (a stable topological order). Errors with a node on a cycle.
fn declaration_order(b: &RawBlock) -> std::result::Result<Vec<&str>, String> {
    let mut done: HashSet<&str> = HashSet::new();
    let mut order = Vec::with_capacity(b.nodes.len());
    while order.len() < b.nodes.len() {
        let next = b.nodes.iter().find(|(name, node)| {
            !done.contains(name.as_str())
                && node
                    .reads()
                    .iter()
                    .all(|i| !b.nodes.contains_key(i) || done.contains(i.as_str()))
        });
        match next {
            Some((name, _)) => {
                done.insert(name);
                order.push(name.as_str());
            }
            None => {
                let stuck = b.nodes.keys().find(|n| !done.contains(n.as_str()));
                return Err(stuck.cloned().unwrap_or_default());
            }
        }
    }
    Ok(order)
}

struct Expander<'a> {
    spec: &'a Spec,
    config: &'a IndexMap<String, Value>,
    graph: Graph,
}

fn info(graph: &Graph, src: Src, tokens: ValueInfo) -> ValueInfo {
    match src {
        Src::Tokens => tokens,
        Src::Node(k) => graph.nodes[k].resolved.out,
    }
}

const TOKENS_INFO: ValueInfo = ValueInfo {
    dim: 1,
    heads: None,
};

impl Expander<'_> {
    fn block(
        &mut self,
        name: &str,
        block: &Sourced<RawBlock>,
        inputs: &[Src],
        path: &str,
        scope: &str,
        layer: Option<&IndexMap<String, Value>>,
    ) -> Result<Src> {
        let b = &block.item;
        let label = block_label(name);
        let mut env: IndexMap<String, Src> = IndexMap::new();
        let input_names: Vec<&str> = if name == "model" {
            vec![TOKENS]
        } else {
            b.inputs.iter().map(String::as_str).collect()
        };
        for (n, s) in input_names.iter().zip(inputs) {
            env.insert(n.to_string(), *s);
        }
        let sorted = declaration_order(b).map_err(|n| {
            node_err(
                &block.file,
                &label,
                &n,
                "in",
                "the node depends on itself (cycle)",
            )
        })?;
        // Inside a layer its scope (config, `i`, per-layer entries);
        // outside, the config with `i` null.
        let outside = With {
            name: "i",
            value: Value::Null,
            base: self.config,
        };
        let scope_vals: &dyn Scope = match layer {
            Some(s) => s,
            None => &outside,
        };
        for node_name in sorted {
            let node = &b.nodes[node_name];
            let here = if path.is_empty() {
                node_name.to_string()
            } else {
                format!("{path}.{node_name}")
            };
            let err = |field: &str, msg: String| {
                node_err(
                    &block.file,
                    &label,
                    node_name,
                    field,
                    format!("{msg} (at {here})"),
                )
            };
            let srcs: Vec<Src> = node
                .inputs
                .to_vec()
                .iter()
                .map(|i| env[i.as_str()])
                .collect();
            if let Some(w) = &node.when {
                let on = eval_bool(w, scope_vals).map_err(|m| err("when", m))?;
                if !on {
                    let stands_for = match &node.otherwise {
                        Some(o) => env[o.as_str()],
                        None => srcs[0],
                    };
                    env.insert(node_name.to_string(), stands_for);
                    continue;
                }
            }
            let node_scope = match &node.scope {
                Some(s) => ops::join_scope(scope, s),
                None => scope.to_string(),
            };
            let out = match (&node.op, &node.block) {
                (None, Some(callee)) => {
                    let def = &self.spec.blocks[callee.as_str()];
                    let out = self.block(callee, def, &srcs, &here, &node_scope, layer)?;
                    self.graph.aliases.insert(here.clone(), out);
                    out
                }
                (Some(op), _) if op == LAYERS_OP => {
                    let out = self.layers(srcs[0], &here)?;
                    self.graph.aliases.insert(here.clone(), out);
                    out
                }
                (Some(op), _) => {
                    let kind = ops::lookup(op)
                        .ok_or_else(|| err("op", format!("unknown primitive '{op}'")))?;
                    let params =
                        eval_params(kind, node, scope_vals).map_err(|(f, m)| err(&f, m))?;
                    let infos: Vec<ValueInfo> = srcs
                        .iter()
                        .map(|s| info(&self.graph, *s, TOKENS_INFO))
                        .collect();
                    let resolved = kind
                        .resolve(&params, &node_scope, &infos)
                        .map_err(|e| err(&e.field, e.msg))?;
                    self.graph.nodes.push(GNode {
                        path: here.clone(),
                        op: kind,
                        params,
                        inputs: srcs,
                        resolved,
                        file: block.file.clone(),
                        origin: format!("{label}.nodes.{node_name}"),
                    });
                    Src::Node(self.graph.nodes.len() - 1)
                }
                (None, None) => {
                    return Err(err("op", "give exactly one of `op` or `block`".into()))
                }
            };
            env.insert(node_name.to_string(), out);
        }
        env.get(&b.output).copied().ok_or_else(|| {
            Error::spec(
                &block.file,
                &label,
                "output",
                format!("unknown value '{}'", b.output),
            )
        })
    }

    fn layers(&mut self, input: Src, path: &str) -> Result<Src> {
        let layers = self.spec.layers.as_ref().ok_or_else(|| {
            Error::spec(&self.spec.file, "model", "layers", "no `layers` schedule")
        })?;
        let l = &layers.item;
        let count = literal_or_expr(&l.count, Ty::Int)
            .and_then(|e| e.eval(self.config))
            .and_then(|v| Ty::Int.coerce(v))
            .map_err(|m| Error::spec(&layers.file, "layers", "count", m))?
            .as_i64()
            .filter(|n| *n >= 0)
            .ok_or_else(|| {
                Error::spec(
                    &layers.file,
                    "layers",
                    "count",
                    "must be a non-negative int",
                )
            })?;
        let order = crate::spec::config::config_order(self.spec)?;
        let mut x = input;
        for i in 0..count {
            let scope = crate::spec::config::layer_scope(self.spec, &order, self.config, i)?;
            let mut chosen = l.block.clone();
            for (k, s) in l.select.iter().enumerate() {
                let hit = match &s.when {
                    None => true,
                    Some(w) => eval_bool(w, &scope).map_err(|m| {
                        Error::spec(&layers.file, format!("layers.select[{k}]"), "when", m)
                    })?,
                };
                if hit {
                    chosen = Some(s.block.clone());
                    break;
                }
            }
            let name = chosen.ok_or_else(|| {
                Error::spec(
                    &layers.file,
                    "layers",
                    "select",
                    format!("no entry matches layer {i}"),
                )
            })?;
            let def = &self.spec.blocks[name.as_str()];
            let prefix = l.prefix.replace("{i}", &i.to_string());
            let here = format!("{path}.{i}");
            x = self.block(&name, def, &[x], &here, &prefix, Some(&scope))?;
            self.graph.aliases.insert(here, x);
            self.graph.layer_blocks.push(name);
        }
        Ok(x)
    }
}

/// Expands a checked spec for bound config values.
pub fn expand(spec: &Spec, config: &IndexMap<String, Value>) -> Result<Graph> {
    let mut ex = Expander {
        spec,
        config,
        graph: Graph {
            nodes: Vec::new(),
            output: Src::Tokens,
            aliases: IndexMap::new(),
            layer_blocks: Vec::new(),
        },
    };
    let out = ex.block("model", &spec.model, &[Src::Tokens], "", "", None)?;
    ex.graph.output = out;
    Ok(ex.graph)
}

/// Graphviz DOT of an expanded graph, one cluster per layer.
pub fn to_dot(graph: &Graph, title: &str) -> String {
    let mut out = format!("digraph \"{title}\" {{\n  rankdir=TB;\n  node [shape=box, fontsize=10];\n  tokens [shape=oval];\n");
    let mut current: Option<String> = None;
    for (k, n) in graph.nodes.iter().enumerate() {
        let layer = n.path.split('.').take(2).collect::<Vec<_>>();
        let cluster =
            (layer.len() == 2 && layer[1].parse::<usize>().is_ok()).then(|| layer.join("."));
        if cluster != current {
            if current.is_some() {
                out.push_str("  }\n");
            }
            if let Some(c) = &cluster {
                out.push_str(&format!(
                    "  subgraph \"cluster_{c}\" {{\n    label=\"{c} ({})\";\n",
                    graph
                        .layer_blocks
                        .get(layer[1].parse::<usize>().unwrap_or(0))
                        .map(String::as_str)
                        .unwrap_or("")
                ));
            }
            current = cluster;
        }
        let dims = match n.resolved.out.heads {
            Some(h) => format!("{h}x{}", n.resolved.out.dim),
            None => n.resolved.out.dim.to_string(),
        };
        out.push_str(&format!(
            "    n{k} [label=\"{}\\n{} [{dims}]\"];\n",
            n.path,
            n.op.name()
        ));
    }
    if current.is_some() {
        out.push_str("  }\n");
    }
    for (k, n) in graph.nodes.iter().enumerate() {
        for s in &n.inputs {
            let from = match s {
                Src::Tokens => "tokens".to_string(),
                Src::Node(j) => format!("n{j}"),
            };
            out.push_str(&format!("  {from} -> n{k};\n"));
        }
    }
    out.push_str("}\n");
    out
}

/// A text dump of an expanded graph: one line per node with its op, inputs,
/// output layout, evaluated parameters and the tensors it needs.
pub fn dump(graph: &Graph) -> String {
    let name = |s: &Src| match s {
        Src::Tokens => TOKENS.to_string(),
        Src::Node(k) => graph.nodes[*k].path.clone(),
    };
    let mut out = String::new();
    for n in &graph.nodes {
        let layout = match n.resolved.out.heads {
            Some(h) => format!("[B, {h}, T, {}]", n.resolved.out.dim),
            None => format!("[B, T, {}]", n.resolved.out.dim),
        };
        let ins: Vec<String> = n.inputs.iter().map(name).collect();
        let params: Vec<String> = n
            .params
            .values
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        out.push_str(&format!(
            "{} = {}({}) -> {layout}",
            n.path,
            n.op.name(),
            ins.join(", ")
        ));
        if !params.is_empty() {
            out.push_str(&format!(" {{{}}}", params.join(", ")));
        }
        for w in &n.resolved.weights {
            out.push_str(&format!("\n    {} {:?}", w.tensor(), w.shape));
        }
        if let Some(c) = n.resolved.cache {
            out.push_str(&format!("\n    state: {c:?}"));
        }
        out.push('\n');
    }
    out.push_str(&format!("output = {}\n", name(&graph.output)));
    out
}
