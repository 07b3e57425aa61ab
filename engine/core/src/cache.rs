//! Per-op state kept between forward calls. Ops declare the kind they need
//! (see `Resolved::state`); a model's cache is derived from its plan, with
//! options choosing the attention cache flavour (standard, rotating window,
//! quantized) as mlx-lm's `make_prompt_cache` / `maybe_quantize_kv_cache` do.
use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::{ArrayIndex, Ellipsis, TryIndexOp};
use mlx_rs::Array;

pub use crate::batch::BatchKv;

/// A kind of state an op declares (its cache slot).
pub use lmspec_spec::ops::StateKind as CacheKind;

/// How attention caches are made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheOptions {
    /// Keep at most this many positions (a rotating window that pins the
    /// first 4 tokens), as mlx-lm's `max_kv_size`.
    pub max_kv_size: Option<i32>,
}

/// Positions a rotating cache made from `max_kv_size` always keeps.
pub const ROTATING_KEEP: i32 = 4;

/// Making the state a [`CacheKind`] declares.
pub trait CreateState {
    fn create(self, opts: CacheOptions) -> CacheState;
}

impl CreateState for CacheKind {
    fn create(self, opts: CacheOptions) -> CacheState {
        match (self, opts.max_kv_size) {
            (CacheKind::Kv, Some(max)) => {
                CacheState::Rotating(RotatingKvCache::new(max, ROTATING_KEEP))
            }
            (CacheKind::Kv, None) => CacheState::Kv(KvCache::default()),
            (CacheKind::Window(n), _) => CacheState::Rotating(RotatingKvCache::new(n, 0)),
            (CacheKind::Conv(n), _) => CacheState::Conv(ConvState {
                keep: n,
                rows: None,
                offset: 0,
            }),
            (CacheKind::Recurrent, _) => CacheState::Recurrent {
                state: None,
                offset: 0,
            },
        }
    }
}

/// The mask attention needs for a call of `t` new positions.
#[derive(Debug, Clone)]
pub enum Mask {
    None,
    Causal,
    /// Boolean [t, keys]: true where attention is allowed.
    Array(Array),
}

/// The boolean mask of `t` query positions starting at `offset` over the
/// `offset + t` keys so far: causal, and within `window` positions when
/// given (mlx-lm's `create_causal_mask`).
pub fn causal_mask(t: i32, offset: i32, window: Option<i32>) -> Array {
    let cols = offset + t;
    let mut allowed = Vec::with_capacity((t * cols).max(0) as usize);
    for row in 0..t {
        let l = offset + row;
        for r in 0..cols {
            allowed.push(l >= r && window.is_none_or(|w| l < r + w));
        }
    }
    Array::from_slice(&allowed, &[t, cols])
}

/// Which key positions a query position sees, by head: the masks of
/// attention patterns that depend on absolute positions (and which a
/// rotating cache, which drops positions, cannot serve).
#[derive(Debug, Clone, Copy)]
pub enum PositionRule {
    /// Causal within aligned chunks: position `l` sees `r <= l` when
    /// `r / chunk == l / chunk` (mlx-lm's llama4 `chunk_mask`).
    LocalChunk(i32),
    /// Causal, by blocks of `block` positions: query block `lb` sees key
    /// block `rb <= lb` when `lb - rb < local`, or when `(rb + h + 1) %
    /// stride == 0` for query head `h` (phi3small's block-sparse layers).
    BlockSparse { block: i32, local: i32, stride: i32 },
}

impl PositionRule {
    /// Whether query head `h` at position `l` sees position `r`.
    pub fn allows(self, h: i32, l: i32, r: i32) -> bool {
        if r < 0 || r > l {
            return false;
        }
        match self {
            PositionRule::LocalChunk(c) => r / c == l / c,
            PositionRule::BlockSparse {
                block,
                local,
                stride,
            } => {
                let (lb, rb) = (l / block, r / block);
                lb - rb < local || (rb + h + 1) % stride == 0
            }
        }
    }

    /// Query heads whose masks differ (1 where the rule ignores the head).
    fn heads(self, heads: i32) -> i32 {
        match self {
            PositionRule::LocalChunk(_) => 1,
            PositionRule::BlockSparse { .. } => heads,
        }
    }

    /// Whether every query of a call sees every earlier key (plain causal
    /// attention does) while all positions so far are below `end`.
    fn is_causal_below(self, end: i32) -> bool {
        match self {
            PositionRule::LocalChunk(c) => end <= c,
            PositionRule::BlockSparse { block, local, .. } => end <= block * local,
        }
    }

