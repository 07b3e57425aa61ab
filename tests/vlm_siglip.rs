//! Vision-language goldens of the SigLIP-tower families (`goldens/vlm/gemma3`,
//! made by mlx-vlm with `porting-tools/python/make_vlm_golden.py --case
//! gemma3`): the tower's features for each image as a batch row, the
//! logits of a prompt with the features spliced in and attention
//! bidirectional within each image's tokens, greedy decoding after a cached
//! prefill (past the sliding window), and the fixed-size image processor
//! against transformers'.

use lmspec::engine::Model;
use lmspec::lm::vision::{image_spans, Expansion, Grid, VisionModel};
use mlx_rs::Array;

use crate::support::{goldens, library, mlx_lock, opts};
use crate::vlm_support::{
    assert_chat_turns, assert_close, assert_greedy_steps, assert_tower_diff_passes, golden,
    golden_images, grids, ints, max_abs,
};

/// Features, prompt logits, the cached prefill and 16 greedy steps against
/// the golden.
fn check_case(case: &str) {
    check_case_attending(case, true);
}

/// As [`check_case`]; with `spans` the golden's attention is bidirectional
/// within the image spans (or the prefix) and a causal-only prompt must
/// differ from it.
pub(crate) fn check_case_attending(case: &str, spans: bool) {
    let _guard = mlx_lock();
    let g = golden(case);
    let dir = goldens().join("vlm").join(case).join("model");
    let text = Model::load(&dir, &opts(&library(), None)).expect("text model");
    let vm = VisionModel::load(&dir, &opts(&library(), None), &text).expect("tower");
    let grid = grids(&g["image_grid_thw"]);
    let ids = ints(&g["input_ids"]);
    let image = vm.image_token;
    // Each image's run of placeholders is as long as its grid's tokens.
    let per_image = ids.iter().filter(|&&t| t == image).count() / grid.len();
    assert_eq!(
        per_image as i64,
        grid[0].tokens(vm.merge),
        "tokens per image"
    );

    let features = vm
        .image_features(&g["pixel_values"], &grid)
        .expect("features");
    assert_close("vision features", &features, &g["vision_features"]);

    // The whole prompt into a fresh cache.
    let mut cache = text.new_cache();
    let logits = vm
        .prefill(&text, &ids, Some(&g["pixel_values"]), &grid, &mut cache)
        .expect("prefill");
    assert_close("prompt logits", &logits, &g["logits"]);

    // The same prompt with causal attention everywhere (no spans) differs:
    // the golden holds the bidirectional image spans.
    let mut inputs = vm
        .prompt_inputs(&ids, Some(&features), &grid)
        .expect("inputs");
    inputs.segments = None;
    let x: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
    let x = Array::from_slice(&x, &[1, x.len() as i32]);
    let (causal, _) = text
        .forward_with_inputs(&x, None, &inputs, &[])
        .expect("causal");
    let gap = max_abs(&causal, &g["logits"]);
    eprintln!("causal-only logits differ by {gap:.3e}");
    if spans {
        assert!(gap > 1e-2, "the image spans changed nothing ({gap})");
    } else {
        assert!(gap < 1e-4, "a causal model's logits moved by {gap}");
    }

    // Greedy decoding after the cached prefill.
    assert_greedy_steps(&text, &mut cache, &logits, &g);
}

#[test]
fn gemma3() {
    check_case("gemma3");
}

/// PaliGemma: one image of 64 tokens (no pooling), a linear projector, the
/// whole prompt attending bidirectionally (a prefix-LM), tied embeddings.
#[test]
fn paligemma() {
    check_case("paligemma");
}

/// PaliGemma 2: the same with the gemma2 text model (sandwich norms,
/// query_pre_attn_scalar, capped attention scores and logits).
#[test]
fn paligemma2() {
    check_case("paligemma2");
}

#[test]
fn paligemma2_generation_with_images_continues_as_mlx_vlm() {
    check_generation("paligemma2");
}

#[test]
fn image_spans_number_each_run_of_image_tokens() {
    assert_eq!(
        image_spans(&[1, 9, 9, 2, 9, 3, 9, 9, 9], 9),
        [-1, 0, 0, -1, 1, -1, 2, 2, 2]
    );
    assert_eq!(image_spans(&[1, 2], 9), [-1, -1]);
}

