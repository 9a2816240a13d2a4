//! Model checks of the lock protocol with `loom`: the *real* helpers, walker
//! and allocator, with the spinlock word and every page-table entry as loom
//! atomics, explored over all interleavings (up to a preemption bound).
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p mm --release --target-dir target/loom loom`
//!
//! Each model leaks its machine for the threads (loom threads need `'static`)
//! and reclaims it once they are joined.

extern crate std;

use std::boxed::Box;

use crate::addr::VirtAddr;
use crate::config::{USE_SPLIT_PMD_PTLOCKS, USE_SPLIT_PTE_PTLOCKS};
use crate::pgtable::walk::{pud_alloc, walk_alloc_pmd, walk_pmd};
use crate::testing::TestMachine;
use crate::{
    Mm, PhysAddr, Pte, PteFlags, pgd_offset, pmd_alloc, pmd_lock, pte_alloc, pte_alloc_map_lock, pte_lockptr,
    pte_offset_map, pte_offset_map_lock, pud_offset, set_pmd,
};

const A: VirtAddr = VirtAddr::new(0x4000_0000);
const A_NEXT: VirtAddr = VirtAddr::new(0x4000_1000);
const B: VirtAddr = VirtAddr::new(0x4020_0000);

fn builder() -> loom::model::Builder {
    let mut b = loom::model::Builder::new();
    // Setup and teardown touch hundreds of entries on one thread; they add
    // branches but no interleavings.
    b.max_branches = 100_000;
    // No preemption bound (unless LOOM_MAX_PREEMPTIONS sets one): these
    // models are small enough to explore every interleaving in seconds.
    b
}

/// A machine and an address space for one execution; `'static` for loom
/// threads until [`Fixture::teardown`].
struct Fixture {
    m: *mut TestMachine,
    mm: *mut Mm<'static>,
}

impl Fixture {
    /// 256 KiB of RAM: enough for a few tables and pages.
    fn new() -> Self {
        Self::with_regions(&[(0x10_0000, 0x14_0000)])
    }
    /// A machine over `regions` (THP models need an order-9-capable block).
    fn with_regions(regions: &[(u64, u64)]) -> Self {
        let m = Box::into_raw(Box::new(TestMachine::with_regions(regions)));
        // SAFETY: just leaked; freed only in `teardown`, after every user.
        let mr: &'static TestMachine = unsafe { &*m };
        let mm = Box::into_raw(Box::new(Mm::new_in(&mr.phys, mr.kernel).unwrap()));
        Self { m, mm }
    }
    fn machine(&self) -> &'static TestMachine {
        // SAFETY: valid until `teardown`, which consumes the fixture.
        unsafe { &*self.m }
    }
    fn mm(&self) -> &'static Mm<'static> {
        // SAFETY: valid until `teardown`, which consumes the fixture.
        unsafe { &*self.mm }
    }
    fn teardown(self) {
        // SAFETY: every thread using them was joined and no reference
        // escaped the model closure; the Mm goes before its machine.
        unsafe {
            drop(Box::from_raw(self.mm));
            drop(Box::from_raw(self.m));
        }
    }
}

fn page(n: u64) -> Pte {
    Pte::page(PhysAddr::new(0x100_0000 + n * 0x1000), PteFlags::WRITABLE | PteFlags::USER)
}

/// Split locks that exist for `ptes` PTE tables and `pmds` PMD tables.
fn locks_for(ptes: u64, pmds: u64) -> u64 {
    if !crate::ALLOC_SPLIT_PTLOCKS {
        return 0;
    }
    (if USE_SPLIT_PTE_PTLOCKS { ptes } else { 0 }) + if USE_SPLIT_PMD_PTLOCKS { pmds } else { 0 }
}

