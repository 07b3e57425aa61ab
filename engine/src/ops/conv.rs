//! `short_conv`: a causal depthwise convolution over the sequence (each
//! channel its own `kernel`-tap filter, as mlx's grouped `conv1d` with
//! `groups = channels` on a left-padded input). It declares a cache slot
//! holding its last `kernel - 1` input rows, so decoding one token at a time
//! gives what one pass over the whole sequence gives.
use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::{ArrayIndex, TryIndexOp};
use mlx_rs::Array;

use super::{
    dense, expect_flat, join_scope, Ctx, Op, OpError, OpKind, Param, ParamDef, ParamKind, Params,
    Resolved, ValueInfo, WeightReq,
};
use crate::cache::{CacheKind, CacheState};
use crate::spec::config::Ty;

#[derive(Debug)]
pub struct ShortConv;

static PARAMS: &[ParamDef] = &[
    ParamDef {
        name: "weight",
        kind: ParamKind::Weight,
        default: None,
        doc: "module holding `weight` [channels, kernel, 1] (and `bias` [channels])",
    },
    ParamDef {
        name: "kernel",
        kind: ParamKind::Expr(Ty::Int),
        default: None,
        doc: "filter taps; the last one multiplies the current position",
    },
    ParamDef {
        name: "bias",
        kind: ParamKind::Expr(Ty::Bool),
        default: Some("false"),
        doc: "whether the module has a bias",
    },
];

impl OpKind for ShortConv {
    fn name(&self) -> &'static str {
        "short_conv"
    }
    fn doc(&self) -> &'static str {
        "Causal depthwise convolution over positions; keeps its last kernel-1 input rows as state."
    }
    fn params(&self) -> &'static [ParamDef] {
        PARAMS
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn resolve(&self, p: &Params, scope: &str, inputs: &[ValueInfo]) -> Result<Resolved, OpError> {
        let d = expect_flat(inputs, 0)?;
        let k = p.int("kernel")?;
        if k < 1 {
            return Err(OpError::new(
                "kernel",
                format!("must be at least 1, got {k}"),
            ));
        }
        let module = join_scope(scope, p.str("weight")?);
        let mut weights = vec![WeightReq {
            field: "weight",
            module: module.clone(),
            suffix: "weight",
            shape: vec![d, k, 1],
            quantizable: false,
        }];
        if p.bool("bias")? {
            weights.push(WeightReq {
                field: "bias",
                module,
                suffix: "bias",
                shape: vec![d],
                quantizable: false,
            });
        }
        Ok(Resolved {
            out: ValueInfo::flat(d),
            weights,
            cache: (k > 1).then_some(CacheKind::Conv(k as i32 - 1)),
        })
    }
    fn build(
        &self,
        p: &Params,
        _inputs: &[ValueInfo],
        weights: Vec<Param>,
    ) -> Result<Box<dyn Op>, OpError> {
        let mut it = weights.into_iter();
        let w = dense(it.next(), "weight")?;
        let bias = it.next().map(|b| dense(Some(b), "bias")).transpose()?;
        // [D, K, 1] -> [K, D]: row j is tap j of every channel.
        let d = w.shape()[0];
        let taps = w
            .reshape(&[d, -1])
            .map(|t| t.t())
            .map_err(|e| OpError::new("weight", e.to_string()))?;
        Ok(Box::new(ShortConvOp {
            taps,
            bias,
            kernel: p.int("kernel")? as i32,
        }))
    }
}

#[derive(Debug)]
struct ShortConvOp {
    taps: Array,
    bias: Option<Array>,
    kernel: i32,
}

impl Op for ShortConvOp {
    fn forward(&self, inputs: &[&Array], ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let x = inputs[0];
        let t = x.shape()[1];
        let k = self.kernel;
        // [B, K - 1 + T, D]: the previous rows (zeros at the start) first.
        let all = match ctx.cache.as_deref_mut() {
            Some(CacheState::Conv(state)) => state.extend(x)?,
            Some(_) => return Err(Exception::custom("short_conv: wrong cache slot")),
            None if k > 1 => {
                let s = x.shape();
                let zeros = mlx_rs::ops::zeros_dtype(&[s[0], k - 1, s[2]], x.dtype())?;
                mlx_rs::ops::concatenate(&[&zeros, x], 1)?
            }
            None => x.clone(),
        };
        let mut out: Option<Array> = None;
        for j in 0..k {
            let window = all.try_index(&[(..).index_op(), (j..j + t).index_op()][..])?;
            let tap = self.taps.try_index(j)?;
            let term = mlx_rs::ops::multiply(&window, &tap)?;
            out = Some(match out {
                Some(o) => mlx_rs::ops::add(&o, &term)?,
                None => term,
            });
        }
        let out = out.ok_or_else(|| Exception::custom("short_conv: no taps"))?;
        match &self.bias {
            Some(b) => mlx_rs::ops::add(&out, b),
            None => Ok(out),
        }
    }
}
