//! Checkpoint loading and the exact weight inventory.
//!
//! A model directory holds `config.json` and `model.safetensors` or shards
//! listed in `model.safetensors.index.json`. Tensors are renamed by the
//! spec's rules into the spec's names, then every tensor a node needs is
//! looked up (dense, or MLX affine-quantized with `scales`/`biases`) and
//! every tensor left over is an error.
pub mod file_slice;
pub mod rules;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use mlx_rs::Array;

use crate::distributed::Rank;
use crate::error::{read_to_string, Error, Result};
pub use file_slice::{FileTensor, FileTensors};
use lmspec_spec::ops::{OpError, WeightReq};
use lmspec_spec::Graph;
use mlx_rs::error::Exception;

/// A loaded weight, dense or MLX affine-quantized.
#[derive(Debug, Clone)]
pub enum Param {
    Dense(Array),
    Quantized {
        w: Array,
        scales: Array,
        biases: Array,
        group_size: i32,
        bits: i32,
    },
}

impl Param {
    /// The dense array, or a dequantized copy.
    pub fn dense(&self) -> Result<Array, Exception> {
        match self {
            Param::Dense(a) => Ok(a.clone()),
            Param::Quantized {
                w,
                scales,
                biases,
                group_size,
                bits,
            } => dequantize(w, scales, biases, *group_size, *bits),
        }
    }

    /// Whether MLX's own quantized ops take this weight (every dense one;
    /// a quantized one in one of MLX's group sizes).
    pub fn mlx_takes(&self) -> bool {
        match self {
            Param::Dense(_) => true,
            Param::Quantized { group_size, .. } => QUANT_GROUP_SIZES.contains(group_size),
        }
    }
}

/// `w * scale + bias` per group: MLX's `dequantize`, or for a group size
/// MLX lacks (16) lmspec's CPU kernel over the rows of `w` (any leading
/// axes), on the CPU whatever the default device.
pub fn dequantize(
    w: &Array,
    scales: &Array,
    biases: &Array,
    group_size: i32,
    bits: i32,
) -> Result<Array, Exception> {
    if QUANT_GROUP_SIZES.contains(&group_size) {
        return mlx_rs::ops::dequantize(w, scales, biases, group_size, bits);
    }
    let shape = w.shape().to_vec();
    let (&words, lead) = shape
        .split_last()
        .ok_or_else(|| Exception::custom("a quantized weight needs an axis"))?;
    let rows = |a: &Array| a.reshape(&[-1, *a.shape().last().unwrap_or(&1)]);
    let dense = crate::cpu_kernels::dequantize(
        &rows(w)?,
        &rows(scales)?,
        &rows(biases)?,
        group_size,
        bits,
    )?;
    let out: Vec<i32> = lead
        .iter()
        .copied()
        .chain([words * 32 / bits.max(1)])
        .collect();
    dense.reshape(&out)
}

/// The weights of one node, each under the parameter (`field`) that
/// required it, with the adapter attached to it, if any.
#[derive(Debug, Default)]
pub struct Weights {
    items: Vec<(&'static str, Param)>,
    adapters: Vec<Option<std::sync::Arc<crate::adapter::AdapterSlot>>>,
}

impl Weights {
    pub fn new(items: Vec<(&'static str, Param)>) -> Weights {
        let adapters = vec![None; items.len()];
        Weights { items, adapters }
    }

    /// Weights with an adapter on some of them (in `items`' order).
    pub fn with_adapters(
        items: Vec<(&'static str, Param)>,
        adapters: Vec<Option<std::sync::Arc<crate::adapter::AdapterSlot>>>,
    ) -> Weights {
        Weights { items, adapters }
    }

    /// The weight required under `field`, if it was (an adapter on it is
    /// dropped, and the plan reports it as not applied).
    pub fn take_opt(&mut self, field: &str) -> Option<Param> {
        self.remove(field).map(|(p, _)| p)
    }

    fn remove(
        &mut self,
        field: &str,
    ) -> Option<(Param, Option<std::sync::Arc<crate::adapter::AdapterSlot>>)> {
        let k = self.items.iter().position(|(f, _)| *f == field)?;
        let adapter = if k < self.adapters.len() {
            self.adapters.remove(k)
        } else {
            None
        };
        Some((self.items.remove(k).1, adapter))
    }

    /// The weight required under `field` and the adapter on it, if any: the
    /// op that takes it this way applies the adapter.
    pub fn take_adapted(
        &mut self,
        field: &str,
    ) -> Result<(Param, Option<std::sync::Arc<crate::adapter::AdapterSlot>>), OpError> {
        let (p, adapter) = self
            .remove(field)
            .ok_or_else(|| OpError::new(field, "not loaded"))?;
        if let Some(a) = &adapter {
            a.mark_applied();
        }
        Ok((p, adapter))
    }

    /// The weight required under `field`.
    pub fn take(&mut self, field: &str) -> Result<Param, OpError> {
        self.take_opt(field)
            .ok_or_else(|| OpError::new(field, "not loaded"))
    }

    /// A weight that must be dense (norm scales, biases, per-head vectors).
    pub fn dense(&mut self, field: &str) -> Result<Array, OpError> {
        match self.take(field)? {
            Param::Dense(a) => Ok(a),
            Param::Quantized { .. } => Err(OpError::new(field, "cannot be quantized")),
        }
    }

    /// An optional weight that must be dense.
    pub fn dense_opt(&mut self, field: &str) -> Result<Option<Array>, OpError> {
        match self.take_opt(field) {
            None => Ok(None),
            Some(Param::Dense(a)) => Ok(Some(a)),
            Some(Param::Quantized { .. }) => Err(OpError::new(field, "cannot be quantized")),
        }
    }
}

/// Tensors of a checkpoint under their original names.
#[derive(Debug)]
pub struct Checkpoint {
    /// The file named in errors (the single file, or the index).
    pub file: PathBuf,
    pub tensors: IndexMap<String, Array>,
    /// Where each loaded tensor's bytes are, for reading slices alone.
    pub files: FileTensors,
}

/// The safetensors files of a model directory and the file named in errors
/// (the index when sharded, else `model.safetensors`).
pub fn safetensors_files(dir: &Path) -> Result<(PathBuf, Vec<PathBuf>)> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = read_to_string(&index)?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Weights {
            file: index.clone(),
            msg: format!("invalid JSON: {e}"),
        })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::Weights {
                file: index.clone(),
                msg: "no `weight_map` object".into(),
            })?;
        let mut files: Vec<PathBuf> = Vec::new();
        for (tensor, f) in map {
            let name = f.as_str().filter(|s| is_plain_file_name(s));
            let Some(name) = name else {
                return Err(Error::Weights {
                    file: index.clone(),
                    msg: format!(
                        "weight_map: '{tensor}': {f} is not a file name in the model folder"
                    ),
                });
            };
            let f = dir.join(name);
            if !files.contains(&f) {
                files.push(f);
            }
        }
        for f in &files {
            if !f.exists() {
                return Err(Error::Weights {
                    file: index.clone(),
                    msg: format!("shard {} is missing", f.display()),
                });
            }
        }
        return Ok((index, files));
    }
    let single = dir.join("model.safetensors");
    let mut files: Vec<PathBuf> = Vec::new();
    if single.exists() {
        files.push(single.clone());
    } else if let Ok(rd) = std::fs::read_dir(dir) {
        files = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
    }
    if files.is_empty() {
        return Err(Error::Weights {
            file: dir.to_path_buf(),
            msg: "no model.safetensors, index or *.safetensors files".into(),
        });
    }
    Ok((single, files))
}

