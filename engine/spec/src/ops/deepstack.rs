//! Ops that carry values beside a forward's dataflow: `keep` and `kept` (a
//! value of a layer kept under a slot and read after the layer stack: the
//! tower's intermediate states that DeepStack merges) and `add_features`
//! (a part of the forward's feature rows added at the positions `splice`
//! wrote: DeepStack's injection into early text layers).
use super::{expect_flat, op, Layout, OpError, Resolved};

op! {
    /// Passes its input [B, N, D] through and keeps it, for the rest of this forward, under `slot`, for a later `kept` node (a layer's state used after the layer stack: Qwen3-VL's DeepStack levels).
    "keep" (1..=1) => Keep {
        slot: i64, "slot number (0 or more); a later keep under the same slot replaces the value";
    }
}

op! {
    /// The value a `keep` node of this forward kept under `slot`. Its input (of the kept value's width, such as the layer stack's output) orders it after the keeping layer and gives its layout; an empty slot or a value of another shape is an error.
    "kept" (1..=1) => Kept {
        slot: i64, "slot number a `keep` node wrote";
    }
}

op! {
    /// Adds part `part` of the forward's feature rows ([N, parts·D]; part k is columns k·D to (k+1)·D) to the hidden states [B, T, D] at the positions the forward's `splice` wrote, row k at the k-th of them (Qwen3-VL's DeepStack: one tower level per early text layer). Without feature rows it passes its input through.
    "add_features" (1..=1) => AddFeatures {
        part: i64, "which block of D columns (1 and up: block 0 is what `splice` writes)";
        parts: i64, "blocks of D columns in each feature row";
    }
}

fn slot(field: &str, n: i64) -> Result<(), OpError> {
    if n < 0 {
        return Err(OpError::new(
            field,
            format!("{n} is not a number of 0 or more"),
        ));
    }
    Ok(())
}

impl Keep {
    pub fn resolve(&self, _scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let d = expect_flat(inputs, 0)?;
        slot("slot", self.slot)?;
        Ok(Resolved::pure(Layout::flat(d)))
    }
}

impl Kept {
    pub fn resolve(&self, _scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let d = expect_flat(inputs, 0)?;
        slot("slot", self.slot)?;
        Ok(Resolved::pure(Layout::flat(d)))
    }
}

impl AddFeatures {
    pub fn resolve(&self, _scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let d = expect_flat(inputs, 0)?;
        if self.parts < 1 {
            return Err(OpError::new(
                "parts",
                format!("must be at least 1, got {}", self.parts),
            ));
        }
        if self.part < 0 || self.part >= self.parts {
            return Err(OpError::new(
                "part",
                format!("{} is not a block of 0 to {}", self.part, self.parts - 1),
            ));
        }
        Ok(Resolved::pure(Layout::flat(d)))
    }
}
