//! Alternating updates (AltUp) and the ops around them: `altup_predict`
//! and `altup_correct` over parallel residual streams held side by side
//! (`[B, T, streams · D]`), `gelu_topk` (a GELU of what lies above a
//! per-row statistical cutoff), `match_rms` (a value scaled to another's
//! root mean square) and `mean_heads`.
use super::norm::first;
use super::{expect_flat, expect_heads, op, Layout, OpError, Resolved, WeightName, WeightReq};

op! {
    /// AltUp's prediction over n streams held side by side, [B, T, n·D]: router modalities m = tanh(modality_router(rms_norm(stream[active]) / D)) in float32; stream c becomes stream c + Σ_a R[c, a] · stream a, R = (m · clip(prediction_coefs))ᵀ reshaped [n, n] (row c, column a: entry c·n + a); in float32, then in the input's dtype.
    "altup_predict" (1..=1) => AltupPredict {
        weight: WeightName, "module holding `router_norm.weight` [D], `modality_router.weight` [n, D] and `prediction_coefs.weight` [n·n, n]";
        streams: i64, "n, the streams";
        dim: i64, "D, one stream's width";
        active: i64 = 0, "the stream the layer computes on";
        coef_clip: Option<f64> = None, "the coefficients clipped to ±this";
        eps: f64 = 1e-6, "the router norm's epsilon";
    }
}

op! {
    /// AltUp's correction, over inputs [predictions [B, T, n·D], activated [B, T, D]]: modalities m as altup_predict's but of `activated`; stream c becomes prediction c + (activated − prediction[active]) · (1 + m · clip(correction_coefs)ᵀ)[c]; in float32 for the coefficients, the result in activated's dtype.
    "altup_correct" (2..=2) => AltupCorrect {
        weight: WeightName, "module holding `router_norm.weight` [D], `modality_router.weight` [n, D] and `correction_coefs.weight` [n, n]";
        streams: i64, "n, the streams";
        dim: i64, "D, one stream's width";
        active: i64 = 0, "the stream the layer computed on";
        coef_clip: Option<f64> = None, "the coefficients clipped to ±this";
        eps: f64 = 1e-6, "the router norm's epsilon";
    }
}

op! {
    /// A GELU (tanh approximation) of what lies above a per-row cutoff: gelu_approx(max(0, x − (mean(x) + std(x) · √2 · erfinv(2·sparsity − 1)))) over the last axis (Gemma 3n's activation sparsity: about `sparsity` of each row is cut).
    "gelu_topk" (1..=1) => GeluTopk {
        sparsity: f64, "the share of each row below the cutoff, in (0, 1)";
    }
}

op! {
    /// Scales x to the root mean square of a reference over the last axis: x · (rms(ref) / rms(x)), rms(v) = mean(v²)^0.5; over inputs [x, ref], ref broadcast (per-head x, a one-head or flat ref of the same width).
    "match_rms" (2..=2) => MatchRms {}
}

op! {
    /// The mean over the heads of a per-head value [B, H, T, D], giving [B, T, D].
    "mean_heads" (1..=1) => MeanHeads {}
}

impl AltupPredict {
    pub fn resolve(&self, scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let (n, d) = check_streams(self.streams, self.dim, self.active, self.coef_clip)?;
        let width = expect_flat(inputs, 0)?;
        if width != n * d {
            return Err(OpError::new(
                "in",
                format!(
                    "the streams are {width} wide; {n} streams of {d} are {}",
                    n * d
                ),
            ));
        }
        let module = self.weight.under(scope);
        Ok(Resolved {
            weights: router_weights(&module, n, d, "prediction_coefs", vec![n * n, n]),
            ..Resolved::pure(Layout::flat(width))
        })
    }
}

impl AltupCorrect {
    pub fn resolve(&self, scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let (n, d) = check_streams(self.streams, self.dim, self.active, self.coef_clip)?;
        super::expect_widths(inputs, &["predictions", "activated"], &[n * d, d])?;
        let module = self.weight.under(scope);
        Ok(Resolved {
            weights: router_weights(&module, n, d, "correction_coefs", vec![n, n]),
            ..Resolved::pure(Layout::flat(n * d))
        })
    }
}

/// The streams and their width, checked.
fn check_streams(n: i64, d: i64, active: i64, clip: Option<f64>) -> Result<(i64, i64), OpError> {
    if n < 1 || d < 1 {
        return Err(OpError::new(
            "streams",
            format!("{n} streams of {d}: both must be 1 or more"),
        ));
    }
    if !(0..n).contains(&active) {
        return Err(OpError::new(
            "active",
            format!("stream {active} is not one of the {n}"),
        ));
    }
    if clip.is_some_and(|c| !(c.is_finite() && c > 0.0)) {
        return Err(OpError::new("coef_clip", "must be a finite number above 0"));
    }
    Ok((n, d))
}

/// The router's weights and one coefficient matrix, under `module`.
fn router_weights(
    module: &str,
    n: i64,
    d: i64,
    coefs: &'static str,
    shape: Vec<i64>,
) -> Vec<WeightReq> {
    let sub = |name: &str| format!("{module}.{name}");
    vec![
        WeightReq::dense("router_norm", sub("router_norm"), "weight", vec![d]),
        WeightReq::matrix(
            "modality_router",
            sub("modality_router"),
            "weight",
            vec![n, d],
        ),
        WeightReq::dense("coefs", sub(coefs), "weight", shape),
    ]
}

impl GeluTopk {
    pub fn resolve(&self, _scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        if !(self.sparsity > 0.0 && self.sparsity < 1.0) {
            return Err(OpError::new(
                "sparsity",
                format!("{} is not between 0 and 1", self.sparsity),
            ));
        }
        first(inputs).map(Resolved::pure)
    }
}

impl MatchRms {
    pub fn resolve(&self, _scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let (x, r) = (first(inputs)?, inputs[1]);
        let broadcasts = r.heads.is_none_or(|h| h == 1 || Some(h) == x.heads);
        if r.dim != x.dim || !broadcasts {
            return Err(OpError::new(
                "in",
                format!("the reference {r:?} does not broadcast over {x:?}"),
            ));
        }
        Ok(Resolved::pure(x))
    }
}

impl MeanHeads {
    pub fn resolve(&self, _scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let (_, d) = expect_heads(inputs, 0)?;
        Ok(Resolved::pure(Layout::flat(d)))
    }
}
