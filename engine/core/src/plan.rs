//! The execution plan: ops built with their weights, inputs resolved to
//! value slots, cache slots assigned, and values freed after their last use.
//! Running it touches no strings and no spec data.
use std::collections::{HashMap, HashSet};

use indexmap::IndexMap;
use mlx_rs::Array;

use std::sync::Arc;

use crate::adapter::AdapterSlot;

/// Adapters by node index: (weight index, slot) pairs.
pub type Adapted = HashMap<usize, Vec<(usize, Arc<AdapterSlot>)>>;
use crate::cache::{CacheKind, ModelCache};
use crate::error::{Error, Result};
use crate::ops::{Ctx, Op, Param, Weights};
use lmspec_spec::ops::Layout;
use lmspec_spec::{Graph, Src};

#[derive(Debug)]
struct Step {
    op: Box<dyn Op>,
    /// The primitive's name (for [`OpTimes`]).
    kind: &'static str,
    inputs: Vec<usize>,
    /// The slot of the op's value; with `split`, the slots of its parts.
    outs: Vec<usize>,
    /// Split points on the last axis, one fewer than `outs` (fused
    /// projections); empty when the op's value goes to one slot.
    split: Vec<i32>,
    cache: Option<usize>,
    /// Slots whose last reader is this step.
    free: Vec<usize>,
}

/// Nodes one GPU kernel runs for a single row ([`crate::kernel_groups`]):
/// the kernel where it applies, else the member steps as the graph lists
/// them.
#[derive(Debug)]
struct Group {
    kernel: Option<crate::gpu_kernels::ProjKernel>,
    /// Slots of the row the kernel reads and of the residual it adds.
    row: usize,
    residual: Option<usize>,
    /// Slots of the kernel's outputs.
    outs: Vec<usize>,
    members: Vec<Step>,
    /// Slots whose last reader is in this group.
    free: Vec<usize>,
}

#[derive(Debug)]
enum Entry {
    One(Step),
    Group(Group),
}

/// Groups of `linear` nodes to run as one projection, keyed by the first
/// member (in node order): nodes that read the same value, each without a
/// cache slot, with weights of one kind — all dense of one dtype, or all
/// quantized alike — and all with or all without a bias, none rotated. Members are
/// listed in node order.
fn fusion_groups(
    graph: &Graph,
    weights: &[Vec<Param>],
    adapted: &Adapted,
    grouped: &HashSet<usize>,
) -> HashMap<usize, Vec<usize>> {
    let mut by_input: IndexMap<(Src, String), Vec<usize>> = IndexMap::new();
    for (k, node) in graph.nodes.iter().enumerate() {
        if grouped.contains(&k) {
            continue;
        }
        // A projection whose partial products are summed across ranks
        // runs alone.
        let reduced = crate::distributed::build_group().is_some()
            && node
                .op
                .as_projection()
                .is_some_and(|l| l.shard == lmspec_spec::ops::Shard::In);
        // A checkpoint's optional tensors (a rotation) make a projection
        // its own.
        let required = node.resolved.weights.iter().filter(|r| !r.optional);
        if node.op.as_projection().is_none()
            || reduced
            || weights[k].len() != required.count()
            || adapted.contains_key(&k)
            || node.inputs.len() != 1
            || node.resolved.state.is_some()
        {
            continue;
        }
        if let Some(kind) = fusable(&weights[k]) {
            by_input.entry((node.inputs[0], kind)).or_default().push(k);
        }
    }
    by_input
        .into_values()
        .filter(|members| members.len() > 1)
        .map(|members| (members[0], members))
        .collect()
}

/// What a linear layer's weights must share with others to be fused:
/// representation, dtype, quantization and whether there is a bias.
fn fusable(params: &[Param]) -> Option<String> {
    let bias = match params.get(1) {
        Some(Param::Dense(b)) => format!("bias {:?}", b.dtype()),
        Some(Param::Quantized { .. }) => return None,
        None => "no bias".into(),
    };
    let weight = match params.first()? {
        Param::Dense(w) if w.ndim() == 2 => format!("dense {:?}", w.dtype()),
        Param::Quantized {
            w,
            scales,
            group_size,
            bits,
            ..
        } if w.ndim() == 2 => format!("q{bits}/{group_size} {:?}", scales.dtype()),
        _ => return None,
    };
    Some(format!("{weight}, {bias}"))
}

