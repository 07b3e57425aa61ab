//! The generic Model API: load a model directory with the spec its
//! `model_type` names (or one given explicitly) and run it.
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use mlx_rs::Array;

use crate::batch::BatchCache;
use crate::cache::{CacheOptions, ModelCache};
use crate::error::{read_to_string, Error, Result};
use crate::gguf::{GgufReader, GgufTokenizerData};
use crate::inputs::ForwardInputs;
use crate::plan::Plan;
use crate::weights::{self, rules, Quantization};
use lmspec_spec::config;
use lmspec_spec::expr::Value;
use lmspec_spec::library::{Spec, SpecLibrary};
use lmspec_spec::raw::RawRule;
use lmspec_spec::Graph;

/// A loaded model: spec, bound config, expanded graph and runnable plan.
#[derive(Debug)]
pub struct Model {
    pub dir: PathBuf,
    pub spec: Spec,
    pub config: IndexMap<String, Value>,
    pub graph: Graph,
    pub(crate) plan: Plan,
    /// Whether quantized weights were expanded to float32 at load.
    pub dequantized: bool,
    /// How the plan's quantized products on the CPU take activations
    /// (chosen at load: [`LoadOptions::activations`]).
    pub activations: crate::cpu_kernels::Activations,
    /// The adapter attached at load, if any.
    pub adapter: Option<crate::adapter::Attached>,
}

/// What a checkpoint provides to [`Model::assemble`].
struct Source<'a> {
    path: &'a Path,
    config: &'a serde_json::Value,
    config_file: &'a Path,
    tensors: IndexMap<String, Array>,
    /// Where the tensors loaded straight from files are (for slices).
    files: weights::FileTensors,
    tensor_file: &'a Path,
    /// Rules applied before the spec's own (GGUF renames).
    first_rules: &'a [RawRule],
}

/// Which representation quantized weights are run in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WeightPlan {
    /// As the checkpoint stores them.
    AsStored,
    /// Dequantized to float32 (BLAS matmuls on CPU).
    Dense,
    /// As stored on a GPU, and on the CPU where lmspec's CPU kernels run
    /// every quantized weight (2-D, MLX affine widths: `cpu_kernels`);
    /// otherwise (quantized expert stacks, kernels off) dense on the CPU
    /// when the float32 weights take at most half of the available memory.
    #[default]
    Auto,
}

impl WeightPlan {
    pub fn parse(s: &str) -> Option<WeightPlan> {
        Some(match s {
            "auto" => WeightPlan::Auto,
            "quantized" | "as-stored" => WeightPlan::AsStored,
            "dense" | "f32" => WeightPlan::Dense,
            _ => return None,
        })
    }

    /// Whether this plan expands the quantized weights among `params`.
    pub fn dequantizes(self, params: &[Vec<crate::ops::Param>]) -> bool {
        match self {
            WeightPlan::AsStored => false,
            WeightPlan::Dense => true,
            WeightPlan::Auto => {
                if crate::runtime::default_device() != "cpu" {
                    return false;
                }
                if crate::cpu_kernels::enabled() && weights::kernels_cover(params) {
                    return false;
                }
                let dense_bytes = weights::dense_bytes(params);
                let available = crate::runtime::available_memory().unwrap_or(0);
                weights::has_quantized(params) && dense_bytes * 2 <= available
            }
        }
    }
}

