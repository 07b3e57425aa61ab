//! Fusing an adapter into its base: a model folder mlx-lm loads, with each
//! adapted weight replaced by mlx-lm's fused weight (LoRA:
//! `W + (scale * bᵀ) @ aᵀ`; DoRA: that, its rows rescaled to `m`),
//! re-quantized with the base's group size and bits when the base was
//! quantized. Every other tensor and file is copied as it was.
use std::path::Path;

use indexmap::IndexMap;
use mlx_rs::{ops, Array, Dtype};

use super::format::write_atomic;
use super::{Attached, ModuleTensors};
use crate::error::{Error, Result};
use crate::weights;

/// The fused weight of one module (dense, the base's dtype); stacked
/// experts (`a` `[E, r, in]`, `b` `[E, out, r]`) fuse as `W + (scale · b) @ a`.
pub fn fused_weight(
    base: &Array,
    t: &ModuleTensors,
    scale: f32,
) -> std::result::Result<Array, mlx_rs::error::Exception> {
    let s = Array::from_f32(scale);
    let delta = if t.a.ndim() == 3 {
        ops::matmul(&ops::multiply(&s, &t.b)?, &t.a)?
    } else {
        ops::matmul(&ops::multiply(&s, t.b.t())?, t.a.t())?
    }
    .as_dtype(base.dtype())?;
    let w = ops::add(base, &delta)?;
    match &t.m {
        None => Ok(w),
        Some(m) => {
            let norm = w.square()?.sum_axis(1, false)?.sqrt()?;
            let s = ops::divide(m, &norm)?.reshape(&[-1, 1])?;
            ops::multiply(&s, &w)
        }
    }
}

/// Writes the base model folder `base` with `adapter` fused in to `out`.
/// `base` must be a safetensors model folder (mlx-lm does not read GGUF).
/// With `dequantize` (mlx-lm's `fuse --dequantize`), every quantized
/// weight is written dense and `config.json` loses its quantization.
pub fn fuse_into(base: &Path, adapter: &Attached, out: &Path, dequantize: bool) -> Result<()> {
    if crate::model::is_gguf(base) {
        return Err(Error::Usage(format!(
            "fuse: {} is a GGUF file; fusing writes an mlx-lm model folder and needs a safetensors model folder as the base",
            base.display()
        )));
    }
    let ckpt = weights::load_safetensors_dir(base, None)?;
    let mut tensors: IndexMap<String, Array> = ckpt.tensors;
    for slot in &adapter.slots {
        let t = slot.tensors();
        let name = format!("{}.weight", slot.module);
        let w = tensors.get(&name).ok_or_else(|| Error::Weights {
            file: ckpt.file.clone(),
            msg: format!("fuse: no tensor '{name}' in the base"),
        })?;
        if tensors.contains_key(&format!("{}.signs", slot.module)) {
            return Err(Error::Weights {
                file: ckpt.file.clone(),
                msg: format!(
                    "fuse: '{}' is stored rotated (it has Hadamard signs); fusing an adapter into a rotated weight is not supported",
                    slot.module
                ),
            });
        }
        let scales = tensors.get(&format!("{}.scales", slot.module));
        let biases = tensors.get(&format!("{}.biases", slot.module));
        let fail = |e: mlx_rs::error::Exception| Error::Weights {
            file: ckpt.file.clone(),
            msg: format!("fuse {}: {}", slot.module, crate::error::mlx_message(&e)),
        };
        match (scales, biases) {
            (Some(s), Some(b)) => {
                let inp = if t.a.ndim() == 3 {
                    t.a.shape()[2]
                } else {
                    t.a.shape()[0]
                };
                let last = |a: &Array| a.shape().last().copied().unwrap_or(1).max(1);
                let group = inp / last(s);
                let bits = last(w) * 32 / inp.max(1);
                let dense = ops::dequantize(w, s, b, group, bits).map_err(fail)?;
                let fused = fused_weight(&dense, &t, slot.scale).map_err(fail)?;
                if dequantize {
                    tensors.shift_remove(&format!("{}.scales", slot.module));
                    tensors.shift_remove(&format!("{}.biases", slot.module));
                    tensors.insert(name, fused);
                } else {
                    let (qw, qs, qb) = ops::quantize(&fused, group, bits).map_err(fail)?;
                    tensors.insert(name, qw);
                    tensors.insert(format!("{}.scales", slot.module), qs);
                    tensors.insert(format!("{}.biases", slot.module), qb);
                }
            }
            _ => {
                let fused = fused_weight(w, &t, slot.scale).map_err(fail)?;
                tensors.insert(name, fused);
            }
        }
    }
    let (config_file, mut config) = crate::model::read_config(base)?;
    if dequantize {
        let quant = weights::Quantization::from_config(&config, &config_file)?;
        let quantized: Vec<String> = tensors
            .keys()
            .filter_map(|k| k.strip_suffix(".scales").map(str::to_string))
            .collect();
        for module in quantized {
            let w = format!("{module}.weight");
            let (Some(qw), Some(s), Some(b)) = (
                tensors.get(&w),
                tensors.get(&format!("{module}.scales")),
                tensors.get(&format!("{module}.biases")),
            ) else {
                continue;
            };
            let (group, bits) = quant.for_module(&module).ok_or_else(|| Error::Config {
                file: config_file.clone(),
                key: "quantization".into(),
                msg: format!("{module} is quantized in the weights but not in the config"),
            })?;
            let dense = ops::dequantize(qw, s, b, group, bits)?;
            tensors.insert(w, dense);
            tensors.shift_remove(&format!("{module}.scales"));
            tensors.shift_remove(&format!("{module}.biases"));
        }
        if let Some(o) = config.as_object_mut() {
            o.remove("quantization");
            o.remove("quantization_config");
        }
    }
    std::fs::create_dir_all(out).map_err(|source| Error::Io {
        path: out.to_path_buf(),
        source,
    })?;
    // Everything but the weights comes along (config, tokenizer, template).
    let entries = std::fs::read_dir(base).map_err(|source| Error::Io {
        path: base.to_path_buf(),
        source,
    })?;
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        let weights_file = name.ends_with(".safetensors") || name == "model.safetensors.index.json";
        if p.is_file() && !weights_file && name != "config.json" {
            let to = out.join(&name);
            write_atomic(&to, |tmp| {
                std::fs::copy(&p, tmp)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })?;
        }
    }
    let text = serde_json::to_string_pretty(&config).map_err(|e| Error::Usage(e.to_string()))?;
    write_atomic(&out.join("config.json"), |tmp| {
        std::fs::write(tmp, text).map_err(|e| e.to_string())
    })?;
    for a in tensors.values() {
        if a.dtype() == Dtype::Float64 {
            return Err(Error::Usage(
                "fuse: float64 tensors are not supported".into(),
            ));
        }
    }
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "mlx".to_string());
    write_atomic(&out.join("model.safetensors"), |tmp| {
        Array::save_safetensors(tensors.iter().map(|(k, v)| (k.as_str(), v)), &meta, tmp)
            .map_err(|e| e.to_string())
    })
}
