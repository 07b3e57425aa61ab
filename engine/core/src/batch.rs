//! Several sequences decoded together: a [`BatchCache`] holds their caches as
//! one batch whose key/value columns are right-aligned (each row's positions
//! end at the same column; shorter rows have masked columns in front). A
//! sequence is prefilled alone and joins with [`BatchCache::from_single`] and
//! [`BatchCache::extend`]; finished ones leave with [`BatchCache::retain`].
//!
//! Each row keeps its own positions (RoPE offsets and learned position rows
//! come from [`Positions`]) and sees only its own keys (the key mask), so a
//! row's tokens are those it would get decoded alone. Sliding windows are
//! kept as masks over full-length keys rather than rotated buffers, so that
//! every layer shares one column layout. Convolution and recurrent states
//! are per row already and are stacked along the batch axis.
use mlx_rs::error::Exception;
use mlx_rs::Array;

use crate::cache::{cat, causal_mask, exception, seq, seq_update, CacheState, Mask, ModelCache};

/// The keys/values of one attention op for a whole batch: `[B, H, cap, D]`
/// buffers of which the first `len` columns are in use.
#[derive(Debug, Clone)]
pub struct BatchKv {
    pub(crate) keys: Array,
    pub(crate) values: Array,
    pub(crate) len: i32,
    /// A sliding window, applied as a mask.
    window: Option<i32>,
}

impl BatchKv {
    /// Columns added when the buffers are full, as the standard cache grows.
    pub const STEP: i32 = 256;

    pub(crate) fn update_and_fetch(
        &mut self,
        keys: &Array,
        values: &Array,
    ) -> Result<(Array, Array), Exception> {
        let t = keys.shape()[2];
        let cap = self.keys.shape()[2];
        if self.len + t > cap {
            let steps = (Self::STEP + t - 1) / Self::STEP * Self::STEP;
            let grow = |x: &Array| -> Result<Array, Exception> {
                let s = x.shape();
                let fresh = mlx_rs::ops::zeros_dtype(&[s[0], s[1], steps, s[3]], x.dtype())?;
                cat(&[&seq(x, 0, self.len)?, &fresh])
            };
            self.keys = grow(&self.keys)?;
            self.values = grow(&self.values)?;
        }
        let (a, b) = (self.len, self.len + t);
        self.keys = seq_update(&self.keys, a, b, keys)?;
        self.values = seq_update(&self.values, a, b, values)?;
        self.len = b;
        Ok((seq(&self.keys, 0, b)?, seq(&self.values, 0, b)?))
    }

    /// The mask of `t` new positions over this op's columns (before the
    /// update); padding is hidden separately by the batch's key mask.
    pub(crate) fn mask(&self, t: i32) -> Result<Mask, Exception> {
        match self.window {
            Some(w) if self.len + t > w => Ok(Mask::Array(causal_mask(t, self.len, Some(w)))),
            _ if t > 1 => Ok(Mask::Causal),
            _ => Ok(Mask::None),
        }
    }

    /// Rows of the batch.
    pub(crate) fn rows(&self) -> usize {
        self.keys.shape()[0] as usize
    }

    /// The first `len` columns, `front` zero columns before them.
    fn padded(&self, front: i32) -> Result<(Array, Array), Exception> {
        Ok((
            left_pad(&seq(&self.keys, 0, self.len)?, front)?,
            left_pad(&seq(&self.values, 0, self.len)?, front)?,
        ))
    }
}

/// `[B, H, T, D]` with `front` zero columns before the positions.
fn left_pad(x: &Array, front: i32) -> Result<Array, Exception> {
    if front == 0 {
        return Ok(x.clone());
    }
    let s = x.shape();
    let zeros = mlx_rs::ops::zeros_dtype(&[s[0], s[1], front, s[3]], x.dtype())?;
    cat(&[&zeros, x])
}

/// Per-row positions of a batched call: the positions each row has seen
/// before it, as an int32 `[B]` array and on the host.
#[derive(Debug)]
pub struct Positions {
    pub array: Array,
    pub host: Vec<i32>,
}

/// The caches of a batch of sequences (see the module docs).
#[derive(Debug)]
pub struct BatchCache {
    pub(crate) cache: ModelCache,
    /// Masked columns in front of each row.
    pads: Vec<i32>,
    /// Columns in use (equal in every attention op).
    len: i32,
}

impl BatchCache {
    /// A batch of one from the cache of a sequence processed alone. Caches
    /// that cannot join a batch are refused: quantized keys/values and a
    /// rotating cache that pins its first positions (`max_kv_size`).
    pub fn from_single(single: ModelCache) -> Result<BatchCache, Exception> {
        let len = single.offset;
        let mut slots = Vec::with_capacity(single.slots.len());
        for slot in single.slots {
            slots.push(match slot {
                CacheState::Kv(c) => {
                    let (keys, values) = c
                        .held()?
                        .ok_or_else(|| exception("a sequence joins a batch after its prefill"))?;
                    CacheState::Batch(BatchKv {
                        keys,
                        values,
                        len,
                        window: None,
                    })
                }
                CacheState::Rotating(c) => {
                    let held = c.held()?;
                    if held.keep > 0 {
                        return Err(exception(
                            "a rotating cache that keeps its first positions (max_kv_size) cannot join a batch",
                        ));
                    }
                    let (k, v) = held
                        .kv
                        .ok_or_else(|| exception("a sequence joins a batch after its prefill"))?;
                    let front = held.offset - k.shape()[2];
                    CacheState::Batch(BatchKv {
                        keys: left_pad(&k, front)?,
                        values: left_pad(&v, front)?,
                        len: held.offset,
                        window: Some(held.max_size),
                    })
                }
                CacheState::Quantized(_) => {
                    return Err(exception("a quantized KV cache cannot join a batch"))
                }
                CacheState::Batch(_) => return Err(exception("the cache is a batch already")),
                other @ (CacheState::Conv(_) | CacheState::Recurrent { .. }) => other,
            });
        }
        Ok(BatchCache {
            cache: ModelCache {
                slots,
                offset: len,
                position_delta: 0,
            },
            pads: vec![0],
            len,
        })
    }

