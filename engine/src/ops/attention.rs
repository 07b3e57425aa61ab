//! `attention`: scaled dot-product attention over per-head q, k, v through
//! `fast::scaled_dot_product_attention` (grouped-query when k/v have fewer
//! heads), with a causal mask and a KV cache slot.
use mlx_rs::error::Exception;
use mlx_rs::fast::ScaledDotProductAttentionMask;
use mlx_rs::Array;

use super::{
    expect_heads, Ctx, Op, OpError, OpKind, Param, ParamDef, ParamKind, Params, Resolved, ValueInfo,
};
use crate::cache::{CacheKind, KvView, Mask};
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
        let (mask, kv) = match ctx.cache.as_deref_mut() {
            Some(cache) => (cache.mask(t)?, cache.update_and_fetch(k, v)?),
            None => (
                if t > 1 { Mask::Causal } else { Mask::None },
                KvView::Dense(k.clone(), v.clone()),
            ),
        };
        let mask = if self.causal { mask } else { Mask::None };
        match kv {
            KvView::Dense(k, v) => {
                let m = match &mask {
                    Mask::None => None,
                    Mask::Causal => Some(ScaledDotProductAttentionMask::Causal),
                    Mask::Array(a) => Some(ScaledDotProductAttentionMask::Array(a)),
                };
                mlx_rs::fast::scaled_dot_product_attention(q, &k, &v, self.scale, m, None)
            }
            KvView::Quantized {
                keys,
                values,
                group_size,
                bits,
            } => quantized_attention(q, &keys, &values, self.scale, &mask, group_size, bits),
        }
    }
}

/// Attention over quantized keys/values: scores and output through
/// `quantized_matmul`, precise softmax, as mlx-lm's quantized path.
fn quantized_attention(
    q: &Array,
    keys: &[Array; 3],
    values: &[Array; 3],
    scale: f32,
    mask: &Mask,
    group_size: i32,
    bits: i32,
) -> Result<Array, Exception> {
    let s = q.shape().to_vec();
    let (b, hq, l, d) = (s[0], s[1], s[2], s[3]);
    let hkv = keys[0].shape()[1];
    let repeats = hq / hkv;
    let mut q = mlx_rs::ops::multiply(q, Array::from_f32(scale).as_dtype(q.dtype())?)?;
    let expand = |x: &[Array; 3]| -> Result<[Array; 3], Exception> {
        if repeats > 1 {
            Ok([
                x[0].expand_dims(-3)?,
                x[1].expand_dims(-3)?,
                x[2].expand_dims(-3)?,
            ])
        } else {
            Ok(x.clone())
        }
    };
    let (keys, values) = (expand(keys)?, expand(values)?);
    if repeats > 1 {
        q = q.reshape(&[b, hkv, repeats, l, d])?;
    }
    let mut scores =
        mlx_rs::ops::quantized_matmul(&q, &keys[0], &keys[1], &keys[2], true, group_size, bits)?;
    let kl = *scores.shape().last().unwrap_or(&0);
    let allowed = match mask {
        Mask::None => None,
        Mask::Causal => {
            let mut m = Vec::with_capacity((l * kl) as usize);
            for row in 0..l {
                for col in 0..kl {
                    m.push(kl - l + row >= col);
                }
            }
            Some(Array::from_slice(&m, &[l, kl]))
        }
        Mask::Array(a) => Some(a.clone()),
    };
    if let Some(m) = allowed {
        let floor = Array::from_f32(f32::MIN).as_dtype(scores.dtype())?;
        scores = mlx_rs::ops::select(&m, &scores, &floor)?;
    }
    let probs = mlx_rs::ops::softmax_axis(&scores, -1, true)?;
    let out = mlx_rs::ops::quantized_matmul(
        &probs, &values[0], &values[1], &values[2], false, group_size, bits,
    )?;
    if repeats > 1 {
        out.reshape(&[b, hq, l, d])
    } else {
        Ok(out)
    }
}
