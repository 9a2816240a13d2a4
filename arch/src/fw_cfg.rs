//! QEMU's firmware configuration device (fw_cfg), used as the kernel command
//! line: xtask passes `-fw_cfg name=opt/ptlk/cmdline,string=...` and the kernel
//! reads the file back here. The I/O-port interface is a selector register at
//! 0x510 and a data register at 0x511.

use x86_64::instructions::port::Port;

const SELECTOR: u16 = 0x510;
const DATA: u16 = 0x511;
const KEY_SIGNATURE: u16 = 0x0000;
const KEY_FILE_DIR: u16 = 0x0019;

fn select(key: u16) {
    let mut port: Port<u16> = Port::new(SELECTOR);
    // SAFETY: 0x510 is the fw_cfg selector; selecting a key has no effect
    // beyond the device's read cursor.
    unsafe { port.write(key) };
}

fn read_bytes(buf: &mut [u8]) {
    let mut port: Port<u8> = Port::new(DATA);
    for b in buf {
        // SAFETY: 0x511 is the fw_cfg data port; reads advance its cursor.
        *b = unsafe { port.read() };
    }
}

/// Whether the fw_cfg device is present ("QEMU" signature).
pub fn present() -> bool {
    select(KEY_SIGNATURE);
    let mut sig = [0u8; 4];
    read_bytes(&mut sig);
    &sig == b"QEMU"
}

/// Reads the fw_cfg file `name` into `buf`; returns the bytes read, or `None`
/// if there is no such file (or no device).
pub fn read_file<'a>(name: &str, buf: &'a mut [u8]) -> Option<&'a [u8]> {
    if !present() {
        return None;
    }
    select(KEY_FILE_DIR);
    let mut count = [0u8; 4];
    read_bytes(&mut count);
    for _ in 0..u32::from_be_bytes(count) {
        let mut entry = [0u8; 64];
        read_bytes(&mut entry);
        let size = u32::from_be_bytes(entry[0..4].try_into().unwrap()) as usize;
        let key = u16::from_be_bytes(entry[4..6].try_into().unwrap());
        let raw_name = &entry[8..64];
        let len = raw_name.iter().position(|&b| b == 0).unwrap_or(56);
        if &raw_name[..len] == name.as_bytes() {
            select(key);
            let n = size.min(buf.len());
            read_bytes(&mut buf[..n]);
            return Some(&buf[..n]);
        }
    }
    None
}
