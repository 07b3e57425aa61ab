//! The vision ops against reference computations written out here in f64
//! (the formulas of mlx-vlm's Qwen2-VL code: `PatchEmbed`,
//! `VisionRotaryEmbedding` + `apply_rotary_pos_emb_vision`, the chunked
//! M-RoPE of `MRoPERotaryEmbedding`, per-frame attention over `cu_seqlens`,
//! `PatchMerger`'s reshape and the image-feature merge).
use lmspec_spec::expr::Value;
use lmspec_spec::ops::Layout as ValueInfo;
use mlx_rs::Array;

use super::tests::{build, close, run};
use super::{Ctx, Param};
use crate::inputs::{scoped, ForwardInputs};

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f64 / (1u64 << 31) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

fn ints(v: &[i32], shape: &[i32]) -> Array {
    Array::from_slice(v, shape)
}

#[test]
fn patchify_is_the_stride_kernel_convolution_of_each_patch() {
    // Conv3d kernel (t=2, p=2, p=2), 3 channels, 4 outputs; MLX weight
    // layout [out, t, p, p, c]; the patches flattened as (c, t, y, x).
    let (o, tt, p, c) = (4usize, 2usize, 2usize, 3usize);
    let k = c * tt * p * p;
    let n = 3usize;
    let ws = values(o * k, 1);
    let bs = values(o, 2);
    let xs = values(n * k, 3);
    let given = [
        ("weight", Value::Str("proj".into())),
        ("out", Value::Int(o as i64)),
        ("patch", Value::Int(p as i64)),
        ("temporal", Value::Int(tt as i64)),
        ("channels", Value::Int(c as i64)),
        ("bias", Value::Bool(true)),
    ];
    let w = vec![
        Param::Dense(Array::from_slice(
            &ws,
            &[o as i32, tt as i32, p as i32, p as i32, c as i32],
        )),
        Param::Dense(Array::from_slice(&bs, &[o as i32])),
    ];
    let op = build("patchify", &given, &[ValueInfo::flat(1)], w);
    let x = Array::from_slice(&xs, &[1, n as i32, k as i32]);
    let mut want = Vec::new();
    for row in 0..n {
        for (oo, b) in bs.iter().enumerate() {
            let mut acc = f64::from(*b);
            for ci in 0..c {
                for ti in 0..tt {
                    for y in 0..p {
                        for xx in 0..p {
                            let wi = (((oo * tt + ti) * p + y) * p + xx) * c + ci;
                            let xi = row * k + ((ci * tt + ti) * p + y) * p + xx;
                            acc += f64::from(ws[wi]) * f64::from(xs[xi]);
                        }
                    }
                }
            }
            want.push(acc);
        }
    }
    close(&run(op.as_ref(), &[&x], 0), &want, 1e-5);
    // A patch of the wrong width is an error, not a panic.
    let bad = Array::from_slice(&xs[..n * (k - 1)], &[1, n as i32, k as i32 - 1]);
    let mut ctx = Ctx {
        offset: 0,
        key_mask: None,
        positions: None,
        cache: None,
    };
    let err = op.forward(&[&bad], &mut ctx).unwrap_err().to_string();
    assert!(err.contains("flattened patches"), "{err}");
}

/// `x·cos + rotate_half(x)·sin` with per-position angles `[T][D/2]`, for
/// x `[H][T][D]` (the half-split rotation mlx-vlm applies).
fn rotate_reference(xs: &[f32], h: usize, t: usize, d: usize, ang: &[Vec<f64>]) -> Vec<f64> {
    let half = d / 2;
    let mut out = Vec::with_capacity(xs.len());
    for hh in 0..h {
        for tt in 0..t {
            let row = &xs[(hh * t + tt) * d..(hh * t + tt + 1) * d];
            for i in 0..d {
                let a = ang[tt][i % half];
                let x = f64::from(row[i]);
                let rot = if i < half {
                    -f64::from(row[i + half])
                } else {
                    f64::from(row[i - half])
                };
                out.push(x * a.cos() + rot * a.sin());
            }
        }
    }
    out
}

