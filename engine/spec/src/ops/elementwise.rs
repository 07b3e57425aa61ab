//! Elementwise ops: `add`, `mul`, `scale`, `softcap`, `activation` and the
//! gated `glu`.
use super::norm::first;
use super::{choice, op, Layout, OpError, Positive, Resolved, Value};

choice! {
    /// Activation functions by spec name.
    pub enum Act {
        Silu = "silu",
        Gelu = "gelu",
        GeluApprox = "gelu_approx",
        GeluFast = "gelu_fast",
        QuickGelu = "quick_gelu",
        Relu = "relu",
        Relu2 = "relu2",
        Sigmoid = "sigmoid",
        Tanh = "tanh",
        Softplus = "softplus",
    }
}

op! {
    /// Sum of its inputs (residual connections).
    "add" (2..=8) => Add {} layout: same_layout
}

op! {
    /// Elementwise product of two inputs.
    "mul" (2..=2) => Mul {} layout: same_layout
}

op! {
    /// Multiplies by a constant (embedding scales, residual multipliers).
    "scale" (1..=1) => Scale {
        factor: f64, "constant multiplier";
    } layout: first
}

op! {
    /// Soft-caps values into (-cap, cap): cap · tanh(x / cap) (final logit capping).
    "softcap" (1..=1) => Softcap {
        cap: f64, "the bound c of c·tanh(x / c)";
    }
}

op! {
    /// Sets the values at the given indices of the last axis to -inf (token ids a model never emits); indices past the axis are left out.
    "mask_tokens" (1..=1) => MaskTokens {
        ids: Value, "the indices (a list of ints of 0 or more)";
    } layout: first
}

impl MaskTokens {
    /// The indices below `width`, sorted and without repeats.
    pub fn ids_below(&self, width: i64) -> Result<Vec<i64>, OpError> {
        let Value::List(items) = &self.ids else {
            return Err(OpError::new(
                "ids",
                format!("expected a list of indices, got {}", self.ids),
            ));
        };
        let mut out = Vec::with_capacity(items.len());
        for v in items {
            match v.as_i64() {
                Some(n) if n >= 0 => {
                    if n < width {
                        out.push(n)
                    }
                }
                _ => {
                    return Err(OpError::new(
                        "ids",
                        format!("{v} is not an index of 0 or more"),
                    ))
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }
}

op! {
    /// Applies an activation function elementwise.
    "activation" (1..=1) => Activation {
        r#fn: Act, "activation function";
    } layout: first
}

op! {
    /// Gated unit: fn(gate) * up, with inputs [gate, up] (SwiGLU, GeGLU); clamped with `limit`.
    "glu" (2..=2) => Glu {
        r#fn: Act, "activation function";
        limit: Option<Positive<f64>> = None, "clamped GLU: min(fn(gate), limit) * clip(up, -limit, limit) (null: none)";
        glu: super::ExpertGlu = super::ExpertGlu::Plain, "plain: fn(gate) * up; oai: gpt-oss's (clip(up, ±limit) + 1) · g · sigmoid(1.702 g), g = min(gate, limit) (fn unused)";
    } layout: same_layout
}

op! {
    /// Clamps values into [min, max] (either bound may be absent).
    "clamp" (1..=1) => Clamp {
        min: Option<f64> = None, "lower bound (null: none)";
        max: Option<f64> = None, "upper bound (null: none)";
    }
}

impl Clamp {
    pub fn resolve(&self, _scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        match (self.min, self.max) {
            (None, None) => Err(OpError::new("max", "a clamp needs min, max or both")),
            (Some(lo), Some(hi)) if lo > hi => {
                Err(OpError::new("max", format!("{hi} is below min {lo}")))
            }
            (lo, hi) if lo.is_some_and(f64::is_nan) || hi.is_some_and(f64::is_nan) => {
                Err(OpError::new("min", "a bound is NaN"))
            }
            _ => first(inputs).map(Resolved::pure),
        }
    }
}

/// The common layout of elementwise inputs; an input whose last axis has
/// size 1 (a per-token gate) broadcasts against the others.
fn same_layout(inputs: &[Layout]) -> Result<Layout, OpError> {
    let widest = inputs
        .iter()
        .copied()
        .max_by_key(|v| v.dim)
        .ok_or_else(|| OpError::new("in", "missing input"))?;
    for (k, v) in inputs.iter().enumerate() {
        let broadcasts = v.dim == 1 && v.heads == widest.heads;
        if *v != widest && !broadcasts {
            return Err(OpError::new(
                "in",
                format!("input {k} has layout {v:?}, another input has {widest:?}"),
            ));
        }
    }
    Ok(widest)
}

impl Softcap {
    pub fn resolve(&self, _scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let cap = self.cap;
        if cap <= 0.0 {
            return Err(OpError::new("cap", format!("{cap} is not a positive cap")));
        }
        first(inputs).map(Resolved::pure)
    }
}
