//! Generation: the token loop with mlx-lm's `generate_step` semantics
//! (chunked prefill of all prompt tokens but the last, cache quantization
//! once it holds `quantized_kv_start` positions, one token in flight during
//! greedy decode), and text generation on top of it (streaming detokenizer,
//! EOS ids, stop strings, statistics, cancellation).
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mlx_rs::{Array, Dtype};

use crate::sampling::{ProcessorParams, Rng, SamplingParams};
use crate::tokenizer::{StreamingDetokenizer, Tokenizer};
use crate::tools::reasoning::{ReasoningSplitter, Span};
use crate::tools::{OutputFormat, RejectReason, ToolCall, ToolEvent, ToolFormat, ToolParser};
use lmspec_engine::cache::{CacheOptions, ModelCache};
use lmspec_engine::error::{Error, Result};
use lmspec_engine::model::Model;
use lmspec_engine::weights::{QUANT_BITS, QUANT_GROUP_SIZES};
use lmspec_engine::{in_pass, Pass};

/// Generation settings; the defaults are mlx-lm's.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub processors: ProcessorParams,
    /// Prompt tokens per prefill forward.
    pub prefill_step_size: usize,
    /// Options of a cache made for this generation (e.g. `max_kv_size`).
    pub cache: CacheOptions,
    /// Quantize the KV cache to this many bits once it holds
    /// `quantized_kv_start` positions.
    pub kv_bits: Option<i32>,
    pub kv_group_size: i32,
    pub quantized_kv_start: i32,
    /// Token ids that end generation besides the tokenizer's EOS ids.
    pub extra_eos: Vec<u32>,
    /// Texts that end generation (not included in the output).
    pub stop_strings: Vec<String>,
    /// Reasoning and tool calls reported as their own events.
    pub output: OutputFormat,
    /// Report each token's log-probability (raw token streams).
    pub logprobs: bool,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_tokens: 256,
            sampling: SamplingParams::default(),
            processors: ProcessorParams::default(),
            prefill_step_size: 2048,
            cache: CacheOptions::default(),
            kv_bits: None,
            kv_group_size: 64,
            quantized_kv_start: 5000,
            extra_eos: Vec::new(),
            stop_strings: Vec::new(),
            output: OutputFormat::default(),
            logprobs: false,
        }
    }
}

impl GenerateParams {
    /// Checks every setting's range; an error names the field. Values out
    /// of range would otherwise reach MLX (a group size of 0 divides by
    /// zero) or sample from nonsense.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, v: &dyn std::fmt::Display, want: &str| {
            Err(Error::Usage(format!("{field}: {v} {want}")))
        };
        let s = &self.sampling;
        if !(s.temperature.is_finite() && s.temperature >= 0.0) {
            return bad(
                "temperature",
                &s.temperature,
                "must be a finite number of 0 or more",
            );
        }
        for (field, v) in [
            ("top_p", s.top_p),
            ("min_p", s.min_p),
            ("xtc_probability", s.xtc_probability),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return bad(field, &v, "must be between 0 and 1");
            }
        }
        if !(0.0..=0.5).contains(&s.xtc_threshold) {
            return bad(
                "xtc_threshold",
                &s.xtc_threshold,
                "must be between 0 and 0.5",
            );
        }
        let p = &self.processors;
        if let Some(v) = p
            .repetition_penalty
            .filter(|v| !(v.is_finite() && *v > 0.0))
        {
            return bad("repetition_penalty", &v, "must be a finite number above 0");
        }
        for (field, v) in [
            ("presence_penalty", p.presence_penalty),
            ("frequency_penalty", p.frequency_penalty),
        ] {
            if let Some(v) = v.filter(|v| !v.is_finite()) {
                return bad(field, &v, "must be a finite number");
            }
        }
        if let Some(bits) = self.kv_bits.filter(|b| !QUANT_BITS.contains(b)) {
            return bad("kv_bits", &bits, "must be one of 2, 3, 4, 5, 6, 8");
        }
        if !QUANT_GROUP_SIZES.contains(&self.kv_group_size) {
            return bad(
                "kv_group_size",
                &self.kv_group_size,
                "must be one of 32, 64, 128",
            );
        }
        if self.quantized_kv_start < 0 {
            return bad(
                "quantized_kv_start",
                &self.quantized_kv_start,
                "must be 0 or more",
            );
        }
        if let Some(n) = self.cache.max_kv_size.filter(|n| *n < 1) {
            return bad("max_kv_size", &n, "must be 1 or more");
        }
        Ok(())
    }
}

