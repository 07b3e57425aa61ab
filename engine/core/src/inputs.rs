//! Inputs of a forward beyond its token ids: positions on several axes
//! (read by `mrope`), segment ids (a non-causal `attention` sees only the
//! keys of its query's segment: one segment per image) and features
//! (`splice` writes them over the embeddings at its token's positions).
//! A forward makes them current while its plan runs, together with the
//! cache's position delta (what `mrope` adds to the sequence position when
//! no positions are given: decoding after a prompt whose image positions
//! ran ahead of or behind the token count).
use std::cell::{Cell, RefCell};

use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::Array;

/// Extra inputs of one forward; each is optional.
#[derive(Debug, Clone, Default)]
pub struct ForwardInputs {
    /// Positions per axis `[axes, T]` (int32), shared by every row.
    pub positions: Option<Array>,
    /// Segment id of each position `[T]` (int32).
    pub segments: Option<Array>,
    /// Feature rows `[N, D]`, one per placeholder token of the forward.
    pub features: Option<Array>,
    /// The position delta the cache keeps after this forward (`mrope`
    /// positions of later calls are the sequence position plus it).
    pub position_delta: Option<i32>,
    /// The patch grid `(t, h, w)` of each image of a tower's forward, its
    /// patches in merge-window order (read by `grid_table`).
    pub grids: Option<Vec<[i64; 3]>>,
}

impl ForwardInputs {
    pub fn is_empty(&self) -> bool {
        self.positions.is_none() && self.segments.is_none() && self.features.is_none()
    }
}

/// What a forward's tokens are, to the CPU's products of quantized (and,
/// under int8 activations, dense) weights: the path a product takes, the
/// CPU kernel or a dequantized BLAS product, sets its float order, so a
/// token's numbers depend on it. Marking the tokens makes them independent
/// of how a generation was split into forwards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Pass {
    /// Unmarked: the path follows the forward's rows (a few: the kernel).
    #[default]
    Unmarked,
    /// A prompt's tokens but its last: BLAS however few a forward holds,
    /// so a prompt's numbers are the same whole or after a reused prefix.
    Prompt,
    /// Tokens whose logits are read (a prompt's last, decode steps,
    /// drafts and their verification): the kernel however many sequences
    /// a batch holds, whose rows do not depend on their neighbours.
    Step,
}

/// Rows up to which an unmarked forward's products take the CPU kernel,
/// and prompt tokens up to which a prompt takes it (see [`Pass::prompt`]).
pub const KERNEL_ROWS: usize = 16;

impl Pass {
    /// The pass of a prompt's tokens before its last, `n` of them: a
    /// longer prompt's is [`Pass::Prompt`], while one of at most
    /// [`KERNEL_ROWS`] goes as steps do, through the kernel (BLAS would
    /// first dequantize every weight, for a few rows). Two prompts can share
    /// a prefix's values only where their passes agree.
    pub fn prompt(n: usize) -> Pass {
        match n <= KERNEL_ROWS {
            true => Pass::Step,
            false => Pass::Prompt,
        }
    }
}

thread_local! {
    static PASS: Cell<Pass> = const { Cell::new(Pass::Unmarked) };
}

/// Restores the pass that was current before a [`in_pass`] scope.
struct RestorePass(Pass);

impl Drop for RestorePass {
    fn drop(&mut self) {
        PASS.set(self.0);
    }
}

/// Runs `f` (forwards of a model) with their tokens marked as `pass`.
pub fn in_pass<R>(pass: Pass, f: impl FnOnce() -> R) -> R {
    let _restore = RestorePass(PASS.replace(pass));
    f()
}

/// The pass of the forward being built.
pub(crate) fn pass() -> Pass {
    PASS.get()
}

thread_local! {
    static CURRENT: RefCell<(ForwardInputs, i32)> = RefCell::new((ForwardInputs::default(), 0));
    static SIDE: RefCell<Side> = RefCell::new(Side::default());
}

/// Values a forward's ops leave for its later ops: what `keep` nodes kept,
/// and where `splice` wrote feature rows (read by `add_features`).
#[derive(Default)]
struct Side {
    kept: Vec<Option<Array>>,
    /// `[B·T, 1]` true at the spliced positions, and the feature row of
    /// each position `[B·T]`.
    spliced: Option<(Array, Array)>,
}

/// Restores the empty inputs when a forward ends (also on an error or a
/// panic), so no later forward sees them.
struct Reset;

impl Drop for Reset {
    fn drop(&mut self) {
        CURRENT.with_borrow_mut(|c| *c = (ForwardInputs::default(), 0));
        SIDE.with_borrow_mut(|s| *s = Side::default());
    }
}

/// Runs `f` with `inputs` and the cache's position `delta` current.
pub(crate) fn scoped<R>(inputs: &ForwardInputs, delta: i32, f: impl FnOnce() -> R) -> R {
    CURRENT.with_borrow_mut(|c| *c = (inputs.clone(), delta));
    SIDE.with_borrow_mut(|s| *s = Side::default());
    let _reset = Reset;
    f()
}

