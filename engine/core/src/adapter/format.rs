//! Adapter files: mlx-lm's and PEFT's, read into mlx-lm's layout; written
//! in mlx-lm's.
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use mlx_rs::Array;
use serde_json::{json, Value};

use super::{Adapter, AdapterConfig, AdapterKind, ModuleTensors};
use crate::error::{read_to_string, Error, Result};

/// The config file of an adapter folder (both formats).
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// mlx-lm's weights file.
pub const ADAPTER_WEIGHTS: &str = "adapters.safetensors";
/// PEFT's weights file.
const PEFT_WEIGHTS: &str = "adapter_model.safetensors";

/// The files of an adapter folder.
#[derive(Debug, Clone)]
pub struct AdapterFiles {
    pub config: PathBuf,
    pub weights: PathBuf,
}

fn config_err(file: &Path, key: &str, msg: impl Into<String>) -> Error {
    Error::Config {
        file: file.to_path_buf(),
        key: key.to_string(),
        msg: msg.into(),
    }
}

fn number(file: &Path, obj: &Value, key: &str, path: &str) -> Result<Option<f64>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| config_err(file, path, format!("expected a number, got {v}"))),
    }
}

fn string_list(file: &Path, v: Option<&Value>, path: &str) -> Result<Option<Vec<String>>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| config_err(file, path, format!("expected strings, got {s}")))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some),
        Some(Value::String(s)) => Ok(Some(vec![s.clone()])),
        Some(v) => Err(config_err(file, path, format!("expected a list, got {v}"))),
    }
}

fn positive_rank(file: &Path, key: &str, r: Option<f64>) -> Result<i32> {
    match r {
        Some(r) if r >= 1.0 && r.fract() == 0.0 && r <= 65536.0 => Ok(r as i32),
        Some(r) => Err(config_err(
            file,
            key,
            format!("{r} is not a positive whole rank"),
        )),
        None => Err(config_err(file, key, "missing")),
    }
}

/// Reads an adapter folder: mlx-lm's files, else PEFT's.
pub fn load(dir: &Path) -> Result<Adapter> {
    let config_file = dir.join(ADAPTER_CONFIG);
    if !dir.is_dir() {
        return Err(Error::Usage(format!(
            "adapter {}: not a folder (it should hold {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})",
            dir.display()
        )));
    }
    let text = read_to_string(&config_file)?;
    let json: Value = serde_json::from_str(&text)
        .map_err(|e| config_err(&config_file, "<document>", format!("invalid JSON: {e}")))?;
    if !json.is_object() {
        return Err(config_err(&config_file, "<document>", "expected an object"));
    }
    if json.get("peft_type").is_some() || json.get("lora_alpha").is_some() {
        load_peft(dir, &config_file, &json)
    } else {
        load_mlx(dir, &config_file, &json)
    }
}

fn load_mlx(dir: &Path, file: &Path, json: &Value) -> Result<Adapter> {
    let kind = match json.get("fine_tune_type") {
        None | Some(Value::Null) => AdapterKind::Lora,
        Some(Value::String(s)) => AdapterKind::parse(s).ok_or_else(|| {
            config_err(
                file,
                "fine_tune_type",
                format!("'{s}' is not an adapter type (lora or dora; full fine-tunes are model folders)"),
            )
        })?,
        Some(v) => return Err(config_err(file, "fine_tune_type", format!("expected a string, got {v}"))),
    };
    let lp = json
        .get("lora_parameters")
        .filter(|v| v.is_object())
        .ok_or_else(|| {
            config_err(
                file,
                "lora_parameters",
                "missing (an object with rank and scale)",
            )
        })?;
    let rank = positive_rank(
        file,
        "lora_parameters.rank",
        number(file, lp, "rank", "lora_parameters.rank")?,
    )?;
    let scale = number(file, lp, "scale", "lora_parameters.scale")?.ok_or_else(|| {
        let hint = if lp.get("alpha").is_some() {
            " (mlx-lm's config uses 'scale', not 'alpha')"
        } else {
            ""
        };
        config_err(file, "lora_parameters.scale", format!("missing{hint}"))
    })?;
    let dropout = number(file, lp, "dropout", "lora_parameters.dropout")?.unwrap_or(0.0);
    let num_layers = number(file, json, "num_layers", "num_layers")?.unwrap_or(16.0) as i64;
    let keys = string_list(file, lp.get("keys"), "lora_parameters.keys")?;
    let config = AdapterConfig {
        kind,
        rank,
        scale: scale as f32,
        dropout: dropout as f32,
        num_layers,
        keys,
    };
    let weights = dir.join(ADAPTER_WEIGHTS);
    let mut modules: IndexMap<String, ModuleTensors> = IndexMap::new();
    let mut stray = Vec::new();
    let mut parts: IndexMap<String, [Option<Array>; 3]> = IndexMap::new();
    for (name, a) in crate::weights::load_safetensors_file(&weights)? {
        let Some((module, leaf)) = name.rsplit_once('.') else {
            stray.push(name);
            continue;
        };
        let at = match leaf {
            "lora_a" => 0,
            "lora_b" => 1,
            "m" => 2,
            _ => {
                stray.push(name);
                continue;
            }
        };
        parts.entry(module.to_string()).or_default()[at] = Some(a);
    }
    if !stray.is_empty() {
        return Err(Error::Weights {
            file: weights,
            msg: format!(
                "not adapter tensors (expected <module>.lora_a, .lora_b or .m): {}",
                stray.join(", ")
            ),
        });
    }
    for (module, [a, b, m]) in parts {
        let missing = |what: &str| Error::Weights {
            file: weights.clone(),
            msg: format!("{module}: has no {what}"),
        };
        let a = a.ok_or_else(|| missing("lora_a"))?;
        let b = b.ok_or_else(|| missing("lora_b"))?;
        modules.insert(module, ModuleTensors { a, b, m });
    }
    if modules.is_empty() {
        return Err(Error::Weights {
            file: weights,
            msg: "holds no adapter tensors".into(),
        });
    }
    Ok(Adapter {
        config,
        modules,
        file: weights,
    })
}

