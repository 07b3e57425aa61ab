//! Primitives: the ops a spec's nodes name, as typed declarations.
//!
//! Each op is declared once with [`op!`]: its parameters with their types,
//! defaults and documentation. The declaration yields the schema that
//! `check` validates against and the docs are generated from, and a typed
//! config struct that `expand` fills once per node. Resolving a config
//! against its input layouts gives the node's output layout, the tensors it
//! needs and the state it keeps; building it on MLX is the engine's job.
use std::fmt;

use crate::expr::Value;
pub(crate) use crate::schema::{choice, op};
pub use crate::schema::{
    param_name, OpSchema, ParamDef, ParamKind, ParamType, Positive, WeightName,
};

mod altup;
mod attention;
mod conv;
mod deepstack;
mod elementwise;
mod embedding;
mod heads;
mod learned;
mod linear;
mod moe;
mod norm;
mod rope;
mod slice;
mod ssm;
mod vision;

pub use altup::{AltupCorrect, AltupPredict, GeluTopk, MatchRms, MeanHeads};
pub use attention::{Attention, BlockTopk, Gqa, IndexTopk, KEEP_MASK};
pub use conv::{ShortConv, TokenShift};
pub use deepstack::{AddFeatures, Keep, Kept};
pub use elementwise::{Act, Activation, Add, Clamp, Glu, MaskTokens, Mul, Scale, Softcap};
pub use embedding::{
    Embedding, NgramEmbedding, PositionEmbedding, NGRAM_PROJECTIONS, NGRAM_TABLES,
};
pub use heads::{MergeHeads, RepeatHeads, SplitHeads};
pub use learned::{FakeQuant, Gain, GainShape, Xielu, XIELU_PARAMS};
pub use linear::{HeadLinear, Linear, Shard};
pub use moe::{ExpertGlu, GroupFill, GroupScore, Moe, MoeShard, Routing};
pub use norm::{LayerNorm, RmsNorm};
pub use rope::{PositionScale, Rope, RopeScaling};
pub use slice::{Concat, Slice};
pub use ssm::{alibi_slopes, GatedDelta, Lightning, RgLru, SelectiveScan, Ssm, Wkv7};
pub use vision::{GridTable, MergePatches, Mrope, Patchify, PixelShuffle, PoolPatches, Splice};

/// Layout of a value flowing between nodes: the size of its last axis and,
/// for per-head values laid out `[B, H, T, D]`, the number of heads
/// (`None` for `[B, T, D]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub dim: i64,
    pub heads: Option<i64>,
}

impl Layout {
    pub fn flat(dim: i64) -> Layout {
        Layout { dim, heads: None }
    }
}

/// An op parameter error: the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq)]
pub struct OpError {
    pub field: String,
    pub msg: String,
}

impl OpError {
    pub fn new(field: impl Into<String>, msg: impl Into<String>) -> OpError {
        OpError {
            field: field.into(),
            msg: msg.into(),
        }
    }
}

impl fmt::Display for OpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.msg)
    }
}

/// Declares the registry: the [`OpConfig`] enum with one variant per op,
/// the schemas in order, and dispatch with one line per op.
macro_rules! registry {
    ($($ty:ident),+ $(,)?) => {
        /// A node's op with its typed parameters.
        #[derive(Debug, Clone, PartialEq)]
        pub enum OpConfig { $($ty($ty)),+ }

        /// Every primitive, in the order the docs list them.
        pub static REGISTRY: &[OpEntry] = &[$(
            OpEntry {
                schema: &$ty::SCHEMA,
                parse: |v| $ty::from_values(v).map(OpConfig::$ty),
            },
        )+];

        impl OpConfig {
            pub fn schema(&self) -> &'static OpSchema {
                match self { $(OpConfig::$ty(_) => &$ty::SCHEMA),+ }
            }
            /// Output layout, weight needs and state of the node.
            pub fn resolve(&self, scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
                match self { $(OpConfig::$ty(c) => c.resolve(scope, inputs)),+ }
            }
            /// The parameters as values, in schema order.
            pub fn values(&self) -> Vec<(&'static str, Value)> {
                match self { $(OpConfig::$ty(c) => c.values()),+ }
            }
        }
    };
}

