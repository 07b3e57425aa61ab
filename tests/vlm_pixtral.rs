//! Vision-language goldens of the Pixtral-tower families
//! (`goldens/vlm/pixtral` and `goldens/vlm/mistral3`, made by mlx-vlm with
//! `porting-tools/python/make_vlm_golden.py --case pixtral` / `--case
//! mistral3`): the tower's features for two images of different sizes (2-D
//! RoPE over each image's patch grid, attention block-diagonal per image;
//! Mistral 3's 2 x 2 patch merger), the logits of a prompt whose images are
//! rows of [IMG] tokens with [IMG_BREAK] / [IMG_END], greedy decoding after
//! a cached prefill, and the longest-edge image processor against
//! transformers'.

use lmspec::engine::Model;
use lmspec::lm::image_processor::{longest_edge_resize, ImageProcessor};
use lmspec::lm::vision::{Grid, VisionModel};
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::Array;

use crate::support::{goldens, library, mlx_lock, opts};
use crate::vlm_support::{
    assert_chat_turns, assert_close, assert_greedy_steps, assert_segments_matter,
    assert_tower_diff_passes, first_divergence_with_edit, golden, golden_images, grids, ints,
    model_dir,
};

/// Features, prompt logits, the cached prefill and 16 greedy steps against
/// the golden; without the per-image segments the features differ.
#[test]
fn pixtral() {
    check_case("pixtral", 1);
}

/// Mistral 3: the same tower, its patches in merge-window order, an
/// RMSNorm and a 2 x 2 patch merger before the projector; one [IMG] per
/// merge window.
#[test]
fn mistral3() {
    check_case("mistral3", 2);
}

fn check_case(case: &str, merge: i64) {
    let _guard = mlx_lock();
    let g = golden(case);
    let dir = model_dir(case);
    let text = Model::load(&dir, &opts(&library(), None)).expect("text model");
    let vm = VisionModel::load(&dir, &opts(&library(), None), &text).expect("tower");
    let grid = grids(&g["image_grid_thw"]);
    assert_eq!(grid.len(), 2);
    assert_ne!(grid[0], grid[1], "two images of different grids");
    let ids = ints(&g["input_ids"]);
    assert_eq!(vm.merge, merge);
    let patches: i64 = grid.iter().map(Grid::patches).sum();
    let image_tokens = ids.iter().filter(|&&t| t == vm.image_token).count() as i64;
    assert_eq!(
        image_tokens,
        patches / (merge * merge),
        "one [IMG] token per merge window"
    );

    let pixels = &g["pixel_values"];
    let features = vm.image_features(pixels, &grid).expect("features");
    assert_close("vision features", &features, &g["vision_features"]);

    // One image alone gives its own rows of the features: attention stays
    // within an image.
    let first = grid[0].patches() as i32;
    let alone = vm
        .image_features(&pixels.try_index(..first).expect("rows"), &grid[..1])
        .expect("first image");
    let rows = grid[0].tokens(merge) as i32;
    let want_first = g["vision_features"].try_index(..rows).expect("rows");
    assert_close("first image alone", &alone, &want_first);
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

    // A prompt whose [IMG] tokens do not number the images' patches is an
    // error, not a panic.
    let mut short = ids.clone();
    let at = short
        .iter()
        .position(|&t| t == vm.image_token)
        .expect("an image token");
    short.remove(at);
    let mut cache = text.new_cache();
    let err = vm
        .prefill(&text, &short, Some(pixels), &grid, &mut cache)
        .expect_err("one token short")
        .to_string();
    assert!(err.contains("image tokens"), "{err}");
}

/// The generation path: the golden prompt with each image's rows collapsed
/// to one [IMG] (as the chat template writes it) expands back to the golden
/// prompt ([IMG_BREAK] between rows, [IMG_END] after), and generation with
/// the images gives mlx-vlm's greedy tokens.
#[test]
fn pixtral_generation_with_images_continues_as_mlx_vlm() {
    check_generation("pixtral");
}

/// Mistral 3: the rows of its merged grid.
#[test]
fn mistral3_generation_with_images_continues_as_mlx_vlm() {
    check_generation("mistral3");
}

