//! Vision-language goldens (`goldens/vlm/<case>`, made by mlx-vlm with
//! `porting-tools/python/make_vlm_golden.py`): the tower's features, the
//! 3-D positions, the logits of a prompt with images, greedy decoding after
//! a cached prefill; and the errors of bad image input.

use lmspec::engine::Model;
use lmspec::lm::vision::VisionModel;
use lmspec::port::tolerance::{compare, Tolerance};
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::Array;

use crate::support::{goldens, library, mlx_lock, opts};
use crate::vlm_support::{
    assert_chat_turns, assert_close, assert_greedy_steps, assert_tower_diff_passes,
    first_divergence_with_edit, golden, golden_images, grids, ints,
};

fn check_case(case: &str) {
    let _guard = mlx_lock();
    let g = golden(case);
    let dir = goldens().join("vlm").join(case).join("model");
    let text = Model::load(&dir, &opts(&library(), None)).expect("text model");
    let vm = VisionModel::load(&dir, &opts(&library(), None), &text).expect("tower");
    let grid = grids(&g["image_grid_thw"]);
    let ids = ints(&g["input_ids"]);

    let features = vm
        .image_features(&g["pixel_values"], &grid)
        .expect("features");
    assert_close("vision features", &features, &g["vision_features"]);

    let inputs = vm
        .prompt_inputs(&ids, Some(&features), &grid)
        .expect("inputs");
    let want_pos = ints(&g["position_ids"]);
    let got_pos = ints(inputs.positions.as_ref().expect("positions"));
    assert_eq!(got_pos, want_pos, "M-RoPE positions");
    assert_eq!(
        inputs.position_delta,
        Some(ints(&g["rope_delta"])[0] as i32),
        "position delta"
    );

    // The whole prompt, no cache.
    let mut cache = text.new_cache();
    let logits = vm
        .prefill(&text, &ids, Some(&g["pixel_values"]), &grid, &mut cache)
        .expect("prefill");
    assert_close("prompt logits", &logits, &g["logits"]);

    // Greedy decoding after the cached prefill.
    assert_greedy_steps(&text, &mut cache, &logits, &g);
}

#[test]
fn qwen2_vl() {
    check_case("qwen2_vl");
}

/// Window attention (tiles of the patch grid; full attention in the blocks
/// of `fullatt_block_indexes`), RMSNorm and a gated SiLU MLP in the tower.
#[test]
fn qwen2_5_vl() {
    check_case("qwen2_5_vl");
}

/// A learned position table interpolated to each grid, two DeepStack
/// levels added after text layers 0 and 1, the qwen3 text model with
/// interleaved M-RoPE.
#[test]
fn qwen3_vl() {
    check_case("qwen3_vl");
}

/// Qwen3-VL-MoE: the same tower and text model with a mixture of experts
/// in layers 0 and 1 (layer 2 dense).
#[test]
fn qwen3_vl_moe() {
    check_case("qwen3_vl_moe");
}

/// The DeepStack levels are used: with their columns of the feature rows
/// zeroed the prompt's logits leave mlx-vlm's, and feature rows of the
/// wrong width are an error naming the op.
#[test]
fn qwen3_vl_deepstack_levels_change_the_logits() {
    let _guard = mlx_lock();
    let g = golden("qwen3_vl");
    let dir = goldens().join("vlm").join("qwen3_vl").join("model");
    let text = Model::load(&dir, &opts(&library(), None)).expect("text model");
    let vm = VisionModel::load(&dir, &opts(&library(), None), &text).expect("tower");
    let grid = grids(&g["image_grid_thw"]);
    let ids = ints(&g["input_ids"]);
    let tokens: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
    let tokens = Array::from_slice(&tokens, &[1, tokens.len() as i32]);
    let features = vm
        .image_features(&g["pixel_values"], &grid)
        .expect("features");
    // [merger | level 0 | level 1], each the text model's width.
    let width = g["logits"].shape()[2];
    let d = 64;
    assert_eq!(width, 256);
    assert_eq!(features.shape()[1], 3 * d);
    let run = |f: &Array| {
        let inputs = vm.prompt_inputs(&ids, Some(f), &grid).expect("inputs");
        text.forward_with_inputs(&tokens, None, &inputs, &[])
            .map(|(out, _)| out)
    };
    let logits = run(&features).expect("forward");
    assert_close("prompt logits", &logits, &g["logits"]);
    let first = features.try_index((.., ..d)).expect("merger");
    let zeros =
        mlx_rs::ops::zeros_like(features.try_index((.., d..)).expect("levels")).expect("zeros");
    let bare = mlx_rs::ops::concatenate(&[&first, &zeros], -1).expect("concat");
    let without = run(&bare).expect("forward");
    let s = compare(&without, &g["logits"]).expect("compare");
    eprintln!("without the DeepStack levels: max_abs {:.2e}", s.max_abs);
    assert!(
        !s.within(Tolerance::F32),
        "the levels changed nothing: {s:?}"
    );
    let err = run(&first).expect_err("one block of columns").to_string();
    assert!(err.contains("splice: features must be [N, 192]"), "{err}");
}

