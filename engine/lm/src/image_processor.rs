//! Image preprocessing as a checkpoint's `preprocessor_config.json` says,
//! computing what the Python processor computes: decode (PNG, JPEG), to RGB
//! (transparency composited onto white), resize to a patch-grid size with
//! the processor's filter exactly as Pillow resamples 8-bit images, rescale,
//! normalise, and flatten into patches ordered by merge window
//! (`[grid_t · grid_h · grid_w, C · T · P · P]`), with the grid and the
//! number of placeholder tokens.
use std::path::{Path, PathBuf};

use lmspec_engine::error::{Error, Result};
use serde_json::Value as Json;

use crate::pil::over_white;
pub use crate::pil::{resize, Filter, RgbImage};
use crate::vision::Grid;

/// A processor that resizes each image to a multiple of the merged patch
/// size within a pixel budget and cuts it into patches (the settings of a
/// `preprocessor_config.json` with `patch_size`, `merge_size` and
/// `temporal_patch_size`).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    /// Pixels per patch side; 0 until the tower's `patch_size` fills it in
    /// (a fixed-size processor's config need not name it).
    pub patch_size: i64,
    /// `(height, width)` every image is resized to (`size.height` and
    /// `size.width`: the SigLIP-style processors), instead of the
    /// pixel-budget resize.
    pub fixed_size: Option<(i64, i64)>,
    /// The longest side an image may keep (`size.longest_edge` alone):
    /// a larger image is scaled down keeping its aspect ratio, then each
    /// side rounded up to a multiple of the patch, instead of the
    /// pixel-budget resize.
    pub longest_edge: Option<i64>,
    /// A first resize before the fixed-size one (`size.longest_edge` of a
    /// processor with `max_image_size`, Idefics3's): the longest side
    /// brought to this many pixels, up or down, the aspect ratio kept and
    /// the other side made even.
    pub first_longest_edge: Option<i64>,
    /// Why every image is refused (a `max_image_size` processor that
    /// splits its images into tiles), naming the file and field; the
    /// processor still loads, so the text model runs.
    pub refusal: Option<String>,
    /// Each patch flattened as (row, column, channel) instead of (channel,
    /// frame, row, column) (the token-budget processor's, LFM2-VL's).
    pub channels_last: bool,
    /// With `do_image_splitting` (the token-budget processor), the area in
    /// pixels above which an image, its sides rounded to the merged patch,
    /// would be split into tiles: such images are refused.
    pub split_above: Option<f64>,
    /// Transparency dropped when an image is made RGB (Pillow's
    /// `convert("RGB")`, the token-budget processor's) instead of
    /// composited onto white.
    pub drop_alpha: bool,
    pub temporal_patch_size: i64,
    pub merge_size: i64,
    pub min_pixels: i64,
    pub max_pixels: i64,
    pub do_resize: bool,
    pub resample: Filter,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

/// One image ready for the tower.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedImage {
    /// Flattened patches, row-major `[patches, C · T · P · P]`.
    pub pixels: Vec<f32>,
    pub grid: Grid,
    /// A video's frames (its grid's `t` counts groups of
    /// `temporal_patch_size` frames), shown at the video placeholder.
    pub video: bool,
}

impl ProcessedImage {
    /// Features of one flattened patch.
    pub fn patch_width(&self) -> usize {
        self.pixels.len() / self.grid.patches().max(1) as usize
    }
}

/// The largest image area a processor may resize to (8192 x 8192 pixels;
/// the released Qwen2-VL processors allow 12845056).
pub const MAX_TARGET_PIXELS: i64 = 1 << 26;
/// The largest patch side, merge size or frames per patch a config may set.
const MAX_PATCH: i64 = 1024;
/// The largest side of an image file accepted for decoding.
pub const MAX_IMAGE_SIDE: u32 = 1 << 15;

fn field_err(file: &Path, key: &str, msg: impl Into<String>) -> Error {
    Error::Config {
        file: file.to_path_buf(),
        key: key.to_string(),
        msg: msg.into(),
    }
}

fn get_int(j: &Json, file: &Path, key: &str, default: Option<i64>) -> Result<i64> {
    match j.get(key) {
        None | Some(Json::Null) => {
            default.ok_or_else(|| field_err(file, key, "required by the image processor"))
        }
        Some(v) => match v.as_i64() {
            Some(n) if n >= 1 => Ok(n),
            _ => Err(field_err(
                file,
                key,
                format!("expected a positive integer, got {v}"),
            )),
        },
    }
}