fn check_generation(case: &str) {
    use lmspec::lm::generate::GenerateParams;
    use lmspec::lm::LanguageModel;

    let _guard = mlx_lock();
    let g = golden(case);
    let lm = LanguageModel::load(&model_dir(case), &opts(&library(), None)).expect("load");
    let vision = lm.vision().expect("a tower");
    let e = vision.expansion.as_ref().expect("an expansion");
    assert_eq!(e.placeholder as i64, vision.image_token);
    assert!(e.before.is_empty());
    let (brk, end) = (e.row_break.clone(), e.after.clone());
    assert_eq!((brk.len(), end.len()), (1, 1));
    let grid = grids(&g["image_grid_thw"]);
    let ids: Vec<u32> = ints(&g["input_ids"]).iter().map(|&t| t as u32).collect();
    // Each image: rows of [IMG] with breaks, then the end token -> [IMG].
    let image = vision.image_token as u32;
    let mut prompt = Vec::new();
    let mut k = 0;
    while k < ids.len() {
        if ids[k] != image {
            prompt.push(ids[k]);
            k += 1;
            continue;
        }
        while ids[k] == image || ids[k] == brk[0] {
            k += 1;
        }
        assert_eq!(ids[k], end[0], "the image ends with its end token");
        prompt.push(image);
        k += 1;
    }
    assert_eq!(prompt.iter().filter(|&&t| t == image).count(), grid.len());
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

    // One image for a prompt with two placeholders: a named error.
    let err = lm
        .generate_with_images(&prompt, &images[..1], &params, None, None, &mut |_| {})
        .expect_err("one image short")
        .to_string();
    assert!(
        err.contains("1 image(s) given but the prompt has 2 image placeholder(s)"),
        "{err}"
    );
}

/// The longest-edge processor (scale down to `size.longest_edge`, each side
/// up to a multiple of the patch, bicubic, CLIP mean/std, patches
/// row-major) against transformers' `PixtralImageProcessorPil` on the five
/// test images: the grids and token counts equal, every image within 1e-2.
#[test]
fn pixtral_image_processing_matches_the_python_processor() {
    check_processor("pixtral", 1);
}

/// Mistral 3's: the same settings; the model's merge of 2 makes each side
/// a multiple of 8 pixels (Hugging Face's processor gets patch x merge) and
/// orders the patches by merge window.
#[test]
fn mistral3_image_processing_matches_the_python_processor() {
    check_processor("mistral3", 2);
}

