//! Expansion: a [`CheckedSpec`] bound to config values and unrolled into a
//! flat [`Graph`]: the layer schedule run, `when`s decided, parameters
//! evaluated into typed op configs, layouts and weight needs resolved. Every
//! lookup is checked, so a spec that passed `check` cannot make it panic.
use std::path::Path;

use indexmap::IndexMap;

use crate::check::{block_label, CheckedBlock, CheckedSpec, NodeKind, ParamSource};
use crate::config::{blame, eval_cond, layer_scope, sources_of, Ty};
use crate::error::{Error, Result};
use crate::expr::{Scope, Value, With};
use crate::graph::{Graph, Node, Skipped, Src};
use crate::library::Spec;
use crate::ops::{join_scope, Layout, OpConfig, OpError, ParamDef, Slice};

const TOKENS_LAYOUT: Layout = Layout {
    dim: 1,
    heads: None,
};

/// Checks `spec`, binds a checkpoint's config (`config_file` names it in
/// errors) and expands the graph: all a model needs short of weights.
pub fn expand_for(
    spec: &Spec,
    config: &serde_json::Value,
    config_file: &Path,
) -> Result<(IndexMap<String, Value>, Graph)> {
    expand_for_ranks(spec, config, config_file, 1)
}

/// [`expand_for`] as one rank of a tensor-parallel run over `ranks` ranks:
/// the config entries the spec's `parallel` section names hold each rank's
/// share, so nodes built from them (heads, widths) are the rank's own.
pub fn expand_for_ranks(
    spec: &Spec,
    config: &serde_json::Value,
    config_file: &Path,
    ranks: i64,
) -> Result<(IndexMap<String, Value>, Graph)> {
    let checked = crate::check(spec)?;
    let (mut bound, prov) = crate::config::bind_traced(spec, config, config_file)?;
    if ranks > 1 {
        share_per_rank(spec, &mut bound, ranks).map_err(|e| match &e {
            Error::Spec { field, .. } => {
                let sources = sources_of(&prov, std::slice::from_ref(field));
                if sources.is_empty() {
                    e
                } else {
                    blame(config_file, &sources, &e)
                }
            }
            _ => e,
        })?;
    }
    // A node that cannot be built from these values is the values' fault
    // when the field at fault reads checkpoint keys: blame those.
    let graph = expand(&checked, &bound).map_err(|e| match &e {
        Error::Spec { node, field, .. } => {
            let sources = sources_of(&prov, &checked.names_read(node, field));
            if sources.is_empty() {
                e
            } else {
                blame(config_file, &sources, &e)
            }
        }
        _ => e,
    })?;
    Ok((bound, graph))
}

/// Replaces the entries a spec's `parallel` section names by one rank's
/// share of `ranks`; an error names the entry (as the field).
fn share_per_rank(spec: &Spec, bound: &mut IndexMap<String, Value>, ranks: i64) -> Result<()> {
    let Some(parallel) = &spec.parallel else {
        return Err(Error::spec(
            &spec.file,
            spec.name.as_str(),
            "parallel",
            format!(
                "spec '{}' declares no tensor parallelism (a `parallel` section); it runs on one rank only, not {ranks}",
                spec.name
            ),
        ));
    };
    let entries = parallel.item.split.iter().map(|n| (n, false));
    let entries = entries.chain(parallel.item.split_or_copy.iter().map(|n| (n, true)));
    for (name, copy) in entries {
        let err = |msg: String| Error::spec(&parallel.file, "parallel", name.as_str(), msg);
        let Some(value) = bound.get_mut(name.as_str()) else {
            return Err(err(format!("'{name}' is not a config entry of the spec")));
        };
        let share = |v: i64| -> Result<i64> {
            if v > 0 && v % ranks == 0 {
                Ok(v / ranks)
            } else if copy && v > 0 && ranks % v == 0 {
                Ok(1)
            } else if copy {
                Err(err(format!(
                    "{name} = {v} cannot be split over {ranks} ranks (the world size must divide it or be a multiple of it)"
                )))
            } else {
                Err(err(format!(
                    "{name} = {v} cannot be split over {ranks} ranks (the world size must divide it)"
                )))
            }
        };
        *value = match &*value {
            Value::Null => Value::Null,
            Value::Int(v) => Value::Int(share(*v)?),
            Value::List(items) => Value::List(
                items
                    .iter()
                    .map(|x| match x {
                        Value::Int(v) => share(*v).map(Value::Int),
                        other => Ok(other.clone()),
                    })
                    .collect::<Result<_>>()?,
            ),
            other => {
                return Err(err(format!(
                    "'{name}' is a {}, not a count to split",
                    other.type_name()
                )))
            }
        };
    }
    Ok(())
}