/// A shard name that stays inside its folder: no separators, not `.`/`..`.
fn is_plain_file_name(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains(['/', '\\', '\0'])
}

/// The header limits in force (`LMSPEC_MAX_HEADER_BYTES` overrides the
/// header size).
pub fn format_limits() -> Result<lmspec_formats::Limits> {
    Ok(lmspec_formats::Limits {
        max_header_bytes: lmspec_spec::limits::limits()?.max_header_bytes,
        ..lmspec_formats::Limits::default()
    })
}

/// Checks a safetensors file's header (lengths, offsets, overlaps) before
/// MLX reads it.
pub(crate) fn check_safetensors(f: &Path) -> Result<lmspec_formats::safetensors::Header> {
    lmspec_formats::safetensors::check_file(f, &format_limits()?).map_err(|e| Error::Weights {
        file: f.to_path_buf(),
        msg: e.to_string(),
    })
}

/// Reads one safetensors file (its header checked first), its tensors by
/// name in name order.
pub fn load_safetensors_file(f: &Path) -> Result<Vec<(String, Array)>> {
    check_safetensors(f)?;
    let loaded = Array::load_safetensors(f).map_err(|e| Error::Weights {
        file: f.to_path_buf(),
        msg: format!("cannot read safetensors: {}", crate::error::mlx_message(&e)),
    })?;
    let mut names: Vec<_> = loaded.into_iter().collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(names)
}

/// Reads the safetensors of a model directory, telling `progress` (when
/// given) of each file read.
pub fn load_safetensors_dir(dir: &Path, progress: Option<&LoadProgress>) -> Result<Checkpoint> {
    let (file, files) = safetensors_files(dir)?;
    let mut tensors = IndexMap::new();
    let mut files_at = FileTensors::new();
    let count = files.len();
    for (i, f) in files.into_iter().enumerate() {
        if let Some(p) = progress {
            (p.0)(i, count, &f);
        }
        let header = check_safetensors(&f)?;
        let loaded = Array::load_safetensors(&f).map_err(|e| Error::Weights {
            file: f.clone(),
            msg: format!("cannot read safetensors: {}", crate::error::mlx_message(&e)),
        })?;
        let data_start = 8 + header.header_len;
        for t in header.tensors {
            let Some(a) = loaded.get(&t.name) else {
                continue;
            };
            let shape = t.shape.iter().map(|&d| d as i64).collect();
            let at = FileTensor::new(f.clone(), data_start + t.begin, shape, &t.dtype);
            if let Some(at) = at.filter(|at| at.shape == shape_of(a)) {
                files_at.insert(file_slice::array_id(a), at);
            }
        }
        let mut names: Vec<_> = loaded.into_iter().collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        tensors.extend(names);
    }
    if let Some(p) = progress {
        (p.0)(count, count, &file);
    }
    Ok(Checkpoint {
        file,
        tensors,
        files: files_at,
    })
}

/// A callback told of weight-loading progress: (files read, files, the
/// file being read next, or the checkpoint at the end).
#[derive(Clone)]
pub struct LoadProgress(pub std::sync::Arc<ProgressFn>);

/// See [`LoadProgress`].
pub type ProgressFn = dyn Fn(usize, usize, &Path) + Send + Sync;

impl std::fmt::Debug for LoadProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoadProgress(..)")
    }
}

