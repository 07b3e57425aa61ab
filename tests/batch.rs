//! Continuous batching is exact: each sequence decoded in a batch, joining
//! and leaving at different steps, gets the tokens it gets decoded alone.
use lmspec::engine::cpu_kernels::Activations;
use lmspec::engine::model::Model;
use lmspec::engine::{in_pass, BatchCache, ModelCache, Pass};
use lmspec::lm::batch::{BatchGenerator, Finish, SeqParams, SeqToken};
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::Array;

use crate::support::{goldens, library, load_model, mlx_lock};

/// Prompts of different lengths drawn from `vocab` (a fixed LCG).
fn prompts(n: usize, vocab: u32) -> Vec<Vec<u32>> {
    let mut x: u64 = 12345;
    (0..n)
        .map(|i| {
            (0..3 + 5 * i)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((x >> 33) % u64::from(vocab)) as u32
                })
                .collect()
        })
        .collect()
}

fn greedy(max_tokens: usize) -> SeqParams {
    SeqParams {
        max_tokens,
        ..Default::default()
    }
}

/// Tokens of `prompt` decoded alone.
fn alone(model: &Model, eos: &[u32], prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let mut g = BatchGenerator::new(model, eos.to_vec(), 0);
    let first = g.insert(0, prompt, greedy(max_tokens)).expect("insert");
    let mut out = vec![first.token];
    let mut done = first.finish.is_some();
    while !done {
        let step = g.step().expect("step");
        assert_eq!(step.len(), 1);
        out.push(step[0].token);
        done = step[0].finish.is_some();
    }
    out
}

/// All prompts together: half join at the start, the rest one per step;
/// sequence 1 is removed after 3 steps. Returns each sequence's tokens.
fn together(
    model: &Model,
    eos: &[u32],
    prompts: &[Vec<u32>],
    max_tokens: &[usize],
) -> Vec<Vec<u32>> {
    let mut g = BatchGenerator::new(model, eos.to_vec(), 4);
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let record = |t: SeqToken, out: &mut Vec<Vec<u32>>| out[t.seq as usize].push(t.token);
    let half = prompts.len() / 2;
    for (i, p) in prompts.iter().enumerate().take(half) {
        record(
            g.insert(i as u64, p, greedy(max_tokens[i]))
                .expect("insert"),
            &mut out,
        );
    }
    let mut joining = half;
    let mut steps = 0;
    while !g.is_empty() || joining < prompts.len() {
        if joining < prompts.len() {
            let p = &prompts[joining];
            record(
                g.insert(joining as u64, p, greedy(max_tokens[joining]))
                    .expect("insert"),
                &mut out,
            );
            joining += 1;
        }
        for t in g.step().expect("step") {
            record(t, &mut out);
        }
        steps += 1;
        if steps == 3 {
            assert!(g.remove(1).expect("remove"), "sequence 1 was decoding");
        }
    }
    out
}

fn check_model(name: &str, vocab: u32) {
    let _guard = mlx_lock();
    let model = load_model(&goldens().join(name).join("model"), &library(), None)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let ps = prompts(8, vocab);
    let max: Vec<usize> = (0..ps.len()).map(|i| 6 + (i % 3) * 4).collect();
    let batched = together(&model, &[], &ps, &max);
    for (i, p) in ps.iter().enumerate() {
        let solo = alone(&model, &[], p, max[i]);
        if i == 1 {
            assert!(
                solo.starts_with(&batched[1]),
                "{name}: removed sequence 1 diverged"
            );
            assert!(
                batched[1].len() < solo.len(),
                "{name}: sequence 1 was removed early"
            );
            continue;
        }
        assert_eq!(
            batched[i],
            solo,
            "{name}: sequence {i} (prompt of {} tokens)",
            p.len()
        );
    }
}

macro_rules! batch_cases {
    ($($case:ident),+ $(,)?) => {
        $(
            #[test]
            fn $case() {
                check_model(stringify!($case), 64);
            }
        )+
    };
}

