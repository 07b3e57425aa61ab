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
