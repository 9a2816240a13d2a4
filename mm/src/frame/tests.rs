//! Frame allocator tests: each builds its own machine, so counts are exact
//! even with tests running in parallel.

extern crate std;

use std::collections::BTreeSet;
use std::vec::Vec;

use proptest::prelude::*;

use super::*;
use crate::testing::TestMachine;

/// RAM with an untouched, 4 MiB-aligned order-10 block at 4 MiB (boot
/// allocations are top-down, so they land in the upper range).
fn machine_with_intact_max_block() -> TestMachine {
    let m = TestMachine::with_regions(&[(0x40_0000, 0x80_0000), (0x100_0000, 0x110_0000)]);
    m.phys.drain_all_pcp();
    m
}

#[test]
fn split_and_merge() {
    let m = machine_with_intact_max_block();
    let p = &m.phys;
    assert_eq!(p.nr_free_blocks(MAX_ORDER), 1);
    let before = p.nr_free_pages();
    let nine = p.nr_free_blocks(9);
    // Taking 2 MiB splits the 4 MiB block: one 2 MiB half stays free.
    let f = p.alloc_pages(9).unwrap();
    assert_eq!(f.pfn().as_u64() % 512, 0);
    assert_eq!(p.nr_free_blocks(MAX_ORDER), 0);
    assert_eq!(p.nr_free_blocks(9), nine + 1);
    assert_eq!(p.nr_free_pages(), before - 512);
    // Freeing merges the halves back.
    drop(f);
    assert_eq!(p.nr_free_blocks(MAX_ORDER), 1);
    assert_eq!(p.nr_free_blocks(9), nine);
    assert_eq!(p.nr_free_pages(), before);
}

#[test]
fn every_order_is_aligned_counted_and_zeroable() {
    let m = machine_with_intact_max_block();
    let p = &m.phys;
    let before = p.nr_free_pages();
    for order in 0..=MAX_ORDER {
        let f = p.alloc_pages(order).unwrap_or_else(|| panic!("order {order}"));
        assert_eq!(f.pfn().as_u64() % (1 << order), 0, "order {order} misaligned");
        assert_eq!(f.size(), PAGE_SIZE << order);
        assert_eq!(p.nr_free_pages(), before - (1 << order));
        assert!((0..1u64 << order).all(|i| p.page(f.pfn().add(i)).unwrap().kind() == PageKind::Kernel));
        assert_eq!(f.page().refcount(), 1);
        // Dirty the block, free it, and check the zeroed variant cleans it.
        let base = f.phys_addr();
        for i in (0..f.size()).step_by(512) {
            p.slot(base.add(i)).unwrap().store(0xdead_beef, Relaxed);
        }
        drop(f);
        assert_eq!(p.nr_free_pages(), before);
        p.drain_all_pcp();
        let z = p.alloc_pages_zeroed(order).unwrap();
        for i in (0..z.size()).step_by(8) {
            assert_eq!(p.slot(z.phys_addr().add(i)).unwrap().load(Relaxed), 0);
        }
        drop(z);
        p.drain_all_pcp();
    }
    assert_eq!(p.nr_free_pages(), before);
    assert_eq!(p.nr_free_blocks(MAX_ORDER), 1, "everything merged back");
}

#[test]
fn every_order_copies_every_word() {
    let m = machine_with_intact_max_block();
    let p = &m.phys;
    for order in 0..MAX_ORDER {
        let (src, dst) = (p.alloc_pages(order).unwrap(), p.alloc_pages_zeroed(order).unwrap());
        let word = |i: u64| 0x5eed_0000_0000 | (order as u64) << 24 | i;
        for i in (0..src.size()).step_by(8) {
            p.slot(src.phys_addr().add(i)).unwrap().store(word(i), Relaxed);
        }
        // SAFETY: both blocks are ours and unmapped; nobody writes `src`.
        unsafe { p.copy_frames(dst.pfn(), src.pfn(), order) };
        for i in (0..dst.size()).step_by(8) {
            assert_eq!(p.slot(dst.phys_addr().add(i)).unwrap().load(Relaxed), word(i), "order {order}, byte {i}");
        }
        drop((src, dst));
        p.drain_all_pcp();
    }
}

