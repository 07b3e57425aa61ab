//! Weight-name rules: patterns with captures (`{i}` matches one dotted
//! segment, `{rest*}` any tail) applied to checkpoint tensor names.
use indexmap::IndexMap;
use mlx_rs::{Array, Dtype};

use lmspec_spec::config::Ty;
use lmspec_spec::expr::Value;
pub use lmspec_spec::pattern::Pattern;
use lmspec_spec::raw::RawRule;

/// Evaluates an expression of a rule (a `when`, a size) as the given type;
/// the layer index is set when the tensor's name captured `{i}` as an
/// integer, so the expression sees that layer's `per_layer` entries.
pub type RuleEval<'a> = &'a dyn Fn(&serde_yaml::Value, Ty, Option<i64>) -> Result<Value, String>;

/// Tensors after the rules, the ties that were made (target, source), and
/// the modules renamed (old, new), in the order the rules ran.
#[derive(Debug)]
pub struct Applied<T = Array> {
    pub tensors: IndexMap<String, T>,
    pub ties: Vec<(String, String)>,
    pub renames: Vec<(String, String)>,
}

/// What rules can rewrite: tensors, or their shapes read from headers.
pub trait RuleValue: Clone {
    /// The 2-D value with its axes swapped.
    fn transposed(&self) -> Result<Self, String>;
    /// Values of one shape stacked along a new first axis.
    fn stacked(items: &[Self]) -> Result<Self, String>;
    /// The shape.
    fn dims(&self) -> Vec<i64>;
    /// The value with a new shape of the same element count.
    fn reshaped(&self, shape: &[i64]) -> Result<Self, String>;
    /// Every element repeated `times` times along `axis` (in range).
    fn repeated(&self, axis: usize, times: i64) -> Result<Self, String>;
    /// Divided by its L2 norm along `axis` (in range) plus `eps`.
    fn l2_normalized(&self, axis: usize, eps: f64) -> Result<Self, String>;
    /// Axis `from` moved to position `to` (both in range).
    fn moved_axis(&self, from: usize, to: usize) -> Result<Self, String>;
    /// `value` added to every element (floating-point values only).
    fn plus(&self, value: f64) -> Result<Self, String>;
    /// `n` equal parts along `axis` (in range): consecutive blocks, or with
    /// `interleaved` every n-th index.
    fn parts(&self, axis: usize, n: usize, interleaved: bool) -> Result<Vec<Self>, String>;
    /// Consecutive blocks of these sizes along `axis` (in range); they sum
    /// to the axis.
    fn blocks(&self, _axis: usize, _sizes: &[i64]) -> Result<Vec<Self>, String> {
        Err("split: parts of given sizes are not supported here".into())
    }
    /// FP8 (e4m3) bytes `[m, n]` dequantized with one scale per
    /// `block` x `block` tile; shapes keep theirs.
    fn fp8_dequantized(&self, _scale: &Self, _block: i64) -> Result<Self, String> {
        Ok(self.clone())
    }
    /// BitNet's ternary bytes `[out / 4, in]` unpacked to `[out, in]` and
    /// scaled (the `ternary` rule).
    fn ternary_unpacked(&self, scale: &Self) -> Result<Self, String>;
    /// A blockwise Hadamard rotation's signs `[in]` laid out
    /// `[in / block, block]` (the `hadamard` rule); arrays check their
    /// values too.
    fn hadamard_signs(&self, block: i64) -> Result<Self, String> {
        self.reshaped(&signs_layout(&self.dims(), block)?)
    }
}

/// The layout `[in / block, block]` of `in` rotation signs, if the block
/// fits: a power of two, 2 or more, dividing `in`.
fn signs_layout(dims: &[i64], block: i64) -> Result<Vec<i64>, String> {
    match dims {
        [n] if block >= 2 && block & (block - 1) == 0 && n % block == 0 => {
            Ok(vec![n / block, block])
        }
        [n] => Err(format!(
            "a block of {block} does not fit {n} signs (it must be a power of two, 2 or more, dividing them)"
        )),
        d => Err(format!("expected a vector of signs, got shape {d:?}")),
    }
}

/// The start of each block of `sizes` along an axis of `size`.
fn block_starts(size: i64, sizes: &[i64]) -> Result<Vec<i64>, String> {
    if sizes.iter().any(|&s| s < 1) || sizes.iter().sum::<i64>() != size {
        return Err(format!(
            "split: sizes {sizes:?} do not cut an axis of {size}"
        ));
    }
    Ok(sizes
        .iter()
        .scan(0, |at, &s| {
            let start = *at;
            *at += s;
            Some(start)
        })
        .collect())
}

/// The indices along an axis of `size` that part `k` of `n` takes.
pub fn part_indices(size: i64, n: usize, k: usize, interleaved: bool) -> Result<Vec<i32>, String> {
    let n64 = n as i64;
    if size % n64 != 0 {
        return Err(format!(
            "split: an axis of {size} does not cut into {n} equal parts"
        ));
    }
    let m = size / n64;
    let k = k as i64;
    (0..m)
        .map(|j| if interleaved { j * n64 + k } else { k * m + j })
        .map(to_i32)
        .collect()
}

/// The axis order that moves `from` to `to`, as numpy's `moveaxis`.
pub fn moveaxis_order(ndim: usize, from: usize, to: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..ndim).filter(|&a| a != from).collect();
    order.insert(to, from);
    order
}

fn to_i32(v: i64) -> Result<i32, String> {
    i32::try_from(v).map_err(|_| format!("size {v} is out of range"))
}

impl RuleValue for Array {
    fn transposed(&self) -> Result<Array, String> {
        match self.ndim() {
            2 => Ok(self.t()),
            n => Err(format!("transpose: tensor has {n} axes, expected 2")),
        }
    }

    fn stacked(items: &[Array]) -> Result<Array, String> {
        if items.windows(2).any(|w| w[0].shape() != w[1].shape()) {
            return Err("stack: the tensors differ in shape".into());
        }
        mlx_rs::ops::stack(items, 0).map_err(|e| format!("stack: {e}"))
    }

    fn dims(&self) -> Vec<i64> {
        self.shape().iter().map(|&d| d as i64).collect()
    }

    fn reshaped(&self, shape: &[i64]) -> Result<Array, String> {
        let shape = shape
            .iter()
            .map(|&d| to_i32(d))
            .collect::<Result<Vec<_>, _>>()?;
        self.reshape(&shape).map_err(|e| format!("reshape: {e}"))
    }

    fn repeated(&self, axis: usize, times: i64) -> Result<Array, String> {
        Array::repeat_axis::<f32>(self.clone(), to_i32(times)?, axis as i32)
            .map_err(|e| format!("repeat: {e}"))
    }

    fn l2_normalized(&self, axis: usize, eps: f64) -> Result<Array, String> {
        let dtype = self.dtype();
        if !dtype.is_float() {
            return Ok(self.clone());
        }
        let go = || -> mlx_rs::error::Result<Array> {
            let w = self.as_dtype(Dtype::Float32)?;
            let norm = w.square()?.sum_axis(axis as i32, true)?.sqrt()?;
            w.divide(norm.add(Array::from_f32(eps as f32))?)?
                .as_dtype(dtype)
        };
        go().map_err(|e| format!("l2_normalize: {e}"))
    }

