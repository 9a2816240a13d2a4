//! The legacy 8259 PICs: remapped away from the exception vectors and masked.
//!
//! Firmware leaves the master PIC delivering IRQ 0 (the PIT) on vector 8,
//! which is also #DF: the first `sti` would make every timer tick look like
//! a double fault without an error code. The kernel uses the local APIC
//! instead, so the PICs are moved to vectors 0x20..0x30 (harmless if a
//! spurious IRQ still slips out) and every line is masked.

use x86_64::instructions::port::Port;

/// Remaps both PICs to vectors 0x20..0x30 and masks all their lines.
pub fn disable() {
    let mut cmd1: Port<u8> = Port::new(0x20);
    let mut data1: Port<u8> = Port::new(0x21);
    let mut cmd2: Port<u8> = Port::new(0xa0);
    let mut data2: Port<u8> = Port::new(0xa1);
    // SAFETY: these are the 8259 command/data ports; the sequence is the
    // standard ICW1..ICW4 initialisation followed by a full mask.
    unsafe {
        cmd1.write(0x11); // ICW1: init, expect ICW4
        cmd2.write(0x11);
        data1.write(0x20); // ICW2: vector offsets
        data2.write(0x28);
        data1.write(0x04); // ICW3: slave on IRQ2
        data2.write(0x02);
        data1.write(0x01); // ICW4: 8086 mode
        data2.write(0x01);
        data1.write(0xff); // mask everything
        data2.write(0xff);
    }
}