#[test]
fn vision_rope_rotates_rows_and_columns_with_their_own_ladders() {
    // mlx-vlm: VisionRotaryEmbedding(head_dim / 2) gives inv_freq over
    // dim = D/2; the angles are [h·inv, w·inv], then cat(freqs, freqs).
    let (h, t, d) = (2usize, 5usize, 8usize);
    let theta = 10000.0f64;
    let dim = d / 2;
    let inv: Vec<f64> = (0..dim / 2)
        .map(|j| 1.0 / theta.powf((2 * j) as f64 / dim as f64))
        .collect();
    let rows = [0i32, 0, 1, 1, 2];
    let cols = [0i32, 1, 0, 1, 0];
    let ang: Vec<Vec<f64>> = (0..t)
        .map(|k| {
            let mut a: Vec<f64> = inv.iter().map(|f| f64::from(rows[k]) * f).collect();
            a.extend(inv.iter().map(|f| f64::from(cols[k]) * f));
            a
        })
        .collect();
    let xs = values(h * t * d, 4);
    let x = Array::from_slice(&xs, &[1, h as i32, t as i32, d as i32]);
    let per_head = ValueInfo {
        dim: d as i64,
        heads: Some(h as i64),
    };
    let sections = Value::List(vec![Value::Int(2), Value::Int(2)]);
    let given = [("sections", sections), ("per_section", Value::Bool(true))];
    let op = build("mrope", &given, &[per_head], vec![]);
    let mut pos = rows.to_vec();
    pos.extend(cols);
    let inputs = ForwardInputs {
        positions: Some(ints(&pos, &[2, t as i32])),
        ..ForwardInputs::default()
    };
    let got = scoped(&inputs, 0, || run(op.as_ref(), &[&x], 0));
    close(&got, &rotate_reference(&xs, h, t, d, &ang), 1e-5);
}

#[test]
fn dealt_vision_rope_gives_rows_the_even_and_columns_the_odd_frequencies() {
    // mlx-vlm's PixtralRotaryEmbedding: freqs = base^(-2k/D) over the head
    // (k < D/2); the angles are [row · freqs[0::2], col · freqs[1::2]],
    // then cat(angles, angles) with the half-split rotation.
    let (h, t, d) = (2usize, 6usize, 16usize);
    let theta = 10000.0f64;
    let freqs: Vec<f64> = (0..d / 2)
        .map(|k| 1.0 / theta.powf((2 * k) as f64 / d as f64))
        .collect();
    let rows = [0i32, 0, 0, 1, 1, 3];
    let cols = [0i32, 1, 2, 0, 5, 2];
    let ang: Vec<Vec<f64>> = (0..t)
        .map(|k| {
            let mut a: Vec<f64> = freqs
                .iter()
                .step_by(2)
                .map(|f| f64::from(rows[k]) * f)
                .collect();
            a.extend(
                freqs
                    .iter()
                    .skip(1)
                    .step_by(2)
                    .map(|f| f64::from(cols[k]) * f),
            );
            a
        })
        .collect();
    let xs = values(h * t * d, 9);
    let x = Array::from_slice(&xs, &[1, h as i32, t as i32, d as i32]);
    let per_head = ValueInfo {
        dim: d as i64,
        heads: Some(h as i64),
    };
    let sections = Value::List(vec![Value::Int(4), Value::Int(4)]);
    let given = [
        ("sections", sections.clone()),
        ("per_section", Value::Bool(true)),
        ("dealt", Value::Bool(true)),
    ];
    let op = build("mrope", &given, &[per_head], vec![]);
    let mut pos = rows.to_vec();
    pos.extend(cols);
    let inputs = ForwardInputs {
        positions: Some(ints(&pos, &[2, t as i32])),
        ..ForwardInputs::default()
    };
    let got = scoped(&inputs, 0, || run(op.as_ref(), &[&x], 0));
    close(&got, &rotate_reference(&xs, h, t, d, &ang), 1e-5);
    // Each section its own ladder (Qwen-VL's) rotates the columns otherwise.
    let own = [("sections", sections), ("per_section", Value::Bool(true))];
    let other = build("mrope", &own, &[per_head], vec![]);
    let got = scoped(&inputs, 0, || run(other.as_ref(), &[&x], 0));
    let want = rotate_reference(&xs, h, t, d, &ang);
    let gap = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (f64::from(*a) - b).abs())
        .fold(0.0, f64::max);
    assert!(gap > 1e-2, "the ladders should differ, max diff {gap}");
}

