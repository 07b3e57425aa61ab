//! Ops built on MLX. The spec crate declares each op (typed parameters,
//! layouts, weight needs); here each declared config gets a [`Build`] impl
//! that turns it and its loaded weights into a runnable [`Op`]. [`build`]
//! dispatches with one line per op.
use std::fmt::Debug;

use lmspec_spec::ops::{Layout, OpConfig, OpError};
use mlx_rs::error::Exception;
use mlx_rs::Array;

use crate::cache::{CacheState, ConvState};
pub use crate::weights::{Param, Weights};
pub(crate) use elementwise::activate;
pub(crate) use linear::apply as linear_apply;
pub(crate) use linear::Rotation;
pub(crate) use norm::rms_scale;

mod altup;
#[cfg(test)]
mod altup_tests;
mod attention;
mod conv;
mod deepstack;
#[cfg(test)]
mod deepstack_tests;
mod delta;
mod elementwise;
mod embedding;
mod heads;
mod index;
mod learned;
mod lightning;
mod linear;
mod moe;
#[cfg(test)]
mod moe_tests;
#[cfg(test)]
mod naflex_tests;
mod norm;
#[cfg(test)]
mod option_tests;
mod rglru;
pub mod rope;
mod scan;
#[cfg(test)]
mod scan_tests;
#[cfg(test)]
mod share_tests;
mod slice;
#[cfg(test)]
mod span_tests;
mod ssm;
#[cfg(test)]
mod tests;
mod tiles;
mod vision;
#[cfg(test)]
mod vision_tests;
#[cfg(test)]
mod window_tests;
mod wkv;

/// Per-call state handed to a running op.
#[derive(Debug)]
pub struct Ctx<'a> {
    /// Tokens already in the cache before this call (RoPE position offset).
    pub offset: i32,
    /// Keys attention may see ([B, T] bool), for padded batches.
    pub key_mask: Option<&'a Array>,
    /// Per-row positions before this call, for a batch of sequences at
    /// different positions (then `offset` is not used).
    pub positions: Option<&'a crate::batch::Positions>,
    /// The op's own cache slot, when it declared one.
    pub cache: Option<&'a mut CacheState>,
}

impl Ctx<'_> {
    /// A recurrent op's state from its cache slot: none before the first
    /// call or without a cache; a slot of another kind is an error naming
    /// `op`.
    pub fn recurrent_state(&self, op: &str) -> Result<Option<Array>, Exception> {
        match self.cache.as_deref() {
            Some(CacheState::Recurrent { state, .. }) => Ok(state.clone()),
            Some(_) => Err(Exception::custom(format!("{op}: wrong cache slot"))),
            None => Ok(None),
        }
    }

    /// `x` `[B, T, ...]` with the `keep` rows before it in front (axis 1):
    /// a convolution slot's remembered rows, which it then updates, or
    /// zeros without a cache; a slot of another kind is an error naming
    /// `op`.
    pub fn with_earlier_rows(
        &mut self,
        op: &str,
        x: &Array,
        keep: i32,
    ) -> Result<Array, Exception> {
        match self.cache.as_deref_mut() {
            Some(CacheState::Conv(state)) => state.extend(x),
            Some(_) => Err(Exception::custom(format!("{op}: wrong cache slot"))),
            None if keep == 0 => Ok(x.clone()),
            None => ConvState {
                keep,
                rows: None,
                offset: 0,
            }
            .extend(x),
        }
    }

    /// Stores a recurrent op's state after a call of `t` positions (when
    /// the op has a cache slot).
    pub fn store_recurrent(&mut self, state: Option<Array>, t: i32) {
        if let Some(CacheState::Recurrent {
            state: slot,
            offset,
        }) = self.cache.as_deref_mut()
        {
            *slot = state;
            *offset += t;
        }
    }
}

