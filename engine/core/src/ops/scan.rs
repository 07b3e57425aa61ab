//! `selective_scan`: Mamba-1's selective scan, as mlx-lm's `MambaBlock`
//! (`ssm_step`): per channel c and state index n, with `dt = softplus(dt_raw)`
//! and `A = -exp(A_log)` (`[channels, state]`),
//! `S[c, n] = exp(dt[c] A[c, n]) S[c, n] + dt[c] x[c] B[n]`,
//! `y[c] = sum_n S[c, n] C[n] + D[c] x[c]`, one position at a time. The
//! float32 state `[B, channels, state]` is the op's cache slot.
use lmspec_spec::ops::{Layout, OpError, SelectiveScan};
use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::{ArrayIndex, TryIndexOp};
use mlx_rs::{Array, Dtype};

use super::{mlx_err, Build, Ctx, Op, Weights};

impl Build for SelectiveScan {
    fn build(&self, _inputs: &[Layout], mut w: Weights) -> Result<Box<dyn Op>, OpError> {
        let (a_log, d) = (w.dense("weight")?, w.dense("weight")?);
        let a = mlx_rs::ops::exp(&a_log)
            .and_then(|x| x.as_dtype(Dtype::Float32))
            .and_then(|x| mlx_rs::ops::negative(&x))
            .map_err(mlx_err("weight"))?;
        Ok(Box::new(SelectiveScanOp {
            a,
            d,
            channels: self.channels as i32,
            state: self.state as i32,
        }))
    }
}

#[derive(Debug)]
struct SelectiveScanOp {
    /// `-exp(A_log)`, float32 `[channels, state]`.
    a: Array,
    d: Array,
    channels: i32,
    state: i32,
}

impl Op for SelectiveScanOp {
    fn forward(&self, inputs: &[&Array], ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let (x, dt, bm, cm) = (inputs[0], inputs[1], inputs[2], inputs[3]);
        let s = x.shape();
        let (b, t) = (s[0], s[1]);
        let (c, n) = (self.channels, self.state);
        // softplus(v) = logaddexp(v, 0)
        let dt = mlx_rs::ops::logaddexp(dt, Array::from_f32(0.0))?;
        let mut state = ctx
            .recurrent_state("selective_scan")?
            .map_or_else(|| mlx_rs::ops::zeros_dtype(&[b, c, n], Dtype::Float32), Ok)?;
        let at = |v: &Array, i: i32| v.try_index(&[(..).index_op(), i.index_op()][..]);
        let mut ys = Vec::with_capacity(t as usize);
        for i in 0..t {
            let (xt, dtt) = (at(x, i)?, at(&dt, i)?);
            let (bt, ct) = (at(bm, i)?, at(cm, i)?);
            // [B, C, 1] against A [C, N]: the decay per (channel, state).
            let dt3 = dtt.expand_dims(-1)?;
            let decay = mlx_rs::ops::exp(mlx_rs::ops::multiply(&dt3, &self.a)?)?;
            let input = mlx_rs::ops::multiply(
                mlx_rs::ops::multiply(&dtt, &xt)?.expand_dims(-1)?,
                bt.expand_dims(-2)?,
            )?;
            state = mlx_rs::ops::add(&input, mlx_rs::ops::multiply(&state, &decay)?)?;
            let y = mlx_rs::ops::multiply(&state, ct.expand_dims(-2)?)?.sum_axis(-1, false)?;
            let y = mlx_rs::ops::add(&y, mlx_rs::ops::multiply(&self.d, &xt)?)?;
            ys.push(y.as_dtype(x.dtype())?);
        }
        ctx.store_recurrent(Some(state), t);
        mlx_rs::ops::stack(&ys, 1)
    }
}
