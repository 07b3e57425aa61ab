//! Vision ops: `patchify` (a stride = kernel convolution over flattened
//! patches, run as one matmul), `mrope` (rotary embeddings from several
//! position axes), `merge_patches` and `splice` (image features written at
//! the placeholder token's positions). Positions, segments and features
//! are the forward's inputs (`crate::inputs`).
use lmspec_spec::ops::{
    GridTable, Layout, MergePatches, Mrope, OpError, Patchify, PixelShuffle, PoolPatches, Splice,
};
use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::{Array, Dtype};

use super::{mlx_err, Build, Ctx, Op, Weights};
use crate::inputs;

impl Build for Patchify {
    fn build(&self, _inputs: &[Layout], mut w: Weights) -> Result<Box<dyn Op>, OpError> {
        let weight = w.dense("weight")?;
        let bias = w.dense_opt("bias")?;
        // MLX conv weights are channels-last ([out, (t,) p, p, c]); flattened
        // patches are channel-first (c, t, p, p): move the channel axis to
        // the front of the kernel, flatten, and keep it transposed [in, out].
        // With channels_last the patches and the weight [out, in] share the
        // (row, column, channel) order: a plain linear map.
        let nd = weight.ndim() as i32;
        let mut axes: Vec<i32> = vec![0, nd - 1];
        axes.extend(1..nd - 1);
        let wt = match self.channels_last {
            true => Ok(weight.t()),
            false => weight
                .transpose_axes(&axes)
                .and_then(|t| t.reshape(&[self.out as i32, -1]))
                .map(|t| t.t()),
        }
        .map_err(mlx_err("weight"))?;
        Ok(Box::new(PatchifyOp {
            wt,
            bias,
            width: self.patch_width() as i32,
        }))
    }
}

#[derive(Debug)]
struct PatchifyOp {
    wt: Array,
    bias: Option<Array>,
    width: i32,
}

impl Op for PatchifyOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let x = inputs[0];
        let got = x.shape().last().copied().unwrap_or(0);
        if x.ndim() != 3 || got != self.width {
            return Err(Exception::custom(format!(
                "patchify: expected flattened patches [B, N, {}], got {:?}",
                self.width,
                x.shape()
            )));
        }
        let x = x.as_dtype(self.wt.dtype())?;
        match &self.bias {
            Some(b) => mlx_rs::ops::addmm(b, &x, &self.wt, 1.0, 1.0),
            None => mlx_rs::ops::matmul(&x, &self.wt),
        }
    }
}

impl Build for Mrope {
    fn build(&self, inputs: &[Layout], _w: Weights) -> Result<Box<dyn Op>, OpError> {
        let head_dim = inputs.first().map_or(0, |l| l.dim);
        if self.traditional && self.per_section {
            return Err(OpError::new(
                "traditional",
                "traditional rotation needs one frequency ladder (per_section: false)",
            ));
        }
        let freqs = self.frequencies(head_dim)?;
        let inv: Vec<f32> = freqs.iter().map(|(f, _)| *f as f32).collect();
        let axis: Vec<i32> = freqs.iter().map(|(_, a)| *a as i32).collect();
        let axes = axis.iter().max().map_or(1, |m| m + 1);
        Ok(Box::new(MropeOp {
            // One ladder over the whole head: without positions this is
            // the half-split rope, run by the fused kernel.
            base: (!self.per_section).then_some(self.base as f32),
            traditional: self.traditional,
            pairs: inv.len() as i32,
            axes,
            inv: Array::from_slice(&inv, &[inv.len() as i32]),
            axis: Array::from_slice(&axis, &[axis.len() as i32]),
        }))
    }
}

#[derive(Debug)]
struct MropeOp {
    /// The rope base when the frequencies form one ladder over the head.
    base: Option<f32>,
    /// Adjacent pairs rotate (sequence positions only).
    traditional: bool,
    /// Rotated frequency pairs (the first `2 * pairs` features).
    pairs: i32,
    /// Position axes the sections read.
    axes: i32,
    /// Angle per unit position of each pair `[pairs]`.
    inv: Array,
    /// The axis each pair reads `[pairs]`.
    axis: Array,
}