registry!(
    Embedding,
    NgramEmbedding,
    PositionEmbedding,
    Linear,
    HeadLinear,
    RmsNorm,
    LayerNorm,
    Add,
    Mul,
    Scale,
    Softcap,
    MaskTokens,
    Clamp,
    Activation,
    Glu,
    Gain,
    Xielu,
    FakeQuant,
    SplitHeads,
    MergeHeads,
    RepeatHeads,
    Slice,
    Concat,
    Rope,
    PositionScale,
    Attention,
    IndexTopk,
    BlockTopk,
    Moe,
    ShortConv,
    TokenShift,
    Ssm,
    SelectiveScan,
    GatedDelta,
    Lightning,
    RgLru,
    Wkv7,
    AltupPredict,
    AltupCorrect,
    GeluTopk,
    MatchRms,
    MeanHeads,
    Patchify,
    Mrope,
    MergePatches,
    GridTable,
    PoolPatches,
    PixelShuffle,
    Splice,
    Keep,
    Kept,
    AddFeatures,
);

/// A registered op: its schema and how its typed config is read.
#[derive(Debug)]
pub struct OpEntry {
    pub schema: &'static OpSchema,
    pub parse: fn(&[Value]) -> Result<OpConfig, OpError>,
}

impl OpConfig {
    pub fn name(&self) -> &'static str {
        self.schema().name
    }

    /// The node as a plain projection of one value (`linear`): such nodes
    /// reading the same value may run as one fused projection.
    pub fn as_projection(&self) -> Option<&Linear> {
        match self {
            OpConfig::Linear(l) => Some(l),
            _ => None,
        }
    }
}

/// The op registered under `name`.
pub fn lookup(name: &str) -> Option<&'static OpEntry> {
    REGISTRY.iter().find(|e| e.schema.name == name)
}

pub fn names() -> Vec<&'static str> {
    REGISTRY.iter().map(|e| e.schema.name).collect()
}

/// The state an op keeps between calls (its cache slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateKind {
    /// Keys and values of the positions so far.
    Kv,
    /// Keys and values of the last `n` positions only (sliding-window
    /// attention): a rotating cache of that size, whatever the options.
    Window(i32),
    /// The last `n` input rows of a causal convolution (recurrent state).
    Conv(i32),
    /// A recurrence's float32 state array (state-space and linear-attention
    /// mixers), whatever its shape.
    Recurrent,
}

/// A tensor an op needs from the checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightReq {
    /// The parameter that named it (the engine hands the loaded tensor back
    /// under this name).
    pub field: &'static str,
    /// Module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub module: String,
    /// Tensor suffix: `weight` or `bias`.
    pub suffix: &'static str,
    /// Expected (unquantized) shape.
    pub shape: Vec<i64>,
    /// Whether an MLX affine-quantized form (`scales`/`biases`) is accepted.
    pub quantizable: bool,
    /// Under tensor parallelism, the axis of `shape` along which each rank
    /// holds a slice (`shape` is then one rank's share); `None`: every rank
    /// holds the whole tensor.
    pub shard_axis: Option<usize>,
    /// Whether consecutive ranks may hold copies of one slice when they
    /// outnumber the slices (key/value heads); never for a weight whose
    /// partial results are summed across ranks.
    pub shard_copies: bool,
    /// Whether `shape` holds the whole axis (each rank then holds an even
    /// share of it) rather than one rank's share.
    pub shard_whole: bool,
    /// Whether a checkpoint may leave it out (a tensor only some
    /// checkpoints carry); an op lists its optional tensors last.
    pub optional: bool,
    /// Whether any shape holding `shape`'s number of elements will do (the
    /// op reads what the layout means).
    pub any_layout: bool,
}

impl WeightReq {
    pub fn tensor(&self) -> String {
        format!("{}.{}", self.module, self.suffix)
    }

    /// Whether a tensor of this shape fits (its own shape, or with
    /// `any_layout` any shape of as many elements).
    pub fn fits(&self, shape: &[i64]) -> bool {
        match self.any_layout {
            true => shape.iter().product::<i64>() == self.shape.iter().product::<i64>(),
            false => shape == self.shape.as_slice(),
        }
    }

