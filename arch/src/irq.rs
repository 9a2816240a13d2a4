//! Interrupt-flag helpers, and [`IrqsOff`], the proof that interrupts are
//! off on this CPU.

use core::marker::PhantomData;

use x86_64::instructions::interrupts;

/// Runs `f` with maskable interrupts disabled, restoring the previous state.
pub fn without_interrupts<R>(f: impl FnOnce() -> R) -> R {
    interrupts::without_interrupts(f)
}

/// Whether maskable interrupts are enabled on this CPU.
pub fn enabled() -> bool {
    interrupts::are_enabled()
}

/// Enables maskable interrupts.
pub fn enable() {
    interrupts::enable();
}

/// Disables maskable interrupts.
pub fn disable() {
    interrupts::disable();
}

/// Halts until the next interrupt (interrupts must be enabled to wake).
pub fn halt() {
    x86_64::instructions::hlt();
}

/// Proof that maskable interrupts are off on this CPU (Linux's
/// `local_irq_save`/`lockdep_assert_irqs_disabled`, as a value): until they
/// are enabled again nothing else runs here, not even an interrupt handler,
/// so state that only its own CPU touches may be used without a lock by
/// whoever holds one.
///
/// [`save`](IrqsOff::save) disables interrupts and enables them again when
/// the guard drops, if they were on; [`assert`](IrqsOff::assert) checks that
/// they are already off and leaves them alone. Interrupts must stay off while
/// a guard lives (code that enables them first drops the guard); users that
/// rely on it can [`check`](IrqsOff::check) this in debug builds. Not `Send`:
/// it speaks for the CPU that made it.
#[must_use = "interrupts are restored when the guard drops"]
pub struct IrqsOff {
    /// Enable interrupts again on drop (they were on at `save`).
    restore: bool,
    _this_cpu: PhantomData<*const ()>,
}

impl IrqsOff {
    /// Disables interrupts; they come back on when the guard drops if they
    /// were on now.
    pub fn save() -> Self {
        let restore = enabled();
        disable();
        Self { restore, _this_cpu: PhantomData }
    }

    /// The proof for code that runs with interrupts off already (the guard
    /// does not enable them on drop). Panics if they are on.
    pub fn assert() -> Self {
        assert!(!enabled(), "interrupts are enabled");
        Self { restore: false, _this_cpu: PhantomData }
    }

    /// Debug builds: panics if interrupts were enabled while this guard lived.
    #[inline]
    pub fn check(&self) {
        debug_assert!(!enabled(), "interrupts enabled under an IrqsOff guard");
    }
}

impl Drop for IrqsOff {
    fn drop(&mut self) {
        if self.restore {
            enable();
        }
    }
}
