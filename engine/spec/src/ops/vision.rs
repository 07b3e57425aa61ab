//! Ops of vision towers and of the splice of their features into a text
//! model: `patchify` (a convolution whose stride equals its kernel, over
//! flattened patches), `mrope` (rotary embeddings from several position
//! axes: 2-D vision RoPE, 3-D M-RoPE), `merge_patches` (neighbouring
//! patches concatenated), `pool_patches` and `pixel_shuffle` (token
//! reduction over a square grid) and `splice` (features written at an
//! image token's positions).
use super::{expect_flat, expect_heads, op, Layout, OpError, Resolved, WeightName, WeightReq};
use crate::expr::Value;

op! {
    /// Patch embedding of flattened patches [B, N, channels·temporal·patch·patch] (channel, time, row, column order, as image processors flatten them): a convolution whose stride equals its kernel, run as one projection.
    "patchify" (1..=1) => Patchify {
        weight: WeightName, "module holding the convolution `weight` [out, temporal, patch, patch, channels] ([out, patch, patch, channels] when temporal is 1; MLX layout) and `bias` [out]";
        out: i64, "output features";
        patch: i64, "patch side in pixels";
        temporal: i64 = 1, "frames per patch (Conv3d's first kernel size)";
        channels: i64 = 3, "input channels";
        bias: bool = false, "whether the convolution has a bias";
        channels_last: bool = false, "the patches flattened as (row, column, channel) [B, N, patch·patch·channels] and the weight a linear map's [out, patch·patch·channels] in that order (SigLIP2-NaFlex's patch embedding); one frame";
    }
}

op! {
    /// Rotary embedding of per-head values [B, H, T, D] from several position axes: frequency pair k reads the axis whose section holds k (Qwen-VL's 3-D M-RoPE over (t, h, w), 2-D vision RoPE over (row, column)). Positions come from the forward's inputs; without them every axis is the sequence position (plus the cache's position delta).
    "mrope" (1..=1) => Mrope {
        sections: Value, "frequency pairs per position axis, in order (a list); with one ladder, pairs past the sections read axis 0 (as mlx-vlm's chunked selector); with `per_section` they must add up to D/2";
        base: f64 = 10000.0, "rope theta";
        per_section: bool = false, "each section has its own frequency ladder base^(-j/section) (vision RoPE); false: one ladder base^(-2k/D) over all pairs (M-RoPE)";
        traditional: bool = false, "rotate adjacent feature pairs (2i, 2i+1) instead of the two halves (mlx-lm's `rope_traditional`); one ladder and positions from the sequence only";
        dealt: bool = false, "with `per_section`: the sections deal one ladder base^(-2k/D) between them, pair j of section a taking entry j·n + a (n sections of equal size; Pixtral's 2-D RoPE, rows the even entries, columns the odd); false: each section its own ladder";
        interleaved: bool = false, "with one ladder, the axes take the pairs in turn: pair k reads axis a = k mod n (n sections) when a > 0 and k < n·sections[a], else axis 0 (Qwen3-VL's interleaved M-RoPE); false: each axis a run of consecutive pairs";
    }
}

op! {
    /// Concatenates each run of `group` consecutive positions of [B, N, D] into one: [B, N/group, group·D] (patch mergers; the patches of a merge window are adjacent).
    "merge_patches" (1..=1) => MergePatches {
        group: i64, "positions merged into one (spatial_merge_size²)";
        channel_major: bool = false, "each merged row in (feature, position) order, feature c of position k at c·group + k (torch's `unfold`: Mistral 3's patch merger); false: the positions' rows one after another";
    }
}

op! {
    /// A learned side x side position table bilinearly interpolated to each image's patch grid (the forward's grids), in merge-window order: [1, N, D] for the N patches of the input [B, N, D] (Qwen3-VL's `fast_pos_embed_interpolate`; with `align_corners: false, antialias: true` SigLIP2's resize of its table, torch's `interpolate`).
    "grid_table" (1..=1) => GridTable {
        weight: WeightName, "module holding the table `weight` [side², D]";
        side: i64, "positions per side of the table";
        merge: i64 = 1, "patches per side of a merge window (the order of the patches)";
        align_corners: bool = true, "the corners of the table meet the corners of the grid (linspace coordinates); false: cell centres, grid cell i at table coordinate (i + 0.5)·side/n - 0.5 clamped at 0 (torch's `align_corners=False`)";
        antialias: bool = false, "with `align_corners: false`, an axis the grid shrinks averages the table rows within a triangle filter as wide as the scale side/n, weights normalised (torch's `antialias=True`); an axis it grows interpolates as without";
    }
}

