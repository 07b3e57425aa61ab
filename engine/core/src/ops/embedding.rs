//! `embedding`: token ids -> rows of a table (dequantized rows when the table
//! is quantized, as mlx-lm's `nn.QuantizedEmbedding`).
use lmspec_spec::ops::{Embedding, Layout, OpError, PositionEmbedding};
use mlx_rs::error::Exception;
use mlx_rs::Array;

use super::{mlx_err, Build, Ctx, Op, Param, Weights};

impl Build for Embedding {
    fn build(&self, _inputs: &[Layout], mut w: Weights) -> Result<Box<dyn Op>, OpError> {
        Ok(Box::new(EmbeddingOp {
            table: w.take("weight")?,
        }))
    }
}

#[derive(Debug)]
struct EmbeddingOp {
    table: Param,
}

impl Op for EmbeddingOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let ids = inputs[0];
        match &self.table {
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
