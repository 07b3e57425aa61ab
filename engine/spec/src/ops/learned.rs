//! Elementwise ops with learned parameters: `gain` (a learned scale
//! broadcast over a value), `xielu` (the xIELU activation with learned
//! scalars) and `fake_quant` (8-bit fake quantization with a learned
//! scale).
use super::norm::first;
use super::{choice, op, Layout, OpError, Resolved, WeightName, WeightReq};

choice! {
    /// What a learned gain varies over.
    pub enum GainShape {
        /// One number for every element: `weight` [1].
        Scalar = "scalar",
        /// One per feature of the last axis: `weight` [D].
        Channel = "channel",
        /// One per head of a per-head value: `weight` [H].
        Head = "head",
        /// One per feature of each head: `weight` [H, D].
        HeadChannel = "head_channel",
    }
}

op! {
    /// Multiplies by a learned gain broadcast over the value (per-head query gains, branch scalars).
    "gain" (1..=1) => Gain {
        weight: WeightName, "module holding `weight`, shaped as `shape` says";
        shape: GainShape = GainShape::Channel, "scalar: [1]; channel: [D]; head: [H]; head_channel: [H, D] (the last two need a per-head input)";
    }
}

op! {
    /// xIELU activation: x > 0: a_p·x² + β·x; else (expm1(min(x, ε)) − x)·a_n + β·x, with a_p = softplus(alpha_p), a_n = β + softplus(alpha_n) (Apertus).
    "xielu" (1..=1) => Xielu {
        weight: WeightName, "module holding the scalars `alpha_p`, `alpha_n`, `beta` and `eps` (shape [])";
    }
}

impl Gain {
    /// The weight's shape for an input layout.
    pub fn weight_shape(&self, x: Layout) -> Result<Vec<i64>, OpError> {
        let heads = || {
            x.heads.ok_or_else(|| {
                OpError::new(
                    "shape",
                    format!("'{}' needs a per-head input", self.shape.spelling()),
                )
            })
        };
        Ok(match self.shape {
            GainShape::Scalar => vec![1],
            GainShape::Channel => vec![x.dim],
            GainShape::Head => vec![heads()?],
            GainShape::HeadChannel => vec![heads()?, x.dim],
        })
    }

    pub fn resolve(&self, scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let x = first(inputs)?;
        let w = WeightReq::dense(
            "weight",
            self.weight.under(scope),
            "weight",
            self.weight_shape(x)?,
        );
        Ok(Resolved {
            weights: vec![w],
            ..Resolved::pure(x)
        })
    }
}

op! {
    /// Fake 8-bit quantization: round(x / s) clipped to [-128, 127], times s, computed in float32, with a learned scalar s (AFM's keys and values).
    "fake_quant" (1..=1) => FakeQuant {
        weight: WeightName, "module holding the scalar `scale` (shape [])";
    }
}

impl FakeQuant {
    pub fn resolve(&self, scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let x = first(inputs)?;
        let w = WeightReq::dense("weight", self.weight.under(scope), "scale", vec![]);
        Ok(Resolved {
            weights: vec![w],
            ..Resolved::pure(x)
        })
    }
}

/// The scalar parameters of `xielu`, in the order the engine reads them.
pub const XIELU_PARAMS: [&str; 4] = ["alpha_p", "alpha_n", "beta", "eps"];

impl Xielu {
    pub fn resolve(&self, scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let x = first(inputs)?;
        let module = self.weight.under(scope);
        let weights = XIELU_PARAMS
            .iter()
            .map(|p| WeightReq::dense("weight", module.clone(), p, vec![]))
            .collect();
        Ok(Resolved {
            weights,
            ..Resolved::pure(x)
        })
    }
}
