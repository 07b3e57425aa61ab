//! `split_heads` ([B, T, H*D] -> [B, H, T, D]), `merge_heads` (inverse) and
//! `repeat_heads`.
use lmspec_spec::ops::{MergeHeads, RepeatHeads, SplitHeads};
use mlx_rs::error::Exception;
use mlx_rs::Array;

use super::{Ctx, Op};

impl Op for SplitHeads {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let x = inputs[0];
        let s = x.shape();
        let heads = self.heads as i32;
        if s[1] == 1 {
            // One position: [B, 1, H*D] and [B, H, 1, D] share a layout, so
            // one reshape does it (a decode step saves a primitive per call).
            return x.reshape(&[s[0], heads, 1, -1]);
        }
        x.reshape(&[s[0], s[1], heads, -1])?
            .transpose_axes(&[0, 2, 1, 3])
    }
}

impl Op for MergeHeads {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let x = inputs[0];
        let s = x.shape();
        if s[2] == 1 {
            return x.reshape(&[s[0], 1, -1]);
        }
        x.transpose_axes(&[0, 2, 1, 3])?.reshape(&[s[0], s[2], -1])
    }
}

impl Op for RepeatHeads {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let x = inputs[0];
        let times = self.times as i32;
        if times == 1 {
            return Ok(x.clone());
        }
        // [B, H, T, D] -> [B, H, times, T, D] -> [B, H * times, T, D].
        let s = x.shape().to_vec();
        let expanded =
            mlx_rs::ops::broadcast_to(x.expand_dims(2)?, &[s[0], s[1], times, s[2], s[3]])?;
        expanded.reshape(&[s[0], s[1] * times, s[2], s[3]])
    }
}
