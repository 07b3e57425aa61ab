//! Prompt caches as files, in mlx-lm's `save_prompt_cache` layout, so that
//! a file either engine writes loads in the other.
//!
//! The layout: one cache object per layer, in layer order. Tensors are named
//! by their position in the nested state (`3.0` is layer 3's keys); the
//! safetensors metadata holds `0.<key>` (free-form metadata), `1.<layer>`
//! (the cache class of each layer) and `2.<k>.0` / `2.<k>.1` (which tensor
//! names stand for an integer, a string or nothing). Classes and their
//! states:
//!
//! - `KVCache`: keys, values, offset.
//! - `RotatingKVCache`: keys, values, offset, keep, max_size, write index.
//! - `QuantizedKVCache`: (data, scales, biases) of keys and of values,
//!   offset, group size, bits.
//! - `ArraysCache`: a list of arrays (convolution rows, recurrent state),
//!   left padding, lengths (both nothing for one sequence).
//! - `CacheList`: a list of (state, class) of the caches above.
//!
//! lmspec's cache slots belong to ops; a layer is the slots whose node
//! paths share the prefix up to the first number (`layers.3`). Attention
//! slots take the file's key/value caches in order and convolution or
//! recurrent slots take its arrays in order, so the file's grouping need not
//! follow the plan's op order. Every tensor is checked against the shapes a
//! one-token run of the model gives before the cache is used.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use mlx_rs::{Array, Dtype};

use crate::cache::{CacheState, KvCache, ModelCache, QuantizedKvCache, RotatingKvCache};
use crate::error::{Error, Result};
use crate::model::Model;

/// Metadata key naming the model a cache was made by (see
/// [`Model::fingerprint`]).
pub const FINGERPRINT_KEY: &str = "lmspec.fingerprint";
/// Metadata key of the positions processed (for caches without attention).
pub const OFFSET_KEY: &str = "lmspec.offset";
/// Metadata key mlx-lm uses for the model a cache was made with.
pub const MODEL_KEY: &str = "model";

/// A value of a cache's state as the file stores it.
#[derive(Debug)]
enum Tree {
    Array(Array),
    Int(i64),
    Str(String),
    Nothing,
    List(Vec<Tree>),
}

/// Collects the tensors and metadata of a file being written.
#[derive(Default)]
struct Writer {
    arrays: Vec<(String, Array)>,
    scalars: Vec<(String, &'static str)>,
}

impl Writer {
    fn array(&mut self, key: String, a: &Array) {
        self.arrays.push((key, a.clone()));
    }

    fn int(&mut self, key: String, v: i32) {
        self.arrays.push((key.clone(), Array::from_int(v)));
        self.scalars.push((key, "scalar"));
    }

    fn string(&mut self, key: String, s: &str) {
        let ords: Vec<i32> = s.chars().map(|c| c as i32).collect();
        self.arrays
            .push((key.clone(), Array::from_slice(&ords, &[ords.len() as i32])));
        self.scalars.push((key, "string"));
    }

    fn nothing(&mut self, key: String) {
        self.arrays
            .push((key.clone(), Array::from_slice::<f32>(&[], &[0])));
        self.scalars.push((key, "none"));
    }

    fn maybe(&mut self, key: String, a: Option<&Array>) {
        match a {
            Some(a) => self.array(key, a),
            None => self.nothing(key),
        }
    }
}

/// The layers of a model's cache: each a name and its slots, in order.
fn layers(paths: &[String]) -> Vec<(String, Vec<usize>)> {
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    for (slot, path) in paths.iter().enumerate() {
        let segs: Vec<&str> = path.split('.').collect();
        let end = segs
            .iter()
            .position(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .map_or(segs.len(), |k| k + 1);
        let name = segs[..end].join(".");
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some((_, slots)) => slots.push(slot),
            None => out.push((name, vec![slot])),
        }
    }
    out
}

fn is_attention(s: &CacheState) -> bool {
    matches!(
        s,
        CacheState::Kv(_) | CacheState::Rotating(_) | CacheState::Quantized(_)
    )
}

/// FNV-1a, 64 bits: a stable hash (the standard library's is not promised
/// to stay the same across releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl Model {
    /// Names this model for cache files: its spec, a hash of its bound
    /// config and of its weights' kind. Two loads of one checkpoint agree;
    /// another checkpoint (or the same one run dequantized) differs.
    pub fn fingerprint(&self) -> String {
        let text = format!(
            "{}\n{:?}\n{}",
            self.spec.name, self.config, self.dequantized
        );
        format!("{}-{:016x}", self.spec.name, fnv1a(text.as_bytes()))
    }