    fn moved_axis(&self, from: usize, to: usize) -> Result<Array, String> {
        let order: Vec<i32> = moveaxis_order(self.ndim(), from, to)
            .into_iter()
            .map(|a| a as i32)
            .collect();
        self.transpose_axes(&order)
            .map_err(|e| format!("moveaxis: {e}"))
    }

    fn parts(&self, axis: usize, n: usize, interleaved: bool) -> Result<Vec<Array>, String> {
        let size = self.dims()[axis];
        (0..n)
            .map(|k| {
                let idx = part_indices(size, n, k, interleaved)?;
                let idx = Array::from_slice(&idx, &[idx.len() as i32]);
                self.take_axis(&idx, axis as i32)
                    .map_err(|e| format!("split: {e}"))
            })
            .collect()
    }

    fn blocks(&self, axis: usize, sizes: &[i64]) -> Result<Vec<Array>, String> {
        let starts = block_starts(self.dims()[axis], sizes)?;
        starts
            .iter()
            .zip(sizes)
            .map(|(&a, &n)| {
                let idx: Vec<i32> = (a..a + n).map(to_i32).collect::<Result<_, _>>()?;
                let idx = Array::from_slice(&idx, &[idx.len() as i32]);
                self.take_axis(&idx, axis as i32)
                    .map_err(|e| format!("split: {e}"))
            })
            .collect()
    }

    fn fp8_dequantized(&self, scale: &Array, block: i64) -> Result<Array, String> {
        use mlx_rs::ops::indexing::IndexOp;
        let s = self.shape().to_vec();
        if s.len() != 2 || !matches!(self.dtype(), Dtype::Uint8) {
            return Err(format!(
                "fp8: expected [m, n] bytes, got a {:?} tensor of shape {s:?}",
                self.dtype()
            ));
        }
        let b = to_i32(block)?;
        let (m, n) = (s[0], s[1]);
        let (pm, pn) = ((b - m % b) % b, (b - n % b) % b);
        let (bm, bn) = ((m + pm) / b, (n + pn) / b);
        if scale.shape() != [bm, bn] {
            return Err(format!(
                "fp8: the scale has shape {:?}, {m}x{n} in {b}x{b} tiles needs [{bm}, {bn}]",
                scale.shape()
            ));
        }
        let go = || -> mlx_rs::error::Result<Array> {
            let w = self.from_fp8(Dtype::Bfloat16)?;
            let w = mlx_rs::ops::pad(&w, &[(0, pm), (0, pn)], None, None)?;
            let w = w.reshape(&[bm, b, bn, b])?;
            let sc = scale.reshape(&[bm, 1, bn, 1])?;
            let w = mlx_rs::ops::multiply(&w, &sc)?.reshape(&[m + pm, n + pn])?;
            w.index((..m, ..n)).as_dtype(Dtype::Bfloat16)
        };
        go().map_err(|e| format!("fp8: {e}"))
    }

    fn ternary_unpacked(&self, scale: &Array) -> Result<Array, String> {
        let s = self.shape().to_vec();
        if s.len() != 2 || !matches!(self.dtype(), Dtype::Uint8) {
            return Err(format!(
                "ternary: expected [out / 4, in] bytes, got a {:?} tensor of shape {s:?}",
                self.dtype()
            ));
        }
        if scale.size() != 1 || !scale.dtype().is_float() {
            return Err(format!(
                "ternary: the scale must be one floating-point value, got a {:?} tensor of shape {:?}",
                scale.dtype(),
                scale.shape()
            ));
        }
        let go = || -> mlx_rs::error::Result<Array> {
            let w = self.as_dtype(Dtype::Int32)?;
            // Bit pair j of row r is row r + j·out/4: the four planes one
            // after another along the rows; pair j is (w / 4^j) mod 4.
            let planes = (0..4)
                .map(|j| {
                    let v = mlx_rs::ops::floor_divide(&w, Array::from_int(1 << (2 * j)))?;
                    let v = mlx_rs::ops::remainder(&v, Array::from_int(4))?;
                    mlx_rs::ops::subtract(&v, Array::from_int(1))
                })
                .collect::<mlx_rs::error::Result<Vec<_>>>()?;
            let w = mlx_rs::ops::concatenate(&planes, 0)?.as_dtype(Dtype::Float32)?;
            let sc = scale.reshape(&[1, 1])?.as_dtype(Dtype::Float32)?;
            mlx_rs::ops::multiply(&w, &sc)?.as_dtype(scale.dtype())
        };
        go().map_err(|e| format!("ternary: {e}"))
    }

    fn hadamard_signs(&self, block: i64) -> Result<Array, String> {
        let layout = signs_layout(&self.dims(), block)?;
        if !self.dtype().is_float() {
            return Err(format!("signs must be floats, got {:?}", self.dtype()));
        }
        let unit =
            || -> mlx_rs::error::Result<Array> { self.abs()?.eq(Array::from_f32(1.0))?.all(None) };
        let unit = unit().map_err(|e| e.to_string())?;
        match unit.try_item_exact::<bool>().map_err(|e| e.to_string())? {
            true => self.reshaped(&layout),
            false => Err("signs must all be +1 or -1".into()),
        }
    }

    fn plus(&self, value: f64) -> Result<Array, String> {
        let dtype = self.dtype();
        if !dtype.is_float() {
            return Err(format!(
                "add: a {dtype:?} tensor (only floating-point ones)"
            ));
        }
        let go = || -> mlx_rs::error::Result<Array> {
            self.as_dtype(Dtype::Float32)?
                .add(Array::from_f32(value as f32))?
                .as_dtype(dtype)
        };
        go().map_err(|e| format!("add: {e}"))
    }
}

impl RuleValue for Vec<i64> {
    fn transposed(&self) -> Result<Vec<i64>, String> {
        match self.as_slice() {
            [a, b] => Ok(vec![*b, *a]),
            s => Err(format!(
                "transpose: tensor has {} axes, expected 2",
                s.len()
            )),
        }
    }

    fn stacked(items: &[Vec<i64>]) -> Result<Vec<i64>, String> {
        let first = items.first().ok_or("stack: nothing to stack")?;
        if items.iter().any(|s| s != first) {
            return Err("stack: the tensors differ in shape".into());
        }
        Ok(std::iter::once(items.len() as i64)
            .chain(first.iter().copied())
            .collect())
    }

    fn dims(&self) -> Vec<i64> {
        self.clone()
    }

    fn reshaped(&self, shape: &[i64]) -> Result<Vec<i64>, String> {
        Ok(shape.to_vec())
    }

    fn repeated(&self, axis: usize, times: i64) -> Result<Vec<i64>, String> {
        let mut s = self.clone();
        s[axis] *= times;
        Ok(s)
    }

    fn l2_normalized(&self, _axis: usize, _eps: f64) -> Result<Vec<i64>, String> {
        Ok(self.clone())
    }

    fn moved_axis(&self, from: usize, to: usize) -> Result<Vec<i64>, String> {
        Ok(moveaxis_order(self.len(), from, to)
            .into_iter()
            .map(|a| self[a])
            .collect())
    }

    fn plus(&self, _value: f64) -> Result<Vec<i64>, String> {
        Ok(self.clone())
    }

