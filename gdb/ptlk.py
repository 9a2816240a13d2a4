"""gdb helpers for the ptlk kernel (loaded automatically by `cargo xtask gdb`).

Commands:
    pt-walk ADDR [CR3]     walk ADDR through the four paging levels
    ptl ADDR               which lock guards ADDR's PTE and PMD entries, where it
                           lives and whether it is held
    page PFN|PHYSADDR      decode a struct-page descriptor (`page pfn N`,
                           `page phys ADDR` to force a reading, `page va ADDR`
                           for the frame a virtual address maps to)
    percpu [CPU]           per-CPU state (default: the selected gdb thread's CPU)
    vmas [PID]             the VMA list of process PID's Mm (default: the Mm
                           running on the selected CPU), with each VMA's lock
                           (readers inside, write-locked in the running write
                           session, detached) and the address space's
                           mm_lock_seq
    procs                  the process table: pid, parent, state, exit status,
                           threads (tid, CPU, state), the Mm; sets $ptlk_pid to
                           the pid running on the selected CPU
    ptlk-break-on-panic [hw]  stop on kernel panics and oopses

Rust layouts these helpers depend on (by name, through DWARF), and what
they read from them:
    kernel::diag::debuginfo::PtlkDebugInfo (symbol PTLK_DEBUG_INFO): magic, version,
        split_pte_ptlocks, split_pmd_ptlocks, alloc_split_ptlocks,
        debug_ptlock, phys_offset, nr_cpus, page_desc_size, and the name
        tables page_kinds and pt_levels (NameTable {count, names})
    mm::PHYS: spin::Once<mm::physmem::PhysMem> -> memmap: mm::memmap::MemMap
        {sections: [Section {base: Pfn, nr, pages: *const Page}], nr_sections}
    mm::memmap::Page {kind, flags, order, pt_level, refcount, lru,
        word: UnsafeCell<PageWord {ptl, private}>}
    mm::lock::spinlock::RawSpinLock {owner: AtomicU32 (bits 0..16 the
        ticket served, bit 16 a waiter may be halted), next: AtomicU16,
        class, [owner_cpu, owner_site with debug-ptlock]}
    mm::lock::rwlock::RwSpinLock {readers: [ReaderShard(AtomicU32)], writer,
        data} (Mm::mmap_lock), whose data is mm::vma::VmaSet {map: BTreeMap<u64,
        Arc<mm::vma_lock::VmaNode {vma: Vma {start, end, flags}, lock: VmaLock
        {state: AtomicU32 (bit 31 writer, low bits readers), lock_seq: AtomicU64,
        detached: AtomicBool}}>>}; Mm::vma_lookup: VmaLookup {array:
        AtomicPtr<VmaArray {nodes: Box<[Arc<VmaNode>]>}>, mm_lock_seq: AtomicU64}
    arch::percpu::PERCPU: [PerCpu {cpu_id, apic_id, kernel_rsp, tss, ...}]
    kernel::sched::CPUS: [CpuSched {rq, current: OwnerCell<Arc<Task>>
        (UnsafeCell<Option<Arc<Task>>>), ...}] and kernel::sched::task::Task {tid, name, cpu, state, space,
        process}
    kernel::uspace::process::PROCESSES: spin::Mutex<BTreeMap<u64, Arc<Process {pid, name, parent,
        exiting, status, zombie, inner: spin::Mutex<Inner {space: Option<Arc<AddressSpace {mm}>>,
        threads: Vec<Weak<Task>>, live}>}>>>
If one of them changes, the command that uses it says which field it could
not find instead of printing nonsense.
"""

import gdb

# Page kinds and page-table level names come from the kernel's debug-info
# block (debug_names); the page flags are mm-private bits (mm/src/memmap.rs).
PAGE_FLAGS = {1: "BUDDY", 2: "PCP", 4: "PTL"}
LEVEL_NAMES = ["PGD", "PUD", "PMD", "PTE"]  # P4D is folded on 4-level x86_64
ENTRY_FLAGS = [
    (0, "P"), (1, "W"), (2, "U"), (3, "PWT"), (4, "PCD"), (5, "A"), (6, "D"),
    (7, "PS"), (8, "G"), (63, "NX"),
]
ADDR_MASK = 0x000F_FFFF_FFFF_F000


class LayoutError(gdb.GdbError):
    pass


# ---------------------------------------------------------------- value access

WRAPPERS = ("core::sync::atomic::Atomic", "core::cell::UnsafeCell", "kernel::sched::OwnerCell", "core::sync::atomic::private::Align",
            "core::mem::manually_drop::ManuallyDrop", "core::mem::maybe_dangling::MaybeDangling",
            "core::cell::Cell")