impl MropeOp {
    /// Angles `[rows, T, pairs]` (rows 1 or B) for a call of `t` positions.
    fn angles(&self, t: i32, ctx: &Ctx<'_>) -> Result<Array, Exception> {
        if let Some(p) = inputs::positions() {
            let s = p.shape();
            if s.len() != 2 || s[0] < self.axes || s[1] != t {
                return Err(Exception::custom(format!(
                    "mrope: positions must be [{} axes, {t}], got {s:?}",
                    self.axes
                )));
            }
            // [axes, T] -> per pair [pairs, T] -> [1, T, pairs].
            let p = p.as_dtype(Dtype::Float32)?;
            let per_pair = p.take_axis(&self.axis, 0)?;
            let ang = mlx_rs::ops::multiply(per_pair.t(), &self.inv)?;
            return ang.expand_dims(0);
        }
        let delta = inputs::position_delta();
        let starts: Vec<f32> = match ctx.positions {
            Some(p) => p.host.iter().map(|&o| (o + delta) as f32).collect(),
            None => vec![(ctx.offset + delta) as f32],
        };
        let rows = starts.len() as i32;
        let starts = Array::from_slice(&starts, &[rows, 1, 1]);
        let steps = mlx_rs::ops::arange::<_, f32>(0, t, None)?.reshape(&[1, t, 1])?;
        let pos = mlx_rs::ops::add(&starts, &steps)?;
        mlx_rs::ops::multiply(&pos, &self.inv.reshape(&[1, 1, self.pairs])?)
    }
}

impl Op for MropeOp {
    fn forward(&self, inputs: &[&Array], ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let x = inputs[0];
        let s = x.shape();
        let (t, d) = (s[2], s[3]);
        let trad = self.traditional;
        if let (Some(base), None) = (self.base, inputs::positions()) {
            let delta = inputs::position_delta();
            match ctx.positions {
                None => return mlx_rs::fast::rope(x, d, trad, base, 1.0, ctx.offset + delta, None),
                Some(p) if delta == 0 => {
                    return mlx_rs::fast::rope_dynamic(x, d, trad, base, 1.0, &p.array, None)
                }
                Some(_) => {}
            }
        }
        if trad {
            return Err(Exception::custom(
                "mrope: traditional rotation runs with sequence positions only, not with per-axis positions (images) or shifted batch rows",
            ));
        }
        let ang = self.angles(t, ctx)?;
        // [rows, T, 2P] -> [rows, 1, T, 2P]: broadcasts over heads.
        let emb = mlx_rs::ops::concatenate(&[&ang, &ang], -1)?.expand_dims(1)?;
        let cos = mlx_rs::ops::cos(&emb)?.as_dtype(x.dtype())?;
        let sin = mlx_rs::ops::sin(&emb)?.as_dtype(x.dtype())?;
        let r = 2 * self.pairs;
        let (rot, pass) = if r < d {
            let parts = x.split_at_indices(&[r], -1)?;
            (parts[0].clone(), Some(parts[1].clone()))
        } else {
            (x.clone(), None)
        };
        let halves = rot.split_at_indices(&[self.pairs], -1)?;
        let neg = mlx_rs::ops::negative(&halves[1])?;
        let rotated = mlx_rs::ops::concatenate(&[&neg, &halves[0]], -1)?;
        let y = mlx_rs::ops::add(
            &mlx_rs::ops::multiply(&rot, &cos)?,
            &mlx_rs::ops::multiply(&rotated, &sin)?,
        )?;
        match pass {
            Some(p) => mlx_rs::ops::concatenate(&[&y, &p], -1),
            None => Ok(y),
        }
    }
}

impl Op for MergePatches {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let x = inputs[0];
        let s = x.shape();
        let g = self.group as i32;
        if s.len() != 3 || s[1] % g != 0 {
            return Err(Exception::custom(format!(
                "merge_patches: {:?} does not group into runs of {g} positions",
                s
            )));
        }
        if !self.channel_major {
            return x.reshape(&[s[0], s[1] / g, s[2] * g]);
        }
        x.reshape(&[s[0], s[1] / g, g, s[2]])?
            .transpose_axes(&[0, 1, 3, 2])?
            .reshape(&[s[0], s[1] / g, s[2] * g])
    }
}

impl Build for GridTable {
    fn build(&self, _inputs: &[Layout], mut w: Weights) -> Result<Box<dyn Op>, OpError> {
        Ok(Box::new(GridTableOp {
            table: w.dense("weight")?,
            side: self.side,
            merge: self.merge,
            align_corners: self.align_corners,
            antialias: self.antialias,
        }))
    }
}

