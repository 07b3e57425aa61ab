//! Vision-language models: a text model (the checkpoint's `generate` spec)
//! and a vision tower (its `vision` spec), both loaded from one checkpoint.
//! The tower turns an image's flattened patches into feature rows; the text
//! model's `splice` node writes them over the embeddings of the image
//! placeholder tokens, and its `mrope` nodes read 3-D (t, h, w) positions:
//! text tokens advance all three axes together, an image's tokens take
//! their cell of the merged patch grid.
//!
//! A tower whose spec binds `images_as_rows` (SigLIP: every image one
//! size) takes each image as a row of a batch instead; a text model whose
//! attention has `bidirectional_spans` reads the prompt's segment ids (each
//! image's run of tokens, or with `prompt_is_prefix` the whole prompt).
//!
//! A video (already-sampled frames, `crate::video`) is an image whose grid
//! has several temporal groups: its placeholder (`video_token_id`, when the
//! tower spec binds `takes_videos: true`) expands to image tokens, and its
//! tokens' t position advances by one per group.
//!
//! What the text spec's config names (bound from the checkpoint) say about
//! images: `image_token_id` (the placeholder), `spatial_merge_size` (patches
//! merged per side into one token), optionally `prompt_is_prefix` and
//! `image_placeholder` + `image_sequence` (what a chat template writes per
//! image and what it becomes).
use std::path::Path;

use lmspec_engine::error::{Error, Result};
use lmspec_engine::model::{read_config, LoadOptions, Model};
use lmspec_engine::{ForwardInputs, ModelCache};
use lmspec_spec::expr::Value;
use lmspec_spec::raw::Task;
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::Array;

use crate::image_processor::{ImageProcessor, ProcessedImage};
use crate::tokenizer::Tokenizer;

/// An image's patch grid: frames (temporal patches), rows, columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    pub t: i64,
    pub h: i64,
    pub w: i64,
}

impl Grid {
    pub fn patches(&self) -> i64 {
        self.t * self.h * self.w
    }

    /// Placeholder tokens of the image: one per merge window.
    pub fn tokens(&self, merge: i64) -> i64 {
        self.patches() / (merge * merge)
    }
}

/// The tower's inputs for images of `grids` whose patches come in merge
/// window order (as the processor flattens them): each patch's (row,
/// column) and one attention segment per frame.
pub fn tower_inputs(grids: &[Grid], merge: i64) -> Result<ForwardInputs> {
    let (mut rows, mut cols, mut seg) = (Vec::new(), Vec::new(), Vec::new());
    let mut frame = 0i32;
    for g in grids {
        if g.t < 1 || g.h < 1 || g.w < 1 || g.h % merge != 0 || g.w % merge != 0 {
            return Err(Error::Usage(format!(
                "image grid {}x{}x{} is not a positive multiple of the merge size {merge}",
                g.t, g.h, g.w
            )));
        }
        for _ in 0..g.t {
            for bh in 0..g.h / merge {
                for bw in 0..g.w / merge {
                    for ih in 0..merge {
                        for iw in 0..merge {
                            rows.push((bh * merge + ih) as i32);
                            cols.push((bw * merge + iw) as i32);
                            seg.push(frame);
                        }
                    }
                }
            }
            frame += 1;
        }
    }
    let n = rows.len() as i32;
    rows.extend(cols);
    Ok(ForwardInputs {
        positions: Some(Array::from_slice(&rows, &[2, n])),
        segments: Some(Array::from_slice(&seg, &[n])),
        grids: Some(grids.iter().map(|g| [g.t, g.h, g.w]).collect()),
        ..ForwardInputs::default()
    })
}

