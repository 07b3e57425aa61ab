//! One training step, as mlx-lm's trainer takes it: the masked mean
//! cross-entropy of next tokens, its gradient with respect to the adapter's
//! arrays only (MLX autodiff through the model's plan), gradient
//! accumulation, and the optimizer update (mlx.optimizers' Adam, AdamW and
//! SGD arithmetic).
use mlx_rs::error::Exception;
use mlx_rs::{ops, Array, Dtype};

use lmspec_engine::adapter::Attached;
use lmspec_engine::error::{Error, Result};
use lmspec_engine::Model;

/// A padded batch: token ids `[B, L]` and per row `(offset, length)`
/// `[B, 2]`: the loss counts targets at steps `offset..=length` (mlx-lm's
/// mask, steps counted from 1).
#[derive(Debug, Clone)]
pub struct Batch {
    pub tokens: Array,
    pub lengths: Array,
}

/// Which optimizer, with mlx.optimizers' defaults.
#[derive(Debug, Clone, PartialEq)]
pub enum Optimizer {
    /// betas (0.9, 0.999), eps 1e-8, no bias correction.
    Adam {
        betas: (f64, f64),
        eps: f64,
        bias_correction: bool,
    },
    /// Adam with decoupled weight decay (default 0.01).
    AdamW {
        betas: (f64, f64),
        eps: f64,
        weight_decay: f64,
        bias_correction: bool,
    },
    /// momentum, weight decay, dampening 0, no Nesterov by default.
    Sgd {
        momentum: f64,
        weight_decay: f64,
        dampening: f64,
        nesterov: bool,
    },
}

impl Optimizer {
    pub fn adam() -> Optimizer {
        Optimizer::Adam {
            betas: (0.9, 0.999),
            eps: 1e-8,
            bias_correction: false,
        }
    }
    pub fn adamw() -> Optimizer {
        Optimizer::AdamW {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
            bias_correction: false,
        }
    }
    pub fn sgd() -> Optimizer {
        Optimizer::Sgd {
            momentum: 0.0,
            weight_decay: 0.0,
            dampening: 0.0,
            nesterov: false,
        }
    }

