//! `rope`: rotary position embeddings through `fast::rope`, with the scaling
//! variants of HF `rope_scaling` (default, linear, dynamic NTK, llama3, yarn,
//! longrope, proportional), traditional or half-split rotation, and partial
//! rotary (`dims` < head size). Positions start at the cache offset.
use mlx_rs::error::Exception;
use mlx_rs::Array;

use super::{
    expect_heads, Ctx, Op, OpError, OpKind, Param, ParamDef, ParamKind, Params, Resolved, ValueInfo,
};
use crate::spec::config::Ty;
use crate::spec::expr::Value;

#[derive(Debug)]
pub struct Rope;

static PARAMS: &[ParamDef] = &[
    ParamDef {
        name: "dims",
        kind: ParamKind::Expr(Ty::Int),
        default: Some("null"),
        doc: "rotated features per head (default: all)",
    },
    ParamDef {
        name: "base",
        kind: ParamKind::Expr(Ty::Float),
        default: Some("10000.0"),
        doc: "rope theta",
    },
    ParamDef {
        name: "traditional",
        kind: ParamKind::Expr(Ty::Bool),
        default: Some("false"),
        doc: "rotate interleaved pairs instead of the two halves",
    },
    ParamDef {
        name: "scaling",
        kind: ParamKind::Expr(Ty::Any),
        default: Some("null"),
        doc: "HF `rope_scaling` map (`type`/`rope_type` picks the variant)",
    },
    ParamDef {
        name: "max_position",
        kind: ParamKind::Expr(Ty::Int),
        default: Some("null"),
        doc: "max_position_embeddings (dynamic and longrope variants)",
    },
];

