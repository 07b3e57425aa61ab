//! Normalisations: `rms_norm` (`fast::rms_norm`, optional `1 + w` offset,
//! optional groups) and `layer_norm` (`fast::layer_norm`, optional bias and
//! offset); either without a weight normalises only.
use lmspec_spec::ops::{LayerNorm, Layout, OpError, RmsNorm};
use mlx_rs::error::Exception;
use mlx_rs::Array;

use super::{mlx_err, Build, Ctx, Op, Weights};

/// `weight + offset`, the scale a norm applies.
fn with_offset(weight: Array, offset: f64) -> Result<Array, OpError> {
    if offset == 0.0 {
        return Ok(weight);
    }
    mlx_rs::ops::add(&weight, Array::from_f32(offset as f32)).map_err(mlx_err("offset"))
}

/// The scale an `rms_norm` node applies to its normalised input: its
/// weight plus the offset.
pub(crate) fn rms_scale(c: &RmsNorm, weight: Array) -> Result<Array, OpError> {
    with_offset(weight, c.offset)
}

impl Build for RmsNorm {
    fn build(&self, _inputs: &[Layout], mut w: Weights) -> Result<Box<dyn Op>, OpError> {
        let weight = match self.weight {
            Some(_) => Some(with_offset(w.dense("weight")?, self.offset)?),
            None => None,
        };
        Ok(Box::new(RmsNormOp {
            weight,
            eps: self.eps as f32,
            groups: self.groups as i32,
        }))
    }
}

#[derive(Debug)]
struct RmsNormOp {
    weight: Option<Array>,
    eps: f32,
    groups: i32,
}

impl Op for RmsNormOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let x = inputs[0];
        if self.groups <= 1 {
            return rms_norm(x, self.weight.as_ref(), self.eps);
        }
        // Each group of the last axis normalised on its own, then the
        // weight over the whole axis.
        let shape = x.shape().to_vec();
        let mut grouped = shape.clone();
        let last = grouped.pop().unwrap_or(0);
        grouped.extend([self.groups, last / self.groups]);
        let normed =
            mlx_rs::fast::rms_norm(x.reshape(&grouped)?, None, self.eps)?.reshape(&shape)?;
        match &self.weight {
            Some(wt) => mlx_rs::ops::multiply(&normed, wt),
            None => Ok(normed),
        }
    }
}

/// `fast::rms_norm`, through lmspec's CPU kernel for float32 on the CPU.
fn rms_norm(x: &Array, weight: Option<&Array>, eps: f32) -> Result<Array, Exception> {
    use crate::cpu_kernels as cpu;
    let f32 = cpu::all_f32(&[x]) && weight.is_none_or(|w| cpu::all_f32(&[w]) && w.ndim() == 1);
    if f32 && x.ndim() >= 1 && cpu::enabled() {
        return cpu::rms_norm(x, weight, eps);
    }
    mlx_rs::fast::rms_norm(x, weight, eps)
}

impl Build for LayerNorm {
    fn build(&self, _inputs: &[Layout], mut w: Weights) -> Result<Box<dyn Op>, OpError> {
        if self.weight.is_none() {
            return Ok(Box::new(WeightlessLayerNormOp {
                eps: self.eps as f32,
            }));
        }
        let weight = with_offset(w.dense("weight")?, self.offset)?;
        if self.per_head {
            // [heads, dim] -> [heads, 1, dim]: one row per head of [B, H, T, dim].
            let s = weight.shape().to_vec();
            let rows = weight
                .reshape(&[s[0], 1, s[1]])
                .map_err(mlx_err("weight"))?;
            return Ok(Box::new(PerHeadLayerNormOp {
                weight: rows,
                eps: self.eps as f32,
            }));
        }
        Ok(Box::new(LayerNormOp {
            weight,
            bias: w.dense_opt("bias")?,
            eps: self.eps as f32,
        }))
    }
}

#[derive(Debug)]
struct LayerNormOp {
    weight: Array,
    bias: Option<Array>,
    eps: f32,
}

impl Op for LayerNormOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        mlx_rs::fast::layer_norm(inputs[0], &self.weight, self.bias.as_ref(), self.eps)
    }
}

/// Layer normalisation of each head's features, scaled by that head's row.
#[derive(Debug)]
struct PerHeadLayerNormOp {
    weight: Array,
    eps: f32,
}

impl Op for PerHeadLayerNormOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let normed = mlx_rs::fast::layer_norm(inputs[0], None, None, self.eps)?;
        mlx_rs::ops::multiply(&normed, &self.weight)
    }
}

/// Layer normalisation alone (no weight, no bias).
#[derive(Debug)]
struct WeightlessLayerNormOp {
    eps: f32,
}

impl Op for WeightlessLayerNormOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        mlx_rs::fast::layer_norm(inputs[0], None, None, self.eps)
    }
}
