//! Transparent huge pages against VMA boundaries: random sequences of every
//! operation that creates, moves or cuts VMAs (mmap with and without
//! `HUGEPAGE`, `MAP_FIXED` over existing mappings, partial munmap and
//! mprotect, mremap grow/shrink/move, `MADV_DONTNEED`/`MADV_COLLAPSE`) and
//! of writes that fault pages and THPs in, at 4 KiB and 2 MiB granularity
//! around a few 2 MiB blocks, some with allocation failures injected. After
//! each one: every mapping (a huge PMD above all) lies inside one VMA that
//! allows it (`check_consistent`), and fork succeeds and copies a consistent
//! child (fork copies a huge PMD whole, so one that two VMAs share would be
//! met twice: "the child's PMD is new").

extern crate std;

use std::vec::Vec;

use proptest::prelude::*;

use crate::addr::{PAGE_SIZE, PMD_SIZE, VirtAddr};
use crate::fault_tests::{RW, big, check_consistent, fault, on_cpu};
use crate::mremap::MremapFlags;
use crate::ptlock::FailSite;
use crate::{Access, Advice, MapFlags, Mm, Prot};

/// The 2 MiB blocks the operations play in, from `BASE`.
const BLOCKS: u64 = 6;
const BASE: u64 = 0x4000_0000;
const PAGES: u64 = BLOCKS * 512;

#[derive(Clone, Debug)]
enum Op {
    Mmap { at: u64, len: u64, prot: Prot, huge: bool, fixed: bool },
    Munmap { at: u64, len: u64 },
    Mprotect { at: u64, len: u64, prot: Prot },
    Mremap { at: u64, old_len: u64, new_len: u64, flags: MremapFlags, to: u64 },
    DontNeed { at: u64, len: u64 },
    Collapse { at: u64, len: u64 },
    Write { at: u64 },
    Fork,
}

/// A page offset into the play area: mostly on or next to a 2 MiB
/// boundary, sometimes anywhere.
fn page() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => (0..BLOCKS).prop_map(|b| b * 512),
        2 => (0..BLOCKS, prop_oneof![Just(1u64), Just(256), Just(511)]).prop_map(|(b, p)| b * 512 + p),
        1 => 0..PAGES,
    ]
}

/// A length in pages: whole blocks, a block and a bit, or a few pages.
fn len() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => (1..=3u64).prop_map(|b| b * 512),
        2 => (1..=2u64, prop_oneof![Just(1u64), Just(256), Just(511)]).prop_map(|(b, p)| b * 512 - p),
        1 => 1..16u64,
    ]
}

fn prot() -> impl Strategy<Value = Prot> {
    prop_oneof![4 => Just(RW), 2 => Just(Prot::READ), 1 => Just(Prot::NONE)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (page(), len(), prot(), any::<bool>(), prop::bool::weighted(0.8))
            .prop_map(|(at, len, prot, huge, fixed)| Op::Mmap { at, len, prot, huge, fixed }),
        2 => (page(), len()).prop_map(|(at, len)| Op::Munmap { at, len }),
        2 => (page(), len(), prot()).prop_map(|(at, len, prot)| Op::Mprotect { at, len, prot }),
        3 => (page(), prop_oneof![8 => len(), 1 => Just(0u64)], len(), 0..3u8, page()).prop_map(|(at, old_len, new_len, f, to)| {
            let flags = match f {
                0 => MremapFlags::empty(),
                1 => MremapFlags::MAYMOVE,
                _ => MremapFlags::MAYMOVE | MremapFlags::FIXED,
            };
            Op::Mremap { at, old_len, new_len, flags, to }
        }),
        1 => (page(), len()).prop_map(|(at, len)| Op::DontNeed { at, len }),
        2 => (page(), len()).prop_map(|(at, len)| Op::Collapse { at, len }),
        5 => page().prop_map(|at| Op::Write { at }),
        1 => Just(Op::Fork),
    ]
}

fn va(page: u64) -> u64 {
    BASE + page * PAGE_SIZE
}

