//! Tests of the address space: mmap/munmap/mprotect, every fault kind and
//! error, the freeing protocol, and fault storms with threads as CPUs. Each
//! test checks the data read back, exact free-frame accounting, and that the
//! page tables hold exactly the mappings expected (walk and count).

extern crate std;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::vec::Vec;

use crate::addr::{PAGE_SIZE, PMD_SIZE, PUD_SIZE, VirtAddr};
use crate::testing::{TestMachine, set_flush_observer, thread_flushes};
use crate::{
    Access, FaultError, FaultResult, MapFlags, Mapping, Mm, MmapError, PageKind, Prot, PteFlags, VmFlags,
    handle_mm_fault,
};

pub(crate) const RW: Prot = Prot::READ.union(Prot::WRITE);

/// 63 MiB of RAM: room for storms and a few 2 MiB pages.
pub(crate) fn big() -> TestMachine {
    TestMachine::with_regions(&[(0x10_0000, 0x400_0000)])
}

/// This thread plays a CPU that has loaded `mm` (the kernel sets the bit on
/// CR3 load).
pub(crate) fn on_cpu(mm: &Mm<'_>) {
    mm.cpu_bitmap().set(crate::hal::cpu_id() % crate::config::NR_CPUS);
}

pub(crate) fn write_u64(mm: &Mm<'_>, va: u64, v: u64) {
    mm.access_remote(VirtAddr::new(va), &mut v.to_le_bytes(), true).unwrap();
}

pub(crate) fn read_u64(mm: &Mm<'_>, va: u64) -> u64 {
    let mut b = [0u8; 8];
    mm.access_remote(VirtAddr::new(va), &mut b, false).unwrap();
    u64::from_le_bytes(b)
}

pub(crate) fn fault(mm: &Mm<'_>, va: u64, a: Access) -> Result<FaultResult, FaultError> {
    handle_mm_fault(mm, VirtAddr::new(va), a)
}

/// Walks the page tables and checks them against the VMA set and the
/// counters: every mapping lies inside a VMA, no two overlap, no frame (but
/// the zero page) is mapped twice, entries follow the VMA's protection, the
/// zero page is never writable, and RSS equals what is mapped. Returns the
/// mappings.
pub(crate) fn check_consistent(mm: &Mm<'_>) -> Vec<Mapping> {
    let maps = mm.mappings();
    let vmas = mm.vmas();
    let zero = mm.phys().zero_pfn().phys();
    let mut frames = BTreeSet::new();
    let (mut rss, mut huge) = (0u64, 0u64);
    let mut last_end = 0u64;
    for m in &maps {
        assert!(m.va.as_u64() >= last_end, "overlapping mappings at {:?}", m.va);
        last_end = m.va.as_u64() + m.size;
        let v = vmas.iter().find(|v| v.contains(m.va)).unwrap_or_else(|| panic!("mapping {m:?} outside every VMA"));
        assert!(m.va.as_u64() + m.size <= v.end.as_u64(), "mapping {m:?} crosses the end of {v:?}");
        assert_eq!(m.size, if v.flags.is_hugetlb() { v.flags.page_size() } else { m.size });
        let present = m.flags.contains(PteFlags::PRESENT);
        assert_eq!(present, v.flags.is_accessible(), "presence of {m:?} vs {v:?}");
        if present {
            // Writable only where the VMA allows it and never the zero page;
            // a page in a writable VMA may be write-protected (copy-on-write
            // after fork, until its next write fault).
            if m.flags.contains(PteFlags::WRITABLE) {
                assert!(v.flags.contains(VmFlags::WRITE) && m.pa != zero, "{m:?} in {v:?}");
            }
            assert_eq!(m.flags.contains(PteFlags::NO_EXECUTE), !v.flags.contains(VmFlags::EXEC), "{m:?} in {v:?}");
        }
        if m.pa == zero {
            assert_eq!(m.size, PAGE_SIZE);
            continue;
        }
        // Every 4 KiB frame, so a huge mapping overlapping another is caught.
        for i in 0..m.size / PAGE_SIZE {
            assert!(frames.insert(m.pa.as_u64() + i * PAGE_SIZE), "frame of {m:?} mapped twice");
        }
        if v.flags.is_hugetlb() {
            huge += m.size / PAGE_SIZE;
        } else {
            rss += m.size / PAGE_SIZE;
        }
        let page = mm.phys().page(m.pa.pfn()).unwrap();
        assert_ne!(page.kind(), PageKind::Free, "{m:?} maps a free frame");
    }
    let st = mm.stats();
    assert_eq!(st.rss_pages, rss, "rss counter vs page tables");
    assert_eq!(st.hugetlb_pages, huge, "hugetlb counter vs page tables");
    maps
}

#[test]
fn anon_write_fault_maps_a_zeroed_private_page() {
    let m = TestMachine::new();
    let start = m.phys.nr_free_pages();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let a = mm.mmap(None, 4 * PAGE_SIZE, RW, MapFlags::empty()).unwrap().as_u64();
    assert_eq!(a % PAGE_SIZE, 0);
    assert!((crate::MMAP_BASE - 0x10_0000..crate::MMAP_BASE).contains(&a), "top-down placement: {a:#x}");
    assert_eq!(fault(&mm, a + 8, Access::WRITE), Ok(FaultResult::Anon));
    assert_eq!(fault(&mm, a + 16, Access::WRITE), Ok(FaultResult::Spurious), "already mapped");
    assert_eq!(read_u64(&mm, a + 8), 0, "fresh pages are zeroed");
    write_u64(&mm, a + 8, 0xfeed);
    assert_eq!(read_u64(&mm, a + 8), 0xfeed);
    let maps = check_consistent(&mm);
    assert_eq!(maps.len(), 1);
    assert_eq!(m.phys.page(maps[0].pa.pfn()).unwrap().kind(), PageKind::Anon);
    let st = mm.stats();
    assert_eq!((st.rss_pages, st.anon_faults, st.spurious_faults), (1, 1, 1));
    mm.munmap(VirtAddr::new(a), 4 * PAGE_SIZE).unwrap();
    assert!(mm.mappings().is_empty());
    assert_eq!(mm.stats().rss_pages, 0);
    assert_eq!((mm.nr_ptes(), mm.nr_pmds(), mm.nr_puds()), (0, 0, 0), "empty tables freed");
    drop(mm);
    assert_eq!(m.settled_free_pages(), start);
}