/// A dense param's array, or a quantized one's packed weight.
fn first_array(p: &Param) -> &Array {
    match p {
        Param::Dense(a) => a,
        Param::Quantized { w, .. } => w,
    }
}

/// Stacks the weights (and biases) of fused linear layers along their
/// output axis.
fn concat_params(
    parts: Vec<Vec<Param>>,
) -> std::result::Result<Vec<Param>, mlx_rs::error::Exception> {
    let cat = |xs: Vec<&Array>| -> std::result::Result<Array, mlx_rs::error::Exception> {
        let y = mlx_rs::ops::concatenate(&xs, 0)?;
        y.eval()?;
        Ok(y)
    };
    let weight = match &parts[0][0] {
        Param::Dense(_) => Param::Dense(cat(parts.iter().map(|p| first_array(&p[0])).collect())?),
        Param::Quantized {
            group_size, bits, ..
        } => {
            let field = |i: usize| -> Vec<&Array> {
                parts
                    .iter()
                    .map(|p| match &p[0] {
                        Param::Quantized {
                            w, scales, biases, ..
                        } => [w, scales, biases][i],
                        Param::Dense(a) => a,
                    })
                    .collect()
            };
            Param::Quantized {
                w: cat(field(0))?,
                scales: cat(field(1))?,
                biases: cat(field(2))?,
                group_size: *group_size,
                bits: *bits,
            }
        }
    };
    let mut out = vec![weight];
    if parts[0].len() > 1 {
        out.push(Param::Dense(cat(parts
            .iter()
            .map(|p| first_array(&p[1]))
            .collect())?));
    }
    Ok(out)
}

/// The parts of a fused projection's output, cut at `split` on the last
/// axis: one `Split`, or with `slices` a slice each (one primitive more;
/// on MLX 0.32.2's CUDA backend RoPE read a `Split`'s parts wrongly and
/// slices of the same output rightly: docs/gpu.md).
fn parts_of(
    y: &Array,
    split: &[i32],
    slices: bool,
) -> std::result::Result<Vec<Array>, mlx_rs::error::Exception> {
    use mlx_rs::ops::indexing::{ArrayIndex, Ellipsis, TryIndexOp};
    if !slices {
        return y.split_at_indices(split, -1);
    }
    let end = y.shape().last().copied().unwrap_or(0);
    let mut start = 0;
    let mut parts = Vec::with_capacity(split.len() + 1);
    for &at in split.iter().chain(std::iter::once(&end)) {
        parts.push(y.try_index(&[Ellipsis.index_op(), (start..at).index_op()][..])?);
        start = at;
    }
    Ok(parts)
}

thread_local! {
    static PROFILING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static OP_TIMES: std::cell::RefCell<OpTimes> = std::cell::RefCell::new(OpTimes::default());
}

/// Host time spent building each primitive's part of the graph (its
/// `forward`, which records MLX operations without running them), summed
/// by primitive name over `forwards` runs of a plan.
#[derive(Debug, Clone, Default)]
pub struct OpTimes {
    pub forwards: usize,
    pub by_op: IndexMap<&'static str, std::time::Duration>,
}

/// Starts (clearing what was recorded) or stops recording [`OpTimes`] for
/// plans run on this thread.
pub fn profile_ops(on: bool) {
    PROFILING.set(on);
    if on {
        OP_TIMES.with_borrow_mut(|m| *m = OpTimes::default());
    }
}

/// What [`profile_ops`] recorded on this thread.
pub fn op_times() -> OpTimes {
    OP_TIMES.with_borrow(|m| m.clone())
}

/// The state of one [`Plan::run`].
struct Run<'a, 'c> {
    values: &'a mut Vec<Option<Array>>,
    wanted: &'a HashMap<usize, Vec<&'a str>>,
    captured: &'a mut IndexMap<String, Array>,
    cache: &'a mut ModelCache,
    offset: i32,
    key_mask: Option<&'c Array>,
    positions: Option<&'c crate::batch::Positions>,
    profiling: bool,
}

/// A runnable model body.
#[derive(Debug)]
pub struct Plan {
    steps: Vec<Entry>,
    slots: usize,
    output: usize,
    cache_kinds: Vec<CacheKind>,
    /// The node path of each cache slot's op (`layers.3.attn`).
    cache_paths: Vec<String>,
    /// Tap name -> slot.
    taps: IndexMap<String, usize>,
    /// Whether fused projections' parts are slices rather than one `Split`
    /// (off the CPU; see [`parts_of`]).
    parts_as_slices: bool,
}

