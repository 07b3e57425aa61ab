//! `embedding`: token ids -> rows of a table (dequantized rows when the table
//! is quantized, as mlx-lm's `nn.QuantizedEmbedding`).
use mlx_rs::error::Exception;
use mlx_rs::Array;

use super::{
    join_scope, take_one, Ctx, Op, OpError, OpKind, Param, ParamDef, ParamKind, Params, Resolved,
    ValueInfo, WeightReq,
};
use crate::spec::config::Ty;

#[derive(Debug)]
pub struct Embedding;

static PARAMS: &[ParamDef] = &[
    ParamDef {
        name: "weight",
        kind: ParamKind::Weight,
        default: None,
        doc: "module holding `weight` [vocab, dim]",
    },
    ParamDef {
        name: "vocab",
        kind: ParamKind::Expr(Ty::Int),
        default: None,
        doc: "rows of the table",
    },
    ParamDef {
        name: "dim",
        kind: ParamKind::Expr(Ty::Int),
        default: None,
        doc: "width of a row",
    },
];

impl OpKind for Embedding {
    fn name(&self) -> &'static str {
        "embedding"
    }
    fn doc(&self) -> &'static str {
        "Looks up token ids [B, T] in a table, giving [B, T, dim]."
    }
    fn params(&self) -> &'static [ParamDef] {
        PARAMS
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn resolve(&self, p: &Params, scope: &str, _inputs: &[ValueInfo]) -> Result<Resolved, OpError> {
        let dim = p.int("dim")?;
        let mut r = Resolved::pure(ValueInfo::flat(dim));
        r.weights.push(WeightReq {
            field: "weight",
            module: join_scope(scope, p.str("weight")?),
            suffix: "weight",
            shape: vec![p.int("vocab")?, dim],
            quantizable: true,
        });
        Ok(r)
    }
    fn build(
        &self,
        _p: &Params,
        _inputs: &[ValueInfo],
        weights: Vec<Param>,
    ) -> Result<Box<dyn Op>, OpError> {
        Ok(Box::new(EmbeddingOp {
            table: take_one(weights)?,
        }))
    }
}

#[derive(Debug)]
struct EmbeddingOp {
    table: Param,
}

impl Op for EmbeddingOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let ids = inputs[0];
        match &self.table {
            Param::Dense(t) => t.take_axis(ids, 0),
            Param::Quantized {
                w,
                scales,
                biases,
                group_size,
                bits,
            } => {
                let w = w.take_axis(ids, 0)?;
                let s = scales.take_axis(ids, 0)?;
                let b = biases.take_axis(ids, 0)?;
                mlx_rs::ops::dequantize(&w, &s, &b, *group_size, *bits)
            }
        }
    }
}

#[derive(Debug)]
pub struct PositionEmbedding;

static POS_PARAMS: &[ParamDef] = &[
    ParamDef {
        name: "weight",
        kind: ParamKind::Weight,
        default: None,
        doc: "module holding `weight` [positions, dim]",
    },
    ParamDef {
        name: "positions",
        kind: ParamKind::Expr(Ty::Int),
        default: None,
        doc: "rows of the table (the longest sequence)",
    },
    ParamDef {
        name: "dim",
        kind: ParamKind::Expr(Ty::Int),
        default: None,
        doc: "width of a row",
    },
    ParamDef {
        name: "row",
        kind: ParamKind::Expr(Ty::Int),
        default: Some("null"),
        doc: "when set, every position takes this row (token-type embeddings of segment 0)",
    },
];

impl OpKind for PositionEmbedding {
    fn name(&self) -> &'static str {
        "position_embedding"
    }
    fn doc(&self) -> &'static str {
        "Learned absolute positions: rows offset..offset+T of a table for an input [B, T], giving [1, T, dim] (added to the token embedding)."
    }
    fn params(&self) -> &'static [ParamDef] {
        POS_PARAMS
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn resolve(&self, p: &Params, scope: &str, _inputs: &[ValueInfo]) -> Result<Resolved, OpError> {
        let dim = p.int("dim")?;
        let positions = p.int("positions")?;
        if let Some(row) = p.opt_int("row")? {
            if row < 0 || row >= positions {
                return Err(OpError::new(
                    "row",
                    format!("row {row} is outside the table's {positions} rows"),
                ));
            }
        }
        let mut r = Resolved::pure(ValueInfo::flat(dim));
        r.weights.push(WeightReq {
            field: "weight",
            module: join_scope(scope, p.str("weight")?),
            suffix: "weight",
            shape: vec![positions, dim],
            quantizable: false,
        });
        Ok(r)
    }
    fn build(
        &self,
        p: &Params,
        _inputs: &[ValueInfo],
        weights: Vec<Param>,
    ) -> Result<Box<dyn Op>, OpError> {
        let table = take_one(weights)?
            .dense()
            .map_err(|e| OpError::new("weight", e.to_string()))?;
        let positions = table.shape()[0];
        Ok(Box::new(PositionOp {
            table,
            positions,
            row: p.opt_int("row")?.map(|r| r as i32),
        }))
    }
}

#[derive(Debug)]
struct PositionOp {
    table: Array,
    positions: i32,
    row: Option<i32>,
}

impl Op for PositionOp {
    fn forward(&self, inputs: &[&Array], ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let t = inputs[0].shape()[1];
        let rows = match self.row {
            Some(r) => Array::from_slice(&vec![r; t as usize], &[t]),
            None => {
                let end = ctx.offset + t;
                if end > self.positions {
                    return Err(Exception::custom(format!(
                        "position {} is past the {} learned positions",
                        end - 1,
                        self.positions
                    )));
                }
                mlx_rs::ops::arange::<_, i32>(ctx.offset, end, None)?
            }
        };
        self.table.take_axis(&rows, 0)?.expand_dims(0)
    }
}
