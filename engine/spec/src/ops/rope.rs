//! `rope`: rotary position embeddings with the scaling variants of HF
//! `rope_scaling` (default, linear, dynamic NTK, llama3, yarn, longrope,
//! proportional), traditional or half-split rotation, and partial rotary
//! (`dims` < head size).
use indexmap::IndexMap;

use super::{expect_heads, op, Layout, OpError, Positive, Resolved};
use crate::expr::Value;

op! {
    /// Rotary position embedding of per-head values [B, H, T, D].
    "rope" (1..=1) => Rope {
        dims: Option<i64> = None, "rotated features per head (default: all)";
        base: f64 = 10000.0, "rope theta";
        traditional: bool = false, "rotate interleaved pairs instead of the two halves";
        scaling: Value = Value::Null, "HF `rope_scaling` map (`type`/`rope_type` picks the variant)";
        max_position: Option<i64> = None, "max_position_embeddings (dynamic and longrope variants)";
        reverse: bool = false, "rotate the other way (negated frequencies, as nanochat's rope)";
    }
}

op! {
    /// Position-dependent scale of [B, T, D] or [B, H, T, D] values: 1 + beta · ln(1 + floor((p + shift) / period)) at position p (the llama-4 query temperature of Ministral 3 and Mistral 4; Llama 4 counts from 1).
    "position_scale" (1..=1) => PositionScale {
        beta: f64, "strength of the logarithmic growth";
        period: Positive<i64>, "positions per step of the floor (original_max_position_embeddings)";
        shift: i64 = 0, "added to each position before the floor (1: Llama 4's positions counted from 1)";
    } layout: super::norm::first
}

/// How frequencies are obtained for one rope (mlx-lm semantics).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `base` and a position scale (`1/factor` for linear).
    Base { base: f32, scale: f32 },
    /// Dynamic NTK: the base grows with the sequence length.
    Dynamic {
        base: f64,
        factor: f64,
        max_position: f64,
    },
    /// Explicit frequencies (llama3, yarn, longrope, proportional) and an
    /// input multiplier on the rotated features (yarn / longrope mscale).
    Freqs { freqs: Vec<f32>, input_scale: f32 },
}

impl Rope {
    /// Rotated features per head for the input layouts, checked.
    pub fn rotated_dims(&self, inputs: &[Layout]) -> Result<i64, OpError> {
        let (_, head_dim) = expect_heads(inputs, 0)?;
        let dims = self.dims.unwrap_or(head_dim);
        if dims <= 0 || dims > head_dim || dims % 2 != 0 {
            return Err(OpError::new(
                "dims",
                format!("{dims} rotated features do not fit a head of {head_dim} (must be even)"),
            ));
        }
        Ok(dims)
    }

    pub fn resolve(&self, _scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let dims = self.rotated_dims(inputs)?;
        self.variant(dims)?;
        Ok(Resolved::pure(inputs[0]))
    }

    /// The scaling variant for `dims` rotated features (see [`Rope::rotated_dims`]),
    /// with negated frequencies when `reverse`.
    pub fn variant(&self, dims: i64) -> Result<RopeScaling, OpError> {
        let v = self.scaling_variant(dims)?;
        if !self.reverse {
            return Ok(v);
        }
        match v {
            // angle = p · scale / f: the periods f / scale, negated.
            RopeScaling::Base { base, scale } => Ok(RopeScaling::Freqs {
                freqs: inv_powers(base as f64, dims)
                    .into_iter()
                    .map(|f| (-f / scale as f64) as f32)
                    .collect(),
                input_scale: 1.0,
            }),
            RopeScaling::Freqs { freqs, input_scale } => Ok(RopeScaling::Freqs {
                freqs: freqs.into_iter().map(|f| -f).collect(),
                input_scale,
            }),
            RopeScaling::Dynamic { .. } => Err(OpError::new(
                "reverse",
                "a reversed rope with dynamic NTK scaling is not supported",
            )),
        }
    }

