"""Reading Hugging Face GPT-Neo weight files without torch.

Every format is reduced to the same thing: a name -> TensorRef table saying where each
tensor's bytes lie in which file. Bytes are reached through read-only memory maps, so a
tensor that needs no conversion is used in place, and one that does is converted and then
dropped from memory before the next (see Checkpoint.release).

PyTorch files are pickles; they are read with a restricted unpickler that admits only what
a state dict of tensors needs, so a checkpoint that tries to run code is refused, never run."""
from __future__ import annotations

import json
import mmap
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .config import CONFIG_LIMIT
from .errors import CheckpointError, shown
from .hugepages import advise_huge_pages, huge_mapped_bytes, populate
from .jsonfile import json_object, read_small_text

# numpy dtype used to view each stored dtype (bfloat16 is viewed as its raw 16 bits)
NUMPY_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F32BE": np.dtype(">f4"),
}


@dataclass(frozen=True)
class TensorRef:
    """Where a tensor's bytes lie: C-contiguous at offset in path. A tuple of paths holds the
    bytes split over whole files, in order; transposed means the file holds the [in, out]
    transpose of the [out, in] tensor named by shape."""
    name: str
    path: Path | tuple[Path, ...]
    offset: int
    dtype: str
    shape: tuple[int, ...]
    transposed: bool = False

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * np.dtype(NUMPY_DTYPES[self.dtype]).itemsize

    @property
    def mappable(self) -> bool:
        """Usable in place: one file, stored as the engine reads it."""
        return isinstance(self.path, Path) and not self.transposed and self.dtype != "F32BE"


def _read_pieces(paths: tuple[Path, ...], nbytes: int) -> bytes:
    """The first nbytes of the files joined, reading no further: a file that grew since its
    size was checked cannot make this read without end."""
    chunks = []
    for path in paths:
        with open(path, "rb") as f:
            chunks.append(f.read(nbytes - sum(map(len, chunks))))
    return b"".join(chunks)


class Checkpoint:
    """The tensors of one model, by name, and the memory maps that reach their bytes."""

    def __init__(self, tensors: dict[str, TensorRef], description: str,
                 config: dict[str, Any] | None = None):
        self.tensors = tensors
        self.description = description  # e.g. the file it came from, for error messages
        self.config = config  # a config.json-style dict, for formats that carry none
        self._maps: dict[Path, mmap.mmap] = {}
        self.advise_huge_pages = False  # set before the first array(): files mapped MADV_HUGEPAGE

    def array(self, ref: TensorRef) -> np.ndarray:
        """The tensor as [out, in]: a read-only view straight from the mapped file, or, for a
        tensor split over files, their bytes joined."""
        count = prod(ref.shape)
        dtype = NUMPY_DTYPES[ref.dtype]
        if isinstance(ref.path, tuple):
            try:
                data = np.frombuffer(_read_pieces(ref.path, ref.nbytes), dtype=dtype, count=count)
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{ref.path[0]}: cannot read ({exc})") from None
        else:
            data = np.frombuffer(self._map(ref.path), dtype=dtype, count=count, offset=ref.offset)
        return data.reshape(ref.shape[::-1]).T if ref.transposed else data.reshape(ref.shape)

    def _map(self, path: Path) -> mmap.mmap:
        mm = self._maps.get(path)
        if mm is None:
            try:
                with open(path, "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                if self.advise_huge_pages:
                    advise_huge_pages(mm)
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{path}: cannot map the file ({exc})") from None
            self._maps[path] = mm
        return mm

    def in_huge_pages(self, refs: list[TensorRef]) -> bool:
        """Whether these tensors (mappable ones) are mapped in 2 MiB pages, which they are where
        the page cache holds the file in 2 MiB folios (as it may when a mapping advised
        MADV_HUGEPAGE reads it from disk, not when a write or a read() put it there). Faults
        them in to find out: the first decode step would fault them anyway."""
        maps = {}
        for ref in refs:
            mm = self._map(ref.path)
            start = ref.offset - ref.offset % mmap.PAGESIZE
            if not populate(mm, start, ref.offset + ref.nbytes - start):
                return False
            maps[ref.path] = np.frombuffer(mm, dtype=np.uint8)
        huge = sum(huge_mapped_bytes(m.ctypes.data, m.ctypes.data + m.nbytes) for m in maps.values())
        return huge >= 0.9 * sum(ref.nbytes for ref in refs)  # short of all: a file's ends lie in small pages

    def release(self, ref: TensorRef) -> None:
        """Drops the tensor's pages from this process once it has been converted, so that
        loading never holds a converted copy and the whole source file at once."""
        mm = self._maps.get(ref.path) if isinstance(ref.path, Path) else None
        if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = ref.offset - ref.offset % mmap.PAGESIZE
        end = min(ref.offset + ref.nbytes, len(mm))
        if end > start:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)


