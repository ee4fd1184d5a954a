//! Process-wide worker pools that survive `fork()`.
//!
//! Invariant: every pool the library keeps for the whole process (the shared rayon pool, the
//! read-ahead workers) belongs to the process that built it. `fork()` copies a pool's
//! bookkeeping into the child but none of its threads, so a child that used it would wait
//! forever; each accessor therefore checks the process id and builds a fresh pool in a child.
//! The parent's copy is leaked in the child, never dropped: dropping would touch locks and
//! condition variables whose owners did not survive the fork.

use std::sync::{Arc, Mutex};

/// A value built once per process: rebuilt (and the inherited one leaked) after a fork.
pub(crate) struct PerProcess<T> {
    slot: Mutex<Option<(u32, T)>>,
}

impl<T: Clone> PerProcess<T> {
    pub(crate) const fn new() -> Self {
        PerProcess {
            slot: Mutex::new(None),
        }
    }

    /// This process's value, built by `make` on first use in this process.
    pub(crate) fn get(&self, make: impl FnOnce() -> T) -> T {
        let pid = std::process::id();
        // A poisoned lock only means a builder panicked; the slot is still consistent.
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        match slot.take() {
            Some((owner, value)) if owner == pid => {
                *slot = Some((owner, value.clone()));
                value
            }
            inherited => {
                std::mem::forget(inherited);
                let value = make();
                *slot = Some((pid, value.clone()));
                value
            }
        }
    }
}

/// The shared rayon pool (one thread per core) every parallel step outside a caller-sized pool
/// runs on. Never rayon's global pool: that one cannot be rebuilt after a fork.
pub(crate) fn shared() -> Arc<rayon::ThreadPool> {
    static POOL: PerProcess<Arc<rayon::ThreadPool>> = PerProcess::new();
    POOL.get(|| {
        Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(crate::cores())
                .thread_name(|i| format!("layerstore-pool-{i}"))
                .build()
                .expect("starting the shared worker pool"),
        )
    })
}

/// Run `f` on the shared pool (its `par_iter`s use that pool).
pub(crate) fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    shared().install(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_is_built_once_per_process() {
        let built = std::sync::atomic::AtomicUsize::new(0);
        let cell: PerProcess<u32> = PerProcess::new();
        let make = || {
            built.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            7
        };
        assert_eq!(cell.get(make), 7);
        assert_eq!(cell.get(make), 7);
        assert_eq!(built.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[test]
    fn a_value_from_another_process_is_rebuilt() {
        let cell: PerProcess<u32> = PerProcess::new();
        // What a forked child finds: a value its parent (another pid) built.
        *cell.slot.lock().unwrap() = Some((std::process::id().wrapping_add(1), 1));
        assert_eq!(cell.get(|| 2), 2);
        assert_eq!(cell.get(|| 3), 2);
    }
}
