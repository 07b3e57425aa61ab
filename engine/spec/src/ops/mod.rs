//! Primitives: the ops a spec's nodes name, as typed declarations.
//!
//! Each op is declared once with [`op!`]: its parameters with their types,
//! defaults and documentation. The declaration yields the schema that
//! `check` validates against and the docs are generated from, and a typed
//! config struct that `expand` fills once per node. Resolving a config
//! against its input layouts gives the node's output layout, the tensors it
//! needs and the state it keeps; building it on MLX is the engine's job.
use std::fmt;

use crate::config::Ty;
use crate::expr::Value;

mod attention;
mod conv;
mod elementwise;
mod embedding;
mod heads;
mod linear;
mod moe;
mod norm;
mod rope;
mod slice;
mod ssm;

pub use attention::Attention;
pub use conv::ShortConv;
pub use elementwise::{Act, Activation, Add, Glu, Mul, Scale, Softcap};
pub use embedding::{Embedding, PositionEmbedding};
pub use heads::{MergeHeads, SplitHeads};
pub use linear::{HeadLinear, Linear};
pub use moe::{GroupScore, Moe, Routing};
pub use norm::{LayerNorm, RmsNorm};
pub use rope::{Rope, RopeScaling};
pub use slice::{Concat, Slice};
pub use ssm::{GatedDelta, Ssm};

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

/// How a parameter is written in a spec.
#[derive(Debug, Clone, Copy)]
pub enum ParamKind {
    /// A literal or an expression of this type.
    Expr(Ty),
    /// A weight name relative to the node's scope.
    Weight,
    /// One of a fixed set of words (or an `=expression` giving one).
    Choice(&'static [&'static str]),
}

/// One parameter of an op's schema.
#[derive(Debug)]
pub struct ParamDef {
    pub name: &'static str,
    pub kind: ParamKind,
    /// The default value; `None` = required.
    pub default: Option<fn() -> Value>,
    pub doc: &'static str,
}

