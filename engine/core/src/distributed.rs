//! Tensor parallelism over MLX's own distributed layer: a [`Group`] of
//! processes (one per GPU through NCCL, or several on one machine through
//! MLX's TCP ring on the CPU) and the collectives the sharded ops need.
//!
//! A process joins the run its environment describes: `MLX_WORLD_SIZE`
//! ranks, this one `MLX_RANK`, the backend `LMSPEC_DIST_BACKEND` (`ring`,
//! `nccl`, `mpi` or `any`) and that backend's own variables (`MLX_HOSTFILE`
//! for the ring; `NCCL_HOST_IP`, `NCCL_PORT` for NCCL). `lmspec launch`
//! sets them all (docs/distributed.md).
use std::ffi::CString;
use std::sync::Arc;

use mlx_rs::error::Exception;
use mlx_rs::Array;

use crate::error::{Error, Result};

/// The environment variable naming the backend (`ring`, `nccl`, `mpi`, `any`).
pub const BACKEND_ENV: &str = "LMSPEC_DIST_BACKEND";
/// The environment variable holding the world size.
pub const WORLD_ENV: &str = "MLX_WORLD_SIZE";
/// The environment variable holding this process's rank.
pub const RANK_ENV: &str = "MLX_RANK";

/// A group of processes that run one model together.
#[derive(Debug)]
pub struct Group {
    raw: mlx_sys::mlx_distributed_group,
    rank: usize,
    size: usize,
}

// SAFETY: the handle points at MLX's reference-counted group, which MLX's
// own collectives share between threads; it is freed once, on drop.
unsafe impl Send for Group {}
// SAFETY: as above; no method mutates the handle.
unsafe impl Sync for Group {}

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: `raw` came from `mlx_distributed_init` and is freed once.
        unsafe {
            mlx_sys::mlx_distributed_group_free(self.raw);
        }
    }
}

impl Group {
    /// Joins the run through `backend`; an error when MLX cannot (the
    /// backend is missing, or its variables do not describe a run).
    pub fn init(backend: &str) -> Result<Group> {
        let bk = CString::new(backend)
            .map_err(|_| Error::Usage(format!("backend name {backend:?} holds a NUL byte")))?;
        // MLX reports a failure through the error handler mlx-rs installs
        // with its first op; run one so that a failure returns here.
        let _ = mlx_rs::ops::add(Array::from_int(0), Array::from_int(0));
        // SAFETY: `bk` outlives the call; `raw` is filled by it.
        let (rc, raw) = unsafe {
            if !mlx_sys::mlx_distributed_is_available(bk.as_ptr()) {
                return Err(Error::Usage(format!(
                    "MLX's distributed backend '{backend}' is not available in this libmlx"
                )));
            }
            let mut raw = mlx_sys::mlx_distributed_group_new();
            let rc = mlx_sys::mlx_distributed_init(&mut raw, true, bk.as_ptr());
            (rc, raw)
        };
        if rc != 0 || raw.ctx.is_null() {
            return Err(Error::Usage(format!(
                "could not join the distributed run through MLX's '{backend}' backend (check {RANK_ENV}, {WORLD_ENV} and the backend's variables)"
            )));
        }
        // SAFETY: `raw` is a live group.
        let (rank, size) = unsafe {
            (
                mlx_sys::mlx_distributed_group_rank(raw),
                mlx_sys::mlx_distributed_group_size(raw),
            )
        };
        Ok(Group {
            raw,
            rank: rank.max(0) as usize,
            size: size.max(1) as usize,
        })
    }

    /// The run this process belongs to, from the environment (see the
    /// module docs), joined once per process; `None` when no world of more
    /// than one rank is set.
    pub fn from_env() -> Result<Option<Arc<Group>>> {
        static JOINED: std::sync::OnceLock<Arc<Group>> = std::sync::OnceLock::new();
        if let Some(g) = JOINED.get() {
            return Ok(Some(g.clone()));
        }
        let joined = Group::join_env()?;
        Ok(joined.map(|g| JOINED.get_or_init(|| g).clone()))
    }

    fn join_env() -> Result<Option<Arc<Group>>> {
        let Ok(world) = std::env::var(WORLD_ENV) else {
            return Ok(None);
        };
        let world: usize = world
            .trim()
            .parse()
            .map_err(|_| Error::Usage(format!("{WORLD_ENV}={world:?} is not a number of ranks")))?;
        if world <= 1 {
            return Ok(None);
        }
        let backend = std::env::var(BACKEND_ENV).unwrap_or_else(|_| "any".into());
        let group = Group::init(&backend)?;
        if group.size != world {
            return Err(Error::Usage(format!(
                "{WORLD_ENV}={world} but MLX's '{backend}' backend joined a group of {}",
                group.size
            )));
        }
        Ok(Some(Arc::new(group)))
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// The sum of `x` over every rank (the same on all).
    pub fn all_sum(&self, x: &Array) -> std::result::Result<Array, Exception> {
        self.collective(x, mlx_sys::mlx_distributed_all_sum, "all_sum")
    }

    /// Every rank's `x` concatenated along the first axis, in rank order.
    pub fn all_gather(&self, x: &Array) -> std::result::Result<Array, Exception> {
        self.collective(x, mlx_sys::mlx_distributed_all_gather, "all_gather")
    }

    fn collective(
        &self,
        x: &Array,
        op: unsafe extern "C" fn(
            *mut mlx_sys::mlx_array,
            mlx_sys::mlx_array,
            mlx_sys::mlx_distributed_group,
            mlx_sys::mlx_stream,
        ) -> std::os::raw::c_int,
        name: &str,
    ) -> std::result::Result<Array, Exception> {
        let stream = mlx_rs::Stream::thread_local_or_default();
        // SAFETY: `res` is a fresh handle the call fills (freed here on
        // failure); `x`, the group and the stream are borrowed for the call.
        unsafe {
            let mut res = mlx_sys::mlx_array_new();
            let rc = op(&mut res, x.as_ptr(), self.raw, stream.as_ptr());
            if rc != 0 {
                mlx_sys::mlx_array_free(res);
                return Err(Exception::custom(format!("distributed {name} failed")));
            }
            Ok(Array::from_ptr(res))
        }
    }
}

/// One rank's place in a tensor-parallel run, as weight loading needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rank {
    pub index: usize,
    pub of: usize,
}

impl Rank {
    /// The rank of `group`, or the only rank without one.
    pub fn of_group(group: Option<&Group>) -> Rank {
        match group {
            Some(g) => Rank {
                index: g.rank(),
                of: g.size(),
            },
            None => Rank { index: 0, of: 1 },
        }
    }
}

thread_local! {
    static BUILD_GROUP: std::cell::RefCell<Option<Arc<Group>>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` (a model's plan being built) with `group` as the group its
/// sharded ops reduce over.
pub fn with_group<T>(group: Option<Arc<Group>>, f: impl FnOnce() -> T) -> T {
    let before = BUILD_GROUP.with(|c| c.replace(group));
    let out = f();
    BUILD_GROUP.with(|c| *c.borrow_mut() = before);
    out
}

/// The group of the plan being built (see [`with_group`]); `None` on one
/// rank.
pub fn build_group() -> Option<Arc<Group>> {
    BUILD_GROUP.with(|c| c.borrow().clone())
}
