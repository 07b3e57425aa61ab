//! Adapters (LoRA, DoRA, QLoRA) against mlx-lm's goldens
//! (`goldens/adapters/<case>`, `porting-tools/python/make_adapter_goldens.py`):
//! mlx-lm-trained adapters load with mlx-lm's logits, training from the same
//! initial adapter over the same batches gives mlx-lm's per-step losses and
//! final weights, fusing gives the adapted logits; plus bad input.
use std::path::{Path, PathBuf};

use lmspec::engine::adapter::{self, AdapterConfig, AdapterKind, AdapterSource};
use lmspec::engine::{LoadOptions, Model};
use lmspec::lm::tune::{self, Batch, Optimizer, Schedule, Trainer};
use lmspec::port::tolerance::{compare, Tolerance};
use mlx_rs::Array;
use std::collections::HashMap as IndexMap;

use crate::support::{goldens, library, mlx_lock, read_json, root};

const CASES: [&str; 5] = ["lora", "dora", "qlora", "lora_accum", "moe"];

pub(crate) fn case_dir(case: &str) -> PathBuf {
    goldens().join("adapters").join(case)
}

fn meta(case: &str) -> serde_json::Value {
    read_json(&case_dir(case).join("meta.json"))
}

fn base_of(case: &str) -> PathBuf {
    root().join(
        meta(case)["base"]
            .as_str()
            .expect("meta.json names the base"),
    )
}

fn golden(case: &str) -> IndexMap<String, Array> {
    let f = case_dir(case).join("golden.safetensors");
    Array::load_safetensors(&f)
        .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
        .into_iter()
        .collect()
}

/// The adapted logits are held to mlx-lm's at float32 tolerances: float32
/// activations (mlx-lm's numerics) for the quantized bases too.
fn opts() -> LoadOptions {
    LoadOptions::as_stored()
        .with_library(library())
        .with_fusion(false)
        .with_activations(lmspec::engine::cpu_kernels::Activations::Float)
}

fn load_with(base: &Path, adapter: &Path) -> Model {
    Model::load(base, &opts().with_adapter(adapter)).expect("model with adapter loads")
}

fn assert_close(what: &str, ours: &Array, reference: &Array, tol: Tolerance) {
    let s = compare(ours, reference).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        s.within(tol),
        "{what}: max rel {:.3e}, cosine {} (tolerance {})",
        s.max_rel(),
        s.cosine,
        tol.name()
    );
}

/// An adapter folder holding the case's initial adapter.
fn init_adapter(case: &str, tmp: &Path) -> PathBuf {
    let d = tmp.join(format!("{case}_init"));
    std::fs::create_dir_all(&d).expect("folder");
    std::fs::copy(
        case_dir(case).join("adapter_config.json"),
        d.join("adapter_config.json"),
    )
    .expect("copy config");
    std::fs::copy(
        case_dir(case).join("init.safetensors"),
        d.join("adapters.safetensors"),
    )
    .expect("copy init");
    d
}

fn optimizer_of(meta: &serde_json::Value) -> (Optimizer, Schedule) {
    let opt = Optimizer::from_name(
        meta["optimizer"].as_str().expect("meta.json optimizer"),
        &meta["optimizer_config"],
    )
    .expect("known optimizer");
    let lr = meta["learning_rate"]
        .as_f64()
        .expect("meta.json learning_rate") as f32;
    match meta.get("lr_schedule").filter(|s| !s.is_null()) {
        Some(s) => (opt, Schedule::from_json(s).expect("meta.json lr_schedule")),
        None => (opt, Schedule::Constant(lr)),
    }
}

#[test]
fn mlx_lm_trained_adapters_load_with_mlx_lm_logits() {
    let _g = mlx_lock();
    for case in CASES {
        let g = golden(case);
        let model = load_with(&base_of(case), &case_dir(case));
        let logits = model.forward(&g["probe"], None).unwrap();
        assert_close(case, &logits, &g["adapted_logits"], Tolerance::F32);
        // Turned off, the adapter leaves the base model.
        let a = model.adapter.as_ref().unwrap();
        a.set_enabled(false);
        let base = Model::load(&base_of(case), &opts()).unwrap();
        let plain = base.forward(&g["probe"], None).unwrap();
        let off = model.forward(&g["probe"], None).unwrap();
        assert_close(&format!("{case} off"), &off, &plain, Tolerance::Exact);
        let moved = compare(&logits, &plain).unwrap();
        assert!(moved.max_abs > 1e-3, "{case}: the adapter changes nothing");
    }
}