/// Quantizes `cache`'s standard KV slots once they hold
/// `params.quantized_kv_start` positions, when `params.kv_bits` asks.
pub(crate) fn maybe_quantize(cache: &mut ModelCache, params: &GenerateParams) -> Result<()> {
    if let Some(bits) = params.kv_bits {
        let group = params.kv_group_size;
        if let Some(w) = cache.kv_widths().into_iter().find(|w| w % group != 0) {
            return Err(Error::Usage(format!(
                "kv_group_size: {group} does not divide this model's key/value head width {w}; \
                 choose a group size that does (32, 64 or 128)"
            )));
        }
        cache.maybe_quantize(params.quantized_kv_start, group, bits)?;
    }
    Ok(())
}

/// Feeds `tokens` into `cache` in chunks of `params.prefill_step_size`,
/// evaluating the cache after each (mlx-lm's prefill), quantizing it as
/// `params` say; `progress(done, total)` follows the chunks.
pub fn prefill(
    model: &Model,
    cache: &mut ModelCache,
    tokens: &[u32],
    params: &GenerateParams,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<()> {
    let total = tokens.len();
    let step = params.prefill_step_size.max(1);
    let pass = Pass::prompt(total);
    let mut done = 0;
    progress(0, total);
    while done < total {
        let n = step.min(total - done);
        in_pass(pass, || {
            model.forward(&row(&tokens[done..done + n]), Some(&mut *cache))
        })?;
        maybe_quantize(cache, params)?;
        mlx_rs::transforms::eval(cache.arrays())?;
        mlx_rs::memory::clear_cache()?;
        done += n;
        progress(done, total);
    }
    Ok(())
}

/// Most positions a generation's token history reserves up front (it grows
/// past this as needed).
const HISTORY_RESERVE: usize = 1 << 16;

fn row(tokens: &[u32]) -> Array {
    let t: Vec<i32> = tokens.iter().map(|&x| x as i32).collect();
    Array::from_slice(&t, &[1, t.len() as i32])
}

/// The next token, still on the device (greedy, pipelined) or already read.
#[derive(Debug)]
enum Next {
    /// The id, and its log-probability when asked for.
    Device(Array, Option<Array>),
    Host(u32, Option<f32>),
}

/// Where a generator's decode steps spent their time on the host, summed
/// over steps: building the step's graph (the forward and the token
/// choice), handing it to MLX (`async_eval`, which encodes its kernels),
/// and waiting for a token to be read back. A host-bound loop shows
/// `build + launch` close to the time per token; a device-bound one shows
/// most of it in `wait`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTimes {
    pub steps: usize,
    pub build: Duration,
    pub launch: Duration,
    pub wait: Duration,
}

/// Produces tokens one at a time.
#[derive(Debug)]
pub struct TokenGenerator<'a> {
    model: &'a Model,
    cache: &'a mut ModelCache,
    params: &'a GenerateParams,
    /// `max_tokens`, or fewer where the context ends first.
    max_tokens: usize,
    history: Vec<u32>,
    rng: Rng,
    next: Option<Next>,
    produced: usize,
    times: StepTimes,
    /// The log-probability of the token `next_token` returned last.
    last_logprob: Option<f32>,
}