#[test]
fn read_fault_maps_the_zero_page_and_a_write_copies_it() {
    let m = TestMachine::new();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    on_cpu(&mm);
    let a = mm.mmap(None, PAGE_SIZE, RW, MapFlags::empty()).unwrap().as_u64();
    assert_eq!(fault(&mm, a, Access::READ), Ok(FaultResult::ZeroPage));
    let maps = check_consistent(&mm);
    assert_eq!(maps[0].pa, m.phys.zero_pfn().phys());
    assert!(!maps[0].flags.contains(PteFlags::WRITABLE));
    assert_eq!(mm.stats().rss_pages, 0, "the zero page is not RSS");
    let flushes = thread_flushes();
    assert_eq!(fault(&mm, a, Access::WRITE), Ok(FaultResult::Cow));
    assert!(thread_flushes() > flushes, "the read-only zero-page entry was shot down");
    let maps = check_consistent(&mm);
    assert_ne!(maps[0].pa, m.phys.zero_pfn().phys());
    assert!(maps[0].flags.contains(PteFlags::WRITABLE));
    assert_eq!(read_u64(&mm, a), 0);
    let st = mm.stats();
    assert_eq!((st.zero_page_faults, st.cow_faults, st.rss_pages), (1, 1, 1));
    // The zero page itself stays zero and allocated.
    assert_eq!(m.phys.page(m.phys.zero_pfn()).unwrap().kind(), PageKind::ZeroPage);
}

#[test]
fn bad_faults_return_distinct_errors() {
    let m = TestMachine::new();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let ro = mm.mmap(None, PAGE_SIZE, Prot::READ, MapFlags::empty()).unwrap().as_u64();
    let none = mm.mmap(None, PAGE_SIZE, Prot::NONE, MapFlags::empty()).unwrap().as_u64();
    let rx = mm.mmap(None, PAGE_SIZE, Prot::READ | Prot::EXEC, MapFlags::empty()).unwrap().as_u64();
    assert_eq!(fault(&mm, 0x2000_0000, Access::READ), Err(FaultError::MapErr), "no VMA");
    assert_eq!(fault(&mm, 0xffff_8000_0000_1000, Access::READ), Err(FaultError::MapErr), "kernel address");
    assert_eq!(fault(&mm, ro, Access::WRITE), Err(FaultError::AccErr), "write to read-only");
    assert_eq!(fault(&mm, ro, Access::EXEC), Err(FaultError::AccErr), "exec of no-exec");
    assert_eq!(fault(&mm, none, Access::READ), Err(FaultError::AccErr), "read of PROT_NONE");
    assert_eq!(fault(&mm, ro, Access::READ), Ok(FaultResult::ZeroPage));
    assert_eq!(fault(&mm, rx, Access::EXEC), Ok(FaultResult::ZeroPage));
    let maps = check_consistent(&mm);
    assert!(!maps.iter().find(|x| x.va.as_u64() == rx).unwrap().flags.contains(PteFlags::NO_EXECUTE));
    assert_eq!(std::format!("{}", FaultError::AccErr), "access not permitted by the mapping (SEGV_ACCERR)");
}

#[test]
fn out_of_frames_in_a_fault_is_oom_and_leaks_nothing() {
    let m = TestMachine::new();
    let start = m.phys.nr_free_pages();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let a = mm.mmap(None, 2 * PAGE_SIZE, RW, MapFlags::empty()).unwrap().as_u64();
    // Tables first, so the data frame is the only thing missing.
    assert_eq!(fault(&mm, a, Access::READ), Ok(FaultResult::ZeroPage));
    let mut hog = Vec::new();
    while let Some(f) = m.phys.alloc_pages(0) {
        hog.push(f);
    }
    assert_eq!(fault(&mm, a + PAGE_SIZE, Access::WRITE), Err(FaultError::Oom));
    assert_eq!(fault(&mm, a, Access::WRITE), Err(FaultError::Oom), "COW needs a frame too");
    assert_eq!(mm.stats().oom, 2);
    assert_eq!(m.phys.nr_free_pages(), 0, "nothing was taken and kept");
    drop(hog);
    assert_eq!(fault(&mm, a + PAGE_SIZE, Access::WRITE), Ok(FaultResult::Anon));
    check_consistent(&mm);
    drop(mm);
    assert_eq!(m.settled_free_pages(), start);
}

