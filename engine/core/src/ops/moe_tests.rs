//! `moe` options against an f64 reference of mlx-lm's MoE blocks: plain
//! (SwitchMLP) experts, expert and router biases, clamped and gpt-oss
//! SwiGLU, identity experts, sparsemixer routing, groups dropped to -inf.
use lmspec_spec::expr::Value;
use lmspec_spec::ops::Layout as ValueInfo;
use mlx_rs::Array;

use super::tests::{build, close, noise, run};
use super::Param;

/// One routing setup of the reference.
#[derive(Clone, Copy)]
enum Route {
    /// Softmax over the top-k logits.
    TopkSoftmax,
    /// Softmax over all slots; the choice adds the correction bias.
    SoftmaxTopk { norm: bool, scale: f64 },
    /// Float64 sigmoid; groups of `size` scored by their best, the worst
    /// `drop` groups left out (-inf), the choice adds the correction bias.
    SigmoidGroups { size: usize, drop: usize },
    /// phimoe's sparsemixer with this jitter.
    Sparsemixer(f64),
    /// The top-k logits, weighted by their sigmoid (llama4).
    TopkSigmoid,
}

#[derive(Clone, Copy)]
enum Mlp {
    /// fc2(act(fc1 x)), act = gelu (tanh approximation) or relu².
    Plain { relu2: bool },
    /// down(min(silu(gate), l) * clip(up, ±l)).
    Clamped(f64),
    /// down((clip(up, ±l) + 1) * g sigmoid(1.702 g)), g = min(gate, l).
    Oai(f64),
}

struct Setup {
    d: usize,
    e: usize,
    zero: usize,
    f: usize,
    k: usize,
    route: Route,
    mlp: Mlp,
    /// The router scores a second input instead of the experts' input.
    router_input: bool,
    /// The weight scales the expert's input, not its output (top-1).
    scale_input: bool,
}

fn dot(a: &[f32], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(p, q)| f64::from(*p) * q).sum()
}

fn softmax(v: &[f64]) -> Vec<f64> {
    let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let ex: Vec<f64> = v.iter().map(|t| (t - m).exp()).collect();
    let s: f64 = ex.iter().sum();
    ex.into_iter().map(|t| t / s).collect()
}

fn sigmoid(v: f64) -> f64 {
    1.0 / (1.0 + (-v).exp())
}

/// Indices of the k largest values, best first.
fn top(v: &[f64], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|a, b| v[*b].total_cmp(&v[*a]));
    order.truncate(k);
    order
}

/// (chosen slots, their weights) for one token's logits.
fn route(s: &Setup, logits: &[f64], correction: &[f32]) -> (Vec<usize>, Vec<f64>) {
    let biased = |scores: &[f64]| -> Vec<f64> {
        scores
            .iter()
            .zip(correction)
            .map(|(a, b)| a + f64::from(*b))
            .collect()
    };
    match s.route {
        Route::TopkSigmoid => {
            let chosen = top(logits, s.k);
            let w = chosen.iter().map(|&j| sigmoid(logits[j])).collect();
            (chosen, w)
        }
        Route::TopkSoftmax => {
            let chosen = top(logits, s.k);
            let w = softmax(&chosen.iter().map(|&j| logits[j]).collect::<Vec<_>>());
            (chosen, w)
        }
        Route::SoftmaxTopk { norm, scale } => {
            let scores = softmax(logits);
            let chosen = top(&biased(&scores), s.k);
            let mut w: Vec<f64> = chosen.iter().map(|&j| scores[j]).collect();
            if norm {
                let t: f64 = w.iter().sum();
                w.iter_mut().for_each(|v| *v /= t);
            }
            (chosen, w.into_iter().map(|v| v * scale).collect())
        }
        Route::SigmoidGroups { size, drop } => {
            let scores: Vec<f64> = logits.iter().map(|v| sigmoid(*v)).collect();
            let mut choice = biased(&scores);
            let best: Vec<f64> = choice
                .chunks(size)
                .map(|g| g.iter().cloned().fold(f64::NEG_INFINITY, f64::max))
                .collect();
            let mut worst: Vec<usize> = (0..best.len()).collect();
            worst.sort_by(|a, b| best[*a].total_cmp(&best[*b]));
            for g in &worst[..drop] {
                choice[g * size..(g + 1) * size].fill(f64::NEG_INFINITY);
            }
            let chosen = top(&choice, s.k);
            let w = chosen.iter().map(|&j| scores[j]).collect();
            (chosen, w)
        }
        Route::Sparsemixer(jitter) => {
            let mut masked = logits.to_vec();
            let (mut chosen, mut w) = (Vec::new(), Vec::new());
            for _ in 0..s.k {
                let pick = top(&masked, 1)[0];
                let best = masked[pick];
                let band: Vec<f64> = logits
                    .iter()
                    .zip(&masked)
                    .map(|(g, m)| {
                        if (best - g) / g.abs().max(best) > 2.0 * jitter {
                            f64::NEG_INFINITY
                        } else {
                            *m
                        }
                    })
                    .collect();
                w.push(softmax(&band)[pick]);
                chosen.push(pick);
                masked[pick] = f64::NEG_INFINITY;
            }
            (chosen, w)
        }
    }
}

