//! Primitives: the ops a spec's nodes name. Each op lives in its own file and
//! is registered in [`REGISTRY`]; an op has a parameter schema, resolves its
//! output layout and weight needs from config values (no MLX), and builds a
//! runnable [`Op`] from loaded weights.
use std::fmt::Debug;

use indexmap::IndexMap;
use mlx_rs::error::Exception;
use mlx_rs::Array;

use crate::cache::{CacheKind, CacheState};
use crate::spec::config::Ty;
use crate::spec::expr::Value;

mod attention;
mod conv;
mod delta;
mod elementwise;
mod embedding;
mod heads;
mod linear;
mod moe;
mod norm;
pub mod rope;
mod slice;
mod ssm;
#[cfg(test)]
mod tests;

/// Layout of a value flowing between nodes: the size of its last axis and,
/// for per-head values laid out `[B, H, T, D]`, the number of heads
/// (`None` for `[B, T, D]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValueInfo {
    pub dim: i64,
    pub heads: Option<i64>,
}

impl ValueInfo {
    pub fn flat(dim: i64) -> ValueInfo {
        ValueInfo { dim, heads: None }
    }
}

/// How a parameter is written in a spec.
#[derive(Debug, Clone, Copy)]
pub enum ParamKind {
    /// A literal or an expression of this type.
    Expr(Ty),
    /// A weight name relative to the node's scope.
    Weight,
    /// One of a fixed set of words.
    Choice(&'static [&'static str]),
}

#[derive(Debug)]
pub struct ParamDef {
    pub name: &'static str,
    pub kind: ParamKind,
    /// Default as spec text (an expression for `Expr`); `None` = required.
    pub default: Option<&'static str>,
    pub doc: &'static str,
}

/// An op parameter error: the field and what is wrong with it.
#[derive(Debug, Clone)]
pub struct OpError {
    pub field: String,
    pub msg: String,
}

impl OpError {
    pub fn new(field: impl Into<String>, msg: impl Into<String>) -> OpError {
        OpError {
            field: field.into(),
            msg: msg.into(),
        }
    }
}

/// Evaluated parameters of one node.
#[derive(Debug, Clone, Default)]
pub struct Params {
    pub values: IndexMap<String, Value>,
}

impl Params {
    fn get(&self, name: &str) -> Result<&Value, OpError> {
        self.values
            .get(name)
            .ok_or_else(|| OpError::new(name, "missing parameter"))
    }
    pub fn int(&self, name: &str) -> Result<i64, OpError> {
        let v = self.get(name)?;
        v.as_i64()
            .ok_or_else(|| OpError::new(name, format!("expected int, got {v}")))
    }
    pub fn opt_int(&self, name: &str) -> Result<Option<i64>, OpError> {
        match self.get(name)? {
            Value::Null => Ok(None),
            _ => self.int(name).map(Some),
        }
    }
    pub fn float(&self, name: &str) -> Result<f64, OpError> {
        let v = self.get(name)?;
        v.as_f64()
            .ok_or_else(|| OpError::new(name, format!("expected float, got {v}")))
    }
    pub fn opt_float(&self, name: &str) -> Result<Option<f64>, OpError> {
        match self.get(name)? {
            Value::Null => Ok(None),
            _ => self.float(name).map(Some),
        }
    }
    pub fn bool(&self, name: &str) -> Result<bool, OpError> {
        let v = self.get(name)?;
        v.as_bool()
            .ok_or_else(|| OpError::new(name, format!("expected bool, got {v}")))
    }
    pub fn str(&self, name: &str) -> Result<&str, OpError> {
        let v = self.get(name)?;
        v.as_str()
            .ok_or_else(|| OpError::new(name, format!("expected str, got {v}")))
    }
    pub fn value(&self, name: &str) -> Result<&Value, OpError> {
        self.get(name)
    }
}

/// A tensor an op needs from the checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightReq {
    /// The parameter that named it (for error messages).
    pub field: &'static str,
    /// Module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub module: String,
    /// Tensor suffix: `weight` or `bias`.
    pub suffix: &'static str,
    /// Expected (unquantized) shape.
    pub shape: Vec<i64>,
    /// Whether an MLX affine-quantized form (`scales`/`biases`) is accepted.
    pub quantizable: bool,
}

impl WeightReq {
    pub fn tensor(&self) -> String {
        format!("{}.{}", self.module, self.suffix)
    }
}

/// A loaded weight, dense or MLX affine-quantized.
#[derive(Debug, Clone)]
pub enum Param {
    Dense(Array),
    Quantized {
        w: Array,
        scales: Array,
        biases: Array,
        group_size: i32,
        bits: i32,
    },
}

impl Param {
    /// The dense array, or a dequantized copy.
    pub fn dense(&self) -> Result<Array, Exception> {
        match self {
            Param::Dense(a) => Ok(a.clone()),
            Param::Quantized {
                w,
                scales,
                biases,
                group_size,
                bits,
            } => mlx_rs::ops::dequantize(w, scales, biases, *group_size, *bits),
        }
    }
}

