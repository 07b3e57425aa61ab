//! `linear`: `y = x Wᵀ (+ b)`, dense or MLX affine-quantized
//! (`quantized_matmul`, as mlx-lm's `nn.QuantizedLinear`).
use lmspec_spec::ops::{HeadLinear, Layout, Linear, OpError};
use mlx_rs::error::Exception;
use mlx_rs::Array;

use super::{mlx_err, Build, Ctx, Op, Param, Weights};

impl Build for Linear {
    fn build(&self, _inputs: &[Layout], mut w: Weights) -> Result<Box<dyn Op>, OpError> {
        let bias = match w.take_opt("bias") {
            Some(Param::Dense(b)) => Some(b),
            Some(Param::Quantized { .. }) => {
                return Err(OpError::new("bias", "a bias cannot be quantized"))
            }
            None => None,
        };
        let weight = match w.take("weight")? {
            Param::Dense(w) => Param::Dense(w.t()),
            q => q,
        };
        Ok(Box::new(LinearOp { weight, bias }))
    }
}

#[derive(Debug)]
struct LinearOp {
    /// Dense weights are kept transposed, `[in, out]`.
    weight: Param,
    bias: Option<Array>,
}

/// Applies a loaded linear layer; shared with ops that project through one.
pub(crate) fn apply(weight: &Param, bias: Option<&Array>, x: &Array) -> Result<Array, Exception> {
    match weight {
        Param::Dense(wt) => match bias {
            Some(b) => mlx_rs::ops::addmm(b, x, wt, 1.0, 1.0),
            None => mlx_rs::ops::matmul(x, wt),
        },
        Param::Quantized {
            w,
            scales,
            biases,
            group_size,
            bits,
        } => {
            let y = mlx_rs::ops::quantized_matmul(x, w, scales, biases, true, *group_size, *bits)?;
            match bias {
                Some(b) => mlx_rs::ops::add(&y, b),
                None => Ok(y),
            }
        }
    }
}

impl Op for LinearOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        apply(&self.weight, self.bias.as_ref(), inputs[0])
    }
}

/// `head_linear`: one projection per head (mlx-lm's `MultiLinear`): input
/// `[B, H or 1, T, in]`, weight `[H, out, in]` (or `[H, in, out]` with
/// `transposed: false`), output `[B, H, T, out]`.
impl Build for HeadLinear {
    fn build(&self, _inputs: &[Layout], mut w: Weights) -> Result<Box<dyn Op>, OpError> {
        // A quantized per-head weight is dequantized once, here.
        let weight = w.take("weight")?.dense().map_err(mlx_err("weight"))?;
        // [H, out] -> [H, 1, out] against [B, H, T, out].
        let bias = match w.dense_opt("bias")? {
            Some(b) => {
                let s = b.shape().to_vec();
                Some(b.reshape(&[s[0], 1, s[1]]).map_err(mlx_err("bias"))?)
            }
            None => None,
        };
        let w = match self.transposed {
            true => weight.swap_axes(-1, -2).map_err(mlx_err("weight"))?,
            false => weight,
        };
        Ok(Box::new(HeadLinearOp { w, bias }))
    }
}

#[derive(Debug)]
struct HeadLinearOp {
    w: Array,
    bias: Option<Array>,
}

impl Op for HeadLinearOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let y = mlx_rs::ops::matmul(inputs[0], &self.w)?;
        match &self.bias {
            Some(b) => mlx_rs::ops::add(&y, b),
            None => Ok(y),
        }
    }
}
