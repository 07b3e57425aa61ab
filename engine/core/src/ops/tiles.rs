//! Window attention over the tiles of a tower's patch grid (`attention`
//! with `grid_window`), run tile by tile: the positions are grouped by
//! (segment, tile row, tile column), each group attends to itself alone,
//! and the rows go back to their order. The result equals the masked
//! attention over the whole input; it costs the tiles' sizes squared, not
//! the input's.
use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::{Array, Dtype};

use crate::inputs;

/// The order that makes each tile of `side` x `side` positions (within its
/// segment) a contiguous run, and the runs' lengths. Within a run the
/// positions keep their order.
pub(crate) fn tile_runs(t: i32, side: i64) -> Result<(Vec<i32>, Vec<i32>), Exception> {
    let Some(p) = inputs::positions() else {
        return Err(Exception::custom(
            "attention: grid_window needs the forward's 2-D positions (a tower's patch rows and columns)",
        ));
    };
    let s = p.shape();
    if s.len() != 2 || s[0] < 2 || s[1] != t {
        return Err(Exception::custom(format!(
            "attention: grid_window needs positions [2 axes, {t}], got {s:?}"
        )));
    }
    let p = p.as_dtype(Dtype::Int64)?;
    p.eval()?;
    let p = p.as_slice::<i64>();
    let n = t as usize;
    let seg: Vec<i64> = match inputs::segments() {
        Some(sg) if sg.size() == n => {
            let sg = sg.as_dtype(Dtype::Int64)?;
            sg.eval()?;
            sg.as_slice::<i64>().to_vec()
        }
        Some(sg) => {
            return Err(Exception::custom(format!(
                "attention: {} segment ids for {t} positions",
                sg.size()
            )))
        }
        None => vec![0; n],
    };
    let side = side.max(1);
    let key = |i: usize| (seg[i], p[i].div_euclid(side), p[n + i].div_euclid(side));
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| key(i));
    let mut lens = Vec::new();
    let mut start = 0;
    for k in 1..=n {
        if k == n || key(order[k]) != key(order[start]) {
            lens.push((k - start) as i32);
            start = k;
        }
    }
    Ok((order.into_iter().map(|i| i as i32).collect(), lens))
}

/// Attention of q, k, v `[B, H, T, D]` within each tile.
pub(crate) fn attend(
    q: &Array,
    k: &Array,
    v: &Array,
    side: i64,
    scale: f32,
) -> Result<Array, Exception> {
    let t = q.shape()[2];
    let (order, lens) = tile_runs(t, side)?;
    let mut back = vec![0i32; order.len()];
    for (at, &i) in order.iter().enumerate() {
        back[i as usize] = at as i32;
    }
    let order = Array::from_slice(&order, &[t]);
    let (q, k, v) = (
        q.take_axis(&order, 2)?,
        k.take_axis(&order, 2)?,
        v.take_axis(&order, 2)?,
    );
    let mut outs = Vec::with_capacity(lens.len());
    let mut start = 0;
    for len in lens {
        let part = |x: &Array| x.try_index((.., .., start..start + len, ..));
        outs.push(mlx_rs::fast::scaled_dot_product_attention(
            part(&q)?,
            part(&k)?,
            part(&v)?,
            scale,
            None,
            None,
        )?);
        start += len;
    }
    let out = mlx_rs::ops::concatenate(&outs.iter().collect::<Vec<_>>(), 2)?;
    out.take_axis(Array::from_slice(&back, &[t]), 2)
}