fn slot(s: Src) -> usize {
    match s {
        Src::Tokens => 0,
        Src::Node(k) => k + 1,
    }
}

/// Cache slots assigned so far: each stateful op's kind and node path.
#[derive(Default)]
struct Caches {
    kinds: Vec<CacheKind>,
    paths: Vec<String>,
}

/// Builds node `k`'s step from its weights (`params`), writing to `outs`
/// (cut at `split` for a fused projection).
fn build_step(
    graph: &Graph,
    k: usize,
    params: Vec<Param>,
    outs: Vec<usize>,
    split: Vec<i32>,
    adapted: &Adapted,
    caches: &mut Caches,
) -> Result<Step> {
    let node = &graph.nodes[k];
    let infos: Vec<_> = node
        .inputs
        .iter()
        .map(|s| match s {
            Src::Tokens => Layout::flat(1),
            Src::Node(j) => graph.nodes[*j].resolved.out,
        })
        .collect();
    let fields = node.resolved.weights.iter().map(|r| r.field);
    let items: Vec<_> = fields.zip(params).collect();
    let built = match adapted.get(&k) {
        None => crate::ops::build(&node.op, &infos, Weights::new(items)),
        // A linear layer runs as the adapted linear op.
        Some(slots) if matches!(node.op, lmspec_spec::ops::OpConfig::Linear(_)) => {
            crate::adapter::build_adapted(&node.op, &infos, Weights::new(items), slots[0].1.clone())
        }
        // Other ops take their adapters with their weights.
        Some(slots) => {
            let mut per_weight = vec![None; items.len()];
            for (w, slot) in slots {
                if let Some(p) = per_weight.get_mut(*w) {
                    *p = Some(slot.clone());
                }
            }
            let built =
                crate::ops::build(&node.op, &infos, Weights::with_adapters(items, per_weight));
            let unapplied = slots.iter().find(|(_, s)| !s.applied());
            if let (Ok(_), Some((_, s))) = (&built, unapplied) {
                return Err(Error::spec(
                    &node.file,
                    &node.origin,
                    "weight",
                    format!(
                        "adapter {}: the {} op does not apply adapters (at {})",
                        s.module,
                        node.op.name(),
                        node.path
                    ),
                ));
            }
            built
        }
    };
    let op = built.map_err(|e| {
        Error::spec(
            &node.file,
            &node.origin,
            e.field,
            format!("{} (at {})", e.msg, node.path),
        )
    })?;
    let cache = node.resolved.state.map(|kind| {
        caches.kinds.push(kind);
        caches.paths.push(node.path.clone());
        caches.kinds.len() - 1
    });
    Ok(Step {
        op,
        kind: node.op.name(),
        inputs: node.inputs.iter().map(|s| slot(*s)).collect(),
        outs,
        split,
        cache,
        free: Vec::new(),
    })
}

/// The kernel for a group: its projections' weights (row-major, evaluated)
/// and its norm's scale; `None` where the kernels do not take them.
fn group_kernel(
    g: &crate::kernel_groups::KernelGroup,
    graph: &Graph,
    weights: &[Vec<Param>],
) -> Option<crate::gpu_kernels::ProjKernel> {
    let norm = match g.norm {
        Some(m) => {
            let lmspec_spec::ops::OpConfig::RmsNorm(c) = &graph.nodes[m].op else {
                return None;
            };
            let Some(Param::Dense(w)) = weights[m].first() else {
                return None;
            };
            let scale = crate::ops::rms_scale(c, w.clone()).ok()?;
            scale.eval().ok()?;
            Some((scale, c.eps as f32))
        }
        None => None,
    };
    let ws: Vec<Param> = g
        .projs
        .iter()
        .map(|&p| weights[p].first().cloned())
        .collect::<Option<_>>()?;
    for w in &ws {
        let a = first_array(w);
        a.eval().ok()?;
        if !crate::cpu_kernels::row_contiguous(a) {
            return None;
        }
    }
    let forms: Vec<crate::gpu_kernels::OutForm> = g
        .forms
        .iter()
        .map(|&(split, rope)| out_form(graph, split, rope))
        .collect::<Option<_>>()?;
    let kernel = crate::gpu_kernels::ProjKernel::new(norm, &ws, g.epilogue, &forms)?;
    Some(match g.merge {
        Some(_) => kernel.reading_heads(),
        None => kernel,
    })
}