#[test]
fn mrope_reads_each_frequency_chunk_from_its_axis() {
    // Chunked M-RoPE: inv_freq over the whole head, pairs [0, s0) read
    // axis t, the next s1 axis h, the last s2 axis w; 3 axes [3, T].
    let (h, t, d) = (2usize, 4usize, 8usize);
    let theta = 1000.0f64;
    let inv: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f64 / d as f64))
        .collect();
    let axis_of = [0usize, 1, 1, 2];
    let pos = [[3i32, 4, 4, 9], [3, 4, 5, 10], [3, 5, 4, 11]];
    let ang: Vec<Vec<f64>> = (0..t)
        .map(|k| {
            (0..d / 2)
                .map(|i| f64::from(pos[axis_of[i]][k]) * inv[i])
                .collect()
        })
        .collect();
    let xs = values(h * t * d, 5);
    let x = Array::from_slice(&xs, &[1, h as i32, t as i32, d as i32]);
    let per_head = ValueInfo {
        dim: d as i64,
        heads: Some(h as i64),
    };
    let sections = Value::List(vec![Value::Int(1), Value::Int(2), Value::Int(1)]);
    let given = [("sections", sections), ("base", Value::Float(theta))];
    let op = build("mrope", &given, &[per_head], vec![]);
    let flat: Vec<i32> = pos.iter().flatten().copied().collect();
    let inputs = ForwardInputs {
        positions: Some(ints(&flat, &[3, t as i32])),
        ..ForwardInputs::default()
    };
    let got = scoped(&inputs, 0, || run(op.as_ref(), &[&x], 0));
    close(&got, &rotate_reference(&xs, h, t, d, &ang), 1e-5);

    // Without positions every axis is the sequence position plus the
    // cache's delta: the ordinary half-split rope at offset + delta.
    let rope = build(
        "rope",
        &[("base", Value::Float(theta))],
        &[per_head],
        vec![],
    );
    let plain = run(rope.as_ref(), &[&x], 7);
    let none = ForwardInputs::default();
    let shifted = scoped(&none, 2, || run(op.as_ref(), &[&x], 5));
    let plain: Vec<f64> = plain.iter().map(|&v| f64::from(v)).collect();
    close(&shifted, &plain, 1e-5);

    // Positions of the wrong length are an error.
    let short = ForwardInputs {
        positions: Some(ints(&flat[..9], &[3, 3])),
        ..ForwardInputs::default()
    };
    let mut ctx = Ctx {
        offset: 0,
        key_mask: None,
        positions: None,
        cache: None,
    };
    let err = scoped(&short, 0, || op.forward(&[&x], &mut ctx))
        .unwrap_err()
        .to_string();
    assert!(err.contains("positions must be"), "{err}");
}

#[test]
fn segments_make_non_causal_attention_block_diagonal() {
    // Two frames of 3 and 2 patches: each query attends to its own frame
    // only (mlx-vlm splits q, k, v at cu_seqlens and attends per part).
    let (h, t, d) = (2usize, 5usize, 4usize);
    let seg = [0i32, 0, 0, 1, 1];
    let (qs, ks, vs) = (
        values(h * t * d, 6),
        values(h * t * d, 7),
        values(h * t * d, 8),
    );
    let shape = [1, h as i32, t as i32, d as i32];
    let (q, k, v) = (
        Array::from_slice(&qs, &shape),
        Array::from_slice(&ks, &shape),
        Array::from_slice(&vs, &shape),
    );
    let scale = (d as f64).powf(-0.5);
    let per_head = ValueInfo {
        dim: d as i64,
        heads: Some(h as i64),
    };
    let given = [
        ("scale", Value::Float(scale)),
        ("causal", Value::Bool(false)),
    ];
    let op = build("attention", &given, &[per_head; 3], vec![]);
    let mut want = Vec::new();
    for hh in 0..h {
        for i in 0..t {
            let at = |a: &[f32], p: usize, c: usize| f64::from(a[(hh * t + p) * d + c]);
            let keys: Vec<usize> = (0..t).filter(|&j| seg[j] == seg[i]).collect();
            let s: Vec<f64> = keys
                .iter()
                .map(|&j| (0..d).map(|c| at(&qs, i, c) * at(&ks, j, c)).sum::<f64>() * scale)
                .collect();
            let m = s.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for c in 0..d {
                want.push(
                    keys.iter()
                        .zip(&e)
                        .map(|(&j, w)| w / z * at(&vs, j, c))
                        .sum(),
                );
            }
        }
    }
    let inputs = ForwardInputs {
        segments: Some(ints(&seg, &[t as i32])),
        ..ForwardInputs::default()
    };
    let got = scoped(&inputs, 0, || run(op.as_ref(), &[&q, &k, &v], 0));
    close(&got, &want, 1e-5);
    // Without segments every query sees every key: a different result.
    let all = run(op.as_ref(), &[&q, &k, &v], 0);
    let diff = all
        .iter()
        .zip(&want)
        .map(|(a, b)| (f64::from(*a) - b).abs())
        .fold(0.0, f64::max);
    assert!(diff > 1e-3, "segments changed nothing ({diff})");
}

