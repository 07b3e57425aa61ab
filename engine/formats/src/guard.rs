//! Calls into third-party code that may panic on hostile input.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Once;

thread_local! {
    /// How many [`catch_quietly`] calls this thread is inside.
    static QUIET: Cell<usize> = const { Cell::new(0) };
}

/// Runs `f` and turns a panic inside it into `Err(message)`. The panic's
/// default report is kept quiet for these calls only; every other panic
/// reports as before. For library calls (tokenizers, HTTP clients) that
/// panic on some malformed input rather than fail.
pub fn catch_quietly<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if QUIET.with(Cell::get) == 0 {
                previous(info);
            }
        }));
    });
    QUIET.with(|q| q.set(q.get() + 1));
    let out = catch_unwind(AssertUnwindSafe(f));
    QUIET.with(|q| q.set(q.get() - 1));
    out.map_err(|p| {
        p.downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("unknown cause")
            .to_string()
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_panic_becomes_its_message() {
        assert_eq!(super::catch_quietly(|| 3), Ok(3));
        let out: Result<(), String> = super::catch_quietly(|| panic!("bad {}", 7));
        assert_eq!(out, Err("bad 7".to_string()));
    }
}