fn get_bool(j: &Json, file: &Path, key: &str, default: bool) -> Result<bool> {
    match j.get(key) {
        None | Some(Json::Null) => Ok(default),
        Some(Json::Bool(b)) => Ok(*b),
        Some(v) => Err(field_err(
            file,
            key,
            format!("expected true or false, got {v}"),
        )),
    }
}

fn get_triple(j: &Json, file: &Path, key: &str) -> Result<[f32; 3]> {
    let v = j
        .get(key)
        .ok_or_else(|| field_err(file, key, "required by the image processor"))?;
    let list: Option<Vec<f64>> = match v {
        Json::Array(a) => a.iter().map(Json::as_f64).collect(),
        Json::Number(n) => n.as_f64().map(|x| vec![x; 3]),
        _ => None,
    };
    match list.as_deref() {
        Some([a, b, c]) => Ok([*a as f32, *b as f32, *c as f32]),
        _ => Err(field_err(
            file,
            key,
            format!("expected three numbers, got {v}"),
        )),
    }
}

impl ImageProcessor {
    /// The processor of a checkpoint folder (its `preprocessor_config.json`).
    pub fn load(dir: &Path) -> Result<ImageProcessor> {
        let file = dir.join("preprocessor_config.json");
        let text = std::fs::read_to_string(&file).map_err(|source| Error::Io {
            path: file.clone(),
            source,
        })?;
        let json: Json = serde_json::from_str(&text)
            .map_err(|e| field_err(&file, "(file)", format!("not JSON: {e}")))?;
        ImageProcessor::from_json(&json, &file)
    }

    /// The processor of a parsed config; `file` is named in errors.
    pub fn from_json(j: &Json, file: &Path) -> Result<ImageProcessor> {
        let size = j.get("size");
        if get_bool(j, file, "do_pan_and_scan", false)? {
            return Err(field_err(
                file,
                "do_pan_and_scan",
                "pan-and-scan crops are not supported",
            ));
        }
        if let Some(max) = j.get("max_image_size").filter(|v| !v.is_null()) {
            return ImageProcessor::max_image_size(j, file, max);
        }
        if j.get("max_image_tokens").is_some_and(|v| !v.is_null()) {
            return ImageProcessor::token_budget(j, file);
        }
        let fixed = match size.map(|s| (s.get("height"), s.get("width"))) {
            Some((Some(_), Some(_))) => {
                let side = |key: &str| {
                    let v = &size.expect("size")[key];
                    v.as_i64()
                        .filter(|&n| (1..=MAX_IMAGE_SIDE as i64).contains(&n))
                        .ok_or_else(|| {
                            field_err(
                                file,
                                &format!("size.{key}"),
                                format!("expected a side of 1 to {MAX_IMAGE_SIDE} pixels, got {v}"),
                            )
                        })
                };
                Some((side("height")?, side("width")?))
            }
            _ => None,
        };
        if let Some((h, w)) = fixed {
            return ImageProcessor::settings(j, file, Some((h, w)), h * w, h * w);
        }
        // size.longest_edge alone (no shortest edge, no pixel bounds): a
        // bound on the longest side, not on the area.
        let longest_only = size
            .is_some_and(|s| s.get("longest_edge").is_some() && s.get("shortest_edge").is_none())
            && j.get("min_pixels").is_none_or(Json::is_null)
            && j.get("max_pixels").is_none_or(Json::is_null);
        if longest_only {
            let v = &size.expect("size")["longest_edge"];
            let side = v
                .as_i64()
                .filter(|&n| (1..=MAX_IMAGE_SIDE as i64).contains(&n))
                .ok_or_else(|| {
                    field_err(
                        file,
                        "size.longest_edge",
                        format!("expected a side of 1 to {MAX_IMAGE_SIDE} pixels, got {v}"),
                    )
                })?;
            let mut p = ImageProcessor::settings(j, file, None, 1, MAX_TARGET_PIXELS)?;
            p.longest_edge = Some(side);
            // Without a merge_size the tower's merge windows apply (the
            // processor config need not name them).
            if j.get("merge_size").is_none_or(Json::is_null) {
                p.merge_size = 0;
            }
            return Ok(p);
        }
        let min_pixels = match j.get("min_pixels") {
            Some(v) if !v.is_null() => get_int(j, file, "min_pixels", None)?,
            _ => match size.and_then(|s| s.get("shortest_edge")) {
                Some(v) => v.as_i64().filter(|&n| n >= 1).ok_or_else(|| {
                    field_err(
                        file,
                        "size.shortest_edge",
                        format!("expected a positive integer, got {v}"),
                    )
                })?,
                None => {
                    return Err(field_err(
                        file,
                        "min_pixels",
                        "required (or size.shortest_edge)",
                    ))
                }
            },
        };
        let max_pixels = match j.get("max_pixels") {
            Some(v) if !v.is_null() => get_int(j, file, "max_pixels", None)?,
            _ => match size.and_then(|s| s.get("longest_edge")) {
                Some(v) => v.as_i64().filter(|&n| n >= 1).ok_or_else(|| {
                    field_err(
                        file,
                        "size.longest_edge",
                        format!("expected a positive integer, got {v}"),
                    )
                })?,
                None => {
                    return Err(field_err(
                        file,
                        "max_pixels",
                        "required (or size.longest_edge)",
                    ))
                }
            },
        };
        ImageProcessor::settings(j, file, None, min_pixels, max_pixels)
    }