impl<'a> TokenGenerator<'a> {
    /// Prefills `prompt` (which must not be empty) and prepares the first
    /// token. `progress(done, total)` is called after each prefill chunk.
    pub fn new(
        model: &'a Model,
        cache: &'a mut ModelCache,
        prompt: &[u32],
        params: &'a GenerateParams,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<TokenGenerator<'a>> {
        TokenGenerator::start(model, cache, prompt, params, progress, "the prompt")
    }

    /// [`TokenGenerator::new`], naming the prompt's ids `what` in errors.
    fn start(
        model: &'a Model,
        cache: &'a mut ModelCache,
        prompt: &[u32],
        params: &'a GenerateParams,
        progress: &mut dyn FnMut(usize, usize),
        what: &str,
    ) -> Result<TokenGenerator<'a>> {
        if prompt.is_empty() {
            return Err(Error::Usage("the prompt has no tokens".into()));
        }
        params.validate()?;
        let ids: Vec<i64> = prompt.iter().map(|&t| i64::from(t)).collect();
        model.check_tokens(&ids, what)?;
        let limits = lmspec_spec::limits::limits()?;
        let context = model.context_length();
        if let Some(max) = limits.max_prompt_tokens.or(context) {
            if prompt.len() as u64 > max {
                let why = match limits.max_prompt_tokens {
                    Some(_) => "the limit LMSPEC_MAX_PROMPT_TOKENS".to_string(),
                    None => format!(
                        "the model's context of {max} positions (its config's \
                         max_position_embeddings or learned positions; LMSPEC_MAX_PROMPT_TOKENS \
                         overrides)"
                    ),
                };
                return Err(Error::Usage(format!(
                    "the prompt: {} tokens are more than {why}",
                    prompt.len()
                )));
            }
        }
        // Without a rotating cache, generation stops where the model's
        // context ends (llama.cpp's rule).
        let room = match (params.cache.max_kv_size, context) {
            (None, Some(c)) => (c as usize).saturating_sub(prompt.len()),
            _ => usize::MAX,
        };
        let mut g = TokenGenerator {
            model,
            cache,
            params,
            max_tokens: params.max_tokens.min(room),
            history: Vec::with_capacity(prompt.len() + params.max_tokens.min(HISTORY_RESERVE)),
            rng: Rng::new(params.sampling.seed),
            next: None,
            produced: 0,
            times: StepTimes::default(),
            last_logprob: None,
        };
        let total = prompt.len();
        let mut report = |done: usize| progress(done, total);
        prefill(
            model,
            g.cache,
            &prompt[..total - 1],
            params,
            &mut |done, _| report(done),
        )?;
        g.history.extend_from_slice(&prompt[..total - 1]);
        let last = prompt[total - 1];
        g.next = Some(g.step(&row(&[last]), Some(last))?);
        progress(total, total);
        Ok(g)
    }

    fn maybe_quantize(&mut self) -> Result<()> {
        maybe_quantize(self.cache, self.params)
    }

    /// Feeds one token and works out the next.
    fn step(&mut self, input: &Array, host: Option<u32>) -> Result<Next> {
        let t0 = Instant::now();
        let logits = in_pass(Pass::Step, || self.model.forward(input, Some(self.cache)))?;
        let v = *logits.shape().last().unwrap_or(&0);
        let t = logits.shape()[1];
        let last = logits.reshape(&[-1, v])?;
        let last = if t > 1 { last_row(&last)? } else { last };
        if let Some(h) = host {
            self.history.push(h);
        }
        self.maybe_quantize()?;
        let p = self.params;
        if p.sampling.is_greedy() && p.processors.is_empty() {
            let id = mlx_rs::ops::indexing::argmax_axis(&last, -1, None)?;
            let lp = match p.logprobs {
                true => {
                    let top = mlx_rs::ops::max_axis(&last, -1, None)?;
                    let lse = mlx_rs::ops::logsumexp_axis(&last, -1, None)?;
                    Some(mlx_rs::ops::subtract(&top, &lse)?.as_dtype(Dtype::Float32)?)
                }
                false => None,
            };
            let t1 = Instant::now();
            mlx_rs::transforms::async_eval([&id].into_iter().chain(lp.as_ref()))?;
            self.times.steps += 1;
            self.times.build += t1 - t0;
            self.times.launch += t1.elapsed();
            return Ok(Next::Device(id, lp));
        }
        let last = last.as_dtype(Dtype::Float32)?.contiguous()?;
        last.eval()?;
        let mut values = last.as_slice::<f32>().to_vec();
        p.processors.apply(&self.history, &mut values);
        let id = p.sampling.sample(&values, &mut self.rng);
        let lp = p.logprobs.then(|| crate::sampling::logprob_of(&values, id));
        Ok(Next::Host(id, lp))
    }

    /// Host time of the greedy decode steps so far (sampled steps, which
    /// read the logits back at once, are not counted).
    pub fn step_times(&self) -> StepTimes {
        self.times
    }