#[test]
fn loom_pte_alloc_map_lock_race_installs_exactly_one_table() {
    // Bounded: the allocation path (frame allocator, constructor, the
    // allocated ptl's heap) made the unbounded search take minutes.
    bounded().check(|| {
        let f = Fixture::new();
        let (m, mm) = (f.machine(), f.mm());
        let pmd = walk_alloc_pmd(mm, A).unwrap();
        let before = m.phys.nr_free_pages();
        let threads = [(A, 1), (A_NEXT, 2)].map(|(addr, n)| {
            loom::thread::spawn(move || {
                let pmd = walk_pmd(mm, addr).unwrap();
                let mut g = pte_alloc_map_lock(mm, pmd, addr).expect("memory is plentiful");
                assert!(g.ptep_get().is_none());
                g.set_pte(page(n));
                g.pmdval()
            })
        });
        let [a, b] = threads.map(|t| t.join().unwrap());
        assert_eq!(a, b, "both threads used the same table");
        assert_eq!(pmd.get(), a);
        assert_eq!(mm.nr_ptes(), 1, "exactly one table installed");
        assert_eq!(m.phys.nr_free_pages(), before - 1, "the loser's table was freed");
        assert_eq!(m.phys.nr_allocated_ptlocks(), locks_for(1, 1), "the loser's lock was freed");
        let map = pte_offset_map(mm, pmd, A).unwrap();
        assert_eq!((map.get_at(A), map.get_at(A_NEXT)), (page(1), page(2)));
        drop(map);
        f.teardown();
    });
}

#[test]
fn loom_pmd_alloc_race_installs_exactly_one_table() {
    builder().check(|| {
        let f = Fixture::new();
        let (m, mm) = (f.machine(), f.mm());
        let pud = pud_alloc(mm, pgd_offset(mm, A), A).unwrap();
        let before = m.phys.nr_free_pages();
        let threads = [A, B].map(|addr| {
            loom::thread::spawn(move || {
                let pud = pud_offset(mm, pgd_offset(mm, addr), addr).unwrap();
                pmd_alloc(mm, pud, addr).expect("memory is plentiful").table_pa()
            })
        });
        let [a, b] = threads.map(|t| t.join().unwrap());
        assert_eq!(a, b);
        assert_eq!(pud.get().phys(), a);
        assert_eq!(mm.nr_pmds(), 1);
        assert_eq!(m.phys.nr_free_pages(), before - 1);
        assert_eq!(m.phys.nr_allocated_ptlocks(), locks_for(0, 1));
        f.teardown();
    });
}

#[test]
fn loom_pte_offset_map_lock_retries_when_the_pmd_changes() {
    builder().check(|| {
        let f = Fixture::new();
        let mm = f.mm();
        // Two PTE tables under one PMD table: pmd(A) -> T1, pmd(B) -> T2.
        let pmd_a = walk_alloc_pmd(mm, A).unwrap();
        let pmd_b = walk_alloc_pmd(mm, B).unwrap();
        pte_alloc(mm, pmd_a).unwrap();
        pte_alloc(mm, pmd_b).unwrap();
        let (t1, t2) = (pmd_a.get(), pmd_b.get());

        // The writer swaps the two tables, holding the PMD lock and both
        // tables' PTE locks (as Linux does when it replaces a PTE table).
        let writer = loom::thread::spawn(move || {
            let pl = pmd_lock(mm, pmd_a);
            // SAFETY: under the PMD lock both entries live in; the tables are
            // freed only with the machine.
            let (l1, l2) = unsafe { (pte_lockptr(mm, t1), pte_lockptr(mm, t2)) };
            // Two PTE locks: taken in the order of their tables' frames. With
            // split locks off they are the already-held page_table_lock.
            //
            // Not in lock-address order: under loom the lock does not fit in
            // a usize (ALLOC_SPLIT_PTLOCKS), so each `ptl` is a heap
            // allocation whose address changes from one execution to the
            // next. loom replays its recorded path of choices on every
            // execution and needs the same schedule to yield the same
            // sequence of atomic operations; a branch on heap addresses
            // flipped the lock order between executions, the replayed
            // choices then applied to the wrong operations (an RMW "read" a
            // value the word never held, two `fetch_add`s got one ticket) and
            // a waiter spun until the branch limit. Frame order is a total
            // order every CPU can compute and is deterministic.
            let (first, second) = if t1.pfn() < t2.pfn() { (l1, l2) } else { (l2, l1) };
            let g1 = (!first.is_held_by(&pl)).then(|| first.lock());
            let g2 = (!second.is_held_by(&pl) && first != second).then(|| second.lock_nested());
            set_pmd(mm, pmd_a, t2, &pl);
            set_pmd(mm, pmd_b, t1, &pl);
            drop((g2, g1, pl));
        });

        let reader = loom::thread::spawn(move || {
            let g = pte_offset_map_lock(mm, pmd_a, A).expect("pmd(A) always has a table");
            // Holding the PTE lock, the pmd must still point at the locked
            // table: the lock is worthless otherwise.
            assert_eq!(pmd_a.get(), g.pmdval(), "locked a table the pmd no longer points to");
            // SAFETY: `g` holds that table's lock inside its read-side section.
            assert!(unsafe { pte_lockptr(mm, pmd_a.get()) }.is_held_by(g.ptl()));
        });
        writer.join().unwrap();
        reader.join().unwrap();
        assert_eq!((pmd_a.get(), pmd_b.get()), (t2, t1));
        f.teardown();
    });
}

