//! `moe`: a routed mixture of experts, as mlx-lm's sparse MoE blocks with a
//! `SwitchGLU` (gated) or `SwitchMLP` (plain) experts: a router scores the
//! experts per token, the top-k are run through stacked expert weights
//! (`[E, out, in]`, with optional per-expert biases) with gather matmuls
//! (`gather_mm`, or `gather_qmm` when quantized), and their outputs summed
//! weighted by the routing scores. Slots past the real experts are
//! identity ("zero-compute") experts that add the input itself.
use lmspec_spec::ops::{ExpertGlu, GroupFill, GroupScore, Layout, Moe, MoeShard, OpError, Routing};
use mlx_rs::error::Exception;
use mlx_rs::ops::argpartition_axis;
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::Array;

use std::sync::Arc;

use super::elementwise::activate;
use super::{linear, mlx_err, Build, Ctx, Op, Param, Weights};
use crate::adapter::AdapterSlot;

impl Build for Moe {
    fn build(&self, _inputs: &[Layout], mut w: Weights) -> Result<Box<dyn Op>, OpError> {
        let (router, router_adapter) = w.take_adapted("router")?;
        let count = if self.gated { 3 } else { 2 };
        let mut projections = Vec::with_capacity(count);
        for _ in 0..count {
            let (weight, adapter) = w.take_adapted("experts")?;
            let weight = stacked(weight)?;
            let bias = if self.expert_bias {
                Some(w.dense("expert_bias")?)
            } else {
                None
            };
            projections.push(Stacked {
                weight,
                bias,
                adapter,
            });
        }
        let router_bias = w.dense_opt("router_bias")?;
        let correction = w.dense_opt("correction_bias")?;
        // Sharded experts: each rank's partial output is summed; a term
        // every rank would add (identity experts, down biases) is refused.
        let reduce = crate::distributed::build_group().filter(|_| self.shard != MoeShard::None);
        if reduce.is_some() && self.zero_experts > 0 {
            return Err(OpError::new(
                "shard",
                "experts with identity slots cannot be split across ranks",
            ));
        }
        if reduce.is_some() && self.expert_bias && self.shard == MoeShard::Width {
            return Err(OpError::new(
                "shard",
                "experts with biases cannot be split by width (every rank would add the down bias); split them by experts",
            ));
        }
        // Experts split whole: this rank's first expert and their count.
        let local = match &reduce {
            Some(g) if self.shard == MoeShard::Experts => {
                let per = self.num_experts / g.size() as i64;
                Some((g.rank() as i64 * per, per))
            }
            _ => None,
        };
        let router = match router {
            Param::Dense(w) => Param::Dense(w.t()),
            q => q,
        };
        Ok(Box::new(MoeOp {
            cfg: self.clone(),
            router,
            router_adapter,
            router_bias,
            projections,
            correction,
            reduce,
            local,
        }))
    }
}