    /// The node path of each cache slot's op, in slot order.
    pub fn cache_paths(&self) -> &[String] {
        self.plan.cache_paths()
    }

    /// Writes `cache` to `path` in mlx-lm's prompt-cache layout with
    /// `metadata` (and this model's fingerprint and the cache's offset).
    /// The file appears whole or not at all.
    pub fn save_cache(
        &self,
        cache: &ModelCache,
        path: &Path,
        metadata: &BTreeMap<String, String>,
    ) -> Result<()> {
        let fail = |msg: String| Error::Cache {
            file: path.to_path_buf(),
            msg,
        };
        let paths = self.cache_paths();
        if cache.slots.len() != paths.len() {
            return Err(fail(format!(
                "the cache has {} slots, this model has {}",
                cache.slots.len(),
                paths.len()
            )));
        }
        let mut w = Writer::default();
        let mut classes = Vec::new();
        for (l, (name, slots)) in layers(paths).iter().enumerate() {
            let states: Vec<&CacheState> = slots.iter().map(|&s| &cache.slots[s]).collect();
            let arrays: Vec<Option<&Array>> = states
                .iter()
                .filter(|s| !is_attention(s))
                .map(|s| match s {
                    CacheState::Conv(c) => Ok(c.rows.as_ref()),
                    CacheState::Recurrent { state, .. } => Ok(state.as_ref()),
                    _ => Err(fail(format!("{name}: a batch cache cannot be saved"))),
                })
                .collect::<Result<_>>()?;
            let attention: Vec<&CacheState> =
                states.iter().copied().filter(|s| is_attention(s)).collect();
            let at = l.to_string();
            if attention.is_empty() {
                classes.push("ArraysCache".to_string());
                write_arrays(&mut w, &at, &arrays);
            } else if attention.len() == 1 && arrays.is_empty() {
                classes.push(write_attention(&mut w, &at, attention[0])?.to_string());
            } else {
                classes.push("CacheList".to_string());
                let mut k = 0;
                for s in &attention {
                    let class = write_attention(&mut w, &format!("{at}.{k}.0"), s)?;
                    w.string(format!("{at}.{k}.1"), class);
                    k += 1;
                }
                if !arrays.is_empty() {
                    write_arrays(&mut w, &format!("{at}.{k}.0"), &arrays);
                    w.string(format!("{at}.{k}.1"), "ArraysCache");
                }
            }
        }
        let mut meta: HashMap<String, String> = HashMap::new();
        let mut user = metadata.clone();
        user.insert(FINGERPRINT_KEY.into(), self.fingerprint());
        user.insert(OFFSET_KEY.into(), cache.offset.to_string());
        for (k, v) in user {
            meta.insert(format!("0.{k}"), v);
        }
        for (l, c) in classes.iter().enumerate() {
            meta.insert(format!("1.{l}"), c.clone());
        }
        meta.insert("2.0".into(), String::new());
        for (j, (key, kind)) in w.scalars.iter().enumerate() {
            meta.insert(format!("2.{}.0", j + 1), key.clone());
            meta.insert(format!("2.{}.1", j + 1), kind.to_string());
        }
        // MLX appends `.safetensors` to names without it: write under such
        // a name, then move into place.
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        let stem = path
            .file_name()
            .map_or("cache".into(), |n| n.to_string_lossy().into_owned());
        let tmp: PathBuf = dir.unwrap_or(Path::new(".")).join(format!(
            ".{stem}.{}.partial.safetensors",
            std::process::id()
        ));
        let written =
            Array::save_safetensors(w.arrays.iter().map(|(k, a)| (k.as_str(), a)), &meta, &tmp);
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(fail(format!(
                "cannot write: {}",
                crate::error::mlx_message(&e)
            )));
        }
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::Io {
                path: path.to_path_buf(),
                source: e,
            }
        })
    }

    /// Reads a prompt-cache file (written by lmspec or by mlx-lm) for this
    /// model: the cache and the file's free-form metadata. A file made by
    /// another model, or whose tensors do not fit this one, is refused.
    pub fn load_cache(&self, path: &Path) -> Result<(ModelCache, BTreeMap<String, String>)> {
        let fail = |msg: String| Error::Cache {
            file: path.to_path_buf(),
            msg,
        };
        crate::weights::check_safetensors(path).map_err(|e| match e {
            Error::Weights { msg, .. } => fail(msg),
            other => other,
        })?;
        let loaded =
            lmspec_formats::guard::catch_quietly(|| Array::load_safetensors_with_metadata(path))
                .map_err(|e| fail(format!("cannot read: {e}")))?;
        let (mut arrays, meta) =
            loaded.map_err(|e| fail(format!("cannot read: {}", crate::error::mlx_message(&e))))?;
        let (user, classes, scalars) = split_metadata(&meta).map_err(&fail)?;
        self.check_origin(&user).map_err(&fail)?;
        let tree = build_tree(&mut arrays, &scalars).map_err(&fail)?;
        let Tree::List(per_layer) = tree else {
            return Err(fail("the state is not a list of layers".into()));
        };
        let ours = layers(self.cache_paths());
        if per_layer.len() != classes.len() || per_layer.len() != ours.len() {
            return Err(fail(format!(
                "the file holds {} layer caches ({} classes), this model has {}",
                per_layer.len(),
                classes.len(),
                ours.len()
            )));
        }
        let probe = self.probe_cache()?;
        let mut slots: Vec<Option<CacheState>> = vec![None; probe.slots.len()];
        for (((name, ours), class), state) in ours.iter().zip(&classes).zip(per_layer) {
            let at = format!("layer {name}");
            let mut parts = Vec::new();
            parse_cache(class, state, &at, &mut parts).map_err(&fail)?;
            let (mut attn, mut rows) = (Vec::new(), Vec::new());
            for p in parts {
                match p {
                    Part::Attention(s) => attn.push(s),
                    Part::Arrays(a) => rows.extend(a),
                }
            }
            let want_attn = ours
                .iter()
                .filter(|&&s| is_attention(&probe.slots[s]))
                .count();
            if attn.len() != want_attn || rows.len() != ours.len() - want_attn {
                return Err(fail(format!(
                    "{at}: the file holds {} key/value caches and {} arrays ({class}), \
                     this model has {} attention and {} convolution/recurrent slots",
                    attn.len(),
                    rows.len(),
                    want_attn,
                    ours.len() - want_attn
                )));
            }
            let (mut attn, mut rows) = (attn.into_iter(), rows.into_iter());
            for &s in ours {
                let reference = &probe.slots[s];
                let what = format!("{at} ({})", self.cache_paths()[s]);
                slots[s] = Some(if is_attention(reference) {
                    let got = attn.next().expect("counted above");
                    fit_attention(got, reference, &what).map_err(&fail)?
                } else {
                    let got = rows.next().expect("counted above");
                    fit_rows(got, reference, &what).map_err(&fail)?
                });
            }
        }
        let slots: Vec<CacheState> = slots.into_iter().map(|s| s.expect("every slot")).collect();
        let offsets: Vec<i32> = slots
            .iter()
            .filter(|s| is_attention(s))
            .map(CacheState::offset)
            .collect();
        let offset = match offsets.first() {
            Some(&o) => {
                if let Some(other) = offsets.iter().find(|&&x| x != o) {
                    return Err(fail(format!(
                        "the layers disagree on the positions held ({o} and {other})"
                    )));
                }
                o
            }
            None => match user.get(OFFSET_KEY) {
                Some(v) => v
                    .parse::<i32>()
                    .ok()
                    .filter(|v| *v >= 0)
                    .ok_or_else(|| fail(format!("{OFFSET_KEY}: '{v}' is not a position")))?,
                None => 0,
            },
        };
        let mut slots = slots;
        for s in &mut slots {
            match s {
                CacheState::Conv(c) => c.offset = offset,
                CacheState::Recurrent { offset: o, .. } => *o = offset,
                _ => {}
            }
        }
        Ok((
            ModelCache {
                slots,
                offset,
                position_delta: 0,
            },
            user,
        ))
    }

    /// Refuses a file whose metadata names another model.
    fn check_origin(&self, user: &BTreeMap<String, String>) -> std::result::Result<(), String> {
        if let Some(f) = user.get(FINGERPRINT_KEY) {
            let mine = self.fingerprint();
            if *f != mine {
                return Err(format!(
                    "made by model {f}{}, not by this one ({mine}, {})",
                    user.get(MODEL_KEY)
                        .map(|m| format!(" ({m})"))
                        .unwrap_or_default(),
                    self.dir.display()
                ));
            }
        } else if let Some(m) = user.get(MODEL_KEY) {
            // mlx-lm names the model it was given; a folder that exists and
            // is not this model's is another model.
            let theirs = Path::new(m).canonicalize();
            let mine = self.dir.canonicalize();
            if let (Ok(theirs), Ok(mine)) = (theirs, mine) {
                if theirs != mine {
                    return Err(format!(
                        "made by model {m}, not by this one ({})",
                        self.dir.display()
                    ));
                }
            }
        }
        Ok(())
    }

    /// A cache after one token: the shape and dtype of every slot's state.
    fn probe_cache(&self) -> Result<ModelCache> {
        let mut probe = self.new_cache();
        self.forward(&Array::from_slice(&[0i32], &[1, 1]), Some(&mut probe))?;
        mlx_rs::transforms::eval(probe.arrays())?;
        Ok(probe)
    }
}