// Dense, sliding windows, learned positions, convolution and recurrent
// state, MoE and latent attention; the recurrences and MoE options
// (Mamba-1, KDA, lightning, RG-LRU; plain, biased and identity experts,
// sparsemixer, clamped SwiGLU); the cross-layer dataflow (looped stacks,
// carried values, KV-shared layers); M-RoPE
// (qwen2_vl: per-row positions on every axis); attention within local
// chunks and block-sparse heads at each row's own positions (llama4,
// phi3small); n-gram hashes over each row's earlier ids (longcat_flash_ngram);
// token shifts and the wkv7 state, layer 0's values carried (rwkv7); the
// sparse attention's key choice among each row's own keys (deepseek_v32);
// Hadamard-rotated packed weights (prism_hadamard_qwen35); AltUp streams
// beside per-layer inputs and KV-shared layers (gemma3n); key blocks
// chosen per index head among each row's own keys (minimax_m3_vl).
batch_cases!(
    llama,
    qwen3,
    gemma3,
    gpt2,
    lfm2,
    mamba2,
    qwen3_next,
    mixtral,
    deepseek_v3,
    mamba,
    jamba,
    kimi_linear,
    olmo_hybrid,
    bailing_moe_v3,
    bailing_moe_linear,
    bailing_hybrid,
    recurrent_gemma,
    nemotron_h,
    longcat_flash,
    phimoe,
    phixtral,
    step3p5,
    nanbeige,
    hunyuan,
    talkie,
    afm7,
    iquestloopcoder,
    gemma4_text,
    qwen2_vl,
    llama4,
    phi3small,
    longcat_flash_ngram,
    rwkv7,
    deepseek_v32,
    prism_hadamard_qwen35,
    gemma3n,
    minimax_m3_vl
);

#[test]
fn end_of_sequence_and_length_finish_a_sequence() {
    let _guard = mlx_lock();
    let model = load_model(&goldens().join("llama/model"), &library(), None).expect("llama");
    let p = &prompts(1, 256)[0];
    let solo = alone(&model, &[], p, 5);
    assert_eq!(solo.len(), 5);
    // The third token as end of sequence: the sequence stops there.
    let eos = solo[2];
    let mut g = BatchGenerator::new(&model, vec![eos], 0);
    let first = g.insert(7, p, greedy(5)).expect("insert");
    assert_eq!(first.finish, None);
    let mut got = vec![first];
    while !g.is_empty() {
        got.extend(g.step().expect("step"));
    }
    let first_eos = solo.iter().position(|&t| t == eos).expect("eos");
    assert_eq!(got.len(), first_eos + 1);
    assert_eq!(got.last().map(|t| t.finish), Some(Some(Finish::Stop)));
    let mut g = BatchGenerator::new(&model, Vec::new(), 0);
    let one = g.insert(0, p, greedy(1)).expect("insert");
    assert_eq!(one.finish, Some(Finish::Length));
    assert!(g.is_empty(), "a finished sequence does not join");
}

/// The logits of `tokens` fed to `cache` as `pass`, on the host.
fn fed(model: &Model, cache: &mut ModelCache, tokens: &[i32], pass: Pass) -> Vec<f32> {
    let ids = Array::from_slice(tokens, &[1, tokens.len() as i32]);
    let logits = in_pass(pass, || model.forward(&ids, Some(&mut *cache))).expect("forward");
    mlx_rs::transforms::eval(cache.arrays()).expect("eval");
    crate::support::last_row_f32(&logits)
}