#[test]
fn merge_patches_concatenates_runs_of_positions() {
    let xs: Vec<f32> = (0..16).map(|v| v as f32).collect();
    let x = Array::from_slice(&xs, &[1, 8, 2]);
    let op = build(
        "merge_patches",
        &[("group", Value::Int(4))],
        &[ValueInfo::flat(2)],
        vec![],
    );
    let y = run(op.as_ref(), &[&x], 0);
    let want: Vec<f64> = xs.iter().map(|&v| f64::from(v)).collect();
    close(&y, &want, 0.0);
    let bad = Array::from_slice(&xs[..12], &[1, 6, 2]);
    let mut ctx = Ctx {
        offset: 0,
        key_mask: None,
        positions: None,
        cache: None,
    };
    assert!(op.forward(&[&bad], &mut ctx).is_err());
}

#[test]
fn channel_major_merge_is_the_unfold_of_each_merge_window() {
    // mlx-vlm's Mistral 3 patch merger: the [h, w, D] grid of an image
    // through unfold(kernel 2, stride 2) gives per merged position (row i,
    // column j) the features x[2i + di, 2j + dj, c] at c·4 + di·2 + dj. The
    // op's input is the grid in merge-window order (the four patches of a
    // window adjacent).
    let (h, w, d, m) = (4usize, 6usize, 3usize, 2usize);
    let grid = values(h * w * d, 11);
    let at = |y: usize, x: usize, c: usize| grid[(y * w + x) * d + c];
    let mut windows = Vec::new();
    for bh in 0..h / m {
        for bw in 0..w / m {
            for ih in 0..m {
                for iw in 0..m {
                    for c in 0..d {
                        windows.push(at(bh * m + ih, bw * m + iw, c));
                    }
                }
            }
        }
    }
    let x = Array::from_slice(&windows, &[1, (h * w) as i32, d as i32]);
    let given = [
        ("group", Value::Int((m * m) as i64)),
        ("channel_major", Value::Bool(true)),
    ];
    let op = build(
        "merge_patches",
        &given,
        &[ValueInfo::flat(d as i64)],
        vec![],
    );
    let mut want = Vec::new();
    for i in 0..h / m {
        for j in 0..w / m {
            for c in 0..d {
                for di in 0..m {
                    for dj in 0..m {
                        want.push(f64::from(at(m * i + di, m * j + dj, c)));
                    }
                }
            }
        }
    }
    close(&run(op.as_ref(), &[&x], 0), &want, 0.0);
    // Without channel_major the patches' rows follow one another.
    let plain = build(
        "merge_patches",
        &[("group", Value::Int((m * m) as i64))],
        &[ValueInfo::flat(d as i64)],
        vec![],
    );
    let got = run(plain.as_ref(), &[&x], 0);
    assert!(got
        .iter()
        .zip(&want)
        .any(|(a, b)| (f64::from(*a) - b).abs() > 1e-3));
}

#[test]
fn splice_writes_feature_rows_at_the_image_tokens() {
    let tokens = ints(&[5, 9, 9, 6, 9], &[1, 5]);
    let emb: Vec<f32> = (0..10).map(|v| v as f32).collect();
    let e = Array::from_slice(&emb, &[1, 5, 2]);
    let op = build(
        "splice",
        &[("token", Value::Int(9))],
        &[ValueInfo::flat(1), ValueInfo::flat(2)],
        vec![],
    );
    let feats = ForwardInputs {
        features: Some(Array::from_slice(
            &[-1.0f32, -2.0, -3.0, -4.0, -5.0, -6.0],
            &[3, 2],
        )),
        ..ForwardInputs::default()
    };
    let got = scoped(&feats, 0, || run(op.as_ref(), &[&tokens, &e], 0));
    let want = [0.0, 1.0, -1.0, -2.0, -3.0, -4.0, 6.0, 7.0, -5.0, -6.0];
    close(&got, &want, 0.0);
    // Without features the embeddings pass through.
    let plain = run(op.as_ref(), &[&tokens, &e], 0);
    let emb64: Vec<f64> = emb.iter().map(|&v| f64::from(v)).collect();
    close(&plain, &emb64, 0.0);
    // More feature rows than placeholders: an error naming both counts.
    let extra = ForwardInputs {
        features: Some(Array::from_slice(&[0.0f32; 8], &[4, 2])),
        ..ForwardInputs::default()
    };
    let mut ctx = Ctx {
        offset: 0,
        key_mask: None,
        positions: None,
        cache: None,
    };
    let err = scoped(&extra, 0, || op.forward(&[&tokens, &e], &mut ctx))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("3 image token(s)") && err.contains("4 feature rows"),
        "{err}"
    );
}