op! {
    /// Average of each k x k block of a square grid of positions [B, side², D] (row-major) into [B, (side/k)², D] (Gemma 3's 4 x 4 pooling of the SigLIP patches).
    "pool_patches" (1..=1) => PoolPatches {
        kernel: i64, "block side k; the grid side (the square root of the positions) must divide by it";
    }
}

op! {
    /// Space-to-depth of a square grid of positions [B, side², D]: each f x f block becomes one position [B, (side/f)², f²·D], features in (block row, block column, feature) order (Idefics3 / SmolVLM's pixel shuffle, LFM2-VL's pixel unshuffle).
    "pixel_shuffle" (1..=1) => PixelShuffle {
        factor: i64, "block side f; the grid side must divide by it";
    }
}

op! {
    /// Writes the rows of the forward's image features over the embeddings [B, T, D] at the positions whose token id is `token`; inputs [token ids, embeddings]. Without features it passes the embeddings through.
    "splice" (2..=2) => Splice {
        token: i64, "the image placeholder token id";
        scale: f64 = 1.0, "multiplier of the feature rows before they are written";
        parts: i64 = 1, "the feature rows hold this many blocks of D columns: the first is written, the others are for `add_features` (DeepStack levels)";
    }
}

impl Patchify {
    /// Features of one flattened patch.
    pub fn patch_width(&self) -> i64 {
        self.channels * self.temporal * self.patch * self.patch
    }

    pub fn resolve(&self, scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        expect_flat(inputs, 0)?;
        for (field, v) in [
            ("out", self.out),
            ("patch", self.patch),
            ("temporal", self.temporal),
            ("channels", self.channels),
        ] {
            if v < 1 {
                return Err(OpError::new(field, format!("must be at least 1, got {v}")));
            }
        }
        let module = self.weight.under(scope);
        if self.channels_last && self.temporal != 1 {
            return Err(OpError::new(
                "channels_last",
                "takes one frame per patch (temporal 1)",
            ));
        }
        let shape = if self.channels_last {
            vec![self.out, self.patch * self.patch * self.channels]
        } else if self.temporal > 1 {
            vec![
                self.out,
                self.temporal,
                self.patch,
                self.patch,
                self.channels,
            ]
        } else {
            vec![self.out, self.patch, self.patch, self.channels]
        };
        let mut weights = vec![WeightReq::dense("weight", module.clone(), "weight", shape)];
        if self.bias {
            weights.push(WeightReq::dense("bias", module, "bias", vec![self.out]));
        }
        Ok(Resolved {
            weights,
            ..Resolved::pure(Layout::flat(self.out))
        })
    }
}

impl Mrope {
    /// The sections as pair counts, checked against a head of `head_dim`.
    pub fn section_sizes(&self, head_dim: i64) -> Result<Vec<i64>, OpError> {
        let Value::List(items) = &self.sections else {
            return Err(OpError::new(
                "sections",
                format!("expected a list of pair counts, got {}", self.sections),
            ));
        };
        let mut out = Vec::with_capacity(items.len());
        for v in items {
            match v.as_i64() {
                Some(n) if n >= 1 => out.push(n),
                _ => {
                    return Err(OpError::new(
                        "sections",
                        format!("each section is a positive pair count, got {v}"),
                    ))
                }
            }
        }
        if out.is_empty() {
            return Err(OpError::new("sections", "no sections"));
        }
        let pairs: i64 = out.iter().sum();
        if head_dim % 2 != 0 || 2 * pairs > head_dim {
            return Err(OpError::new(
                "sections",
                format!("{pairs} frequency pairs do not fit a head of {head_dim} features"),
            ));
        }
        if self.per_section && 2 * pairs != head_dim {
            return Err(OpError::new(
                "sections",
                format!(
                    "with per_section the sections cover the head: {pairs} pairs for {head_dim} features"
                ),
            ));
        }
        Ok(out)
    }

