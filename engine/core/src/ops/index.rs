//! `index_topk` and `block_topk`: the keys each query keeps, scored by a
//! lightning indexer (DeepSeek-V3.2's sparse attention) or by key blocks
//! (MiniMax M3's), as the keep mask an attention node takes as its fourth
//! input.
use lmspec_spec::ops::{BlockTopk, IndexTopk};
use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::{ops, Array};

use super::{Ctx, Op};
use crate::cache::{causal_mask, KvView, Mask};

impl Op for IndexTopk {
    fn forward(&self, inputs: &[&Array], ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let (q, k, w) = (inputs[0], inputs[1], inputs[2]);
        let t = q.shape()[2];
        let keys = index_keys(k, ctx)?;
        let s = keys.shape()[2];
        let topk = self.topk.0.min(i64::from(i32::MAX)) as i32;
        if s <= topk {
            return Ok(Array::from_bool(true));
        }
        // [B, H, T, S] scores, relu, times each head's weight.
        let scores = ops::maximum(
            &ops::matmul(q, &keys.swap_axes(-1, -2)?)?,
            Array::from_f32(0.0),
        )?;
        let w = ops::multiply(w, Array::from_f32(self.scale as f32))?;
        let w = w.swap_axes(-1, -2)?.expand_dims(-1)?;
        let scores = ops::multiply(&scores, &w)?;
        // Heads summed one after another for a multi-token call, by a
        // reduction for one token (as mlx-lm), so that near-equal scores
        // order the same way.
        let heads = scores.shape()[1];
        let summed = if t > 1 {
            let mut acc = scores.try_index((.., 0..1))?;
            for h in 1..heads {
                acc = ops::add(&acc, &scores.try_index((.., h..h + 1))?)?;
            }
            acc
        } else {
            scores.sum_axis(1, true)?
        };
        // Future keys of a multi-token call, and a batch's padding (its key
        // mask), score -inf: a row keeps its own keys only.
        let summed = match visible(t, s, ctx)? {
            Some(v) => ops::select(&v, &summed, Array::from_f32(f32::NEG_INFINITY))?,
            None => summed,
        };
        let order = ops::argpartition_axis(&summed, -topk, -1)?;
        let chosen = mlx_rs::stop_gradient(&order.try_index((.., .., .., s - topk..))?)?;
        let none = ops::zeros_dtype(summed.shape(), mlx_rs::Dtype::Bool)?;
        none.put_along_axis(&chosen, Array::from_bool(true), -1)
    }
}

/// All index keys so far: the node's own cache holds them (as keys and
/// values), dequantized under a quantized KV cache.
fn index_keys(k: &Array, ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
    Ok(match ctx.cache.as_deref_mut() {
        None => k.clone(),
        Some(cache) => match cache.update_and_fetch(k, k)? {
            KvView::Dense(keys, _) => keys,
            KvView::Quantized {
                keys: [w, scales, biases],
                group_size,
                bits,
                ..
            } => crate::weights::dequantize(&w, &scales, &biases, group_size, bits)?,
        },
    })
}

/// The keys `t` queries may score among `s`: none in their future (a
/// multi-token call) and none of a batch's padding (its key mask, as
/// attention applies it); `None`: every one.
fn visible(t: i32, s: i32, ctx: &Ctx<'_>) -> Result<Option<Array>, Exception> {
    let causal = if t > 1 { Mask::Causal } else { Mask::None };
    let mask = match ctx.key_mask {
        Some(keys) => super::attention::with_key_mask(causal, keys, t)?,
        None => causal,
    };
    Ok(match mask {
        Mask::None => None,
        Mask::Causal => Some(causal_mask(t, s - t, None)),
        Mask::Array(a) => Some(a),
    })
}

