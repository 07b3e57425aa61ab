//! `port coverage`: which of mlx-lm's model types a spec claims, and whether
//! their golden cases pass. mlx-lm's types are read from the installed
//! package: every `models/<type>.py` that defines `class Model`, plus the
//! aliases of `MODEL_REMAPPING` in `utils.py`.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use lmspec_engine::{LoadOptions, SpecLibrary};

use crate::golden::{self, Golden};

/// The installed mlx-lm package folder under a virtualenv.
pub fn find_mlx_lm(venv: &Path) -> Option<PathBuf> {
    let lib = venv.join("lib");
    std::fs::read_dir(lib)
        .ok()?
        .flatten()
        .map(|e| e.path().join("site-packages/mlx_lm"))
        .find(|p| p.is_dir())
}

/// Model types mlx-lm implements, with the module serving each (aliases
/// point at another module).
pub fn mlx_lm_model_types(mlx_lm: &Path) -> Result<BTreeMap<String, String>> {
    let models = mlx_lm.join("models");
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(&models).with_context(|| models.display().to_string())? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "py") {
            let text = std::fs::read_to_string(&path)?;
            if text.lines().any(|l| l.starts_with("class Model(")) {
                let name = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                out.insert(name.clone(), name);
            }
        }
    }
    let utils = std::fs::read_to_string(mlx_lm.join("utils.py")).context("mlx_lm/utils.py")?;
    if let Some(start) = utils.find("MODEL_REMAPPING = {") {
        let body = &utils[start..];
        let body = &body[..body.find('}').unwrap_or(body.len())];
        for line in body.lines().skip(1) {
            let quoted: Vec<&str> = line.split('"').skip(1).step_by(2).collect();
            if let [from, to, ..] = quoted[..] {
                out.insert(from.to_string(), to.to_string());
            }
        }
    }
    Ok(out)
}

/// The config keys an mlx-lm model module reads: the fields of its
/// `ModelArgs` dataclass (`BaseModelArgs.from_dict` passes exactly those).
pub fn reference_keys(module_source: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in module_source.lines() {
        if line.starts_with("class ModelArgs(") || line.starts_with("class ModelArgs:") {
            inside = true;
            continue;
        }
        if !inside || line.trim().is_empty() {
            continue;
        }
        if !line.starts_with("    ") {
            break;
        }
        // A field: four spaces, a name, a colon (not a method or decorator).
        let field = line.strip_prefix("    ").unwrap_or(line);
        if let Some((name, _)) = field.split_once(':') {
            if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                out.push(name.to_string());
            }
        }
    }
    out
}

/// Keys every model reads through the engine rather than its spec.
const ENGINE_KEYS: [&str; 3] = ["model_type", "quantization", "quantization_config"];

/// Keys specs read for the engine itself, not for the reference's math:
/// the context length (where generation stops) and GGUF numerics.
const ENGINE_ONLY_KEYS: [&str; 2] = ["max_position_embeddings", "llama_cpp_gguf"];

/// The reference keys a spec neither reads nor declares (`config_keys`).
pub fn undeclared_keys(spec: &lmspec_spec::Spec, reference: &[String]) -> Vec<String> {
    let read = spec.checkpoint_keys();
    reference
        .iter()
        .filter(|k| {
            !read.contains(k.as_str())
                && !spec.only_keys.contains_key(k.as_str())
                && !spec.ignored_keys.contains_key(k.as_str())
                && !ENGINE_KEYS.contains(&k.as_str())
        })
        .cloned()
        .collect()
}

/// Config keys a spec reads that the reference does not: a checkpoint
/// whose config sets one may be read differently by the two.
pub fn extra_keys(spec: &lmspec_spec::Spec, reference: &[String]) -> Vec<String> {
    spec.checkpoint_keys()
        .into_iter()
        .filter(|k| {
            !reference.contains(k)
                && !ENGINE_KEYS.contains(&k.as_str())
                && !ENGINE_ONLY_KEYS.contains(&k.as_str())
        })
        .collect()
}

/// One row of the coverage table.
#[derive(Debug)]
pub struct Row {
    pub model_type: String,
    pub module: String,
    pub spec: Option<String>,
    pub spec_lines: Option<usize>,
    pub goldens: Vec<(String, bool)>,
    /// Config keys mlx-lm reads for this type: how many, and those the spec
    /// neither reads nor declares (claimed types with an mlx-lm module).
    pub keys: Option<(usize, Vec<String>)>,
    /// Keys the spec reads that the reference does not.
    pub extra: Vec<String>,
    /// For a vision-language type (its mlx-lm module reads or drops vision
    /// weights or a `vision_config`): the `vision` spec of its tower, if
    /// any, and its cases under `goldens/vlm/`.
    pub vision: Option<(Option<String>, Vec<String>)>,
}

