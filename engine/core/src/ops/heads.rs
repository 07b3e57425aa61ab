//! `split_heads` ([B, T, H*D] -> [B, H, T, D]) and `merge_heads` (inverse).
use lmspec_spec::ops::{MergeHeads, SplitHeads};
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
