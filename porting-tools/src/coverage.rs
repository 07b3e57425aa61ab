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

/// One row of the coverage table.
#[derive(Debug)]
pub struct Row {
    pub model_type: String,
    pub module: String,
    pub spec: Option<String>,
    pub spec_lines: Option<usize>,
    pub goldens: Vec<(String, bool)>,
}

impl Row {
    pub fn status(&self) -> &'static str {
        match (&self.spec, self.goldens.is_empty()) {
            (None, _) => "",
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
    let mut all: BTreeMap<String, String> = types;
    for mt in claims.keys() {
        all.entry(mt.clone()).or_insert_with(|| "-".to_string());
    }
    let mut rows = Vec::new();
    for (mt, module) in all {
        let spec = claims.get(&mt).cloned();
        let spec_lines = match &spec {
            Some(name) => {
                let s = lib.load(name)?;
                Some(std::fs::read_to_string(&s.file)?.lines().count())
            }
            None => None,
        };
        rows.push(Row {
            goldens: golden_results.remove(&mt).unwrap_or_default(),
            model_type: mt,
            module,
            spec,
            spec_lines,
        });
    }
    Ok(rows)
}

/// The rows as the Markdown page `docs/coverage.md`.
pub fn markdown(rows: &[Row]) -> String {
    let claimed: Vec<&Row> = rows.iter().filter(|r| r.spec.is_some()).collect();
    let passing = claimed.iter().filter(|r| r.status() == "pass").count();
    let mut s = String::from("# Coverage of mlx-lm model types\n\nWritten by `lmspec port coverage` from the installed mlx-lm and the golden cases.\n\n");
    s.push_str(&format!(
        "{} model types in mlx-lm (modules and `MODEL_REMAPPING` aliases); lmspec specs claim {}; {} pass their goldens.\n\n",
        rows.iter().filter(|r| r.module != "-").count(),
        claimed.len(),
        passing
    ));
    s.push_str("## Claimed by a spec\n\n| model_type | mlx-lm module | spec | spec lines | golden cases | status |\n|---|---|---|---|---|---|\n");
    for r in &claimed {
        let cases: Vec<String> = r.goldens.iter().map(|(c, _)| format!("`{c}`")).collect();
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            r.model_type,
            r.module,
            r.spec.as_deref().unwrap_or(""),
            r.spec_lines.map(|n| n.to_string()).unwrap_or_default(),
            cases.join(", "),
            r.status()
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