    /// A batch of no sequences.
    pub fn empty() -> BatchCache {
        BatchCache {
            cache: ModelCache {
                slots: Vec::new(),
                offset: 0,
                position_delta: 0,
            },
            pads: Vec::new(),
            len: 0,
        }
    }

    /// Sequences in the batch.
    pub fn rows(&self) -> usize {
        self.pads.len()
    }

    /// Positions each row has seen.
    pub fn lengths(&self) -> Vec<i32> {
        self.pads.iter().map(|p| self.len - p).collect()
    }

    /// Appends the rows of `other` (columns right-aligned).
    pub fn extend(&mut self, other: BatchCache) -> Result<(), Exception> {
        if self.pads.is_empty() {
            *self = other;
            return Ok(());
        }
        if other.cache.slots.len() != self.cache.slots.len() {
            return Err(exception("batches of different models"));
        }
        let len = self.len.max(other.len);
        let (fa, fb) = (len - self.len, len - other.len);
        for (a, b) in self.cache.slots.iter_mut().zip(other.cache.slots) {
            let stacked = match (&*a, b) {
                (CacheState::Batch(x), CacheState::Batch(y)) => {
                    let (ka, va) = x.padded(fa)?;
                    let (kb, vb) = y.padded(fb)?;
                    CacheState::Batch(BatchKv {
                        keys: mlx_rs::ops::concatenate(&[&ka, &kb], 0)?,
                        values: mlx_rs::ops::concatenate(&[&va, &vb], 0)?,
                        len,
                        window: x.window,
                    })
                }
                (CacheState::Conv(x), CacheState::Conv(y)) => {
                    let rows = match (&x.rows, &y.rows) {
                        (Some(p), Some(q)) => Some(mlx_rs::ops::concatenate(&[p, q], 0)?),
                        _ => return Err(exception("a convolution state is empty")),
                    };
                    CacheState::Conv(crate::cache::ConvState {
                        keep: x.keep,
                        rows,
                        offset: x.offset.max(y.offset),
                    })
                }
                (
                    CacheState::Recurrent {
                        state: Some(p),
                        offset,
                    },
                    CacheState::Recurrent { state: Some(q), .. },
                ) => CacheState::Recurrent {
                    state: Some(mlx_rs::ops::concatenate(&[p, &q], 0)?),
                    offset: *offset,
                },
                _ => return Err(exception("cache slots of different kinds")),
            };
            *a = stacked;
        }
        self.pads.iter_mut().for_each(|p| *p += fa);
        self.pads.extend(other.pads.iter().map(|p| p + fb));
        self.len = len;
        self.cache.offset = len;
        Ok(())
    }

    /// Keeps the rows `keep` (in that order), dropping columns no kept row
    /// uses.
    pub fn retain(&mut self, keep: &[usize]) -> Result<(), Exception> {
        if keep.iter().any(|&r| r >= self.pads.len()) {
            return Err(exception("row index past the batch"));
        }
        self.pads = keep.iter().map(|&r| self.pads[r]).collect();
        if keep.is_empty() {
            self.cache.slots.clear();
            self.len = 0;
            return Ok(());
        }
        let idx: Vec<i32> = keep.iter().map(|&r| r as i32).collect();
        let idx = Array::from_slice(&idx, &[idx.len() as i32]);
        let drop = self.pads.iter().copied().min().unwrap_or(0);
        for slot in &mut self.cache.slots {
            match slot {
                CacheState::Batch(c) => {
                    c.keys = seq(&c.keys.take_axis(&idx, 0)?, drop, c.len)?;
                    c.values = seq(&c.values.take_axis(&idx, 0)?, drop, c.len)?;
                    c.len -= drop;
                }
                CacheState::Conv(c) => {
                    if let Some(r) = &c.rows {
                        c.rows = Some(r.take_axis(&idx, 0)?);
                    }
                }
                CacheState::Recurrent { state, .. } => {
                    if let Some(s) = state {
                        *state = Some(s.take_axis(&idx, 0)?);
                    }
                }
                _ => return Err(exception("a batch holds batch slots only")),
            }
        }
        self.pads.iter_mut().for_each(|p| *p -= drop);
        self.len -= drop;
        self.cache.offset = self.len;
        Ok(())
    }

    /// `[B, len + t]`: true where a row's keys are real, for a call of `t`
    /// new positions.
    pub(crate) fn key_mask(&self, t: i32) -> Array {
        let cols = self.len + t;
        let mut allowed = Vec::with_capacity(self.pads.len() * cols as usize);
        for &p in &self.pads {
            allowed.extend((0..cols).map(|c| c >= p));
        }
        Array::from_slice(&allowed, &[self.pads.len() as i32, cols])
    }

    /// The positions each row has seen, before a call.
    pub(crate) fn positions(&self) -> Positions {
        let host = self.lengths();
        Positions {
            array: Array::from_slice(&host, &[host.len() as i32]),
            host,
        }
    }

    pub(crate) fn advance(&mut self, t: i32) {
        self.len += t;
        self.cache.offset = self.len;
    }

    /// Arrays holding the state, for evaluating it.
    pub fn arrays(&self) -> Vec<&Array> {
        self.cache.arrays()
    }
}
