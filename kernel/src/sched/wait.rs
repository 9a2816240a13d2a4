//! Wait queues: block until a condition holds.

use alloc::sync::Arc;
use alloc::vec::Vec;

use spin::Mutex;

use super::Task;

/// Tasks waiting for something. The lock protects the list of waiters.
pub struct WaitQueue {
    waiters: Mutex<Vec<Arc<Task>>>,
}

impl WaitQueue {
    /// An empty queue.
    pub const fn new() -> Self {
        Self { waiters: Mutex::new(Vec::new()) }
    }

    /// Blocks the running task until `cond()` is true. `cond` is evaluated
    /// after the task registered itself, so a `wake_all` that makes it true
    /// cannot be lost.
    pub fn wait_until(&self, mut cond: impl FnMut() -> bool) {
        loop {
            if cond() {
                return;
            }
            let me = super::current();
            self.waiters.lock().push(me.clone());
            me.prepare_block();
            if cond() {
                me.cancel_block();
                let mut waiters = self.waiters.lock();
                waiters.retain(|t| !Arc::ptr_eq(t, &me));
                if waiters.is_empty() {
                    // Give the buffer back, as `wake_all` does: an idle
                    // queue holds no heap (the leak checks count bytes).
                    *waiters = Vec::new();
                }
                return;
            }
            drop(me);
            super::block_prepared();
        }
    }

    /// Wakes every waiter.
    pub fn wake_all(&self) {
        let waiters = core::mem::take(&mut *self.waiters.lock());
        for t in &waiters {
            super::wake(t);
        }
    }
}

impl Default for WaitQueue {
    fn default() -> Self {
        Self::new()
    }
}