def field(value, name):
    """`value.name`, with a clear error naming the Rust layout if absent."""
    try:
        return value[name]
    except gdb.error:
        raise LayoutError("ptlk.py: type %s has no field `%s` (has the Rust layout changed?)"
                          % (value.type, name))


def unwrap(value):
    """Strips Atomic/UnsafeCell/ManuallyDrop-style wrappers down to the payload."""
    for _ in range(12):
        t = value.type.strip_typedefs()
        if t.code != gdb.TYPE_CODE_STRUCT or not any(str(t).startswith(w) for w in WRAPPERS):
            return value
        fields = t.fields()
        if not fields:
            return value
        value = value[fields[0]]
    return value


def as_int(value):
    """An integer from an integer, a wrapper around one, or a newtype (Pfn)."""
    value = unwrap(value)
    for _ in range(8):
        t = value.type.strip_typedefs()
        if t.code != gdb.TYPE_CODE_STRUCT:
            break
        fields = [f for f in t.fields() if not str(f.type).startswith("core::marker::PhantomData")]
        if len(fields) != 1:
            break
        value = unwrap(value[fields[0]])
    return int(value)


def rust_str(value):
    """The text of an alloc::string::String or &str value."""
    def find(v, name, depth=0):
        t = v.type.strip_typedefs()
        if t.code != gdb.TYPE_CODE_STRUCT or depth > 8:
            return None
        for f in t.fields():
            if f.name == name:
                return v[f]
        for f in t.fields():
            r = find(v[f], name, depth + 1)
            if r is not None:
                return r
        return None

    def first_ptr(v, depth=0):
        t = v.type.strip_typedefs()
        if t.code == gdb.TYPE_CODE_PTR:
            return v
        if t.code != gdb.TYPE_CODE_STRUCT or depth > 8:
            return None
        for f in t.fields():
            r = first_ptr(v[f], depth + 1)
            if r is not None:
                return r
        return None

    ptr = first_ptr(value)
    length = find(value, "len") or find(value, "length")
    if ptr is None or length is None:
        return value.format_string()
    n = as_int(length)
    data = bytes(gdb.selected_inferior().read_memory(int(ptr), min(n, 256)))
    return data.decode("utf-8", "replace")


def once_get(value):
    """The payload of an initialised spin::Once, else None."""
    if as_int(field(value, "status")) != 2:
        return None
    data = unwrap(field(value, "data"))  # MaybeUninit
    return unwrap(field(data, "value"))


def read_u64(addr):
    mem = gdb.selected_inferior().read_memory(addr, 8)
    return int.from_bytes(bytes(mem), "little")


def debug_info():
    info = None
    for name in ("kernel::diag::debuginfo::PTLK_DEBUG_INFO", "PTLK_DEBUG_INFO"):
        try:
            info = gdb.parse_and_eval(name)
            break
        except gdb.error:
            continue
    if info is None:
        raise gdb.GdbError("ptlk.py: symbol PTLK_DEBUG_INFO not found: is this the ptlk kernel ELF?")
    if as_int(info["magic"]) != int.from_bytes(b"PTLKDBG\0", "little"):
        raise gdb.GdbError("ptlk.py: PTLK_DEBUG_INFO has the wrong magic")
    if as_int(info["version"]) != 2:
        raise gdb.GdbError("ptlk.py: PTLK_DEBUG_INFO version %d, this script knows 2" % as_int(info["version"]))
    return info


def debug_names(table):
    """A name table of the debug-info block (`page_kinds`, `pt_levels`) as a list."""
    t = field(debug_info(), table)
    names = field(t, "names")
    out = []
    for i in range(as_int(field(t, "count"))):
        raw = bytes(gdb.selected_inferior().read_memory(int(names[i].address), names[i].type.sizeof))
        out.append(raw.split(b"\0", 1)[0].decode("ascii", "replace"))
    return out


def name_of(table, value):
    names = debug_names(table)
    return names[value] if value < len(names) else "?%d" % value


def phys_offset():
    return as_int(debug_info()["phys_offset"])


def read_phys_u64(pa):
    return read_u64(phys_offset() + pa)


def parse_int(arg):
    return int(gdb.parse_and_eval(arg)) & 0xFFFF_FFFF_FFFF_FFFF


def current_cpu():
    """The CPU of the selected gdb thread (QEMU numbers threads CPU0 = 1)."""
    thread = gdb.selected_thread()
    return 0 if thread is None else thread.num - 1


# ---------------------------------------------------------------- page tables

