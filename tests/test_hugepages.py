"""Weights in huge pages: the arena's slots, the kernel settings read, /proc/self/smaps read,
the choice between the mapped file's pages and a copy, and logits that do not depend on where
the weights lie."""
from __future__ import annotations

import mmap

import numpy as np
import pytest

import neocore
from neocore import hugepages, weights
from neocore.checkpoint import Checkpoint
from neocore.hugepages import HUGE_PAGE, SLOT_ALIGN, HugePageArena

pytestmark = pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="transparent huge pages are Linux's")
IDS = [5, 17, 900, 3, 44, 1002, 7, 0, 61, 250, 8, 9]


def test_arena_hands_out_aligned_slots_and_refuses_past_its_size():
    arena = HugePageArena(2 * SLOT_ALIGN + 100)
    assert arena.start % HUGE_PAGE == 0
    a = arena.empty((3, 5), np.float32)
    assert a.ctypes.data == arena.start and a.flags.c_contiguous and a.shape == (3, 5)
    source = np.arange(24, dtype=np.int16).reshape(4, 6).T  # not contiguous: copied into C order
    b = arena.copy(source)
    assert b.ctypes.data == arena.start + SLOT_ALIGN and b.flags.c_contiguous
    assert np.array_equal(b, source)
    a[...] = 7  # slots do not overlap
    assert np.array_equal(b, source)
    arena.empty((100,), np.uint8)
    with pytest.raises(MemoryError):
        arena.empty((1,), np.uint8)
    assert HugePageArena.create(1 << 62) is None  # more than any address space: no arena, no error


@pytest.mark.parametrize("two_mib, whole, offered", [
    (None, "always [madvise] never\n", True), (None, "[always] madvise never\n", True),
    (None, "always madvise [never]\n", False), (None, None, False),
    ("always inherit madvise [never]\n", "[always] madvise never\n", False),  # the 2 MiB size's own wins
    ("always [inherit] madvise never\n", "always [madvise] never\n", True),
    ("[always] inherit madvise never\n", "always madvise [never]\n", True)])
def test_huge_pages_offered_follows_the_kernel_settings(monkeypatch, tmp_path, two_mib, whole, offered):
    for name, setting in (("THP_2M_SETTING", two_mib), ("THP_SETTING", whole)):
        path = tmp_path / name
        if setting is not None:
            path.write_text(setting)
        monkeypatch.setattr(hugepages, name, path)
    assert hugepages.huge_pages_offered() == offered


SMAPS = """\
00400000-00600000 r-xp 00000000 fd:01 1234   /usr/bin/python3-dash-name
Size:               2048 kB
AnonHugePages:      2048 kB
VmFlags: rd ex mr mw me
7f0000000000-7f0000800000 r--s 00000000 fd:01 99   /models/a-b/model.safetensors
Size:               8192 kB
FilePmdMapped:      4096 kB
AnonHugePages:         0 kB
VmFlags: rd sh mr mw me hg
7f0000800000-7f0001000000 rw-p 00000000 00:00 0
Size:               8192 kB
AnonHugePages:      6144 kB
ShmemPmdMapped:     2048 kB
"""


def test_huge_mapped_bytes_sums_the_mappings_that_overlap(monkeypatch, tmp_path):
    (tmp_path / "smaps").write_text(SMAPS)
    monkeypatch.setattr(hugepages, "SMAPS", tmp_path / "smaps")
    assert hugepages.huge_mapped_bytes(0x7F0000000000, 0x7F0000000001) == 4096 << 10
    assert hugepages.huge_mapped_bytes(0x7F00007FFFFF, 0x7F0000800001) == (4096 + 6144 + 2048) << 10
    assert hugepages.huge_mapped_bytes(0x00600000, 0x7F0000000000) == 0  # the gap between
    assert hugepages.huge_mapped_bytes(0, 1 << 64) == (2048 + 4096 + 6144 + 2048) << 10
    monkeypatch.setattr(hugepages, "SMAPS", tmp_path / "missing")
    assert hugepages.huge_mapped_bytes(0, 1 << 64) == 0