/// The generation path: the prompt with one placeholder per image (as the
/// chat template writes it) expanded, prefilled with the images, then
/// mlx-vlm's greedy tokens; images of different sizes for a fixed-size
/// tower are an error.
#[test]
fn gemma3_generation_with_images_continues_as_mlx_vlm() {
    check_generation("gemma3");
}

/// PaliGemma's prompt is prefilled whole (its last token inside the
/// bidirectional prefix) and the cache rewound by that token, which
/// generation then feeds: mlx-vlm's greedy tokens.
#[test]
fn paligemma_generation_with_images_continues_as_mlx_vlm() {
    check_generation("paligemma");
}

/// `ids` with each image's run of `image` tokens, and the expansion's
/// tokens around it, replaced by one placeholder.
fn collapse(ids: &[u32], image: u32, expansion: Option<&Expansion>) -> Vec<u32> {
    let (placeholder, before, after) = match expansion {
        Some(e) => (e.placeholder, e.before.as_slice(), e.after.as_slice()),
        None => (image, &[][..], &[][..]),
    };
    let mut out = Vec::new();
    let mut k = 0;
    while k < ids.len() {
        let run_start = k + before.len();
        let is_image = ids[k..].starts_with(before) && ids.get(run_start) == Some(&image);
        if !is_image {
            out.push(ids[k]);
            k += 1;
            continue;
        }
        let mut end = run_start;
        while ids.get(end) == Some(&image) {
            end += 1;
        }
        assert!(
            ids[end..].starts_with(after),
            "no {after:?} after the image at {k}"
        );
        out.push(placeholder);
        k = end + after.len();
    }
    out
}

pub(crate) fn check_generation(case: &str) {
    use lmspec::lm::generate::GenerateParams;
    use lmspec::lm::image_processor::ProcessedImage;
    use lmspec::lm::LanguageModel;

    let _guard = mlx_lock();
    let g = golden(case);
    let dir = goldens().join("vlm").join(case).join("model");
    let lm = LanguageModel::load(&dir, &opts(&library(), None)).expect("load");
    let vision = lm.vision().expect("a tower");
    let grid = grids(&g["image_grid_thw"]);
    let images = golden_images(&g);
    // The golden prompt as a chat template writes it: each image's tokens
    // (with what the spec's expansion puts around them) back to one
    // placeholder.
    let image = vision.image_token as u32;
    let ids: Vec<u32> = ints(&g["input_ids"]).iter().map(|&t| t as u32).collect();
    let prompt = collapse(&ids, image, vision.expansion.as_ref());
    assert_eq!(
        vision.expand_placeholders(&prompt, &grid).expect("expand"),
        ids,
        "the expansion gives the golden prompt back"
    );
    let params = GenerateParams {
        max_tokens: 16,
        ..GenerateParams::default()
    };
    let out = lm
        .generate_with_images(&prompt, &images, &params, None, None, &mut |_| {})
        .expect("generate");
    let want: Vec<u32> = ints(&g["greedy_tokens"])
        .iter()
        .map(|&t| t as u32)
        .collect();
    assert_eq!(out.tokens, want);
    if images.len() < 2 {
        return;
    }

    // A second image of another grid: refused by name, no panic.
    let width = g["pixel_values"].shape()[1] as usize;
    let small = ProcessedImage {
        pixels: images[1].pixels[..16 * width].to_vec(),
        grid: Grid { t: 1, h: 4, w: 4 },
        video: false,
    };
    let err = lm
        .generate_with_images(
            &prompt,
            &[images[0].clone(), small],
            &params,
            None,
            None,
            &mut |_| {},
        )
        .expect_err("mixed grids")
        .to_string();
    assert!(err.contains("share one patch grid"), "{err}");
}

/// The fixed-size processor (resize to `size`, rescale, normalise, patches
/// row-major) against transformers' `Gemma3ImageProcessorPil` (bilinear)
/// and `SiglipImageProcessorPil` (bicubic, PaliGemma's) on the five test
/// images: the grids equal, every image within 1e-2.
#[test]
fn gemma3_image_processing_matches_the_python_processor() {
    check_processor("gemma3", 16);
}