    /// Angle per unit position of each frequency pair, with the axis it
    /// reads: `(inv_freq, axis)` for every rotated pair (D/2 of them).
    pub fn frequencies(&self, head_dim: i64) -> Result<Vec<(f64, usize)>, OpError> {
        let sections = self.section_sizes(head_dim)?;
        if self.per_section && self.dealt {
            let n = sections.len() as i64;
            let mut out = Vec::new();
            for (axis, &m) in sections.iter().enumerate() {
                out.extend((0..m).map(|j| {
                    let k = j * n + axis as i64;
                    (self.base.powf(-2.0 * k as f64 / head_dim as f64), axis)
                }));
            }
            return Ok(out);
        }
        if self.per_section {
            let mut out = Vec::new();
            for (axis, &n) in sections.iter().enumerate() {
                out.extend((0..n).map(|j| (self.base.powf(-(j as f64) / n as f64), axis)));
            }
            return Ok(out);
        }
        let mut axis_of = Vec::new();
        if self.interleaved {
            let n = sections.len() as i64;
            axis_of.extend((0..head_dim / 2).map(|k| {
                let a = k % n;
                match a > 0 && k < n * sections[a as usize] {
                    true => a as usize,
                    false => 0,
                }
            }));
        } else {
            for (axis, &n) in sections.iter().enumerate() {
                axis_of.extend(std::iter::repeat_n(axis, n as usize));
            }
        }
        Ok((0..head_dim / 2)
            .map(|k| {
                let f = self.base.powf(-2.0 * k as f64 / head_dim as f64);
                (f, axis_of.get(k as usize).copied().unwrap_or(0))
            })
            .collect())
    }

    pub fn resolve(&self, _scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let (_, head_dim) = expect_heads(inputs, 0)?;
        self.section_sizes(head_dim)?;
        if self.interleaved && self.per_section {
            return Err(OpError::new(
                "interleaved",
                "interleaving deals the pairs of one ladder (per_section: false)",
            ));
        }
        if self.dealt {
            let sections = self.section_sizes(head_dim)?;
            if !self.per_section || sections.iter().any(|&n| n != sections[0]) {
                return Err(OpError::new(
                    "dealt",
                    "dealing one ladder needs per_section: true and sections of one size",
                ));
            }
        }
        if self.base <= 0.0 {
            return Err(OpError::new(
                "base",
                format!("must be positive, got {}", self.base),
            ));
        }
        Ok(Resolved::pure(inputs[0]))
    }
}

impl MergePatches {
    pub fn resolve(&self, _scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let d = expect_flat(inputs, 0)?;
        if self.group < 1 {
            return Err(OpError::new(
                "group",
                format!("must be at least 1, got {}", self.group),
            ));
        }
        Ok(Resolved::pure(Layout::flat(d * self.group)))
    }
}

fn grid_block(field: &str, k: i64) -> Result<(), OpError> {
    if k < 1 {
        return Err(OpError::new(field, format!("must be at least 1, got {k}")));
    }
    Ok(())
}

impl GridTable {
    pub fn resolve(&self, scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let d = expect_flat(inputs, 0)?;
        grid_block("side", self.side)?;
        grid_block("merge", self.merge)?;
        if self.antialias && self.align_corners {
            return Err(OpError::new(
                "antialias",
                "needs align_corners: false (the filter is defined on cell centres)",
            ));
        }
        let module = self.weight.under(scope);
        Ok(Resolved {
            weights: vec![WeightReq::dense(
                "weight",
                module,
                "weight",
                vec![self.side * self.side, d],
            )],
            ..Resolved::pure(Layout::flat(d))
        })
    }
}

impl PoolPatches {
    pub fn resolve(&self, _scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let d = expect_flat(inputs, 0)?;
        grid_block("kernel", self.kernel)?;
        Ok(Resolved::pure(Layout::flat(d)))
    }
}

impl PixelShuffle {
    pub fn resolve(&self, _scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let d = expect_flat(inputs, 0)?;
        grid_block("factor", self.factor)?;
        Ok(Resolved::pure(Layout::flat(d * self.factor * self.factor)))
    }
}

impl Splice {
    pub fn resolve(&self, _scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        expect_flat(inputs, 0)?;
        let d = expect_flat(inputs, 1)?;
        if self.token < 0 {
            return Err(OpError::new(
                "token",
                format!("a token id is not negative, got {}", self.token),
            ));
        }
        if !self.scale.is_finite() {
            return Err(OpError::new(
                "scale",
                format!("expected a finite number, got {}", self.scale),
            ));
        }
        if self.parts < 1 {
            return Err(OpError::new(
                "parts",
                format!("must be at least 1, got {}", self.parts),
            ));
        }
        Ok(Resolved::pure(Layout::flat(d)))
    }
}
