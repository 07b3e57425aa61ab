//! `attention`: scaled dot-product attention over per-head q, k, v.
use super::{choice, expect_heads, op, Layout, OpError, Positive, Resolved, StateKind, WeightReq};

choice! {
    /// Which key/value head a query head reads (grouped-query attention).
    pub enum Gqa {
        /// Query head h reads head h / (Hq / Hkv): consecutive query heads share one (llama).
        Grouped = "grouped",
        /// Query head h reads head h mod Hkv: the key/value heads tiled (PLaMo).
        Tiled = "tiled",
    }
}

op! {
    /// softmax(scale · q kᵀ + mask) v over inputs [q, k, v] ([B, H, T, D]); keeps a KV cache. With `kv_from`, over [q] alone and another attention node's keys and values. A fourth input, an `index_topk` node's keep mask, restricts each query to the keys it keeps.
    "attention" (1..=4) => Attention {
        scale: f64, "multiplier of q·k (usually head_dim ** -0.5)";
        causal: bool = true, "mask future positions";
        window: Option<Positive<i64>> = None, "attend to at most this many most recent positions (sliding window; its cache keeps only those); non-causal: to keys less than this many positions away on either side";
        grid_window: Option<Positive<i64>> = None, "non-causal: a query sees only the keys of its own tile of this many x this many positions of the forward's 2-D positions (axis 0 the row, axis 1 the column of each patch, as a tower's inputs give them), within its segment (Qwen2.5-VL's window attention; null: the whole segment)";
        chunk_window: Option<Positive<i64>> = None, "the window a query of a multi-token call (a whole forward, a prefill chunk) sees, at least `window`; the cache still keeps `window` positions, so a single-token step, and the first query of a chunk after cached positions, see `window` (null: `window`)";
        local_chunk: Option<Positive<i64>> = None, "causal within aligned chunks: a query at position p sees the keys at positions q <= p with floor(q / local_chunk) = floor(p / local_chunk) (llama4's chunked attention, `attention_chunk_size`); the cache keeps every position";
        sparse_block: Option<Positive<i64>> = None, "block-sparse causal attention by blocks of this many positions: query block qb sees key block kb <= qb when qb - kb < sparse_local, or when (kb + h + 1) % sparse_stride == 0 for query head h (phi3small's sparse layers); the cache keeps every position";
        sparse_local: i64 = 1, "sparse_block: the most recent blocks every head sees (the query's own included)";
        sparse_stride: Option<Positive<i64>> = None, "sparse_block: the stride of the blocks each head sees beyond the local ones, offset by the head";
        softcap: Option<Positive<f64>> = None, "cap scores to (-c, c) with c·tanh(s / c) before the softmax";
        sinks: bool = false, "learned per-head sink logits `sinks` [Hq] in the node's scope join each softmax's denominator (gpt-oss)";
        gqa: Gqa = Gqa::Grouped, "grouped: query head h reads key/value head h / (Hq / Hkv); tiled: h mod Hkv";
        kv_out: Option<i64> = None, "publish this node's keys and values (all positions, after its cache) and its mask under this number, for later `kv_from` nodes of the same forward";
        kv_from: Option<i64> = None, "attend over the keys, values and mask an earlier node published under this number (KV-shared layers): the node takes [q] alone, keeps no cache, and its output is as wide as q's heads";
        bidirectional_spans: bool = false, "causal, but the positions of one span of the forward's segment ids (an image's tokens: ids of 0 or more, text -1) also see each other (the image tokens of a vision-language prompt)";
    }
}

impl Attention {
    /// The sliding window as the cache counts it.
    pub fn window_size(&self) -> Option<i32> {
        self.window.map(|w| w.0.min(i32::MAX as i64) as i32)
    }

    /// The aligned chunk of `local_chunk` attention.
    pub fn local_chunk_size(&self) -> Option<i32> {
        self.local_chunk.map(|b| b.0.min(i32::MAX as i64) as i32)
    }

    /// The window the mask of a multi-token call allows.
    pub fn chunk_window_size(&self) -> Option<i32> {
        self.chunk_window
            .map(|w| w.0.min(i32::MAX as i64) as i32)
            .or(self.window_size())
    }

