//! JSON schemas of tool parameters derived from Rust types: a type's
//! `serde::Deserialize` implementation is driven by a tracing deserializer
//! that records what it asks for (fields, their types, which are optional)
//! instead of reading data.
use std::cell::RefCell;
use std::rc::Rc;

use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Visitor};
use serde_json::{json, Map, Value};

/// Why a type has no schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaError(pub String);

impl std::fmt::Display for SchemaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SchemaError {}

impl de::Error for SchemaError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        SchemaError(msg.to_string())
    }
}

/// Nesting bound: a recursive type (a tree of `Option<Box<Self>>`) would
/// otherwise be traced forever.
const MAX_DEPTH: usize = 32;

/// The JSON schema of `T`'s serde shape: structs are objects whose
/// non-`Option` fields are required, sequences arrays, maps objects with
/// `additionalProperties`, unit-variant enums string enums, numbers
/// `integer` or `number`. Enums with data and self-describing types
/// (`serde_json::Value` fields are allowed: they accept anything) beyond
/// that are errors.
pub fn schema_for<T: DeserializeOwned>() -> std::result::Result<Value, SchemaError> {
    let trace = Trace::default();
    T::deserialize(Tracer {
        trace: trace.clone(),
        depth: 0,
    })?;
    let schema = trace.take();
    Ok(schema.value)
}

/// What one traced value turned out to be.
#[derive(Debug, Default)]
struct Traced {
    value: Value,
    optional: bool,
}

#[derive(Debug, Default, Clone)]
struct Trace(Rc<RefCell<Traced>>);

impl Trace {
    fn set(&self, value: Value) {
        self.0.borrow_mut().value = value;
    }

    fn take(&self) -> Traced {
        std::mem::take(&mut *self.0.borrow_mut())
    }
}

struct Tracer {
    trace: Trace,
    depth: usize,
}

impl Tracer {
    fn child(&self) -> std::result::Result<(Tracer, Trace), SchemaError> {
        if self.depth >= MAX_DEPTH {
            return Err(SchemaError(format!(
                "the type nests deeper than {MAX_DEPTH} levels (a recursive type has no finite schema)"
            )));
        }
        let trace = Trace::default();
        Ok((
            Tracer {
                trace: trace.clone(),
                depth: self.depth + 1,
            },
            trace,
        ))
    }
}

macro_rules! traced {
    ($($method:ident => $schema:expr, $visit:ident($arg:expr);)*) => {
        $(fn $method<V: Visitor<'de>>(self, visitor: V) -> std::result::Result<V::Value, SchemaError> {
            self.trace.set($schema);
            visitor.$visit($arg)
        })*
    };
}

impl<'de> de::Deserializer<'de> for Tracer {
    type Error = SchemaError;

