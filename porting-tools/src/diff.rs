//! `port diff`: run the engine with the golden's taps and compare node by
//! node in execution order, naming the first node past tolerance.
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use lmspec_engine::{LoadOptions, Model};
use mlx_rs::Array;

use crate::golden::Golden;
use crate::tolerance::{compare, Stats, Tolerance};

/// One compared node.
#[derive(Debug, Clone)]
pub struct NodeDiff {
    pub name: String,
    pub shape: Vec<i32>,
    /// `None` when the shapes differ (always a failure).
    pub stats: Option<Stats>,
    pub passed: bool,
}

impl NodeDiff {
    /// Layer index of a `layers.{i}...` tap.
    pub fn layer(&self) -> Option<usize> {
        let mut parts = self.name.split('.');
        match (parts.next(), parts.next()) {
            (Some("layers"), Some(i)) => i.parse().ok(),
            _ => None,
        }
    }

    /// The tap name with its layer prefix removed (`attn.q` for
    /// `layers.3.attn.q`, `output` for `layers.3`).
    pub fn kind(&self) -> String {
        match self.layer() {
            Some(i) => {
                let prefix = format!("layers.{i}");
                match self.name.strip_prefix(&prefix) {
                    Some("") => "output".to_string(),
                    Some(rest) => rest.trim_start_matches('.').to_string(),
                    None => self.name.clone(),
                }
            }
            None => self.name.clone(),
        }
    }
}

/// The comparison of one model against one golden case.
#[derive(Debug)]
pub struct DiffReport {
    pub model: PathBuf,
    pub golden: PathBuf,
    pub spec: String,
    pub tolerance: Tolerance,
    pub rows: Vec<NodeDiff>,
    /// Golden taps the engine has no node for.
    pub unmatched: Vec<String>,
}

impl DiffReport {
    pub fn first_failure(&self) -> Option<&NodeDiff> {
        self.rows.iter().find(|r| !r.passed)
    }

    pub fn passed(&self) -> bool {
        self.first_failure().is_none() && !self.rows.is_empty()
    }

    /// A plain-text table.
    pub fn table(&self) -> String {
        let mut out = format!(
            "model {}  golden {}  spec {}  tolerance {} (max_rel <= {:.0e}, cosine >= {})\n",
            self.model.display(),
            self.golden.display(),
            self.spec,
            self.tolerance.name(),
            self.tolerance.max_rel(),
            self.tolerance.min_cosine()
        );
        out.push_str(&format!(
            "{:<28} {:<16} {:>11} {:>11} {:>11} {:>13}  {}\n",
            "node", "shape", "max_abs", "max_rel", "nmse", "cosine", "ok"
        ));
        for r in &self.rows {
            let shape = format!("{:?}", r.shape);
            match &r.stats {
                Some(s) => out.push_str(&format!(
                    "{:<28} {:<16} {:>11.3e} {:>11.3e} {:>11.3e} {:>13.9}  {}\n",
                    r.name,
                    shape,
                    s.max_abs,
                    s.max_rel(),
                    s.nmse,
                    s.cosine,
                    if r.passed { "ok" } else { "FAIL" }
                )),
                None => out.push_str(&format!(
                    "{:<28} {:<16} shape differs from the golden  FAIL\n",
                    r.name, shape
                )),
            }
        }
        for name in &self.unmatched {
            out.push_str(&format!("{name:<28} (golden tap with no engine node)\n"));
        }
        match self.first_failure() {
            Some(f) => out.push_str(&format!("first divergent node: {}\n", f.name)),
            None if self.rows.is_empty() => out.push_str("no taps in common: nothing compared\n"),
            None => out.push_str(&format!("all {} nodes within tolerance\n", self.rows.len())),
        }
        out
    }
}

/// Compares the engine on `model_dir` with the golden case `golden_dir`.
/// The golden tap holding the model's output.
const OUTPUT_TAP: &str = "logits";

pub fn diff(
    model_dir: &Path,
    golden_dir: &Path,
    opts: &LoadOptions,
    tolerance: Option<Tolerance>,
) -> Result<DiffReport> {
    let g = Golden::load(golden_dir)?;
    if g.taps.is_empty() {
        return Err(anyhow!(
            "{}: the golden has no taps; regenerate it with porting-tools/python/make_golden.py",
            golden_dir.display()
        ));
    }
    let model = Model::load(model_dir, opts)?;
    let engine_taps = model.tap_names();
    // The golden's `logits` tap is the model's output, whatever node makes it.
    let wanted: Vec<String> = engine_taps
        .iter()
        .filter(|n| n.as_str() != OUTPUT_TAP && g.taps.contains_key(*n))
        .cloned()
        .collect();
    let tokens = Array::from_slice(&g.tokens, &[1, g.tokens.len() as i32]);
    let (output, values) = model.forward_with_taps(&tokens, None, &wanted)?;
    let tolerance = tolerance.unwrap_or_else(|| g.tolerance());
    let mut rows = Vec::new();
    let pairs = wanted.iter().map(|n| (n.as_str(), &values[n])).chain(
        g.taps
            .contains_key(OUTPUT_TAP)
            .then_some((OUTPUT_TAP, &output)),
    );
    for (name, ours) in pairs {
        let theirs = &g.taps[name];
        let row = if ours.size() == theirs.size() {
            let ours = ours.reshape(theirs.shape())?;
            let stats = compare(&ours, theirs).map_err(|e| anyhow!("{name}: {e}"))?;
            NodeDiff {
                name: name.to_string(),
                shape: theirs.shape().to_vec(),
                passed: stats.within(tolerance),
                stats: Some(stats),
            }
        } else {
            NodeDiff {
                name: name.to_string(),
                shape: ours.shape().to_vec(),
                stats: None,
                passed: false,
            }
        };
        rows.push(row);
    }
    let unmatched = g
        .taps
        .keys()
        .filter(|k| k.as_str() != OUTPUT_TAP && !engine_taps.contains(k))
        .cloned()
        .collect();
    Ok(DiffReport {
        model: model_dir.to_path_buf(),
        golden: golden_dir.to_path_buf(),
        spec: model.spec.name.clone(),
        tolerance,
        rows,
        unmatched,
    })
}

