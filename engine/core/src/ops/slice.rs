//! `slice`: a contiguous range of the last axis (fused projections such as
//! a `qkv` or `gate_up` output, or one part of each head).
use lmspec_spec::ops::{Concat, Layout, OpError, Slice};
use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::{ArrayIndex, Ellipsis, TryIndexOp};
use mlx_rs::Array;

use super::{Build, Ctx, Op, Weights};

impl Op for Slice {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let x = inputs[0];
        let (start, size) = (self.start as i32, self.size as i32);
        if start == 0 && x.shape().last() == Some(&size) {
            return Ok(x.clone());
        }
        x.try_index(&[Ellipsis.index_op(), (start..start + size).index_op()][..])
    }
}

/// `concat`: inputs joined along the last axis (the inverse of `slice`);
/// per-head inputs with one head are repeated to the others' head count
/// (a rotary part shared by every head).
impl Build for Concat {
    fn build(&self, inputs: &[Layout], _w: Weights) -> Result<Box<dyn Op>, OpError> {
        Ok(Box::new(ConcatOp {
            share: Concat::heads(inputs)
                .filter(|h| *h > 1)
                .map(|_| inputs.iter().map(|v| v.heads == Some(1)).collect())
                .unwrap_or_default(),
        }))
    }
}

#[derive(Debug)]
struct ConcatOp {
    /// Which inputs have one head to share (empty: none).
    share: Vec<bool>,
}

impl Op for ConcatOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        if !self.share.iter().any(|s| *s) {
            return mlx_rs::ops::concatenate(inputs, -1);
        }
        let full = inputs
            .iter()
            .zip(&self.share)
            .find(|(_, s)| !**s)
            .map(|(x, _)| x.shape().to_vec())
            .ok_or_else(|| Exception::custom("concat: every input has one head"))?;
        let parts = inputs
            .iter()
            .zip(&self.share)
            .map(|(x, s)| match s {
                true => {
                    let mut shape = full.clone();
                    let last = shape.len() - 1;
                    shape[last] = x.shape()[last];
                    mlx_rs::ops::broadcast_to(x, &shape)
                }
                false => Ok((*x).clone()),
            })
            .collect::<Result<Vec<_>, _>>()?;
        mlx_rs::ops::concatenate(&parts, -1)
    }
}
