//! `attention`: scaled dot-product attention over per-head q, k, v through
//! `fast::scaled_dot_product_attention` (grouped-query when k/v have fewer
//! heads), with a causal (optionally sliding-window, optionally wider for
//! multi-token calls than for single tokens) mask, an optional
//! key-padding mask and a KV cache slot. Non-causal attention (encoders)
//! sees every key, or with `window` a band around the query, or with
//! `grid_window` a tile of the forward's 2-D positions, and keeps no
//! cache. With `softcap` the scores are
//! computed explicitly and capped with `tanh` before the softmax. Learned
//! sink logits join every softmax's denominator; with `gqa: tiled` query
//! head h reads key/value head h mod Hkv (the query heads are reordered
//! into groups around the call and back after it).
use lmspec_spec::ops::{Attention, Gqa, Layout, OpError};
use mlx_rs::error::Exception;
use mlx_rs::fast::ScaledDotProductAttentionMask;
use mlx_rs::Array;

use super::{Build, Ctx, Op, Weights};
use crate::cache::{causal_mask, KvView, Mask, PositionRule};

impl Build for Attention {
    fn build(&self, inputs: &[Layout], mut w: Weights) -> Result<Box<dyn Op>, OpError> {
        let sinks = if self.sinks {
            Some(w.dense("sinks")?)
        } else {
            None
        };
        let heads = |k: usize| inputs.get(k).and_then(|l| l.heads).unwrap_or(1) as i32;
        let (hq, hkv) = (heads(0), heads(1));
        let tiled = self.gqa == Gqa::Tiled && hq != hkv && self.kv_from.is_none();
        // Tiled: grouped query head g·rep + r is original head r·Hkv + g,
        // so the sinks follow the same order.
        let sinks = match (sinks, tiled) {
            (Some(s), true) => Some(
                regroup(
                    &s.reshape(&[1, hq, 1, 1]).map_err(super::mlx_err("sinks"))?,
                    hkv,
                    false,
                )
                .and_then(|a| a.reshape(&[hq]))
                .map_err(super::mlx_err("sinks"))?,
            ),
            (s, _) => s,
        };
        Ok(Box::new(AttentionOp {
            config: self.clone(),
            sinks,
            tiled_kv_heads: tiled.then_some(hkv),
        }))
    }
}

/// A built attention node: its config, its sink logits (in the order of the
/// query heads as attention sees them) and, for tiled GQA, the key/value
/// head count.
#[derive(Debug)]
struct AttentionOp {
    config: Attention,
    sinks: Option<Array>,
    tiled_kv_heads: Option<i32>,
}

/// Reorders the heads of `[B, H, T, D]`: `to_groups` takes head r·Hkv + g
/// (tiled) to g·rep + r (grouped); the inverse otherwise.
fn regroup(x: &Array, hkv: i32, to_groups: bool) -> Result<Array, Exception> {
    let s = x.shape().to_vec();
    let rep = s[1] / hkv;
    let split = if to_groups { [rep, hkv] } else { [hkv, rep] };
    x.reshape(&[s[0], split[0], split[1], s[2], s[3]])?
        .swap_axes(1, 2)?
        .reshape(&s)
}

impl Op for AttentionOp {
    fn forward(&self, inputs: &[&Array], ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let Some(hkv) = self.tiled_kv_heads else {
            return self.config.attend(inputs, ctx, self.sinks.as_ref());
        };
        let q = regroup(inputs[0], hkv, true)?;
        let mut regrouped = vec![&q];
        regrouped.extend_from_slice(&inputs[1..]);
        let out = self.config.attend(&regrouped, ctx, self.sinks.as_ref())?;
        regroup(&out, hkv, false)
    }
}

trait Attend {
    fn attend(
        &self,
        inputs: &[&Array],
        ctx: &mut Ctx<'_>,
        sinks: Option<&Array>,
    ) -> Result<Array, Exception>;
}