/// A stacked expert projection as the gather matmuls take it: dense
/// weights transposed once to `[E, in, out]`, quantized ones as stored.
fn stacked(p: Param) -> Result<Param, OpError> {
    match p {
        Param::Dense(w) => w
            .swap_axes(-1, -2)
            .map(Param::Dense)
            .map_err(mlx_err("experts")),
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

/// One stacked expert projection, its optional `[E, out]` bias and its
/// optional LoRA adapter (`a` `[E, r, in]`, `b` `[E, out, r]`).
#[derive(Debug)]
struct Stacked {
    weight: Param,
    bias: Option<Array>,
    adapter: Option<Arc<AdapterSlot>>,
}

impl Stacked {
    fn apply(&self, x: &Array, idx: &Array, sorted: bool) -> Result<Array, Exception> {
        let y = gather(&self.weight, x, idx, sorted)?;
        let y = match &self.bias {
            // bias[idx] is [..., out]; the gathered rows are [..., 1, out].
            Some(b) => mlx_rs::ops::add(&y, b.take_axis(idx, 0)?.expand_dims(-2)?)?,
            None => y,
        };
        match &self.adapter {
            Some(slot) => crate::adapter::stacked_lora(slot, x, &y, idx, sorted),
            None => Ok(y),
        }
    }
}

#[derive(Debug)]
struct MoeOp {
    cfg: Moe,
    /// Dense router weights are kept transposed, `[in, experts]`.
    router: Param,
    router_adapter: Option<Arc<AdapterSlot>>,
    router_bias: Option<Array>,
    /// gate, up, down (gated) or fc1, fc2 (plain).
    projections: Vec<Stacked>,
    correction: Option<Array>,
    /// The group whose ranks each hold a slice of every expert (their
    /// partial outputs are summed); `None` on one rank.
    reduce: Option<Arc<crate::distributed::Group>>,
    /// With whole experts split across ranks: this rank's first expert and
    /// how many it holds.
    local: Option<(i64, i64)>,
}

/// From this many routed (token, expert) pairs on, the rows are sorted by
/// expert first (mlx-lm's threshold), so each expert's weights are read
/// once per call.
const SORT_FROM: i32 = 64;

impl MoeOp {
    /// Expert indices `[B, T, k]` and their weights `[B, T, k]`.
    fn route(&self, x: &Array) -> Result<(Array, Array), Exception> {
        let logits = linear::apply(&self.router, self.router_bias.as_ref(), x)?;
        let logits = match &self.router_adapter {
            Some(slot) => crate::adapter::lora_delta(slot, x, &logits)?,
            None => logits,
        };
        let k = self.cfg.top_k as i32;
        let scores = match self.cfg.routing {
            Routing::SoftmaxTopk => mlx_rs::ops::softmax_axis(&logits, -1, true)?,
            Routing::TopkSoftmax | Routing::TopkSigmoid => logits.clone(),
            Routing::SigmoidTopk => {
                mlx_rs::ops::sigmoid(&logits.as_dtype(mlx_rs::Dtype::Float32)?)?
            }
            Routing::Sparsemixer => return self.sparsemixer(&logits),
        };
        let mut choice = match &self.correction {
            Some(b) => mlx_rs::ops::add(&scores, b)?,
            None => scores.clone(),
        };
        if self.cfg.groups > 1 {
            choice = self.limit_groups(&choice)?;
        }
        let neg = mlx_rs::ops::negative(&choice)?;
        // The choice is not differentiated (mlx-lm's stop_gradient): a
        // gradient through the scores flows into the weights only.
        let inds =
            mlx_rs::stop_gradient(argpartition_axis(&neg, k - 1, -1)?.try_index((.., .., ..k))?)?;
        // Weights come from the scores the choice was made on, dropped
        // groups zeroed (so an expert of a dropped group that fills the top
        // k weighs nothing); with a correction bias, from the scores alone.
        let weighed = match &self.correction {
            Some(_) => &scores,
            None => &choice,
        };
        let picked = weighed.take_along_axis(&inds, -1)?;
        let mut weights = match self.cfg.routing {
            Routing::TopkSoftmax => mlx_rs::ops::softmax_axis(&picked, -1, true)?,
            Routing::TopkSigmoid => {
                mlx_rs::ops::sigmoid(&picked.as_dtype(mlx_rs::Dtype::Float32)?)?
                    .as_dtype(picked.dtype())?
            }
            _ => picked,
        };
        if self.cfg.norm_topk {
            let total = weights.sum_axis(-1, true)?;
            weights = mlx_rs::ops::divide(&weights, &total)?;
        }
        if self.cfg.scale != 1.0 {
            let s = Array::from_f32(self.cfg.scale as f32).as_dtype(weights.dtype())?;
            weights = mlx_rs::ops::multiply(&weights, &s)?;
        }
        Ok((inds, weights))
    }

    /// phimoe's sparsemixer (inference path): `top_k` rounds, each picking
    /// the best remaining logit and weighting it by its softmax over the
    /// remaining logits within the jitter band below it (relative to
    /// `max(|logit|, pick)`).
    fn sparsemixer(&self, logits: &Array) -> Result<(Array, Array), Exception> {
        let neg_inf = Array::from_f32(f32::NEG_INFINITY).as_dtype(logits.dtype())?;
        let band_width = Array::from_f32(2.0 * self.cfg.jitter as f32).as_dtype(logits.dtype())?;
        let magnitude = mlx_rs::ops::abs(logits)?;
        let mut masked = logits.clone();
        let (mut inds, mut weights) = (Vec::new(), Vec::new());
        for _ in 0..self.cfg.top_k {
            let top = masked.max_axis(-1, true)?;
            let ind =
                mlx_rs::stop_gradient(mlx_rs::ops::indexing::argmax_axis(&masked, -1, true)?)?;
            let factor = mlx_rs::ops::maximum(&magnitude, &top)?;
            let gap = mlx_rs::ops::divide(mlx_rs::ops::subtract(&top, logits)?, &factor)?;
            let band = mlx_rs::ops::select(&gap.gt(&band_width)?, &neg_inf, &masked)?;
            let band = mlx_rs::ops::softmax_axis(&band, -1, true)?;
            weights.push(band.take_along_axis(&ind, -1)?);
            masked = masked.put_along_axis(&ind, &neg_inf, -1)?;
            inds.push(ind);
        }
        Ok((
            mlx_rs::ops::concatenate(&inds, -1)?,
            mlx_rs::ops::concatenate(&weights, -1)?,
        ))
    }

    /// Drops the scores of every expert outside the `keep` best groups
    /// (to zero, or to minus infinity).
    fn limit_groups(&self, scores: &Array) -> Result<Array, Exception> {
        let (count, keep) = (self.cfg.groups as i32, self.cfg.topk_groups as i32);
        let top2_sum = self.cfg.group_score == GroupScore::Top2Sum;
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
        let worst = mlx_rs::stop_gradient(
            argpartition_axis(&group_scores, drop - 1, -2)?.try_index((.., .., ..drop, ..))?,
        )?;
        let fill = match self.cfg.group_fill {
            GroupFill::Zero => 0.0,
            GroupFill::NegInf => f32::NEG_INFINITY,
        };
        let fill = Array::from_f32(fill).as_dtype(scores.dtype())?;
        grouped.put_along_axis(&worst, &fill, -2)?.reshape(&s)
    }

    /// The gated expert MLP of each routed slot: `[B, T, k, D]`.
    fn experts(&self, x: &Array, inds: &Array) -> Result<Array, Exception> {
        let shape = inds.shape().to_vec();
        let d = *x.shape().last().unwrap_or(&0);
        let routed = shape.iter().product::<i32>();
        if routed < SORT_FROM {
            // [B, T, 1, 1, D] against [B, T, k] expert indices.
            let x = x.expand_dims_axes(&[-2, -3])?;
            let y = self.expert_mlp(&x, inds, false)?;
            return y.squeeze_axes(&[-2]);
        }
        // Sorted by expert: row r of the flat (token, slot) list reads token
        // order[r] / k; the result is put back in the original order.
        let k = shape[shape.len() - 1];
        let flat = inds.reshape(&[-1])?;
        let order = mlx_rs::ops::argsort_axis(&flat, 0)?;
        let inverse = mlx_rs::ops::argsort_axis(&order, 0)?;
        let tokens = mlx_rs::ops::floor_divide(&order, Array::from_int(k))?;
        let x = x.reshape(&[-1, 1, d])?.try_index(&tokens)?;
        let idx = flat.try_index(&order)?;
        let y = self.expert_mlp(&x, &idx, true)?.try_index(&inverse)?;
        let mut out = shape;
        out.push(d);
        y.reshape(&out)
    }

    fn expert_mlp(&self, x: &Array, idx: &Array, sorted: bool) -> Result<Array, Exception> {
        let p = &self.projections;
        if !self.cfg.gated {
            let h = activate(self.cfg.act, &p[0].apply(x, idx, sorted)?)?;
            return p[1].apply(&h, idx, sorted);
        }
        let up = p[1].apply(x, idx, sorted)?;
        let gate = p[0].apply(x, idx, sorted)?;
        let limit = self.cfg.limit.map(|l| l.0 as f32);
        let h = match self.cfg.glu {
            ExpertGlu::Plain => clamped_glu(self.cfg.act, &gate, &up, limit)?,
            ExpertGlu::Oai => oai_glu(&gate, &up, limit)?,
        };
        p[2].apply(&h, idx, sorted)
    }
}

/// `act(gate) * up`; with a limit, `min(act(gate), limit) * clip(up, ±limit)`.
pub(crate) fn clamped_glu(
    act: lmspec_spec::ops::Act,
    gate: &Array,
    up: &Array,
    limit: Option<f32>,
) -> Result<Array, Exception> {
    let g = activate(act, gate)?;
    match limit {
        None => mlx_rs::ops::multiply(&g, up),
        Some(l) => {
            let g = mlx_rs::ops::minimum(&g, Array::from_f32(l).as_dtype(g.dtype())?)?;
            let u = mlx_rs::ops::clip(up, (-l, l))?;
            mlx_rs::ops::multiply(&g, &u)
        }
    }
}

/// gpt-oss's SwiGLU: `g = min(gate, limit)`, `u = clip(up, ±limit)`,
/// `(u + 1) * g * sigmoid(1.702 g)`.
pub(crate) fn oai_glu(gate: &Array, up: &Array, limit: Option<f32>) -> Result<Array, Exception> {
    let (g, u) = match limit {
        Some(l) => (
            mlx_rs::ops::minimum(gate, Array::from_f32(l).as_dtype(gate.dtype())?)?,
            mlx_rs::ops::clip(up, (-l, l))?,
        ),
        None => (gate.clone(), up.clone()),
    };
    let alpha = Array::from_f32(1.702).as_dtype(g.dtype())?;
    let glu = mlx_rs::ops::multiply(
        &g,
        mlx_rs::ops::sigmoid(mlx_rs::ops::multiply(&g, &alpha)?)?,
    )?;
    let one = Array::from_f32(1.0).as_dtype(u.dtype())?;
    mlx_rs::ops::multiply(&glu, mlx_rs::ops::add(&u, &one)?)
}

impl Op for MoeOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let x = inputs[0];
        let (mut inds, mut scores) = self.route(inputs.get(1).copied().unwrap_or(x))?;
        // Identity experts: slots past the real ones run no MLP; their
        // weights scale the input itself.
        let mut identity = None;
        if self.cfg.zero_experts > 0 {
            let real = Array::from_int(self.cfg.num_experts as i32);
            let is_zero = inds.ge(&real)?;
            let none = Array::from_f32(0.0).as_dtype(scores.dtype())?;
            let zero_weight = mlx_rs::ops::select(&is_zero, &scores, &none)?.sum_axis(-1, true)?;
            identity = Some(zero_weight);
            scores = mlx_rs::ops::select(&is_zero, &none, &scores)?;
            inds = mlx_rs::ops::select(&is_zero, Array::from_int(0), &inds)?;
        }
        if let Some((first, count)) = self.local {
            // A choice of another rank's expert weighs nothing here (its
            // index is any local one); the sum over ranks adds it back.
            let lo = Array::from_int(first as i32);
            let mine = mlx_rs::ops::logical_and(
                &inds.ge(&lo)?,
                &inds.lt(Array::from_int((first + count) as i32))?,
            )?;
            let none = Array::from_f32(0.0).as_dtype(scores.dtype())?;
            scores = mlx_rs::ops::select(&mine, &scores, &none)?;
            inds = mlx_rs::ops::select(
                &mine,
                mlx_rs::ops::subtract(&inds, &lo)?,
                Array::from_int(0),
            )?;
        }
        if self.cfg.scale_input {
            // Top-1: the weight scales what the expert reads, [B, T, 1] * x.
            let scaled = mlx_rs::ops::multiply(x, &scores)?;
            let out = self.experts(&scaled, &inds)?.squeeze_axes(&[-2])?;
            return match &self.reduce {
                Some(group) => group.all_sum(&out),
                None => Ok(out),
            };
        }
        let y = self.experts(x, &inds)?;
        let weighted = mlx_rs::ops::multiply(&y, scores.expand_dims(-1)?)?;
        let out = weighted.sum_axis(-2, false)?.as_dtype(y.dtype())?;
        if let Some(group) = &self.reduce {
            return group.all_sum(&out);
        }
        match identity {
            Some(w) => mlx_rs::ops::add(&out, mlx_rs::ops::multiply(x, &w)?)?.as_dtype(y.dtype()),
            None => Ok(out),
        }
    }
}