#[test]
fn adapters_attach_to_fused_projections_too() {
    // Fusion of q/k/v stays on for nodes without adapters; the adapted
    // nodes run alone, and the logits are the same.
    let _g = mlx_lock();
    let g = golden("qlora");
    let o = opts().with_fusion(true).with_adapter(case_dir("qlora"));
    let model = Model::load(&base_of("qlora"), &o).unwrap();
    let logits = model.forward(&g["probe"], None).unwrap();
    assert_close(
        "qlora fused plan",
        &logits,
        &g["adapted_logits"],
        Tolerance::F32,
    );
}

fn train_case(case: &str, tmp: &Path) -> (Model, Vec<f32>) {
    let m = meta(case);
    let g = golden(case);
    let model = load_with(&base_of(case), &init_adapter(case, tmp));
    let (opt, schedule) = optimizer_of(&m);
    let accumulate = m["grad_accumulation_steps"].as_u64().unwrap_or(1);
    let mut trainer = Trainer::new(&model, opt, schedule, accumulate).expect("trainer");
    let steps = m["steps"].as_u64().expect("meta.json steps") as usize;
    let mut losses = Vec::new();
    for k in 0..steps {
        let batch = Batch {
            tokens: g[&format!("batch.{k}")].clone(),
            lengths: g[&format!("lengths.{k}")].clone(),
        };
        losses.push(trainer.step(&batch).expect("training step").0);
    }
    (model, losses)
}

