//! Interrupt-flag helpers.

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