/// The tower's input and forward inputs for images given as flattened
/// patches `[Σ patches, F]` with their grids. A tower whose spec binds
/// `images_as_rows: true` (every image resized to one size) takes the
/// images as the rows of a batch `[images, patches, F]`, each patch row-major
/// in its image; any other takes one row of all patches in merge-window
/// order, with positions and segments from [`tower_inputs`].
pub fn tower_batch(
    tower: &Model,
    pixels: &Array,
    grids: &[Grid],
    merge: i64,
) -> Result<(Array, ForwardInputs)> {
    let rows = tower
        .config
        .get("images_as_rows")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if !rows {
        return Ok((pixels.clone(), tower_inputs(grids, merge)?));
    }
    let Some(first) = grids.first() else {
        return Err(Error::Usage("no images given to the tower".into()));
    };
    if let Some(g) = grids.iter().find(|g| *g != first) {
        return Err(Error::Usage(format!(
            "images of a fixed-size tower must share one patch grid: {}x{}x{} and {}x{}x{}",
            first.t, first.h, first.w, g.t, g.h, g.w
        )));
    }
    let width = pixels.shape().get(1).copied().unwrap_or(0);
    let batch = pixels.reshape(&[grids.len() as i32, first.patches() as i32, width])?;
    let grids = grids.iter().map(|g| [g.t, g.h, g.w]).collect();
    Ok((
        batch,
        ForwardInputs {
            grids: Some(grids),
            ..ForwardInputs::default()
        },
    ))
}

/// Segment ids `[T]` of a prompt: each run of `image` tokens its own span
/// (0, 1, ... in order), text -1 (read by attention that is bidirectional
/// within an image's tokens).
pub fn image_spans(ids: &[i64], image: i64) -> Vec<i32> {
    let mut next = 0;
    let mut out = Vec::with_capacity(ids.len());
    for (k, &t) in ids.iter().enumerate() {
        if t != image {
            out.push(-1);
            continue;
        }
        if k > 0 && ids[k - 1] == image {
            out.push(next - 1);
        } else {
            out.push(next);
            next += 1;
        }
    }
    out
}

/// 3-D (t, h, w) positions `[3][T]` of a prompt whose runs of `image`
/// tokens stand for the images of `grids` in order, and the delta later
/// positions add (the largest position + 1 - the prompt's length). Text
/// tokens advance all axes together; an image's tokens take
/// `start + (t, h, w)` over its merged grid, and the text after it starts
/// past the image's largest position.
pub fn text_positions(
    ids: &[i64],
    grids: &[Grid],
    image: i64,
    merge: i64,
) -> Result<([Vec<i32>; 3], i32)> {
    let mut pos: [Vec<i32>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    let mut next = 0i64;
    let mut k = 0usize;
    let mut used = 0usize;
    while k < ids.len() {
        if ids[k] != image {
            for p in pos.iter_mut() {
                p.push(next as i32);
            }
            next += 1;
            k += 1;
            continue;
        }
        let Some(g) = grids.get(used) else {
            return Err(Error::Usage(format!(
                "the prompt has more image placeholders (token {image}) than the {} image(s) given",
                grids.len()
            )));
        };
        used += 1;
        let (gh, gw) = (g.h / merge, g.w / merge);
        let count = (g.t * gh * gw) as usize;
        if k + count > ids.len() || ids[k..k + count].iter().any(|&t| t != image) {
            return Err(Error::Usage(format!(
                "image {used} needs {count} placeholder tokens (id {image}) in a row at position {k}"
            )));
        }
        for t in 0..g.t {
            for h in 0..gh {
                for w in 0..gw {
                    pos[0].push((next + t) as i32);
                    pos[1].push((next + h) as i32);
                    pos[2].push((next + w) as i32);
                }
            }
        }
        next += g.t.max(gh).max(gw);
        k += count;
    }
    if used != grids.len() {
        return Err(Error::Usage(format!(
            "{} image(s) given but the prompt has placeholders for {used}",
            grids.len()
        )));
    }
    Ok((pos, (next - ids.len() as i64) as i32))
}

/// A vision tower with what the text model says about images; it runs
/// beside the text model it was loaded with.
#[derive(Debug)]
pub struct VisionModel {
    pub tower: Model,
    /// The checkpoint's image processor, when it has a
    /// `preprocessor_config.json`.
    pub processor: Option<ImageProcessor>,
    /// The placeholder token id.
    pub image_token: i64,
    /// The video placeholder token id (the text spec's `video_token_id`),
    /// when the model takes videos (its tower spec binds `takes_videos:
    /// true`: each temporal group of a video advances the t position by
    /// one).
    pub video_token: Option<i64>,
    /// Patches merged per side into one placeholder token.
    pub merge: i64,
    /// The whole prompt of an image prompt is one bidirectional span (a
    /// prefix-LM: the text spec binds `prompt_is_prefix: true`); otherwise
    /// each image's run of placeholders is one.
    pub prompt_is_prefix: bool,
    /// An image's tokens come in rows of its merged grid with break tokens
    /// between them (the text spec binds `image_row_break`): the text
    /// model then takes sequence positions only.
    pub image_rows: bool,
    /// What the chat template writes per image and what it becomes, when
    /// the text spec says (see [`image_expansion`]); otherwise the template
    /// writes one image token per image.
    pub expansion: Option<Expansion>,
}

/// A per-image placeholder token and the tokens around the image's run of
/// image tokens that replace it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expansion {
    pub placeholder: u32,
    pub before: Vec<u32>,
    pub after: Vec<u32>,
    /// Tokens between the rows of an image's tokens (`image_row_break`):
    /// when present, the image's tokens are its merged grid's rows, each
    /// but the last followed by these.
    pub row_break: Vec<u32>,
}