#[test]
fn quick_gelu_is_x_sigmoid_1_702_x() {
    // mlx's nn.gelu_fast_approx (and CLIP's QuickGELU), which ViT MLPs use.
    let xs = [-4.0f32, -1.0, -0.25, 0.0, 0.5, 2.0, 6.0];
    let x = Array::from_slice(&xs, &[1, 1, xs.len() as i32]);
    let op = build(
        "activation",
        &[("fn", Value::Str("quick_gelu".into()))],
        &[ValueInfo::flat(xs.len() as i64)],
        vec![],
    );
    let want: Vec<f64> = xs
        .iter()
        .map(|&v| {
            let v = f64::from(v);
            v / (1.0 + (-1.702 * v).exp())
        })
        .collect();
    close(&run(op.as_ref(), &[&x], 0), &want, 1e-6);
}

#[test]
fn pool_patches_averages_each_block_of_the_grid() {
    // A 4 x 4 grid of 2 features, 2 x 2 blocks: mlx-vlm's AvgPool2d over
    // the grid (Gemma 3's projector).
    let (side, k, d) = (4usize, 2usize, 2usize);
    let xs = values(side * side * d, 9);
    let x = Array::from_slice(&xs, &[1, (side * side) as i32, d as i32]);
    let op = build(
        "pool_patches",
        &[("kernel", Value::Int(k as i64))],
        &[ValueInfo::flat(d as i64)],
        vec![],
    );
    let mut want = Vec::new();
    for br in 0..side / k {
        for bc in 0..side / k {
            for c in 0..d {
                let mut acc = 0.0;
                for r in 0..k {
                    for q in 0..k {
                        let pos = (br * k + r) * side + bc * k + q;
                        acc += f64::from(xs[pos * d + c]);
                    }
                }
                want.push(acc / (k * k) as f64);
            }
        }
    }
    close(&run(op.as_ref(), &[&x], 0), &want, 1e-6);
    let bad = Array::from_slice(&xs[..12], &[1, 6, 2]);
    let mut ctx = Ctx {
        offset: 0,
        key_mask: None,
        positions: None,
        cache: None,
    };
    assert!(op.forward(&[&bad], &mut ctx).is_err(), "not a square grid");
}

#[test]
fn pixel_shuffle_moves_each_block_into_the_features() {
    // Idefics3's pixel_shuffle: output row h2 * (side/f) + w2 holds, in
    // order, the features of grid cells (h2 f + hs, w2 f + ws) for hs, ws.
    let (side, f, d) = (4usize, 2usize, 3usize);
    let xs = values(side * side * d, 10);
    let x = Array::from_slice(&xs, &[1, (side * side) as i32, d as i32]);
    let op = build(
        "pixel_shuffle",
        &[("factor", Value::Int(f as i64))],
        &[ValueInfo::flat(d as i64)],
        vec![],
    );
    let mut want = Vec::new();
    for h2 in 0..side / f {
        for w2 in 0..side / f {
            for hs in 0..f {
                for ws in 0..f {
                    let pos = (h2 * f + hs) * side + w2 * f + ws;
                    want.extend(xs[pos * d..(pos + 1) * d].iter().map(|&v| f64::from(v)));
                }
            }
        }
    }
    close(&run(op.as_ref(), &[&x], 0), &want, 0.0);
}

