//! The execution plan: ops built with their weights, inputs resolved to
//! value slots, cache slots assigned, and values freed after their last use.
//! Running it touches no strings and no spec data.
use std::collections::HashMap;

use indexmap::IndexMap;
use mlx_rs::Array;

use crate::cache::{CacheKind, ModelCache};
use crate::error::{Error, Result};
use crate::graph::{Graph, Src};
use crate::ops::{Ctx, Op, Param};

#[derive(Debug)]
struct Step {
    op: Box<dyn Op>,
    inputs: Vec<usize>,
    out: usize,
    cache: Option<usize>,
    /// Slots whose last reader is this step.
    free: Vec<usize>,
}

/// A runnable model body.
#[derive(Debug)]
pub struct Plan {
    steps: Vec<Step>,
    slots: usize,
    output: usize,
    cache_kinds: Vec<CacheKind>,
    /// Tap name -> slot.
    taps: IndexMap<String, usize>,
}

fn slot(s: Src) -> usize {
    match s {
        Src::Tokens => 0,
        Src::Node(k) => k + 1,
    }
}

impl Plan {
    pub fn build(graph: &Graph, weights: Vec<Vec<Param>>) -> Result<Plan> {
        let mut steps = Vec::with_capacity(graph.nodes.len());
        let mut cache_kinds = Vec::new();
        for (k, (node, params)) in graph.nodes.iter().zip(weights).enumerate() {
            let infos: Vec<_> = node
                .inputs
                .iter()
                .map(|s| match s {
                    Src::Tokens => crate::ops::ValueInfo::flat(1),
                    Src::Node(j) => graph.nodes[*j].resolved.out,
                })
                .collect();
            let op = node.op.build(&node.params, &infos, params).map_err(|e| {
                Error::spec(
                    &node.file,
                    &node.origin,
                    e.field,
                    format!("{} (at {})", e.msg, node.path),
                )
            })?;
            let cache = node.resolved.cache.map(|kind| {
                cache_kinds.push(kind);
                cache_kinds.len() - 1
            });
            steps.push(Step {
                op,
                inputs: node.inputs.iter().map(|s| slot(*s)).collect(),
                out: k + 1,
                cache,
                free: Vec::new(),
            });
        }
        let output = slot(graph.output);
        let mut last_use: HashMap<usize, usize> = HashMap::new();
        for (k, step) in steps.iter().enumerate() {
            for &i in &step.inputs {
                last_use.insert(i, k);
            }
        }
        for (s, k) in last_use {
            if s != output {
                steps[k].free.push(s);
            }
        }
        let mut taps = IndexMap::new();
        for name in graph.tap_names() {
            if let Some(src) = graph.find(&name) {
                taps.insert(name, slot(src));
            }
        }
        Ok(Plan {
            slots: graph.nodes.len() + 1,
            steps,
            output,
            cache_kinds,
            taps,
        })
    }

    pub fn cache_kinds(&self) -> &[CacheKind] {
        &self.cache_kinds
    }

    /// Tap names in execution order.
    pub fn tap_names(&self) -> impl Iterator<Item = &str> {
        self.taps.keys().map(String::as_str)
    }

    /// Runs the plan on token ids [B, T]. `taps` selects values to return;
    /// `key_mask` ([B, T] bool, true for real tokens) hides padding keys
    /// from every attention.
    pub fn run(
        &self,
        tokens: &Array,
        cache: &mut ModelCache,
        taps: &[String],
        key_mask: Option<&Array>,
    ) -> Result<(Array, IndexMap<String, Array>)> {
        if cache.slots.len() != self.cache_kinds.len() {
            return Err(Error::Usage(format!(
                "cache has {} slots, this model needs {}",
                cache.slots.len(),
                self.cache_kinds.len()
            )));
        }
        let mut wanted: HashMap<usize, Vec<&str>> = HashMap::new();
        for name in taps {
            let s = *self.taps.get(name).ok_or_else(|| {
                Error::Usage(format!("unknown tap '{name}' (see `lmspec spec taps`)"))
            })?;
            wanted.entry(s).or_default().push(name);
        }
        let mut captured = IndexMap::new();
        let mut values: Vec<Option<Array>> = vec![None; self.slots];
        values[0] = Some(tokens.clone());
        let offset = cache.offset;
        let t = tokens.shape().last().copied().unwrap_or(0);
        for step in &self.steps {
            let inputs: Vec<&Array> = step
                .inputs
                .iter()
                .map(|&i| {
                    values[i]
                        .as_ref()
                        .expect("plan orders producers before readers")
                })
                .collect();
            let mut ctx = Ctx {
                offset,
                key_mask,
                cache: step.cache.map(|c| &mut cache.slots[c]),
            };
            let y = step.op.forward(&inputs, &mut ctx)?;
            if let Some(names) = wanted.get(&step.out) {
                for n in names {
                    captured.insert(n.to_string(), y.clone());
                }
            }
            values[step.out] = Some(y);
            for &f in &step.free {
                values[f] = None;
            }
        }
        cache.offset += t;
        let out = values[self.output]
            .take()
            .ok_or_else(|| Error::Usage("the model produced no output".into()))?;
        // Taps of the model's input come straight from the tokens.
        if let Some(names) = wanted.get(&0) {
            for n in names {
                captured.insert(n.to_string(), tokens.clone());
            }
        }
        Ok((out, captured))
    }
}