/// Tensor names and shapes of a model directory, read from the safetensors
/// headers only (no tensor data).
pub fn read_shapes(dir: &Path) -> Result<IndexMap<String, Vec<i64>>> {
    let (_, files) = safetensors_files(dir)?;
    let mut out = IndexMap::new();
    for f in files {
        let header = check_safetensors(&f)?;
        let mut names: Vec<(String, Vec<i64>)> = header
            .tensors
            .into_iter()
            .map(|t| {
                let shape = t.shape.iter().map(|&d| d as i64).collect();
                (t.name, shape)
            })
            .collect();
        names.sort();
        out.extend(names);
    }
    Ok(out)
}

/// Bit widths of MLX's affine quantization.
pub const QUANT_BITS: [i32; 6] = [2, 3, 4, 5, 6, 8];
/// Group sizes of MLX's affine quantization.
pub const QUANT_GROUP_SIZES: [i32; 3] = [32, 64, 128];
/// Group sizes a loaded weight may have: MLX's, and 16 (the sub-blocks of
/// GGUF's Q2_K, Q3_K and Q6_K), which lmspec's CPU kernels run and which
/// is expanded at load where they do not ([`dequantize_where`]).
pub const HELD_GROUP_SIZES: [i32; 4] = [16, 32, 64, 128];

/// Quantization settings from `config.json`'s `quantization` block.
#[derive(Debug, Clone, Default)]
pub struct Quantization {
    default: Option<(i32, i32)>,
    /// Per-module overrides; `None` marks a module left unquantized.
    overrides: IndexMap<String, Option<(i32, i32)>>,
    /// Tied modules (target, source): a target without an override of its
    /// own is quantized like its source.
    ties: Vec<(String, String)>,
}

impl Quantization {
    pub fn from_config(config: &serde_json::Value, file: &Path) -> Result<Quantization> {
        let found = ["quantization", "quantization_config"]
            .into_iter()
            .find_map(|k| config.get(k).filter(|q| !q.is_null()).map(|q| (k, q)));
        let Some((block_key, block)) = found else {
            return Ok(Quantization::default());
        };
        // Hugging Face's block-scaled FP8 is not an MLX quantization: its
        // weights are dequantized by the spec's `fp8` weight rule. Nor is
        // BitNet's ternary packing, which the `ternary` rule unpacks.
        let method = block.get("quant_method").and_then(|m| m.as_str());
        if matches!(method, Some("fp8" | "bitnet")) {
            return Ok(Quantization::default());
        }
        let block = block.as_object().ok_or_else(|| Error::Config {
            file: file.to_path_buf(),
            key: block_key.to_string(),
            msg: format!("expected an object with group_size and bits, got {block}"),
        })?;
        let err = |key: &str, msg: &str| Error::Config {
            file: file.to_path_buf(),
            key: if key.is_empty() {
                block_key.to_string()
            } else {
                format!("{block_key}.{key}")
            },
            msg: msg.to_string(),
        };
        // A module's own entry may leave group_size or bits out: MLX's
        // `to_quantized` then takes the affine mode's defaults (group 64,
        // 4 bits), not the block's (mlx-lm's rwkv7 writes `{"bits": 8}`).
        let field = |key: &str,
                     v: &serde_json::Map<String, serde_json::Value>,
                     name: &str,
                     default: i64| match v.get(name) {
            None if !key.is_empty() => Ok(default),
            x => x
                .and_then(|x| x.as_i64())
                .ok_or_else(|| err(key, &format!("needs integer {name}"))),
        };
        let pair =
            |key: &str, v: &serde_json::Map<String, serde_json::Value>| -> Result<(i32, i32)> {
                let g = field(key, v, "group_size", 64)?;
                let b = field(key, v, "bits", 4)?;
                if let Some(mode) = v.get("mode").and_then(|m| m.as_str()) {
                    if mode != "affine" {
                        return Err(err(
                            key,
                            &format!("mode '{mode}' is not supported (only affine)"),
                        ));
                    }
                }
                if !i32::try_from(g).is_ok_and(|g| QUANT_GROUP_SIZES.contains(&g)) {
                    return Err(err(
                        key,
                        &format!("group_size {g} is not supported (32, 64 or 128)"),
                    ));
                }
                if !i32::try_from(b).is_ok_and(|b| QUANT_BITS.contains(&b)) {
                    return Err(err(
                        key,
                        &format!("bits {b} is not supported (2, 3, 4, 5, 6 or 8)"),
                    ));
                }
                Ok((g as i32, b as i32))
            };
        let mut q = Quantization {
            default: Some(pair("", block)?),
            overrides: IndexMap::new(),
            ties: Vec::new(),
        };
        for (k, v) in block {
            match v {
                serde_json::Value::Object(o) => {
                    q.overrides.insert(k.clone(), Some(pair(k, o)?));
                }
                serde_json::Value::Bool(false) => {
                    q.overrides.insert(k.clone(), None);
                }
                _ => {}
            }
        }
        Ok(q)
    }

    /// Records the ties the weight rules made.
    pub fn with_ties(mut self, ties: Vec<(String, String)>) -> Quantization {
        self.ties = ties;
        self
    }

    /// Follows the weight rules' module renames (old, new; in rule order):
    /// an override written under a checkpoint's module name also applies
    /// under the name the rules gave that module.
    pub fn with_renames(mut self, renames: &[(String, String)]) -> Quantization {
        for (old, new) in renames {
            if let Some(o) = self.overrides.get(old).copied() {
                self.overrides.entry(new.clone()).or_insert(o);
            }
        }
        self
    }

    /// The (group size, bits) of a module; `None`: not quantized.
    pub fn for_module(&self, module: &str) -> Option<(i32, i32)> {
        if let Some(o) = self.overrides.get(module) {
            return *o;
        }
        match self.ties.iter().find(|(target, _)| target == module) {
            Some((_, source)) => self.for_module(source),
            None => self.default,
        }
    }
}