#[test]
fn constructor_failure_in_a_fault_is_oom_and_leaks_nothing() {
    let m = TestMachine::new();
    let start = m.phys.nr_free_pages();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let a = mm.mmap(None, PMD_SIZE, RW, MapFlags::empty()).unwrap().as_u64();
    // The fault constructs a PMD table then a PTE table: fail each in turn.
    for nth in 1..=2 {
        let before = m.phys.nr_free_pages();
        let tables_before = mm.nr_pmds() + mm.nr_ptes() + mm.nr_puds();
        m.phys.fault_inject().fail_nth_ctor(nth);
        assert_eq!(fault(&mm, a, Access::WRITE), Err(FaultError::Oom), "ctor {nth}");
        let installed = mm.nr_pmds() + mm.nr_ptes() + mm.nr_puds() - tables_before;
        assert_eq!(before - m.phys.nr_free_pages(), installed, "only installed tables were kept");
        assert_eq!(
            m.phys.nr_allocated_ptlocks(),
            if crate::ALLOC_SPLIT_PTLOCKS {
                mm.nr_pmds() * u64::from(crate::config::USE_SPLIT_PMD_PTLOCKS)
                    + mm.nr_ptes() * u64::from(crate::config::USE_SPLIT_PTE_PTLOCKS)
            } else {
                0
            }
        );
        assert!(mm.mappings().is_empty());
    }
    assert_eq!(m.phys.fault_inject().injected(), 2);
    assert_eq!(fault(&mm, a, Access::WRITE), Ok(FaultResult::Anon));
    mm.munmap(VirtAddr::new(a), PMD_SIZE).unwrap();
    drop(mm);
    assert_eq!(m.settled_free_pages(), start);
    assert_eq!(m.phys.nr_allocated_ptlocks(), 0);
}

#[test]
fn mmap_argument_checks_and_placement() {
    let m = TestMachine::new();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    assert_eq!(mm.mmap(None, 0, RW, MapFlags::empty()), Err(MmapError::Invalid));
    assert_eq!(mm.mmap(Some(VirtAddr::new(0x1001)), 1, RW, MapFlags::FIXED), Err(MmapError::Invalid));
    assert_eq!(
        mm.mmap(Some(VirtAddr::new(0x1000)), 1, RW, MapFlags::FIXED),
        Err(MmapError::Invalid),
        "below mmap_min_addr"
    );
    assert_eq!(mm.mmap(None, PAGE_SIZE, RW, MapFlags::HUGETLB_2M | MapFlags::HUGETLB_1G), Err(MmapError::Invalid));
    assert_eq!(
        mm.mmap(Some(VirtAddr::new(0x4000_1000)), 1, RW, MapFlags::HUGETLB_2M | MapFlags::FIXED),
        Err(MmapError::Invalid)
    );
    assert_eq!(mm.mmap(None, PUD_SIZE, RW, MapFlags::HUGETLB_1G), Err(MmapError::NoMemory), "empty gigantic pool");
    assert_eq!(mm.munmap(VirtAddr::new(0x1234), 10), Err(MmapError::Invalid));
    assert_eq!(mm.munmap(VirtAddr::new(0x1000), 0), Err(MmapError::Invalid));
    // A hint is honoured when free, ignored when not.
    let h = mm.mmap(Some(VirtAddr::new(0x5000_0000)), 3 * PAGE_SIZE, RW, MapFlags::empty()).unwrap();
    assert_eq!(h.as_u64(), 0x5000_0000);
    let h2 = mm.mmap(Some(VirtAddr::new(0x5000_0000)), PAGE_SIZE, RW, MapFlags::empty()).unwrap();
    assert_ne!(h2.as_u64(), 0x5000_0000);
    // THP mappings are 2 MiB aligned, and len rounds up to pages.
    let t = mm.mmap(None, 2 * PMD_SIZE + 1, RW, MapFlags::HUGEPAGE).unwrap().as_u64();
    assert_eq!(t % PMD_SIZE, 0);
    let v = mm.vmas().into_iter().find(|v| v.start.as_u64() == t).unwrap();
    assert_eq!(v.len(), 2 * PMD_SIZE + PAGE_SIZE);
    assert!(v.flags.contains(VmFlags::HUGEPAGE));
    // Adjacent equal mappings merge.
    let x = mm.mmap(Some(VirtAddr::new(0x5000_3000)), PAGE_SIZE, RW, MapFlags::FIXED).unwrap().as_u64();
    assert_eq!(x, 0x5000_3000);
    assert!(mm.vmas().iter().any(|v| v.start.as_u64() == 0x5000_0000 && v.end.as_u64() == 0x5000_4000));
    // munmap of nothing mapped succeeds; mprotect of a hole does not.
    assert_eq!(mm.munmap(VirtAddr::new(0x6000_0000), PAGE_SIZE), Ok(()));
    assert_eq!(mm.mprotect(VirtAddr::new(0x6000_0000), PAGE_SIZE, Prot::READ), Err(MmapError::NoMemory));
    assert_eq!(mm.mprotect(VirtAddr::new(0x5000_3000), 2 * PAGE_SIZE, Prot::READ), Err(MmapError::NoMemory));
}