/// The current positions `[axes, T]`, if the forward has them.
pub(crate) fn positions() -> Option<Array> {
    CURRENT.with_borrow(|c| c.0.positions.clone())
}

/// Keeps `x` under `slot` for the rest of the forward.
pub(crate) fn keep(slot: usize, x: &Array) {
    SIDE.with_borrow_mut(|s| {
        if s.kept.len() <= slot {
            s.kept.resize(slot + 1, None);
        }
        s.kept[slot] = Some(x.clone());
    });
}

/// The value kept under `slot` in this forward.
pub(crate) fn kept(slot: usize) -> Option<Array> {
    SIDE.with_borrow(|s| s.kept.get(slot).cloned().flatten())
}

/// Records where a splice wrote feature rows: the mask `[B·T, 1]` and the
/// row of each position `[B·T]`.
pub(crate) fn set_spliced(mask: &Array, rows: &Array) {
    SIDE.with_borrow_mut(|s| s.spliced = Some((mask.clone(), rows.clone())));
}

/// Where this forward's splice wrote feature rows, if it did.
pub(crate) fn spliced() -> Option<(Array, Array)> {
    SIDE.with_borrow(|s| s.spliced.clone())
}

/// The current segment ids `[T]`, if the forward has them.
pub(crate) fn segments() -> Option<Array> {
    CURRENT.with_borrow(|c| c.0.segments.clone())
}

/// The current position delta.
pub(crate) fn position_delta() -> i32 {
    CURRENT.with_borrow(|c| c.1)
}

/// The current image grids, if the forward has them.
pub(crate) fn grids() -> Option<Vec<[i64; 3]>> {
    CURRENT.with_borrow(|c| c.0.grids.clone())
}

/// The current features `[N, D]`, if the forward has them.
pub(crate) fn features() -> Option<Array> {
    CURRENT.with_borrow(|c| c.0.features.clone())
}

/// A `[t, t]` mask (true: both positions lie in one span) over the
/// forward's segment ids, where a span is the positions of one id of 0 or
/// more (text positions carry -1); `None` without segment ids.
pub(crate) fn span_mask(t: i32) -> Result<Option<Array>, Exception> {
    let Some(seg) = CURRENT.with_borrow(|c| c.0.segments.clone()) else {
        return Ok(None);
    };
    if seg.size() as i32 != t {
        return Err(Exception::custom(format!(
            "attention: {} segment ids for {t} positions",
            seg.size()
        )));
    }
    let rows = seg.reshape(&[t, 1])?;
    let cols = seg.reshape(&[1, t])?;
    let same = mlx_rs::ops::eq(&rows, &cols)?;
    let inside = mlx_rs::ops::ge(&rows, Array::from_int(0))?;
    mlx_rs::ops::logical_and(&same, &inside).map(Some)
}

/// A `[t, t]` mask (true: visible) that keeps each query to the keys of
/// its own segment, when the forward has segment ids.
pub(crate) fn segment_mask(t: i32) -> Result<Option<Array>, Exception> {
    let Some(seg) = CURRENT.with_borrow(|c| c.0.segments.clone()) else {
        return Ok(None);
    };
    if seg.size() as i32 != t {
        return Err(Exception::custom(format!(
            "attention: {} segment ids for {t} positions",
            seg.size()
        )));
    }
    let rows = seg.reshape(&[t, 1])?;
    let cols = seg.reshape(&[1, t])?;
    mlx_rs::ops::eq(&rows, &cols).map(Some)
}

/// A `[t, t]` mask (true: visible) that keeps each query to the keys in its
/// own `side` x `side` tile of the forward's 2-D positions (axis 0 the row,
/// axis 1 the column): window attention over a grid of patches.
pub(crate) fn tile_mask(t: i32, side: i64) -> Result<Array, Exception> {
    let Some(p) = positions() else {
        return Err(Exception::custom(
            "attention: grid_window needs the forward's 2-D positions (a tower's patch rows and columns)",
        ));
    };
    let s = p.shape();
    if s.len() != 2 || s[0] < 2 || s[1] != t {
        return Err(Exception::custom(format!(
            "attention: grid_window needs positions [2 axes, {t}], got {s:?}"
        )));
    }
    let side = Array::from_int(side.min(i32::MAX as i64) as i32);
    let tile = mlx_rs::ops::floor_divide(&p.as_dtype(mlx_rs::Dtype::Int32)?, &side)?;
    let same = |axis: i32| -> Result<Array, Exception> {
        let a = tile.try_index(axis)?;
        mlx_rs::ops::eq(&a.reshape(&[t, 1])?, &a.reshape(&[1, t])?)
    };
    mlx_rs::ops::logical_and(&same(0)?, &same(1)?)
}
