//! `slice`: a contiguous range of the last axis (fused projections such as
//! a `qkv` or `gate_up` output, or one part of each head); `concat`: inputs
//! joined along the last axis (the inverse), per-head inputs with one head
//! repeated to the others' head count (a rotary part shared by every head).
use super::norm::first;
use super::{op, Layout, OpError, Resolved};

op! {
    /// Takes `size` entries of the last axis starting at `start`, in any layout.
    "slice" (1..=1) => Slice {
        start: i64 = 0, "first index taken";
        size: i64, "number of indices taken";
    }
}

op! {
    /// Joins its inputs along the last axis; a one-head input is shared by every head.
    "concat" (2..=8) => Concat {}
}

impl Slice {
    pub fn resolve(&self, _scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let (start, size) = (self.start, self.size);
        let x = first(inputs)?;
        let end = start.checked_add(size);
        if start < 0 || size <= 0 || end.is_none_or(|e| e > x.dim) {
            return Err(OpError::new(
                "size",
                format!(
                    "{size} entries from {start} are not inside the {} entries of the last axis",
                    x.dim
                ),
            ));
        }
        Ok(Resolved::pure(Layout {
            dim: size,
            heads: x.heads,
        }))
    }
}

impl Concat {
    /// The inputs' common head count (`None`: flat inputs).
    pub fn heads(inputs: &[Layout]) -> Option<i64> {
        inputs.iter().filter_map(|v| v.heads).max()
    }

    pub fn resolve(&self, _scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let heads = Concat::heads(inputs);
        for (k, v) in inputs.iter().enumerate() {
            let fits = match (v.heads, heads) {
                (None, None) => true,
                (Some(h), Some(most)) => h == most || h == 1,
                _ => false,
            };
            if !fits {
                return Err(OpError::new(
                    "in",
                    format!(
                        "input {k} has layout {v:?}; inputs must share their heads (or have one)"
                    ),
                ));
            }
        }
        Ok(Resolved::pure(Layout {
            dim: inputs.iter().map(|v| v.dim).sum(),
            heads,
        }))
    }
}
