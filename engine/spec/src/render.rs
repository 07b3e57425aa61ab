//! Rendering an expanded graph: Graphviz DOT, the text dump that snapshots
//! pin, and the explanation of skipped nodes.
use crate::graph::{Graph, Skipped, Src};
use crate::ops::{ParamKind, REGISTRY};

/// Graphviz DOT of an expanded graph, one cluster per layer.
pub fn to_dot(graph: &Graph, title: &str) -> String {
    let mut out = format!("digraph \"{title}\" {{\n  rankdir=TB;\n  node [shape=box, fontsize=10];\n  tokens [shape=oval];\n");
    let mut current: Option<String> = None;
    for (k, n) in graph.nodes.iter().enumerate() {
        let layer = n.path.split('.').take(2).collect::<Vec<_>>();
        let cluster =
            (layer.len() == 2 && layer[1].parse::<usize>().is_ok()).then(|| layer.join("."));
        if cluster != current {
            if current.is_some() {
                out.push_str("  }\n");
            }
            if let Some(c) = &cluster {
                out.push_str(&format!(
                    "  subgraph \"cluster_{c}\" {{\n    label=\"{c} ({})\";\n",
                    graph
                        .layer_blocks
                        .get(layer[1].parse::<usize>().unwrap_or(0))
                        .map(String::as_str)
                        .unwrap_or("")
                ));
            }
            current = cluster;
        }
        let dims = match n.resolved.out.heads {
            Some(h) => format!("{h}x{}", n.resolved.out.dim),
            None => n.resolved.out.dim.to_string(),
        };
        out.push_str(&format!(
            "    n{k} [label=\"{}\\n{} [{dims}]\"];\n",
            n.path,
            n.op.name()
        ));
    }
    if current.is_some() {
        out.push_str("  }\n");
    }
    for (k, n) in graph.nodes.iter().enumerate() {
        for s in &n.inputs {
            let from = match s {
                Src::Tokens => "tokens".to_string(),
                Src::Node(j) => format!("n{j}"),
            };
            out.push_str(&format!("  {from} -> n{k};\n"));
        }
    }
    out.push_str("}\n");
    out
}

/// A text dump of an expanded graph: one line per node with its op, inputs,
/// output layout, evaluated parameters and the tensors it needs. With
/// `explain`, each node also names the spec file and node it came from, and
/// every skipped node is listed with the value that stands for it.
pub fn dump(graph: &Graph, explain: bool) -> String {
    let mut out = String::new();
    let mut skipped = graph.skipped.iter().peekable();
    for (k, n) in graph.nodes.iter().enumerate() {
        if explain {
            // Skipped nodes are listed before the first node made after them.
            while let Some(s) = skipped.next_if(|s| s.before <= k) {
                out.push_str(&skipped_line(graph, s));
            }
        }
        let layout = match n.resolved.out.heads {
            Some(h) => format!("[B, {h}, T, {}]", n.resolved.out.dim),
            None => format!("[B, T, {}]", n.resolved.out.dim),
        };
        let ins: Vec<&str> = n.inputs.iter().map(|s| graph.name_of(*s)).collect();
        let params: Vec<String> =
            n.op.values()
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
        out.push_str(&format!(
            "{} = {}({}) -> {layout}",
            n.path,
            n.op.name(),
            ins.join(", ")
        ));
        if !params.is_empty() {
            out.push_str(&format!(" {{{}}}", params.join(", ")));
        }
        if explain {
            out.push_str(&format!("  # {}: {}", n.file.display(), n.origin));
        }
        // Optional tensors (a rotation's signs) are left out: a checkpoint
        // that has them is the exception.
        for w in n.resolved.weights.iter().filter(|w| !w.optional) {
            out.push_str(&format!("\n    {} {:?}", w.tensor(), w.shape));
        }
        if let Some(c) = n.resolved.state {
            out.push_str(&format!("\n    state: {c:?}"));
        }
        out.push('\n');
    }
    if explain {
        for s in skipped {
            out.push_str(&skipped_line(graph, s));
        }
    }
    out.push_str(&format!("output = {}\n", graph.name_of(graph.output)));
    out
}

/// The `--explain` line of a skipped node.
fn skipped_line(graph: &Graph, s: &Skipped) -> String {
    format!(
        "# skipped {} (when false at {}: {}) = {}\n",
        s.path,
        s.file.display(),
        s.origin,
        graph.name_of(s.stands_for)
    )
}

/// The op reference (`docs/ops.md`), generated from the op schemas.
pub fn op_reference() -> String {
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
