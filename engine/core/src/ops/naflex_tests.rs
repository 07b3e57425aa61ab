//! The ops of SigLIP2-NaFlex towers (LFM2-VL's). `patchify` with
//! `channels_last` against mlx-vlm's `nn.Linear` over (row, column,
//! channel) patches, written out here in f64. `grid_table` with cell-centre coordinates and antialiasing against the
//! resize of torch's `interpolate(mode="bilinear", align_corners=False,
//! antialias=True)` written out here in f64 in ATen's own terms (the
//! filter's centre `scale·(i + 0.5)`, its support `[centre - scale + 0.5,
//! centre + scale + 0.5)` cut to the table, triangle weights normalised;
//! a grown axis plain bilinear from `(i + 0.5)·scale - 0.5` clamped at 0),
//! the formula mlx-vlm's SigLIP2 towers use for their position tables.
use lmspec_spec::expr::Value;
use lmspec_spec::ops::Layout as ValueInfo;
use mlx_rs::Array;

use super::tests::{build, close, run};
use super::Param;
use crate::inputs::{scoped, ForwardInputs};

/// ATen's per-axis weights: for each of `n` cells, (table row, weight).
fn aten_axis(side: usize, n: usize, antialias: bool) -> Vec<Vec<(usize, f64)>> {
    let scale = side as f64 / n as f64;
    (0..n)
        .map(|i| {
            if antialias && scale > 1.0 {
                let centre = scale * (i as f64 + 0.5);
                let xmin = ((centre - scale + 0.5).floor().max(0.0)) as usize;
                let xmax = ((centre + scale + 0.5).floor() as usize).min(side);
                let taps: Vec<(usize, f64)> = (xmin..xmax)
                    .map(|j| {
                        let x = (j as f64 - centre + 0.5) / scale;
                        (j, (1.0 - x.abs()).max(0.0))
                    })
                    .collect();
                let total: f64 = taps.iter().map(|t| t.1).sum();
                taps.into_iter().map(|(j, w)| (j, w / total)).collect()
            } else {
                let src = ((i as f64 + 0.5) * scale - 0.5).max(0.0);
                let i0 = src.floor() as usize;
                let i1 = (i0 + 1).min(side - 1);
                let f = src - i0 as f64;
                vec![(i0.min(side - 1), 1.0 - f), (i1, f)]
            }
        })
        .collect()
}

fn table(n: usize) -> Vec<f32> {
    (0..n)
        .map(|k| ((k * 37 % 23) as f32 / 11.0) - 1.0)
        .collect()
}

fn want(side: usize, d: usize, m: usize, grids: &[[i64; 3]], t: &[f32], aa: bool) -> Vec<f64> {
    let mut out = Vec::new();
    for &[_, h, w] in grids {
        let (h, w) = (h as usize, w as usize);
        let (ys, xs) = (aten_axis(side, h, aa), aten_axis(side, w, aa));
        for bh in 0..h / m {
            for bw in 0..w / m {
                for ih in 0..m {
                    for iw in 0..m {
                        let mut row = vec![0f64; d];
                        for &(y, wy) in &ys[bh * m + ih] {
                            for &(x, wx) in &xs[bw * m + iw] {
                                for (k, r) in row.iter_mut().enumerate() {
                                    *r += wy * wx * f64::from(t[(y * side + x) * d + k]);
                                }
                            }
                        }
                        out.extend(row);
                    }
                }
            }
        }
    }
    out
}

fn run_table(
    side: usize,
    d: usize,
    m: usize,
    grids: &[[i64; 3]],
    aa: bool,
) -> (Vec<f32>, Vec<f32>) {
    let t = table(side * side * d);
    let given = [
        ("weight", Value::Str("pos".into())),
        ("side", Value::Int(side as i64)),
        ("merge", Value::Int(m as i64)),
        ("align_corners", Value::Bool(false)),
        ("antialias", Value::Bool(aa)),
    ];
    let w = vec![Param::Dense(Array::from_slice(
        &t,
        &[(side * side) as i32, d as i32],
    ))];
    let op = build("grid_table", &given, &[ValueInfo::flat(d as i64)], w);
    let n: i64 = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
    let x = Array::from_slice(&vec![0f32; n as usize * d], &[1, n as i32, d as i32]);
    let inputs = ForwardInputs {
        grids: Some(grids.to_vec()),
        ..ForwardInputs::default()
    };
    let got = scoped(&inputs, 0, || run(op.as_ref(), &[&x], 0));
    (t, got)
}