#[test]
fn munmap_frees_frames_only_after_a_flush_covering_them() {
    let m = TestMachine::new();
    let start = m.phys.nr_free_pages();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    on_cpu(&mm);
    let n = 40u64;
    let a = mm.mmap(None, n * PAGE_SIZE, RW, MapFlags::empty()).unwrap().as_u64();
    for i in 0..n {
        let acc = if i % 3 == 0 { Access::READ } else { Access::WRITE };
        fault(&mm, a + i * PAGE_SIZE, acc).unwrap();
    }
    let maps = check_consistent(&mm);
    let zero = m.phys.zero_pfn().phys();
    let frames: Vec<(u64, u64)> =
        maps.iter().filter(|x| x.pa != zero).map(|x| (x.va.as_u64(), x.pa.pfn().as_u64())).collect();
    assert!(!frames.is_empty());
    // At each shoot-down: every frame whose address it covers must still be
    // allocated (not yet freed). Record which frames were covered.
    let covered = Arc::new(Mutex::new(BTreeSet::new()));
    let phys: &'static crate::PhysMem = unsafe_static(&m.phys);
    let (f2, c2) = (frames.clone(), covered.clone());
    set_flush_observer(Some(std::boxed::Box::new(move |cpus, range| {
        assert!(!cpus.is_empty(), "shoot-down aimed at nobody");
        for &(va, pfn) in &f2 {
            if range.contains(VirtAddr::new(va)) && !c2.lock().unwrap().contains(&pfn) {
                let kind = phys.page(crate::Pfn::new(pfn)).unwrap().kind();
                assert_ne!(kind, PageKind::Free, "frame {pfn:#x} freed before the flush covering it");
                c2.lock().unwrap().insert(pfn);
            }
        }
    })));
    // Unmap the middle (splits the VMA) and then the rest.
    mm.munmap(VirtAddr::new(a + 5 * PAGE_SIZE), 10 * PAGE_SIZE).unwrap();
    for &(va, pfn) in &frames {
        let gone = va >= a + 5 * PAGE_SIZE && va < a + 15 * PAGE_SIZE;
        assert_eq!(m.phys.page(crate::Pfn::new(pfn)).unwrap().kind() == PageKind::Free, gone, "frame at {va:#x}");
    }
    check_consistent(&mm);
    mm.munmap(VirtAddr::new(a), n * PAGE_SIZE).unwrap();
    set_flush_observer(None);
    let covered = covered.lock().unwrap();
    for &(_, pfn) in &frames {
        assert!(covered.contains(&pfn), "frame {pfn:#x} freed without a covering flush");
        assert_eq!(m.phys.page(crate::Pfn::new(pfn)).unwrap().kind(), PageKind::Free);
    }
    drop(mm);
    assert_eq!(m.settled_free_pages(), start);
}

/// Extends a borrow for a flush observer, which must be `'static`; the
/// observer is removed before the machine is dropped.
fn unsafe_static<T>(t: &T) -> &'static T {
    // SAFETY: callers remove the observer holding this reference before `t`
    // goes away (`set_flush_observer(None)`), and only the observer uses it.
    unsafe { &*(t as *const T) }
}

#[test]
fn munmap_frees_page_tables_whose_span_it_empties() {
    let m = big();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    // Two VMAs sharing one PTE table's span, one in another PUD entry.
    let a = 0x4000_0000u64;
    mm.mmap(Some(VirtAddr::new(a)), 16 * PAGE_SIZE, RW, MapFlags::FIXED).unwrap();
    mm.mmap(Some(VirtAddr::new(a + 32 * PAGE_SIZE)), 16 * PAGE_SIZE, Prot::READ, MapFlags::FIXED).unwrap();
    mm.mmap(Some(VirtAddr::new(a + PUD_SIZE)), PAGE_SIZE, RW, MapFlags::FIXED).unwrap();
    for va in [a, a + 32 * PAGE_SIZE, a + PUD_SIZE] {
        fault(&mm, va, Access::READ).unwrap();
    }
    assert_eq!((mm.nr_puds(), mm.nr_pmds(), mm.nr_ptes()), (1, 2, 2));
    mm.munmap(VirtAddr::new(a), 16 * PAGE_SIZE).unwrap();
    assert_eq!((mm.nr_puds(), mm.nr_pmds(), mm.nr_ptes()), (1, 2, 2), "the PTE table still serves the other VMA");
    mm.munmap(VirtAddr::new(a + 32 * PAGE_SIZE), 16 * PAGE_SIZE).unwrap();
    assert_eq!((mm.nr_puds(), mm.nr_pmds(), mm.nr_ptes()), (1, 1, 1), "PTE and PMD table of the first GiB freed");
    mm.munmap(VirtAddr::new(a + PUD_SIZE), PAGE_SIZE).unwrap();
    assert_eq!((mm.nr_puds(), mm.nr_pmds(), mm.nr_ptes()), (0, 0, 0));
    // Their locks go with the tables, after a grace period.
    m.phys.rcu_barrier();
    assert_eq!(m.phys.nr_allocated_ptlocks(), 0);
}

#[test]
fn mmap_fixed_replaces_an_existing_mapping() {
    let m = TestMachine::new();
    let start = m.phys.nr_free_pages();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let a = 0x4000_0000u64;
    mm.mmap(Some(VirtAddr::new(a)), 4 * PAGE_SIZE, RW, MapFlags::FIXED).unwrap();
    for i in 0..4 {
        write_u64(&mm, a + i * PAGE_SIZE, 100 + i);
    }
    assert_eq!(mm.stats().rss_pages, 4);
    let r = mm.mmap(Some(VirtAddr::new(a + PAGE_SIZE)), 2 * PAGE_SIZE, Prot::READ, MapFlags::FIXED).unwrap();
    assert_eq!(r.as_u64(), a + PAGE_SIZE);
    assert_eq!(mm.stats().rss_pages, 2, "the replaced pages were unmapped");
    assert_eq!(read_u64(&mm, a), 100);
    assert_eq!(read_u64(&mm, a + PAGE_SIZE), 0, "a fresh mapping reads zero");
    assert_eq!(read_u64(&mm, a + 3 * PAGE_SIZE), 103);
    let v = mm.vmas();
    assert_eq!(v.len(), 3);
    assert_eq!(v[1].flags, VmFlags::READ);
    check_consistent(&mm);
    drop(mm);
    assert_eq!(m.settled_free_pages(), start);
}

