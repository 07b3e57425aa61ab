//! Typed parameters: how an op declares its parameters once ([`op!`]:
//! Rust type, typed default, documentation) and gets from that one
//! declaration the schema `check` validates against, the typed config struct
//! `expand` fills, and the values dumps print. [`choice!`] declares word
//! choices whose variants own their spellings.
use std::fmt;

use crate::config::Ty;
use crate::expr::Value;
use crate::ops::join_scope;

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

/// Scalars: written as a literal or an expression of their type.
macro_rules! scalar {
    ($($t:ty: $ty:ident, $as:ident, $variant:ident, $name:literal;)+) => {$(
        impl ParamType for $t {
            const KIND: ParamKind = ParamKind::Expr(Ty::$ty);
            fn from_value(v: &Value) -> Result<$t, String> {
                v.$as().map_or_else(|| expected($name, v), Ok)
            }
            fn to_value(&self) -> Value {
                Value::$variant(*self)
            }
        }
    )+};
}

scalar! {
    bool: Bool, as_bool, Bool, "bool";
    i64: Int, as_i64, Int, "int";
    f64: Float, as_f64, Float, "float";
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

        impl $crate::schema::ParamType for $name {
            const KIND: $crate::schema::ParamKind = $crate::schema::ParamKind::Choice(Self::SPELLINGS);
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
/// A trailing `layout: f` makes the op's output layout `f(inputs)`, with no
/// weights and no state (elementwise ops).
macro_rules! op {
    (
        $(#[doc = $doc:literal])*
        $name:literal ($lo:literal ..= $hi:literal) => $ty:ident {
            $( $field:ident : $fty:ty $(= $default:expr)? , $pdoc:literal ; )*
        } layout: $layout:path
    ) => {
        op! { $(#[doc = $doc])* $name ($lo..=$hi) => $ty { $( $field : $fty $(= $default)? , $pdoc ; )* } }

        impl $ty {
            pub fn resolve(
                &self,
                _scope: &str,
                inputs: &[$crate::ops::Layout],
            ) -> Result<$crate::ops::Resolved, $crate::ops::OpError> {
                $layout(inputs).map($crate::ops::Resolved::pure)
            }
        }
    };
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
            pub const SCHEMA: $crate::schema::OpSchema = $crate::schema::OpSchema {
                name: $name,
                doc: concat!($($doc),*),
                arity: ($lo, $hi),
                params: &[$(
                    $crate::schema::ParamDef {
                        name: $crate::schema::param_name(stringify!($field)),
                        kind: <$fty as $crate::schema::ParamType>::KIND,
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
                        <$fty as $crate::schema::ParamType>::from_value(v)
                            .map_err(|m| $crate::ops::OpError::new($crate::schema::param_name(stringify!($field)), m))?
                    },
                )* })
            }

            /// The parameters as values, in schema order (for dumps).
            pub fn values(&self) -> Vec<(&'static str, $crate::expr::Value)> {
                vec![$( ($crate::schema::param_name(stringify!($field)), $crate::schema::ParamType::to_value(&self.$field)), )*]
            }
        }
    };
    (@default $fty:ty) => { None };
    (@default $fty:ty, $default:expr) => {
        Some(|| {
            let d: $fty = $default;
            $crate::schema::ParamType::to_value(&d)
        })
    };
}
pub(crate) use op;
