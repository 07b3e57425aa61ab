//! `port scaffold`: draft a spec for a checkpoint of an architecture lmspec
//! lacks. Reads only `config.json` and the safetensors headers, ranks the
//! existing specs by how exactly their weight inventory fits, then searches
//! the best specs' boolean config switches (biases, q/k norms, ties...) for
//! the setting that fits best, and writes a draft that extends the winner.
use std::collections::HashSet;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use indexmap::IndexMap;
use lmspec_engine::model::read_config;
use lmspec_engine::spec::expr::Value;
use lmspec_engine::weights::{read_shapes, rules};
use lmspec_engine::{Spec, SpecLibrary};
use lmspec_spec::expand_for;

/// How well one spec (with some switches set) fits the checkpoint.
#[derive(Debug, Clone)]
pub struct Fit {
    pub spec: String,
    /// Matched tensors / (needed + unused).
    pub score: f64,
    /// Share of the config keys the spec reads that the config has (breaks
    /// ties between specs that fit the weights equally).
    pub config_fit: f64,
    pub overrides: Vec<(String, bool)>,
    pub missing: Vec<String>,
    pub unused: Vec<String>,
    pub mismatched: Vec<String>,
    /// Why the spec could not be expanded for this config, if it could not.
    pub error: Option<String>,
}

/// A drafted spec and what is left for its author.
#[derive(Debug)]
pub struct Draft {
    pub model_type: String,
    pub best: Fit,
    /// Every spec's fit before switch search, best first.
    pub ranking: Vec<Fit>,
    /// Top-level config keys the drafted spec reads from nowhere.
    pub unread_config_keys: Vec<String>,
    pub yaml: String,
}

fn evaluate(
    spec: &Spec,
    config: &serde_json::Value,
    config_file: &Path,
    shapes: &IndexMap<String, Vec<i64>>,
) -> Fit {
    let mut fit = Fit {
        spec: spec.name.clone(),
        score: 0.0,
        config_fit: config_fit(spec, config),
        overrides: Vec::new(),
        missing: Vec::new(),
        unused: Vec::new(),
        mismatched: Vec::new(),
        error: None,
    };
    let (bound, g) = match expand_for(spec, config, config_file) {
        Ok(x) => x,
        Err(e) => {
            fit.error = Some(e.to_string());
            return fit;
        }
    };
    let rule_refs: Vec<_> = spec.rules.iter().map(|r| &r.item).collect();
    let scope = match lmspec_spec::config::RuleScope::new(spec, &bound) {
        Ok(s) => s,
        Err(e) => {
            fit.error = Some(e.to_string());
            return fit;
        }
    };
    let eval = |v: &serde_yaml::Value, ty, layer| scope.eval(v, ty, layer);
    let applied = match rules::apply(&rule_refs, shapes.clone(), &eval) {
        Ok(a) => a,
        Err(e) => {
            fit.error = Some(e);
            return fit;
        }
    };
    let have = applied.tensors;
    let mut used: HashSet<String> = HashSet::new();
    let mut needed = 0usize;
    let mut matched = 0usize;
    for node in &g.nodes {
        for req in &node.resolved.weights {
            let name = req.tensor();
            if req.optional && !have.contains_key(&name) {
                continue;
            }
            needed += 1;
            let scales = format!("{}.scales", req.module);
            match have.get(&name) {
                None => fit.missing.push(name),
                Some(_) if req.quantizable && have.contains_key(&scales) => {
                    matched += 1;
                    used.extend([name, scales, format!("{}.biases", req.module)]);
                }
                Some(shape) if req.fits(shape) => {
                    matched += 1;
                    used.insert(name);
                }
                Some(shape) => {
                    fit.mismatched.push(format!(
                        "{name}: checkpoint {shape:?}, spec {:?}",
                        req.shape
                    ));
                    used.insert(name);
                }
            }
        }
    }
    fit.missing.sort();
    fit.missing.dedup();
    fit.unused = have
        .keys()
        .filter(|k| !used.contains(*k))
        .cloned()
        .collect();
    let total = needed + fit.unused.len();
    fit.score = if total == 0 {
        0.0
    } else {
        matched as f64 / total as f64
    };
    fit
}