#[test]
fn paligemma_image_processing_matches_the_python_processor() {
    check_processor("paligemma", 64);
}

pub(crate) fn check_processor(case_name: &str, tokens: i64) {
    let _guard = mlx_lock();
    let case = goldens().join("vlm").join(case_name);
    let dir = case.join("model");
    let text = Model::load(&dir, &opts(&library(), None)).expect("text model");
    let vm = VisionModel::load(&dir, &opts(&library(), None), &text).expect("tower");
    let proc = vm.processor.as_ref().expect("a processor");
    assert_eq!(proc.fixed_size, Some((32, 32)));
    let want =
        Array::load_safetensors(case.join("processor.safetensors")).expect("processor tensors");
    let mut worst = 0f32;
    for name in ["wide.png", "tall.jpg", "alpha.png", "gray.png", "photo.jpg"] {
        let path = goldens().join("vlm").join("images").join(name);
        let got = proc.process_file(&path).expect("process");
        let grid = ints(&want[&format!("{name}.grid")]);
        assert_eq!(
            vec![got.grid.t, got.grid.h, got.grid.w],
            grid,
            "{name}: grid"
        );
        assert_eq!(got.grid.tokens(vm.merge), tokens, "{name}: tokens");
        let wv = want[&format!("{name}.pixel_values")].as_slice::<f32>();
        assert_eq!(wv.len(), got.pixels.len(), "{name}: size");
        let max = got
            .pixels
            .iter()
            .zip(wv)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("{name}: grid {grid:?}, max abs diff {max:.3e}");
        assert!(max <= 1e-2, "{name}: max abs diff {max} above 1e-2");
        worst = worst.max(max);
    }
    eprintln!("worst max abs diff {worst:.3e}");
}

/// A fixed-size processor config that asks for pan-and-scan crops, or whose
/// size is not a positive number of pixels, is an error naming the field.
#[test]
fn fixed_size_processor_configs_are_checked() {
    use lmspec::lm::image_processor::ImageProcessor;

    let base = serde_json::json!({"size": {"height": 32, "width": 32},
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]});
    let file = std::path::Path::new("preprocessor_config.json");
    let p = ImageProcessor::from_json(&base, file).expect("fixed");
    assert_eq!(
        (p.fixed_size, p.patch_size, p.merge_size),
        (Some((32, 32)), 0, 1)
    );
    let mut j = base.clone();
    j["do_pan_and_scan"] = serde_json::json!(true);
    let err = ImageProcessor::from_json(&j, file).unwrap_err().to_string();
    assert!(err.contains("do_pan_and_scan"), "{err}");
    let mut j = base.clone();
    j["size"]["width"] = serde_json::json!(0);
    let err = ImageProcessor::from_json(&j, file).unwrap_err().to_string();
    assert!(err.contains("size.width"), "{err}");
    // Without a patch side (none given, no tower) processing is refused.
    let img = lmspec::lm::image_processor::RgbImage {
        width: 4,
        height: 4,
        data: vec![0; 48],
    };
    let err = p.process(&img).unwrap_err().to_string();
    assert!(err.contains("no patch_size"), "{err}");
}