/// How a model is loaded: one set of options for [`Model`], the language
/// model and the embedder.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// The spec to use (a name in the library or a path to a YAML file);
    /// `None`: the one claiming the checkpoint's `model_type` (or GGUF
    /// architecture).
    pub spec: Option<String>,
    /// Which representation quantized weights run in.
    pub weights: WeightPlan,
    /// Whether linear layers that read the same value run as one
    /// projection (see [`Plan::build`]); `None`: on for the CPU, and on a
    /// GPU for models with quantized weights (fused, a 1B 4-bit model
    /// decoded faster in five of six alternating pairs on H100s, median
    /// 1.15x; a bfloat16 one no faster: docs/gpu.md).
    pub fuse_projections: Option<bool>,
    /// The spec library; `None`: [`SpecLibrary::open_default`]
    /// (`$LMSPEC_SPECS`, else the library built into the binary).
    pub library: Option<SpecLibrary>,
    /// Told of each safetensors file read.
    pub progress: Option<weights::LoadProgress>,
    /// Which spec a `model_type` claimed by several picks (the embedder
    /// asks for `embed`, the reranker for `classify`).
    pub task: lmspec_spec::raw::Task,
    /// A LoRA/DoRA adapter to attach (see [`crate::adapter`]).
    pub adapter: Option<crate::adapter::AdapterSource>,
    /// How quantized products on the CPU treat activations; `None`: 16-bit
    /// blocks where the model holds quantized weights (float32's numerics
    /// within a bound, at close to int8's speed), float32 (MLX's numerics,
    /// bit for bit) where it holds none. int8 blocks are llama.cpp's; see
    /// [`crate::cpu_kernels::Activations`].
    pub activations: Option<crate::cpu_kernels::Activations>,
    /// The tensor-parallel group this process is a rank of: the model is
    /// split across its ranks as the spec's `parallel` section and `shard`
    /// hints say; `None`: one process holds the whole model.
    pub parallel: Option<std::sync::Arc<crate::distributed::Group>>,
}

impl LoadOptions {
    /// Options with weights kept as stored.
    pub fn as_stored() -> LoadOptions {
        LoadOptions {
            weights: WeightPlan::AsStored,
            ..LoadOptions::default()
        }
    }

    pub fn with_spec(mut self, spec: impl Into<String>) -> LoadOptions {
        self.spec = Some(spec.into());
        self
    }

    pub fn with_weights(mut self, weights: WeightPlan) -> LoadOptions {
        self.weights = weights;
        self
    }

    pub fn with_library(mut self, library: SpecLibrary) -> LoadOptions {
        self.library = Some(library);
        self
    }

    pub fn with_task(mut self, task: lmspec_spec::raw::Task) -> LoadOptions {
        self.task = task;
        self
    }

    /// Attaches the adapter in folder `dir`.
    pub fn with_adapter(mut self, dir: impl Into<PathBuf>) -> LoadOptions {
        self.adapter = Some(crate::adapter::AdapterSource::Dir(dir.into()));
        self
    }

    pub fn with_activations(mut self, a: crate::cpu_kernels::Activations) -> LoadOptions {
        self.activations = Some(a);
        self
    }

    /// Loads this rank's share of the model (see [`LoadOptions::parallel`]).
    pub fn with_parallel(
        mut self,
        group: std::sync::Arc<crate::distributed::Group>,
    ) -> LoadOptions {
        self.parallel = Some(group);
        self
    }

    pub fn with_fusion(mut self, fuse: bool) -> LoadOptions {
        self.fuse_projections = Some(fuse);
        self
    }

    /// The library these options name (opened when none was given).
    pub fn library(&self) -> Result<std::borrow::Cow<'_, SpecLibrary>> {
        Ok(match &self.library {
            Some(l) => std::borrow::Cow::Borrowed(l),
            None => std::borrow::Cow::Owned(SpecLibrary::open_default()?),
        })
    }

    /// Whether this model's projections fuse on `device` (see
    /// [`LoadOptions::fuse_projections`]).
    fn fuse(&self, quantized: bool, device: &str) -> bool {
        self.fuse_projections
            .unwrap_or(quantized || device == "cpu")
    }
}

/// Whether `path` names a GGUF file.
pub fn is_gguf(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
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
    resolve_spec_for(lib, config, config_file, spec, Default::default())
}

/// [`resolve_spec`] preferring the spec of `task` for the `model_type`.
pub fn resolve_spec_for(
    lib: &SpecLibrary,
    config: &serde_json::Value,
    config_file: &Path,
    spec: Option<&str>,
    task: lmspec_spec::raw::Task,
) -> Result<Spec> {
    match spec {
        Some(s) => Ok(lib.load(s)?),
        None => {
            let mt = config
                .get("model_type")
                .and_then(|m| m.as_str())
                .ok_or_else(|| Error::Config {
                    file: config_file.to_path_buf(),
                    key: "model_type".into(),
                    msg: "missing; pass a spec explicitly".into(),
                })?;
            Ok(lib.for_model_type_task(mt, task, config_file)?)
        }
    }
}

