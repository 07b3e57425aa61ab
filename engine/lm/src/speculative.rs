//! Speculative decoding with a draft model, with mlx-lm's semantics
//! (`speculative_generate_step`): the draft proposes `num_draft_tokens`
//! tokens one at a time, the model scores all of them in one forward, the
//! longest prefix on which the model's own choice equals the draft's is
//! kept, and the model's token after it follows; both caches are rewound
//! past what was rejected. The model's choices are made exactly as without
//! a draft, so greedy output is the same.
use std::sync::atomic::AtomicBool;

use mlx_rs::{Array, Dtype};

use crate::generate::{
    begin, drive, maybe_quantize, prefill, DraftStats, Event, GenerateParams, GeneratedToken,
    Generation, TokenSource,
};
use crate::lm::LanguageModel;
use crate::sampling::{logprob_of, Rng};
use lmspec_engine::cache::ModelCache;
use lmspec_engine::error::{Error, Result};
use lmspec_engine::model::Model;
use lmspec_engine::{in_pass, Pass};

/// A draft model and how many tokens it proposes per step.
#[derive(Debug, Clone, Copy)]
pub struct Draft<'a> {
    pub model: &'a Model,
    pub num_draft_tokens: usize,
}

fn row(tokens: &[u32]) -> Array {
    let t: Vec<i32> = tokens.iter().map(|&x| x as i32).collect();
    Array::from_slice(&t, &[1, t.len() as i32])
}

/// The last `n` rows of logits `[1, T, V]` as float32 host rows.
fn last_rows(logits: &Array, n: usize) -> Result<Vec<Vec<f32>>> {
    let s = logits.shape();
    let (t, v) = (s[1] as usize, s[2] as usize);
    let flat = logits
        .reshape(&[-1, v as i32])?
        .as_dtype(Dtype::Float32)?
        .contiguous()?;
    flat.eval()?;
    let all = flat.as_slice::<f32>();
    Ok((t - n..t)
        .map(|r| all[r * v..(r + 1) * v].to_vec())
        .collect())
}

/// Produces tokens by drafting and verifying.
#[derive(Debug)]
pub struct SpeculativeGenerator<'a> {
    model: &'a Model,
    draft: &'a Model,
    cache: &'a mut ModelCache,
    draft_cache: ModelCache,
    params: &'a GenerateParams,
    num_draft: usize,
    max_tokens: usize,
    /// Every token the model has been fed or will be fed next, in order.
    history: Vec<u32>,
    /// Tokens the model has yet to be fed (one, or none at the start).
    y: Vec<u32>,
    /// Tokens the draft has yet to be fed.
    draft_y: Vec<u32>,
    /// Tokens decided and not yet returned.
    ready: std::collections::VecDeque<GeneratedToken>,
    produced: usize,
    rng: Rng,
    draft_rng: Rng,
    stats: DraftStats,
}

