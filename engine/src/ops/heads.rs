//! `split_heads` ([B, T, H*D] -> [B, H, T, D]) and `merge_heads` (inverse).
use mlx_rs::error::Exception;
use mlx_rs::Array;

use super::{
    expect_flat, expect_heads, Ctx, Op, OpError, OpKind, Param, ParamDef, ParamKind, Params,
    Resolved, ValueInfo,
};
use crate::spec::config::Ty;

#[derive(Debug)]
pub struct SplitHeads;

static SPLIT_PARAMS: &[ParamDef] = &[ParamDef {
    name: "heads",
    kind: ParamKind::Expr(Ty::Int),
    default: None,
    doc: "number of heads H; the last axis must divide by it",
}];

impl OpKind for SplitHeads {
    fn name(&self) -> &'static str {
        "split_heads"
    }
    fn doc(&self) -> &'static str {
        "Reshapes [B, T, H*D] to [B, H, T, D]."
    }
    fn params(&self) -> &'static [ParamDef] {
        SPLIT_PARAMS
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn resolve(&self, p: &Params, _s: &str, inputs: &[ValueInfo]) -> Result<Resolved, OpError> {
        let dim = expect_flat(inputs, 0)?;
        let heads = p.int("heads")?;
        if heads <= 0 || dim % heads != 0 {
            return Err(OpError::new(
                "heads",
                format!("{dim} features do not split into {heads} heads"),
            ));
        }
        Ok(Resolved::pure(ValueInfo {
            dim: dim / heads,
            heads: Some(heads),
        }))
    }
    fn build(
        &self,
        p: &Params,
        _inputs: &[ValueInfo],
        _w: Vec<Param>,
    ) -> Result<Box<dyn Op>, OpError> {
        Ok(Box::new(SplitOp {
            heads: p.int("heads")? as i32,
        }))
    }
}

#[derive(Debug)]
struct SplitOp {
    heads: i32,
}

impl Op for SplitOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let x = inputs[0];
        let s = x.shape();
        if s[1] == 1 {
            // One position: [B, 1, H*D] and [B, H, 1, D] share a layout, so
            // one reshape does it (a decode step saves a primitive per call).
            return x.reshape(&[s[0], self.heads, 1, -1]);
        }
        x.reshape(&[s[0], s[1], self.heads, -1])?
            .transpose_axes(&[0, 2, 1, 3])
    }
}

#[derive(Debug)]
pub struct MergeHeads;

impl OpKind for MergeHeads {
    fn name(&self) -> &'static str {
        "merge_heads"
    }
    fn doc(&self) -> &'static str {
        "Reshapes [B, H, T, D] back to [B, T, H*D]."
    }
    fn params(&self) -> &'static [ParamDef] {
        &[]
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn resolve(&self, _p: &Params, _s: &str, inputs: &[ValueInfo]) -> Result<Resolved, OpError> {
        let (h, d) = expect_heads(inputs, 0)?;
        Ok(Resolved::pure(ValueInfo::flat(h * d)))
    }
    fn build(
        &self,
        _p: &Params,
        _inputs: &[ValueInfo],
        _w: Vec<Param>,
    ) -> Result<Box<dyn Op>, OpError> {
        Ok(Box::new(MergeOp))
    }
}

#[derive(Debug)]
struct MergeOp;

impl Op for MergeOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let x = inputs[0];
        let s = x.shape();
        if s[2] == 1 {
            return x.reshape(&[s[0], 1, -1]);
        }
        x.transpose_axes(&[0, 2, 1, 3])?.reshape(&[s[0], s[2], -1])
    }
}
