//! Vision-language goldens of the SigLIP-tower families (`goldens/vlm/gemma3`,
//! made by mlx-vlm with `porting-tools/python/make_vlm_golden.py --case
//! gemma3`): the tower's features for each image as a batch row, the
//! logits of a prompt with the features spliced in and attention
//! bidirectional within each image's tokens, greedy decoding after a cached
//! prefill (past the sliding window), and the fixed-size image processor
//! against transformers'.
use std::collections::HashMap;

use lmspec::engine::Model;
use lmspec::lm::vision::{image_spans, Grid, VisionModel};
use lmspec::port::tolerance::{compare, Tolerance};
use mlx_rs::ops::indexing::{argmax_axis, TryIndexOp};
use mlx_rs::Array;

use crate::support::{goldens, library, mlx_lock, opts};

fn golden(case: &str) -> HashMap<String, Array> {
    let file = goldens().join("vlm").join(case).join("golden.safetensors");
    Array::load_safetensors(&file).expect("golden tensors")
}

fn ints(a: &Array) -> Vec<i64> {
    let a = a.as_dtype(mlx_rs::Dtype::Int64).expect("cast");
    a.as_slice::<i64>().to_vec()
}

fn grids(a: &Array) -> Vec<Grid> {
    ints(a)
        .chunks(3)
        .map(|g| Grid {
            t: g[0],
            h: g[1],
            w: g[2],
        })
        .collect()
}

fn max_abs(got: &Array, want: &Array) -> f32 {
    let d = mlx_rs::ops::subtract(got, want)
        .and_then(|d| mlx_rs::ops::abs(&d))
        .and_then(|d| d.max(None))
        .expect("diff");
    d.item_cast::<f32>()
}

fn assert_close(what: &str, got: &Array, want: &Array) {
    let s = compare(got, want).unwrap_or_else(|e| panic!("{what}: {e}"));
    eprintln!(
        "{what}: max_rel {:.2e} max_abs {:.2e} cos {:.9}",
        s.max_rel(),
        max_abs(&got.reshape(want.shape()).expect("shape"), want),
        s.cosine
    );
    assert!(s.within(Tolerance::F32), "{what}: {s:?}");
}

/// Features, prompt logits, the cached prefill and 16 greedy steps against
/// the golden.
fn check_case(case: &str) {
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
    assert!(gap > 1e-2, "the image spans changed nothing ({gap})");

    // Greedy decoding after the cached prefill.
    let want_tokens = ints(&g["greedy_tokens"]);
    let want_steps = &g["decode_logits"];
    let mut last = logits.try_index((.., -1, ..)).expect("last");
    let mut tokens = Vec::new();
    let mut worst = 0f32;
    for step in 0..want_tokens.len() {
        let tok = ints(&argmax_axis(&last, -1, None).expect("argmax"))[0];
        tokens.push(tok);
        let x = Array::from_slice(&[tok as i32], &[1, 1]);
        let out = text.forward(&x, Some(&mut cache)).expect("decode");
        last = out.try_index((.., -1, ..)).expect("last");
        let want = want_steps.try_index(step as i32).expect("step");
        let got = last.reshape(&[-1]).expect("flat");
        let s = compare(&got, &want).expect("compare");
        assert!(s.within(Tolerance::F32), "decode step {step}: {s:?}");
        worst = worst.max(max_abs(&got, &want));
    }
    eprintln!("decode steps: max abs diff {worst:.2e}");
    assert_eq!(tokens, want_tokens, "greedy tokens");
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

fn check_generation(case: &str) {
    use lmspec::lm::generate::GenerateParams;
    use lmspec::lm::image_processor::ProcessedImage;
    use lmspec::lm::LanguageModel;

    let _guard = mlx_lock();
    let g = golden(case);
    let dir = goldens().join("vlm").join(case).join("model");
    let lm = LanguageModel::load(&dir, &opts(&library(), None)).expect("load");
    let vision = lm.vision().expect("a tower");
    let grid = grids(&g["image_grid_thw"]);
    let pixels = g["pixel_values"].as_slice::<f32>().to_vec();
    let width = g["pixel_values"].shape()[1] as usize;
    let mut images = Vec::new();
    let mut start = 0;
    for gr in &grid {
        let n = gr.patches() as usize * width;
        images.push(ProcessedImage {
            pixels: pixels[start..start + n].to_vec(),
            grid: *gr,
        });
        start += n;
    }
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
    if images.len() < 2 {
        return;
    }

    // A second image of another grid: refused by name, no panic.
    let small = ProcessedImage {
        pixels: images[1].pixels[..16 * width].to_vec(),
        grid: Grid { t: 1, h: 4, w: 4 },
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
/// images: the grids equal, PNGs within 1e-2, JPEGs within three 8-bit
/// levels (the JPEG decoders' difference).
#[test]
fn gemma3_image_processing_matches_the_python_processor() {
    check_processor("gemma3", 16);
}

#[test]
fn paligemma_image_processing_matches_the_python_processor() {
    check_processor("paligemma", 64);
}

fn check_processor(case_name: &str, tokens: i64) {
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
        let bound = if name.ends_with(".png") {
            1e-2
        } else {
            3.0 / 255.0 / 0.5
        };
        assert!(max <= bound, "{name}: max abs diff {max} above {bound}");
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