#[test]
fn exhaustion_returns_none_and_everything_comes_back() {
    let m = TestMachine::with_regions(&[(0x10_0000, 0x18_0000)]);
    let p = &m.phys;
    let before = p.nr_free_pages();
    assert!(p.alloc_pages(MAX_ORDER).is_none(), "no 4 MiB block in 512 KiB");
    let mut held = Vec::new();
    while let Some(f) = p.alloc_pages(0) {
        held.push(f);
    }
    assert_eq!(held.len() as u64, before);
    assert_eq!(p.nr_free_pages(), 0);
    assert!(p.alloc_pages(0).is_none());
    assert!(p.alloc_pages_zeroed(1).is_none());
    let distinct: BTreeSet<u64> = held.iter().map(|f| f.pfn().as_u64()).collect();
    assert_eq!(distinct.len(), held.len(), "a frame was handed out twice");
    drop(held);
    assert_eq!(p.nr_free_pages(), before);
}

#[test]
fn higher_orders_drain_the_per_cpu_caches_before_failing() {
    let m = TestMachine::with_regions(&[(0x10_0000, 0x18_0000)]);
    let p = &m.phys;
    let mut held = Vec::new();
    while let Some(f) = p.alloc_pages(0) {
        held.push(f);
    }
    // Free every frame: they land in this CPU's cache or the buddy.
    drop(held);
    assert!(p.nr_cached_pages() > 0);
    // An order-3 block only exists once cached frames merge in the buddy.
    let f = p.alloc_pages(3).expect("drain + retry finds the block");
    drop(f);
}

/// Room for more than HIGH frames (16 MiB of them), caches drained.
fn machine_with_room_past_high() -> TestMachine {
    let m = TestMachine::with_regions(&[(0x200_0000, 0x400_0000)]);
    m.phys.drain_all_pcp();
    m
}

#[test]
fn per_cpu_cache_counts_as_free_and_drains() {
    let m = machine_with_room_past_high();
    let p = &m.phys;
    let before = p.nr_free_pages();
    let f = p.alloc_pages(0).unwrap();
    assert_eq!(p.nr_cached_pages(), (PCP_BATCH - 1) as u64, "refilled a batch, handed one out");
    assert_eq!(p.nr_free_pages(), before - 1);
    drop(f);
    assert_eq!(p.nr_cached_pages(), PCP_BATCH as u64);
    p.drain_local_pcp();
    assert_eq!(p.nr_cached_pages(), 0);
    assert_eq!(p.nr_free_pages(), before);
    // Freeing past HIGH gives a batch back.
    let many: Vec<_> = (0..PCP_HIGH + 1).map(|_| p.alloc_pages(0).unwrap()).collect();
    p.drain_all_pcp();
    drop(many);
    assert!(p.nr_cached_pages() <= PCP_HIGH as u64);
    assert_eq!(p.nr_free_pages(), before);
}

#[test]
fn bulk_free_fills_the_list_trims_to_high_and_loses_nothing() {
    let m = machine_with_room_past_high();
    let p = &m.phys;
    let before = p.nr_free_pages();
    let pfns: Vec<Pfn> = (0..PCP_HIGH + 2 * PCP_BATCH).map(|_| p.alloc_pages(0).unwrap().into_raw().0).collect();
    p.drain_all_pcp();
    // SAFETY: the frames were allocated above at order 0 and given up here.
    unsafe { p.free_frames_bulk(&pfns[..5]) };
    assert_eq!(p.nr_cached_pages(), 5, "a small batch stays cached");
    // SAFETY: the rest of the frames allocated above at order 0, not in the
    // first batch, so each is freed once.
    unsafe { p.free_frames_bulk(&pfns[5..]) };
    assert!(p.nr_cached_pages() <= PCP_HIGH as u64, "the list gives batches back past HIGH");
    assert!(p.nr_cached_pages() > (PCP_HIGH - PCP_BATCH) as u64, "only as many batches as needed");
    assert_eq!(p.nr_free_pages(), before);
    for &pfn in &pfns {
        assert_eq!(p.page(pfn).unwrap().kind(), PageKind::Free);
    }
}