    traced! {
        deserialize_bool => json!({"type": "boolean"}), visit_bool(false);
        deserialize_i8 => json!({"type": "integer"}), visit_i8(0);
        deserialize_i16 => json!({"type": "integer"}), visit_i16(0);
        deserialize_i32 => json!({"type": "integer"}), visit_i32(0);
        deserialize_i64 => json!({"type": "integer"}), visit_i64(0);
        deserialize_u8 => json!({"type": "integer", "minimum": 0}), visit_u8(0);
        deserialize_u16 => json!({"type": "integer", "minimum": 0}), visit_u16(0);
        deserialize_u32 => json!({"type": "integer", "minimum": 0}), visit_u32(0);
        deserialize_u64 => json!({"type": "integer", "minimum": 0}), visit_u64(0);
        deserialize_f32 => json!({"type": "number"}), visit_f32(0.0);
        deserialize_f64 => json!({"type": "number"}), visit_f64(0.0);
        deserialize_char => json!({"type": "string", "minLength": 1, "maxLength": 1}), visit_char('a');
        deserialize_str => json!({"type": "string"}), visit_str("");
        deserialize_string => json!({"type": "string"}), visit_str("");
        deserialize_bytes => json!({"type": "string"}), visit_bytes(&[]);
        deserialize_byte_buf => json!({"type": "string"}), visit_bytes(&[]);
        deserialize_identifier => json!({"type": "string"}), visit_str("");
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SchemaError> {
        self.trace.set(json!({"type": "null"}));
        visitor.visit_unit()
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SchemaError> {
        self.deserialize_any(visitor)
    }

    /// Self-describing values (`serde_json::Value`) accept anything.
    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SchemaError> {
        self.trace.set(json!({}));
        visitor.visit_unit()
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SchemaError> {
        let (child, trace) = self.child()?;
        let out = visitor.visit_some(child)?;
        let inner = trace.take();
        self.trace.set(inner.value);
        self.trace.0.borrow_mut().optional = true;
        Ok(out)
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, SchemaError> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, SchemaError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SchemaError> {
        let (child, trace) = self.child()?;
        let out = visitor.visit_seq(OneItem(Some(child)))?;
        self.trace
            .set(json!({"type": "array", "items": trace.take().value}));
        Ok(out)
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, SchemaError> {
        let mut items = Vec::new();
        let mut tracers = Vec::new();
        for _ in 0..len {
            let (child, trace) = self.child()?;
            tracers.push(child);
            items.push(trace);
        }
        tracers.reverse();
        let out = visitor.visit_seq(Items(tracers))?;
        let items: Vec<Value> = items.iter().map(|t| t.take().value).collect();
        self.trace.set(json!({"type": "array", "prefixItems": items,
            "minItems": len, "maxItems": len}));
        Ok(out)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, SchemaError> {
        self.deserialize_tuple(len, visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SchemaError> {
        let (key, _) = self.child()?;
        let (value, trace) = self.child()?;
        let out = visitor.visit_map(OneEntry(Some((key, value))))?;
        self.trace
            .set(json!({"type": "object", "additionalProperties": trace.take().value}));
        Ok(out)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, SchemaError> {
        let mut traces = Vec::new();
        let mut entries = Vec::new();
        for f in fields.iter().rev() {
            let (child, trace) = self.child()?;
            entries.push((*f, child));
            traces.push((*f, trace));
        }
        let out = visitor.visit_map(Fields(entries))?;
        let mut properties = Map::new();
        let mut required = Vec::new();
        for (name, trace) in traces.into_iter().rev() {
            let t = trace.take();
            if !t.optional {
                required.push(Value::from(name));
            }
            properties.insert(name.to_string(), t.value);
        }
        self.trace
            .set(json!({"type": "object", "properties": properties,
            "required": required, "additionalProperties": false}));
        Ok(out)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, SchemaError> {
        let first = variants
            .first()
            .ok_or_else(|| SchemaError(format!("enum {name} has no variants")))?;
        self.trace.set(json!({"type": "string", "enum": variants}));
        visitor.visit_enum(UnitVariant {
            name,
            variant: first,
        })
    }
}

/// A sequence of one traced item.
struct OneItem(Option<Tracer>);

impl<'de> de::SeqAccess<'de> for OneItem {
    type Error = SchemaError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, SchemaError> {
        self.0.take().map(|t| seed.deserialize(t)).transpose()
    }
}

/// A sequence of traced items (a tuple), last item first.
struct Items(Vec<Tracer>);

impl<'de> de::SeqAccess<'de> for Items {
    type Error = SchemaError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, SchemaError> {
        self.0.pop().map(|t| seed.deserialize(t)).transpose()
    }
}

/// A map of one traced entry.
struct OneEntry(Option<(Tracer, Tracer)>);

impl<'de> de::MapAccess<'de> for OneEntry {
    type Error = SchemaError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, SchemaError> {
        match &mut self.0 {
            Some((key, _)) => {
                let key = Tracer {
                    trace: key.trace.clone(),
                    depth: key.depth,
                };
                seed.deserialize(key).map(Some)
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, SchemaError> {
        let (_, value) = self
            .0
            .take()
            .ok_or_else(|| SchemaError("map value without a key".into()))?;
        seed.deserialize(value)
    }
}

/// A struct's fields by name, each value traced; last field first.
struct Fields(Vec<(&'static str, Tracer)>);

impl<'de> de::MapAccess<'de> for Fields {
    type Error = SchemaError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, SchemaError> {
        match self.0.last() {
            Some((name, _)) => {
                let key: de::value::StrDeserializer<SchemaError> = name.into_deserializer();
                seed.deserialize(key).map(Some)
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, SchemaError> {
        let (_, value) = self
            .0
            .pop()
            .ok_or_else(|| SchemaError("struct value without a field".into()))?;
        seed.deserialize(value)
    }
}

/// An enum read as its first variant, which must carry no data.
struct UnitVariant {
    name: &'static str,
    variant: &'static str,
}

impl<'de> de::EnumAccess<'de> for UnitVariant {
    type Error = SchemaError;
    type Variant = UnitVariant;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, UnitVariant), SchemaError> {
        let key: de::value::StrDeserializer<SchemaError> = self.variant.into_deserializer();
        Ok((seed.deserialize(key)?, self))
    }
}

impl<'de> de::VariantAccess<'de> for UnitVariant {
    type Error = SchemaError;

    fn unit_variant(self) -> Result<(), SchemaError> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(
        self,
        _seed: T,
    ) -> Result<T::Value, SchemaError> {
        Err(self.with_data())
    }

    fn tuple_variant<V: Visitor<'de>>(
        self,
        _len: usize,
        _visitor: V,
    ) -> Result<V::Value, SchemaError> {
        Err(self.with_data())
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, SchemaError> {
        Err(self.with_data())
    }
}

impl UnitVariant {
    fn with_data(&self) -> SchemaError {
        SchemaError(format!(
            "enum {} variant {} carries data: only enums of unit variants have a schema",
            self.name, self.variant
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::collections::HashMap;

    #[derive(Deserialize)]
    #[allow(dead_code)]
    enum Unit {
        Celsius,
        Fahrenheit,
    }

    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct Inner {
        lat: f64,
        lon: f64,
    }

    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct Args {
        city: String,
        days: u32,
        unit: Option<Unit>,
        tags: Vec<String>,
        at: Option<Inner>,
        extra: HashMap<String, i64>,
        pair: (bool, char),
        any: Value,
        #[serde(rename = "renamed-field")]
        renamed: i8,
    }

    #[test]
    fn a_struct_gives_properties_types_and_required_fields() {
        let s = schema_for::<Args>().expect("schema");
        let p = &s["properties"];
        assert_eq!(s["type"], "object");
        assert_eq!(p["city"], json!({"type": "string"}));
        assert_eq!(p["days"], json!({"type": "integer", "minimum": 0}));
        assert_eq!(
            p["unit"],
            json!({"type": "string", "enum": ["Celsius", "Fahrenheit"]})
        );
        assert_eq!(
            p["tags"],
            json!({"type": "array", "items": {"type": "string"}})
        );
        assert_eq!(p["at"]["properties"]["lat"], json!({"type": "number"}));
        assert_eq!(p["at"]["required"], json!(["lat", "lon"]));
        assert_eq!(
            p["extra"],
            json!({"type": "object", "additionalProperties": {"type": "integer"}})
        );
        assert_eq!(p["pair"]["prefixItems"][0], json!({"type": "boolean"}));
        assert_eq!(p["any"], json!({}));
        assert_eq!(p["renamed-field"], json!({"type": "integer"}));
        assert_eq!(
            s["required"],
            json!([
                "city",
                "days",
                "tags",
                "extra",
                "pair",
                "any",
                "renamed-field"
            ])
        );
    }

    #[derive(Deserialize)]
    #[allow(dead_code)]
    enum WithData {
        A(i32),
    }

    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct Tree {
        child: Option<Box<Tree>>,
    }

    #[test]
    fn data_enums_and_recursive_types_are_errors() {
        let e = schema_for::<WithData>().unwrap_err();
        assert!(e.0.contains("carries data"), "{e}");
        let e = schema_for::<Tree>().unwrap_err();
        assert!(e.0.contains("recursive"), "{e}");
    }
}