def decode_entry(e):
    flags = [name for bit, name in ENTRY_FLAGS if e & (1 << bit)]
    return " ".join(flags) if flags else "-"


def walk(addr, cr3):
    """Yields (level name, index, entry address (phys), entry value) and stops
    at a non-present or huge entry."""
    table = cr3 & ADDR_MASK
    shifts = [39, 30, 21, 12]
    for level, shift in enumerate(shifts):
        index = (addr >> shift) & 0x1FF
        entry_pa = table + index * 8
        e = read_phys_u64(entry_pa)
        yield LEVEL_NAMES[level], index, entry_pa, e
        if not e & 1:
            return
        if level in (1, 2) and e & (1 << 7):
            return
        table = e & ADDR_MASK


def translate(addr, cr3):
    """Physical address ADDR maps to, with the page size, or None."""
    last = None
    for level, _index, _pa, e in walk(addr, cr3):
        last = (level, e)
    if last is None or not last[1] & 1:
        return None
    level, e = last
    size = {"PUD": 1 << 30, "PMD": 1 << 21, "PTE": 1 << 12}.get(level)
    if size is None:
        return None
    base = e & ADDR_MASK & ~(size - 1)
    return base + (addr & (size - 1)), size


class PtWalk(gdb.Command):
    """pt-walk ADDR [CR3]: walk ADDR through PGD/PUD/PMD/PTE (P4D folded).

Each level prints the entry's index, physical location and value, the frame
it points to, and its flags (P W U PWT PCD A D PS G NX). Without CR3 the
selected CPU's CR3 is used."""

    def __init__(self):
        super().__init__("pt-walk", gdb.COMMAND_DATA)

    def invoke(self, arg, from_tty):
        args = gdb.string_to_argv(arg)
        if not args or len(args) > 2:
            raise gdb.GdbError("usage: pt-walk ADDR [CR3]")
        addr = parse_int(args[0])
        cr3 = parse_int(args[1]) if len(args) == 2 else int(gdb.parse_and_eval("$cr3"))
        print("pt-walk %#x (CR3 %#x, CPU %d)" % (addr, cr3, current_cpu()))
        for level, index, entry_pa, e in walk(addr, cr3):
            huge = level in ("PUD", "PMD") and e & 0x80 and e & 1
            what = "not present" if not e & 1 else (
                "%s page %#x" % ({"PUD": "1G", "PMD": "2M"}[level], e & ADDR_MASK) if huge
                else ("frame %#x" % (e & ADDR_MASK) if level == "PTE" else "table %#x" % (e & ADDR_MASK)))
            print("  %-3s[%3d] @phys %#014x = %#018x  %-22s %s" % (level, index, entry_pa, e, what, decode_entry(e)))
        t = translate(addr, cr3)
        if t is None:
            print("  => %#x is not mapped" % addr)
        else:
            print("  => %#x maps to phys %#x (%s page)" % (addr, t[0], {1 << 12: "4K", 1 << 21: "2M", 1 << 30: "1G"}[t[1]]))


# ---------------------------------------------------------------- struct page

def memmap():
    try:
        phys = gdb.parse_and_eval("mm::PHYS")
    except gdb.error:
        raise LayoutError("ptlk.py: static mm::PHYS not found")
    pm = once_get(phys)
    if pm is None:
        raise gdb.GdbError("mm::init has not run yet: no memmap")
    return field(pm, "memmap")


def page_desc(pfn):
    """gdb.Value of the mm::memmap::Page for PFN, or None (hole)."""
    mmap = memmap()
    sections = field(mmap, "sections")
    for i in range(as_int(field(mmap, "nr_sections"))):
        s = sections[i]
        base = as_int(field(s, "base"))
        nr = as_int(field(s, "nr"))
        if base <= pfn < base + nr:
            return (field(s, "pages") + (pfn - base)).dereference()
    return None


def max_pfn():
    mmap = memmap()
    sections = field(mmap, "sections")
    top = 0
    for i in range(as_int(field(mmap, "nr_sections"))):
        s = sections[i]
        base = as_int(field(s, "base"))
        top = max(top, base + as_int(field(s, "nr")))
    return top


