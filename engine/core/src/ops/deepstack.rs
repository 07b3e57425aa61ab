//! `keep`, `kept` and `add_features`: values carried beside the dataflow
//! within one forward (`crate::inputs` holds them while it runs).
use lmspec_spec::ops::{AddFeatures, Keep, Kept};
use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::Array;

use super::{Ctx, Op};
use crate::inputs;

impl Op for Keep {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        inputs::keep(self.slot as usize, inputs[0]);
        Ok(inputs[0].clone())
    }
}

impl Op for Kept {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let Some(v) = inputs::kept(self.slot as usize) else {
            return Err(Exception::custom(format!(
                "kept: no keep node of this forward kept a value under slot {}",
                self.slot
            )));
        };
        if v.shape() != inputs[0].shape() {
            return Err(Exception::custom(format!(
                "kept: slot {} holds {:?}, the node's input is {:?}",
                self.slot,
                v.shape(),
                inputs[0].shape()
            )));
        }
        Ok(v)
    }
}

impl Op for AddFeatures {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let x = inputs[0];
        let Some(features) = inputs::features() else {
            return Ok(x.clone());
        };
        let s = x.shape();
        let (b, t, d) = (s[0], s[1], s[2]);
        let fs = features.shape();
        let parts = self.parts as i32;
        if fs.len() != 2 || fs[1] != parts * d {
            return Err(Exception::custom(format!(
                "add_features: features must be [N, {}] ({parts} blocks of {d}), got {fs:?}",
                parts * d
            )));
        }
        if fs[0] == 0 {
            return Ok(x.clone());
        }
        let Some((mask, rows)) = inputs::spliced() else {
            return Err(Exception::custom(
                "add_features: no splice wrote this forward's feature rows",
            ));
        };
        if mask.shape()[0] != b * t {
            return Err(Exception::custom(format!(
                "add_features: the splice covered {} positions, the input {}",
                mask.shape()[0],
                b * t
            )));
        }
        let p = self.part as i32;
        let part = features.try_index((.., p * d..(p + 1) * d))?;
        let rows = part.as_dtype(x.dtype())?.take_axis(&rows, 0)?;
        let flat = x.reshape(&[b * t, d])?;
        let added = mlx_rs::ops::add(&flat, &rows)?;
        mlx_rs::ops::select(&mask, &added, &flat)?.reshape(&[b, t, d])
    }
}