#[test]
fn loom_ticket_lock_is_mutually_exclusive() {
    use loom::cell::UnsafeCell;
    use loom::sync::Arc;

    use crate::lock::{LockClass, LockLevel, SpinLock};
    loom::model(|| {
        // loom's UnsafeCell reports any unsynchronised access: the lock must
        // order the two increments.
        let l = Arc::new(SpinLock::new(LockClass::Other, LockLevel::Untracked, UnsafeCell::new(0u64)));
        let ts: std::vec::Vec<_> = (0..2)
            .map(|_| {
                let l = l.clone();
                loom::thread::spawn(move || {
                    let g = l.lock();
                    // SAFETY: loom's cell access; the guard excludes others.
                    g.with_mut(|v| unsafe { *v += 1 });
                })
            })
            .collect();
        for t in ts {
            t.join().unwrap();
        }
        let g = l.lock();
        // SAFETY: loom's cell access under the guard, which excludes others.
        assert_eq!(g.with(|v| unsafe { *v }), 2);
    });
}

fn bounded() -> loom::model::Builder {
    let mut b = builder();
    // The fault path takes mmap_lock, the PTE lock and the frame
    // allocator's locks: bound preemptions (overridable by
    // LOOM_MAX_PREEMPTIONS) to keep the model to seconds.
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(3);
    }
    b
}

/// The frame allocator's last resort against another CPU's refill. Every
/// free frame sits on CPU 0's list (fewer than a batch), and CPUs 1 and 2
/// allocate one each: CPU 1's list (its own) and the zone are empty, CPU 2
/// shares CPU 0's list (the models have two). CPU 1 must drain CPU 0's list
/// and keep a frame even when CPU 2 empties that list and refills it from
/// the zone in between: "no memory" must mean no free frame anywhere.
#[test]
fn loom_alloc_keeps_a_drained_frame_from_another_cpus_refill() {
    bounded().check(|| {
        let f = Fixture::new();
        let phys = &f.machine().phys;
        // Take every free frame and give them back: they land on this
        // CPU's list, and each frame's words (loom atomics made on first
        // touch) exist before the threads race.
        let all: std::vec::Vec<_> = core::iter::from_fn(|| phys.alloc_pages(0)).collect();
        assert!(!all.is_empty() && all.len() < crate::frame::PCP_BATCH, "fewer free frames than a batch");
        drop(all);
        assert_eq!(phys.allocator().nr_cached(), phys.nr_free_pages(), "every free frame is on a list");
        let ts = [1, 2].map(|_| {
            // Each thread keeps its frame until both are joined.
            loom::thread::spawn(move || phys.alloc_pages(0).expect("free frames exist on CPU 0's list"))
        });
        let [a, b] = ts.map(|t| t.join().unwrap());
        assert_ne!(a.pfn(), b.pfn());
        drop((a, b));
        f.teardown();
    });
}

