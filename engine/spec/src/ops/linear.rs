//! `linear` (an affine projection, quantized when the checkpoint is) and
//! `head_linear` (one projection per head).
use super::{expect_flat, expect_heads, op, Layout, OpError, Resolved, WeightName, WeightReq};

op! {
    /// Affine projection of the last axis; quantized when the checkpoint is.
    "linear" (1..=1) => Linear {
        weight: WeightName, "module holding `weight` [out, in] (and `bias` [out])";
        out: i64, "output features";
        bias: bool = false, "whether the module has a bias";
    }
}

op! {
    /// A separate projection per head; a one-head input is shared by every head.
    "head_linear" (1..=1) => HeadLinear {
        weight: WeightName, "module holding `weight` [heads, out, in]";
        heads: i64, "heads (the weight's first axis)";
        out: i64, "output features per head";
        transposed: bool = true, "the weight is stored [heads, out, in] (false: [heads, in, out])";
        bias: bool = false, "the module has a per-head `bias` [heads, out]";
    }
}

impl Linear {
    pub fn resolve(&self, scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let input = expect_flat(inputs, 0)?;
        let module = self.weight.under(scope);
        let mut weights = vec![WeightReq::matrix(
            "weight",
            module.clone(),
            "weight",
            vec![self.out, input],
        )];
        if self.bias {
            weights.push(WeightReq::dense("bias", module, "bias", vec![self.out]));
        }
        Ok(Resolved {
            weights,
            ..Resolved::pure(Layout::flat(self.out))
        })
    }
}

impl HeadLinear {
    pub fn resolve(&self, scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let (h_in, input) = expect_heads(inputs, 0)?;
        let (heads, out) = (self.heads, self.out);
        if h_in != heads && h_in != 1 {
            return Err(OpError::new(
                "heads",
                format!("the input has {h_in} heads; expected {heads} or 1"),
            ));
        }
        let shape = match self.transposed {
            true => vec![heads, out, input],
            false => vec![heads, input, out],
        };
        // Quantizable as mlx-lm's QuantizedMultiLinear stores it (along
        // the stored last axis); the engine dequantizes it once.
        let module = self.weight.under(scope);
        let mut weights = vec![WeightReq::matrix("weight", module.clone(), "weight", shape)];
        if self.bias {
            weights.push(WeightReq::dense("bias", module, "bias", vec![heads, out]));
        }
        Ok(Resolved {
            weights,
            ..Resolved::pure(Layout {
                dim: out,
                heads: Some(heads),
            })
        })
    }
}
