//! `gain` (a learned scale broadcast over a value), `xielu` (xIELU with
//! learned scalars, as mlx-lm's `XieLU`) and `fake_quant` (8-bit fake
//! quantization with a learned scale, as mlx-lm's afm7 `fake_8bit_quant`).
use lmspec_spec::ops::{FakeQuant, Gain, GainShape, Layout, OpError, Xielu};
use mlx_rs::error::Exception;
use mlx_rs::Array;
use mlx_rs::Dtype;

use super::{mlx_err, Build, Ctx, Op, Weights};

impl Build for Gain {
    fn build(&self, _inputs: &[Layout], mut w: Weights) -> Result<Box<dyn Op>, OpError> {
        let weight = w.dense("weight")?;
        // [H] -> [H, 1, 1] and [H, D] -> [H, 1, D] against [B, H, T, D].
        let s = weight.shape().to_vec();
        let gain = match self.shape {
            GainShape::Scalar | GainShape::Channel => weight,
            GainShape::Head => weight.reshape(&[s[0], 1, 1]).map_err(mlx_err("weight"))?,
            GainShape::HeadChannel => weight
                .reshape(&[s[0], 1, s[1]])
                .map_err(mlx_err("weight"))?,
        };
        Ok(Box::new(GainOp { gain }))
    }
}

#[derive(Debug)]
struct GainOp {
    gain: Array,
}

impl Op for GainOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        mlx_rs::ops::multiply(inputs[0], &self.gain)
    }
}

impl Build for Xielu {
    fn build(&self, _inputs: &[Layout], mut w: Weights) -> Result<Box<dyn Op>, OpError> {
        let (alpha_p, alpha_n) = (w.dense("weight")?, w.dense("weight")?);
        let (beta, eps) = (w.dense("weight")?, w.dense("weight")?);
        let err = mlx_err("weight");
        let pos = mlx_rs::nn::softplus(&alpha_p).map_err(&err)?;
        let neg =
            mlx_rs::ops::add(&beta, mlx_rs::nn::softplus(&alpha_n).map_err(&err)?).map_err(&err)?;
        Ok(Box::new(XieluOp {
            pos,
            neg,
            beta,
            eps,
        }))
    }
}

/// x > 0: pos·x² + β·x; else (expm1(min(x, ε)) − x)·neg + β·x.
#[derive(Debug)]
struct XieluOp {
    pos: Array,
    neg: Array,
    beta: Array,
    eps: Array,
}

impl Op for XieluOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        use mlx_rs::ops::{add, expm1, gt, minimum, multiply, select, square, subtract};
        let x = inputs[0];
        let bx = multiply(&self.beta, x)?;
        let up = add(multiply(&self.pos, square(x)?)?, &bx)?;
        let down = add(
            multiply(subtract(expm1(minimum(x, &self.eps)?)?, x)?, &self.neg)?,
            &bx,
        )?;
        select(gt(x, Array::from_f32(0.0))?, &up, &down)
    }
}

impl Build for FakeQuant {
    fn build(&self, _inputs: &[Layout], mut w: Weights) -> Result<Box<dyn Op>, OpError> {
        let scale = w
            .dense("weight")?
            .as_dtype(Dtype::Float32)
            .map_err(mlx_err("weight"))?;
        Ok(Box::new(FakeQuantOp { scale }))
    }
}

/// round(x / s) clipped to [-128, 127], times s, in float32.
#[derive(Debug)]
struct FakeQuantOp {
    scale: Array,
}

impl Op for FakeQuantOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let x = inputs[0];
        let q = mlx_rs::ops::divide(x.as_dtype(Dtype::Float32)?, &self.scale)?.round(None)?;
        let q = mlx_rs::ops::clip(&q, (-128.0f32, 127.0f32))?;
        mlx_rs::ops::multiply(&q, &self.scale)?.as_dtype(x.dtype())
    }
}