/// `do_anonymous_page` on two CPUs for the same page: both allocate and
/// zero a frame outside the lock; under the PTE lock exactly one installs,
/// the other sees the entry taken, frees its frame and returns quietly.
#[test]
fn loom_do_anonymous_page_another_cpu_won() {
    use crate::{Access, FaultResult, MapFlags, Prot, handle_mm_fault};
    bounded().check(|| {
        let f = Fixture::new();
        let (m, mm) = (f.machine(), f.mm());
        mm.mmap(Some(A), 2 * crate::PAGE_SIZE, Prot::READ | Prot::WRITE, MapFlags::FIXED).unwrap();
        // Tables exist already (the pte_alloc race has its own model).
        assert_eq!(handle_mm_fault(mm, A_NEXT, Access::READ), Ok(FaultResult::ZeroPage));
        // Touch A's entry once here: frame words become loom atomics on
        // first touch, and that creation must not race (it is the harness's
        // bookkeeping, not the protocol under test).
        assert!(mm.follow_pte_lockless(A).is_none());
        let before = m.phys.nr_free_pages();
        let ts = [0, 1].map(|_| loom::thread::spawn(move || handle_mm_fault(mm, A, Access::WRITE).unwrap()));
        let [r1, r2] = ts.map(|t| t.join().unwrap());
        let anon = [r1, r2].iter().filter(|r| **r == FaultResult::Anon).count();
        assert_eq!(anon, 1, "{r1:?} {r2:?}");
        assert!(matches!(if r1 == FaultResult::Anon { r2 } else { r1 }, FaultResult::LostRace | FaultResult::Spurious));
        assert_eq!(m.phys.nr_free_pages(), before - 1, "the loser's frame was freed");
        let st = mm.stats();
        assert_eq!((st.rss_pages, st.anon_faults), (1, 1));
        assert_eq!(mm.mappings().len(), 2);
        f.teardown();
    });
}

/// A THP fault and a 4 KiB fault (one CPU fell back) race on one empty
/// PMD: either the huge page or the PTE table wins under `pmd_lock`, the
/// loser frees what it prepared and retries into the winner's mapping.
#[test]
fn loom_thp_fault_races_pte_alloc_on_one_pmd() {
    use crate::memory::{FaultLock, fault_locked};
    use crate::vma::Vma;
    use crate::{Access, FaultResult, MapFlags, PMD_SIZE, Prot, VmFlags};
    const H: VirtAddr = VirtAddr::new(0x4000_0000);
    bounded().check(|| {
        // 4 MiB at 2 MiB: an order-9 block for the THP.
        let f = Fixture::with_regions(&[(0x20_0000, 0x60_0000)]);
        let (m, mm) = (f.machine(), f.mm());
        mm.mmap(Some(H), PMD_SIZE, Prot::READ | Prot::WRITE, MapFlags::FIXED | MapFlags::HUGEPAGE).unwrap();
        // The PMD table exists; the race is on its entry.
        let _ = walk_alloc_pmd(mm, H).unwrap();
        let before = m.phys.nr_free_pages();
        let vma = mm.vmas()[0];
        let plain = Vma { flags: vma.flags.difference(VmFlags::HUGEPAGE), ..vma };
        let t1 = loom::thread::spawn(move || {
            let _l = mm.mmap_lock().read();
            fault_locked(mm, &vma, H, Access::WRITE, false, FaultLock::Mmap).unwrap()
        });
        let t2 = loom::thread::spawn(move || {
            let _l = mm.mmap_lock().read();
            fault_locked(mm, &plain, H.add(0x1000), Access::WRITE, false, FaultLock::Mmap).unwrap()
        });
        let (r1, r2) = (t1.join().unwrap(), t2.join().unwrap());
        let maps = mm.mappings();
        if r1 == FaultResult::Thp {
            assert_eq!(r2, FaultResult::Spurious);
            assert_eq!(maps.len(), 1);
            assert_eq!(maps[0].size, PMD_SIZE);
            // 512 frames + the deposited table.
            assert_eq!(m.phys.nr_free_pages(), before - 513);
        } else {
            assert_eq!((r1, r2), (FaultResult::Anon, FaultResult::Anon));
            assert_eq!(maps.len(), 2);
            // Two frames + the PTE table; the 2 MiB block and its table went back.
            assert_eq!(m.phys.nr_free_pages(), before - 3);
        }
        assert_eq!(mm.nr_ptes(), 1);
        f.teardown();
    });
}

