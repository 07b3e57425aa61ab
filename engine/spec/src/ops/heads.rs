//! `split_heads` ([B, T, H*D] -> [B, H, T, D]), `merge_heads` (inverse) and
//! `repeat_heads` (each head repeated).
use super::{expect_flat, expect_heads, op, Layout, OpError, Resolved};

op! {
    /// Reshapes [B, T, H*D] to [B, H, T, D].
    "split_heads" (1..=1) => SplitHeads {
        heads: i64, "number of heads H; the last axis must divide by it";
    }
}

op! {
    /// Reshapes [B, H, T, D] back to [B, T, H*D].
    "merge_heads" (1..=1) => MergeHeads {}
}

op! {
    /// Repeats each of the H heads of [B, H, T, D] `times` times in a row, giving [B, H·times, T, D] (key/value heads expanded to the query heads outside attention).
    "repeat_heads" (1..=1) => RepeatHeads {
        times: i64, "copies of each head (query heads / key-value heads)";
    }
}

impl RepeatHeads {
    pub fn resolve(&self, _scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let (h, d) = expect_heads(inputs, 0)?;
        if self.times < 1 {
            return Err(OpError::new("times", format!("{} is below 1", self.times)));
        }
        Ok(Resolved::pure(Layout {
            dim: d,
            heads: Some(h * self.times),
        }))
    }
}

impl SplitHeads {
    pub fn resolve(&self, _scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let dim = expect_flat(inputs, 0)?;
        let heads = self.heads;
        if heads <= 0 || dim % heads != 0 {
            return Err(OpError::new(
                "heads",
                format!("{dim} features do not split into {heads} heads"),
            ));
        }
        Ok(Resolved::pure(Layout {
            dim: dim / heads,
            heads: Some(heads),
        }))
    }
}

impl MergeHeads {
    pub fn resolve(&self, _scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let (h, d) = expect_heads(inputs, 0)?;
        Ok(Resolved::pure(Layout::flat(h * d)))
    }
}