/// The expansion a text spec declares with `image_placeholder` (the text a
/// chat template writes per image, one token of the vocabulary) and
/// `image_sequence` (the text it becomes, `{image}` standing for the
/// image's tokens), tokenized with the checkpoint's tokenizer; `None` when
/// the spec binds neither. With `image_row_break` the image's tokens come
/// in rows of its merged grid, that text between each two rows.
pub fn image_expansion(text: &Model, tok: &Tokenizer) -> Result<Option<Expansion>> {
    let get = |key: &str| match text.config.get(key) {
        Some(Value::Str(s)) => Some(s.clone()),
        _ => None,
    };
    let row_break = get("image_row_break");
    let (placeholder, sequence) = match (get("image_placeholder"), get("image_sequence")) {
        (None, None) if row_break.is_some() => {
            return Err(Error::Usage(format!(
                "{}: the spec binds image_row_break without image_placeholder and image_sequence",
                text.dir.display()
            )))
        }
        (None, None) => return Ok(None),
        (Some(p), Some(s)) => (p, s),
        _ => {
            return Err(Error::Usage(format!(
                "{}: the spec binds only one of image_placeholder and image_sequence",
                text.dir.display()
            )))
        }
    };
    let Some(id) = tok.token_to_id(&placeholder) else {
        return Err(Error::Usage(format!(
            "{}: image_placeholder '{placeholder}' is not a token of the vocabulary",
            text.dir.display()
        )));
    };
    let parts: Vec<&str> = sequence.split("{image}").collect();
    let [before, after] = parts[..] else {
        return Err(Error::Usage(format!(
            "{}: image_sequence '{}' must hold {{image}} once",
            text.dir.display(),
            sequence.escape_debug()
        )));
    };
    let row_break = match row_break {
        Some(text) => tok.tokenize(&text, false, true)?,
        None => Vec::new(),
    };
    Ok(Some(Expansion {
        placeholder: id,
        before: tok.tokenize(before, false, true)?,
        after: tok.tokenize(after, false, true)?,
        row_break,
    }))
}

fn config_int(m: &Model, key: &str) -> Result<i64> {
    m.config.get(key).and_then(Value::as_i64).ok_or_else(|| {
        Error::Usage(format!(
            "{}: the spec binds no '{key}': it takes no images",
            m.dir.display()
        ))
    })
}

/// Whether the checkpoint in `dir` has a vision tower spec (a `vision` spec
/// claims its `model_type`).
pub fn has_tower(dir: &Path, opts: &LoadOptions) -> Result<bool> {
    let (_, json) = read_config(dir)?;
    let model_type = json
        .get("model_type")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    Ok(opts.library()?.claims_for_task(model_type, Task::Vision))
}