fn shape_of(a: &Array) -> Vec<i64> {
    a.shape().iter().map(|&d| d as i64).collect()
}

/// Finds every node's weights; checks shapes and that nothing is left over.
/// On a rank of a tensor-parallel run, a sharded weight is that rank's
/// slice of the checkpoint's tensor.
pub fn bind(
    graph: &Graph,
    tensors: &IndexMap<String, Array>,
    quant: &Quantization,
    file: &Path,
    rank: Rank,
    files: &FileTensors,
) -> Result<Vec<Vec<Param>>> {
    let mut used: HashSet<String> = HashSet::new();
    let mut missing: Vec<String> = Vec::new();
    let mut out = Vec::with_capacity(graph.nodes.len());
    for node in &graph.nodes {
        let reqs = &node.resolved.weights;
        if reqs.windows(2).any(|w| w[0].optional && !w[1].optional) {
            return Err(Error::Weights {
                file: file.to_path_buf(),
                msg: format!(
                    "node {}: the {} op lists an optional tensor before a required one",
                    node.path,
                    node.op.name()
                ),
            });
        }
        let mut params = Vec::new();
        for req in reqs {
            let at = || {
                format!(
                    "node {} (field {} of {} in {})",
                    node.path,
                    req.field,
                    node.origin,
                    node.file.display()
                )
            };
            match find(req, tensors, quant, &mut used, rank, files) {
                Ok(Some(p)) => params.push(p),
                // Params pair with the fields in order: an absent optional
                // tensor is only ever among the last.
                Ok(None) if req.optional => {}
                Ok(None) => missing.push(format!("{} needed by {}", req.tensor(), at())),
                Err(msg) => {
                    return Err(Error::Weights {
                        file: file.to_path_buf(),
                        msg: format!("{}: {msg}, needed by {}", req.tensor(), at()),
                    })
                }
            }
        }
        out.push(params);
    }
    if !missing.is_empty() {
        return Err(Error::Weights {
            file: file.to_path_buf(),
            msg: format!(
                "{} tensor(s) missing:\n  {}",
                missing.len(),
                missing.join("\n  ")
            ),
        });
    }
    let unused: Vec<&String> = tensors.keys().filter(|k| !used.contains(*k)).collect();
    if !unused.is_empty() {
        let list: Vec<&str> = unused.iter().map(|s| s.as_str()).collect();
        return Err(Error::Weights {
            file: file.to_path_buf(),
            msg: format!(
                "{} tensor(s) not used by the spec (add a rule to drop them if intended):\n  {}",
                list.len(),
                list.join("\n  ")
            ),
        });
    }
    Ok(out)
}

/// Group size and bits of an affine-quantized matrix with `inp` input
/// features, worked out from its packed shapes (as mlx-lm does when the
/// config does not say).
fn infer_quantization(inp: i64, w: &Array, scales: &Array) -> Option<(i32, i32)> {
    let (packed, groups) = (*shape_of(w).last()?, *shape_of(scales).last()?);
    if groups == 0 || inp % groups != 0 || (packed * 32) % inp != 0 {
        return None;
    }
    let (group, bits) = (inp / groups, packed * 32 / inp);
    let ok = i32::try_from(group).is_ok_and(|g| HELD_GROUP_SIZES.contains(&g))
        && i32::try_from(bits).is_ok_and(|b| QUANT_BITS.contains(&b));
    ok.then_some((group as i32, bits as i32))
}

fn find(
    req: &WeightReq,
    tensors: &IndexMap<String, Array>,
    quant: &Quantization,
    used: &mut HashSet<String>,
    rank: Rank,
    files: &FileTensors,
) -> std::result::Result<Option<Param>, String> {
    let Some(axis) = req.shard_axis.filter(|_| rank.of > 1) else {
        return find_whole(req, tensors, quant, used);
    };
    let Some(w) = tensors.get(&req.tensor()) else {
        return Ok(None);
    };
    let stated = *req
        .shape
        .get(axis)
        .ok_or_else(|| format!("no axis {axis} to split in shape {:?}", req.shape))?;
    // A whole axis is shared evenly; else the node states the rank's share.
    let local = match req.shard_whole {
        true if stated % rank.of as i64 == 0 => stated / rank.of as i64,
        true => {
            return Err(format!(
                "axis {axis} of {:?}: {stated} cannot be shared evenly by {} ranks",
                req.shape, rank.of
            ))
        }
        false => stated,
    };
    // A quantized weight's input axis is packed: its whole width is the
    // world's share times the world size (never copied).
    let packed_axis = req.quantizable
        && axis + 1 == req.shape.len()
        && tensors.contains_key(&format!("{}.scales", req.module));
    let global = match packed_axis {
        true => local * rank.of as i64,
        false => shape_of(w).get(axis).copied().unwrap_or(0),
    };
    let mut whole = req.clone();
    whole.shape[axis] = global;
    let Some(param) = find_whole(&whole, tensors, quant, used)? else {
        return Ok(None);
    };
    let start = shard_start(global, local, rank, req.shard_copies).map_err(|msg| {
        format!(
            "axis {axis} of {:?}: {msg} (tensor parallelism over {} ranks)",
            whole.shape, rank.of
        )
    })?;
    shard_param(param, axis, start, local, files)
        .map(Some)
        .map_err(|e| format!("splitting it: {e}"))
}