/// The prefix of a vision-language golden's tower taps
/// (`goldens/vlm/<case>/golden.safetensors`).
pub const VISION_TAPS: &str = "vision_taps.";

/// Whether the golden case in `golden_dir` is a vision-language one (its
/// tensors hold tower taps).
pub fn is_vision_golden(golden_dir: &Path) -> bool {
    let file = golden_dir.join("golden.safetensors");
    match Array::load_safetensors(&file) {
        Ok(t) => t.keys().any(|k| k.starts_with(VISION_TAPS)),
        Err(_) => false,
    }
}

/// `port diff` of a vision tower: the tower of the checkpoint in
/// `model_dir` runs on the golden's patches and grids, and each of its
/// taps is compared with the golden's `vision_taps.*` in execution order.
pub fn diff_tower(
    model_dir: &Path,
    golden_dir: &Path,
    opts: &LoadOptions,
    tolerance: Option<Tolerance>,
) -> Result<DiffReport> {
    use lmspec_lm::vision::{tower_batch, Grid};
    let file = golden_dir.join("golden.safetensors");
    let t = Array::load_safetensors(&file).map_err(|e| anyhow!("{}: {e}", file.display()))?;
    let need = |k: &str| {
        t.get(k)
            .ok_or_else(|| anyhow!("{}: no tensor '{k}'", file.display()))
    };
    let pixels = need("pixel_values")?;
    let grid = need("image_grid_thw")?.as_dtype(mlx_rs::Dtype::Int64)?;
    let grids: Vec<Grid> = grid
        .as_slice::<i64>()
        .chunks(3)
        .map(|g| Grid {
            t: g[0],
            h: g[1],
            w: g[2],
        })
        .collect();
    let tower = Model::load(
        model_dir,
        &opts.clone().with_task(lmspec_spec::raw::Task::Vision),
    )?;
    // A tower that takes each image as a batch row needs no merge size.
    let rows = tower.config.get("images_as_rows").and_then(|v| v.as_bool()) == Some(true);
    let merge = match tower
        .config
        .get("spatial_merge_size")
        .and_then(|v| v.as_i64())
    {
        Some(m) => m,
        None if rows => 1,
        None => {
            return Err(anyhow!(
                "{}: the tower spec binds no spatial_merge_size",
                model_dir.display()
            ))
        }
    };
    let engine_taps = tower.tap_names();
    let wanted: Vec<String> = engine_taps
        .iter()
        .filter(|n| t.contains_key(&format!("{VISION_TAPS}{n}")))
        .cloned()
        .collect();
    let (pixels, inputs) = tower_batch(&tower, pixels, &grids, merge)?;
    let (_, values) = tower.encode(&pixels, &inputs, &wanted)?;
    let tolerance = tolerance.unwrap_or(Tolerance::F32);
    let mut rows = Vec::new();
    for name in &wanted {
        let theirs = &t[&format!("{VISION_TAPS}{name}")];
        let ours = &values[name];
        rows.push(if ours.size() == theirs.size() {
            let ours = ours.reshape(theirs.shape())?;
            let stats = compare(&ours, theirs).map_err(|e| anyhow!("{name}: {e}"))?;
            NodeDiff {
                name: name.clone(),
                shape: theirs.shape().to_vec(),
                passed: stats.within(tolerance),
                stats: Some(stats),
            }
        } else {
            NodeDiff {
                name: name.clone(),
                shape: ours.shape().to_vec(),
                stats: None,
                passed: false,
            }
        });
    }
    let unmatched = t
        .keys()
        .filter_map(|k| k.strip_prefix(VISION_TAPS))
        .filter(|k| !engine_taps.iter().any(|n| n == k))
        .map(str::to_string)
        .collect();
    Ok(DiffReport {
        model: model_dir.to_path_buf(),
        golden: golden_dir.to_path_buf(),
        spec: tower.spec.name.clone(),
        tolerance,
        rows,
        unmatched,
    })
}