impl VisionModel {
    /// Loads the tower of the checkpoint whose text model is `text`; a
    /// checkpoint whose type no `vision` spec claims is refused (its model
    /// takes no images).
    pub fn load(dir: &Path, opts: &LoadOptions, text: &Model) -> Result<VisionModel> {
        if !has_tower(dir, opts)? {
            let (config_file, json) = read_config(dir)?;
            let model_type = json
                .get("model_type")
                .and_then(|v| v.as_str())
                .unwrap_or("");
            return Err(Error::Usage(format!(
                "{}: model_type '{model_type}' has no vision tower spec: the model takes no images",
                config_file.display()
            )));
        }
        let tower = Model::load(dir, &opts.clone().with_task(Task::Vision))?;
        let processor = match dir.join("preprocessor_config.json").exists() {
            true => Some(ImageProcessor::load(dir)?),
            false => None,
        };
        let image_token = config_int(text, "image_token_id")?;
        let merge = config_int(text, "spatial_merge_size")?;
        // The patch order the tower reads: merge windows, or row-major
        // (merge 1) for a tower that takes each image as a batch row.
        let rows = tower
            .config
            .get("images_as_rows")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let order = if rows { 1 } else { merge };
        let processor = match processor {
            Some(p) if p.patch_size == 0 => {
                Some(p.with_patch_size(config_int(&tower, "patch_size")?))
            }
            p => p,
        };
        let processor = match processor {
            Some(p) if p.merge_size == 0 => Some(p.with_merge_size(order)),
            p => p,
        };
        if let Some(p) = &processor {
            if p.merge_size != order {
                return Err(Error::Usage(format!(
                    "{}: merge_size {} differs from the tower's patch order (merge windows of {order})",
                    dir.join("preprocessor_config.json").display(),
                    p.merge_size
                )));
            }
            // A fixed-size tower's position table fits one grid: the
            // processor's size must give it.
            if let (true, Some((h, w)), Some(side)) = (
                rows,
                p.fixed_size,
                tower.config.get("patches_per_side").and_then(Value::as_i64),
            ) {
                let patch = p.patch_size.max(1);
                if h != side * patch || w != side * patch {
                    return Err(Error::Usage(format!(
                        "{}: size {w}x{h} does not give the tower's {side}x{side} patches of {patch} pixels (vision_config image_size / patch_size)",
                        dir.join("preprocessor_config.json").display()
                    )));
                }
            }
        }
        let prompt_is_prefix = text
            .config
            .get("prompt_is_prefix")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let video_token = match tower.config.get("takes_videos").and_then(Value::as_bool) {
            Some(true) => text.config.get("video_token_id").and_then(Value::as_i64),
            _ => None,
        };
        Ok(VisionModel {
            tower,
            processor,
            image_token,
            video_token,
            merge,
            prompt_is_prefix,
            image_rows: matches!(text.config.get("image_row_break"), Some(Value::Str(_))),
            expansion: None,
        })
    }

    /// Feature rows `[Σ tokens, D]` of images given as flattened patches
    /// `[Σ patches, F]` with their grids.
    pub fn image_features(&self, pixels: &Array, grids: &[Grid]) -> Result<Array> {
        let n: i64 = grids.iter().map(Grid::patches).sum();
        let s = pixels.shape();
        if s.len() != 2 || s[0] as i64 != n {
            return Err(Error::Usage(format!(
                "pixel values must be [{n}, F] for the grids given, got {s:?}"
            )));
        }
        let (pixels, inputs) = tower_batch(&self.tower, pixels, grids, self.merge)?;
        let (out, _) = self.tower.encode(&pixels, &inputs, &[])?;
        let d = out.shape()[2];
        Ok(out.reshape(&[-1, d])?)
    }

    /// The forward inputs of a prompt `ids` with images (their feature rows
    /// and grids).
    pub fn prompt_inputs(
        &self,
        ids: &[i64],
        features: Option<&Array>,
        grids: &[Grid],
    ) -> Result<ForwardInputs> {
        if self.image_rows {
            return self.row_prompt_inputs(ids, features, grids);
        }
        let (pos, delta) = text_positions(ids, grids, self.image_token, self.merge)?;
        let t = ids.len() as i32;
        let flat: Vec<i32> = pos.concat();
        let spans = match self.prompt_is_prefix {
            true => vec![0; ids.len()],
            false => image_spans(ids, self.image_token),
        };
        Ok(ForwardInputs {
            positions: Some(Array::from_slice(&flat, &[3, t])),
            segments: Some(Array::from_slice(&spans, &[t])),
            features: features.cloned(),
            position_delta: Some(delta),
            ..ForwardInputs::default()
        })
    }