/// What resolving a node against config values gives: its output layout,
/// the tensors it needs and the state it keeps between calls.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub out: ValueInfo,
    pub weights: Vec<WeightReq>,
    pub cache: Option<CacheKind>,
}

impl Resolved {
    pub fn pure(out: ValueInfo) -> Resolved {
        Resolved {
            out,
            weights: Vec::new(),
            cache: None,
        }
    }
}

/// Per-call state handed to a running op.
#[derive(Debug)]
pub struct Ctx<'a> {
    /// Tokens already in the cache before this call (RoPE position offset).
    pub offset: i32,
    /// Keys attention may see ([B, T] bool), for padded batches.
    pub key_mask: Option<&'a Array>,
    /// The op's own cache slot, when it declared one.
    pub cache: Option<&'a mut CacheState>,
}

/// A built op, ready to run on the hot path.
pub trait Op: Debug + Send {
    fn forward(&self, inputs: &[&Array], ctx: &mut Ctx<'_>) -> Result<Array, Exception>;
}

/// A primitive the spec language knows.
pub trait OpKind: Sync {
    fn name(&self) -> &'static str;
    fn doc(&self) -> &'static str;
    fn params(&self) -> &'static [ParamDef];
    /// Minimum and maximum number of inputs.
    fn arity(&self) -> (usize, usize);
    /// Checks layouts and computes what the node needs; `scope` is the
    /// module path weight names are relative to.
    fn resolve(&self, p: &Params, scope: &str, inputs: &[ValueInfo]) -> Result<Resolved, OpError>;
    /// Builds the runnable op; `weights` follow the order of `resolve`'s.
    fn build(
        &self,
        p: &Params,
        inputs: &[ValueInfo],
        weights: Vec<Param>,
    ) -> Result<Box<dyn Op>, OpError>;
}

/// Every primitive, by name.
pub static REGISTRY: &[&dyn OpKind] = &[
    &embedding::Embedding,
    &embedding::PositionEmbedding,
    &linear::Linear,
    &linear::HeadLinear,
    &norm::RmsNorm,
    &norm::LayerNorm,
    &elementwise::Add,
    &elementwise::Mul,
    &elementwise::Scale,
    &elementwise::Softcap,
    &elementwise::Activation,
    &elementwise::Glu,
    &heads::SplitHeads,
    &heads::MergeHeads,
    &slice::Slice,
    &slice::Concat,
    &rope::Rope,
    &attention::Attention,
    &moe::Moe,
    &conv::ShortConv,
    &ssm::Ssm,
    &delta::GatedDelta,
];

pub fn lookup(name: &str) -> Option<&'static dyn OpKind> {
    REGISTRY.iter().copied().find(|k| k.name() == name)
}

pub fn names() -> Vec<&'static str> {
    REGISTRY.iter().map(|k| k.name()).collect()
}

/// Joins a scope and a relative weight name.
pub fn join_scope(scope: &str, name: &str) -> String {
    if scope.is_empty() {
        name.to_string()
    } else {
        format!("{scope}.{name}")
    }
}

pub(crate) fn expect_flat(inputs: &[ValueInfo], k: usize) -> Result<i64, OpError> {
    match inputs[k] {
        ValueInfo { dim, heads: None } => Ok(dim),
        ValueInfo { heads: Some(h), .. } => Err(OpError::new(
            "in",
            format!("input {k} is split into {h} heads; this op needs a [B, T, D] value"),
        )),
    }
}

pub(crate) fn expect_heads(inputs: &[ValueInfo], k: usize) -> Result<(i64, i64), OpError> {
    match inputs[k] {
        ValueInfo {
            dim,
            heads: Some(h),
        } => Ok((h, dim)),
        ValueInfo { .. } => Err(OpError::new(
            "in",
            format!("input {k} is [B, T, D]; this op needs per-head values (use split_heads)"),
        )),
    }
}

/// A weight that must be dense (norm scales, biases, per-head vectors).
pub(crate) fn dense(p: Option<Param>, field: &str) -> Result<Array, OpError> {
    match p {
        Some(Param::Dense(a)) => Ok(a),
        Some(Param::Quantized { .. }) => Err(OpError::new(field, "cannot be quantized")),
        None => Err(OpError::new(field, "not loaded")),
    }
}

/// Checks that flat inputs named `names` have the last-axis sizes `want`.
pub(crate) fn expect_widths(
    inputs: &[ValueInfo],
    names: &[&str],
    want: &[i64],
) -> Result<(), OpError> {
    for (k, (name, w)) in names.iter().zip(want).enumerate() {
        let d = expect_flat(inputs, k)?;
        if d != *w {
            return Err(OpError::new(
                "in",
                format!("input {k} ({name}) is {d} wide; expected {w}"),
            ));
        }
    }
    Ok(())
}

pub(crate) fn take_one(weights: Vec<Param>) -> Result<Param, OpError> {
    weights
        .into_iter()
        .next()
        .ok_or_else(|| OpError::new("weight", "weight not loaded"))
}
