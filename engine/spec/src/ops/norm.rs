//! Normalisations: `rms_norm` and `layer_norm`.
use super::{op, Layout, OpError, Resolved, WeightName, WeightReq};

op! {
    /// RMS normalisation of the last axis, scaled by (offset + weight).
    "rms_norm" (1..=1) => RmsNorm {
        weight: WeightName, "module holding `weight` [dim]";
        eps: f64 = 1e-5, "added to the mean square";
        offset: f64 = 0.0, "added to the weight (1.0 for `(1 + w)` norms)";
    }
}

op! {
    /// Layer normalisation of the last axis with weight and optional bias.
    "layer_norm" (1..=1) => LayerNorm {
        weight: WeightName, "module holding `weight` [dim] (and `bias` [dim])";
        eps: f64 = 1e-5, "added to the variance";
        bias: bool = true, "whether the module has a bias";
        per_head: bool = false, "a per-head input, one weight row per head: `weight` [heads, dim], no bias (mlx-lm's LayerNorm2D / LayerNormPerHead)";
    }
}

impl RmsNorm {
    pub fn resolve(&self, scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let x = first(inputs)?;
        let w = WeightReq::dense("weight", self.weight.under(scope), "weight", vec![x.dim]);
        Ok(Resolved {
            weights: vec![w],
            ..Resolved::pure(x)
        })
    }
}

impl LayerNorm {
    pub fn resolve(&self, scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let x = first(inputs)?;
        let module = self.weight.under(scope);
        if self.per_head {
            let heads = x
                .heads
                .ok_or_else(|| OpError::new("per_head", "the input is not split into heads"))?;
            if self.bias {
                return Err(OpError::new("bias", "a per-head LayerNorm has no bias"));
            }
            let w = WeightReq::dense("weight", module, "weight", vec![heads, x.dim]);
            return Ok(Resolved {
                weights: vec![w],
                ..Resolved::pure(x)
            });
        }
        let mut weights = vec![WeightReq::dense(
            "weight",
            module.clone(),
            "weight",
            vec![x.dim],
        )];
        if self.bias {
            weights.push(WeightReq::dense("bias", module, "bias", vec![x.dim]));
        }
        Ok(Resolved {
            weights,
            ..Resolved::pure(x)
        })
    }
}

/// The one input of a unary op.
pub(crate) fn first(inputs: &[Layout]) -> Result<Layout, OpError> {
    inputs
        .first()
        .copied()
        .ok_or_else(|| OpError::new("in", "missing input"))
}
