//! ACPI tables, read with the `acpi` crate: the MADT's list of processors and
//! the local APIC address.
//!
//! The bootloader hands over the RSDP's physical address. Tables are read
//! through the direct map (every table lies in RAM the bootloader maps, and
//! the direct map covers at least the first 4 GiB), so the handler's "map" is
//! an addition and "unmap" does nothing.

use core::ptr::NonNull;

use acpi::madt::{Madt, MadtEntry};
use acpi::{AcpiHandler, AcpiTables, PhysicalMapping};
use bitflags::bitflags;

/// Maps ACPI tables through the direct map at `phys_offset`.
#[derive(Clone, Copy, Debug)]
struct DirectMapHandler {
    phys_offset: u64,
}

impl AcpiHandler for DirectMapHandler {
    unsafe fn map_physical_region<T>(&self, physical_address: usize, size: usize) -> PhysicalMapping<Self, T> {
        let virt = (self.phys_offset + physical_address as u64) as *mut T;
        let virt = NonNull::new(virt).expect("direct map at virtual address 0");
        // SAFETY: the direct map covers every RAM frame and the first 4 GiB
        // for the lifetime of the kernel, so `virt` stays valid for `size`
        // bytes; the acpi crate's contract makes `physical_address` a `T`.
        unsafe { PhysicalMapping::new(physical_address, virt, size, size, *self) }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {
        // The direct map is permanent: nothing to undo.
    }
}

bitflags! {
    /// Flags of a MADT Processor Local APIC / x2APIC entry (ACPI 6.5, 5.2.12.2).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct LocalApicFlags: u32 {
        /// The processor is present and usable now.
        const ENABLED = 1 << 0;
        /// The processor may be brought online later (hot-plug); only
        /// meaningful when ENABLED is clear.
        const ONLINE_CAPABLE = 1 << 1;
    }
}

/// One processor as the MADT describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MadtCpu {
    /// Its local APIC ID (the destination of IPIs).
    pub apic_id: u32,
    /// The ACPI processor UID.
    pub acpi_uid: u32,
    /// Its flags.
    pub flags: LocalApicFlags,
    /// Whether it came from an x2APIC entry (IDs >= 255 need x2APIC mode).
    pub x2apic_entry: bool,
}

impl MadtCpu {
    /// Whether the firmware says the processor can be started now.
    pub fn is_enabled(&self) -> bool {
        self.flags.contains(LocalApicFlags::ENABLED)
    }
}

/// What the MADT says besides the processor list.
#[derive(Clone, Copy, Debug, Default)]
pub struct MadtSummary {
    /// Physical address of the local APIC registers (xAPIC mode), after any
    /// 64-bit override entry.
    pub local_apic_phys: u64,
    /// Number of I/O APICs.
    pub io_apics: usize,
    /// Whether the machine also has the legacy dual 8259 PICs.
    pub has_8259: bool,
}

/// Why the processors could not be enumerated.
#[derive(Debug)]
pub enum Error {
    /// The bootloader passed no RSDP.
    NoRsdp,
    /// The acpi crate rejected the tables.
    Acpi(acpi::AcpiError),
}

/// Walks the MADT and calls `each` for every processor entry (Local APIC
/// and Local x2APIC, in table order, enabled or not).
///
/// # Safety
///
/// `rsdp` is the physical address of the RSDP the firmware provided, and
/// physical memory is mapped at `phys_offset`.
pub unsafe fn enumerate_cpus(
    rsdp: Option<u64>,
    phys_offset: u64,
    mut each: impl FnMut(MadtCpu),
) -> Result<MadtSummary, Error> {
    let rsdp = rsdp.ok_or(Error::NoRsdp)?;
    let handler = DirectMapHandler { phys_offset };
    // SAFETY: the caller guarantees `rsdp` is the firmware's RSDP.
    let tables = unsafe { AcpiTables::from_rsdp(handler, rsdp as usize) }.map_err(Error::Acpi)?;
    let madt = tables.find_table::<Madt>().map_err(Error::Acpi)?;
    let madt = madt.get();
    let mut summary = MadtSummary {
        local_apic_phys: u64::from(madt.local_apic_address),
        io_apics: 0,
        has_8259: madt.supports_8259(),
    };
    for entry in madt.entries() {
        match entry {
            MadtEntry::LocalApic(e) => each(MadtCpu {
                apic_id: u32::from(e.apic_id),
                acpi_uid: u32::from(e.processor_id),
                flags: LocalApicFlags::from_bits_truncate(e.flags),
                x2apic_entry: false,
            }),
            MadtEntry::LocalX2Apic(e) => each(MadtCpu {
                apic_id: e.x2apic_id,
                acpi_uid: e.processor_uid,
                flags: LocalApicFlags::from_bits_truncate(e.flags),
                x2apic_entry: true,
            }),
            MadtEntry::LocalApicAddressOverride(e) => summary.local_apic_phys = e.local_apic_address,
            MadtEntry::IoApic(_) => summary.io_apics += 1,
            _ => {}
        }
    }
    Ok(summary)
}