/// Where rank `rank`'s slice of `local` values starts among `global`: the
/// ranks split the axis evenly, or, when `copies` allows and they
/// outnumber its `global / local` slices, each slice is copied to
/// consecutive ranks.
fn shard_start(
    global: i64,
    local: i64,
    rank: Rank,
    copies: bool,
) -> std::result::Result<i64, String> {
    let of = rank.of as i64;
    let slices = if local > 0 { global / local } else { 0 };
    let fits = slices == of || (copies && slices > 0 && slices < of && of % slices == 0);
    if local <= 0 || global % local != 0 || !fits {
        return Err(format!(
            "{global} values cannot be split into {of} rank slices of {local} (is an entry missing from the spec's `parallel` section?)"
        ));
    }
    let index = rank.index as i64;
    Ok(index / (of / slices) * local)
}

/// `len` values from `start` along `axis` of a loaded param: read alone
/// from the file when the tensor came straight from one, else cut from the
/// whole tensor and copied (the whole is not kept). A quantized param's
/// last axis counts unpacked input features and must keep whole groups.
fn shard_param(
    p: Param,
    axis: usize,
    start: i64,
    len: i64,
    files: &FileTensors,
) -> std::result::Result<Param, String> {
    let take = |a: &Array, axis: usize, start: i64, len: i64| {
        if let Some(at) = files.get(&file_slice::array_id(a)) {
            return at.slice(axis, start, len);
        }
        let idx = Array::from_iter(start as i32..(start + len) as i32, &[len as i32]);
        a.take_axis(&idx, axis as i32).map_err(|e| e.to_string())
    };
    match p {
        Param::Dense(w) => Ok(Param::Dense(take(&w, axis, start, len)?)),
        Param::Quantized {
            w,
            scales,
            biases,
            group_size,
            bits,
        } => {
            let last = w.ndim() - 1;
            let (packed, grouped) = if axis == last {
                let g = group_size as i64;
                if start % g != 0 || len % g != 0 {
                    return Err(format!(
                        "a slice of {len} input features from {start} does not keep whole quantization groups of {group_size}"
                    ));
                }
                // The packed words are cut whole: 32 values hold whole words
                // at every width, 16 only at 2 and 6 bits.
                if (start * bits as i64) % 32 != 0 || (len * bits as i64) % 32 != 0 {
                    return Err(format!(
                        "a slice of {len} input features from {start} cuts the {bits}-bit packed words"
                    ));
                }
                let words = |n: i64| n * bits as i64 / 32;
                ((words(start), words(len)), (start / g, len / g))
            } else {
                ((start, len), (start, len))
            };
            Ok(Param::Quantized {
                w: take(&w, axis, packed.0, packed.1)?,
                scales: take(&scales, axis, grouped.0, grouped.1)?,
                biases: take(&biases, axis, grouped.0, grouped.1)?,
                group_size,
                bits,
            })
        }
    }
}

fn find_whole(
    req: &WeightReq,
    tensors: &IndexMap<String, Array>,
    quant: &Quantization,
    used: &mut HashSet<String>,
) -> std::result::Result<Option<Param>, String> {
    let name = req.tensor();
    let Some(w) = tensors.get(&name) else {
        return Ok(None);
    };
    let scales_name = format!("{}.scales", req.module);
    let biases_name = format!("{}.biases", req.module);
    match tensors.get(&scales_name) {
        Some(scales) if req.quantizable => {
            // Leading axes (rows, and experts when stacked) stay; the last
            // (input features) is packed and grouped.
            let (inp, lead) = req
                .shape
                .split_last()
                .ok_or_else(|| "a quantized weight needs at least one axis".to_string())?;
            let inp = *inp;
            let (group_size, bits) = match quant.for_module(&req.module) {
                Some(gb) => gb,
                None => infer_quantization(inp, w, scales).ok_or_else(|| {
                    format!(
                        "has `scales` but no quantization settings cover module '{}' and the shapes {:?} / {:?} fit no MLX affine layout",
                        req.module,
                        shape_of(w),
                        shape_of(scales)
                    )
                })?,
            };
            let biases = tensors
                .get(&biases_name)
                .ok_or_else(|| format!("quantized but `{biases_name}` is missing"))?;
            let with_last = |last: i64| lead.iter().copied().chain([last]).collect::<Vec<_>>();
            let want_w = with_last(inp * bits as i64 / 32);
            let want_s = with_last(inp / group_size as i64);
            if shape_of(w) != want_w || shape_of(scales) != want_s || shape_of(biases) != want_s {
                return Err(format!(
                    "quantized shapes weight {:?} / scales {:?} do not match {:?} at {bits} bits, group {group_size} (expected {want_w:?} / {want_s:?})",
                    shape_of(w),
                    shape_of(scales),
                    req.shape
                ));
            }
            // MLX's affine layout: packed 32-bit words, float scales and
            // biases. Other types would reach MLX's kernels unchecked.
            if w.dtype() != mlx_rs::Dtype::Uint32 {
                return Err(format!(
                    "dtype: a quantized weight is packed in U32 words, this one is {:?}",
                    w.dtype()
                ));
            }
            for (part, a) in [(&scales_name, scales), (&biases_name, biases)] {
                if !is_float(a.dtype()) {
                    return Err(format!(
                        "dtype: `{part}` must hold floats, it holds {:?}",
                        a.dtype()
                    ));
                }
            }
            used.extend([name.clone(), scales_name, biases_name]);
            Ok(Some(Param::Quantized {
                w: w.clone(),
                scales: scales.clone(),
                biases: biases.clone(),
                group_size,
                bits,
            }))
        }
        _ => {
            if !req.fits(&shape_of(w)) {
                return Err(format!(
                    "shape mismatch: checkpoint has {:?}, spec expects {:?}",
                    shape_of(w),
                    req.shape
                ));
            }
            if !is_float(w.dtype()) {
                return Err(format!(
                    "dtype: a weight must hold floats, this one holds {:?}",
                    w.dtype()
                ));
            }
            used.insert(name);
            Ok(Some(Param::Dense(w.clone())))
        }
    }
}