def _check_extent(path: Path, name: str, offset: int, nbytes: int, file_size: int) -> None:
    if offset < 0 or offset + nbytes > file_size:
        raise CheckpointError(f"{path}: truncated or corrupt: tensor {name!r} needs bytes "
                              f"{offset}..{offset + nbytes} but the file has {file_size}")


# ---- safetensors ---------------------------------------------------------------------------

SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024
# a weight has 1 or 2; millions (a few megabytes of header) made the byte count's product run
# for hours, its partial products for gigabytes
MAX_DIMENSIONS = 8


def read_safetensors(path: Path) -> dict[str, TensorRef]:
    """Parses the header: 8-byte little-endian length, then JSON {name: {dtype, shape, data_offsets}}."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated: too short to be a safetensors file")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(size - 8, SAFETENSORS_MAX_HEADER):
                raise CheckpointError(f"{path}: truncated or not safetensors: header length "
                                      f"{header_len} does not fit in a file of {size} bytes")
            header = json.loads(f.read(header_len))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (ValueError, RecursionError):  # not JSON, not UTF-8, an integer past 4300 digits, too deep
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON, or nested too deeply)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            if not isinstance(dtype, str) or len(shape) > MAX_DIMENSIONS \
                    or not all(isinstance(d, int) and d >= 0 for d in shape) \
                    or not isinstance(begin, int) \
                    or not isinstance(end, int) or begin < 0 or end < begin:
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors entry for {name!r}") from None
        if dtype not in NUMPY_DTYPES or dtype == "F32BE":  # F32BE: the Java port's files, not a safetensors dtype
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        ref = TensorRef(name, path, data_start + begin, dtype, shape)
        if end - begin != ref.nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} holds {shown(end - begin)} bytes, "
                                  f"but {dtype}{shown(list(shape))} needs {shown(ref.nbytes)}")
        _check_extent(path, name, ref.offset, ref.nbytes, size)
        tensors[name] = ref
    # as the format requires (and its own reader checks): no two tensors share a byte
    spans = sorted((ref.offset, ref.offset + ref.nbytes, name) for name, ref in tensors.items() if ref.nbytes)
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise CheckpointError(f"{path}: tensors {first!r} and {second!r} overlap")
    return tensors


SafetensorsEntry = tuple[str, str, tuple[int, ...], Callable[[], np.ndarray]]  # name, dtype, shape, data


def write_safetensors(path: Path, entries: list[SafetensorsEntry], metadata: dict[str, str] | None = None) -> None:
    """Writes tensors one at a time (each made only when its turn comes), so that a model
    never has to sit in memory whole; offsets are padded as the format asks (8-byte header).
    The file is written beside path and then renamed over it: a path that is a link to the
    file being read (a converted folder linked to its source) is replaced, never truncated
    while the tensors are still read from it."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, dtype, shape, _ in entries:
        size = prod(shape) * np.dtype(NUMPY_DTYPES[dtype]).itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, dtype, shape, make in entries:
                data = np.ascontiguousarray(make(), dtype=NUMPY_DTYPES[dtype])
                if data.shape != tuple(shape):
                    raise ValueError(f"{name}: made shape {data.shape}, declared {shape}")
                f.write(data.tobytes())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


# ---- PyTorch pickles -----------------------------------------------------------------------

@dataclass(frozen=True)
class _StorageType:
    """Stands in for torch.FloatStorage and friends: only its dtype matters."""
    dtype: str


@dataclass(frozen=True)
class _Storage:
    path: Path
    offset: int
    dtype: str
    numel: int


STORAGE_TYPES = {
    "DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
    "ByteStorage": "U8", "BoolStorage": "BOOL",
}

# (path, key, dtype, numel) -> (file, byte offset) of that storage's bytes
StorageLocator = Callable[[str, str, int], tuple[Path, int]]