    /// `adam`, `adamw` or `sgd` with mlx-lm's `optimizer_config` keys
    /// (`betas`, `eps`, `weight_decay`, `bias_correction`, `momentum`,
    /// `dampening`, `nesterov`).
    pub fn from_name(
        name: &str,
        config: &serde_json::Value,
    ) -> std::result::Result<Optimizer, String> {
        let mut o = match name {
            "adam" => Optimizer::adam(),
            "adamw" => Optimizer::adamw(),
            "sgd" => Optimizer::sgd(),
            other => {
                return Err(format!(
                    "'{other}' is not an optimizer lmspec has (adam, adamw, sgd)"
                ))
            }
        };
        let Some(map) = config.as_object() else {
            return Ok(o);
        };
        let f = |k: &str| -> std::result::Result<Option<f64>, String> {
            match map.get(k) {
                None => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| format!("{k}: expected a number, got {v}")),
            }
        };
        let b = |k: &str| -> std::result::Result<Option<bool>, String> {
            match map.get(k) {
                None => Ok(None),
                Some(v) => v
                    .as_bool()
                    .map(Some)
                    .ok_or_else(|| format!("{k}: expected true or false, got {v}")),
            }
        };
        for k in map.keys() {
            let known: &[&str] = match &o {
                Optimizer::Adam { .. } => &["betas", "eps", "bias_correction"],
                Optimizer::AdamW { .. } => &["betas", "eps", "weight_decay", "bias_correction"],
                Optimizer::Sgd { .. } => &["momentum", "weight_decay", "dampening", "nesterov"],
            };
            if !known.contains(&k.as_str()) {
                return Err(format!(
                    "{k}: not a setting of {name} ({})",
                    known.join(", ")
                ));
            }
        }
        let betas = match map.get("betas") {
            None => None,
            Some(serde_json::Value::Array(v)) if v.len() == 2 => {
                match (v[0].as_f64(), v[1].as_f64()) {
                    (Some(a), Some(b)) => Some((a, b)),
                    _ => return Err("betas: expected two numbers".into()),
                }
            }
            Some(v) => return Err(format!("betas: expected two numbers, got {v}")),
        };
        match &mut o {
            Optimizer::Adam {
                betas: bt,
                eps,
                bias_correction,
            } => {
                *bt = betas.unwrap_or(*bt);
                *eps = f("eps")?.unwrap_or(*eps);
                *bias_correction = b("bias_correction")?.unwrap_or(*bias_correction);
            }
            Optimizer::AdamW {
                betas: bt,
                eps,
                weight_decay,
                bias_correction,
            } => {
                *bt = betas.unwrap_or(*bt);
                *eps = f("eps")?.unwrap_or(*eps);
                *weight_decay = f("weight_decay")?.unwrap_or(*weight_decay);
                *bias_correction = b("bias_correction")?.unwrap_or(*bias_correction);
            }
            Optimizer::Sgd {
                momentum,
                weight_decay,
                dampening,
                nesterov,
            } => {
                *momentum = f("momentum")?.unwrap_or(*momentum);
                *weight_decay = f("weight_decay")?.unwrap_or(*weight_decay);
                *dampening = f("dampening")?.unwrap_or(*dampening);
                *nesterov = b("nesterov")?.unwrap_or(*nesterov);
            }
        }
        if let Optimizer::Sgd {
            momentum,
            dampening,
            nesterov: true,
            ..
        } = o
        {
            if momentum <= 0.0 || dampening != 0.0 {
                return Err("nesterov needs a positive momentum and zero dampening".into());
            }
        }
        Ok(o)
    }
}

/// A learning rate per optimizer step: mlx.optimizers' schedules
/// (`cosine_decay`, `linear_schedule`, `exponential_decay`, `step_decay`),
/// optionally after a linear warmup (mlx-lm's `lr_schedule`).
#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    Constant(f32),
    CosineDecay {
        init: f32,
        steps: u64,
        end: f32,
    },
    Linear {
        init: f32,
        end: f32,
        steps: u64,
    },
    Exponential {
        init: f32,
        rate: f32,
    },
    Step {
        init: f32,
        rate: f32,
        every: u64,
    },
    Warmup {
        init: f32,
        steps: u64,
        then: Box<Schedule>,
    },
}

impl Schedule {
    /// The rate at optimizer step `step` (0 for the first update).
    pub fn at(&self, step: u64) -> f32 {
        match self {
            Schedule::Constant(lr) => *lr,
            Schedule::CosineDecay { init, steps, end } => {
                let s = step.min(*steps) as f64;
                let decay = 0.5 * (1.0 + (std::f64::consts::PI / *steps as f64 * s).cos());
                (*end as f64 + decay * (*init as f64 - *end as f64)) as f32
            }
            Schedule::Linear { init, end, steps } => {
                let s = step.min(*steps) as f32;
                s * ((end - init) / *steps as f32) + init
            }
            Schedule::Exponential { init, rate } => init * rate.powf(step as f32),
            Schedule::Step { init, rate, every } => init * rate.powf((step / every) as f32),
            Schedule::Warmup { init, steps, then } => {
                // join_schedules([linear(init, peak, steps), then], [steps + 1])
                let boundary = steps + 1;
                if step < boundary {
                    let peak = then.at(0);
                    let s = step.min(*steps) as f32;
                    s * ((peak - init) / *steps as f32) + init
                } else {
                    then.at(step - boundary)
                }
            }
        }
    }