    /// The next token, or `None` once `max_tokens` were produced.
    pub fn next_token(&mut self) -> Option<Result<u32>> {
        if self.produced >= self.max_tokens {
            return None;
        }
        let current = self.next.take()?;
        let out = (|| -> Result<u32> {
            let id = match current {
                Next::Device(y, lp) => {
                    // Launch the following step before reading this one, so
                    // one token is always in flight.
                    let input = y.reshape(&[1, 1])?;
                    let following = self.step(&input, None)?;
                    let t = Instant::now();
                    let id = y
                        .try_item_cast::<u32>()
                        .map_err(|e| Error::Usage(format!("token id: {e}")))?;
                    self.times.wait += t.elapsed();
                    self.last_logprob = match lp {
                        Some(lp) => Some(
                            lp.try_item_cast::<f32>()
                                .map_err(|e| Error::Usage(format!("logprob: {e}")))?,
                        ),
                        None => None,
                    };
                    self.history.push(id);
                    self.next = Some(following);
                    id
                }
                Next::Host(id, lp) => {
                    self.last_logprob = lp;
                    self.next = Some(self.step(&row(&[id]), Some(id))?);
                    id
                }
            };
            self.produced += 1;
            if self.produced % 256 == 0 {
                mlx_rs::memory::clear_cache()?;
            }
            Ok(id)
        })();
        Some(out)
    }
}

impl Drop for TokenGenerator<'_> {
    /// The step after the last returned token may still be running (it was
    /// launched ahead); finish it so that its work neither spills into
    /// whatever runs next nor leaves the cache half-written.
    fn drop(&mut self) {
        if let Some(Next::Device(y, _)) = &self.next {
            let _ = y.eval();
        }
    }
}

/// `x[-1:]` of a 2-D array.
fn last_row(x: &Array) -> std::result::Result<Array, mlx_rs::error::Exception> {
    use mlx_rs::ops::indexing::{ArrayIndex, TryIndexOp};
    let n = x.shape()[0];
    x.try_index(&[(n - 1..n).index_op()][..])
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// An EOS token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// Cancelled by the caller.
    Cancelled,
}

/// Statistics of one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationInfo {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Prompt processing time (to the first token), seconds.
    pub prompt_seconds: f64,
    pub generation_seconds: f64,
    pub prompt_tps: f64,
    pub generation_tps: f64,
    pub peak_memory_bytes: usize,
    pub stop: StopReason,
    /// Drafted and accepted tokens (speculative decoding).
    pub draft: Option<DraftStats>,
}

/// What a streaming generation reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Newly decoded text.
    Text(String),
    /// Newly decoded reasoning (with [`GenerateParams::output`]'s markers).
    Reasoning(String),
    /// A tool call in [`GenerateParams::output`]'s format.
    ToolCall(ToolCall),
    /// Text in the tool-call format that is not an acceptable call.
    ToolRejected {
        reason: RejectReason,
        text: String,
        detail: String,
    },
    /// Prefill progress: (tokens done, total).
    PromptProgress(usize, usize),
    /// The end, with statistics.
    Info(GenerationInfo),
}

/// The result of a whole generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The whole output text, reasoning and calls included.
    pub text: String,
    pub tokens: Vec<u32>,
    /// The tool calls reported as [`Event::ToolCall`].
    pub calls: Vec<ToolCall>,
    pub info: GenerationInfo,
}

/// Splits the output text into answer, reasoning and tool-call events.
#[derive(Debug)]
struct OutputStream<'a> {
    reasoning: Option<ReasoningSplitter>,
    tools: Option<ToolParser<'a>>,
    calls: Vec<ToolCall>,
}

