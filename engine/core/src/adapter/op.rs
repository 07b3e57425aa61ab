//! The adapted linear op: the base projection (dense or quantized) plus the
//! low-rank update, with mlx-lm's arithmetic:
//!
//! - LoRA: `y = linear(x) + (scale * ((dropout(x) @ a) @ b)).astype(x)`;
//! - DoRA: `y = x @ Wᵀ + scale * (dropout(x) @ a) @ b`, times
//!   `m / stop_gradient(‖W + scale * bᵀ aᵀ‖ per row)`, plus the bias
//!   (`W` dequantized when the base is quantized).
use std::sync::Arc;

use lmspec_spec::ops::{Layout, OpConfig, OpError};
use mlx_rs::error::Exception;
use mlx_rs::ops;
use mlx_rs::Array;

use super::AdapterSlot;
use crate::ops::{Ctx, Op, Param, Weights};

#[derive(Debug)]
struct Adapted {
    weight: Param,
    /// A rotated checkpoint's rotation of the base product's input.
    rotation: Option<crate::ops::Rotation>,
    bias: Option<Array>,
    /// DoRA: the dense weight `[out, in]`.
    dense: Option<Array>,
    slot: Arc<AdapterSlot>,
}

/// Builds an adapted `linear` node.
pub(crate) fn build_adapted(
    op: &OpConfig,
    _inputs: &[Layout],
    mut w: Weights,
    slot: Arc<AdapterSlot>,
) -> Result<Box<dyn Op>, OpError> {
    if !matches!(op, OpConfig::Linear(_)) {
        return Err(OpError::new(
            "weight",
            format!("adapter {}: only linear nodes take adapters", slot.module),
        ));
    }
    let bias = match w.take_opt("bias") {
        Some(Param::Dense(b)) => Some(b),
        Some(Param::Quantized { .. }) => {
            return Err(OpError::new("bias", "a bias cannot be quantized"))
        }
        None => None,
    };
    let weight = w.take("weight")?;
    // A rotated weight multiplies the rotated input; the low-rank update
    // reads the input as it comes.
    let rotation = crate::ops::Rotation::take(&mut w)?;
    if rotation.is_some() && slot.tensors().m.is_some() {
        return Err(OpError::new(
            "signs",
            format!(
                "adapter {}: DoRA needs the weight in the input's basis, and this one is stored rotated (Hadamard signs)",
                slot.module
            ),
        ));
    }
    let dense = match slot.tensors().m {
        Some(_) => Some(
            weight
                .dense()
                .map_err(|e| OpError::new("weight", e.to_string()))?,
        ),
        None => None,
    };
    let weight = match weight {
        Param::Dense(w) => Param::Dense(w.t()),
        q => q,
    };
    Ok(Box::new(Adapted {
        weight,
        rotation,
        bias,
        dense,
        slot,
    }))
}

fn dropout(x: &Array, p: f32) -> Result<Array, Exception> {
    let keep = mlx_rs::random::bernoulli(&Array::from_f32(1.0 - p), x.shape(), None)?;
    let kept = ops::multiply(x, keep.as_dtype(x.dtype())?)?;
    ops::multiply(&kept, Array::from_f32(1.0 / (1.0 - p)).as_dtype(x.dtype())?)
}

impl Op for Adapted {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let x = inputs[0];
        let base = |x: &Array| match &self.rotation {
            Some(r) => crate::ops::linear_apply(&self.weight, self.bias.as_ref(), &r.forward(x)?),
            None => crate::ops::linear_apply(&self.weight, self.bias.as_ref(), x),
        };
        if !self.slot.enabled() {
            return base(x);
        }
        let t = self.slot.tensors();
        let xd = if self.slot.training() && self.slot.dropout > 0.0 {
            dropout(x, self.slot.dropout)?
        } else {
            x.clone()
        };
        let scale = Array::from_f32(self.slot.scale);
        let z = ops::matmul(&ops::matmul(&xd, &t.a)?, &t.b)?;
        let z = ops::multiply(&scale, &z)?.as_dtype(x.dtype())?;
        match (&self.dense, &t.m) {
            (Some(w), Some(m)) => {
                let y = ops::matmul(x, w.t())?;
                let out = ops::add(&y, &z)?;
                let delta = ops::matmul(&ops::multiply(&scale, t.b.t())?, t.a.t())?;
                let adapted = ops::add(w, &delta)?;
                let norm = adapted.square()?.sum_axis(1, false)?.sqrt()?;
                let denom = mlx_rs::stop_gradient(&norm)?;
                let out = ops::multiply(&ops::divide(m, &denom)?.as_dtype(x.dtype())?, &out)?;
                match &self.bias {
                    Some(b) => ops::add(&out, b),
                    None => Ok(out),
                }
            }
            _ => ops::add(&base(x)?, &z),
        }
    }
}

/// `y + (scale * ((dropout(x) @ a) @ b)).astype(x)`: a LoRA update on a
/// projection another op computed (a `moe` router).
pub(crate) fn lora_delta(slot: &AdapterSlot, x: &Array, y: &Array) -> Result<Array, Exception> {
    if !slot.enabled() {
        return Ok(y.clone());
    }
    let t = slot.tensors();
    let xd = if slot.training() && slot.dropout > 0.0 {
        dropout(x, slot.dropout)?
    } else {
        x.clone()
    };
    let z = ops::matmul(&ops::matmul(&xd, &t.a)?, &t.b)?;
    let z = ops::multiply(Array::from_f32(slot.scale), &z)?.as_dtype(x.dtype())?;
    ops::add(y, &z)
}

/// mlx-lm's `LoRASwitchLinear`: `y` (the chosen experts' outputs) plus
/// `scale` times the chosen experts' low-rank update, `a` `[E, r, in]` and
/// `b` `[E, out, r]` gathered by the same indices.
pub(crate) fn stacked_lora(
    slot: &AdapterSlot,
    x: &Array,
    y: &Array,
    idx: &Array,
    sorted: bool,
) -> Result<Array, Exception> {
    if !slot.enabled() {
        return Ok(y.clone());
    }
    let t = slot.tensors();
    let xd = if slot.training() && slot.dropout > 0.0 {
        dropout(x, slot.dropout)?
    } else {
        x.clone()
    };
    let z = ops::gather_mm(&xd, t.a.swap_axes(-1, -2)?, None, idx, sorted)?;
    let z = ops::gather_mm(&z, t.b.swap_axes(-1, -2)?, None, idx, sorted)?;
    let z = ops::multiply(Array::from_f32(slot.scale), &z)?.as_dtype(x.dtype())?;
    ops::add(y, &z)
}