/// Applies `op`; its result is not judged (errors are allowed, only what
/// the page tables look like afterwards is).
fn apply(mm: &Mm<'_>, op: &Op) {
    let _ = match *op {
        Op::Mmap { at, len, prot, huge, fixed } => {
            let mut flags = if huge { MapFlags::HUGEPAGE } else { MapFlags::empty() };
            if fixed {
                flags |= MapFlags::FIXED;
            }
            mm.mmap(Some(VirtAddr::new(va(at))), len * PAGE_SIZE, prot, flags).map(|_| ())
        }
        Op::Munmap { at, len } => mm.munmap(VirtAddr::new(va(at)), len * PAGE_SIZE),
        Op::Mprotect { at, len, prot } => mm.mprotect(VirtAddr::new(va(at)), len * PAGE_SIZE, prot),
        Op::Mremap { at, old_len, new_len, flags, to } => mm
            .mremap(VirtAddr::new(va(at)), old_len * PAGE_SIZE, new_len * PAGE_SIZE, flags, Some(VirtAddr::new(va(to))))
            .map(|_| ()),
        Op::DontNeed { at, len } => mm.madvise(VirtAddr::new(va(at)), len * PAGE_SIZE, Advice::DontNeed),
        Op::Collapse { at, len } => mm.madvise(VirtAddr::new(va(at)), len * PAGE_SIZE, Advice::Collapse),
        Op::Write { at } => {
            let _ = fault(mm, va(at), Access::WRITE);
            Ok(())
        }
        Op::Fork => {
            let _ = mm.fork();
            Ok(())
        }
    };
}

/// Every huge PMD lies inside one VMA that allows it, every mapping is
/// consistent with its VMA, and fork copies it all.
fn check(mm: &Mm<'_>, after: &Op) {
    let vmas = mm.vmas();
    for m in mm.mappings().iter().filter(|m| m.size == PMD_SIZE) {
        let inside = vmas
            .iter()
            .find(|v| v.contains(m.va))
            .filter(|v| !v.flags.is_hugetlb() && m.va >= v.start && m.va.add(PMD_SIZE) <= v.end);
        assert!(inside.is_some(), "THP {m:?} not inside one VMA after {after:?}: {vmas:?}");
    }
    check_consistent(mm);
    let child = mm.fork().unwrap_or_else(|e| panic!("fork after {after:?}: {e:?}"));
    on_cpu(&child);
    assert_eq!(child.vmas(), vmas, "the child's VMAs after {after:?}");
    check_consistent(&child);
}

/// The soak's "the child's PMD is new": `mremap` to the same size cut the
/// VMA at the range's end, inside a THP, without splitting it; fork then
/// met the huge PMD once per VMA.
#[test]
fn mremap_to_the_same_size_does_not_cut_a_thp() {
    let m = big();
    let start = m.phys.nr_free_pages();
    {
        let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
        on_cpu(&mm);
        let a = mm.mmap(Some(VirtAddr::new(BASE)), 2 * PMD_SIZE, RW, MapFlags::HUGEPAGE | MapFlags::FIXED).unwrap();
        assert_eq!(fault(&mm, a.as_u64(), Access::WRITE), Ok(crate::FaultResult::Thp));
        let half = PMD_SIZE / 2;
        assert_eq!(mm.mremap(a, half, half, MremapFlags::empty(), None), Ok(a));
        let op = Op::Mremap { at: 0, old_len: 256, new_len: 256, flags: MremapFlags::empty(), to: 0 };
        check(&mm, &op);
        assert_eq!(mm.vmas().len(), 1, "nothing changed, nothing cut");
        assert_eq!(mm.follow_pte_lockless(a).unwrap().size, PMD_SIZE, "the THP stays whole");
    }
    assert_eq!(m.settled_free_pages(), start, "frames leaked");
}

/// Runs `ops` on one address space from a `HUGEPAGE` mapping of the whole
/// play area; `true` beside an op injects allocation failures into it.
fn run(ops: Vec<(Op, bool)>) {
    let m = big();
    let start = m.phys.nr_free_pages();
    {
        let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
        on_cpu(&mm);
        // Start with the whole play area one THP mapping.
        mm.mmap(Some(VirtAddr::new(BASE)), PAGES * PAGE_SIZE, RW, MapFlags::HUGEPAGE | MapFlags::FIXED).unwrap();
        let inject = m.phys.fault_inject();
        inject.set_seed(ops.len() as u64);
        for (op, fail) in &ops {
            if *fail {
                // Frames (THPs, tables), constructors, and `ptl` where it is
                // allocated: one call in three fails.
                for site in [FailSite::Frame, FailSite::Table, FailSite::Ptl] {
                    inject.set_rate(site, 3);
                }
            }
            apply(&mm, op);
            inject.clear_rates();
            check(&mm, op);
        }
    }
    assert_eq!(m.settled_free_pages(), start, "frames leaked");
}

proptest! {
    // About 10 s in release; set VT_CASES for a longer run.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("VT_CASES").map_or(128, |c| c.parse().expect("VT_CASES: a number")),
        ..ProptestConfig::default()
    })]
    #[test]
    fn thps_stay_inside_one_vma_and_fork_copies_them(
        ops in proptest::collection::vec((op(), prop::bool::weighted(0.2)), 1..40)
    ) {
        run(ops);
    }
}