impl<'a> OutputStream<'a> {
    /// `prompt_tail`: the end of the prompt text, which may already have
    /// opened a reasoning block; `tools`: the format of `format.tools`
    /// (borrowed for as long as the stream lives).
    fn new(
        format: &OutputFormat,
        tools: Option<&'a ToolFormat>,
        prompt_tail: &str,
    ) -> OutputStream<'a> {
        OutputStream {
            reasoning: format.reasoning.as_ref().map(|(open, close)| {
                ReasoningSplitter::new(open, close, prompt_tail.trim_end().ends_with(open.as_str()))
            }),
            tools: tools.map(|f| ToolParser::new(f, &[]).with_schemas(&format.schemas)),
            calls: Vec::new(),
        }
    }

    fn push(&mut self, text: &str, on_event: &mut dyn FnMut(Event)) {
        let spans = match &mut self.reasoning {
            Some(r) => r.push(text),
            None => vec![Span::Text(text.to_string())],
        };
        self.spans(spans, on_event);
    }

    fn spans(&mut self, spans: Vec<Span>, on_event: &mut dyn FnMut(Event)) {
        for span in spans {
            match span {
                Span::Reasoning(r) => on_event(Event::Reasoning(r)),
                Span::Text(t) => match &mut self.tools {
                    Some(p) => {
                        let events = p.push(&t);
                        self.tool_events(events, on_event);
                    }
                    None => on_event(Event::Text(t)),
                },
            }
        }
    }

    fn tool_events(&mut self, events: Vec<ToolEvent>, on_event: &mut dyn FnMut(Event)) {
        for e in events {
            on_event(match e {
                ToolEvent::Text(t) => Event::Text(t),
                ToolEvent::Call(c) => {
                    self.calls.push(c.clone());
                    Event::ToolCall(c)
                }
                ToolEvent::Rejected {
                    reason,
                    text,
                    detail,
                } => Event::ToolRejected {
                    reason,
                    text,
                    detail,
                },
            });
        }
    }

    fn finish(&mut self, on_event: &mut dyn FnMut(Event)) {
        if let Some(r) = &mut self.reasoning {
            let spans = r.finish();
            self.spans(spans, on_event);
        }
        if let Some(p) = &mut self.tools {
            let events = p.finish();
            self.tool_events(events, on_event);
        }
    }
}

/// Holds back text that might be the start of a stop string.
#[derive(Debug, Default)]
struct StopMatcher {
    stops: Vec<String>,
    held: String,
    /// The stop string that ended the output.
    hit: Option<usize>,
}

impl StopMatcher {
    /// Returns (text safe to emit, whether a stop string was hit).
    fn push(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        if let Some((pos, k)) = self
            .stops
            .iter()
            .enumerate()
            .filter_map(|(k, s)| self.held.find(s.as_str()).map(|p| (p, k)))
            .min()
        {
            let out = self.held[..pos].to_string();
            self.held.clear();
            self.hit = Some(k);
            return (out, true);
        }
        let keep = self
            .stops
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(move |k| s.is_char_boundary(*k))
                    .map(move |k| &s[..k])
            })
            .filter(|p| self.held.ends_with(p))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, false)
    }

    fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// The text side of a generation: turns tokens into text as they come,
/// cuts the output at stop strings and splits it into answer, reasoning and
/// tool-call [`Event`]s.
#[derive(Debug)]
pub struct TextStream<'a> {
    detok: StreamingDetokenizer,
    stops: StopMatcher,
    output: OutputStream<'a>,
    /// The output text so far (reasoning and calls included, stop strings
    /// not).
    pub text: String,
}

