"""Weight matrices in memory that the kernel backs with transparent huge pages.

Decode streams every weight once a token. In 4 KiB pages that stream takes a TLB miss every
64 cache lines and a hardware prefetcher that stops at every page's end; in 2 MiB pages the
same kernels stream faster (AMD EPYC Zen 4, 125M, bf16, whole decode steps, both layouts in
one process, alternating: 1.36-1.42x at 1 thread, 1.11-1.16x at 2; see BENCHMARKS.md). A mapped
checkpoint lies in whatever pages the page cache holds it in: 2 MiB ones where a mapping
advised MADV_HUGEPAGE read it from disk (on kernels whose file system caches large folios),
often 4 KiB ones where a write or a read() put it there. A HugePageArena is the other way: one
anonymous mapping advised MADV_HUGEPAGE that the matrices are copied into at load, at the
price of the copy and of one private copy per process where the file's pages are shared."""
from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# Linux 6.8 on: the 2 MiB size's own setting, "inherit" (the line above's) unless set
THP_2M_SETTING = Path("/sys/kernel/mm/transparent_hugepage/hugepages-2048kB/enabled")
SMAPS = Path("/proc/self/smaps")
HUGE_PAGE = 2 << 20
SLOT_ALIGN = 4096  # every matrix starts on a page of its own
# Past this many bytes of matrices, a load that was not asked to (huge_pages=None) does not
# copy them: the copy's cost grows with them and the gain measured fell (Zen 4, the file
# cached in 4 KiB pages, decode at 1 / 2 threads: 125M bf16 1.42x / 1.11x for 0.16-0.68 s of
# load; 350M 1.07x / 1.02x for 0.6-1.9 s; 1.3B 1.09x / 1.05x for 1.4-7.5 s).
COPY_LIMIT = 512 << 20
MADV_POPULATE_READ = 22


def huge_pages_offered() -> bool:
    """Whether this kernel backs an anonymous mapping with huge pages when asked (THP in
    "always" or "madvise" mode); where it does not, a copy would buy nothing."""
    setting = ""
    for path in (THP_2M_SETTING, THP_SETTING):
        try:
            setting = path.read_text()
        except OSError:
            continue
        if "[inherit]" not in setting:
            break
    return hasattr(mmap, "MADV_HUGEPAGE") and ("[always]" in setting or "[madvise]" in setting)


def advise_huge_pages(mm: mmap.mmap, start: int = 0, length: int | None = None) -> None:
    """Asks for huge pages: advice, which a kernel that refuses it leaves the mapping without."""
    try:
        mm.madvise(mmap.MADV_HUGEPAGE, start, len(mm) - start if length is None else length)
    except (OSError, ValueError):
        pass


def populate(mm: mmap.mmap, start: int, length: int) -> bool:
    """Faults [start, start + length) of a mapping in now (MADV_POPULATE_READ, Linux 5.14; Python's
    mmap module does not name it); False where the kernel cannot."""
    try:
        mm.madvise(MADV_POPULATE_READ, start, length)
    except (OSError, ValueError):
        return False
    return True


def huge_mapped_bytes(start: int, end: int) -> int:
    """Bytes that the mappings overlapping addresses [start, end) map in 2 MiB pages (file and
    anonymous ones), from /proc/self/smaps."""
    total, overlaps = 0, False
    try:
        with open(SMAPS) as f:
            for line in f:
                head = line.split(maxsplit=1)[0]
                if "-" in head and not head.endswith(":"):  # a mapping's first line: its range
                    low, high = (int(a, 16) for a in head.split("-"))
                    overlaps = low < end and start < high
                elif overlaps and head in ("FilePmdMapped:", "AnonHugePages:", "ShmemPmdMapped:"):
                    total += int(line.split()[1]) * 1024
    except OSError:
        return 0
    return total


def slot_bytes(nbytes: int) -> int:
    return -(-nbytes // SLOT_ALIGN) * SLOT_ALIGN


class HugePageArena:
    """One private anonymous mapping, 2 MiB aligned and advised MADV_HUGEPAGE, handed out in
    page-aligned slots; pages are backed as they are first written. The arrays it hands out
    keep the mapping alive."""

    def __init__(self, nbytes: int):
        self._map = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        whole = np.frombuffer(self._map, dtype=np.uint8)
        skip = -whole.ctypes.data % HUGE_PAGE
        advise_huge_pages(self._map, skip, nbytes)
        self._bytes = whole[skip:skip + nbytes]
        self._used = 0

    @classmethod
    def create(cls, nbytes: int) -> HugePageArena | None:
        """An arena, or None where the address space cannot take it (an overcommit limit, a
        ulimit -v): the caller then allocates as before."""
        try:
            return cls(nbytes)
        except OSError:
            return None

    @property
    def start(self) -> int:
        """The address of the first slot (a multiple of HUGE_PAGE)."""
        return self._bytes.ctypes.data

    @property
    def nbytes(self) -> int:
        return self._bytes.nbytes

    def empty(self, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        """A C-contiguous array in the next slot (contents undefined until written)."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if self._used + nbytes > self.nbytes:
            raise MemoryError(f"the weight arena holds {self.nbytes} bytes; {self._used + nbytes} asked")
        slot = self._bytes[self._used:self._used + nbytes]
        self._used += slot_bytes(nbytes)
        return slot.view(dtype).reshape(shape)

    def copy(self, array: np.ndarray) -> np.ndarray:
        """array copied into the next slot, C-contiguous."""
        out = self.empty(array.shape, array.dtype)
        np.copyto(out, array)
        return out
