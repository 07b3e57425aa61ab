//! Elementwise ops: `add`, `mul`, `scale`, `softcap`, `mask_tokens`,
//! `activation` and the gated `glu`.
use lmspec_spec::ops::{
    Act, Activation, Add, Clamp, Glu, Layout, MaskTokens, Mul, OpError, Scale, Softcap,
};
use mlx_rs::error::Exception;
use mlx_rs::Array;

use super::{Ctx, Op};

impl Op for Add {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let mut acc = mlx_rs::ops::add(inputs[0], inputs[1])?;
        for x in &inputs[2..] {
            acc = mlx_rs::ops::add(&acc, x)?;
        }
        Ok(acc)
    }
}

impl Op for Mul {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        mlx_rs::ops::multiply(inputs[0], inputs[1])
    }
}

impl Op for Scale {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let f = Array::from_f32(self.factor as f32).as_dtype(inputs[0].dtype())?;
        mlx_rs::ops::multiply(inputs[0], &f)
    }
}

impl Op for Softcap {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        soft_cap(inputs[0], self.cap as f32)
    }
}

/// `mask_tokens`: the indices inside the input's last axis, checked once.
pub(crate) fn build_mask_tokens(c: &MaskTokens, inputs: &[Layout]) -> Result<Box<dyn Op>, OpError> {
    let width = inputs.first().map_or(0, |l| l.dim);
    let ids = c.ids_below(width)?;
    let mut hit = vec![false; width.max(0) as usize];
    for &i in &ids {
        hit[i as usize] = true;
    }
    Ok(Box::new(MaskTokensOp {
        hit: (!ids.is_empty()).then(|| Array::from_slice(&hit, &[width as i32])),
    }))
}

/// A built `mask_tokens`: true at the indices to set to -inf (none: the
/// identity).
#[derive(Debug)]
struct MaskTokensOp {
    hit: Option<Array>,
}

impl Op for MaskTokensOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let x = inputs[0];
        let Some(hit) = &self.hit else {
            return Ok(x.clone());
        };
        let inf = Array::from_f32(f32::NEG_INFINITY).as_dtype(x.dtype())?;
        mlx_rs::ops::select(hit, &inf, x)
    }
}

/// `cap · tanh(x / cap)` in `x`'s dtype.
pub(crate) fn soft_cap(x: &Array, cap: f32) -> Result<Array, Exception> {
    let c = Array::from_f32(cap).as_dtype(x.dtype())?;
    mlx_rs::ops::multiply(mlx_rs::ops::tanh(mlx_rs::ops::divide(x, &c)?)?, &c)
}

/// Applies an activation function.
pub(crate) fn activate(act: Act, x: &Array) -> Result<Array, Exception> {
    match act {
        Act::Silu | Act::Gelu | Act::GeluApprox | Act::GeluFast => compiled_act(act, x),
        // x · sigmoid(1.702 x): CLIP's QuickGELU, mlx's `gelu_fast_approx`
        // (mlx-rs's `gelu_fast_approximate` uses 1.773).
        Act::QuickGelu => {
            let k = Array::from_f32(1.702).as_dtype(x.dtype())?;
            mlx_rs::ops::multiply(x, mlx_rs::ops::sigmoid(mlx_rs::ops::multiply(x, &k)?)?)
        }
        Act::Relu => mlx_rs::nn::relu(x),
        Act::Relu2 => mlx_rs::ops::square(mlx_rs::nn::relu(x)?),
        Act::Sigmoid => mlx_rs::ops::sigmoid(x),
        Act::Tanh => mlx_rs::ops::tanh(x),
        Act::Softplus => mlx_rs::nn::softplus(x),
    }
}

impl Op for Activation {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        activate(self.r#fn, inputs[0])
    }
}

