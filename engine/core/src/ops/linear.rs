//! `linear`: `y = x Wᵀ (+ b)`, dense or MLX affine-quantized
//! (`quantized_matmul`, as mlx-lm's `nn.QuantizedLinear`).
use std::sync::Arc;

use lmspec_spec::ops::{HeadLinear, Layout, Linear, OpError, Shard};
use mlx_rs::error::Exception;
use mlx_rs::Array;

use super::{mlx_err, Build, Ctx, Op, Param, Weights};
use crate::cpu_kernels::Activations;

impl Build for Linear {
    fn build(&self, _inputs: &[Layout], mut w: Weights) -> Result<Box<dyn Op>, OpError> {
        let bias = match w.take_opt("bias") {
            Some(Param::Dense(b)) => Some(b),
            Some(Param::Quantized { .. }) => {
                return Err(OpError::new("bias", "a bias cannot be quantized"))
            }
            None => None,
        };
        let weight = match w.take("weight")? {
            Param::Dense(w) => Param::Dense(w.t()),
            q => q,
        };
        let rotation = Rotation::take(&mut w)?;
        let batched = match &weight {
            Param::Dense(wt) => Some(wt.expand_dims(0).map_err(mlx_err("weight"))?),
            Param::Quantized { .. } => None,
        };
        let activations = crate::cpu_kernels::build_activations();
        let reduce = crate::distributed::build_group().filter(|_| self.shard == Shard::In);
        if rotation.is_some() && reduce.is_some() {
            return Err(OpError::new(
                "signs",
                "a rotated weight mixes all its input features: its input cannot be split across ranks",
            ));
        }
        let tied = match &weight {
            Param::Quantized {
                w,
                scales,
                biases,
                bits,
                ..
            } if w.ndim() == 2 && crate::cpu_kernels::enabled() => {
                crate::cpu_kernels::tied_biases(scales, biases, *bits).map_err(mlx_err("biases"))?
            }
            _ => None,
        };
        Ok(Box::new(LinearOp {
            weight,
            rotation,
            batched,
            bias,
            activations,
            tied,
            reduce,
        }))
    }
}

#[derive(Debug)]
struct LinearOp {
    /// Dense weights are kept transposed, `[in, out]`.
    weight: Param,
    /// The rotation of the input a rotated checkpoint's weight expects.
    rotation: Option<Rotation>,
    /// A dense weight as `[1, in, out]`: one sequence's `[1, T, in]` times
    /// it is one `Matmul` primitive; times the 2-D weight, MLX's `matmul`
    /// records a `Flatten` and an `Unflatten` around it as well (two of
    /// every three primitives a dense linear layer records per step).
    batched: Option<Array>,
    bias: Option<Array>,
    /// How a quantized product on the CPU treats the activations.
    activations: Activations,
    /// The multiple of its scale every bias of a quantized weight is, if
    /// one is (GGUF's Q4_0, Q5_0, Q8_0, Q3_K, Q6_K): the CPU kernel then
    /// reads no biases.
    tied: Option<f32>,
    /// The group whose ranks each hold a slice of the input features: the
    /// partial products are summed over it before the bias is added.
    reduce: Option<Arc<crate::distributed::Group>>,
}

/// Applies a loaded linear layer; shared with ops that project through one.
pub(crate) fn apply(weight: &Param, bias: Option<&Array>, x: &Array) -> Result<Array, Exception> {
    apply_with(weight, None, bias, x, Activations::Float, None)
}

fn apply_with(
    weight: &Param,
    batched: Option<&Array>,
    bias: Option<&Array>,
    x: &Array,
    activations: Activations,
    tied: Option<f32>,
) -> Result<Array, Exception> {
    match weight {
        Param::Dense(wt) => {
            if let Some(y) = dense_rows(x, wt, activations)? {
                return match bias {
                    Some(b) => mlx_rs::ops::add(&y, b),
                    None => Ok(y),
                };
            }
            match (bias, batched) {
                (Some(b), _) => mlx_rs::ops::addmm(b, x, wt, 1.0, 1.0),
                (None, Some(w3)) if x.ndim() == 3 && x.shape()[0] == 1 => {
                    mlx_rs::ops::matmul(x, w3)
                }
                (None, _) => mlx_rs::ops::matmul(x, wt),
            }
        }
        Param::Quantized {
            w,
            scales,
            biases,
            group_size,
            bits,
        } => {
            let q = Quantized {
                w,
                scales,
                biases,
                group_size: *group_size,
                bits: *bits,
                tied,
            };
            let y = quantized(x, &q, activations)?;
            match bias {
                Some(b) => mlx_rs::ops::add(&y, b),
                None => Ok(y),
            }
        }
    }
}

