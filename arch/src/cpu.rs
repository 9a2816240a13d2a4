//! CPU feature detection (CPUID) and enabling of protection features.

use core::arch::x86_64::{__cpuid_count, CpuidResult};

use bitflags::bitflags;
use x86_64::registers::control::{Cr4, Cr4Flags};
use x86_64::registers::model_specific::{Efer, EferFlags};

bitflags! {
    /// The CPU features this kernel cares about.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Features: u32 {
        /// Supervisor-mode execution prevention.
        const SMEP = 1 << 0;
        /// Supervisor-mode access prevention.
        const SMAP = 1 << 1;
        /// Process-context identifiers.
        const PCID = 1 << 2;
        /// The `invpcid` instruction.
        const INVPCID = 1 << 3;
        /// x2APIC mode of the local APIC.
        const X2APIC = 1 << 4;
        /// 1 GiB pages.
        const PDPE1GB = 1 << 5;
        /// No-execute bit in page tables.
        const NX = 1 << 6;
        /// The TSC-deadline timer mode.
        const TSC_DEADLINE = 1 << 7;
        /// The TSC runs at a constant rate in all states.
        const INVARIANT_TSC = 1 << 8;
        /// `rdtscp`.
        const RDTSCP = 1 << 9;
        /// Running under a hypervisor (CPUID.1:ECX bit 31): vCPUs may be
        /// descheduled by the host at any moment (QEMU's TCG sets it too).
        const HYPERVISOR = 1 << 10;
    }
}

fn cpuid(leaf: u32, sub: u32) -> CpuidResult {
    // SAFETY: CPUID exists on every x86_64 CPU and has no side effects.
    #[allow(unused_unsafe)]
    unsafe {
        __cpuid_count(leaf, sub)
    }
}

/// Features reported by this CPU.
pub fn features() -> Features {
    let mut f = Features::empty();
    let max = cpuid(0, 0).eax;
    let l1 = cpuid(1, 0);
    f.set(Features::PCID, l1.ecx & (1 << 17) != 0);
    f.set(Features::X2APIC, l1.ecx & (1 << 21) != 0);
    f.set(Features::TSC_DEADLINE, l1.ecx & (1 << 24) != 0);
    f.set(Features::HYPERVISOR, l1.ecx & (1 << 31) != 0);
    if max >= 7 {
        let l7 = cpuid(7, 0);
        f.set(Features::SMEP, l7.ebx & (1 << 7) != 0);
        f.set(Features::INVPCID, l7.ebx & (1 << 10) != 0);
        f.set(Features::SMAP, l7.ebx & (1 << 20) != 0);
    }
    let max_ext = cpuid(0x8000_0000, 0).eax;
    if max_ext >= 0x8000_0001 {
        let e1 = cpuid(0x8000_0001, 0);
        f.set(Features::NX, e1.edx & (1 << 20) != 0);
        f.set(Features::PDPE1GB, e1.edx & (1 << 26) != 0);
        f.set(Features::RDTSCP, e1.edx & (1 << 27) != 0);
    }
    if max_ext >= 0x8000_0007 {
        f.set(Features::INVARIANT_TSC, cpuid(0x8000_0007, 0).edx & (1 << 8) != 0);
    }
    f
}

/// What the CPU reports about a performance-monitoring unit whose counters
/// could raise an overflow NMI (the sampling profiler's preferred clock).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Perfmon {
    /// Intel architectural perfmon version (CPUID.0AH:EAX bits 7..0); 0: none.
    pub version: u8,
    /// General-purpose counters per logical CPU (CPUID.0AH:EAX bits 15..8).
    pub counters: u8,
    /// AMD core performance counter extensions (CPUID.80000001H:ECX bit 23).
    pub amd_core_ext: bool,
}

/// The performance-monitoring unit as CPUID describes it. QEMU's TCG
/// emulates none: `-cpu max` reports version 0 and no AMD extension.
pub fn perfmon() -> Perfmon {
    let mut p = Perfmon::default();
    if cpuid(0, 0).eax >= 0xa {
        let a = cpuid(0xa, 0).eax;
        p.version = a as u8;
        p.counters = (a >> 8) as u8;
    }
    if cpuid(0x8000_0000, 0).eax >= 0x8000_0001 {
        p.amd_core_ext = cpuid(0x8000_0001, 0).ecx & (1 << 23) != 0;
    }
    p
}

/// The CPU's brand string, e.g. "QEMU TCG CPU version 2.5+".
pub fn brand(buf: &mut [u8; 48]) -> &str {
    for (i, leaf) in (0x8000_0002u32..=0x8000_0004).enumerate() {
        let r = cpuid(leaf, 0);
        for (j, reg) in [r.eax, r.ebx, r.ecx, r.edx].into_iter().enumerate() {
            buf[i * 16 + j * 4..i * 16 + j * 4 + 4].copy_from_slice(&reg.to_le_bytes());
        }
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(48);
    core::str::from_utf8(&buf[..end]).unwrap_or("?").trim()
}

/// Turns on NX (EFER.NXE), write protection in ring 0 (CR0.WP), and, where
/// the CPU has them, SMEP and SMAP. Returns what is now on. Call on every CPU.
pub fn enable_protection(f: Features) -> Features {
    let mut on = Features::empty();
    if f.contains(Features::NX) {
        // SAFETY: setting NXE only makes the NX bit in page tables meaningful;
        // the bootloader's and our tables set NX only on non-code pages.
        unsafe { Efer::update(|e| e.insert(EferFlags::NO_EXECUTE_ENABLE)) };
        on |= Features::NX;
    }
    // SAFETY: CR0.WP makes ring 0 honour read-only pages; the kernel never
    // writes through a read-only mapping on purpose.
    unsafe {
        x86_64::registers::control::Cr0::update(|c| c.insert(x86_64::registers::control::Cr0Flags::WRITE_PROTECT))
    };
    let mut cr4 = Cr4Flags::empty();
    if f.contains(Features::SMEP) {
        cr4 |= Cr4Flags::SUPERVISOR_MODE_EXECUTION_PROTECTION;
        on |= Features::SMEP;
    }
    if f.contains(Features::SMAP) {
        cr4 |= Cr4Flags::SUPERVISOR_MODE_ACCESS_PREVENTION;
        on |= Features::SMAP;
    }
    // SAFETY: SMEP/SMAP only forbid ring 0 from executing/accessing user
    // pages; kernel code reaches user memory only inside stac/clac windows.
    unsafe { Cr4::update(|c| c.insert(cr4)) };
    on
}

/// Allows ring-0 access to user pages until [`clac`] (SMAP window).
#[inline(always)]
pub fn stac() {
    // SAFETY: only changes RFLAGS.AC; callers pair it with `clac`.
    unsafe { core::arch::asm!("stac", options(nomem, nostack)) };
}

/// Closes an SMAP window opened by [`stac`].
#[inline(always)]
pub fn clac() {
    // SAFETY: only changes RFLAGS.AC.
    unsafe { core::arch::asm!("clac", options(nomem, nostack)) };
}
