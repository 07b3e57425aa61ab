//! The CPU kernels against MLX's own ops (the ops Python's `mx.*` calls)
//! and against float64 sums.
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::{Array, Dtype};

use super::*;

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
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn array(shape: &[i32], seed: u64) -> Array {
    let n = shape.iter().product::<i32>() as usize;
    Array::from_slice(&values(n, seed), shape)
}

fn host(a: &Array) -> Vec<f32> {
    let a = a
        .as_dtype(Dtype::Float32)
        .and_then(|a| a.contiguous())
        .expect("contiguous");
    a.eval().expect("eval");
    a.as_slice::<f32>().to_vec()
}

fn f32_of(a: &Array) -> Array {
    a.as_dtype(Dtype::Float32).expect("float32")
}

#[test]
fn biases_tied_to_the_scales_are_not_read() {
    expect_forced_level();
    // GGUF's Q8_0, Q5_0 and Q4_0 hold `d * (q - k)` as scale d, bias -k d.
    let (n, k) = (20, 256);
    for (bits, scale_dtype) in [
        (8, Dtype::Float16),
        (5, Dtype::Float16),
        (4, Dtype::Float32),
    ] {
        let w = array(&[n, k], 800 + bits as u64);
        let (wq, s, b) = mlx_rs::ops::quantize(&w, 32, bits).expect("quantize");
        let s = s.as_dtype(scale_dtype).expect("scales");
        let m = -((1 << (bits - 1)) as f32);
        let tied = mlx_rs::ops::multiply(&s, Array::from_f32(m))
            .and_then(|t| t.as_dtype(scale_dtype))
            .expect("tied");
        assert_eq!(tied_biases(&s, &tied, bits).expect("check"), Some(m));
        assert_eq!(
            tied_biases(&s, &b, bits).expect("check"),
            None,
            "MLX's own biases"
        );
        let zeros = mlx_rs::ops::zeros_like(&tied).expect("zeros");
        for activations in [Activations::Float, Activations::Int8, Activations::Int16] {
            for rows in [1, 5] {
                let x = array(&[rows, k], 810 + rows as u64);
                let read = quantized_matmul(&x, &wq, &s, &tied, 32, bits, activations)
                    .expect("reads the biases");
                // Given zeros for biases, the tied product still computes
                // them from the scales: the same bits.
                let from_scales =
                    quantized_matmul_tied(&x, &wq, &s, &zeros, 32, bits, activations, Some(m))
                        .expect("tied");
                assert_eq!(
                    host(&read),
                    host(&from_scales),
                    "bits {bits} {activations:?} rows {rows}"
                );
            }
        }
    }
}

#[test]
fn strided_inputs_read_as_their_values() {
    // x as a transposed view (no unit stride) and as a slice with gaps
    // between rows: the product equals that of a contiguous copy.
    let (n, k) = (8, 64);
    let (wq, s, b) = mlx_rs::ops::quantize(array(&[n, k], 90), 32, 4).expect("quantize");
    let t = array(&[k, 3], 91).t();
    let wide = array(&[3, 2 * k], 92);
    let gaps = wide.index((.., 0..k));
    for x in [&t, &gaps] {
        let dense = x.contiguous().expect("copy");
        for act in [Activations::Float, Activations::Int8, Activations::Int16] {
            let got = host(&quantized_matmul(x, &wq, &s, &b, 32, 4, act).expect("strided"));
            let want = host(&quantized_matmul(&dense, &wq, &s, &b, 32, 4, act).expect("dense"));
            assert_eq!(got, want, "{act:?} {:?}", x.strides());
        }
    }
}

