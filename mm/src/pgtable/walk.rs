//! The page-table walker: pointers to entries at each level, the `*_offset`
//! steps between levels, the `*_populate` writers and the `*_alloc`
//! allocators. There is one walker; host tests use it unchanged.
//!
//! # Locks (see [`crate::lock`] for the whole protocol)
//!
//! * PGD/P4D and PUD entries are written under `mm.page_table_lock`;
//! * PMD entries under the PMD table's lock ([`crate::pmd_lock`]);
//! * the writers take the guard as proof and check in debug builds that it is
//!   the lock of *that* entry's table.
//!
//! Reads are lockless (`READ_ONCE`, here an acquire load: it also orders the
//! reads of the table the entry points to after the writer's zeroing and
//! constructor, which the writer's release store publishes: Linux's `smp_wmb`
//! in `pmd_install`).
//!
//! Each `*_offset` returns `None` when the upper entry is not a table (none,
//! huge, bad, or pointing outside managed memory): a corrupted entry can never
//! turn into a wild pointer.

use core::fmt;
use core::sync::atomic::Ordering::{Acquire, Release};

use super::entry::{P4d, Pgd, Pmd, Pud};
use super::slot::EntrySlot;
use crate::addr::{PhysAddr, VirtAddr};
use crate::lock::RawSpinGuard;
use crate::mm_struct::Mm;
use crate::ptdesc::{PtLevel, PtPage, pagetable_alloc, pagetable_ctor, pagetable_pmd_ctor, pagetable_pte_ctor};
use crate::ptlock::AllocError;
use crate::{pmd_lock, pmd_lockptr};

macro_rules! entry_ref {
    ($(#[$m:meta])* $name:ident, $entry:ty) => {
        $(#[$m])*
        #[derive(Clone, Copy)]
        pub struct $name<'a> {
            pub(crate) slot: EntrySlot<'a>,
        }

        impl<'a> $name<'a> {
            /// Reads the entry (lockless; Linux `p?dp_get`).
            #[inline]
            pub fn get(&self) -> $entry {
                <$entry>::from_raw(self.slot.load(Acquire))
            }
            /// The entry's physical address.
            pub fn pa(&self) -> PhysAddr {
                self.slot.pa()
            }
            /// The physical address of the table containing the entry.
            pub fn table_pa(&self) -> PhysAddr {
                self.slot.pa().align_down(crate::addr::PAGE_SIZE)
            }
            #[inline]
            pub(crate) fn write(&self, v: $entry) {
                self.slot.store(v.raw(), Release);
            }
        }

        impl fmt::Debug for $name<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:?} = {:?})"), self.pa(), self.get())
            }
        }

        impl PartialEq for $name<'_> {
            fn eq(&self, other: &Self) -> bool {
                self.pa() == other.pa()
            }
        }
    };
}

entry_ref!(
    /// A pointer to a PGD entry (`pgd_t *`).
    PgdRef, Pgd
);
entry_ref!(
    /// A pointer to a PUD entry (`pud_t *`).
    PudRef, Pud
);
entry_ref!(
    /// A pointer to a PMD entry (`pmd_t *`).
    PmdRef, Pmd
);

/// P4D is folded: a P4D pointer is the PGD pointer.
pub type P4dRef<'a> = PgdRef<'a>;

fn entry_in<'a>(mm: &'a Mm<'_>, table: PhysAddr, index: usize) -> Option<EntrySlot<'a>> {
    mm.phys().slot(table.add(8 * index as u64))
}

/// Linux `pgd_offset`: the PGD entry for `addr`.
pub fn pgd_offset<'a>(mm: &'a Mm<'_>, addr: VirtAddr) -> PgdRef<'a> {
    let pa = mm.pgd_phys().add(8 * addr.pgd_index() as u64);
    // SAFETY: the PGD is either this Mm's own (managed) frame or the kernel
    // PML4 named by a `KernelPgd`, whose contract makes it mapped, live and
    // atomically accessed; `pa` is 8-byte aligned inside it.
    let slot = unsafe { mm.phys().slot_unchecked(pa) };
    PgdRef { slot }
}

/// Linux `p4d_offset`: folded, the PGD entry itself.
pub fn p4d_offset<'a>(_mm: &'a Mm<'_>, pgd: PgdRef<'a>, _addr: VirtAddr) -> P4dRef<'a> {
    pgd
}

/// Linux `pud_offset`: the PUD entry for `addr` in the table `p4d` points to,
/// or `None` if `p4d` is not a table.
pub fn pud_offset<'a>(mm: &'a Mm<'_>, p4d: P4dRef<'a>, addr: VirtAddr) -> Option<PudRef<'a>> {
    let v: P4d = p4d.get();
    if !v.is_table() {
        return None;
    }
    Some(PudRef { slot: entry_in(mm, v.phys(), addr.pud_index())? })
}

