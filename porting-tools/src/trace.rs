//! `port trace`: a golden case's prefill and each cached decode step with
//! every tap recorded, written to a safetensors file or compared with one
//! written before (another device, another build). For each step it names
//! the first node whose values part from the other run's, which locates a
//! divergence that the logits alone only show (a backend's fault in the
//! cached path, say).
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use indexmap::IndexMap;
use lmspec_engine::{LoadOptions, Model};
use mlx_rs::Array;

use crate::golden::Golden;
use crate::tolerance::{compare, Stats, Tolerance};

/// Every tap of the prefill (`step0.`) and of each decode step
/// (`step{k}.`), and each step's output (`step{k}.logits`), in run order.
pub fn record(g: &Golden, opts: &LoadOptions) -> Result<IndexMap<String, Array>> {
    if crate::golden::is_encoder(&g.meta) {
        return Err(anyhow!(
            "{}: an encoder's golden has no cached path to trace",
            g.dir.display()
        ));
    }
    let model = Model::load(&g.model_dir(), opts)?;
    let taps = model.tap_names();
    let split = g.prefill_split();
    let mut cache = model.new_cache();
    let mut out = IndexMap::new();
    let steps = std::iter::once(&g.tokens[..split]).chain(g.tokens[split..].chunks(1));
    for (k, ids) in steps.enumerate() {
        let row = Array::from_slice(ids, &[1, ids.len() as i32]);
        let (logits, values) = model.forward_with_taps(&row, Some(&mut cache), &taps)?;
        for (name, value) in values {
            out.insert(format!("step{k}.{name}"), value);
        }
        out.insert(format!("step{k}.logits"), logits);
        // One step at a time, as a token loop evaluates them.
        let arrays: Vec<&Array> = out.values().collect();
        mlx_rs::transforms::eval(arrays)?;
    }
    Ok(out)
}

/// Writes a recording (float32) to `path`, a `.safetensors` file.
pub fn save(values: &IndexMap<String, Array>, path: &Path) -> Result<()> {
    if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        return Err(anyhow!(
            "{}: a trace is written as safetensors; name the file *.safetensors",
            path.display()
        ));
    }
    let wide = values
        .iter()
        .map(|(k, v)| Ok((k.as_str(), v.as_dtype(mlx_rs::Dtype::Float32)?)))
        .collect::<Result<Vec<_>>>()?;
    let none: Option<&std::collections::HashMap<String, String>> = None;
    Array::save_safetensors(wide.iter().map(|(k, v)| (*k, v)), none, path)
        .with_context(|| path.display().to_string())
}

/// Reads a recording written by [`save`].
pub fn load(path: &Path) -> Result<std::collections::HashMap<String, Array>> {
    Array::load_safetensors(path).with_context(|| path.display().to_string())
}

/// One step's comparison: its output's difference and the first node past
/// the tolerance, in run order.
#[derive(Debug)]
pub struct StepDiff {
    pub step: usize,
    pub logits: Option<Stats>,
    pub first: Option<(String, Stats)>,
    pub compared: usize,
}

/// Compares a recording with a reference recording, step by step.
pub fn compare_runs(
    ours: &IndexMap<String, Array>,
    theirs: &std::collections::HashMap<String, Array>,
    tolerance: Tolerance,
) -> Result<Vec<StepDiff>> {
    let mut steps: Vec<StepDiff> = Vec::new();
    for (name, a) in ours {
        let Some(b) = theirs.get(name) else { continue };
        let (head, node) = name
            .split_once('.')
            .ok_or_else(|| anyhow!("{name}: not a trace name"))?;
        let step: usize = head
            .strip_prefix("step")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("{name}: not a trace name"))?;
        if steps.last().map(|s| s.step) != Some(step) {
            steps.push(StepDiff {
                step,
                logits: None,
                first: None,
                compared: 0,
            });
        }
        let row = steps.last_mut().expect("pushed above");
        let a = a.as_dtype(mlx_rs::Dtype::Float32)?;
        let stats = compare(&a, b).map_err(|e| anyhow!("{name}: {e}"))?;
        row.compared += 1;
        if node == "logits" {
            row.logits = Some(stats);
        } else if row.first.is_none() && !stats.within(tolerance) {
            row.first = Some((node.to_string(), stats));
        }
    }
    Ok(steps)
}

/// The comparison as a table, one row per step.
pub fn table(steps: &[StepDiff], tolerance: Tolerance) -> String {
    let mut out = format!(
        "{:<6} {:>6} {:>12}  first node past {} (max_rel)\n",
        "step",
        "taps",
        "logits rel",
        tolerance.name()
    );
    for s in steps {
        let logits = s
            .logits
            .map(|l| format!("{:.2e}", l.max_rel()))
            .unwrap_or_else(|| "-".to_string());
        let first = match &s.first {
            Some((node, st)) => format!("{node} ({:.2e})", st.max_rel()),
            None => "none".to_string(),
        };
        out.push_str(&format!(
            "{:<6} {:>6} {:>12}  {first}\n",
            s.step, s.compared, logits
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_parting_node_of_each_step() {
        let v = |x: &[f32]| Array::from_slice(x, &[x.len() as i32]);
        let mut ours = IndexMap::new();
        let mut theirs = std::collections::HashMap::new();
        for (name, a, b) in [
            ("step0.layers.0.conv", [1.0, 2.0], [1.0, 2.0]),
            ("step0.logits", [3.0, 4.0], [3.0, 4.0]),
            ("step1.layers.0.conv", [1.0, 2.0], [1.0, 2.0]),
            ("step1.layers.0.scan", [1.0, 2.0], [1.0, 2.5]),
            ("step1.layers.1.scan", [1.0, 2.0], [1.0, 3.0]),
            ("step1.logits", [1.0, 2.0], [1.0, 4.0]),
        ] {
            ours.insert(name.to_string(), v(&a));
            theirs.insert(name.to_string(), v(&b));
        }
        let steps = compare_runs(&ours, &theirs, Tolerance::F32).unwrap();
        assert_eq!(steps.len(), 2);
        assert!(steps[0].first.is_none());
        assert_eq!(steps[0].compared, 2);
        let (node, stats) = steps[1].first.as_ref().unwrap();
        assert_eq!(node, "layers.0.scan");
        assert!((stats.max_rel() - 0.2).abs() < 1e-6);
        assert!((steps[1].logits.unwrap().max_rel() - 0.5).abs() < 1e-6);
        let text = table(&steps, Tolerance::F32);
        assert!(text.contains("layers.0.scan (2.00e-1)"), "{text}");
        ours.insert("bad".to_string(), v(&[1.0]));
        theirs.insert("bad".to_string(), v(&[1.0]));
        assert!(compare_runs(&ours, &theirs, Tolerance::F32).is_err());
    }
}
