//! `slice`: a contiguous range of the last axis (fused projections such as
//! a `qkv` or `gate_up` output, or one part of each head).
use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::{ArrayIndex, Ellipsis, TryIndexOp};
use mlx_rs::Array;

use super::{Ctx, Op, OpError, OpKind, Param, ParamDef, ParamKind, Params, Resolved, ValueInfo};
use crate::spec::config::Ty;

#[derive(Debug)]
pub struct Slice;

static PARAMS: &[ParamDef] = &[
    ParamDef {
        name: "start",
        kind: ParamKind::Expr(Ty::Int),
        default: Some("0"),
        doc: "first index taken",
    },
    ParamDef {
        name: "size",
        kind: ParamKind::Expr(Ty::Int),
        default: None,
        doc: "number of indices taken",
    },
];

impl OpKind for Slice {
    fn name(&self) -> &'static str {
        "slice"
    }
    fn doc(&self) -> &'static str {
        "Takes `size` entries of the last axis starting at `start`, in any layout."
    }
    fn params(&self) -> &'static [ParamDef] {
        PARAMS
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn resolve(&self, p: &Params, _s: &str, inputs: &[ValueInfo]) -> Result<Resolved, OpError> {
        let (start, size) = (p.int("start")?, p.int("size")?);
        let dim = inputs[0].dim;
        if start < 0 || size <= 0 || start + size > dim {
            return Err(OpError::new(
                "size",
                format!(
                    "[{start}, {}) is not inside the {dim} entries of the last axis",
                    start + size
                ),
            ));
        }
        Ok(Resolved::pure(ValueInfo {
            dim: size,
            heads: inputs[0].heads,
        }))
    }
    fn build(
        &self,
        p: &Params,
        inputs: &[ValueInfo],
        _w: Vec<Param>,
    ) -> Result<Box<dyn Op>, OpError> {
        let (start, size) = (p.int("start")? as i32, p.int("size")? as i32);
        Ok(Box::new(SliceOp {
            start,
            end: start + size,
            whole: start == 0 && i64::from(size) == inputs[0].dim,
        }))
    }
}

#[derive(Debug)]
struct SliceOp {
    start: i32,
    end: i32,
    whole: bool,
}

impl Op for SliceOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        if self.whole {
            return Ok(inputs[0].clone());
        }
        inputs[0].try_index(&[Ellipsis.index_op(), (self.start..self.end).index_op()][..])
    }
}

/// `concat`: inputs joined along the last axis (the inverse of `slice`);
/// per-head inputs with one head are repeated to the others' head count
/// (a rotary part shared by every head).
#[derive(Debug)]
pub struct Concat;

impl OpKind for Concat {
    fn name(&self) -> &'static str {
        "concat"
    }
    fn doc(&self) -> &'static str {
        "Joins its inputs along the last axis; a one-head input is shared by every head."
    }
    fn params(&self) -> &'static [ParamDef] {
        &[]
    }
    fn arity(&self) -> (usize, usize) {
        (2, 8)
    }
    fn resolve(&self, _p: &Params, _s: &str, inputs: &[ValueInfo]) -> Result<Resolved, OpError> {
        let heads = inputs.iter().filter_map(|v| v.heads).max();
        for (k, v) in inputs.iter().enumerate() {
            let fits = match (v.heads, heads) {
                (None, None) => true,
                (Some(h), Some(most)) => h == most || h == 1,
                _ => false,
            };
            if !fits {
                return Err(OpError::new(
                    "in",
                    format!(
                        "input {k} has layout {v:?}; inputs must share their heads (or have one)"
                    ),
                ));
            }
        }
        Ok(Resolved::pure(ValueInfo {
            dim: inputs.iter().map(|v| v.dim).sum(),
            heads,
        }))
    }
    fn build(
        &self,
        _p: &Params,
        inputs: &[ValueInfo],
        _w: Vec<Param>,
    ) -> Result<Box<dyn Op>, OpError> {
        let heads = inputs.iter().filter_map(|v| v.heads).max();
        Ok(Box::new(ConcatOp {
            share: heads
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
