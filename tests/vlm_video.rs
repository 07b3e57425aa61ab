//! Videos for Qwen2-VL (`goldens/vlm/qwen2_vl_video`, made by mlx-vlm with
//! `porting-tools/python/make_vlm_golden.py --case qwen2_vl_video` on the
//! qwen2_vl checkpoint): the tower's features of a 4-frame video, the 3-D
//! positions, the logits and greedy decoding of a prompt with
//! `<|video_pad|>`; the processor on a 3-frame video; the errors of bad
//! video input; `generate --video` and `chat --video`.
use std::collections::HashMap;
use std::path::PathBuf;

use lmspec::engine::Model;
use lmspec::lm::generate::GenerateParams;
use lmspec::lm::image_processor::{ImageProcessor, ProcessedImage};
use lmspec::lm::video::video_frames;
use lmspec::lm::vision::{Grid, VisionModel};
use lmspec::lm::LanguageModel;
use mlx_rs::Array;

use crate::support::{goldens, library, mlx_lock, opts};
use crate::vlm_support::{assert_chat_turns, assert_close, assert_greedy_steps, ints};

fn golden() -> HashMap<String, Array> {
    let file = goldens().join("vlm/qwen2_vl_video/golden.safetensors");
    Array::load_safetensors(&file).expect("golden tensors")
}

fn model_dir() -> PathBuf {
    goldens().join("vlm/qwen2_vl/model")
}

fn grid(a: &Array) -> Grid {
    let g = ints(a);
    Grid {
        t: g[0],
        h: g[1],
        w: g[2],
    }
}

/// The golden's video as the processor would give it.
fn golden_video(g: &HashMap<String, Array>) -> ProcessedImage {
    ProcessedImage {
        pixels: g["pixel_values"].as_slice::<f32>().to_vec(),
        grid: grid(&g["video_grid_thw"]),
        video: true,
    }
}

/// The golden prompt with the video's run of placeholders collapsed to one
/// `<|video_pad|>`, as a chat template writes it.
fn collapsed_prompt(g: &HashMap<String, Array>, video: u32) -> Vec<u32> {
    let mut prompt: Vec<u32> = Vec::new();
    for t in ints(&g["input_ids"]) {
        if t as u32 != video || prompt.last() != Some(&video) {
            prompt.push(t as u32);
        }
    }
    prompt
}

#[test]
fn qwen2_vl_video_matches_mlx_vlm() {
    let _guard = mlx_lock();
    let g = golden();
    let dir = model_dir();
    let text = Model::load(&dir, &opts(&library(), None)).expect("text model");
    let vm = VisionModel::load(&dir, &opts(&library(), None), &text).expect("tower");
    let video = vm.video_token.expect("the model takes videos");
    let v = golden_video(&g);
    assert_eq!(v.grid, Grid { t: 2, h: 4, w: 6 });

    let features = vm
        .image_features(&g["pixel_values"], &[v.grid])
        .expect("features");
    assert_close("video features", &features, &g["vision_features"]);

    // The prompt expanded: the video's tokens become image tokens, the
    // template's tokens around them stay.
    let (ids, order) = vm
        .expand_visuals(
            &collapsed_prompt(&g, video as u32),
            std::slice::from_ref(&v),
        )
        .expect("expand");
    assert_eq!(order.len(), 1);
    let want_ids: Vec<u32> = ints(&g["input_ids"])
        .iter()
        .map(|&t| {
            if t == video {
                vm.image_token as u32
            } else {
                t as u32
            }
        })
        .collect();
    assert_eq!(ids, want_ids, "expanded prompt");
    let ids: Vec<i64> = ids.iter().map(|&t| i64::from(t)).collect();

    let inputs = vm
        .prompt_inputs(&ids, Some(&features), &[v.grid])
        .expect("inputs");
    let got_pos = ints(inputs.positions.as_ref().expect("positions"));
    assert_eq!(got_pos, ints(&g["position_ids"]), "M-RoPE positions");
    assert_eq!(
        inputs.position_delta,
        Some(ints(&g["rope_delta"])[0] as i32),
        "position delta"
    );

    let mut cache = text.new_cache();
    let logits = vm
        .prefill(&text, &ids, Some(&g["pixel_values"]), &[v.grid], &mut cache)
        .expect("prefill");
    assert_close("prompt logits", &logits, &g["logits"]);

    // Greedy decoding after the cached prefill.
    assert_greedy_steps(&text, &mut cache, &logits, &g);
}