    pub fn resolve(&self, scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        if let Some(n) = self.kv_out.filter(|n| *n < 0) {
            return Err(OpError::new(
                "kv_out",
                format!("{n} is not a number of 0 or more"),
            ));
        }
        match (self.kv_from, inputs.len()) {
            (Some(n), _) if n < 0 => {
                return Err(OpError::new(
                    "kv_from",
                    format!("{n} is not a number of 0 or more"),
                ))
            }
            (Some(_), 1) => {
                if self.kv_out.is_some()
                    || self.sinks
                    || !self.causal
                    || self.bidirectional_spans
                    || self.local_chunk.is_some()
                    || self.sparse_block.is_some()
                {
                    return Err(OpError::new(
                        "kv_from",
                        "a node reading shared keys and values neither publishes its own, has sinks, nor is bidirectional (nor over spans), nor masks by positions (local_chunk, sparse_block): it takes the publisher's mask",
                    ));
                }
                let (hq, dq) = expect_heads(inputs, 0)?;
                return Ok(Resolved::pure(Layout {
                    dim: dq,
                    heads: Some(hq),
                }));
            }
            (Some(_), n) => {
                return Err(OpError::new(
                    "in",
                    format!("with kv_from the node takes [q] alone, not {n} inputs"),
                ))
            }
            (None, 3) => {}
            (None, 4) => {
                if inputs[3] != KEEP_MASK {
                    return Err(OpError::new(
                        "in",
                        "the fourth input is a keep mask: an index_topk node's output",
                    ));
                }
            }
            (None, n) => {
                return Err(OpError::new(
                    "in",
                    format!("{n} input(s): attention takes [q, k, v] (or [q] with kv_from, or [q, k, v, keep])"),
                ))
            }
        }
        let (hq, dq) = expect_heads(inputs, 0)?;
        let (hk, dk) = expect_heads(inputs, 1)?;
        let (hv, dv) = expect_heads(inputs, 2)?;
        if dq != dk {
            return Err(OpError::new(
                "in",
                format!("q head size {dq} != k head size {dk}"),
            ));
        }
        if self.grid_window.is_some() && self.causal {
            return Err(OpError::new(
                "grid_window",
                "tiles of a 2-D grid are for non-causal attention (causal: false)",
            ));
        }
        match (self.chunk_window, self.window) {
            (Some(_), None) => {
                return Err(OpError::new(
                    "chunk_window",
                    "needs a window (the positions the cache keeps)",
                ))
            }
            (Some(c), Some(w)) if c.0 < w.0 => {
                return Err(OpError::new(
                    "chunk_window",
                    format!("{} is below window {}", c.0, w.0),
                ))
            }
            _ => {}
        }
        if self.local_chunk.is_some()
            && (!self.causal
                || self.window.is_some()
                || self.bidirectional_spans
                || self.kv_out.is_some())
        {
            return Err(OpError::new(
                "local_chunk",
                "local chunks are causal, without a window, spans or published keys",
            ));
        }
        match (self.sparse_block, self.sparse_stride) {
            (Some(_), None) | (None, Some(_)) => {
                return Err(OpError::new(
                    "sparse_block",
                    "sparse_block and sparse_stride go together",
                ))
            }
            (Some(_), Some(_))
                if self.local_chunk.is_some()
                    || !self.causal
                    || self.window.is_some()
                    || self.bidirectional_spans
                    || self.kv_out.is_some()
                    || self.gqa == Gqa::Tiled =>
            {
                return Err(OpError::new(
                    "sparse_block",
                    "block-sparse attention is causal, without local chunks, a window, spans, published keys or tiled heads",
                ))
            }
            _ => {}
        }
        if self.sparse_local < 1 {
            return Err(OpError::new(
                "sparse_local",
                format!("{}: at least the query's own block", self.sparse_local),
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
        if self.bidirectional_spans && !self.causal {
            return Err(OpError::new(
                "bidirectional_spans",
                "spans widen a causal mask: not for non-causal attention",
            ));
        }
        if self.sinks && scope.is_empty() {
            return Err(OpError::new(
                "sinks",
                "the sinks tensor needs a scope (call the attention from a block with one)",
            ));
        }
        let weights = if self.sinks {
            vec![WeightReq::dense(
                "sinks",
                scope.to_string(),
                "sinks",
                vec![hq],
            )]
        } else {
            Vec::new()
        };
        Ok(Resolved {
            weights,
            state: Some(self.window_size().map_or(StateKind::Kv, StateKind::Window)),
            ..Resolved::pure(Layout {
                dim: dv,
                heads: Some(hq),
            })
        })
    }
}

op! {
    /// The keys each query keeps, as DeepSeek-V3.2's lightning indexer picks them: over inputs [q [B, H, T, D], k [B, 1, T, D], w [B, T, H]] and every key so far (the node keeps its own key cache), the score of key j for query i is Σ_h relu(q_h,i · k_j) · w_i,h · scale (the heads summed in order; future keys of a multi-token call, and a batch's padding, score -inf), and each query keeps the `topk` keys MLX's argpartition puts last. Gives the keep mask [B, 1, T, S] an attention node takes as its fourth input; while there are `topk` keys or fewer, a true scalar (every key kept).
    "index_topk" (3..=3) => IndexTopk {
        topk: Positive<i64>, "keys each query keeps";
        scale: f64, "factor on the head weights w (mlx-lm: heads ** -0.5 · head_dim ** -0.5)";
    }
}

/// The layout that stands for a keep mask (an `index_topk` or
/// `block_topk` node's output, an attention node's fourth input): one
/// "head" of width 0.
pub const KEEP_MASK: Layout = Layout {
    dim: 0,
    heads: Some(1),
};

/// An indexer's queries [B, H, T, D] and one key head of their size: H.
fn index_queries(inputs: &[Layout]) -> Result<i64, OpError> {
    let (hq, dq) = expect_heads(inputs, 0)?;
    let (hk, dk) = expect_heads(inputs, 1)?;
    if hk != 1 || dk != dq {
        return Err(OpError::new(
            "in",
            format!("k must be one head of q's size {dq}, got {hk} of {dk}"),
        ));
    }
    Ok(hq)
}

/// An indexer's result: a keep mask, and its own key cache.
fn keep_mask() -> Resolved {
    Resolved {
        state: Some(StateKind::Kv),
        ..Resolved::pure(KEEP_MASK)
    }
}

impl IndexTopk {
    pub fn resolve(&self, _scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let hq = index_queries(inputs)?;
        let w = super::expect_flat(inputs, 2)?;
        if w != hq {
            return Err(OpError::new(
                "in",
                format!("w has {w} weights per position, q has {hq} heads"),
            ));
        }
        if !self.scale.is_finite() {
            return Err(OpError::new(
                "scale",
                format!("{} is not finite", self.scale),
            ));
        }
        Ok(keep_mask())
    }
}

op! {
    /// The key blocks each query keeps, as MiniMax M3's block indexer picks them: over inputs [q [B, H, T, D], k [B, 1, T, D]] and every key so far (the node keeps its own key cache), key j scores q_h,i · k_j in float32 (future keys -inf); a block of `block_size` consecutive keys (the last may be shorter) scores its best key; the `local` most recent blocks up to the query's own always win; each index head keeps its `topk` best blocks (MLX's argpartition), the future keys in them masked again, and serves `repeat` consecutive query heads. Gives the keep mask [B, H·repeat, T, S] an attention node takes as its fourth input; while there are `topk` blocks or fewer, a true scalar.
    "block_topk" (2..=2) => BlockTopk {
        block_size: Positive<i64>, "keys per block";
        topk: Positive<i64>, "blocks each query keeps";
        local: i64 = 1, "the most recent blocks (the query's own among them) kept whatever they score";
        repeat: Positive<i64> = Positive(1), "query heads each index head serves";
    }
}

impl BlockTopk {
    pub fn resolve(&self, _scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        index_queries(inputs)?;
        if self.local < 0 {
            return Err(OpError::new(
                "local",
                format!("{} is not 0 or more", self.local),
            ));
        }
        Ok(keep_mask())
    }
}