impl Row {
    pub fn status(&self) -> &'static str {
        let undeclared = self.keys.as_ref().is_some_and(|(_, u)| !u.is_empty());
        match (&self.spec, self.goldens.is_empty()) {
            (None, _) => "",
            (Some(_), _) if undeclared => "undeclared keys",
            (Some(_), true) => "no golden",
            (Some(_), false) if self.goldens.iter().all(|(_, ok)| *ok) => "pass",
            _ => "FAIL",
        }
    }
}

/// Builds the coverage rows: every mlx-lm type, and any type a spec claims
/// that mlx-lm lacks.
pub fn coverage(lib: &SpecLibrary, mlx_lm: &Path, goldens: &Path) -> Result<Vec<Row>> {
    let types = mlx_lm_model_types(mlx_lm)?;
    let claims: BTreeMap<String, String> = lib.model_types().into_iter().collect();
    let mut golden_results: BTreeMap<String, Vec<(String, bool)>> = BTreeMap::new();
    for case in Golden::cases(goldens)? {
        let g = Golden::load(&case)?;
        let mt = g
            .meta
            .get("model_type")
            .and_then(|m| m.as_str())
            .unwrap_or_default()
            .to_string();
        let report = golden::run(&case, &LoadOptions::as_stored().with_library(lib.clone()))
            .map_err(|e| anyhow!("{}: {e:#}", case.display()))?;
        golden_results
            .entry(mt)
            .or_default()
            .push((report.case.clone(), report.passed()));
    }
    // Towers: `vision` specs by the types they claim.
    let mut towers: BTreeMap<String, String> = BTreeMap::new();
    for name in lib.names().map(str::to_string).collect::<Vec<_>>() {
        let s = lib.load(&name)?;
        if s.task == lmspec_spec::raw::Task::Vision {
            for mt in &s.model_types {
                towers.entry(mt.clone()).or_insert_with(|| name.clone());
            }
        }
    }
    let vlm_cases = vlm_goldens(&goldens.join("vlm"));
    let mut all: BTreeMap<String, String> = types;
    for mt in claims.keys() {
        all.entry(mt.clone()).or_insert_with(|| "-".to_string());
    }
    let mut rows = Vec::new();
    for (mt, module) in all {
        let spec = claims.get(&mt).cloned();
        let (spec_lines, keys, extra) = match &spec {
            Some(name) => {
                let s = lib.load(name)?;
                // A type mlx-lm lacks is held to mlx-embeddings (encoders).
                let source = match module.as_str() {
                    "-" => mlx_lm
                        .with_file_name("mlx_embeddings")
                        .join("models")
                        .join(format!("{mt}.py")),
                    m => mlx_lm.join("models").join(format!("{m}.py")),
                };
                let (keys, extra) = match std::fs::read_to_string(&source) {
                    Ok(text) => {
                        let reference = reference_keys(&text);
                        (
                            Some((reference.len(), undeclared_keys(&s, &reference))),
                            extra_keys(&s, &reference),
                        )
                    }
                    Err(_) => (None, Vec::new()),
                };
                (
                    Some(std::fs::read_to_string(&s.file)?.lines().count()),
                    keys,
                    extra,
                )
            }
            None => (None, None, Vec::new()),
        };
        let source = mlx_lm.join("models").join(format!("{module}.py"));
        let is_vlm = std::fs::read_to_string(&source).is_ok_and(|t| {
            [
                "vision_tower",
                "vision_config",
                "vision_model",
                "\"visual\"",
                "visual.",
            ]
            .iter()
            .any(|p| t.contains(p))
        });
        let vision = (is_vlm || towers.contains_key(&mt)).then(|| {
            let cases = vlm_cases
                .iter()
                .filter(|(_, t)| *t == mt)
                .map(|(c, _)| c.clone())
                .collect();
            (towers.get(&mt).cloned(), cases)
        });
        rows.push(Row {
            keys,
            extra,
            vision,
            goldens: golden_results.remove(&mt).unwrap_or_default(),
            model_type: mt,
            module,
            spec,
            spec_lines,
        });
    }
    Ok(rows)
}

/// The cases under `goldens/vlm/` with their config's `model_type`.
fn vlm_goldens(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let config = e.path().join("model").join("config.json");
        let Ok(text) = std::fs::read_to_string(&config) else {
            continue;
        };
        let mt = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("model_type")?.as_str().map(str::to_string));
        if let Some(mt) = mt {
            out.push((e.file_name().to_string_lossy().to_string(), mt));
        }
    }
    out.sort();
    out
}