/// A few rows (a decode step) times a dense float32 weight through the CPU
/// kernel, one dot product per output, under int8 activations (llama.cpp's
/// numerics, not mlx-lm's: there the order of the sums is ours to choose;
/// this is how a GGUF's Q6_K tensors, held as float32, run); `None`: MLX's
/// matmul, whose results equal mlx-lm's bit for bit.
fn dense_rows(x: &Array, wt: &Array, activations: Activations) -> Result<Option<Array>, Exception> {
    use crate::cpu_kernels as cpu;
    if activations != Activations::Int8
        || !kernel_rows(input_rows(x))
        || !cpu::all_f32(&[x, wt])
        || !cpu::enabled()
    {
        return Ok(None);
    }
    // The kernel reads the weight's memory, so whether it applies depends
    // on the evaluated layout: evaluating here (once; a weight is a
    // constant) makes that the same on every call.
    wt.eval()?;
    cpu::dense_matmul(x, wt)
}

/// The rows of `x`: all its axes but the last (the input features).
fn input_rows(x: &Array) -> i64 {
    let k = x.shape().last().copied().unwrap_or(0).max(1);
    x.size() as i64 / k as i64
}

/// Whether a product of `rows` input rows takes the CPU kernel rather than
/// dequantizing the weight once and multiplying through BLAS: by the
/// forward's [`Pass`](crate::inputs::Pass) where it is marked, else by the
/// count (up to [`KERNEL_ROWS`](crate::inputs::KERNEL_ROWS)).
fn kernel_rows(rows: i64) -> bool {
    use crate::inputs::{Pass, KERNEL_ROWS};
    match crate::inputs::pass() {
        Pass::Prompt => false,
        Pass::Step => true,
        Pass::Unmarked => rows <= KERNEL_ROWS as i64,
    }
}

/// A quantized weight as one product reads it.
struct Quantized<'a> {
    w: &'a Array,
    scales: &'a Array,
    biases: &'a Array,
    group_size: i32,
    bits: i32,
    tied: Option<f32>,
}

/// `x @ dequantize(w)ᵀ`: lmspec's CPU kernels where they apply, else MLX's
/// `quantized_matmul`.
fn quantized(x: &Array, q: &Quantized<'_>, activations: Activations) -> Result<Array, Exception> {
    use crate::cpu_kernels as cpu;
    let &Quantized {
        w,
        scales,
        biases,
        group_size,
        bits,
        tied,
    } = q;
    let k = x.shape().last().copied().unwrap_or(0).max(1);
    let rows = input_rows(x);
    if cpu::supports_bits(bits) && cpu::all_f32(&[x]) && x.ndim() >= 1 && cpu::enabled() {
        // int8 activations are llama.cpp's numerics for every row count;
        // int16 ones, float32's within their tolerance, take BLAS for a
        // prompt as float32 does (faster there than the integer products).
        if activations == Activations::Int8 || kernel_rows(rows) {
            return cpu::quantized_matmul_tied(
                x,
                w,
                scales,
                biases,
                group_size,
                bits,
                activations,
                tied,
            );
        }
        let dense = cpu::dequantize(w, scales, biases, group_size, bits)?;
        return mlx_rs::ops::matmul(x, dense.t());
    }
    let mlx_group = crate::weights::QUANT_GROUP_SIZES.contains(&group_size);
    if !mlx_group || (rows > 1 && k <= SMALL_INPUT && crate::runtime::default_device() == "gpu") {
        return dequantized_product(x, w, scales, biases, group_size, bits);
    }
    mlx_rs::ops::quantized_matmul(x, w, scales, biases, true, group_size, bits)
}

/// Input features up to which a product of several rows on the GPU runs
/// dequantized: the CUDA `quantized_matmul` of MLX 0.32.2 gives wrong rows
/// for several-row inputs of 64 features at group 64 (docs/gpu.md, "Single
/// operations"; the routers of small MoE models). Real models' layers are
/// far wider, so this costs nothing there.
const SMALL_INPUT: i32 = 128;

/// `x @ dequantize(w)ᵀ` through a dense copy of the weight (how a group
/// size MLX lacks runs where the kernels do not: a traced gradient).
pub(crate) fn dequantized_product(
    x: &Array,
    w: &Array,
    scales: &Array,
    biases: &Array,
    group_size: i32,
    bits: i32,
) -> Result<Array, Exception> {
    let dense = crate::weights::dequantize(w, scales, biases, group_size, bits)?;
    mlx_rs::ops::matmul(x, dense.t())
}