impl<'a> SpeculativeGenerator<'a> {
    /// Prefills both models with `prompt` (all but its last token).
    /// Refused when the model's cache cannot be rewound (recurrent state)
    /// or the two vocabularies differ.
    pub fn new(
        model: &'a Model,
        draft: Draft<'a>,
        cache: &'a mut ModelCache,
        prompt: &[u32],
        params: &'a GenerateParams,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<SpeculativeGenerator<'a>> {
        if prompt.is_empty() {
            return Err(Error::Usage("the prompt has no tokens".into()));
        }
        if draft.num_draft_tokens == 0 {
            return Err(Error::Usage("num_draft_tokens: must be 1 or more".into()));
        }
        params.validate()?;
        let ids: Vec<i64> = prompt.iter().map(|&t| i64::from(t)).collect();
        model.check_tokens(&ids, "the prompt")?;
        draft
            .model
            .check_tokens(&ids, "the prompt (for the draft model)")?;
        let mut draft_cache = draft.model.new_cache_with(params.cache);
        for (c, who) in [(&*cache, "model"), (&draft_cache, "draft model")] {
            if !c.can_rewind() {
                return Err(Error::Usage(format!(
                    "speculative decoding needs caches that can be rewound; the {who}'s \
                     cache holds convolution or recurrent state"
                )));
            }
        }
        let n = prompt.len();
        let context = model.context_length();
        let room = match (params.cache.max_kv_size, context) {
            (None, Some(c)) => (c as usize).saturating_sub(n + cache.offset() as usize),
            _ => usize::MAX,
        };
        prefill(
            draft.model,
            &mut draft_cache,
            &prompt[..n - 1],
            params,
            &mut |_, _| {},
        )?;
        prefill(model, cache, &prompt[..n - 1], params, progress)?;
        Ok(SpeculativeGenerator {
            model,
            draft: draft.model,
            cache,
            draft_cache,
            params,
            num_draft: draft.num_draft_tokens,
            max_tokens: params.max_tokens.min(room),
            history: prompt.to_vec(),
            y: vec![prompt[n - 1]],
            draft_y: vec![prompt[n - 1]],
            ready: Default::default(),
            produced: 0,
            rng: Rng::new(params.sampling.seed),
            draft_rng: Rng::new(params.sampling.seed.map(|s| s ^ 0x5eed)),
            stats: DraftStats::default(),
        })
    }

    /// The model's choice from one row of logits, given the tokens before.
    fn choose(&mut self, mut logits: Vec<f32>, before: &[u32], draft: bool) -> (u32, f32) {
        let p = self.params;
        p.processors.apply(before, &mut logits);
        let rng = if draft {
            &mut self.draft_rng
        } else {
            &mut self.rng
        };
        let id = p.sampling.sample(&logits, rng);
        (id, logprob_of(&logits, id))
    }

    /// One draft-and-verify round; fills `ready`.
    fn round(&mut self) -> Result<()> {
        let left = self.max_tokens - self.produced;
        let num_draft = left.saturating_sub(1).min(self.num_draft);
        // Draft.
        let mut drafted = Vec::with_capacity(num_draft);
        let base = self.history.len();
        for _ in 0..num_draft {
            let logits = in_pass(Pass::Step, || {
                self.draft
                    .forward(&row(&self.draft_y), Some(&mut self.draft_cache))
            })?;
            let rows = last_rows(&logits, 1)?;
            let mut before = self.history.clone();
            before.extend(&drafted);
            let (t, _) = self.choose(rows.into_iter().next().expect("one row"), &before, true);
            drafted.push(t);
            self.draft_y = vec![t];
        }
        // Verify: the pending token and every drafted one in one forward.
        let mut input = self.y.clone();
        input.extend(&drafted);
        let logits = in_pass(Pass::Step, || {
            self.model.forward(&row(&input), Some(self.cache))
        })?;
        maybe_quantize(self.cache, self.params)?;
        let rows = last_rows(&logits, num_draft + 1)?;
        let mut accepted = 0;
        let mut next = None;
        for (i, r) in rows.into_iter().enumerate() {
            let mut before = self.history[..base].to_vec();
            before.extend(&drafted[..i]);
            let (t, lp) = self.choose(r, &before, false);
            let token = |from_draft| GeneratedToken {
                id: t,
                logprob: self.params.logprobs.then_some(lp),
                from_draft,
            };
            if i < num_draft && t == drafted[i] {
                accepted += 1;
                self.ready.push_back(token(true));
                continue;
            }
            self.ready.push_back(token(false));
            next = Some(t);
            break;
        }
        let next = next.expect("the round ends with the model's own token");
        self.stats.drafted += num_draft;
        self.stats.accepted += accepted;
        self.history.extend(&drafted[..accepted]);
        self.history.push(next);
        // Rewind what was rejected.
        let rejected = num_draft - accepted;
        if !self.cache.trim(rejected) {
            return Err(Error::Usage(
                "speculative decoding: the model's cache cannot be rewound past its window \
                 (a rotating cache that has wrapped)"
                    .into(),
            ));
        }
        if !self.draft_cache.trim(rejected.saturating_sub(1)) {
            return Err(Error::Usage(
                "speculative decoding: the draft model's cache cannot be rewound past its \
                 window (a rotating cache that has wrapped)"
                    .into(),
            ));
        }
        self.y = vec![next];
        self.draft_y = if accepted == num_draft && num_draft > 0 {
            vec![drafted[num_draft - 1], next]
        } else {
            vec![next]
        };
        Ok(())
    }
}

impl TokenSource for SpeculativeGenerator<'_> {
    fn next_token(&mut self) -> Option<Result<GeneratedToken>> {
        if self.produced >= self.max_tokens {
            return None;
        }
        if self.ready.is_empty() {
            if let Err(e) = self.round() {
                return Some(Err(e));
            }
        }
        // A round decides at most the tokens left to produce.
        let t = self.ready.pop_front()?;
        self.produced += 1;
        Some(Ok(t))
    }

