//! The vision-language golden of LFM2-VL (`goldens/vlm/lfm2_vl`, made by
//! mlx-vlm with `porting-tools/python/make_vlm_golden.py --case lfm2_vl`):
//! the SigLIP2-NaFlex tower's features for two images of different grids
//! (the position table grown to one, shrunk with antialiasing to the
//! other; attention per image), pixel unshuffle and the projector, the
//! logits of an lfm2 prompt with the images spliced in, greedy decoding
//! after a cached prefill, and the token-budget image processor against
//! mlx-vlm's.
use std::collections::HashMap;

use lmspec::engine::Model;
use lmspec::lm::image_processor::{ImageProcessor, RgbImage};
use lmspec::lm::vision::{Grid, VisionModel};
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::Array;

use crate::support::{goldens, library, mlx_lock, opts};
use crate::vlm_support::{
    assert_close, assert_greedy_steps, assert_segments_matter, assert_tower_diff_passes,
    first_divergence_with_edit, golden_images, grids, ints,
};

const CASE: &str = "lfm2_vl";

fn golden() -> HashMap<String, Array> {
    let file = goldens().join("vlm").join(CASE).join("golden.safetensors");
    Array::load_safetensors(&file).expect("golden tensors")
}

fn model_dir() -> std::path::PathBuf {
    goldens().join("vlm").join(CASE).join("model")
}

/// Features, prompt logits, the cached prefill and 16 greedy steps against
/// the golden; each image alone gives its own rows; without the per-image
/// segments the features differ.
#[test]
fn lfm2_vl() {
    let _guard = mlx_lock();
    let g = golden();
    let dir = model_dir();
    let text = Model::load(&dir, &opts(&library(), None)).expect("text model");
    let vm = VisionModel::load(&dir, &opts(&library(), None), &text).expect("tower");
    let grid = grids(&g["image_grid_thw"]);
    assert_eq!(grid.len(), 2);
    assert_eq!(vm.merge, 2);
    let ids = ints(&g["input_ids"]);
    let patches: i64 = grid.iter().map(Grid::patches).sum();
    let image_tokens = ids.iter().filter(|&&t| t == vm.image_token).count() as i64;
    assert_eq!(image_tokens, patches / 4, "one <image> per 2 x 2 window");

    let pixels = &g["pixel_values"];
    let features = vm.image_features(pixels, &grid).expect("features");
    assert_close("vision features", &features, &g["vision_features"]);

    // Each image alone gives its own rows of the features.
    let (first, rows) = (grid[0].patches() as i32, grid[0].tokens(2) as i32);
    let alone = vm
        .image_features(&pixels.try_index(..first).expect("rows"), &grid[..1])
        .expect("first image");
    let want = g["vision_features"].try_index(..rows).expect("rows");
    assert_close("first image alone", &alone, &want);
    let alone = vm
        .image_features(&pixels.try_index(first..).expect("rows"), &grid[1..])
        .expect("second image");
    let want = g["vision_features"].try_index(rows..).expect("rows");
    assert_close("second image alone", &alone, &want);
    // Without the per-image segments the images see each other.
    assert_segments_matter(&vm, pixels, &grid, &g["vision_features"]);

    // The whole prompt into a fresh cache.
    let mut cache = text.new_cache();
    let logits = vm
        .prefill(&text, &ids, Some(pixels), &grid, &mut cache)
        .expect("prefill");
    assert_close("prompt logits", &logits, &g["logits"]);

    // Greedy decoding after the cached prefill.
    assert_greedy_steps(&text, &mut cache, &logits, &g);

    // A prompt one image token short is an error, not a panic.
    let mut short = ids.clone();
    let at = short
        .iter()
        .position(|&t| t == vm.image_token)
        .expect("an image token");
    short.remove(at);
    let mut cache = text.new_cache();
    assert!(vm
        .prefill(&text, &short, Some(pixels), &grid, &mut cache)
        .is_err());
}