fn check_processor(case_name: &str, merge: i64) {
    let _guard = mlx_lock();
    let case = goldens().join("vlm").join(case_name);
    let dir = case.join("model");
    let text = Model::load(&dir, &opts(&library(), None)).expect("text model");
    let vm = VisionModel::load(&dir, &opts(&library(), None), &text).expect("tower");
    let proc = vm.processor.as_ref().expect("a processor");
    assert_eq!(
        (proc.longest_edge, proc.patch_size, proc.merge_size),
        (Some(64), 4, merge)
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
        assert_eq!(
            got.grid.tokens(vm.merge),
            grid[1] * grid[2] / (merge * merge),
            "{name}: tokens"
        );
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

/// The longest-edge resize: small images only round up to whole patches,
/// large ones scale down (each side floored) first; bad configs name the
/// field.
#[test]
fn longest_edge_processor_configs_are_checked() {
    assert_eq!(longest_edge_resize(50, 50, 64, 4).expect("fits"), (52, 52));
    // 130 x 200 -> ratio 3.125 -> 41 x 64 -> 44 x 64.
    assert_eq!(
        longest_edge_resize(130, 200, 64, 4).expect("down"),
        (44, 64)
    );
    assert_eq!(
        longest_edge_resize(64, 64, 64, 16).expect("exact"),
        (64, 64)
    );
    assert!(longest_edge_resize(0, 5, 64, 4).is_err());

    let base = serde_json::json!({"size": {"longest_edge": 64},
        "patch_size": {"height": 4, "width": 4},
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]});
    let file = std::path::Path::new("preprocessor_config.json");
    let p = ImageProcessor::from_json(&base, file).expect("longest edge");
    assert_eq!((p.longest_edge, p.patch_size), (Some(64), 4));
    let mut j = base.clone();
    j["patch_size"] = serde_json::json!({"height": 4, "width": 8});
    let err = ImageProcessor::from_json(&j, file).unwrap_err().to_string();
    assert!(err.contains("patch_size"), "{err}");
    let mut j = base.clone();
    j["size"]["longest_edge"] = serde_json::json!(0);
    let err = ImageProcessor::from_json(&j, file).unwrap_err().to_string();
    assert!(err.contains("size.longest_edge"), "{err}");
    // With a shortest edge too, the sizes are pixel bounds (Qwen2-VL's).
    let mut j = base.clone();
    j["size"] = serde_json::json!({"shortest_edge": 16, "longest_edge": 4096});
    let p = ImageProcessor::from_json(&j, file).expect("pixel bounds");
    assert_eq!(
        (p.longest_edge, p.min_pixels, p.max_pixels),
        (None, 16, 4096)
    );
}

/// `port diff` on the Pixtral golden matches every tower node; with the
/// dealt 2-D RoPE taken out (each section its own ladder) it names the
/// first block's output.
#[test]
fn port_diff_names_the_first_divergent_pixtral_node() {
    let _guard = mlx_lock();
    assert_tower_diff_passes("pixtral", 12);
    let first = first_divergence_with_edit(
        "pixtral",
        "pixtral_vision.yaml",
        "dealt: true",
        "dealt: false",
        2,
    );
    assert_eq!(first, "layers.0.o");
}

/// `port diff` on the Mistral 3 golden matches every node of the tower and
/// projector; with the merger's rows concatenated patch after patch
/// (`channel_major: false`) it names `merging`.
#[test]
fn port_diff_names_the_first_divergent_mistral3_node() {
    use lmspec::port::diff::diff_tower;

    let _guard = mlx_lock();
    assert_tower_diff_passes("mistral3", 14);
    let golden = goldens().join("vlm").join("mistral3");
    let model = golden.join("model");

    let root = crate::support::root().join("specs/models");
    let tower = std::fs::read_to_string(root.join("mistral3_vision.yaml")).expect("spec");
    let parent = std::fs::read_to_string(root.join("pixtral_vision.yaml")).expect("spec");
    assert!(tower.contains("extends: pixtral_vision\n"));
    assert!(tower.contains("channel_major: true"));
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(
        dir.path().join("mistral3_vision.yaml"),
        tower
            .replace(
                "extends: pixtral_vision\n",
                "extends: ./pixtral_vision.yaml\n",
            )
            .replace("channel_major: true", "channel_major: false"),
    )
    .expect("write");
    std::fs::write(dir.path().join("pixtral_vision.yaml"), parent).expect("write");
    let mut o = opts(&library(), None);
    o.spec = Some(
        dir.path()
            .join("mistral3_vision.yaml")
            .display()
            .to_string(),
    );
    let report = diff_tower(&model, &golden, &o, None).expect("diff");
    let first = report.first_failure().expect("a divergence");
    assert_eq!(first.name, "merging", "{}", report.table());
}

/// The golden checkpoints in Hugging Face's layouts: the original one
/// (`vision_tower.transformer...`, `language_model.model...`,
/// `language_model.lm_head`) and the newer one (everything under `model.`,
/// a top-level `lm_head`), the patch convolution as `[out, C, P, P]`; the
/// specs' weight rules bring both to the same features and logits.
#[test]
fn hugging_face_layouts_give_the_same_outputs() {
    for case in ["pixtral", "mistral3"] {
        for newer in [false, true] {
            let _guard = mlx_lock();
            let g = golden(case);
            let src = model_dir(case);
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
                let name = name.replace("vision_tower.vision_model.", "vision_tower.");
                let hf = match (newer, name.strip_prefix("language_model.")) {
                    (false, _) => name.clone(),
                    (true, Some("lm_head.weight")) => "lm_head.weight".to_string(),
                    (true, Some(rest)) => {
                        format!("model.language_model.{}", rest.trim_start_matches("model."))
                    }
                    (true, None) => format!("model.{name}"),
                };
                let w = if name.ends_with("patch_conv.weight") {
                    // MLX [out, P, P, C] to PyTorch [out, C, P, P].
                    w.transpose_axes(&[0, 3, 1, 2]).expect("transpose")
                } else {
                    w.clone()
                };
                renamed.push((hf, w));
            }
            Array::save_safetensors(
                renamed.iter().map(|(n, w)| (n.as_str(), w)),
                None,
                dir.join("model.safetensors"),
            )
            .expect("save");
            let what = format!("{case} ({})", if newer { "newer" } else { "original" });
            let text = Model::load(dir, &opts(&library(), None)).expect("text model");
            let vm = VisionModel::load(dir, &opts(&library(), None), &text).expect("tower");
            let grid = grids(&g["image_grid_thw"]);
            let features = vm
                .image_features(&g["pixel_values"], &grid)
                .expect("features");
            assert_close(
                &format!("{what} features"),
                &features,
                &g["vision_features"],
            );
            let ids = ints(&g["input_ids"]);
            let mut cache = text.new_cache();
            let logits = vm
                .prefill(&text, &ids, Some(&g["pixel_values"]), &grid, &mut cache)
                .expect("prefill");
            assert_close(&format!("{what} logits"), &logits, &g["logits"]);
        }
    }
}

