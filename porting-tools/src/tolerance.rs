//! Tolerance levels for comparing engine tensors with golden tensors, and
//! the comparison statistics. The levels are defined here and nowhere else.
use mlx_rs::error::Exception;
use mlx_rs::{Array, Dtype};

/// How close two tensors must be.
///
/// Errors are measured relative to the reference's largest magnitude
/// (`max |a - b| / max |b|`), so a level means the same for logits of any
/// scale. Why these numbers:
/// - `F32`: the engine runs the same MLX kernels as mlx-lm on the same
///   libmlx, so in float32 the only differences come from evaluation order
///   (e.g. how a graph is fused or split into prefill chunks); those stay
///   near float32 epsilon (1.2e-7) times a few accumulations per layer.
///   1e-4 leaves three orders of magnitude of margin yet fails on any real
///   bug (a wrong rope base or a swapped norm moves logits by >1e-2).
/// - `Bf16` / `F16`: half-precision rounding (eps 7.8e-3 / 9.8e-4) compounds
///   over layers.
/// - `Quantized`: quantized matmuls accumulate in a different order across
///   kernels; still float32 accumulation, so 1e-3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tolerance {
    Exact,
    F32,
    F16,
    Bf16,
    Quantized,
}

impl Tolerance {
    /// Largest allowed `max |a - b| / max |b|`.
    pub fn max_rel(self) -> f64 {
        match self {
            Tolerance::Exact => 0.0,
            Tolerance::F32 => 1e-4,
            Tolerance::F16 => 1e-2,
            Tolerance::Bf16 => 5e-2,
            Tolerance::Quantized => 1e-3,
        }
    }

    /// Smallest allowed cosine similarity.
    pub fn min_cosine(self) -> f64 {
        match self {
            Tolerance::Exact => 1.0,
            Tolerance::F32 => 0.999_999,
            Tolerance::F16 => 0.9999,
            Tolerance::Bf16 => 0.999,
            Tolerance::Quantized => 0.99999,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Tolerance::Exact => "exact",
            Tolerance::F32 => "f32",
            Tolerance::F16 => "f16",
            Tolerance::Bf16 => "bf16",
            Tolerance::Quantized => "quantized",
        }
    }
}

/// How two tensors differ.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub max_abs: f64,
    /// `max |b|` of the reference.
    pub ref_max: f64,
    /// Normalised mean squared error: `sum (a-b)^2 / sum b^2`.
    pub nmse: f64,
    pub cosine: f64,
}

impl Stats {
    pub fn max_rel(&self) -> f64 {
        if self.ref_max == 0.0 {
            self.max_abs
        } else {
            self.max_abs / self.ref_max
        }
    }

    pub fn within(&self, tol: Tolerance) -> bool {
        self.max_rel() <= tol.max_rel() && (self.cosine >= tol.min_cosine() || self.max_abs == 0.0)
    }
}

fn host(a: &Array) -> Result<Vec<f32>, Exception> {
    // Values may be views (parts of a fused projection): copy them dense.
    let a = a.as_dtype(Dtype::Float32)?.contiguous()?;
    a.eval()?;
    Ok(a.as_slice::<f32>().to_vec())
}

/// Compares `a` (engine) with `b` (reference); shapes must match.
pub fn compare(a: &Array, b: &Array) -> Result<Stats, String> {
    if a.shape() != b.shape() {
        return Err(format!(
            "shape {:?} vs reference {:?}",
            a.shape(),
            b.shape()
        ));
    }
    let (x, y) = (
        host(a).map_err(|e| e.to_string())?,
        host(b).map_err(|e| e.to_string())?,
    );
    let (mut max_abs, mut ref_max, mut err2, mut ref2, mut dot, mut a2) =
        (0f64, 0f64, 0f64, 0f64, 0f64, 0f64);
    for (p, q) in x.iter().zip(&y) {
        let (p, q) = (*p as f64, *q as f64);
        let d = (p - q).abs();
        if d.is_nan() || d > max_abs {
            max_abs = if d.is_nan() { f64::INFINITY } else { d };
        }
        ref_max = ref_max.max(q.abs());
        err2 += (p - q) * (p - q);
        ref2 += q * q;
        dot += p * q;
        a2 += p * p;
    }
    let nmse = if ref2 == 0.0 { err2 } else { err2 / ref2 };
    let cosine = if a2 == 0.0 || ref2 == 0.0 {
        if a2 == ref2 {
            1.0
        } else {
            0.0
        }
    } else {
        dot / (a2.sqrt() * ref2.sqrt())
    };
    Ok(Stats {
        max_abs,
        ref_max,
        nmse,
        cosine,
    })
}
