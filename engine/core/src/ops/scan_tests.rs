//! The recurrences added for issue #23 against f64 references, each fed
//! whole and in pieces through its cache slot: `selective_scan`
//! (Mamba-1).
use lmspec_spec::expr::Value;
use lmspec_spec::ops::{lookup, Layout as ValueInfo, StateKind};
use mlx_rs::Array;

use super::tests::{build, close, noise, run};
use super::{Ctx, Op, Param};
use crate::cache::CreateState;

/// The op's declared state: a recurrent slot, which `ModelCache::trim`
/// refuses to rewind.
fn assert_recurrent(kind: &str, given: &[(&str, Value)], inputs: &[ValueInfo]) {
    let entry = lookup(kind).expect("op");
    let values: Vec<Value> = entry
        .schema
        .params
        .iter()
        .map(|def| {
            given
                .iter()
                .find(|(n, _)| *n == def.name)
                .map(|(_, v)| v.clone())
                .or_else(|| def.default.map(|d| d()))
                .unwrap_or(Value::Null)
        })
        .collect();
    let op = (entry.parse)(&values).expect("parse");
    let resolved = op.resolve("", inputs).expect("resolve");
    assert_eq!(resolved.state, Some(StateKind::Recurrent));
}

/// Runs `op` over positions `[a, b)` of each bound, one call per bound,
/// through one recurrent slot; the outputs concatenated.
fn run_in_pieces(
    op: &dyn Op,
    bounds: &[(usize, usize)],
    args: impl Fn(usize, usize) -> Vec<Array>,
) -> Vec<f32> {
    let mut slot = crate::cache::CacheKind::Recurrent.create(Default::default());
    let mut got = Vec::new();
    for &(a, b) in bounds {
        let xs = args(a, b);
        let refs: Vec<&Array> = xs.iter().collect();
        let mut ctx = Ctx {
            offset: a as i32,
            key_mask: None,
            positions: None,
            cache: Some(&mut slot),
        };
        let y = op.forward(&refs, &mut ctx).expect("forward");
        y.eval().expect("eval");
        got.extend_from_slice(y.as_slice::<f32>());
    }
    got
}

/// `[1, b - a, w]` rows a..b of a `[T, w]` table.
fn rows(v: &[f32], w: usize, a: usize, b: usize) -> Array {
    Array::from_slice(&v[a * w..b * w], &[1, (b - a) as i32, w as i32])
}

fn softplus(v: f64) -> f64 {
    v.exp().ln_1p()
}

/// Mamba-1's recurrence in f64: per channel c and state n,
/// `S = exp(dt A) S + dt x B`, `y = S · C + D x`, `dt = softplus(dt_raw)`.
fn selective_scan_reference(
    [x, dt, bm, cm]: [&[f32]; 4],
    a_log: &[f32],
    d: &[f32],
    (t, c, n): (usize, usize, usize),
) -> Vec<f64> {
    let mut s = vec![0.0f64; c * n];
    let mut out = Vec::new();
    for p in 0..t {
        for ch in 0..c {
            let step = softplus(f64::from(dt[p * c + ch]));
            let xv = f64::from(x[p * c + ch]);
            let mut y = 0.0;
            for k in 0..n {
                let a = -f64::from(a_log[ch * n + k]).exp();
                let st = &mut s[ch * n + k];
                *st = (step * a).exp() * *st + step * xv * f64::from(bm[p * n + k]);
                y += *st * f64::from(cm[p * n + k]);
            }
            out.push(y + f64::from(d[ch]) * xv);
        }
    }
    out
}

#[test]
fn selective_scan_matches_the_recurrence_whole_and_in_pieces() {
    let (t, c, n) = (9usize, 6usize, 4usize);
    let x = noise(t * c, 51);
    let dt = noise(t * c, 52);
    let bm = noise(t * n, 53);
    let cm = noise(t * n, 54);
    // A_log per (channel, state), as mlx-lm's log(1..=N) rows but varied.
    let a_log: Vec<f32> = noise(c * n, 55).iter().map(|v| v * 1.5).collect();
    let d = noise(c, 56);
    let want = selective_scan_reference([&x, &dt, &bm, &cm], &a_log, &d, (t, c, n));
    let given = [
        ("weight", Value::Str("mixer".into())),
        ("channels", Value::Int(c as i64)),
        ("state", Value::Int(n as i64)),
    ];
    let infos = [c, c, n, n].map(|w| ValueInfo::flat(w as i64));
    assert_recurrent("selective_scan", &given, &infos);
    let weights = vec![
        Param::Dense(Array::from_slice(&a_log, &[c as i32, n as i32])),
        Param::Dense(Array::from_slice(&d, &[c as i32])),
    ];
    let op = build("selective_scan", &given, &infos, weights);
    let args = |a: usize, b: usize| {
        vec![
            rows(&x, c, a, b),
            rows(&dt, c, a, b),
            rows(&bm, n, a, b),
            rows(&cm, n, a, b),
        ]
    };
    let whole = args(0, t);
    let refs: Vec<&Array> = whole.iter().collect();
    close(&run(op.as_ref(), &refs, 0), &want, 1e-5);
    let pieces = [(0, 5), (5, 6), (6, 8), (8, 9)];
    close(&run_in_pieces(op.as_ref(), &pieces, args), &want, 1e-5);
}