impl Model {
    /// Loads `path` (a model directory or a `.gguf` file).
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Model> {
        if is_gguf(path) {
            return Ok(Model::load_gguf(path, opts)?.0);
        }
        let lib = opts.library()?;
        let (config_file, json) = read_config(path)?;
        let spec = resolve_spec_for(&lib, &json, &config_file, opts.spec.as_deref(), opts.task)?;
        let checkpoint = weights::load_safetensors_dir(path, opts.progress.as_ref())?;
        let source = Source {
            path,
            config: &json,
            config_file: &config_file,
            tensors: checkpoint.tensors,
            files: checkpoint.files,
            tensor_file: &checkpoint.file,
            first_rules: &[],
        };
        Model::assemble(spec, source, opts)
    }

    /// Loads a GGUF file; also returns what it holds besides the model
    /// (tokenizer data, chat template).
    pub fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<(Model, GgufTokenizerData)> {
        let lib = opts.library()?;
        let reader = GgufReader::open(path)?;
        let spec = match opts.spec.as_deref() {
            Some(s) => lib.load(s)?,
            None => lib.for_gguf_architecture(&reader.architecture()?, path)?,
        };
        let ckpt = reader.read(&spec)?;
        let gguf_rules: Vec<RawRule> = spec
            .gguf
            .as_ref()
            .map(|g| g.item.rules.clone())
            .unwrap_or_default();
        let source = Source {
            path,
            config: &ckpt.config,
            config_file: path,
            tensors: ckpt.tensors,
            files: Default::default(),
            tensor_file: path,
            first_rules: &gguf_rules,
        };
        let model = Model::assemble(spec, source, opts)?;
        Ok((model, ckpt.tokenizer))
    }

    fn assemble(spec: Spec, src: Source<'_>, opts: &LoadOptions) -> Result<Model> {
        let Source {
            path,
            config: json,
            config_file,
            tensors,
            files,
            tensor_file,
            first_rules,
        } = src;
        let group = opts.parallel.clone().filter(|g| g.size() > 1);
        let rank = crate::distributed::Rank::of_group(group.as_deref());
        if group.is_some() && opts.adapter.is_some() {
            return Err(Error::Usage(
                "adapters are not supported on a tensor-parallel run; fuse the adapter first (lmspec fuse)".into(),
            ));
        }
        let (bound, graph) =
            lmspec_spec::expand_for_ranks(&spec, json, config_file, rank.of as i64)?;
        let rule_refs: Vec<&RawRule> = first_rules
            .iter()
            .chain(spec.rules.iter().map(|r| &r.item))
            .collect();
        let scope = config::RuleScope::new(&spec, &bound)?;
        let eval = |v: &serde_yaml::Value, ty, layer| scope.eval(v, ty, layer);
        let targets = match &opts.adapter {
            Some(_) => {
                let shapes = tensors
                    .iter()
                    .map(|(k, a)| (k.clone(), a.shape().iter().map(|&d| d as i64).collect()))
                    .collect();
                let first: Vec<&RawRule> = first_rules.iter().collect();
                let own: Vec<&RawRule> = spec.rules.iter().map(|r| &r.item).collect();
                let origins =
                    crate::adapter::origins(shapes, &first, &own, &eval).map_err(|msg| {
                        Error::Weights {
                            file: tensor_file.to_path_buf(),
                            msg: format!("weight rules of {}: {msg}", spec.file.display()),
                        }
                    })?;
                crate::adapter::targets(&graph, &origins)
            }
            None => Vec::new(),
        };
        let applied = rules::apply(&rule_refs, tensors, &eval).map_err(|msg| Error::Weights {
            file: tensor_file.to_path_buf(),
            msg: format!("weight rules of {}: {msg}", spec.file.display()),
        })?;
        let quant = Quantization::from_config(json, config_file)?
            .with_renames(&applied.renames)
            .with_ties(applied.ties);
        let mut params =
            weights::bind(&graph, &applied.tensors, &quant, tensor_file, rank, &files)?;
        // The params hold what the plan needs; the checkpoint's own arrays
        // go now, so that moving the weights (Plan::build) frees as it goes.
        drop(applied.tensors);
        // A group size MLX lacks (GGUF's sub-blocks of 16) stays quantized
        // only where lmspec's CPU kernels run it: matrices, on the CPU.
        let kernels = crate::cpu_kernels::enabled();
        weights::dequantize_where(&mut params, |_, p| {
            !(p.mlx_takes() || (kernels && weights::kernels_run(p)))
        })?;
        let dense = opts.weights.dequantizes(&params);
        if dense {
            weights::dequantize_all(&mut params)?;
        }
        let (adapter, adapted) = match &opts.adapter {
            Some(source) => {
                let (attached, nodes) = crate::adapter::attach(source, &targets, &params)?;
                let mut by_node: std::collections::HashMap<usize, Vec<_>> = Default::default();
                for (node, weight, slot) in nodes {
                    by_node.entry(node).or_default().push((weight, slot));
                }
                (Some(attached), by_node)
            }
            None => (None, std::collections::HashMap::new()),
        };
        let quantized = weights::has_quantized(&params);
        let fuse = opts.fuse(quantized, crate::runtime::default_device());
        let activations = opts.activations.unwrap_or(if quantized {
            crate::cpu_kernels::Activations::Int16
        } else {
            crate::cpu_kernels::Activations::Float
        });
        let plan = crate::distributed::with_group(group, || {
            crate::cpu_kernels::with_activations(activations, || {
                Plan::build_adapted(&graph, params, fuse, &adapted)
            })
        })?;
        Ok(Model {
            dir: path.to_path_buf(),
            spec,
            config: bound,
            graph,
            plan,
            dequantized: dense,
            activations,
            adapter,
        })
    }

