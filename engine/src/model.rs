//! The generic Model API: load a model directory with the spec its
//! `model_type` names (or one given explicitly) and run it.
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use mlx_rs::Array;

use crate::cache::ModelCache;
use crate::error::{read_to_string, Error, Result};
use crate::graph::{self, Graph};
use crate::plan::Plan;
use crate::spec::config;
use crate::spec::expr::Value;
use crate::spec::library::{Spec, SpecLibrary};
use crate::weights::{self, rules, Quantization};

/// A loaded model: spec, bound config, expanded graph and runnable plan.
#[derive(Debug)]
pub struct Model {
    pub dir: PathBuf,
    pub spec: Spec,
    pub config: IndexMap<String, Value>,
    pub graph: Graph,
    plan: Plan,
}

/// Reads `config.json` of a model directory.
pub fn read_config(dir: &Path) -> Result<(PathBuf, serde_json::Value)> {
    let file = dir.join("config.json");
    let text = read_to_string(&file)?;
    let json = serde_json::from_str(&text).map_err(|e| Error::Config {
        file: file.clone(),
        key: "<document>".into(),
        msg: format!("invalid JSON: {e}"),
    })?;
    Ok((file, json))
}

/// The spec a config asks for: `spec` when given, else its `model_type`.
pub fn resolve_spec(
    lib: &SpecLibrary,
    config: &serde_json::Value,
    config_file: &Path,
    spec: Option<&str>,
) -> Result<Spec> {
    match spec {
        Some(s) => lib.load(s),
        None => {
            let mt = config
                .get("model_type")
                .and_then(|m| m.as_str())
                .ok_or_else(|| Error::Config {
                    file: config_file.to_path_buf(),
                    key: "model_type".into(),
                    msg: "missing; pass a spec explicitly".into(),
                })?;
            lib.for_model_type(mt, config_file)
        }
    }
}

/// Checks a spec, binds a config and expands the graph (no weights).
pub fn expand_for(
    spec: &Spec,
    config: &serde_json::Value,
    config_file: &Path,
) -> Result<(IndexMap<String, Value>, Graph)> {
    graph::check(spec)?;
    let bound = config::bind(spec, config, config_file)?;
    let g = graph::expand(spec, &bound)?;
    Ok((bound, g))
}

impl Model {
    /// Loads `dir` with the default spec library.
    pub fn load(dir: &Path) -> Result<Model> {
        Model::load_with(dir, &SpecLibrary::open_default()?, None)
    }

    /// Loads `dir` with `lib`, using `spec` (a name or a path) when given.
    pub fn load_with(dir: &Path, lib: &SpecLibrary, spec: Option<&str>) -> Result<Model> {
        let (config_file, json) = read_config(dir)?;
        let spec = resolve_spec(lib, &json, &config_file, spec)?;
        let (bound, graph) = expand_for(&spec, &json, &config_file)?;
        let checkpoint = weights::load_safetensors_dir(dir)?;
        let rule_refs: Vec<_> = spec.rules.iter().map(|r| &r.item).collect();
        let truthy = |v: &serde_yaml::Value| graph::eval_bool(v, &bound);
        let applied = rules::apply(&rule_refs, checkpoint.tensors, &truthy).map_err(|msg| {
            Error::Weights {
                file: checkpoint.file.clone(),
                msg: format!("weight rules of {}: {msg}", spec.file.display()),
            }
        })?;
        let quant = Quantization::from_config(&json, &config_file)?.with_ties(applied.ties);
        let params = weights::bind(&graph, &applied.tensors, &quant, &checkpoint.file)?;
        let plan = Plan::build(&graph, params)?;
        Ok(Model {
            dir: dir.to_path_buf(),
            spec,
            config: bound,
            graph,
            plan,
        })
    }

    /// A fresh cache with the slots this model's ops declared.
    pub fn new_cache(&self) -> ModelCache {
        ModelCache::new(self.plan.cache_kinds())
    }

    /// Logits [B, T, vocab] for token ids [B, T] (or [T]). Without a cache,
    /// the tokens are the whole sequence.
    pub fn forward(&self, tokens: &Array, cache: Option<&mut ModelCache>) -> Result<Array> {
        Ok(self.forward_with_taps(tokens, cache, &[])?.0)
    }

    /// Like [`Model::forward`], also returning the named taps.
    pub fn forward_with_taps(
        &self,
        tokens: &Array,
        cache: Option<&mut ModelCache>,
        taps: &[String],
    ) -> Result<(Array, IndexMap<String, Array>)> {
        let tokens = match tokens.ndim() {
            1 => tokens.reshape(&[1, -1])?,
            2 => tokens.clone(),
            n => {
                return Err(Error::Usage(format!(
                    "tokens must be [T] or [B, T], got {n} axes"
                )))
            }
        };
        let mut fresh;
        let cache = match cache {
            Some(c) => c,
            None => {
                fresh = self.new_cache();
                &mut fresh
            }
        };
        self.plan.run(&tokens, cache, taps)
    }

    /// Tap names in execution order.
    pub fn tap_names(&self) -> Vec<String> {
        self.plan.tap_names().map(str::to_string).collect()
    }
}