fn write_arrays(w: &mut Writer, at: &str, arrays: &[Option<&Array>]) {
    for (k, a) in arrays.iter().enumerate() {
        w.maybe(format!("{at}.0.{k}"), *a);
    }
    w.nothing(format!("{at}.1"));
    w.nothing(format!("{at}.2"));
}

fn write_attention(w: &mut Writer, at: &str, s: &CacheState) -> Result<&'static str> {
    Ok(match s {
        CacheState::Kv(c) => {
            let held = c.held()?;
            w.maybe(format!("{at}.0"), held.as_ref().map(|h| &h.0));
            w.maybe(format!("{at}.1"), held.as_ref().map(|h| &h.1));
            w.int(format!("{at}.2"), c.offset);
            "KVCache"
        }
        CacheState::Rotating(c) => {
            w.maybe(format!("{at}.0"), c.keys.as_ref());
            w.maybe(format!("{at}.1"), c.values.as_ref());
            w.int(format!("{at}.2"), c.offset);
            w.int(format!("{at}.3"), c.keep);
            w.int(format!("{at}.4"), c.max_size);
            w.int(format!("{at}.5"), c.idx);
            "RotatingKVCache"
        }
        CacheState::Quantized(c) => {
            for (k, part) in [&c.keys, &c.values].into_iter().enumerate() {
                match part {
                    Some(parts) => {
                        for (j, a) in parts.iter().enumerate() {
                            w.array(format!("{at}.{k}.{j}"), a);
                        }
                    }
                    None => w.nothing(format!("{at}.{k}")),
                }
            }
            w.int(format!("{at}.2"), c.offset);
            w.int(format!("{at}.3"), c.group_size);
            w.int(format!("{at}.4"), c.bits);
            "QuantizedKVCache"
        }
        _ => unreachable!("attention states only"),
    })
}