impl Op for BlockTopk {
    fn forward(&self, inputs: &[&Array], ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        use mlx_rs::ops::indexing::{argmax_axis, take_along_axis};
        let (q, k) = (inputs[0], inputs[1]);
        let t = q.shape()[2];
        let keys = index_keys(k, ctx)?;
        let s = keys.shape()[2];
        let clamp = |v: i64| v.clamp(0, i64::from(i32::MAX)) as i32;
        let (block, topk, local) = (
            clamp(self.block_size.0),
            clamp(self.topk.0),
            clamp(self.local),
        );
        let (full, tail) = (s / block, s % block);
        let blocks = full + i32::from(tail > 0);
        if topk >= blocks {
            return Ok(Array::from_bool(true));
        }
        let f32 = |a: &Array| a.as_dtype(mlx_rs::Dtype::Float32);
        let scores = ops::matmul(&f32(q)?, &f32(&keys)?.swap_axes(-1, -2)?)?;
        // Blocks are cut from a row's first key: in a batch, each row's
        // scores are shifted left past its padding (the key mask's leading
        // false), the keep mask shifted back at the end.
        let pad = match ctx.key_mask {
            // argmax gives unsigned indices: signed, to shift both ways.
            Some(m) => Some(
                argmax_axis(m.as_dtype(mlx_rs::Dtype::Int32)?, 1, false)?
                    .as_dtype(mlx_rs::Dtype::Int32)?,
            ),
            None => None,
        };
        let rows = pad.as_ref().map_or(1, |p| p.shape()[0]);
        let pad_col = match &pad {
            Some(p) => p.reshape(&[rows, 1, 1, 1])?,
            None => Array::from_int(0),
        };
        let slots = Array::from_iter(0..s, &[1, 1, 1, s]);
        let shift = |a: &Array, by: &Array| -> Result<Array, Exception> {
            let idx = ops::add(&ops::add(&slots, by)?, Array::from_int(s))?;
            let idx = ops::remainder(&idx, Array::from_int(s))?;
            let sh = a.shape().to_vec();
            take_along_axis(
                a,
                ops::broadcast_to(&idx, &[sh[0].max(rows), sh[1], sh[2], s])?,
                -1,
            )
        };
        // A query's own position, in its row: [rows, 1, T, 1].
        let positions = Array::from_iter(s - t..s, &[1, 1, t, 1]);
        let own = ops::subtract(&positions, &pad_col)?;
        let seen = ops::le(&slots, &own)?;
        let scores = match &pad {
            Some(_) => shift(&scores, &pad_col)?,
            None => scores,
        };
        let scores = ops::select(&seen, &scores, Array::from_f32(f32::NEG_INFINITY))?;
        // Each block's best key; the last block may be shorter.
        let sh = scores.shape().to_vec();
        let split = full * block;
        let mut block_scores = scores
            .try_index((.., .., .., ..split))?
            .reshape(&[sh[0], sh[1], sh[2], full, block])?
            .max_axis(-1, false)?;
        if tail > 0 {
            let last = scores
                .try_index((.., .., .., split..))?
                .max_axis(-1, true)?;
            block_scores = ops::concatenate(&[&block_scores, &last], -1)?;
        }
        // The `local` blocks up to the query's own win.
        if local > 0 {
            let own_block = ops::floor_divide(&own, Array::from_int(block))?;
            let ids = Array::from_iter(0..blocks, &[1, 1, 1, blocks]);
            let won = ops::logical_and(
                &ops::le(&ids, &own_block)?,
                &ops::gt(&ids, &ops::subtract(&own_block, Array::from_int(local))?)?,
            )?;
            block_scores = ops::select(&won, Array::from_f32(f32::INFINITY), &block_scores)?;
        }
        let order = ops::argpartition_axis(&ops::negative(&block_scores)?, topk - 1, -1)?;
        let chosen = mlx_rs::stop_gradient(&order.try_index((.., .., .., ..topk))?)?;
        let none = ops::zeros_dtype(block_scores.shape(), mlx_rs::Dtype::Bool)?;
        let kept = none.put_along_axis(&chosen, Array::from_bool(true), -1)?;
        // Blocks back to keys; the future keys of a kept block masked again.
        let kept = ops::repeat_axis::<bool>(kept, block, -1)?.try_index((.., .., .., ..s))?;
        let kept = ops::logical_and(&kept, &seen)?;
        let kept = match &pad {
            Some(_) => shift(&kept, &ops::negative(&pad_col)?)?,
            None => kept,
        };
        ops::repeat_axis::<bool>(kept, clamp(self.repeat.0), 1)
    }
}