    /// The boolean mask `[rows, heads, t, cols]` of `t` new positions per
    /// row, row `b` having seen `seen[b]` positions before the call, its
    /// keys right-aligned in `cols` columns (padding in front).
    pub(crate) fn mask(self, t: i32, heads: i32, seen: &[i32], cols: i32) -> Array {
        let heads = self.heads(heads);
        let rows = seen.len() as i32;
        let mut allowed = Vec::with_capacity((rows * heads * t * cols).max(0) as usize);
        for &before in seen {
            let front = cols - t - before;
            for h in 0..heads {
                for row in 0..t {
                    let l = before + row;
                    for c in 0..cols {
                        allowed.push(self.allows(h, l, c - front));
                    }
                }
            }
        }
        Array::from_slice(&allowed, &[rows, heads, t, cols])
    }
}

/// Keys and values for attention, dense or quantized (data, scales, biases).
#[derive(Debug, Clone)]
pub enum KvView {
    Dense(Array, Array),
    Quantized {
        keys: [Array; 3],
        values: [Array; 3],
        group_size: i32,
        bits: i32,
    },
}

#[derive(Debug, Clone)]
pub enum CacheState {
    Kv(KvCache),
    Rotating(RotatingKvCache),
    Quantized(QuantizedKvCache),
    Conv(ConvState),
    /// A recurrence's state (none before the first call).
    Recurrent {
        state: Option<Array>,
        offset: i32,
    },
    /// Keys/values of several sequences at once (see [`BatchCache`]).
    Batch(BatchKv),
}

/// A causal convolution's memory: its last `keep` input rows `[B, keep, D]`
/// (none before the first call: zeros).
#[derive(Debug, Clone)]
pub struct ConvState {
    pub keep: i32,
    pub rows: Option<Array>,
    pub offset: i32,
}

impl ConvState {
    /// `x [B, T, ...]` with the remembered rows (axis 1) in front, zeros
    /// standing for rows not yet seen (at first, or where a state holds
    /// fewer than `keep`, as another engine's cache file may), keeping the
    /// last `keep` rows of the result for the next call.
    pub fn extend(&mut self, x: &Array) -> Result<Array, Exception> {
        let s = x.shape().to_vec();
        let held = self.rows.as_ref().map_or(0, |r| r.shape()[1]);
        let zeros = match self.keep - held {
            missing if missing > 0 => {
                let mut shape = s.clone();
                shape[1] = missing;
                Some(mlx_rs::ops::zeros_dtype(&shape, x.dtype())?)
            }
            _ => None,
        };
        let parts: Vec<&Array> = zeros.iter().chain(&self.rows).chain([x]).collect();
        let all = mlx_rs::ops::concatenate(&parts, 1)?;
        let n = all.shape()[1];
        self.rows = Some(all.try_index((.., n - self.keep..))?);
        self.offset += s[1];
        Ok(all)
    }
}

impl CacheState {
    /// Positions processed so far.
    pub fn offset(&self) -> i32 {
        match self {
            CacheState::Kv(c) => c.offset,
            CacheState::Rotating(c) => c.offset,
            CacheState::Quantized(c) => c.offset,
            CacheState::Conv(c) => c.offset,
            CacheState::Recurrent { offset, .. } => *offset,
            CacheState::Batch(c) => c.len,
        }
    }

    /// The mask for a call of `t` positions, decided before the update;
    /// `window` widens a rotating cache's window for multi-token calls
    /// (mlx-lm's `make_mask(N, window_size=...)`).
    pub fn mask(&self, t: i32, window: Option<i32>) -> Result<Mask, Exception> {
        match self {
            CacheState::Rotating(c) => c.mask(t, window),
            CacheState::Batch(c) => c.mask(t),
            _ if t > 1 => Ok(Mask::Causal),
            _ => Ok(Mask::None),
        }
    }

    /// The mask of a [`PositionRule`] for a call of `t` positions with
    /// `heads` query heads, decided before the update. A batch's rows sit
    /// at their own positions (`seen`: each row's positions before the
    /// call); a rotating cache, which drops positions, cannot serve it.
    pub fn rule_mask(
        &self,
        rule: PositionRule,
        t: i32,
        heads: i32,
        seen: Option<&[i32]>,
    ) -> Result<Mask, Exception> {
        match self {
            CacheState::Batch(c) => {
                let rows = c.rows();
                let seen: Vec<i32> = (0..rows)
                    .map(|b| seen.and_then(|s| s.get(b)).copied().unwrap_or(c.len))
                    .collect();
                Ok(Mask::Array(rule.mask(t, heads, &seen, c.len + t)))
            }
            CacheState::Rotating(_) => Err(Exception::custom(
                "this attention reads keys by their positions; a rotating cache \
                 (max_kv_size) drops positions: run this model without max_kv_size",
            )),
            _ => {
                let offset = self.offset();
                if rule.is_causal_below(offset + t) {
                    return self.mask(t, None);
                }
                Ok(Mask::Array(rule.mask(t, heads, &[offset], offset + t)))
            }
        }
    }