#[test]
fn geglu_f16_is_llama_cpps_table_gelu() {
    expect_forced_level();
    // Gates over [-12, 12): both cut-offs and the table between; a strided
    // pair from a fused projection and a plain pair (77: a partial vector).
    let fused =
        mlx_rs::ops::multiply(array(&[1, 5, 2 * 70], 61), Array::from_f32(12.0)).expect("x");
    let parts = mlx_rs::ops::split_equal(&fused, 2, -1).expect("split");
    let plain = (
        mlx_rs::ops::multiply(array(&[3, 77], 62), Array::from_f32(12.0)).expect("g"),
        array(&[3, 77], 63),
    );
    for (g, u) in [(&parts[0], &parts[1]), (&plain.0, &plain.1)] {
        let ours = host(&geglu_f16(g, u).expect("kernel"));
        let (gs, us) = (host(g), host(u));
        for (i, (&x, &up)) in gs.iter().zip(&us).enumerate() {
            // ggml: x rounded to float16, its tanh-GELU rounded to float16.
            let gelu = if x <= -10.0 {
                0.0
            } else if x >= 10.0 {
                x
            } else {
                let h = half::f16::from_f32(x).to_f32();
                let c = 0.797_884_6_f32 * h * (1.0 + 0.044715 * h * h);
                f16_round(0.5 * h * (1.0 + c.tanh()))
            };
            let want = gelu * up;
            assert!(
                (ours[i] - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "gate {x}: {} vs {want}",
                ours[i]
            );
        }
    }
}

#[test]
fn sixteen_value_groups_multiply_and_dequantize() {
    expect_forced_level();
    // GGUF's Q2_K/Q3_K/Q6_K sub-blocks: groups MLX does not make, so the
    // reference is the block formula over MLX's packing of the values.
    let (n, k) = (24, 512);
    for bits in [2, 3, 6] {
        let w = array(&[n, k], 700 + bits as u64);
        let (wq, _, _) = mlx_rs::ops::quantize(&w, 32, bits).expect("quantize");
        let shape = [n, k / 16];
        let s = mlx_rs::ops::abs(array(&shape, 710 + bits as u64)).expect("s");
        let b = array(&shape, 720 + bits as u64);
        let ones = mlx_rs::ops::ones::<f32>(&[n, k / 32]).expect("ones");
        let zeros = mlx_rs::ops::zeros::<f32>(&[n, k / 32]).expect("zeros");
        let q = host(&mlx_rs::ops::dequantize(&wq, &ones, &zeros, 32, bits).expect("q"));
        let (sf, bf) = (host(&s), host(&b));
        let (ku, g) = (k as usize, 16);
        let wd: Vec<f32> = (0..n as usize * ku)
            .map(|i| {
                let at = (i / ku) * (ku / g) + (i % ku) / g;
                q[i] * sf[at] + bf[at]
            })
            .collect();
        assert_eq!(
            host(&dequantize(&wq, &s, &b, 16, bits).expect("dequantize")),
            wd,
            "bits {bits}: dequantized"
        );
        for rows in [1, 3] {
            let x = array(&[1, rows, k], 730 + rows as u64);
            let ours = host(
                &quantized_matmul(&x, &wq, &s, &b, 16, bits, Activations::Float).expect("kernel"),
            );
            let xs = host(&x);
            for r in 0..rows as usize {
                for j in 0..n as usize {
                    let terms = (0..ku).map(|i| xs[r * ku + i] as f64 * wd[j * ku + i] as f64);
                    let (exact, size) = terms.fold((0f64, 0f64), |(e, m), t| (e + t, m + t.abs()));
                    // Float32 sums in some order: within a few roundings of
                    // the terms' magnitude.
                    let err = (ours[r * n as usize + j] as f64 - exact).abs();
                    assert!(
                        err <= 1e-6 * size,
                        "bits {bits} row {r} out {j}: {err} of {size}"
                    );
                }
            }
        }
    }
}

/// Largest |a - b| / (1 + |b|).
fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths");
    a.iter()
        .zip(b)
        .map(|(x, y)| ((*x as f64 - *y as f64).abs()) / (1.0 + (*y as f64).abs()))
        .fold(0.0, f64::max)
}

/// With `LMSPEC_CPU_KERNELS` set (by `every_path_gives_the_same_products`),
/// the kernels must take that path.
fn expect_forced_level() {
    if let Ok(want) = std::env::var("LMSPEC_CPU_KERNELS") {
        let can =
            want == "scalar" || (want == "avx2" && std::arch::is_x86_feature_detected!("avx2"));
        if can {
            assert_eq!(level().name(), want, "forced path not taken");
        }
    }
}

#[test]
fn quantized_product_matches_mlx_and_float64() {
    expect_forced_level();
    let (n, k) = (48, 256);
    for bits in [2, 3, 4, 5, 6, 8] {
        for group in [32, 64, 128] {
            for scale_dtype in [Dtype::Float32, Dtype::Float16, Dtype::Bfloat16] {
                let w = array(&[n, k], bits as u64 * 1000 + group as u64);
                let (wq, s, b) = mlx_rs::ops::quantize(&w, group, bits).expect("quantize");
                let s = s.as_dtype(scale_dtype).expect("scales");
                let b = b.as_dtype(scale_dtype).expect("biases");
                for rows in [1, 3] {
                    let x = array(&[1, rows, k], 7 + rows as u64);
                    let ours = host(
                        &quantized_matmul(&x, &wq, &s, &b, group, bits, Activations::Float)
                            .expect("kernel"),
                    );
                    let mlx = mlx_rs::ops::quantized_matmul(&x, &wq, &s, &b, true, group, bits)
                        .expect("mlx");
                    let mlx = host(&mlx);
                    let what = format!("bits {bits} group {group} {scale_dtype:?} rows {rows}");
                    assert!(
                        max_rel(&ours, &mlx) < 2e-5,
                        "{what}: {}",
                        max_rel(&ours, &mlx)
                    );
                    // float64 sums of the same dequantized weights.
                    let (s32, b32) = (f32_of(&s), f32_of(&b));
                    let wd =
                        host(&mlx_rs::ops::dequantize(&wq, &s32, &b32, group, bits).expect("deq"));
                    let xs = host(&x);
                    let exact: Vec<f32> = (0..rows as usize)
                        .flat_map(|r| {
                            let (xs, wd) = (&xs, &wd);
                            (0..n as usize).map(move |j| {
                                (0..k as usize)
                                    .map(|i| {
                                        xs[r * k as usize + i] as f64
                                            * wd[j * k as usize + i] as f64
                                    })
                                    .sum::<f64>() as f32
                            })
                        })
                        .collect();
                    assert!(
                        max_rel(&ours, &exact) < 1e-5,
                        "{what} vs f64: {}",
                        max_rel(&ours, &exact)
                    );
                }
            }
        }
    }
}