    fn ternary_unpacked(&self, _scale: &Vec<i64>) -> Result<Vec<i64>, String> {
        match self.as_slice() {
            [rows, cols] => Ok(vec![4 * rows, *cols]),
            s => Err(format!(
                "ternary: expected [out / 4, in] bytes, got shape {s:?}"
            )),
        }
    }

    fn blocks(&self, axis: usize, sizes: &[i64]) -> Result<Vec<Vec<i64>>, String> {
        block_starts(self[axis], sizes)?;
        Ok(sizes
            .iter()
            .map(|&n| {
                let mut part = self.clone();
                part[axis] = n;
                part
            })
            .collect())
    }

    fn parts(&self, axis: usize, n: usize, interleaved: bool) -> Result<Vec<Vec<i64>>, String> {
        part_indices(self[axis], n, 0, interleaved)?;
        let mut part = self.clone();
        part[axis] /= n as i64;
        Ok(vec![part; n])
    }
}

/// Replaces every tensor matching `pattern` whose scale tensor (`scale`
/// filled with its captures) exists by `f(tensor, scale)`; the scale
/// tensors go (the `fp8` and `ternary` rules).
fn with_scales<T: RuleValue>(
    tensors: &mut IndexMap<String, T>,
    pattern: &str,
    scale: &str,
    f: impl Fn(&T, &T) -> Result<T, String>,
) -> Result<(), String> {
    let (wp, sp) = (Pattern::parse(pattern)?, Pattern::parse(scale)?);
    let pairs: Vec<(String, String)> = tensors
        .keys()
        .filter_map(|k| {
            let caps = wp.matches(k)?;
            let s = sp.fill(&caps).ok()?;
            tensors.contains_key(&s).then(|| (k.clone(), s))
        })
        .collect();
    for (k, s) in pairs {
        let sc = tensors.shift_remove(&s).expect("listed above");
        let d = f(&tensors[&k], &sc).map_err(|e| format!("{e} ('{k}')"))?;
        tensors.insert(k, d);
    }
    Ok(())
}

/// The `hadamard` rule: each record of `manifest` names a module by the
/// pattern's captures (its fields of those names) and gives its block
/// (field `field`); every tensor the pattern matches is laid out by its
/// record's block, and every record with a block above 0 needs its tensor.
fn hadamard<T: RuleValue>(
    tensors: &mut IndexMap<String, T>,
    pattern: &str,
    manifest: &Value,
    field: &str,
) -> Result<(), String> {
    let p = Pattern::parse(pattern)?;
    let Value::List(records) = manifest else {
        return Err(format!(
            "hadamard: the manifest is {} {manifest}, expected a list of records",
            manifest.type_name()
        ));
    };
    let mut blocks: IndexMap<String, i64> = IndexMap::new();
    for (k, record) in records.iter().enumerate() {
        let bad = |m: String| format!("hadamard: manifest record {k}: {m}");
        let Value::Map(record) = record else {
            return Err(bad(format!("expected a map, got {}", record.type_name())));
        };
        let mut caps = IndexMap::new();
        for c in p.captures() {
            match record.get(&c) {
                Some(Value::Str(s)) => caps.insert(c, s.clone()),
                _ => return Err(bad(format!("needs a string field '{c}'"))),
            };
        }
        let block = match record.get(field) {
            Some(Value::Int(b)) if *b >= 0 => *b,
            other => {
                return Err(bad(format!(
                    "field '{field}' must be an int of 0 or more, got {}",
                    other.map_or("nothing".to_string(), |v| v.to_string())
                )))
            }
        };
        let name = p.fill(&caps).map_err(bad)?;
        if blocks.insert(name.clone(), block).is_some() {
            return Err(bad(format!("a second record for '{name}'")));
        }
    }
    for (name, v) in tensors.iter_mut() {
        if p.matches(name).is_none() {
            continue;
        }
        *v = match blocks.get(name) {
            None => return Err(format!("hadamard: '{name}' has no record in the manifest")),
            Some(0) => {
                return Err(format!(
                    "hadamard: '{name}' exists but its record's block is 0 (no rotation)"
                ))
            }
            Some(&b) => v
                .hadamard_signs(b)
                .map_err(|e| format!("hadamard: {e} ('{name}')"))?,
        };
    }
    if let Some((name, b)) = blocks
        .iter()
        .find(|(name, b)| **b > 0 && !tensors.contains_key(*name))
    {
        return Err(format!(
            "hadamard: the manifest rotates '{name}' in blocks of {b} but the checkpoint has no such tensor"
        ));
    }
    Ok(())
}

/// Whether a rule's `if_shape` condition (an expression of `shape`) holds
/// for a tensor of shape `dims`; no condition holds.
fn shape_holds(cond: Option<&str>, dims: &[i64]) -> Result<bool, String> {
    let Some(src) = cond else { return Ok(true) };
    let mut scope: IndexMap<String, Value> = IndexMap::new();
    scope.insert(
        "shape".into(),
        Value::List(dims.iter().map(|&d| Value::Int(d)).collect()),
    );
    match lmspec_spec::expr::Expr::parse(src).and_then(|e| e.eval(&scope))? {
        Value::Bool(b) => Ok(b),
        other => Err(format!(
            "if_shape gave {} {other}, expected a bool",
            other.type_name()
        )),
    }
}

/// The layer index a tensor name's `{i}` capture gives, if any.
fn layer_of(caps: &IndexMap<String, String>) -> Option<i64> {
    caps.get("i").and_then(|s| s.parse().ok())
}

/// `axis` (negative from the end) as an index into `ndim` axes.
fn axis_index(axis: i64, ndim: usize) -> Result<usize, String> {
    let a = if axis < 0 { ndim as i64 + axis } else { axis };
    usize::try_from(a)
        .ok()
        .filter(|&a| a < ndim)
        .ok_or_else(|| format!("axis {axis} is out of range for {ndim} axes"))
}

fn eval_int(eval: RuleEval<'_>, v: &serde_yaml::Value, layer: Option<i64>) -> Result<i64, String> {
    match eval(v, Ty::Int, layer)? {
        Value::Int(n) => Ok(n),
        other => Err(format!(
            "gave {} {other}, expected an int",
            other.type_name()
        )),
    }
}

/// `shape` evaluated for a tensor of shape `dims`, its -1 worked out.
fn resolve_shape(
    shape: &[serde_yaml::Value],
    dims: &[i64],
    eval: RuleEval<'_>,
    layer: Option<i64>,
) -> Result<Vec<i64>, String> {
    let mut out = shape
        .iter()
        .map(|v| eval_int(eval, v, layer))
        .collect::<Result<Vec<i64>, String>>()?;
    let count: i64 = dims.iter().product();
    let known: i64 = out.iter().filter(|&&d| d != -1).product();
    if out.iter().any(|&d| d < -1 || d == 0) || out.iter().filter(|&&d| d == -1).count() > 1 {
        return Err(format!(
            "shape {out:?}: sizes must be positive, one may be -1"
        ));
    }
    if let Some(pos) = out.iter().position(|&d| d == -1) {
        if count % known != 0 {
            return Err(format!("cannot reshape {dims:?} to {out:?}"));
        }
        out[pos] = count / known;
    }
    if out.iter().product::<i64>() != count {
        return Err(format!("cannot reshape {dims:?} to {out:?}"));
    }
    Ok(out)
}

