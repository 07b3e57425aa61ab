//! Memory tickets: work declares the bytes it needs before it runs, a
//! policy turns the declared sizes into a memory limit and decides what may
//! start, and the limit goes back to where it was once the last ticket
//! ends. This is mlx-swift-lm's wired-memory API on MLX's memory limit
//! (wiring memory is a Metal notion; on the CPU and CUDA backends the limit
//! MLX allocates against is what there is to set).
//!
//! A ticket is either `Active` (work running now, e.g. one generation) or a
//! `Reservation` (long-lived, e.g. a model's weights): both count when
//! deciding admission, only active tickets keep the limit raised.
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Bytes in use: MLX's active memory plus the weights held in lmspec's own
/// huge-page memory ([`crate::weights::to_huge_pages`]), which MLX's
/// allocator does not see (nor does its memory limit).
pub fn active_bytes() -> std::result::Result<usize, mlx_rs::error::Exception> {
    Ok(mlx_rs::memory::active_memory()? + crate::cpu_kernels::arena_bytes() as usize)
}

/// The most bytes in use since [`reset_peak`]: MLX's peak plus the weights
/// in lmspec's own memory (which stay put while a model is loaded).
pub fn peak_bytes() -> std::result::Result<usize, mlx_rs::error::Exception> {
    Ok(mlx_rs::memory::peak_memory()? + crate::cpu_kernels::arena_bytes() as usize)
}

/// Starts a new peak from the bytes in use now.
pub fn reset_peak() -> std::result::Result<(), mlx_rs::error::Exception> {
    mlx_rs::memory::reset_peak_memory()
}

/// How declared sizes become a limit and whether new work fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryPolicy {
    /// The baseline plus every ticket's size, clamped to `cap`; work is
    /// admitted while that sum stays within `cap` (no cap: always).
    Sum { cap: Option<u64> },
    /// The largest of the baseline and the tickets' sizes (tickets that
    /// run one after another and share their memory); always admits.
    Max,
    /// A fixed limit; work is admitted while the tickets' sizes sum to at
    /// most it.
    Fixed(u64),
    /// The baseline plus `base` (e.g. weights) plus every ticket's size,
    /// clamped to `cap`; admitted while that stays within `cap`.
    Budget { base: u64, cap: Option<u64> },
}

impl MemoryPolicy {
    /// The limit for `sizes` over `baseline`.
    pub fn limit(&self, baseline: u64, sizes: &[u64]) -> u64 {
        let sum: u64 = sizes.iter().fold(0u64, |a, &b| a.saturating_add(b));
        let clamp = |v: u64, cap: Option<u64>| cap.map_or(v, |c| v.min(c));
        match *self {
            MemoryPolicy::Sum { cap } => clamp(baseline.saturating_add(sum), cap),
            MemoryPolicy::Max => sizes.iter().copied().fold(baseline, u64::max),
            MemoryPolicy::Fixed(limit) => limit,
            MemoryPolicy::Budget { base, cap } => {
                clamp(baseline.saturating_add(base).saturating_add(sum), cap)
            }
        }
    }

    /// Whether a ticket of `new` bytes may start beside `sizes`.
    pub fn can_admit(&self, baseline: u64, sizes: &[u64], new: u64) -> bool {
        let sum: u64 = sizes.iter().fold(new, |a, &b| a.saturating_add(b));
        match *self {
            MemoryPolicy::Sum { cap } => cap.is_none_or(|c| baseline.saturating_add(sum) <= c),
            MemoryPolicy::Max => true,
            MemoryPolicy::Fixed(limit) => sum <= limit,
            MemoryPolicy::Budget { base, cap } => {
                cap.is_none_or(|c| baseline.saturating_add(base).saturating_add(sum) <= c)
            }
        }
    }
}

/// What a ticket stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TicketKind {
    /// Work running now; keeps the limit raised while it runs.
    Active,
    /// Memory held for long (weights); counts for admission only.
    Reservation,
}

/// Sets the memory limit (MLX's by default).
pub type ApplyLimit = dyn Fn(u64) + Send + Sync;

#[derive(Debug, Default)]
struct State {
    /// The limit before the first ticket started (restored after the last).
    baseline: Option<u64>,
    /// Running tickets: id, size, kind.
    running: Vec<(u64, u64, TicketKind)>,
    next_id: u64,
    /// The limit last applied.
    applied: Option<u64>,
}

