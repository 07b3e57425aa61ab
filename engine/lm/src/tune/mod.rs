//! Adapter training (LoRA, DoRA, QLoRA) with mlx-lm's trainer semantics:
//! [`train`] runs a model whose adapter was attached at load
//! ([`lmspec_engine::LoadOptions::adapter`]) over a tokenized data folder
//! ([`data`]), reporting loss, tokens/s and peak memory, evaluating and
//! saving the adapter as it goes, and draws the loss curve
//! (`loss_curve.svg`) beside the adapter. [`step::Trainer`] is one step of
//! it: the gradient of the masked next-token loss with respect to the
//! adapter's arrays only, then the optimizer update.
pub mod data;
pub mod plot;
pub mod step;

use std::path::{Path, PathBuf};
use std::time::Instant;

use lmspec_engine::error::{Error, Result};
use lmspec_engine::Model;

pub use data::{Dataset, Datasets, Features};
pub use step::{item, Batch, Optimizer, Schedule, Trainer};

/// mlx-lm's training options (its defaults, except the learning rate
/// schedule, which is a [`Schedule`]).
#[derive(Debug, Clone)]
pub struct TrainParams {
    pub optimizer: Optimizer,
    /// Default: constant 1e-5.
    pub schedule: Schedule,
    pub batch_size: usize,
    pub iters: u64,
    /// Validation batches per evaluation; -1: the whole set.
    pub val_batches: i64,
    pub steps_per_report: u64,
    pub steps_per_eval: u64,
    pub save_every: u64,
    pub max_seq_length: usize,
    pub grad_accumulation_steps: u64,
    /// Seed of the batch order.
    pub seed: u64,
    /// Where the adapter is saved (`adapters.safetensors`,
    /// `adapter_config.json`, checkpoints, `loss_curve.svg`); `None`: not
    /// saved.
    pub adapter_path: Option<PathBuf>,
    /// Settings recorded in `adapter_config.json` besides the adapter's own.
    pub record: serde_json::Value,
}

impl Default for TrainParams {
    fn default() -> TrainParams {
        TrainParams {
            optimizer: Optimizer::adam(),
            schedule: Schedule::Constant(1e-5),
            batch_size: 4,
            iters: 1000,
            val_batches: 25,
            steps_per_report: 10,
            steps_per_eval: 200,
            save_every: 100,
            max_seq_length: 2048,
            grad_accumulation_steps: 1,
            seed: 0,
            adapter_path: None,
            record: serde_json::Value::Null,
        }
    }
}

/// A training report (every `steps_per_report` iterations).
#[derive(Debug, Clone)]
pub struct TrainReport {
    pub iteration: u64,
    /// Mean loss over the iterations since the last report.
    pub loss: f32,
    pub learning_rate: f32,
    pub iterations_per_second: f64,
    pub tokens_per_second: f64,
    pub trained_tokens: u64,
    pub peak_memory_bytes: usize,
}

/// What [`train`] tells its progress callback.
#[derive(Debug, Clone)]
pub enum TrainEvent {
    /// One iteration done (its own loss).
    Step {
        iteration: u64,
        loss: f32,
    },
    Report(TrainReport),
    Validation {
        iteration: u64,
        loss: f32,
        seconds: f64,
    },
    Saved(PathBuf),
}

/// What a run gave.
#[derive(Debug, Clone, Default)]
pub struct TrainOutcome {
    /// Every iteration's loss.
    pub step_losses: Vec<f32>,
    /// (iteration, mean loss) per report.
    pub reports: Vec<(u64, f32)>,
    /// (iteration, loss) per validation (iteration 0: before training).
    pub validations: Vec<(u64, f32)>,
}

fn usage(msg: impl Into<String>) -> Error {
    Error::Usage(msg.into())
}

/// The mean loss over `num_batches` batches of `data` (-1: all), weighted
/// by their target counts, in a fixed order (mlx-lm's `evaluate`).
pub fn evaluate(
    model: &Model,
    data: &Dataset,
    batch_size: usize,
    num_batches: i64,
    max_seq_length: usize,
) -> Result<f32> {
    let groups = data::batch_groups(data, batch_size)?;
    let order = data::Shuffler::new(0).permutation(groups.len());
    let take = if num_batches < 0 {
        groups.len()
    } else {
        (num_batches as usize).min(groups.len())
    };
    if let Some(a) = &model.adapter {
        a.set_training(false);
    }
    let (mut total, mut count) = (0.0f64, 0.0f64);
    for &g in order.iter().take(take) {
        let ex: Vec<_> = groups[g].iter().map(|&i| &data.examples[i]).collect();
        let batch = data::make_batch(&ex, max_seq_length)?;
        let (l, n) = step::batch_loss(model, &batch)?;
        mlx_rs::transforms::eval([&l, &n])?;
        let n = item(&n)? as f64;
        total += item(&l)? as f64 * n;
        count += n;
    }
    if count == 0.0 {
        return Err(usage(format!(
            "{}: no targets to evaluate",
            data.file.display()
        )));
    }
    Ok((total / count) as f32)
}