/// `lmspec generate --image` on the Pixtral and Mistral 3 goldens: the
/// chat template writes `[IMG]` per image, which becomes the image's rows
/// (the processor's grid, merged for Mistral 3) with their break and end
/// tokens, around the prompt's 4 other tokens; an image without its
/// placeholder (`--raw`) is an error, not a panic.
#[test]
fn generate_takes_images_on_the_command_line() {
    for (case, merge) in [("pixtral", 1), ("mistral3", 2)] {
        let fixtures = Array::load_safetensors(
            goldens()
                .join("vlm")
                .join(case)
                .join("processor.safetensors"),
        )
        .expect("processor tensors");
        let mut want = 4;
        for name in ["wide.png", "alpha.png"] {
            let g = ints(&fixtures[&format!("{name}.grid")]);
            let (rows, cols) = (g[1] / merge, g[2] / merge);
            want += rows * cols + rows;
        }
        let model = format!("goldens/vlm/{case}/model");
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
        assert!(
            err.contains(&format!("[prompt {want} tokens")),
            "{case}: {err}"
        );
        let out = run(&["--image", wide, "--raw", "-p", "w5 w6"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            err.contains("1 image(s) given but the prompt has 0 image placeholder(s)"),
            "{err}"
        );
    }
}

/// The towers give the last block's output: a checkpoint asking for
/// another layer (`vision_feature_layer`) is refused at load, naming the
/// key, rather than run with the wrong features.
#[test]
fn another_feature_layer_is_a_named_error() {
    use lmspec::lm::LanguageModel;

    let _guard = mlx_lock();
    for case in ["pixtral", "mistral3"] {
        let src = model_dir(case);
        let tmp = tempfile::tempdir().expect("tmp");
        for entry in std::fs::read_dir(&src).expect("read_dir") {
            let path = entry.expect("entry").path();
            let to = tmp.path().join(path.file_name().expect("name"));
            std::fs::copy(&path, to).expect("copy");
        }
        let config = std::fs::read_to_string(src.join("config.json")).expect("config");
        let mut json: serde_json::Value = serde_json::from_str(&config).expect("json");
        assert_eq!(json["vision_feature_layer"], serde_json::json!(-1));
        json["vision_feature_layer"] = serde_json::json!(-2);
        std::fs::write(tmp.path().join("config.json"), json.to_string()).expect("write");
        let err = LanguageModel::load(tmp.path(), &opts(&library(), None))
            .expect_err("refused")
            .to_string();
        assert!(err.contains("vision_feature_layer"), "{case}: {err}");
    }
}

/// A chat session with an image: the first turn answers as one
/// `generate_with_images` call on the same prompt; a second, text-only
/// turn reuses the cache (the image's rows are not fed again) and answers
/// as the whole conversation run from scratch.
#[test]
fn chat_sessions_keep_their_images_across_turns() {
    use lmspec::lm::LanguageModel;

    let _guard = mlx_lock();
    for case in ["pixtral", "mistral3"] {
        let lm = LanguageModel::load(&model_dir(case), &opts(&library(), None)).expect("load");
        let images = lm
            .load_images(&[goldens().join("vlm").join("images").join("alpha.png")])
            .expect("image");
        // The first turn's image tokens are not fed again.
        let image_tokens = images[0].grid.tokens(lm.vision().expect("tower").merge);
        eprintln!("{case}:");
        assert_chat_turns(&lm, images, "image", image_tokens as usize, true);
    }
}