impl Attend for Attention {
    fn attend(
        &self,
        inputs: &[&Array],
        ctx: &mut Ctx<'_>,
        sinks: Option<&Array>,
    ) -> Result<Array, Exception> {
        let scale = self.scale as f32;
        let softcap = self.softcap.map(|c| c.0 as f32);
        let q = inputs[0];
        let t = q.shape()[2];
        if let Some(n) = self.kv_from {
            let (mask, kv) = crate::cache::shared::read(n)?;
            return attend_over(q, mask, kv, ctx, scale, softcap, sinks);
        }
        let (k, v) = (inputs[1], inputs[2]);
        let (mask, kv) = match ctx.cache.as_deref_mut() {
            // Bidirectional attention (encoders) sees the whole input, or a
            // band of it; it neither reads nor grows a cache.
            _ if !self.causal => {
                // Tiles of the 2-D grid positions (window attention), run
                // tile by tile when nothing else shapes the scores.
                if let Some(side) = self.grid_window {
                    let plain = sinks.is_none() && softcap.is_none() && self.window.is_none();
                    if plain && ctx.key_mask.is_none() && self.kv_out.is_none() {
                        return super::tiles::attend(q, k, v, side.0, scale);
                    }
                }
                let band = match self.window_size() {
                    Some(w) if t > w => Some(band_mask(t, w)),
                    _ => None,
                };
                // Segment ids of the forward (one per image) keep each
                // query to its own segment's keys.
                let mut mask = match (band, crate::inputs::segment_mask(t)?) {
                    (Some(b), Some(s)) => Mask::Array(mlx_rs::ops::logical_and(&b, &s)?),
                    (Some(m), None) | (None, Some(m)) => Mask::Array(m),
                    (None, None) => Mask::None,
                };
                // Tiles of the 2-D grid positions (window attention).
                if let Some(side) = self.grid_window {
                    let tiles = crate::inputs::tile_mask(t, side.0)?;
                    mask = match mask {
                        Mask::Array(m) => Mask::Array(mlx_rs::ops::logical_and(&m, &tiles)?),
                        _ => Mask::Array(tiles),
                    };
                }
                (mask, KvView::Dense(k.clone(), v.clone()))
            }
            Some(cache) => (
                match position_rule(self) {
                    Some(rule) => {
                        let seen = ctx.positions.map(|p| p.host.as_slice());
                        cache.rule_mask(rule, t, q.shape()[1], seen)?
                    }
                    None => cache.mask(t, self.chunk_window_size())?,
                },
                cache.update_and_fetch(k, v)?,
            ),
            None => {
                let mask = match (position_rule(self), self.chunk_window_size()) {
                    (Some(rule), _) if t > 1 => Mask::Array(rule.mask(t, q.shape()[1], &[0], t)),
                    (None, Some(w)) if t > w => Mask::Array(causal_mask(t, 0, Some(w))),
                    _ if t > 1 => Mask::Causal,
                    _ => Mask::None,
                };
                (mask, KvView::Dense(k.clone(), v.clone()))
            }
        };
        let mask = match self.bidirectional_spans && t > 1 {
            true => with_spans(mask, &kv, t)?,
            false => mask,
        };
        if let Some(n) = self.kv_out {
            crate::cache::shared::publish(n, &mask, &kv);
        }
        // An index_topk node's keep mask (a scalar: every key kept).
        let mask = match inputs.get(3) {
            Some(keep) if keep.ndim() > 0 => with_keep(mask, keep, &kv, t)?,
            _ => mask,
        };
        attend_over(q, mask, kv, ctx, scale, softcap, sinks)
    }
}

/// The rule of an attention whose mask depends on absolute positions.
fn position_rule(a: &Attention) -> Option<PositionRule> {
    if let Some(c) = a.local_chunk_size() {
        return Some(PositionRule::LocalChunk(c));
    }
    let clamp = |v: i64| v.clamp(1, i32::MAX as i64) as i32;
    match (a.sparse_block, a.sparse_stride) {
        (Some(block), Some(stride)) => Some(PositionRule::BlockSparse {
            block: clamp(block.0),
            local: clamp(a.sparse_local),
            stride: clamp(stride.0),
        }),
        _ => None,
    }
}

/// Attention of `q` over `kv` with `mask` (the key-padding mask of `ctx`
/// added).
#[allow(clippy::too_many_arguments)]
fn attend_over(
    q: &Array,
    mask: Mask,
    kv: KvView,
    ctx: &Ctx<'_>,
    scale: f32,
    softcap: Option<f32>,
    sinks: Option<&Array>,
) -> Result<Array, Exception> {
    let t = q.shape()[2];
    if let (KvView::Dense(k, v), None) = (&kv, softcap) {
        if let Some(out) = cpu_attention(q, k, v, scale, &mask, sinks, ctx) {
            return out;
        }
    }
    let mask = match ctx.key_mask {
        Some(keys) => with_key_mask(mask, keys, t)?,
        None => mask,
    };
    match kv {
        KvView::Dense(k, v) if softcap.is_none() => {
            let m = match &mask {
                Mask::None => None,
                Mask::Causal => Some(ScaledDotProductAttentionMask::Causal),
                Mask::Array(a) => Some(ScaledDotProductAttentionMask::Array(a)),
            };
            mlx_rs::fast::scaled_dot_product_attention(q, &k, &v, scale, m, sinks)
        }
        KvView::Dense(k, v) => {
            let hkv = k.shape()[1];
            explicit_attention(q, &k, &v, hkv, scale, softcap, sinks, &mask)
        }
        KvView::Quantized {
            keys,
            values,
            group_size,
            bits,
        } => {
            let hkv = keys[0].shape()[1];
            let wrap = |parts| QuantizedKv {
                parts,
                group_size,
                bits,
            };
            let (keys, values) = (wrap(keys), wrap(values));
            explicit_attention(q, &keys, &values, hkv, scale, softcap, sinks, &mask)
        }
    }
}