/// How a split group's output leaves the kernel: split into the heads of
/// node `split`, rotated as node `rope` rotates.
fn out_form(
    graph: &Graph,
    split: Option<usize>,
    rope: Option<usize>,
) -> Option<crate::gpu_kernels::OutForm> {
    use lmspec_spec::ops::{OpConfig, RopeScaling};
    let Some(s) = split else {
        return Some(Default::default());
    };
    let layout = graph.nodes[s].resolved.out;
    let heads = layout.heads? as i32;
    let head_dim = layout.dim as i32;
    let rope = match rope {
        None => None,
        Some(r) => {
            let OpConfig::Rope(c) = &graph.nodes[r].op else {
                return None;
            };
            let dims = c.rotated_dims(&[layout]).ok()?;
            let (log2_base, scale, freqs) = match c.variant(dims).ok()? {
                RopeScaling::Base { base, scale } => (Some(base.log2()), scale, None),
                RopeScaling::Freqs {
                    freqs,
                    input_scale: 1.0,
                } => (
                    None,
                    1.0,
                    Some(Array::from_slice(&freqs, &[freqs.len() as i32])),
                ),
                _ => return None,
            };
            Some(crate::gpu_kernels::RopeForm {
                dims: dims as i32,
                traditional: c.traditional,
                log2_base,
                scale,
                freqs,
            })
        }
    };
    Some(crate::gpu_kernels::OutForm {
        heads: Some((heads, head_dim)),
        rope,
    })
}

impl Plan {
    /// Builds the plan. With `fuse`, `linear` nodes that read the same
    /// value and hold weights of one kind (see [`fusable`]) run as one
    /// projection whose output is split: fewer matmul kernels per step.
    pub fn build(graph: &Graph, weights: Vec<Vec<Param>>, fuse: bool) -> Result<Plan> {
        Plan::build_adapted(graph, weights, fuse, &HashMap::new())
    }

    /// [`Plan::build`] with adapters on some node weights (by node index,
    /// then weight index); adapted nodes are never fused.
    pub fn build_adapted(
        graph: &Graph,
        mut weights: Vec<Vec<Param>>,
        fuse: bool,
        adapted: &Adapted,
    ) -> Result<Plan> {
        let kernels_on = crate::gpu_kernels::enabled();
        let kernel_groups = if crate::gpu_kernels::grouping() {
            crate::kernel_groups::kernel_groups(graph, &weights, adapted)
        } else {
            Vec::new()
        };
        let grouped: HashSet<usize> = kernel_groups.iter().flat_map(|g| g.members()).collect();
        // Each group by its first member, where its step goes.
        let group_at: HashMap<usize, &crate::kernel_groups::KernelGroup> =
            kernel_groups.iter().map(|g| (g.members()[0], g)).collect();
        let groups = if fuse {
            fusion_groups(graph, &weights, adapted, &grouped)
        } else {
            HashMap::new()
        };
        // Members after the first run inside the first one's step.
        let merged: HashSet<usize> = groups
            .values()
            .flat_map(|members| members[1..].iter().copied())
            .collect();
        // Each group's weights stacked, in its first member's slot.
        for (&k, members) in &groups {
            let parts: Vec<Vec<Param>> = members
                .iter()
                .map(|&m| std::mem::take(&mut weights[m]))
                .collect();
            let node = &graph.nodes[k];
            weights[k] = concat_params(parts).map_err(|e| {
                Error::spec(
                    &node.file,
                    &node.origin,
                    "weight",
                    format!("{e} (at {})", node.path),
                )
            })?;
        }
        if crate::cpu_kernels::enabled()
            && std::env::var_os("LMSPEC_HUGE_PAGES").is_none_or(|v| v != "0")
        {
            crate::weights::to_huge_pages(&mut weights)?;
        }
        let mut steps = Vec::with_capacity(graph.nodes.len());
        let mut caches = Caches::default();
        for k in 0..graph.nodes.len() {
            if merged.contains(&k) {
                continue;
            }
            if grouped.contains(&k) {
                if let Some(g) = group_at.get(&k) {
                    let kernel = kernels_on
                        .then(|| group_kernel(g, graph, &weights))
                        .flatten();
                    let mut members = Vec::new();
                    for m in g.members() {
                        let params = std::mem::take(&mut weights[m]);
                        members.push(build_step(
                            graph,
                            m,
                            params,
                            vec![m + 1],
                            Vec::new(),
                            adapted,
                            &mut caches,
                        )?);
                    }
                    steps.push(Entry::Group(Group {
                        kernel,
                        row: slot(g.row),
                        residual: g.residual.map(slot),
                        outs: g.outputs().iter().map(|&m| m + 1).collect(),
                        members,
                        free: Vec::new(),
                    }));
                }
                continue;
            }
            let (outs, split) = match groups.get(&k) {
                Some(members) => {
                    let mut split = Vec::new();
                    let mut at = 0;
                    for &m in &members[..members.len() - 1] {
                        at += graph.nodes[m].resolved.out.dim as i32;
                        split.push(at);
                    }
                    (members.iter().map(|&m| m + 1).collect(), split)
                }
                None => (vec![k + 1], Vec::new()),
            };
            let params = std::mem::take(&mut weights[k]);
            steps.push(Entry::One(build_step(
                graph,
                k,
                params,
                outs,
                split,
                adapted,
                &mut caches,
            )?));
        }
        let output = slot(graph.output);
        let mut last_use: HashMap<usize, usize> = HashMap::new();
        for (k, entry) in steps.iter().enumerate() {
            let members = match entry {
                Entry::One(step) => std::slice::from_ref(step),
                Entry::Group(g) => &g.members[..],
            };
            for &i in members.iter().flat_map(|m| &m.inputs) {
                last_use.insert(i, k);
            }
        }
        for (s, k) in last_use {
            if s != output {
                match &mut steps[k] {
                    Entry::One(step) => step.free.push(s),
                    Entry::Group(g) => g.free.push(s),
                }
            }
        }
        let mut taps = IndexMap::new();
        for name in graph.tap_names() {
            if let Some(src) = graph.find(&name) {
                taps.insert(name, slot(src));
            }
        }
        Ok(Plan {
            slots: graph.nodes.len() + 1,
            steps,
            output,
            cache_kinds: caches.kinds,
            cache_paths: caches.paths,
            taps,
            parts_as_slices: crate::runtime::default_device() != "cpu",
        })
    }

