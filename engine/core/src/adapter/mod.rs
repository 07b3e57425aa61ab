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
mod attach;
mod format;
pub mod fuse;
mod op;
mod targets;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use indexmap::IndexMap;
use mlx_rs::Array;

use crate::error::Result;

pub use attach::{attach, attach_loaded, row_norms};
pub use format::{
    config_json, load, save, save_weights, AdapterFiles, ADAPTER_CONFIG, ADAPTER_WEIGHTS,
};
pub(crate) use op::{build_adapted, lora_delta, stacked_lora};
pub use targets::{origins, relative_key, select, targets, Target};

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
