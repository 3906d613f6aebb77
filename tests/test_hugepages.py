"""Weights in huge pages: the arena's slots, the kernel setting read, the choice between the
mapped file's pages and a copy, and logits that do not depend on where the weights lie."""
from __future__ import annotations

import numpy as np
import pytest

import neocore
from neocore import hugepages, weights
from neocore.checkpoint import Checkpoint
from neocore.hugepages import HUGE_PAGE, SLOT_ALIGN, HugePageArena

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


@pytest.mark.parametrize("setting, offered", [
    ("always [madvise] never\n", True), ("[always] madvise never\n", True),
    ("always madvise [never]\n", False), (None, False)])
def test_huge_pages_offered_follows_the_kernel_setting(monkeypatch, tmp_path, setting, offered):
    path = tmp_path / "enabled"
    if setting is not None:
        path.write_text(setting)
    monkeypatch.setattr(hugepages, "THP_SETTING", path)
    assert hugepages.huge_pages_offered() == offered


def test_huge_mapped_bytes_sums_what_the_kernel_reports():
    arena = HugePageArena(4 * HUGE_PAGE)
    arena.empty((4 * HUGE_PAGE,), np.uint8)[...] = 1  # backed, in huge pages where granted
    rollup = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(("AnonHugePages:", "FilePmdMapped:")):
                rollup += int(line.split()[1]) * 1024
    assert hugepages.huge_mapped_bytes(0, 1 << 64) == rollup
    assert 0 <= hugepages.huge_mapped_bytes(arena.start, arena.start + arena.nbytes) <= rollup


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


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
@pytest.mark.parametrize("file_in_huge_pages", [False, True])
def test_matrices_are_copied_only_when_the_file_is_not_in_huge_pages(monkeypatch, folders, dtype,
                                                                      file_in_huge_pages):
    plain = neocore.load(folders[dtype], huge_pages=False)
    assert plain.matrices_in_place == 2 + 6 * plain.config.num_layers
    assert plain.weight_pages == "4 KiB (huge pages not asked for)"
    monkeypatch.setattr(weights, "huge_pages_offered", lambda: True)
    asked = []
    monkeypatch.setattr(Checkpoint, "in_huge_pages",
                        lambda self, refs: asked.append(len(refs)) or file_in_huge_pages)
    model = neocore.load(folders[dtype])
    assert asked == [2 + 6 * model.config.num_layers]  # every matrix that could be used in place
    matrices = _matrices(model)
    if file_in_huge_pages:
        assert model.matrices_in_place == plain.matrices_in_place
        assert model.weight_pages == "2 MiB (the mapped file's, used in place)"
    else:
        assert model.matrices_in_place == 0
        assert model.weight_pages == "2 MiB where the kernel grants them (copied into memory at load)"
        assert matrices[0].ctypes.data % HUGE_PAGE == 0  # the first slot of the arena
        assert all(m.ctypes.data % SLOT_ALIGN == 0 and m.flags.c_contiguous and m.flags.writeable
                   for m in matrices)
    assert np.array_equal(model.logits(IDS), plain.logits(IDS))


def test_matrices_converted_at_load_go_into_the_arena(monkeypatch, reference_models):
    folder = reference_models("tiny").folder  # float32: every matrix is converted
    plain = neocore.load(folder, huge_pages=False)
    monkeypatch.setattr(weights, "huge_pages_offered", lambda: True)
    for dtype in ("bfloat16", "int8", "float32"):
        model = neocore.load(folder, dtype=dtype)
        matrices = _matrices(model)
        assert matrices[0].ctypes.data % HUGE_PAGE == 0
        assert all(m.ctypes.data % SLOT_ALIGN == 0 for m in matrices)
        if dtype == "bfloat16":
            assert np.array_equal(model.logits(IDS), plain.logits(IDS))


def test_default_load_asks_for_huge_pages_where_the_kernel_offers_them(folders):
    model = neocore.load(folders["bfloat16"])
    if hugepages.huge_pages_offered():
        assert model.weight_pages.startswith("2 MiB where the kernel grants them (")
    else:
        assert model.weight_pages == "4 KiB (this kernel offers no transparent huge pages)"
    assert np.array_equal(model.logits(IDS), neocore.load(folders["bfloat16"], huge_pages=False).logits(IDS))
    with pytest.raises(neocore.NeocoreError, match="huge_pages must be None, True or False"):
        neocore.load(folders["bfloat16"], huge_pages="no")


def test_past_the_copy_limit_only_a_load_asked_to_copies(monkeypatch, folders):
    monkeypatch.setattr(weights, "huge_pages_offered", lambda: True)
    monkeypatch.setattr(weights, "COPY_LIMIT", 0)
    asked = []
    monkeypatch.setattr(Checkpoint, "in_huge_pages", lambda self, refs: asked.append(len(refs)) or False)
    auto = neocore.load(folders["bfloat16"])
    assert asked == [] and auto.matrices_in_place == 2 + 6 * auto.config.num_layers
    assert auto.weight_pages == ("the mapped file's, as the page cache holds it (asked for 2 MiB; not copied: "
                                 "more than 0 MiB of matrices)")
    told = neocore.load(folders["bfloat16"], huge_pages=True)
    assert asked == [2 + 6 * told.config.num_layers] and told.matrices_in_place == 0
    assert np.array_equal(auto.logits(IDS), told.logits(IDS))