fn check(params: &TrainParams, data: &Datasets) -> Result<()> {
    if data.train.is_empty() {
        return Err(usage(format!(
            "{}: the training set is empty (or missing)",
            data.train.file.display()
        )));
    }
    if params.iters == 0 {
        return Err(usage("iters must be at least 1"));
    }
    if params.steps_per_report == 0 || params.steps_per_eval == 0 || params.save_every == 0 {
        return Err(usage(
            "steps_per_report, steps_per_eval and save_every must be at least 1",
        ));
    }
    if params.max_seq_length < 2 {
        return Err(usage("max_seq_length must be at least 2"));
    }
    data::batch_groups(&data.train, params.batch_size)?;
    if !data.valid.is_empty() {
        data::batch_groups(&data.valid, params.batch_size)?;
    }
    Ok(())
}

fn save(model: &Model, params: &TrainParams, dir: &Path, it: Option<u64>) -> Result<PathBuf> {
    let adapter = model
        .adapter
        .as_ref()
        .ok_or_else(|| usage("the model has no adapter"))?;
    adapter.save(dir, &params.record)?;
    let main = dir.join(lmspec_engine::adapter::ADAPTER_WEIGHTS);
    if let Some(it) = it {
        let copy = dir.join(format!("{it:07}_adapters.safetensors"));
        lmspec_engine::adapter::save_weights(&copy, &adapter.modules())?;
        return Ok(copy);
    }
    Ok(main)
}

/// Trains the adapter attached to `model` on `data.train` (validating on
/// `data.valid` when it has examples), as mlx-lm's `train` does: batches of
/// examples sorted by length, in a shuffled order each pass (our own seeded
/// shuffle), padded to a multiple of 32 plus one; validation at the first
/// iteration, every `steps_per_eval` and at the end; the adapter saved every
/// `save_every` iterations and at the end, with `loss_curve.svg`.
pub fn train(
    model: &Model,
    data: &Datasets,
    params: &TrainParams,
    progress: &mut dyn FnMut(&TrainEvent),
) -> Result<TrainOutcome> {
    check(params, data)?;
    let mut trainer = Trainer::new(
        model,
        params.optimizer.clone(),
        params.schedule.clone(),
        params.grad_accumulation_steps,
    )?;
    let groups = data::batch_groups(&data.train, params.batch_size)?;
    let mut shuffle = data::Shuffler::new(params.seed);
    let mut order: Vec<usize> = Vec::new();
    let mut outcome = TrainOutcome::default();
    lmspec_engine::memory::reset_peak()?;
    let (mut losses, mut steps, mut tokens, mut trained) = (0.0f64, 0u64, 0.0f64, 0u64);
    let mut elapsed = 0.0f64;
    for it in 1..=params.iters {
        if !data.valid.is_empty()
            && (it == 1 || it % params.steps_per_eval == 0 || it == params.iters)
        {
            let t = Instant::now();
            let loss = evaluate(
                model,
                &data.valid,
                params.batch_size,
                params.val_batches,
                params.max_seq_length,
            )?;
            let at = it - 1;
            outcome.validations.push((at, loss));
            progress(&TrainEvent::Validation {
                iteration: at,
                loss,
                seconds: t.elapsed().as_secs_f64(),
            });
        }
        if order.is_empty() {
            order = shuffle.permutation(groups.len());
            order.reverse();
        }
        let g = order.pop().unwrap_or(0);
        let ex: Vec<_> = groups[g].iter().map(|&i| &data.train.examples[i]).collect();
        let batch = data::make_batch(&ex, params.max_seq_length)?;
        let t = Instant::now();
        let (loss, ntoks) = trainer.step(&batch)?;
        elapsed += t.elapsed().as_secs_f64();
        outcome.step_losses.push(loss);
        progress(&TrainEvent::Step {
            iteration: it,
            loss,
        });
        losses += loss as f64;
        tokens += ntoks as f64;
        steps += 1;
        if it % params.steps_per_report == 0 || it == params.iters {
            trained += tokens as u64;
            let report = TrainReport {
                iteration: it,
                loss: (losses / steps as f64) as f32,
                learning_rate: trainer.learning_rate(),
                iterations_per_second: steps as f64 / elapsed.max(1e-9),
                tokens_per_second: tokens / elapsed.max(1e-9),
                trained_tokens: trained,
                peak_memory_bytes: lmspec_engine::memory::peak_bytes()?,
            };
            outcome.reports.push((it, report.loss));
            progress(&TrainEvent::Report(report));
            (losses, steps, tokens, elapsed) = (0.0, 0, 0.0, 0.0);
        }
        if let Some(dir) = &params.adapter_path {
            if it % params.save_every == 0 {
                let f = save(model, params, dir, Some(it))?;
                progress(&TrainEvent::Saved(f));
            }
        }
    }
    if let Some(dir) = &params.adapter_path {
        let f = save(model, params, dir, None)?;
        let curve: Vec<(u64, f32)> = outcome
            .step_losses
            .iter()
            .enumerate()
            .map(|(k, &l)| (k as u64 + 1, l))
            .collect();
        let svg = plot::loss_svg(&curve, &outcome.validations);
        let file = dir.join("loss_curve.svg");
        std::fs::write(&file, svg).map_err(|source| Error::Io { path: file, source })?;
        progress(&TrainEvent::Saved(f));
    }
    Ok(outcome)
}
