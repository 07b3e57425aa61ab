//! Idefics3 / SmolVLM (`goldens/vlm/idefics3`, made by mlx-vlm with
//! `porting-tools/python/make_vlm_golden.py --case idefics3`): the SigLIP
//! tower, the connector's pixel shuffle and linear, the llama text model
//! attending causally; each image `<fake_token_around_image><global-img>`,
//! its tokens, `<fake_token_around_image>`; the processor without image
//! splitting (longest edge, then a square) against transformers'.
use lmspec::engine::Model;
use lmspec::lm::image_processor::{longest_edge_to, ImageProcessor};
use lmspec::lm::vision::VisionModel;
use mlx_rs::Array;

use crate::support::{goldens, library, mlx_lock, opts};
use crate::vlm_siglip::{check_case_attending, check_chat, check_generation, check_processor};
use crate::vlm_support::{assert_close, assert_tower_diff_passes, golden, grids, ints};

/// Features (pixel-shuffled, projected), the prompt's logits, the cached
/// prefill and 16 greedy steps against mlx-vlm; attention is causal.
#[test]
fn idefics3() {
    check_case_attending("idefics3", false);
}

/// SmolVLM's types (`smolvlm`, `smolvlm_vision`) with a scale factor of 4:
/// 8 x 8 patches to 4 tokens an image.
#[test]
fn smolvlm() {
    check_case_attending("smolvlm", false);
}

#[test]
fn smolvlm_generation_with_images_continues_as_mlx_vlm() {
    check_generation("smolvlm");
}

/// `SmolVLMImageProcessorPil`, the first resize scaling three of the test
/// images up and two down.
#[test]
fn smolvlm_image_processing_matches_the_python_processor() {
    check_processor("smolvlm", 4);
}

/// The prompt with one `<image>` per image, expanded with the tokens
/// around each image, generates mlx-vlm's greedy tokens.
#[test]
fn idefics3_generation_with_images_continues_as_mlx_vlm() {
    check_generation("idefics3");
}

/// A chat session: the template's `<image>` expanded, the second turn
/// reusing the cache past the image and answering as from scratch.
#[test]
fn idefics3_chat_session_keeps_its_images_across_turns() {
    check_chat("idefics3");
}

/// Longest edge to `size.longest_edge` (Lanczos, up or down), then the
/// `max_image_size` square, against `Idefics3ImageProcessorPil`.
#[test]
fn idefics3_image_processing_matches_the_python_processor() {
    check_processor("idefics3", 16);
}

#[test]
fn the_first_resize_keeps_the_aspect_ratio_with_an_even_side() {
    // Hugging Face's _resize_output_size_rescale_to_max_len: the longer
    // side becomes the target, the other int(side / aspect), made even.
    for (h, w, side) in [(41, 150, 48), (90, 33, 48), (50, 50, 48), (61, 47, 100)] {
        let (th, tw) = longest_edge_to(h, w, side);
        assert_eq!(th.max(tw), side, "{h}x{w}: the longest side");
        assert_eq!(th.min(tw) % 2, 0, "{h}x{w}: the other side is even");
        let other = if w >= h {
            (side as f64 / (w as f64 / h as f64)) as i64
        } else {
            (side as f64 * (w as f64 / h as f64)) as i64
        };
        assert!(th.min(tw) - other <= 1, "{h}x{w}: {th}x{tw}");
    }
    // Above 4096 the longest side is brought back down.
    let (h, w) = longest_edge_to(10, 20, 9000);
    assert_eq!((h, w), (2048, 4096));
}

/// A `max_image_size` processor's bad fields are errors naming them; one
/// that splits its images (`do_image_splitting` true, or absent: the
/// default splits) loads, but refuses every image it would split, naming
/// the file and the field; with `size.longest_edge` within the square
/// nothing is split and the pixels are those without splitting.
#[test]
fn idefics3_processor_configs_are_checked() {
    let file = std::path::Path::new("preprocessor_config.json");
    let base = serde_json::json!({
        "size": {"longest_edge": 48},
        "max_image_size": {"longest_edge": 32},
        "resample": 1,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_image_splitting": false,
        "patch_size": 4,
    });
    let edited = |edit: serde_json::Value| {
        let mut j = base.clone();
        for (k, v) in edit.as_object().expect("object") {
            if v.is_null() {
                j.as_object_mut().expect("object").remove(k);
            } else {
                j[k] = v.clone();
            }
        }
        j
    };
    let p = ImageProcessor::from_json(&base, file).expect("no splitting");
    assert_eq!(p.fixed_size, Some((32, 32)));
    assert_eq!(p.first_longest_edge, Some(48));
    for (edit, field) in [
        (
            serde_json::json!({"max_image_size": {"longest_edge": 0}}),
            "max_image_size.longest_edge",
        ),
        (
            serde_json::json!({"size": {"height": 4}}),
            "size.longest_edge",
        ),
        (serde_json::json!({"resample": 4}), "resample"),
    ] {
        let err = ImageProcessor::from_json(&edited(edit), file)
            .expect_err(field)
            .to_string();
        assert!(
            err.contains("preprocessor_config.json") && err.contains(field),
            "{err}"
        );
    }
    let image = goldens().join("vlm").join("images").join("photo.jpg");
    for edit in [
        serde_json::json!({"do_image_splitting": true}),
        serde_json::json!({"do_image_splitting": null}),
    ] {
        let split = ImageProcessor::from_json(&edited(edit), file).expect("loads");
        let err = split
            .process_file(&image)
            .expect_err("split images")
            .to_string();
        assert!(
            err.contains("preprocessor_config.json") && err.contains("do_image_splitting"),
            "{err}"
        );
    }
    let whole = serde_json::json!({"do_image_splitting": true, "size": {"longest_edge": 32}});
    let unsplit = serde_json::json!({"size": {"longest_edge": 32}});
    let a = ImageProcessor::from_json(&edited(whole), file).expect("loads");
    let b = ImageProcessor::from_json(&edited(unsplit), file).expect("loads");
    assert_eq!(
        a.process_file(&image).expect("not split"),
        b.process_file(&image).expect("no splitting")
    );
}