#[test]
fn image_inputs_that_do_not_fit_are_errors() {
    let _guard = mlx_lock();
    let g = golden("qwen2_vl");
    let dir = goldens().join("vlm").join("qwen2_vl").join("model");
    let text = Model::load(&dir, &opts(&library(), None)).expect("text model");
    let vm = VisionModel::load(&dir, &opts(&library(), None), &text).expect("tower");
    let grid = grids(&g["image_grid_thw"]);
    let ids = ints(&g["input_ids"]);
    let mut cache = text.new_cache();
    // One image more than the prompt has placeholders for.
    let mut three = grid.clone();
    three.push(grid[1]);
    let err = vm
        .prefill(&text, &ids, Some(&g["pixel_values"]), &three, &mut cache)
        .unwrap_err()
        .to_string();
    assert!(err.contains("pixel values must be"), "{err}");
    let err = vm
        .prompt_inputs(&ids, None, &three)
        .unwrap_err()
        .to_string();
    assert!(err.contains("3 image(s) given"), "{err}");
    // Pixels of the wrong width.
    let narrow = g["pixel_values"].try_index((.., ..10)).expect("slice");
    let err = vm.image_features(&narrow, &grid).unwrap_err().to_string();
    assert!(err.contains("flattened patches"), "{err}");
    // A text-only model takes no images.
    let qwen2 = goldens().join("qwen2").join("model");
    let plain = Model::load(&qwen2, &opts(&library(), None)).expect("qwen2");
    let err = VisionModel::load(&qwen2, &opts(&library(), None), &plain)
        .expect_err("refused")
        .to_string();
    assert!(err.contains("takes no images"), "{err}");
    // The text model alone still runs the prompt's ids (placeholders as
    // tokens, no features).
    let x: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
    let x = Array::from_slice(&x, &[1, x.len() as i32]);
    assert!(text.forward(&x, None).is_ok());
}

/// The Rust image processor against the Python one (transformers' PIL
/// backend) on the five test images: same grids; PNGs (RGB, RGBA, gray)
/// within 1e-2 (Pillow's resampling and compositing are reproduced
/// exactly), JPEGs too (both decode them with libjpeg-turbo).
#[test]
fn image_processing_matches_the_python_processor() {
    check_processor("qwen2_vl");
}

/// Qwen2.5-VL's processor (Qwen2-VL's, other pixel bounds).
#[test]
fn qwen2_5_vl_image_processing_matches_the_python_processor() {
    check_processor("qwen2_5_vl");
}

/// Qwen3-VL's settings (mean and std 0.5, size.shortest_edge /
/// longest_edge, bilinear).
#[test]
fn qwen3_vl_image_processing_matches_the_python_processor() {
    check_processor("qwen3_vl");
}