/// The metadata parts: free-form entries, classes per layer, and the
/// tensor names that stand for scalars (name -> kind).
#[allow(clippy::type_complexity)]
fn split_metadata(
    meta: &HashMap<String, String>,
) -> std::result::Result<
    (
        BTreeMap<String, String>,
        Vec<String>,
        HashMap<String, String>,
    ),
    String,
> {
    let mut user = BTreeMap::new();
    let mut classes: BTreeMap<usize, String> = BTreeMap::new();
    let mut scalar_parts: BTreeMap<usize, (Option<String>, Option<String>)> = BTreeMap::new();
    for (k, v) in meta {
        let (head, rest) = k.split_once('.').unwrap_or((k.as_str(), ""));
        match head {
            "0" => {
                user.insert(rest.to_string(), v.clone());
            }
            "1" => {
                let l: usize = rest
                    .parse()
                    .map_err(|_| format!("metadata key '{k}': not a layer number"))?;
                classes.insert(l, v.clone());
            }
            "2" if rest == "0" => {}
            "2" => {
                let (j, field) = rest
                    .split_once('.')
                    .and_then(|(j, f)| Some((j.parse::<usize>().ok()?, f)))
                    .ok_or_else(|| format!("metadata key '{k}': not a scalar entry"))?;
                let e = scalar_parts.entry(j).or_default();
                match field {
                    "0" => e.0 = Some(v.clone()),
                    "1" => e.1 = Some(v.clone()),
                    _ => return Err(format!("metadata key '{k}': not a scalar entry")),
                }
            }
            _ => return Err(format!("metadata key '{k}' is not part of a prompt cache")),
        }
    }
    if classes.is_empty() {
        return Err("no cache classes in the metadata (not a prompt-cache file)".into());
    }
    let n = classes.len();
    if classes.keys().copied().ne(0..n) {
        return Err("the cache classes are not numbered 0..n".into());
    }
    let mut scalars = HashMap::new();
    for (j, (name, kind)) in scalar_parts {
        match (name, kind) {
            (Some(name), Some(kind)) => {
                scalars.insert(name, kind);
            }
            _ => return Err(format!("metadata scalar entry {j} is incomplete")),
        }
    }
    Ok((user, classes.into_values().collect(), scalars))
}