#[test]
fn training_matches_mlx_lm_per_step_and_in_the_final_adapter() {
    let _g = mlx_lock();
    let tmp = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for case in CASES {
        let g = golden(case);
        let (model, losses) = train_case(case, tmp.path());
        let reference = g["losses"].as_slice::<f32>().to_vec();
        assert_eq!(losses.len(), reference.len());
        let rels: Vec<f64> = losses
            .iter()
            .zip(&reference)
            .map(|(a, b)| ((a - b).abs() / b.abs()) as f64)
            .collect();
        let worst = rels.iter().cloned().fold(0.0, f64::max);
        let shown: Vec<String> = rels.iter().map(|r| format!("{r:.1e}")).collect();
        eprintln!("{case}: per-step loss relative differences {shown:?}");
        if let Some(k) = rels.iter().position(|r| *r > Tolerance::F32.max_rel()) {
            failures.push(format!(
                "{case} step {}: loss {} vs mlx-lm {} (rel {:.2e})",
                k + 1,
                losses[k],
                reference[k],
                rels[k]
            ));
            continue;
        }
        eprintln!("{case}: per-step loss max rel diff {worst:.2e}");
        // The losses moved: training did something.
        let trained: IndexMap<String, Array> =
            Array::load_safetensors(case_dir(case).join("adapters.safetensors"))
                .unwrap()
                .into_iter()
                .collect();
        let a = model.adapter.as_ref().unwrap();
        let names = a.param_names();
        let mut worst_weight = 0.0f64;
        assert_eq!(names.len(), trained.len(), "{case}: adapter arrays");
        for (name, p) in names.iter().zip(a.params()) {
            let r = trained
                .get(name)
                .unwrap_or_else(|| panic!("{case}: mlx-lm has no {name}"));
            assert_close(&format!("{case} {name}"), &p, r, Tolerance::F32);
            worst_weight = worst_weight.max(compare(&p, r).expect("shapes").max_rel());
        }
        eprintln!("{case}: trained adapter arrays max rel diff {worst_weight:.2e}");
        let init: IndexMap<String, Array> =
            Array::load_safetensors(case_dir(case).join("init.safetensors"))
                .unwrap()
                .into_iter()
                .collect();
        let b = names.iter().find(|n| n.ends_with("lora_b")).unwrap();
        let moved = compare(&trained[b], &init[b]).unwrap();
        assert!(moved.max_abs > 1e-4, "{case}: lora_b did not move");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn fused_models_give_the_adapted_logits() {
    let _g = mlx_lock();
    let tmp = tempfile::tempdir().unwrap();
    for case in CASES {
        let g = golden(case);
        let model = load_with(&base_of(case), &case_dir(case));
        let out = tmp.path().join(case);
        let a = model.adapter.as_ref().unwrap();
        adapter::fuse::fuse_into(&base_of(case), a, &out, false).unwrap();
        let fused = Model::load(&out, &opts()).unwrap();
        let logits = fused.forward(&g["probe"], None).unwrap();
        let adapted = model.forward(&g["probe"], None).unwrap();
        assert_close(
            &format!("{case} fused vs mlx-lm fused"),
            &logits,
            &g["fused_logits"],
            Tolerance::F32,
        );
        if case == "qlora" {
            // Re-quantizing the fused 4-bit weights moves this tiny random
            // model's logits a lot (mlx-lm's own fuse: the same); fused
            // dense, the logits are the adapted ones.
            let dense = tmp.path().join("qlora_dense");
            adapter::fuse::fuse_into(&base_of(case), a, &dense, true).unwrap();
            let config = crate::support::read_json(&dense.join("config.json"));
            assert!(config.get("quantization").is_none());
            let fused = Model::load(&dense, &opts()).unwrap();
            let logits = fused.forward(&g["probe"], None).unwrap();
            assert_close(
                "qlora fused dense vs adapted",
                &logits,
                &adapted,
                Tolerance::Quantized,
            );
        } else {
            assert_close(
                &format!("{case} fused vs adapted"),
                &logits,
                &adapted,
                Tolerance::F32,
            );
        }
    }
}

/// Trains with lmspec, then has mlx-lm load the adapter and the fused
/// folder (`make_adapter_goldens.py --check-lmspec`) and compare logits.
#[test]
fn lmspec_adapters_and_fused_folders_load_in_mlx_lm() {
    let _g = mlx_lock();
    let python = root().join(".venv/bin/python");
    let tmp = tempfile::tempdir().unwrap();
    for case in CASES {
        let g = golden(case);
        let (model, _) = train_case(case, tmp.path());
        let d = tmp.path().join(format!("{case}_check"));
        let a = model.adapter.as_ref().unwrap();
        a.save(&d.join("adapter"), &serde_json::Value::Null)
            .unwrap();
        adapter::fuse::fuse_into(&base_of(case), a, &d.join("fused"), false).unwrap();
        let fused = Model::load(&d.join("fused"), &opts()).unwrap();
        let probe = &g["probe"];
        let adapted = model.forward(probe, None).unwrap();
        let fused_logits = fused.forward(probe, None).unwrap();
        Array::save_safetensors(
            [
                ("probe", probe),
                ("adapted_logits", &adapted),
                ("fused_logits", &fused_logits),
            ],
            None,
            d.join("logits.safetensors"),
        )
        .unwrap();
        std::fs::write(d.join("base"), base_of(case).display().to_string()).unwrap();
        let out = std::process::Command::new(&python)
            .arg(root().join("porting-tools/python/make_adapter_goldens.py"))
            .arg("--check-lmspec")
            .arg(&d)
            .output()
            .expect("python runs");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{case}: mlx-lm check failed:\n{text}");
        eprintln!("{case}: {text}");
    }
}

#[test]
fn a_new_adapter_starts_as_mlx_lm_does() {
    let _g = mlx_lock();
    for (kind, layers) in [(AdapterKind::Lora, 1), (AdapterKind::Dora, -1)] {
        let config = AdapterConfig {
            kind,
            rank: 4,
            scale: 10.0,
            num_layers: layers,
            ..AdapterConfig::default()
        };
        let o = opts();
        let mut o = o;
        o.adapter = Some(AdapterSource::New { config, seed: 0 });
        let model = Model::load(&goldens().join("llama/model"), &o).unwrap();
        let a = model.adapter.as_ref().unwrap();
        // llama: q, k, v, o, gate, up, down per layer.
        let layers_used = if layers < 0 { 2 } else { 1 };
        assert_eq!(a.slots.len(), 7 * layers_used);
        assert!(a.slots[0]
            .module
            .starts_with(&format!("model.layers.{}", 2 - layers_used)));
        for s in &a.slots {
            let t = s.tensors();
            let inp = t.a.shape()[0] as f32;
            let bound = 1.0 / inp.sqrt();
            let max = t.a.abs().unwrap().max(None).unwrap();
            assert!(tune::item(&max).unwrap() <= bound);
            assert_eq!(
                tune::item(&t.b.abs().unwrap().sum(None).unwrap()).unwrap(),
                0.0
            );
            assert_eq!(t.m.is_some(), kind == AdapterKind::Dora);
        }
        // lora_b = 0: the model is the base model.
        let base = Model::load(&goldens().join("llama/model"), &opts()).unwrap();
        let probe = Array::from_slice(&[1i32, 5, 9, 33], &[1, 4]);
        let x = model.forward(&probe, None).unwrap();
        let y = base.forward(&probe, None).unwrap();
        assert_close("fresh adapter", &x, &y, Tolerance::F32);
    }
}

pub(crate) fn write(dir: &Path, name: &str, text: &str) {
    std::fs::create_dir_all(dir).expect("folder");
    std::fs::write(dir.join(name), text).expect("file");
}

fn load_err(base: &Path, adapter: &Path) -> String {
    match Model::load(base, &opts().with_adapter(adapter)) {
        Ok(_) => panic!("{} loaded", adapter.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn adapter_keys_matching_no_node_are_listed() {
    let _g = mlx_lock();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("stray");
    write(
        &d,
        "adapter_config.json",
        r#"{"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 2, "scale": 1.0, "dropout": 0.0}}"#,
    );
    let a = Array::zeros::<f32>(&[64, 2]).unwrap();
    let b = Array::zeros::<f32>(&[2, 64]).unwrap();
    Array::save_safetensors(
        [
            ("model.layers.0.self_attn.q_proj.lora_a", &a),
            ("model.layers.0.self_attn.q_proj.lora_b", &b),
            ("model.layers.0.attn.qkv.lora_a", &a),
            ("model.layers.0.attn.qkv.lora_b", &b),
            ("model.layers.7.mlp.up_proj.lora_a", &a),
            ("model.layers.7.mlp.up_proj.lora_b", &b),
        ],
        None,
        d.join("adapters.safetensors"),
    )
    .unwrap();
    let e = load_err(&goldens().join("llama/model"), &d);
    assert!(e.contains("adapters.safetensors"), "{e}");
    assert!(e.contains("model.layers.0.attn.qkv"), "{e}");
    assert!(e.contains("model.layers.7.mlp.up_proj"), "{e}");
    assert!(
        !e.contains("match no linear layer of the model: model.layers.0.self_attn.q_proj"),
        "{e}"
    );
}

#[test]
fn a_rank_mismatch_names_the_tensor_and_the_config() {
    let _g = mlx_lock();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("rank");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(
        case_dir("lora").join("adapters.safetensors"),
        d.join("adapters.safetensors"),
    )
    .unwrap();
    // The weights have rank 4; the config says 8.
    write(
        &d,
        "adapter_config.json",
        r#"{"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 8, "scale": 10.0, "dropout": 0.0}}"#,
    );
    let e = load_err(&goldens().join("llama/model"), &d);
    assert!(e.contains("adapters.safetensors"), "{e}");
    assert!(
        e.contains("lora_a: rank 4 does not match lora_parameters.rank 8"),
        "{e}"
    );
    // A missing scale is named with mlx-lm's hint.
    write(
        &d,
        "adapter_config.json",
        r#"{"num_layers": 2, "lora_parameters": {"rank": 4, "alpha": 16}}"#,
    );
    let e = load_err(&goldens().join("llama/model"), &d);
    assert!(e.contains("adapter_config.json: lora_parameters.scale: missing (mlx-lm's config uses 'scale', not 'alpha')"), "{e}");
    // A DoRA config over LoRA weights.
    write(
        &d,
        "adapter_config.json",
        r#"{"fine_tune_type": "dora", "num_layers": 2, "lora_parameters": {"rank": 4, "scale": 10.0}}"#,
    );
    let e = load_err(&goldens().join("llama/model"), &d);
    assert!(e.contains(".m: missing"), "{e}");
}

#[test]
fn peft_adapters_load_as_their_mlx_lm_equivalent() {
    let _g = mlx_lock();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("peft");
    let trained: IndexMap<String, Array> =
        Array::load_safetensors(case_dir("lora").join("adapters.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    // The same adapter in PEFT's layout: A = aᵀ, B = bᵀ, scale = alpha / r.
    let mut peft: Vec<(String, Array)> = Vec::new();
    for (k, v) in &trained {
        let (module, leaf) = k.rsplit_once('.').unwrap();
        let name = match leaf {
            "lora_a" => format!("base_model.model.{module}.lora_A.weight"),
            _ => format!("base_model.model.{module}.lora_B.weight"),
        };
        peft.push((name, v.t()));
    }
    std::fs::create_dir_all(&d).unwrap();
    Array::save_safetensors(
        peft.iter().map(|(k, v)| (k.as_str(), v)),
        None,
        d.join("adapter_model.safetensors"),
    )
    .unwrap();
    write(
        &d,
        "adapter_config.json",
        r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 40, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}"#,
    );
    let g = golden("lora");
    let model = load_with(&base_of("lora"), &d);
    let logits = model.forward(&g["probe"], None).unwrap();
    assert_close("peft", &logits, &g["adapted_logits"], Tolerance::F32);
}

#[test]
fn batches_are_padded_as_mlx_lm_pads_them() {
    // Every golden batch came from mlx-lm's iterate_batches: its width is
    // one more than the longest row rounded up to 32.
    let _g = mlx_lock();
    let g = golden("lora");
    for k in 0..20 {
        let b = &g[&format!("batch.{k}")];
        let l = g[&format!("lengths.{k}")].as_slice::<i32>().to_vec();
        let longest = l.chunks(2).map(|r| r[1] as usize).max().expect("rows");
        assert_eq!(
            tune::data::padded_length(longest, 2048),
            b.shape()[1] as usize,
            "batch {k}"
        );
    }
    let ex = [(vec![5u32; 5], 2usize), (vec![7u32; 40], 0)];
    let refs: Vec<_> = ex.iter().collect();
    let batch = tune::data::make_batch(&refs, 2048).expect("batch");
    assert_eq!(batch.tokens.shape(), &[2, 65]);
    assert_eq!(batch.lengths.as_slice::<i32>(), &[2, 5, 0, 40]);
    let short = tune::data::make_batch(&refs, 16).expect("batch");
    assert_eq!(short.tokens.shape(), &[2, 16]);
    assert_eq!(short.lengths.as_slice::<i32>(), &[2, 5, 0, 16]);
}

#[test]
fn a_new_dora_adapter_starts_from_mlx_lm_magnitudes() {
    // DoRA's m is the base rows' norms: equal to what mlx-lm computed for
    // the golden's initial adapter (lora_a draws follow mlx-lm's module
    // order, which a spec does not have; the goldens load mlx-lm's init).
    let _g = mlx_lock();
    let config = AdapterConfig {
        kind: AdapterKind::Dora,
        rank: 4,
        scale: 10.0,
        num_layers: 2,
        ..AdapterConfig::default()
    };
    let mut o = opts();
    o.adapter = Some(AdapterSource::New { config, seed: 0 });
    let model = Model::load(&goldens().join("llama/model"), &o).expect("load");
    let init: IndexMap<String, Array> =
        Array::load_safetensors(case_dir("dora").join("init.safetensors"))
            .expect("init")
            .into_iter()
            .collect();
    let a = model.adapter.as_ref().expect("adapter");
    let names = a.param_names();
    assert_eq!(names.len(), init.len());
    for (n, p) in names.iter().zip(a.params()) {
        let r = init.get(n).unwrap_or_else(|| panic!("mlx-lm has no {n}"));
        assert_eq!(p.shape(), r.shape(), "{n}");
        if n.ends_with(".m") {
            assert_close(n, &p, r, Tolerance::F32);
        }
    }
}

/// Every golden model takes a new adapter on its linear layers, trains
/// through MLX autodiff (attention variants, MoE routing, recurrences), and
/// its saved adapter reloads to the same logits.
#[test]
fn every_golden_spec_takes_trains_and_reloads_an_adapter() {
    let _g = mlx_lock();
    let tmp = tempfile::tempdir().expect("tmp");
    let mut failures = Vec::new();
    let mut cases: Vec<PathBuf> = std::fs::read_dir(goldens())
        .expect("goldens")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("model/config.json").exists())
        .collect();
    cases.sort();
    assert!(cases.len() > 50, "{} golden models", cases.len());
    let probe = Array::from_slice(&[1i32, 2, 3, 4, 5, 6], &[1, 6]);
    for case in cases {
        let name = case
            .file_name()
            .expect("name")
            .to_string_lossy()
            .to_string();
        let run = || -> Result<(), String> {
            let config = AdapterConfig {
                rank: 2,
                num_layers: -1,
                ..AdapterConfig::default()
            };
            let mut o = opts();
            o.adapter = Some(AdapterSource::New { config, seed: 1 });
            let model = Model::load(&case.join("model"), &o).map_err(|e| format!("load: {e}"))?;
            let a = model.adapter.as_ref().ok_or("no adapter")?;
            let base = model.forward(&probe, None).map_err(|e| e.to_string())?;
            let batch = Batch {
                tokens: probe.clone(),
                lengths: Array::from_slice(&[0i32, 6], &[1, 2]),
            };
            let mut t = Trainer::new(&model, Optimizer::adam(), Schedule::Constant(1e-2), 1)
                .map_err(|e| e.to_string())?;
            let (loss, _) = t.step(&batch).map_err(|e| format!("step: {e}"))?;
            if !loss.is_finite() {
                return Err(format!("loss {loss}"));
            }
            let trained = model.forward(&probe, None).map_err(|e| e.to_string())?;
            if compare(&trained, &base).map_err(|e| e.to_string())?.max_abs == 0.0 {
                return Err("a training step left the logits unchanged".into());
            }
            let d = tmp.path().join(&name);
            a.save(&d, &serde_json::Value::Null)
                .map_err(|e| e.to_string())?;
            let re = Model::load(&case.join("model"), &opts().with_adapter(&d))
                .map_err(|e| format!("reload: {e}"))?;
            let again = re.forward(&probe, None).map_err(|e| e.to_string())?;
            let s = compare(&again, &trained).map_err(|e| e.to_string())?;
            if s.max_abs != 0.0 {
                return Err(format!("reloaded logits differ by {:.2e}", s.max_abs));
            }
            Ok(())
        };
        if let Err(e) = run() {
            failures.push(format!("{name}: {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn dropout_applies_while_training_only() {
    let _g = mlx_lock();
    let tmp = tempfile::tempdir().expect("tmp");
    let g = golden("lora");
    let d = init_adapter("lora", tmp.path());
    // The trained adapter (lora_b non-zero) with dropout 0.5.
    std::fs::copy(
        case_dir("lora").join("adapters.safetensors"),
        d.join("adapters.safetensors"),
    )
    .expect("copy");
    write(
        &d,
        "adapter_config.json",
        r#"{"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.5}}"#,
    );
    let with = load_with(&base_of("lora"), &d);
    let without = load_with(&base_of("lora"), &case_dir("lora"));
    let batch = Batch {
        tokens: g["batch.0"].clone(),
        lengths: g["lengths.0"].clone(),
    };
    let (opt, schedule) = optimizer_of(&meta("lora"));
    let t_with = Trainer::new(&with, opt.clone(), schedule.clone(), 1).expect("trainer");
    let t_without = Trainer::new(&without, opt, schedule, 1).expect("trainer");
    // Evaluation: no dropout, the same loss.
    assert_eq!(
        t_with.loss(&batch).expect("loss"),
        t_without.loss(&batch).expect("loss")
    );
    // A training step drops inputs of the adapters: another loss.
    let mut t_with = t_with;
    let mut t_without = t_without;
    let (a, _) = t_with.step(&batch).expect("step");
    let (b, _) = t_without.step(&batch).expect("step");
    assert!((a - b).abs() > 1e-4, "dropout changed nothing: {a} vs {b}");
}

#[test]
fn a_tensor_split_by_the_rules_takes_no_adapter() {
    // granitemoe in Hugging Face's layout: the experts' fused input_linear
    // [E, 2F, D] is split by a rule into gate and up; an adapter of the
    // whole module fits neither part, so it takes none (the router, the
    // experts' output_linear and attention do).
    let _g = mlx_lock();
    let base = goldens().join("granitemoe_hf/model");
    let config = AdapterConfig {
        rank: 2,
        num_layers: -1,
        ..AdapterConfig::default()
    };
    let mut o = opts();
    o.adapter = Some(AdapterSource::New { config, seed: 0 });
    let model = Model::load(&base, &o).expect("load");
    let modules: Vec<String> = model
        .adapter
        .as_ref()
        .expect("adapter")
        .slots
        .iter()
        .map(|s| s.module.clone())
        .collect();
    assert!(
        modules
            .iter()
            .any(|m| m.ends_with("block_sparse_moe.output_linear")),
        "{modules:?}"
    );
    assert!(
        modules
            .iter()
            .any(|m| m.ends_with("block_sparse_moe.router.layer")),
        "{modules:?}"
    );
    assert!(
        !modules.iter().any(|m| m.contains("input_linear")),
        "{modules:?}"
    );
    // An adapter naming it is refused, with the reason.
    let tmp = tempfile::tempdir().expect("tmp");
    let d = tmp.path().join("split");
    write(
        &d,
        "adapter_config.json",
        r#"{"num_layers": 2, "lora_parameters": {"rank": 2, "scale": 1.0}}"#,
    );
    let a = Array::zeros::<f32>(&[4, 2, 64]).expect("a");
    let b = Array::zeros::<f32>(&[4, 64, 2]).expect("b");
    Array::save_safetensors(
        [
            ("model.layers.0.block_sparse_moe.input_linear.lora_a", &a),
            ("model.layers.0.block_sparse_moe.input_linear.lora_b", &b),
        ],
        None,
        d.join("adapters.safetensors"),
    )
    .expect("save");
    let e = load_err(&base, &d);
    assert!(
        e.contains("model.layers.0.block_sparse_moe.input_linear"),
        "{e}"
    );
    assert!(
        e.contains("split into several layers takes no adapter"),
        "{e}"
    );
}

/// A rotated (Hadamard-packed) linear layer takes a LoRA adapter on its
/// unrotated input, and no DoRA; fusing into it is a named error, not a
/// silently wrong weight.
#[test]
fn rotated_weights_take_lora_but_are_not_fused_into() {
    let _g = mlx_lock();
    let base = goldens().join("prism_hadamard_qwen35").join("model");
    let with = |dora: bool| {
        let mut o = opts();
        let config = AdapterConfig {
            rank: 2,
            num_layers: -1,
            kind: if dora {
                AdapterKind::Dora
            } else {
                AdapterKind::Lora
            },
            ..AdapterConfig::default()
        };
        o.adapter = Some(AdapterSource::New { config, seed: 1 });
        Model::load(&base, &o)
    };
    let e = with(true).expect_err("no DoRA on a rotated weight");
    assert!(e.to_string().contains("stored rotated"), "{e}");
    let model = with(false).expect("LoRA on rotated weights");
    let a = model.adapter.as_ref().expect("adapter");
    let tmp = tempfile::tempdir().unwrap();
    let e = adapter::fuse::fuse_into(&base, a, &tmp.path().join("fused"), false)
        .expect_err("no fuse into a rotated weight");
    assert!(
        e.to_string().contains("is stored rotated") && e.to_string().contains("in_proj_qkv"),
        "{e}"
    );
}