/// `generate_with_images` with a video (and a chat session with one)
/// continues as mlx-vlm; more videos than placeholders is an error.
#[test]
fn generation_with_a_video_continues_as_mlx_vlm() {
    let _guard = mlx_lock();
    let g = golden();
    let lm = LanguageModel::load(&model_dir(), &opts(&library(), None)).expect("load");
    let video = lm.vision().expect("tower").video_token.expect("videos") as u32;
    let v = golden_video(&g);
    let prompt = collapsed_prompt(&g, video);
    let params = GenerateParams {
        max_tokens: 16,
        ..GenerateParams::default()
    };
    let out = lm
        .generate_with_images(
            &prompt,
            std::slice::from_ref(&v),
            &params,
            None,
            None,
            &mut |_| {},
        )
        .expect("generate");
    let want: Vec<u32> = ints(&g["greedy_tokens"])
        .iter()
        .map(|&t| t as u32)
        .collect();
    assert_eq!(out.tokens, want);

    let two = [v.clone(), v.clone()];
    let err = lm
        .generate_with_images(&prompt, &two, &params, None, None, &mut |_| {})
        .expect_err("two videos, one placeholder")
        .to_string();
    assert!(
        err.contains("2 video(s) given but the prompt has 1 video placeholder(s)"),
        "{err}"
    );
    // An image where the prompt has a video placeholder.
    let image = ProcessedImage { video: false, ..v };
    let err = lm
        .generate_with_images(&prompt, &[image], &params, None, None, &mut |_| {})
        .expect_err("an image for a video placeholder")
        .to_string();
    assert!(err.contains("image placeholder"), "{err}");
}

fn frames() -> Vec<PathBuf> {
    ["photo.jpg", "wide.png", "gray.png"]
        .iter()
        .map(|n| goldens().join("vlm/images").join(n))
        .collect()
}

/// A 3-frame video (frames of different sizes, each resized to the first
/// frame's target; the last frame repeated to fill the second group)
/// against the Python processor's output.
#[test]
fn video_processing_matches_the_python_processor() {
    let _guard = mlx_lock();
    let proc = ImageProcessor::load(&model_dir()).expect("processor");
    let want = Array::load_safetensors(goldens().join("vlm/qwen2_vl_video/processor.safetensors"))
        .expect("processor tensors");
    let got = proc.process_video_files(&frames()).expect("video");
    assert!(got.video);
    assert_eq!(got.grid, grid(&want["video.grid"]), "grid");
    let wv = want["video.pixel_values"].as_slice::<f32>();
    assert_eq!(wv.len(), got.pixels.len(), "size");
    let max = got
        .pixels
        .iter()
        .zip(wv)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!(
        "video grid {:?}, {} tokens, max abs diff {max:.3e}",
        got.grid,
        got.grid.tokens(proc.merge_size)
    );
    assert!(max <= 1e-2, "max abs diff {max} above 1e-2");

    // A folder of the frames, in name order, is the same video.
    let tmp = tempfile::tempdir().expect("tempdir");
    for (k, f) in frames().iter().enumerate() {
        let ext = f.extension().and_then(|e| e.to_str()).expect("ext");
        std::fs::copy(f, tmp.path().join(format!("frame{k}.{ext}"))).expect("copy");
    }
    let listed = video_frames(&[tmp.path().to_path_buf()]).expect("frames");
    assert_eq!(listed.len(), 3);
    let again = proc.process_video_files(&listed).expect("video");
    assert_eq!(again, got);
}

