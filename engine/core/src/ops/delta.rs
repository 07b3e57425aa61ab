//! `gated_delta`: the gated delta rule of Gated DeltaNet linear
//! attention, as mlx-lm's `gated_delta_update` ops path. Per value
//! head j (key head j / (value_heads / key_heads)), with q, k normalised
//! to unit length (q also scaled by `key_dim^-0.5`), `beta = sigmoid(b)`
//! (twice that with `neg_eigval`) and `g = exp(-exp(A_log) softplus(a +
//! dt_bias))` (with a lower bound: `exp(lb sigmoid(exp(A_log) (a +
//! dt_bias)))`), one per head or, with `channel_gate` (Kimi Delta
//! Attention), one per key channel:
//! `S = g S + beta (v - g S k) kᵀ`, `y = S q`. The float32 state
//! `[B, value_heads, value_dim, key_dim]` is the op's cache slot.
use lmspec_spec::ops::{GatedDelta, Layout, OpError};
use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::{ArrayIndex, TryIndexOp};
use mlx_rs::{Array, Dtype};

use super::{mlx_err, Build, Ctx, Op, Weights};

/// Added to the squared length before q and k are normalised.
const NORM_EPS: f32 = 1e-6;

impl Build for GatedDelta {
    fn build(&self, _inputs: &[Layout], mut w: Weights) -> Result<Box<dyn Op>, OpError> {
        let (a_log, dt_bias) = (w.dense("weight")?, w.dense("weight")?);
        let neg_a = a_log
            .as_dtype(Dtype::Float32)
            .and_then(|a| mlx_rs::ops::exp(&a))
            .and_then(|a| mlx_rs::ops::negative(&a))
            .map_err(mlx_err("weight"))?;
        // Per-channel gates: dt_bias [Hv, Dk] against a [B, T, Hv, Dk], the
        // per-head A broadcast over the channels.
        let (neg_a, dt_bias) = if self.channel_gate {
            let (hv, dk) = (self.value_heads as i32, self.key_dim as i32);
            (
                neg_a.reshape(&[hv, 1]).map_err(mlx_err("weight"))?,
                dt_bias.reshape(&[hv, dk]).map_err(mlx_err("weight"))?,
            )
        } else {
            (neg_a, dt_bias)
        };
        Ok(Box::new(GatedDeltaOp {
            neg_a,
            dt_bias,
            channel_gate: self.channel_gate,
            lower_bound: self.lower_bound.map(|b| b as f32),
            neg_eigval: self.neg_eigval,
            key_heads: self.key_heads as i32,
            value_heads: self.value_heads as i32,
            key_dim: self.key_dim as i32,
            value_dim: self.value_dim as i32,
        }))
    }
}

#[derive(Debug)]
struct GatedDeltaOp {
    /// `-exp(A_log)`, float32 `[value_heads]` (`[value_heads, 1]` with
    /// per-channel gates).
    neg_a: Array,
    dt_bias: Array,
    channel_gate: bool,
    lower_bound: Option<f32>,
    neg_eigval: bool,
    key_heads: i32,
    value_heads: i32,
    key_dim: i32,
    value_dim: i32,
}

/// `x / sqrt(sum(x²) + eps)` over the last axis (a head), times `scale`.
fn unit(x: &Array, scale: f32) -> Result<Array, Exception> {
    let sq = mlx_rs::ops::square(x.as_dtype(Dtype::Float32)?)?.sum_axis(-1, true)?;
    let inv = mlx_rs::ops::rsqrt(mlx_rs::ops::add(&sq, Array::from_f32(NORM_EPS))?)?;
    let inv = mlx_rs::ops::multiply(&inv, Array::from_f32(scale))?;
    mlx_rs::ops::multiply(x, &inv)?.as_dtype(x.dtype())
}

impl GatedDeltaOp {
    /// `[B, T, Hk * Dk]` as `[B, T, Hv, Dk]`, each key head normalised
    /// (times `scale`) and serving its value heads.
    fn per_value_head(&self, x: &Array, scale: f32) -> Result<Array, Exception> {
        let s = x.shape();
        let (b, t) = (s[0], s[1]);
        let rep = self.value_heads / self.key_heads;
        let x = unit(&x.reshape(&[b, t, self.key_heads, self.key_dim])?, scale)?;
        let x = x.reshape(&[b, t, self.key_heads, 1, self.key_dim])?;
        let x = mlx_rs::ops::broadcast_to(&x, &[b, t, self.key_heads, rep, self.key_dim])?;
        x.reshape(&[b, t, self.value_heads, self.key_dim])
    }
}

