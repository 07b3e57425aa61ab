//! Ops built on MLX. The spec crate declares each op (typed parameters,
//! layouts, weight needs); here each declared config gets a [`Build`] impl
//! that turns it and its loaded weights into a runnable [`Op`]. [`build`]
//! dispatches with one line per op.
use std::fmt::Debug;

use lmspec_spec::ops::{Layout, OpConfig, OpError};
use mlx_rs::error::Exception;
use mlx_rs::Array;

use crate::cache::CacheState;

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

/// The weights of one node, each under the parameter (`field`) that
/// required it.
#[derive(Debug, Default)]
pub struct Weights {
    items: Vec<(&'static str, Param)>,
}

impl Weights {
    pub fn new(items: Vec<(&'static str, Param)>) -> Weights {
        Weights { items }
    }

    /// The weight required under `field`, if it was.
    pub fn take_opt(&mut self, field: &str) -> Option<Param> {
        let k = self.items.iter().position(|(f, _)| *f == field)?;
        Some(self.items.remove(k).1)
    }

    /// The weight required under `field`.
    pub fn take(&mut self, field: &str) -> Result<Param, OpError> {
        self.take_opt(field)
            .ok_or_else(|| OpError::new(field, "not loaded"))
    }

    /// A weight that must be dense (norm scales, biases, per-head vectors).
    pub fn dense(&mut self, field: &str) -> Result<Array, OpError> {
        match self.take(field)? {
            Param::Dense(a) => Ok(a),
            Param::Quantized { .. } => Err(OpError::new(field, "cannot be quantized")),
        }
    }

    /// An optional weight that must be dense.
    pub fn dense_opt(&mut self, field: &str) -> Result<Option<Array>, OpError> {
        match self.take_opt(field) {
            None => Ok(None),
            Some(Param::Dense(a)) => Ok(Some(a)),
            Some(Param::Quantized { .. }) => Err(OpError::new(field, "cannot be quantized")),
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

/// An op config that can be built on MLX.
pub trait Build {
    /// Builds the runnable op from its input layouts and loaded weights.
    fn build(&self, inputs: &[Layout], weights: Weights) -> Result<Box<dyn Op>, OpError>;
}

/// Builds any op config.
pub fn build(op: &OpConfig, inputs: &[Layout], w: Weights) -> Result<Box<dyn Op>, OpError> {
    match op {
        OpConfig::Embedding(c) => c.build(inputs, w),
        OpConfig::PositionEmbedding(c) => c.build(inputs, w),
        OpConfig::Linear(c) => c.build(inputs, w),
        OpConfig::HeadLinear(c) => c.build(inputs, w),
        OpConfig::RmsNorm(c) => c.build(inputs, w),
        OpConfig::LayerNorm(c) => c.build(inputs, w),
        OpConfig::Add(c) => c.build(inputs, w),
        OpConfig::Mul(c) => c.build(inputs, w),
        OpConfig::Scale(c) => c.build(inputs, w),
        OpConfig::Softcap(c) => c.build(inputs, w),
        OpConfig::Activation(c) => c.build(inputs, w),
        OpConfig::Glu(c) => c.build(inputs, w),
        OpConfig::SplitHeads(c) => c.build(inputs, w),
        OpConfig::MergeHeads(c) => c.build(inputs, w),
        OpConfig::Slice(c) => c.build(inputs, w),
        OpConfig::Concat(c) => c.build(inputs, w),
        OpConfig::Rope(c) => c.build(inputs, w),
        OpConfig::Attention(c) => c.build(inputs, w),
        OpConfig::Moe(c) => c.build(inputs, w),
        OpConfig::ShortConv(c) => c.build(inputs, w),
        OpConfig::Ssm(c) => c.build(inputs, w),
        OpConfig::GatedDelta(c) => c.build(inputs, w),
    }
}

/// An MLX error while preparing a weight, blamed on its parameter.
pub(crate) fn mlx_err(field: &str) -> impl Fn(Exception) -> OpError + '_ {
    move |e| OpError::new(field, e.to_string())
}