fn check_processor(case: &str) {
    use lmspec::lm::image_processor::ImageProcessor;

    let _guard = mlx_lock();
    let dir = goldens().join("vlm").join(case);
    let proc = ImageProcessor::load(&dir.join("model")).expect("processor");
    let want =
        Array::load_safetensors(dir.join("processor.safetensors")).expect("processor tensors");
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
        let wp = &want[&format!("{name}.pixel_values")];
        assert_eq!(wp.shape()[0] as i64, got.grid.patches(), "{name}: patches");
        let wv = wp.as_slice::<f32>();
        assert_eq!(wv.len(), got.pixels.len(), "{name}: size");
        let max = got
            .pixels
            .iter()
            .zip(wv)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!(
            "{name}: grid {:?}, {} tokens, max abs diff {max:.3e}",
            grid,
            got.grid.tokens(proc.merge_size)
        );
        assert!(max <= 1e-2, "{name}: max abs diff {max} above 1e-2");
        worst = worst.max(max);
    }
    eprintln!("worst max abs diff {worst:.3e}");
    // The bilinear filter (resample 2) on two PNGs: Pillow's, exactly.
    let mut bilinear = proc.clone();
    bilinear.resample = lmspec::lm::image_processor::Filter::Bilinear;
    for name in ["alpha.png", "gray.png"] {
        let path = goldens().join("vlm").join("images").join(name);
        let got = bilinear.process_file(&path).expect("process");
        let wv = want[&format!("{name}.bilinear.pixel_values")].as_slice::<f32>();
        assert_eq!(wv.len(), got.pixels.len(), "{name}: size");
        let max = got
            .pixels
            .iter()
            .zip(wv)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("{name} (bilinear): max abs diff {max:.3e}");
        assert!(max <= 1e-2, "{name} bilinear: {max}");
    }
}

/// Bad image files are clear errors naming the file.
#[test]
fn bad_image_files_are_named_errors() {
    use lmspec::lm::image_processor::ImageProcessor;

    let proc = ImageProcessor::load(&goldens().join("vlm").join("qwen2_vl").join("model"))
        .expect("processor");
    let fixtures = crate::support::root().join("tests/fixtures/vision");
    for (file, says) in [
        ("zero_width.png", "zero_width.png"),
        ("truncated.jpg", "truncated"),
        ("not_an_image.png", "not a PNG or JPEG"),
        ("missing.png", "missing.png"),
    ] {
        let err = match proc.process_file(&fixtures.join(file)) {
            Ok(img) => panic!("{file}: processed into grid {:?}", img.grid),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(says), "{file}: {err}");
        eprintln!("{file}: {err}");
    }
}

/// `LanguageModel::generate_with_images`: the prompt with one placeholder
/// per image (as a chat template writes it) is expanded, run with the
/// images spliced in, and greedy generation continues: mlx-vlm's 16 tokens.
#[test]
fn generation_with_images_continues_as_mlx_vlm() {
    generate_with_images_case("qwen2_vl");
}

/// The same for Qwen3-VL (feature rows three blocks wide: the DeepStack
/// levels travel with the merger's rows).
#[test]
fn qwen3_vl_generation_with_images_continues_as_mlx_vlm() {
    generate_with_images_case("qwen3_vl");
}

/// And for Qwen2.5-VL (window attention in the tower).
#[test]
fn qwen2_5_vl_generation_with_images_continues_as_mlx_vlm() {
    generate_with_images_case("qwen2_5_vl");
}

/// A copy of a vision golden's model folder with its config.json edited.
fn edited_model(case: &str, edit: impl Fn(&mut serde_json::Value)) -> tempfile::TempDir {
    let src = goldens().join("vlm").join(case).join("model");
    let dir = tempfile::tempdir().expect("tmp");
    for entry in std::fs::read_dir(&src).expect("model dir") {
        let path = entry.expect("entry").path();
        let name = path.file_name().expect("name");
        std::fs::copy(&path, dir.path().join(name)).expect("copy");
    }
    let file = dir.path().join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).expect("config")).expect("json");
    edit(&mut json);
    std::fs::write(&file, serde_json::to_string(&json).expect("json")).expect("write");
    dir
}

