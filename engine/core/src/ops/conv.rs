//! `short_conv`: a causal depthwise convolution over the sequence (each
//! channel its own `kernel`-tap filter, as mlx's grouped `conv1d` with
//! `groups = channels` on a left-padded input). It declares a cache slot
//! holding its last `kernel - 1` input rows, so decoding one token at a time
//! gives what one pass over the whole sequence gives.
use lmspec_spec::ops::{Layout, OpError, ShortConv};
use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::{ArrayIndex, TryIndexOp};
use mlx_rs::Array;

use super::{mlx_err, Build, Ctx, Op, Weights};

impl Build for ShortConv {
    fn build(&self, _inputs: &[Layout], mut w: Weights) -> Result<Box<dyn Op>, OpError> {
        let weight = w.dense("weight")?;
        let bias = w.dense_opt("bias")?;
        // [D, K, 1] -> [K, D]: row j is tap j of every channel.
        let d = weight.shape()[0];
        let taps = weight
            .reshape(&[d, -1])
            .map(|t| t.t())
            .map_err(mlx_err("weight"))?;
        Ok(Box::new(ShortConvOp {
            taps,
            bias,
            kernel: self.kernel as i32,
        }))
    }
}

#[derive(Debug)]
struct ShortConvOp {
    taps: Array,
    bias: Option<Array>,
    kernel: i32,
}

impl Op for ShortConvOp {
    fn forward(&self, inputs: &[&Array], ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let x = inputs[0];
        let t = x.shape()[1];
        let k = self.kernel;
        // [B, K - 1 + T, D]: the previous rows (zeros at the start) first.
        let all = ctx.with_earlier_rows("short_conv", x, k - 1)?;
        let mut out: Option<Array> = None;
        for j in 0..k {
            let window = all.try_index(&[(..).index_op(), (j..j + t).index_op()][..])?;
            let tap = self.taps.try_index(j)?;
            let term = mlx_rs::ops::multiply(&window, &tap)?;
            out = Some(match out {
                Some(o) => mlx_rs::ops::add(&o, &term)?,
                None => term,
            });
        }
        let out = out.ok_or_else(|| Exception::custom("short_conv: no taps"))?;
        match &self.bias {
            Some(b) => mlx_rs::ops::add(&out, b),
            None => Ok(out),
        }
    }
}