/// The generation path: the golden prompt with each image's
/// `<|image_start|>`, tokens and `<|image_end|>` collapsed to one `<image>`
/// (as the chat template writes it) expands back to the golden prompt, and
/// generation with the images gives mlx-vlm's greedy tokens.
#[test]
fn lfm2_vl_generation_with_images_continues_as_mlx_vlm() {
    use lmspec::lm::generate::GenerateParams;
    use lmspec::lm::LanguageModel;

    let _guard = mlx_lock();
    let g = golden();
    let lm = LanguageModel::load(&model_dir(), &opts(&library(), None)).expect("load");
    let vision = lm.vision().expect("a tower");
    let e = vision.expansion.as_ref().expect("an expansion");
    assert_eq!((e.before.len(), e.after.len()), (1, 1));
    let (start, end) = (e.before[0], e.after[0]);
    let grid = grids(&g["image_grid_thw"]);
    let ids: Vec<u32> = ints(&g["input_ids"]).iter().map(|&t| t as u32).collect();
    let image = vision.image_token as u32;
    let mut prompt = Vec::new();
    let mut k = 0;
    while k < ids.len() {
        if ids[k] != start {
            prompt.push(ids[k]);
            k += 1;
            continue;
        }
        k += 1;
        while ids[k] == image {
            k += 1;
        }
        assert_eq!(ids[k], end, "the image ends with <|image_end|>");
        prompt.push(e.placeholder);
        k += 1;
    }
    assert_eq!(
        prompt.iter().filter(|&&t| t == e.placeholder).count(),
        grid.len()
    );
    assert_eq!(
        vision.expand_placeholders(&prompt, &grid).expect("expand"),
        ids,
        "the expansion gives the golden prompt back"
    );
    let params = GenerateParams {
        max_tokens: 16,
        ..GenerateParams::default()
    };
    let images = golden_images(&g);
    let out = lm
        .generate_with_images(&prompt, &images, &params, None, None, &mut |_| {})
        .expect("generate");
    let want: Vec<u32> = ints(&g["greedy_tokens"])
        .iter()
        .map(|&t| t as u32)
        .collect();
    assert_eq!(out.tokens, want);
}

/// The token-budget processor (smart resize to multiples of patch x
/// downsample within the token budget, bicubic, mean and std 0.5, patches
/// in merge-window order flattened channels last) against mlx-vlm's
/// `Lfm2VlNumpyImageProcessor` on the five test images: grids and token
/// counts equal, pixel values within 1e-2.
#[test]
fn lfm2_vl_image_processing_matches_the_python_processor() {
    let _guard = mlx_lock();
    let case = goldens().join("vlm").join(CASE);
    let dir = case.join("model");
    let text = Model::load(&dir, &opts(&library(), None)).expect("text model");
    let vm = VisionModel::load(&dir, &opts(&library(), None), &text).expect("tower");
    let proc = vm.processor.as_ref().expect("a processor");
    assert_eq!(
        (proc.patch_size, proc.merge_size, proc.channels_last),
        (4, 2, true)
    );
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
        assert_eq!(got.grid.tokens(vm.merge), grid[1] * grid[2] / 4, "{name}");
        let wv = want[&format!("{name}.pixel_values")].as_slice::<f32>();
        assert_eq!(wv.len(), got.pixels.len(), "{name}: size");
        let max = got
            .pixels
            .iter()
            .zip(wv)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("{name}: grid {grid:?}, max abs diff {max:.3e}");
        assert!(max <= 1e-2, "{name}: max abs diff {max}");
        worst = worst.max(max);
    }
    eprintln!("worst max abs diff {worst:.3e}");
}

