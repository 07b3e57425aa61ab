//! Low-rank adapters (LoRA, DoRA; QLoRA when the base is quantized) on a
//! spec's `linear` nodes.
//!
//! An adapter names the modules it changes the way the checkpoint names
//! them (`model.layers.0.self_attn.q_proj`). Which node that is follows from
//! the spec's own weight rules: the checkpoint's tensor names are traced
//! through the rules ([`origins`]), so the node whose weight came from
//! `model.layers.0.self_attn.q_proj.weight` takes that module's adapter. No
//! list of layer names lives in Rust.
//!
//! Formats: mlx-lm's (`adapter_config.json` with `fine_tune_type`,
//! `num_layers`, `lora_parameters`; `adapters.safetensors` with
//! `<module>.lora_a` `[in, r]`, `<module>.lora_b` `[r, out]` and, for DoRA,
//! `<module>.m` `[out]`) and Hugging Face PEFT's (`adapter_config.json` with
//! `r`, `lora_alpha`, `target_modules`; `adapter_model.safetensors` with
//! `lora_A.weight` `[r, in]` and `lora_B.weight` `[out, r]`), read into
//! mlx-lm's layout.
mod format;
pub mod fuse;
mod op;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use indexmap::IndexMap;
use mlx_rs::Array;

use crate::error::{Error, Result};
use crate::weights::rules::{self, RuleEval, RuleValue};
use crate::weights::Param;
use lmspec_spec::ops::OpConfig;
use lmspec_spec::raw::RawRule;
use lmspec_spec::Graph;

pub use format::{
    config_json, load, save, save_weights, AdapterFiles, ADAPTER_CONFIG, ADAPTER_WEIGHTS,
};
pub(crate) use op::{build_adapted, lora_delta, stacked_lora};

/// LoRA or DoRA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AdapterKind {
    #[default]
    Lora,
    Dora,
}

impl AdapterKind {
    pub fn name(self) -> &'static str {
        match self {
            AdapterKind::Lora => "lora",
            AdapterKind::Dora => "dora",
        }
    }

    pub fn parse(s: &str) -> Option<AdapterKind> {
        match s {
            "lora" => Some(AdapterKind::Lora),
            "dora" => Some(AdapterKind::Dora),
            _ => None,
        }
    }
}

/// What an adapter is: mlx-lm's `fine_tune_type`, `num_layers` and
/// `lora_parameters` (defaults as mlx-lm's: rank 8, scale 20, dropout 0,
/// 16 layers).
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    pub kind: AdapterKind,
    pub rank: i32,
    pub scale: f32,
    pub dropout: f32,
    /// The last `num_layers` layers take adapters; -1: all.
    pub num_layers: i64,
    /// Module names (relative to a layer, e.g. `self_attn.q_proj`) that
    /// take adapters; `None`: every linear layer.
    pub keys: Option<Vec<String>>,
}

impl Default for AdapterConfig {
    fn default() -> AdapterConfig {
        AdapterConfig {
            kind: AdapterKind::Lora,
            rank: 8,
            scale: 20.0,
            dropout: 0.0,
            num_layers: 16,
            keys: None,
        }
    }
}

/// Where a model's adapter comes from.
#[derive(Debug, Clone)]
pub enum AdapterSource {
    /// A folder with an adapter (mlx-lm's or PEFT's files).
    Dir(PathBuf),
    /// A new adapter, initialised as mlx-lm does (`lora_a` uniform in
    /// ±1/sqrt(in), `lora_b` zero, DoRA's `m` the base rows' norms), with
    /// the seed of its `lora_a` draws.
    New { config: AdapterConfig, seed: u64 },
}

/// The tensors of one adapted module, in mlx-lm's layout.
#[derive(Debug, Clone)]
pub struct ModuleTensors {
    /// `[in, r]`.
    pub a: Array,
    /// `[r, out]`.
    pub b: Array,
    /// DoRA's magnitude, `[out]`.
    pub m: Option<Array>,
}

/// An adapter read from files: its config and each module's tensors.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub config: AdapterConfig,
    pub modules: IndexMap<String, ModuleTensors>,
    /// The weights file (named in errors).
    pub file: PathBuf,
}

/// The trainable state of one adapted linear node, shared by its op and a
/// trainer (which swaps in traced arrays while differentiating).
#[derive(Debug)]
pub struct AdapterSlot {
    /// The checkpoint's module name.
    pub module: String,
    /// The node's tap path.
    pub node: String,
    pub scale: f32,
    pub dropout: f32,
    a: Mutex<Array>,
    b: Mutex<Array>,
    m: Option<Mutex<Array>>,
    /// Off: the node runs its base weights only.
    enabled: AtomicBool,
    /// On: dropout applies (training).
    training: AtomicBool,
    /// Set when an op took the slot with its weight.
    applied: AtomicBool,
}