#[derive(Debug)]
struct GridTableOp {
    table: Array,
    side: i64,
    merge: i64,
    align_corners: bool,
    antialias: bool,
}

/// `n` points from 0 to `last` evenly (mlx's `linspace`, float32).
fn linspace(last: f32, n: i64) -> Vec<f32> {
    match n {
        1 => vec![0.0],
        _ => {
            let step = last / (n - 1) as f32;
            (0..n).map(|i| i as f32 * step).collect()
        }
    }
}

/// The table rows (index, weight) that each of `n` grid cells reads along
/// one axis of a table of `side` rows. Corners aligned: linspace
/// coordinates, the two neighbours weighted linearly (the second clamped
/// to the table). Cell centres: coordinate `(i + 0.5)·side/n - 0.5`; when
/// the axis shrinks and `antialias`, every table row within the scale
/// weighted by a triangle filter, normalised; otherwise the coordinate is
/// clamped at 0 and its two neighbours weighted linearly. All in float32.
pub(crate) fn axis_taps(side: i64, n: i64, corners: bool, antialias: bool) -> Vec<Vec<(i64, f32)>> {
    let two = |p: f32| {
        let p0 = p.floor();
        let f = p - p0;
        let i0 = (p0 as i64).clamp(0, side - 1);
        let i1 = (p0 as i64 + 1).clamp(0, side - 1);
        vec![(i0, 1.0 - f), (i1, f)]
    };
    if corners {
        return linspace((side - 1) as f32, n)
            .into_iter()
            .map(two)
            .collect();
    }
    let scale = side as f32 / n as f32;
    (0..n)
        .map(|i| {
            let src = (i as f32 + 0.5) * scale - 0.5;
            if !(antialias && scale > 1.0) {
                return two(src.max(0.0));
            }
            let lo = (src - scale + 1.0).floor().max(0.0);
            let hi = (src + scale).floor().min((side - 1) as f32);
            let taps: Vec<(i64, f32)> = (0..)
                .map(|k| lo + k as f32)
                .take_while(|&p| p <= hi)
                .map(|p| (p as i64, (1.0 - (p - src).abs() / scale).max(0.0)))
                .collect();
            let total: f32 = taps.iter().map(|t| t.1).sum();
            taps.into_iter().map(|(p, w)| (p, w / total)).collect()
        })
        .collect()
}

impl Op for GridTableOp {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let n_in = inputs[0].shape().get(1).copied().unwrap_or(0);
        let Some(grids) = inputs::grids() else {
            return Err(Exception::custom(
                "grid_table: the forward has no image grids",
            ));
        };
        let (g, m) = (self.side, self.merge);
        // Per patch, the (table row, weight) pairs it sums, in row-tap then
        // column-tap order.
        let mut cells: Vec<Vec<(i32, f32)>> = Vec::new();
        for &[t, h, w] in &grids {
            if t < 1 || h < 1 || w < 1 || h % m != 0 || w % m != 0 {
                return Err(Exception::custom(format!(
                    "grid_table: grid {t}x{h}x{w} does not split into {m}x{m} windows"
                )));
            }
            let ys = axis_taps(g, h, self.align_corners, self.antialias);
            let xs = axis_taps(g, w, self.align_corners, self.antialias);
            for _ in 0..t {
                for bh in 0..h / m {
                    for bw in 0..w / m {
                        for ih in 0..m {
                            for iw in 0..m {
                                let (ty, tx) =
                                    (&ys[(bh * m + ih) as usize], &xs[(bw * m + iw) as usize]);
                                let mut cell = Vec::with_capacity(ty.len() * tx.len());
                                for &(yy, wy) in ty {
                                    for &(xx, wx) in tx {
                                        cell.push(((yy * g + xx) as i32, wy * wx));
                                    }
                                }
                                cells.push(cell);
                            }
                        }
                    }
                }
            }
        }
        let n = cells.len() as i32;
        if n != n_in {
            return Err(Exception::custom(format!(
                "grid_table: the grids hold {n} patches, the input {n_in}"
            )));
        }
        // Taps of every patch padded with zero weights to one count.
        let k = cells.iter().map(Vec::len).max().unwrap_or(1);
        let mut flat_idx = vec![0i32; k * cells.len()];
        let mut flat_w = vec![0f32; k * cells.len()];
        for (p, cell) in cells.iter().enumerate() {
            for (j, &(i, wt)) in cell.iter().enumerate() {
                flat_idx[j * cells.len() + p] = i;
                flat_w[j * cells.len() + p] = wt;
            }
        }
        let k = k as i32;
        let rows = self
            .table
            .take_axis(Array::from_slice(&flat_idx, &[k * n]), 0)?;
        let d = rows.shape()[1];
        let rows = rows.reshape(&[k, n, d])?;
        let weights = Array::from_slice(&flat_w, &[k, n, 1]).as_dtype(rows.dtype())?;
        mlx_rs::ops::multiply(&rows, &weights)?
            .sum_axis(0, None)?
            .reshape(&[1, n, d])
    }
}

