//! Window attention over a tower's patch grid (`attention` with
//! `grid_window`) against mlx-vlm's Qwen2.5-VL formula written out here in
//! f64: `get_window_index` regroups the merge windows by attention window
//! (each frame's merged grid padded to whole windows, windows in row-major
//! order, merge windows row-major inside each), attention runs over each
//! window's run (`cu_window_seqlens`), and the rows go back to the
//! processor's order.
use lmspec_spec::expr::Value;
use lmspec_spec::ops::Layout as ValueInfo;
use mlx_rs::Array;

use super::tests::{build, close, run};
use super::Ctx;
use crate::inputs::{scoped, ForwardInputs};

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(2862933555777941757)
        .wrapping_add(3037000493);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(2862933555777941757).wrapping_add(3037000493);
            ((s >> 33) as f64 / (1u64 << 31) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

/// mlx-vlm's `get_window_index` for grids `(t, h, w)` in patches, `merge`
/// patches a merge-window side and `win` merge windows an attention-window
/// side: the merge-window order and the window lengths in merge windows.
fn window_index(grids: &[[usize; 3]], merge: usize, win: usize) -> (Vec<usize>, Vec<usize>) {
    let (mut order, mut lens) = (Vec::new(), Vec::new());
    let mut base = 0;
    for &[t, h, w] in grids {
        let (gh, gw) = (h / merge, w / merge);
        let (nh, nw) = ((gh + win - gh % win) / win, (gw + win - gw % win) / win);
        for f in 0..t {
            for wh in 0..nh {
                for ww in 0..nw {
                    let mut n = 0;
                    for r in wh * win..(wh + 1) * win {
                        for c in ww * win..(ww + 1) * win {
                            if r < gh && c < gw {
                                order.push(base + (f * gh + r) * gw + c);
                                n += 1;
                            }
                        }
                    }
                    if n > 0 {
                        lens.push(n);
                    }
                }
            }
        }
        base += t * gh * gw;
    }
    (order, lens)
}

#[test]
fn grid_window_attention_is_mlx_vlm_window_attention() {
    // Two images: 6 x 10 patches (3 x 5 merge windows: windows of 2 x 2,
    // cut ones at the bottom and right) and 4 x 4 (one window); merge 2,
    // windows of 2 x 2 merge windows (4 x 4 patches).
    let (merge, win) = (2usize, 2usize);
    let grids = [[1usize, 6, 10], [1, 4, 4]];
    let (h, d) = (2usize, 4usize);
    let unit = merge * merge;
    // Each patch's row, column and frame in the processor's order.
    let (mut rows, mut cols, mut seg) = (Vec::new(), Vec::new(), Vec::new());
    let mut frame = 0;
    for &[t, gh, gw] in &grids {
        for _ in 0..t {
            for bh in 0..gh / merge {
                for bw in 0..gw / merge {
                    for ih in 0..merge {
                        for iw in 0..merge {
                            rows.push((bh * merge + ih) as i32);
                            cols.push((bw * merge + iw) as i32);
                            seg.push(frame);
                        }
                    }
                }
            }
            frame += 1;
        }
    }
    let t = rows.len();
    let (qs, ks, vs) = (
        values(h * t * d, 1),
        values(h * t * d, 2),
        values(h * t * d, 3),
    );
    let at = |a: &[f32], hh: usize, p: usize, c: usize| f64::from(a[(hh * t + p) * d + c]);
    let scale = (d as f64).powf(-0.5);
    // mlx-vlm: regroup, attend per window run, put the rows back.
    let (order, lens) = window_index(&grids, merge, win);
    let perm: Vec<usize> = order
        .iter()
        .flat_map(|&u| (0..unit).map(move |k| u * unit + k))
        .collect();
    let mut out = vec![0f64; h * t * d];
    for hh in 0..h {
        let mut start = 0;
        for &n in &lens {
            let run = &perm[start * unit..(start + n) * unit];
            for &i in run {
                let s: Vec<f64> = run
                    .iter()
                    .map(|&j| {
                        (0..d)
                            .map(|c| at(&qs, hh, i, c) * at(&ks, hh, j, c))
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..d {
                    out[(hh * t + i) * d + c] = run
                        .iter()
                        .zip(&e)
                        .map(|(&j, w)| w / z * at(&vs, hh, j, c))
                        .sum();
                }
            }
            start += n;
        }
    }
    // 3 x 5 merge windows in 2 x 2 windows: 2, 2, 1 / 2, 2, 1 wide; then one.
    assert_eq!(lens, [4, 4, 2, 2, 2, 1, 4]);

    let per_head = ValueInfo {
        dim: d as i64,
        heads: Some(h as i64),
    };
    let given = [
        ("scale", Value::Float(scale)),
        ("causal", Value::Bool(false)),
        ("grid_window", Value::Int((win * merge) as i64)),
    ];
    let op = build("attention", &given, &[per_head; 3], vec![]);
    let shape = [1, h as i32, t as i32, d as i32];
    let (q, k, v) = (
        Array::from_slice(&qs, &shape),
        Array::from_slice(&ks, &shape),
        Array::from_slice(&vs, &shape),
    );
    let n = t as i32;
    let mut pos = rows.clone();
    pos.extend(&cols);
    let inputs = ForwardInputs {
        positions: Some(Array::from_slice(&pos, &[2, n])),
        segments: Some(Array::from_slice(&seg, &[n])),
        ..ForwardInputs::default()
    };
    // Run tile by tile (the plain case)...
    let got = scoped(&inputs, 0, || run(op.as_ref(), &[&q, &k, &v], 0));
    close(&got, &out, 1e-5);
    // ...and as one masked attention (a key mask present: every key real).
    let keys = Array::from_slice(&vec![true; t], &[1, n]);
    let masked = scoped(&inputs, 0, || {
        let mut ctx = Ctx {
            offset: 0,
            key_mask: Some(&keys),
            positions: None,
            cache: None,
        };
        op.forward(&[&q, &k, &v], &mut ctx).expect("masked")
    });
    close(masked.as_slice::<f32>(), &out, 1e-5);
    // Without the tiles (the full-attention blocks) the result differs.
    let full = build("attention", &given[..2], &[per_head; 3], vec![]);
    let whole = scoped(&inputs, 0, || run(full.as_ref(), &[&q, &k, &v], 0));
    let diff = whole
        .iter()
        .zip(&out)
        .map(|(a, b)| (f64::from(*a) - b).abs())
        .fold(0.0, f64::max);
    assert!(diff > 1e-3, "the windows changed nothing ({diff})");
    // Without positions the tiles are unknown: an error, not a panic.
    let mut ctx = Ctx {
        offset: 0,
        key_mask: None,
        positions: None,
        cache: None,
    };
    let bare = ForwardInputs {
        segments: Some(Array::from_slice(&seg, &[n])),
        ..ForwardInputs::default()
    };
    let err = scoped(&bare, 0, || op.forward(&[&q, &k, &v], &mut ctx))
        .unwrap_err()
        .to_string();
    assert!(err.contains("grid_window needs"), "{err}");
}
