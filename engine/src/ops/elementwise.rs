//! Elementwise ops: `add`, `mul`, `scale`, `softcap`, `activation` and the
//! gated `glu`.
use mlx_rs::error::Exception;
use mlx_rs::Array;

use super::{Ctx, Op, OpError, OpKind, Param, ParamDef, ParamKind, Params, Resolved, ValueInfo};
use crate::spec::config::Ty;

/// The common layout of elementwise inputs; an input whose last axis has
/// size 1 (a per-token gate) broadcasts against the others.
fn same_layout(inputs: &[ValueInfo]) -> Result<ValueInfo, OpError> {
    let widest = inputs
        .iter()
        .copied()
        .max_by_key(|v| v.dim)
        .unwrap_or(inputs[0]);
    for (k, v) in inputs.iter().enumerate() {
        let broadcasts = v.dim == 1 && v.heads == widest.heads;
        if *v != widest && !broadcasts {
            return Err(OpError::new(
                "in",
                format!("input {k} has layout {v:?}, another input has {widest:?}"),
            ));
        }
    }
    Ok(widest)
}

#[derive(Debug)]
pub struct Add;

impl OpKind for Add {
    fn name(&self) -> &'static str {
        "add"
    }
    fn doc(&self) -> &'static str {
        "Sum of its inputs (residual connections)."
    }
    fn params(&self) -> &'static [ParamDef] {
        &[]
    }
    fn arity(&self) -> (usize, usize) {
        (2, 8)
    }
    fn resolve(&self, _p: &Params, _s: &str, inputs: &[ValueInfo]) -> Result<Resolved, OpError> {
        same_layout(inputs).map(Resolved::pure)
    }
    fn build(
        &self,
        _p: &Params,
        _inputs: &[ValueInfo],
        _w: Vec<Param>,
    ) -> Result<Box<dyn Op>, OpError> {
        Ok(Box::new(AddOp))
    }
}

#[derive(Debug)]
struct AddOp;

impl Op for AddOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let mut acc = mlx_rs::ops::add(inputs[0], inputs[1])?;
        for x in &inputs[2..] {
            acc = mlx_rs::ops::add(&acc, x)?;
        }
        Ok(acc)
    }
}

#[derive(Debug)]
pub struct Mul;

impl OpKind for Mul {
    fn name(&self) -> &'static str {
        "mul"
    }
    fn doc(&self) -> &'static str {
        "Elementwise product of two inputs."
    }
    fn params(&self) -> &'static [ParamDef] {
        &[]
    }
    fn arity(&self) -> (usize, usize) {
        (2, 2)
    }
    fn resolve(&self, _p: &Params, _s: &str, inputs: &[ValueInfo]) -> Result<Resolved, OpError> {
        same_layout(inputs).map(Resolved::pure)
    }
    fn build(
        &self,
        _p: &Params,
        _inputs: &[ValueInfo],
        _w: Vec<Param>,
    ) -> Result<Box<dyn Op>, OpError> {
        Ok(Box::new(MulOp))
    }
}

#[derive(Debug)]
struct MulOp;

impl Op for MulOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        mlx_rs::ops::multiply(inputs[0], inputs[1])
    }
}

#[derive(Debug)]
pub struct Scale;

static SCALE_PARAMS: &[ParamDef] = &[ParamDef {
    name: "factor",
    kind: ParamKind::Expr(Ty::Float),
    default: None,
    doc: "constant multiplier",
}];

impl OpKind for Scale {
    fn name(&self) -> &'static str {
        "scale"
    }
    fn doc(&self) -> &'static str {
        "Multiplies by a constant (embedding scales, residual multipliers)."
    }
    fn params(&self) -> &'static [ParamDef] {
        SCALE_PARAMS
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn resolve(&self, _p: &Params, _s: &str, inputs: &[ValueInfo]) -> Result<Resolved, OpError> {
        Ok(Resolved::pure(inputs[0]))
    }
    fn build(
        &self,
        p: &Params,
        _inputs: &[ValueInfo],
        _w: Vec<Param>,
    ) -> Result<Box<dyn Op>, OpError> {
        Ok(Box::new(ScaleOp {
            factor: p.float("factor")? as f32,
        }))
    }
}

#[derive(Debug)]
struct ScaleOp {
    factor: f32,
}

impl Op for ScaleOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let f = Array::from_f32(self.factor).as_dtype(inputs[0].dtype())?;
        mlx_rs::ops::multiply(inputs[0], &f)
    }
}

#[derive(Debug)]
pub struct Softcap;

static SOFTCAP_PARAMS: &[ParamDef] = &[ParamDef {
    name: "cap",
    kind: ParamKind::Expr(Ty::Float),
    default: None,
    doc: "the bound c of c·tanh(x / c)",
}];

impl OpKind for Softcap {
    fn name(&self) -> &'static str {
        "softcap"
    }
    fn doc(&self) -> &'static str {
        "Soft-caps values into (-cap, cap): cap · tanh(x / cap) (final logit capping)."
    }
    fn params(&self) -> &'static [ParamDef] {
        SOFTCAP_PARAMS
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn resolve(&self, p: &Params, _s: &str, inputs: &[ValueInfo]) -> Result<Resolved, OpError> {
        let cap = p.float("cap")?;
        if cap <= 0.0 {
            return Err(OpError::new("cap", format!("{cap} is not a positive cap")));
        }
        Ok(Resolved::pure(inputs[0]))
    }
    fn build(
        &self,
        p: &Params,
        _inputs: &[ValueInfo],
        _w: Vec<Param>,
    ) -> Result<Box<dyn Op>, OpError> {
        Ok(Box::new(SoftcapOp {
            cap: p.float("cap")? as f32,
        }))
    }
}