def test_in_huge_pages_faults_the_tensors_in_and_weighs_what_smaps_says(monkeypatch, folders):
    from neocore.checkpoint import open_checkpoint
    checkpoint = open_checkpoint(folders["bfloat16"])
    refs = [ref for ref in checkpoint.tensors.values() if ref.name.endswith("wte.weight")]
    seen = []
    monkeypatch.setattr("neocore.checkpoint.huge_mapped_bytes", lambda start, end: seen.append((start, end)) or huge)
    mm = checkpoint._map(refs[0].path)
    if not hugepages.populate(mm, 0, mmap.PAGESIZE):  # a kernel before 5.14: found wanting, unread
        huge = refs[0].nbytes
        assert not checkpoint.in_huge_pages(refs) and seen == []
        return
    for huge, found in ((refs[0].nbytes, True), (refs[0].nbytes // 2, False)):
        assert checkpoint.in_huge_pages(refs) == found
    start = np.frombuffer(mm, np.uint8).ctypes.data
    assert seen == [(start, start + len(mm))] * 2  # the file's whole mapping
    resident = 0
    with open("/proc/self/smaps") as f:  # the kernel's word that populate faulted the tensor in
        lines = iter(f)
        for line in lines:
            head = line.split(maxsplit=1)[0]
            if head == f"{start:x}-{start + len(mm) + (-len(mm) % mmap.PAGESIZE):x}":
                resident = next(int(ln.split()[1]) << 10 for ln in lines if ln.startswith("Rss:"))
    assert resident >= refs[0].nbytes


def _matrices(model) -> list[np.ndarray]:
    found = []
    for group in [model._weights, *model._weights["layers"]]:
        for value in group.values():
            if isinstance(value, weights.Int8Matrix):
                found += [value.values, value.scales]
            elif isinstance(value, np.ndarray) and value.ndim == 2:
                found.append(value)
    return found


@pytest.fixture(scope="module")
def folders(reference_models, tmp_path_factory):
    """The tiny model converted to bf16 and to int8 (matrices usable in place)."""
    from neocore.convert import convert
    src = reference_models("tiny").folder
    out = tmp_path_factory.mktemp("pages")
    return {"bfloat16": convert(src, out / "bf16"), "int8": convert(src, out / "int8", dtype="int8")}


@pytest.fixture
def offered(monkeypatch):
    """The kernel offers huge pages, and in_huge_pages answers as told; asked: its calls' tensors."""
    monkeypatch.setattr(weights, "huge_pages_offered", lambda: True)
    state = {"answer": False, "asked": []}

    def in_huge_pages(self, refs):
        state["asked"].append([ref.name for ref in refs])
        return state["answer"]
    monkeypatch.setattr(Checkpoint, "in_huge_pages", in_huge_pages)
    return state


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
@pytest.mark.parametrize("file_in_huge_pages", [False, True])
def test_matrices_are_copied_only_when_the_file_is_not_in_huge_pages(offered, folders, dtype, file_in_huge_pages):
    plain = neocore.load(folders[dtype], huge_pages=False)
    assert plain.matrices_in_place == 2 + 6 * plain.config.num_layers
    assert plain.weight_pages == "the mapped file's, as the page cache holds it (huge pages not asked for)"
    offered["answer"] = file_in_huge_pages
    model = neocore.load(folders[dtype])
    assert offered["asked"] == [["transformer.wte.weight"]]  # the largest stands for the file
    matrices = _matrices(model)
    if file_in_huge_pages:
        assert model.matrices_in_place == plain.matrices_in_place
        assert model.weight_pages == "2 MiB (the mapped file's, found in them)"
    else:
        assert model.matrices_in_place == 0
        assert model.weight_pages == "2 MiB where the kernel grants them (copied into memory at load)"
        assert matrices[0].ctypes.data % HUGE_PAGE == 0  # the first slot of the arena
        assert all(m.ctypes.data % SLOT_ALIGN == 0 and m.flags.c_contiguous and m.flags.writeable
                   for m in matrices)
    assert np.array_equal(model.logits(IDS), plain.logits(IDS))


def test_matrices_converted_at_load_go_into_the_arena(offered, reference_models, folders):
    offered["answer"] = True  # whatever the file's pages: these matrices are converted
    cases = [(reference_models("tiny").folder, "bfloat16"), (reference_models("tiny").folder, "int8"),
             (folders["bfloat16"], "float32")]
    for folder, dtype in cases:
        model = neocore.load(folder, dtype=dtype)
        matrices = _matrices(model)
        assert model.matrices_in_place == 0 and offered["asked"] == []
        assert matrices[0].ctypes.data % HUGE_PAGE == 0
        assert all(m.ctypes.data % SLOT_ALIGN == 0 for m in matrices)
        assert np.array_equal(model.logits(IDS), neocore.load(folder, dtype=dtype, huge_pages=False).logits(IDS))


def test_past_the_copy_limit_only_a_load_asked_to_copies(monkeypatch, offered, folders):
    monkeypatch.setattr(weights, "COPY_LIMIT", 0)
    auto = neocore.load(folders["bfloat16"])
    assert offered["asked"] == [] and auto.matrices_in_place == 2 + 6 * auto.config.num_layers
    assert auto.weight_pages == ("the mapped file's, as the page cache holds it (asked for 2 MiB; not copied: "
                                 "more than 0 MiB of matrices)")
    told = neocore.load(folders["bfloat16"], huge_pages=True)
    assert offered["asked"] == [["transformer.wte.weight"]] and told.matrices_in_place == 0
    assert np.array_equal(auto.logits(IDS), told.logits(IDS))


def test_without_room_for_an_arena_the_load_goes_on(monkeypatch, offered, folders, reference_models):
    monkeypatch.setattr(HugePageArena, "create", classmethod(lambda cls, nbytes: None))
    mapped = neocore.load(folders["bfloat16"])  # not in huge pages, and nowhere to copy it
    assert mapped.matrices_in_place == 2 + 6 * mapped.config.num_layers
    assert mapped.weight_pages == ("the mapped file's, as the page cache holds it "
                                   "(no address space for a huge-page arena)")
    converted = neocore.load(reference_models("tiny").folder)
    assert converted.weight_pages == "in memory (no address space for a huge-page arena)"
    assert np.array_equal(mapped.logits(IDS), converted.logits(IDS))


def test_default_load_asks_for_huge_pages_where_the_kernel_offers_them(folders, tmp_path):
    model = neocore.load(folders["bfloat16"])
    if hugepages.huge_pages_offered():
        assert model.weight_pages in ("2 MiB where the kernel grants them (copied into memory at load)",
                                      "2 MiB (the mapped file's, found in them)")
    else:
        assert model.weight_pages == ("the mapped file's, as the page cache holds it "
                                      "(this kernel offers no transparent huge pages)")
    assert np.array_equal(model.logits(IDS), neocore.load(folders["bfloat16"], huge_pages=False).logits(IDS))
    for folder in (folders["bfloat16"], tmp_path / "missing"):  # checked before the folder is looked for
        with pytest.raises(neocore.NeocoreError, match="huge_pages must be None, True or False"):
            neocore.load(folder, huge_pages="no")