/// Configs a tower cannot run are load errors naming what is wrong:
/// a window smaller than a merge window (no whole tile), a DeepStack level
/// whose merger the checkpoint lacks, a level past the three the spec
/// writes out (its merger's tensors left unused).
#[test]
fn tower_configs_that_do_not_fit_are_errors() {
    let _guard = mlx_lock();
    let load = |dir: &std::path::Path| {
        let text = Model::load(dir, &opts(&library(), None))?;
        VisionModel::load(dir, &opts(&library(), None), &text).map(|_| ())
    };
    let small = edited_model("qwen2_5_vl", |j| {
        j["vision_config"]["window_size"] = 4.into()
    });
    let err = load(small.path())
        .expect_err("window of no tile")
        .to_string();
    eprintln!("{err}");
    assert!(err.contains("window_patches"), "{err}");
    assert!(err.contains("config.json"), "{err}");

    let three = edited_model("qwen3_vl", |j| {
        j["vision_config"]["deepstack_visual_indexes"] = serde_json::json!([0, 1, 2])
    });
    let err = load(three.path())
        .expect_err("a level without its merger")
        .to_string();
    eprintln!("{err}");
    assert!(err.contains("deepstack_merger_list.2"), "{err}");

    let one = edited_model("qwen3_vl", |j| {
        j["vision_config"]["deepstack_visual_indexes"] = serde_json::json!([0])
    });
    let err = load(one.path())
        .expect_err("a merger left unused")
        .to_string();
    eprintln!("{err}");
    assert!(err.contains("deepstack_merger_list.1"), "{err}");
}

fn generate_with_images_case(case: &str) {
    use lmspec::lm::generate::GenerateParams;
    use lmspec::lm::LanguageModel;

    let _guard = mlx_lock();
    let g = golden(case);
    let dir = goldens().join("vlm").join(case).join("model");
    let lm = LanguageModel::load(&dir, &opts(&library(), None)).expect("load");
    let vision = lm.vision().expect("a tower");
    let images = golden_images(&g);
    // The golden prompt with each image's run of placeholders collapsed.
    let image = vision.image_token as u32;
    let mut prompt: Vec<u32> = Vec::new();
    for t in ints(&g["input_ids"]) {
        if t as u32 != image || prompt.last() != Some(&image) {
            prompt.push(t as u32);
        }
    }
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
    // The same through a shared container.
    let container = lmspec::lm::ModelContainer::new(lm);
    let shared = container
        .generate_with_images(&prompt, &images, &params, &mut |_| {})
        .expect("container");
    assert_eq!(shared.tokens, want);
    // One image fewer than placeholders: an error, not a panic.
    let err = container
        .generate_with_images(&prompt, &images[..1], &params, &mut |_| {})
        .expect_err("too few images")
        .to_string();
    assert!(
        err.contains("1 image(s) given but the prompt has 2"),
        "{err}"
    );
}

fn lmspec(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_lmspec"))
        .args(args)
        .current_dir(crate::support::root())
        .output()
        .expect("lmspec runs")
}