    /// Stores new keys/values ([B, H, T, D]) and returns all keys/values.
    pub fn update_and_fetch(&mut self, keys: &Array, values: &Array) -> Result<KvView, Exception> {
        match self {
            CacheState::Kv(c) => c
                .update_and_fetch(keys, values)
                .map(|(k, v)| KvView::Dense(k, v)),
            CacheState::Rotating(c) => c
                .update_and_fetch(keys, values)
                .map(|(k, v)| KvView::Dense(k, v)),
            CacheState::Quantized(c) => c.update_and_fetch(keys, values),
            CacheState::Batch(c) => c
                .update_and_fetch(keys, values)
                .map(|(k, v)| KvView::Dense(k, v)),
            CacheState::Conv(_) | CacheState::Recurrent { .. } => {
                Err(exception("a recurrent state holds no keys/values"))
            }
        }
    }
}

/// Keys, values and masks that attention nodes publish (`kv_out`) for
/// later nodes of the same forward to attend over (`kv_from`: KV-shared
/// layers). One table per thread, cleared when a forward starts.
pub(crate) mod shared {
    use std::cell::RefCell;

    use super::{exception, KvView, Mask};
    use mlx_rs::error::Exception;

    thread_local! {
        static TABLE: RefCell<Vec<Option<(Mask, KvView)>>> = const { RefCell::new(Vec::new()) };
    }

    /// Forgets what the previous forward published.
    pub(crate) fn clear() {
        TABLE.with_borrow_mut(|t| t.clear());
    }

    pub(crate) fn publish(n: i64, mask: &Mask, kv: &KvView) {
        let n = n as usize;
        TABLE.with_borrow_mut(|t| {
            if t.len() <= n {
                t.resize(n + 1, None);
            }
            t[n] = Some((mask.clone(), kv.clone()));
        });
    }

    pub(crate) fn read(n: i64) -> Result<(Mask, KvView), Exception> {
        TABLE
            .with_borrow(|t| t.get(n as usize).cloned().flatten())
            .ok_or_else(|| {
                exception(format!(
                    "attention: kv_from {n}: no earlier node of this forward published keys and values under {n} (kv_out)"
                ))
            })
    }
}

pub(crate) fn exception(e: impl std::fmt::Display) -> Exception {
    Exception::custom(e.to_string())
}

/// `x[..., a:b, :]` on the sequence axis.
pub(crate) fn seq(x: &Array, a: i32, b: i32) -> Result<Array, Exception> {
    x.try_index(&[Ellipsis.index_op(), (a..b).index_op(), (..).index_op()][..])
}

/// `x[..., a:b, :] = update` for `[B, H, T, D]` buffers, returning the new
/// array: one `SliceUpdate` primitive (the generic index-update path adds
/// two reshapes per call, which a decode step pays per layer).
pub(crate) fn seq_update(x: &Array, a: i32, b: i32, update: &Array) -> Result<Array, Exception> {
    let (xs, us) = (x.shape(), update.shape());
    if xs.len() != 4
        || us.len() != 4
        || us[2] != b - a
        || us[0] != xs[0]
        || us[1] != xs[1]
        || us[3] != xs[3]
    {
        return Err(exception(format!(
            "cache update of shape {us:?} does not fit positions {a}..{b} of a buffer of shape {xs:?}"
        )));
    }
    let start = [0, 0, a, 0];
    let stop = [xs[0], xs[1], b, xs[3]];
    let strides = [1; 4];
    let stream = mlx_rs::Stream::thread_local_or_default();
    // SAFETY: `res` is a fresh handle that the call fills (or leaves empty
    // on failure, when it is freed here); the inputs are borrowed for the
    // call; the start/stop/stride arrays hold four entries each.
    unsafe {
        let mut res = mlx_sys::mlx_array_new();
        let rc = mlx_sys::mlx_slice_update(
            &mut res,
            x.as_ptr(),
            update.as_ptr(),
            start.as_ptr(),
            4,
            stop.as_ptr(),
            4,
            strides.as_ptr(),
            4,
            stream.as_ptr(),
        );
        if rc != 0 {
            mlx_sys::mlx_array_free(res);
            return Err(exception("slice_update failed"));
        }
        Ok(Array::from_ptr(res))
    }
}