fn get(m: &Mutex<Array>) -> Array {
    m.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

fn set(m: &Mutex<Array>, v: Array) {
    *m.lock().unwrap_or_else(|e| e.into_inner()) = v;
}

impl AdapterSlot {
    fn new(module: String, node: String, cfg: &AdapterConfig, t: ModuleTensors) -> AdapterSlot {
        AdapterSlot {
            module,
            node,
            scale: cfg.scale,
            dropout: cfg.dropout,
            a: Mutex::new(t.a),
            b: Mutex::new(t.b),
            m: t.m.map(Mutex::new),
            enabled: AtomicBool::new(true),
            training: AtomicBool::new(false),
            applied: AtomicBool::new(false),
        }
    }

    /// The current tensors.
    pub fn tensors(&self) -> ModuleTensors {
        ModuleTensors {
            a: get(&self.a),
            b: get(&self.b),
            m: self.m.as_ref().map(get),
        }
    }

    /// The trainable arrays in order: `lora_a`, `lora_b` (and `m`).
    pub fn params(&self) -> Vec<Array> {
        let mut v = vec![get(&self.a), get(&self.b)];
        if let Some(m) = &self.m {
            v.push(get(m));
        }
        v
    }

    /// Their names (mlx-lm's keys).
    pub fn param_names(&self) -> Vec<String> {
        let mut v = vec![
            format!("{}.lora_a", self.module),
            format!("{}.lora_b", self.module),
        ];
        if self.m.is_some() {
            v.push(format!("{}.m", self.module));
        }
        v
    }

    /// Replaces the trainable arrays (as many as [`AdapterSlot::params`]
    /// gives, in its order).
    pub fn set_params(&self, p: &[Array]) {
        set(&self.a, p[0].clone());
        set(&self.b, p[1].clone());
        if let (Some(m), Some(v)) = (&self.m, p.get(2)) {
            set(m, v.clone());
        }
    }

    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    pub(crate) fn mark_applied(&self) {
        self.applied.store(true, Ordering::Relaxed);
    }

    /// Whether an op took this slot with its weight.
    pub fn applied(&self) -> bool {
        self.applied.load(Ordering::Relaxed)
    }

    /// Whether this adapts stacked experts (`a` `[E, r, in]`).
    pub fn is_stacked(&self) -> bool {
        get(&self.a).ndim() == 3
    }

    pub fn set_training(&self, on: bool) {
        self.training.store(on, Ordering::Relaxed);
    }

    pub(crate) fn training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }
}

/// Each adapted node weight (node index, weight index) with its slot (a
/// slot may serve several).
pub type NodeSlots = Vec<(usize, usize, Arc<AdapterSlot>)>;

/// An adapter attached to a loaded model.
#[derive(Debug, Clone)]
pub struct Attached {
    pub config: AdapterConfig,
    /// One per adapted node, in node order.
    pub slots: Vec<Arc<AdapterSlot>>,
}

impl Attached {
    /// Every trainable array, slot by slot.
    pub fn params(&self) -> Vec<Array> {
        self.slots.iter().flat_map(|s| s.params()).collect()
    }

    /// Their names.
    pub fn param_names(&self) -> Vec<String> {
        self.slots.iter().flat_map(|s| s.param_names()).collect()
    }

    /// Sets every trainable array (in [`Attached::params`]'s order).
    pub fn set_params(&self, p: &[Array]) {
        let mut at = 0;
        for s in &self.slots {
            let n = 2 + usize::from(s.m.is_some());
            s.set_params(&p[at..at + n]);
            at += n;
        }
    }

    /// Turns the adapter off (base model) or on again.
    pub fn set_enabled(&self, on: bool) {
        self.slots.iter().for_each(|s| s.set_enabled(on));
    }

    /// Dropout on (training) or off.
    pub fn set_training(&self, on: bool) {
        self.slots.iter().for_each(|s| s.set_training(on));
    }

    /// The module tensors, by module name.
    pub fn modules(&self) -> IndexMap<String, ModuleTensors> {
        self.slots
            .iter()
            .map(|s| (s.module.clone(), s.tensors()))
            .collect()
    }

    /// Writes the adapter in mlx-lm's layout (see [`format::save`]).
    pub fn save(&self, dir: &Path, extra: &serde_json::Value) -> Result<()> {
        format::save(dir, &self.config, &self.modules(), extra)
    }
}