/// Builds a `glu` node. A tanh-GELU gate takes, under int8 activations
/// (llama.cpp's numerics), llama.cpp's float16-table GELU (as its `geglu`);
/// under int16 ones (float32's within a tolerance), the vectorized sigmoid
/// form of the same function.
pub(crate) fn build_glu(c: &Glu) -> Box<dyn Op> {
    use crate::cpu_kernels::Activations;
    if c.r#fn == Act::GeluApprox && c.limit.is_none() && c.glu == lmspec_spec::ops::ExpertGlu::Plain
    {
        match crate::cpu_kernels::build_activations() {
            Activations::Int8 => return Box::new(GegluKernel(Activations::Int8)),
            Activations::Int16 => return Box::new(GegluKernel(Activations::Int16)),
            Activations::Float => {}
        }
    }
    Box::new(c.clone())
}

/// `gelu(gate) * up` with the GELU of these activations (see `build_glu`)
/// where lmspec's CPU kernels run, else the tanh approximation in float32.
#[derive(Debug)]
struct GegluKernel(crate::cpu_kernels::Activations);

impl Op for GegluKernel {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        use crate::cpu_kernels::{self as cpu, Activations};
        let (gate, up) = (inputs[0], inputs[1]);
        if cpu_glu(gate, up) {
            return match self.0 {
                Activations::Int8 => cpu::geglu_f16(gate, up),
                _ => cpu::geglu_sigmoid(gate, up),
            };
        }
        mlx_rs::ops::multiply(activate(Act::GeluApprox, gate)?, up)
    }
}

impl Op for Glu {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        if self.glu == lmspec_spec::ops::ExpertGlu::Oai {
            let limit = self.limit.map(|l| l.0 as f32);
            return super::moe::oai_glu(inputs[0], inputs[1], limit);
        }
        match (self.r#fn, self.limit) {
            (act, Some(l)) => super::moe::clamped_glu(act, inputs[0], inputs[1], Some(l.0 as f32)),
            // One fused kernel, as mlx-lm's compiled `swiglu`.
            (Act::Silu, None) => swiglu(inputs[0], inputs[1]),
            // MLX's GELU bit for bit, on the CPU kernels' threads.
            (Act::GeluApprox, None) if cpu_glu(inputs[0], inputs[1]) => {
                crate::cpu_kernels::geglu_tanh(inputs[0], inputs[1])
            }
            (act, None) => mlx_rs::ops::multiply(activate(act, inputs[0])?, inputs[1]),
        }
    }
}

/// Whether the CPU kernels take this gate and up projection (float32, one
/// shape, the kernels on): their `glu` kernels.
fn cpu_glu(gate: &Array, up: &Array) -> bool {
    use crate::cpu_kernels as cpu;
    cpu::enabled() && cpu::all_f32(&[gate, up]) && gate.shape() == up.shape()
}

/// SiLU and the GELUs, compiled shapeless once per thread with mlx-rs's
/// formulas. mlx-rs's own `nn` functions build a new compiled closure on
/// every call, which MLX traces and compiles anew each time (a fresh
/// closure is a fresh function id to its cache): on a small GELU model that was
/// a fifth of a CPU decode step.
fn compiled_act(act: Act, x: &Array) -> Result<Array, Exception> {
    use mlx_rs::ops::{add, divide, erf, multiply, power, sigmoid, sqrt, tanh};
    type Unary = Box<dyn FnMut(&Array) -> Result<Array, Exception>>;
    type Formula = fn(&Array) -> Result<Array, Exception>;
    fn silu(x: &Array) -> Result<Array, Exception> {
        multiply(x, sigmoid(x)?)
    }
    fn gelu(x: &Array) -> Result<Array, Exception> {
        let inner = erf(divide(x, Array::from_f32(2f32.sqrt()))?)?;
        divide(
            multiply(x, add(Array::from_int(1), inner)?)?,
            Array::from_f32(2.0),
        )
    }
    fn gelu_approx(x: &Array) -> Result<Array, Exception> {
        let cube = multiply(Array::from_f32(0.044715), power(x, Array::from_int(3))?)?;
        let c = sqrt(Array::from_f32(2.0 / std::f32::consts::PI))?;
        let t = tanh(multiply(&c, add(x, cube)?)?)?;
        multiply(
            multiply(Array::from_f32(0.5), x)?,
            add(Array::from_f32(1.0), t)?,
        )
    }
    fn gelu_fast(x: &Array) -> Result<Array, Exception> {
        multiply(x, sigmoid(multiply(Array::from_f32(1.773), x)?)?)
    }
    let (slot, f): (usize, Formula) = match act {
        Act::Silu => (0, silu),
        Act::Gelu => (1, gelu),
        Act::GeluApprox => (2, gelu_approx),
        _ => (3, gelu_fast),
    };
    // Compiled closures hold MLX handles (not `Send`): one set per thread.
    thread_local! {
        static COMPILED: std::cell::RefCell<[Option<Unary>; 4]> =
            const { std::cell::RefCell::new([None, None, None, None]) };
    }
    COMPILED.with_borrow_mut(|c| {
        let call =
            c[slot].get_or_insert_with(|| Box::new(mlx_rs::transforms::compile::compile(f, true)));
        call(x)
    })
}