/// Linux `pmd_offset`: the PMD entry for `addr` in the table `pud` points to,
/// or `None` if `pud` is not a table (none, a 1 GiB page, bad).
pub fn pmd_offset<'a>(mm: &'a Mm<'_>, pud: PudRef<'a>, addr: VirtAddr) -> Option<PmdRef<'a>> {
    let v = pud.get();
    if !v.is_table() {
        return None;
    }
    Some(PmdRef { slot: entry_in(mm, v.phys(), addr.pmd_index())? })
}

#[track_caller]
fn assert_page_table_lock(mm: &Mm<'_>, guard: &RawSpinGuard<'_>) {
    debug_assert!(
        core::ptr::eq(guard.lock(), mm.page_table_lock_raw()),
        "PGD/P4D/PUD entries are written under mm.page_table_lock"
    );
}

#[track_caller]
fn assert_pmd_lock(mm: &Mm<'_>, pmd: PmdRef<'_>, guard: &RawSpinGuard<'_>) {
    debug_assert!(
        core::ptr::eq(guard.lock(), pmd_lockptr(mm, pmd).raw()),
        "PMD entries are written under their table's pmd_lock"
    );
}

/// Linux `p4d_populate` (folded: `pgd_populate`): points `p4d` at a PUD table.
/// `guard` must hold `mm.page_table_lock`.
#[track_caller]
pub fn p4d_populate<'p>(mm: &Mm<'p>, p4d: P4dRef<'_>, table: PtPage<'p>, guard: &RawSpinGuard<'_>) {
    assert_page_table_lock(mm, guard);
    let pa = table.publish().phys();
    p4d.write(Pgd::table(pa, !mm.is_init_mm()));
}

/// Linux `pud_populate`: points `pud` at a PMD table, under `mm.page_table_lock`.
#[track_caller]
pub fn pud_populate<'p>(mm: &Mm<'p>, pud: PudRef<'_>, table: PtPage<'p>, guard: &RawSpinGuard<'_>) {
    assert_page_table_lock(mm, guard);
    let pa = table.publish().phys();
    pud.write(Pud::table(pa, !mm.is_init_mm()));
}

/// Linux `pmd_populate`: points `pmd` at a PTE table, under the PMD lock.
#[track_caller]
pub fn pmd_populate<'p>(mm: &Mm<'p>, pmd: PmdRef<'_>, table: PtPage<'p>, guard: &RawSpinGuard<'_>) {
    assert_pmd_lock(mm, pmd, guard);
    let pa = table.publish().phys();
    pmd.write(Pmd::table(pa, !mm.is_init_mm()));
}

/// Linux `set_pmd`: writes a PMD entry (a huge page, or none) under the PMD
/// lock. Overwriting a table pointer detaches that table: the caller must
/// also hold the table's PTE lock while doing so and free the table only after
/// a grace period ([`PtPage::from_published`]).
#[track_caller]
pub fn set_pmd(mm: &Mm<'_>, pmd: PmdRef<'_>, v: Pmd, guard: &RawSpinGuard<'_>) {
    assert_pmd_lock(mm, pmd, guard);
    pmd.write(v);
}

/// Linux `p4d_clear` (folded: `pgd_clear`): empties a PGD entry under
/// `mm.page_table_lock`, detaching the PUD table it pointed to; the caller
/// frees that table only after a grace period.
#[track_caller]
pub fn p4d_clear(mm: &Mm<'_>, p4d: P4dRef<'_>, guard: &RawSpinGuard<'_>) {
    assert_page_table_lock(mm, guard);
    p4d.write(Pgd::NONE);
}

/// Linux `set_pud`: writes a PUD entry (a 1 GiB page, or none) under
/// `mm.page_table_lock`.
#[track_caller]
pub fn set_pud(mm: &Mm<'_>, pud: PudRef<'_>, v: Pud, guard: &RawSpinGuard<'_>) {
    assert_page_table_lock(mm, guard);
    pud.write(v);
}

/// Linux `pmd_clear_bad`: reports a bad PMD entry and clears it. Lockless like
/// Linux's, but only clears if the entry still holds the bad value it was
/// judged by (a compare-and-swap), so a concurrent valid update survives.
pub fn pmd_clear_bad(pmd: PmdRef<'_>, bad: Pmd) {
    log::error!("mm: bad {bad} at {:?}, clearing", pmd.pa());
    let _ = pmd.slot.compare_exchange(bad.raw(), 0);
}

/// Linux `p4d_alloc`: with P4D folded it never allocates.
pub fn p4d_alloc<'a>(_mm: &'a Mm<'_>, pgd: PgdRef<'a>, _addr: VirtAddr) -> Option<P4dRef<'a>> {
    Some(pgd)
}

/// Linux `pud_alloc`: the PUD entry for `addr`, allocating the PUD table if
/// the P4D is empty. The table is allocated outside the lock and installed
/// under `mm.page_table_lock` only if the entry is still empty; otherwise
/// (another CPU won) it is freed. `None`: out of memory, or the P4D entry is
/// not a table.
#[inline]
pub fn pud_alloc<'a>(mm: &'a Mm<'_>, p4d: P4dRef<'a>, addr: VirtAddr) -> Option<PudRef<'a>> {
    if p4d.get().is_none() {
        __pud_alloc(mm, p4d).ok()?;
    }
    pud_offset(mm, p4d, addr)
}