def lock_state(lock):
    """Describes a mm::lock::spinlock::RawSpinLock value."""
    nxt, owner = as_int(field(lock, "next")), as_int(field(lock, "owner")) & 0xFFFF
    held = nxt != owner
    text = "held" if held else "free"
    if held:
        waiters = (nxt - owner - 1) & 0xFFFF
        text += ", %d waiting" % waiters
        try:
            cpu = as_int(lock["owner_cpu"])
            site = lock["owner_site"]
            text += ", owner CPU %d" % cpu
            site_ptr = int(unwrap(site))
            if site_ptr:
                loc = gdb.Value(site_ptr).cast(gdb.lookup_type("core::panic::location::Location").pointer()).dereference()
                text += " at %s:%d" % (loc["file"].format_string().strip('"'), int(loc["line"]))
        except (gdb.error, LayoutError):
            pass
    return "%s (next ticket %d, owner %d)" % (text, nxt, owner)


def rwlock_state(lock):
    """Describes a mm::lock::RwSpinLock (readers: [ReaderShard(AtomicU32)]
    one count per CPU shard; writer: WRITER bit)."""
    shards = field(lock, "readers")
    lo, hi = shards.type.strip_typedefs().range()
    readers = sum(as_int(shards[i]) for i in range(lo, hi + 1))
    writer = as_int(field(lock, "writer")) & 1
    return "%d readers%s" % (readers, ", writer in or waiting" if writer else "")


def page_ptl(page):
    """(lock value, where) for a page-table page's descriptor, or None."""
    flags = as_int(field(page, "flags"))
    if not flags & 4:
        return None
    word = unwrap(field(page, "word"))
    ptl = unwrap(field(word, "ptl"))
    if ptl.type.strip_typedefs().code == gdb.TYPE_CODE_PTR:
        return ptl.dereference(), "allocated lock at %#x (pointer in the descriptor)" % int(ptl)
    return ptl, "inline in the descriptor at %#x" % int(ptl.address)


def describe_page(pfn):
    page = page_desc(pfn)
    if page is None:
        return ["pfn %#x (phys %#x): no descriptor (a hole or not RAM the memmap covers)" % (pfn, pfn << 12)]
    kind = as_int(field(page, "kind"))
    flags = as_int(field(page, "flags"))
    level = as_int(field(page, "pt_level"))
    lines = ["pfn %#x (phys %#x): struct page at %#x" % (pfn, pfn << 12, int(page.address)),
             "  kind      %s" % name_of("page_kinds", kind),
             "  flags     %#x %s" % (flags, " ".join(n for b, n in PAGE_FLAGS.items() if flags & b) or "-"),
             "  order     %d" % as_int(field(page, "order")),
             "  refcount  %d" % as_int(field(page, "refcount")),
             "  pt_level  %s" % name_of("pt_levels", level)]
    ptl = page_ptl(page)
    if ptl is not None:
        lock, where = ptl
        lines.append("  ptl       %s: %s" % (where, lock_state(lock)))
    return lines


class PageCmd(gdb.Command):
    """page PFN|PHYSADDR: decode the struct-page descriptor of a frame.

A number below the highest PFN the memmap covers is read as a PFN, anything
else as a physical address; `page pfn N` and `page phys ADDR` force one, and
`page va ADDR` decodes the frame a virtual address maps to on this CPU."""

    def __init__(self):
        super().__init__("page", gdb.COMMAND_DATA)

    def invoke(self, arg, from_tty):
        args = gdb.string_to_argv(arg)
        if len(args) == 2 and args[0] == "va":
            va = parse_int(args[1])
            t = translate(va, int(gdb.parse_and_eval("$cr3")))
            if t is None:
                raise gdb.GdbError("page va: %#x is not mapped on this CPU" % va)
            print("(%#x maps to phys %#x)" % (va, t[0]))
            for line in describe_page(t[0] >> 12):
                print(line)
            return
        if len(args) == 2 and args[0] in ("pfn", "phys"):
            n = parse_int(args[1])
            pfn = n if args[0] == "pfn" else n >> 12
            how = args[0]
        elif len(args) == 1:
            n = parse_int(args[0])
            if n < max_pfn():
                pfn, how = n, "pfn"
            else:
                pfn, how = n >> 12, "phys"
        else:
            raise gdb.GdbError("usage: page PFN|PHYSADDR  (or: page pfn N | page phys ADDR | page va ADDR)")
        print("(read as %s)" % ("a PFN" if how == "pfn" else "a physical address"))
        for line in describe_page(pfn):
            print(line)


# ---------------------------------------------------------------- locks

def current_space(cpu):
    """The mm::Mm (gdb.Value) of the task running on CPU, or None."""
    try:
        cs = gdb.parse_and_eval("kernel::sched::CPUS")[cpu]
    except gdb.error:
        return None
    cur = unwrap(field(cs, "current"))
    task = option_arc(cur)
    if task is None:
        return None
    try:
        space = option_arc(task["space"])
    except gdb.error:
        return None
    if space is None:
        return None
    return field(space, "mm")