/// `silu(gate) * up`: lmspec's CPU kernel where it applies (float32 on the
/// CPU), else compiled shapeless so MLX fuses it. One compiled
/// function serves every call: MLX caches a compiled graph by the
/// function's id, and each new compiled closure gets a fresh id, so a
/// closure made per call would be traced and compiled again every time.
fn swiglu(gate: &Array, up: &Array) -> Result<Array, Exception> {
    if cpu_glu(gate, up) {
        return crate::cpu_kernels::swiglu(gate, up);
    }
    type Swiglu = Box<dyn for<'a> FnMut((&'a Array, &'a Array)) -> Result<Array, Exception>>;
    fn f((g, u): (&Array, &Array)) -> Result<Array, Exception> {
        mlx_rs::ops::multiply(mlx_rs::ops::multiply(g, mlx_rs::ops::sigmoid(g)?)?, u)
    }
    // The compiled closure is not `Send` (it holds MLX handles), so each
    // thread keeps its own.
    thread_local! {
        static COMPILED: std::cell::RefCell<Option<Swiglu>> = const { std::cell::RefCell::new(None) };
    }
    COMPILED.with_borrow_mut(|slot| {
        let call =
            slot.get_or_insert_with(|| Box::new(mlx_rs::transforms::compile::compile(f, true)));
        call((gate, up))
    })
}

impl Op for Clamp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let x = inputs[0];
        let bound = |b: f64| Array::from_f32(b as f32).as_dtype(x.dtype());
        let low = match self.min {
            Some(lo) => mlx_rs::ops::maximum(x, bound(lo)?)?,
            None => x.clone(),
        };
        match self.max {
            Some(hi) => mlx_rs::ops::minimum(&low, bound(hi)?),
            None => Ok(low),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_tanh_geglu_is_mlx_bit_for_bit() {
        assert!(crate::cpu_kernels::enabled(), "tests run on the CPU");
        // Gates across the GELU's range, tiny ones among them.
        let n = 1 << 16;
        let gates: Vec<f32> = (0..n)
            .map(|i| {
                let t = (i as f32 / n as f32) * 24.0 - 12.0;
                if i % 3 == 0 {
                    t * 1e-3
                } else {
                    t
                }
            })
            .collect();
        let ups: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0)
            .collect();
        let gate = Array::from_slice(&gates, &[4, n / 4]);
        let up = Array::from_slice(&ups, &[4, n / 4]);
        let ours = crate::cpu_kernels::geglu_tanh(&gate, &up).expect("kernel");
        let mlx = mlx_rs::ops::multiply(compiled_act(Act::GeluApprox, &gate).expect("gelu"), &up)
            .expect("mlx");
        ours.eval().expect("eval");
        mlx.eval().expect("eval");
        let (ours, mlx) = (ours.as_slice::<f32>(), mlx.as_slice::<f32>());
        let differ = ours
            .iter()
            .zip(mlx)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(differ, 0, "{differ} of {n} values differ from MLX's");
    }
}
