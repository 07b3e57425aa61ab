//! `embedding` (token ids to rows), `ngram_embedding` (n-gram hash tables)
//! and `position_embedding` (learned absolute positions).
use super::{op, Layout, OpError, Resolved, StateKind, WeightName, WeightReq};

op! {
    /// Looks up token ids [B, T] in a table, giving [B, T, dim]. A table stored rotated (a `signs` tensor beside it, laid out `[dim / b, b]` by the `hadamard` weight rule) has its rows rotated back: in float32, a Hadamard transform over each block of b features scaled by 1/sqrt(b), times the signs, then in the rows' dtype.
    "embedding" (1..=1) => Embedding {
        weight: WeightName, "module holding `weight` [vocab, dim] (and, when rotated, `signs`)";
        vocab: i64, "rows of the table";
        dim: i64, "width of a row";
        outside: Option<i64> = None, "ids of vocab or more look this row up instead (Gemma 3n's per-layer inputs: 0); null: every id must be a row";
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

op! {
    /// N-gram hash embeddings over token ids [B, T] (LongCat-Flash-Ngram): the token's row of `word_embeddings`, plus, for each n-gram order g in 2..=neighbors and each of `splits` tables per order, a row of table t = (g - 2)·splits + j looked up at the hash (id_p + Σ_{s=1}^{g-1} id_{p-s} · (vocab^s mod M_t)) mod M_t of the token and the g - 1 before it (ids before the sequence count as 0; M_t = ratio·vocab + 2t + 1), projected by post_projs.t to dim; the sum divided by 1 + splits·(neighbors - 1). Keeps the last neighbors - 1 ids between calls.
    "ngram_embedding" (1..=1) => NgramEmbedding {
        weight: WeightName, "module holding `word_embeddings.weight` [vocab, dim], `embedders.{t}.weight` [M_t, dim / tables] and `post_projs.{t}.weight` [dim, dim / tables]";
        vocab: i64, "token vocabulary";
        dim: i64, "width of the output";
        ratio: i64, "ratio·vocab + 2t + 1 rows in table t";
        neighbors: i64, "n-grams of 2 up to this many tokens";
        splits: i64, "tables per n-gram order";
    }
}

/// Weight fields of the n-gram tables, in table order.
pub const NGRAM_TABLES: [&str; 32] = [
    "t0", "t1", "t2", "t3", "t4", "t5", "t6", "t7", "t8", "t9", "t10", "t11", "t12", "t13", "t14",
    "t15", "t16", "t17", "t18", "t19", "t20", "t21", "t22", "t23", "t24", "t25", "t26", "t27",
    "t28", "t29", "t30", "t31",
];

/// Weight fields of the n-gram projections, in table order.
pub const NGRAM_PROJECTIONS: [&str; 32] = [
    "p0", "p1", "p2", "p3", "p4", "p5", "p6", "p7", "p8", "p9", "p10", "p11", "p12", "p13", "p14",
    "p15", "p16", "p17", "p18", "p19", "p20", "p21", "p22", "p23", "p24", "p25", "p26", "p27",
    "p28", "p29", "p30", "p31",
];

impl NgramEmbedding {
    /// Tables: splits · (neighbors - 1).
    pub fn tables(&self) -> i64 {
        self.splits * (self.neighbors - 1)
    }

    /// Rows of table `t`.
    pub fn table_rows(&self, t: i64) -> i64 {
        self.ratio * self.vocab + 2 * t + 1
    }

    pub fn resolve(&self, scope: &str, _inputs: &[Layout]) -> Result<Resolved, OpError> {
        if self.neighbors < 2 || self.splits < 1 {
            return Err(OpError::new(
                "neighbors",
                format!(
                    "{} neighbors, {} splits: n-grams need 2 or more neighbors and 1 or more splits",
                    self.neighbors, self.splits
                ),
            ));
        }
        let tables = self.tables();
        if tables > NGRAM_TABLES.len() as i64 {
            return Err(OpError::new(
                "splits",
                format!("{tables} tables: at most {}", NGRAM_TABLES.len()),
            ));
        }
        if self.vocab < 1 || self.ratio < 1 || self.dim < tables {
            return Err(OpError::new(
                "dim",
                format!(
                    "vocab {}, ratio {}, dim {}: each must be positive and dim at least the {tables} tables",
                    self.vocab, self.ratio, self.dim
                ),
            ));
        }
        let module = self.weight.under(scope);
        let width = self.dim / tables;
        let mut weights = vec![WeightReq::matrix(
            "word_embeddings",
            format!("{module}.word_embeddings"),
            "weight",
            vec![self.vocab, self.dim],
        )];
        for t in 0..tables as usize {
            weights.push(WeightReq::matrix(
                NGRAM_TABLES[t],
                format!("{module}.embedders.{t}"),
                "weight",
                vec![self.table_rows(t as i64), width],
            ));
            weights.push(WeightReq::matrix(
                NGRAM_PROJECTIONS[t],
                format!("{module}.post_projs.{t}"),
                "weight",
                vec![self.dim, width],
            ));
        }
        Ok(Resolved {
            weights,
            state: Some(StateKind::Conv((self.neighbors - 1) as i32)),
            ..Resolved::pure(Layout::flat(self.dim))
        })
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
        if let Some(o) = self.outside.filter(|o| !(0..self.vocab).contains(o)) {
            return Err(OpError::new(
                "outside",
                format!("row {o} is not one of the table's {}", self.vocab),
            ));
        }
        let signs = WeightReq::rotation_signs(self.weight.under(scope), self.dim);
        Ok(Resolved {
            weights: vec![w, signs],
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
