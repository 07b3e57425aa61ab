//! Which node weights take adapters: checkpoint tensor names traced
//! through the weight rules to the nodes whose weights they became.
use indexmap::IndexMap;

use super::AdapterConfig;
use crate::error::{Error, Result};
use crate::weights::rules::{self, RuleEval, RuleValue};
use lmspec_spec::ops::OpConfig;
use lmspec_spec::raw::RawRule;
use lmspec_spec::Graph;

/// A tensor name traced through the weight rules: its shape, the names
/// (after any format renames) it came from, and whether a rule cut it out
/// of a larger tensor (`split`: such a part takes no adapter, since an
/// adapter of the whole module fits none of its parts).
#[derive(Debug, Clone)]
struct Traced {
    dims: Vec<i64>,
    from: Vec<String>,
    split: bool,
}

impl Traced {
    /// The same origin with other dims (and `split` when cut out).
    fn with(&self, dims: Vec<i64>, cut: bool) -> Traced {
        Traced {
            dims,
            from: self.from.clone(),
            split: self.split || cut,
        }
    }
}

impl RuleValue for Traced {
    fn transposed(&self) -> std::result::Result<Self, String> {
        Ok(self.with(self.dims.transposed()?, false))
    }
    fn stacked(items: &[Self]) -> std::result::Result<Self, String> {
        let dims: Vec<Vec<i64>> = items.iter().map(|t| t.dims.clone()).collect();
        Ok(Traced {
            dims: RuleValue::stacked(&dims)?,
            from: items.iter().flat_map(|t| t.from.clone()).collect(),
            split: items.iter().any(|t| t.split),
        })
    }
    fn dims(&self) -> Vec<i64> {
        self.dims.clone()
    }
    fn reshaped(&self, shape: &[i64]) -> std::result::Result<Self, String> {
        Ok(self.with(shape.to_vec(), false))
    }
    fn repeated(&self, axis: usize, times: i64) -> std::result::Result<Self, String> {
        Ok(self.with(self.dims.repeated(axis, times)?, false))
    }
    fn l2_normalized(&self, _axis: usize, _eps: f64) -> std::result::Result<Self, String> {
        Ok(self.clone())
    }
    fn moved_axis(&self, from: usize, to: usize) -> std::result::Result<Self, String> {
        Ok(self.with(self.dims.moved_axis(from, to)?, false))
    }
    fn plus(&self, _value: f64) -> std::result::Result<Self, String> {
        Ok(self.clone())
    }
    fn ternary_unpacked(&self, scale: &Self) -> std::result::Result<Self, String> {
        Ok(self.with(self.dims.ternary_unpacked(&scale.dims)?, false))
    }
    fn blocks(&self, axis: usize, sizes: &[i64]) -> std::result::Result<Vec<Self>, String> {
        Ok(self
            .dims
            .blocks(axis, sizes)?
            .into_iter()
            .map(|dims| self.with(dims, true))
            .collect())
    }
    fn parts(
        &self,
        axis: usize,
        n: usize,
        interleaved: bool,
    ) -> std::result::Result<Vec<Self>, String> {
        Ok(self
            .dims
            .parts(axis, n, interleaved)?
            .into_iter()
            .map(|dims| self.with(dims, true))
            .collect())
    }
}

/// For each tensor name the rules produce, the checkpoint names it came
/// from: `first` (a format's renames, e.g. GGUF's) run first and name the
/// origins; then the spec's `rules`. Tied tensors and parts split out of a
/// tensor have no origin of their own.
pub fn origins(
    shapes: IndexMap<String, Vec<i64>>,
    first: &[&RawRule],
    spec_rules: &[&RawRule],
    eval: RuleEval<'_>,
) -> std::result::Result<IndexMap<String, Vec<String>>, String> {
    let start: IndexMap<String, Traced> = shapes
        .into_iter()
        .map(|(k, dims)| {
            (
                k,
                Traced {
                    dims,
                    from: Vec::new(),
                    split: false,
                },
            )
        })
        .collect();
    let renamed = rules::apply(first, start, eval)?.tensors;
    let named: IndexMap<String, Traced> = renamed
        .into_iter()
        .map(|(k, t)| {
            let from = vec![k.clone()];
            let split = t.split;
            (
                k,
                Traced {
                    dims: t.dims,
                    from,
                    split,
                },
            )
        })
        .collect();
    let applied = rules::apply(spec_rules, named, eval)?;
    let tied: Vec<String> = applied.ties.iter().map(|(t, _)| format!("{t}.")).collect();
    Ok(applied
        .tensors
        .into_iter()
        .map(|(k, t)| {
            let from = if t.split || tied.iter().any(|p| k.starts_with(p)) {
                Vec::new()
            } else {
                t.from
            };
            (k, from)
        })
        .collect())
}