impl Op for GatedDeltaOp {
    fn forward(&self, inputs: &[&Array], ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let (q, k, v, a, b) = (inputs[0], inputs[1], inputs[2], inputs[3], inputs[4]);
        let s = q.shape();
        let (bsz, t) = (s[0], s[1]);
        let (hv, dk, dv) = (self.value_heads, self.key_dim, self.value_dim);
        let q = self.per_value_head(q, (dk as f32).powf(-0.5))?;
        let k = self.per_value_head(k, 1.0)?;
        let v = v.reshape(&[bsz, t, hv, dv])?;
        let mut beta = mlx_rs::ops::sigmoid(b)?;
        if self.neg_eigval {
            beta = mlx_rs::ops::multiply(&beta, Array::from_f32(2.0).as_dtype(beta.dtype())?)?;
        }
        let a = if self.channel_gate {
            a.reshape(&[bsz, t, hv, dk])?
        } else {
            a.clone()
        };
        let g = match self.lower_bound {
            // softplus(a + dt_bias) = logaddexp(., 0)
            None => {
                let sp = mlx_rs::ops::logaddexp(
                    mlx_rs::ops::add(&a, &self.dt_bias)?,
                    Array::from_f32(0.0),
                )?;
                mlx_rs::ops::exp(mlx_rs::ops::multiply(
                    &self.neg_a,
                    sp.as_dtype(Dtype::Float32)?,
                )?)?
            }
            // exp(lb * sigmoid(exp(A_log) * (a + dt_bias))), in float32.
            Some(lb) => {
                let shifted = mlx_rs::ops::add(a.as_dtype(Dtype::Float32)?, &self.dt_bias)?;
                let rate = mlx_rs::ops::multiply(mlx_rs::ops::negative(&self.neg_a)?, &shifted)?;
                let s = mlx_rs::ops::sigmoid(&rate)?;
                mlx_rs::ops::exp(mlx_rs::ops::multiply(&s, Array::from_f32(lb))?)?
            }
        };
        // The decay of one step: per head [B, Hv, 1, 1] or per key channel
        // [B, Hv, 1, Dk].
        let decay_shape = if self.channel_gate {
            [bsz, hv, 1, dk]
        } else {
            [bsz, hv, 1, 1]
        };
        let mut state = ctx.recurrent_state("gated_delta")?.map_or_else(
            || mlx_rs::ops::zeros_dtype(&[bsz, hv, dv, dk], Dtype::Float32),
            Ok,
        )?;
        let at = |x: &Array, i: i32| x.try_index(&[(..).index_op(), i.index_op()][..]);
        let mut ys = Vec::with_capacity(t as usize);
        for i in 0..t {
            let (qt, kt, vt) = (at(&q, i)?, at(&k, i)?, at(&v, i)?);
            let (gt, bt) = (at(&g, i)?, at(&beta, i)?);
            // [B, Hv, Dv, Dk] scaled by g; k and q along the last axis.
            state = mlx_rs::ops::multiply(&state, gt.reshape(&decay_shape)?)?;
            let k4 = kt.expand_dims(-2)?;
            let kv_mem = mlx_rs::ops::multiply(&state, &k4)?.sum_axis(-1, false)?;
            let delta =
                mlx_rs::ops::multiply(mlx_rs::ops::subtract(&vt, &kv_mem)?, bt.expand_dims(-1)?)?;
            state = mlx_rs::ops::add(&state, mlx_rs::ops::multiply(&k4, delta.expand_dims(-1)?)?)?;
            let y = mlx_rs::ops::multiply(&state, qt.expand_dims(-2)?)?.sum_axis(-1, false)?;
            ys.push(y.as_dtype(q.dtype())?);
        }
        ctx.store_recurrent(Some(state), t);
        mlx_rs::ops::stack(&ys, 1)?.reshape(&[bsz, t, hv * dv])
    }
}