/// Allocates `n` frames and frees them one by one, as a thread that maps,
/// touches and unmaps a region does.
fn cycle(p: &PhysMem, n: usize) {
    let frames: Vec<_> = (0..n).map(|_| p.alloc_pages(0).unwrap()).collect();
    drop(frames);
}

#[test]
fn a_recycling_cpu_grows_its_list_up_to_the_maximum_and_a_drain_resets_it() {
    let m = TestMachine::with_regions(&[(0x200_0000, 0x800_0000)]);
    let p = &m.phys;
    p.drain_all_pcp();
    p.set_pcp_limits(PCP_HIGH, 3 * PCP_HIGH);
    let before = p.nr_free_pages();
    let n = 3 * PCP_HIGH;
    let near = |limit: usize| {
        let cached = p.nr_cached_pages();
        assert!(cached <= limit as u64 && cached > (limit - PCP_BATCH) as u64, "cached {cached}, limit {limit}");
    };
    // A CPU that only frees keeps the base limit: nothing came back from
    // the zone since the drain.
    let frames: Vec<_> = (0..n).map(|_| p.alloc_pages(0).unwrap()).collect();
    p.drain_all_pcp();
    drop(frames);
    near(PCP_HIGH);
    // One that refilled and overflows doubles its limit, once per overflow
    // after a refill, up to the maximum.
    p.drain_all_pcp();
    cycle(p, n);
    near(2 * PCP_HIGH);
    cycle(p, n);
    near(3 * PCP_HIGH);
    cycle(p, n);
    near(3 * PCP_HIGH);
    // Pressure (the drain an allocation failure does) resets it.
    p.drain_all_pcp();
    let frames: Vec<_> = (0..n).map(|_| p.alloc_pages(0).unwrap()).collect();
    p.drain_all_pcp();
    drop(frames);
    near(PCP_HIGH);
    p.drain_all_pcp();
    assert_eq!(p.nr_free_pages(), before, "nothing lost");
}

/// A bulk free trusts the descriptor given with each frame (the gather's,
/// so the free does not look it up again); a debug build checks that it is
/// the frame's own.
#[test]
#[cfg(debug_assertions)]
#[should_panic(expected = "with another frame's descriptor")]
fn a_bulk_free_given_another_frames_descriptor_is_caught() {
    let m = TestMachine::new();
    let (a, _) = m.phys.alloc_pages(0).unwrap().into_raw();
    let (b, _) = m.phys.alloc_pages(0).unwrap().into_raw();
    let wrong = m.phys.page(b).unwrap();
    // SAFETY: deliberately pairs `a` with `b`'s descriptor to check that the
    // allocator refuses it before touching either.
    unsafe { m.phys.free_pages_bulk(&[(a, wrong)]) };
}

#[test]
#[should_panic(expected = "double free")]
fn bulk_double_free_is_caught() {
    let m = TestMachine::new();
    let (pfn, _) = m.phys.alloc_pages(0).unwrap().into_raw();
    // SAFETY: deliberately frees the frame twice in one batch to check that
    // the allocator refuses it before touching any list.
    unsafe { m.phys.free_frames_bulk(&[pfn, pfn]) };
}

