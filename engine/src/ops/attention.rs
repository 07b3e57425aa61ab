//! `attention`: scaled dot-product attention over per-head q, k, v through
//! `fast::scaled_dot_product_attention` (grouped-query when k/v have fewer
//! heads), with a causal mask and a KV cache slot.
use mlx_rs::error::Exception;
use mlx_rs::fast::ScaledDotProductAttentionMask;
use mlx_rs::Array;

use super::{
    expect_heads, Ctx, Op, OpError, OpKind, Param, ParamDef, ParamKind, Params, Resolved, ValueInfo,
};
use crate::cache::{CacheKind, CacheState};
use crate::spec::config::Ty;

#[derive(Debug)]
pub struct Attention;

static PARAMS: &[ParamDef] = &[
    ParamDef {
        name: "scale",
        kind: ParamKind::Expr(Ty::Float),
        default: None,
        doc: "multiplier of q·k (usually head_dim ** -0.5)",
    },
    ParamDef {
        name: "causal",
        kind: ParamKind::Expr(Ty::Bool),
        default: Some("true"),
        doc: "mask future positions",
    },
];

impl OpKind for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }
    fn doc(&self) -> &'static str {
        "softmax(scale · q kᵀ + mask) v over inputs [q, k, v] ([B, H, T, D]); keeps a KV cache."
    }
    fn params(&self) -> &'static [ParamDef] {
        PARAMS
    }
    fn arity(&self) -> (usize, usize) {
        (3, 3)
    }
    fn resolve(&self, _p: &Params, _s: &str, inputs: &[ValueInfo]) -> Result<Resolved, OpError> {
        let (hq, dq) = expect_heads(inputs, 0)?;
        let (hk, dk) = expect_heads(inputs, 1)?;
        let (hv, dv) = expect_heads(inputs, 2)?;
        if dq != dk {
            return Err(OpError::new(
                "in",
                format!("q head size {dq} != k head size {dk}"),
            ));
        }
        if hk != hv {
            return Err(OpError::new("in", format!("k has {hk} heads, v has {hv}")));
        }
        if hk == 0 || hq % hk != 0 {
            return Err(OpError::new(
                "in",
                format!("{hq} query heads do not group over {hk} key/value heads"),
            ));
        }
        Ok(Resolved {
            out: ValueInfo {
                dim: dv,
                heads: Some(hq),
            },
            weights: Vec::new(),
            cache: Some(CacheKind::Kv),
        })
    }
    fn build(
        &self,
        p: &Params,
        _inputs: &[ValueInfo],
        _w: Vec<Param>,
    ) -> Result<Box<dyn Op>, OpError> {
        Ok(Box::new(AttentionOp {
            scale: p.float("scale")? as f32,
            causal: p.bool("causal")?,
        }))
    }
}

#[derive(Debug)]
struct AttentionOp {
    scale: f32,
    causal: bool,
}

impl Op for AttentionOp {
    fn forward(&self, inputs: &[&Array], ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let (q, k, v) = (inputs[0], inputs[1], inputs[2]);
        let t = q.shape()[2];
        let (k, v) = match ctx.cache.as_deref_mut() {
            Some(CacheState::Kv(cache)) => cache.update_and_fetch(k, v)?,
            None => (k.clone(), v.clone()),
        };
        let mask = (self.causal && t > 1).then_some(ScaledDotProductAttentionMask::Causal);
        mlx_rs::fast::scaled_dot_product_attention(q, &k, &v, self.scale, mask, None)
    }
}
