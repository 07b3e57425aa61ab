//! Runs of graph nodes that one GPU kernel ([`ProjKernel`]) computes for a
//! single row: an RMSNorm and the projections that read it, two projections
//! and the gated unit over them, or a projection and the residual add after
//! it (with the `merge_heads` before it). Found by the node kinds and weights
//! alone (no model names), so every spec that lays out these patterns gets
//! them.
use std::collections::HashSet;

use lmspec_spec::ops::{Act, ExpertGlu, OpConfig, RopeScaling};
use lmspec_spec::{Graph, Src};

use crate::gpu_kernels::{weight_kind, Epilogue, GluAct};
use crate::plan::Adapted;
use crate::weights::Param;

/// One kernel's nodes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct KernelGroup {
    /// An `rms_norm` whose output only the projections read.
    pub norm: Option<usize>,
    /// The `linear` nodes, in node order (gate before up for a gated unit).
    pub projs: Vec<usize>,
    /// Per projection of a split group: the `split_heads` node after it and
    /// the `rope` after that, where the kernel does them too.
    pub forms: Vec<(Option<usize>, Option<usize>)>,
    /// The `glu` or `add` node after the projections.
    pub tail: Option<usize>,
    /// A `merge_heads` that only the projection reads: the kernel reads its
    /// input, heads first (for one position the layouts agree).
    pub merge: Option<usize>,
    pub epilogue: Epilogue,
    /// The value the kernel reads (the norm's input, or the projections').
    pub row: Src,
    /// The residual a tail `add` adds.
    pub residual: Option<Src>,
}

impl KernelGroup {
    /// Every node of the group, in node order.
    pub fn members(&self) -> Vec<usize> {
        let mut m: Vec<usize> = self
            .norm
            .iter()
            .chain(&self.projs)
            .chain(&self.tail)
            .chain(&self.merge)
            .copied()
            .chain(
                self.forms
                    .iter()
                    .flat_map(|(s, r)| s.iter().chain(r).copied()),
            )
            .collect();
        m.sort_unstable();
        m
    }

    /// The nodes whose values the kernel produces (read outside the group).
    pub fn outputs(&self) -> Vec<usize> {
        match self.tail {
            Some(t) => vec![t],
            None => self
                .projs
                .iter()
                .zip(&self.forms)
                .map(|(&p, (s, r))| r.or(*s).unwrap_or(p))
                .collect(),
        }
    }
}

/// What a projection's weights must share with the others of its kernel:
/// one weight (no bias or rotation) of a kind the kernels take.
fn kind(p: &[Param]) -> Option<String> {
    let [w] = p else { return None };
    weight_kind(w)
}