/// Expands a checked spec for bound config values.
pub fn expand(spec: &CheckedSpec, config: &IndexMap<String, Value>) -> Result<Graph> {
    let mut ex = Expander {
        spec,
        config,
        graph: Graph {
            nodes: Vec::new(),
            output: Src::Tokens,
            aliases: IndexMap::new(),
            layer_blocks: Vec::new(),
            skipped: Vec::new(),
        },
    };
    let model = spec
        .blocks
        .get("model")
        .ok_or_else(|| Error::spec(&spec.spec.file, "model", "nodes", "no model block"))?;
    let out = ex.block(model, &[Src::Tokens], "", "", None)?;
    ex.graph.output = out;
    Ok(ex.graph)
}

struct Expander<'a> {
    spec: &'a CheckedSpec,
    config: &'a IndexMap<String, Value>,
    graph: Graph,
}

/// The node's parameters evaluated in `scope`, in schema order.
fn eval_params(
    params: &[ParamSource],
    defs: &[ParamDef],
    scope: &dyn Scope,
) -> std::result::Result<Vec<Value>, OpError> {
    params
        .iter()
        .zip(defs)
        .map(|(p, def)| {
            let err = |m: String| OpError::new(def.name, m);
            match p {
                ParamSource::Expr(ty, e) => e.eval(scope).and_then(|v| ty.coerce(v)).map_err(err),
                ParamSource::Choice(options, e) => {
                    let v = e.eval(scope).map_err(err)?;
                    match v.as_str() {
                        Some(s) if options.contains(&s) => Ok(v),
                        _ => Err(err(format!("{v} is not one of: {}", options.join(", ")))),
                    }
                }
                ParamSource::Weight(v) => Ok(v.clone()),
                ParamSource::Default(d) => Ok(d()),
            }
        })
        .collect()
}

