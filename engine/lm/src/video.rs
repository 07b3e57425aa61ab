//! Videos as already-sampled frames, for a patch-grid processor with
//! `temporal_patch_size` (Qwen2-VL's): every frame resized to the first
//! frame's target and normalised as an image is, the frames grouped by
//! `temporal_patch_size` (the last frame repeated to fill the last group),
//! each patch flattened as (channel, frame, row, column) in merge-window
//! order within each group. Decoding video files (mp4, ...) is not done
//! here: a video is its frame images.
use std::path::PathBuf;

use lmspec_engine::error::{Error, Result};

use crate::image_processor::{decode_rgb_with, ImageProcessor, ProcessedImage, RgbImage};
use crate::vision::Grid;

impl ImageProcessor {
    /// Reads, decodes and processes the frames of a video (already sampled,
    /// in order) into one grid; errors name the file.
    pub fn process_video_files(&self, frames: &[PathBuf]) -> Result<ProcessedImage> {
        let mut images = Vec::with_capacity(frames.len());
        for path in frames {
            let bytes = std::fs::read(path).map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            images.push(decode_rgb_with(&bytes, path, !self.drop_alpha)?);
        }
        self.process_video(&images)
    }

    /// Processes the frames of a video: every frame resized to the first
    /// frame's target size, rescaled and normalised as an image is, the
    /// frames grouped by `temporal_patch_size` (the last frame repeated to
    /// fill the last group); grid (groups, rows, columns), each patch
    /// flattened as (channel, frame, row, column) in merge-window order
    /// within each group.
    pub fn process_video(&self, frames: &[RgbImage]) -> Result<ProcessedImage> {
        let Some(first) = frames.first() else {
            return Err(Error::Usage("a video needs at least one frame".into()));
        };
        if self.channels_last
            || self.fixed_size.is_some()
            || self.longest_edge.is_some()
            || self.first_longest_edge.is_some()
            || self.split_above.is_some()
        {
            return Err(Error::Usage(
                "the image processor takes no videos (only the patch-grid processor with temporal_patch_size does)".into(),
            ));
        }
        // The first frame fixes the size, as an image would be processed.
        let probe = self.process(first)?;
        let (th, tw) = (
            probe.grid.h * self.patch_size,
            probe.grid.w * self.patch_size,
        );
        let t = self.temporal_patch_size.max(1) as usize;
        let mut chw: Vec<Vec<f32>> = frames.iter().map(|f| self.to_chw(f, th, tw)).collect();
        while chw.len() % t != 0 {
            let last = chw[chw.len() - 1].clone();
            chw.push(last);
        }
        let (p, m) = (self.patch_size as usize, self.merge_size as usize);
        let (h, w) = (th as usize, tw as usize);
        let (gh, gw) = (h / p, w / p);
        let mut out = Vec::with_capacity(chw.len() * 3 * h * w);
        for group in chw.chunks_exact(t) {
            for bh in 0..gh / m {
                for bw in 0..gw / m {
                    for ih in 0..m {
                        for iw in 0..m {
                            let (y0, x0) = ((bh * m + ih) * p, (bw * m + iw) * p);
                            for c in 0..3 {
                                for frame in group {
                                    for y in 0..p {
                                        let row = c * h * w + (y0 + y) * w + x0;
                                        out.extend_from_slice(&frame[row..row + p]);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(ProcessedImage {
            pixels: out,
            grid: Grid {
                t: (chw.len() / t) as i64,
                h: gh as i64,
                w: gw as i64,
            },
            video: true,
        })
    }
}

/// The frame files of a video given as `entries`: each file itself, each
/// directory its files in name order (hidden files skipped); at least one
/// frame.
pub fn video_frames(entries: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut frames = Vec::new();
    for entry in entries {
        if !entry.is_dir() {
            frames.push(entry.clone());
            continue;
        }
        let io = |source| Error::Io {
            path: entry.clone(),
            source,
        };
        let mut files = Vec::new();
        for item in std::fs::read_dir(entry).map_err(io)? {
            let path = item.map_err(io)?.path();
            let hidden = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            if path.is_file() && !hidden {
                files.push(path);
            }
        }
        if files.is_empty() {
            return Err(Error::Usage(format!(
                "{}: the video's folder holds no frame files",
                entry.display()
            )));
        }
        files.sort();
        frames.extend(files);
    }
    if frames.is_empty() {
        return Err(Error::Usage("a video needs at least one frame".into()));
    }
    Ok(frames)
}
