//! `ssm`: the selective state-space scan (SSD), as mlx-lm's
//! `ssm_attn`: per head h (group g = h / (heads / groups)),
//! `dt = clip(softplus(dt_raw + dt_bias))`, `S_t = exp(dt A) S_{t-1} + (dt x_t) ⊗ B_t`,
//! `y_t = S_t · C_t + D x_t`, with `A = -exp(A_log)`. Prefill runs in chunks of
//! 256 positions (quadratic within a chunk, the state carried between
//! chunks); the float32 state `[B, heads, head_dim, state]` is the op's
//! cache slot.
use lmspec_spec::ops::{Layout, OpError, Ssm};
use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::{ArrayIndex, TryIndexOp};
use mlx_rs::{Array, Dtype};

use super::{mlx_err, Build, Ctx, Op, Weights};

/// Positions per quadratic block.
const CHUNK: i32 = 256;

impl Build for Ssm {
    fn build(&self, _inputs: &[Layout], mut w: Weights) -> Result<Box<dyn Op>, OpError> {
        let (a_log, d, dt_bias) = (w.dense("weight")?, w.dense("weight")?, w.dense("weight")?);
        // A = -exp(A_log), computed in A_log's dtype and then made float32.
        let a = mlx_rs::ops::exp(&a_log)
            .and_then(|x| x.as_dtype(Dtype::Float32))
            .and_then(|x| mlx_rs::ops::negative(&x))
            .map_err(mlx_err("weight"))?;
        Ok(Box::new(SsmOp {
            a,
            d,
            dt_bias,
            heads: self.heads as i32,
            head_dim: self.head_dim as i32,
            groups: self.groups as i32,
            state: self.state as i32,
            dt_min: self.dt_min as f32,
            dt_max: self.dt_max as f32,
        }))
    }
}

#[derive(Debug)]
struct SsmOp {
    /// `-exp(A_log)`, float32 `[heads]`.
    a: Array,
    d: Array,
    dt_bias: Array,
    heads: i32,
    head_dim: i32,
    groups: i32,
    state: i32,
    dt_min: f32,
    dt_max: f32,
}

/// Running sums along axis -2 (the positions of `[.., s, k]`). On a GPU
/// they are a product with a lower-triangular matrix of ones: with MLX
/// 0.32.2's CUDA `cumsum` here, a kernel of the step wrote out of bounds
/// and corrupted other arrays (every state-space model's cached decode
/// went wrong; without the `cumsum` it is right; docs/gpu.md). The CPU
/// keeps MLX's `cumsum`, whose sums are mlx-lm's.
fn running_sum(x: &Array) -> Result<Array, Exception> {
    if crate::runtime::default_device() != "gpu" {
        return x.cumsum(-2, None, None);
    }
    triangular_sum(x)
}

/// Running sums along axis -2 as `tril(ones) @ x`.
fn triangular_sum(x: &Array) -> Result<Array, Exception> {
    let s = x.shape()[x.ndim() - 2];
    let ones = mlx_rs::ops::ones_dtype(&[s, s], x.dtype())?;
    mlx_rs::ops::matmul(mlx_rs::ops::tril(&ones, 0)?, x)
}

/// `x[:, a..b]` on the position axis.
fn positions(x: &Array, a: i32, b: i32) -> Result<Array, Exception> {
    x.try_index(&[(..).index_op(), (a..b).index_op()][..])
}

/// `[B, G, ...]` repeated to `[B, G * rep, ...]` (each group `rep` times).
fn repeat_groups(x: &Array, rep: i32) -> Result<Array, Exception> {
    if rep == 1 {
        return Ok(x.clone());
    }
    let s = x.shape().to_vec();
    let mut wide = s.clone();
    wide.insert(2, rep);
    let mut out = s.clone();
    out[1] *= rep;
    mlx_rs::ops::broadcast_to(x.expand_dims(2)?, &wide)?.reshape(&out)
}