    /// A processor with `max_image_size` (Idefics3's): each image's longest
    /// side first brought to `size.longest_edge`, then the image resized
    /// to a `max_image_size.longest_edge` square. With
    /// `do_image_splitting` (true when absent) an image whose first resize
    /// is larger than the square is split into tiles plus a global image:
    /// not supported, so every image is refused at processing (when
    /// `size.longest_edge` is within the square nothing is split and the
    /// images are processed as without splitting).
    fn max_image_size(j: &Json, file: &Path, max: &Json) -> Result<ImageProcessor> {
        let split = get_bool(j, file, "do_image_splitting", true)?;
        let side = |v: Option<&Json>, key: &str| {
            v.and_then(Json::as_i64)
                .filter(|&n| (1..=MAX_IMAGE_SIDE as i64).contains(&n))
                .ok_or_else(|| {
                    field_err(
                        file,
                        key,
                        format!(
                            "expected a side of 1 to {MAX_IMAGE_SIDE} pixels, got {}",
                            v.map_or("nothing".to_string(), Json::to_string)
                        ),
                    )
                })
        };
        let square = side(max.get("longest_edge"), "max_image_size.longest_edge")?;
        let first = side(
            j.get("size").and_then(|s| s.get("longest_edge")),
            "size.longest_edge",
        )?;
        let mut p = ImageProcessor::settings(
            j,
            file,
            Some((square, square)),
            square * square,
            square * square,
        )?;
        p.first_longest_edge = Some(first);
        if split && first > square {
            let why = format!(
                "images are split into tiles of {square} pixels plus a global image (size.longest_edge {first} is above max_image_size.longest_edge {square}), which is not supported: set it to false for one {square}x{square} image each"
            );
            p.refusal = Some(field_err(file, "do_image_splitting", why).to_string());
        }
        Ok(p)
    }

