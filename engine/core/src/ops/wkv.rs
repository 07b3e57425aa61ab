//! RWKV-7's mechanisms, as mlx-lm's `rwkv7` ops path computes them:
//! `token_shift`, each position's previous row (the last row of the
//! previous call as state), and `wkv7`, the time-mixing core. Per head,
//! with `decay = exp(-0.606531 sigmoid(w))`, `iclr = sigmoid(a)`,
//! `kk = unit(k k_k)`, `k' = k (1 + (iclr - 1) k_a)`:
//! `S = S diag(decay) - (S kk)(kk iclr)ᵀ + v k'ᵀ`, `y = S r`, and the
//! output `LayerNorm(y) g + b + Σ(r k' r_k) v`. The state
//! `[B, heads, head_dim (values), head_dim (keys)]` is kept in float32.
use lmspec_spec::ops::{Layout, OpError, TokenShift, Wkv7};
use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::{ArrayIndex, TryIndexOp};
use mlx_rs::{Array, Dtype};

use super::{Build, Ctx, Op, Weights};

/// The decay is exp(DECAY_RATE · sigmoid(w)): -e^(-1/2), to six places as
/// the reference writes it.
const DECAY_RATE: f32 = -0.606531;
/// The least length a key is divided by when made unit (mlx-lm's `l2_norm`).
const L2_FLOOR: f32 = 1e-7;

impl Op for TokenShift {
    fn forward(&self, inputs: &[&Array], ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let x = inputs[0];
        let t = x.shape()[1];
        // [B, 1 + T, D]: the previous row (zeros at the start) first.
        let all = ctx.with_earlier_rows("token_shift", x, 1)?;
        all.try_index(&[(..).index_op(), (..t).index_op()][..])
    }
}

impl Build for Wkv7 {
    fn build(&self, _inputs: &[Layout], mut w: Weights) -> Result<Box<dyn Op>, OpError> {
        let mut next = || w.dense("weight");
        let (k_k, k_a, r_k) = (next()?, next()?, next()?);
        let (norm_w, norm_b) = (next()?, next()?);
        Ok(Box::new(Wkv7Op {
            k_k,
            k_a,
            r_k,
            norm_w,
            norm_b,
            heads: self.heads as i32,
            head_dim: self.head_dim as i32,
            eps: self.eps as f32,
        }))
    }
}

#[derive(Debug)]
struct Wkv7Op {
    k_k: Array,
    k_a: Array,
    r_k: Array,
    norm_w: Array,
    norm_b: Array,
    heads: i32,
    head_dim: i32,
    eps: f32,
}

fn f32(x: f32) -> Array {
    Array::from_f32(x)
}

/// `x / max(|x|, L2_FLOOR)` over the last axis.
fn unit(x: &Array) -> Result<Array, Exception> {
    let len = mlx_rs::ops::sqrt(mlx_rs::ops::square(x)?.sum_axis(-1, true)?)?;
    let floor = f32(L2_FLOOR).as_dtype(x.dtype())?;
    mlx_rs::ops::divide(x, mlx_rs::ops::maximum(&len, &floor)?)
}

impl Wkv7Op {
    /// One step of the recurrence: the new state and `S r` `[B, H, Dv]`,
    /// every argument `[B, H, D]` in float32.
    #[allow(clippy::too_many_arguments)]
    fn step(
        state: &Array,
        r: &Array,
        decay: &Array,
        k: &Array,
        v: &Array,
        a: &Array,
        b: &Array,
    ) -> Result<(Array, Array), Exception> {
        // (S a) bᵀ from the state before the step.
        let sa = mlx_rs::ops::matmul(state, a.expand_dims(-1)?)?;
        let sab = mlx_rs::ops::multiply(&sa, b.expand_dims(-2)?)?;
        let vk = mlx_rs::ops::multiply(v.expand_dims(-1)?, k.expand_dims(-2)?)?;
        let decayed = mlx_rs::ops::multiply(state, decay.expand_dims(-2)?)?;
        let state = mlx_rs::ops::add(mlx_rs::ops::add(&decayed, &vk)?, &sab)?;
        let y = mlx_rs::ops::matmul(&state, r.expand_dims(-1)?)?.squeeze_axes(&[-1])?;
        Ok((state, y))
    }
}

impl Op for Wkv7Op {
    fn forward(&self, inputs: &[&Array], ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let s = inputs[0].shape();
        let (bsz, t) = (s[0], s[1]);
        let (h, d) = (self.heads, self.head_dim);
        let dtype = inputs[0].dtype();
        let heads = |x: &Array| x.reshape(&[bsz, t, h, d]);
        let (r, w, k, v, a) = (
            heads(inputs[0])?,
            heads(inputs[1])?,
            heads(inputs[2])?,
            heads(inputs[3])?,
            heads(inputs[4])?,
        );
        let sig = mlx_rs::ops::sigmoid(w.as_dtype(Dtype::Float32)?)?;
        let decay =
            mlx_rs::ops::exp(mlx_rs::ops::multiply(&sig, f32(DECAY_RATE))?)?.as_dtype(dtype)?;
        let iclr = mlx_rs::ops::sigmoid(&a)?;
        let kk = unit(&mlx_rs::ops::multiply(&k, &self.k_k)?)?;
        let one = f32(1.0).as_dtype(dtype)?;
        let gain = mlx_rs::ops::add(
            &one,
            mlx_rs::ops::multiply(mlx_rs::ops::subtract(&iclr, &one)?, &self.k_a)?,
        )?;
        let key = mlx_rs::ops::multiply(&k, &gain)?;
        let neg_kk = mlx_rs::ops::negative(&kk)?;
        let kk_iclr = mlx_rs::ops::multiply(&kk, &iclr)?;

        let mut state = ctx.recurrent_state("wkv7")?.map_or_else(
            || mlx_rs::ops::zeros_dtype(&[bsz, h, d, d], Dtype::Float32),
            Ok,
        )?;
        let at = |x: &Array, i: i32| {
            x.try_index(&[(..).index_op(), i.index_op()][..])
                .and_then(|x| x.as_dtype(Dtype::Float32))
        };
        let mut ys = Vec::with_capacity(t as usize);
        for i in 0..t {
            let (next, y) = Self::step(
                &state,
                &at(&r, i)?,
                &at(&decay, i)?,
                &at(&key, i)?,
                &at(&v, i)?,
                &at(&neg_kk, i)?,
                &at(&kk_iclr, i)?,
            )?;
            state = next;
            ys.push(y.as_dtype(dtype)?);
        }
        ctx.store_recurrent(Some(state), t);
        // [B, T, H, D]: per-head LayerNorm with its [H, D] gain and bias,
        // plus the bonus Σ(r k' r_k) v.
        let y = mlx_rs::ops::stack(&ys, 1)?;
        let normed = mlx_rs::fast::layer_norm(&y, None, None, self.eps)?;
        let normed = mlx_rs::ops::add(mlx_rs::ops::multiply(&normed, &self.norm_w)?, &self.norm_b)?;
        let rk = mlx_rs::ops::multiply(mlx_rs::ops::multiply(&r, &key)?, &self.r_k)?;
        let bonus = mlx_rs::ops::multiply(rk.sum_axis(-1, true)?, &v)?;
        mlx_rs::ops::add(&normed, &bonus)?.reshape(&[bsz, t, h * d])
    }
}

#[cfg(test)]
#[path = "wkv_tests.rs"]
mod tests;