def option_arc(opt):
    """The T inside an Option<Arc<T>> value, or None."""
    opt = unwrap(opt)
    t = opt.type.strip_typedefs()
    # Option<Arc<T>> is a niche-optimised enum; gdb shows it as a struct with
    # variant fields. Find a pointer payload by walking down.
    for f in t.fields():
        if f.name and f.name.startswith("Some"):
            inner = opt[f]
            return arc_payload(inner[inner.type.fields()[0]])
    try:
        return arc_payload(opt)
    except (gdb.error, LayoutError, IndexError):
        return None


def arc_payload(arc):
    ptr = field(arc, "ptr")
    ptr = unwrap(ptr)
    while ptr.type.strip_typedefs().code == gdb.TYPE_CODE_STRUCT:
        ptr = ptr[ptr.type.fields()[0]]
    if int(ptr) == 0:
        return None
    return field(ptr.dereference(), "data")


class PtlCmd(gdb.Command):
    """ptl ADDR: the locks that protect ADDR's page-table entries.

Prints, for the PTE entry and the PMD entry of ADDR in the selected CPU's
address space: which lock the build's configuration uses (split PTE lock,
split PMD lock, or mm.page_table_lock), where it lives (inline in the page
descriptor or allocated), and whether it is held (with the owner CPU and
site when the debug lock is built in)."""

    def __init__(self):
        super().__init__("ptl", gdb.COMMAND_DATA)

    def invoke(self, arg, from_tty):
        args = gdb.string_to_argv(arg)
        if len(args) != 1:
            raise gdb.GdbError("usage: ptl ADDR")
        addr = parse_int(args[0])
        info = debug_info()
        split_pte = as_int(info["split_pte_ptlocks"]) != 0
        split_pmd = as_int(info["split_pmd_ptlocks"]) != 0
        alloc = as_int(info["alloc_split_ptlocks"]) != 0
        cr3 = int(gdb.parse_and_eval("$cr3"))
        print("ptl %#x (CPU %d, CR3 %#x)" % (addr, current_cpu(), cr3))
        print("  config: PTE locks %s, PMD locks %s, ptl %s" % (
            "split" if split_pte else "mm.page_table_lock",
            "split" if split_pmd else "mm.page_table_lock",
            "allocated" if alloc else "inline"))
        entries = {level: (pa, e) for level, _i, pa, e in walk(addr, cr3)}
        if addr >= 0xFFFF_8000_0000_0000:
            print("  kernel address: init_mm's tables have no split locks (Linux: mm != &init_mm)")
        mm = current_space(current_cpu())
        ptl_global = None
        if mm is not None:
            try:
                ptl_global = mm["page_table_lock"]
            except gdb.error:
                ptl_global = None

        def global_lock(what):
            if ptl_global is None:
                print("  %s: mm.page_table_lock (the Mm on this CPU is not known to gdb)" % what)
            else:
                lock = unwrap(ptl_global)
                print("  %s: mm.page_table_lock at %#x: %s" % (what, int(lock.address), lock_state(lock)))

        # PMD entry: lives in the PMD table reached through the PUD entry.
        if "PMD" not in entries:
            print("  PMD: no PMD table maps %#x (PUD entry %s)" % (
                addr, "huge" if "PUD" in entries and entries["PUD"][1] & 0x80 else "not present"))
            return
        pmd_pa, pmd = entries["PMD"]
        if split_pmd and addr < 0xFFFF_8000_0000_0000:
            pfn = pmd_pa >> 12
            page = page_desc(pfn)
            ptl = page_ptl(page) if page is not None else None
            if ptl is None:
                print("  PMD entry @phys %#x: split PMD lock of table pfn %#x: NOT CONSTRUCTED (no PTL flag)" % (pmd_pa, pfn))
            else:
                print("  PMD entry @phys %#x: split PMD lock of table pfn %#x, %s: %s" % (pmd_pa, pfn, ptl[1], lock_state(ptl[0])))
        else:
            global_lock("PMD entry @phys %#x" % pmd_pa)
        if not pmd & 1:
            print("  PTE: none (pmd not present): a fault would allocate the PTE table under the PMD lock")
            return
        if pmd & 0x80:
            print("  PTE: none (huge pmd): the 2M mapping itself is guarded by the PMD lock above (huge_pte_lock)")
            return
        pte_table = pmd & ADDR_MASK
        if split_pte and addr < 0xFFFF_8000_0000_0000:
            pfn = pte_table >> 12
            page = page_desc(pfn)
            ptl = page_ptl(page) if page is not None else None
            if ptl is None:
                print("  PTE entry: split PTE lock of table pfn %#x: NOT CONSTRUCTED (no PTL flag)" % pfn)
            else:
                print("  PTE entry @phys %#x: split PTE lock of table pfn %#x, %s: %s" % (
                    pte_table + ((addr >> 12) & 0x1FF) * 8, pfn, ptl[1], lock_state(ptl[0])))
        else:
            global_lock("PTE entry @phys %#x" % (pte_table + ((addr >> 12) & 0x1FF) * 8))