/// A fault racing PTE-table reclaim on one PMD (`madvise`'s
/// `try_to_free_pte`): the fault installs its page into the live table, or
/// finds the table gone (its `pte_offset_map` fails or its `pmd_same`
/// re-check does) and walks again into a new one; reclaim frees only an
/// empty table; no entry is ever written into a detached table (checked
/// when the queued table is finally freed) and the page ends up mapped.
#[test]
fn loom_fault_races_pt_reclaim_on_one_pmd() {
    use crate::tlb::MmuGather;
    use crate::zap::try_to_free_pte;
    use crate::{Access, FaultResult, MapFlags, Prot, handle_mm_fault};
    bounded().check(|| {
        let f = Fixture::new();
        let (m, mm) = (f.machine(), f.mm());
        mm.mmap(Some(A), crate::PAGE_SIZE, Prot::READ | Prot::WRITE, MapFlags::FIXED).unwrap();
        // An empty PTE table under pmd(A), as a DONTNEED leaves it.
        let pmd = walk_alloc_pmd(mm, A).unwrap();
        pte_alloc(mm, pmd).unwrap();
        assert!(mm.follow_pte_lockless(A).is_none());
        let fault = loom::thread::spawn(move || handle_mm_fault(mm, A, Access::WRITE).unwrap());
        let reclaim = loom::thread::spawn(move || {
            let _shared = mm.mmap_lock().read();
            let mut tlb = MmuGather::new(mm);
            let freed = try_to_free_pte(&mut tlb, walk_pmd(mm, A).unwrap(), A);
            tlb.finish();
            freed
        });
        let (r, freed) = (fault.join().unwrap(), reclaim.join().unwrap());
        assert_eq!(r, FaultResult::Anon);
        let maps = mm.mappings();
        assert_eq!(maps.len(), 1, "the page is mapped exactly once");
        assert_eq!(mm.nr_ptes(), 1);
        assert_eq!(mm.stats().rss_pages, 1);
        // A reclaimed table is freed now; had the fault written into it after
        // the detach, freeing it would report the entry.
        m.phys.rcu_barrier();
        assert_eq!(m.phys.table_rcu_stats().freed, freed as u64);
        f.teardown();
    });
}

/// A fault under its VMA's lock racing munmap of that VMA: either the fault
/// took the VMA lock first (munmap's write lock waits for it, then zaps
/// what it installed) or it finds the VMA write-locked or gone (falls back
/// to `mmap_lock` and fails with `MapErr`). Either way nothing stays mapped
/// and every frame comes back.
#[test]
fn loom_vma_locked_fault_races_munmap_of_its_vma() {
    use crate::{Access, FaultError, FaultResult, MapFlags, Prot, handle_mm_fault};
    bounded().check(|| {
        let f = Fixture::new();
        let (m, mm) = (f.machine(), f.mm());
        let before = m.phys.nr_free_pages();
        mm.mmap(Some(A), crate::PAGE_SIZE, Prot::READ | Prot::WRITE, MapFlags::FIXED).unwrap();
        let pmd = walk_alloc_pmd(mm, A).unwrap();
        pte_alloc(mm, pmd).unwrap();
        assert!(mm.follow_pte_lockless(A).is_none());
        let fault = loom::thread::spawn(move || handle_mm_fault(mm, A, Access::WRITE));
        let unmap = loom::thread::spawn(move || mm.munmap(A, crate::PAGE_SIZE).unwrap());
        let r = fault.join().unwrap();
        unmap.join().unwrap();
        assert!(matches!(r, Ok(FaultResult::Anon) | Err(FaultError::MapErr)), "{r:?}");
        assert!(mm.mappings().is_empty(), "a page stayed mapped outside every VMA");
        assert_eq!(mm.stats().rss_pages, 0);
        m.phys.rcu_barrier();
        assert_eq!(m.phys.nr_free_pages(), before, "the page and every emptied table went back");
        f.teardown();
    });
}