/// Row `r` of expert `j`'s `[E, out, in]` projection applied to `x`, plus its bias.
fn project(w: &[f32], b: &[f32], j: usize, out: usize, x: &[f64]) -> Vec<f64> {
    let n = x.len();
    (0..out)
        .map(|r| dot(&w[(j * out + r) * n..(j * out + r + 1) * n], x) + f64::from(b[j * out + r]))
        .collect()
}

fn gelu_tanh(v: f64) -> f64 {
    0.5 * v * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v.powi(3))).tanh())
}

fn reference(s: &Setup, x: &[f32], r: &[f32], tokens: usize, w: &[Vec<f32>]) -> Vec<f64> {
    let (d, f) = (s.d, s.f);
    let (router, router_bias, correction) = (&w[0], &w[1], &w[2]);
    let mut out = Vec::new();
    for t in 0..tokens {
        let xt: Vec<f64> = x[t * d..(t + 1) * d]
            .iter()
            .map(|v| f64::from(*v))
            .collect();
        let rt: Vec<f64> = r[t * d..(t + 1) * d]
            .iter()
            .map(|v| f64::from(*v))
            .collect();
        let logits: Vec<f64> = (0..s.e + s.zero)
            .map(|j| dot(&router[j * d..(j + 1) * d], &rt) + f64::from(router_bias[j]))
            .collect();
        let (chosen, weights) = route(s, &logits, correction);
        let mut y = vec![0.0f64; d];
        for (&j, weight) in chosen.iter().zip(&weights) {
            // Input-scaled experts read w x and add their output unweighted.
            let (xt, sc) = if s.scale_input {
                (xt.iter().map(|v| v * weight).collect::<Vec<f64>>(), &1.0)
            } else {
                (xt.clone(), weight)
            };
            let expert: Vec<f64> = if j >= s.e {
                xt.clone()
            } else {
                match s.mlp {
                    Mlp::Plain { relu2 } => {
                        let h: Vec<f64> = project(&w[3], &w[4], j, f, &xt)
                            .into_iter()
                            .map(|v| {
                                if relu2 {
                                    v.max(0.0).powi(2)
                                } else {
                                    gelu_tanh(v)
                                }
                            })
                            .collect();
                        project(&w[5], &w[6], j, d, &h)
                    }
                    Mlp::Clamped(l) | Mlp::Oai(l) => {
                        let g = project(&w[3], &w[4], j, f, &xt);
                        let u = project(&w[5], &w[6], j, f, &xt);
                        let h: Vec<f64> = g
                            .iter()
                            .zip(&u)
                            .map(|(g, u)| match s.mlp {
                                Mlp::Oai(_) => {
                                    let g = g.min(l);
                                    (u.clamp(-l, l) + 1.0) * g * sigmoid(1.702 * g)
                                }
                                _ => (g * sigmoid(*g)).min(l) * u.clamp(-l, l),
                            })
                            .collect();
                        project(&w[7], &w[8], j, d, &h)
                    }
                }
            };
            y.iter_mut().zip(&expert).for_each(|(a, b)| *a += sc * b);
        }
        out.extend(y);
    }
    out
}