/// Attention through lmspec's CPU kernel, where it applies: float32, no
/// mask or a causal one, no sinks; in a batch of sequences at their own
/// positions, each row from its first real key (the padding in front of
/// it is what the batch's key mask hides), so that a sequence's values are
/// those it gets alone.
fn cpu_attention(
    q: &Array,
    k: &Array,
    v: &Array,
    scale: f32,
    mask: &Mask,
    sinks: Option<&Array>,
    ctx: &Ctx<'_>,
) -> Option<Result<Array, Exception>> {
    use crate::cpu_kernels as cpu;
    let causal = match mask {
        Mask::None => false,
        Mask::Causal => true,
        Mask::Array(_) => return None,
    };
    let (tq, tk) = (q.shape()[2], k.shape()[2]);
    let fits = sinks.is_none() && tk >= tq && q.ndim() == 4;
    if !fits || !cpu::all_f32(&[q, k, v]) || !cpu::enabled() {
        return None;
    }
    // A batch's row holds its `positions` real keys before this call's
    // `tq`; the columns before them are padding.
    let firsts: Vec<i32> = match (ctx.key_mask, ctx.positions) {
        (None, _) => Vec::new(),
        (Some(keys), Some(p)) if keys.shape().last() == Some(&tk) => {
            p.host.iter().map(|&seen| tk - tq - seen).collect()
        }
        _ => return None,
    };
    if firsts.iter().any(|&f| f < 0 || f > tk - tq) {
        return None;
    }
    Some(cpu::attention(q, k, v, scale, causal, &firsts))
}

/// The bidirectional band of a non-causal `window`: query `i` sees key `j`
/// when `|i - j| < window` (ModernBERT's local attention).
pub(crate) fn band_mask(t: i32, window: i32) -> Array {
    let mut allowed = Vec::with_capacity((t * t).max(0) as usize);
    for i in 0..t {
        for j in 0..t {
            allowed.push((i - j).abs() < window);
        }
    }
    Array::from_slice(&allowed, &[t, t])
}

/// `mask` widened so that the positions of one span of the forward's
/// segment ids (the last `t` keys: this call's own positions) see each
/// other, whatever their order.
fn with_spans(mask: Mask, kv: &KvView, t: i32) -> Result<Mask, Exception> {
    let Some(spans) = crate::inputs::span_mask(t)? else {
        return Ok(mask);
    };
    let s = keys_len(kv);
    let spans = match s - t {
        0 => spans,
        past => mlx_rs::ops::concatenate(
            &[
                &Array::from_slice(&vec![false; (t * past) as usize], &[t, past]),
                &spans,
            ],
            1,
        )?,
    };
    Ok(Mask::Array(match mask {
        Mask::None => return Ok(Mask::None),
        Mask::Causal => mlx_rs::ops::logical_or(causal_mask(t, s - t, None), &spans)?,
        Mask::Array(a) => mlx_rs::ops::logical_or(&a, &spans)?,
    }))
}

/// How many keys `kv` holds.
fn keys_len(kv: &KvView) -> i32 {
    match kv {
        KvView::Dense(k, _) => k.shape()[2],
        KvView::Quantized { keys, .. } => keys[0].shape()[2],
    }
}

/// `mask` restricted to the keys an `index_topk` node keeps (`keep`,
/// `[B, 1, t, S]`).
fn with_keep(mask: Mask, keep: &Array, kv: &KvView, t: i32) -> Result<Mask, Exception> {
    let s = keys_len(kv);
    Ok(Mask::Array(match mask {
        Mask::None => keep.clone(),
        Mask::Causal => mlx_rs::ops::logical_and(keep, causal_mask(t, s - t, None))?,
        Mask::Array(a) => mlx_rs::ops::logical_and(keep, &a)?,
    }))
}

/// `mask` restricted to the keys a `[B, S]` key mask allows (true = a real
/// token); the result is `[B, 1, t, S]` and broadcasts over heads.
pub(super) fn with_key_mask(mask: Mask, keys: &Array, t: i32) -> Result<Mask, Exception> {
    let s = keys.shape();
    let keys = keys.reshape(&[s[0], 1, 1, s[1]])?;
    Ok(Mask::Array(match mask {
        Mask::None => keys,
        Mask::Causal => mlx_rs::ops::logical_and(&keys, causal_mask(t, s[1] - t, None))?,
        Mask::Array(a) => mlx_rs::ops::logical_and(&keys, &a)?,
    }))
}

