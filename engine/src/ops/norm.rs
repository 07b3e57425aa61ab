//! Normalisations: `rms_norm` (`fast::rms_norm`, optional `1 + w` offset)
//! and `layer_norm` (`fast::layer_norm`, optional bias).
use mlx_rs::error::Exception;
use mlx_rs::Array;

use super::{
    dense, join_scope, Ctx, Op, OpError, OpKind, Param, ParamDef, ParamKind, Params, Resolved,
    ValueInfo, WeightReq,
};
use crate::spec::config::Ty;

#[derive(Debug)]
pub struct RmsNorm;

static RMS_PARAMS: &[ParamDef] = &[
    ParamDef {
        name: "weight",
        kind: ParamKind::Weight,
        default: None,
        doc: "module holding `weight` [dim]",
    },
    ParamDef {
        name: "eps",
        kind: ParamKind::Expr(Ty::Float),
        default: Some("1e-5"),
        doc: "added to the mean square",
    },
    ParamDef {
        name: "offset",
        kind: ParamKind::Expr(Ty::Float),
        default: Some("0.0"),
        doc: "added to the weight (1.0 for `(1 + w)` norms)",
    },
];

fn vector(field: &'static str, module: String, suffix: &'static str, dim: i64) -> WeightReq {
    WeightReq {
        field,
        module,
        suffix,
        shape: vec![dim],
        quantizable: false,
    }
}

impl OpKind for RmsNorm {
    fn name(&self) -> &'static str {
        "rms_norm"
    }
    fn doc(&self) -> &'static str {
        "RMS normalisation of the last axis, scaled by (offset + weight)."
    }
    fn params(&self) -> &'static [ParamDef] {
        RMS_PARAMS
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn resolve(&self, p: &Params, scope: &str, inputs: &[ValueInfo]) -> Result<Resolved, OpError> {
        let mut r = Resolved::pure(inputs[0]);
        r.weights.push(vector(
            "weight",
            join_scope(scope, p.str("weight")?),
            "weight",
            inputs[0].dim,
        ));
        Ok(r)
    }
    fn build(
        &self,
        p: &Params,
        _inputs: &[ValueInfo],
        weights: Vec<Param>,
    ) -> Result<Box<dyn Op>, OpError> {
        let mut w = dense(weights.into_iter().next(), "weight")?;
        let offset = p.float("offset")?;
        if offset != 0.0 {
            w = mlx_rs::ops::add(&w, Array::from_f32(offset as f32))
                .map_err(|e| OpError::new("offset", e.to_string()))?;
        }
        Ok(Box::new(RmsNormOp {
            weight: w,
            eps: p.float("eps")? as f32,
        }))
    }
}

#[derive(Debug)]
struct RmsNormOp {
    weight: Array,
    eps: f32,
}

impl Op for RmsNormOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        mlx_rs::fast::rms_norm(inputs[0], Some(&self.weight), self.eps)
    }
}

#[derive(Debug)]
pub struct LayerNorm;

static LN_PARAMS: &[ParamDef] = &[
    ParamDef {
        name: "weight",
        kind: ParamKind::Weight,
        default: None,
        doc: "module holding `weight` [dim] (and `bias` [dim])",
    },
    ParamDef {
        name: "eps",
        kind: ParamKind::Expr(Ty::Float),
        default: Some("1e-5"),
        doc: "added to the variance",
    },
    ParamDef {
        name: "bias",
        kind: ParamKind::Expr(Ty::Bool),
        default: Some("true"),
        doc: "whether the module has a bias",
    },
];

impl OpKind for LayerNorm {
    fn name(&self) -> &'static str {
        "layer_norm"
    }
    fn doc(&self) -> &'static str {
        "Layer normalisation of the last axis with weight and optional bias."
    }
    fn params(&self) -> &'static [ParamDef] {
        LN_PARAMS
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn resolve(&self, p: &Params, scope: &str, inputs: &[ValueInfo]) -> Result<Resolved, OpError> {
        let module = join_scope(scope, p.str("weight")?);
        let dim = inputs[0].dim;
        let mut r = Resolved::pure(inputs[0]);
        r.weights
            .push(vector("weight", module.clone(), "weight", dim));
        if p.bool("bias")? {
            r.weights.push(vector("bias", module, "bias", dim));
        }
        Ok(r)
    }
    fn build(
        &self,
        p: &Params,
        _inputs: &[ValueInfo],
        weights: Vec<Param>,
    ) -> Result<Box<dyn Op>, OpError> {
        let mut it = weights.into_iter();
        let weight = dense(it.next(), "weight")?;
        let bias = it.next().map(|b| dense(Some(b), "bias")).transpose()?;
        Ok(Box::new(LayerNormOp {
            weight,
            bias,
            eps: p.float("eps")? as f32,
        }))
    }
}

#[derive(Debug)]
struct LayerNormOp {
    weight: Array,
    bias: Option<Array>,
    eps: f32,
}

impl Op for LayerNormOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        mlx_rs::fast::layer_norm(inputs[0], &self.weight, self.bias.as_ref(), self.eps)
    }
}