fn load_peft(dir: &Path, file: &Path, json: &Value) -> Result<Adapter> {
    let rank = positive_rank(file, "r", number(file, json, "r", "r")?)?;
    let alpha = number(file, json, "lora_alpha", "lora_alpha")?.unwrap_or(rank as f64);
    let rslora = json
        .get("use_rslora")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let scale = if rslora {
        alpha / (rank as f64).sqrt()
    } else {
        alpha / rank as f64
    };
    let dora = json
        .get("use_dora")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let dropout = number(file, json, "lora_dropout", "lora_dropout")?.unwrap_or(0.0);
    let keys = string_list(file, json.get("target_modules"), "target_modules")?;
    let config = AdapterConfig {
        kind: if dora {
            AdapterKind::Dora
        } else {
            AdapterKind::Lora
        },
        rank,
        scale: scale as f32,
        dropout: dropout as f32,
        num_layers: -1,
        keys,
    };
    let weights = dir.join(PEFT_WEIGHTS);
    let mut parts: IndexMap<String, [Option<Array>; 3]> = IndexMap::new();
    let mut stray = Vec::new();
    for (name, t) in crate::weights::load_safetensors_file(&weights)? {
        let base = name.strip_prefix("base_model.model.").unwrap_or(&name);
        let found = [
            (".lora_A.weight", 0),
            (".lora_B.weight", 1),
            (".lora_magnitude_vector", 2),
            (".lora_magnitude_vector.weight", 2),
        ]
        .into_iter()
        .find_map(|(suffix, at)| base.strip_suffix(suffix).map(|m| (m, at)));
        let Some((module, at)) = found else {
            stray.push(name);
            continue;
        };
        // PEFT stores A [r, in] and B [out, r]; mlx-lm's a is [in, r], b [r, out].
        let t = if at < 2 { t.t() } else { t };
        parts.entry(module.to_string()).or_default()[at] = Some(t);
    }
    if !stray.is_empty() {
        return Err(Error::Weights {
            file: weights,
            msg: format!("not LoRA tensors: {}", stray.join(", ")),
        });
    }
    let mut modules = IndexMap::new();
    for (module, [a, b, m]) in parts {
        let missing = |what: &str| Error::Weights {
            file: weights.clone(),
            msg: format!("{module}: has no {what}"),
        };
        let a = a.ok_or_else(|| missing("lora_A.weight"))?;
        let b = b.ok_or_else(|| missing("lora_B.weight"))?;
        modules.insert(module, ModuleTensors { a, b, m });
    }
    if modules.is_empty() {
        return Err(Error::Weights {
            file: weights,
            msg: "holds no LoRA tensors".into(),
        });
    }
    Ok(Adapter {
        config,
        modules,
        file: weights,
    })
}

/// The config mlx-lm reads back (`fine_tune_type`, `num_layers`,
/// `lora_parameters`), plus `extra`'s keys (training settings).
pub fn config_json(config: &AdapterConfig, extra: &Value) -> Value {
    let mut lp = json!({
        "rank": config.rank,
        "scale": config.scale,
        "dropout": config.dropout,
    });
    if let Some(keys) = &config.keys {
        lp["keys"] = json!(keys);
    }
    let mut out = json!({
        "fine_tune_type": config.kind.name(),
        "num_layers": config.num_layers,
        "lora_parameters": lp,
    });
    if let (Some(o), Some(e)) = (out.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            o.entry(k.clone()).or_insert(v.clone());
        }
    }
    out
}

/// Writes `file` through a temporary file beside it, so a failure leaves
/// no partial file behind.
pub(crate) fn write_atomic(
    file: &Path,
    write: impl FnOnce(&Path) -> std::result::Result<(), String>,
) -> Result<()> {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // MLX writes safetensors only to names ending in `.safetensors`.
    let tmp = file.with_file_name(format!(".partial-{name}"));
    let io = |path: &Path, source: std::io::Error| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Err(msg) = write(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(file, std::io::Error::other(msg)));
    }
    std::fs::rename(&tmp, file).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(file, e)
    })
}

/// Writes `adapters.safetensors` and `adapter_config.json` into `dir`
/// (created when missing) in mlx-lm's layout.
pub fn save(
    dir: &Path,
    config: &AdapterConfig,
    modules: &IndexMap<String, ModuleTensors>,
    extra: &Value,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    save_weights(&dir.join(ADAPTER_WEIGHTS), modules)?;
    let text = serde_json::to_string_pretty(&config_json(config, extra))
        .map_err(|e| Error::Usage(e.to_string()))?;
    write_atomic(&dir.join(ADAPTER_CONFIG), |tmp| {
        std::fs::write(tmp, text).map_err(|e| e.to_string())
    })
}

/// Writes the module tensors as mlx-lm names them.
pub fn save_weights(file: &Path, modules: &IndexMap<String, ModuleTensors>) -> Result<()> {
    let mut arrays: Vec<(String, Array)> = Vec::new();
    for (module, t) in modules {
        arrays.push((format!("{module}.lora_a"), t.a.clone()));
        arrays.push((format!("{module}.lora_b"), t.b.clone()));
        if let Some(m) = &t.m {
            arrays.push((format!("{module}.m"), m.clone()));
        }
    }
    write_atomic(file, |tmp| {
        Array::save_safetensors(arrays.iter().map(|(k, v)| (k.as_str(), v)), None, tmp)
            .map_err(|e| e.to_string())
    })
}