/// The kernel groups of a graph. Nodes with adapters, caches or extra
/// weights (a bias, a rotation) stay out, as does anything under a
/// tensor-parallel group.
pub(crate) fn kernel_groups(
    graph: &Graph,
    weights: &[Vec<Param>],
    adapted: &Adapted,
) -> Vec<KernelGroup> {
    if crate::distributed::build_group().is_some() {
        return Vec::new();
    }
    let n = graph.nodes.len();
    let mut readers: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (k, node) in graph.nodes.iter().enumerate() {
        for s in &node.inputs {
            if let Src::Node(j) = s {
                readers[*j].push(k);
            }
        }
    }
    let output = match graph.output {
        Src::Node(k) => Some(k),
        Src::Tokens => None,
    };
    // Read by `reader` alone, and not the graph's output.
    let private =
        |k: usize, reader: usize| readers[k].iter().all(|&r| r == reader) && Some(k) != output;
    let proj_kind = |k: usize| -> Option<String> {
        let node = &graph.nodes[k];
        let linear = node.op.as_projection().is_some()
            && node.inputs.len() == 1
            && node.resolved.state.is_none()
            && !adapted.contains_key(&k);
        linear.then(|| kind(&weights[k])).flatten()
    };
    let mut taken: HashSet<usize> = HashSet::new();
    let mut groups = Vec::new();
    // Gated units over two projections of one value.
    for (g, node) in graph.nodes.iter().enumerate() {
        let OpConfig::Glu(c) = &node.op else { continue };
        let act = match (c.r#fn, c.limit, c.glu) {
            (Act::Silu, None, ExpertGlu::Plain) => GluAct::Silu,
            (Act::GeluApprox, None, ExpertGlu::Plain) => GluAct::GeluTanh,
            _ => continue,
        };
        let [Src::Node(a), Src::Node(b)] = node.inputs[..] else {
            continue;
        };
        let same = a != b
            && graph.nodes[a].inputs == graph.nodes[b].inputs
            && graph.nodes[a].resolved.out.dim == graph.nodes[b].resolved.out.dim
            && private(a, g)
            && private(b, g);
        if same && proj_kind(a).is_some() && proj_kind(a) == proj_kind(b) {
            taken.extend([a, b, g]);
            groups.push(KernelGroup {
                norm: None,
                projs: vec![a, b],
                forms: Vec::new(),
                tail: Some(g),
                merge: None,
                epilogue: Epilogue::Glu(act),
                row: graph.nodes[a].inputs[0],
                residual: None,
            });
        }
    }
    // A projection and the residual added to it.
    for (t, node) in graph.nodes.iter().enumerate() {
        if !matches!(node.op, OpConfig::Add(_)) || node.inputs.len() != 2 {
            continue;
        }
        for (i, s) in node.inputs.iter().enumerate().rev() {
            let Src::Node(p) = *s else { continue };
            let other = node.inputs[1 - i];
            let earlier = match other {
                Src::Node(r) => r < p && r != p,
                Src::Tokens => false,
            };
            if !taken.contains(&p)
                && earlier
                && private(p, t)
                && proj_kind(p).is_some()
                && graph.nodes[p].resolved.out == node.resolved.out
            {
                taken.extend([p, t]);
                let row = graph.nodes[p].inputs[0];
                // The group runs where its first member stands: a merge
                // joins it where the residual is ready by then.
                let merge = match (row, other) {
                    (Src::Node(h), Src::Node(r))
                        if matches!(graph.nodes[h].op, OpConfig::MergeHeads(_))
                            && private(h, p)
                            && r < h =>
                    {
                        taken.insert(h);
                        Some(h)
                    }
                    _ => None,
                };
                groups.push(KernelGroup {
                    norm: None,
                    projs: vec![p],
                    forms: Vec::new(),
                    tail: Some(t),
                    merge,
                    epilogue: Epilogue::Residual,
                    row: merge.map_or(row, |h| graph.nodes[h].inputs[0]),
                    residual: Some(other),
                });
                break;
            }
        }
    }
    // A norm read only by projections: into their gated unit's group, or
    // a group of its own over them.
    for (m, node) in graph.nodes.iter().enumerate() {
        let OpConfig::RmsNorm(c) = &node.op else {
            continue;
        };
        if c.groups > 1
            || c.weight.is_none()
            || adapted.contains_key(&m)
            || Some(m) == output
            || readers[m].is_empty()
            || !matches!(weights[m].as_slice(), [Param::Dense(_)])
        {
            continue;
        }
        let mut rs = readers[m].clone();
        rs.sort_unstable();
        rs.dedup();
        if let Some(g) = groups
            .iter_mut()
            .find(|g| g.norm.is_none() && g.epilogue != Epilogue::Residual && g.projs == rs)
        {
            g.norm = Some(m);
            g.row = node.inputs[0];
            continue;
        }
        let kinds: Option<Vec<String>> = rs
            .iter()
            .map(|&p| (!taken.contains(&p)).then(|| proj_kind(p)).flatten())
            .collect();
        let Some(kinds) = kinds else { continue };
        if kinds.iter().all(|k| *k == kinds[0]) {
            taken.extend(rs.iter().copied());
            taken.insert(m);
            groups.push(KernelGroup {
                norm: Some(m),
                forms: rs
                    .iter()
                    .map(|&p| heads_after(graph, &readers, output, p))
                    .collect(),
                projs: rs,
                tail: None,
                merge: None,
                epilogue: Epilogue::Split,
                row: node.inputs[0],
                residual: None,
            });
        }
    }
    // Several projections of one value, without a norm before them.
    let mut by_input: indexmap::IndexMap<(Src, String), Vec<usize>> = indexmap::IndexMap::new();
    for k in 0..n {
        if taken.contains(&k) {
            continue;
        }
        if let Some(kind) = proj_kind(k) {
            by_input
                .entry((graph.nodes[k].inputs[0], kind))
                .or_default()
                .push(k);
        }
    }
    for ((row, _), projs) in by_input {
        if projs.len() > 1 {
            groups.push(KernelGroup {
                norm: None,
                forms: projs
                    .iter()
                    .map(|&p| heads_after(graph, &readers, output, p))
                    .collect(),
                projs,
                tail: None,
                merge: None,
                epilogue: Epilogue::Split,
                row,
                residual: None,
            });
        }
    }
    groups.sort_by_key(|g| g.members()[0]);
    groups
}