/// Rewrites every tensor matching `p` with `f(value, layer index)`.
fn rewrite<T: RuleValue>(
    tensors: &mut IndexMap<String, T>,
    p: &str,
    what: &str,
    f: impl Fn(&T, Option<i64>) -> Result<T, String>,
) -> Result<(), String> {
    let p = Pattern::parse(p)?;
    for (k, v) in tensors.iter_mut() {
        if let Some(caps) = p.matches(k) {
            *v = f(v, layer_of(&caps)).map_err(|e| format!("{what}: {e} ('{k}')"))?;
        }
    }
    Ok(())
}

/// Applies rules in order to a name -> tensor map (or any name -> value map,
/// e.g. shapes read from headers). `eval` evaluates a rule's expressions.
pub fn apply<T: RuleValue>(
    rules: &[&RawRule],
    mut tensors: IndexMap<String, T>,
    eval: RuleEval<'_>,
) -> Result<Applied<T>, String> {
    // A rule's condition (none holds), at a tensor's layer when given.
    let holds = |w: Option<&serde_yaml::Value>, layer: Option<i64>| match w {
        None => Ok(true),
        Some(w) => match eval(w, Ty::Bool, layer)? {
            Value::Bool(b) => Ok(b),
            other => Err(format!(
                "condition gave {} {other}, expected a bool",
                other.type_name()
            )),
        },
    };
    let mut ties = Vec::new();
    let mut renames = Vec::new();
    for rule in rules {
        match rule {
            RawRule::Reshape { pattern, shape } => {
                rewrite(&mut tensors, pattern, "reshape", |v, layer| {
                    let dims = v.dims();
                    v.reshaped(&resolve_shape(shape, &dims, eval, layer)?)
                })?;
            }
            RawRule::Repeat {
                pattern,
                axis,
                times,
            } => {
                rewrite(&mut tensors, pattern, "repeat", |v, layer| {
                    let axis = axis_index(*axis, v.dims().len())?;
                    match eval_int(eval, times, layer)? {
                        n if n >= 1 => v.repeated(axis, n),
                        n => Err(format!("times: {n} is not at least 1")),
                    }
                })?;
            }
            RawRule::L2Normalize {
                pattern,
                axis,
                eps,
                when,
            } => {
                if !holds(when.as_ref(), None)? {
                    continue;
                }
                rewrite(&mut tensors, pattern, "l2_normalize", |v, _| {
                    v.l2_normalized(axis_index(*axis, v.dims().len())?, *eps)
                })?;
            }
            RawRule::MoveAxis {
                pattern,
                from,
                to,
                if_shape,
            } => {
                rewrite(&mut tensors, pattern, "moveaxis", |v, _| {
                    let dims = v.dims();
                    if !shape_holds(if_shape.as_deref(), &dims)? {
                        return Ok(v.clone());
                    }
                    let (f, t) = (axis_index(*from, dims.len())?, axis_index(*to, dims.len())?);
                    v.moved_axis(f, t)
                })?;
            }
            RawRule::Split {
                pattern,
                axis,
                to,
                interleaved,
                sizes,
            } => {
                let from = Pattern::parse(pattern)?;
                let to = to
                    .iter()
                    .map(|t| Pattern::parse(t))
                    .collect::<Result<Vec<_>, _>>()?;
                let mut out = IndexMap::with_capacity(tensors.len() + to.len());
                for (k, v) in tensors {
                    let Some(caps) = from.matches(&k) else {
                        if out.insert(k.clone(), v).is_some() {
                            return Err(format!("split gives two tensors the name '{k}'"));
                        }
                        continue;
                    };
                    let a = axis_index(*axis, v.dims().len())
                        .map_err(|e| format!("split: {e} ('{k}')"))?;
                    let parts = match sizes {
                        Some(sizes) => {
                            let layer = layer_of(&caps);
                            let sizes = sizes
                                .iter()
                                .map(|v| eval_int(eval, v, layer))
                                .collect::<Result<Vec<i64>, String>>()
                                .map_err(|e| format!("split: sizes: {e} ('{k}')"))?;
                            v.blocks(a, &sizes)
                        }
                        None => v.parts(a, to.len(), *interleaved),
                    }
                    .map_err(|e| format!("{e} ('{k}')"))?;
                    for (t, part) in to.iter().zip(parts) {
                        let name = t.fill(&caps)?;
                        if out.insert(name.clone(), part).is_some() {
                            return Err(format!("split gives two tensors the name '{name}'"));
                        }
                    }
                }
                tensors = out;
            }
            RawRule::Fp8 {
                pattern,
                scale,
                block,
            } => with_scales(&mut tensors, pattern, scale, |w, sc| {
                w.fp8_dequantized(sc, *block)
            })?,
            RawRule::Ternary { pattern, scale } => {
                with_scales(&mut tensors, pattern, scale, |w, sc| w.ternary_unpacked(sc))?
            }
            RawRule::Hadamard {
                pattern,
                manifest,
                block,
                when,
            } => {
                if !holds(when.as_ref(), None)? {
                    continue;
                }
                let records = eval(manifest, Ty::List, None)
                    .map_err(|e| format!("hadamard: manifest: {e}"))?;
                hadamard(&mut tensors, pattern, &records, block)?
            }
            RawRule::Add {
                pattern,
                value,
                if_shape,
                if_present,
            } => {
                if let Some(p) = if_present {
                    let p = Pattern::parse(p)?;
                    if !tensors.keys().any(|k| p.matches(k).is_some()) {
                        continue;
                    }
                }
                rewrite(&mut tensors, pattern, "add", |v, _| {
                    if !shape_holds(if_shape.as_deref(), &v.dims())? {
                        return Ok(v.clone());
                    }
                    v.plus(*value)
                })?;
            }
            RawRule::SkipIfPresent(p) => {
                let p = Pattern::parse(p)?;
                if tensors.keys().any(|k| p.matches(k).is_some()) {
                    break;
                }
            }
            RawRule::DropWhen { pattern, when } => {
                let p = Pattern::parse(pattern)?;
                let mut kept = IndexMap::with_capacity(tensors.len());
                for (k, v) in tensors {
                    let dropped = match p.matches(&k) {
                        Some(caps) => holds(Some(when), layer_of(&caps))
                            .map_err(|e| format!("drop: {e} ('{k}')"))?,
                        None => false,
                    };
                    if !dropped {
                        kept.insert(k, v);
                    }
                }
                tensors = kept;
            }
            RawRule::Drop(p) => {
                let p = Pattern::parse(p)?;
                tensors.retain(|k, _| p.matches(k).is_none());
            }
            RawRule::Transpose(p) => {
                let p = Pattern::parse(p)?;
                for (k, v) in tensors.iter_mut() {
                    if p.matches(k).is_some() {
                        *v = v.transposed().map_err(|e| format!("{e} ('{k}')"))?;
                    }
                }
            }
            RawRule::Rename { from, to } => {
                let (from, to) = (Pattern::parse(from)?, Pattern::parse(to)?);
                let mut out = IndexMap::with_capacity(tensors.len());
                for (k, v) in tensors {
                    let name = match from.matches(&k) {
                        Some(caps) => to.fill(&caps)?,
                        None => k.clone(),
                    };
                    if let Some(pair) = module_rename(&k, &name) {
                        if !renames.contains(&pair) {
                            renames.push(pair);
                        }
                    }
                    if out.insert(name.clone(), v).is_some() {
                        return Err(format!("rename gives two tensors the name '{name}'"));
                    }
                }
                tensors = out;
            }
            RawRule::Stack { from, to, index } => {
                tensors = stack(tensors, &Pattern::parse(from)?, &Pattern::parse(to)?, index)?;
            }
            RawRule::Tie {
                target,
                source,
                when,
                if_missing,
            } => {
                if !holds(when.as_ref(), None)? {
                    continue;
                }
                let tprefix = format!("{target}.");
                let sprefix = format!("{source}.");
                if *if_missing && tensors.keys().any(|k| k.starts_with(&tprefix)) {
                    continue;
                }
                tensors.retain(|k, _| !k.starts_with(&tprefix));
                let tied: Vec<(String, T)> = tensors
                    .iter()
                    .filter_map(|(k, v)| {
                        k.strip_prefix(&sprefix)
                            .map(|s| (format!("{tprefix}{s}"), v.clone()))
                    })
                    .collect();
                if tied.is_empty() {
                    return Err(format!(
                        "tie: no tensors under '{source}' to tie '{target}' to"
                    ));
                }
                tensors.extend(tied);
                ties.push((target.to_string(), source.to_string()));
            }
        }
    }
    Ok(Applied {
        tensors,
        ties,
        renames,
    })
}

