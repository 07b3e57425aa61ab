//! Per-op state kept between forward calls. Ops declare the kind they need
//! (see `Resolved::cache`); a model's cache is derived from its plan.
use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::{ArrayIndex, Ellipsis, TryIndexOp, TryIndexUpdateOp, UpdateMode};
use mlx_rs::Array;

/// A kind of state an op declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheKind {
    /// Keys and values of every position so far, grown in steps.
    Kv,
}

impl CacheKind {
    pub fn create(self) -> CacheState {
        match self {
            CacheKind::Kv => CacheState::Kv(KvCache::default()),
        }
    }
}

#[derive(Debug)]
pub enum CacheState {
    Kv(KvCache),
}

/// Grows its buffers `STEP` positions at a time, as mlx-lm's `KVCache` does,
/// so that decoding one token writes into preallocated space.
#[derive(Debug, Default)]
pub struct KvCache {
    keys: Option<Array>,
    values: Option<Array>,
    offset: i32,
}

impl KvCache {
    pub const STEP: i32 = 256;

    pub fn offset(&self) -> i32 {
        self.offset
    }

    /// Appends `keys`/`values` ([B, H, T, D]) and returns everything so far.
    pub fn update_and_fetch(
        &mut self,
        keys: &Array,
        values: &Array,
    ) -> Result<(Array, Array), Exception> {
        let t = keys.shape()[2];
        let prev = self.offset;
        let capacity = self.keys.as_ref().map_or(0, |k| k.shape()[2]);
        if self.keys.is_none() || prev + t > capacity {
            let steps = (Self::STEP + t - 1) / Self::STEP;
            let grow = |x: &Array, old: Option<&Array>| -> Result<Array, Exception> {
                let s = x.shape();
                let fresh =
                    mlx_rs::ops::zeros_dtype(&[s[0], s[1], steps * Self::STEP, s[3]], x.dtype())?;
                match old {
                    None => Ok(fresh),
                    Some(old) => {
                        let old = if prev % Self::STEP != 0 {
                            upto(old, prev)?
                        } else {
                            old.clone()
                        };
                        mlx_rs::ops::concatenate(&[&old, &fresh], 2)
                    }
                }
            };
            self.keys = Some(grow(keys, self.keys.as_ref())?);
            self.values = Some(grow(values, self.values.as_ref())?);
        }
        self.offset += t;
        let window = [
            Ellipsis.index_op(),
            (prev..self.offset).index_op(),
            (..).index_op(),
        ];
        let (k, v) = match (&self.keys, &self.values) {
            (Some(k), Some(v)) => (k, v),
            _ => unreachable!("buffers allocated above"),
        };
        let k = k
            .try_index_update(&window[..], keys, UpdateMode::Replace)
            .map_err(|e| Exception::custom(e.to_string()))?;
        let v = v
            .try_index_update(&window[..], values, UpdateMode::Replace)
            .map_err(|e| Exception::custom(e.to_string()))?;
        let out = if self.offset < k.shape()[2] {
            (upto(&k, self.offset)?, upto(&v, self.offset)?)
        } else {
            (k.clone(), v.clone())
        };
        self.keys = Some(k);
        self.values = Some(v);
        Ok(out)
    }
}

/// `x[..., :n, :]`
fn upto(x: &Array, n: i32) -> Result<Array, Exception> {
    x.try_index(&[Ellipsis.index_op(), (..n).index_op(), (..).index_op()][..])
}

/// The state of every stateful op of a model, in plan order, plus the number
/// of positions already processed.
#[derive(Debug)]
pub struct ModelCache {
    pub(crate) slots: Vec<CacheState>,
    pub(crate) offset: i32,
}

impl ModelCache {
    pub fn new(kinds: &[CacheKind]) -> ModelCache {
        ModelCache {
            slots: kinds.iter().map(|k| k.create()).collect(),
            offset: 0,
        }
    }

    /// Positions processed so far.
    pub fn offset(&self) -> i32 {
        self.offset
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}
