//! `rope`: rotary position embeddings through `fast::rope`, with the scaling
//! variants of HF `rope_scaling` (default, linear, dynamic NTK, llama3, yarn,
//! longrope, proportional), traditional or half-split rotation, and partial
//! rotary (`dims` < head size). Positions start at the cache offset.
use lmspec_spec::ops::{Layout, OpError, PositionScale, Rope, RopeScaling};
use mlx_rs::error::Exception;
use mlx_rs::Array;

use super::{Build, Ctx, Op, Weights};

impl Build for Rope {
    fn build(&self, inputs: &[Layout], _w: Weights) -> Result<Box<dyn Op>, OpError> {
        let dims = self.rotated_dims(inputs)?;
        let v = self.variant(dims)?;
        let freqs = match &v {
            RopeScaling::Freqs { freqs, .. } => {
                Some(Array::from_slice(freqs, &[freqs.len() as i32]))
            }
            _ => None,
        };
        Ok(Box::new(RopeOp {
            dims: dims as i32,
            traditional: self.traditional,
            variant: v,
            freqs,
        }))
    }
}

#[derive(Debug)]
struct RopeOp {
    dims: i32,
    traditional: bool,
    variant: RopeScaling,
    freqs: Option<Array>,
}

impl Op for RopeOp {
    fn forward(&self, inputs: &[&Array], ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let (x, dims) = (inputs[0], self.dims);
        let at = |x: &Array, base: Option<f32>, scale: f32, freqs: Option<&Array>| {
            use crate::cpu_kernels as cpu;
            // The CPU kernel, for one offset or a batch's per-row ones, so
            // a sequence's values are the same batched or alone.
            if x.ndim() == 4 && cpu::all_f32(&[x]) && cpu::enabled() {
                let offsets = match ctx.positions {
                    Some(p) => p.host.as_slice(),
                    None => std::slice::from_ref(&ctx.offset),
                };
                return cpu::rope(x, dims, self.traditional, base, scale, offsets, freqs);
            }
            match ctx.positions {
                Some(p) => mlx_rs::fast::rope_dynamic(
                    x,
                    dims,
                    self.traditional,
                    base,
                    scale,
                    &p.array,
                    freqs,
                ),
                None => {
                    mlx_rs::fast::rope(x, dims, self.traditional, base, scale, ctx.offset, freqs)
                }
            }
        };
        match &self.variant {
            RopeScaling::Base { base, scale } => at(x, Some(*base), *scale, None),
            RopeScaling::Dynamic {
                base,
                factor,
                max_position,
            } => {
                if ctx.positions.is_some() {
                    return Err(Exception::custom(
                        "dynamic NTK RoPE scales by sequence length: sequences at different positions cannot share a batch",
                    ));
                }
                let t = x.shape()[x.ndim() - 2] as f64;
                let seq = (t + ctx.offset as f64).max(*max_position);
                let d = dims as f64;
                let b = base * ((factor * seq / max_position) - (factor - 1.0)).powf(d / (d - 2.0));
                at(x, Some(b as f32), 1.0, None)
            }
            RopeScaling::Freqs { input_scale, .. } => {
                let scaled;
                let x = if *input_scale != 1.0 {
                    scaled = scale_leading(x, dims, *input_scale)?;
                    &scaled
                } else {
                    x
                };
                at(x, None, 1.0, self.freqs.as_ref())
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

impl Op for PositionScale {
    fn forward(&self, inputs: &[&Array], ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let x = inputs[0];
        let nd = x.ndim();
        let t = x.shape()[nd - 2];
        let (beta, period, shift) = (self.beta, self.period.0 as f64, self.shift);
        // Padding in front of a batch row sits at negative positions: scale 1.
        let factor = |p: i64| {
            (1.0 + beta * (1.0 + ((p.max(0) + shift).max(0) as f64 / period).floor()).ln()) as f32
        };
        let starts: Vec<i64> = match ctx.positions {
            Some(p) => p.host.iter().map(|&o| o as i64).collect(),
            None => vec![ctx.offset as i64],
        };
        let rows = starts.len() as i32;
        let values: Vec<f32> = starts
            .iter()
            .flat_map(|&o| (0..t as i64).map(move |k| factor(o + k)))
            .collect();
        // [rows, T] -> broadcast against [B, T, D] or [B, H, T, D].
        let shape: Vec<i32> = if nd == 4 {
            vec![rows, 1, t, 1]
        } else {
            vec![rows, t, 1]
        };
        let scale = Array::from_slice(&values, &shape).as_dtype(x.dtype())?;
        mlx_rs::ops::multiply(x, &scale)
    }
}
