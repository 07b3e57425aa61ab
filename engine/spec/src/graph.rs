//! The expanded graph: a spec unrolled for one config into a flat list of
//! resolved nodes, each with a typed op config. Made by [`crate::expand`].
use std::path::PathBuf;

use indexmap::IndexMap;

use crate::ops::{OpConfig, Resolved};

/// The model's input value.
pub const TOKENS: &str = "tokens";

/// Where a value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Src {
    Tokens,
    Node(usize),
}

/// A node of the expanded graph.
#[derive(Debug, Clone)]
pub struct Node {
    /// Tap name, e.g. `layers.3.attn.q`.
    pub path: String,
    pub op: OpConfig,
    pub inputs: Vec<Src>,
    pub resolved: Resolved,
    /// The spec file and node that produced it (for errors).
    pub file: PathBuf,
    pub origin: String,
}

/// A node that did not run for this config, and what stands for it.
#[derive(Debug, Clone)]
pub struct Skipped {
    /// Tap-style path of the skipped node.
    pub path: String,
    /// The value used in its place.
    pub stands_for: Src,
    /// How many nodes the graph had when it was skipped (it is listed
    /// before that node).
    pub before: usize,
    /// The spec file and node (for `spec dump --explain`).
    pub file: PathBuf,
    pub origin: String,
}

/// A spec expanded for one config.
#[derive(Debug, Clone)]
pub struct Graph {
    pub nodes: Vec<Node>,
    pub output: Src,
    /// Tap names that stand for another node's value (block calls, layers).
    pub aliases: IndexMap<String, Src>,
    /// Block kind of each layer.
    pub layer_blocks: Vec<String>,
    /// Nodes whose `when` was false, in expansion order.
    pub skipped: Vec<Skipped>,
}

impl Graph {
    /// The value a tap name refers to.
    pub fn find(&self, name: &str) -> Option<Src> {
        if let Some(s) = self.aliases.get(name) {
            return Some(*s);
        }
        self.nodes
            .iter()
            .position(|n| n.path == name)
            .map(Src::Node)
    }

    /// The tap name of a value.
    pub fn name_of(&self, src: Src) -> &str {
        match src {
            Src::Tokens => TOKENS,
            Src::Node(k) => self.nodes.get(k).map_or("?", |n| n.path.as_str()),
        }
    }

    /// Every tap name, in execution order.
    pub fn tap_names(&self) -> Vec<String> {
        let mut names: Vec<(usize, String)> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(k, n)| (k, n.path.clone()))
            .collect();
        for (name, src) in &self.aliases {
            if let Src::Node(k) = src {
                names.push((*k, name.clone()));
            }
        }
        names.sort_by_key(|(k, _)| *k);
        names.into_iter().map(|(_, n)| n).collect()
    }
}

impl Graph {
    /// Rows of the tables that token ids index (the fewest when several
    /// do): every id must be below it.
    pub fn token_rows(&self) -> Option<i64> {
        self.nodes
            .iter()
            .filter(|n| n.inputs.first() == Some(&Src::Tokens))
            .filter_map(|n| match &n.op {
                // A table that sends ids past it to a row takes any id.
                OpConfig::Embedding(e) if e.outside.is_none() => Some(e.vocab),
                _ => None,
            })
            .min()
    }

    /// The layout of the model's output (`None` when it is the tokens).
    pub fn output_layout(&self) -> Option<crate::ops::Layout> {
        match self.output {
            Src::Node(i) => self.nodes.get(i).map(|n| n.resolved.out),
            Src::Tokens => None,
        }
    }

    /// Rows of learned position tables (the fewest when several): no
    /// sequence may be longer.
    pub fn position_rows(&self) -> Option<i64> {
        self.nodes
            .iter()
            .filter_map(|n| match &n.op {
                OpConfig::PositionEmbedding(p) if p.row.is_none() => Some(p.positions - p.offset),
                _ => None,
            })
            .min()
    }
}
