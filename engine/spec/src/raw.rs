//! The spec file format as serde structs: what a YAML file may contain,
//! before any validation. `docs/spec-language.md` documents each field.
use indexmap::IndexMap;
use serde::Deserialize;

/// The spec language version this engine reads.
pub const SPEC_VERSION: u32 = 1;

/// One YAML file: an architecture (`specs/models/`) or a block library
/// (`specs/blocks/`, only `spec_version` and `blocks`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSpec {
    pub spec_version: u32,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub model_types: Vec<String>,
    /// What the spec's output is for (`generate`: logits; `embed`: hidden
    /// states an embedder pools; `classify`: per-token class scores). Two
    /// specs may claim one `model_type` when their tasks differ.
    #[serde(default)]
    pub task: Option<Task>,
    #[serde(default)]
    pub extends: Option<String>,
    #[serde(default)]
    pub config: IndexMap<String, RawBinding>,
    #[serde(default)]
    pub blocks: IndexMap<String, RawBlock>,
    #[serde(default)]
    pub layers: Option<RawLayers>,
    #[serde(default)]
    pub model: Option<RawBlock>,
    #[serde(default)]
    pub weights: RawWeights,
    /// How GGUF checkpoints map onto this spec.
    #[serde(default)]
    pub gguf: Option<RawGguf>,
    /// Tool-call format used when neither the tokenizer config nor the chat
    /// template names one (a file name in `specs/tool-formats/`).
    #[serde(default)]
    pub tool_format: Option<String>,
    /// Checkpoint keys the reference reads that this spec does not compute
    /// with: accepted with one value only, or ignored for a reason.
    #[serde(default)]
    pub config_keys: RawConfigKeys,
    /// Tensor parallelism: the config values each rank holds a share of
    /// (the nodes say which weights are split with `shard`).
    #[serde(default)]
    pub parallel: Option<RawParallel>,
}

/// `parallel`: config entries divided by the world size on each rank of a
/// tensor-parallel run. Without this section a spec runs on one rank only.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawParallel {
    /// Divided by the world size, which must divide them (query heads,
    /// intermediate widths).
    #[serde(default)]
    pub split: Vec<String>,
    /// Divided by the world size, which must divide them or be a multiple
    /// of them: then every rank holds one, copied (key/value heads).
    #[serde(default)]
    pub split_or_copy: Vec<String>,
}

/// A spec's task: which loader picks it for a `model_type`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Logits over the vocabulary (language models).
    #[default]
    Generate,
    /// Last hidden states, pooled into sentence vectors by an embedder.
    Embed,
    /// Class scores per position (cross-encoder rerankers).
    Classify,
    /// A vision tower: flattened image patches in, features for the text
    /// model's placeholders out (loaded beside the `generate` spec of a
    /// vision-language checkpoint).
    Vision,
}

impl Task {
    pub fn name(self) -> &'static str {
        match self {
            Task::Generate => "generate",
            Task::Embed => "embed",
            Task::Classify => "classify",
            Task::Vision => "vision",
        }
    }
}

/// `config_keys`: what the spec says about checkpoint keys it does not read.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfigKeys {
    /// Accepted when absent, null or equal to this value; any other value
    /// is refused, naming the key, the value and the spec.
    #[serde(default)]
    pub only: IndexMap<String, serde_yaml::Value>,
    /// Read by the reference but without effect here; the reason says why.
    #[serde(default)]
    pub ignored: IndexMap<String, String>,
}

/// GGUF support: which `general.architecture` values the spec serves, how
/// config entries come from GGUF metadata, and the tensor renames from GGUF
/// names to the spec's (applied before the spec's own weight rules).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGguf {
    pub architectures: Vec<String>,
    /// config.json key -> source. `{arch}` in a metadata key is replaced by
    /// the file's architecture.
    #[serde(default)]
    pub config: indexmap::IndexMap<String, GgufSource>,
    #[serde(default)]
    pub rules: Vec<RawRule>,
}

/// Where a config value comes from in a GGUF file.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum GgufSource {
    /// A metadata key.
    Key(String),
    /// The length of a metadata array (`{len: tokenizer.ggml.tokens}`).
    Len { len: String },
    /// Whether a tensor is absent (`{absent: output.weight}`).
    Absent { absent: String },
    /// A constant.
    Value { value: serde_yaml::Value },
}