# ---------------------------------------------------------------- per-CPU, VMAs

class PercpuCmd(gdb.Command):
    """percpu [CPU]: the per-CPU block and scheduler state of a CPU."""

    def __init__(self):
        super().__init__("percpu", gdb.COMMAND_DATA)

    def invoke(self, arg, from_tty):
        args = gdb.string_to_argv(arg)
        cpu = parse_int(args[0]) if args else current_cpu()
        try:
            pc = gdb.parse_and_eval("arch::percpu::PERCPU")[cpu]
        except gdb.error:
            raise LayoutError("ptlk.py: static arch::percpu::PERCPU not found")
        print("CPU %d: per-CPU block at %#x" % (cpu, int(pc.address)))
        for name in ("cpu_id", "apic_id", "online", "kernel_rsp", "user_rsp_scratch", "tss", "irq_depth"):
            try:
                v = as_int(pc[name])
            except gdb.error:
                continue
            print("  %-17s %#x" % (name, v))
        try:
            cs = gdb.parse_and_eval("kernel::sched::CPUS")[cpu]
        except gdb.error:
            return
        task = option_arc(unwrap(field(cs, "current")))
        if task is not None:
            states = ["Runnable", "Running", "Blocked", "Exited"]
            state = as_int(task["state"])
            print("  current task      tid %d \"%s\" %s" % (
                as_int(task["tid"]), rust_str(task["name"]), states[state] if state < 4 else state))
        print("  context switches  %d" % as_int(field(cs, "switches")))


VMA_WRITER = 1 << 31  # mm/src/vma_lock.rs WRITER


def vma_lock_state(lock, mm_lock_seq):
    """Describes a mm::vma_lock::VmaLock: faults inside, and whether a writer
    holds it or has write-locked it for the running session."""
    state = as_int(field(lock, "state"))
    seq = as_int(field(lock, "lock_seq"))
    readers = state & ~VMA_WRITER & 0xFFFF_FFFF
    parts = ["%d reader%s" % (readers, "" if readers == 1 else "s")]
    if state & VMA_WRITER:
        parts.append("writer in (waiting for the readers to leave)")
    if seq == mm_lock_seq:
        parts.append("write-locked this session (lock_seq %d = mm_lock_seq): faults fall back to mmap_lock" % seq)
    else:
        parts.append("lock_seq %d" % seq)
    if as_int(field(lock, "detached")):
        parts.append("DETACHED (replaced; freed after a grace period)")
    return ", ".join(parts)