/// Nests the tensors by their dotted names, scalars read back.
fn build_tree(
    arrays: &mut HashMap<String, Array>,
    scalars: &HashMap<String, String>,
) -> std::result::Result<Tree, String> {
    let mut entries: Vec<(Vec<usize>, Tree)> = Vec::new();
    for (name, a) in arrays.drain() {
        let path = name
            .split('.')
            .map(|s| s.parse::<usize>())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| format!("tensor '{name}': not a position in a cache state"))?;
        let leaf = match scalars.get(&name).map(String::as_str) {
            None => Tree::Array(a),
            Some("none") => Tree::Nothing,
            Some("scalar") => {
                if a.size() != 1 {
                    return Err(format!(
                        "tensor '{name}': a scalar with {} values",
                        a.size()
                    ));
                }
                let v = a
                    .try_item_cast::<i64>()
                    .map_err(|e| format!("tensor '{name}': {e}"))?;
                Tree::Int(v)
            }
            Some("string") => {
                let ords = a
                    .as_dtype(Dtype::Int32)
                    .map_err(|e| format!("tensor '{name}': {}", crate::error::mlx_message(&e)))?;
                ords.eval()
                    .map_err(|e| format!("tensor '{name}': {}", crate::error::mlx_message(&e)))?;
                let text: Option<String> = ords
                    .as_slice::<i32>()
                    .iter()
                    .map(|&c| char::from_u32(c as u32))
                    .collect();
                Tree::Str(text.ok_or_else(|| format!("tensor '{name}': not a string"))?)
            }
            Some(other) => return Err(format!("tensor '{name}': unknown scalar kind '{other}'")),
        };
        entries.push((path, leaf));
    }
    nest(entries, "")
}

fn nest(mut entries: Vec<(Vec<usize>, Tree)>, at: &str) -> std::result::Result<Tree, String> {
    if entries.len() == 1 && entries[0].0.is_empty() {
        return Ok(entries.pop().expect("one").1);
    }
    if entries.iter().any(|(p, _)| p.is_empty()) {
        return Err(format!("'{at}' is both a tensor and a list"));
    }
    let mut groups: BTreeMap<usize, Vec<(Vec<usize>, Tree)>> = BTreeMap::new();
    for (mut p, t) in entries {
        let first = p.remove(0);
        groups.entry(first).or_default().push((p, t));
    }
    let n = groups.len();
    if groups.keys().copied().ne(0..n) {
        return Err(format!("the entries of '{at}' are not numbered 0..n"));
    }
    let mut out = Vec::with_capacity(n);
    for (k, g) in groups {
        let name = if at.is_empty() {
            k.to_string()
        } else {
            format!("{at}.{k}")
        };
        out.push(nest(g, &name)?);
    }
    Ok(Tree::List(out))
}

/// What one file cache gives: a key/value state, or arrays for
/// convolution/recurrent slots.
enum Part {
    Attention(CacheState),
    Arrays(Vec<Option<Array>>),
}

