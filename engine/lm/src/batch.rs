//! Continuous batching: sequences are prefilled one at a time, then decode
//! together, one batched forward per step for all of them
//! ([`lmspec_engine::BatchCache`]: each row at its own position, seeing only
//! its own keys), each with its own sampling, processors, constraint and
//! stop conditions. Sequences join between steps and leave when they end or
//! are removed. A small cache of prefilled prompts lets a request that
//! starts with an earlier prompt (the next turn of a conversation) prefill
//! only what is new.
use std::collections::VecDeque;

use mlx_rs::{Array, Dtype};

use crate::constrain::JsonConstraint;
use crate::sampling::{argmax, log_softmax, ProcessorParams, Rng, SamplingParams};
use lmspec_engine::cache::ModelCache;
use lmspec_engine::error::{Error, Result};
use lmspec_engine::model::Model;
use lmspec_engine::{in_pass, BatchCache, Pass};

/// How one sequence is decoded.
#[derive(Debug, Clone, Default)]
pub struct SeqParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub processors: ProcessorParams,
    /// Only tokens this allows are chosen.
    pub constraint: Option<JsonConstraint>,
    /// Report log-probabilities, with this many alternatives.
    pub logprobs: Option<usize>,
    /// Keep going past end-of-sequence tokens (for benchmarks).
    pub ignore_eos: bool,
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-sequence token (not part of the output).
    Stop,
    /// `max_tokens`, or the end of the model's context.
    Length,
}

/// The log-probability of a chosen token and of the best alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// One decoded token of one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqToken {
    pub seq: u64,
    pub token: u32,
    pub logprobs: Option<TokenLogprobs>,
    /// Set on the sequence's last token; with [`Finish::Stop`] the token is
    /// the end-of-sequence one.
    pub finish: Option<Finish>,
}

#[derive(Debug)]
struct Row {
    seq: u64,
    params: SeqParams,
    history: Vec<u32>,
    /// The token to feed next.
    next: u32,
    produced: usize,
    max_tokens: usize,
    rng: Rng,
}

/// Prefilled prompts kept for reuse, most recent first.
#[derive(Debug, Default)]
struct PrefixCache {
    entries: VecDeque<(Vec<u32>, ModelCache)>,
    capacity: usize,
}

impl PrefixCache {
    /// A cache holding the longest prefix of `prompt` found, and its length:
    /// at most all but `prompt`'s last token, which must be fed to get
    /// logits, and all but the stored prompt's last, which went through
    /// the forward of a step ([`Pass`]) where `prompt` alone puts it
    /// through a prompt's; only from a stored prompt whose tokens went
    /// through the pass `prompt`'s go through.
    fn lookup(&mut self, prompt: &[u32]) -> Option<(ModelCache, usize)> {
        let common = |t: &[u32]| t.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        let pass = Pass::prompt(prompt.len() - 1);
        let (i, m) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, (t, _))| Pass::prompt(t.len().saturating_sub(1)) == pass)
            .map(|(i, (t, _))| (i, common(t).min(t.len().saturating_sub(1))))
            .max_by_key(|&(i, m)| (m, std::cmp::Reverse(i)))?;
        let keep = m.min(prompt.len() - 1);
        if keep == 0 {
            return None;
        }
        let entry = self.entries.remove(i)?;
        let mut cache = entry.1.clone();
        let held = cache.offset() as usize;
        self.entries.push_front(entry);
        cache.trim(held - keep).then_some((cache, keep))
    }

    fn store(&mut self, prompt: &[u32], cache: &ModelCache) -> Result<()> {
        if self.capacity == 0 {
            return Ok(());
        }
        self.entries.retain(|(t, _)| t != prompt);
        self.entries
            .push_front((prompt.to_vec(), cache.compacted()?));
        self.entries.truncate(self.capacity);
        Ok(())
    }
}

/// Decodes many sequences together (see the module docs).
#[derive(Debug)]
pub struct BatchGenerator<'m> {
    model: &'m Model,
    eos: Vec<u32>,
    /// Prompt tokens per prefill forward.
    pub prefill_step_size: usize,
    cache: BatchCache,
    rows: Vec<Row>,
    prefixes: PrefixCache,
    /// Prompt tokens taken from the prefix cache, over all sequences.
    pub reused_tokens: usize,
}

fn ids_row(tokens: &[u32]) -> Array {
    let t: Vec<i32> = tokens.iter().map(|&x| x as i32).collect();
    Array::from_slice(&t, &[1, t.len() as i32])
}

