//! Logit processing and sampling in mlx-lm's order: logits processors
//! (logit bias, repetition / presence / frequency penalties over a context
//! window), then log-probabilities, then top-p, min-p and top-k filters on the
//! untempered log-probabilities, then a categorical draw at `1/temperature`.
//! Temperature 0 is greedy.
use std::sync::Arc;

/// Sampling settings (mlx-lm `make_sampler`).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    pub min_p: f32,
    pub min_tokens_to_keep: usize,
    pub top_k: usize,
    /// Seed of the random draws; `None` seeds from the clock.
    pub seed: Option<u64>,
    /// XTC ("exclude top choices"): with this probability per token, every
    /// token at least `xtc_threshold` likely except the least likely of
    /// them is removed (mlx-lm's `apply_xtc`); 0 turns it off.
    pub xtc_probability: f32,
    pub xtc_threshold: f32,
    /// Tokens XTC never removes (e.g. EOS, newline).
    pub xtc_special_tokens: Vec<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 0.0,
            min_p: 0.0,
            min_tokens_to_keep: 1,
            top_k: 0,
            seed: None,
            xtc_probability: 0.0,
            xtc_threshold: 0.1,
            xtc_special_tokens: Vec::new(),
        }
    }
}

/// A caller's logits processor (one of mlx-lm's `logits_processors`): it
/// sees every token so far (prompt and generated) and edits the logits of
/// the next one in place.
#[derive(Clone)]
#[allow(clippy::type_complexity)]
pub struct LogitsProcessor(pub Arc<dyn Fn(&[u32], &mut [f32]) + Send + Sync>);

impl LogitsProcessor {
    pub fn new(f: impl Fn(&[u32], &mut [f32]) + Send + Sync + 'static) -> LogitsProcessor {
        LogitsProcessor(Arc::new(f))
    }
}

impl std::fmt::Debug for LogitsProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogitsProcessor")
    }
}

/// Two processors are equal when they are the same function object.
impl PartialEq for LogitsProcessor {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Logits processors (mlx-lm `make_logits_processors`).
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessorParams {
    pub logit_bias: Vec<(u32, f32)>,
    pub repetition_penalty: Option<f32>,
    pub repetition_context: usize,
    pub presence_penalty: Option<f32>,
    pub presence_context: usize,
    pub frequency_penalty: Option<f32>,
    pub frequency_context: usize,
    /// The caller's processors, run after the ones above, in order.
    pub custom: Vec<LogitsProcessor>,
}

impl Default for ProcessorParams {
    fn default() -> Self {
        ProcessorParams {
            logit_bias: Vec::new(),
            repetition_penalty: None,
            repetition_context: 20,
            presence_penalty: None,
            presence_context: 20,
            frequency_penalty: None,
            frequency_context: 20,
            custom: Vec::new(),
        }
    }
}

impl ProcessorParams {
    pub fn is_empty(&self) -> bool {
        self.logit_bias.is_empty()
            && self.custom.is_empty()
            && self.repetition_penalty.is_none_or(|p| p == 0.0)
            && self.presence_penalty.is_none_or(|p| p == 0.0)
            && self.frequency_penalty.is_none_or(|p| p == 0.0)
    }

