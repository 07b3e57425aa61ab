//! `embedding` (token ids to rows) and `position_embedding` (learned
//! absolute positions).
use super::{op, Layout, OpError, Resolved, WeightName, WeightReq};

op! {
    /// Looks up token ids [B, T] in a table, giving [B, T, dim].
    "embedding" (1..=1) => Embedding {
        weight: WeightName, "module holding `weight` [vocab, dim]";
        vocab: i64, "rows of the table";
        dim: i64, "width of a row";
    }
}

op! {
    /// Learned absolute positions: rows offset..offset+T of a table for an input [B, T], giving [1, T, dim] (added to the token embedding).
    "position_embedding" (1..=1) => PositionEmbedding {
        weight: WeightName, "module holding `weight` [positions, dim]";
        positions: i64, "rows of the table (the longest sequence)";
        dim: i64, "width of a row";
        row: Option<i64> = None, "when set, every position takes this row (token-type embeddings of segment 0)";
        offset: i64 = 0, "row of position 0 (RoBERTa's padding_idx + 1); the sequence may use positions - offset rows";
    }
}

impl Embedding {
    pub fn resolve(&self, scope: &str, _inputs: &[Layout]) -> Result<Resolved, OpError> {
        let w = WeightReq::matrix(
            "weight",
            self.weight.under(scope),
            "weight",
            vec![self.vocab, self.dim],
        );
        Ok(Resolved {
            weights: vec![w],
            ..Resolved::pure(Layout::flat(self.dim))
        })
    }
}

impl PositionEmbedding {
    pub fn resolve(&self, scope: &str, _inputs: &[Layout]) -> Result<Resolved, OpError> {
        let positions = self.positions;
        if self.offset < 0 || self.offset >= positions {
            return Err(OpError::new(
                "offset",
                format!(
                    "offset {} is outside the table's {positions} rows",
                    self.offset
                ),
            ));
        }
        if let Some(row) = self.row {
            if row < 0 || row >= positions {
                return Err(OpError::new(
                    "row",
                    format!("row {row} is outside the table's {positions} rows"),
                ));
            }
        }
        // mlx-lm quantizes a position table like any embedding; the engine
        // dequantizes it once.
        let w = WeightReq::matrix(
            "weight",
            self.weight.under(scope),
            "weight",
            vec![positions, self.dim],
        );
        Ok(Resolved {
            weights: vec![w],
            ..Resolved::pure(Layout::flat(self.dim))
        })
    }
}