#[test]
fn mprotect_rewrites_entries_and_later_faults_follow_it() {
    let m = TestMachine::new();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    on_cpu(&mm);
    let a = mm.mmap(None, 4 * PAGE_SIZE, RW, MapFlags::empty()).unwrap().as_u64();
    write_u64(&mm, a, 7);
    fault(&mm, a + PAGE_SIZE, Access::READ).unwrap(); // the zero page
    let flushes = thread_flushes();
    mm.mprotect(VirtAddr::new(a), 2 * PAGE_SIZE, Prot::READ).unwrap();
    assert!(thread_flushes() > flushes, "dropping write permission is shot down");
    assert_eq!(mm.vmas().len(), 2);
    check_consistent(&mm);
    assert_eq!(fault(&mm, a, Access::WRITE), Err(FaultError::AccErr));
    assert_eq!(fault(&mm, a + 2 * PAGE_SIZE, Access::WRITE), Ok(FaultResult::Anon), "the rest is still writable");
    // Back to read-write: the private page is writable again, the zero
    // page stays read-only until written.
    mm.mprotect(VirtAddr::new(a), 2 * PAGE_SIZE, RW).unwrap();
    assert_eq!(mm.vmas().len(), 1, "merged back");
    check_consistent(&mm);
    assert_eq!(fault(&mm, a, Access::WRITE), Ok(FaultResult::Spurious));
    assert_eq!(fault(&mm, a + PAGE_SIZE, Access::WRITE), Ok(FaultResult::Cow));
    assert_eq!(read_u64(&mm, a), 7);
    // PROT_NONE keeps the data, refuses every access, and access_remote
    // (ptrace-like) still sees it.
    mm.mprotect(VirtAddr::new(a), 4 * PAGE_SIZE, Prot::NONE).unwrap();
    check_consistent(&mm);
    assert_eq!(fault(&mm, a, Access::READ), Err(FaultError::AccErr));
    assert_eq!(read_u64(&mm, a), 7);
    write_u64(&mm, a + 3 * PAGE_SIZE, 9);
    mm.mprotect(VirtAddr::new(a), 4 * PAGE_SIZE, Prot::READ).unwrap();
    check_consistent(&mm);
    assert_eq!(fault(&mm, a, Access::READ), Ok(FaultResult::Spurious));
    assert_eq!(read_u64(&mm, a + 3 * PAGE_SIZE), 9);
}

#[test]
fn access_remote_writes_read_only_memory_without_making_it_writable() {
    let m = TestMachine::new();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let a = mm.mmap(None, 3 * PAGE_SIZE, Prot::READ | Prot::EXEC, MapFlags::empty()).unwrap().as_u64();
    // Like an ELF loader: one copy spanning page boundaries.
    let data: Vec<u8> = (0..(2 * PAGE_SIZE + 100) as usize).map(|i| i as u8).collect();
    let mut buf = data.clone();
    mm.access_remote(VirtAddr::new(a + 50), &mut buf, true).unwrap();
    let mut back = std::vec![0u8; data.len()];
    mm.access_remote(VirtAddr::new(a + 50), &mut back, false).unwrap();
    assert_eq!(back, data);
    assert_eq!(fault(&mm, a, Access::WRITE), Err(FaultError::AccErr), "still read-only for the user");
    let maps = check_consistent(&mm);
    assert_eq!(maps.len(), 3);
    assert!(maps.iter().all(|x| !x.flags.contains(PteFlags::WRITABLE) && x.pa != m.phys.zero_pfn().phys()));
    let mut b = [0u8; 8];
    assert_eq!(mm.access_remote(VirtAddr::new(a + 3 * PAGE_SIZE), &mut b, false), Err(FaultError::MapErr));
}

#[test]
fn dropping_an_mm_frees_everything_it_mapped() {
    let m = big();
    let start = m.phys.nr_free_pages();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    on_cpu(&mm);
    let a = mm.mmap(None, 64 * PAGE_SIZE, RW, MapFlags::POPULATE).unwrap().as_u64();
    let b = mm.mmap(None, 8 * PAGE_SIZE, Prot::READ, MapFlags::POPULATE).unwrap().as_u64();
    let t = mm.mmap(None, 2 * PMD_SIZE, RW, MapFlags::HUGEPAGE).unwrap().as_u64();
    fault(&mm, t, Access::WRITE).unwrap();
    let h = mm.mmap(None, PMD_SIZE, RW, MapFlags::HUGETLB_2M).unwrap().as_u64();
    fault(&mm, h, Access::READ).unwrap();
    write_u64(&mm, a + 5 * PAGE_SIZE, 1);
    let _ = b;
    let st = mm.stats();
    assert_eq!(st.rss_pages, 64 + 512);
    assert_eq!(st.hugetlb_pages, 512);
    assert!(m.phys.nr_free_pages() < start - 64 - 1024);
    check_consistent(&mm);
    drop(mm);
    assert_eq!(m.settled_free_pages(), start, "frames, huge frames, deposited and page tables all freed");
    assert_eq!(m.phys.nr_allocated_ptlocks(), 0);
}

