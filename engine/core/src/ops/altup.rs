//! AltUp's prediction and correction over side-by-side streams, the
//! activation-sparsity GELU, `match_rms` and `mean_heads`.
use lmspec_spec::ops::{
    Act, AltupCorrect, AltupPredict, GeluTopk, Layout, MatchRms, MeanHeads, OpError,
};
use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::{ops, Array, Dtype};

use super::elementwise::activate;
use super::{mlx_err, Build, Ctx, Op, Param, Weights};

/// AltUp's router and one coefficient matrix (float32, clipped).
#[derive(Debug)]
struct Router {
    norm: Array,
    router: Param,
    /// `[rows, n]` float32, clipped.
    coefs: Array,
    streams: i32,
    dim: i32,
    active: i32,
    eps: f32,
}

impl Router {
    /// The router of an op's weights and settings (streams, stream width,
    /// active stream, coefficient clip, norm epsilon).
    fn take(
        w: &mut Weights,
        (streams, dim, active, clip, eps): (i64, i64, i64, Option<f64>, f64),
    ) -> Result<Router, OpError> {
        let norm = w.dense("router_norm")?;
        // As linear layers hold them: a dense weight transposed.
        let router = match w.take("modality_router")? {
            Param::Dense(r) => Param::Dense(r.t()),
            q => q,
        };
        let coefs = w
            .dense("coefs")?
            .as_dtype(Dtype::Float32)
            .map_err(mlx_err("coefs"))?;
        let coefs = match clip {
            Some(c) => {
                let c = c as f32;
                ops::clip(&coefs, (Array::from_f32(-c), Array::from_f32(c)))
                    .map_err(mlx_err("coefs"))?
            }
            None => coefs,
        };
        Ok(Router {
            norm,
            router,
            coefs,
            streams: streams as i32,
            dim: dim as i32,
            active: active as i32,
            eps: eps as f32,
        })
    }

    /// tanh(router(rms_norm(x) / D)) in float32: [B, T, n].
    fn modalities(&self, x: &Array) -> Result<Array, Exception> {
        let normed = mlx_rs::fast::rms_norm(x, Some(&self.norm), self.eps)?;
        let scaled = ops::multiply(&normed, Array::from_f32((1.0 / f64::from(self.dim)) as f32))?;
        let routed = crate::ops::linear_apply(&self.router, None, &scaled)?;
        ops::tanh(&routed.as_dtype(Dtype::Float32)?)
    }

    /// `x` [B, T, n·D] as [B, T, n, D].
    fn streams_of(&self, x: &Array) -> Result<Array, Exception> {
        let s = x.shape();
        x.reshape(&[s[0], s[1], self.streams, self.dim])
    }

    /// Stream `active` of `x` [B, T, n·D].
    fn active_of(&self, x: &Array) -> Result<Array, Exception> {
        let (a, d) = (self.active, self.dim);
        x.try_index((.., .., a * d..(a + 1) * d))
    }
}

/// Both AltUp ops take the same settings and weights: the router.
macro_rules! build_with_router {
    ($config:ty, $op:ident) => {
        impl Build for $config {
            fn build(&self, _inputs: &[Layout], mut w: Weights) -> Result<Box<dyn Op>, OpError> {
                let settings = (
                    self.streams,
                    self.dim,
                    self.active,
                    self.coef_clip,
                    self.eps,
                );
                Ok(Box::new($op(Router::take(&mut w, settings)?)))
            }
        }
    };
}

build_with_router!(AltupPredict, PredictOp);
build_with_router!(AltupCorrect, CorrectOp);

#[derive(Debug)]
struct PredictOp(Router);

impl Op for PredictOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let r = &self.0;
        let x = inputs[0];
        let n = r.streams;
        let m = r.modalities(&r.active_of(x)?)?;
        // R [B, T, n, n]: row c, column a is entry c·n + a.
        let all = ops::matmul(&m, r.coefs.t())?;
        let s = all.shape();
        let coefs = all.reshape(&[s[0], s[1], n, n])?;
        let streams = r.streams_of(&x.as_dtype(Dtype::Float32)?)?;
        let mixed = ops::add(&ops::matmul(&coefs, &streams)?, &streams)?;
        mixed.reshape(x.shape())?.as_dtype(x.dtype())
    }
}

#[derive(Debug)]
struct CorrectOp(Router);

impl Op for CorrectOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let r = &self.0;
        let (predictions, activated) = (inputs[0], inputs[1]);
        let m = r.modalities(activated)?;
        // 1 + m · coefsᵀ: one factor per stream, [B, T, n, 1].
        let factors = ops::add(&ops::matmul(&m, r.coefs.t())?, Array::from_f32(1.0))?;
        let factors = factors.expand_dims(-1)?;
        let innovation = ops::subtract(activated, &r.active_of(predictions)?)?.expand_dims(2)?;
        let corrected = ops::add(
            &ops::multiply(&innovation, &factors)?,
            &r.streams_of(predictions)?,
        )?;
        corrected
            .reshape(predictions.shape())?
            .as_dtype(activated.dtype())
    }
}

impl Build for GeluTopk {
    fn build(&self, _inputs: &[Layout], _w: Weights) -> Result<Box<dyn Op>, OpError> {
        // √2 · erfinv(2p − 1), the erfinv in float32 as MLX computes it.
        let q = Array::from_f32((2.0 * self.sparsity - 1.0) as f32);
        let multiplier = ops::erfinv(&q)
            .and_then(|e| ops::multiply(&e, Array::from_f32(std::f64::consts::SQRT_2 as f32)))
            .map_err(mlx_err("sparsity"))?;
        multiplier.eval().map_err(mlx_err("sparsity"))?;
        Ok(Box::new(GeluTopkOp { multiplier }))
    }
}

#[derive(Debug)]
struct GeluTopkOp {
    multiplier: Array,
}

impl Op for GeluTopkOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let x = inputs[0];
        let mean = x.mean_axis(-1, true)?;
        let std = ops::std_axis(x, -1, true, 0)?;
        let cutoff = ops::add(
            &mean,
            &ops::multiply(&std, &self.multiplier.as_dtype(std.dtype())?)?,
        )?;
        let above = ops::maximum(Array::from_f32(0.0), &ops::subtract(x, &cutoff)?)?;
        activate(Act::GeluApprox, &above)
    }
}

/// mean(v²)^0.5 over the last axis, kept.
fn rms(v: &Array) -> Result<Array, Exception> {
    ops::power(&ops::square(v)?.mean_axis(-1, true)?, Array::from_f32(0.5))
}

impl Op for MatchRms {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let (x, reference) = (inputs[0], inputs[1]);
        ops::multiply(x, &ops::divide(&rms(reference)?, &rms(x)?)?)
    }
}

impl Op for MeanHeads {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        inputs[0].mean_axis(1, false)
    }
}