/// A checkpoint whose processor splits its images (the released SmolVLM
/// configs) still loads and generates text; its images are refused.
#[test]
fn a_splitting_processor_leaves_the_text_model_running() {
    use lmspec::lm::generate::GenerateParams;
    use lmspec::lm::LanguageModel;

    let _guard = mlx_lock();
    let src = goldens().join("vlm").join("idefics3").join("model");
    let tmp = tempfile::tempdir().expect("tmp");
    for f in std::fs::read_dir(&src).expect("dir") {
        let f = f.expect("entry").path();
        std::fs::copy(&f, tmp.path().join(f.file_name().expect("name"))).expect("copy");
    }
    let cfg = tmp.path().join("preprocessor_config.json");
    let mut j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).expect("read")).expect("json");
    j["do_image_splitting"] = serde_json::json!(true);
    std::fs::write(&cfg, j.to_string()).expect("write");
    let lm = LanguageModel::load(tmp.path(), &opts(&library(), None)).expect("loads");
    let params = GenerateParams {
        max_tokens: 3,
        ..GenerateParams::default()
    };
    let out = lm
        .generate(&[5, 6, 7], &params, None, None, &mut |_| {})
        .expect("text generation");
    assert_eq!(out.tokens.len(), 3);
    let err = lm
        .load_images(&[goldens().join("vlm").join("images").join("wide.png")])
        .expect_err("split")
        .to_string();
    assert!(
        err.contains("preprocessor_config.json") && err.contains("do_image_splitting"),
        "{err}"
    );
}

/// The golden's checkpoint in Hugging Face's names (`model.vision_model.*`
/// with the patch convolution as `[out, C, P, P]`, `model.connector.*`,
/// `model.text_model.*`, `lm_head`) gives the same features and logits.
#[test]
fn idefics3_hugging_face_layout_gives_the_same_outputs() {
    let _guard = mlx_lock();
    let g = golden("idefics3");
    let src = goldens().join("vlm").join("idefics3").join("model");
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
        let hf = if let Some(rest) = name.strip_prefix("language_model.lm_head.") {
            format!("lm_head.{rest}")
        } else if let Some(rest) = name.strip_prefix("language_model.") {
            format!("model.text_model.{rest}")
        } else {
            format!("model.{name}")
        };
        let w = if name.ends_with("patch_embedding.weight") {
            w.transpose_axes(&[0, 3, 1, 2]).expect("transpose")
        } else {
            w.clone()
        };
        renamed.push((hf, w));
    }
    assert!(renamed
        .iter()
        .any(|(n, _)| n.starts_with("model.connector.")));
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

/// `port diff` matches the tower node by node against the golden's taps,
/// the pixel shuffle and the connector's linear included.
#[test]
fn port_diff_matches_every_idefics3_tower_node() {
    let _guard = mlx_lock();
    let names = assert_tower_diff_passes("idefics3", 15);
    for node in ["layers.0.act", "post_ln", "shuffled", "proj"] {
        assert!(
            names.iter().any(|n| n == node),
            "{node} not compared: {names:?}"
        );
    }
}

/// `generate --image` on the golden: the template's `<image>` per image
/// becomes the two markers, `<global-img>` and 16 image tokens.
#[test]
fn idefics3_generate_takes_images_on_the_command_line() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lmspec"))
        .args([
            "generate",
            "--model",
            "goldens/vlm/idefics3/model",
            "--max-tokens",
            "4",
            "--image",
            "goldens/vlm/images/wide.png",
            "--image",
            "goldens/vlm/images/alpha.png",
            "-p",
            "w5 w6",
        ])
        .current_dir(crate::support::root())
        .output()
        .expect("lmspec runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // <start_of_turn> user, two images of 3 + 16 tokens, w5 w6,
    // <end_of_turn>, <start_of_turn> model.
    let tokens = 2 + 2 * (3 + 16) + 2 + 1 + 2;
    assert!(err.contains(&format!("[prompt {tokens} tokens")), "{err}");
}