impl<'m> BatchGenerator<'m> {
    /// A generator for `model` whose sequences end at any of `eos`, keeping
    /// up to `prefix_entries` prefilled prompts for reuse.
    pub fn new(model: &'m Model, eos: Vec<u32>, prefix_entries: usize) -> BatchGenerator<'m> {
        BatchGenerator {
            model,
            eos,
            prefill_step_size: 2048,
            cache: BatchCache::empty(),
            rows: Vec::new(),
            prefixes: PrefixCache {
                entries: VecDeque::new(),
                capacity: prefix_entries,
            },
            reused_tokens: 0,
        }
    }

    /// Whether the model decodes sequences at different positions in one
    /// batch: two short sequences are run together once. (An op that
    /// depends on the whole batch's length, as dynamic-NTK RoPE does,
    /// cannot.)
    pub fn can_batch(model: &Model) -> bool {
        let probe = || -> Result<()> {
            let mut g = BatchGenerator::new(model, Vec::new(), 0);
            let two = || SeqParams {
                max_tokens: 2,
                ..Default::default()
            };
            g.insert(0, &[0], two())?;
            g.insert(1, &[0, 0], two())?;
            g.step().map(|_| ())
        };
        probe().is_ok()
    }

    /// Sequences decoding.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Prefills `prompt` for a new sequence `seq` and returns its first
    /// token; unless that token ends it, the sequence joins the batch.
    pub fn insert(&mut self, seq: u64, prompt: &[u32], params: SeqParams) -> Result<SeqToken> {
        if prompt.is_empty() {
            return Err(Error::Usage("the prompt has no tokens".into()));
        }
        let ids: Vec<i64> = prompt.iter().map(|&t| i64::from(t)).collect();
        self.model.check_tokens(&ids, "the prompt")?;
        let room = match self.model.context_length() {
            Some(c) if prompt.len() as u64 >= c => {
                return Err(Error::Usage(format!(
                    "the prompt: {} tokens leave no room in the model's context of {c} positions",
                    prompt.len()
                )))
            }
            Some(c) => c as usize - prompt.len(),
            None => usize::MAX,
        };
        let (mut cache, mut done) = match self.prefixes.lookup(prompt) {
            Some(hit) => hit,
            None => (self.model.new_cache(), 0),
        };
        self.reused_tokens += done;
        let step = self.prefill_step_size.max(1);
        let pass = Pass::prompt(prompt.len() - 1);
        while prompt.len() - done > 1 {
            let n = step.min(prompt.len() - done - 1);
            in_pass(pass, || {
                self.model
                    .forward(&ids_row(&prompt[done..done + n]), Some(&mut cache))
            })?;
            mlx_rs::transforms::eval(cache.arrays())?;
            done += n;
        }
        let logits = in_pass(Pass::Step, || {
            self.model
                .forward(&ids_row(&prompt[prompt.len() - 1..]), Some(&mut cache))
        })?;
        self.prefixes.store(prompt, &cache)?;
        let mut row = Row {
            seq,
            rng: Rng::new(params.sampling.seed),
            max_tokens: params.max_tokens.min(room),
            params,
            history: prompt.to_vec(),
            next: 0,
            produced: 0,
        };
        let v = *logits.shape().last().unwrap_or(&0);
        let out = self.choose(&logits.reshape(&[1, v])?, std::slice::from_mut(&mut row))?;
        let first = out
            .into_iter()
            .next()
            .ok_or_else(|| Error::Usage("no token".into()))?;
        if first.finish.is_none() {
            self.cache.extend(BatchCache::from_single(cache)?)?;
            self.rows.push(row);
        }
        Ok(first)
    }

    /// One decode step for every sequence in the batch; sequences whose
    /// token ends them leave.
    pub fn step(&mut self) -> Result<Vec<SeqToken>> {
        if self.rows.is_empty() {
            return Ok(Vec::new());
        }
        let next: Vec<i32> = self.rows.iter().map(|r| r.next as i32).collect();
        let tokens = Array::from_slice(&next, &[next.len() as i32, 1]);
        let logits = in_pass(Pass::Step, || {
            self.model.forward_batch(&tokens, &mut self.cache)
        })?;
        let v = *logits.shape().last().unwrap_or(&0);
        let logits = logits.reshape(&[next.len() as i32, v])?;
        let mut rows = std::mem::take(&mut self.rows);
        let out = self.choose(&logits, &mut rows);
        self.rows = rows;
        let out = out?;
        let keep: Vec<usize> = (0..out.len())
            .filter(|&i| out[i].finish.is_none())
            .collect();
        if keep.len() < self.rows.len() {
            self.retain(&keep)?;
        }
        Ok(out)
    }

    /// Ends sequence `seq` (a cancelled request); false if it is not here.
    pub fn remove(&mut self, seq: u64) -> Result<bool> {
        let keep: Vec<usize> = (0..self.rows.len())
            .filter(|&i| self.rows[i].seq != seq)
            .collect();
        if keep.len() == self.rows.len() {
            return Ok(false);
        }
        self.retain(&keep)?;
        Ok(true)
    }

    fn retain(&mut self, keep: &[usize]) -> Result<()> {
        self.cache.retain(keep)?;
        let mut rows: Vec<Option<Row>> = std::mem::take(&mut self.rows)
            .into_iter()
            .map(Some)
            .collect();
        self.rows = keep.iter().filter_map(|&i| rows[i].take()).collect();
        if self.rows.is_empty() {
            mlx_rs::memory::clear_cache()?;
        }
        Ok(())
    }

    /// Picks each row's next token from its logits row ([rows, vocab]).
    fn choose(&self, logits: &Array, rows: &mut [Row]) -> Result<Vec<SeqToken>> {
        let plain = |r: &Row| {
            r.params.sampling.is_greedy()
                && r.params.processors.is_empty()
                && r.params.constraint.is_none()
                && r.params.logprobs.is_none()
        };
        let picked: Vec<(u32, Option<TokenLogprobs>)> = if rows.iter().all(plain) {
            let ids =
                mlx_rs::ops::indexing::argmax_axis(logits, -1, None)?.as_dtype(Dtype::Int32)?;
            ids.eval()?;
            ids.as_slice::<i32>()
                .iter()
                .map(|&t| (t as u32, None))
                .collect()
        } else {
            let all = logits.as_dtype(Dtype::Float32)?.contiguous()?;
            all.eval()?;
            let v = *all.shape().last().unwrap_or(&0) as usize;
            let data = all.as_slice::<f32>();
            rows.iter_mut()
                .enumerate()
                .map(|(i, r)| pick(r, &data[i * v..(i + 1) * v]))
                .collect()
        };
        let mut out = Vec::with_capacity(rows.len());
        for (r, (token, logprobs)) in rows.iter_mut().zip(picked) {
            r.produced += 1;
            r.history.push(token);
            r.next = token;
            if let Some(c) = &mut r.params.constraint {
                c.advance(token);
            }
            let finish = if !r.params.ignore_eos && self.eos.contains(&token) {
                Some(Finish::Stop)
            } else if r.produced >= r.max_tokens {
                Some(Finish::Length)
            } else {
                None
            };
            out.push(SeqToken {
                seq: r.seq,
                token,
                logprobs,
                finish,
            });
        }
        Ok(out)
    }
}

/// A row's token from its own logits, after its processors and constraint.
fn pick(r: &mut Row, raw: &[f32]) -> (u32, Option<TokenLogprobs>) {
    let mut values = raw.to_vec();
    r.params.processors.apply(&r.history, &mut values);
    let token = match &r.params.constraint {
        Some(c) if r.params.sampling.is_greedy() => {
            let t = c.best(&values).unwrap_or_else(|| argmax(&values));
            if r.params.logprobs.is_some() {
                c.mask(&mut values);
            }
            t
        }
        Some(c) => {
            c.mask(&mut values);
            r.params.sampling.sample(&values, &mut r.rng)
        }
        None => r.params.sampling.sample(&values, &mut r.rng),
    };
    let logprobs = r.params.logprobs.map(|k| {
        let lp = log_softmax(&values);
        let mut order: Vec<u32> = (0..lp.len() as u32).collect();
        let k = k.min(order.len());
        if k > 0 {
            order.select_nth_unstable_by(k - 1, |&a, &b| lp[b as usize].total_cmp(&lp[a as usize]));
        }
        order.truncate(k);
        order.sort_by(|&a, &b| lp[b as usize].total_cmp(&lp[a as usize]).then(a.cmp(&b)));
        TokenLogprobs {
            logprob: lp[token as usize],
            top: order.into_iter().map(|t| (t, lp[t as usize])).collect(),
        }
    });
    (token, logprobs)
}