/// What the spec language knows about an op.
#[derive(Debug)]
pub struct OpSchema {
    pub name: &'static str,
    pub doc: &'static str,
    /// Minimum and maximum number of inputs.
    pub arity: (usize, usize),
    pub params: &'static [ParamDef],
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

/// A parameter's Rust type: how it is written in a spec and read from an
/// evaluated value.
pub trait ParamType: Sized {
    const KIND: ParamKind;
    fn from_value(v: &Value) -> Result<Self, String>;
    fn to_value(&self) -> Value;
}

fn expected<T>(ty: &str, v: &Value) -> Result<T, String> {
    Err(format!("expected {ty}, got {} {v}", v.type_name()))
}

impl ParamType for bool {
    const KIND: ParamKind = ParamKind::Expr(Ty::Bool);
    fn from_value(v: &Value) -> Result<bool, String> {
        v.as_bool().map_or_else(|| expected("bool", v), Ok)
    }
    fn to_value(&self) -> Value {
        Value::Bool(*self)
    }
}

impl ParamType for i64 {
    const KIND: ParamKind = ParamKind::Expr(Ty::Int);
    fn from_value(v: &Value) -> Result<i64, String> {
        v.as_i64().map_or_else(|| expected("int", v), Ok)
    }
    fn to_value(&self) -> Value {
        Value::Int(*self)
    }
}

impl ParamType for f64 {
    const KIND: ParamKind = ParamKind::Expr(Ty::Float);
    fn from_value(v: &Value) -> Result<f64, String> {
        v.as_f64().map_or_else(|| expected("float", v), Ok)
    }
    fn to_value(&self) -> Value {
        Value::Float(*self)
    }
}

/// `null` is `None`.
impl<T: ParamType> ParamType for Option<T> {
    const KIND: ParamKind = T::KIND;
    fn from_value(v: &Value) -> Result<Option<T>, String> {
        match v {
            Value::Null => Ok(None),
            v => T::from_value(v).map(Some),
        }
    }
    fn to_value(&self) -> Value {
        self.as_ref().map_or(Value::Null, T::to_value)
    }
}

/// A number that must be above zero.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Positive<T>(pub T);

impl<T: ParamType + PartialOrd + Default + fmt::Display> ParamType for Positive<T> {
    const KIND: ParamKind = T::KIND;
    fn from_value(v: &Value) -> Result<Positive<T>, String> {
        let x = T::from_value(v)?;
        if x > T::default() {
            Ok(Positive(x))
        } else {
            Err(format!("{x} is not positive"))
        }
    }
    fn to_value(&self) -> Value {
        self.0.to_value()
    }
}

/// A weight module name, relative to the node's scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightName(pub String);

impl WeightName {
    /// The module path under `scope`.
    pub fn under(&self, scope: &str) -> String {
        join_scope(scope, &self.0)
    }
}

impl ParamType for WeightName {
    const KIND: ParamKind = ParamKind::Weight;
    fn from_value(v: &Value) -> Result<WeightName, String> {
        match v {
            Value::Str(s) => Ok(WeightName(s.clone())),
            v => expected("a weight name", v),
        }
    }
    fn to_value(&self) -> Value {
        Value::Str(self.0.clone())
    }
}

/// Any value (maps such as RoPE scaling).
impl ParamType for Value {
    const KIND: ParamKind = ParamKind::Expr(Ty::Any);
    fn from_value(v: &Value) -> Result<Value, String> {
        Ok(v.clone())
    }
    fn to_value(&self) -> Value {
        self.clone()
    }
}

/// A parameter's spec name from its field name (`r#fn` is `fn`).
pub const fn param_name(field: &'static str) -> &'static str {
    match field.as_bytes() {
        [b'r', b'#', rest @ ..] => match std::str::from_utf8(rest) {
            Ok(name) => name,
            Err(_) => field,
        },
        _ => field,
    }
}

/// Declares a choice enum whose variants own their spellings.
macro_rules! choice {
    ($(#[$m:meta])* $vis:vis enum $name:ident { $($(#[$vm:meta])* $v:ident = $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        $vis enum $name { $($(#[$vm])* $v),+ }

        impl $name {
            pub const SPELLINGS: &'static [&'static str] = &[$($s),+];
            pub fn spelling(self) -> &'static str {
                match self { $($name::$v => $s),+ }
            }
        }

        impl $crate::ops::ParamType for $name {
            const KIND: $crate::ops::ParamKind = $crate::ops::ParamKind::Choice(Self::SPELLINGS);
            fn from_value(v: &$crate::expr::Value) -> Result<Self, String> {
                match v.as_str() {
                    $(Some($s) => Ok($name::$v),)+
                    _ => Err(format!("{v} is not one of: {}", Self::SPELLINGS.join(", "))),
                }
            }
            fn to_value(&self) -> $crate::expr::Value {
                $crate::expr::Value::Str(self.spelling().to_string())
            }
        }
    };
}
pub(crate) use choice;

/// Declares an op: a typed config struct with one field per parameter, and
/// its schema. `field: Type = default, "doc";` (no `= default`: required).
macro_rules! op {
    (
        $(#[doc = $doc:literal])*
        $name:literal ($lo:literal ..= $hi:literal) => $ty:ident {
            $( $field:ident : $fty:ty $(= $default:expr)? , $pdoc:literal ; )*
        }
    ) => {
        $(#[doc = $doc])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $ty { $( pub $field: $fty, )* }

        impl $ty {
            pub const SCHEMA: $crate::ops::OpSchema = $crate::ops::OpSchema {
                name: $name,
                doc: concat!($($doc),*),
                arity: ($lo, $hi),
                params: &[$(
                    $crate::ops::ParamDef {
                        name: $crate::ops::param_name(stringify!($field)),
                        kind: <$fty as $crate::ops::ParamType>::KIND,
                        default: op!(@default $fty $(, $default)?),
                        doc: $pdoc,
                    },
                )*],
            };

            /// Reads the evaluated parameters, in schema order.
            #[allow(unused_variables, unused_mut)]
            pub fn from_values(values: &[$crate::expr::Value]) -> Result<$ty, $crate::ops::OpError> {
                let mut it = values.iter();
                Ok($ty { $(
                    $field: {
                        let v = it.next().unwrap_or(&$crate::expr::Value::Null);
                        <$fty as $crate::ops::ParamType>::from_value(v)
                            .map_err(|m| $crate::ops::OpError::new($crate::ops::param_name(stringify!($field)), m))?
                    },
                )* })
            }

            /// The parameters as values, in schema order (for dumps).
            pub fn values(&self) -> Vec<(&'static str, $crate::expr::Value)> {
                vec![$( ($crate::ops::param_name(stringify!($field)), $crate::ops::ParamType::to_value(&self.$field)), )*]
            }
        }
    };
    (@default $fty:ty) => { None };
    (@default $fty:ty, $default:expr) => {
        Some(|| {
            let d: $fty = $default;
            $crate::ops::ParamType::to_value(&d)
        })
    };
}
pub(crate) use op;

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
    PositionEmbedding,
    Linear,
    HeadLinear,
    RmsNorm,
    LayerNorm,
    Add,
    Mul,
    Scale,
    Softcap,
    Activation,
    Glu,
    SplitHeads,
    MergeHeads,
    Slice,
    Concat,
    Rope,
    Attention,
    Moe,
    ShortConv,
    Ssm,
    GatedDelta,
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
}

impl WeightReq {
    pub fn tensor(&self) -> String {
        format!("{}.{}", self.module, self.suffix)
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
pub fn join_scope(scope: &str, name: &str) -> String {
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

/// The op reference (`docs/ops.md`), generated from the schemas.
pub fn reference() -> String {
    let mut out = String::from(
        "# Op reference\n\nGenerated from the op schemas in `engine/spec/src/ops/` \
         (a test keeps this file current). Parameters without a default are required. \
         Besides these primitives a node may be `layers` (the layer schedule) or \
         `split` (see docs/spec-language.md).\n",
    );
    for e in REGISTRY {
        let s = e.schema;
        let (lo, hi) = s.arity;
        let inputs = if lo == hi {
            format!("{lo}")
        } else {
            format!("{lo} to {hi}")
        };
        out.push_str(&format!(
            "\n## `{}`\n\n{} Inputs: {inputs}.\n",
            s.name,
            s.doc.trim()
        ));
        if s.params.is_empty() {
            continue;
        }
        out.push_str("\n| parameter | kind | default | meaning |\n| --- | --- | --- | --- |\n");
        for p in s.params {
            let kind = match p.kind {
                ParamKind::Expr(ty) => ty.name().to_string(),
                ParamKind::Weight => "weight".to_string(),
                ParamKind::Choice(words) => words.join(" \\| "),
            };
            let default = p
                .default
                .map_or("required".to_string(), |d| format!("`{}`", d()));
            out.push_str(&format!(
                "| `{}` | {kind} | {default} | {} |\n",
                p.name, p.doc
            ));
        }
    }
    out
}