    fn draft_stats(&self) -> Option<DraftStats> {
        Some(self.stats)
    }
}

impl LanguageModel {
    /// [`LanguageModel::generate`] with a draft model proposing tokens.
    /// The generation info reports drafted and accepted tokens.
    pub fn generate_speculative(
        &self,
        prompt: &[u32],
        params: &GenerateParams,
        draft: &Draft<'_>,
        cache: Option<&mut ModelCache>,
        cancel: Option<&AtomicBool>,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Generation> {
        let (start, mut slot) = begin(&self.model, params, cache)?;
        let mut progress = |done, total| on_event(Event::PromptProgress(done, total));
        let cache = slot.get();
        let mut gen =
            SpeculativeGenerator::new(&self.model, *draft, cache, prompt, params, &mut progress)?;
        drive(
            &mut gen,
            &self.tokenizer,
            prompt,
            params,
            start,
            cancel,
            on_event,
        )
    }
}

/// Raw generated tokens ([`LanguageModel::generate_tokens`]): ids with
/// log-probabilities (when asked for) and draft flags, up to and including
/// an end-of-sequence id, or `max_tokens`.
pub struct TokenStream<'a> {
    source: Box<dyn TokenSource + 'a>,
    eos: Vec<u32>,
    done: bool,
}

impl std::fmt::Debug for TokenStream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenStream")
            .field("done", &self.done)
            .finish()
    }
}

impl TokenStream<'_> {
    /// Drafted and accepted tokens so far (with a draft model).
    pub fn draft_stats(&self) -> Option<DraftStats> {
        self.source.draft_stats()
    }
}

impl Iterator for TokenStream<'_> {
    type Item = Result<GeneratedToken>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let t = self.source.next_token();
        match &t {
            Some(Ok(t)) if self.eos.contains(&t.id) => self.done = true,
            Some(Err(_)) | None => self.done = true,
            _ => {}
        }
        t
    }
}

impl LanguageModel {
    /// Generates raw tokens for `prompt`, continuing `cache` (mlx-swift-lm's
    /// `generateTokens`); with `draft`, by speculative decoding.
    pub fn generate_tokens<'a>(
        &'a self,
        prompt: &[u32],
        params: &'a GenerateParams,
        cache: &'a mut ModelCache,
        draft: Option<Draft<'a>>,
    ) -> Result<TokenStream<'a>> {
        let mut eos = self.tokenizer.eos_ids.clone();
        eos.extend(&params.extra_eos);
        let source: Box<dyn TokenSource + 'a> = match draft {
            Some(d) => Box::new(SpeculativeGenerator::new(
                &self.model,
                d,
                cache,
                prompt,
                params,
                &mut |_, _| {},
            )?),
            None => Box::new(crate::generate::TokenGenerator::new(
                &self.model,
                cache,
                prompt,
                params,
                &mut |_, _| {},
            )?),
        };
        Ok(TokenStream {
            source,
            eos,
            done: false,
        })
    }
}