/// `lmspec generate --image`: images through the processor, the tower and
/// the chat template into generation; bad images and an image for a
/// text-only model are errors that name the problem, without a panic.
#[test]
fn generate_takes_images_on_the_command_line() {
    let model = "goldens/vlm/qwen2_vl/model";
    let (wide, alpha) = (
        "goldens/vlm/images/wide.png",
        "goldens/vlm/images/alpha.png",
    );
    let base = ["generate", "--model", model, "--max-tokens", "6"];
    let run = |extra: &[&str]| {
        let mut args: Vec<&str> = base.to_vec();
        args.extend_from_slice(extra);
        lmspec(&args)
    };
    let out = run(&["--image", wide, "--image", alpha, "-p", "w5 w6"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("generated 6 tokens"), "{err}");
    // The prompt counts the images' tokens: 60 + 36 placeholders and 11
    // template and text tokens.
    assert!(err.contains("[prompt 107 tokens"), "{err}");
    let text = String::from_utf8_lossy(&out.stdout);
    // The images change the answer: the same prompt without them differs.
    let plain = run(&["-p", "w5 w6"]);
    assert!(plain.status.success());
    let first = |t: &str| t.lines().next().unwrap_or("").to_string();
    assert_ne!(
        first(&text),
        first(&String::from_utf8_lossy(&plain.stdout)),
        "the images made no difference"
    );
    for (args, says) in [
        (
            vec!["--image", "tests/fixtures/vision/truncated.jpg", "-p", "w5"],
            "truncated.jpg: the JPEG data is truncated",
        ),
        (
            vec![
                "--image",
                "tests/fixtures/vision/zero_width.png",
                "-p",
                "w5",
            ],
            "zero_width.png",
        ),
        (
            vec!["--image", wide, "--raw", "-p", "w5 w6"],
            "1 image(s) given but the prompt has 0 image placeholder(s)",
        ),
        (
            vec![
                "--image",
                wide,
                "--raw",
                "-p",
                "<|image_pad|> w5 <|image_pad|>",
            ],
            "1 image(s) given but the prompt has 2 image placeholder(s)",
        ),
    ] {
        let out = run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(!err.contains("panicked"), "{err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    // A text-only model (the default chat model) takes no images.
    let out = lmspec(&["generate", "--image", wide, "-p", "hi", "--max-tokens", "2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("takes no images"), "{err}");
}

/// A chat session with an image: the first turn answers as one
/// `generate_with_images` call on the same prompt; a second, text-only turn
/// reuses the cache (image tokens included) and answers as the whole
/// conversation run from scratch.
#[test]
fn a_chat_session_keeps_its_images_across_turns() {
    chat_session_case("qwen2_vl");
}

/// The same with Qwen3-VL: the second turn runs past the image's DeepStack
/// levels in the cache as the whole conversation does from scratch.
#[test]
fn qwen3_vl_chat_session_keeps_its_images_across_turns() {
    chat_session_case("qwen3_vl");
}

fn chat_session_case(case: &str) {
    use lmspec::lm::LanguageModel;

    let _guard = mlx_lock();
    let dir = goldens().join("vlm").join(case).join("model");
    let lm = LanguageModel::load(&dir, &opts(&library(), None)).expect("load");
    let images = lm
        .load_images(&[goldens().join("vlm").join("images").join("alpha.png")])
        .expect("image");
    assert_chat_turns(&lm, images, "image", 10, true);
}

/// `lmspec chat --image`: the image goes with the first message (its 48
/// placeholder tokens counted in the prompt), the next turn reuses the
/// cache.
#[test]
fn chat_takes_an_image_with_the_first_message() {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lmspec"))
        .args([
            "chat",
            "--model",
            "goldens/vlm/qwen2_vl/model",
            "--image",
            "goldens/vlm/images/gray.png",
            "--max-tokens",
            "3",
        ])
        .current_dir(crate::support::root())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("lmspec runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"w5 w6\nw7\n\n")
        .expect("write");
    let out = child.wait_with_output().expect("lmspec ends");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("[prompt 57 tokens"), "{err}");
    assert!(err.contains("[prompt 7 tokens"), "{err}");
}

/// `port diff` on a vision golden compares the tower's taps with mlx-vlm's
/// node by node, and names the first node that diverges: with the MLP's
/// quick GELU swapped for another approximation, `layers.0.fc2`.
#[test]
fn port_diff_names_the_first_divergent_tower_node() {
    use lmspec::port::diff::is_vision_golden;

    let _guard = mlx_lock();
    // Qwen3-VL's tower (and Qwen3-VL-MoE's, its GELUs exchanged): the
    // position table, the blocks, the merger and both DeepStack levels,
    // node by node.
    for case in ["qwen3_vl", "qwen3_vl_moe"] {
        assert_tower_diff_passes(case, 40);
    }

    // Qwen2.5-VL's tower, window attention included, node by node.
    assert_tower_diff_passes("qwen2_5_vl", 30);
    // Without the windows every block attends over the whole image: the
    // first block's attention output diverges.
    let first = first_divergence_with_edit(
        "qwen2_5_vl",
        "qwen2_5_vl_vision.yaml",
        ", grid_window: attn_window}",
        "}",
        1,
    );
    assert_eq!(first, "layers.0.proj");

    assert!(is_vision_golden(&goldens().join("vlm").join("qwen2_vl")));
    assert_tower_diff_passes("qwen2_vl", 20);
    let first = first_divergence_with_edit(
        "qwen2_vl",
        "qwen2_vl_vision.yaml",
        "fn: quick_gelu",
        "fn: gelu_approx",
        1,
    );
    assert_eq!(first, "layers.0.fc2");
}
