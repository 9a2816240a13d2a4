//! `AddressSpace`: an Mm and the kernel's bookkeeping around it.

use alloc::collections::BTreeMap;
use alloc::sync::{Arc, Weak};
use core::sync::atomic::{AtomicU64, Ordering};

use mm::{MapFlags, Mm, Prot, VirtAddr};
use spin::Mutex;

use super::process::Process;
use crate::binfmt::elf::Elf;
use crate::sched::WaitQueue;

/// Live address spaces (for leak tests).
pub static LIVE_SPACES: AtomicU64 = AtomicU64::new(0);

/// Size of each user thread's stack.
pub const USER_STACK_SIZE: u64 = 64 * 1024;

/// One in-progress `barrier` system call: how many threads arrived in the
/// current round, and which round it is.
#[derive(Default)]
struct BarrierState {
    arrived: usize,
    generation: u64,
}

/// A user address space.
pub struct AddressSpace {
    /// The memory manager's view: page tables, VMAs and their locks.
    pub mm: Mm<'static>,
    /// Entry point of the loaded image.
    entry: AtomicU64,
    /// Barriers of the `barrier` system call, by id. The lock protects the
    /// map; waiters sleep on `barrier_wq`.
    barriers: Mutex<BTreeMap<u64, BarrierState>>,
    barrier_wq: WaitQueue,
    /// The process that owns this space (set when the process is made; a
    /// space made for `spawn_user` gets one with its first thread).
    process: Mutex<Weak<Process>>,
}

/// Why an address space could not be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpaceError {
    /// Out of memory.
    NoMemory,
    /// The program image is not a valid user ELF.
    BadImage,
}

impl AddressSpace {
    /// A new, empty address space sharing the kernel's upper half.
    pub fn new() -> Result<Arc<Self>, SpaceError> {
        Self::build(Mm::new(crate::pgd::kernel_pgd()).ok_or(()), 0)
    }

    /// A copy of this space for `fork` (`Mm::fork`: the VMAs, and the pages
    /// shared copy-on-write), with the same image entry and no barriers.
    pub fn fork(&self) -> Result<Arc<Self>, SpaceError> {
        Self::build(self.mm.fork(), self.entry())
    }

    /// A space around the `Mm` in `made`, built in its heap allocation
    /// field by field, the `Mm` moved there straight out of `made`. An `Mm`
    /// is several KiB (per-CPU reader and counter shards), and a debug build
    /// copies every binding and struct literal that holds one through the
    /// frame: `fork` runs deep on a 32 KiB kernel stack, and with the debug
    /// page-table lock this frame (four copies) and `Mm::fork`'s overflowed
    /// it. `#[inline(always)]`: `made` is the caller's return slot.
    #[inline(always)]
    fn build<E>(made: Result<Mm<'static>, E>, entry: u64) -> Result<Arc<Self>, SpaceError> {
        let Ok(mm) = &made else { return Err(SpaceError::NoMemory) };
        let mut slot = Arc::<Self>::new_uninit();
        let p = Arc::get_mut(&mut slot).expect("a new Arc is unique").as_mut_ptr();
        // SAFETY: `p` points to the allocation of `slot`, which nothing else
        // references (it was just made), sized and aligned for `Self`; each
        // field is written once, through a raw pointer, without reading or
        // dropping the uninitialised memory. The `Mm` is moved bitwise out
        // of `made`, which is forgotten right after, so it is not dropped
        // twice (nothing between can unwind: no panic unwinds here).
        unsafe {
            core::ptr::copy_nonoverlapping(mm, core::ptr::addr_of_mut!((*p).mm), 1);
            core::mem::forget(made);
            core::ptr::addr_of_mut!((*p).entry).write(AtomicU64::new(entry));
            core::ptr::addr_of_mut!((*p).barriers).write(Mutex::new(BTreeMap::new()));
            core::ptr::addr_of_mut!((*p).barrier_wq).write(WaitQueue::new());
            core::ptr::addr_of_mut!((*p).process).write(Mutex::new(Weak::new()));
        }
        LIVE_SPACES.fetch_add(1, Ordering::Relaxed);
        // SAFETY: every field of `Self` was written above.
        Ok(unsafe { slot.assume_init() })
    }

    /// Records the process that owns this space.
    pub(super) fn set_process(&self, p: &Arc<Process>) {
        *self.process.lock() = Arc::downgrade(p);
    }

    /// The process that owns this space, if it is alive and takes new
    /// threads; else a new parentless process for it (for `spawn_user`).
    pub(super) fn process_for_new_thread(self: &Arc<Self>, name: &str) -> Arc<Process> {
        let mut slot = self.process.lock();
        if let Some(p) = slot.upgrade()
            && !p.exiting()
            && !p.is_zombie()
        {
            return p;
        }
        let p = Process::new_unlinked(self.clone(), name);
        *slot = Arc::downgrade(&p);
        p
    }

