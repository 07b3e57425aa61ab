//! Normalisations: `rms_norm` (`fast::rms_norm`, optional `1 + w` offset)
//! and `layer_norm` (`fast::layer_norm`, optional bias).
use lmspec_spec::ops::{LayerNorm, Layout, OpError, RmsNorm};
use mlx_rs::error::Exception;
use mlx_rs::Array;

use super::{mlx_err, Build, Ctx, Op, Weights};

impl Build for RmsNorm {
    fn build(&self, _inputs: &[Layout], mut w: Weights) -> Result<Box<dyn Op>, OpError> {
        let mut weight = w.dense("weight")?;
        if self.offset != 0.0 {
            weight = mlx_rs::ops::add(&weight, Array::from_f32(self.offset as f32))
                .map_err(mlx_err("offset"))?;
        }
        Ok(Box::new(RmsNormOp {
            weight,
            eps: self.eps as f32,
        }))
    }
}

#[derive(Debug)]
struct RmsNormOp {
    weight: Array,
    eps: f32,
}

impl Op for RmsNormOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        mlx_rs::fast::rms_norm(inputs[0], Some(&self.weight), self.eps)
    }
}

impl Build for LayerNorm {
    fn build(&self, _inputs: &[Layout], mut w: Weights) -> Result<Box<dyn Op>, OpError> {
        let weight = w.dense("weight")?;
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