/// The module rename behind a tensor rename (`a.b.weight` -> `c.weight`
/// gives `a.b` -> `c`), when both names end in the same parameter name.
fn module_rename(old: &str, new: &str) -> Option<(String, String)> {
    let (old_module, old_param) = old.rsplit_once('.')?;
    let (new_module, new_param) = new.rsplit_once('.')?;
    (old != new && old_param == new_param && old_module != new_module)
        .then(|| (old_module.to_string(), new_module.to_string()))
}

/// The `stack` rule: tensors matching `from` grouped by their `to` name,
/// each group stacked in `index` order, which must run 0, 1, ... n-1. The
/// stacked tensor takes the place of the group's first member.
fn stack<T: RuleValue>(
    tensors: IndexMap<String, T>,
    from: &Pattern,
    to: &Pattern,
    index: &str,
) -> Result<IndexMap<String, T>, String> {
    let mut groups: IndexMap<String, Vec<(usize, String)>> = IndexMap::new();
    for k in tensors.keys() {
        if let Some(caps) = from.matches(k) {
            let i: usize = caps[index]
                .parse()
                .map_err(|_| format!("stack: '{k}': index '{}' is not a number", caps[index]))?;
            groups
                .entry(to.fill(&caps)?)
                .or_default()
                .push((i, k.clone()));
        }
    }
    if groups.is_empty() {
        return Ok(tensors);
    }
    let mut members: IndexMap<String, String> = IndexMap::new();
    for (name, list) in &mut groups {
        list.sort();
        if let Some((pos, _)) = list.iter().enumerate().find(|(pos, (i, _))| pos != i) {
            return Err(format!(
                "stack: '{name}' has no member {pos} (members {:?})",
                list.iter().map(|(i, _)| *i).collect::<Vec<_>>()
            ));
        }
        for (_, k) in list.iter() {
            members.insert(k.clone(), name.clone());
        }
    }
    let mut out = IndexMap::with_capacity(tensors.len());
    for (k, v) in &tensors {
        match members.get(k) {
            None => {
                if out.insert(k.clone(), v.clone()).is_some() || groups.contains_key(k) {
                    return Err(format!("stack gives two tensors the name '{k}'"));
                }
            }
            Some(name) if !out.contains_key(name) => {
                let items: Vec<T> = groups[name]
                    .iter()
                    .map(|(_, m)| tensors[m].clone())
                    .collect();
                let stacked = T::stacked(&items).map_err(|e| format!("{e} ('{name}')"))?;
                out.insert(name.clone(), stacked);
            }
            Some(_) => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_and_fill() {
        let p = Pattern::parse("blk.{i}.attn_q.{s}").unwrap();
        let caps = p.matches("blk.12.attn_q.weight").unwrap();
        assert_eq!(caps["i"], "12");
        assert_eq!(caps["s"], "weight");
        assert!(p.matches("blk.12.attn_k.weight").is_none());
        assert!(p.matches("blk.1.2.attn_q.weight").is_none());
        let to = Pattern::parse("model.layers.{i}.self_attn.q_proj.{s}").unwrap();
        assert_eq!(
            to.fill(&caps).unwrap(),
            "model.layers.12.self_attn.q_proj.weight"
        );
        let tail = Pattern::parse("transformer.{rest*}").unwrap();
        assert_eq!(tail.matches("transformer.h.0.x").unwrap()["rest"], "h.0.x");
    }

    #[test]
    fn bad_patterns() {
        assert!(Pattern::parse("a.{i").is_err());
        assert!(Pattern::parse("a.{}.b").is_err());
        assert!(Pattern::parse("a.{i}{j}").is_err());
        let caps = IndexMap::new();
        assert!(Pattern::parse("x.{i}").unwrap().fill(&caps).is_err());
    }

    #[test]
    fn renames_report_the_modules_they_move() {
        let rule = RawRule::Rename {
            from: "transformer.h.{i}.attn.{s}".into(),
            to: "model.layers.{i}.self_attn.{s}".into(),
        };
        let mut t: IndexMap<String, Vec<i64>> = IndexMap::new();
        for s in ["weight", "scales", "biases"] {
            t.insert(format!("transformer.h.0.attn.{s}"), vec![4, 8]);
        }
        t.insert("lm_head.weight".into(), vec![3, 8]);
        let out = apply(&[&rule], t, &no_eval).expect("renames");
        assert_eq!(
            out.renames,
            vec![(
                "transformer.h.0.attn".to_string(),
                "model.layers.0.self_attn".to_string()
            )]
        );
    }

    #[test]
    fn stack_groups_by_target_in_index_order() {
        let rule = RawRule::Stack {
            from: "l.{l}.experts.{e}.{m}.weight".into(),
            to: "l.{l}.switch.{m}.weight".into(),
            index: "e".into(),
        };
        let mut t: IndexMap<String, Vec<i64>> = IndexMap::new();
        for e in [1, 0, 2] {
            for m in ["up", "down"] {
                t.insert(format!("l.0.experts.{e}.{m}.weight"), vec![4, 8]);
            }
        }
        t.insert("l.0.gate.weight".into(), vec![3, 8]);
        let out = apply(&[&rule], t, &no_eval).expect("stacks").tensors;
        let names: Vec<&str> = out.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "l.0.switch.up.weight",
                "l.0.switch.down.weight",
                "l.0.gate.weight"
            ]
        );
        assert_eq!(out["l.0.switch.up.weight"], vec![3, 4, 8]);

        let mut gap: IndexMap<String, Vec<i64>> = IndexMap::new();
        gap.insert("l.0.experts.0.up.weight".into(), vec![4, 8]);
        gap.insert("l.0.experts.2.up.weight".into(), vec![4, 8]);
        let e = apply(&[&rule], gap, &no_eval).unwrap_err();
        assert!(e.contains("has no member 1"), "{e}");
    }

    fn no_eval(v: &serde_yaml::Value, _: Ty, _: Option<i64>) -> Result<Value, String> {
        Ok(Value::from_yaml(v))
    }

    /// Sizes read the layer index of the name's `{i}` (here: 2 + i).
    fn layer_eval(v: &serde_yaml::Value, ty: Ty, layer: Option<i64>) -> Result<Value, String> {
        let e = lmspec_spec::config::literal_or_expr(v, ty)?;
        let mut scope = IndexMap::new();
        scope.insert("i".to_string(), layer.map_or(Value::Null, Value::Int));
        e.eval(&scope)
    }

    #[test]
    fn reshape_and_repeat_per_layer() {
        let rules = [
            RawRule::Reshape {
                pattern: "l.{i}.conv".into(),
                shape: vec![
                    serde_yaml::Value::from(-1),
                    serde_yaml::Value::from(2),
                    1.into(),
                ],
            },
            RawRule::Repeat {
                pattern: "l.{i}.conv".into(),
                axis: 0,
                times: serde_yaml::Value::from("2 + i"),
            },
        ];
        let refs: Vec<&RawRule> = rules.iter().collect();
        let mut t: IndexMap<String, Vec<i64>> = IndexMap::new();
        t.insert("l.0.conv".into(), vec![1, 1, 3, 1, 2]);
        t.insert("l.1.conv".into(), vec![1, 1, 3, 1, 2]);
        let out = apply(&refs, t, &layer_eval).expect("applies").tensors;
        assert_eq!(out["l.0.conv"], vec![6, 2, 1]);
        assert_eq!(out["l.1.conv"], vec![9, 2, 1]);

        // Arrays: each head's pair repeated for its channels, in order.
        let a = Array::from_slice(&[1.0f32, 2.0, 3.0, 4.0], &[1, 1, 2, 1, 2]);
        let mut t: IndexMap<String, Array> = IndexMap::new();
        t.insert("l.0.conv".into(), a);
        let out = apply(&refs, t, &layer_eval).expect("applies").tensors;
        let c = &out["l.0.conv"];
        assert_eq!(c.shape(), &[4, 2, 1]);
        assert_eq!(
            c.as_slice::<f32>(),
            &[1.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 4.0]
        );

        let bad = RawRule::Reshape {
            pattern: "x".into(),
            shape: vec![serde_yaml::Value::from(3), serde_yaml::Value::from(-1)],
        };
        let mut t: IndexMap<String, Vec<i64>> = IndexMap::new();
        t.insert("x".into(), vec![2, 2]);
        let e = apply(&[&bad], t, &no_eval).unwrap_err();
        assert!(e.contains("cannot reshape"), "{e}");
    }

    #[test]
    fn l2_normalize_rows_of_float_tensors_only() {
        let rule = RawRule::L2Normalize {
            pattern: "head.weight".into(),
            axis: -1,
            eps: 0.0,
            when: None,
        };
        let mut t: IndexMap<String, Array> = IndexMap::new();
        t.insert(
            "head.weight".into(),
            Array::from_slice(&[3.0f32, 4.0, 0.0, 2.0], &[2, 2]),
        );
        let out = apply(&[&rule], t, &no_eval).expect("applies").tensors;
        assert_eq!(out["head.weight"].as_slice::<f32>(), &[0.6, 0.8, 0.0, 1.0]);
        // A packed quantized weight is left as it is.
        let mut q: IndexMap<String, Array> = IndexMap::new();
        q.insert("head.weight".into(), Array::from_slice(&[7u32, 9], &[1, 2]));
        let out = apply(&[&rule], q, &no_eval).expect("applies").tensors;
        assert_eq!(out["head.weight"].as_slice::<u32>(), &[7, 9]);
    }

    #[test]
    fn moveaxis_and_add_follow_their_shape_and_layout_conditions() {
        let rules = [
            RawRule::MoveAxis {
                pattern: "l.{i}.conv.weight".into(),
                from: 2,
                to: 1,
                if_shape: Some("shape[2] != 1".into()),
            },
            RawRule::Add {
                pattern: "l.{i}.norm.weight".into(),
                value: 1.0,
                if_shape: Some("len(shape) == 1".into()),
                if_present: Some("l.{i}.experts.{e}".into()),
            },
        ];
        let refs: Vec<&RawRule> = rules.iter().collect();
        // numpy: np.moveaxis(np.arange(6).reshape(2, 1, 3), 2, 1)
        let conv = || Array::from_slice(&[0.0f32, 1.0, 2.0, 3.0, 4.0, 5.0], &[2, 1, 3]);
        let norm = || Array::from_slice(&[0.5f32, -0.25], &[2]);
        let mut t: IndexMap<String, Array> = IndexMap::new();
        t.insert("l.0.conv.weight".into(), conv());
        t.insert("l.0.norm.weight".into(), norm());
        t.insert("l.0.experts.0".into(), Array::from_f32(0.0));
        let out = apply(&refs, t, &no_eval).expect("applies").tensors;
        let c = out["l.0.conv.weight"].contiguous().expect("contiguous");
        assert_eq!(c.shape(), &[2, 3, 1]);
        assert_eq!(c.as_slice::<f32>(), &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(out["l.0.norm.weight"].as_slice::<f32>(), &[1.5, 0.75]);
        // Already in the spec's layout: nothing moves, and without the
        // marker tensor nothing is added.
        let mut t: IndexMap<String, Array> = IndexMap::new();
        t.insert(
            "l.0.conv.weight".into(),
            conv().reshape(&[2, 3, 1]).expect("reshape"),
        );
        t.insert("l.0.norm.weight".into(), norm());
        let out = apply(&refs, t, &no_eval).expect("applies").tensors;
        assert_eq!(out["l.0.conv.weight"].shape(), &[2, 3, 1]);
        assert_eq!(out["l.0.norm.weight"].as_slice::<f32>(), &[0.5, -0.25]);
        // Shapes read from headers move the same way.
        let mut shapes: IndexMap<String, Vec<i64>> = IndexMap::new();
        shapes.insert("l.0.conv.weight".into(), vec![8, 1, 4]);
        let out = apply(&refs, shapes, &no_eval).expect("applies").tensors;
        assert_eq!(out["l.0.conv.weight"], vec![8, 4, 1]);
        // An axis out of range, a condition that is not a bool, an integer
        // tensor: errors naming the rule and the tensor.
        let bad = RawRule::MoveAxis {
            pattern: "l.{i}.conv.weight".into(),
            from: 3,
            to: 0,
            if_shape: None,
        };
        let mut t: IndexMap<String, Array> = IndexMap::new();
        t.insert("l.0.conv.weight".into(), conv());
        let e = apply(&[&bad], t, &no_eval).unwrap_err();
        assert!(
            e.contains("moveaxis") && e.contains("l.0.conv.weight"),
            "{e}"
        );
        let bad = RawRule::Add {
            pattern: "q".into(),
            value: 1.0,
            if_shape: Some("shape".into()),
            if_present: None,
        };
        let mut t: IndexMap<String, Array> = IndexMap::new();
        t.insert("q".into(), Array::from_slice(&[1u32], &[1]));
        let e = apply(&[&bad], t.clone(), &no_eval).unwrap_err();
        assert!(e.contains("expected a bool"), "{e}");
        let bad = RawRule::Add {
            pattern: "q".into(),
            value: 1.0,
            if_shape: None,
            if_present: None,
        };
        let e = apply(&[&bad], t, &no_eval).unwrap_err();
        assert!(e.contains("only floating-point"), "{e}");
    }

    #[test]
    fn split_cuts_blocks_or_interleaved_rows_into_named_parts() {
        let rule = |interleaved| RawRule::Split {
            pattern: "l.{i}.gate_up".into(),
            axis: 1,
            to: vec!["l.{i}.gate".into(), "l.{i}.up".into()],
            interleaved,
            sizes: None,
        };
        // [1, 4, 2]: rows 0..4 of two columns.
        let fused = || Array::from_slice(&[0.0f32, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], &[1, 4, 2]);
        let mut t: IndexMap<String, Array> = IndexMap::new();
        t.insert("l.3.gate_up".into(), fused());
        t.insert("l.3.other".into(), Array::from_f32(1.0));
        let r = rule(false);
        let out = apply(&[&r], t, &no_eval).expect("applies").tensors;
        let keys: Vec<&str> = out.keys().map(String::as_str).collect();
        assert_eq!(keys, ["l.3.gate", "l.3.up", "l.3.other"]);
        assert_eq!(out["l.3.gate"].shape(), &[1, 2, 2]);
        assert_eq!(out["l.3.gate"].as_slice::<f32>(), &[0.0, 1.0, 2.0, 3.0]);
        assert_eq!(out["l.3.up"].as_slice::<f32>(), &[4.0, 5.0, 6.0, 7.0]);
        let mut t: IndexMap<String, Array> = IndexMap::new();
        t.insert("l.3.gate_up".into(), fused());
        let r = rule(true);
        let out = apply(&[&r], t, &no_eval).expect("applies").tensors;
        assert_eq!(out["l.3.gate"].as_slice::<f32>(), &[0.0, 1.0, 4.0, 5.0]);
        assert_eq!(out["l.3.up"].as_slice::<f32>(), &[2.0, 3.0, 6.0, 7.0]);
        // Shapes split the same way; an axis that does not divide, or a
        // part named like a tensor that exists, is an error naming it.
        let mut shapes: IndexMap<String, Vec<i64>> = IndexMap::new();
        shapes.insert("l.0.gate_up".into(), vec![4, 6, 8]);
        let out = apply(&[&r], shapes, &no_eval).expect("applies").tensors;
        assert_eq!(out["l.0.up"], vec![4, 3, 8]);
        let mut odd: IndexMap<String, Vec<i64>> = IndexMap::new();
        odd.insert("l.0.gate_up".into(), vec![4, 5, 8]);
        let e = apply(&[&r], odd, &no_eval).unwrap_err();
        assert!(
            e.contains("equal parts") && e.contains("l.0.gate_up"),
            "{e}"
        );
        // Blocks of given sizes (expressions of the config).
        let sized = RawRule::Split {
            pattern: "l.{i}.kv".into(),
            axis: 1,
            to: vec!["l.{i}.k".into(), "l.{i}.v".into()],
            interleaved: false,
            sizes: Some(vec![serde_yaml::Value::from(1), serde_yaml::Value::from(3)]),
        };
        let mut t: IndexMap<String, Array> = IndexMap::new();
        t.insert("l.0.kv".into(), fused());
        let out = apply(&[&sized], t, &no_eval).expect("applies").tensors;
        assert_eq!(out["l.0.k"].as_slice::<f32>(), &[0.0, 1.0]);
        assert_eq!(
            out["l.0.v"].as_slice::<f32>(),
            &[2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
        );
        let mut short: IndexMap<String, Vec<i64>> = IndexMap::new();
        short.insert("l.0.kv".into(), vec![1, 5, 2]);
        let e = apply(&[&sized], short, &no_eval).unwrap_err();
        assert!(e.contains("do not cut an axis of 5"), "{e}");
        let mut clash: IndexMap<String, Vec<i64>> = IndexMap::new();
        clash.insert("l.0.up".into(), vec![1]);
        clash.insert("l.0.gate_up".into(), vec![4, 6, 8]);
        let e = apply(&[&r], clash, &no_eval).unwrap_err();
        assert!(e.contains("two tensors the name 'l.0.up'"), "{e}");
    }

    #[test]
    fn fp8_tiles_are_scaled_and_their_scales_dropped() {
        let rule = RawRule::Fp8 {
            pattern: "{m*}.weight".into(),
            scale: "{m*}.weight_scale_inv".into(),
            block: 2,
        };
        // e4m3 bytes: 0x38 = 1.0, 0x40 = 2.0, 0xb8 = -1.0, 0x30 = 0.5.
        let w = Array::from_slice(&[0x38u8, 0x40, 0xb8, 0x30, 0x38, 0x40], &[2, 3]);
        // [2, 3] in 2x2 tiles: one row of two tiles (the second padded).
        let s = Array::from_slice(&[2.0f32, 10.0], &[1, 2]);
        let mut t: IndexMap<String, Array> = IndexMap::new();
        t.insert("a.b.weight".into(), w);
        t.insert("a.b.weight_scale_inv".into(), s);
        t.insert("a.norm".into(), Array::from_f32(1.0));
        let out = apply(&[&rule], t, &no_eval).expect("applies").tensors;
        let keys: Vec<&str> = out.keys().map(String::as_str).collect();
        assert_eq!(keys, ["a.b.weight", "a.norm"]);
        let d = out["a.b.weight"].as_dtype(Dtype::Float32).expect("f32");
        assert_eq!(out["a.b.weight"].dtype(), Dtype::Bfloat16);
        assert_eq!(d.shape(), &[2, 3]);
        assert_eq!(d.as_slice::<f32>(), &[2.0, 4.0, -10.0, 1.0, 2.0, 20.0]);
        // A scale of the wrong shape, or a weight that is not bytes.
        let mut t: IndexMap<String, Array> = IndexMap::new();
        t.insert("a.weight".into(), Array::from_slice(&[0x38u8; 6], &[2, 3]));
        t.insert(
            "a.weight_scale_inv".into(),
            Array::from_slice(&[1.0f32], &[1, 1]),
        );
        let e = apply(&[&rule], t, &no_eval).unwrap_err();
        assert!(e.contains("needs [1, 2]") && e.contains("a.weight"), "{e}");
        let mut t: IndexMap<String, Array> = IndexMap::new();
        t.insert("a.weight".into(), Array::from_slice(&[1.0f32; 4], &[2, 2]));
        t.insert(
            "a.weight_scale_inv".into(),
            Array::from_slice(&[1.0f32], &[1, 1]),
        );
        let e = apply(&[&rule], t, &no_eval).unwrap_err();
        assert!(e.contains("expected [m, n] bytes"), "{e}");
    }

    #[test]
    fn ternary_bytes_unpack_to_rows_by_bit_pair_and_scale() {
        let rule = RawRule::Ternary {
            pattern: "{m*}.weight".into(),
            scale: "{m*}.weight_scale".into(),
        };
        // One packed row of 2 columns: out = 4 rows. Byte b = v0 + 4 v1 +
        // 16 v2 + 64 v3, weight row j = v_j - 1 (as mlx-lm's BitLinear
        // kernel reads it).
        let byte = |v: [u8; 4]| v[0] + 4 * v[1] + 16 * v[2] + 64 * v[3];
        let w = Array::from_slice(&[byte([0, 1, 2, 1]), byte([2, 2, 0, 1])], &[1, 2]);
        let mut t: IndexMap<String, Array> = IndexMap::new();
        t.insert("a.weight".into(), w);
        t.insert("a.weight_scale".into(), Array::from_slice(&[0.5f32], &[1]));
        let out = apply(&[&rule], t, &no_eval).expect("applies").tensors;
        let keys: Vec<&str> = out.keys().map(String::as_str).collect();
        assert_eq!(keys, ["a.weight"]);
        let d = &out["a.weight"];
        assert_eq!((d.shape(), d.dtype()), (&[4, 2][..], Dtype::Float32));
        assert_eq!(
            d.as_slice::<f32>(),
            &[-0.5, 0.5, 0.0, 0.5, 0.5, -0.5, 0.0, 0.0]
        );
        // The header pass gives the same shape.
        let shapes = IndexMap::from([
            ("a.weight".to_string(), vec![3i64, 8]),
            ("a.weight_scale".to_string(), vec![1i64]),
        ]);
        let out = apply(&[&rule], shapes, &no_eval).expect("applies").tensors;
        assert_eq!(out["a.weight"], vec![12, 8]);
        // Not bytes, or a scale of more than one value.
        let mut t: IndexMap<String, Array> = IndexMap::new();
        t.insert("a.weight".into(), Array::from_slice(&[1.0f32; 4], &[2, 2]));
        t.insert("a.weight_scale".into(), Array::from_f32(1.0));
        let e = apply(&[&rule], t, &no_eval).unwrap_err();
        assert!(
            e.contains("expected [out / 4, in] bytes") && e.contains("a.weight"),
            "{e}"
        );
        let mut t: IndexMap<String, Array> = IndexMap::new();
        t.insert("a.weight".into(), Array::from_slice(&[0u8; 4], &[2, 2]));
        t.insert(
            "a.weight_scale".into(),
            Array::from_slice(&[1.0f32, 2.0], &[2]),
        );
        let e = apply(&[&rule], t, &no_eval).unwrap_err();
        assert!(e.contains("one floating-point value"), "{e}");
    }

    #[test]
    fn a_conditional_drop_sees_the_layer_of_each_name() {
        // Drop layers 2 and up (i >= 2), keep the rest and other names.
        let rule = RawRule::DropWhen {
            pattern: "l.{i}.k.weight".into(),
            when: serde_yaml::Value::String("i >= 2".into()),
        };
        let names = [
            "l.0.k.weight",
            "l.1.k.weight",
            "l.2.k.weight",
            "l.3.k.weight",
            "l.3.q.weight",
        ];
        let shapes: IndexMap<String, Vec<i64>> =
            names.iter().map(|n| (n.to_string(), vec![2])).collect();
        let out = apply(&[&rule], shapes.clone(), &layer_eval).expect("applies");
        let kept: Vec<&str> = out.tensors.keys().map(String::as_str).collect();
        assert_eq!(kept, ["l.0.k.weight", "l.1.k.weight", "l.3.q.weight"]);
        let not_bool = RawRule::DropWhen {
            pattern: "l.{i}.k.weight".into(),
            when: serde_yaml::Value::String("i + 1".into()),
        };
        let e = apply(&[&not_bool], shapes, &layer_eval).unwrap_err();
        assert!(
            e.contains("expected a bool") && e.contains("l.0.k.weight"),
            "{e}"
        );
    }

    #[test]
    fn hadamard_signs_take_their_block_from_the_manifest() {
        let rule = |manifest: &str| RawRule::Hadamard {
            pattern: "lm.{path*}.signs".into(),
            manifest: serde_yaml::from_str(manifest).expect("yaml"),
            block: "block".into(),
            when: None,
        };
        let manifest = "[{path: a.x, block: 2}, {path: b, block: 0}, {path: c, block: 4}]";
        let signs = |v: &[f32]| Array::from_slice(v, &[v.len() as i32]);
        let tensors = |extra: &[(&str, Array)]| {
            let mut t: IndexMap<String, Array> = IndexMap::new();
            t.insert("lm.a.x.signs".into(), signs(&[1.0, -1.0, -1.0, 1.0]));
            t.insert("lm.c.signs".into(), signs(&[-1.0; 8]));
            t.insert("lm.a.x.weight".into(), signs(&[0.5; 4]));
            for (k, v) in extra {
                t.insert(k.to_string(), v.clone());
            }
            t
        };
        let out = apply(&[&rule(manifest)], tensors(&[]), &no_eval)
            .expect("applies")
            .tensors;
        let a = &out["lm.a.x.signs"];
        assert_eq!(a.shape(), &[2, 2]);
        assert_eq!(a.as_slice::<f32>(), &[1.0, -1.0, -1.0, 1.0]);
        assert_eq!(out["lm.c.signs"].shape(), &[2, 4]);
        assert_eq!(out["lm.a.x.weight"].shape(), &[4]);
        // The header pass lays the shapes out the same way.
        let shapes = IndexMap::from([
            ("lm.a.x.signs".to_string(), vec![4i64]),
            ("lm.c.signs".to_string(), vec![8i64]),
        ]);
        let out = apply(&[&rule(manifest)], shapes, &no_eval).expect("applies");
        assert_eq!(out.tensors["lm.c.signs"], vec![2, 4]);
        // What the rule refuses, each naming the tensor or the record.
        let refused = |manifest: &str, t: IndexMap<String, Array>, want: &str| {
            let e = apply(&[&rule(manifest)], t, &no_eval).unwrap_err();
            assert!(e.contains(want), "{e}");
        };
        let mut bad = tensors(&[]);
        bad.insert("lm.a.x.signs".into(), signs(&[1.0, 0.5, 1.0, 1.0]));
        refused(manifest, bad, "+1 or -1 ('lm.a.x.signs')");
        let stray = tensors(&[("lm.d.signs", signs(&[1.0; 2]))]);
        refused(manifest, stray, "'lm.d.signs' has no record");
        let zero = tensors(&[("lm.b.signs", signs(&[1.0; 2]))]);
        refused(
            manifest,
            zero,
            "'lm.b.signs' exists but its record's block is 0",
        );
        let mut missing = tensors(&[]);
        missing.shift_remove("lm.c.signs");
        refused(manifest, missing, "rotates 'lm.c.signs' in blocks of 4");
        let uneven = "[{path: a.x, block: 3}, {path: c, block: 4}]";
        refused(uneven, tensors(&[]), "a block of 3 does not fit 4 signs");
        refused(
            "[{name: a.x, block: 2}]",
            tensors(&[]),
            "record 0: needs a string field 'path'",
        );
        let twice = "[{path: c, block: 4}, {path: c, block: 8}, {path: a.x, block: 2}]";
        refused(
            twice,
            tensors(&[]),
            "record 1: a second record for 'lm.c.signs'",
        );
        refused(
            "[{path: c, block: -4}]",
            tensors(&[]),
            "field 'block' must be an int of 0 or more",
        );
        refused("modules", tensors(&[]), "expected a list of records");
    }

    #[test]
    fn stacked_arrays_keep_member_order() {
        let a = Array::from_slice(&[1.0f32, 2.0], &[2]);
        let b = Array::from_slice(&[3.0f32, 4.0], &[2]);
        let s = Array::stacked(&[a, b]).expect("stack");
        assert_eq!(s.shape(), &[2, 2]);
        assert_eq!(s.as_slice::<f32>(), &[1.0, 2.0, 3.0, 4.0]);
    }
}