fn is_float(d: mlx_rs::Dtype) -> bool {
    use mlx_rs::Dtype::*;
    matches!(d, Float16 | Bfloat16 | Float32 | Float64)
}

/// Whether any loaded weight is quantized.
pub fn has_quantized(params: &[Vec<Param>]) -> bool {
    params
        .iter()
        .flatten()
        .any(|p| matches!(p, Param::Quantized { .. }))
}

/// Whether lmspec's CPU kernels run every quantized weight among `params`.
pub fn kernels_cover(params: &[Vec<Param>]) -> bool {
    params.iter().flatten().all(kernels_run)
}

/// Whether lmspec's CPU kernels run this weight: dense, or a 2-D matrix of
/// an affine width they take (not a stack of experts).
pub fn kernels_run(p: &Param) -> bool {
    match p {
        Param::Quantized { w, bits, .. } => {
            w.ndim() == 2 && crate::cpu_kernels::supports_bits(*bits)
        }
        Param::Dense(_) => true,
    }
}

/// Bytes the quantized weights would take as float32.
pub fn dense_bytes(params: &[Vec<Param>]) -> usize {
    params
        .iter()
        .flatten()
        .map(|p| match p {
            Param::Quantized { w, bits, .. } => {
                let s = w.shape();
                let cols = *s.last().unwrap_or(&0) as usize * 32 / (*bits).max(1) as usize;
                s.iter()
                    .rev()
                    .skip(1)
                    .map(|d| *d as usize)
                    .product::<usize>()
                    * cols
                    * 4
            }
            Param::Dense(_) => 0,
        })
        .sum()
}

/// Weights below this total stay where they are: a model this small gains
/// nothing from huge pages and would hold a 2 MB page for kilobytes.
const HUGE_PAGES_FROM: usize = 16 << 20;

/// The most bytes copied at once (or one weight, where it is larger), so
/// that moving the weights holds at most that much twice.
const ARENA_CHUNK: usize = 64 << 20;

/// The arrays of a param, mutably.
fn arrays_mut(p: &mut Param) -> Vec<&mut Array> {
    match p {
        Param::Dense(a) => vec![a],
        Param::Quantized {
            w, scales, biases, ..
        } => vec![w, scales, biases],
    }
}

/// Every array of every param, in one fixed order.
fn all_arrays(params: &mut [Vec<Param>]) -> impl Iterator<Item = &mut Array> {
    params.iter_mut().flatten().flat_map(arrays_mut)
}

/// What makes two arrays one weight: their data, shape and dtype (a
/// reshaped view shares the data, not the shape). `None`: an array to
/// leave where it is (a strided view).
type BufferKey = (usize, Vec<i32>, mlx_rs::Dtype);

fn buffer_key(a: &Array) -> std::result::Result<Option<BufferKey>, Exception> {
    let ptr = crate::cpu_kernels::data_ptr(a)?;
    if ptr == 0 || !crate::cpu_kernels::row_contiguous(a) {
        return Ok(None);
    }
    Ok(Some((ptr, a.shape().to_vec(), a.dtype())))
}

/// Moves every weight into memory of lmspec's own, aligned to 2 MB and
/// advised for transparent huge pages ([`crate::cpu_kernels::weight_arena`]),
/// a chunk at a time: a decode step streams every weight once, and with 4 KB
/// pages its reads also walk a page table entry per 4 KB (an installed
/// model's 8-bit output head, 178 MB, int8 activations: 5.7-7.4 ms per product on
/// 4 KB pages against 5.0-6.2 on 2 MB ones). Values are unchanged; arrays
/// that share a buffer (a tied embedding and head) share the copy. Nothing
/// moves where transparent huge pages are off or the weights are under
/// 16 MB.
pub fn to_huge_pages(params: &mut [Vec<Param>]) -> Result<()> {
    let weights_err = |e: Exception| Error::Usage(format!("moving weights to huge pages: {e}"));
    // The distinct buffers, in order of first use, with their sizes, and
    // each array's buffer in the order `all_arrays` walks them (`None`: an
    // array that stays).
    let mut keys: Vec<BufferKey> = Vec::new();
    let mut sizes: Vec<usize> = Vec::new();
    let mut slot_of: Vec<Option<usize>> = Vec::new();
    for a in all_arrays(params) {
        let slot = buffer_key(a).map_err(weights_err)?.map(|key| {
            keys.iter().position(|k| *k == key).unwrap_or_else(|| {
                keys.push(key);
                sizes.push(a.nbytes());
                keys.len() - 1
            })
        });
        slot_of.push(slot);
    }
    if sizes.iter().sum::<usize>() < HUGE_PAGES_FROM {
        return Ok(());
    }
    let mut start = 0;
    while start < keys.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < keys.len() && (end == start || bytes + sizes[end] <= ARENA_CHUNK) {
            bytes += sizes[end];
            end += 1;
        }
        // The arrays of the chunk, each with its buffer's index in it.
        let in_chunk =
            |slot: &Option<usize>| slot.filter(|i| (start..end).contains(i)).map(|i| i - start);
        let mut originals: Vec<Option<Array>> = vec![None; end - start];
        for (a, slot) in all_arrays(params).zip(&slot_of) {
            if let Some(i) = in_chunk(slot) {
                originals[i].get_or_insert_with(|| a.clone());
            }
        }
        let refs: Vec<&Array> = originals.iter().flatten().collect();
        if refs.len() != end - start {
            return Err(Error::Usage(
                "moving weights to huge pages: a weight changed while it was moved".into(),
            ));
        }
        let Some(copies) = crate::cpu_kernels::weight_arena(&refs).map_err(weights_err)? else {
            return Ok(());
        };
        drop(refs);
        drop(originals);
        for (a, slot) in all_arrays(params).zip(&slot_of) {
            if let Some(i) = in_chunk(slot) {
                *a = copies[i].clone();
            }
        }
        // The originals' memory goes back to the system before the next
        // chunk: MLX's cache of freed buffers, and what the C heap keeps of
        // freed blocks (72 MB more resident without this on a 270 MB model).
        mlx_rs::memory::clear_cache().map_err(weights_err)?;
        // SAFETY: malloc_trim only releases free heap memory.
        unsafe {
            libc::malloc_trim(0);
        }
        start = end;
    }
    Ok(())
}