    /// A dense (never quantized) tensor.
    pub fn dense(
        field: &'static str,
        module: String,
        suffix: &'static str,
        shape: Vec<i64>,
    ) -> WeightReq {
        WeightReq {
            field,
            module,
            suffix,
            shape,
            quantizable: false,
            shard_axis: None,
            shard_copies: false,
            shard_whole: false,
            optional: false,
            any_layout: false,
        }
    }

    /// The signs of a blockwise Hadamard rotation of `width` features,
    /// `module.signs`, which only rotated checkpoints carry: laid out
    /// `[width / block, block]` by the `hadamard` weight rule.
    pub fn rotation_signs(module: String, width: i64) -> WeightReq {
        WeightReq {
            optional: true,
            any_layout: true,
            ..WeightReq::dense("signs", module, "signs", vec![width])
        }
    }

    /// The same tensor, each rank holding its own slice along `axis` (when
    /// `sharded`).
    pub fn sharded(self, sharded: bool, axis: usize) -> WeightReq {
        WeightReq {
            shard_axis: sharded.then_some(axis),
            ..self
        }
    }

    /// Each rank holding an even share along `axis` of a tensor whose
    /// `shape` is the whole (when `sharded`).
    pub fn sharded_evenly(self, sharded: bool, axis: usize) -> WeightReq {
        WeightReq {
            shard_whole: sharded,
            ..self.sharded(sharded, axis)
        }
    }

    /// Like [`WeightReq::sharded`], ranks that outnumber the slices holding
    /// copies.
    pub fn sharded_or_copied(self, sharded: bool, axis: usize) -> WeightReq {
        WeightReq {
            shard_copies: sharded,
            ..self.sharded(sharded, axis)
        }
    }

    /// A matrix that may be stored quantized.
    pub fn matrix(
        field: &'static str,
        module: String,
        suffix: &'static str,
        shape: Vec<i64>,
    ) -> WeightReq {
        WeightReq {
            quantizable: true,
            ..WeightReq::dense(field, module, suffix, shape)
        }
    }
}

/// What resolving a node against config values gives: its output layout,
/// the tensors it needs and the state it keeps between calls.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub out: Layout,
    pub weights: Vec<WeightReq>,
    pub state: Option<StateKind>,
}

impl Resolved {
    pub fn pure(out: Layout) -> Resolved {
        Resolved {
            out,
            weights: Vec::new(),
            state: None,
        }
    }
}

/// Joins a scope and a relative weight name.
/// A weight name in a scope; a name that starts with `/` is absolute (the
/// scope is not prepended), for a layer block that reads a model-level
/// weight.
pub fn join_scope(scope: &str, name: &str) -> String {
    if let Some(absolute) = name.strip_prefix('/') {
        return absolute.to_string();
    }
    if scope.is_empty() {
        name.to_string()
    } else {
        format!("{scope}.{name}")
    }
}

pub(crate) fn expect_flat(inputs: &[Layout], k: usize) -> Result<i64, OpError> {
    match inputs.get(k) {
        Some(Layout { dim, heads: None }) => Ok(*dim),
        Some(Layout { heads: Some(h), .. }) => Err(OpError::new(
            "in",
            format!("input {k} is split into {h} heads; this op needs a [B, T, D] value"),
        )),
        None => Err(OpError::new("in", format!("input {k} is missing"))),
    }
}

pub(crate) fn expect_heads(inputs: &[Layout], k: usize) -> Result<(i64, i64), OpError> {
    match inputs.get(k) {
        Some(Layout {
            dim,
            heads: Some(h),
        }) => Ok((*h, *dim)),
        Some(Layout { .. }) => Err(OpError::new(
            "in",
            format!("input {k} is [B, T, D]; this op needs per-head values (use split_heads)"),
        )),
        None => Err(OpError::new("in", format!("input {k} is missing"))),
    }
}

/// Checks that flat inputs named `names` have the last-axis sizes `want`.
pub(crate) fn expect_widths(
    inputs: &[Layout],
    names: &[&str],
    want: &[i64],
) -> Result<(), OpError> {
    for (k, (name, w)) in names.iter().zip(want).enumerate() {
        let d = expect_flat(inputs, k)?;
        if d != *w {
            return Err(OpError::new(
                "in",
                format!("input {k} ({name}) is {d} wide; expected {w}"),
            ));
        }
    }
    Ok(())
}