#[test]
fn grid_table_resizes_from_cell_centres_with_antialiasing() {
    // A 5 x 5 table grown to 6 x 8, shrunk to 2 x 4 (scale 2.5 and 1.25)
    // and to 4 x 2: merge windows of 2.
    let (side, d, m) = (5usize, 3usize, 2usize);
    let grids = [[1i64, 6, 8], [1, 2, 4], [1, 4, 2]];
    let (t, got) = run_table(side, d, m, &grids, true);
    close(&got, &want(side, d, m, &grids, &t, true), 1e-5);
    // Without antialiasing a shrunk axis reads two neighbours only, and
    // the values differ from the filtered ones.
    let (t, plain) = run_table(side, d, m, &grids, false);
    let plain_want = want(side, d, m, &grids, &t, false);
    close(&plain, &plain_want, 1e-5);
    let filtered = want(side, d, m, &grids, &t, true);
    let gap = plain_want
        .iter()
        .zip(&filtered)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(gap > 1e-2, "antialiasing changes the shrunk grids: {gap}");
}

#[test]
fn grid_table_refuses_antialias_with_aligned_corners() {
    let spec = lmspec_spec::ops::GridTable {
        weight: lmspec_spec::schema::WeightName("pos".into()),
        side: 4,
        merge: 1,
        align_corners: true,
        antialias: true,
    };
    let err = spec
        .resolve("", &[ValueInfo::flat(8)])
        .expect_err("antialias needs cell centres");
    assert!(err.to_string().contains("antialias"), "{err}");
}

#[test]
fn patchify_channels_last_is_a_linear_map_of_each_patch() {
    // Patches of 2 x 2 pixels, 3 channels, flattened (y, x, c); the weight
    // [out, y·x·c] of a linear map, with a bias.
    let (o, p, c, n) = (4usize, 2usize, 3usize, 5usize);
    let k = p * p * c;
    let w = table(o * k);
    let b: Vec<f32> = (0..o).map(|i| i as f32 * 0.25 - 0.4).collect();
    let x: Vec<f32> = (0..n * k)
        .map(|i| ((i * 13 % 17) as f32 / 8.0) - 1.0)
        .collect();
    let given = [
        ("weight", Value::Str("patch_embedding".into())),
        ("out", Value::Int(o as i64)),
        ("patch", Value::Int(p as i64)),
        ("channels", Value::Int(c as i64)),
        ("bias", Value::Bool(true)),
        ("channels_last", Value::Bool(true)),
    ];
    let params = vec![
        Param::Dense(Array::from_slice(&w, &[o as i32, k as i32])),
        Param::Dense(Array::from_slice(&b, &[o as i32])),
    ];
    let op = build("patchify", &given, &[ValueInfo::flat(k as i64)], params);
    let input = Array::from_slice(&x, &[1, n as i32, k as i32]);
    let got = run(op.as_ref(), &[&input], 0);
    let mut want = Vec::new();
    for r in 0..n {
        for j in 0..o {
            let dot: f64 = (0..k)
                .map(|i| f64::from(x[r * k + i]) * f64::from(w[j * k + i]))
                .sum();
            want.push(dot + f64::from(b[j]));
        }
    }
    close(&got, &want, 1e-5);
    // More than one frame per patch is refused with channels_last.
    let spec = lmspec_spec::ops::Patchify {
        weight: lmspec_spec::schema::WeightName("patch_embedding".into()),
        out: 4,
        patch: 2,
        temporal: 2,
        channels: 3,
        bias: false,
        channels_last: true,
    };
    let err = spec
        .resolve("", &[ValueInfo::flat(24)])
        .expect_err("one frame");
    assert!(err.to_string().contains("channels_last"), "{err}");
}
