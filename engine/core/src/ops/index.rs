//! `index_topk`: the keys each query keeps, scored by a lightning indexer
//! (DeepSeek-V3.2's sparse attention), as the keep mask an attention node
//! takes as its fourth input.
use lmspec_spec::ops::IndexTopk;
use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::{ops, Array};

use super::{Ctx, Op};
use crate::cache::{causal_mask, KvView};

impl Op for IndexTopk {
    fn forward(&self, inputs: &[&Array], ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let (q, k, w) = (inputs[0], inputs[1], inputs[2]);
        let t = q.shape()[2];
        // The node's own cache holds the index keys (as keys and values).
        let keys = match ctx.cache.as_deref_mut() {
            None => k.clone(),
            Some(cache) => match cache.update_and_fetch(k, k)? {
                KvView::Dense(keys, _) => keys,
                // Under a quantized KV cache the index keys are quantized too.
                KvView::Quantized {
                    keys: [w, scales, biases],
                    group_size,
                    bits,
                    ..
                } => crate::weights::dequantize(&w, &scales, &biases, group_size, bits)?,
            },
        };
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
        let causal = (t > 1).then(|| causal_mask(t, s - t, None));
        let padding = match ctx.key_mask {
            Some(keys) => Some(keys.reshape(&[keys.shape()[0], 1, 1, keys.shape()[1]])?),
            None => None,
        };
        let visible = match (causal, padding) {
            (Some(c), Some(p)) => Some(ops::logical_and(&c, &p)?),
            (c, p) => c.or(p),
        };
        let summed = match visible {
            Some(v) => ops::select(&v, &summed, Array::from_f32(f32::NEG_INFINITY))?,
            None => summed,
        };
        let order = ops::argpartition_axis(&summed, -topk, -1)?;
        let chosen = order.try_index((.., .., .., s - topk..))?;
        let none = ops::zeros_dtype(summed.shape(), mlx_rs::Dtype::Bool)?;
        none.put_along_axis(&chosen, Array::from_bool(true), -1)
    }
}