    /// The forward inputs of a prompt whose images' tokens come in rows:
    /// the placeholders must number the images' tokens; positions are the
    /// sequence's (no per-axis positions, no delta).
    fn row_prompt_inputs(
        &self,
        ids: &[i64],
        features: Option<&Array>,
        grids: &[Grid],
    ) -> Result<ForwardInputs> {
        let found = ids.iter().filter(|&&t| t == self.image_token).count() as i64;
        let want: i64 = grids.iter().map(|g| g.tokens(self.merge)).sum();
        if found != want {
            return Err(Error::Usage(format!(
                "the prompt has {found} image tokens (id {}) but its {} image(s) have {want}",
                self.image_token,
                grids.len()
            )));
        }
        let spans = image_spans(ids, self.image_token);
        Ok(ForwardInputs {
            segments: Some(Array::from_slice(&spans, &[ids.len() as i32])),
            features: features.cloned(),
            position_delta: Some(0),
            ..ForwardInputs::default()
        })
    }

    /// Logits `[1, T, vocab]` of `text` on a prompt with images, written
    /// into `cache` (decoding then continues with `text.forward`).
    pub fn prefill(
        &self,
        text: &Model,
        ids: &[i64],
        pixels: Option<&Array>,
        grids: &[Grid],
        cache: &mut ModelCache,
    ) -> Result<Array> {
        let inputs = self.prefill_inputs(text, ids, ids.len(), pixels, grids)?;
        let tokens: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
        let tokens = Array::from_slice(&tokens, &[1, tokens.len() as i32]);
        Ok(text
            .forward_with_inputs(&tokens, Some(cache), &inputs, &[])?
            .0)
    }

    /// The inputs of the first `n` tokens of a prompt with images (the
    /// position delta is the whole prompt's, so the rest continues it).
    fn prefill_inputs(
        &self,
        text: &Model,
        ids: &[i64],
        n: usize,
        pixels: Option<&Array>,
        grids: &[Grid],
    ) -> Result<ForwardInputs> {
        text.check_tokens(ids, "the prompt")?;
        let features = match pixels {
            Some(p) => Some(self.image_features(p, grids)?),
            None if grids.is_empty() => None,
            None => return Err(Error::Usage("image grids given without pixels".into())),
        };
        let mut inputs = self.prompt_inputs(ids, features.as_ref(), grids)?;
        if n < ids.len() {
            if ids[n..].contains(&self.image_token) {
                return Err(Error::Usage(
                    "an image placeholder ends the prompt: nothing to continue from".into(),
                ));
            }
            if let Some(p) = inputs.positions.take() {
                inputs.positions = Some(p.try_index((.., ..n as i32))?);
            }
            if let Some(sg) = inputs.segments.take() {
                inputs.segments = Some(sg.try_index(..n as i32)?);
            }
        }
        Ok(inputs)
    }

    /// Replaces each image placeholder of `ids` by as many placeholders as
    /// its image has tokens; the number of placeholders must equal the
    /// number of images.
    pub fn expand_placeholders(&self, ids: &[u32], grids: &[Grid]) -> Result<Vec<u32>> {
        let image = self.image_token as u32;
        let token = self.expansion.as_ref().map_or(image, |e| e.placeholder);
        let found = ids.iter().filter(|&&t| t == token).count();
        if found != grids.len() {
            return Err(Error::Usage(format!(
                "{} image(s) given but the prompt has {found} image placeholder(s)",
                grids.len()
            )));
        }
        let mut out = Vec::with_capacity(ids.len());
        let mut k = 0;
        for &t in ids {
            if t == token {
                let n = grids[k].tokens(self.merge);
                if let Some(e) = &self.expansion {
                    out.extend_from_slice(&e.before);
                }
                match &self.expansion {
                    Some(e) if !e.row_break.is_empty() => {
                        let g = grids[k];
                        let (rows, cols) = (g.t * g.h / self.merge, g.w / self.merge);
                        for r in 0..rows {
                            if r > 0 {
                                out.extend_from_slice(&e.row_break);
                            }
                            out.extend(std::iter::repeat_n(image, cols as usize));
                        }
                    }
                    _ => out.extend(std::iter::repeat_n(image, n as usize)),
                }
                if let Some(e) = &self.expansion {
                    out.extend_from_slice(&e.after);
                }
                k += 1;
            } else {
                out.push(t);
            }
        }
        Ok(out)
    }