/// Admits tickets under a policy and keeps the memory limit in step.
pub struct MemoryManager {
    policy: MemoryPolicy,
    state: Mutex<State>,
    freed: Condvar,
    apply: Box<ApplyLimit>,
    /// The baseline when not read from MLX.
    fixed_baseline: Option<u64>,
}

impl std::fmt::Debug for MemoryManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryManager")
            .field("policy", &self.policy)
            .field("state", &self.lock())
            .finish()
    }
}

impl MemoryManager {
    /// A manager over MLX's memory limit: the baseline is the limit when
    /// the first ticket starts.
    pub fn new(policy: MemoryPolicy) -> Arc<MemoryManager> {
        Arc::new(MemoryManager {
            policy,
            state: Mutex::default(),
            freed: Condvar::new(),
            apply: Box::new(|limit| {
                let _ = mlx_rs::memory::set_memory_limit(limit as usize);
            }),
            fixed_baseline: None,
        })
    }

    /// A manager with a given baseline that hands limits to `apply`
    /// (tests, or a limit of the caller's own).
    pub fn with_limit_fn(
        policy: MemoryPolicy,
        baseline: u64,
        apply: impl Fn(u64) + Send + Sync + 'static,
    ) -> Arc<MemoryManager> {
        Arc::new(MemoryManager {
            policy,
            state: Mutex::default(),
            freed: Condvar::new(),
            apply: Box::new(apply),
            fixed_baseline: Some(baseline),
        })
    }

    pub fn policy(&self) -> MemoryPolicy {
        self.policy
    }

    /// A ticket for `size` bytes (not started).
    pub fn ticket(self: &Arc<Self>, size: u64, kind: TicketKind) -> Ticket {
        let id = {
            let mut s = self.lock();
            s.next_id += 1;
            s.next_id
        };
        Ticket {
            manager: Arc::clone(self),
            id,
            size,
            kind,
        }
    }

    /// The limit in force now, when tickets run (`None`: the baseline).
    pub fn current_limit(&self) -> Option<u64> {
        self.lock().applied
    }

    /// Sizes of the running tickets.
    pub fn running(&self) -> Vec<(u64, TicketKind)> {
        self.lock()
            .running
            .iter()
            .map(|&(_, size, kind)| (size, kind))
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the state consistent (every
        // change is one push or one removal), so a poisoned lock is used.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn baseline(&self, s: &mut State) -> u64 {
        if let Some(b) = s.baseline {
            return b;
        }
        let b = self
            .fixed_baseline
            .unwrap_or_else(|| mlx_rs::memory::memory_limit().map_or(u64::MAX, |l| l as u64));
        s.baseline = Some(b);
        b
    }

    /// Applies the limit the running tickets call for; with no active
    /// ticket left, the baseline comes back and is forgotten.
    fn update(&self, s: &mut State) {
        let baseline = self.baseline(s);
        if !s.running.iter().any(|t| t.2 == TicketKind::Active) {
            if s.applied.take().is_some() {
                (self.apply)(baseline);
            }
            if s.running.is_empty() {
                s.baseline = None;
            }
            return;
        }
        let sizes: Vec<u64> = s.running.iter().map(|t| t.1).collect();
        let limit = self.policy.limit(baseline, &sizes);
        if s.applied != Some(limit) {
            (self.apply)(limit);
            s.applied = Some(limit);
        }
    }

    /// Starts `t`, waiting until the policy admits it (at most `timeout`
    /// when given). Already started: nothing happens.
    fn start(&self, t: &Ticket, timeout: Option<Duration>) -> Result<()> {
        let deadline = timeout.map(|d| Instant::now() + d);
        let mut s = self.lock();
        if s.running.iter().any(|r| r.0 == t.id) {
            return Ok(());
        }
        loop {
            let baseline = self.baseline(&mut s);
            let sizes: Vec<u64> = s.running.iter().map(|r| r.1).collect();
            if self.policy.can_admit(baseline, &sizes, t.size) {
                break;
            }
            if s.running.is_empty() {
                return Err(Error::Usage(format!(
                    "memory ticket of {} bytes: more than the policy {:?} can ever admit \
                     (baseline {baseline} bytes)",
                    t.size, self.policy
                )));
            }
            s = match deadline {
                None => self.freed.wait(s).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err(Error::Usage(format!(
                            "memory ticket of {} bytes: not admitted within {:?}",
                            t.size,
                            timeout.unwrap_or_default()
                        )));
                    }
                    self.freed
                        .wait_timeout(s, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
        s.running.push((t.id, t.size, t.kind));
        self.update(&mut s);
        Ok(())
    }

    /// Ends `t`; a ticket not running is ignored.
    fn end(&self, t: &Ticket) {
        let mut s = self.lock();
        let before = s.running.len();
        s.running.retain(|r| r.0 != t.id);
        if s.running.len() != before {
            self.update(&mut s);
            self.freed.notify_all();
        }
    }
}

/// Memory declared for a piece of work; ended when dropped.
#[derive(Debug)]
pub struct Ticket {
    manager: Arc<MemoryManager>,
    id: u64,
    size: u64,
    kind: TicketKind,
}

impl Ticket {
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn kind(&self) -> TicketKind {
        self.kind
    }

    /// Starts the ticket, blocking until the policy admits it.
    pub fn start(&self) -> Result<()> {
        self.manager.start(self, None)
    }

    /// Starts the ticket, waiting at most `timeout` for admission.
    pub fn start_timeout(&self, timeout: Duration) -> Result<()> {
        self.manager.start(self, Some(timeout))
    }

    /// Ends the ticket (again: nothing happens).
    pub fn end(&self) {
        self.manager.end(self)
    }

    /// Runs `f` with the ticket started, ending it afterwards (also when
    /// `f` panics).
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        self.start()?;
        struct End<'a>(&'a Ticket);
        impl Drop for End<'_> {
            fn drop(&mut self) {
                self.0.end();
            }
        }
        let _end = End(self);
        Ok(f())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.manager.end(self);
    }
}

