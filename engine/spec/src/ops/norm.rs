//! Normalisations: `rms_norm` and `layer_norm`, with or without a learned
//! weight.
use super::{op, Layout, OpError, Resolved, WeightName, WeightReq};

op! {
    /// RMS normalisation of the last axis, scaled by (offset + weight); without a weight, the normalisation alone.
    "rms_norm" (1..=1) => RmsNorm {
        weight: Option<WeightName> = None, "module holding `weight` [dim]; null: no weight (mlx-lm's `rms_norm(x, None, eps)`)";
        eps: f64 = 1e-5, "added to the mean square";
        offset: f64 = 0.0, "added to the weight (1.0 for `(1 + w)` norms)";
        groups: i64 = 1, "normalise each of this many equal groups of the last axis on its own (the weight still spans the whole axis)";
    }
}

op! {
    /// Layer normalisation of the last axis with weight and optional bias; without a weight, the normalisation alone.
    "layer_norm" (1..=1) => LayerNorm {
        weight: Option<WeightName> = None, "module holding `weight` [dim] (and `bias` [dim]); null: no weight and no bias (LayerNorm with affine=False)";
        eps: f64 = 1e-5, "added to the variance";
        bias: bool = true, "whether the module has a bias";
        per_head: bool = false, "a per-head input, one weight row per head: `weight` [heads, dim], no bias (mlx-lm's LayerNorm2D / LayerNormPerHead)";
        offset: f64 = 0.0, "added to the weight (1.0 for Nemotron's LayerNorm1P, `(1 + w)`)";
    }
}

impl RmsNorm {
    pub fn resolve(&self, scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let x = first(inputs)?;
        if self.groups < 1 || x.dim % self.groups != 0 {
            return Err(OpError::new(
                "groups",
                format!(
                    "{} features do not split into {} groups",
                    x.dim, self.groups
                ),
            ));
        }
        let Some(weight) = &self.weight else {
            if self.offset != 0.0 {
                return Err(OpError::new(
                    "offset",
                    "a norm without a weight has no offset",
                ));
            }
            return Ok(Resolved::pure(x));
        };
        let w = WeightReq::dense("weight", weight.under(scope), "weight", vec![x.dim]);
        Ok(Resolved {
            weights: vec![w],
            ..Resolved::pure(x)
        })
    }
}

impl LayerNorm {
    pub fn resolve(&self, scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let x = first(inputs)?;
        let Some(weight) = &self.weight else {
            if self.bias {
                return Err(OpError::new(
                    "bias",
                    "a LayerNorm without a weight has no bias either (set bias: false)",
                ));
            }
            if self.per_head || self.offset != 0.0 {
                let field = if self.per_head { "per_head" } else { "offset" };
                return Err(OpError::new(field, "needs a weight"));
            }
            return Ok(Resolved::pure(x));
        };
        let module = weight.under(scope);
        if self.per_head {
            if self.offset != 0.0 {
                return Err(OpError::new("offset", "not supported with per_head"));
            }
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
