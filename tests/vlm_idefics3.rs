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
use crate::vlm_siglip::{
    assert_close, check_case_attending, check_generation, check_processor, golden, grids, ints,
};

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

/// A `max_image_size` processor that splits images (or does not say: the
/// default splits) is refused naming the field, as is a missing size.
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
    });
    let p = ImageProcessor::from_json(&base, file).expect("no splitting");
    assert_eq!(p.fixed_size, Some((32, 32)));
    assert_eq!(p.first_longest_edge, Some(48));
    for (edit, field) in [
        (
            serde_json::json!({"do_image_splitting": true}),
            "do_image_splitting",
        ),
        (
            serde_json::json!({"do_image_splitting": null}),
            "do_image_splitting",
        ),
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
        let mut j = base.clone();
        for (k, v) in edit.as_object().expect("object") {
            if v.is_null() {
                j.as_object_mut().expect("object").remove(k);
            } else {
                j[k] = v.clone();
            }
        }
        let err = ImageProcessor::from_json(&j, file)
            .expect_err(field)
            .to_string();
        assert!(
            err.contains("preprocessor_config.json") && err.contains(field),
            "{err}"
        );
    }
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
    use lmspec::port::diff::diff_tower;

    let _guard = mlx_lock();
    let golden = goldens().join("vlm").join("idefics3");
    let report = diff_tower(
        &golden.join("model"),
        &golden,
        &opts(&library(), None),
        None,
    )
    .expect("diff");
    assert!(report.passed(), "{}", report.table());
    let names: Vec<&str> = report.rows.iter().map(|r| r.name.as_str()).collect();
    for node in ["layers.0.act", "post_ln", "shuffled", "proj"] {
        assert!(names.contains(&node), "{node} not compared: {names:?}");
    }
    eprintln!("{}", report.table());
}