/// The first `offset` positions of full buffers (the buffers themselves
/// when they hold exactly that many).
fn upto_offset(k: &Array, v: &Array, offset: i32) -> Result<(Array, Array), Exception> {
    if offset < k.shape()[2] {
        Ok((seq(k, 0, offset)?, seq(v, 0, offset)?))
    } else {
        Ok((k.clone(), v.clone()))
    }
}

pub(crate) fn cat(parts: &[&Array]) -> Result<Array, Exception> {
    mlx_rs::ops::concatenate(parts, 2)
}

pub(crate) fn zeros_like_steps(x: &Array, steps: i32) -> Result<Array, Exception> {
    let s = x.shape();
    mlx_rs::ops::zeros_dtype(&[s[0], s[1], steps, s[3]], x.dtype())
}

/// Grows its buffers `STEP` positions at a time, as mlx-lm's `KVCache` does,
/// so that decoding one token writes into preallocated space.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    pub(crate) keys: Option<Array>,
    pub(crate) values: Option<Array>,
    pub(crate) offset: i32,
}

impl KvCache {
    pub const STEP: i32 = 256;

    pub fn offset(&self) -> i32 {
        self.offset
    }

    pub fn update_and_fetch(
        &mut self,
        keys: &Array,
        values: &Array,
    ) -> Result<(Array, Array), Exception> {
        let t = keys.shape()[2];
        let prev = self.offset;
        let capacity = self.keys.as_ref().map_or(0, |k| k.shape()[2]);
        if self.keys.is_none() || prev + t > capacity {
            let steps = (Self::STEP + t - 1) / Self::STEP * Self::STEP;
            let grow = |x: &Array, old: Option<&Array>| -> Result<Array, Exception> {
                let fresh = zeros_like_steps(x, steps)?;
                match old {
                    None => Ok(fresh),
                    Some(old) if prev % Self::STEP != 0 => cat(&[&seq(old, 0, prev)?, &fresh]),
                    Some(old) => cat(&[old, &fresh]),
                }
            };
            self.keys = Some(grow(keys, self.keys.as_ref())?);
            self.values = Some(grow(values, self.values.as_ref())?);
        }
        self.offset += t;
        let (Some(k), Some(v)) = (&self.keys, &self.values) else {
            unreachable!("buffers allocated above")
        };
        let k = seq_update(k, prev, self.offset, keys)?;
        let v = seq_update(v, prev, self.offset, values)?;
        let out = upto_offset(&k, &v, self.offset)?;
        self.keys = Some(k);
        self.values = Some(v);
        Ok(out)
    }

    /// The keys and values of the positions held, in order.
    pub(crate) fn held(&self) -> Result<Option<(Array, Array)>, Exception> {
        match (&self.keys, &self.values) {
            (Some(k), Some(v)) => upto_offset(k, v, self.offset).map(Some),
            _ => Ok(None),
        }
    }

    /// The same cache with keys/values quantized (mlx-lm `to_quantized`).
    pub fn to_quantized(&self, group_size: i32, bits: i32) -> Result<QuantizedKvCache, Exception> {
        let q = |x: &Option<Array>| -> Result<Option<[Array; 3]>, Exception> {
            x.as_ref()
                .map(|a| mlx_rs::ops::quantize(a, group_size, bits).map(|(w, s, b)| [w, s, b]))
                .transpose()
        };
        Ok(QuantizedKvCache {
            keys: q(&self.keys)?,
            values: q(&self.values)?,
            offset: self.offset,
            group_size,
            bits,
        })
    }
}

/// A sliding window over the last `max_size` positions that always keeps the
/// first `keep`; mlx-lm's `RotatingKVCache` (multi-token calls concatenate in
/// temporal order, single tokens write in place and rotate).
#[derive(Debug, Clone)]
pub struct RotatingKvCache {
    pub(crate) keys: Option<Array>,
    pub(crate) values: Option<Array>,
    pub(crate) offset: i32,
    pub(crate) max_size: i32,
    pub(crate) keep: i32,
    pub(crate) idx: i32,
}

impl RotatingKvCache {
    pub const STEP: i32 = 256;

    pub fn new(max_size: i32, keep: i32) -> RotatingKvCache {
        RotatingKvCache {
            keys: None,
            values: None,
            offset: 0,
            max_size,
            keep,
            idx: 0,
        }
    }