/// `[B, side², D]` as `[B, side/k, k, side/k, k, D]` (block row, row in
/// the block, block column, column in the block), checked.
fn grid_blocks(x: &Array, k: i32, what: &str) -> Result<Array, Exception> {
    let s = x.shape();
    let side = (s.get(1).copied().unwrap_or(0) as f64).sqrt().round() as i32;
    if s.len() != 3 || side * side != s[1] || side % k != 0 {
        return Err(Exception::custom(format!(
            "{what}: {s:?} is not a square grid of positions whose side divides by {k}"
        )));
    }
    x.reshape(&[s[0], side / k, k, side / k, k, s[2]])
}

impl Op for PoolPatches {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let x = inputs[0];
        let k = self.kernel as i32;
        let blocks = grid_blocks(x, k, "pool_patches")?;
        let s = blocks.shape().to_vec();
        let mean = blocks.mean_axes(&[2, 4], None)?;
        mean.reshape(&[s[0], s[1] * s[3], s[5]])
    }
}

impl Op for PixelShuffle {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let x = inputs[0];
        let f = self.factor as i32;
        let blocks = grid_blocks(x, f, "pixel_shuffle")?;
        let s = blocks.shape().to_vec();
        blocks
            .transpose_axes(&[0, 1, 3, 2, 4, 5])?
            .reshape(&[s[0], s[1] * s[3], f * f * s[5]])
    }
}

impl Op for Splice {
    fn forward(&self, inputs: &[&Array], _ctx: &mut Ctx<'_>) -> Result<Array, Exception> {
        let (tokens, emb) = (inputs[0], inputs[1]);
        let Some(features) = inputs::features() else {
            return Ok(emb.clone());
        };
        let s = emb.shape();
        let (b, t, d) = (s[0], s[1], s[2]);
        let fs = features.shape().to_vec();
        let parts = self.parts as i32;
        if fs.len() != 2 || fs[1] != parts * d {
            return Err(Exception::custom(format!(
                "splice: features must be [N, {}], got {fs:?}",
                parts * d
            )));
        }
        // Only the first block of D columns is written here.
        let features = match parts {
            1 => features,
            _ => features.try_index((.., ..d))?,
        };
        let is_image = mlx_rs::ops::eq(
            &tokens.reshape(&[-1])?,
            &Array::from_int(self.token as i32).as_dtype(tokens.dtype())?,
        )?;
        let count = is_image.as_dtype(Dtype::Int32)?.sum(None)?;
        count.eval()?;
        let count = count
            .try_item_cast::<i32>()
            .map_err(|e| Exception::custom(format!("splice: {e}")))?;
        if count != fs[0] {
            return Err(Exception::custom(format!(
                "splice: {count} image token(s) (id {}) in the prompt, but {} feature rows",
                self.token, fs[0]
            )));
        }
        if count == 0 {
            return Ok(emb.clone());
        }
        // Row k of the features goes to the k-th image position.
        let rank = mlx_rs::ops::subtract(
            &mlx_rs::ops::cumsum(&is_image.as_dtype(Dtype::Int32)?, 0, None, None)?,
            Array::from_int(1),
        )?;
        let rank = mlx_rs::ops::maximum(&rank, Array::from_int(0))?;
        let features = match self.scale {
            1.0 => features,
            f => mlx_rs::ops::multiply(&features, Array::from_f32(f as f32))?,
        };
        let rows = features.as_dtype(emb.dtype())?.take_axis(&rank, 0)?;
        let flat = emb.reshape(&[b * t, d])?;
        let mask = is_image.reshape(&[b * t, 1])?;
        inputs::set_spliced(&mask, &rank);
        mlx_rs::ops::select(&mask, &rows, &flat)?.reshape(&[b, t, d])
    }
}
