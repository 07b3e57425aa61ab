//! `lightning`: linear attention with a constant decay per head, as
//! mlx-lm's `recurrent_gla` (Bailing's lightning layers): per head h with
//! `g_h = -slope_h * layer_factor` (`slope_h` its ALiBi slope),
//! `S = exp(g_h) S + kᵀ v`, `y = (scale q) S`, one position at a time. The
//! float32 state `[B, heads, key_dim, value_dim]` is the op's cache slot.
use lmspec_spec::ops::{alibi_slopes, Layout, Lightning, OpError};
use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::{ArrayIndex, TryIndexOp};
use mlx_rs::{Array, Dtype};

use super::{Build, Ctx, Op, Weights};

impl Build for Lightning {
    fn build(&self, inputs: &[Layout], _w: Weights) -> Result<Box<dyn Op>, OpError> {
        let heads = inputs.first().and_then(|l| l.heads).unwrap_or(1);
        let decay: Vec<f32> = alibi_slopes(heads as usize)
            .into_iter()
            .map(|s| (-(s as f32) * self.layer_factor as f32).exp())
            .collect();
        Ok(Box::new(LightningOp {
            decay: Array::from_slice(&decay, &[heads as i32, 1, 1]),
            scale: self.scale as f32,
        }))
    }
}

#[derive(Debug)]
struct LightningOp {
    /// `exp(g_h)`, float32 `[heads, 1, 1]`.
    decay: Array,
    scale: f32,
}

impl Op for LightningOp {
    fn forward(&self, inputs: &[&Array], ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let (q, k, v) = (inputs[0], inputs[1], inputs[2]);
        let s = q.shape();
        let (b, h, t, dk) = (s[0], s[1], s[2], s[3]);
        let dv = v.shape()[3];
        let q = mlx_rs::ops::multiply(q, Array::from_f32(self.scale).as_dtype(q.dtype())?)?;
        let mut state = ctx.recurrent_state("lightning")?.map_or_else(
            || mlx_rs::ops::zeros_dtype(&[b, h, dk, dv], Dtype::Float32),
            Ok,
        )?;
        // Position i of a [B, H, T, D] value, kept as [B, H, 1, D].
        let at = |x: &Array, i: i32| {
            x.try_index(&[(..).index_op(), (..).index_op(), (i..i + 1).index_op()][..])
        };
        let mut ys = Vec::with_capacity(t as usize);
        for i in 0..t {
            let (qt, kt, vt) = (at(&q, i)?, at(k, i)?, at(v, i)?);
            let update = mlx_rs::ops::matmul(kt.swap_axes(-1, -2)?, &vt)?;
            state = mlx_rs::ops::add(mlx_rs::ops::multiply(&state, &self.decay)?, &update)?;
            ys.push(mlx_rs::ops::matmul(&qt, &state)?.as_dtype(v.dtype())?);
        }
        ctx.store_recurrent(Some(state), t);
        mlx_rs::ops::concatenate(&ys, 2)
    }
}