fn list(t: Tree, n: usize, what: &str) -> std::result::Result<Vec<Tree>, String> {
    match t {
        Tree::List(v) if v.len() == n => Ok(v),
        Tree::List(v) => Err(format!("{what}: {} entries, expected {n}", v.len())),
        _ => Err(format!("{what}: expected a list of {n} entries")),
    }
}

/// A list of exactly `N` entries, as an array.
fn fixed<const N: usize>(t: Tree, what: &str) -> std::result::Result<[Tree; N], String> {
    list(t, N, what)?
        .try_into()
        .map_err(|_| format!("{what}: expected {N} entries"))
}

fn int(t: &Tree, what: &str) -> std::result::Result<i32, String> {
    match t {
        Tree::Int(v) => i32::try_from(*v).map_err(|_| format!("{what}: {v} is out of range")),
        _ => Err(format!("{what}: expected a number")),
    }
}

fn maybe_array(t: Tree, what: &str) -> std::result::Result<Option<Array>, String> {
    match t {
        Tree::Array(a) => Ok(Some(a)),
        Tree::Nothing => Ok(None),
        _ => Err(format!("{what}: expected an array")),
    }
}

/// Positions a stored key tensor holds (its third axis; none: 0).
fn positions(keys: Option<&Array>) -> i32 {
    keys.map_or(0, |k| k.shape().get(2).copied().unwrap_or(0))
}

/// A cache's offset must lie within the positions it stores.
fn within(what: &str, offset: i32, held: i32) -> std::result::Result<(), String> {
    if offset < 0 || offset > held {
        return Err(format!(
            "{what}: offset {offset} but {held} positions stored"
        ));
    }
    Ok(())
}

fn parse_cache(
    class: &str,
    state: Tree,
    at: &str,
    out: &mut Vec<Part>,
) -> std::result::Result<(), String> {
    let what = format!("{at} ({class})");
    match class {
        "KVCache" => {
            let [k, v, o]: [Tree; 3] = fixed::<3>(state, &what)?;
            let offset = int(&o, &format!("{what} offset"))?;
            let keys = maybe_array(k, &format!("{what} keys"))?;
            let values = maybe_array(v, &format!("{what} values"))?;
            within(&what, offset, positions(keys.as_ref()))?;
            out.push(Part::Attention(CacheState::Kv(KvCache {
                keys,
                values,
                offset,
            })));
        }
        "ConcatenateKVCache" => {
            let [k, v]: [Tree; 2] = fixed::<2>(state, &what)?;
            let keys = maybe_array(k, &format!("{what} keys"))?;
            let values = maybe_array(v, &format!("{what} values"))?;
            let offset = positions(keys.as_ref());
            out.push(Part::Attention(CacheState::Kv(KvCache {
                keys,
                values,
                offset,
            })));
        }
        "RotatingKVCache" => {
            let s = list(state, 6, &what)?;
            let n = |k: usize, f: &str| int(&s[k], &format!("{what} {f}"));
            let (offset, keep, max_size, idx) = (
                n(2, "offset")?,
                n(3, "keep")?,
                n(4, "max_size")?,
                n(5, "index")?,
            );
            let mut s = s.into_iter();
            let keys = maybe_array(s.next().expect("6"), &format!("{what} keys"))?;
            let values = maybe_array(s.next().expect("6"), &format!("{what} values"))?;
            let held = positions(keys.as_ref());
            if max_size < 1 || keep < 0 || keep > max_size || offset < 0 || idx < 0 || idx > held {
                return Err(format!(
                    "{what}: inconsistent window (offset {offset}, keep {keep}, max_size \
                     {max_size}, index {idx}, {held} positions stored)"
                ));
            }
            out.push(Part::Attention(CacheState::Rotating(RotatingKvCache {
                keys,
                values,
                offset,
                max_size,
                keep,
                idx,
            })));
        }
        "QuantizedKVCache" => {
            let s = list(state, 5, &what)?;
            let n = |k: usize, f: &str| int(&s[k], &format!("{what} {f}"));
            let (offset, group_size, bits) = (n(2, "offset")?, n(3, "group_size")?, n(4, "bits")?);
            if !crate::weights::QUANT_BITS.contains(&bits)
                || !crate::weights::QUANT_GROUP_SIZES.contains(&group_size)
            {
                return Err(format!(
                    "{what}: {bits} bits in groups of {group_size} is not a quantization MLX has"
                ));
            }
            let mut s = s.into_iter();
            let mut triple = |f: &str| -> std::result::Result<Option<[Array; 3]>, String> {
                match s.next().expect("5") {
                    Tree::Nothing => Ok(None),
                    t => {
                        let parts = list(t, 3, &format!("{what} {f}"))?;
                        let arrays = parts
                            .into_iter()
                            .map(|p| {
                                maybe_array(p, &format!("{what} {f}"))?
                                    .ok_or_else(|| format!("{what} {f}: a part is missing"))
                            })
                            .collect::<std::result::Result<Vec<_>, _>>()?;
                        Ok(Some(
                            arrays
                                .try_into()
                                .map_err(|_| format!("{what} {f}: expected 3 parts"))?,
                        ))
                    }
                }
            };
            let keys = triple("keys")?;
            let values = triple("values")?;
            within(&what, offset, positions(keys.as_ref().map(|k| &k[0])))?;
            out.push(Part::Attention(CacheState::Quantized(QuantizedKvCache {
                keys,
                values,
                offset,
                group_size,
                bits,
            })));
        }
        "ArraysCache" | "MambaCache" => {
            let [arrays, pad, lengths]: [Tree; 3] = fixed::<3>(state, &what)?;
            if !matches!(pad, Tree::Nothing) || !matches!(lengths, Tree::Nothing) {
                return Err(format!(
                    "{what}: holds a padded batch (left_padding/lengths); one sequence only"
                ));
            }
            let items = match arrays {
                Tree::List(v) => v,
                _ => return Err(format!("{what}: expected a list of arrays")),
            };
            let arrays = items
                .into_iter()
                .map(|t| maybe_array(t, &what))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            out.push(Part::Arrays(arrays));
        }
        "CacheList" => {
            let items = match state {
                Tree::List(v) => v,
                _ => return Err(format!("{what}: expected a list of caches")),
            };
            for (k, item) in items.into_iter().enumerate() {
                let [s, c]: [Tree; 2] = fixed::<2>(item, &format!("{what} entry {k}"))?;
                let Tree::Str(c) = c else {
                    return Err(format!("{what} entry {k}: no class name"));
                };
                parse_cache(&c, s, &format!("{at} entry {k}"), out)?;
            }
        }
        other => {
            return Err(format!(
                "{at}: cache class '{other}' is not one lmspec reads (KVCache, \
                 RotatingKVCache, QuantizedKVCache, ArraysCache, CacheList)"
            ))
        }
    }
    Ok(())
}