/// Linux `__pud_alloc`: [`pud_alloc`]'s allocation, out of line (a fault
/// almost always finds its upper tables present), as [`__pte_alloc`] is
/// [`pte_alloc`]'s. `Err`: out of memory.
#[inline(never)]
pub fn __pud_alloc(mm: &Mm<'_>, p4d: P4dRef<'_>) -> Result<(), AllocError> {
    let mut new = pagetable_alloc(mm.phys()).ok_or(AllocError)?;
    pagetable_ctor(&mut new, PtLevel::Pud);
    let ptl = mm.lock_page_table();
    if p4d.get().is_none() {
        mm.inc_nr(PtLevel::Pud);
        p4d_populate(mm, p4d, new, &ptl);
    } else {
        drop(ptl);
        drop(new); // lost the race: dtor + free, outside the lock
    }
    Ok(())
}

/// Linux `pmd_alloc`: the PMD entry for `addr`, allocating and constructing
/// (`pagetable_pmd_ctor`) the PMD table if the PUD is empty, then installing
/// it under the PUD lock (`mm.page_table_lock`) only if still empty, else
/// freeing it (dtor + free). `None`: out of memory (frame or ctor), or the PUD
/// maps a 1 GiB page or is bad.
#[inline]
pub fn pmd_alloc<'a>(mm: &'a Mm<'_>, pud: PudRef<'a>, addr: VirtAddr) -> Option<PmdRef<'a>> {
    if pud.get().is_none() {
        __pmd_alloc(mm, pud).ok()?;
    }
    pmd_offset(mm, pud, addr)
}

/// Linux `__pmd_alloc`: [`pmd_alloc`]'s allocation, out of line. `Err`: out
/// of memory (frame or ctor).
#[inline(never)]
pub fn __pmd_alloc(mm: &Mm<'_>, pud: PudRef<'_>) -> Result<(), AllocError> {
    let mut new = pagetable_alloc(mm.phys()).ok_or(AllocError)?;
    pagetable_pmd_ctor(mm, &mut new)?; // on failure `new` drops: freed
    let ptl = crate::pud_lock(mm, pud);
    if pud.get().is_none() {
        mm.inc_nr(PtLevel::Pmd);
        pud_populate(mm, pud, new, &ptl);
    } else {
        drop(ptl);
        drop(new);
    }
    Ok(())
}

/// Linux `__pte_alloc` (+ `pmd_install`): allocates and constructs a PTE
/// table outside any lock, then under `pmd_lock` installs it only if the PMD
/// is still empty; if another CPU populated it first, the new table is
/// destroyed and freed (after the lock is dropped).
#[inline(never)]
pub fn __pte_alloc(mm: &Mm<'_>, pmd: PmdRef<'_>) -> Result<(), AllocError> {
    let mut new = pagetable_alloc(mm.phys()).ok_or(AllocError)?;
    pagetable_pte_ctor(mm, &mut new)?; // on failure `new` drops: freed
    let ptl = pmd_lock(mm, pmd);
    if pmd.get().is_none() {
        mm.inc_nr(PtLevel::Pte);
        pmd_populate(mm, pmd, new, &ptl);
        drop(ptl);
    } else {
        drop(ptl);
        drop(new);
    }
    Ok(())
}

/// Linux `pte_alloc`: makes sure `pmd` points to something, allocating a PTE
/// table if it is empty. `Ok` also when the PMD holds a huge page: the
/// caller's `pte_offset_map_lock` then returns `None`. `Err`: out of memory.
#[inline]
pub fn pte_alloc(mm: &Mm<'_>, pmd: PmdRef<'_>) -> Result<(), AllocError> {
    if pmd.get().is_none() { __pte_alloc(mm, pmd) } else { Ok(()) }
}

/// Walks to the PMD entry for `addr`, allocating PUD and PMD tables as needed
/// (the fault path's first step). `None`: out of memory, or a huge PUD.
pub fn walk_alloc_pmd<'a>(mm: &'a Mm<'_>, addr: VirtAddr) -> Option<PmdRef<'a>> {
    let pgd = pgd_offset(mm, addr);
    let p4d = p4d_alloc(mm, pgd, addr)?;
    let pud = pud_alloc(mm, p4d, addr)?;
    pmd_alloc(mm, pud, addr)
}

/// Walks to the PMD entry for `addr` without allocating.
pub fn walk_pmd<'a>(mm: &'a Mm<'_>, addr: VirtAddr) -> Option<PmdRef<'a>> {
    let pgd = pgd_offset(mm, addr);
    let p4d = p4d_offset(mm, pgd, addr);
    let pud = pud_offset(mm, p4d, addr)?;
    pmd_offset(mm, pud, addr)
}