    /// mlx-lm's `lr_schedule` object: `{name, arguments, warmup,
    /// warmup_init}`.
    pub fn from_json(v: &serde_json::Value) -> std::result::Result<Schedule, String> {
        let name = v
            .get("name")
            .and_then(|n| n.as_str())
            .ok_or("name: missing")?;
        let args: Vec<f64> = v
            .get("arguments")
            .and_then(|a| a.as_array())
            .ok_or("arguments: missing (a list of numbers)")?
            .iter()
            .map(|x| x.as_f64().ok_or(format!("arguments: {x} is not a number")))
            .collect::<std::result::Result<_, _>>()?;
        let arg = |i: usize| {
            args.get(i)
                .copied()
                .ok_or(format!("arguments: {name} needs at least {} values", i + 1))
        };
        let steps = |x: f64| -> std::result::Result<u64, String> {
            if x >= 1.0 {
                Ok(x as u64)
            } else {
                Err(format!("{name}: steps must be at least 1, got {x}"))
            }
        };
        let base = match name {
            "cosine_decay" => Schedule::CosineDecay {
                init: arg(0)? as f32,
                steps: steps(arg(1)?)?,
                end: args.get(2).copied().unwrap_or(0.0) as f32,
            },
            "linear_schedule" => Schedule::Linear {
                init: arg(0)? as f32,
                end: arg(1)? as f32,
                steps: steps(arg(2)?)?,
            },
            "exponential_decay" => Schedule::Exponential {
                init: arg(0)? as f32,
                rate: arg(1)? as f32,
            },
            "step_decay" => Schedule::Step {
                init: arg(0)? as f32,
                rate: arg(1)? as f32,
                every: steps(arg(2)?)?,
            },
            other => return Err(format!("name: '{other}' is not a schedule (cosine_decay, linear_schedule, exponential_decay, step_decay)")),
        };
        match v.get("warmup").and_then(|w| w.as_u64()).unwrap_or(0) {
            0 => Ok(base),
            w => Ok(Schedule::Warmup {
                init: v.get("warmup_init").and_then(|x| x.as_f64()).unwrap_or(0.0) as f32,
                steps: w,
                then: Box::new(base),
            }),
        }
    }
}

fn mlx(e: Error) -> Exception {
    Exception::custom(e.to_string())
}

/// mlx-lm's `default_loss`: the masked mean cross-entropy of next tokens
/// and the number of targets counted.
pub fn batch_loss(model: &Model, batch: &Batch) -> std::result::Result<(Array, Array), Exception> {
    let t = batch.tokens.shape()[1];
    let inputs = batch.tokens.index((.., ..t - 1));
    let targets = batch.tokens.index((.., 1..));
    let logits = model.forward(&inputs, None).map_err(mlx)?;
    let steps = ops::arange::<_, i32>(1, t, None)?;
    let offsets = batch.lengths.index((.., 0..1));
    let lengths = batch.lengths.index((.., 1..));
    let mask = ops::logical_and(&steps.ge(&offsets)?, &steps.le(&lengths)?)?;
    let lse = logits.logsumexp_axis(-1, false)?;
    let score = logits
        .take_along_axis(&targets.expand_dims(-1)?, -1)?
        .squeeze_axes(&[-1])?;
    let ce = ops::multiply(&ops::subtract(&lse, &score)?, &mask)?;
    let ntoks = mask.sum(None)?;
    let loss = ops::divide(&ce.as_dtype(Dtype::Float32)?.sum(None)?, &ntoks)?;
    Ok((loss, ntoks))
}

use mlx_rs::ops::indexing::IndexOp;

/// Optimizer state of one array.
#[derive(Debug, Clone)]
struct Moments {
    m: Option<Array>,
    v: Option<Array>,
}

/// The optimizer over an adapter's arrays, and the gradients accumulated
/// between updates.
#[derive(Debug)]
pub struct Trainer<'a> {
    model: &'a Model,
    adapter: &'a Attached,
    optimizer: Optimizer,
    schedule: Schedule,
    /// Optimizer updates made.
    pub updates: u64,
    /// Steps taken (updates times the accumulation).
    pub steps: u64,
    accumulate: u64,
    pending: Option<Vec<Array>>,
    state: Vec<Moments>,
}

