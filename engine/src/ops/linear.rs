//! `linear`: `y = x Wᵀ (+ b)`, dense or MLX affine-quantized
//! (`quantized_matmul`, as mlx-lm's `nn.QuantizedLinear`).
use mlx_rs::error::Exception;
use mlx_rs::Array;

use super::{
    expect_flat, join_scope, Ctx, Op, OpError, OpKind, Param, ParamDef, ParamKind, Params,
    Resolved, ValueInfo, WeightReq,
};
use crate::spec::config::Ty;

#[derive(Debug)]
pub struct Linear;

static PARAMS: &[ParamDef] = &[
    ParamDef {
        name: "weight",
        kind: ParamKind::Weight,
        default: None,
        doc: "module holding `weight` [out, in] (and `bias` [out])",
    },
    ParamDef {
        name: "out",
        kind: ParamKind::Expr(Ty::Int),
        default: None,
        doc: "output features",
    },
    ParamDef {
        name: "bias",
        kind: ParamKind::Expr(Ty::Bool),
        default: Some("false"),
        doc: "whether the module has a bias",
    },
];

impl OpKind for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }
    fn doc(&self) -> &'static str {
        "Affine projection of the last axis; quantized when the checkpoint is."
    }
    fn params(&self) -> &'static [ParamDef] {
        PARAMS
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn resolve(&self, p: &Params, scope: &str, inputs: &[ValueInfo]) -> Result<Resolved, OpError> {
        let input = expect_flat(inputs, 0)?;
        let out = p.int("out")?;
        let module = join_scope(scope, p.str("weight")?);
        let mut weights = vec![WeightReq {
            field: "weight",
            module: module.clone(),
            suffix: "weight",
            shape: vec![out, input],
            quantizable: true,
        }];
        if p.bool("bias")? {
            weights.push(WeightReq {
                field: "bias",
                module,
                suffix: "bias",
                shape: vec![out],
                quantizable: false,
            });
        }
        Ok(Resolved::pure(ValueInfo::flat(out))).map(|r| Resolved { weights, ..r })
    }
    fn build(
        &self,
        _p: &Params,
        _inputs: &[ValueInfo],
        weights: Vec<Param>,
    ) -> Result<Box<dyn Op>, OpError> {
        let mut it = weights.into_iter();
        let weight = it
            .next()
            .ok_or_else(|| OpError::new("weight", "not loaded"))?;
        let bias = match it.next() {
            Some(Param::Dense(b)) => Some(b),
            Some(Param::Quantized { .. }) => {
                return Err(OpError::new("bias", "a bias cannot be quantized"))
            }
            None => None,
        };
        let weight = match weight {
            Param::Dense(w) => Param::Dense(w.t()),
            q => q,
        };
        Ok(Box::new(LinearOp { weight, bias }))
    }
}

#[derive(Debug)]
struct LinearOp {
    /// Dense weights are kept transposed, `[in, out]`.
    weight: Param,
    bias: Option<Array>,
}

/// Applies a loaded linear layer; shared with ops that project through one.
pub(crate) fn apply(weight: &Param, bias: Option<&Array>, x: &Array) -> Result<Array, Exception> {
    match weight {
        Param::Dense(wt) => match bias {
            Some(b) => mlx_rs::ops::addmm(b, x, wt, 1.0, 1.0),
            None => mlx_rs::ops::matmul(x, wt),
        },
        Param::Quantized {
            w,
            scales,
            biases,
            group_size,
            bits,
        } => {
            let y = mlx_rs::ops::quantized_matmul(x, w, scales, biases, true, *group_size, *bits)?;
            match bias {
                Some(b) => mlx_rs::ops::add(&y, b),
                None => Ok(y),
            }
        }
    }
}

impl Op for LinearOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        apply(&self.weight, self.bias.as_ref(), inputs[0])
    }
}

/// `head_linear`: one projection per head (mlx-lm's `MultiLinear`): input
/// `[B, H or 1, T, in]`, weight `[H, out, in]` (or `[H, in, out]` with
/// `transposed: false`), output `[B, H, T, out]`.
#[derive(Debug)]
pub struct HeadLinear;

static HEAD_PARAMS: &[ParamDef] = &[
    ParamDef {
        name: "weight",
        kind: ParamKind::Weight,
        default: None,
        doc: "module holding `weight` [heads, out, in]",
    },
    ParamDef {
        name: "heads",
        kind: ParamKind::Expr(Ty::Int),
        default: None,
        doc: "heads (the weight's first axis)",
    },
    ParamDef {
        name: "out",
        kind: ParamKind::Expr(Ty::Int),
        default: None,
        doc: "output features per head",
    },
    ParamDef {
        name: "transposed",
        kind: ParamKind::Expr(Ty::Bool),
        default: Some("true"),
        doc: "the weight is stored [heads, out, in] (false: [heads, in, out])",
    },
];

impl OpKind for HeadLinear {
    fn name(&self) -> &'static str {
        "head_linear"
    }
    fn doc(&self) -> &'static str {
        "A separate projection per head; a one-head input is shared by every head."
    }
    fn params(&self) -> &'static [ParamDef] {
        HEAD_PARAMS
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn resolve(&self, p: &Params, scope: &str, inputs: &[ValueInfo]) -> Result<Resolved, OpError> {
        let (h_in, input) = super::expect_heads(inputs, 0)?;
        let (heads, out) = (p.int("heads")?, p.int("out")?);
        if h_in != heads && h_in != 1 {
            return Err(OpError::new(
                "heads",
                format!("the input has {h_in} heads; expected {heads} or 1"),
            ));
        }
        let shape = match p.bool("transposed")? {
            true => vec![heads, out, input],
            false => vec![heads, input, out],
        };
        Ok(Resolved {
            weights: vec![WeightReq {
                field: "weight",
                module: join_scope(scope, p.str("weight")?),
                suffix: "weight",
                shape,
                quantizable: false,
            }],
            ..Resolved::pure(ValueInfo {
                dim: out,
                heads: Some(heads),
            })
        })
    }
    fn build(
        &self,
        p: &Params,
        _inputs: &[ValueInfo],
        weights: Vec<Param>,
    ) -> Result<Box<dyn Op>, OpError> {
        let w = match weights.into_iter().next() {
            Some(Param::Dense(w)) => w,
            Some(Param::Quantized { .. }) => {
                return Err(OpError::new(
                    "weight",
                    "quantized per-head weights are not supported",
                ))
            }
            None => return Err(OpError::new("weight", "not loaded")),
        };
        // Kept as [H, in, out] for x @ w.
        let w = match p.bool("transposed")? {
            true => w
                .swap_axes(-1, -2)
                .map_err(|e| OpError::new("weight", e.to_string()))?,
            false => w,
        };
        Ok(Box::new(HeadLinearOp { w }))
    }
}

#[derive(Debug)]
struct HeadLinearOp {
    w: Array,
}

impl Op for HeadLinearOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        mlx_rs::ops::matmul(inputs[0], &self.w)
    }
}