    fn trim(&self, trim: i32, v: &Array, append: Option<&Array>) -> Result<Array, Exception> {
        let mut parts: Vec<Array> = if trim > 0 {
            let len = v.shape()[2];
            vec![seq(v, 0, self.keep)?, seq(v, trim + self.keep, len)?]
        } else {
            vec![v.clone()]
        };
        if let Some(a) = append {
            parts.push(a.clone());
        }
        let refs: Vec<&Array> = parts.iter().collect();
        cat(&refs)
    }

    fn temporal_order(&self, v: &Array) -> Result<Array, Exception> {
        let len = v.shape()[2];
        if self.idx == len {
            Ok(v.clone())
        } else if self.idx < self.offset {
            cat(&[
                &seq(v, 0, self.keep)?,
                &seq(v, self.idx, len)?,
                &seq(v, self.keep, self.idx)?,
            ])
        } else {
            seq(v, 0, self.idx)
        }
    }

    fn update_concat(&mut self, keys: &Array, values: &Array) -> Result<(Array, Array), Exception> {
        match (&self.keys, &self.values) {
            (Some(k), Some(v)) => {
                let k = self.temporal_order(k)?;
                let v = self.temporal_order(v)?;
                self.idx = k.shape()[2];
                let trim = self.idx - self.max_size + 1;
                self.keys = Some(self.trim(trim, &k, Some(keys))?);
                self.values = Some(self.trim(trim, &v, Some(values))?);
            }
            _ => {
                self.keys = Some(keys.clone());
                self.values = Some(values.clone());
            }
        }
        self.offset += keys.shape()[2];
        let (Some(k), Some(v)) = (&self.keys, &self.values) else {
            unreachable!("set above")
        };
        self.idx = k.shape()[2];
        Ok((k.clone(), v.clone()))
    }

    fn update_in_place(
        &mut self,
        keys: &Array,
        values: &Array,
    ) -> Result<(Array, Array), Exception> {
        let s = keys.shape()[2];
        let prev = self.offset;
        let len = self.keys.as_ref().map_or(0, |k| k.shape()[2]);
        if self.keys.is_none() || (prev >= len && len < self.max_size) {
            let new_size = Self::STEP.min(self.max_size - prev);
            let nk = zeros_like_steps(keys, new_size)?;
            let nv = zeros_like_steps(values, new_size)?;
            match (&self.keys, &self.values) {
                (Some(k), Some(v)) => {
                    self.keys = Some(cat(&[k, &nk])?);
                    self.values = Some(cat(&[v, &nv])?);
                }
                _ => {
                    self.keys = Some(nk);
                    self.values = Some(nv);
                }
            }
            self.idx = prev;
        }
        let (Some(k), Some(v)) = (self.keys.clone(), self.values.clone()) else {
            unreachable!("allocated above")
        };
        let trim = k.shape()[2] - self.max_size;
        let (k, v) = if trim > 0 {
            self.idx = self.max_size;
            (self.trim(trim, &k, None)?, self.trim(trim, &v, None)?)
        } else {
            (k, v)
        };
        if self.idx == self.max_size {
            self.idx = self.keep;
        }
        let k = seq_update(&k, self.idx, self.idx + s, keys)?;
        let v = seq_update(&v, self.idx, self.idx + s, values)?;
        self.offset += s;
        self.idx += s;
        let out = upto_offset(&k, &v, self.offset)?;
        self.keys = Some(k);
        self.values = Some(v);
        Ok(out)
    }

    /// The window, the pinned first positions, the positions seen, and the
    /// keys and values held in temporal order (the last ones seen).
    pub(crate) fn held(&self) -> Result<RotatingHeld, Exception> {
        let kv = match (&self.keys, &self.values) {
            (Some(k), Some(v)) => Some((self.temporal_order(k)?, self.temporal_order(v)?)),
            _ => None,
        };
        Ok(RotatingHeld {
            max_size: self.max_size,
            keep: self.keep,
            offset: self.offset,
            kv,
        })
    }

    pub fn update_and_fetch(
        &mut self,
        keys: &Array,
        values: &Array,
    ) -> Result<(Array, Array), Exception> {
        if keys.shape()[2] == 1 {
            self.update_in_place(keys, values)
        } else {
            self.update_concat(keys, values)
        }
    }