fn scalar(x: f32) -> Array {
    Array::from_f32(x)
}

/// A Python float in an expression with a float32 array: computed in
/// double precision, then rounded once.
fn py(x: f64) -> Array {
    Array::from_f32(x as f32)
}

impl<'a> Trainer<'a> {
    /// A trainer of the adapter attached to `model`.
    pub fn new(
        model: &'a Model,
        optimizer: Optimizer,
        schedule: Schedule,
        grad_accumulation: u64,
    ) -> Result<Trainer<'a>> {
        let adapter = model
            .adapter
            .as_ref()
            .ok_or_else(|| Error::Usage("the model has no adapter to train".into()))?;
        if grad_accumulation < 1 {
            return Err(Error::Usage(
                "grad_accumulation_steps must be at least 1".into(),
            ));
        }
        let n = adapter.params().len();
        Ok(Trainer {
            model,
            adapter,
            optimizer,
            schedule,
            updates: 0,
            steps: 0,
            accumulate: grad_accumulation,
            pending: None,
            state: vec![Moments { m: None, v: None }; n],
        })
    }

    /// The learning rate of the next update.
    pub fn learning_rate(&self) -> f32 {
        self.schedule.at(self.updates)
    }

    /// The loss of a batch without gradients.
    pub fn loss(&self, batch: &Batch) -> Result<(f32, f32)> {
        self.adapter.set_training(false);
        let (l, n) = batch_loss(self.model, batch)?;
        mlx_rs::transforms::eval([&l, &n])?;
        Ok((item(&l)?, item(&n)?))
    }

    /// One training step: loss and gradient of `batch`, accumulated; every
    /// `grad_accumulation` steps the optimizer updates the adapter. Returns
    /// the batch's loss and target count.
    pub fn step(&mut self, batch: &Batch) -> Result<(f32, f32)> {
        let params = self.adapter.params();
        let argnums: Vec<i32> = (0..params.len() as i32).collect();
        let adapter = self.adapter;
        let model = self.model;
        adapter.set_training(true);
        let f = |p: &[Array]| -> std::result::Result<Vec<Array>, Exception> {
            adapter.set_params(p);
            let (l, n) =
                lmspec_engine::cpu_kernels::while_differentiating(|| batch_loss(model, batch))?;
            Ok(vec![l, n])
        };
        let result = {
            let mut vg = mlx_rs::transforms::value_and_grad_with_argnums(f, &argnums[..]);
            vg(&params)
        };
        // The slots held the traced arrays while differentiating.
        adapter.set_params(&params);
        adapter.set_training(false);
        let (values, grads) = result?;
        let mut grads = match self.pending.take() {
            Some(prev) => grads
                .iter()
                .zip(&prev)
                .map(|(g, p)| ops::add(g, p))
                .collect::<std::result::Result<Vec<_>, _>>()?,
            None => grads,
        };
        self.steps += 1;
        if self.steps % self.accumulate == 0 {
            if self.accumulate > 1 {
                let k = scalar(self.accumulate as f32);
                grads = grads
                    .iter()
                    .map(|g| ops::divide(g, &k))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
            }
            let updated = self.update(&params, &grads)?;
            adapter.set_params(&updated);
            let mut all: Vec<&Array> = updated.iter().collect();
            for s in &self.state {
                all.extend(s.m.iter().chain(s.v.iter()));
            }
            all.extend(values.iter());
            mlx_rs::transforms::eval(all)?;
        } else {
            mlx_rs::transforms::eval(grads.iter().chain(values.iter()))?;
            self.pending = Some(grads);
        }
        let loss = item(&values[0])?;
        let ntoks = item(&values[1])?;
        Ok((loss, ntoks))
    }

    fn update(&mut self, params: &[Array], grads: &[Array]) -> Result<Vec<Array>> {
        let lr = self.schedule.at(self.updates);
        self.updates += 1;
        let step = self.updates;
        let mut out = Vec::with_capacity(params.len());
        for ((p, g), st) in params.iter().zip(grads).zip(self.state.iter_mut()) {
            out.push(apply(&self.optimizer, lr, step, p, g, st)?);
        }
        Ok(out)
    }
}