/// What a model needs for a prompt, measured by running it (mlx-swift-lm's
/// `WiredMemoryUtils.tune`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryMeasurement {
    /// Active memory before the run: the weights (and whatever else was
    /// alive).
    pub weight_bytes: u64,
    /// The cache's state after the prompt.
    pub kv_bytes: u64,
    /// The rest of the peak: activations and scratch.
    pub workspace_bytes: u64,
    pub peak_active_bytes: u64,
    pub token_count: usize,
    pub prefill_step_size: usize,
    /// Weights + cache + workspace: a ticket's size for this work.
    pub total_bytes: u64,
}

/// Runs a `token_count`-token prompt through `model` in chunks of
/// `prefill_step_size` with a fresh cache made with `opts` and reports
/// what it took.
pub fn measure(
    model: &crate::model::Model,
    token_count: usize,
    prefill_step_size: usize,
    opts: crate::cache::CacheOptions,
) -> Result<MemoryMeasurement> {
    if token_count == 0 || prefill_step_size == 0 {
        return Err(Error::Usage(
            "measure: token_count and prefill_step_size must be 1 or more".into(),
        ));
    }
    mlx_rs::memory::clear_cache()?;
    let weights = active_bytes()? as u64;
    reset_peak()?;
    let mut cache = model.new_cache_with(opts);
    let mut done = 0;
    while done < token_count {
        let n = prefill_step_size.min(token_count - done);
        let tokens = mlx_rs::Array::from_slice(&vec![0i32; n], &[1, n as i32]);
        let logits = model.forward(&tokens, Some(&mut cache))?;
        let mut all = cache.arrays();
        all.push(&logits);
        mlx_rs::transforms::eval(all)?;
        done += n;
    }
    let kv: u64 = cache.arrays().iter().map(|a| a.nbytes() as u64).sum();
    let peak = peak_bytes()? as u64;
    let workspace = peak.saturating_sub(weights).saturating_sub(kv);
    Ok(MemoryMeasurement {
        weight_bytes: weights,
        kv_bytes: kv,
        workspace_bytes: workspace,
        peak_active_bytes: peak,
        token_count,
        prefill_step_size,
        total_bytes: weights + kv + workspace,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    #[test]
    fn each_policy_computes_its_limit_and_admission() {
        let sizes = [10 * MB, 30 * MB];
        let sum = MemoryPolicy::Sum {
            cap: Some(200 * MB),
        };
        assert_eq!(sum.limit(100 * MB, &sizes), 140 * MB);
        assert_eq!(sum.limit(100 * MB, &[300 * MB]), 200 * MB, "clamped");
        assert!(sum.can_admit(100 * MB, &sizes, 60 * MB));
        assert!(!sum.can_admit(100 * MB, &sizes, 61 * MB));
        assert!(MemoryPolicy::Sum { cap: None }.can_admit(0, &sizes, u64::MAX));

        let max = MemoryPolicy::Max;
        assert_eq!(max.limit(100 * MB, &sizes), 100 * MB);
        assert_eq!(max.limit(20 * MB, &sizes), 30 * MB);
        assert!(max.can_admit(0, &sizes, u64::MAX));

        let fixed = MemoryPolicy::Fixed(50 * MB);
        assert_eq!(fixed.limit(100 * MB, &sizes), 50 * MB);
        assert!(fixed.can_admit(0, &sizes, 10 * MB));
        assert!(!fixed.can_admit(0, &sizes, 11 * MB));

        let budget = MemoryPolicy::Budget {
            base: 50 * MB,
            cap: Some(200 * MB),
        };
        assert_eq!(budget.limit(100 * MB, &sizes), 190 * MB);
        assert_eq!(budget.limit(100 * MB, &[100 * MB]), 200 * MB);
        assert!(budget.can_admit(100 * MB, &sizes, 10 * MB));
        assert!(!budget.can_admit(100 * MB, &sizes, 11 * MB));
    }

    fn recorder(policy: MemoryPolicy) -> (Arc<MemoryManager>, Arc<Mutex<Vec<u64>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let m = MemoryManager::with_limit_fn(policy, 100, move |l| log.lock().unwrap().push(l));
        (m, seen)
    }

    #[test]
    fn limits_follow_tickets_and_the_baseline_returns() {
        let (m, seen) = recorder(MemoryPolicy::Sum { cap: None });
        let weights = m.ticket(50, TicketKind::Reservation);
        weights.start().unwrap();
        assert!(
            seen.lock().unwrap().is_empty(),
            "a reservation alone raises nothing"
        );
        let a = m.ticket(10, TicketKind::Active);
        let b = m.ticket(20, TicketKind::Active);
        a.start().unwrap();
        a.start().unwrap();
        b.start().unwrap();
        assert_eq!(m.current_limit(), Some(180));
        a.end();
        a.end();
        assert_eq!(m.current_limit(), Some(170));
        drop(b);
        assert_eq!(m.current_limit(), None);
        assert_eq!(*seen.lock().unwrap(), vec![160, 180, 170, 100]);
        assert_eq!(m.running(), vec![(50, TicketKind::Reservation)]);
    }

    #[test]
    fn admission_blocks_until_capacity_frees() {
        let (m, _) = recorder(MemoryPolicy::Fixed(100));
        let first = m.ticket(70, TicketKind::Active);
        first.start().unwrap();
        let second = m.ticket(50, TicketKind::Active);
        let err = second
            .start_timeout(Duration::from_millis(50))
            .expect_err("no room yet");
        assert!(err.to_string().contains("not admitted"), "{err}");
        let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&started);
        let waiter = std::thread::spawn(move || {
            second.start().unwrap();
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            second
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !started.load(std::sync::atomic::Ordering::SeqCst),
            "still waiting"
        );
        first.end();
        let second = waiter.join().unwrap();
        assert!(started.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(m.running(), vec![(50, TicketKind::Active)]);
        drop(second);
        let huge = m.ticket(101, TicketKind::Active);
        let err = huge.start().expect_err("can never fit");
        assert!(err.to_string().contains("can ever admit"), "{err}");
    }

    #[test]
    fn a_panicking_task_releases_its_ticket() {
        let (m, _) = recorder(MemoryPolicy::Fixed(100));
        let t = m.ticket(80, TicketKind::Active);
        let r = std::thread::spawn(move || {
            t.run(|| panic!("task failed")).ok();
        })
        .join();
        assert!(r.is_err(), "the task panicked");
        assert!(m.running().is_empty(), "its ticket ended");
        let next = m.ticket(90, TicketKind::Active);
        next.start_timeout(Duration::from_millis(50))
            .expect("admitted at once");
    }
}
