//! `rg_lru`: Griffin's real-gated linear recurrent unit, as mlx-lm's
//! recurrent_gemma `RGLRU` after its block-diagonal gates: with the input
//! gate `gx` and recurrence gate `ga` (sigmoids, computed by the spec),
//! `log a = -8 ga softplus(recurrent_param)`, `a = exp(log a)`,
//! `h = a h + sqrt(1 - a²) gx x` per channel, `y = h`; at the start of a
//! sequence (no state yet) the first position's multiplier is 1. The
//! float32 state `[B, width]` is the op's cache slot.
use lmspec_spec::ops::{Layout, OpError, RgLru};
use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::{ArrayIndex, TryIndexOp};
use mlx_rs::{Array, Dtype};

use super::{mlx_err, Build, Ctx, Op, Weights};

impl Build for RgLru {
    fn build(&self, _inputs: &[Layout], mut w: Weights) -> Result<Box<dyn Op>, OpError> {
        let param = w.dense("weight")?;
        // -8 softplus(recurrent_param) = -8 logaddexp(p, 0)
        let rate = mlx_rs::ops::logaddexp(&param, Array::from_f32(0.0))
            .and_then(|s| mlx_rs::ops::multiply(&s, Array::from_f32(-8.0)))
            .map_err(mlx_err("weight"))?;
        Ok(Box::new(RgLruOp { rate }))
    }
}

#[derive(Debug)]
struct RgLruOp {
    /// `-8 softplus(recurrent_param)`, `[width]`.
    rate: Array,
}

impl Op for RgLruOp {
    fn forward(&self, inputs: &[&Array], ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let (x, gx, ga) = (inputs[0], inputs[1], inputs[2]);
        let t = x.shape()[1];
        let log_a = mlx_rs::ops::multiply(ga, &self.rate)?;
        let a = mlx_rs::ops::exp(&log_a)?;
        let a2 = mlx_rs::ops::exp(mlx_rs::ops::multiply(&log_a, Array::from_f32(2.0))?)?;
        let mut mult = mlx_rs::ops::sqrt(mlx_rs::ops::subtract(Array::from_f32(1.0), &a2)?)?;
        let state = ctx.recurrent_state("rg_lru")?;
        if state.is_none() {
            // A sequence's first position enters unscaled.
            let first = mlx_rs::ops::ones_like(
                &mult.try_index(&[(..).index_op(), (0..1).index_op()][..])?,
            )?;
            let rest = mult.try_index(&[(..).index_op(), (1..t).index_op()][..])?;
            mult = mlx_rs::ops::concatenate(&[first, rest], 1)?;
        }
        let xn = mlx_rs::ops::multiply(mlx_rs::ops::multiply(x, gx)?, &mult)?;
        let at = |v: &Array, i: i32| v.try_index(&[(..).index_op(), i.index_op()][..]);
        let mut h = match state {
            Some(s) => s,
            None => mlx_rs::ops::zeros_dtype(&[x.shape()[0], x.shape()[2]], Dtype::Float32)?,
        };
        let mut ys = Vec::with_capacity(t as usize);
        for i in 0..t {
            h = mlx_rs::ops::add(mlx_rs::ops::multiply(&at(&a, i)?, &h)?, &at(&xn, i)?)?;
            ys.push(h.as_dtype(x.dtype())?);
        }
        ctx.store_recurrent(Some(h), t);
        mlx_rs::ops::stack(&ys, 1)
    }
}