    /// mlx-lm's `make_mask` for the rotating cache: a multi-token call sees
    /// `window` positions (default `max_size`), of which the cache holds at
    /// most `max_size - 1` from before the call; a single token sees the
    /// `max_size` the cache keeps.
    fn mask(&self, t: i32, window: Option<i32>) -> Result<Mask, Exception> {
        if t <= 1 {
            return Ok(Mask::None);
        }
        let window = window.unwrap_or(self.max_size);
        let offset = (self.max_size - 1).min(self.offset);
        if offset + t <= window {
            return Ok(Mask::Causal);
        }
        Ok(Mask::Array(causal_mask(t, offset, Some(window))))
    }
}

/// What a rotating cache holds (see [`RotatingKvCache::held`]).
pub(crate) struct RotatingHeld {
    pub max_size: i32,
    pub keep: i32,
    pub offset: i32,
    pub kv: Option<(Array, Array)>,
}

/// Keys and values stored MLX-affine-quantized along the head dimension
/// (mlx-lm's `QuantizedKVCache`); attention runs through quantized matmuls.
#[derive(Debug, Clone)]
pub struct QuantizedKvCache {
    pub(crate) keys: Option<[Array; 3]>,
    pub(crate) values: Option<[Array; 3]>,
    pub(crate) offset: i32,
    pub(crate) group_size: i32,
    pub(crate) bits: i32,
}

impl QuantizedKvCache {
    pub const STEP: i32 = 256;

    pub fn update_and_fetch(&mut self, keys: &Array, values: &Array) -> Result<KvView, Exception> {
        let shape = keys.shape().to_vec();
        let (b, h, t) = (shape[0], shape[1], shape[2]);
        let prev = self.offset;
        let capacity = self.keys.as_ref().map_or(0, |k| k[0].shape()[2]);
        if self.keys.is_none() || prev + t > capacity {
            let per_int = 32 / self.bits;
            let steps = (Self::STEP + t - 1) / Self::STEP * Self::STEP;
            let g = self.group_size;
            let init = |dim: i32, dtype| -> Result<[Array; 3], Exception> {
                Ok([
                    mlx_rs::ops::zeros_dtype(&[b, h, steps, dim / per_int], mlx_rs::Dtype::Uint32)?,
                    mlx_rs::ops::zeros_dtype(&[b, h, steps, dim / g], dtype)?,
                    mlx_rs::ops::zeros_dtype(&[b, h, steps, dim / g], dtype)?,
                ])
            };
            let expand = |old: &[Array; 3]| -> Result<[Array; 3], Exception> {
                let grow = |x: &Array| -> Result<Array, Exception> {
                    let x = if prev % Self::STEP != 0 {
                        seq(x, 0, prev)?
                    } else {
                        x.clone()
                    };
                    let s = x.shape();
                    let fresh = mlx_rs::ops::zeros_dtype(&[s[0], s[1], steps, s[3]], x.dtype())?;
                    cat(&[&x, &fresh])
                };
                Ok([grow(&old[0])?, grow(&old[1])?, grow(&old[2])?])
            };
            match (&self.keys, &self.values) {
                (Some(k), Some(v)) => {
                    self.keys = Some(expand(k)?);
                    self.values = Some(expand(v)?);
                }
                _ => {
                    self.keys = Some(init(shape[3], keys.dtype())?);
                    self.values = Some(init(values.shape()[3], values.dtype())?);
                }
            }
        }
        self.offset += t;
        let qk = mlx_rs::ops::quantize(keys, self.group_size, self.bits)?;
        let qv = mlx_rs::ops::quantize(values, self.group_size, self.bits)?;
        let (Some(k), Some(v)) = (&self.keys, &self.values) else {
            unreachable!("allocated above")
        };
        let put =
            |buf: &[Array; 3], new: &(Array, Array, Array)| -> Result<[Array; 3], Exception> {
                Ok([
                    seq_update(&buf[0], prev, self.offset, &new.0)?,
                    seq_update(&buf[1], prev, self.offset, &new.1)?,
                    seq_update(&buf[2], prev, self.offset, &new.2)?,
                ])
            };
        let k = put(k, &qk)?;
        let v = put(v, &qv)?;
        let view = |x: &[Array; 3]| -> Result<[Array; 3], Exception> {
            if self.offset == x[0].shape()[2] {
                Ok(x.clone())
            } else {
                Ok([
                    seq(&x[0], 0, self.offset)?,
                    seq(&x[1], 0, self.offset)?,
                    seq(&x[2], 0, self.offset)?,
                ])
            }
        };
        let out = KvView::Quantized {
            keys: view(&k)?,
            values: view(&v)?,
            group_size: self.group_size,
            bits: self.bits,
        };
        self.keys = Some(k);
        self.values = Some(v);
        Ok(out)
    }
}