    /// A new address space with the user programs (`crate::binfmt::IMAGE`) loaded.
    pub fn with_programs() -> Result<Arc<Self>, SpaceError> {
        let space = Self::new()?;
        space.load(crate::binfmt::IMAGE)?;
        Ok(space)
    }

    /// Maps the segments of `image` (text read+exec, rodata read, data
    /// read+write) and copies their bytes in.
    pub fn load(&self, image: &[u8]) -> Result<(), SpaceError> {
        let elf = Elf::parse(image).map_err(|_| SpaceError::BadImage)?;
        for seg in elf.segments().map_err(|_| SpaceError::BadImage)? {
            let start = seg.vaddr & !0xfff;
            let end = (seg.vaddr + seg.mem_size + 0xfff) & !0xfff;
            let mut prot = Prot::empty();
            prot.set(Prot::READ, seg.read);
            prot.set(Prot::WRITE, seg.write);
            prot.set(Prot::EXEC, seg.exec);
            self.mm
                .mmap(Some(VirtAddr::new(start)), end - start, prot, MapFlags::FIXED)
                .map_err(|_| SpaceError::NoMemory)?;
            let mut bytes = alloc::vec::Vec::from(elf.bytes(&seg));
            if !bytes.is_empty() {
                self.mm.access_remote(VirtAddr::new(seg.vaddr), &mut bytes, true).map_err(|_| SpaceError::NoMemory)?;
            }
        }
        self.entry.store(elf.entry, Ordering::Relaxed);
        Ok(())
    }

    /// Entry point of the loaded image.
    pub fn entry(&self) -> u64 {
        self.entry.load(Ordering::Relaxed)
    }

    /// Maps a fresh stack (no-exec) and returns its top. The page below the
    /// stack stays unmapped: an overflow faults instead of running into
    /// another mapping.
    pub fn map_stack(&self) -> Result<u64, SpaceError> {
        let base = self
            .mm
            .mmap(None, USER_STACK_SIZE + 4096, Prot::READ | Prot::WRITE, MapFlags::empty())
            .map_err(|_| SpaceError::NoMemory)?;
        // Turn the lowest page into the guard.
        self.mm.munmap(base, 4096).map_err(|_| SpaceError::NoMemory)?;
        Ok(base.as_u64() + 4096 + USER_STACK_SIZE)
    }

    /// Reads user memory of this space from the kernel (any CPU, any CR3).
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        self.mm.access_remote(VirtAddr::new(addr), buf, false).is_ok()
    }

    /// Writes user memory of this space from the kernel.
    pub fn write(&self, addr: u64, bytes: &[u8]) -> bool {
        let mut copy = alloc::vec::Vec::from(bytes);
        self.mm.access_remote(VirtAddr::new(addr), &mut copy, true).is_ok()
    }

    /// Loads this space's page tables on this CPU and records that the CPU
    /// may now cache its translations (TLB shoot-downs will include it).
    pub fn activate(&self) {
        let cpu = arch::percpu::cpu_id();
        self.mm.cpu_bitmap().set(cpu);
        // SAFETY: the PGD shares the kernel's upper half (Mm::new copies it),
        // so the running kernel code, stack and data stay mapped.
        unsafe { crate::pgd::load_cr3(self.mm.pgd_phys().as_u64()) };
    }

    /// Called when this CPU stops running the space (it switched CR3 away,
    /// which flushed the space's non-global translations).
    pub fn deactivate(&self) {
        self.mm.cpu_bitmap().clear(arch::percpu::cpu_id());
    }

    /// The `barrier` system call: blocks until `parties` threads called it
    /// with `id`, then releases them all. Reusable round after round.
    ///
    /// A thread whose process is being killed leaves early (its arrival
    /// withdrawn); returns whether the barrier completed.
    pub fn barrier(&self, id: u64, parties: usize) -> bool {
        let my_generation;
        {
            let mut barriers = self.barriers.lock();
            let b = barriers.entry(id).or_default();
            b.arrived += 1;
            my_generation = b.generation;
            if b.arrived >= parties {
                b.arrived = 0;
                b.generation += 1;
                drop(barriers);
                self.barrier_wq.wake_all();
                return true;
            }
        }
        let done = || self.barriers.lock().get(&id).is_some_and(|b| b.generation != my_generation);
        self.barrier_wq.wait_until(|| done() || super::process::current_exiting());
        let mut barriers = self.barriers.lock();
        match barriers.get_mut(&id) {
            Some(b) if b.generation == my_generation => {
                b.arrived -= 1;
                false
            }
            _ => true,
        }
    }

    /// Wakes every thread sleeping in `barrier` (they re-check; those of a
    /// process being killed leave).
    pub(super) fn wake_barrier_waiters(&self) {
        self.barrier_wq.wake_all();
    }
}

impl Drop for AddressSpace {
    fn drop(&mut self) {
        LIVE_SPACES.fetch_sub(1, Ordering::Relaxed);
    }
}