    /// Runs one step, storing its value (or parts) and freeing the values
    /// it read last.
    fn run_step(&self, step: &Step, run: &mut Run<'_, '_>) -> Result<()> {
        let inputs: Vec<&Array> = step
            .inputs
            .iter()
            .map(|&i| {
                run.values[i]
                    .as_ref()
                    .expect("plan orders producers before readers")
            })
            .collect();
        let mut ctx = Ctx {
            offset: run.offset,
            key_mask: run.key_mask,
            positions: run.positions,
            cache: step.cache.map(|c| &mut run.cache.slots[c]),
        };
        let started = run.profiling.then(std::time::Instant::now);
        // An op with a cache may refuse its state (a rotating cache
        // under attention that needs every position): say which node.
        let y = step
            .op
            .forward(&inputs, &mut ctx)
            .map_err(|e| match step.cache {
                Some(c) => Error::Usage(format!("{}: {e}", self.cache_paths[c])),
                None => e.into(),
            })?;
        if let Some(t) = started {
            OP_TIMES.with_borrow_mut(|m| *m.by_op.entry(step.kind).or_default() += t.elapsed());
        }
        let parts = if step.split.is_empty() {
            vec![y]
        } else {
            parts_of(&y, &step.split, self.parts_as_slices)?
        };
        for (&out, y) in step.outs.iter().zip(parts) {
            if let Some(names) = run.wanted.get(&out) {
                for n in names {
                    run.captured.insert(n.to_string(), y.clone());
                }
            }
            run.values[out] = Some(y);
        }
        for &f in &step.free {
            run.values[f] = None;
        }
        Ok(())
    }

    /// The kernel groups of this plan, each as its nodes' op names and
    /// whether it has a GPU kernel (`rms_norm+linear+linear+linear: kernel`).
    pub fn kernel_groups(&self) -> Vec<String> {
        self.steps
            .iter()
            .filter_map(|e| match e {
                Entry::Group(g) => Some(format!(
                    "{}: {}",
                    g.members
                        .iter()
                        .map(|m| m.kind)
                        .collect::<Vec<_>>()
                        .join("+"),
                    if g.kernel.is_some() { "kernel" } else { "ops" }
                )),
                Entry::One(_) => None,
            })
            .collect()
    }