/// float32 → float16 → float32, rounding to nearest even.
fn f16_round(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

/// llama.cpp's activation blocks, written out: (int8 values, scale per
/// block, block length, Q8_0 scales before rounding).
fn q8_reference(x: &[f32], k_blocks: bool) -> (Vec<i32>, Vec<f32>, usize, Vec<f32>) {
    let block = if k_blocks { 256 } else { 32 };
    let mut q = vec![0i32; x.len()];
    let (mut d, mut full) = (vec![], vec![]);
    for (b, xb) in x.chunks(block).enumerate() {
        let qb = &mut q[b * block..(b + 1) * block];
        if k_blocks {
            let (mut amax, mut max) = (0f32, 0f32);
            for &v in xb {
                if v.abs() > amax {
                    (amax, max) = (v.abs(), v);
                }
            }
            if amax == 0.0 {
                d.push(0.0);
                continue;
            }
            let iscale = -127.0 / max;
            for (o, &v) in qb.iter_mut().zip(xb) {
                *o = ((iscale * v).round_ties_even() as i32).min(127);
            }
            d.push(1.0 / iscale);
        } else {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            for (o, &v) in qb.iter_mut().zip(xb) {
                *o = (v * id).round_ties_even() as i32;
            }
            full.push(amax / 127.0);
            d.push(f16_round(amax / 127.0));
        }
    }
    (q, d, block, full)
}

#[test]
fn int8_activation_product_matches_the_block_formula() {
    expect_forced_level();
    // 544: an odd number of 32-value blocks (the 4-bit kernel pairs them).
    for (n, k) in [(36, 512), (20, 544)] {
        int8_product_at(n, k);
    }
}

/// The widths, group sizes and scale dtypes the activation-product tests
/// run at width k.
fn product_cases(k: i32) -> Vec<(i32, i32, Dtype)> {
    let mut cases = Vec::new();
    for bits in [2, 3, 4, 5, 6, 8] {
        for (group, scale_dtype) in [
            (32, Dtype::Float16),
            (64, Dtype::Bfloat16),
            (32, Dtype::Float32),
            // Sub-blocks of 16 (Q6_K's layout): not a group size MLX makes.
            (16, Dtype::Float32),
        ] {
            if !((group == 16 && matches!(bits, 4 | 8)) || k % group != 0) {
                cases.push((bits, group, scale_dtype));
            }
        }
    }
    cases
}

/// A quantized weight `[n, k]` for those tests: MLX's quantization of
/// random values (seed `seed + group`), or for groups of 16 (which MLX does not
/// make) its packing with random scales and biases (seeds `seed + 400`,
/// `seed + 401`); scales and biases as `scale_dtype`. Also the quantized
/// values and the scales and biases as float32.
struct TestWeight {
    wq: Array,
    s: Array,
    b: Array,
    qw: Vec<f32>,
    sf: Vec<f32>,
    bf: Vec<f32>,
}

fn test_weight(n: i32, k: i32, bits: i32, group: i32, scale_dtype: Dtype, seed: u64) -> TestWeight {
    let w = array(&[n, k], seed + group as u64);
    let (wq, s, b) = mlx_rs::ops::quantize(&w, group.max(32), bits).expect("quantize");
    let (s, b) = if group == 16 {
        let shape = [n, k / 16];
        let s = mlx_rs::ops::abs(array(&shape, seed + 400)).expect("s");
        (s, array(&shape, seed + 401))
    } else {
        (s, b)
    };
    let (s, b) = (
        s.as_dtype(scale_dtype).expect("s"),
        b.as_dtype(scale_dtype).expect("b"),
    );
    let ones = mlx_rs::ops::ones::<f32>(&[n, k / 32]).expect("ones");
    let zeros = mlx_rs::ops::zeros::<f32>(&[n, k / 32]).expect("zeros");
    let qw = host(&mlx_rs::ops::dequantize(&wq, &ones, &zeros, 32, bits).expect("q"));
    let (sf, bf) = (host(&s), host(&b));
    TestWeight {
        wq,
        s,
        b,
        qw,
        sf,
        bf,
    }
}

fn int8_product_at(n: i32, k: i32) {
    for (bits, group, scale_dtype) in product_cases(k) {
        let TestWeight {
            wq,
            s,
            b,
            qw,
            sf,
            bf,
        } = test_weight(n, k, bits, group, scale_dtype, 500 + bits as u64);
        // Q8_K blocks where the scales are float32 and the width allows.
        let k_blocks = scale_dtype == Dtype::Float32 && k % 256 == 0;
        // 5 rows: 4 through the kernel's several-row path, 1 alone.
        let x = array(&[5, k], 77 + bits as u64);
        let xs = host(&x);
        let ours = host(
            &quantized_matmul(&x, &wq, &s, &b, group, bits, Activations::Int8).expect("kernel"),
        );
        let (k, g) = (k as usize, group as usize);
        for r in 0..5 {
            let (q, d, block, full) = q8_reference(&xs[r * k..(r + 1) * k], k_blocks);
            for j in 0..n as usize {
                let mut y = 0f64;
                for c in 0..k / 16 {
                    let isum: i64 = (0..16)
                        .map(|i| qw[j * k + c * 16 + i] as i64 * q[c * 16 + i] as i64)
                        .sum();
                    let qsum: i32 = q[c * 16..c * 16 + 16].iter().sum();
                    let at = j * (k / g) + c * 16 / g;
                    y += sf[at] as f64 * d[c * 16 / block] as f64 * isum as f64;
                    // Against 4-bit float16-scaled weights the sum of
                    // each 32 values is itself rounded to float16.
                    y += bf[at] as f64
                        * match (k_blocks, bits) {
                            (false, 4) if c % 2 == 0 => {
                                let pair: i32 = q[c * 16..c * 16 + 32].iter().sum();
                                f16_round(full[c / 2] * pair as f32) as f64
                            }
                            (false, 4) => 0.0,
                            _ => d[c * 16 / block] as f64 * qsum as f64,
                        };
                }
                let got = ours[r * n as usize + j] as f64;
                let what = format!("bits {bits} group {group} {scale_dtype:?} row {r} out {j}");
                assert!(
                    (got - y).abs() <= 1e-4 * (1.0 + y.abs()),
                    "{what}: {got} vs {y}"
                );
            }
        }
        if group == 16 {
            continue;
        }
        // Within the activation rounding of MLX's float product.
        let mlx =
            host(&mlx_rs::ops::quantized_matmul(&x, &wq, &s, &b, true, group, bits).expect("mlx"));
        let scale = mlx.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        let worst = ours
            .iter()
            .zip(&mlx)
            .map(|(a, b)| (a - b).abs() as f64)
            .fold(0.0, f64::max);
        assert!(
            worst < 0.02 * scale,
            "bits {bits} group {group}: {worst} of {scale}"
        );
    }
}

#[test]
fn int16_activation_product_is_float32_within_its_bound() {
    expect_forced_level();
    // 544: an odd number of 32-value blocks (the 4-bit kernel pairs them).
    for (n, k) in [(36, 512), (20, 544)] {
        for (bits, group, scale_dtype) in product_cases(k) {
            int16_product_at(n, k, bits, group, scale_dtype);
        }
    }
}

/// Against float64 sums of the dequantized weights: each activation is
/// within 1/65024 of its block's (32 values) largest magnitude, so an
/// output within the sum of |weight| times that, plus float32 roundings.
fn int16_product_at(n: i32, k: i32, bits: i32, group: i32, scale_dtype: Dtype) {
    let TestWeight {
        wq,
        s,
        b,
        qw,
        sf,
        bf,
    } = test_weight(n, k, bits, group, scale_dtype, 600 + bits as u64);
    // 5 rows: 4 through the kernel's several-row path, 1 alone; a wide
    // range of magnitudes within each row.
    let x = mlx_rs::ops::multiply(
        array(&[5, k], 177 + bits as u64),
        mlx_rs::ops::exp(
            mlx_rs::ops::multiply(array(&[5, k], 178), Array::from_f32(4.0)).expect("e"),
        )
        .expect("exp"),
    )
    .expect("x");
    let xs = host(&x);
    let ours =
        host(&quantized_matmul(&x, &wq, &s, &b, group, bits, Activations::Int16).expect("kernel"));
    let (k, g) = (k as usize, group as usize);
    for r in 0..5 {
        let xr = &xs[r * k..(r + 1) * k];
        let step: Vec<f64> = xr
            .chunks(32)
            .map(|c| c.iter().fold(0f64, |m, v| m.max(v.abs() as f64)) / 65024.0)
            .collect();
        for j in 0..n as usize {
            let (mut exact, mut bound, mut size) = (0f64, 0f64, 0f64);
            for i in 0..k {
                let at = j * (k / g) + i / g;
                let wv = qw[j * k + i] as f64 * sf[at] as f64 + bf[at] as f64;
                exact += wv * xr[i] as f64;
                bound += (qw[j * k + i] as f64 * sf[at] as f64).abs() * step[i / 32];
                size += xr[i].abs() as f64
                    * ((qw[j * k + i] as f64 * sf[at] as f64).abs() + (bf[at] as f64).abs());
            }
            let err = (ours[r * n as usize + j] as f64 - exact).abs();
            assert!(
                err <= bound * 1.001 + 2e-6 * size,
                "bits {bits} group {group} {scale_dtype:?} row {r} out {j}: {err} > {bound} (+ {size})"
            );
        }
    }
}

/// A row's product does not depend on the rows beside it (a batch of
/// sequences decodes as each would alone): several rows at once equal
/// each row alone, bit for bit, in every mode.
#[test]
fn a_rows_product_does_not_depend_on_its_neighbours() {
    expect_forced_level();
    let k = 544;
    for (bits, group, scale_dtype) in product_cases(k) {
        let TestWeight { wq, s, b, .. } = test_weight(24, k, bits, group, scale_dtype, 700);
        let x = array(&[6, k], 701 + bits as u64);
        for act in [Activations::Float, Activations::Int8, Activations::Int16] {
            let together =
                host(&quantized_matmul(&x, &wq, &s, &b, group, bits, act).expect("rows"));
            for r in 0..6 {
                let row = x.index((r..r + 1, ..));
                let alone =
                    host(&quantized_matmul(&row, &wq, &s, &b, group, bits, act).expect("row"));
                assert_eq!(
                    alone,
                    together[r as usize * 24..(r as usize + 1) * 24],
                    "bits {bits} group {group} {scale_dtype:?} {act:?} row {r}"
                );
            }
        }
    }
}

#[test]
fn geglu_sigmoid_is_the_tanh_gelu() {
    expect_forced_level();
    // Gates across the GELU's range and beyond; 77: a partial vector.
    let g = mlx_rs::ops::multiply(array(&[3, 77], 64), Array::from_f32(40.0)).expect("g");
    let u = array(&[3, 77], 65);
    let ours = host(&geglu_sigmoid(&g, &u).expect("kernel"));
    let (gs, us) = (host(&g), host(&u));
    for (i, (&x, &up)) in gs.iter().zip(&us).enumerate() {
        let x64 = x as f64;
        let y = 0.7978845608028654 * (x64 + 0.044715 * x64 * x64 * x64);
        // 0.5 x (1 + tanh y) in float64, as x / (1 + exp(-2 y)): the same
        // value without the cancellation of 1 + tanh y at large negative y.
        let want = x64 / (1.0 + (-2.0 * y).exp()) * up as f64;
        assert!(
            y.abs() > 3.0 || (want - 0.5 * x64 * (1.0 + y.tanh()) * up as f64).abs() <= 1e-12,
            "the two forms at {x}"
        );
        assert!(
            // The rounding of y in float32 (a few ulp of y) moves exp(-2 y)
            // by up to about 4 ulp of y relatively, where y is large.
            (ours[i] as f64 - want).abs() <= 1e-5 * want.abs() + 1e-30,
            "gate {x}: {} vs {want}",
            ours[i]
        );
    }
}

#[test]
fn dequantization_equals_mlx() {
    for bits in [2, 3, 4, 5, 6, 8] {
        for group in [32, 64] {
            let w = array(&[40, 128], 99 + bits as u64);
            let (wq, s, b) = mlx_rs::ops::quantize(&w, group, bits).expect("quantize");
            let s = s.as_dtype(Dtype::Float16).expect("scales");
            let b = b.as_dtype(Dtype::Float16).expect("biases");
            let ours = host(&dequantize(&wq, &s, &b, group, bits).expect("kernel"));
            // MLX dequantizes in the scales' dtype: give it them as float32.
            let (s32, b32) = (f32_of(&s), f32_of(&b));
            let mlx = host(&mlx_rs::ops::dequantize(&wq, &s32, &b32, group, bits).expect("mlx"));
            assert!(max_rel(&ours, &mlx) < 1e-6, "bits {bits} group {group}");
        }
    }
}

#[test]
fn bad_shapes_are_errors() {
    let w = array(&[8, 64], 1);
    let (wq, s, b) = mlx_rs::ops::quantize(&w, 32, 4).expect("quantize");
    let x = array(&[1, 60], 2);
    let err = quantized_matmul(&x, &wq, &s, &b, 32, 4, Activations::Float).expect_err("width");
    assert!(err.to_string().contains("packed width"), "{err}");
    let x = array(&[1, 64], 2);
    assert!(
        quantized_matmul(&x, &wq, &s, &b, 48, 4, Activations::Int8).is_err(),
        "group 48"
    );
    let q = array(&[1, 3, 1, 8], 3);
    let kv = array(&[1, 2, 4, 8], 4);
    assert!(
        attention(&q, &kv, &kv, 1.0, true, &[]).is_err(),
        "3 heads over 2"
    );
    assert!(
        attention(&array(&[2, 2, 1, 8], 3), &kv, &kv, 1.0, true, &[0]).is_err(),
        "one first key for two rows"
    );
    assert!(
        rope(&array(&[2, 8], 5), 8, false, None, 1.0, &[0], None).is_err(),
        "2-D rope"
    );
    assert!(
        rope(
            &array(&[2, 1, 3, 8], 5),
            8,
            false,
            None,
            1.0,
            &[0, 1, 2],
            None
        )
        .is_err(),
        "three offsets for two rows"
    );
}

#[test]
fn rms_norm_matches_mlx() {
    let x = array(&[3, 5, 96], 11);
    let w = array(&[96], 12);
    for weight in [None, Some(&w)] {
        let ours = host(&rms_norm(&x, weight, 1e-5).expect("kernel"));
        let mlx = host(&mlx_rs::fast::rms_norm(&x, weight, 1e-5).expect("mlx"));
        assert!(max_rel(&ours, &mlx) < 1e-6, "{}", max_rel(&ours, &mlx));
    }
    // A strided input (a transposed view).
    let xt = array(&[96, 4], 13).t();
    let ours = host(&rms_norm(&xt, Some(&w), 1e-6).expect("kernel"));
    let mlx = host(&mlx_rs::fast::rms_norm(&xt, Some(&w), 1e-6).expect("mlx"));
    assert!(max_rel(&ours, &mlx) < 1e-6);
}

#[test]
fn rope_matches_mlx() {
    // [B, T, H, D] transposed to [B, H, T, D], as attention lays it out.
    let x = array(&[2, 5, 3, 32], 21)
        .transpose_axes(&[0, 2, 1, 3])
        .expect("transpose");
    let freqs = Array::from_slice(
        &values(12, 22)
            .iter()
            .map(|v| 1.0 + v.abs() * 50.0)
            .collect::<Vec<_>>(),
        &[12],
    );
    for traditional in [false, true] {
        for (dims, offset) in [(32, 0), (24, 7), (32, 300)] {
            let ours = host(
                &rope(&x, dims, traditional, Some(10_000.0), 0.5, &[offset], None).expect("kernel"),
            );
            let mlx = host(
                &mlx_rs::fast::rope(&x, dims, traditional, Some(10_000.0), 0.5, offset, None)
                    .expect("mlx"),
            );
            assert!(
                max_rel(&ours, &mlx) < 1e-5,
                "traditional {traditional} dims {dims} offset {offset}"
            );
        }
        let ours = host(&rope(&x, 24, traditional, None, 1.0, &[3], Some(&freqs)).expect("kernel"));
        let mlx = host(
            &mlx_rs::fast::rope(&x, 24, traditional, None, 1.0, 3, Some(&freqs)).expect("mlx"),
        );
        assert!(
            max_rel(&ours, &mlx) < 1e-5,
            "freqs, traditional {traditional}"
        );
    }
}

#[test]
fn rope_with_an_offset_per_row_gives_each_row_its_values_alone() {
    // Rows at positions 7 and 300 (a batch of sequences at their own
    // positions): each equals the row rotated alone at its offset, bit for
    // bit, and MLX's rope with an offset array within its tolerance.
    let x = array(&[2, 5, 3, 32], 23)
        .transpose_axes(&[0, 2, 1, 3])
        .expect("transpose");
    let offsets = [7, 300];
    for traditional in [false, true] {
        let both =
            host(&rope(&x, 24, traditional, Some(10_000.0), 0.5, &offsets, None).expect("rows"));
        for (b, &offset) in offsets.iter().enumerate() {
            let row = x.index((b as i32..b as i32 + 1, .., .., ..));
            let alone = host(
                &rope(&row, 24, traditional, Some(10_000.0), 0.5, &[offset], None).expect("row"),
            );
            assert_eq!(
                alone,
                both[b * alone.len()..(b + 1) * alone.len()],
                "row {b}"
            );
        }
        let at = Array::from_slice(&offsets, &[2]);
        let mlx = host(
            &mlx_rs::fast::rope_dynamic(&x, 24, traditional, Some(10_000.0), 0.5, &at, None)
                .expect("mlx"),
        );
        assert!(max_rel(&both, &mlx) < 1e-5, "traditional {traditional}");
    }
}

/// lmspec's attention against MLX's, without and with the causal mask.
fn attention_agrees(q: &Array, k: &Array, v: &Array, what: &str) {
    use mlx_rs::fast::ScaledDotProductAttentionMask as M;
    for causal in [false, true] {
        let ours = host(&attention(q, k, v, 0.125, causal, &[]).expect("kernel"));
        let mask = causal.then_some(M::Causal);
        let mlx = host(
            &mlx_rs::fast::scaled_dot_product_attention(q, k, v, 0.125, mask, None).expect("mlx"),
        );
        assert!(
            max_rel(&ours, &mlx) < 1e-5,
            "{what} causal {causal}: {}",
            max_rel(&ours, &mlx)
        );
    }
}

#[test]
fn attention_matches_mlx() {
    // Keys and values as a cache holds them: the first 9 of 16 positions.
    let cache = array(&[2, 2, 16, 64], 31);
    let idx = |a: &Array| a.index((.., .., 0..9, ..));
    let (k, v) = (idx(&cache), idx(&array(&[2, 2, 16, 64], 32)));
    for tq in [1, 4] {
        attention_agrees(&array(&[2, 6, tq, 64], 33), &k, &v, &format!("tq {tq}"));
    }
    // A prompt of 40 positions (every query row through the kernel), the
    // scores spread wide enough that exp meets small and large arguments.
    let q = mlx_rs::ops::multiply(array(&[1, 4, 40, 64], 41), Array::from_f32(8.0)).expect("q");
    let (k, v) = (array(&[1, 2, 40, 64], 42), array(&[1, 2, 40, 64], 43));
    attention_agrees(&q, &k, &v, "prompt");
}

#[test]
fn attention_of_a_prompt_equals_its_decode_steps() {
    // Four query heads over one key/value head (grouped in a prompt; in a
    // decode step the threads share the keys, then the value columns),
    // head dims of 256, more keys than one thread's share.
    let (t, d) = (150, 256);
    let q = mlx_rs::ops::multiply(array(&[1, 4, t, d], 44), Array::from_f32(4.0)).expect("q");
    let (k, v) = (array(&[1, 1, t, d], 45), array(&[1, 1, t, d], 46));
    attention_agrees(&q, &k, &v, "grouped heads");
    let prompt = host(&attention(&q, &k, &v, 0.125, true, &[]).expect("prompt"));
    for step in [0, 7, 64, 100, t - 1] {
        let qs = q.index((.., .., step..step + 1, ..));
        let ks = k.index((.., .., 0..step + 1, ..));
        let vs = v.index((.., .., 0..step + 1, ..));
        let one = host(&attention(&qs, &ks, &vs, 0.125, true, &[]).expect("step"));
        for h in 0..4 {
            let at = (h * t as usize + step as usize) * d as usize;
            assert_eq!(
                &one[h * d as usize..(h + 1) * d as usize],
                &prompt[at..at + d as usize],
                "head {h} position {step}"
            );
        }
    }
}

#[test]
fn attention_of_a_padded_row_equals_the_row_alone() {
    // Two sequences in one batch, the shorter with 7 columns of padding in
    // front: each row's values equal those of its real keys alone, bit for
    // bit (the batch takes the per-item path, one row alone the threads'
    // shared keys), and MLX's attention under the batch's mask.
    use mlx_rs::fast::ScaledDotProductAttentionMask as M;
    let (tk, d, firsts) = (20, 64, [0, 7]);
    for tq in [1, 3] {
        let q = mlx_rs::ops::multiply(array(&[2, 4, tq, d], 47), Array::from_f32(4.0)).expect("q");
        let (k, v) = (array(&[2, 2, tk, d], 48), array(&[2, 2, tk, d], 49));
        for causal in [false, true] {
            let both = host(&attention(&q, &k, &v, 0.125, causal, &firsts).expect("batch"));
            let row_len = both.len() / 2;
            for (b, &f) in firsts.iter().enumerate() {
                let b = b as i32;
                let alone = host(
                    &attention(
                        &q.index((b..b + 1, .., .., ..)),
                        &k.index((b..b + 1, .., f..tk, ..)),
                        &v.index((b..b + 1, .., f..tk, ..)),
                        0.125,
                        causal,
                        &[],
                    )
                    .expect("alone"),
                );
                let at = b as usize * row_len;
                assert_eq!(
                    alone,
                    both[at..at + row_len],
                    "tq {tq} causal {causal} row {b}"
                );
            }
            let allowed: Vec<bool> = (0..2)
                .flat_map(|b| {
                    (0..tq).flat_map(move |t| {
                        (0..tk).map(move |j| j >= firsts[b] && (!causal || j <= t + tk - tq))
                    })
                })
                .collect();
            let mask = Array::from_slice(&allowed, &[2, 1, tq, tk]);
            let mlx = host(
                &mlx_rs::fast::scaled_dot_product_attention(
                    &q,
                    &k,
                    &v,
                    0.125,
                    M::Array(&mask),
                    None,
                )
                .expect("mlx"),
            );
            assert!(max_rel(&both, &mlx) < 1e-5, "tq {tq} causal {causal}");
        }
    }
}

/// Each instruction-set path (forced through `LMSPEC_CPU_KERNELS` in a
/// child process) gives the products the MLX comparison accepts.
#[test]
fn every_path_gives_the_same_products() {
    if std::env::var_os("LMSPEC_CPU_KERNELS").is_some() {
        return; // the child itself
    }
    let exe = std::env::current_exe().expect("test binary");
    let tests = [
        "cpu_kernels::tests::quantized_product_matches_mlx_and_float64",
        "cpu_kernels::tests::int8_activation_product_matches_the_block_formula",
        "cpu_kernels::tests::int16_activation_product_is_float32_within_its_bound",
        "cpu_kernels::tests::geglu_sigmoid_is_the_tanh_gelu",
        "cpu_kernels::tests::a_rows_product_does_not_depend_on_its_neighbours",
        "cpu_kernels::tests::sixteen_value_groups_multiply_and_dequantize",
        "cpu_kernels::tests::geglu_f16_is_llama_cpps_table_gelu",
        "cpu_kernels::tests::biases_tied_to_the_scales_are_not_read",
        "cpu_kernels::tests::attention_of_a_prompt_equals_its_decode_steps",
        "cpu_kernels::tests::attention_of_a_padded_row_equals_the_row_alone",
    ];
    for (path, test) in ["scalar", "avx2"]
        .into_iter()
        .flat_map(|p| tests.map(|t| (p, t)))
    {
        let out = std::process::Command::new(&exe)
            .args(["--exact", test])
            .args(["--test-threads=1", "--nocapture"])
            .env("LMSPEC_CPU_KERNELS", path)
            .output()
            .expect("child");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{path} {test}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("1 passed"),
            "{path} {test}: the test did not run: {text}"
        );
    }
}