impl<'a> TextStream<'a> {
    /// A stream for the output after `prompt`. `tools` is the format of
    /// `format.tools` borrowed for the stream's life (`None`: no calls are
    /// read).
    pub fn new(
        tokenizer: &Tokenizer,
        prompt: &[u32],
        stop_strings: &[String],
        format: &OutputFormat,
        tools: Option<&'a ToolFormat>,
    ) -> Result<TextStream<'a>> {
        let tail_from = prompt.len().saturating_sub(8);
        let prompt_tail = match &format.reasoning {
            Some(_) => tokenizer.decode(&prompt[tail_from..], false)?,
            None => String::new(),
        };
        Ok(TextStream {
            detok: StreamingDetokenizer::new(),
            stops: StopMatcher {
                stops: stop_strings.to_vec(),
                ..Default::default()
            },
            output: OutputStream::new(format, tools, &prompt_tail),
            text: String::new(),
        })
    }

    /// Adds a generated token (not an end-of-sequence one); returns whether
    /// a stop string ended the output.
    pub fn push(
        &mut self,
        tokenizer: &Tokenizer,
        tok: u32,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<bool> {
        let piece = self.detok.push(tokenizer, tok)?;
        let (emit, hit) = self.stops.push(&piece);
        if !emit.is_empty() {
            self.text.push_str(&emit);
            self.output.push(&emit, on_event);
        }
        Ok(hit)
    }

    /// Ends the output: text held back (unless a stop ended it, `stopped`)
    /// and open reasoning or calls come out.
    pub fn finish(
        &mut self,
        tokenizer: &Tokenizer,
        stopped: bool,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<()> {
        if !stopped {
            let (emit, _) = self.stops.push(&self.detok.finish(tokenizer)?);
            let rest = emit + &self.stops.flush();
            if !rest.is_empty() {
                self.text.push_str(&rest);
                self.output.push(&rest, on_event);
            }
        }
        self.output.finish(on_event);
        Ok(())
    }

    /// The stop string that ended the output, if one did.
    pub fn stop_sequence(&self) -> Option<&str> {
        self.stops.hit.map(|k| self.stops.stops[k].as_str())
    }

    /// The tool calls reported so far.
    pub fn calls(&self) -> &[ToolCall] {
        &self.output.calls
    }
}

/// A source of generated tokens: the plain token loop or speculative
/// decoding.
pub trait TokenSource {
    /// The next token, or `None` once the source is done.
    fn next_token(&mut self) -> Option<Result<GeneratedToken>>;

    /// Draft statistics, for sources that draft.
    fn draft_stats(&self) -> Option<DraftStats> {
        None
    }
}

/// One token of a raw token stream.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GeneratedToken {
    pub id: u32,
    /// The token's log-probability under the (processed) logits, when
    /// [`GenerateParams::logprobs`] asks for it.
    pub logprob: Option<f32>,
    /// Whether a draft model proposed it (and the model accepted it).
    pub from_draft: bool,
}

/// How many drafted tokens the model accepted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DraftStats {
    pub drafted: usize,
    pub accepted: usize,
}

impl DraftStats {
    /// Accepted over drafted (0 when nothing was drafted).
    pub fn acceptance_rate(&self) -> f64 {
        self.accepted as f64 / self.drafted.max(1) as f64
    }
}

impl TokenSource for TokenGenerator<'_> {
    fn next_token(&mut self) -> Option<Result<GeneratedToken>> {
        TokenGenerator::next_token(self).map(|r| {
            r.map(|id| GeneratedToken {
                id,
                logprob: self.last_logprob.take(),
                from_draft: false,
            })
        })
    }
}

/// Generates text for `prompt` token ids, streaming events to `on_event`.
/// With `cache`, generation continues that cache (its positions must be the
/// tokens before `prompt`); without, a fresh one is made from `params`.
pub fn generate(
    model: &Model,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    params: &GenerateParams,
    cache: Option<&mut ModelCache>,
    cancel: Option<&AtomicBool>,
    on_event: &mut dyn FnMut(Event),
) -> Result<Generation> {
    let (start, mut slot) = begin(model, params, cache)?;
    let mut progress = |done, total| on_event(Event::PromptProgress(done, total));
    let what = format!("the prompt (as {} encodes it)", tokenizer.source.display());
    let cache = slot.get();
    let mut gen = TokenGenerator::start(model, cache, prompt, params, &mut progress, &what)?;
    drive(&mut gen, tokenizer, prompt, params, start, cancel, on_event)
}

/// The cache a generation continues: the caller's, or a fresh one.
pub(crate) enum CacheSlot<'a> {
    Given(&'a mut ModelCache),
    Fresh(ModelCache),
}

impl CacheSlot<'_> {
    pub(crate) fn get(&mut self) -> &mut ModelCache {
        match self {
            CacheSlot::Given(c) => c,
            CacheSlot::Fresh(c) => c,
        }
    }
}

/// The start of a generation: its clock, MLX's peak memory reset, and the
/// cache it runs on (`cache`, else a fresh one made from `params`).
pub(crate) fn begin<'a>(
    model: &Model,
    params: &GenerateParams,
    cache: Option<&'a mut ModelCache>,
) -> Result<(Instant, CacheSlot<'a>)> {
    let start = Instant::now();
    lmspec_engine::memory::reset_peak()?;
    let slot = match cache {
        Some(c) => CacheSlot::Given(c),
        None => CacheSlot::Fresh(model.new_cache_with(params.cache)),
    };
    Ok((start, slot))
}