/// A quantized model on the CPU gives a sequence the same logits, bit for
/// bit, whether its prompt ran whole or after a reused prefix (the rest
/// fewer rows than a long prompt's path takes alone; a short prompt too),
/// and whether it decodes alone or beside a longer sequence (padding in
/// front of its row), in every activation mode. (The integer modes round the activations: a
/// float difference anywhere upstream can move a rounding, and a near-tie
/// with it.)
#[test]
fn a_sequence_gets_the_same_logits_however_it_is_split_or_batched() {
    let _guard = mlx_lock();
    let path = lmspec::default_model().expect("SmolLM2 installed by .ci/setup.sh");
    let short: Vec<i32> = (0..33).map(|i| 100 + i * 7).collect();
    let long: Vec<i32> = (0..38).map(|i| 200 + i * 11).collect();
    let tiny: Vec<i32> = (0..11).map(|i| 300 + i * 13).collect();
    for act in [Activations::Float, Activations::Int8, Activations::Int16] {
        let mut opts = crate::support::opts(&library(), None);
        opts.activations = Some(act);
        let model = Model::load(&path, &opts).expect("load");
        let prompt = |tokens: &[i32], split: usize| {
            let mut cache = model.new_cache();
            let n = tokens.len() - 1;
            for part in [&tokens[..split], &tokens[split..n]] {
                if !part.is_empty() {
                    fed(&model, &mut cache, part, Pass::prompt(n));
                }
            }
            let first = fed(&model, &mut cache, &tokens[n..], Pass::Step);
            (cache, first)
        };
        let (mut alone, whole) = prompt(&short, 0);
        let (_, after_prefix) = prompt(&short, 24);
        assert!(whole == after_prefix, "{act:?}: the prompt after a prefix");
        let (_, tiny_whole) = prompt(&tiny, 0);
        let (_, tiny_after_prefix) = prompt(&tiny, 4);
        assert!(
            tiny_whole == tiny_after_prefix,
            "{act:?}: a short prompt after a prefix"
        );
        let (beside, _) = prompt(&long, 0);
        let mut batch = BatchCache::from_single(alone.clone()).expect("batch");
        batch
            .extend(BatchCache::from_single(beside).expect("row"))
            .expect("extend");
        let step = fed(&model, &mut alone, &[5], Pass::Step);
        let tokens = Array::from_slice(&[5i32, 9], &[2, 1]);
        let both = in_pass(Pass::Step, || model.forward_batch(&tokens, &mut batch)).expect("batch");
        let both = both.reshape(&[2, -1]).expect("rows");
        let first_row = crate::support::last_row_f32(&both.index((0..1, ..)));
        assert!(step == first_row, "{act:?}: the decode step batched");
    }
}

/// Attention within local chunks reads each row's own positions: two
/// sequences of different lengths decoded together (the shorter padded in
/// front) give the logits each gets from its own cache, step by step
/// across chunk borders (llama4's chunks are 5 positions).
#[test]
fn local_chunks_follow_each_rows_positions_in_a_batch() {
    let _guard = mlx_lock();
    let model = load_model(&goldens().join("llama4/model"), &library(), None).expect("llama4");
    let a: Vec<i32> = (0..13).map(|i| (7 + i * 19) % 256).collect();
    let b: Vec<i32> = (0..6).map(|i| (3 + i * 23) % 256).collect();
    let prefilled = |tokens: &[i32]| {
        let mut cache = model.new_cache();
        fed(&model, &mut cache, tokens, Pass::prompt(tokens.len()));
        cache
    };
    let (mut alone_a, mut alone_b) = (prefilled(&a), prefilled(&b));
    let mut batch = BatchCache::from_single(prefilled(&a)).expect("batch");
    batch
        .extend(BatchCache::from_single(prefilled(&b)).expect("row"))
        .expect("extend");
    for step in 0..8i32 {
        let (ta, tb) = ((11 + step * 31) % 256, (5 + step * 17) % 256);
        let want_a = fed(&model, &mut alone_a, &[ta], Pass::Step);
        let want_b = fed(&model, &mut alone_b, &[tb], Pass::Step);
        let tokens = Array::from_slice(&[ta, tb], &[2, 1]);
        let both = in_pass(Pass::Step, || model.forward_batch(&tokens, &mut batch)).expect("batch");
        let both = both.reshape(&[2, -1]).expect("rows");
        for (row, want) in [(0, &want_a), (1, &want_b)] {
            let got = crate::support::last_row_f32(&both.index((row..row + 1, ..)));
            let worst = got
                .iter()
                .zip(want.iter())
                .map(|(g, w)| (g - w).abs())
                .fold(0.0f32, f32::max);
            assert!(
                worst < 1e-4,
                "step {step}, row {row}: logits differ by {worst}"
            );
        }
    }
}