#[test]
fn grid_table_interpolates_the_learned_table_to_each_grid() {
    // mlx-vlm's Qwen3-VL fast_pos_embed_interpolate: per image, linspace
    // row/column coordinates over the side x side table, the four corners
    // weighted bilinearly, then the rows in merge-window order.
    let (g, d, m) = (5usize, 3usize, 2usize);
    let table = values(g * g * d, 11);
    let grids = [[1i64, 4, 6], [1, 2, 2]];
    let n: usize = grids.iter().map(|x| (x[0] * x[1] * x[2]) as usize).sum();
    let x = Array::from_slice(&vec![0f32; n * d], &[1, n as i32, d as i32]);
    let given = [
        ("weight", Value::Str("pos_embed".into())),
        ("side", Value::Int(g as i64)),
        ("merge", Value::Int(m as i64)),
    ];
    let w = vec![Param::Dense(Array::from_slice(
        &table,
        &[(g * g) as i32, d as i32],
    ))];
    let op = build("grid_table", &given, &[ValueInfo::flat(d as i64)], w);
    let lin = |k: usize, count: usize| -> f64 {
        if count == 1 {
            0.0
        } else {
            k as f64 * (g - 1) as f64 / (count - 1) as f64
        }
    };
    let mut want = Vec::new();
    for &[_, h, wd] in &grids {
        let (h, wd) = (h as usize, wd as usize);
        // Row-major interpolated table of this image.
        let mut img = vec![vec![0f64; d]; h * wd];
        for r in 0..h {
            for c in 0..wd {
                let (y, xx) = (lin(r, h), lin(c, wd));
                let (y0, x0) = (y.floor() as usize, xx.floor() as usize);
                let (y1, x1) = ((y0 + 1).min(g - 1), (x0 + 1).min(g - 1));
                let (dy, dx) = (y - y0 as f64, xx - x0 as f64);
                for (yy, xc, wt) in [
                    (y0, x0, (1.0 - dy) * (1.0 - dx)),
                    (y0, x1, (1.0 - dy) * dx),
                    (y1, x0, dy * (1.0 - dx)),
                    (y1, x1, dy * dx),
                ] {
                    for k in 0..d {
                        img[r * wd + c][k] += wt * f64::from(table[(yy * g + xc) * d + k]);
                    }
                }
            }
        }
        for bh in 0..h / m {
            for bw in 0..wd / m {
                for ih in 0..m {
                    for iw in 0..m {
                        want.extend(&img[(bh * m + ih) * wd + bw * m + iw]);
                    }
                }
            }
        }
    }
    let inputs = ForwardInputs {
        grids: Some(grids.to_vec()),
        ..ForwardInputs::default()
    };
    let got = scoped(&inputs, 0, || run(op.as_ref(), &[&x], 0));
    close(&got, &want, 1e-5);
    // Without grids, or with grids that do not cover the input: errors.
    let mut ctx = Ctx {
        offset: 0,
        key_mask: None,
        positions: None,
        cache: None,
    };
    assert!(op.forward(&[&x], &mut ctx).is_err());
    let short = ForwardInputs {
        grids: Some(vec![[1, 2, 2]]),
        ..ForwardInputs::default()
    };
    assert!(scoped(&short, 0, || op.forward(&[&x], &mut ctx)).is_err());
}

#[test]
fn traditional_mrope_rotates_adjacent_pairs_at_sequence_positions() {
    // mlx-lm runs Qwen-VL text models as qwen2: `rope_traditional` rotates
    // (x[2i], x[2i+1]). Without per-axis positions that is the traditional
    // rope at offset + delta; with them it is refused.
    let (h, t, d) = (2usize, 3usize, 8usize);
    let theta = 1000.0f64;
    let xs = values(h * t * d, 6);
    let x = Array::from_slice(&xs, &[1, h as i32, t as i32, d as i32]);
    let per_head = ValueInfo {
        dim: d as i64,
        heads: Some(h as i64),
    };
    let sections = Value::List(vec![Value::Int(2), Value::Int(1), Value::Int(1)]);
    let given = [
        ("sections", sections.clone()),
        ("base", Value::Float(theta)),
        ("traditional", Value::Bool(true)),
    ];
    let op = build("mrope", &given, &[per_head], vec![]);
    let rope = build(
        "rope",
        &[
            ("base", Value::Float(theta)),
            ("traditional", Value::Bool(true)),
        ],
        &[per_head],
        vec![],
    );
    let plain: Vec<f64> = run(rope.as_ref(), &[&x], 6)
        .iter()
        .map(|&v| f64::from(v))
        .collect();
    let none = ForwardInputs::default();
    close(
        &scoped(&none, 2, || run(op.as_ref(), &[&x], 4)),
        &plain,
        1e-6,
    );

    let flat: Vec<i32> = (0..3 * t as i32).collect();
    let inputs = ForwardInputs {
        positions: Some(ints(&flat, &[3, t as i32])),
        ..ForwardInputs::default()
    };
    let mut ctx = Ctx {
        offset: 0,
        key_mask: None,
        positions: None,
        cache: None,
    };
    let err = scoped(&inputs, 0, || op.forward(&[&x], &mut ctx)).expect_err("refused");
    assert!(err.to_string().contains("traditional"), "{err}");
}