/// One array's update (mlx.optimizers' `apply_single`).
fn apply(
    opt: &Optimizer,
    lr: f32,
    step: u64,
    p: &Array,
    g: &Array,
    st: &mut Moments,
) -> std::result::Result<Array, Exception> {
    let zeros = || ops::zeros_like(p);
    let lr_a = scalar(lr).as_dtype(g.dtype())?;
    let adam = |p: &Array,
                st: &mut Moments,
                (b1, b2): (f64, f64),
                eps: f64,
                bias_correction: bool|
     -> std::result::Result<Array, Exception> {
        let m0 = match st.m.take() {
            Some(m) => m,
            None => zeros()?,
        };
        let v0 = match st.v.take() {
            Some(v) => v,
            None => zeros()?,
        };
        let m = ops::add(
            &ops::multiply(py(b1), &m0)?,
            &ops::multiply(py(1.0 - b1), g)?,
        )?;
        let v = ops::add(
            &ops::multiply(py(b2), &v0)?,
            &ops::multiply(py(1.0 - b2), &g.square()?)?,
        )?;
        st.m = Some(m.clone());
        st.v = Some(v.clone());
        if bias_correction {
            let c1 = ops::divide(&lr_a, py(1.0 - b1.powi(step as i32)))?;
            let c2 = py(1.0 - b2.powi(step as i32))
                .rsqrt()?
                .as_dtype(g.dtype())?;
            let num = ops::multiply(&c1, &m)?;
            let den = ops::add(&ops::multiply(&v.sqrt()?, &c2)?, py(eps))?;
            ops::subtract(p, &ops::divide(&num, &den)?)
        } else {
            let upd = ops::divide(&ops::multiply(&lr_a, &m)?, &ops::add(&v.sqrt()?, py(eps))?)?;
            ops::subtract(p, &upd)
        }
    };
    match *opt {
        Optimizer::Adam {
            betas,
            eps,
            bias_correction,
        } => adam(p, st, betas, eps, bias_correction),
        Optimizer::AdamW {
            betas,
            eps,
            weight_decay,
            bias_correction,
        } => {
            let decayed = ops::multiply(
                p,
                &ops::subtract(scalar(1.0), &ops::multiply(&lr_a, py(weight_decay))?)?,
            )?;
            adam(&decayed, st, betas, eps, bias_correction)
        }
        Optimizer::Sgd {
            momentum,
            weight_decay,
            dampening,
            nesterov,
        } => {
            let g = if weight_decay != 0.0 {
                ops::add(g, &ops::multiply(py(weight_decay), p)?)?
            } else {
                g.clone()
            };
            if momentum <= 0.0 {
                return ops::subtract(p, &ops::multiply(&lr_a, &g)?);
            }
            let v0 = match st.v.take() {
                Some(v) => v,
                None => zeros()?,
            };
            let mut v = ops::multiply(py(momentum), &v0)?;
            v = if dampening > 0.0 {
                ops::add(&v, &ops::multiply(py(1.0 - dampening), &g)?)?
            } else {
                ops::add(&v, &g)?
            };
            let upd = if nesterov {
                ops::add(&g, &ops::multiply(py(momentum), &v)?)?
            } else {
                v.clone()
            };
            st.v = Some(v);
            ops::subtract(p, &ops::multiply(&lr_a, &upd)?)
        }
    }
}

/// The value of a one-element array as f32.
pub fn item(a: &Array) -> Result<f32> {
    a.as_dtype(Dtype::Float32)?
        .try_item_exact::<f32>()
        .map_err(|e| Error::Usage(format!("reading a scalar: {e}")))
}