/// Threads fault pages of one address space; each thread owns a disjoint
/// 2 MiB region. Data is read back, tables and RSS match, nothing leaks.
#[test]
fn storm_disjoint_2m_regions() {
    let m = big();
    let start = m.phys.nr_free_pages();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    const T: u64 = 8;
    const PAGES: u64 = 128;
    let base = mm.mmap(None, T * PMD_SIZE, RW, MapFlags::empty()).unwrap().as_u64() & !(PMD_SIZE - 1);
    let base = if mm.vmas()[0].contains(VirtAddr::new(base)) { base + PMD_SIZE } else { base };
    std::thread::scope(|s| {
        for t in 0..T - 1 {
            let mm = &mm;
            s.spawn(move || {
                on_cpu(mm);
                let r = base + t * PMD_SIZE;
                for i in 0..PAGES {
                    assert_eq!(fault(mm, r + i * PAGE_SIZE, Access::WRITE), Ok(FaultResult::Anon));
                    write_u64(mm, r + i * PAGE_SIZE, t << 32 | i);
                }
            });
        }
    });
    for t in 0..T - 1 {
        for i in 0..PAGES {
            assert_eq!(read_u64(&mm, base + t * PMD_SIZE + i * PAGE_SIZE), t << 32 | i);
        }
    }
    let maps = check_consistent(&mm);
    assert_eq!(maps.len() as u64, (T - 1) * PAGES);
    assert_eq!(mm.stats().lost_races, 0, "disjoint regions never race on an entry");
    drop(mm);
    assert_eq!(m.settled_free_pages(), start);
}

/// Threads fault interleaved pages of the same PTE table (same PTE lock,
/// the same `pte_alloc` race at the start).
#[test]
fn storm_same_pte_table_interleaved() {
    let m = big();
    let start = m.phys.nr_free_pages();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    const T: u64 = 8;
    let a = mm.mmap(None, PMD_SIZE, RW, MapFlags::HUGEPAGE).unwrap().as_u64();
    // HUGEPAGE but no 2 MiB frames can be had? There are; so use a plain
    // mapping to force 4 KiB pages in one PTE table.
    mm.munmap(VirtAddr::new(a), PMD_SIZE).unwrap();
    mm.mmap(Some(VirtAddr::new(a)), PMD_SIZE, RW, MapFlags::FIXED).unwrap();
    std::thread::scope(|s| {
        for t in 0..T {
            let mm = &mm;
            s.spawn(move || {
                on_cpu(mm);
                for i in (t..512).step_by(T as usize) {
                    let va = a + i * PAGE_SIZE;
                    let r = fault(mm, va, if i % 2 == 0 { Access::WRITE } else { Access::READ }).unwrap();
                    assert!(matches!(r, FaultResult::Anon | FaultResult::ZeroPage), "{r:?}");
                    if i % 2 == 0 {
                        write_u64(mm, va + 8, i);
                    }
                }
            });
        }
    });
    assert_eq!(mm.nr_ptes(), 1, "exactly one PTE table installed");
    for i in (0..512).step_by(2) {
        assert_eq!(read_u64(&mm, a + i * PAGE_SIZE + 8), i);
    }
    let maps = check_consistent(&mm);
    assert_eq!(maps.len(), 512);
    assert_eq!(mm.stats().rss_pages, 256);
    drop(mm);
    assert_eq!(m.settled_free_pages(), start);
}

/// Every thread write-faults the same page: exactly one frame is
/// installed; the others lose the race (their frame freed) or find it done.
#[test]
fn storm_same_page_installs_exactly_one_frame() {
    for round in 0..20 {
        let m = TestMachine::new();
        let start = m.phys.nr_free_pages();
        let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
        const T: usize = 8;
        let a = mm.mmap(None, PAGE_SIZE, RW, MapFlags::empty()).unwrap().as_u64();
        let go = AtomicBool::new(false);
        let results: Vec<FaultResult> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..T)
                .map(|_| {
                    let (mm, go) = (&mm, &go);
                    s.spawn(move || {
                        while !go.load(SeqCst) {
                            core::hint::spin_loop();
                        }
                        fault(mm, a, Access::WRITE).unwrap()
                    })
                })
                .collect();
            go.store(true, SeqCst);
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let anon = results.iter().filter(|r| **r == FaultResult::Anon).count();
        assert_eq!(anon, 1, "round {round}: {results:?}");
        let st = mm.stats();
        assert_eq!(st.anon_faults, 1);
        assert_eq!(st.lost_races + st.spurious_faults, T as u64 - 1, "{st:?}");
        assert_eq!(st.lost_races, results.iter().filter(|r| **r == FaultResult::LostRace).count() as u64);
        let maps = check_consistent(&mm);
        assert_eq!(maps.len(), 1);
        drop(mm);
        assert_eq!(m.settled_free_pages(), start, "round {round}: the losers' frames were freed");
    }
}

/// Writers on every thread hit the same zero-page mappings at once; each
/// thread writes its own byte of every page. A COW that lost its race must
/// not install a second copy (which would lose the other thread's byte and
/// leak a frame).
#[test]
fn cow_storm_on_zero_page_mappings() {
    let m = big();
    let start = m.phys.nr_free_pages();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    const T: usize = 8;
    const PAGES: u64 = 64;
    let a = mm.mmap(None, PAGES * PAGE_SIZE, RW, MapFlags::empty()).unwrap().as_u64();
    for i in 0..PAGES {
        assert_eq!(fault(&mm, a + i * PAGE_SIZE, Access::READ), Ok(FaultResult::ZeroPage));
    }
    let go = AtomicBool::new(false);
    std::thread::scope(|s| {
        for t in 0..T {
            let (mm, go) = (&mm, &go);
            s.spawn(move || {
                on_cpu(mm);
                while !go.load(SeqCst) {
                    core::hint::spin_loop();
                }
                for k in 0..PAGES {
                    let i = (k + t as u64 * 7) % PAGES;
                    let va = a + i * PAGE_SIZE + t as u64;
                    let r = fault(mm, va, Access::WRITE).unwrap();
                    assert!(matches!(r, FaultResult::Cow | FaultResult::LostRace | FaultResult::Spurious), "{r:?}");
                    mm.access_remote(VirtAddr::new(va), &mut [t as u8 + 1], true).unwrap();
                }
            });
        }
        go.store(true, SeqCst);
    });
    for i in 0..PAGES {
        let mut b = [0u8; T];
        mm.access_remote(VirtAddr::new(a + i * PAGE_SIZE), &mut b, false).unwrap();
        let want: Vec<u8> = (1..=T as u8).collect();
        assert_eq!(b.to_vec(), want, "page {i}: a write was lost");
    }
    let st = mm.stats();
    assert_eq!(st.cow_faults, PAGES, "exactly one copy per page: {st:?}");
    let maps = check_consistent(&mm);
    assert_eq!(maps.len() as u64, PAGES);
    assert!(maps.iter().all(|x| x.pa != m.phys.zero_pfn().phys()));
    drop(mm);
    assert_eq!(m.settled_free_pages(), start);
}