class VmasCmd(gdb.Command):
    """vmas [PID]: the VMA list of process PID's Mm (default: the Mm running on
the selected CPU; `procs` lists the pids).

Each VMA's line ends with its per-VMA lock (`lock:`): the faults inside it
(readers), a writer waiting for them, whether a write session stamped it
(lock_seq equal to the address space's mm_lock_seq: faults on it fall back to
mmap_lock until the session ends) and whether it was detached (replaced,
waiting for a grace period). Last, the array that faults search under RCU:
how many nodes it lists, and those that are no longer in the set (a
writer's session replaced them and has not ended yet)."""

    def __init__(self):
        super().__init__("vmas", gdb.COMMAND_DATA)

    def invoke(self, arg, from_tty):
        args = gdb.string_to_argv(arg)
        if len(args) > 1:
            raise gdb.GdbError("usage: vmas [PID]")
        if args:
            pid = parse_int(args[0])
            proc = find_process(pid)
            if proc is None:
                raise gdb.GdbError("vmas: no process %d in the process table (see `procs`)" % pid)
            space = process_space(proc)
            if space is None:
                print("process %d is a zombie: it has no address space any more" % pid)
                return
            mm = field(space, "mm")
            where = "of process %d" % pid
        else:
            cpu = current_cpu()
            mm = current_space(cpu)
            if mm is None:
                print("CPU %d runs no user address space (kernel task or idle)" % cpu)
                return
            pid = current_pid(cpu)
            where = "on CPU %d" % cpu + ("" if pid is None else " (process %d)" % pid)
        mm_lock_seq = as_int(field(field(mm, "vma_lookup"), "mm_lock_seq"))
        print("Mm at %#x %s (mmap_lock: %s; mm_lock_seq %d)" % (
            int(mm.address), where, rwlock_state(field(mm, "mmap_lock")), mm_lock_seq))
        vmaset = unwrap(field(field(mm, "mmap_lock"), "data"))
        tree = field(vmaset, "map")
        # The set is an alloc BTreeMap; the Rust toolchain's pretty-printers
        # (loaded below) know how to walk it.
        vis = gdb.default_visualizer(tree)
        if vis is None:
            print(tree.format_string())
            return
        items = [v for _, v in vis.children()]
        # children() alternates keys and values.
        vmas = items[1::2]
        print("  %d VMAs" % len(vmas))
        in_set = set()
        for node in vmas:
            vnode = arc_payload(node)
            in_set.add(int(vnode.address))
            print(vma_line(vnode, mm_lock_seq))
        # The array faults search under RCU (VmaLookup::array): between a
        # writer's change and the end of its session it still lists the
        # nodes the writer replaced (detached).
        array = unwrap(field(field(mm, "vma_lookup"), "array"))
        if int(array) == 0:
            return
        nodes = field(array.dereference(), "nodes")
        data, length = field(nodes, "data_ptr"), as_int(field(nodes, "length"))
        stale = [arc_payload(data[i]) for i in range(length)]
        stale = [n for n in stale if int(n.address) not in in_set]
        print("  published array (faults search it under RCU): %d nodes, %d not in the set%s" % (
            length, len(stale), ":" if stale else ""))
        for vnode in stale:
            print(vma_line(vnode, mm_lock_seq))


# ---------------------------------------------------------------- processes

def mutex_data(value):
    """The T inside a spin::Mutex<T> (whatever wraps its `data` UnsafeCell)."""
    def find(v, depth=0):
        t = v.type.strip_typedefs()
        if t.code != gdb.TYPE_CODE_STRUCT or depth > 6:
            return None
        for f in t.fields():
            if f.name == "data":
                return unwrap(v[f])
        for f in t.fields():
            r = find(v[f], depth + 1)
            if r is not None:
                return r
        return None

    data = find(value)
    if data is None:
        raise LayoutError("ptlk.py: type %s holds no `data` field (not a spin::Mutex?)" % value.type)
    return data


def processes():
    """(pid, Process gdb.Value) for every entry of the process table."""
    try:
        table = gdb.parse_and_eval("kernel::uspace::process::PROCESSES")
    except gdb.error:
        raise LayoutError("ptlk.py: static kernel::uspace::process::PROCESSES not found")
    tree = mutex_data(table)
    vis = gdb.default_visualizer(tree)
    if vis is None:
        raise gdb.GdbError("ptlk.py: the Rust pretty-printers are needed to walk the process table")
    items = [v for _, v in vis.children()]
    # children() alternates keys and values.
    return [(as_int(k), arc_payload(v)) for k, v in zip(items[0::2], items[1::2])]


def find_process(pid):
    for p, proc in processes():
        if p == pid:
            return proc
    return None


def process_space(proc):
    """The AddressSpace of a Process, or None for a zombie."""
    inner = mutex_data(field(proc, "inner"))
    return option_arc(field(inner, "space"))


def current_pid(cpu):
    """The pid of the process whose thread runs on CPU, or None."""
    try:
        cs = gdb.parse_and_eval("kernel::sched::CPUS")[cpu]
        task = option_arc(unwrap(field(cs, "current")))
        if task is None:
            return None
        proc = option_arc(task["process"])
    except (gdb.error, LayoutError):
        return None
    return None if proc is None else as_int(field(proc, "pid"))


def weak_payload(weak):
    """The T of a live alloc::sync::Weak<T>, or None (dangling or dropped)."""
    ptr = unwrap(field(weak, "ptr"))
    while ptr.type.strip_typedefs().code == gdb.TYPE_CODE_STRUCT:
        ptr = ptr[ptr.type.fields()[0]]
    if int(ptr) in (0, 0xFFFF_FFFF_FFFF_FFFF):
        return None
    inner = ptr.dereference()
    if as_int(field(inner, "strong")) == 0:
        return None
    return field(inner, "data")


TASK_STATES = ["Runnable", "Running", "Blocked", "Exited"]