impl Op for LinearOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let Some(group) = &self.reduce else {
            let rotated = match &self.rotation {
                Some(r) => Some(r.forward(inputs[0])?),
                None => None,
            };
            return apply_with(
                &self.weight,
                self.batched.as_ref(),
                self.bias.as_ref(),
                rotated.as_ref().unwrap_or(inputs[0]),
                self.activations,
                self.tied,
            );
        };
        let partial = group.all_sum(&apply_with(
            &self.weight,
            self.batched.as_ref(),
            None,
            inputs[0],
            self.activations,
            self.tied,
        )?)?;
        match &self.bias {
            Some(b) => mlx_rs::ops::add(&partial, b),
            None => Ok(partial),
        }
    }
}

/// A blockwise Hadamard rotation of the last axis, as rotated checkpoints
/// store their weights: `forward` multiplies by the signs, then transforms
/// each block of `block` features (a Walsh-Hadamard transform scaled by
/// 1/sqrt(block)); `inverse` transforms, then multiplies by the signs. Both
/// in float32, the result in the input's dtype.
#[derive(Debug)]
pub(crate) struct Rotation {
    /// `[n]`, float32.
    signs: Array,
    block: i32,
}

impl Rotation {
    /// The node's rotation, if its checkpoint stores one: the `signs`
    /// tensor laid out `[n / block, block]` (the `hadamard` weight rule).
    pub(crate) fn take(w: &mut Weights) -> Result<Option<Rotation>, OpError> {
        let signs = match w.take_opt("signs") {
            None => return Ok(None),
            Some(Param::Dense(s)) => s,
            Some(Param::Quantized { .. }) => {
                return Err(OpError::new("signs", "rotation signs cannot be quantized"))
            }
        };
        let &[_, block] = signs.shape() else {
            return Err(OpError::new(
                "signs",
                format!(
                    "signs of shape {:?}: expected them laid out [n / block, block] by the `hadamard` weight rule",
                    signs.shape()
                ),
            ));
        };
        let flat = signs
            .reshape(&[-1])
            .and_then(|s| s.as_dtype(mlx_rs::Dtype::Float32))
            .map_err(mlx_err("signs"))?;
        Ok(Some(Rotation { signs: flat, block }))
    }

    pub(crate) fn forward(&self, x: &Array) -> Result<Array, Exception> {
        self.rotate(x, false)
    }

    pub(crate) fn inverse(&self, x: &Array) -> Result<Array, Exception> {
        self.rotate(x, true)
    }

    fn rotate(&self, x: &Array, inverse: bool) -> Result<Array, Exception> {
        let shape = x.shape().to_vec();
        let mut y = x.as_dtype(mlx_rs::Dtype::Float32)?;
        if !inverse {
            y = mlx_rs::ops::multiply(&y, &self.signs)?;
        }
        let scale = (1.0 / f64::from(self.block).sqrt()) as f32;
        y = y
            .reshape(&[-1, self.block])?
            .hadamard_transform(scale)?
            .reshape(&shape)?;
        if inverse {
            y = mlx_rs::ops::multiply(&y, &self.signs)?;
        }
        y.as_dtype(x.dtype())
    }
}

/// `head_linear`: one projection per head (mlx-lm's `MultiLinear`): input
/// `[B, H or 1, T, in]`, weight `[H, out, in]` (or `[H, in, out]` with
/// `transposed: false`), output `[B, H, T, out]`.
impl Build for HeadLinear {
    fn build(&self, _inputs: &[Layout], mut w: Weights) -> Result<Box<dyn Op>, OpError> {
        // A quantized per-head weight is dequantized once, here.
        let weight = w.take("weight")?.dense().map_err(mlx_err("weight"))?;
        // [H, out] -> [H, 1, out] against [B, H, T, out].
        let bias = match w.dense_opt("bias")? {
            Some(b) => {
                let s = b.shape().to_vec();
                Some(b.reshape(&[s[0], 1, s[1]]).map_err(mlx_err("bias"))?)
            }
            None => None,
        };
        let w = match self.transposed {
            true => weight.swap_axes(-1, -2).map_err(mlx_err("weight"))?,
            false => weight,
        };
        Ok(Box::new(HeadLinearOp { w, bias }))
    }
}

#[derive(Debug)]
struct HeadLinearOp {
    w: Array,
    bias: Option<Array>,
}

impl Op for HeadLinearOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let y = mlx_rs::ops::matmul(inputs[0], &self.w)?;
        match &self.bias {
            Some(b) => mlx_rs::ops::add(&y, b),
            None => Ok(y),
        }
    }
}