/// The state of every stateful op of a model, in plan order, plus the number
/// of positions already processed.
#[derive(Debug, Clone)]
pub struct ModelCache {
    pub(crate) slots: Vec<CacheState>,
    pub(crate) offset: i32,
    /// Added to the sequence position by `mrope` when a forward gives no
    /// positions (set by a forward whose inputs carry it: an image prompt).
    pub(crate) position_delta: i32,
}

impl ModelCache {
    pub fn new(kinds: &[CacheKind], opts: CacheOptions) -> ModelCache {
        ModelCache {
            slots: kinds.iter().map(|k| k.create(opts)).collect(),
            offset: 0,
            position_delta: 0,
        }
    }

    /// Positions processed so far.
    pub fn offset(&self) -> i32 {
        self.offset
    }

    /// What `mrope` adds to the sequence position of later calls.
    pub fn position_delta(&self) -> i32 {
        self.position_delta
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Removes the last `n` positions, when every slot can (standard and
    /// quantized caches can; a rotating one only before it wraps; recurrent
    /// state cannot be rewound).
    pub fn trim(&mut self, n: usize) -> bool {
        let n = n as i32;
        let ok = self.slots.iter().all(|s| match s {
            CacheState::Rotating(c) => c.offset < c.max_size,
            CacheState::Conv(_) | CacheState::Recurrent { .. } | CacheState::Batch(_) => n == 0,
            _ => true,
        });
        if !ok || n > self.offset {
            return false;
        }
        for s in &mut self.slots {
            match s {
                CacheState::Kv(c) => c.offset -= n,
                CacheState::Quantized(c) => c.offset -= n,
                CacheState::Rotating(c) => {
                    c.offset -= n;
                    c.idx -= n;
                }
                CacheState::Conv(_) | CacheState::Recurrent { .. } | CacheState::Batch(_) => {}
            }
        }
        self.offset -= n;
        true
    }

    /// Whether [`ModelCache::trim`] can remove positions now: no
    /// convolution or recurrent state, no rotating window that has wrapped.
    pub fn can_rewind(&self) -> bool {
        self.slots.iter().all(|s| match s {
            CacheState::Rotating(c) => c.offset < c.max_size,
            CacheState::Conv(_) | CacheState::Recurrent { .. } | CacheState::Batch(_) => false,
            _ => true,
        })
    }

    /// Converts standard KV caches to quantized ones once they hold at least
    /// `start` positions (mlx-lm's `maybe_quantize_kv_cache`).
    pub fn maybe_quantize(
        &mut self,
        start: i32,
        group_size: i32,
        bits: i32,
    ) -> Result<(), Exception> {
        for slot in &mut self.slots {
            if let CacheState::Kv(c) = slot {
                if c.offset >= start {
                    *slot = CacheState::Quantized(c.to_quantized(group_size, bits)?);
                }
            }
        }
        Ok(())
    }

    /// The last-axis widths of the keys and values the standard KV slots
    /// hold so far (what quantizing them groups).
    pub fn kv_widths(&self) -> Vec<i32> {
        let mut out = Vec::new();
        for s in &self.slots {
            if let CacheState::Kv(c) = s {
                for a in c.keys.iter().chain(c.values.iter()) {
                    out.extend(a.shape().last().copied());
                }
            }
        }
        out
    }

    /// A copy whose standard KV slots hold exactly the positions seen (no
    /// spare capacity), in buffers of their own: what a cache kept for
    /// later reuse should cost.
    pub fn compacted(&self) -> Result<ModelCache, Exception> {
        let mut out = self.clone();
        let one = |x: &Array| mlx_rs::ops::multiply(x, Array::from_f32(1.0).as_dtype(x.dtype())?);
        for slot in &mut out.slots {
            if let CacheState::Kv(c) = slot {
                if let Some((k, v)) = c.held()? {
                    let (k, v) = (one(&k)?, one(&v)?);
                    mlx_rs::transforms::eval([&k, &v])?;
                    c.keys = Some(k);
                    c.values = Some(v);
                }
            }
        }
        Ok(out)
    }

    /// Bytes the state takes per sequence: (fixed, per position). Attention
    /// slots count per position (a window counts every position, as a
    /// batch holds them), convolution and recurrent states are fixed.
    /// Measured on a cache that has seen at least one position.
    pub fn footprint(&self) -> (u64, u64) {
        let per = |a: &Array| a.nbytes() as u64 / a.shape()[2].max(1) as u64;
        let (mut fixed, mut position) = (0, 0);
        for s in &self.slots {
            match s {
                CacheState::Kv(KvCache { keys, values, .. })
                | CacheState::Rotating(RotatingKvCache { keys, values, .. }) => {
                    position += keys.iter().chain(values.iter()).map(per).sum::<u64>();
                }
                CacheState::Quantized(c) => {
                    position += c
                        .keys
                        .iter()
                        .chain(c.values.iter())
                        .flatten()
                        .map(per)
                        .sum::<u64>();
                }
                CacheState::Batch(c) => {
                    let rows = c.keys.shape()[0].max(1) as u64;
                    position += (per(&c.keys) + per(&c.values)) / rows;
                }
                CacheState::Conv(c) => {
                    fixed += c.rows.iter().map(|a| a.nbytes() as u64).sum::<u64>()
                }
                CacheState::Recurrent { state, .. } => {
                    fixed += state.iter().map(|a| a.nbytes() as u64).sum::<u64>()
                }
            }
        }
        (fixed, position)
    }

    /// Arrays holding the state, for evaluating it between prefill chunks.
    pub fn arrays(&self) -> Vec<&Array> {
        let mut out = Vec::new();
        for s in &self.slots {
            match s {
                CacheState::Kv(c) => out.extend(c.keys.iter().chain(c.values.iter())),
                CacheState::Rotating(c) => out.extend(c.keys.iter().chain(c.values.iter())),
                CacheState::Quantized(c) => {
                    out.extend(c.keys.iter().flatten().chain(c.values.iter().flatten()))
                }
                CacheState::Conv(c) => out.extend(c.rows.iter()),
                CacheState::Recurrent { state, .. } => out.extend(state.iter()),
                CacheState::Batch(c) => out.extend([&c.keys, &c.values]),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recurrent_state_refuses_to_be_rewound() {
        let kinds = [CacheKind::Kv, CacheKind::Conv(2), CacheKind::Recurrent];
        let mut c = ModelCache::new(&kinds, CacheOptions::default());
        c.offset = 3;
        assert!(
            !c.trim(1),
            "conv rows and recurrent state cannot be rewound"
        );
        assert_eq!(c.offset(), 3);
        assert!(c.trim(0));
        let mut state = CacheKind::Conv(2).create(CacheOptions::default());
        let CacheState::Conv(conv) = &mut state else {
            panic!("a conv slot")
        };
        let x = Array::from_slice(&[1.0f32, 2.0, 3.0], &[1, 3, 1]);
        let all = conv.extend(&x).expect("extend");
        assert_eq!(all.shape(), &[1, 5, 1], "two zero rows in front");
        let kept = conv.rows.as_ref().expect("rows");
        kept.eval().expect("eval");
        assert_eq!(kept.as_slice::<f32>(), &[2.0, 3.0]);
        assert_eq!(state.offset(), 3);
        // Token ids [B, T] (two axes), a state holding one row of the two
        // it keeps (another engine's file): a zero stands for the other.
        let mut ids = ConvState {
            keep: 2,
            rows: Some(Array::from_slice(&[7i64], &[1, 1])),
            offset: 1,
        };
        let all = ids
            .extend(&Array::from_slice(&[8i64, 9], &[1, 2]))
            .expect("extend");
        all.eval().expect("eval");
        assert_eq!(all.as_slice::<i64>(), &[0, 7, 8, 9]);
        let kept = ids.rows.as_ref().expect("rows");
        kept.eval().expect("eval");
        assert_eq!(kept.as_slice::<i64>(), &[8, 9]);
        assert_eq!(ids.offset, 3);
    }

    #[test]
    fn seq_update_writes_positions_and_checks_shapes() {
        let buf = mlx_rs::ops::zeros::<f32>(&[1, 2, 4, 3]).expect("zeros");
        let upd = Array::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], &[1, 2, 1, 3]);
        let out = seq_update(&buf, 2, 3, &upd).expect("update");
        let out = out.contiguous().expect("contiguous");
        out.eval().expect("eval");
        let v = out.as_slice::<f32>();
        // Head 0 position 2, head 1 position 2; everything else zero.
        assert_eq!(&v[6..9], &[1.0, 2.0, 3.0]);
        assert_eq!(&v[18..21], &[4.0, 5.0, 6.0]);
        assert_eq!(v.iter().filter(|x| **x != 0.0).count(), 6);
        let err = seq_update(&buf, 1, 3, &upd).expect_err("two positions, one given");
        assert!(
            err.what().contains("does not fit positions 1..3"),
            "{}",
            err.what()
        );
    }
}