/// A config binding: `name: int` (shorthand) or the full form.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawBinding {
    Type(String),
    Full(Box<BindingDef>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingDef {
    #[serde(rename = "type")]
    pub ty: String,
    /// Config keys to read, first present wins (dotted paths reach nested maps).
    #[serde(default)]
    pub from: Option<OneOrMany>,
    /// Used when no key is present: a literal, or an expression where the
    /// type is a number or bool and the YAML value is a string.
    #[serde(default, deserialize_with = "present")]
    pub default: Option<serde_yaml::Value>,
    /// Always computed, never read from the config.
    #[serde(default, deserialize_with = "present")]
    pub value: Option<serde_yaml::Value>,
    /// Absent with no default binds `null` instead of failing.
    #[serde(default)]
    pub optional: bool,
    /// An expression evaluated again for each layer with `i` bound (and
    /// `null` outside layers), e.g. a per-layer window or RoPE base.
    #[serde(default, deserialize_with = "present")]
    pub per_layer: Option<serde_yaml::Value>,
    #[serde(default)]
    pub doc: Option<String>,
}

/// A field that is present: `Some` even when it is YAML `null`
/// (`value: null` binds null; an absent field stays `None`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<serde_yaml::Value>, D::Error> {
    serde_yaml::Value::deserialize(d).map(Some)
}

/// A string or a list of strings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::None => Vec::new(),
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// A block: named dataflow over primitives and other blocks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBlock {
    #[serde(default)]
    pub inputs: Vec<String>,
    pub nodes: IndexMap<String, RawNode>,
    pub output: String,
}

/// One node: `op` (a primitive) or `block` (a call), its inputs, and the
/// op's parameters inline.
#[derive(Debug, Clone, Deserialize)]
pub struct RawNode {
    #[serde(default)]
    pub op: Option<String>,
    #[serde(default)]
    pub block: Option<String>,
    #[serde(rename = "in", default)]
    pub inputs: OneOrMany,
    /// Weight scope added for this node (and everything inside a called block).
    #[serde(default)]
    pub scope: Option<String>,
    /// When this evaluates false, the node passes its first input through.
    #[serde(default)]
    pub when: Option<serde_yaml::Value>,
    /// With `when`: the value the skipped node stands for instead of its
    /// first input.
    #[serde(rename = "else", default)]
    pub otherwise: Option<String>,
    #[serde(flatten)]
    pub params: IndexMap<String, serde_yaml::Value>,
}

impl RawNode {
    /// Every value the node reads: its inputs, then its `else`.
    pub fn reads(&self) -> Vec<String> {
        let mut v = self.inputs.to_vec();
        v.extend(self.otherwise.iter().cloned());
        v
    }
}