#[test]
#[should_panic(expected = "double free")]
fn double_free_is_caught() {
    let m = TestMachine::new();
    let (pfn, order) = m.phys.alloc_pages(0).unwrap().into_raw();
    // SAFETY: deliberately claims the block twice to check that the second
    // free is refused; the allocator panics before touching any list.
    let (a, b) = unsafe { (Frames::from_raw(&m.phys, pfn, order), Frames::from_raw(&m.phys, pfn, order)) };
    drop(a);
    drop(b);
}

/// A tiny deterministic generator (the stress test must not depend on a
/// crate's RNG).
fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

#[test]
fn threads_allocating_and_freeing_concurrently_lose_nothing() {
    let m = TestMachine::with_regions(&[(0x10_0000, 0x100_0000)]);
    let p = &m.phys;
    let before = p.nr_free_pages();
    std::thread::scope(|s| {
        for t in 0..8u64 {
            s.spawn(move || {
                let mut rng = 0x9e37_79b9_7f4a_7c15 ^ (t + 1);
                let mut held: Vec<Frames<'_>> = Vec::new();
                for _ in 0..3000 {
                    if held.len() < 64 && !xorshift(&mut rng).is_multiple_of(3) {
                        let order = (xorshift(&mut rng) % 4) as usize;
                        if let Some(f) = p.alloc_pages(order) {
                            // Stamp the block: another owner would overwrite it.
                            p.slot(f.phys_addr()).unwrap().store(t << 32 | f.pfn().as_u64(), Relaxed);
                            held.push(f);
                        }
                    } else if !held.is_empty() {
                        let i = (xorshift(&mut rng) as usize) % held.len();
                        let f = held.swap_remove(i);
                        let stamp = p.slot(f.phys_addr()).unwrap().load(Relaxed);
                        assert_eq!(stamp, t << 32 | f.pfn().as_u64(), "frame shared between owners");
                        drop(f);
                    }
                }
            });
        }
    });
    assert_eq!(p.nr_free_pages(), before);
    p.drain_all_pcp();
    assert_eq!(p.nr_cached_pages(), 0);
    assert_eq!(p.nr_free_pages(), before);
}

#[derive(Clone, Debug)]
enum Op {
    Alloc(usize),
    Free(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![(0usize..=4).prop_map(Op::Alloc), any::<usize>().prop_map(Op::Free)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Random alloc/free sequences against a model of the free count; blocks
    /// never overlap; everything returns and merges at the end.
    #[test]
    fn random_sequences_match_the_model(ops in proptest::collection::vec(op(), 1..200)) {
        let m = TestMachine::with_regions(&[(0x10_0000, 0x14_0000)]);
        let p = &m.phys;
        let initial = p.nr_free_pages();
        let mut model = initial;
        let mut held: Vec<Frames<'_>> = Vec::new();
        let mut owned: BTreeSet<u64> = BTreeSet::new();
        for op in ops {
            match op {
                Op::Alloc(order) => {
                    if let Some(f) = p.alloc_pages(order) {
                        for i in 0..1u64 << order {
                            prop_assert!(owned.insert(f.pfn().as_u64() + i), "overlapping blocks");
                        }
                        model -= 1 << order;
                        held.push(f);
                    } else {
                        // Fragmentation may refuse a larger block; a single frame is
                        // refused only when none is free anywhere.
                        prop_assert!(order > 0 || model == 0, "order-0 failure with free frames");
                    }
                }
                Op::Free(i) if !held.is_empty() => {
                    let f = held.swap_remove(i % held.len());
                    for j in 0..1u64 << f.order() {
                        owned.remove(&(f.pfn().as_u64() + j));
                    }
                    model += 1 << f.order();
                    drop(f);
                }
                Op::Free(_) => {}
            }
            prop_assert_eq!(p.nr_free_pages(), model);
        }
        drop(held);
        prop_assert_eq!(p.nr_free_pages(), initial);
        p.drain_all_pcp();
        prop_assert_eq!(p.nr_free_pages(), initial);
    }
}

/// Debug builds poison a freed frame and check the poison when the frame
/// is handed out again: a write after the free is reported with the frame
/// and its last owner (kind at the free, allocation site, freeing CPU).
#[test]
#[cfg(debug_assertions)]
fn a_write_after_free_is_reported_with_the_last_owner() {
    let m = machine_with_intact_max_block();
    let p = &m.phys;
    let f = p.alloc_pages(0).unwrap();
    let (pfn, pa) = (f.pfn(), f.phys_addr());
    let site_line = line!() - 2;
    f.page().set_kind(PageKind::Anon);
    drop(f);
    // Freed: poisoned, and the owner record says who had it.
    assert_eq!(p.slot(pa.add(8)).unwrap().load(Relaxed), u64::from_ne_bytes([poison::POISON; 8]));
    let o = poison::owner(p.page(pfn).unwrap());
    assert_eq!(o.freed_kind, Some(PageKind::Anon));
    assert_eq!(o.site.map(|s| (s.file(), s.line())), Some((file!(), site_line)));
    // A clean reuse passes the check; the next owner is recorded.
    let again = p.alloc_pages(0).unwrap();
    assert_eq!(again.pfn(), pfn, "the per-CPU cache hands the frame straight back");
    assert_eq!(poison::owner(again.page()).freed_kind, None);
    drop(again);
    // A stale writer scribbles on the free frame: the next allocation of it
    // must say so, naming the frame and its last owner.
    p.slot(pa.add(0x123 * 8)).unwrap().store(0x5eed, Relaxed);
    let report = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.alloc_pages(0).map(|f| f.into_raw())))
        .expect_err("the write after free went unnoticed");
    let msg = report.downcast_ref::<std::string::String>().cloned().unwrap_or_default();
    assert!(msg.contains(&std::format!("frame {pfn:?}")), "{msg}");
    assert!(msg.contains("written after it was freed") && msg.contains("offset 0x918"), "{msg}");
    assert!(msg.contains("last owner: Kernel allocated at mm/src/frame/tests.rs"), "{msg}");
}