fn check(s: &Setup, params: &[(&str, Value)]) {
    let (d, e, f, slots) = (s.d as i32, s.e as i32, s.f as i32, (s.e + s.zero) as i32);
    let gated = !matches!(s.mlp, Mlp::Plain { .. });
    // router, router bias, correction bias, then each projection and its bias.
    let mut shapes: Vec<Vec<i32>> = vec![vec![slots, d], vec![slots], vec![slots]];
    let projections: &[(i32, i32)] = if gated {
        &[(f, d), (f, d), (d, f)]
    } else {
        &[(f, d), (d, f)]
    };
    for (out, inp) in projections {
        shapes.push(vec![e, *out, *inp]);
        shapes.push(vec![e, *out]);
    }
    let w: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(n, sh)| noise(sh.iter().product::<i32>() as usize, 40 + n as u64))
        .collect();
    // Weights in the order the op asks for them: router, each projection
    // then its bias, router bias, correction bias.
    // The correction bias only where the reference routing adds it.
    let correction = matches!(
        s.route,
        Route::SoftmaxTopk { .. } | Route::SigmoidGroups { .. }
    );
    let dense = |n: usize| Param::Dense(Array::from_slice(&w[n], &shapes[n]));
    let mut given = vec![dense(0)];
    given.extend((3..shapes.len()).map(dense));
    given.push(dense(1));
    if correction {
        given.push(dense(2));
    }
    let mut values = vec![
        ("router", Value::Str("gate".into())),
        ("experts", Value::Str("switch_mlp".into())),
        ("num_experts", Value::Int(s.e as i64)),
        ("top_k", Value::Int(s.k as i64)),
        ("hidden", Value::Int(s.f as i64)),
        ("expert_bias", Value::Bool(true)),
        ("router_bias", Value::Bool(true)),
        ("correction_bias", Value::Bool(correction)),
        ("gated", Value::Bool(gated)),
        ("zero_experts", Value::Int(s.zero as i64)),
    ];
    values.extend(params.iter().cloned());
    let infos = vec![ValueInfo::flat(s.d as i64); if s.router_input { 2 } else { 1 }];
    let op = build("moe", &values, &infos, given);
    // 5 tokens: below the sort threshold; 40 tokens: sorted by expert.
    for tokens in [5usize, 40] {
        let x = noise(tokens * s.d, 7 + tokens as u64);
        let xa = Array::from_slice(&x, &[1, tokens as i32, d]);
        let r = if s.router_input {
            noise(tokens * s.d, 9 + tokens as u64)
        } else {
            x.clone()
        };
        let ra = Array::from_slice(&r, &[1, tokens as i32, d]);
        let inputs: Vec<&Array> = if s.router_input {
            vec![&xa, &ra]
        } else {
            vec![&xa]
        };
        close(
            &run(op.as_ref(), &inputs, 0),
            &reference(s, &x, &r, tokens, &w),
            1e-5,
        );
    }
}

#[test]
fn plain_experts_with_biases() {
    let base = Setup {
        d: 8,
        e: 4,
        zero: 0,
        f: 6,
        k: 2,
        route: Route::TopkSoftmax,
        mlp: Mlp::Plain { relu2: false },
        router_input: false,
        scale_input: false,
    };
    check(
        &base,
        &[
            ("routing", Value::Str("topk_softmax".into())),
            ("act", Value::Str("gelu_approx".into())),
        ],
    );
    let groups = Setup {
        route: Route::SigmoidGroups { size: 2, drop: 1 },
        mlp: Mlp::Plain { relu2: true },
        // nemotron_h's latent experts: the router scores another input.
        router_input: true,
        scale_input: false,
        ..base
    };
    check(
        &groups,
        &[
            ("routing", Value::Str("sigmoid_topk".into())),
            ("act", Value::Str("relu2".into())),
            ("groups", Value::Int(2)),
            ("topk_groups", Value::Int(1)),
            ("group_fill", Value::Str("neg_inf".into())),
        ],
    );
}

#[test]
fn clamped_swiglu_and_sparsemixer() {
    // A limit inside the values' range, so the clamps act.
    let s = Setup {
        d: 8,
        e: 4,
        zero: 0,
        f: 6,
        k: 2,
        route: Route::Sparsemixer(0.3),
        mlp: Mlp::Clamped(0.4),
        router_input: false,
        scale_input: false,
    };
    check(
        &s,
        &[
            ("routing", Value::Str("sparsemixer".into())),
            ("jitter", Value::Float(0.3)),
            ("limit", Value::Float(0.4)),
        ],
    );
}

#[test]
fn identity_experts_and_oai_swiglu() {
    let s = Setup {
        d: 8,
        e: 3,
        zero: 3,
        f: 6,
        k: 3,
        route: Route::SoftmaxTopk {
            norm: true,
            scale: 1.5,
        },
        mlp: Mlp::Oai(0.5),
        router_input: false,
        scale_input: false,
    };
    check(
        &s,
        &[
            ("norm_topk", Value::Bool(true)),
            ("scale", Value::Float(1.5)),
            ("limit", Value::Float(0.5)),
            ("glu", Value::Str("oai".into())),
        ],
    );
}

#[test]
fn input_scaled_top1_experts() {
    // llama4: the top logit's sigmoid scales what its expert reads.
    let s = Setup {
        d: 8,
        e: 4,
        zero: 0,
        f: 6,
        k: 1,
        route: Route::TopkSigmoid,
        mlp: Mlp::Clamped(1e9),
        router_input: false,
        scale_input: true,
    };
    check(
        &s,
        &[
            ("routing", Value::Str("topk_sigmoid".into())),
            ("scale_input", Value::Bool(true)),
        ],
    );
}
