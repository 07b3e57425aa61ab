//! Recurrent mixers with a float32 state: `ssm`, the selective state-space
//! scan (SSD) of mlx-lm's `ssm_attn`, `selective_scan`, Mamba-1's scan with
//! a per-channel A matrix, and `gated_delta`, the gated delta rule of Gated
//! DeltaNet linear attention.
use super::{expect_widths, op, Layout, OpError, Resolved, StateKind, WeightName, WeightReq};

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
        weight: WeightName, "module holding `A_log` and `dt_bias` [value_heads]";
        key_heads: i64, "query/key heads";
        value_heads: i64, "value heads (a multiple of key_heads)";
        key_dim: i64, "query/key channels per head";
        value_dim: i64, "value channels per head";
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
        expect_widths(
            inputs,
            &["q", "k", "v", "a", "b"],
            &[hk * dk, hk * dk, hv * dv, hv, hv],
        )?;
        Ok(recurrent(
            hv * dv,
            self.weight.under(scope),
            &["A_log", "dt_bias"],
            hv,
        ))
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