/// Frames freed at order > 0 are poisoned frame by frame, and a block
/// handed out at another order is checked frame by frame too.
#[test]
#[cfg(debug_assertions)]
fn poison_covers_every_frame_of_a_block() {
    let m = machine_with_intact_max_block();
    let p = &m.phys;
    let f = p.alloc_pages(3).unwrap();
    let pa = f.phys_addr();
    drop(f);
    for i in 0..8u64 {
        assert_eq!(p.slot(pa.add(i * PAGE_SIZE + 4088)).unwrap().load(Relaxed), u64::from_ne_bytes([0xaa; 8]));
    }
    p.slot(pa.add(5 * PAGE_SIZE)).unwrap().store(1, Relaxed);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.alloc_pages(3).map(|f| f.into_raw())));
    assert!(r.is_err(), "a write into the sixth frame of a freed block went unnoticed");
}

/// How many free blocks the zone has of each order.
fn zone_shape(p: &PhysMem) -> Vec<u64> {
    (0..NR_ORDERS).map(|o| p.nr_free_blocks(o)).collect()
}

/// A frame freed on another CPU goes back to the list of the CPU that
/// allocated it: one thread's `munmap` of frames another thread faulted in
/// must not leave the faulting CPU's list to refill from the zone while the
/// unmapping CPU's list overflows into it. The allocating CPU's next
/// allocations get exactly those frames back (its list is LIFO); filed on
/// the freeing CPU's list instead, they would come from the rest of the
/// allocating CPU's last refill.
#[test]
fn a_frame_freed_on_another_cpu_goes_home_to_the_list_it_came_from() {
    let m = TestMachine::new();
    let p = &m.phys;
    p.drain_all_pcp();
    let (to_main, from_thread) = std::sync::mpsc::channel::<(usize, Vec<(Pfn, usize)>)>();
    let (to_thread, from_main) = std::sync::mpsc::channel::<()>();
    let (first, again) = std::thread::scope(|s| {
        let t = s.spawn(move || {
            // This thread is a CPU of its own (the host HAL numbers threads).
            let first: Vec<_> = (0..5).map(|_| p.alloc_pages(0).expect("frame").into_raw()).collect();
            to_main.send((crate::hal::cpu_id(), first.clone())).unwrap();
            from_main.recv().unwrap();
            let again: Vec<_> = (0..5).map(|_| p.alloc_pages(0).expect("frame").into_raw()).collect();
            (first, again)
        });
        let (their_cpu, frames) = from_thread.recv().unwrap();
        assert_ne!(their_cpu % NR_PCP, crate::hal::cpu_id() % NR_PCP, "the two threads share a list");
        let pfns: Vec<Pfn> = frames.iter().map(|&(pfn, _)| pfn).collect();
        // SAFETY: the other thread allocated these frames and gave them to
        // us (`into_raw`); nothing uses them any more.
        unsafe { p.free_frames_bulk(&pfns) };
        to_thread.send(()).unwrap();
        t.join().unwrap()
    });
    let mut first: Vec<_> = first.iter().map(|&(pfn, _)| pfn.as_u64()).collect();
    let mut again: Vec<_> = again.iter().map(|&(pfn, _)| pfn.as_u64()).collect();
    first.sort_unstable();
    again.sort_unstable();
    assert_eq!(
        again, first,
        "the allocating CPU did not get its freed frames back: they went to the freeing CPU's list"
    );
    for &pfn in &again {
        // SAFETY: allocated above, unused.
        unsafe { p.free_frames_bulk(&[Pfn::new(pfn)]) };
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// A per-CPU refill takes whole blocks ([`Buddy::alloc_bulk`]), but must
    /// hand out the same frames, and leave the same free blocks behind, as
    /// that many single-frame allocations: on two identical machines whose
    /// zones random allocations and frees fragmented the same way, one
    /// refills in bulk and the other frame by frame.
    #[test]
    fn a_bulk_refill_takes_what_single_allocations_would(
        ops in proptest::collection::vec(op(), 0..120),
        n in 1usize..200,
    ) {
        let machines = [TestMachine::with_regions(&[(0x10_0000, 0x14_0000)]),
                        TestMachine::with_regions(&[(0x10_0000, 0x14_0000)])];
        let mut taken: Vec<Vec<u64>> = Vec::new();
        let mut shapes = Vec::new();
        for (k, m) in machines.iter().enumerate() {
            let p = &m.phys;
            p.drain_all_pcp();
            let mut held: Vec<Frames<'_>> = Vec::new();
            for op in &ops {
                match *op {
                    Op::Alloc(order) => held.extend(p.alloc_pages(order)),
                    Op::Free(i) if !held.is_empty() => drop(held.swap_remove(i % held.len())),
                    Op::Free(_) => {}
                }
            }
            p.drain_all_pcp();
            let map = p.memmap();
            let mut zone = p.allocator().zone.lock();
            let mut got = Vec::new();
            if k == 0 {
                let n_got = zone.alloc_bulk(map, n, |pfn| got.push(pfn.as_u64()));
                prop_assert_eq!(n_got, got.len());
            } else {
                got.extend((0..n).map_while(|_| zone.alloc(map, 0)).map(|pfn| pfn.as_u64()));
            }
            // The zone's shape right after the refill; then the frames go
            // back, so the machine drops with everything free.
            let free = zone.free_frames();
            drop(zone);
            shapes.push((zone_shape(p), free));
            let mut zone = p.allocator().zone.lock();
            for &pfn in &got {
                // SAFETY: the zone handed out these frames just above, and
                // nothing used them.
                unsafe { zone.free(map, Pfn::new(pfn), 0) };
            }
            drop(zone);
            got.sort_unstable();
            taken.push(got);
            drop(held);
        }
        prop_assert_eq!(&taken[0], &taken[1]);
        prop_assert_eq!(&shapes[0], &shapes[1]);
    }
}