    /// Applies the processors to `logits` given every token so far.
    pub fn apply(&self, history: &[u32], logits: &mut [f32]) {
        for &(id, bias) in &self.logit_bias {
            if let Some(x) = logits.get_mut(id as usize) {
                *x += bias;
            }
        }
        let window = |n: usize| &history[history.len().saturating_sub(n)..];
        if let Some(p) = self.repetition_penalty.filter(|p| *p != 0.0) {
            let mut seen = std::collections::HashSet::new();
            for &t in window(self.repetition_context) {
                if seen.insert(t) {
                    if let Some(x) = logits.get_mut(t as usize) {
                        *x = if *x < 0.0 { *x * p } else { *x / p };
                    }
                }
            }
        }
        if let Some(p) = self.presence_penalty.filter(|p| *p != 0.0) {
            let mut seen = std::collections::HashSet::new();
            for &t in window(self.presence_context) {
                if seen.insert(t) {
                    if let Some(x) = logits.get_mut(t as usize) {
                        *x -= p;
                    }
                }
            }
        }
        if let Some(p) = self.frequency_penalty.filter(|p| *p != 0.0) {
            for &t in window(self.frequency_context) {
                if let Some(x) = logits.get_mut(t as usize) {
                    *x -= p;
                }
            }
        }
        for c in &self.custom {
            (c.0)(history, logits);
        }
    }
}

/// XTC's removal on log-probabilities (applied when its draw says so):
/// every token whose probability exceeds the smallest probability above
/// `threshold` is set to -inf, except `special` ones.
pub fn apply_xtc(logprobs: &mut [f32], threshold: f32, special: &[u32]) {
    let probs: Vec<f32> = {
        let max = logprobs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f64> = logprobs.iter().map(|&x| f64::from(x - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        e.iter().map(|v| (v / sum) as f32).collect()
    };
    let floor = probs
        .iter()
        .copied()
        .filter(|&p| p > threshold)
        .fold(f32::INFINITY, f32::min);
    for (k, (x, p)) in logprobs.iter_mut().zip(&probs).enumerate() {
        if *p > floor && !special.contains(&(k as u32)) {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// `log_softmax(logits)[id]`.
pub fn logprob_of(logits: &[f32], id: u32) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| f64::from(x - max).exp()).sum();
    let x = logits
        .get(id as usize)
        .copied()
        .unwrap_or(f32::NEG_INFINITY);
    ((f64::from(x - max)) - sum.ln()) as f32
}

/// A small seeded generator (SplitMix64) for the categorical draw.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`; without one, from `$LMSPEC_SEED` (which
    /// `lmspec launch` sets alike on every rank, so that all draw the same
    /// tokens), else from the clock.
    pub fn new(seed: Option<u64>) -> Rng {
        let shared = || std::env::var("LMSPEC_SEED").ok()?.trim().parse().ok();
        Rng(seed.or_else(shared).unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x9E37_79B9_7F4A_7C15)
        }))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Log-probabilities of `logits`.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|x| ((x - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    logits.iter().map(|x| (*x as f64 - lse) as f32).collect()
}

/// Nucleus filter: keeps the most likely tokens holding `top_p` of the mass.
pub fn apply_top_p(logprobs: &mut [f32], top_p: f32) {
    let mut sorted: Vec<f32> = logprobs.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let probs: Vec<f64> = sorted.iter().map(|x| (*x as f64).exp()).collect();
    let mut above = vec![0.0f64; probs.len()];
    let mut acc = 0.0;
    for i in (0..probs.len()).rev() {
        above[i] = acc;
        acc += probs[i];
    }
    let total = acc;
    let dropped = above.iter().filter(|m| **m >= top_p as f64 * total).count();
    let threshold = sorted[dropped.min(sorted.len() - 1)];
    for x in logprobs.iter_mut() {
        if *x < threshold {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// Drops tokens less likely than `min_p` times the most likely one, keeping
/// at least `keep`.
pub fn apply_min_p(logprobs: &mut [f32], min_p: f32, keep: usize) {
    let top = logprobs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let floor = top + min_p.ln();
    let mut order: Vec<usize> = (0..logprobs.len()).collect();
    order.sort_by(|a, b| logprobs[*b].total_cmp(&logprobs[*a]));
    let kept: std::collections::HashSet<usize> = order.into_iter().take(keep).collect();
    for (i, x) in logprobs.iter_mut().enumerate() {
        if *x < floor && !kept.contains(&i) {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// Keeps the `k` most likely tokens.
pub fn apply_top_k(logprobs: &mut [f32], k: usize) {
    if k == 0 || k >= logprobs.len() {
        return;
    }
    let mut order: Vec<usize> = (0..logprobs.len()).collect();
    order.sort_by(|a, b| logprobs[*b].total_cmp(&logprobs[*a]));
    for &i in &order[k..] {
        logprobs[i] = f32::NEG_INFINITY;
    }
}

/// Draws from `softmax(logprobs / temperature)`.
pub fn categorical(logprobs: &[f32], temperature: f32, rng: &mut Rng) -> u32 {
    let max = logprobs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = logprobs
        .iter()
        .map(|x| (((x - max) / temperature) as f64).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut u = rng.uniform() * total;
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return i as u32;
        }
        u -= w;
    }
    weights.iter().rposition(|w| *w > 0.0).unwrap_or(0) as u32
}

pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in xs.iter().enumerate() {
        if *x > xs[best] {
            best = i;
        }
    }
    best as u32
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Samples a token from processed logits.
    pub fn sample(&self, logits: &[f32], rng: &mut Rng) -> u32 {
        if self.is_greedy() {
            return argmax(logits);
        }
        let mut lp = log_softmax(logits);
        if self.top_p > 0.0 && self.top_p < 1.0 {
            apply_top_p(&mut lp, self.top_p);
        }
        if self.min_p != 0.0 {
            apply_min_p(&mut lp, self.min_p, self.min_tokens_to_keep.max(1));
        }
        if self.xtc_probability > 0.0 && rng.uniform() <= f64::from(self.xtc_probability) {
            apply_xtc(&mut lp, self.xtc_threshold, &self.xtc_special_tokens);
        }
        if self.top_k > 0 {
            apply_top_k(&mut lp, self.top_k);
        }
        categorical(&lp, self.temperature, rng)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draws(params: &SamplingParams, logits: &[f32], n: usize) -> Vec<usize> {
        let mut rng = Rng::new(params.seed);
        let mut counts = vec![0; logits.len()];
        for _ in 0..n {
            counts[params.sample(logits, &mut rng) as usize] += 1;
        }
        counts
    }

    const LOGITS: [f32; 5] = [2.0, 1.5, 1.0, 0.0, -1.0];

    #[test]
    fn seeded_sampling_is_reproducible() {
        let p = SamplingParams {
            temperature: 1.0,
            seed: Some(7),
            ..Default::default()
        };
        assert_eq!(draws(&p, &LOGITS, 200), draws(&p, &LOGITS, 200));
        let q = SamplingParams {
            seed: Some(8),
            ..p.clone()
        };
        assert_ne!(draws(&p, &LOGITS, 200), draws(&q, &LOGITS, 200));
    }

    #[test]
    fn temperature_one_follows_the_softmax() {
        let p = SamplingParams {
            temperature: 1.0,
            seed: Some(1),
            ..Default::default()
        };
        let n = 20_000;
        let counts = draws(&p, &LOGITS, n);
        let lp = log_softmax(&LOGITS);
        for (c, l) in counts.iter().zip(lp) {
            let expected = (l as f64).exp() * n as f64;
            let sd = (expected * (1.0 - expected / n as f64)).sqrt();
            assert!((*c as f64 - expected).abs() < 5.0 * sd + 1.0, "{counts:?}");
        }
    }

    #[test]
    fn filters_remove_what_they_should() {
        let top_k = SamplingParams {
            temperature: 1.0,
            top_k: 2,
            seed: Some(3),
            ..Default::default()
        };
        let c = draws(&top_k, &LOGITS, 2000);
        assert!(
            c[0] > 0 && c[1] > 0 && c[2..].iter().all(|x| *x == 0),
            "{c:?}"
        );

        // p = softmax(LOGITS) ≈ [.43, .26, .16, .06, .02]: top-p 0.6 keeps two.
        let top_p = SamplingParams {
            temperature: 1.0,
            top_p: 0.6,
            seed: Some(3),
            ..Default::default()
        };
        let c = draws(&top_p, &LOGITS, 2000);
        assert!(
            c[0] > 0 && c[1] > 0 && c[2..].iter().all(|x| *x == 0),
            "{c:?}"
        );

        // min-p 0.3 keeps tokens with p >= 0.3 * p_max: the first three.
        let min_p = SamplingParams {
            temperature: 1.0,
            min_p: 0.3,
            seed: Some(3),
            ..Default::default()
        };
        let c = draws(&min_p, &LOGITS, 4000);
        assert!(
            c[..3].iter().all(|x| *x > 0) && c[3..].iter().all(|x| *x == 0),
            "{c:?}"
        );

        // Low temperature concentrates on the argmax.
        let cold = SamplingParams {
            temperature: 0.05,
            seed: Some(3),
            ..Default::default()
        };
        let c = draws(&cold, &LOGITS, 1000);
        assert!(c[0] > 990, "{c:?}");
    }

    #[test]
    fn processors_penalise_history() {
        let mut l = vec![1.0, -1.0, 2.0, 0.5];
        let p = ProcessorParams {
            logit_bias: vec![(3, 10.0)],
            repetition_penalty: Some(2.0),
            presence_penalty: Some(0.5),
            frequency_penalty: Some(0.25),
            ..Default::default()
        };
        p.apply(&[0, 1, 0], &mut l);
        // token 0: /2 -> 0.5, -0.5 presence, -0.5 frequency (twice) = -0.5
        // token 1: *2 -> -2, -0.5, -0.25 = -2.75
        assert_eq!(l, vec![-0.5, -2.75, 2.0, 10.5]);
    }
}