/// Checks a dense `[B, H, T, D]` tensor against the model's (all axes but
/// positions) and converts it to the model's dtype.
fn fit_dense(a: Array, like: &Array, what: &str) -> std::result::Result<Array, String> {
    let (s, r) = (a.shape(), like.shape());
    if s.len() != 4 || s[0] != r[0] || s[1] != r[1] || s[3] != r[3] {
        return Err(format!(
            "{what}: shape {s:?}, this model's is [{}, {}, positions, {}]",
            r[0], r[1], r[3]
        ));
    }
    if a.dtype() == like.dtype() {
        return Ok(a);
    }
    a.as_dtype(like.dtype())
        .map_err(|e| format!("{what}: {}", crate::error::mlx_message(&e)))
}

/// The model's keys/values of a probed attention slot.
fn probe_kv(s: &CacheState) -> Option<(&Array, &Array)> {
    match s {
        CacheState::Kv(KvCache {
            keys: Some(k),
            values: Some(v),
            ..
        })
        | CacheState::Rotating(RotatingKvCache {
            keys: Some(k),
            values: Some(v),
            ..
        }) => Some((k, v)),
        _ => None,
    }
}

fn fit_attention(
    got: CacheState,
    reference: &CacheState,
    what: &str,
) -> std::result::Result<CacheState, String> {
    let Some((rk, rv)) = probe_kv(reference) else {
        return Err(format!("{what}: this model's attention state has no keys"));
    };
    let both = |k: Option<Array>, v: Option<Array>| -> std::result::Result<_, String> {
        match (k, v) {
            (Some(k), Some(v)) => Ok((
                Some(fit_dense(k, rk, &format!("{what} keys"))?),
                Some(fit_dense(v, rv, &format!("{what} values"))?),
            )),
            (None, None) => Ok((None, None)),
            _ => Err(format!(
                "{what}: keys without values or values without keys"
            )),
        }
    };
    Ok(match got {
        CacheState::Kv(c) => {
            let (keys, values) = both(c.keys, c.values)?;
            CacheState::Kv(KvCache {
                keys,
                values,
                offset: c.offset,
            })
        }
        CacheState::Rotating(c) => {
            let (keys, values) = both(c.keys, c.values)?;
            CacheState::Rotating(RotatingKvCache { keys, values, ..c })
        }
        CacheState::Quantized(c) => {
            let per_int = 32 / c.bits;
            for (parts, like, f) in [(&c.keys, rk, "keys"), (&c.values, rv, "values")] {
                let Some([w, s, b]) = parts else { continue };
                let (ws, r) = (w.shape(), like.shape());
                let ok = ws.len() == 4
                    && ws[0] == r[0]
                    && ws[1] == r[1]
                    && ws[3] * per_int == r[3]
                    && s.shape() == b.shape()
                    && s.shape().len() == 4
                    && s.shape()[2] == ws[2]
                    && s.shape()[3] * c.group_size == r[3];
                if !ok {
                    return Err(format!(
                        "{what} {f}: quantized shapes {ws:?}/{:?} do not hold this model's \
                         [{}, {}, positions, {}] at {} bits in groups of {}",
                        s.shape(),
                        r[0],
                        r[1],
                        r[3],
                        c.bits,
                        c.group_size
                    ));
                }
            }
            CacheState::Quantized(c)
        }
        _ => unreachable!("attention parts only"),
    })
}

