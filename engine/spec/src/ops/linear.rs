//! `linear` (an affine projection, quantized when the checkpoint is) and
//! `head_linear` (one projection per head).
use super::{
    choice, expect_flat, expect_heads, op, Layout, OpError, Resolved, WeightName, WeightReq,
};

choice! {
    /// How a projection is split across the ranks of a tensor-parallel run
    /// (nothing changes on one rank).
    pub enum Shard {
        /// Every rank holds the whole weight.
        None = "none",
        /// Each rank holds a slice of the output features (weight rows and
        /// bias); its output is that rank's slice.
        Out = "out",
        /// Each rank holds a slice of the input features (weight columns);
        /// the partial products are summed across ranks, then the bias added.
        In = "in",
    }
}

op! {
    /// Affine projection of the last axis; quantized when the checkpoint is. A weight stored rotated (a `signs` tensor beside it, laid out `[in / b, b]` by the `hadamard` weight rule) rotates its input first: in float32, times the signs, a Hadamard transform over each block of b features scaled by 1/sqrt(b), then in the input's dtype.
    "linear" (1..=1) => Linear {
        weight: WeightName, "module holding `weight` [out, in] (and `bias` [out]; when rotated, `signs`)";
        out: i64, "output features";
        bias: bool = false, "whether the module has a bias";
        shard: Shard = Shard::None, "tensor parallelism: none (replicated), out (each rank a slice of the output features) or in (each rank a slice of the input features, the partial products summed across ranks)";
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
        let weight = WeightReq::matrix("weight", module.clone(), "weight", vec![self.out, input]);
        // Output slices may be copied (key/value heads shared by ranks);
        // input slices are summed, so each must be a rank's own.
        let weight = match self.shard {
            Shard::None => weight,
            Shard::Out => weight.sharded_or_copied(true, 0),
            Shard::In => weight.sharded(true, 1),
        };
        let mut weights = vec![weight];
        if self.bias {
            weights.push(
                WeightReq::dense("bias", module.clone(), "bias", vec![self.out])
                    .sharded_or_copied(self.shard == Shard::Out, 0),
            );
        }
        // Every rank holds the whole rotation (one that splits the input
        // features across ranks refuses it when built).
        weights.push(WeightReq::rotation_signs(module, input));
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