/// A tensor name traced through the weight rules: its shape and the names
/// (after any format renames) it came from.
#[derive(Debug, Clone)]
struct Traced {
    dims: Vec<i64>,
    from: Vec<String>,
}

impl RuleValue for Traced {
    fn transposed(&self) -> std::result::Result<Self, String> {
        Ok(Traced {
            dims: self.dims.transposed()?,
            from: self.from.clone(),
        })
    }
    fn stacked(items: &[Self]) -> std::result::Result<Self, String> {
        let dims: Vec<Vec<i64>> = items.iter().map(|t| t.dims.clone()).collect();
        Ok(Traced {
            dims: RuleValue::stacked(&dims)?,
            from: items.iter().flat_map(|t| t.from.clone()).collect(),
        })
    }
    fn dims(&self) -> Vec<i64> {
        self.dims.clone()
    }
    fn reshaped(&self, shape: &[i64]) -> std::result::Result<Self, String> {
        Ok(Traced {
            dims: shape.to_vec(),
            from: self.from.clone(),
        })
    }
    fn repeated(&self, axis: usize, times: i64) -> std::result::Result<Self, String> {
        Ok(Traced {
            dims: self.dims.repeated(axis, times)?,
            from: self.from.clone(),
        })
    }
    fn l2_normalized(&self, _axis: usize, _eps: f64) -> std::result::Result<Self, String> {
        Ok(self.clone())
    }
    fn moved_axis(&self, from: usize, to: usize) -> std::result::Result<Self, String> {
        Ok(Traced {
            dims: self.dims.moved_axis(from, to)?,
            from: self.from.clone(),
        })
    }
    fn plus(&self, _value: f64) -> std::result::Result<Self, String> {
        Ok(self.clone())
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
            .map(|dims| Traced {
                dims,
                from: self.from.clone(),
            })
            .collect())
    }
}