/// `lmspec generate --image` on the Gemma 3 golden: the chat template
/// writes `<start_of_image>` per image, which the spec's expansion turns
/// into a blank line, itself, 16 image tokens, `<end_of_image>` and a blank
/// line (2 x 20 of the 47 prompt tokens); a count mismatch is an error.
#[test]
fn gemma3_generate_takes_images_on_the_command_line() {
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            "goldens/vlm/gemma3/model",
            "--max-tokens",
            "4",
        ];
        args.extend_from_slice(extra);
        std::process::Command::new(env!("CARGO_BIN_EXE_lmspec"))
            .args(&args)
            .current_dir(crate::support::root())
            .output()
            .expect("lmspec runs")
    };
    let (wide, alpha) = (
        "goldens/vlm/images/wide.png",
        "goldens/vlm/images/alpha.png",
    );
    let out = run(&["--image", wide, "--image", alpha, "-p", "w5 w6"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("[prompt 47 tokens"), "{err}");
    let out = run(&[
        "--image",
        wide,
        "--image",
        alpha,
        "--raw",
        "-p",
        "w5 <start_of_image> w6",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("2 image(s) given but the prompt has 1 image placeholder(s)"),
        "{err}"
    );
}

/// A text spec whose image expansion does not fit the tokenizer is an error
/// at load, naming the key.
#[test]
fn image_expansions_that_do_not_fit_are_named_errors() {
    use lmspec::lm::LanguageModel;

    let _guard = mlx_lock();
    let dir = goldens().join("vlm").join("gemma3").join("model");
    let spec = crate::support::root().join("specs/models/gemma3.yaml");
    let text = std::fs::read_to_string(spec).expect("spec");
    let tmp = tempfile::tempdir().expect("tmp");
    for (from, to, says) in [
        (
            "{image}<end_of_image>",
            "<end_of_image>",
            "must hold {image} once",
        ),
        (
            "value: \"<start_of_image>\"}",
            "value: \"<no_such_token>\"}",
            "not a token of the vocabulary",
        ),
    ] {
        assert!(text.contains(from), "{from}");
        // A copy of the library with the changed text spec.
        let specs = tmp.path().join("specs");
        copy_dir(&crate::support::root().join("specs"), &specs);
        std::fs::write(specs.join("models/gemma3.yaml"), text.replace(from, to)).expect("write");
        let lib = lmspec::engine::SpecLibrary::open(&specs).expect("library");
        let err = LanguageModel::load(&dir, &opts(&lib, None))
            .expect_err("refused")
            .to_string();
        assert!(err.contains(says), "{err}");
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let path = entry.expect("entry").path();
        let dest = to.join(path.file_name().expect("name"));
        if path.is_dir() {
            copy_dir(&path, &dest);
        } else {
            std::fs::copy(&path, &dest).expect("copy");
        }
    }
}

/// `port diff` on the Gemma 3 golden compares the SigLIP tower node by
/// node; with the MLP's tanh GELU swapped for the exact one it names
/// `layers.0.act`.
#[test]
fn port_diff_names_the_first_divergent_siglip_node() {
    use lmspec::port::diff::diff_tower;

    let _guard = mlx_lock();
    assert_tower_diff_passes("gemma3", 14);
    let golden = goldens().join("vlm").join("gemma3");
    let model = golden.join("model");

    let root = crate::support::root().join("specs/models");
    let tower = std::fs::read_to_string(root.join("gemma3_vision.yaml")).expect("spec");
    let siglip = std::fs::read_to_string(root.join("siglip_vision.yaml")).expect("spec");
    assert!(siglip.contains("fn: gelu_approx"));
    let dir = tempfile::tempdir().expect("tmp");
    // The tower spec with its parent beside it, the parent's GELU changed.
    assert!(tower.contains("extends: siglip_vision\n"));
    std::fs::write(
        dir.path().join("gemma3_vision.yaml"),
        tower.replace(
            "extends: siglip_vision\n",
            "extends: ./siglip_vision.yaml\n",
        ),
    )
    .expect("write");
    std::fs::write(
        dir.path().join("siglip_vision.yaml"),
        siglip.replace("fn: gelu_approx", "fn: gelu"),
    )
    .expect("write");
    let mut o = opts(&library(), None);
    o.spec = Some(dir.path().join("gemma3_vision.yaml").display().to_string());
    let report = diff_tower(&model, &golden, &o, None).expect("diff");
    let first = report.first_failure().expect("a divergence");
    assert_eq!(first.name, "layers.0.act", "{}", report.table());
}

/// A chat session with an image: the first turn answers as one
/// `generate_with_images` call on the same prompt; a second, text-only turn
/// reuses the cache and answers as the whole conversation run from scratch.
#[test]
fn gemma3_chat_session_keeps_its_images_across_turns() {
    check_chat("gemma3");
}

/// PaliGemma in a chat session: the second turn reuses the cache (its
/// answer is not compared: see `check_chat`).
#[test]
fn paligemma_chat_session_runs_a_second_turn_from_the_cache() {
    check_chat("paligemma");
}

pub(crate) fn check_chat(case: &str) {
    use lmspec::lm::LanguageModel;

    let _guard = mlx_lock();
    let dir = goldens().join("vlm").join(case).join("model");
    let lm = LanguageModel::load(&dir, &opts(&library(), None)).expect("load");
    let images = lm
        .load_images(&[goldens().join("vlm").join("images").join("alpha.png")])
        .expect("image");
    // The first turn's 20 image tokens (Gemma 3) or 64 (PaliGemma) are not
    // fed again. A prefix-LM's second turn attends causally to what the
    // first left in the cache, while a fresh run sees the whole
    // conversation as one prefix: PaliGemma's answers may differ; the turn
    // must still run.
    assert_chat_turns(&lm, images, "image", 20, case != "paligemma");
}

/// The golden checkpoints in Hugging Face's newer layout (everything under
/// `model.`: `model.language_model`, `model.vision_tower`,
/// `model.multi_modal_projector`; the patch convolution as `[out, C, P, P]`;
/// a stored `lm_head`): the spec's weight rules bring them to the same
/// features and logits.
#[test]
fn hugging_face_layouts_give_the_same_outputs() {
    for case in ["gemma3", "paligemma", "paligemma2"] {
        let _guard = mlx_lock();
        let g = golden(case);
        let src = goldens().join("vlm").join(case).join("model");
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path();
        for f in [
            "config.json",
            "preprocessor_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            std::fs::copy(src.join(f), dir.join(f)).expect("copy");
        }
        let weights = Array::load_safetensors(src.join("model.safetensors")).expect("weights");
        let mut renamed: Vec<(String, Array)> = Vec::new();
        for (name, w) in &weights {
            let hf = if let Some(rest) = name.strip_prefix("language_model.model.") {
                format!("model.language_model.{rest}")
            } else if let Some(rest) = name.strip_prefix("language_model.") {
                rest.to_string()
            } else {
                format!("model.{name}")
            };
            let w = if name.ends_with("patch_embedding.weight") {
                // MLX [out, P, P, C] to PyTorch [out, C, P, P].
                w.transpose_axes(&[0, 3, 1, 2]).expect("transpose")
            } else {
                w.clone()
            };
            renamed.push((hf, w));
        }
        if case.starts_with("paligemma") {
            let table = &weights["language_model.model.embed_tokens.weight"];
            renamed.push(("lm_head.weight".into(), table.clone()));
        }
        Array::save_safetensors(
            renamed.iter().map(|(n, w)| (n.as_str(), w)),
            None,
            dir.join("model.safetensors"),
        )
        .expect("save");
        let text = Model::load(dir, &opts(&library(), None)).expect("text model");
        let vm = VisionModel::load(dir, &opts(&library(), None), &text).expect("tower");
        let grid = grids(&g["image_grid_thw"]);
        let features = vm
            .image_features(&g["pixel_values"], &grid)
            .expect("features");
        assert_close(
            &format!("{case} HF features"),
            &features,
            &g["vision_features"],
        );
        let ids = ints(&g["input_ids"]);
        let mut cache = text.new_cache();
        let logits = vm
            .prefill(&text, &ids, Some(&g["pixel_values"]), &grid, &mut cache)
            .expect("prefill");
        assert_close(&format!("{case} HF logits"), &logits, &g["logits"]);
    }
}

/// A fixed-size processor whose size does not give the tower's patch grid
/// is refused at load, naming the file.
#[test]
fn a_processor_size_that_misses_the_tower_grid_is_an_error() {
    let _guard = mlx_lock();
    let src = goldens().join("vlm").join("gemma3").join("model");
    let tmp = tempfile::tempdir().expect("tmp");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(src.join(f), tmp.path().join(f)).expect("copy");
    }
    let text = std::fs::read_to_string(src.join("preprocessor_config.json")).expect("read");
    let mut j: serde_json::Value = serde_json::from_str(&text).expect("json");
    j["size"] = serde_json::json!({"height": 48, "width": 48});
    std::fs::write(
        tmp.path().join("preprocessor_config.json"),
        serde_json::to_string(&j).expect("json"),
    )
    .expect("write");
    let model = Model::load(tmp.path(), &opts(&library(), None)).expect("text model");
    let err = VisionModel::load(tmp.path(), &opts(&library(), None), &model)
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains("preprocessor_config.json") && err.contains("8x8 patches"),
        "{err}"
    );
}