/// The grace-period batch against a walker that mapped the table: munmap
/// detaches the PTE table and queues it without waiting; a walker that
/// mapped it before can still read it and take its lock; `rcu_barrier`
/// (the batch's wait) returns only after the walker left, and only then is
/// the table destroyed and freed.
#[test]
fn loom_rcu_batch_free_waits_for_a_walker_that_mapped_the_table() {
    use crate::{MapFlags, PageKind, Prot, pte_offset_map_ro_nolock};
    bounded().check(|| {
        let f = Fixture::new();
        let (m, mm) = (f.machine(), f.mm());
        mm.mmap(Some(A), crate::PAGE_SIZE, Prot::READ | Prot::WRITE, MapFlags::FIXED).unwrap();
        let pmd = walk_alloc_pmd(mm, A).unwrap();
        pte_alloc(mm, pmd).unwrap();
        let table = pmd.get().pfn();
        assert!(mm.follow_pte_lockless(A).is_none());
        let walker = loom::thread::spawn(move || {
            let Some(map) = pte_offset_map_ro_nolock(mm, pmd, A) else { return };
            // Inside the section: the table is a table, and its lock works.
            assert_eq!(m.phys.page(table).unwrap().kind(), PageKind::PageTable, "table freed under a walker");
            let g = map.lock();
            assert!(g.ptep_get().is_none());
        });
        let unmapper = loom::thread::spawn(move || {
            mm.munmap(A, crate::PAGE_SIZE).unwrap();
            m.phys.rcu_barrier();
            // Everything queued before the barrier is gone.
            assert_ne!(m.phys.page(table).unwrap().kind(), PageKind::PageTable);
        });
        walker.join().unwrap();
        unmapper.join().unwrap();
        assert_eq!(m.phys.table_rcu_stats().waiting, 0);
        f.teardown();
    });
}

/// fork's `copy_pte_range` (the child's PTE lock, then the parent's nested)
/// against a write fault in the parent on the same PTE table: either the
/// fault ran first (the child gets its page shared copy-on-write, one
/// reference per mapping, read-only in both) or it waited for the fork (the
/// parent's page is its own); every frame's reference count equals its
/// mappings, and both address spaces free everything.
#[test]
fn loom_fork_copy_races_a_fault_in_the_parent_on_the_same_table() {
    use crate::{Access, FaultResult, MapFlags, Prot, handle_mm_fault};
    bounded().check(|| {
        let f = Fixture::new();
        let (m, mm) = (f.machine(), f.mm());
        let start = m.phys.nr_free_pages();
        mm.mmap(Some(A), 2 * crate::PAGE_SIZE, Prot::READ | Prot::WRITE, MapFlags::FIXED).unwrap();
        assert_eq!(handle_mm_fault(mm, A, Access::WRITE), Ok(FaultResult::Anon));
        assert!(mm.follow_pte_lockless(A_NEXT).is_none());
        let fork = loom::thread::spawn(move || mm.fork().unwrap());
        let fault = loom::thread::spawn(move || handle_mm_fault(mm, A_NEXT, Access::WRITE).unwrap());
        let child = fork.join().unwrap();
        let r = fault.join().unwrap();
        assert!(matches!(r, FaultResult::Anon | FaultResult::Cow | FaultResult::Reuse), "{r:?}");
        let p = mm.follow_pte_lockless(A_NEXT).expect("the parent's page is mapped");
        match child.follow_pte_lockless(A_NEXT) {
            Some(c) => {
                assert_eq!(c.pa, p.pa, "shared copy-on-write");
                assert!(!c.flags.contains(PteFlags::WRITABLE) && !p.flags.contains(PteFlags::WRITABLE));
                assert_eq!(m.phys.page(p.pa.pfn()).unwrap().refcount(), 2);
            }
            None => assert_eq!(m.phys.page(p.pa.pfn()).unwrap().refcount(), 1, "the fault came after the fork"),
        }
        let a = mm.follow_pte_lockless(A).unwrap();
        assert_eq!(child.follow_pte_lockless(A).unwrap().pa, a.pa);
        assert_eq!(m.phys.page(a.pa.pfn()).unwrap().refcount(), 2);
        drop(child);
        mm.munmap(A, 2 * crate::PAGE_SIZE).unwrap();
        m.phys.rcu_barrier();
        assert_eq!(m.phys.nr_free_pages(), start, "every page and table of both went back");
        f.teardown();
    });
}