#[derive(Debug)]
struct SoftcapOp {
    cap: f32,
}

impl Op for SoftcapOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        soft_cap(inputs[0], self.cap)
    }
}

/// `cap · tanh(x / cap)` in `x`'s dtype.
pub(crate) fn soft_cap(x: &Array, cap: f32) -> Result<Array, Exception> {
    let c = Array::from_f32(cap).as_dtype(x.dtype())?;
    mlx_rs::ops::multiply(mlx_rs::ops::tanh(mlx_rs::ops::divide(x, &c)?)?, &c)
}

/// Activation functions by spec name.
pub(crate) const ACTIVATIONS: &[&str] = &[
    "silu",
    "gelu",
    "gelu_approx",
    "gelu_fast",
    "relu",
    "sigmoid",
    "tanh",
];

#[derive(Debug, Clone, Copy)]
pub(crate) enum Act {
    Silu,
    Gelu,
    GeluApprox,
    GeluFast,
    Relu,
    Sigmoid,
    Tanh,
}

impl Act {
    pub(crate) fn parse(name: &str) -> Result<Act, OpError> {
        Ok(match name {
            "silu" => Act::Silu,
            "gelu" => Act::Gelu,
            "gelu_approx" => Act::GeluApprox,
            "gelu_fast" => Act::GeluFast,
            "relu" => Act::Relu,
            "sigmoid" => Act::Sigmoid,
            "tanh" => Act::Tanh,
            other => {
                return Err(OpError::new(
                    "fn",
                    format!(
                        "unknown activation '{other}' (known: {})",
                        ACTIVATIONS.join(", ")
                    ),
                ))
            }
        })
    }

    pub(crate) fn apply(self, x: &Array) -> Result<Array, Exception> {
        match self {
            Act::Silu => mlx_rs::nn::silu(x),
            Act::Gelu => mlx_rs::nn::gelu(x),
            Act::GeluApprox => mlx_rs::nn::gelu_approximate(x),
            Act::GeluFast => mlx_rs::nn::gelu_fast_approximate(x),
            Act::Relu => mlx_rs::nn::relu(x),
            Act::Sigmoid => mlx_rs::ops::sigmoid(x),
            Act::Tanh => mlx_rs::ops::tanh(x),
        }
    }
}

static ACT_PARAMS: &[ParamDef] = &[ParamDef {
    name: "fn",
    kind: ParamKind::Choice(ACTIVATIONS),
    default: None,
    doc: "activation function",
}];

#[derive(Debug)]
pub struct Activation;

impl OpKind for Activation {
    fn name(&self) -> &'static str {
        "activation"
    }
    fn doc(&self) -> &'static str {
        "Applies an activation function elementwise."
    }
    fn params(&self) -> &'static [ParamDef] {
        ACT_PARAMS
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn resolve(&self, p: &Params, _s: &str, inputs: &[ValueInfo]) -> Result<Resolved, OpError> {
        Act::parse(p.str("fn")?)?;
        Ok(Resolved::pure(inputs[0]))
    }
    fn build(
        &self,
        p: &Params,
        _inputs: &[ValueInfo],
        _w: Vec<Param>,
    ) -> Result<Box<dyn Op>, OpError> {
        Ok(Box::new(ActOp {
            act: Act::parse(p.str("fn")?)?,
        }))
    }
}

#[derive(Debug)]
struct ActOp {
    act: Act,
}

impl Op for ActOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        self.act.apply(inputs[0])
    }
}

#[derive(Debug)]
pub struct Glu;

impl OpKind for Glu {
    fn name(&self) -> &'static str {
        "glu"
    }
    fn doc(&self) -> &'static str {
        "Gated unit: fn(gate) * up, with inputs [gate, up] (SwiGLU, GeGLU)."
    }
    fn params(&self) -> &'static [ParamDef] {
        ACT_PARAMS
    }
    fn arity(&self) -> (usize, usize) {
        (2, 2)
    }
    fn resolve(&self, p: &Params, _s: &str, inputs: &[ValueInfo]) -> Result<Resolved, OpError> {
        Act::parse(p.str("fn")?)?;
        same_layout(inputs).map(Resolved::pure)
    }
    fn build(
        &self,
        p: &Params,
        _inputs: &[ValueInfo],
        _w: Vec<Param>,
    ) -> Result<Box<dyn Op>, OpError> {
        Ok(Box::new(GluOp {
            act: Act::parse(p.str("fn")?)?,
        }))
    }
}

#[derive(Debug)]
struct GluOp {
    act: Act,
}

impl Op for GluOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        match self.act {
            // One fused kernel, as mlx-lm's compiled `swiglu`.
            Act::Silu => swiglu(inputs[0], inputs[1]),
            act => mlx_rs::ops::multiply(act.apply(inputs[0])?, inputs[1]),
        }
    }
}

/// `silu(gate) * up`, compiled shapeless so MLX fuses it. One compiled
/// function serves every call: MLX caches a compiled graph by the
/// function's id, and each new compiled closure gets a fresh id, so a
/// closure made per call would be traced and compiled again every time.
fn swiglu(gate: &Array, up: &Array) -> Result<Array, Exception> {
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