/// Faults race munmap and MAP_FIXED re-mmap of the same range. Faults may
/// fail with MapErr while the range is away; everything else must hold:
/// no leak, no mapping outside a VMA, data of the final mapping intact.
#[test]
fn faults_race_munmap_and_fixed_remap() {
    let m = big();
    let start = m.phys.nr_free_pages();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    const PAGES: u64 = 96;
    let a = 0x4000_0000u64 - 16 * PAGE_SIZE; // straddles a PTE-table and a PUD boundary
    mm.mmap(Some(VirtAddr::new(a)), PAGES * PAGE_SIZE, RW, MapFlags::FIXED).unwrap();
    let stop = AtomicBool::new(false);
    let faults = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (mm, stop, faults) = (&mm, &stop, &faults);
            s.spawn(move || {
                on_cpu(mm);
                let mut i = t;
                while !stop.load(SeqCst) {
                    let va = a + (i % PAGES) * PAGE_SIZE;
                    match fault(mm, va, if i % 3 == 0 { Access::READ } else { Access::WRITE }) {
                        Ok(_) => {
                            faults.fetch_add(1, SeqCst);
                        }
                        Err(FaultError::MapErr) | Err(FaultError::AccErr) => {}
                        Err(e) => panic!("{e:?}"),
                    }
                    i += 5;
                }
            });
        }
        let (mm, stop, faults) = (&mm, &stop, &faults);
        s.spawn(move || {
            let _stop = StopOnDrop(stop);
            on_cpu(mm);
            // 200 rounds, and on until the faulting threads have faulted (a
            // loaded host may not run them during the first 200).
            let mut round = 0u64;
            while round < 200 || (faults.load(SeqCst) == 0 && round < 2_000_000) {
                round += 1;
                let off = (round * 13 % PAGES) * PAGE_SIZE;
                match round % 3 {
                    0 => mm.munmap(VirtAddr::new(a + off), 20 * PAGE_SIZE).unwrap(),
                    1 => {
                        mm.mmap(Some(VirtAddr::new(a)), PAGES * PAGE_SIZE, RW, MapFlags::FIXED).unwrap();
                    }
                    _ => {
                        let p = if round.is_multiple_of(2) { Prot::READ } else { RW };
                        mm.mmap(Some(VirtAddr::new(a + off)), 8 * PAGE_SIZE, p, MapFlags::FIXED).unwrap();
                    }
                }
            }
        });
    });
    assert!(faults.load(SeqCst) > 0);
    check_consistent(&mm);
    // A last clean remap: its data reads back.
    mm.mmap(Some(VirtAddr::new(a)), PAGES * PAGE_SIZE, RW, MapFlags::FIXED).unwrap();
    assert_eq!(mm.stats().rss_pages, 0);
    for i in 0..PAGES {
        write_u64(&mm, a + i * PAGE_SIZE, i);
    }
    for i in 0..PAGES {
        assert_eq!(read_u64(&mm, a + i * PAGE_SIZE), i);
    }
    check_consistent(&mm);
    mm.munmap(VirtAddr::new(a), PAGES * PAGE_SIZE).unwrap();
    assert_eq!((mm.nr_ptes(), mm.nr_pmds(), mm.nr_puds()), (0, 0, 0));
    drop(mm);
    assert_eq!(m.settled_free_pages(), start);
}

/// Sets the flag when dropped, also when the owning thread panics, so the
/// threads that wait for it stop and the panic is reported.
struct StopOnDrop<'a>(&'a AtomicBool);
impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, SeqCst);
    }
}

#[test]
fn many_vmas_and_counters_survive_a_long_sequence() {
    let m = big();
    let start = m.phys.nr_free_pages();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let mut model: BTreeMap<u64, u64> = BTreeMap::new();
    for i in 0..200u64 {
        let a = mm.mmap(None, (1 + i % 5) * PAGE_SIZE, RW, MapFlags::empty()).unwrap().as_u64();
        write_u64(&mm, a, i);
        model.insert(a, i);
        if i % 4 == 3 {
            let (&k, _) = model.iter().nth((i as usize * 7) % model.len()).unwrap();
            mm.munmap(VirtAddr::new(k), PAGE_SIZE).unwrap();
            model.remove(&k);
        }
    }
    for (&a, &v) in &model {
        assert_eq!(read_u64(&mm, a), v);
    }
    check_consistent(&mm);
    drop(mm);
    assert_eq!(m.settled_free_pages(), start);
}

mod model {
    //! A property test: random mmap/munmap/mprotect/fault sequences against
    //! a page-by-page model of the address space.
    use proptest::prelude::*;

    use super::*;