/// For each tensor name the rules produce, the checkpoint names it came
/// from: `first` (a format's renames, e.g. GGUF's) run first and name the
/// origins; then the spec's `rules`. Tied tensors have no origin of their
/// own.
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
                },
            )
        })
        .collect();
    let renamed = rules::apply(first, start, eval)?.tensors;
    let named: IndexMap<String, Traced> = renamed
        .into_iter()
        .map(|(k, t)| {
            let from = vec![k.clone()];
            (k, Traced { dims: t.dims, from })
        })
        .collect();
    let applied = rules::apply(spec_rules, named, eval)?;
    let tied: Vec<String> = applied.ties.iter().map(|(t, _)| format!("{t}.")).collect();
    Ok(applied
        .tensors
        .into_iter()
        .map(|(k, t)| {
            let from = if tied.iter().any(|p| k.starts_with(p)) {
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

/// The rows' L2 norms of a linear weight in float32 (DoRA's initial `m`).
pub fn row_norms(p: &Param) -> std::result::Result<Array, mlx_rs::error::Exception> {
    let w = p.dense()?.as_dtype(mlx_rs::Dtype::Float32)?;
    w.square()?.sum_axis(1, false)?.sqrt()
}

/// Builds the slots of `source` for a model whose targets and node weights
/// are given: a loaded adapter is checked against the nodes (every module
/// found, shapes and rank as configured); a new one is initialised.
pub fn attach(
    source: &AdapterSource,
    targets: &[Target],
    weights: &[Vec<Param>],
) -> Result<(Attached, NodeSlots)> {
    match source {
        AdapterSource::Dir(dir) => {
            let adapter = format::load(dir)?;
            attach_loaded(&adapter, targets)
        }
        AdapterSource::New { config, seed } => {
            let chosen = select(targets, config)?;
            // Draws follow MLX's global key sequence after `seed(seed)`:
            // each draw splits the key and uses the second half.
            let mut key = mlx_rs::random::key(*seed)?;
            let mut slots = Vec::new();
            let mut nodes = Vec::new();
            for t in &chosen {
                let (node, r) = t.uses[0];
                let p = &weights[node][r];
                let r = config.rank;
                let (a_shape, b_shape, inp) = match t.shape[..] {
                    [out, inp] => (vec![inp as i32, r], vec![r, out as i32], inp),
                    [e, out, inp] => (
                        vec![e as i32, r, inp as i32],
                        vec![e as i32, out as i32, r],
                        inp,
                    ),
                    _ => return Err(Error::Usage(format!("{}: not a linear weight", t.module))),
                };
                if t.shape.len() == 3 && config.kind == AdapterKind::Dora {
                    return Err(Error::Usage(format!(
                        "{}: DoRA on stacked experts is not supported (nor by mlx-lm); use lora or --keys",
                        t.module
                    )));
                }
                let bound = 1.0 / (inp as f32).sqrt();
                let (next, k) = mlx_rs::random::split(&key, 2)?;
                key = next;
                let a = mlx_rs::random::uniform::<f32, f32>(-bound, bound, &a_shape[..], &k)?;
                let b = mlx_rs::ops::zeros::<f32>(&b_shape)?;
                let m = match config.kind {
                    AdapterKind::Dora => Some(row_norms(p)?),
                    AdapterKind::Lora => None,
                };
                let tensors = ModuleTensors { a, b, m };
                let slot = Arc::new(AdapterSlot::new(
                    t.module.clone(),
                    t.path.clone(),
                    config,
                    tensors,
                ));
                nodes.extend(t.uses.iter().map(|&(k, r)| (k, r, slot.clone())));
                slots.push(slot);
            }
            let attached = Attached {
                config: config.clone(),
                slots,
            };
            mlx_rs::transforms::eval(attached.params().iter())?;
            Ok((attached, nodes))
        }
    }
}

/// Checks a loaded adapter against the model's nodes and builds its slots.
pub fn attach_loaded(adapter: &Adapter, targets: &[Target]) -> Result<(Attached, NodeSlots)> {
    let file = &adapter.file;
    let cfg = &adapter.config;
    let unmatched: Vec<&str> = adapter
        .modules
        .keys()
        .filter(|m| !targets.iter().any(|t| &t.module == *m))
        .map(String::as_str)
        .collect();
    if !unmatched.is_empty() {
        let known: Vec<&str> = targets.iter().take(8).map(|t| t.module.as_str()).collect();
        return Err(Error::Weights {
            file: file.clone(),
            msg: format!(
                "adapter modules match no linear layer of the model: {} (the model's linear layers are named like {}; a tensor the spec's rules split into several layers takes no adapter)",
                unmatched.join(", "),
                known.join(", ")
            ),
        });
    }
    let mut slots = Vec::new();
    let mut nodes = Vec::new();
    for t in targets {
        let Some(m) = adapter.modules.get(&t.module) else {
            continue;
        };
        let bad = |what: &str, msg: String| Error::Weights {
            file: file.clone(),
            msg: format!("{}.{what}: {msg}", t.module),
        };
        let (sa, sb) = (m.a.shape(), m.b.shape());
        let r = cfg.rank;
        let (want_a, want_b, rank_at) = match t.shape[..] {
            [out, inp] => (vec![inp as i32, r], vec![r, out as i32], 1),
            [e, out, inp] => (
                vec![e as i32, r, inp as i32],
                vec![e as i32, out as i32, r],
                1,
            ),
            _ => return Err(bad("lora_a", "the layer is not a linear weight".into())),
        };
        if sa.len() != want_a.len()
            || sa
                .iter()
                .zip(&want_a)
                .enumerate()
                .any(|(k, (x, y))| k != rank_at && x != y)
        {
            return Err(bad(
                "lora_a",
                format!(
                    "shape {sa:?}, expected {want_a:?} for the layer's weight {:?}",
                    t.shape
                ),
            ));
        }
        if sa[rank_at] != r {
            return Err(bad(
                "lora_a",
                format!(
                    "rank {} does not match lora_parameters.rank {} of the adapter config",
                    sa[rank_at], r
                ),
            ));
        }
        if sb != want_b.as_slice() {
            return Err(bad("lora_b", format!("shape {sb:?}, expected {want_b:?}")));
        }
        let out = t.shape[t.shape.len() - 2] as i32;
        if t.shape.len() == 3 && cfg.kind == AdapterKind::Dora {
            return Err(bad("m", "DoRA on stacked experts is not supported".into()));
        }
        match (&m.m, cfg.kind) {
            (Some(mm), AdapterKind::Dora) if mm.shape() != [out] => {
                return Err(bad(
                    "m",
                    format!("shape {:?}, expected [{out}]", mm.shape()),
                ))
            }
            (None, AdapterKind::Dora) => {
                return Err(bad(
                    "m",
                    "missing (a DoRA adapter needs the magnitude)".into(),
                ))
            }
            (Some(_), AdapterKind::Lora) => {
                return Err(bad(
                    "m",
                    "present, but the adapter config says fine_tune_type lora".into(),
                ))
            }
            _ => {}
        }
        let slot = Arc::new(AdapterSlot::new(
            t.module.clone(),
            t.path.clone(),
            cfg,
            m.clone(),
        ));
        nodes.extend(t.uses.iter().map(|&(k, r)| (k, r, slot.clone())));
        slots.push(slot);
    }
    Ok((
        Attached {
            config: cfg.clone(),
            slots,
        },
        nodes,
    ))
}
