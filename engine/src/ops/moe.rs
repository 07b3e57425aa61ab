//! `moe`: a routed mixture of gated experts, as mlx-lm's sparse MoE blocks
//! with a `SwitchGLU`: a router scores the experts per token, the top-k are
//! run through stacked expert weights (`[E, out, in]`) with gather matmuls
//! (`gather_mm`, or `gather_qmm` when quantized), and their outputs summed
//! weighted by the routing scores.
use mlx_rs::error::Exception;
use mlx_rs::ops::argpartition_axis;
use mlx_rs::ops::indexing::{IndexOp, TryIndexOp};
use mlx_rs::Array;

use super::elementwise::{Act, ACTIVATIONS};
use super::{
    dense, expect_flat, join_scope, linear, Ctx, Op, OpError, OpKind, Param, ParamDef, ParamKind,
    Params, Resolved, ValueInfo, WeightReq,
};
use crate::spec::config::Ty;

#[derive(Debug)]
pub struct Moe;

/// How routing scores come from the router's logits.
const ROUTINGS: &[&str] = &["softmax_topk", "topk_softmax", "sigmoid_topk"];

/// How a group of experts is scored for group-limited routing.
const GROUP_SCORES: &[&str] = &["max", "top2_sum"];

static PARAMS: &[ParamDef] = &[
    ParamDef {
        name: "router",
        kind: ParamKind::Weight,
        default: None,
        doc: "module holding the router `weight` [experts, in]",
    },
    ParamDef {
        name: "experts",
        kind: ParamKind::Weight,
        default: None,
        doc: "module holding stacked `gate_proj`, `up_proj` [experts, hidden, in] and `down_proj` [experts, in, hidden]",
    },
    ParamDef {
        name: "num_experts",
        kind: ParamKind::Expr(Ty::Int),
        default: None,
        doc: "number of experts",
    },
    ParamDef {
        name: "top_k",
        kind: ParamKind::Expr(Ty::Int),
        default: None,
        doc: "experts per token",
    },
    ParamDef {
        name: "hidden",
        kind: ParamKind::Expr(Ty::Int),
        default: None,
        doc: "an expert's intermediate width",
    },
    ParamDef {
        name: "routing",
        kind: ParamKind::Choice(ROUTINGS),
        default: Some("softmax_topk"),
        doc: "softmax_topk: softmax over all experts, then the top k; topk_softmax: the top k logits, then a softmax over them; sigmoid_topk: float32 sigmoid scores, then the top k",
    },
    ParamDef {
        name: "norm_topk",
        kind: ParamKind::Expr(Ty::Bool),
        default: Some("false"),
        doc: "renormalise the k scores to sum to 1",
    },
    ParamDef {
        name: "scale",
        kind: ParamKind::Expr(Ty::Float),
        default: Some("1.0"),
        doc: "factor on the routing weights (routed_scaling_factor)",
    },
    ParamDef {
        name: "correction_bias",
        kind: ParamKind::Expr(Ty::Bool),
        default: Some("false"),
        doc: "the router has `e_score_correction_bias` [experts], added to the scores to choose experts (not to weight them)",
    },
    ParamDef {
        name: "groups",
        kind: ParamKind::Expr(Ty::Int),
        default: Some("1"),
        doc: "expert groups for group-limited routing (1: none)",
    },
    ParamDef {
        name: "topk_groups",
        kind: ParamKind::Expr(Ty::Int),
        default: Some("1"),
        doc: "groups whose experts may be chosen (the others are zeroed first)",
    },
    ParamDef {
        name: "group_score",
        kind: ParamKind::Choice(GROUP_SCORES),
        default: Some("max"),
        doc: "a group's score: its best expert (max) or its two best summed (top2_sum)",
    },
    ParamDef {
        name: "act",
        kind: ParamKind::Choice(ACTIVATIONS),
        default: Some("silu"),
        doc: "activation of the gate projection",
    },
];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Routing {
    SoftmaxTopk,
    TopkSoftmax,
    SigmoidTopk,
}

/// Group-limited routing: only experts of the `keep` best groups compete.
#[derive(Debug, Clone, Copy)]
struct Groups {
    count: i32,
    keep: i32,
    top2_sum: bool,
}

