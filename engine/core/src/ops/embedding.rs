//! `embedding`: token ids -> rows of a table (dequantized rows when the table
//! is quantized, as mlx-lm's `nn.QuantizedEmbedding`); `ngram_embedding`:
//! the same plus rows of n-gram hash tables; `position_embedding`.
use lmspec_spec::ops::{
    Embedding, Layout, NgramEmbedding, OpError, PositionEmbedding, NGRAM_PROJECTIONS, NGRAM_TABLES,
};
use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::{Array, Dtype};

use super::linear::Rotation;
use super::{mlx_err, Build, Ctx, Op, Param, Weights};

impl Build for Embedding {
    fn build(&self, _inputs: &[Layout], mut w: Weights) -> Result<Box<dyn Op>, OpError> {
        Ok(Box::new(EmbeddingOp {
            table: w.take("weight")?,
            rotation: Rotation::take(&mut w)?,
            outside: self.outside.map(|o| (self.vocab as i32, o as i32)),
        }))
    }
}

#[derive(Debug)]
struct EmbeddingOp {
    table: Param,
    /// A rotated table's rotation, undone on the rows looked up.
    rotation: Option<Rotation>,
    /// (vocab, row): ids of vocab or more look up that row.
    outside: Option<(i32, i32)>,
}

impl Op for EmbeddingOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let ids = match self.outside {
            Some((vocab, row)) => {
                let inside = inputs[0].lt(Array::from_int(vocab))?;
                mlx_rs::ops::select(&inside, inputs[0], Array::from_int(row))?
            }
            None => inputs[0].clone(),
        };
        let rows = rows(&self.table, &ids)?;
        match &self.rotation {
            Some(r) => r.inverse(&rows),
            None => Ok(rows),
        }
    }
}

/// The rows of `table` at `ids` (dequantized when the table is quantized).
fn rows(table: &Param, ids: &Array) -> Result<Array, Exception> {
    match table {
        Param::Dense(t) => t.take_axis(ids, 0),
        Param::Quantized {
            w,
            scales,
            biases,
            group_size,
            bits,
        } => {
            let w = w.take_axis(ids, 0)?;
            let s = scales.take_axis(ids, 0)?;
            let b = biases.take_axis(ids, 0)?;
            crate::weights::dequantize(&w, &s, &b, *group_size, *bits)
        }
    }
}

impl Build for NgramEmbedding {
    fn build(&self, _inputs: &[Layout], mut w: Weights) -> Result<Box<dyn Op>, OpError> {
        let word = w.take("word_embeddings")?;
        let mut tables = Vec::new();
        let (k, n) = (self.splits, self.neighbors);
        for order in 2..=n {
            for j in 0..k {
                let t = ((order - 2) * k + j) as usize;
                let rows = self.table_rows(t as i64);
                // vocab^s mod rows for s = 1..order-1, as mlx-lm's
                // `_vocab_mods` (kept below 2^31 by the rows' bound).
                let mut mods = Vec::new();
                let mut power: i128 = 1;
                for _ in 1..order {
                    power = power * i128::from(self.vocab) % i128::from(rows);
                    mods.push(power as i64);
                }
                tables.push(NgramTable {
                    rows,
                    mods,
                    table: w.take(NGRAM_TABLES[t])?,
                    // As linear layers hold it: a dense weight transposed.
                    projection: match w.take(NGRAM_PROJECTIONS[t])? {
                        Param::Dense(p) => Param::Dense(p.t()),
                        q => q,
                    },
                });
            }
        }
        Ok(Box::new(NgramOp {
            word,
            tables,
            keep: (n - 1) as i32,
            divisor: (1 + k * (n - 1)) as f32,
        }))
    }
}

/// One n-gram table: its hash (`mods` per earlier token) and weights.
#[derive(Debug)]
struct NgramTable {
    rows: i64,
    mods: Vec<i64>,
    table: Param,
    projection: Param,
}