/// Replaces every quantized weight by its float32 dequantization, evaluated
/// now so that no quantized buffer stays alive. Weights shared by several
/// nodes (a tied embedding and head) are dequantized once and stay shared.
pub fn dequantize_all(params: &mut [Vec<Param>]) -> Result<()> {
    dequantize_where(params, |_, _| true)
}

/// As [`dequantize_all`], for the quantized weights `pick(node, weight)`
/// names.
pub fn dequantize_where(
    params: &mut [Vec<Param>],
    pick: impl Fn(usize, &Param) -> bool,
) -> Result<()> {
    let mut done: Vec<(*const u32, Array)> = Vec::new();
    for (node, ps) in params.iter_mut().enumerate() {
        for p in ps.iter_mut() {
            let Param::Quantized { w, .. } = &*p else {
                continue;
            };
            if !pick(node, p) {
                continue;
            }
            w.eval()?;
            let key = w.as_slice::<u32>().as_ptr();
            let dense = match done.iter().find(|(k, _)| *k == key) {
                Some((_, d)) => d.clone(),
                None => {
                    let d = p.dense()?.as_dtype(mlx_rs::Dtype::Float32)?;
                    d.eval()?;
                    done.push((key, d.clone()));
                    d
                }
            };
            *p = Param::Dense(dense);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 6- or 3-bit weight in groups of 16 (GGUF's K-quant sub-blocks).
    fn sixteens(rows: i32, k: i32, bits: i32) -> Param {
        let words = k * bits / 32;
        let w: Vec<u32> = (0..rows * words)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761))
            .collect();
        let s: Vec<f32> = (0..rows * k / 16)
            .map(|i| 0.01 * (i % 7) as f32 + 0.02)
            .collect();
        let b: Vec<f32> = (0..rows * k / 16).map(|i| -0.1 * (i % 5) as f32).collect();
        Param::Quantized {
            w: Array::from_slice(&w, &[rows, words]),
            scales: Array::from_slice(&s, &[rows, k / 16]),
            biases: Array::from_slice(&b, &[rows, k / 16]),
            group_size: 16,
            bits,
        }
    }

    #[test]
    fn sixteen_value_groups_expand_where_picked() {
        let (keep, expand) = (sixteens(4, 64, 6), sixteens(4, 64, 6));
        assert!(!keep.mlx_takes());
        let want = expand.dense().expect("dense");
        let mut params = vec![vec![keep], vec![expand]];
        dequantize_where(&mut params, |node, p| node == 1 && !p.mlx_takes()).expect("expand");
        assert!(matches!(
            params[0][0],
            Param::Quantized { group_size: 16, .. }
        ));
        match &params[1][0] {
            Param::Dense(d) => assert!(d.eq_values(&want).expect("compare")),
            p => panic!("not expanded: {p:?}"),
        }
        // Leading axes (a stack of experts) expand row by row.
        let Param::Quantized {
            w, scales, biases, ..
        } = sixteens(6, 64, 6)
        else {
            unreachable!()
        };
        let stacked = dequantize(
            &w.reshape(&[2, 3, 12]).expect("w"),
            &scales.reshape(&[2, 3, 4]).expect("s"),
            &biases.reshape(&[2, 3, 4]).expect("b"),
            16,
            6,
        )
        .expect("stacked");
        let flat = dequantize(&w, &scales, &biases, 16, 6).expect("flat");
        assert_eq!(stacked.shape(), &[2, 3, 64]);
        let flat = flat.reshape(&[2, 3, 64]).expect("reshape");
        assert!(stacked.eq_values(&flat).expect("compare"));
    }

    #[test]
    fn a_slice_may_not_cut_packed_words() {
        let files = FileTensors::default();
        // 3 bits x 16 values = 48 bits: 16 features from 16 cut a word.
        let e = shard_param(sixteens(2, 64, 3), 1, 16, 16, &files).expect_err("cut");
        assert!(e.contains("cuts the 3-bit packed words"), "{e}");
        // 32 values of 3 bits are whole words; 16 of 6 bits too.
        assert!(shard_param(sixteens(2, 64, 3), 1, 32, 32, &files).is_ok());
        assert!(shard_param(sixteens(2, 64, 6), 1, 16, 16, &files).is_ok());
    }

    #[test]
    fn overrides_follow_the_rules_renames_and_ties() {
        let config = serde_json::json!({"quantization": {
            "group_size": 64, "bits": 4,
            "transformer.h.0.attn": {"group_size": 32, "bits": 8},
            "transformer.h.1.attn": false,
        }});
        let renames = [
            (
                "transformer.h.0.attn".to_string(),
                "model.layers.0.self_attn".to_string(),
            ),
            (
                "transformer.h.1.attn".to_string(),
                "model.layers.1.self_attn".to_string(),
            ),
        ];
        let q = Quantization::from_config(&config, Path::new("config.json"))
            .expect("valid")
            .with_renames(&renames)
            .with_ties(vec![("lm_head".into(), "model.layers.0.self_attn".into())]);
        assert_eq!(q.for_module("model.layers.0.self_attn"), Some((32, 8)));
        assert_eq!(q.for_module("transformer.h.0.attn"), Some((32, 8)));
        assert_eq!(q.for_module("model.layers.1.self_attn"), None);
        assert_eq!(q.for_module("lm_head"), Some((32, 8)));
        assert_eq!(q.for_module("model.embed_tokens"), Some((64, 4)));
    }

    #[test]
    fn a_module_entry_without_group_size_or_bits_takes_the_affine_defaults() {
        // As MLX's `to_quantized(**entry)`: group 64 and 4 bits, not the
        // block's group 32 and 8 bits.
        let config = serde_json::json!({"quantization": {
            "group_size": 32, "bits": 8,
            "model.embeddings": {"bits": 6},
            "lm_head": {"group_size": 128},
        }});
        let q = Quantization::from_config(&config, Path::new("config.json")).expect("valid");
        assert_eq!(q.for_module("model.embeddings"), Some((64, 6)));
        assert_eq!(q.for_module("lm_head"), Some((128, 4)));
        assert_eq!(q.for_module("model.layers.0.mlp"), Some((32, 8)));
        // The block itself must say both.
        let config = serde_json::json!({"quantization": {"bits": 4}});
        let e = Quantization::from_config(&config, Path::new("config.json")).expect_err("no group");
        assert!(e.to_string().contains("needs integer group_size"), "{e}");
        let config = serde_json::json!({"quantization": {"group_size": 64, "bits": 4,
            "lm_head": {"bits": "eight"}}});
        let e = Quantization::from_config(&config, Path::new("config.json")).expect_err("bits");
        assert!(e.to_string().contains("quantization.lm_head"), "{e}");
    }

    fn f32s(a: &Array) -> Vec<f32> {
        let a = a.as_dtype(mlx_rs::Dtype::Float32).unwrap();
        a.eval().unwrap();
        a.as_slice::<f32>().to_vec()
    }

    #[test]
    fn weights_moved_to_huge_pages_keep_their_values_and_their_sharing() {
        // 16 MB shared by two nodes (a tied embedding and head), a
        // quantized weight and a reshaped view of the shared one.
        let big = Array::from_iter((0..4 << 20).map(|i| (i % 1000) as f32), &[2048, 2048]);
        let (w, scales, biases) = mlx_rs::ops::quantize(&big, 64, 4).unwrap();
        let view = big.reshape(&[4096, 1024]).unwrap();
        let mut params = vec![
            vec![Param::Dense(big.clone())],
            vec![Param::Quantized {
                w: w.clone(),
                scales: scales.clone(),
                biases: biases.clone(),
                group_size: 64,
                bits: 4,
            }],
            vec![Param::Dense(big.clone())],
            vec![Param::Dense(view.clone())],
        ];
        let before = crate::cpu_kernels::arena_bytes();
        to_huge_pages(&mut params).expect("moves");
        let ptr = |p: &Param| crate::cpu_kernels::data_ptr(first_of(p)).unwrap();
        if crate::cpu_kernels::arena_bytes() == before {
            // No huge-page memory on this system: nothing moved.
            assert_eq!(
                ptr(&params[0][0]),
                crate::cpu_kernels::data_ptr(&big).unwrap()
            );
            return;
        }
        assert_ne!(
            ptr(&params[0][0]),
            crate::cpu_kernels::data_ptr(&big).unwrap()
        );
        assert_eq!(
            ptr(&params[0][0]),
            ptr(&params[2][0]),
            "the tie stays one buffer"
        );
        assert_eq!(first_of(&params[3][0]).shape(), &[4096, 1024]);
        assert_eq!(f32s(first_of(&params[0][0])), f32s(&big));
        assert_eq!(f32s(first_of(&params[3][0])), f32s(&view));
        let Param::Quantized {
            w: w2,
            scales: s2,
            biases: b2,
            ..
        } = &params[1][0]
        else {
            panic!("still quantized")
        };
        assert_eq!(
            f32s(&params[1][0].dense().unwrap()),
            f32s(&dequantize(&w, &scales, &biases, 64, 4).unwrap())
        );
        assert_eq!(f32s(s2), f32s(&scales));
        assert_eq!(f32s(b2), f32s(&biases));
        assert_eq!(w2.dtype(), w.dtype());
        drop(params);
        assert_eq!(
            crate::cpu_kernels::arena_bytes(),
            before,
            "the mapping goes with the weights"
        );
    }

    fn first_of(p: &Param) -> &Array {
        match p {
            Param::Dense(a) => a,
            Param::Quantized { w, .. } => w,
        }
    }

    #[test]
    fn small_models_keep_their_weights_where_they_are() {
        let a = Array::from_iter((0..1024).map(|i| i as f32), &[32, 32]);
        let mut params = vec![vec![Param::Dense(a.clone())]];
        to_huge_pages(&mut params).expect("nothing to do");
        let Param::Dense(b) = &params[0][0] else {
            panic!("dense")
        };
        assert_eq!(
            crate::cpu_kernels::data_ptr(b).unwrap(),
            crate::cpu_kernels::data_ptr(&a).unwrap()
        );
    }
}