/// Bad video input: clear errors, never a panic.
#[test]
fn bad_video_input_is_a_named_error() {
    let _guard = mlx_lock();
    let proc = ImageProcessor::load(&model_dir()).expect("processor");
    let err = proc.process_video(&[]).expect_err("no frames").to_string();
    assert!(err.contains("at least one frame"), "{err}");
    let err = video_frames(&[]).expect_err("no frames").to_string();
    assert!(err.contains("at least one frame"), "{err}");
    let empty = tempfile::tempdir().expect("tempdir");
    let err = video_frames(&[empty.path().to_path_buf()])
        .expect_err("empty folder")
        .to_string();
    assert!(err.contains("holds no frame files"), "{err}");
    let mut bad = frames();
    bad.push(PathBuf::from("tests/fixtures/vision/truncated.jpg"));
    let err = proc
        .process_video_files(&bad)
        .expect_err("truncated frame")
        .to_string();
    assert!(err.contains("truncated.jpg"), "{err}");

    // A model whose tower does not take videos (Gemma 3's).
    let lm = LanguageModel::load(&goldens().join("vlm/gemma3/model"), &opts(&library(), None))
        .expect("load");
    let err = lm
        .load_videos(&[frames()])
        .expect_err("no videos")
        .to_string();
    assert!(err.contains("takes no videos"), "{err}");
}

fn lmspec(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_lmspec"))
        .args(args)
        .current_dir(crate::support::root())
        .output()
        .expect("lmspec runs")
}

/// The qwen2_vl checkpoint with a chat template that writes video entries
/// (`<|vision_start|><|video_pad|><|vision_end|>`), as Qwen2-VL's does.
fn model_with_video_template() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(model_dir()).expect("model dir") {
        let path = entry.expect("entry").path();
        let name = path.file_name().expect("name");
        std::fs::copy(&path, tmp.path().join(name)).expect("copy");
    }
    let file = tmp.path().join("tokenizer_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).expect("read")).expect("json");
    let template = cfg["chat_template"].as_str().expect("template").replace(
        "{% elif c['type'] == 'text' %}",
        "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|> {% elif c['type'] == 'text' %}",
    );
    cfg["chat_template"] = serde_json::Value::String(template);
    std::fs::write(&file, cfg.to_string()).expect("write");
    tmp
}

/// `lmspec generate --video` (frames by commas or a folder) and `lmspec
/// chat --video`; bad videos are named errors.
#[test]
fn generate_and_chat_take_videos_on_the_command_line() {
    let tmp = model_with_video_template();
    let model = tmp.path().to_str().expect("utf-8").to_string();
    let list: Vec<String> = frames()
        .iter()
        .map(|p| p.to_str().expect("utf-8").to_string())
        .collect();
    let list = list.join(",");
    let base = ["generate", "--model", &model, "--max-tokens", "4"];
    let run = |extra: &[&str]| {
        let mut args: Vec<&str> = base.to_vec();
        args.extend_from_slice(extra);
        lmspec(&args)
    };
    let out = run(&["--video", &list, "-p", "w5 w6"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // 2 x 12 x 18 patches: 108 tokens, and 9 template and text tokens.
    assert!(err.contains("[prompt 117 tokens"), "{err}");
    // An image and a video together.
    let out = run(&[
        "--image",
        "goldens/vlm/images/gray.png",
        "--video",
        &list,
        "-p",
        "w5",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    for (args, says) in [
        (
            vec!["--video", "tests/fixtures/vision/truncated.jpg", "-p", "w5"],
            "truncated.jpg",
        ),
        (
            vec!["--video", &list, "--raw", "-p", "w5 w6"],
            "1 video(s) given but the prompt has 0 video placeholder(s)",
        ),
        (vec!["--video", ",", "-p", "w5"], "at least one frame"),
    ] {
        let out = run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(!err.contains("panicked"), "{err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }

    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lmspec"))
        .args([
            "chat",
            "--model",
            &model,
            "--video",
            &list,
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
    assert!(err.contains("[prompt 117 tokens"), "{err}");
    assert!(err.contains("[prompt 7 tokens"), "{err}");
}

/// A chat session with a video: the first turn answers as one
/// `generate_with_images` call on the same prompt; a text-only second turn
/// reuses the cache (the video's tokens included) and answers as the whole
/// conversation run from scratch.
#[test]
fn a_chat_session_keeps_its_video_across_turns() {
    let _guard = mlx_lock();
    let tmp = model_with_video_template();
    let lm = LanguageModel::load(tmp.path(), &opts(&library(), None)).expect("load");
    let videos = lm.load_videos(&[frames()]).expect("video");
    assert_chat_turns(&lm, videos, "video", 10, true);
}