    /// A fresh cache with the slots this model's ops declared.
    pub fn new_cache(&self) -> ModelCache {
        self.new_cache_with(CacheOptions::default())
    }

    /// A fresh cache with the given options (e.g. a rotating window).
    pub fn new_cache_with(&self, opts: CacheOptions) -> ModelCache {
        ModelCache::new(self.plan.cache_kinds(), opts)
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
        self.run(tokens, cache, taps, None, &ForwardInputs::default())
    }

    /// Like [`Model::forward_with_taps`], with the forward's extra inputs:
    /// positions on several axes, segment ids, features to splice (see
    /// [`ForwardInputs`]). A `position_delta` in them is kept by the cache
    /// for later calls.
    pub fn forward_with_inputs(
        &self,
        tokens: &Array,
        cache: Option<&mut ModelCache>,
        inputs: &ForwardInputs,
        taps: &[String],
    ) -> Result<(Array, IndexMap<String, Array>)> {
        self.run(tokens, cache, taps, None, inputs)
    }

    /// Runs a tower on non-token input (a vision tower's flattened patches
    /// `[N, F]` or `[1, N, F]`) with its inputs; no cache.
    pub fn encode(
        &self,
        input: &Array,
        inputs: &ForwardInputs,
        taps: &[String],
    ) -> Result<(Array, IndexMap<String, Array>)> {
        let input = match input.ndim() {
            2 => input.expand_dims(0)?,
            3 => input.clone(),
            n => {
                return Err(Error::Usage(format!(
                    "a tower's input must be [N, F] or [1, N, F], got {n} axes"
                )))
            }
        };
        let mut cache = self.new_cache();
        crate::inputs::scoped(inputs, 0, || {
            self.plan.run(&input, &mut cache, taps, None, None)
        })
    }

    /// The output for a padded batch: `tokens` [B, T] and `key_mask` [B, T]
    /// (true for real tokens); padding positions are hidden from attention.
    pub fn forward_masked(&self, tokens: &Array, key_mask: &Array) -> Result<Array> {
        Ok(self
            .run(tokens, None, &[], Some(key_mask), &ForwardInputs::default())?
            .0)
    }