/// mremap's `move_ptes` (the old table's PTE lock, then the new table's
/// nested) against a fault on the destination table from a neighbouring
/// VMA: both land in the destination table, the moved page keeps its frame,
/// the old address is empty.
#[test]
fn loom_mremap_move_races_a_fault_on_the_destination_table() {
    use crate::mremap::MremapFlags;
    use crate::{Access, FaultResult, MapFlags, Prot, handle_mm_fault};
    const DST: VirtAddr = VirtAddr::new(0x4020_1000);
    const NEIGHBOUR: VirtAddr = VirtAddr::new(0x4020_3000);
    bounded().check(|| {
        let f = Fixture::new();
        let mm = f.mm();
        let rw = Prot::READ | Prot::WRITE;
        mm.mmap(Some(A), crate::PAGE_SIZE, rw, MapFlags::FIXED).unwrap();
        mm.mmap(Some(NEIGHBOUR), crate::PAGE_SIZE, Prot::READ, MapFlags::FIXED).unwrap();
        assert_eq!(handle_mm_fault(mm, A, Access::WRITE), Ok(FaultResult::Anon));
        let frame = mm.follow_pte_lockless(A).unwrap().pa;
        // The destination table exists (the neighbour's), empty.
        let pmd = walk_alloc_pmd(mm, NEIGHBOUR).unwrap();
        pte_alloc(mm, pmd).unwrap();
        assert!(mm.follow_pte_lockless(NEIGHBOUR).is_none() && mm.follow_pte_lockless(DST).is_none());
        let mover = loom::thread::spawn(move || {
            let flags = MremapFlags::MAYMOVE | MremapFlags::FIXED;
            mm.mremap(A, crate::PAGE_SIZE, crate::PAGE_SIZE, flags, Some(DST)).unwrap()
        });
        let fault = loom::thread::spawn(move || handle_mm_fault(mm, NEIGHBOUR, Access::READ).unwrap());
        assert_eq!(mover.join().unwrap(), DST);
        assert_eq!(fault.join().unwrap(), FaultResult::ZeroPage);
        assert_eq!(mm.follow_pte_lockless(DST).unwrap().pa, frame, "the page moved with its frame");
        assert!(mm.follow_pte_lockless(NEIGHBOUR).is_some());
        assert!(mm.follow_pte_lockless(A).is_none());
        assert_eq!(mm.mappings().len(), 2);
        f.teardown();
    });
}

/// Test-and-set on two CPUs: a waiter that keeps losing queues for a FIFO
/// ticket (after two spins under loom), which shuts the compare-exchange to
/// the other; every interleaving of competing, queueing and unlocking stays
/// mutually exclusive, and both get the lock twice.
#[test]
fn loom_a_starved_test_and_set_waiter_queues_for_a_ticket() {
    tas_lock_model(2, 2, false);
}

