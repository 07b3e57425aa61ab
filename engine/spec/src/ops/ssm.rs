//! Recurrent mixers with a float32 state: `ssm`, the selective state-space
//! scan (SSD) of mlx-lm's `ssm_attn`, `selective_scan`, Mamba-1's scan with
//! a per-channel A matrix, `gated_delta`, the gated delta rule of Gated
//! DeltaNet linear attention, `lightning`, linear attention with a
//! constant decay per head, `rg_lru`, Griffin's gated diagonal
//! recurrence, and `wkv7`, RWKV-7's generalized delta rule.
use super::{
    expect_heads, expect_widths, op, Layout, OpError, Resolved, StateKind, WeightName, WeightReq,
};

op! {
    /// Selective state-space (SSD) scan of [x, B, C, dt]; keeps a float32 state.
    "ssm" (4..=4) => Ssm {
        weight: WeightName, "module holding `A_log`, `D` and `dt_bias` [heads]";
        heads: i64, "heads";
        head_dim: i64, "channels per head";
        groups: i64 = 1, "groups of heads sharing B and C";
        state: i64, "state size per group";
        dt_min: f64 = 0.0, "lower clip of the time step";
        dt_max: f64 = 1e30, "upper clip of the time step";
    }
}

op! {
    /// Gated delta rule over [q, k, v, a, b]; keeps a float32 state.
    "gated_delta" (5..=5) => GatedDelta {
        weight: WeightName, "module holding `A_log` [value_heads] and `dt_bias` [value_heads] (`[value_heads * key_dim]` with `channel_gate`)";
        key_heads: i64, "query/key heads";
        value_heads: i64, "value heads (a multiple of key_heads)";
        key_dim: i64, "query/key channels per head";
        value_dim: i64, "value channels per head";
        channel_gate: bool = false, "one decay per key channel (Kimi Delta Attention): `a` is value_heads * key_dim wide";
        lower_bound: Option<f64> = None, "the decay as exp(lower_bound * sigmoid(exp(A_log) (a + dt_bias))), bounded below by exp(lower_bound) (null: exp(-exp(A_log) softplus(a + dt_bias)))";
        neg_eigval: bool = false, "beta = 2 sigmoid(b), in [0, 2] (negative eigenvalues of the transition)";
    }
}