impl SsmOp {
    /// One chunk: outputs `[B, s, H, P]` (float32) and the state after it.
    fn chunk(
        &self,
        dtx: &Array,
        dta: &Array,
        bm: &Array,
        cm: &Array,
        state: Option<&Array>,
    ) -> Result<(Array, Array), Exception> {
        let rep = self.heads / self.groups;
        let s = dtx.shape()[1];
        let b = dtx.shape()[0];
        // C B^T per group: [B, G, s, s], repeated to heads.
        let bt = bm.transpose_axes(&[0, 2, 3, 1])?;
        let cb = mlx_rs::ops::matmul(cm.swap_axes(1, 2)?, &bt)?;
        let cb = repeat_groups(&cb, rep)?;
        // seg[i, j] = dtA[j+1] + ... + dtA[i] for i > j.
        let z = dta.swap_axes(1, 2)?.expand_dims(-1)?;
        let z = mlx_rs::ops::broadcast_to(&z, &[b, self.heads, s, s])?;
        let seg = running_sum(&mlx_rs::ops::tril(&z, -1)?)?;
        let decay = mlx_rs::ops::exp(&seg)?;
        let m = mlx_rs::ops::tril(mlx_rs::ops::multiply(&cb, &decay)?, 0)?;
        let mut y = mlx_rs::ops::matmul(&m, dtx.swap_axes(1, 2)?)?.swap_axes(1, 2)?;
        // Decay from each position to the chunk's end: [B, s, H, 1].
        let last = decay
            .try_index(&[(..).index_op(), (..).index_op(), (s - 1..s).index_op()][..])?
            .transpose_axes(&[0, 3, 1, 2])?;
        let bh = repeat_groups(&bt, rep)?.swap_axes(2, 3)?;
        let weighted = mlx_rs::ops::multiply(dtx, &last)?
            .swap_axes(1, 2)?
            .swap_axes(2, 3)?;
        let mut new = mlx_rs::ops::matmul(&weighted, &bh)?;
        if let Some(prev) = state {
            let ecs = mlx_rs::ops::exp(running_sum(dta)?)?;
            let end = ecs
                .try_index(&[(..).index_op(), (s - 1..s).index_op()][..])?
                .reshape(&[b, self.heads, 1, 1])?;
            new = mlx_rs::ops::add(&new, mlx_rs::ops::multiply(&end, prev)?)?;
            let (p, n, g) = (self.head_dim, self.state, self.groups);
            let sp = prev.reshape(&[b, 1, g, rep, p, n])?;
            let c6 = cm.reshape(&[b, s, g, 1, n, 1])?;
            let y_prev = mlx_rs::ops::matmul(&sp, &c6)?.reshape(&[b, s, self.heads, p])?;
            y = mlx_rs::ops::add(&y, mlx_rs::ops::multiply(ecs.expand_dims(-1)?, &y_prev)?)?;
        }
        Ok((y, new))
    }
}

impl Op for SsmOp {
    fn forward(&self, inputs: &[&Array], ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let (x, bm, cm, dt) = (inputs[0], inputs[1], inputs[2], inputs[3]);
        let sh = x.shape();
        let (b, t) = (sh[0], sh[1]);
        let (h, p, g, n) = (self.heads, self.head_dim, self.groups, self.state);
        let xh = x.reshape(&[b, t, h, p])?;
        let bm = bm.reshape(&[b, t, g, n])?;
        let cm = cm.reshape(&[b, t, g, n])?;
        // softplus(v) = logaddexp(v, 0), in float32.
        let v = mlx_rs::ops::add(dt.as_dtype(Dtype::Float32)?, &self.dt_bias)?;
        let dt = mlx_rs::ops::logaddexp(&v, Array::from_f32(0.0))?;
        let dt = mlx_rs::ops::clip(&dt, (self.dt_min, self.dt_max))?;
        let dta = mlx_rs::ops::multiply(&dt, &self.a)?;
        let dtx = mlx_rs::ops::multiply(dt.expand_dims(-1)?, &xh)?;
        let mut state = ctx.recurrent_state("ssm")?;
        let mut ys = Vec::new();
        let mut start = 0;
        while start < t {
            let end = (start + CHUNK).min(t);
            let (y, new) = self.chunk(
                &positions(&dtx, start, end)?,
                &positions(&dta, start, end)?,
                &positions(&bm, start, end)?,
                &positions(&cm, start, end)?,
                state.as_ref(),
            )?;
            ys.push(y.as_dtype(x.dtype())?);
            state = Some(new);
            start = end;
        }
        ctx.store_recurrent(state, t);
        let y = mlx_rs::ops::concatenate(&ys, 1)?;
        let skip = mlx_rs::ops::multiply(&xh, self.d.reshape(&[h, 1])?)?;
        mlx_rs::ops::add(&y, &skip)?.reshape(&[b, t, h * p])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The GPU's running sums (a triangular product) equal `cumsum` on the
    /// shapes the scan takes: `[B, H, s, s]` and `[B, s, H]`, one position
    /// (a decode step) too.
    #[test]
    fn triangular_sums_equal_cumsum() {
        let shapes: [&[i32]; 5] = [
            &[1, 4, 8, 8],
            &[2, 3, 1, 1],
            &[1, 8, 11, 11],
            &[1, 8, 4],
            &[1, 1, 4],
        ];
        for shape in shapes {
            let x = mlx_rs::random::normal::<f32>(shape, None, None, None).unwrap();
            let got = triangular_sum(&x).unwrap();
            let want = x.cumsum(-2, None, None).unwrap();
            assert_eq!(got.shape(), want.shape());
            let diff = mlx_rs::ops::subtract(&got, &want).unwrap();
            let err: f32 = mlx_rs::ops::abs(&diff)
                .unwrap()
                .max(None)
                .unwrap()
                .item_exact::<f32>();
            assert!(err < 1e-5, "{shape:?}: {err}");
        }
    }
}
