//! In-kernel tests of the mm crate's helpers on real page tables loaded in
//! CR3 (the host tests run the same code against tables in a buffer), and a
//! frame-allocator stress on every CPU at once.

#[cfg(target_os = "none")]
mod tests {
    use alloc::vec::Vec;
    use core::sync::atomic::{AtomicU64, Ordering};

    use ktest::ktest;
    use mm::{
        Pte, PteFlags, VirtAddr, pte_alloc_map_lock, pte_lockptr, pte_offset_map, pte_offset_map_lock, walk_alloc_pmd,
    };

    use crate::sched;
    use crate::uspace::AddressSpace;

    /// A page installed through `pte_alloc_map_lock` is what the MMU sees:
    /// with the address space in CR3, a user-copy read of the address
    /// returns the frame's contents. Also: `pte_offset_map` refuses a none
    /// pmd, and lock identity follows the tables.
    #[ktest]
    fn helpers_drive_the_real_mmu() {
        let space = AddressSpace::new().unwrap();
        let mm = &space.mm;
        let a = VirtAddr::new(0x5000_0000);
        let b = VirtAddr::new(0x5000_1000); // same PTE table
        let c = VirtAddr::new(0x5020_0000); // next PTE table, same PMD table
        let frame = mm::alloc_pages_zeroed(0).unwrap();
        // SAFETY: the frame is ours and mapped by the direct map.
        unsafe { (frame.virt() as *mut u64).write(0x5eed_cafe_f00d) };

        let pmd_a = walk_alloc_pmd(mm, a).unwrap();
        assert!(pte_offset_map(mm, pmd_a, a).is_none(), "pte_offset_map must refuse a none pmd");
        let mut g = pte_alloc_map_lock(mm, pmd_a, a).unwrap();
        g.set_pte(Pte::page(frame.phys_addr(), PteFlags::USER | PteFlags::WRITABLE | PteFlags::NO_EXECUTE));
        drop(g);
        let pmd_c = walk_alloc_pmd(mm, c).unwrap();
        drop(pte_alloc_map_lock(mm, pmd_c, c).unwrap());
        let pmd_b = walk_alloc_pmd(mm, b).unwrap();
        // SAFETY: this test's address space is used by nothing else, so its
        // tables stay attached while the lock references are compared.
        let lock = |pmd: mm::PmdRef<'_>| unsafe { pte_lockptr(mm, pmd.get()) };
        assert!(lock(pmd_a) == lock(pmd_b), "one PTE table, one lock");
        assert_eq!(
            lock(pmd_a) == lock(pmd_c),
            !mm::config::USE_SPLIT_PTE_PTLOCKS,
            "two PTE tables share a lock exactly when split locks are off"
        );

        let mut buf = [0u8; 8];
        arch::irq::without_interrupts(|| {
            space.activate();
            let mapped = arch::usercopy::copy_from_user(&mut buf, a.as_u64());
            let mut other = [0u8; 8];
            // b shares a's PTE table but has no entry: the copy faults and
            // the exception table turns that into an error.
            let unmapped = arch::usercopy::copy_from_user(&mut other, b.as_u64());
            crate::pgd::load_kernel_cr3();
            space.deactivate();
            assert!(mapped.is_ok(), "reading the installed page faulted");
            assert!(unmapped.is_err(), "reading an address with no entry succeeded");
        });
        assert_eq!(u64::from_le_bytes(buf), 0x5eed_cafe_f00d, "the MMU did not see the installed entry");

        // Take the page back out before the Mm (which would free it) goes.
        let mut g = pte_offset_map_lock(mm, pmd_a, a).unwrap();
        assert_eq!(g.ptep_get_and_clear(a).pfn(), frame.pfn());
        drop(g);
        mm::free_pages(frame);
        drop(space);
    }

    static SEED: AtomicU64 = AtomicU64::new(1);