/// The layer schedule: how many layers and which block each one runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLayers {
    pub count: serde_yaml::Value,
    /// Weight scope of layer `i`, e.g. `model.layers.{i}`.
    pub prefix: String,
    #[serde(default)]
    pub block: Option<String>,
    /// First matching entry wins; an entry without `when` always matches.
    #[serde(default)]
    pub select: Vec<RawSelect>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSelect {
    #[serde(default)]
    pub when: Option<serde_yaml::Value>,
    pub block: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWeights {
    #[serde(default)]
    pub rules: Vec<RawRule>,
}

/// A weight rule, applied in order to checkpoint tensor names. Written as
/// a one-key map: `- drop: PATTERN`, `- rename: {from, to}`, ...
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RuleRepr")]
pub enum RawRule {
    /// Drop tensors whose name matches the pattern.
    Drop(String),
    /// Drop the tensors matching the pattern for which `when` (a bool
    /// expression that sees the layer index of the name's `{i}`) holds.
    DropWhen {
        pattern: String,
        when: serde_yaml::Value,
    },
    /// Rename matching tensors; captures like `{i}` carry over.
    Rename { from: String, to: String },
    /// Make `target` an alias of `source` (all its tensors), dropping any
    /// checkpoint tensors of `target`, when the condition holds.
    Tie {
        target: String,
        source: String,
        #[serde(default)]
        when: Option<serde_yaml::Value>,
        /// Tie only when the checkpoint has no tensor of `target` (mlx-lm
        /// models that tie a missing head and keep a present one).
        #[serde(default)]
        if_missing: bool,
    },
    /// Skip the rest of the rules when a tensor with this pattern exists
    /// (the checkpoint is already in the spec's naming).
    SkipIfPresent(String),
    /// Transpose the two axes of matching 2-D tensors ([in, out] layouts
    /// such as Conv1D projections, to the [out, in] `linear` expects).
    Transpose(String),
    /// Stack the tensors matching `from` that fill `to` to one name along a
    /// new first axis, ordered by the integer capture `index` (per-expert
    /// tensors into one `[E, ...]` tensor).
    Stack {
        from: String,
        to: String,
        index: String,
    },
    /// Reshape matching tensors to `shape` (int literals or expressions,
    /// one of them may be -1: the size that keeps the element count).
    Reshape {
        pattern: String,
        shape: Vec<serde_yaml::Value>,
    },
    /// Repeat every element of matching tensors `times` times along `axis`
    /// (numpy's `repeat`: per-head values widened to per-channel ones).
    Repeat {
        pattern: String,
        axis: i64,
        times: serde_yaml::Value,
    },
    /// Divide matching floating-point tensors by their L2 norm along `axis`
    /// plus `eps`, computed in float32 (a normalised head); integer
    /// (quantized) tensors are left alone.
    L2Normalize {
        pattern: String,
        axis: i64,
        eps: f64,
        when: Option<serde_yaml::Value>,
    },
    /// Move axis `from` of matching tensors to position `to` (numpy's
    /// `moveaxis`; Hugging Face's conv1d `[C, 1, K]` to `[C, K, 1]`), for
    /// tensors whose shape satisfies `if_shape` (an expression of `shape`).
    MoveAxis {
        pattern: String,
        from: i64,
        to: i64,
        if_shape: Option<String>,
    },
    /// Cut each matching tensor into `to.len()` parts along `axis` (equal
    /// consecutive blocks, blocks of `sizes`, or with `interleaved` every
    /// n-th row), named by
    /// filling each `to` pattern with the match's captures (a fused
    /// `gate_up` `[E, 2F, D]` into `gate` and `up`).
    Split {
        pattern: String,
        axis: i64,
        to: Vec<String>,
        interleaved: bool,
        /// The parts' sizes (int expressions), when not equal.
        sizes: Option<Vec<serde_yaml::Value>>,
    },
    /// Dequantize FP8 (e4m3) weights stored as bytes, each
    /// `block` x `block` tile multiplied by its entry of the scale tensor
    /// (`weight_scale_inv`), to bfloat16; the scale tensors go.
    Fp8 {
        pattern: String,
        scale: String,
        block: i64,
    },
    /// Unpack BitNet's ternary weights: bytes `[out / 4, in]` whose bit
    /// pair j (bits 2j, 2j + 1) of row r holds v for row r + j·out/4 of the
    /// weight, worth v − 1, times the scale tensor (`weight_scale`, one
    /// value), in the scale's dtype; the scale tensors go.
    Ternary { pattern: String, scale: String },
    /// Lay out the sign vectors of blockwise Hadamard-rotated weights:
    /// every matching tensor `[in]` (each value +1 or -1) becomes
    /// `[in / block, block]`, the ops' mark of a rotated input (or, on an
    /// embedding, output). The block comes from the manifest, a list of
    /// records (`manifest`, a config expression): the record whose fields
    /// named like the pattern's captures equal them, its field `block`.
    /// A record with a block above 0 needs its tensor; 0 means none.
    /// With `when` (a bool expression), only when it holds.
    Hadamard {
        pattern: String,
        manifest: serde_yaml::Value,
        block: String,
        when: Option<serde_yaml::Value>,
    },
    /// Add a constant to matching floating-point tensors (zero-centred
    /// `(1 + w)` norms stored as `w`), for tensors whose shape satisfies
    /// `if_shape`.
    Add {
        pattern: String,
        value: f64,
        if_shape: Option<String>,
        /// Only when some tensor matches this pattern (a layout's marker,
        /// e.g. per-expert tensors that only Hugging Face checkpoints hold).
        if_present: Option<String>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleRepr {
    #[serde(default)]
    drop: Option<DropRepr>,
    #[serde(default)]
    rename: Option<RenameRepr>,
    #[serde(default)]
    tie: Option<TieRepr>,
    #[serde(default)]
    skip_if_present: Option<String>,
    #[serde(default)]
    transpose: Option<String>,
    #[serde(default)]
    stack: Option<StackRepr>,
    #[serde(default)]
    reshape: Option<ReshapeRepr>,
    #[serde(default)]
    repeat: Option<RepeatRepr>,
    #[serde(default)]
    l2_normalize: Option<L2NormalizeRepr>,
    #[serde(default)]
    moveaxis: Option<MoveAxisRepr>,
    #[serde(default)]
    split: Option<SplitRepr>,
    #[serde(default)]
    fp8: Option<Fp8Repr>,
    #[serde(default)]
    ternary: Option<TernaryRepr>,
    #[serde(default)]
    hadamard: Option<HadamardRepr>,
    #[serde(default)]
    add: Option<AddRepr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MoveAxisRepr {
    #[serde(rename = "match")]
    pattern: String,
    from: i64,
    to: i64,
    #[serde(default)]
    if_shape: Option<String>,
}

fn fp8_block() -> i64 {
    128
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Fp8Repr {
    #[serde(rename = "match")]
    pattern: String,
    scale: String,
    #[serde(default = "fp8_block")]
    block: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TernaryRepr {
    #[serde(rename = "match")]
    pattern: String,
    scale: String,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum DropRepr {
    Pattern(String),
    When(DropWhenRepr),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DropWhenRepr {
    #[serde(rename = "match")]
    pattern: String,
    when: serde_yaml::Value,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HadamardRepr {
    #[serde(rename = "match")]
    pattern: String,
    manifest: serde_yaml::Value,
    block: String,
    #[serde(default)]
    when: Option<serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SplitRepr {
    #[serde(rename = "match")]
    pattern: String,
    axis: i64,
    to: Vec<String>,
    #[serde(default)]
    interleaved: bool,
    #[serde(default)]
    sizes: Option<Vec<serde_yaml::Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddRepr {
    #[serde(rename = "match")]
    pattern: String,
    value: f64,
    #[serde(default)]
    if_shape: Option<String>,
    #[serde(default)]
    if_present: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReshapeRepr {
    #[serde(rename = "match")]
    pattern: String,
    shape: Vec<serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RepeatRepr {
    #[serde(rename = "match")]
    pattern: String,
    axis: i64,
    times: serde_yaml::Value,
}

fn minus_one() -> i64 {
    -1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct L2NormalizeRepr {
    #[serde(rename = "match")]
    pattern: String,
    #[serde(default = "minus_one")]
    axis: i64,
    #[serde(default)]
    eps: f64,
    #[serde(default)]
    when: Option<serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StackRepr {
    from: String,
    to: String,
    index: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RenameRepr {
    from: String,
    to: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TieRepr {
    target: String,
    source: String,
    #[serde(default)]
    when: Option<serde_yaml::Value>,
    #[serde(default)]
    if_missing: bool,
}

impl TryFrom<RuleRepr> for RawRule {
    type Error = String;

    fn try_from(r: RuleRepr) -> Result<RawRule, String> {
        let mut rules = Vec::new();
        match r.drop {
            Some(DropRepr::Pattern(p)) => rules.push(RawRule::Drop(p)),
            Some(DropRepr::When(x)) => rules.push(RawRule::DropWhen {
                pattern: x.pattern,
                when: x.when,
            }),
            None => {}
        }
        if let Some(x) = r.rename {
            rules.push(RawRule::Rename {
                from: x.from,
                to: x.to,
            });
        }
        if let Some(t) = r.tie {
            rules.push(RawRule::Tie {
                target: t.target,
                source: t.source,
                when: t.when,
                if_missing: t.if_missing,
            });
        }
        if let Some(p) = r.skip_if_present {
            rules.push(RawRule::SkipIfPresent(p));
        }
        if let Some(p) = r.transpose {
            rules.push(RawRule::Transpose(p));
        }
        if let Some(x) = r.stack {
            rules.push(RawRule::Stack {
                from: x.from,
                to: x.to,
                index: x.index,
            });
        }
        if let Some(x) = r.reshape {
            rules.push(RawRule::Reshape {
                pattern: x.pattern,
                shape: x.shape,
            });
        }
        if let Some(x) = r.repeat {
            rules.push(RawRule::Repeat {
                pattern: x.pattern,
                axis: x.axis,
                times: x.times,
            });
        }
        if let Some(x) = r.l2_normalize {
            rules.push(RawRule::L2Normalize {
                pattern: x.pattern,
                axis: x.axis,
                eps: x.eps,
                when: x.when,
            });
        }
        if let Some(x) = r.moveaxis {
            rules.push(RawRule::MoveAxis {
                pattern: x.pattern,
                from: x.from,
                to: x.to,
                if_shape: x.if_shape,
            });
        }
        if let Some(x) = r.split {
            rules.push(RawRule::Split {
                pattern: x.pattern,
                axis: x.axis,
                to: x.to,
                interleaved: x.interleaved,
                sizes: x.sizes,
            });
        }
        if let Some(x) = r.fp8 {
            rules.push(RawRule::Fp8 {
                pattern: x.pattern,
                scale: x.scale,
                block: x.block,
            });
        }
        if let Some(x) = r.ternary {
            rules.push(RawRule::Ternary {
                pattern: x.pattern,
                scale: x.scale,
            });
        }
        if let Some(x) = r.hadamard {
            rules.push(RawRule::Hadamard {
                pattern: x.pattern,
                manifest: x.manifest,
                block: x.block,
                when: x.when,
            });
        }
        if let Some(x) = r.add {
            rules.push(RawRule::Add {
                pattern: x.pattern,
                value: x.value,
                if_shape: x.if_shape,
                if_present: x.if_present,
            });
        }
        match (rules.pop(), rules.is_empty()) {
            (Some(rule), true) => Ok(rule),
            _ => Err(
                "a rule is a map with exactly one of: drop, rename, tie, skip_if_present, transpose, stack, reshape, repeat, l2_normalize, moveaxis, split, fp8, ternary, hadamard, add".into(),
            ),
        }
    }
}