impl OpKind for Moe {
    fn name(&self) -> &'static str {
        "moe"
    }
    fn doc(&self) -> &'static str {
        "Top-k routed mixture of gated (GLU) experts with stacked weights and gather matmuls."
    }
    fn params(&self) -> &'static [ParamDef] {
        PARAMS
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn resolve(&self, p: &Params, scope: &str, inputs: &[ValueInfo]) -> Result<Resolved, OpError> {
        let d = expect_flat(inputs, 0)?;
        let (e, k, f) = (p.int("num_experts")?, p.int("top_k")?, p.int("hidden")?);
        if e < 1 || k < 1 || k > e {
            return Err(OpError::new(
                "top_k",
                format!("top_k {k} must be between 1 and num_experts {e}"),
            ));
        }
        routing(p)?;
        let (g, tg) = (p.int("groups")?, p.int("topk_groups")?);
        if g < 1 || e % g != 0 || tg < 1 || tg > g {
            return Err(OpError::new(
                "groups",
                format!("{g} groups of {e} experts with {tg} kept: groups must divide the experts and 1 <= topk_groups <= groups"),
            ));
        }
        Act::parse(p.str("act")?).map_err(|e| OpError::new("act", e.msg))?;
        let experts = join_scope(scope, p.str("experts")?);
        let req = |field, module: String, shape| WeightReq {
            field,
            module,
            suffix: "weight",
            shape,
            quantizable: true,
        };
        let router = join_scope(scope, p.str("router")?);
        let mut weights = vec![
            req("router", router.clone(), vec![e, d]),
            req("experts", format!("{experts}.gate_proj"), vec![e, f, d]),
            req("experts", format!("{experts}.up_proj"), vec![e, f, d]),
            req("experts", format!("{experts}.down_proj"), vec![e, d, f]),
        ];
        if p.bool("correction_bias")? {
            weights.push(WeightReq {
                field: "correction_bias",
                module: router,
                suffix: "e_score_correction_bias",
                shape: vec![e],
                quantizable: false,
            });
        }
        Ok(Resolved {
            weights,
            ..Resolved::pure(ValueInfo::flat(d))
        })
    }
    fn build(
        &self,
        p: &Params,
        _inputs: &[ValueInfo],
        weights: Vec<Param>,
    ) -> Result<Box<dyn Op>, OpError> {
        let mut weights = weights.into_iter();
        let mut next = || {
            weights
                .next()
                .ok_or_else(|| OpError::new("experts", "weights not loaded"))
        };
        let (router, gate, up, down) = (next()?, next()?, next()?, next()?);
        let correction = match p.bool("correction_bias")? {
            true => Some(dense(Some(next()?), "correction_bias")?),
            false => None,
        };
        let router = match router {
            Param::Dense(w) => Param::Dense(w.t()),
            q => q,
        };
        Ok(Box::new(MoeOp {
            router,
            gate: stacked(gate)?,
            up: stacked(up)?,
            down: stacked(down)?,
            top_k: p.int("top_k")? as i32,
            routing: routing(p)?,
            norm_topk: p.bool("norm_topk")?,
            scale: p.float("scale")? as f32,
            correction,
            groups: Groups {
                count: p.int("groups")? as i32,
                keep: p.int("topk_groups")? as i32,
                top2_sum: p.str("group_score")? == "top2_sum",
            },
            act: Act::parse(p.str("act")?).map_err(|e| OpError::new("act", e.msg))?,
        }))
    }
}

fn routing(p: &Params) -> Result<Routing, OpError> {
    match p.str("routing")? {
        "softmax_topk" => Ok(Routing::SoftmaxTopk),
        "topk_softmax" => Ok(Routing::TopkSoftmax),
        "sigmoid_topk" => Ok(Routing::SigmoidTopk),
        other => Err(OpError::new(
            "routing",
            format!("unknown routing '{other}' (known: {})", ROUTINGS.join(", ")),
        )),
    }
}

/// A stacked expert projection as the gather matmuls take it: dense
/// weights transposed once to `[E, in, out]`, quantized ones as stored.
fn stacked(p: Param) -> Result<Param, OpError> {
    match p {
        Param::Dense(w) => w
            .swap_axes(-1, -2)
            .map(Param::Dense)
            .map_err(|e| OpError::new("experts", e.to_string())),
        q => Ok(q),
    }
}

/// `x [..., 1, in]` through the experts `idx [...]` of one stacked
/// projection: `[..., 1, out]`.
fn gather(p: &Param, x: &Array, idx: &Array, sorted: bool) -> Result<Array, Exception> {
    match p {
        Param::Dense(w) => mlx_rs::ops::gather_mm(x, w, None, idx, sorted),
        Param::Quantized {
            w,
            scales,
            biases,
            group_size,
            bits,
        } => mlx_rs::ops::gather_qmm(
            x,
            w,
            scales,
            biases,
            None,
            idx,
            true,
            *group_size,
            *bits,
            sorted,
        ),
    }
}

#[derive(Debug)]
struct MoeOp {
    /// Dense router weights are kept transposed, `[in, experts]`.
    router: Param,
    gate: Param,
    up: Param,
    down: Param,
    top_k: i32,
    routing: Routing,
    norm_topk: bool,
    scale: f32,
    correction: Option<Array>,
    groups: Groups,
    act: Act,
}

/// From this many routed (token, expert) pairs on, the rows are sorted by
/// expert first (mlx-lm's threshold), so each expert's weights are read
/// once per call.
const SORT_FROM: i32 = 64;