/// How frequencies are obtained for one rope.
#[derive(Debug, Clone)]
pub enum Variant {
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

fn num(
    map: &indexmap::IndexMap<String, Value>,
    key: &str,
    default: Option<f64>,
) -> Result<f64, OpError> {
    match map.get(key).and_then(Value::as_f64) {
        Some(v) => Ok(v),
        None => default.ok_or_else(|| OpError::new("scaling", format!("missing '{key}'"))),
    }
}

fn inv_powers(base: f64, dims: i64) -> Vec<f64> {
    (0..dims)
        .step_by(2)
        .map(|k| base.powf(k as f64 / dims as f64))
        .collect()
}

/// Works out the variant from the rope parameters (mlx-lm semantics).
pub fn variant(
    dims: i64,
    base: f64,
    scaling: &Value,
    max_position: Option<i64>,
) -> Result<Variant, OpError> {
    let map = match scaling {
        Value::Null => {
            return Ok(Variant::Base {
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
        "default" | "mrope" => Ok(Variant::Base { base: base as f32, scale: 1.0 }),
        "linear" => Ok(Variant::Base {
            base: base as f32,
            scale: (1.0 / num(map, "factor", None)?) as f32,
        }),
        "dynamic" => Ok(Variant::Dynamic {
            base,
            factor: num(map, "factor", None)?,
            max_position: max_position
                .ok_or_else(|| OpError::new("max_position", "dynamic rope needs it"))?
                as f64,
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
            Ok(Variant::Freqs { freqs, input_scale: 1.0 })
        }
        "yarn" | "deepseek_yarn" | "telechat3-yarn" => {
            let factor = num(map, "factor", None)?;
            let orig = num(map, "original_max_position_embeddings", Some(4096.0))?;
            let beta_fast = num(map, "beta_fast", Some(32.0))?;
            let beta_slow = num(map, "beta_slow", Some(1.0))?;
            let mscale = num(map, "mscale", Some(1.0))?;
            let mscale_all = num(map, "mscale_all_dim", Some(0.0))?;
            let d = dims as f64;
            let correction =
                |rot: f64| d * (orig / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln());
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
            Ok(Variant::Freqs {
                freqs,
                input_scale: (get_mscale(mscale) / get_mscale(mscale_all)) as f32,
            })
        }
        "longrope" | "su" => {
            let orig = num(map, "original_max_position_embeddings", None)?;
            let long = match map.get("long_factor") {
                Some(Value::List(l)) => l.iter().filter_map(Value::as_f64).collect::<Vec<_>>(),
                Some(v) => vec![v.as_f64().unwrap_or(1.0); (dims / 2) as usize],
                None => vec![1.0; (dims / 2) as usize],
            };
            if long.len() != (dims / 2) as usize {
                return Err(OpError::new(
                    "scaling",
                    format!("long_factor has {} entries, rope needs {}", long.len(), dims / 2),
                ));
            }
            let max_pos = max_position
                .ok_or_else(|| OpError::new("max_position", "longrope needs it"))?
                as f64;
            let factor = max_pos / orig;
            let scale = match map.get("long_mscale").and_then(Value::as_f64) {
                Some(s) if s != 0.0 => s,
                _ if factor <= 1.0 => 1.0,
                _ => (1.0 + factor.ln() / orig.ln()).sqrt(),
            };
            let freqs = inv_powers(base, dims)
                .into_iter()
                .zip(long)
                .map(|(f, l)| (f * l) as f32)
                .collect();
            Ok(Variant::Freqs { freqs, input_scale: scale as f32 })
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
            Ok(Variant::Freqs { freqs, input_scale: 1.0 })
        }
        other => Err(OpError::new(
            "scaling",
            format!("unsupported rope type '{other}' (known: default, linear, dynamic, llama3, yarn, longrope, proportional, mrope)"),
        )),
    }
}

impl OpKind for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }
    fn doc(&self) -> &'static str {
        "Rotary position embedding of per-head values [B, H, T, D]."
    }
    fn params(&self) -> &'static [ParamDef] {
        PARAMS
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn resolve(&self, p: &Params, _s: &str, inputs: &[ValueInfo]) -> Result<Resolved, OpError> {
        let (_, head_dim) = expect_heads(inputs, 0)?;
        let dims = p.opt_int("dims")?.unwrap_or(head_dim);
        if dims <= 0 || dims > head_dim || dims % 2 != 0 {
            return Err(OpError::new(
                "dims",
                format!("{dims} rotated features do not fit a head of {head_dim} (must be even)"),
            ));
        }
        variant(
            dims,
            p.float("base")?,
            p.value("scaling")?,
            p.opt_int("max_position")?,
        )?;
        Ok(Resolved::pure(inputs[0]))
    }
    fn build(
        &self,
        p: &Params,
        inputs: &[ValueInfo],
        _w: Vec<Param>,
    ) -> Result<Box<dyn Op>, OpError> {
        let (_, head_dim) = expect_heads(inputs, 0)?;
        let dims = p.opt_int("dims")?.unwrap_or(head_dim);
        let v = variant(
            dims,
            p.float("base")?,
            p.value("scaling")?,
            p.opt_int("max_position")?,
        )?;
        let freqs = match &v {
            Variant::Freqs { freqs, .. } => Some(Array::from_slice(freqs, &[freqs.len() as i32])),
            _ => None,
        };
        Ok(Box::new(RopeOp {
            dims: dims as i32,
            traditional: p.bool("traditional")?,
            variant: v,
            freqs,
        }))
    }
}

#[derive(Debug)]
struct RopeOp {
    dims: i32,
    traditional: bool,
    variant: Variant,
    freqs: Option<Array>,
}

impl Op for RopeOp {
    fn forward(&self, inputs: &[&Array], ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let (x, dims, offset) = (inputs[0], self.dims, ctx.offset);
        match &self.variant {
            Variant::Base { base, scale } => {
                mlx_rs::fast::rope(x, dims, self.traditional, *base, *scale, offset, None)
            }
            Variant::Dynamic {
                base,
                factor,
                max_position,
            } => {
                let t = x.shape()[x.ndim() - 2] as f64;
                let seq = (t + offset as f64).max(*max_position);
                let d = dims as f64;
                let b = base * ((factor * seq / max_position) - (factor - 1.0)).powf(d / (d - 2.0));
                mlx_rs::fast::rope(x, dims, self.traditional, b as f32, 1.0, offset, None)
            }
            Variant::Freqs { input_scale, .. } => {
                let scaled;
                let x = if *input_scale != 1.0 {
                    scaled = scale_leading(x, dims, *input_scale)?;
                    &scaled
                } else {
                    x
                };
                mlx_rs::fast::rope(
                    x,
                    dims,
                    self.traditional,
                    None,
                    1.0,
                    offset,
                    self.freqs.as_ref(),
                )
            }
        }
    }
}

/// Multiplies the first `dims` features of the last axis by `s`.
fn scale_leading(x: &Array, dims: i32, s: f32) -> Result<Array, Exception> {
    let width = *x.shape().last().unwrap_or(&0);
    let s = Array::from_f32(s).as_dtype(x.dtype())?;
    if dims >= width {
        return mlx_rs::ops::multiply(x, &s);
    }
    let parts = x.split_at_indices(&[dims], -1)?;
    let head = mlx_rs::ops::multiply(&parts[0], &s)?;
    mlx_rs::ops::concatenate(&[&head, &parts[1]], -1)
}