/// The rows as the Markdown page `docs/coverage.md`.
pub fn markdown(rows: &[Row]) -> String {
    let claimed: Vec<&Row> = rows.iter().filter(|r| r.spec.is_some()).collect();
    let in_mlx_lm = |r: &&&Row| r.module != "-";
    let claimed_mlx_lm = claimed.iter().filter(in_mlx_lm).count();
    let passing_mlx_lm = claimed
        .iter()
        .filter(in_mlx_lm)
        .filter(|r| r.status() == "pass")
        .count();
    let mut s = String::from("# Coverage of mlx-lm model types\n\nWritten by `lmspec port coverage` from the installed mlx-lm and the golden cases.\n\n");
    s.push_str(&format!(
        "{} model types in mlx-lm (modules and `MODEL_REMAPPING` aliases); lmspec specs claim {} of them, {} passing their goldens, and {} types mlx-lm does not have (encoders, vision-language ids).\n\n",
        rows.iter().filter(|r| r.module != "-").count(),
        claimed_mlx_lm,
        passing_mlx_lm,
        claimed.len() - claimed_mlx_lm
    ));
    s.push_str("\"config keys\" counts the fields of the type's `ModelArgs` in mlx-lm (in mlx-embeddings for the encoders mlx-lm lacks); each is read by the spec, accepted with one value only, or ignored for a stated reason (the spec's `config_keys`). A key that is none of these is listed, and the type does not pass.\n\n");
    s.push_str("## Claimed by a spec\n\n| model_type | mlx-lm module | spec | spec lines | config keys | golden cases | status |\n|---|---|---|---|---|---|---|\n");
    for r in &claimed {
        let cases: Vec<String> = r.goldens.iter().map(|(c, _)| format!("`{c}`")).collect();
        let keys = match &r.keys {
            None => "-".to_string(),
            Some((n, u)) if u.is_empty() => format!("{n}, all declared"),
            Some((n, u)) => format!("{n}; undeclared: {}", u.join(", ")),
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            r.model_type,
            r.module,
            r.spec.as_deref().unwrap_or(""),
            r.spec_lines.map(|n| n.to_string()).unwrap_or_default(),
            keys,
            cases.join(", "),
            r.status()
        ));
    }
    let extra: Vec<String> = claimed
        .iter()
        .filter(|r| !r.extra.is_empty())
        .map(|r| format!("- {}: {}", r.model_type, r.extra.join(", ")))
        .collect();
    if !extra.is_empty() {
        s.push_str("\n## Keys read beyond the reference\n\nKeys a spec reads from `config.json` that the reference's `ModelArgs` does not list (fields a `ModelArgs` inherits are not seen, so some are false alarms; the context length and the GGUF switch, which only the engine uses, are left out): a checkpoint that sets one may be read differently by the two. Not a failure; a list to pin down.\n\n");
        s.push_str(&extra.join("\n"));
        s.push('\n');
    }
    s.push_str("\n## Vision-language types\n\nTypes whose mlx-lm module reads or drops vision weights (mlx-lm runs their text models only), and types a `vision` spec claims. \"images\": a tower spec and a vision-language golden under `goldens/vlm/` (made by mlx-vlm, checked by `tests/vlm.rs`); \"text only\": the text model runs, its vision weights are dropped (docs/vision.md).\n\n| model_type | mlx-lm module | text spec | tower spec | vision goldens | images |\n|---|---|---|---|---|---|\n");
    for r in rows {
        let Some((tower, cases)) = &r.vision else {
            continue;
        };
        let cases: Vec<String> = cases.iter().map(|c| format!("`vlm/{c}`")).collect();
        let images = match (tower, cases.is_empty(), &r.spec) {
            (Some(_), false, Some(_)) => "images",
            (_, _, Some(_)) => "text only",
            (_, _, None) => "not claimed",
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            r.model_type,
            r.module,
            r.spec.as_deref().unwrap_or(""),
            tower.as_deref().unwrap_or(""),
            cases.join(", "),
            images
        ));
    }
    s.push_str("\n## Not yet claimed\n\n");
    let open: Vec<String> = rows
        .iter()
        .filter(|r| r.spec.is_none())
        .map(|r| {
            if r.module == r.model_type {
                format!("`{}`", r.model_type)
            } else {
                format!("`{}` (→ {})", r.model_type, r.module)
            }
        })
        .collect();
    s.push_str(&open.join(", "));
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_keys_are_the_model_args_fields() {
        let src = "import x\n\n@dataclass\nclass ModelArgs(BaseModelArgs):\n    model_type: str\n    hidden_size: int = 4\n    rope_scaling: Optional[Dict[str, float]] = None\n\n    def __post_init__(self):\n        self.extra: int = 3\n\nclass Model(nn.Module):\n    x: int\n";
        assert_eq!(
            reference_keys(src),
            ["model_type", "hidden_size", "rope_scaling"]
        );
    }
}