    /// Expands the placeholders of a prompt with images and videos: each
    /// image placeholder takes the next image, each video placeholder
    /// (`video_token_id`) the next video, each becoming as many image
    /// tokens as the image or video has (the features are spliced at image
    /// tokens; the template's tokens around them stay). Returns the
    /// expanded prompt and the images and videos in the order the prompt
    /// shows them.
    pub fn expand_visuals(
        &self,
        ids: &[u32],
        visuals: &[ProcessedImage],
    ) -> Result<(Vec<u32>, Vec<ProcessedImage>)> {
        let (videos, images): (Vec<&ProcessedImage>, Vec<&ProcessedImage>) =
            visuals.iter().partition(|v| v.video);
        if videos.is_empty() {
            let grids: Vec<Grid> = visuals.iter().map(|i| i.grid).collect();
            return Ok((self.expand_placeholders(ids, &grids)?, visuals.to_vec()));
        }
        let Some(video) = self.video_token else {
            return Err(Error::Usage(format!(
                "{}: the model takes no videos (its tower spec binds no takes_videos, or its text spec no video_token_id)",
                self.tower.dir.display()
            )));
        };
        if self.expansion.is_some() || self.image_rows {
            return Err(Error::Usage(
                "videos need a model whose template writes one image token per image".into(),
            ));
        }
        let image = self.image_token as u32;
        let count = |t: u32| ids.iter().filter(|&&x| x == t).count();
        let (found_i, found_v) = (count(image), count(video as u32));
        if found_i != images.len() {
            return Err(Error::Usage(format!(
                "{} image(s) given but the prompt has {found_i} image placeholder(s) (token {image})",
                images.len()
            )));
        }
        if found_v != videos.len() {
            return Err(Error::Usage(format!(
                "{} video(s) given but the prompt has {found_v} video placeholder(s) (video_token_id {video})",
                videos.len()
            )));
        }
        let (mut ki, mut kv) = (0, 0);
        let mut out = Vec::with_capacity(ids.len());
        let mut order = Vec::with_capacity(visuals.len());
        for &t in ids {
            let item = if t == image {
                ki += 1;
                images[ki - 1]
            } else if i64::from(t) == video {
                kv += 1;
                videos[kv - 1]
            } else {
                out.push(t);
                continue;
            };
            out.extend(std::iter::repeat_n(
                image,
                item.grid.tokens(self.merge) as usize,
            ));
            order.push(item.clone());
        }
        Ok((out, order))
    }

    /// Prefills `text` with the tokens `start..` of an expanded prompt but
    /// the last (the cache holds those before `start`; the images spliced
    /// in, M-RoPE positions of the whole prompt), so that generation
    /// continues from the last token; returns that token.
    pub fn prefill_for_generation(
        &self,
        text: &Model,
        ids: &[u32],
        start: usize,
        images: &[ProcessedImage],
        cache: &mut ModelCache,
    ) -> Result<u32> {
        let Some((&last, head)) = ids.split_last() else {
            return Err(Error::Usage("the prompt is empty".into()));
        };
        if start > head.len() || start as i32 != cache.offset() {
            return Err(Error::Usage(format!(
                "prefill from token {start}: the cache holds {}",
                cache.offset()
            )));
        }
        let ids64: Vec<i64> = ids.iter().map(|&t| i64::from(t)).collect();
        let grids: Vec<Grid> = images.iter().map(|i| i.grid).collect();
        let pixels = stack_pixels(images)?;
        // A prefix-LM's last prompt token belongs to the bidirectional
        // prefix: the whole prompt is prefilled, then the cache rewound by
        // one so that generation feeds that token again (its own state is
        // the same either way: it sees every earlier token in both).
        let prefix = self.prompt_is_prefix && !images.is_empty();
        let n = if prefix { ids.len() } else { head.len() };
        let mut inputs = self.prefill_inputs(text, &ids64, n, pixels.as_ref(), &grids)?;
        if start > 0 {
            // Only the rows and positions of the tokens not cached yet.
            let before = ids[..start]
                .iter()
                .filter(|&&t| i64::from(t) == self.image_token)
                .count() as i32;
            let after = ids[start..n]
                .iter()
                .filter(|&&t| i64::from(t) == self.image_token)
                .count() as i32;
            if let Some(f) = inputs.features.take() {
                inputs.features = Some(f.try_index(before..before + after)?);
            }
            if let Some(p) = inputs.positions.take() {
                inputs.positions = Some(p.try_index((.., start as i32..))?);
            }
            if let Some(sg) = inputs.segments.take() {
                inputs.segments = Some(sg.try_index(start as i32..)?);
            }
        }
        let fed = &ids[start..n];
        if !fed.is_empty() {
            let tokens: Vec<i32> = fed.iter().map(|&t| t as i32).collect();
            let tokens = Array::from_slice(&tokens, &[1, tokens.len() as i32]);
            let (out, _) = text.forward_with_inputs(&tokens, Some(cache), &inputs, &[])?;
            out.eval()?;
        }
        if prefix && !cache.trim(1) {
            return Err(Error::Usage(
                "the model's cache cannot rewind the prompt's last token (a prefix-LM prompt)"
                    .into(),
            ));
        }
        Ok(last)
    }
}