/// With `do_image_splitting` (the released checkpoints' setting) an image
/// small enough for one view is processed as without; one that would be
/// split into tiles is a named error. Bad budgets name their field.
#[test]
fn lfm2_vl_processor_refuses_tiling_and_bad_budgets() {
    let file = std::path::Path::new("preprocessor_config.json");
    let base = serde_json::json!({"encoder_patch_size": 4, "downsample_factor": 2,
        "min_image_tokens": 4, "max_image_tokens": 16, "do_image_splitting": true,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_resize": false});
    let p = ImageProcessor::from_json(&base, file).expect("token budget");
    assert!(p.do_resize, "the budget processor always resizes");
    // 16 tokens of 8 x 8 pixels, twice that with the tolerance: 2048.
    assert_eq!(p.split_above, Some(2048.0));
    let img = RgbImage {
        width: 30,
        height: 20,
        data: vec![128; 30 * 20 * 3],
    };
    let out = p.process(&img).expect("one view");
    // 20 x 30 -> 16 x 32 pixels: a 4 x 8 patch grid, 2 x 4 tokens.
    assert_eq!(out.grid.tokens(2), 8);
    let big = RgbImage {
        width: 64,
        height: 64,
        data: vec![0; 64 * 64 * 3],
    };
    let err = p.process(&big).unwrap_err().to_string();
    assert!(err.contains("do_image_splitting"), "{err}");
    let mut j = base.clone();
    j["do_image_splitting"] = serde_json::json!(false);
    let p = ImageProcessor::from_json(&j, file).expect("no splitting");
    assert_eq!(p.process(&big).expect("resized down").grid.tokens(2), 16);
    let mut j = base.clone();
    j["max_image_tokens"] = serde_json::json!(0);
    let err = ImageProcessor::from_json(&j, file).unwrap_err().to_string();
    assert!(err.contains("max_image_tokens"), "{err}");
    let mut j = base;
    j["min_image_tokens"] = serde_json::json!(32);
    let err = ImageProcessor::from_json(&j, file).unwrap_err().to_string();
    assert!(err.contains("min_pixels"), "{err}");
}

/// `port diff` on the golden matches every node of the tower and the
/// projector; with the position table resized without antialiasing it
/// names `positions`.
#[test]
fn port_diff_names_the_first_divergent_lfm2_vl_node() {
    let _guard = mlx_lock();
    assert_tower_diff_passes(CASE, 12);
    let first = first_divergence_with_edit(
        CASE,
        "lfm2_vl_vision.yaml",
        "antialias: true",
        "antialias: false",
        1,
    );
    assert_eq!(first, "positions");
}

/// The golden checkpoint in Hugging Face's layout
/// (`model.vision_tower.vision_model.*`, `model.multi_modal_projector.*`,
/// `model.language_model.*` with lfm2's own names and the depthwise
/// convolution as `[C, 1, K]`): the specs' weight rules bring it to the
/// same features and logits.
#[test]
fn lfm2_vl_hugging_face_layout_gives_the_same_outputs() {
    let _guard = mlx_lock();
    let g = golden();
    let src = model_dir();
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
    let mut convs = 0;
    for (name, w) in &weights {
        let hf = if let Some(rest) = name.strip_prefix("language_model.model.") {
            format!("model.language_model.{rest}")
        } else if let Some(rest) = name.strip_prefix("vision_tower.") {
            format!("model.vision_tower.vision_model.{rest}")
        } else {
            format!("model.{name}")
        };
        let w = if name.ends_with("conv.conv.weight") {
            convs += 1;
            // MLX [C, K, 1] to PyTorch [C, 1, K].
            w.transpose_axes(&[0, 2, 1]).expect("transpose")
        } else {
            w.clone()
        };
        renamed.push((hf, w));
    }
    assert_eq!(convs, 2, "the golden's two convolution layers");
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
    assert_close("HF features", &features, &g["vision_features"]);
    let ids = ints(&g["input_ids"]);
    let mut cache = text.new_cache();
    let logits = vm
        .prefill(&text, &ids, Some(&g["pixel_values"]), &grid, &mut cache)
        .expect("prefill");
    assert_close("HF logits", &logits, &g["logits"]);
}

/// A chat session with an image: the first turn answers as one
/// `generate_with_images` call on the same prompt; a second, text-only turn
/// reuses the cache (convolution states included) and answers as the whole
/// conversation run from scratch.
#[test]
fn lfm2_vl_chat_session_keeps_its_images_across_turns() {
    crate::vlm_siglip::check_chat(CASE);
}

/// `lmspec generate --image` on the golden: each image's `<image>` becomes
/// its tokens between `<|image_start|>` and `<|image_end|>` (the prompt
/// counts them); an image without a placeholder in a raw prompt is a
/// named error.
#[test]
fn lfm2_vl_generate_takes_images_on_the_command_line() {
    let fixtures = Array::load_safetensors(
        goldens()
            .join("vlm")
            .join(CASE)
            .join("processor.safetensors"),
    )
    .expect("processor tensors");
    // The template's seven text tokens, then each image's tokens and its
    // two markers.
    let mut want = 7;
    for name in ["wide.png", "alpha.png"] {
        let g = ints(&fixtures[&format!("{name}.grid")]);
        want += g[1] * g[2] / 4 + 2;
    }
    let model = format!("goldens/vlm/{CASE}/model");
    let run = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", &model, "--max-tokens", "4"];
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
    assert!(err.contains(&format!("[prompt {want} tokens")), "{err}");
    let out = run(&["--image", wide, "--raw", "-p", "w5 w6"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("1 image(s) given but the prompt has 0 image placeholder(s)"),
        "{err}"
    );
}