/// The `split_heads` node that alone reads projection `p` (for one
/// position its layout is the product's), and the `rope` that alone reads
/// that, where the kernel can apply it (a fixed base or frequencies, no
/// input scale, no growing base).
fn heads_after(
    graph: &Graph,
    readers: &[Vec<usize>],
    output: Option<usize>,
    p: usize,
) -> (Option<usize>, Option<usize>) {
    let only = |k: usize| match readers[k].as_slice() {
        [r] if Some(k) != output => Some(*r),
        _ => None,
    };
    let Some(s) = only(p).filter(|&s| matches!(graph.nodes[s].op, OpConfig::SplitHeads(_))) else {
        return (None, None);
    };
    let rope = only(s).filter(|&r| match &graph.nodes[r].op {
        OpConfig::Rope(c) => {
            let layout = graph.nodes[s].resolved.out;
            let variant = c.rotated_dims(&[layout]).and_then(|d| c.variant(d));
            match variant {
                Ok(RopeScaling::Base { .. }) => true,
                Ok(RopeScaling::Freqs { input_scale, .. }) => input_scale == 1.0,
                _ => false,
            }
        }
        _ => false,
    });
    (Some(s), rope)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use lmspec_spec::{expand_for, SpecLibrary};

    use super::*;

    /// The groups of a tiny graph: `heads` and `merged` before the output
    /// projection `o`, and the residual `r` added to it placed at `r_at`
    /// (`first`: before the heads; `between`: after the merge).
    fn groups_with_residual(r_at: &str) -> Vec<String> {
        let r = "    r: {op: scale, in: x, factor: 2.0}\n";
        let text = format!(
            "spec_version: 1\nname: order\nmodel_types: [order]\nmodel:\n  inputs: [tokens]\n  nodes:\n    \
             x: {{op: embedding, in: tokens, weight: emb, vocab: 10, dim: 8}}\n{}    \
             heads: {{op: split_heads, in: x, heads: 2}}\n    \
             merged: {{op: merge_heads, in: heads}}\n{}    \
             o: {{op: linear, in: merged, weight: o, out: 8}}\n    \
             sum: {{op: add, in: [o, r]}}\n  output: sum\n",
            if r_at == "first" { r } else { "" },
            if r_at == "between" { r } else { "" },
        );
        let lib = SpecLibrary::embedded().expect("library");
        let spec = lib.load_text(&text, Path::new("order.yaml")).expect("spec");
        let (_, graph) =
            expand_for(&spec, &serde_json::json!({}), Path::new("config.json")).expect("expand");
        let weights: Vec<Vec<Param>> = graph
            .nodes
            .iter()
            .map(|n| match n.op {
                OpConfig::Linear(_) => {
                    vec![Param::Dense(
                        mlx_rs::ops::zeros::<f32>(&[8, 8]).expect("zeros"),
                    )]
                }
                _ => Vec::new(),
            })
            .collect();
        kernel_groups(&graph, &weights, &Adapted::default())
            .iter()
            .map(|g| {
                g.members()
                    .iter()
                    .map(|&m| graph.nodes[m].op.name())
                    .collect::<Vec<_>>()
                    .join("+")
            })
            .collect()
    }

    #[test]
    fn a_merge_joins_where_the_residual_is_ready_first() {
        assert_eq!(groups_with_residual("first"), ["merge_heads+linear+add"]);
        // The group runs where its first member stands: a residual made
        // after the merge keeps the merge out.
        assert_eq!(groups_with_residual("between"), ["linear+add"]);
    }
}