class ProcsCmd(gdb.Command):
    """procs: the process table.

One line per process (pid, parent pid or -, state: live, exiting (killed,
its threads leaving on their way back to ring 3) or zombie (waiting for its
parent's wait), exit status, live threads, name, the Mm), then its threads
(tid, name, CPU, state). The process running on the selected CPU is marked
`*` and its pid stored in $ptlk_pid (else the first pid), for `vmas $ptlk_pid`."""

    def __init__(self):
        super().__init__("procs", gdb.COMMAND_DATA)

    def invoke(self, arg, from_tty):
        cpu = current_cpu()
        mine = current_pid(cpu)
        procs = processes()
        print("%d processes (selected CPU %d runs %s)" % (
            len(procs), cpu, "process %d" % mine if mine is not None else "no process"))
        print("    %5s %5s %-8s %7s %7s  %-14s %s" % ("PID", "PPID", "STATE", "STATUS", "THREADS", "NAME", "MM"))
        for pid, proc in procs:
            parent = as_int(field(proc, "parent"))
            zombie = as_int(field(proc, "zombie")) != 0
            exiting = as_int(field(proc, "exiting")) != 0
            state = "zombie" if zombie else ("exiting" if exiting else "live")
            status = "%d" % as_int(field(proc, "status")) if (zombie or exiting) else "-"
            inner = mutex_data(field(proc, "inner"))
            space = option_arc(field(inner, "space"))
            mm = "Mm at %#x" % int(field(space, "mm").address) if space is not None else "(released)"
            print("  %s %5d %5s %-8s %7s %7d  %-14s %s" % (
                "*" if pid == mine else " ", pid, parent if parent else "-", state, status,
                as_int(field(inner, "live")), rust_str(field(proc, "name")), mm))
            threads = field(inner, "threads")
            vis = gdb.default_visualizer(threads)
            for _, w in (vis.children() if vis is not None else []):
                task = weak_payload(w)
                if task is None:
                    continue
                st = as_int(task["state"])
                print("          tid %-5d %-20s cpu %-3d %s" % (
                    as_int(task["tid"]), rust_str(task["name"]), as_int(task["cpu"]),
                    TASK_STATES[st] if st < 4 else st))
        pick = mine if mine is not None else (procs[0][0] if procs else None)
        if pick is not None:
            gdb.set_convenience_variable("ptlk_pid", pick)


def vma_line(vnode, mm_lock_seq):
    """One line of `vmas` for a mm::vma_lock::VmaNode: range, size, flags, lock."""
    v = field(vnode, "vma")
    start, end = as_int(field(v, "start")), as_int(field(v, "end"))
    flags = as_int(field(v, "flags"))
    names = [n for bit, n in ((1, "r"), (2, "w"), (4, "x"), (8, "thp"), (16, "hugetlb2M"), (32, "hugetlb1G")) if flags & bit]
    return "  %#014x-%#014x %8d KiB  %-10s lock: %s" % (
        start, end, (end - start) >> 10, " ".join(names) or "none", vma_lock_state(field(vnode, "lock"), mm_lock_seq))


class BreakOnPanic(gdb.Command):
    """ptlk-break-on-panic [hw]: stop in the kernel's panic handler and in the
oops path (hbreak with `hw`, needed under KVM where software breakpoints are
unreliable)."""

    def __init__(self):
        super().__init__("ptlk-break-on-panic", gdb.COMMAND_BREAKPOINTS)

    def invoke(self, arg, from_tty):
        hw = arg.strip() == "hw"
        for sym in ("kernel::diag::panic::panic", "arch::trap::oops"):
            try:
                gdb.Breakpoint(sym, type=gdb.BP_HARDWARE_BREAKPOINT if hw else gdb.BP_BREAKPOINT, internal=False)
            except (gdb.error, RuntimeError) as e:
                print("ptlk: could not break on %s: %s" % (sym, e))


def load_rust_printers():
    """The Rust toolchain's gdb pretty-printers (BTreeMap, Vec, String...)."""
    import os
    import subprocess
    repo = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    try:
        import sys
        root = subprocess.check_output(["rustc", "--print", "sysroot"], cwd=repo, text=True).strip()
        etc = os.path.join(root, "lib", "rustlib", "etc")
        if etc not in sys.path:
            sys.path.append(etc)
        import gdb_lookup
        gdb_lookup.register_printers(gdb.current_progspace())
    except Exception as e:  # noqa: BLE001 - any failure just means plainer output
        print("ptlk: Rust pretty-printers not loaded (%s); `vmas` prints raw values" % e)


load_rust_printers()
PtWalk()
PageCmd()
PtlCmd()
PercpuCmd()
VmasCmd()
ProcsCmd()
BreakOnPanic()
print("ptlk gdb helpers loaded: pt-walk, ptl, page, percpu, vmas, procs, ptlk-break-on-panic")