    fn scaling_variant(&self, dims: i64) -> Result<RopeScaling, OpError> {
        let base = self.base;
        let map = match &self.scaling {
            Value::Null => {
                return Ok(RopeScaling::Base {
                    base: base as f32,
                    scale: 1.0,
                })
            }
            Value::Map(m) => m,
            other => {
                return Err(OpError::new(
                    "scaling",
                    format!("expected a map, got {other}"),
                ))
            }
        };
        let kind = match (map.get("type"), map.get("rope_type")) {
            (Some(Value::Str(t)), _) => t.as_str(),
            (_, Some(Value::Str(t))) => t.as_str(),
            _ => "default",
        };
        match kind {
            "default" | "mrope" => Ok(RopeScaling::Base { base: base as f32, scale: 1.0 }),
            "linear" => Ok(RopeScaling::Base {
                base: base as f32,
                scale: (1.0 / num(map, "factor", None)?) as f32,
            }),
            "dynamic" => Ok(RopeScaling::Dynamic {
                base,
                factor: num(map, "factor", None)?,
                max_position: self
                    .max_position
                    .ok_or_else(|| OpError::new("max_position", "dynamic rope needs it"))? as f64,
            }),
            "llama3" => {
                let factor = num(map, "factor", None)?;
                let low = num(map, "low_freq_factor", Some(1.0))?;
                let high = num(map, "high_freq_factor", Some(4.0))?;
                let old = num(map, "original_max_position_embeddings", Some(8192.0))?;
                let (low_wl, high_wl) = (old / low, old / high);
                let freqs = inv_powers(base, dims)
                    .into_iter()
                    .map(|f| {
                        let wl = 2.0 * std::f64::consts::PI * f;
                        let f = if wl > low_wl { f * factor } else { f };
                        if wl > high_wl && wl < low_wl {
                            let smooth = (old / wl - low) / (high - low);
                            (f / ((1.0 - smooth) / factor + smooth)) as f32
                        } else {
                            f as f32
                        }
                    })
                    .collect();
                Ok(RopeScaling::Freqs { freqs, input_scale: 1.0 })
            }
            "yarn" | "deepseek_yarn" | "telechat3-yarn" => {
                let factor = num(map, "factor", None)?;
                let orig = num(map, "original_max_position_embeddings", Some(4096.0))?;
                let beta_fast = num(map, "beta_fast", Some(32.0))?;
                let beta_slow = num(map, "beta_slow", Some(1.0))?;
                let mscale = num(map, "mscale", Some(1.0))?;
                let mscale_all = num(map, "mscale_all_dim", Some(0.0))?;
                let d = dims as f64;
                let correction = |rot: f64| d * (orig / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln());
                let lo = correction(beta_fast).floor().max(0.0);
                let mut hi = correction(beta_slow).ceil().min(d - 1.0);
                if lo == hi {
                    hi += 0.001;
                }
                let get_mscale = |m: f64| if factor <= 1.0 { 1.0 } else { 0.1 * m * factor.ln() + 1.0 };
                let freqs = inv_powers(base, dims)
                    .into_iter()
                    .enumerate()
                    .map(|(k, extra)| {
                        let ramp = ((k as f64 - lo) / (hi - lo)).clamp(0.0, 1.0);
                        let mask = 1.0 - ramp;
                        let inter = factor * extra;
                        ((inter * extra) / (inter * mask + extra * (1.0 - mask))) as f32
                    })
                    .collect();
                Ok(RopeScaling::Freqs {
                    freqs,
                    input_scale: (get_mscale(mscale) / get_mscale(mscale_all)) as f32,
                })
            }
            "longrope" | "su" => {
                let orig = num(map, "original_max_position_embeddings", None)?;
                let half = (dims / 2) as usize;
                let long = match map.get("long_factor") {
                    Some(Value::List(l)) => l.iter().filter_map(Value::as_f64).collect::<Vec<_>>(),
                    Some(v) => vec![v.as_f64().unwrap_or(1.0); half],
                    None => vec![1.0; half],
                };
                if long.len() != half {
                    return Err(OpError::new(
                        "scaling",
                        format!("long_factor has {} entries, rope needs {}", long.len(), dims / 2),
                    ));
                }
                let max_pos = self
                    .max_position
                    .ok_or_else(|| OpError::new("max_position", "longrope needs it"))? as f64;
                let factor = max_pos / orig;
                let scale = match map.get("long_mscale").and_then(Value::as_f64) {
                    Some(s) if s != 0.0 => s,
                    _ if factor <= 1.0 => 1.0,
                    _ => (1.0 + factor.ln() / orig.ln()).sqrt(),
                };
                let freqs = inv_powers(base, dims).into_iter().zip(long).map(|(f, l)| (f * l) as f32).collect();
                Ok(RopeScaling::Freqs { freqs, input_scale: scale as f32 })
            }
            "proportional" => {
                let factor = num(map, "factor", Some(1.0))?;
                let partial = num(map, "partial_rotary_factor", Some(1.0))?;
                let rotated = (dims as f64 * partial) as i64;
                let mut freqs: Vec<f32> = (0..rotated)
                    .step_by(2)
                    .map(|k| (factor * base.powf(k as f64 / dims as f64)) as f32)
                    .collect();
                freqs.resize((dims / 2) as usize, f32::INFINITY);
                Ok(RopeScaling::Freqs { freqs, input_scale: 1.0 })
            }
            other => Err(OpError::new(
                "scaling",
                format!("unsupported rope type '{other}' (known: default, linear, dynamic, llama3, yarn, longrope, proportional, mrope)"),
            )),
        }
    }
}

fn num(map: &IndexMap<String, Value>, key: &str, default: Option<f64>) -> Result<f64, OpError> {
    let bad = |msg: String| Err(OpError::new("scaling", format!("'{key}': {msg}")));
    match map.get(key) {
        None | Some(Value::Null) => {
            default.ok_or_else(|| OpError::new("scaling", format!("missing '{key}'")))
        }
        Some(v) => match v.as_f64() {
            None => bad(format!("{v} is not a number")),
            Some(x) if !x.is_finite() => bad(format!("{x} is not finite")),
            // Scale factors divide or multiply frequencies: zero or less
            // has no meaning.
            Some(x) if key.ends_with("factor") && x <= 0.0 => bad(format!("{x} is not above zero")),
            Some(x) => Ok(x),
        },
    }
}

fn inv_powers(base: f64, dims: i64) -> Vec<f64> {
    (0..dims)
        .step_by(2)
        .map(|k| base.powf(k as f64 / dims as f64))
        .collect()
}