impl MoeOp {
    /// Expert indices `[B, T, k]` and their weights `[B, T, k]`.
    fn route(&self, x: &Array) -> Result<(Array, Array), Exception> {
        let logits = linear::apply(&self.router, None, x)?;
        let k = self.top_k;
        let scores = match self.routing {
            Routing::SoftmaxTopk => mlx_rs::ops::softmax_axis(&logits, -1, true)?,
            Routing::TopkSoftmax => logits.clone(),
            Routing::SigmoidTopk => {
                mlx_rs::ops::sigmoid(&logits.as_dtype(mlx_rs::Dtype::Float32)?)?
            }
        };
        let mut choice = match &self.correction {
            Some(b) => mlx_rs::ops::add(&scores, b)?,
            None => scores.clone(),
        };
        if self.groups.count > 1 {
            choice = self.limit_groups(&choice)?;
        }
        let neg = mlx_rs::ops::negative(&choice)?;
        let inds = argpartition_axis(&neg, k - 1, -1)?.try_index((.., .., ..k))?;
        let picked = scores.take_along_axis(&inds, -1)?;
        let mut weights = match self.routing {
            Routing::TopkSoftmax => mlx_rs::ops::softmax_axis(&picked, -1, true)?,
            _ => picked,
        };
        if self.norm_topk {
            let total = weights.sum_axis(-1, true)?;
            weights = mlx_rs::ops::divide(&weights, &total)?;
        }
        if self.scale != 1.0 {
            let s = Array::from_f32(self.scale).as_dtype(weights.dtype())?;
            weights = mlx_rs::ops::multiply(&weights, &s)?;
        }
        Ok((inds, weights))
    }

    /// Zeroes the scores of every expert outside the `keep` best groups.
    fn limit_groups(&self, scores: &Array) -> Result<Array, Exception> {
        let Groups {
            count,
            keep,
            top2_sum,
        } = self.groups;
        let s = scores.shape().to_vec();
        let grouped = scores.reshape(&[s[0], s[1], count, -1])?;
        let group_scores = if top2_sum {
            let sorted = mlx_rs::ops::sort_axis(&grouped, -1)?;
            let n = sorted.shape()[3];
            sorted
                .try_index((.., .., .., n - 2..))?
                .sum_axis(-1, true)?
        } else {
            grouped.max_axis(-1, true)?
        };
        let drop = count - keep;
        if drop == 0 {
            return Ok(scores.clone());
        }
        let worst =
            argpartition_axis(&group_scores, drop - 1, -2)?.try_index((.., .., ..drop, ..))?;
        let zero = Array::from_f32(0.0).as_dtype(scores.dtype())?;
        grouped.put_along_axis(&worst, &zero, -2)?.reshape(&s)
    }

    /// The gated expert MLP of each routed slot: `[B, T, k, D]`.
    fn experts(&self, x: &Array, inds: &Array) -> Result<Array, Exception> {
        let shape = inds.shape().to_vec();
        let d = *x.shape().last().unwrap_or(&0);
        let routed = shape.iter().product::<i32>();
        if routed < SORT_FROM {
            // [B, T, 1, 1, D] against [B, T, k] expert indices.
            let x = x.expand_dims_axes(&[-2, -3])?;
            let y = self.glu(&x, inds, false)?;
            return y.squeeze_axes(&[-2]);
        }
        // Sorted by expert: row r of the flat (token, slot) list reads token
        // order[r] / k; the result is put back in the original order.
        let k = shape[shape.len() - 1];
        let flat = inds.reshape(&[-1])?;
        let order = mlx_rs::ops::argsort_axis(&flat, 0)?;
        let inverse = mlx_rs::ops::argsort_axis(&order, 0)?;
        let tokens = mlx_rs::ops::floor_divide(&order, Array::from_int(k))?;
        let x = x.reshape(&[-1, 1, d])?.index(&tokens);
        let idx = flat.index(&order);
        let y = self.glu(&x, &idx, true)?.index(&inverse);
        let mut out = shape;
        out.push(d);
        y.reshape(&out)
    }

    fn glu(&self, x: &Array, idx: &Array, sorted: bool) -> Result<Array, Exception> {
        let up = gather(&self.up, x, idx, sorted)?;
        let gate = gather(&self.gate, x, idx, sorted)?;
        let h = mlx_rs::ops::multiply(self.act.apply(&gate)?, &up)?;
        gather(&self.down, &h, idx, sorted)
    }
}

impl Op for MoeOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let x = inputs[0];
        let (inds, scores) = self.route(x)?;
        let y = self.experts(x, &inds)?;
        let weighted = mlx_rs::ops::multiply(&y, scores.expand_dims(-1)?)?;
        weighted.sum_axis(-2, false)?.as_dtype(y.dtype())
    }
}