fn fit_rows(
    got: Option<Array>,
    reference: &CacheState,
    what: &str,
) -> std::result::Result<CacheState, String> {
    let like = match reference {
        CacheState::Conv(c) => c.rows.as_ref(),
        CacheState::Recurrent { state, .. } => state.as_ref(),
        _ => None,
    };
    let got = match (got, like) {
        (None, _) => None,
        (Some(a), Some(like)) => {
            if a.shape() != like.shape() {
                return Err(format!(
                    "{what}: shape {:?}, this model's is {:?}",
                    a.shape(),
                    like.shape()
                ));
            }
            Some(if a.dtype() == like.dtype() {
                a
            } else {
                a.as_dtype(like.dtype())
                    .map_err(|e| format!("{what}: {}", crate::error::mlx_message(&e)))?
            })
        }
        (Some(_), None) => return Err(format!("{what}: this model keeps no state here")),
    };
    Ok(match reference {
        CacheState::Conv(c) => CacheState::Conv(crate::cache::ConvState {
            keep: c.keep,
            rows: got,
            offset: 0,
        }),
        _ => CacheState::Recurrent {
            state: got,
            offset: 0,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_group_slots_by_their_layer_prefix() {
        let paths: Vec<String> = ["layers.0.attn", "layers.1.conv", "layers.1.ssm", "head"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let got = layers(&paths);
        assert_eq!(
            got,
            vec![
                ("layers.0".to_string(), vec![0]),
                ("layers.1".to_string(), vec![1, 2]),
                ("head".to_string(), vec![3]),
            ]
        );
    }

    #[test]
    fn metadata_is_split_and_checked() {
        let mut m = HashMap::new();
        m.insert("0.model".to_string(), "x".to_string());
        m.insert("1.0".to_string(), "KVCache".to_string());
        m.insert("2.0".to_string(), String::new());
        m.insert("2.1.0".to_string(), "0.2".to_string());
        m.insert("2.1.1".to_string(), "scalar".to_string());
        let (user, classes, scalars) = split_metadata(&m).expect("valid");
        assert_eq!(user.get("model").map(String::as_str), Some("x"));
        assert_eq!(classes, vec!["KVCache".to_string()]);
        assert_eq!(scalars.get("0.2").map(String::as_str), Some("scalar"));
        m.insert("1.2".to_string(), "KVCache".to_string());
        assert!(split_metadata(&m).unwrap_err().contains("numbered"));
        m.remove("1.2");
        m.insert("2.3.0".to_string(), "0.1".to_string());
        assert!(split_metadata(&m).unwrap_err().contains("incomplete"));
    }
}