    /// A processor with an image-token budget (`min_image_tokens`,
    /// `max_image_tokens`; LFM2-VL's): each image resized as `smart_resize`
    /// does with the factor `encoder_patch_size · downsample_factor` and
    /// the pixel bounds of the token budget (always: its checkpoints'
    /// `do_resize: false` is ignored, as the Python processor does), cut
    /// into patches in merge-window order, each flattened as (row, column,
    /// channel). With `do_image_splitting` (true when absent) an image
    /// large enough to be split into tiles is refused at processing.
    fn token_budget(j: &Json, file: &Path) -> Result<ImageProcessor> {
        let patch = match j.get("encoder_patch_size") {
            Some(v) if !v.is_null() => get_int(j, file, "encoder_patch_size", None)?,
            _ => get_int(j, file, "patch_size", Some(16))?,
        };
        let merge = get_int(j, file, "downsample_factor", Some(2))?;
        let min_tokens = get_int(j, file, "min_image_tokens", Some(64))?;
        let max_tokens = get_int(j, file, "max_image_tokens", None)?;
        for (key, v) in [("encoder_patch_size", patch), ("downsample_factor", merge)] {
            if !(1..=MAX_PATCH).contains(&v) {
                return Err(field_err(
                    file,
                    key,
                    format!("expected 1 to {MAX_PATCH}, got {v}"),
                ));
            }
        }
        let per_token = (patch * merge).pow(2);
        let tokens = MAX_TARGET_PIXELS / per_token;
        for (key, v) in [
            ("min_image_tokens", min_tokens),
            ("max_image_tokens", max_tokens),
        ] {
            if !(1..=tokens).contains(&v) {
                return Err(field_err(
                    file,
                    key,
                    format!("expected 1 to {tokens}, got {v}"),
                ));
            }
        }
        let tolerance = match j.get("max_pixels_tolerance") {
            None | Some(Json::Null) => 2.0,
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| {
                    field_err(
                        file,
                        "max_pixels_tolerance",
                        format!("expected a positive number, got {v}"),
                    )
                })?,
        };
        let (min_pixels, max_pixels) = (min_tokens * per_token, max_tokens * per_token);
        // The patch side and merge come from the keys above; a placeholder
        // fixed size lets the shared settings leave patch_size unread.
        let mut p = ImageProcessor::settings(j, file, Some((1, 1)), min_pixels, max_pixels)?;
        p.fixed_size = None;
        p.patch_size = patch;
        p.merge_size = merge;
        p.temporal_patch_size = 1;
        p.do_resize = true;
        p.channels_last = true;
        p.drop_alpha = true;
        if get_bool(j, file, "do_image_splitting", true)? {
            p.split_above = Some(max_pixels as f64 * tolerance);
        }
        Ok(p)
    }

    /// The settings every processor kind shares, read from `j`.
    fn settings(
        j: &Json,
        file: &Path,
        fixed_size: Option<(i64, i64)>,
        min_pixels: i64,
        max_pixels: i64,
    ) -> Result<ImageProcessor> {
        if max_pixels > MAX_TARGET_PIXELS {
            return Err(field_err(
                file,
                "max_pixels",
                format!("{max_pixels} is above the supported {MAX_TARGET_PIXELS}"),
            ));
        }
        if min_pixels > max_pixels {
            return Err(field_err(
                file,
                "min_pixels",
                format!("{min_pixels} is above max_pixels {max_pixels}"),
            ));
        }
        let resample = match j.get("resample") {
            None | Some(Json::Null) => Filter::Bicubic,
            Some(v) => match v.as_i64() {
                Some(0) => Filter::Nearest,
                Some(1) => Filter::Lanczos,
                Some(2) => Filter::Bilinear,
                Some(3) => Filter::Bicubic,
                _ => {
                    return Err(field_err(
                        file,
                        "resample",
                        format!("{v} is not a supported filter (0 nearest, 1 Lanczos, 2 bilinear, 3 bicubic)"),
                    ))
                }
            },
        };
        let rescale_factor = match j.get("rescale_factor") {
            None | Some(Json::Null) => 1.0 / 255.0,
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| {
                    field_err(
                        file,
                        "rescale_factor",
                        format!("expected a positive number, got {v}"),
                    )
                })?,
        };
        let image_std = get_triple(j, file, "image_std")?;
        if image_std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(field_err(file, "image_std", "each value must be positive"));
        }
        let bounded = |key: &str, default: Option<i64>| -> Result<i64> {
            let v = match (key, j.get(key)) {
                ("patch_size", Some(Json::Object(_))) => patch_sides(j, file)?,
                _ => get_int(j, file, key, default)?,
            };
            if v > MAX_PATCH {
                return Err(field_err(file, key, format!("{v} is above {MAX_PATCH}")));
            }
            Ok(v)
        };
        // A fixed-size processor may leave the patch side to the tower.
        let patch_default = fixed_size.map(|_| 0);
        Ok(ImageProcessor {
            patch_size: bounded("patch_size", patch_default)?,
            fixed_size,
            longest_edge: None,
            first_longest_edge: None,
            refusal: None,
            channels_last: false,
            split_above: None,
            drop_alpha: false,
            temporal_patch_size: bounded("temporal_patch_size", Some(1))?,
            merge_size: bounded("merge_size", Some(1))?,
            min_pixels,
            max_pixels,
            do_resize: get_bool(j, file, "do_resize", true)?,
            resample,
            do_rescale: get_bool(j, file, "do_rescale", true)?,
            rescale_factor,
            do_normalize: get_bool(j, file, "do_normalize", true)?,
            image_mean: get_triple(j, file, "image_mean")?,
            image_std,
        })
    }

    /// The processor with its merge size set (a longest-edge processor
    /// without one takes the model's: each side a multiple of patch x
    /// merge, the patches in merge-window order).
    pub fn with_merge_size(mut self, merge: i64) -> ImageProcessor {
        self.merge_size = merge;
        self
    }

    /// The processor with its patch side set (a fixed-size processor takes
    /// the tower's).
    pub fn with_patch_size(mut self, patch: i64) -> ImageProcessor {
        self.patch_size = patch;
        self
    }

    /// The size an image of `height` x `width` is resized to: each side a
    /// multiple of `patch_size · merge_size`, the area within
    /// `[min_pixels, max_pixels]`, the aspect ratio kept as closely as
    /// possible.
    pub fn target_size(&self, height: i64, width: i64) -> Result<(i64, i64)> {
        if let Some(size) = self.fixed_size {
            return Ok(size);
        }
        if let Some(side) = self.longest_edge {
            return longest_edge_resize(height, width, side, self.patch_size * self.merge_size);
        }
        smart_resize(
            height,
            width,
            self.patch_size * self.merge_size,
            self.min_pixels,
            self.max_pixels,
        )
    }

    /// Reads, decodes and processes an image file.
    pub fn process_file(&self, path: &Path) -> Result<ProcessedImage> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let img = decode_rgb_with(&bytes, path, !self.drop_alpha)?;
        self.process(&img)
    }

    /// Processes an RGB image.
    pub fn process(&self, img: &RgbImage) -> Result<ProcessedImage> {
        if let Some(why) = &self.refusal {
            return Err(Error::Usage(why.clone()));
        }
        let first;
        let img = match self.first_longest_edge {
            Some(side) if self.do_resize => {
                let (h, w) = longest_edge_to(img.height as i64, img.width as i64, side);
                first = if (h, w) == (img.height as i64, img.width as i64) {
                    img.clone()
                } else {
                    resize(img, w as usize, h as usize, self.resample)
                };
                &first
            }
            _ => img,
        };
        let (h, w) = (img.height as i64, img.width as i64);
        if let Some(limit) = self.split_above {
            // The Python processor's test for tiling: each side rounded to
            // the merged patch (at least one patch).
            let f = (self.patch_size * self.merge_size).max(1) as f64;
            let side = |x: i64| (self.patch_size as f64).max(round_half_even(x as f64 / f) * f);
            if side(h) * side(w) > limit {
                return Err(Error::Usage(format!(
                    "an image of {w}x{h} pixels is above the processor's single-image budget ({limit} pixels): it would be split into tiles (do_image_splitting), which is not supported; use a smaller image"
                )));
            }
        }
        let (th, tw) = if self.do_resize {
            self.target_size(h, w)?
        } else {
            (h, w)
        };
        if self.patch_size < 1 {
            return Err(Error::Usage(
                "the image processor has no patch_size (and no tower gave one)".into(),
            ));
        }
        if self.merge_size < 1 {
            return Err(Error::Usage(
                "the image processor has no merge_size (and no model gave one)".into(),
            ));
        }
        let factor = self.patch_size * self.merge_size;
        if th.saturating_mul(tw) > MAX_TARGET_PIXELS {
            return Err(Error::Usage(format!(
                "an image of {w}x{h} would be resized to {tw}x{th}, above {MAX_TARGET_PIXELS} pixels"
            )));
        }
        if th % factor != 0 || tw % factor != 0 {
            if self.fixed_size.is_some() {
                return Err(Error::Usage(format!(
                    "the processor's size {tw}x{th} does not divide into patches of {factor} pixels"
                )));
            }
            return Err(Error::Usage(format!(
                "image of {w}x{h} is not a multiple of {factor} pixels and the processor does not resize"
            )));
        }
        let chw = self.to_chw(img, th, tw);
        let grid = Grid {
            t: 1,
            h: th / self.patch_size,
            w: tw / self.patch_size,
        };
        Ok(ProcessedImage {
            pixels: self.patchify(&chw, th as usize, tw as usize),
            grid,
            video: false,
        })
    }

    /// An RGB image resized to `th` x `tw` (unless it has that size),
    /// rescaled and normalised as NumPy does: u8 -> f64 · factor -> f32,
    /// then (x - mean) / std in f32; planes `[3, th, tw]`.
    pub(crate) fn to_chw(&self, img: &RgbImage, th: i64, tw: i64) -> Vec<f32> {
        let resized;
        let img = if (th, tw) == (img.height as i64, img.width as i64) {
            img
        } else {
            resized = resize(img, tw as usize, th as usize, self.resample);
            &resized
        };
        let plane = (th * tw) as usize;
        let mut chw = vec![0f32; 3 * plane];
        for (k, px) in img.data.chunks_exact(3).enumerate() {
            for c in 0..3 {
                let mut v = f32::from(px[c]);
                if self.do_rescale {
                    v = (f64::from(px[c]) * self.rescale_factor) as f32;
                }
                if self.do_normalize {
                    v = (v - self.image_mean[c]) / self.image_std[c];
                }
                chw[c * plane + k] = v;
            }
        }
        chw
    }

    /// Patches of a `[3, H, W]` image in merge-window order, each flattened
    /// as (channel, frame, row, column) with the frame repeated
    /// `temporal_patch_size` times.
    fn patchify(&self, chw: &[f32], h: usize, w: usize) -> Vec<f32> {
        let (p, m, t) = (
            self.patch_size as usize,
            self.merge_size as usize,
            self.temporal_patch_size as usize,
        );
        let (gh, gw) = (h / p, w / p);
        let mut out = Vec::with_capacity(3 * t * h * w);
        for bh in 0..gh / m {
            for bw in 0..gw / m {
                for ih in 0..m {
                    for iw in 0..m {
                        let (y0, x0) = ((bh * m + ih) * p, (bw * m + iw) * p);
                        if self.channels_last {
                            for y in 0..p {
                                for x in 0..p {
                                    let at = (y0 + y) * w + x0 + x;
                                    out.extend((0..3).map(|c| chw[c * h * w + at]));
                                }
                            }
                            continue;
                        }
                        for c in 0..3 {
                            for _ in 0..t {
                                for y in 0..p {
                                    let row = c * h * w + (y0 + y) * w + x0;
                                    out.extend_from_slice(&chw[row..row + p]);
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    }
}

/// The size whose longest side is `side` (up or down), the other side
/// truncated to keep the aspect ratio and made even, then both scaled
/// below 4096 (Idefics3's first resize, computed as Hugging Face does in
/// double precision).
pub fn longest_edge_to(height: i64, width: i64, side: i64) -> (i64, i64) {
    const UPPER: i64 = 4096;
    let aspect = width as f64 / height as f64;
    let (mut h, mut w) = if width >= height {
        let h = (side as f64 / aspect) as i64;
        (h + h % 2, side)
    } else {
        let w = (side as f64 * aspect) as i64;
        (side, w + w % 2)
    };
    (h, w) = (h.max(1), w.max(1));
    let aspect = w as f64 / h as f64;
    if w >= h && w > UPPER {
        (h, w) = ((UPPER as f64 / aspect) as i64, UPPER);
    } else if h > w && h > UPPER {
        (h, w) = (UPPER, (UPPER as f64 * aspect) as i64);
    }
    (h.max(1), w.max(1))
}

/// A `patch_size` given as `{"height": P, "width": P}` (square patches only).
fn patch_sides(j: &Json, file: &Path) -> Result<i64> {
    let v = &j["patch_size"];
    match (
        v.get("height").and_then(Json::as_i64),
        v.get("width").and_then(Json::as_i64),
    ) {
        (Some(h), Some(w)) if h >= 1 && h == w => Ok(h),
        _ => Err(field_err(
            file,
            "patch_size",
            format!("expected a positive integer or a square {{height, width}}, got {v}"),
        )),
    }
}

/// The size an image of `height` x `width` is resized to under a bound on
/// its longest side: scaled down (each side floored) when a side is above
/// `longest`, then each side rounded up to a multiple of `factor`.
pub fn longest_edge_resize(
    height: i64,
    width: i64,
    longest: i64,
    factor: i64,
) -> Result<(i64, i64)> {
    if height < 1 || width < 1 {
        return Err(Error::Usage(format!(
            "an image of {width}x{height} pixels has no area"
        )));
    }
    let (mut h, mut w) = (height, width);
    let ratio = (height as f64 / longest as f64).max(width as f64 / longest as f64);
    if ratio > 1.0 {
        h = (height as f64 / ratio).floor() as i64;
        w = (width as f64 / ratio).floor() as i64;
    }
    let up = |x: i64| ((x.max(1) - 1) / factor + 1) * factor;
    Ok((up(h), up(w)))
}

/// Python's `round` (halves to even) of a non-negative ratio.
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc() - 0.5).abs() < 1e-12 && r % 2.0 != 0.0 {
        r - 1.0
    } else {
        r
    }
}

/// The resize target of the patch-grid processors (transformers'
/// `smart_resize`).
pub fn smart_resize(
    height: i64,
    width: i64,
    factor: i64,
    min_pixels: i64,
    max_pixels: i64,
) -> Result<(i64, i64)> {
    if height < 1 || width < 1 {
        return Err(Error::Usage(format!(
            "an image of {width}x{height} pixels has no area"
        )));
    }
    let ratio = height.max(width) as f64 / height.min(width) as f64;
    if ratio > 200.0 {
        return Err(Error::Usage(format!(
            "an image of {width}x{height} pixels: the aspect ratio {ratio:.1} is above 200"
        )));
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let mut hb = round_half_even(h / f) * f;
    let mut wb = round_half_even(w / f) * f;
    if hb * wb > max_pixels as f64 {
        let beta = (h * w / max_pixels as f64).sqrt();
        hb = f.max((h / beta / f).floor() * f);
        wb = f.max((w / beta / f).floor() * f);
    } else if hb * wb < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        hb = (h * beta / f).ceil() * f;
        wb = (w * beta / f).ceil() * f;
    }
    Ok((hb as i64, wb as i64))
}

/// Decodes PNG or JPEG bytes to RGB: transparency is composited onto white
/// (as Pillow's `alpha_composite` over an opaque white background), gray
/// replicated to three channels. `path` is named in errors.
pub fn decode_rgb(bytes: &[u8], path: &Path) -> Result<RgbImage> {
    decode_rgb_with(bytes, path, true)
}

/// [`decode_rgb`], with transparency composited onto white
/// (`composite`) or dropped (Pillow's `convert("RGB")`).
pub fn decode_rgb_with(bytes: &[u8], path: &Path, composite: bool) -> Result<RgbImage> {
    let bad = |msg: String| Error::Usage(format!("{}: {msg}", path.display()));
    let format = image::guess_format(bytes)
        .map_err(|_| bad("not a PNG or JPEG image (unknown format)".into()))?;
    if !matches!(format, image::ImageFormat::Png | image::ImageFormat::Jpeg) {
        return Err(bad(format!(
            "{format:?} images are not supported (PNG or JPEG)"
        )));
    }
    // libjpeg-turbo's decoder for JPEGs where it reads the file (CMYK and
    // other color spaces it cannot turn into RGB take the `image` crate's).
    let jpeg = match format {
        image::ImageFormat::Jpeg if !jpeg_is_complete(bytes) => {
            return Err(bad(
                "the JPEG data is truncated (no end-of-image marker after the scan)".into(),
            ))
        }
        image::ImageFormat::Jpeg => lmspec_formats::guard::catch_quietly(|| decode_jpeg(bytes))
            .ok()
            .and_then(|r| r.ok()),
        _ => None,
    };
    let (width, height, data) = match jpeg {
        Some(decoded) => decoded,
        None => decode_other(bytes, format, composite, &bad)?,
    };
    if width == 0 || height == 0 {
        return Err(bad(format!("the image is {width}x{height} pixels")));
    }
    Ok(RgbImage {
        width,
        height,
        data,
    })
}

/// PNGs (and JPEGs libjpeg-turbo does not read) through the `image` crate,
/// as (width, height, RGB bytes).
fn decode_other(
    bytes: &[u8],
    format: image::ImageFormat,
    composite: bool,
    bad: &dyn Fn(String) -> Error,
) -> Result<(usize, usize, Vec<u8>)> {
    let decode = || {
        let mut reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(MAX_IMAGE_SIDE);
        limits.max_image_height = Some(MAX_IMAGE_SIDE);
        reader.limits(limits);
        reader.decode()
    };
    let img = lmspec_formats::guard::catch_quietly(decode)
        .map_err(|e| bad(format!("the image decoder failed: {e}")))?
        .map_err(|e| bad(format!("cannot decode the image: {e}")))?;
    let (width, height) = (img.width() as usize, img.height() as usize);
    let data = if composite && img.color().has_alpha() {
        let rgba = img.to_rgba8();
        let mut out = Vec::with_capacity(width * height * 3);
        for px in rgba.pixels() {
            let a = u32::from(px[3]);
            for c in 0..3 {
                out.push(over_white(u32::from(px[c]), a));
            }
        }
        out
    } else {
        img.to_rgb8().into_raw()
    };
    Ok((width, height, data))
}

/// A JPEG as RGB through libjpeg-turbo's decoder (the `mozjpeg` crate):
/// the integer IDCT, fancy chroma upsampling and color conversion Pillow's
/// libjpeg-turbo uses, so the pixels equal Pillow's.
fn decode_jpeg(bytes: &[u8]) -> std::io::Result<(usize, usize, Vec<u8>)> {
    let d = mozjpeg::Decompress::new_mem(bytes)?;
    let (width, height) = (d.width(), d.height());
    let side = MAX_IMAGE_SIDE as usize;
    if width > side || height > side {
        return Err(std::io::Error::other(format!(
            "the image is {width}x{height} pixels, above {side} on a side"
        )));
    }
    if width == 0 || height == 0 {
        return Ok((width, height, Vec::new()));
    }
    let mut rgb = d.rgb()?;
    let rows: Vec<[u8; 3]> = rgb.read_scanlines()?;
    rgb.finish()?;
    Ok((width, height, rows.into_iter().flatten().collect()))
}

/// Whether a JPEG's last scan (SOS marker) is followed by the end-of-image
/// marker: a truncated file is an error, as in Pillow, rather than an
/// image filled with gray.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let sos = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    let eoi = bytes.windows(2).rposition(|w| w == [0xFF, 0xD9]);
    matches!((sos, eoi), (Some(s), Some(e)) if e > s)
}

/// The image files of a prompt, each processed (errors name the file).
pub fn process_files(proc: &ImageProcessor, paths: &[PathBuf]) -> Result<Vec<ProcessedImage>> {
    paths.iter().map(|p| proc.process_file(p)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_out_of_range_are_named_errors() {
        let base = serde_json::json!({"patch_size": 14, "min_pixels": 3136, "max_pixels": 12845056,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]});
        let file = Path::new("preprocessor_config.json");
        assert!(ImageProcessor::from_json(&base, file).is_ok());
        for (key, value, says) in [
            ("max_pixels", serde_json::json!(1u64 << 40), "max_pixels"),
            ("patch_size", serde_json::json!(5000), "patch_size"),
            ("min_pixels", serde_json::json!(1u64 << 25), "min_pixels"),
            ("image_std", serde_json::json!([0.5, 0.0, 0.5]), "image_std"),
            ("image_mean", serde_json::json!("x"), "image_mean"),
            ("resample", serde_json::json!(7), "resample"),
        ] {
            let mut j = base.clone();
            j[key] = value;
            let err = ImageProcessor::from_json(&j, file).unwrap_err().to_string();
            assert!(
                err.contains(says) && err.contains("preprocessor_config.json"),
                "{key}: {err}"
            );
        }
    }

    #[test]
    fn smart_resize_rounds_halves_to_even_and_keeps_the_budget() {
        // 42 / 28 = 1.5 rounds to 2 (Python), 70 / 28 = 2.5 to 2.
        assert_eq!(smart_resize(42, 70, 28, 1, 1 << 30).unwrap(), (56, 56));
        // Too small: scaled up to at least min_pixels.
        let (h, w) = smart_resize(10, 20, 28, 56 * 56, 1 << 30).unwrap();
        assert!(h * w >= 56 * 56 && h % 28 == 0 && w % 28 == 0);
        // Too large: scaled down within max_pixels.
        let (h, w) = smart_resize(1000, 3000, 28, 1, 28 * 28 * 64).unwrap();
        assert!(h * w <= 28 * 28 * 64, "{h}x{w}");
        assert!(smart_resize(0, 10, 28, 1, 100).is_err());
        assert!(smart_resize(1, 300, 28, 1, 1 << 30).is_err());
    }
}