/// A checkpoint module that can take an adapter: the node weights that
/// came from its `<module>.weight` (several when a spec runs one module more
/// than once, e.g. layers looped with shared weights), each as (node,
/// weight index); the first node's tap path and layer (from a `layers.{i}.`
/// path); the weight's unquantized shape: `[out, in]` for a linear layer or
/// a router, `[experts, out, in]` for stacked experts.
#[derive(Debug, Clone)]
pub struct Target {
    pub uses: Vec<(usize, usize)>,
    pub path: String,
    pub layer: Option<usize>,
    pub module: String,
    pub shape: Vec<i64>,
}

/// Whether a node's weight takes adapters: a `linear` node's `weight`, a
/// `moe` node's `router` and stacked `experts` (mlx-lm's `LoRALinear` and
/// `LoRASwitchLinear`).
fn adaptable(op: &OpConfig, field: &str) -> bool {
    matches!(
        (op, field),
        (OpConfig::Linear(_), "weight") | (OpConfig::Moe(_), "router" | "experts")
    )
}

/// The layer a node's tap path puts it in (`layers.3.attn.q` -> 3).
fn layer_of(path: &str) -> Option<usize> {
    let rest = path.strip_prefix("layers.")?;
    rest.split('.').next()?.parse().ok()
}

/// Every checkpoint module whose `<module>.weight` is, alone, an adaptable
/// weight (see [`adaptable`]) of one shape. A tensor the rules split into
/// weights of different shapes is no target (an adapter of the whole module
/// would not fit any part).
pub fn targets(graph: &Graph, origins: &IndexMap<String, Vec<String>>) -> Vec<Target> {
    let mut by_module: IndexMap<String, (Target, bool)> = IndexMap::new();
    for (k, node) in graph.nodes.iter().enumerate() {
        for (r, req) in node.resolved.weights.iter().enumerate() {
            if req.suffix != "weight" || !adaptable(&node.op, req.field) {
                continue;
            }
            let Some([from]) = origins.get(&req.tensor()).map(Vec::as_slice) else {
                continue;
            };
            let Some(module) = from.strip_suffix(".weight") else {
                continue;
            };
            match by_module.get_mut(module) {
                Some((t, same)) => {
                    t.uses.push((k, r));
                    *same &= t.shape == req.shape;
                }
                None => {
                    let t = Target {
                        uses: vec![(k, r)],
                        path: node.path.clone(),
                        layer: layer_of(&node.path),
                        module: module.to_string(),
                        shape: req.shape.clone(),
                    };
                    by_module.insert(module.to_string(), (t, true));
                }
            }
        }
    }
    by_module
        .into_values()
        .filter(|(t, same)| *same && matches!(t.shape.len(), 2 | 3))
        .map(|(t, _)| t)
        .collect()
}

/// The module name relative to its layer (`model.layers.3.self_attn.q_proj`
/// -> `self_attn.q_proj`), for mlx-lm's `keys`.
pub fn relative_key(module: &str, layer: usize) -> &str {
    let needle = format!(".{layer}.");
    match module.find(&needle) {
        Some(at) => &module[at + needle.len()..],
        None => module,
    }
}

/// The targets a new adapter of `cfg` covers: linear nodes of the last
/// `num_layers` layers (all with -1), filtered by `keys`.
pub fn select<'t>(targets: &'t [Target], cfg: &AdapterConfig) -> Result<Vec<&'t Target>> {
    // Layers as the checkpoint has them (a looped stack counts once).
    let layers = targets
        .iter()
        .filter_map(|t| t.layer)
        .max()
        .map_or(0, |l| l + 1);
    let from = match cfg.num_layers {
        n if n < 0 => 0,
        n if n as usize > layers => {
            return Err(Error::Usage(format!(
                "num_layers: {n} layers requested, the model has {layers}"
            )))
        }
        n => layers - n as usize,
    };
    let chosen: Vec<&Target> = targets
        .iter()
        .filter(|t| t.layer.is_some_and(|l| l >= from))
        .filter(|t| match &cfg.keys {
            None => true,
            Some(keys) => keys
                .iter()
                .any(|k| relative_key(&t.module, t.layer.unwrap_or(0)) == k),
        })
        .collect();
    if chosen.is_empty() {
        return Err(Error::Usage(format!(
            "no linear layer matches the adapter's keys {:?} in the last {} layers",
            cfg.keys.as_deref().unwrap_or_default(),
            cfg.num_layers
        )));
    }
    Ok(chosen)
}