/// `threads` loom threads take one spinlock in test-and-set mode `times`
/// times each and count under it; the count must come out exact. With
/// `halting`, each thread is a CPU whose waits may halt
/// (`testing::halting_cpu`), with the halting mode on for the execution.
fn tas_lock_model(threads: usize, times: usize, halting: bool) {
    use loom::cell::UnsafeCell;
    use loom::sync::Arc;

    use crate::lock::{LockClass, LockLevel, SpinLock, set_halting_waiters};
    bounded().check(move || {
        // Per execution under loom (not the other models' mode).
        set_halting_waiters(halting);
        let l = Arc::new(SpinLock::new(LockClass::Other, LockLevel::Untracked, UnsafeCell::new(0usize)));
        let ts: std::vec::Vec<_> = (0..threads)
            .map(|cpu| {
                let l = l.clone();
                loom::thread::spawn(move || {
                    if halting {
                        crate::testing::halting_cpu(cpu);
                    }
                    for _ in 0..times {
                        let g = l.lock_in_mode(true);
                        // SAFETY: loom's cell access; the guard excludes others.
                        g.with_mut(|v| unsafe { *v += 1 });
                    }
                })
            })
            .collect();
        for t in ts {
            t.join().unwrap();
        }
        let g = l.lock();
        // SAFETY: loom's cell access under the guard.
        assert_eq!(g.with(|v| unsafe { *v }), threads * times);
    });
}

/// The test-and-set mode of the spinlock (`set_virt_spinlocks`, Linux
/// `virt_spin_lock`) is mutually exclusive too, alone and mixed with a CPU
/// still taking a FIFO ticket.
#[test]
fn loom_virt_test_and_set_lock_is_mutually_exclusive() {
    use loom::cell::UnsafeCell;
    use loom::sync::Arc;

    use crate::lock::{LockClass, LockLevel, SpinLock};
    loom::model(|| {
        let l = Arc::new(SpinLock::new(LockClass::Other, LockLevel::Untracked, UnsafeCell::new(0u64)));
        let ts: std::vec::Vec<_> = [true, false]
            .into_iter()
            .map(|tas| {
                let l = l.clone();
                loom::thread::spawn(move || {
                    // One thread in each mode: the words are the same, so
                    // they must exclude each other as well.
                    let g = l.lock_in_mode(tas);
                    // SAFETY: loom's cell access; the guard excludes others.
                    g.with_mut(|v| unsafe { *v += 1 });
                })
            })
            .collect();
        for t in ts {
            t.join().unwrap();
        }
        let g = l.lock();
        // SAFETY: loom's cell access under the guard.
        assert_eq!(g.with(|v| unsafe { *v }), 2);
    });
}

/// Halting waiters (`set_halting_waiters`, mm/src/lock/spinlock.rs
/// "Halting waiters"): CPUs that may halt take one lock; a waiter halts at
/// its first lost turn, and under loom a halt is a park that only a kick
/// ends. In every interleaving of the waiter's slot store and
/// `fetch_or(HALTED)` with the unlock's `swap` and slot scan, every halted
/// waiter is kicked (else loom reports the parked thread as a deadlock),
/// and the lock stays mutually exclusive.
///
/// Two CPUs taking the lock twice each, then three taking it once (two
/// waiters halted on one lock: the unlock kicks both, the loser halts again
/// and the next unlock kicks it). One test, so that no other model runs
/// halting CPUs meanwhile and the halt counters show that these halted.
#[test]
fn loom_halted_waiters_are_always_kicked() {
    for (threads, times) in [(2, 2), (3, 1)] {
        let (halts, kicks) = crate::lock::halt_counts();
        tas_lock_model(threads, times, true);
        let (halts_now, kicks_now) = crate::lock::halt_counts();
        assert!(
            halts_now > halts && kicks_now > kicks,
            "{threads} CPUs: no waiter halted or was kicked in any execution"
        );
    }
}