    fn run(
        &self,
        tokens: &Array,
        cache: Option<&mut ModelCache>,
        taps: &[String],
        key_mask: Option<&Array>,
        inputs: &ForwardInputs,
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
        if let Some(d) = inputs.position_delta {
            cache.position_delta = d;
        }
        let delta = cache.position_delta;
        crate::inputs::scoped(inputs, delta, || {
            self.plan.run(&tokens, cache, taps, key_mask, None)
        })
    }

    /// Logits [B, T, vocab] for the next tokens [B, T] of a batch of
    /// sequences at their own positions (see [`BatchCache`]).
    pub fn forward_batch(&self, tokens: &Array, cache: &mut BatchCache) -> Result<Array> {
        let s = tokens.shape();
        if s.len() != 2 || s[0] as usize != cache.rows() {
            return Err(Error::Usage(format!(
                "a batch of {} rows takes tokens [{}, T], got {s:?}",
                cache.rows(),
                cache.rows()
            )));
        }
        // One row has no padding once alone: a plain call at its offset.
        let (out, _) = if cache.rows() == 1 {
            self.plan.run(tokens, &mut cache.cache, &[], None, None)?
        } else {
            let mask = cache.key_mask(s[1]);
            let positions = cache.positions();
            self.plan
                .run(tokens, &mut cache.cache, &[], Some(&mask), Some(&positions))?
        };
        cache.advance(s[1]);
        Ok(out)
    }

    /// Checks token ids before they reach the model: each must index the
    /// embedding table (an id past it would read outside the table), and
    /// a sequence may not outrun a learned position table. `what` names the
    /// ids' source in errors (`--tokens`, `the prompt`).
    pub fn check_tokens(&self, ids: &[i64], what: &str) -> Result<()> {
        if let Some(rows) = self.graph.token_rows() {
            if let Some((k, id)) = ids.iter().enumerate().find(|(_, &t)| t < 0 || t >= rows) {
                return Err(Error::Usage(format!(
                    "{what}: token {k} is id {id}, outside the model's vocabulary of {rows} ids (0..{rows})"
                )));
            }
        }
        if let Some(rows) = self.graph.position_rows() {
            if ids.len() as i64 > rows {
                return Err(Error::Usage(format!(
                    "{what}: {} tokens are more than the model's {rows} learned positions",
                    ids.len()
                )));
            }
        }
        Ok(())
    }

    /// The longest sequence the model declares it was made for: its
    /// learned positions, else the config's `max_position_embeddings`.
    pub fn context_length(&self) -> Option<u64> {
        self.graph.position_rows().map(|r| r as u64).or_else(|| {
            self.config
                .get("max_position_embeddings")
                .and_then(Value::as_i64)
                .map(|v| v as u64)
        })
    }

    /// Tap names in execution order.
    pub fn tap_names(&self) -> Vec<String> {
        self.plan.tap_names().map(str::to_string).collect()
    }

    /// The plan's GPU kernel groups (see [`crate::gpu_kernels`]), each as
    /// its ops and whether a kernel runs it: `rms_norm+linear+linear: kernel`.
    pub fn kernel_groups(&self) -> Vec<String> {
        self.plan.kernel_groups()
    }
}

#[cfg(test)]
mod tests {
    use super::LoadOptions;

    #[test]
    fn projections_fuse_on_the_cpu_and_for_quantized_models_on_a_gpu() {
        let auto = LoadOptions::default();
        assert!(auto.fuse(false, "cpu") && auto.fuse(true, "cpu"));
        assert!(auto.fuse(true, "gpu"), "quantized on a GPU");
        assert!(!auto.fuse(false, "gpu"), "float weights on a GPU");
        let off = LoadOptions {
            fuse_projections: Some(false),
            ..LoadOptions::default()
        };
        assert!(!off.fuse(true, "cpu") && !off.fuse(true, "gpu"));
        let on = LoadOptions {
            fuse_projections: Some(true),
            ..LoadOptions::default()
        };
        assert!(on.fuse(false, "gpu"));
    }
}