/// The patches of several images stacked `[Σ patches, F]`.
fn stack_pixels(images: &[ProcessedImage]) -> Result<Option<Array>> {
    let Some(first) = images.first() else {
        return Ok(None);
    };
    let width = first.patch_width();
    let mut all = Vec::new();
    for img in images {
        if img.patch_width() != width {
            return Err(Error::Usage("images of different patch widths".into()));
        }
        all.extend_from_slice(&img.pixels);
    }
    let rows = (all.len() / width.max(1)) as i32;
    Ok(Some(Array::from_slice(&all, &[rows, width as i32])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_follow_the_merged_grid_of_each_image() {
        // text, image (1 x 4 x 6 patches -> 2 x 3 tokens), text.
        let g = [Grid { t: 1, h: 4, w: 6 }];
        let ids = [1, 2, 9, 9, 9, 9, 9, 9, 3];
        let (pos, delta) = text_positions(&ids, &g, 9, 2).expect("positions");
        assert_eq!(pos[0], [0, 1, 2, 2, 2, 2, 2, 2, 5]);
        assert_eq!(pos[1], [0, 1, 2, 2, 2, 3, 3, 3, 5]);
        assert_eq!(pos[2], [0, 1, 2, 3, 4, 2, 3, 4, 5]);
        assert_eq!(delta, 6 - 9);
    }

    #[test]
    fn a_video_advances_the_time_axis_per_temporal_group() {
        // text, video (2 groups of 2 x 4 patches -> 2 x (1 x 2) tokens), text.
        let g = [Grid { t: 2, h: 2, w: 4 }];
        let ids = [1, 9, 9, 9, 9, 3];
        let (pos, delta) = text_positions(&ids, &g, 9, 2).expect("positions");
        assert_eq!(pos[0], [0, 1, 1, 2, 2, 3]);
        assert_eq!(pos[1], [0, 1, 1, 1, 1, 3]);
        assert_eq!(pos[2], [0, 1, 2, 1, 2, 3]);
        assert_eq!(delta, 4 - 6);
    }

    #[test]
    fn placeholder_and_image_counts_must_agree() {
        let g = [Grid { t: 1, h: 2, w: 2 }];
        let err = text_positions(&[1, 9, 9], &g, 9, 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("more image placeholders"), "{err}");
        let two = [g[0], g[0]];
        let err = text_positions(&[1, 9], &two, 9, 2).unwrap_err().to_string();
        assert!(err.contains("2 image(s) given"), "{err}");
        let big = [Grid { t: 1, h: 4, w: 4 }];
        let err = text_positions(&[1, 9, 9, 2], &big, 9, 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs 4 placeholder tokens"), "{err}");
    }

    #[test]
    fn tower_positions_come_in_merge_window_order() {
        let inputs = tower_inputs(&[Grid { t: 1, h: 2, w: 4 }], 2).expect("inputs");
        let p = inputs.positions.expect("positions");
        let v: Vec<i32> = p.as_slice::<i32>().to_vec();
        assert_eq!(&v[..8], &[0, 0, 1, 1, 0, 0, 1, 1]);
        assert_eq!(&v[8..], &[0, 1, 0, 1, 2, 3, 2, 3]);
        assert!(tower_inputs(&[Grid { t: 1, h: 3, w: 4 }], 2).is_err());
    }
}