/// Runs a token source to the end of a generation: EOS ids, stop strings,
/// cancellation, text events and statistics.
pub(crate) fn drive(
    gen: &mut dyn TokenSource,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    params: &GenerateParams,
    start: Instant,
    cancel: Option<&AtomicBool>,
    on_event: &mut dyn FnMut(Event),
) -> Result<Generation> {
    let mut eos: Vec<u32> = tokenizer.eos_ids.clone();
    eos.extend(&params.extra_eos);
    let output = &params.output;
    let mut text = TextStream::new(
        tokenizer,
        prompt,
        &params.stop_strings,
        output,
        output.tools.as_ref(),
    )?;
    let mut tokens = Vec::new();
    let mut first_token_at = None;
    let mut stop = StopReason::Length;
    while let Some(tok) = gen.next_token() {
        let tok = tok?.id;
        first_token_at.get_or_insert_with(Instant::now);
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            stop = StopReason::Cancelled;
            break;
        }
        tokens.push(tok);
        if eos.contains(&tok) {
            stop = StopReason::Stop;
            break;
        }
        if text.push(tokenizer, tok, on_event)? {
            stop = StopReason::Stop;
            break;
        }
    }
    text.finish(tokenizer, stop == StopReason::Stop, on_event)?;
    let end = Instant::now();
    let first = first_token_at.unwrap_or(end);
    let prompt_seconds = (first - start).as_secs_f64();
    let generation_seconds = (end - first).as_secs_f64();
    let n = tokens.len();
    let info = GenerationInfo {
        prompt_tokens: prompt.len(),
        generated_tokens: n,
        prompt_seconds,
        generation_seconds,
        prompt_tps: prompt.len() as f64 / prompt_seconds.max(1e-9),
        generation_tps: n.saturating_sub(1) as f64 / generation_seconds.max(1e-9),
        peak_memory_bytes: lmspec_engine::memory::peak_bytes()?,
        stop,
        draft: gen.draft_stats(),
    };
    on_event(Event::Info(info.clone()));
    Ok(Generation {
        calls: text.calls().to_vec(),
        text: text.text,
        tokens,
        info,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_held_back_and_cut() {
        let mut m = StopMatcher {
            stops: vec!["</end>".into()],
            ..Default::default()
        };
        assert_eq!(m.push("hello </"), ("hello ".into(), false));
        assert_eq!(m.push("en"), (String::new(), false));
        assert_eq!(m.push("d> more"), (String::new(), true));
        let mut m = StopMatcher {
            stops: vec!["</end>".into()],
            ..Default::default()
        };
        assert_eq!(m.push("a </b"), ("a </b".into(), false));
        assert_eq!(m.push("<"), (String::new(), false));
        assert_eq!(m.flush(), "<");
    }
}

#[cfg(test)]
mod validate_tests {
    use super::*;

    #[test]
    fn settings_out_of_range_are_refused_by_field() {
        let err = |edit: &dyn Fn(&mut GenerateParams)| {
            let mut p = GenerateParams::default();
            edit(&mut p);
            p.validate().expect_err("refused").to_string()
        };
        assert!(GenerateParams::default().validate().is_ok());
        assert!(err(&|p| p.sampling.temperature = f32::NAN).starts_with("temperature:"));
        assert!(err(&|p| p.sampling.top_p = 1.5).starts_with("top_p:"));
        assert!(err(&|p| p.processors.repetition_penalty = Some(0.0))
            .starts_with("repetition_penalty:"));
        assert!(
            err(&|p| p.processors.presence_penalty = Some(f32::INFINITY))
                .starts_with("presence_penalty:")
        );
        assert!(err(&|p| p.kv_bits = Some(7)).starts_with("kv_bits:"));
        assert!(err(&|p| p.kv_group_size = 0).starts_with("kv_group_size:"));
        assert!(err(&|p| p.quantized_kv_start = -1).starts_with("quantized_kv_start:"));
        assert!(err(&|p| p.cache.max_kv_size = Some(0)).starts_with("max_kv_size:"));
        let mut ok = GenerateParams::default();
        ok.processors.presence_penalty = Some(-0.5);
        assert!(
            ok.validate().is_ok(),
            "a negative presence penalty is allowed"
        );
    }
}