    extern "C" fn alloc_stress(cpu: usize) -> ! {
        let mut x = SEED.fetch_add(0x9e37_79b9, Ordering::Relaxed) ^ (cpu as u64) << 32;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut live: Vec<(mm::Frames<'static>, u64)> = Vec::new();
        let mut bad = 0;
        for _ in 0..3000 {
            if live.len() < 64 && next() % 3 != 0 {
                let order = match next() % 16 {
                    0 => 3,
                    1 | 2 => 1,
                    _ => 0,
                };
                if let Some(f) = mm::alloc_pages(order) {
                    let tag = next();
                    // SAFETY: the frames are ours.
                    unsafe { (f.virt() as *mut u64).write(tag) };
                    live.push((f, tag));
                }
            } else if !live.is_empty() {
                let i = (next() as usize) % live.len();
                let (f, tag) = live.swap_remove(i);
                // SAFETY: the frames are ours until `free_pages` below, and
                // their first word was written when they were allocated.
                if unsafe { (f.virt() as *const u64).read() } != tag {
                    bad += 1;
                }
                mm::free_pages(f);
            }
        }
        for (f, tag) in live {
            // SAFETY: the frames are ours until `free_pages` below, and
            // their first word was written when they were allocated.
            if unsafe { (f.virt() as *const u64).read() } != tag {
                bad += 1;
            }
            mm::free_pages(f);
        }
        sched::exit_current(bad)
    }

    /// Every CPU allocates and frees frames of mixed orders at once; no frame
    /// is handed out twice (tags survive) and the free count comes back.
    #[ktest]
    fn frame_allocator_stress_on_all_cpus() {
        crate::workload::storm::settle();
        let before = mm::nr_free_pages();
        let tasks: Vec<_> = arch::percpu::online_cpus()
            .map(|cpu| sched::spawn(sched::Task::new_kernel("alloc-stress".into(), cpu, alloc_stress, cpu).unwrap()))
            .collect();
        for t in tasks {
            assert_eq!(t.join(), 0, "a frame's contents changed while it was allocated");
        }
        crate::workload::storm::settle();
        assert_eq!(mm::nr_free_pages(), before, "frames leaked");
    }

    /// The lock `rwlock_stress` tasks share: (value, copy), equal whenever
    /// no writer is inside.
    static RW: mm::lock::RwSpinLock<(u64, u64)> = mm::lock::RwSpinLock::new(mm::lock::LockClass::Other, (0, 0));
    const RW_ROUNDS: u64 = 4000;

    extern "C" fn rwlock_stress(cpu: usize) -> ! {
        let mut torn = 0;
        for i in 0..RW_ROUNDS {
            if (i + cpu as u64).is_multiple_of(16) {
                let mut g = RW.write();
                g.0 += 1;
                core::hint::spin_loop();
                g.1 += 1;
            } else {
                let g = RW.read();
                let (a, b) = *g;
                if a != b {
                    torn += 1;
                }
            }
        }
        sched::exit_current(torn)
    }

    /// `mmap_lock`'s lock type in the kernel build, where a reader leaves with
    /// an unlocked decrement of its CPU's shard: readers on every CPU never
    /// see a writer's half-done update, no writer's update is lost, and
    /// every shard is back at zero (the lock is free) afterwards.
    #[ktest]
    fn rwlock_readers_and_writers_on_every_cpu() {
        let start = RW.read().0;
        let cpus: Vec<usize> = arch::percpu::online_cpus().collect();
        let tasks: Vec<_> = cpus
            .iter()
            .map(|&cpu| sched::spawn(sched::Task::new_kernel("rwlock-stress".into(), cpu, rwlock_stress, cpu).unwrap()))
            .collect();
        for t in tasks {
            assert_eq!(t.join(), 0, "a reader saw a writer's half-done update");
        }
        let writes: u64 =
            cpus.iter().map(|&cpu| (0..RW_ROUNDS).filter(|i| (i + cpu as u64).is_multiple_of(16)).count() as u64).sum();
        let g = RW.write(); // would spin forever if a reader count were left over
        assert_eq!(*g, (start + writes, start + writes), "a writer's update was lost");
    }

    /// What the two-CPU protocol tests share with their helper task: the
    /// address space (its `Mm`), the address, and a stage counter.
    struct Duet {
        mm: core::sync::atomic::AtomicPtr<mm::Mm<'static>>,
        addr: AtomicU64,
        stage: AtomicU64,
    }

    static DUET: Duet = Duet {
        mm: core::sync::atomic::AtomicPtr::new(core::ptr::null_mut()),
        addr: AtomicU64::new(0),
        stage: AtomicU64::new(0),
    };

    fn duet_mm() -> &'static mm::Mm<'static> {
        // SAFETY: the test that stores the pointer joins the helper task
        // before the address space goes away (see the tests below).
        unsafe { &*DUET.mm.load(Ordering::SeqCst) }
    }

    /// Runs `helper` on another CPU against `space`, around `main` on this
    /// one; returns the helper's exit code. `None`: one CPU only.
    fn duet(space: &AddressSpace, addr: u64, helper: extern "C" fn(usize) -> !, main: impl FnOnce()) -> Option<i64> {
        let other = arch::percpu::online_cpus().find(|&c| c != arch::percpu::cpu_id())?;
        DUET.mm.store(&space.mm as *const mm::Mm<'static> as *mut _, Ordering::SeqCst);
        DUET.addr.store(addr, Ordering::SeqCst);
        DUET.stage.store(0, Ordering::SeqCst);
        let t = sched::spawn(sched::Task::new_kernel("duet".into(), other, helper, 0).unwrap());
        main();
        let code = t.join();
        DUET.mm.store(core::ptr::null_mut(), Ordering::SeqCst);
        Some(code)
    }

    fn wait_stage(s: u64) {
        while DUET.stage.load(Ordering::SeqCst) < s {
            core::hint::spin_loop();
        }
    }

    /// Takes `pte_offset_map_lock` on the duet's address once the main CPU
    /// holds the PTE lock; exits 1 if it got a guard on a table the PMD no
    /// longer points to, 0 if it (rightly) found no table.
    extern "C" fn locker(_: usize) -> ! {
        let mm = duet_mm();
        let a = VirtAddr::new(DUET.addr.load(Ordering::SeqCst));
        let pmd = mm::walk_pmd(mm, a).unwrap();
        wait_stage(1);
        DUET.stage.store(2, Ordering::SeqCst);
        // Reads the PMD (the table is still attached), then spins on the
        // PTE lock the main CPU holds while it detaches the table.
        let got = pte_offset_map_lock(mm, pmd, a).map(|g| g.pmdval());
        let stale = got.is_some_and(|v| v != pmd.get());
        sched::exit_current(stale as i64)
    }

    /// `pte_offset_map_lock` re-checks the PMD after taking the PTE lock, on
    /// real tables with another CPU: a walker that read the PMD before the
    /// table was detached (the reclaim protocol: PMD lock, PTE lock, clear)
    /// and got the lock after, finds no table instead of a guard on the
    /// detached one.
    #[ktest]
    fn pte_offset_map_lock_rechecks_the_pmd_against_a_detach_on_another_cpu() {
        let space = AddressSpace::new().unwrap();
        let mm = &space.mm;
        let a = VirtAddr::new(0x5000_0000);
        drop(pte_alloc_map_lock(mm, walk_alloc_pmd(mm, a).unwrap(), a).unwrap());
        let pmd = mm::walk_pmd(mm, a).unwrap();
        let detached = core::cell::Cell::new(mm::Pmd::NONE);
        let code = duet(&space, a.as_u64(), locker, || {
            let pl = mm::pmd_lock(mm, pmd);
            let (map, old) = mm::pte_offset_map_rw_nolock(mm, pmd, a).unwrap();
            let ptl = map.ptl();
            let pte_lock = (!ptl.is_held_by(&pl)).then(|| ptl.lock());
            DUET.stage.store(1, Ordering::SeqCst);
            wait_stage(2);
            // Let the locker read the PMD and start spinning on our lock.
            arch::time::delay_us(20_000);
            mm::set_pmd(mm, pmd, mm::Pmd::NONE, &pl);
            drop(pte_lock);
            drop(map);
            drop(pl);
            detached.set(old);
        });
        // The locker has exited: put the table back for the teardown to free.
        if !detached.get().is_none() {
            mm::set_pmd(mm, pmd, detached.get(), &mm::pmd_lock(mm, pmd));
        }
        if let Some(code) = code {
            assert_eq!(code, 0, "pte_offset_map_lock returned a guard on a detached table");
        }
        drop(space);
    }

    /// Once the main CPU is ready (stage 1), faults a page of the duet's
    /// address on this CPU (as a fault handler would; stage 2 while it is
    /// in the fault, 3 after), then exits with 0 if the fault succeeded.
    extern "C" fn faulter(_: usize) -> ! {
        let mm = duet_mm();
        let a = VirtAddr::new(DUET.addr.load(Ordering::SeqCst));
        wait_stage(1);
        DUET.stage.store(2, Ordering::SeqCst);
        let r = mm::handle_mm_fault(mm, a, mm::Access::WRITE);
        DUET.stage.store(3, Ordering::SeqCst);
        sched::exit_current(if r.is_ok() { 0 } else { 1 })
    }

    /// Per-VMA locks on real CPUs: a writer (`mmap_lock` exclusive) that
    /// changed a VMA keeps faults on it out until its write session ends (the
    /// fault falls back to `mmap_lock` and waits); a fault on a VMA the
    /// writer did not touch runs under its own VMA lock meanwhile.
    #[ktest]
    fn writers_exclude_faults_on_the_vmas_they_change_only() {
        let space = AddressSpace::new().unwrap();
        let mm = &space.mm;
        let rw = mm::Prot::READ | mm::Prot::WRITE;
        let a = mm.mmap(Some(VirtAddr::new(0x6000_0000)), 4096, rw, mm::MapFlags::FIXED).unwrap().as_u64();
        let b = mm.mmap(Some(VirtAddr::new(0x7000_0000)), 4096, rw, mm::MapFlags::FIXED).unwrap().as_u64();
        // A fault on `b` while a writer holds mmap_lock: not blocked.
        let before = mm.stats();
        let code = duet(&space, b, faulter, || {
            let w = mm.mmap_write_lock();
            DUET.stage.store(1, Ordering::SeqCst);
            wait_stage(3);
            drop(w);
        });
        if code.is_none() {
            return; // one CPU
        }
        assert_eq!(code, Some(0));
        assert_eq!(mm.stats().vma_lock_faults - before.vma_lock_faults, 1, "the fault used its VMA lock");
        // A fault on `a` while the writer changes `a` (extends it): waits.
        let before = mm.stats();
        let code = duet(&space, a, faulter, || {
            let mut w = mm.mmap_write_lock();
            w.insert(mm::Vma {
                start: VirtAddr::new(a + 4096),
                end: VirtAddr::new(a + 8192),
                flags: mm::VmFlags::READ | mm::VmFlags::WRITE,
            });
            DUET.stage.store(1, Ordering::SeqCst);
            wait_stage(2);
            // Hold the lock until the fault has found its VMA write-locked
            // (however long the host keeps the faulting vCPU off a core),
            // then a while longer: a fault that got past it would finish.
            let deadline = arch::time::now_ns() + 60_000_000_000;
            while mm.stats().vma_fallback_locked == before.vma_fallback_locked {
                assert_eq!(DUET.stage.load(Ordering::SeqCst), 2, "a fault ran on a VMA under change");
                assert!(arch::time::now_ns() < deadline, "the fault never reached its VMA's lock in 60 s");
                core::hint::spin_loop();
            }
            arch::time::delay_us(20_000);
            assert_eq!(DUET.stage.load(Ordering::SeqCst), 2, "a fault ran on a VMA under change");
            drop(w);
        });
        assert_eq!(code, Some(0));
        let after = mm.stats();
        assert_eq!(after.vma_fallback_locked - before.vma_fallback_locked, 1, "it fell back: VMA write-locked");
        assert_eq!(after.mmap_lock_faults - before.mmap_lock_faults, 1);
        drop(space);
    }

    /// A write fault on anonymous memory maps a zeroed frame even when the
    /// frame it gets held data a moment ago: dirty a frame, free it (it goes
    /// to the head of this CPU's frame cache), fault, and check all 4096
    /// bytes of the page the fault mapped. Rerun per page; the frame must
    /// have been the dirty one for most of them (else the test proved
    /// nothing).
    #[ktest]
    fn a_fault_zeroes_a_frame_that_just_held_data() {
        const PAGES: u64 = 32;
        let space = AddressSpace::new().unwrap();
        let mm = &space.mm;
        let base = VirtAddr::new(0x5100_0000);
        let rw = mm::Prot::READ | mm::Prot::WRITE;
        mm.mmap(Some(base), PAGES * 4096, rw, mm::MapFlags::FIXED).unwrap();
        // The first fault allocates the page tables the others use.
        mm::handle_mm_fault(mm, base, mm::Access::WRITE).unwrap();
        let mut reused = 0;
        for k in 1..PAGES {
            let va = base.add(k * 4096);
            let dirty = mm::alloc_pages(0).unwrap();
            let dirty_pfn = dirty.pfn();
            // SAFETY: the frame is ours, 4096 bytes through the direct map.
            unsafe { core::ptr::write_bytes(dirty.virt(), 0x5a, 4096) };
            drop(dirty);
            mm::handle_mm_fault(mm, va, mm::Access::WRITE).unwrap();
            let m = mm.mappings().into_iter().find(|m| m.va == va).expect("the fault mapped the page");
            let frame = mm::phys().window().virt(m.pa).cast_const();
            // SAFETY: the page is mapped (the address space, used by no
            // thread, keeps it), and the direct map covers its frame.
            let bytes = unsafe { core::slice::from_raw_parts(frame, 4096) };
            if let Some(at) = bytes.iter().position(|&b| b != 0) {
                panic!(
                    "page {k}: byte {at:#x} of a freshly faulted page is {:#04x} (frame {:?}, the dirty frame was {dirty_pfn:?})",
                    bytes[at],
                    m.pa.pfn()
                );
            }
            reused += u64::from(m.pa.pfn() == dirty_pfn);
        }
        assert!(reused >= PAGES / 2, "the fault reused the dirty frame only {reused} times of {}", PAGES - 1);
        drop(space);
    }
}