/// A built op, ready to run on the hot path.
pub trait Op: Debug + Send {
    fn forward(&self, inputs: &[&Array], ctx: &mut Ctx<'_>) -> Result<Array, Exception>;
}

/// An op config that needs its weights or input layouts prepared before it
/// runs. Configs that need neither run as they are (they implement [`Op`]).
pub trait Build {
    /// Builds the runnable op from its input layouts and loaded weights.
    fn build(&self, inputs: &[Layout], weights: Weights) -> Result<Box<dyn Op>, OpError>;
}

/// Builds any op config.
pub fn build(op: &OpConfig, inputs: &[Layout], w: Weights) -> Result<Box<dyn Op>, OpError> {
    match op {
        OpConfig::Embedding(c) => c.build(inputs, w),
        OpConfig::NgramEmbedding(c) => c.build(inputs, w),
        OpConfig::PositionEmbedding(c) => c.build(inputs, w),
        OpConfig::Linear(c) => c.build(inputs, w),
        OpConfig::HeadLinear(c) => c.build(inputs, w),
        OpConfig::RmsNorm(c) => c.build(inputs, w),
        OpConfig::LayerNorm(c) => c.build(inputs, w),
        OpConfig::Add(c) => Ok(Box::new(c.clone())),
        OpConfig::Mul(c) => Ok(Box::new(c.clone())),
        OpConfig::Scale(c) => Ok(Box::new(c.clone())),
        OpConfig::Softcap(c) => Ok(Box::new(c.clone())),
        OpConfig::MaskTokens(c) => elementwise::build_mask_tokens(c, inputs),
        OpConfig::Clamp(c) => Ok(Box::new(c.clone())),
        OpConfig::Activation(c) => Ok(Box::new(c.clone())),
        OpConfig::Glu(c) => Ok(elementwise::build_glu(c)),
        OpConfig::Gain(c) => c.build(inputs, w),
        OpConfig::Xielu(c) => c.build(inputs, w),
        OpConfig::FakeQuant(c) => c.build(inputs, w),
        OpConfig::SplitHeads(c) => Ok(Box::new(c.clone())),
        OpConfig::MergeHeads(c) => Ok(Box::new(c.clone())),
        OpConfig::RepeatHeads(c) => Ok(Box::new(c.clone())),
        OpConfig::Slice(c) => Ok(Box::new(c.clone())),
        OpConfig::Concat(c) => c.build(inputs, w),
        OpConfig::Rope(c) => c.build(inputs, w),
        OpConfig::PositionScale(c) => Ok(Box::new(c.clone())),
        OpConfig::Attention(c) => c.build(inputs, w),
        OpConfig::IndexTopk(c) => Ok(Box::new(c.clone())),
        OpConfig::BlockTopk(c) => Ok(Box::new(c.clone())),
        OpConfig::Moe(c) => c.build(inputs, w),
        OpConfig::ShortConv(c) => c.build(inputs, w),
        OpConfig::TokenShift(c) => Ok(Box::new(c.clone())),
        OpConfig::Ssm(c) => c.build(inputs, w),
        OpConfig::SelectiveScan(c) => c.build(inputs, w),
        OpConfig::GatedDelta(c) => c.build(inputs, w),
        OpConfig::Wkv7(c) => c.build(inputs, w),
        OpConfig::AltupPredict(c) => c.build(inputs, w),
        OpConfig::AltupCorrect(c) => c.build(inputs, w),
        OpConfig::GeluTopk(c) => c.build(inputs, w),
        OpConfig::MatchRms(c) => Ok(Box::new(c.clone())),
        OpConfig::MeanHeads(c) => Ok(Box::new(c.clone())),
        OpConfig::Lightning(c) => c.build(inputs, w),
        OpConfig::RgLru(c) => c.build(inputs, w),
        OpConfig::Patchify(c) => c.build(inputs, w),
        OpConfig::Mrope(c) => c.build(inputs, w),
        OpConfig::MergePatches(c) => Ok(Box::new(c.clone())),
        OpConfig::GridTable(c) => c.build(inputs, w),
        OpConfig::PoolPatches(c) => Ok(Box::new(c.clone())),
        OpConfig::PixelShuffle(c) => Ok(Box::new(c.clone())),
        OpConfig::Splice(c) => Ok(Box::new(c.clone())),
        OpConfig::Keep(c) => Ok(Box::new(c.clone())),
        OpConfig::Kept(c) => Ok(Box::new(c.clone())),
        OpConfig::AddFeatures(c) => Ok(Box::new(c.clone())),
    }
}

/// An MLX error while preparing a weight, blamed on its parameter.
pub(crate) fn mlx_err(field: &str) -> impl Fn(Exception) -> OpError + '_ {
    move |e| OpError::new(field, e.to_string())
}
