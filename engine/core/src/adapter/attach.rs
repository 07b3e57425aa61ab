//! Adapters attached to a model's node weights: a loaded one checked
//! against them, a new one initialised as mlx-lm does.
use std::sync::Arc;

use mlx_rs::Array;

use super::{
    format, select, Adapter, AdapterKind, AdapterSlot, AdapterSource, Attached, ModuleTensors,
    NodeSlots, Target,
};
use crate::error::{Error, Result};
use crate::weights::Param;

/// The rows' L2 norms of a linear weight in float32 (DoRA's initial `m`).
pub fn row_norms(p: &Param) -> std::result::Result<Array, mlx_rs::error::Exception> {
    let w = p.dense()?.as_dtype(mlx_rs::Dtype::Float32)?;
    w.square()?.sum_axis(1, false)?.sqrt()
}

/// Builds the slots of `source` for a model whose targets and node weights
/// are given: a loaded adapter is checked against the nodes (every module
/// found, shapes and rank as configured); a new one is initialised.
pub fn attach(
    source: &AdapterSource,
    targets: &[Target],
    weights: &[Vec<Param>],
) -> Result<(Attached, NodeSlots)> {
    match source {
        AdapterSource::Dir(dir) => {
            let adapter = format::load(dir)?;
            attach_loaded(&adapter, targets)
        }
        AdapterSource::New { config, seed } => {
            let chosen = select(targets, config)?;
            // Draws follow MLX's global key sequence after `seed(seed)`:
            // each draw splits the key and uses the second half.
            let mut key = mlx_rs::random::key(*seed)?;
            let mut slots = Vec::new();
            let mut nodes = Vec::new();
            for t in &chosen {
                let (node, r) = t.uses[0];
                let p = &weights[node][r];
                let r = config.rank;
                let (a_shape, b_shape, inp) = match t.shape[..] {
                    [out, inp] => (vec![inp as i32, r], vec![r, out as i32], inp),
                    [e, out, inp] => (
                        vec![e as i32, r, inp as i32],
                        vec![e as i32, out as i32, r],
                        inp,
                    ),
                    _ => return Err(Error::Usage(format!("{}: not a linear weight", t.module))),
                };
                if t.shape.len() == 3 && config.kind == AdapterKind::Dora {
                    return Err(Error::Usage(format!(
                        "{}: DoRA on stacked experts is not supported (nor by mlx-lm); use lora or --keys",
                        t.module
                    )));
                }
                let bound = 1.0 / (inp as f32).sqrt();
                let (next, k) = mlx_rs::random::split(&key, 2)?;
                key = next;
                let a = mlx_rs::random::uniform::<f32, f32>(-bound, bound, &a_shape[..], &k)?;
                let b = mlx_rs::ops::zeros::<f32>(&b_shape)?;
                let m = match config.kind {
                    AdapterKind::Dora => Some(row_norms(p)?),
                    AdapterKind::Lora => None,
                };
                let tensors = ModuleTensors { a, b, m };
                let slot = Arc::new(AdapterSlot::new(
                    t.module.clone(),
                    t.path.clone(),
                    config,
                    tensors,
                ));
                nodes.extend(t.uses.iter().map(|&(k, r)| (k, r, slot.clone())));
                slots.push(slot);
            }
            let attached = Attached {
                config: config.clone(),
                slots,
            };
            mlx_rs::transforms::eval(attached.params().iter())?;
            Ok((attached, nodes))
        }
    }
}

/// Checks a loaded adapter against the model's nodes and builds its slots.
pub fn attach_loaded(adapter: &Adapter, targets: &[Target]) -> Result<(Attached, NodeSlots)> {
    let file = &adapter.file;
    let cfg = &adapter.config;
    let unmatched: Vec<&str> = adapter
        .modules
        .keys()
        .filter(|m| !targets.iter().any(|t| &t.module == *m))
        .map(String::as_str)
        .collect();
    if !unmatched.is_empty() {
        let known: Vec<&str> = targets.iter().take(8).map(|t| t.module.as_str()).collect();
        return Err(Error::Weights {
            file: file.clone(),
            msg: format!(
                "adapter modules match no linear layer of the model: {} (the model's linear layers are named like {}; a tensor the spec's rules split into several layers takes no adapter)",
                unmatched.join(", "),
                known.join(", ")
            ),
        });
    }
    let mut slots = Vec::new();
    let mut nodes = Vec::new();
    for t in targets {
        let Some(m) = adapter.modules.get(&t.module) else {
            continue;
        };
        let bad = |what: &str, msg: String| Error::Weights {
            file: file.clone(),
            msg: format!("{}.{what}: {msg}", t.module),
        };
        let (sa, sb) = (m.a.shape(), m.b.shape());
        let r = cfg.rank;
        let (want_a, want_b, rank_at) = match t.shape[..] {
            [out, inp] => (vec![inp as i32, r], vec![r, out as i32], 1),
            [e, out, inp] => (
                vec![e as i32, r, inp as i32],
                vec![e as i32, out as i32, r],
                1,
            ),
            _ => return Err(bad("lora_a", "the layer is not a linear weight".into())),
        };
        if sa.len() != want_a.len()
            || sa
                .iter()
                .zip(&want_a)
                .enumerate()
                .any(|(k, (x, y))| k != rank_at && x != y)
        {
            return Err(bad(
                "lora_a",
                format!(
                    "shape {sa:?}, expected {want_a:?} for the layer's weight {:?}",
                    t.shape
                ),
            ));
        }
        if sa[rank_at] != r {
            return Err(bad(
                "lora_a",
                format!(
                    "rank {} does not match lora_parameters.rank {} of the adapter config",
                    sa[rank_at], r
                ),
            ));
        }
        if sb != want_b.as_slice() {
            return Err(bad("lora_b", format!("shape {sb:?}, expected {want_b:?}")));
        }
        let out = t.shape[t.shape.len() - 2] as i32;
        if t.shape.len() == 3 && cfg.kind == AdapterKind::Dora {
            return Err(bad("m", "DoRA on stacked experts is not supported".into()));
        }
        match (&m.m, cfg.kind) {
            (Some(mm), AdapterKind::Dora) if mm.shape() != [out] => {
                return Err(bad(
                    "m",
                    format!("shape {:?}, expected [{out}]", mm.shape()),
                ))
            }
            (None, AdapterKind::Dora) => {
                return Err(bad(
                    "m",
                    "missing (a DoRA adapter needs the magnitude)".into(),
                ))
            }
            (Some(_), AdapterKind::Lora) => {
                return Err(bad(
                    "m",
                    "present, but the adapter config says fine_tune_type lora".into(),
                ))
            }
            _ => {}
        }
        let slot = Arc::new(AdapterSlot::new(
            t.module.clone(),
            t.path.clone(),
            cfg,
            m.clone(),
        ));
        nodes.extend(t.uses.iter().map(|&(k, r)| (k, r, slot.clone())));
        slots.push(slot);
    }
    Ok((
        Attached {
            config: cfg.clone(),
            slots,
        },
        nodes,
    ))
}