    const BASE: u64 = 0x4000_0000 - PMD_SIZE; // two PMDs, across a PUD boundary
    const NPAGES: u64 = 1024;

    #[derive(Clone, Debug)]
    enum Op {
        Mmap { page: u64, len: u64, prot: u8, huge: bool },
        Munmap { page: u64, len: u64 },
        Mprotect { page: u64, len: u64, prot: u8 },
        Touch { page: u64, kind: u8 },
    }

    fn prot_of(p: u8) -> Prot {
        [Prot::NONE, Prot::READ, RW, Prot::READ | Prot::EXEC][p as usize % 4]
    }

    fn op() -> impl Strategy<Value = Op> {
        // Ranges are often 2 MiB aligned so whole THPs come and go too.
        let range = prop_oneof![(0..NPAGES, 1..64u64), (0..2u64, Just(512u64)).prop_map(|(i, l)| (i * 512, l))];
        prop_oneof![
            (range.clone(), 0..4u8, any::<bool>()).prop_map(|((page, len), prot, huge)| Op::Mmap {
                page,
                len,
                prot,
                huge
            }),
            range.clone().prop_map(|(page, len)| Op::Munmap { page, len }),
            (range, 0..4u8).prop_map(|((page, len), prot)| Op::Mprotect { page, len, prot }),
            (0..NPAGES, 0..3u8).prop_map(|(page, kind)| Op::Touch { page, kind }),
            (0..2u64, 0..3u8).prop_map(|(i, kind)| Op::Touch { page: i * 512 + 7, kind }),
        ]
    }

    /// page -> (VmFlags, last value written, if any)
    type Model = BTreeMap<u64, (VmFlags, Option<u64>)>;

    fn normalized(model: &Model) -> Vec<(u64, u64, VmFlags)> {
        let mut out: Vec<(u64, u64, VmFlags)> = Vec::new();
        for (&p, &(f, _)) in model {
            match out.last_mut() {
                Some(last) if last.1 == p && last.2 == f => last.1 = p + 1,
                _ => out.push((p, p + 1, f)),
            }
        }
        out
    }

    fn run(ops: Vec<Op>) {
        let m = TestMachine::with_regions(&[(0x10_0000, 0x140_0000)]);
        let start = m.phys.nr_free_pages();
        let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
        on_cpu(&mm);
        let mut model = Model::new();
        let mut stamp = 1u64;
        for op in ops {
            match op {
                Op::Mmap { page, len, prot, huge } => {
                    let len = len.min(NPAGES - page);
                    let flags = if huge { MapFlags::FIXED | MapFlags::HUGEPAGE } else { MapFlags::FIXED };
                    let r =
                        mm.mmap(Some(VirtAddr::new(BASE + page * PAGE_SIZE)), len * PAGE_SIZE, prot_of(prot), flags);
                    assert_eq!(r, Ok(VirtAddr::new(BASE + page * PAGE_SIZE)));
                    let vf = VmFlags::from_prot_and_map(prot_of(prot), flags);
                    for p in page..page + len {
                        model.insert(p, (vf, None));
                    }
                }
                Op::Munmap { page, len } => {
                    let len = len.min(NPAGES - page);
                    mm.munmap(VirtAddr::new(BASE + page * PAGE_SIZE), len * PAGE_SIZE).unwrap();
                    for p in page..page + len {
                        model.remove(&p);
                    }
                }
                Op::Mprotect { page, len, prot } => {
                    let len = len.min(NPAGES - page);
                    let r = mm.mprotect(VirtAddr::new(BASE + page * PAGE_SIZE), len * PAGE_SIZE, prot_of(prot));
                    if (page..page + len).all(|p| model.contains_key(&p)) {
                        assert_eq!(r, Ok(()));
                        for p in page..page + len {
                            let e = model.get_mut(&p).unwrap();
                            e.0 = e.0.with_prot(prot_of(prot));
                        }
                    } else {
                        assert_eq!(r, Err(MmapError::NoMemory));
                    }
                }
                Op::Touch { page, kind } => {
                    let va = BASE + page * PAGE_SIZE;
                    let access = [Access::READ, Access::WRITE, Access::EXEC][kind as usize];
                    let r = fault(&mm, va, access);
                    match model.get_mut(&page) {
                        None => assert_eq!(r, Err(FaultError::MapErr)),
                        Some((f, data)) => {
                            if crate::memory::access_error(*f, access) {
                                assert_eq!(r, Err(FaultError::AccErr));
                            } else {
                                assert!(r.is_ok(), "{r:?}");
                                if access.write {
                                    write_u64(&mm, va + 8, stamp);
                                    *data = Some(stamp);
                                    stamp += 1;
                                }
                            }
                        }
                    }
                }
            }
            let got: Vec<(u64, u64, VmFlags)> = mm
                .vmas()
                .iter()
                .map(|v| ((v.start.as_u64() - BASE) / PAGE_SIZE, (v.end.as_u64() - BASE) / PAGE_SIZE, v.flags))
                .collect();
            assert_eq!(got, normalized(&model), "the VMA set differs from the model");
            check_consistent(&mm);
        }
        for (&p, &(_, data)) in &model {
            if let Some(v) = data {
                assert_eq!(read_u64(&mm, BASE + p * PAGE_SIZE + 8), v, "page {p}");
            }
        }
        drop(mm);
        assert_eq!(m.settled_free_pages(), start, "teardown frees everything");
        assert_eq!(m.phys.nr_allocated_ptlocks(), 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        #[test]
        fn random_mmap_munmap_mprotect_sequences_match_the_model(ops in proptest::collection::vec(op(), 1..40)) {
            run(ops);
        }
    }
}
