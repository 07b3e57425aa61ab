//! `short_conv`: a causal depthwise convolution over the sequence (each
//! channel its own `kernel`-tap filter); its state is its last `kernel - 1`
//! input rows.
use super::{expect_flat, op, Layout, OpError, Resolved, StateKind, WeightName, WeightReq};

op! {
    /// Causal depthwise convolution over positions; keeps its last kernel-1 input rows as state.
    "short_conv" (1..=1) => ShortConv {
        weight: WeightName, "module holding `weight` [channels, kernel, 1] (and `bias` [channels])";
        kernel: i64, "filter taps; the last one multiplies the current position";
        bias: bool = false, "whether the module has a bias";
    }
}

impl ShortConv {
    pub fn resolve(&self, scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let d = expect_flat(inputs, 0)?;
        let k = self.kernel;
        if k < 1 {
            return Err(OpError::new(
                "kernel",
                format!("must be at least 1, got {k}"),
            ));
        }
        let module = self.weight.under(scope);
        let mut weights = vec![WeightReq::dense(
            "weight",
            module.clone(),
            "weight",
            vec![d, k, 1],
        )];
        if self.bias {
            weights.push(WeightReq::dense("bias", module, "bias", vec![d]));
        }
        Ok(Resolved {
            out: Layout::flat(d),
            weights,
            state: (k > 1).then_some(StateKind::Conv(k as i32 - 1)),
        })
    }
}

op! {
    /// The previous position's row of [B, T, D] at each position, zeros before the first (RWKV's token shift); keeps its last input row as state.
    "token_shift" (1..=1) => TokenShift {}
}

impl TokenShift {
    pub fn resolve(&self, _scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let d = expect_flat(inputs, 0)?;
        Ok(Resolved {
            out: Layout::flat(d),
            weights: Vec::new(),
            state: Some(StateKind::Conv(1)),
        })
    }
}