    pub fn cache_kinds(&self) -> &[CacheKind] {
        &self.cache_kinds
    }

    /// The node path of each cache slot's op, in slot order.
    pub fn cache_paths(&self) -> &[String] {
        &self.cache_paths
    }

    /// Tap names in execution order.
    pub fn tap_names(&self) -> impl Iterator<Item = &str> {
        self.taps.keys().map(String::as_str)
    }

    /// Runs the plan on token ids [B, T]. `taps` selects values to return;
    /// `key_mask` ([B, T] bool, true for real tokens) hides padding keys
    /// from every attention.
    pub fn run(
        &self,
        tokens: &Array,
        cache: &mut ModelCache,
        taps: &[String],
        key_mask: Option<&Array>,
        positions: Option<&crate::batch::Positions>,
    ) -> Result<(Array, IndexMap<String, Array>)> {
        crate::cache::shared::clear();
        if cache.slots.len() != self.cache_kinds.len() {
            return Err(Error::Usage(format!(
                "cache has {} slots, this model needs {}",
                cache.slots.len(),
                self.cache_kinds.len()
            )));
        }
        let mut wanted: HashMap<usize, Vec<&str>> = HashMap::new();
        for name in taps {
            let s = *self.taps.get(name).ok_or_else(|| {
                Error::Usage(format!("unknown tap '{name}' (see `lmspec spec taps`)"))
            })?;
            wanted.entry(s).or_default().push(name);
        }
        let mut captured = IndexMap::new();
        let mut values: Vec<Option<Array>> = vec![None; self.slots];
        values[0] = Some(tokens.clone());
        let offset = cache.offset;
        let t = tokens.shape().last().copied().unwrap_or(0);
        let profiling = PROFILING.get();
        if profiling {
            OP_TIMES.with_borrow_mut(|m| m.forwards += 1);
        }
        let mut run = Run {
            values: &mut values,
            wanted: &wanted,
            captured: &mut captured,
            cache,
            offset,
            key_mask,
            positions,
            profiling,
        };
        for entry in &self.steps {
            match entry {
                Entry::One(step) => self.run_step(step, &mut run)?,
                Entry::Group(g) => {
                    // The kernel's outputs, unless a tap asks for the
                    // values inside the group or the kernel does not apply.
                    let fused = match (&g.kernel, wanted.is_empty()) {
                        (Some(kernel), true) => {
                            let x = run.values[g.row]
                                .as_ref()
                                .expect("plan orders producers before readers");
                            let r = g.residual.and_then(|r| run.values[r].as_ref());
                            let position = positions.is_none().then_some(offset);
                            kernel.apply(x, r, position)?
                        }
                        _ => None,
                    };
                    match fused {
                        Some(ys) => {
                            for (&out, y) in g.outs.iter().zip(ys) {
                                run.values[out] = Some(y);
                            }
                        }
                        None => {
                            for step in &g.members {
                                self.run_step(step, &mut run)?;
                            }
                        }
                    }
                    for &f in &g.free {
                        run.values[f] = None;
                    }
                }
            }
        }
        cache.offset += t;
        let out = values[self.output]
            .take()
            .ok_or_else(|| Error::Usage("the model produced no output".into()))?;
        // Taps of the model's input come straight from the tokens.
        if let Some(names) = wanted.get(&0) {
            for n in names {
                captured.insert(n.to_string(), tokens.clone());
            }
        }
        Ok((out, captured))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_and_split_give_the_same_parts() {
        let y = Array::from_iter(0..24, &[2, 1, 12])
            .as_dtype(mlx_rs::Dtype::Float32)
            .unwrap();
        let by_split = parts_of(&y, &[4, 10], false).unwrap();
        let by_slices = parts_of(&y, &[4, 10], true).unwrap();
        assert_eq!(by_slices.len(), 3);
        for (a, b) in by_split.iter().zip(&by_slices) {
            assert_eq!(a.shape(), b.shape());
            let (a, b) = (a.contiguous().unwrap(), b.contiguous().unwrap());
            mlx_rs::transforms::eval([&a, &b]).unwrap();
            assert_eq!(a.as_slice::<f32>(), b.as_slice::<f32>());
        }
        assert_eq!(by_slices[2].shape(), &[2, 1, 2]);
    }
}