/// Keys or values as the explicit attention path multiplies them: dense, or
/// MLX-affine-quantized along the head dimension.
trait KvOperand: Sized {
    /// Inserts a group axis before the head axis (grouped-query attention).
    fn expand_groups(&self) -> Result<Self, Exception>;
    /// `lhs @ selfᵀ` (`transpose`) or `lhs @ self`.
    fn matmul(&self, lhs: &Array, transpose: bool) -> Result<Array, Exception>;
}

impl KvOperand for Array {
    fn expand_groups(&self) -> Result<Array, Exception> {
        self.expand_dims(-3)
    }
    fn matmul(&self, lhs: &Array, transpose: bool) -> Result<Array, Exception> {
        if transpose {
            mlx_rs::ops::matmul(lhs, self.swap_axes(-1, -2)?)
        } else {
            mlx_rs::ops::matmul(lhs, self)
        }
    }
}

struct QuantizedKv {
    parts: [Array; 3],
    group_size: i32,
    bits: i32,
}

impl KvOperand for QuantizedKv {
    fn expand_groups(&self) -> Result<Self, Exception> {
        Ok(QuantizedKv {
            parts: [
                self.parts[0].expand_dims(-3)?,
                self.parts[1].expand_dims(-3)?,
                self.parts[2].expand_dims(-3)?,
            ],
            group_size: self.group_size,
            bits: self.bits,
        })
    }
    fn matmul(&self, lhs: &Array, transpose: bool) -> Result<Array, Exception> {
        let [w, s, b] = &self.parts;
        mlx_rs::ops::quantized_matmul(lhs, w, s, b, transpose, self.group_size, self.bits)
    }
}

/// Attention with the scores materialised (mlx-lm's explicit paths): scale
/// q, `q kᵀ` per key/value group, optional `tanh` cap, mask, precise
/// softmax (with a sink column in front when there are sinks), `· v`.
#[allow(clippy::too_many_arguments)]
fn explicit_attention<K: KvOperand>(
    q: &Array,
    keys: &K,
    values: &K,
    hkv: i32,
    scale: f32,
    softcap: Option<f32>,
    sinks: Option<&Array>,
    mask: &Mask,
) -> Result<Array, Exception> {
    let s = q.shape().to_vec();
    let (b, hq, l, d) = (s[0], s[1], s[2], s[3]);
    let repeats = hq / hkv;
    let mut q = mlx_rs::ops::multiply(q, Array::from_f32(scale).as_dtype(q.dtype())?)?;
    let grouped;
    let (keys, values) = if repeats > 1 {
        q = q.reshape(&[b, hkv, repeats, l, d])?;
        grouped = (keys.expand_groups()?, values.expand_groups()?);
        (&grouped.0, &grouped.1)
    } else {
        (keys, values)
    };
    let mut scores = keys.matmul(&q, true)?;
    if let Some(c) = softcap {
        scores = super::elementwise::soft_cap(&scores, c)?;
    }
    let kl = *scores.shape().last().unwrap_or(&0);
    let allowed = match mask {
        Mask::None => None,
        Mask::Causal => Some(causal_mask(l, kl - l, None)),
        Mask::Array(a) => Some(a.clone()),
    };
    if let Some(m) = allowed {
        let floor = Array::from_f32(f32::MIN).as_dtype(scores.dtype())?;
        scores = mlx_rs::ops::select(&m, &scores, &floor)?;
    }
    let probs = match sinks {
        None => mlx_rs::ops::softmax_axis(&scores, -1, true)?,
        Some(sinks) => {
            // One sink logit per query head, in front of each row of scores.
            let mut shape = scores.shape().to_vec();
            let mut head_shape = vec![1; shape.len()];
            let heads_axes = shape.len() - 3;
            if repeats > 1 {
                head_shape[heads_axes - 1] = hkv;
                head_shape[heads_axes] = repeats;
            } else {
                head_shape[heads_axes] = hq;
            }
            let column = sinks.reshape(&head_shape)?.as_dtype(scores.dtype())?;
            *shape.last_mut().unwrap_or(&mut 0) = 1;
            let column = mlx_rs::ops::broadcast_to(&column, &shape)?;
            let joined = mlx_rs::ops::concatenate(&[&column, &scores], -1)?;
            let p = mlx_rs::ops::softmax_axis(&joined, -1, true)?;
            let mut parts = p.split_at_indices(&[1], -1)?;
            parts.pop().unwrap_or(p)
        }
    };
    let out = values.matmul(&probs, false)?;
    if repeats > 1 {
        out.reshape(&[b, hq, l, -1])
    } else {
        Ok(out)
    }
}