#[derive(Debug)]
struct NgramOp {
    word: Param,
    tables: Vec<NgramTable>,
    /// Earlier ids an n-gram reads: neighbors - 1.
    keep: i32,
    divisor: f32,
}

impl Op for NgramOp {
    fn forward(&self, inputs: &[&Array], ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let ids = inputs[0];
        let t = ids.shape()[1];
        // [B, earlier + T] int64: the ids of earlier calls (zeros before the
        // sequence) then this call's. The state holds the last `keep` ids as
        // [B, keep], the layout of mlx-lm's ArraysCache (which holds fewer
        // while the sequence is shorter: zeros stand for the missing ones).
        let current_ids = ids.as_dtype(Dtype::Int64)?;
        let all = ctx.with_earlier_rows("ngram_embedding", &current_ids, self.keep)?;
        // The id `back` positions before each of this call's.
        let end = all.shape()[1];
        let earlier = |back: i32| all.try_index((.., end - t - back..end - back));
        let current = earlier(0)?;
        let mut x = rows(&self.word, ids)?;
        for table in &self.tables {
            let mut hash = current.clone();
            for (s, &m) in table.mods.iter().enumerate() {
                let term =
                    mlx_rs::ops::multiply(&earlier(s as i32 + 1)?, Array::from_slice(&[m], &[1]))?;
                hash = mlx_rs::ops::add(&hash, &term)?;
            }
            let row = mlx_rs::ops::remainder(&hash, Array::from_slice(&[table.rows], &[1]))?;
            let row = row.as_dtype(Dtype::Int32)?;
            let e = rows(&table.table, &row)?;
            let p = super::linear::apply(&table.projection, None, &e)?;
            x = mlx_rs::ops::add(&x, &p)?;
        }
        let d = Array::from_f32(self.divisor).as_dtype(x.dtype())?;
        mlx_rs::ops::divide(&x, &d)
    }
}

impl Build for PositionEmbedding {
    fn build(&self, _inputs: &[Layout], mut w: Weights) -> Result<Box<dyn Op>, OpError> {
        let table = w.take("weight")?.dense().map_err(mlx_err("weight"))?;
        let positions = table.shape()[0];
        Ok(Box::new(PositionOp {
            table,
            positions,
            row: self.row.map(|r| r as i32),
            offset: self.offset as i32,
        }))
    }
}

#[derive(Debug)]
struct PositionOp {
    table: Array,
    positions: i32,
    row: Option<i32>,
    offset: i32,
}

impl PositionOp {
    /// Errors when rows up to `end` (exclusive) outrun the table.
    fn check_within(&self, end: i32) -> Result<(), Exception> {
        if end > self.positions {
            return Err(Exception::custom(format!(
                "position {} is past the {} learned positions",
                end - 1 - self.offset,
                self.positions - self.offset
            )));
        }
        Ok(())
    }
}

impl Op for PositionOp {
    fn forward(&self, inputs: &[&Array], ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let t = inputs[0].shape()[1];
        if let Some(p) = ctx.positions {
            // One row of positions per sequence: [B, t].
            let rows = match self.row {
                Some(r) => mlx_rs::ops::full::<i32>(&[p.host.len() as i32, t], Array::from_int(r))?,
                None => {
                    let last = p.host.iter().max().copied().unwrap_or(0) + t;
                    self.check_within(self.offset + last)?;
                    let start = p.array.reshape(&[-1, 1])?;
                    let steps = mlx_rs::ops::arange::<_, i32>(self.offset, self.offset + t, None)?;
                    mlx_rs::ops::add(&start, steps)?
                }
            };
            return self.table.take_axis(&rows, 0);
        }
        let rows = match self.row {
            Some(r) => Array::from_slice(&vec![r; t as usize], &[t]),
            None => {
                let start = self.offset + ctx.offset;
                self.check_within(start + t)?;
                mlx_rs::ops::arange::<_, i32>(start, start + t, None)?
            }
        };
        self.table.take_axis(&rows, 0)?.expand_dims(0)
    }
}