/// How well a spec's config keys and the checkpoint's agree: the harmonic
/// mean of the share of the keys the spec needs (its bindings' `from` keys,
/// or their names; constant `value`s, `per_layer` expressions and optional
/// ones need nothing) that `config` holds, and the share of `config`'s keys
/// (but `model_type` and quantization) that the spec reads at all.
fn config_fit(spec: &Spec, config: &serde_json::Value) -> f64 {
    let top = |k: &str| k.split('.').next().unwrap_or_default().to_string();
    let needed: Vec<String> = spec
        .config
        .iter()
        .filter(|(_, d)| d.item.value.is_none() && d.item.per_layer.is_none() && !d.item.optional)
        .map(|(k, d)| {
            let from = d
                .item
                .from
                .as_ref()
                .map(|f| f.to_vec())
                .filter(|v| !v.is_empty());
            top(&from
                .and_then(|v| v.first().cloned())
                .unwrap_or_else(|| k.clone()))
        })
        .collect();
    let read = spec.checkpoint_keys();
    let given: Vec<&String> = config
        .as_object()
        .map(|o| {
            o.keys()
                .filter(|k| {
                    !["model_type", "quantization", "quantization_config"].contains(&k.as_str())
                })
                .collect()
        })
        .unwrap_or_default();
    if needed.is_empty() || given.is_empty() {
        return 0.0;
    }
    let precision = needed
        .iter()
        .filter(|k| config.get(k.as_str()).is_some())
        .count() as f64
        / needed.len() as f64;
    let recall =
        given.iter().filter(|k| read.contains(k.as_str())).count() as f64 / given.len() as f64;
    if precision + recall == 0.0 {
        return 0.0;
    }
    2.0 * precision * recall / (precision + recall)
}

/// Current values of the spec's boolean config entries for this config.
fn bool_switches(
    spec: &Spec,
    config: &serde_json::Value,
    config_file: &Path,
) -> Vec<(String, bool)> {
    let Ok((bound, _)) = expand_for(spec, config, config_file) else {
        return Vec::new();
    };
    spec.config
        .iter()
        .filter(|(_, d)| d.item.ty == "bool")
        .filter_map(|(k, _)| match bound.get(k) {
            Some(Value::Bool(b)) => Some((k.clone(), *b)),
            _ => None,
        })
        .collect()
}

fn with_overrides(spec: &Spec, overrides: &[(String, bool)]) -> Spec {
    let mut s = spec.clone();
    for (name, v) in overrides {
        if let Some(def) = s.config.get_mut(name) {
            def.item.value = Some(serde_yaml::Value::Bool(*v));
        }
    }
    s
}

/// Greedy search over boolean switches: flip the one that helps most until
/// nothing helps.
fn search(
    spec: &Spec,
    config: &serde_json::Value,
    config_file: &Path,
    shapes: &IndexMap<String, Vec<i64>>,
) -> Fit {
    let mut overrides: Vec<(String, bool)> = Vec::new();
    let mut best = evaluate(spec, config, config_file, shapes);
    let switches = bool_switches(spec, config, config_file);
    loop {
        let mut improved: Option<(Fit, Vec<(String, bool)>)> = None;
        for (name, current) in &switches {
            if overrides.iter().any(|(n, _)| n == name) {
                continue;
            }
            let mut trial = overrides.clone();
            trial.push((name.clone(), !current));
            let fit = evaluate(&with_overrides(spec, &trial), config, config_file, shapes);
            let bar = improved.as_ref().map_or(best.score, |(f, _)| f.score);
            if fit.error.is_none() && fit.score > bar {
                improved = Some((fit, trial));
            }
        }
        match improved {
            Some((fit, trial)) => {
                best = fit;
                overrides = trial;
            }
            None => break,
        }
    }
    best.overrides = overrides;
    best
}

fn yaml_list(title: &str, items: &[String]) -> String {
    if items.is_empty() {
        return format!("# {title}: none\n");
    }
    let mut s = format!("# {title}:\n");
    for i in items {
        s.push_str(&format!("#   - {i}\n"));
    }
    s
}