#[test]
fn dense_product_matches_mlx() {
    let (n, k) = (40, 200);
    let w = array(&[n, k], 31);
    let wt = w.t();
    // Not yet evaluated: not a view the kernel reads, MLX's matmul runs.
    assert!(dense_matmul(&array(&[1, k], 32), &wt)
        .expect("kernel")
        .is_none());
    wt.eval().expect("eval");
    for rows in [1, 3] {
        let x = array(&[1, rows, k], 33 + rows as u64);
        let ours = host(&dense_matmul(&x, &wt).expect("kernel").expect("applies"));
        let mlx = host(&mlx_rs::ops::matmul(&x, &wt).expect("mlx"));
        assert!(max_rel(&ours, &mlx) < 1e-5, "{}", max_rel(&ours, &mlx));
    }
    // A row-major [K, N] weight is not the transpose view.
    let plain = array(&[k, n], 34);
    plain.eval().expect("eval");
    assert!(dense_matmul(&array(&[1, k], 35), &plain)
        .expect("kernel")
        .is_none());
}

#[test]
fn swiglu_matches_mlx() {
    // The halves of a fused projection are strided views; a plain pair too.
    let fused =
        mlx_rs::ops::multiply(array(&[1, 5, 2 * 70], 51), Array::from_f32(12.0)).expect("x");
    let parts = mlx_rs::ops::split_equal(&fused, 2, -1).expect("split");
    let plain = (array(&[3, 33], 52), array(&[3, 33], 53));
    for (g, u) in [(&parts[0], &parts[1]), (&plain.0, &plain.1)] {
        let ours = host(&swiglu(g, u).expect("kernel"));
        let silu = mlx_rs::nn::silu(g).expect("silu");
        let want = host(&mlx_rs::ops::multiply(&silu, u).expect("mlx"));
        assert!(max_rel(&ours, &want) < 1e-6, "{}", max_rel(&ours, &want));
    }
}

