//! `moe`: a routed mixture of gated experts, as mlx-lm's sparse MoE blocks
//! with a `SwitchGLU`: a router scores the experts per token, the top-k are
//! run through stacked expert weights (`[E, out, in]`) with gather matmuls
//! (`gather_mm`, or `gather_qmm` when quantized), and their outputs summed
//! weighted by the routing scores.
use lmspec_spec::ops::{GroupScore, Layout, Moe, OpError, Routing};
use mlx_rs::error::Exception;
use mlx_rs::ops::argpartition_axis;
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::Array;

use super::elementwise::activate;
use super::{linear, mlx_err, Build, Ctx, Op, Param, Weights};

impl Build for Moe {
    fn build(&self, _inputs: &[Layout], mut w: Weights) -> Result<Box<dyn Op>, OpError> {
        let router = w.take("router")?;
        let (gate, up, down) = (w.take("experts")?, w.take("experts")?, w.take("experts")?);
        let correction = w.dense_opt("correction_bias")?;
        let router = match router {
            Param::Dense(w) => Param::Dense(w.t()),
            q => q,
        };
        Ok(Box::new(MoeOp {
            cfg: self.clone(),
            router,
            gate: stacked(gate)?,
            up: stacked(up)?,
            down: stacked(down)?,
            correction,
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

#[derive(Debug)]
struct MoeOp {
    cfg: Moe,
    /// Dense router weights are kept transposed, `[in, experts]`.
    router: Param,
    gate: Param,
    up: Param,
    down: Param,
    correction: Option<Array>,
}

/// From this many routed (token, expert) pairs on, the rows are sorted by
/// expert first (mlx-lm's threshold), so each expert's weights are read
/// once per call.
const SORT_FROM: i32 = 64;

impl MoeOp {
    /// Expert indices `[B, T, k]` and their weights `[B, T, k]`.
    fn route(&self, x: &Array) -> Result<(Array, Array), Exception> {
        let logits = linear::apply(&self.router, None, x)?;
        let k = self.cfg.top_k as i32;
        let scores = match self.cfg.routing {
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
        if self.cfg.groups > 1 {
            choice = self.limit_groups(&choice)?;
        }
        let neg = mlx_rs::ops::negative(&choice)?;
        let inds = argpartition_axis(&neg, k - 1, -1)?.try_index((.., .., ..k))?;
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

    /// Zeroes the scores of every expert outside the `keep` best groups.
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
        let x = x.reshape(&[-1, 1, d])?.try_index(&tokens)?;
        let idx = flat.try_index(&order)?;
        let y = self.glu(&x, &idx, true)?.try_index(&inverse)?;
        let mut out = shape;
        out.push(d);
        y.reshape(&out)
    }

    fn glu(&self, x: &Array, idx: &Array, sorted: bool) -> Result<Array, Exception> {
        let up = gather(&self.up, x, idx, sorted)?;
        let gate = gather(&self.gate, x, idx, sorted)?;
        let h = mlx_rs::ops::multiply(activate(self.cfg.act, &gate)?, &up)?;
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