/// Drafts a spec for the checkpoint in `model_dir`.
pub fn scaffold(model_dir: &Path, lib: &SpecLibrary) -> Result<Draft> {
    let (config_file, config) = read_config(model_dir)?;
    let shapes = read_shapes(model_dir)?;
    let model_type = config
        .get("model_type")
        .and_then(|m| m.as_str())
        .ok_or_else(|| anyhow!("{}: no model_type", config_file.display()))?
        .to_string();
    // Language-model specs only: an embedder's (task embed) lacks the head.
    let specs: Vec<Spec> = lib
        .names()
        .map(|n| lib.load(n))
        .collect::<Result<Vec<_>, _>>()
        .context("loading the spec library")?
        .into_iter()
        .filter(|s| s.task == lmspec_spec::raw::Task::Generate)
        .collect();
    let mut ranking: Vec<Fit> = specs
        .iter()
        .map(|s| evaluate(s, &config, &config_file, &shapes))
        .collect();
    ranking.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(b.config_fit.total_cmp(&a.config_fit))
    });
    let mut best: Option<Fit> = None;
    for fit in ranking.iter().take(3).filter(|f| f.error.is_none()) {
        let spec = specs
            .iter()
            .find(|s| s.name == fit.spec)
            .expect("ranked from specs");
        let searched = search(spec, &config, &config_file, &shapes);
        let better = best.as_ref().is_none_or(|b| {
            searched.score > b.score
                || (searched.score == b.score && searched.config_fit > b.config_fit)
        });
        if better {
            best = Some(searched);
        }
    }
    let best = best.ok_or_else(|| {
        let reasons: Vec<String> = ranking
            .iter()
            .map(|f| format!("{}: {}", f.spec, f.error.clone().unwrap_or_default()))
            .collect();
        anyhow!(
            "no spec could be expanded for this config:\n  {}",
            reasons.join("\n  ")
        )
    })?;
    let base = specs
        .iter()
        .find(|s| s.name == best.spec)
        .expect("best is a spec");
    let read: HashSet<String> = base
        .config
        .iter()
        .flat_map(|(k, d)| {
            let keys = d
                .item
                .from
                .as_ref()
                .map(|f| f.to_vec())
                .filter(|v| !v.is_empty());
            keys.unwrap_or_else(|| vec![k.clone()])
        })
        .map(|k| k.split('.').next().unwrap_or_default().to_string())
        .collect();
    let mut unread: Vec<String> = config
        .as_object()
        .map(|o| {
            o.keys()
                .filter(|k| !read.contains(*k) && *k != "model_type")
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    unread.sort();
    let first = ranking
        .iter()
        .find(|f| f.spec == best.spec)
        .map_or(0.0, |f| f.score);
    let mut yaml = format!(
        "# Draft spec written by `lmspec port scaffold` for {}.\n\
                  # Nearest spec: {} (weight inventory fit {:.3}; {:.3} with the switches below;\n\
         # config key agreement: {:.0}%).\n\
         # Check it with: lmspec port diff --golden <case> --spec <this file>\n\
         spec_version: 1\nname: {mt}\nextends: {}\nmodel_types: [{mt}]\n",
        model_dir.display(),
        best.spec,
        first,
        best.score,
        best.config_fit * 100.0,
        best.spec,
        mt = model_type,
    );
    if !best.overrides.is_empty() {
        yaml.push_str("config:\n");
        for (name, v) in &best.overrides {
            yaml.push_str(&format!("  {name}: {{type: bool, value: {v}}}\n"));
        }
    }
    yaml.push_str(&yaml_list(
        "config keys the spec does not read (check whether they matter)",
        &unread,
    ));
    yaml.push_str(&yaml_list(
        "tensors the spec needs that the checkpoint lacks",
        &best.missing,
    ));
    yaml.push_str(&yaml_list(
        "checkpoint tensors the spec does not use",
        &best.unused,
    ));
    yaml.push_str(&yaml_list("tensors whose shape differs", &best.mismatched));
    Ok(Draft {
        model_type,
        best,
        ranking,
        unread_config_keys: unread,
        yaml,
    })
}