/// A recurrent op's result: per-head `[heads]` vectors under one module.
fn recurrent(out: i64, module: String, suffixes: &[&'static str], heads: i64) -> Resolved {
    Resolved {
        out: Layout::flat(out),
        weights: suffixes
            .iter()
            .map(|s| WeightReq::dense("weight", module.clone(), s, vec![heads]))
            .collect(),
        state: Some(StateKind::Recurrent),
    }
}

impl Ssm {
    pub fn resolve(&self, scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let (h, hd, g, n) = (self.heads, self.head_dim, self.groups, self.state);
        if g < 1 || h % g != 0 {
            return Err(OpError::new(
                "groups",
                format!("{g} groups do not divide {h} heads"),
            ));
        }
        expect_widths(inputs, &["x", "B", "C", "dt"], &[h * hd, g * n, g * n, h])?;
        Ok(recurrent(
            h * hd,
            self.weight.under(scope),
            &["A_log", "D", "dt_bias"],
            h,
        ))
    }
}

impl GatedDelta {
    pub fn resolve(&self, scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let (hk, hv, dk, dv) = (
            self.key_heads,
            self.value_heads,
            self.key_dim,
            self.value_dim,
        );
        if hk < 1 || hv % hk != 0 {
            return Err(OpError::new(
                "value_heads",
                format!("{hv} value heads do not group over {hk} key heads"),
            ));
        }
        if self.lower_bound.is_some_and(|b| !b.is_finite()) {
            return Err(OpError::new("lower_bound", "must be a finite number"));
        }
        let gates = if self.channel_gate { hv * dk } else { hv };
        expect_widths(
            inputs,
            &["q", "k", "v", "a", "b"],
            &[hk * dk, hk * dk, hv * dv, gates, hv],
        )?;
        let module = self.weight.under(scope);
        let mut resolved = recurrent(hv * dv, module.clone(), &["A_log"], hv);
        resolved
            .weights
            .push(WeightReq::dense("weight", module, "dt_bias", vec![gates]));
        Ok(resolved)
    }
}

op! {
    /// Mamba-1 selective scan of [x, dt, B, C], A per (channel, state); keeps a float32 state.
    "selective_scan" (4..=4) => SelectiveScan {
        weight: WeightName, "module holding `A_log` [channels, state] and `D` [channels]";
        channels: i64, "channels (the mixer's width, one recurrence each)";
        state: i64, "state size per channel";
    }
}

impl SelectiveScan {
    pub fn resolve(&self, scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let (c, n) = (self.channels, self.state);
        if c < 1 || n < 1 {
            return Err(OpError::new(
                "state",
                format!("{c} channels with state {n}: both must be at least 1"),
            ));
        }
        expect_widths(inputs, &["x", "dt", "B", "C"], &[c, c, n, n])?;
        let module = self.weight.under(scope);
        Ok(Resolved {
            out: Layout::flat(c),
            weights: vec![
                WeightReq::dense("weight", module.clone(), "A_log", vec![c, n]),
                WeightReq::dense("weight", module, "D", vec![c]),
            ],
            state: Some(StateKind::Recurrent),
        })
    }
}

op! {
    /// Lightning (constant-decay linear) attention of per-head [q, k, v] with ALiBi-slope decays; keeps a float32 state.
    "lightning" (3..=3) => Lightning {
        scale: f64, "factor on q";
        layer_factor: f64, "head h's log-decay per position is -slope_h * layer_factor, slope_h its ALiBi slope";
    }
}

impl Lightning {
    pub fn resolve(&self, _scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let (hq, dq) = expect_heads(inputs, 0)?;
        let (hk, dk) = expect_heads(inputs, 1)?;
        let (hv, dv) = expect_heads(inputs, 2)?;
        if hq != hk || hk != hv || dq != dk {
            return Err(OpError::new(
                "in",
                format!("q [{hq} heads of {dq}], k [{hk} of {dk}] and v [{hv} heads] must have the same heads, and q and k the same width"),
            ));
        }
        if !self.layer_factor.is_finite() || !self.scale.is_finite() {
            return Err(OpError::new(
                "layer_factor",
                "scale and layer_factor must be finite",
            ));
        }
        Ok(Resolved {
            out: Layout {
                dim: dv,
                heads: Some(hv),
            },
            weights: Vec::new(),
            state: Some(StateKind::Recurrent),
        })
    }
}

/// ALiBi's slope of each of `n` heads: for a power of two,
/// `2^(-8 (h + 1) / n)`; otherwise the slopes of the power of two below
/// `n`, then every other slope of twice that, up to `n`.
pub fn alibi_slopes(n: usize) -> Vec<f64> {
    fn pow2(n: usize) -> Vec<f64> {
        let start = 2f64.powf(-(2f64.powf(-((n as f64).log2() - 3.0))));
        (0..n).map(|i| start.powi(i as i32 + 1)).collect()
    }
    if n.is_power_of_two() {
        return pow2(n);
    }
    let p = 1usize << (usize::BITS - 1 - n.leading_zeros());
    let mut slopes = pow2(p);
    slopes.extend(pow2(2 * p).into_iter().step_by(2).take(n - p));
    slopes
}

op! {
    /// RG-LRU, Griffin's real-gated linear recurrence of [x, input gate, recurrence gate]; keeps a float32 state.
    "rg_lru" (3..=3) => RgLru {
        weight: WeightName, "module holding `recurrent_param` [width]";
        width: i64, "channels, one recurrence each";
    }
}

impl RgLru {
    pub fn resolve(&self, scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let d = self.width;
        expect_widths(inputs, &["x", "input gate", "recurrence gate"], &[d, d, d])?;
        Ok(Resolved {
            out: Layout::flat(d),
            weights: vec![WeightReq::dense(
                "weight",
                self.weight.under(scope),
                "recurrent_param",
                vec![d],
            )],
            state: Some(StateKind::Recurrent),
        })
    }
}

op! {
    /// RWKV-7's time mixing core over [r, w, k, v, a] ([B, T, heads·head_dim] each; w and a before their sigmoids): per head, the decay exp(-0.606531·sigmoid(w)), kk = unit(k·k_k), k' = k·(1 + (sigmoid(a) − 1)·k_a), the state S = S·diag(decay) − (S kk)(kk·sigmoid(a))ᵀ + v k'ᵀ and y = S r, then LayerNorm(y)·g_norm.weight + g_norm.bias + Σ(r·k'·r_k)·v per head; keeps a float32 state.
    "wkv7" (5..=5) => Wkv7 {
        weight: WeightName, "module holding `k_k`, `k_a`, `r_k`, `g_norm.weight` and `g_norm.bias` [heads, head_dim]";
        heads: i64, "heads";
        head_dim: i64, "channels per head (keys and values alike)";
        eps: f64 = 64e-5, "epsilon of the per-head LayerNorm of y";
    }
}

impl Wkv7 {
    pub fn resolve(&self, scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let (h, d) = (self.heads, self.head_dim);
        if h < 1 || d < 1 {
            return Err(OpError::new(
                "heads",
                format!("{h} heads of {d}: both must be at least 1"),
            ));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(OpError::new("eps", "must be a positive number"));
        }
        expect_widths(inputs, &["r", "w", "k", "v", "a"], &[h * d; 5])?;
        let module = self.weight.under(scope);
        let norm = format!("{module}.g_norm");
        let mut weights: Vec<WeightReq> = ["k_k", "k_a", "r_k"]
            .iter()
            .map(|s| WeightReq::dense("weight", module.clone(), s, vec![h, d]))
            .collect();
        for s in ["weight", "bias"] {
            weights.push(WeightReq::dense("weight", norm.clone(), s, vec![h, d]));
        }
        Ok(Resolved {
            out: Layout::flat(h * d),
            weights,
            state: Some(StateKind::Recurrent),
        })
    }
}