def _rebuild_tensor(storage: _Storage, storage_offset: int, size: tuple, stride: tuple,
                    *_ignored: Any) -> TensorRef:
    """torch._utils._rebuild_tensor_v2, reduced to where the bytes are. Needs C order."""
    def whole_numbers(values: Any) -> bool:  # checked before any is printed or multiplied
        return isinstance(values, tuple) and len(values) <= MAX_DIMENSIONS and all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in values)
    if not isinstance(storage, _Storage) or isinstance(storage_offset, bool) or not isinstance(storage_offset, int) \
            or storage_offset < 0 or not whole_numbers(size) or not whole_numbers(stride):
        raise pickle.UnpicklingError("a tensor whose storage, offset, size or stride is not what torch writes")
    shape = tuple(size)
    expected, step = [], 1
    for d in reversed(shape):
        expected.append(step)
        step *= d
    if prod(shape) > 1 and stride != tuple(reversed(expected)):
        raise pickle.UnpicklingError(f"tensor of shape {shape} is not contiguous (stride {stride})")
    if storage_offset + prod(shape) > storage.numel:
        raise pickle.UnpicklingError("tensor runs past the end of its storage")
    itemsize = np.dtype(NUMPY_DTYPES[storage.dtype]).itemsize
    return TensorRef("", storage.path, storage.offset + storage_offset * itemsize, storage.dtype, shape)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any, state: Any = None) -> TensorRef:
    """torch._utils._rebuild_parameter(_with_state): a Parameter is its tensor. Hooks and
    state are refused unless empty, as torch.load(weights_only=True) would not restore them."""
    if not isinstance(data, TensorRef):
        raise pickle.UnpicklingError("a Parameter that does not hold a tensor")
    if backward_hooks or state:
        raise pickle.UnpicklingError("a Parameter carrying hooks or attributes (only plain tensors are read)")
    return data


SCALARS = (str, bytes, int, float, bool, type(None))


def _flat(value: Any) -> bool:
    """A scalar, or a tuple or frozenset of scalars: hashed in time linear in its size."""
    return isinstance(value, SCALARS) or isinstance(value, (tuple, frozenset)) and all(
        isinstance(v, SCALARS) for v in value)


def _empty_ordered_dict(*args: Any) -> OrderedDict:
    """OrderedDict as torch's pickles make it, empty (its items come by SETITEMS, whose keys are
    checked): pairs given here would be hashed unchecked."""
    if args:
        raise pickle.UnpicklingError("an OrderedDict made with items (torch makes it empty)")
    return OrderedDict()


def _refuse(module: str, name: str) -> None:
    raise pickle.UnpicklingError(f"refused to load {module}.{name}: a weight file may hold only "
                                 f"tensors and dicts (the pickle tries to run code)")


def _plain_name(name: str) -> bool:
    """A file name with no directory in it: what torch's storage keys and HF's shard names are."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


class _RestrictedUnpickler(pickle._Unpickler):
    """Admits OrderedDict, torch's tensor and Parameter rebuild functions and storage types;
    nothing else. The pure-Python unpickler, because the C one sizes its memo by the indices
    the pickle names: one corrupt PUT index made it allocate and clear gigabytes (a state
    dict's pickle is a few kB, so the speed does not matter)."""

    def __init__(self, data: bytes, locate: StorageLocator):
        import io
        super().__init__(io.BytesIO(data))
        self._locate = locate
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return _empty_ordered_dict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module == "torch" and name in STORAGE_TYPES:
            return _StorageType(STORAGE_TYPES[name])
        _refuse(module, name)

    def load_build(self) -> None:
        """BUILD sets an object's state: allowed on the state dict (torch stores its _metadata
        so), refused on what stands for tensors and storages, which it could repoint."""
        if isinstance(self.stack[-2], (TensorRef, _Storage, _StorageType)):
            raise pickle.UnpicklingError("the pickle rewrites a tensor's or a storage's fields")
        super().load_build()

    # A dict key or a set element is hashed, in C, where no signal is seen: a tuple built of
    # itself 80 times over (a few hundred bytes) took for ever and ignored Ctrl-C and SIGTERM.
    # Scalars, and tuples or frozensets of scalars, hash in time linear in their size (a state
    # dict's keys are names; a checkpoint may wrap it with other plain values): nothing nested.
    def _check_hashed(self, values: list) -> None:
        for value in values:
            if not _flat(value):
                raise pickle.UnpicklingError(f"a dict key or set element of type {type(value).__name__} "
                                             f"holding containers (a checkpoint's keys are names)")

    def load_setitem(self) -> None:
        self._check_hashed([self.stack[-2]])
        super().load_setitem()

    def load_setitems(self) -> None:
        self._check_hashed(self.stack[0::2])  # the key-value pairs above the mark
        super().load_setitems()

    def load_dict(self) -> None:
        self._check_hashed(self.stack[0::2])
        super().load_dict()

    def load_additems(self) -> None:
        self._check_hashed(self.stack)  # the elements above the mark
        super().load_additems()

    def load_frozenset(self) -> None:
        self._check_hashed(self.stack)
        super().load_frozenset()

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.DICT[0]] = load_dict
    dispatch[pickle.ADDITEMS[0]] = load_additems
    dispatch[pickle.FROZENSET[0]] = load_frozenset

    def persistent_load(self, pid: Any) -> _Storage:
        # torch writes ("storage", storage_type, key, location, numel)
        # (its type only in the message: the repr of a hostile nested tuple never ends)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[4], int) and pid[4] >= 0):
            raise pickle.UnpicklingError(f"unexpected persistent id (a {type(pid).__name__})")
        _, storage_type, key, _location, numel = pid
        if not _plain_name(key):  # only a str is turned into text (see above)
            what = shown(key) if isinstance(key, str) else f"of type {type(key).__name__}"
            raise pickle.UnpicklingError(f"storage key {what} is not a plain file name")
        if key not in self._storages:
            path, offset = self._locate(key, storage_type.dtype, numel)
            self._storages[key] = _Storage(path, offset, storage_type.dtype, numel)
        return self._storages[key]