impl Expander<'_> {
    fn layout(&self, src: Src) -> Layout {
        match src {
            Src::Tokens => TOKENS_LAYOUT,
            Src::Node(k) => self
                .graph
                .nodes
                .get(k)
                .map_or(TOKENS_LAYOUT, |n| n.resolved.out),
        }
    }

    fn push(&mut self, node: Node) -> Src {
        self.graph.nodes.push(node);
        Src::Node(self.graph.nodes.len() - 1)
    }

    fn block(
        &mut self,
        block: &CheckedBlock,
        inputs: &[Src],
        path: &str,
        scope: &str,
        layer: Option<&IndexMap<String, Value>>,
    ) -> Result<Src> {
        let label = &block.label;
        let mut env: IndexMap<&str, Src> = IndexMap::new();
        for (n, s) in block.inputs.iter().zip(inputs) {
            env.insert(n.as_str(), *s);
        }
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
        for node in &block.nodes {
            let here = if path.is_empty() {
                node.name.clone()
            } else {
                format!("{path}.{}", node.name)
            };
            let origin = format!("{label}.nodes.{}", node.name);
            let err = |field: &str, msg: String| {
                Error::spec(&block.file, &origin, field, format!("{msg} (at {here})"))
            };
            let srcs: Vec<Src> = node
                .inputs
                .iter()
                .map(|i| {
                    env.get(i.as_str())
                        .copied()
                        .ok_or_else(|| err("in", format!("unknown value '{i}'")))
                })
                .collect::<Result<_>>()?;
            if let Some(w) = &node.when {
                if !eval_cond(w, scope_vals).map_err(|m| err("when", m))? {
                    let stands_for = match &node.otherwise {
                        Some(o) => env.get(o.as_str()).copied(),
                        None => srcs.first().copied(),
                    }
                    .ok_or_else(|| err("else", "nothing to stand for the skipped node".into()))?;
                    self.graph.skipped.push(Skipped {
                        path: here.clone(),
                        stands_for,
                        before: self.graph.nodes.len(),
                        file: block.file.clone(),
                        origin: origin.clone(),
                    });
                    env.insert(node.name.as_str(), stands_for);
                    continue;
                }
            }
            let node_scope = match &node.scope {
                Some(s) => join_scope(scope, s),
                None => scope.to_string(),
            };
            match &node.kind {
                NodeKind::Block(callee) => {
                    let def = self
                        .spec
                        .blocks
                        .get(callee.as_str())
                        .ok_or_else(|| err("block", format!("unknown block '{callee}'")))?;
                    let out = self.block(def, &srcs, &here, &node_scope, layer)?;
                    self.graph.aliases.insert(here.clone(), out);
                    env.insert(node.name.as_str(), out);
                }
                NodeKind::Layers => {
                    let input = srcs
                        .first()
                        .copied()
                        .ok_or_else(|| err("in", "missing input".into()))?;
                    let out = self.layers(input, &here)?;
                    self.graph.aliases.insert(here.clone(), out);
                    env.insert(node.name.as_str(), out);
                }
                NodeKind::Split { sizes, outs } => {
                    let input = srcs
                        .first()
                        .copied()
                        .ok_or_else(|| err("in", "missing input".into()))?;
                    let mut start = 0;
                    for (size, name) in sizes.iter().zip(outs) {
                        let size = size
                            .eval(scope_vals)
                            .and_then(|v| {
                                v.as_i64().ok_or_else(|| format!("expected int, got {v}"))
                            })
                            .map_err(|m| err("sizes", m))?;
                        let op = OpConfig::Slice(Slice { start, size });
                        let resolved = op
                            .resolve(&node_scope, &[self.layout(input)])
                            .map_err(|e| err(&e.field, e.msg))?;
                        let part = if path.is_empty() {
                            name.clone()
                        } else {
                            format!("{path}.{name}")
                        };
                        let src = self.push(Node {
                            path: part,
                            op,
                            inputs: vec![input],
                            resolved,
                            file: block.file.clone(),
                            origin: origin.clone(),
                        });
                        env.insert(name.as_str(), src);
                        start += size;
                    }
                }
                NodeKind::Op { entry, params } => {
                    let values = eval_params(params, entry.schema.params, scope_vals)
                        .map_err(|e| err(&e.field, e.msg))?;
                    let op = (entry.parse)(&values).map_err(|e| err(&e.field, e.msg))?;
                    let layouts: Vec<Layout> = srcs.iter().map(|s| self.layout(*s)).collect();
                    let resolved = op
                        .resolve(&node_scope, &layouts)
                        .map_err(|e| err(&e.field, e.msg))?;
                    let src = self.push(Node {
                        path: here.clone(),
                        op,
                        inputs: srcs,
                        resolved,
                        file: block.file.clone(),
                        origin: origin.clone(),
                    });
                    env.insert(node.name.as_str(), src);
                }
            }
        }
        env.get(block.output.as_str()).copied().ok_or_else(|| {
            Error::spec(
                &block.file,
                label,
                "output",
                format!("unknown value '{}'", block.output),
            )
        })
    }

    fn layers(&mut self, input: Src, path: &str) -> Result<Src> {
        let spec = self.spec;
        let l = spec.layers.as_ref().ok_or_else(|| {
            Error::spec(&spec.spec.file, "model", "layers", "no `layers` schedule")
        })?;
        let count = l
            .count
            .eval(self.config)
            .and_then(|v| Ty::Int.coerce(v))
            .map_err(|m| Error::spec(&l.file, "layers", "count", m))?
            .as_i64()
            .filter(|n| *n >= 0)
            .ok_or_else(|| Error::spec(&l.file, "layers", "count", "must be a non-negative int"))?;
        let max = crate::limits::limits()?.max_layers;
        if count as u64 > max {
            return Err(Error::spec(
                &l.file,
                "layers",
                "count",
                format!("{count} layers are over the limit of {max} (LMSPEC_MAX_LAYERS)"),
            ));
        }
        let mut x = input;
        for i in 0..count {
            let scope = layer_scope(&spec.spec, &spec.order, self.config, i)?;
            let mut chosen = l.block.as_deref();
            for (k, (when, block)) in l.select.iter().enumerate() {
                let hit = match when {
                    None => true,
                    Some(w) => eval_cond(w, &scope).map_err(|m| {
                        Error::spec(&l.file, format!("layers.select[{k}]"), "when", m)
                    })?,
                };
                if hit {
                    chosen = Some(block.as_str());
                    break;
                }
            }
            let name = chosen.ok_or_else(|| {
                Error::spec(
                    &l.file,
                    "layers",
                    "select",
                    format!("no entry matches layer {i}"),
                )
            })?;
            let def = spec
                .blocks
                .get(name)
                .ok_or_else(|| Error::spec(&l.file, block_label(name), "block", "unknown block"))?;
            let prefix = render_prefix(&l.prefix, &scope)
                .map_err(|m| Error::spec(&l.file, "layers", "prefix", format!("layer {i}: {m}")))?;
            let here = format!("{path}.{i}");
            x = self.block(def, &[x], &here, &prefix, Some(&scope))?;
            self.graph.aliases.insert(here, x);
            self.graph.layer_blocks.push(name.to_string());
        }
        Ok(x)
    }
}

/// A layer's weight scope: the prefix's text with each `{expression}`'s
/// value (an int or a string) in its place.
fn render_prefix(
    parts: &[crate::check::PrefixPart],
    scope: &dyn Scope,
) -> std::result::Result<String, String> {
    use crate::check::PrefixPart;
    let mut out = String::new();
    for p in parts {
        match p {
            PrefixPart::Text(t) => out.push_str(t),
            PrefixPart::Expr(e) => match e.eval(scope)? {
                Value::Int(n) => out.push_str(&n.to_string()),
                Value::Str(s) => out.push_str(&s),
                v => {
                    return Err(format!(
                        "an expression gives {} {v}, not an int or a string",
                        v.type_name()
                    ))
                }
            },
        }
    }
    Ok(out)
}