#[test]
fn weight_arena_copies_keep_their_values_and_go_with_the_last_copy() {
    let f = array(&[3, 5], 21);
    let h = array(&[4, 7], 22).as_dtype(Dtype::Float16).expect("f16");
    let (wq, s, b) = mlx_rs::ops::quantize(array(&[8, 64], 23), 32, 4).expect("quantize");
    let before = arena_bytes();
    let Some(copies) = weight_arena(&[&f, &h, &wq, &s, &b]).expect("arena") else {
        // The system gives no huge-page memory: nothing was moved.
        assert_eq!(arena_bytes(), before);
        return;
    };
    let held = arena_bytes() - before;
    assert!(held >= 2 << 20 && held % (2 << 20) == 0, "{held}");
    for (c, o) in copies.iter().zip([&f, &h, &wq, &s, &b]) {
        assert_eq!(c.shape(), o.shape());
        assert_eq!(c.dtype(), o.dtype());
        assert_ne!(data_ptr(c).unwrap(), data_ptr(o).unwrap());
        assert_eq!(data_ptr(c).unwrap() % 64, 0);
    }
    assert_eq!(host(&copies[0]), host(&f));
    assert_eq!(host(&copies[1]), host(&h));
    let (cw, cs, cb) = (&copies[2], &copies[3], &copies[4]);
    let x = array(&[2, 64], 24);
    assert_eq!(
        host(&quantized_matmul(&x, cw, cs, cb, 32, 4, Activations::Int8).expect("copy")),
        host(&quantized_matmul(&x, &wq, &s, &b, 32, 4, Activations::Int8).expect("original"))
    );
    // MLX may write an op's result into a copy it is the last user of.
    let mut copies = copies;
    let first = copies.remove(0);
    let doubled = mlx_rs::ops::multiply(&first, Array::from_f32(2.0)).expect("op");
    drop(first);
    let want: Vec<f32> = host(&f).iter().map(|v| v * 2.0).collect();
    assert_eq!(host(&doubled), want);
    drop(doubled);
    assert_eq!(
        arena_bytes() - before,
        held,
        "others still hold the mapping"
    );
    drop(copies);
    assert_eq!(arena_bytes(), before);
}

#[test]
fn weight_arena_refuses_a_strided_view() {
    let t = array(&[4, 6], 25).transpose().expect("transpose");
    match weight_arena(&[&t]) {
        Err(e) => assert!(e.to_string().contains("row-contiguous"), "{e}"),
        Ok(None) => {}
        Ok(Some(_)) => panic!("a transposed view was copied as if row-contiguous"),
    }
}