def unpickle_state_dict(data: bytes, source: Path, locate: StorageLocator) -> dict[str, TensorRef]:
    """Reads a torch.save()d state dict's data.pkl; non-tensor entries are left out."""
    try:
        state = _RestrictedUnpickler(data, locate).load()
    except CheckpointError:
        raise
    except pickle.UnpicklingError as exc:  # ours say what was refused; the pickle module's what broke
        raise CheckpointError(f"{source}: {exc}") from None
    except Exception as exc:  # any malformed or hostile pickle ends here, nothing having run
        raise CheckpointError(f"{source}: corrupt data.pkl ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: expected a state dict, found {type(state).__name__}")
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return {name: TensorRef(name, ref.path, ref.offset, ref.dtype, ref.shape)
            for name, ref in state.items() if isinstance(ref, TensorRef)}


def _zip_member_offset(f, info: zipfile.ZipInfo) -> int:
    """Where a stored member's bytes start: after its local header, name and extra field."""
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise CheckpointError(f"corrupt zip local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


MAX_PICKLE_BYTES = 64 << 20  # a zip member read into memory (data.pkl, byteorder): no bombs
# What zipfile raises on a damaged archive (a garbled name is a UnicodeDecodeError, a ValueError)
ZIP_ERRORS = (zipfile.BadZipFile, OSError, EOFError, ValueError, struct.error, NotImplementedError)


def read_torch_zip(path: Path) -> dict[str, TensorRef]:
    """A torch.save() zip: <top>/data.pkl plus one stored (uncompressed) <top>/data/<key> per storage."""
    try:
        size = path.stat().st_size
        zf = zipfile.ZipFile(path)
    except ZIP_ERRORS as exc:
        raise CheckpointError(f"{path}: not a readable zip-format PyTorch checkpoint "
                              f"(truncated, corrupt or legacy format: {exc})") from None
    with zf, open(path, "rb") as f:
        pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: no <name>/data.pkl inside: not a PyTorch checkpoint")
        top = pickles[0][: -len("data.pkl")]

        def locate(key: str, dtype: str, numel: int) -> tuple[Path, int]:
            member = f"{top}data/{key}"
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise CheckpointError(f"{path}: storage {member} is missing") from None
            if info.compress_type != zipfile.ZIP_STORED:
                raise CheckpointError(f"{path}: storage {member} is compressed; cannot map it")
            offset = _zip_member_offset(f, info)
            nbytes = numel * np.dtype(NUMPY_DTYPES[dtype]).itemsize
            if info.file_size < nbytes:
                raise CheckpointError(f"{path}: storage {member} is shorter than its tensors")
            _check_extent(path, member, offset, nbytes, size)
            return path, offset

        for member in (pickles[0], top + "byteorder"):
            if member in zf.namelist() and zf.getinfo(member).file_size > MAX_PICKLE_BYTES:
                raise CheckpointError(f"{path}: {member} would inflate to {zf.getinfo(member).file_size} bytes; "
                                      f"a state dict's pickle is a few kB")
        try:
            data = zf.read(pickles[0])
            byteorder = zf.read(top + "byteorder").strip() if top + "byteorder" in zf.namelist() else b"little"
        except ZIP_ERRORS as exc:
            raise CheckpointError(f"{path}: corrupt zip member ({exc})") from None
        if byteorder != b"little":
            raise CheckpointError(f"{path}: big-endian PyTorch checkpoints are not supported")
        return unpickle_state_dict(data, path, locate)


# ---- folders -------------------------------------------------------------------------------

# What neocore convert --dtype int8 writes: not model.safetensors, so that transformers, which
# would read the int8 values as weights, finds no weights in the folder instead.
NEOCORE_INT8_FILE = "neocore-int8.safetensors"
SINGLE_FILE_READERS: dict[str, Callable[[Path], dict[str, TensorRef]]] = {
    "model.safetensors": read_safetensors,
    "pytorch_model.bin": read_torch_zip,
    NEOCORE_INT8_FILE: read_safetensors,
}


def _read_sharded(index: Path, reader: Callable[[Path], dict[str, TensorRef]]) -> dict[str, TensorRef]:
    weight_map = json_object(read_small_text(index, CONFIG_LIMIT, CheckpointError), index, CheckpointError,
                             "not a valid index file").get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: not a valid index file (needs a 'weight_map' object)")
    outside = [shard for shard in weight_map.values() if not _plain_name(shard)]
    if outside:
        raise CheckpointError(f"{index}: shard {shown(outside[0])} is not a file name in the model folder")
    tensors: dict[str, TensorRef] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index.parent / shard
        if not shard_path.is_file():
            what = "not a regular file" if os.path.lexists(shard_path) else "missing"
            raise CheckpointError(f"{index}: names shard {shard}, which is {what}")
        tensors.update(reader(shard_path))
    for name, shard in weight_map.items():
        if name not in tensors:
            raise CheckpointError(f"{index.parent / shard}: tensor {name!r} listed in {index.name} is missing")
    return tensors


def find_unzipped_pickle(folder: Path) -> Path | None:
    """data.pkl of an unzipped torch.save() archive: in the folder or one folder down."""
    candidates = [folder / "data.pkl"] + sorted(folder.glob("*/data.pkl"))
    return next((c for c in candidates if c.is_file()), None)


def read_unzipped(pickle_path: Path) -> dict[str, TensorRef]:
    """An unzipped pytorch_model.bin: data.pkl beside data/<key>, one file per storage."""
    top = pickle_path.parent

    def locate(key: str, dtype: str, numel: int) -> tuple[Path, int]:
        path = top / "data" / key
        if not path.is_file():
            raise CheckpointError(f"{path}: storage file is missing")
        nbytes = numel * np.dtype(NUMPY_DTYPES[dtype]).itemsize
        if path.stat().st_size < nbytes:
            raise CheckpointError(f"{path}: truncated: holds {path.stat().st_size} bytes, "
                                  f"its storage needs {nbytes}")
        return path, 0

    try:
        size = pickle_path.stat().st_size
        if size > MAX_PICKLE_BYTES:
            raise CheckpointError(f"{pickle_path}: {size} bytes, too large for the pickle of a state dict")
        data = pickle_path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{pickle_path}: cannot read ({exc.strerror})") from None
    return unpickle_state_dict(data, pickle_path, locate)


def open_checkpoint(folder: Path) -> Checkpoint:
    """Finds the weights in a model folder, whatever their format (safetensors preferred)."""
    for filename, reader in SINGLE_FILE_READERS.items():
        single, index = folder / filename, folder / f"{filename}.index.json"
        if single.is_file():
            return Checkpoint(reader(single), str(single))
        if index.is_file():
            return Checkpoint(_read_sharded(index, reader), str(index))
    unzipped = find_unzipped_pickle(folder)
    if unzipped is not None:
        return Checkpoint(read_unzipped(unzipped), str(unzipped))
    from .java_port import is_java_port_folder, read_java_port
    if is_java_port_folder(folder):
        tensors, config = read_java_port(folder)
        return Checkpoint(tensors, str(folder), config)
    for filename in SINGLE_FILE_READERS:  # named so, but a folder, a device, a dangling link
        for path in (folder / filename, folder / f"{filename}.index.json"):
            if os.path.lexists(path):
                raise CheckpointError(f"{path}: not a regular file, and no other weights found")
    looked_for = ", ".join(f"{n}, {n}.index.json" for n in SINGLE_FILE_READERS)
    raise CheckpointError(f"{folder}: no weights found (looked for {looked_for}, an unzipped "
                          f"checkpoint's data.pkl + data/, and the Java port's input/ + decoderN/ folders)")
