"""The multi-query KV cache of fast decoding (one K and one V head per layer).

Two storages, chosen by ``page_size``:

* **contiguous** (``page_size=None``): ``k``, ``v`` ``[n_layers, batch, max_len, head_dim]``;
  token ``i`` of sequence ``b`` lives at ``k[layer, b, i]``.
* **paged** (``page_size`` given): pools ``k``, ``v`` ``[n_layers, num_pages, page_size,
  head_dim]`` and an int32 ``page_table`` ``[batch, ceil(max_len / page_size)]``; token ``i``
  of sequence ``b`` lives at ``k[layer, page_table[b, i // page_size], i % page_size]``.
  Pages are taken from a free list when an ``append`` / ``advance`` / ``reserve`` first
  needs them (unused table entries are -1) and given back by ``reset``. Every layer uses
  the same page table (the pools have one slice per layer).

``lengths`` (int32 ``[batch]`` on the cache's device) counts the tokens cached per sequence.
A host copy of it (and of the page table) is kept in step by this class, so that checks
never read the device; change the cache only through its methods.

**Shared prefixes** (paged only): ``fork(src, dst, n_tokens)`` makes the sequences ``dst``
start with the first ``n_tokens`` tokens of ``src`` *without copying them*: the full pages
of that prefix are shared (reference counted; a partly filled last page is copied, since
the sequences write their own tokens into it). The sequences sharing pages form a *prefix
group*; ``palm_fast.ops.mqa_decode`` reads a group's shared pages once for all its members
(``prefix_groups()`` lists them). Pages a group shares are never written again: every
sequence appends at its own length, which is past the shared pages.

Every method validates all of its arguments before it changes anything: a rejected call
(``ValueError`` / ``TypeError`` naming the argument, expected and received) leaves the
cache bitwise unchanged.
"""
from __future__ import annotations

import functools
import math
import numbers
import sys
from dataclasses import dataclass

import torch

from .ops._checks import check_int
from .ops._dispatch import exporting, fake_mode_on

__all__ = ["KVCache", "PrefixGroup"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT_DTYPES = (torch.int32, torch.int64)
_INT32_MAX = 2 ** 31 - 1


def _check_pos_int(name: str, value, *, allow_zero: bool = False) -> int:
    value = check_int(name, value)
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name}: expected an int {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


_THP = "/sys/kernel/mm/transparent_hugepage"


@functools.cache
def _thp_size() -> int:
    """The transparent huge page size in bytes (``hpage_pmd_size``: 2 MiB on x86-64), or 0
    where there are none to ask for (not Linux, THP set to "never", unreadable sysfs)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        with open(f"{_THP}/enabled") as f:
            if "[never]" in f.read():
                return 0
        with open(f"{_THP}/hpage_pmd_size") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 0


@functools.cache
def _madvise():
    """(libc ``madvise``, ``MADV_HUGEPAGE``), or None where they cannot be had."""
    try:
        import ctypes
        import mmap

        fn = ctypes.CDLL(None, use_errno=True).madvise
        fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        fn.restype = ctypes.c_int
        return fn, mmap.MADV_HUGEPAGE
    except (ImportError, OSError, AttributeError, TypeError):
        return None


def _madvise_huge(ptr: int, n_bytes: int) -> bool:
    """Ask Linux to back ``[ptr, ptr + n_bytes)`` (huge-page aligned) with transparent huge
    pages. Best effort: False (and nothing changed) where that is not possible."""
    m = _madvise()
    return m is not None and m[0](ptr, n_bytes, m[1]) == 0


def _zeros_kv(shape: tuple, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-filled K and V storages of ``shape`` on ``device``.

    A decode step reads the whole cache from memory; with 4 KiB pages every 4 KiB of it is a
    TLB miss and a restart of the hardware prefetcher. So on a Linux CPU with transparent
    huge pages (THP) of size P (2 MiB on x86-64), K and V of at least P / 2 each get their own
    allocation, aligned to P and rounded up to whole huge pages, advised to use THP before
    it is first touched. Resident memory: the rounding at most doubles a tensor of P / 2 to
    P, past that it adds under P; the reserved (virtual) size is up to P more, never
    touched, and counts in ``untyped_storage().nbytes()`` and ``torch.save``. Measured 5-10%
    faster CPU decode steps from DRAM (``benchmarks/results/cpu/NOTES.md``, twelfth session).
    K and V never share a storage: ops that write both (``rope_append``) must not see aliased
    inputs, which torch.compile would have to functionalise.
    Elsewhere (CUDA, no THP, small caches, while torch.compile traces or under a fake tensor
    mode): ``torch.zeros``.
    """
    return _zeros_cache_tensor(shape, dtype, device), _zeros_cache_tensor(shape, dtype, device)


def _tracing_or_fake() -> bool:
    return torch.compiler.is_compiling() or fake_mode_on()


def _zeros_cache_tensor(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type != "cpu" or _tracing_or_fake():  # (before _thp_size: tracing can't open files)
        return torch.zeros(shape, dtype=dtype, device=device)
    n_bytes = math.prod(shape) * dtype.itemsize
    huge = _thp_size()
    if huge == 0 or 2 * n_bytes < huge:
        return torch.zeros(shape, dtype=dtype, device=device)
    span = -(-n_bytes // huge) * huge  # whole huge pages
    raw = torch.empty(span + huge, dtype=torch.uint8, device=device)
    start = -raw.data_ptr() % huge
    _madvise_huge(raw.data_ptr() + start, span)
    buf = raw[start:start + n_bytes]
    buf.zero_()  # first touch, after the advice
    return buf.view(dtype).view(shape)


@dataclass(frozen=True)
class PrefixGroup:
    """Sequences ``members`` (sorted) share the pages holding tokens ``[0, n_tokens)``
    (``n_tokens`` is a multiple of the page size); ``pages`` are those pages, in order."""

    members: tuple[int, ...]
    n_tokens: int
    pages: tuple[int, ...]


def _index_list(name: str, value, also: str = "") -> list:
    """Sequence indices given as an int (Python or numpy), a list / tuple / range of them, or
    an integer tensor or numpy array (any shape), as a list; the entries are checked by the
    caller. Raises TypeError naming ``name``."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple, range)):
        return list(value)
    if isinstance(value, torch.Tensor) or (type(value).__module__ == "numpy" and hasattr(value, "reshape")):
        return value.reshape(-1).tolist()
    raise TypeError(f"{name}: expected {also}an int or a list of ints, got {type(value).__name__}")


class KVCache:
    """Preallocated MQA key/value cache; see the module docstring.

    ``KVCache(n_layers, batch, max_len, head_dim, *, dtype=torch.float32, device="cpu",
    page_size=None, num_pages=None)``; ``num_pages`` defaults to enough pages for every
    sequence to reach ``max_len`` (``batch * ceil(max_len / page_size)``).
    """

    # (normal tensors even when made under torch.inference_mode(): the cache's in-place
    # updates of inference tensors raised outside that mode, after its host state had moved)
    @torch.inference_mode(False)
    def __init__(self, n_layers: int, batch: int, max_len: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device="cpu", page_size: int | None = None,
                 num_pages: int | None = None):
        self.n_layers = _check_pos_int("n_layers", n_layers)
        self.batch = _check_pos_int("batch", batch)
        self.max_len = _check_pos_int("max_len", max_len)
        if self.max_len > _INT32_MAX:
            raise ValueError(f"max_len: expected at most 2**31 - 1 (lengths and positions are int32 "
                             f"on the device), got {max_len}")
        self.head_dim = _check_pos_int("head_dim", head_dim)
        # Python ints from here on: numpy int32 sizes overflowed in the byte count (a cache
        # of 2**32 + 2 MiB bytes counted as 2 MiB, then a failed view)
        n_layers, batch, max_len, head_dim = self.n_layers, self.batch, self.max_len, self.head_dim
        if dtype not in _FLOAT_DTYPES:
            raise TypeError(f"dtype: expected one of {_FLOAT_DTYPES}, got {dtype}")
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device: expected a torch.device or a device string, got {device!r} "
                             f"({e})") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device: expected a cpu or cuda device, got {device}")
        try:
            self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)
        except (AssertionError, RuntimeError) as e:   # (a CPU-only torch raises AssertionError)
            raise ValueError(f"device: {device} is not available ({e})") from None
        # The device as tensors report it ("cuda" -> "cuda:0"), so comparisons with a
        # tensor's .device are exact.
        self.dtype, self.device = dtype, self.lengths.device
        self._host_lengths = [0] * batch
        self._checked_values = None   # ops.mqa_decode: the last seq_lens / page table it validated
        # Made while torch.compile / export traces (its tensors are the tracer's): see
        # check_not_exported; allow_export: the user's opt-in there
        self._made_traced = _tracing_or_fake()
        self.allow_export = False
        if page_size is None:
            if num_pages is not None:
                raise ValueError(f"num_pages: only meaningful with page_size, got num_pages={num_pages} "
                                 "and page_size=None")
            self.page_size = None
            self.num_pages = None
            shape = (n_layers, batch, max_len, head_dim)
            self.page_table = None
        else:
            self.page_size = page_size = _check_pos_int("page_size", page_size)
            self.blocks_per_seq = math.ceil(max_len / page_size)
            if self.blocks_per_seq * self.page_size > _INT32_MAX:   # (the kernels' key range)
                raise ValueError(f"max_len: with page_size={page_size} a sequence spans "
                                 f"{self.blocks_per_seq} pages = {self.blocks_per_seq * page_size} "
                                 f"slots, past 2**31 - 1 (positions are int32 on the device); "
                                 f"expected max_len <= {_INT32_MAX // page_size * page_size}, "
                                 f"got {max_len}")
            if num_pages is None:
                num_pages = batch * self.blocks_per_seq
            self.num_pages = num_pages = _check_pos_int("num_pages", num_pages)
            shape = (n_layers, num_pages, page_size, head_dim)
            self.page_table = torch.full((batch, self.blocks_per_seq), -1, dtype=torch.int32,
                                         device=device)
            self._host_table = [[-1] * self.blocks_per_seq for _ in range(batch)]
            self._n_alloc = [0] * batch  # table entries [0, n) of each row hold pages
            self._refcount = [0] * num_pages
            self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low pages first
            self._groups: list[PrefixGroup] = []
        # Zero-filled (not empty): unused slots hold finite values, so a bug that reads
        # past a length shows as a wrong result rather than as NaN noise.
        self.k, self.v = _zeros_kv(shape, dtype, self.device)
        self._full_n_new: dict[int, torch.Tensor] = {}
        self._decode_meta = None  # shared-prefix index tensors, rebuilt when groups change
        self._decode_index = None  # the same as int64 gather indices (decode_index)
        self._note_device_state()

    # ------------------------------------------------------------------ properties
    @property
    def paged(self) -> bool:
        return self.page_size is not None

    def host_lengths(self) -> list[int]:
        """The cached token counts as a Python list (no device read)."""
        return list(self._host_lengths)

    def free_pages(self) -> int:
        """Pages not referenced by any sequence (paged caches)."""
        self._require_paged("free_pages")
        return len(self._free)

    def prefix_groups(self) -> list[PrefixGroup]:
        """The current shared-prefix groups (paged caches; empty when nothing is shared)."""
        return list(self._groups) if self.paged else []

    def __getstate__(self) -> dict:
        # torch.save / pickle: the validation memo of ops.mqa_decode holds weak references
        # (not picklable) and is only valid for this object; a restored cache re-validates.
        state = dict(self.__dict__)
        state["_checked_values"] = None
        return state

    def __repr__(self) -> str:
        kind = (f"paged(page_size={self.page_size}, num_pages={self.num_pages})" if self.paged
                else "contiguous")
        return (f"KVCache(n_layers={self.n_layers}, batch={self.batch}, max_len={self.max_len}, "
                f"head_dim={self.head_dim}, dtype={self.dtype}, device={self.device}, {kind})")

    # ------------------------------------------------------------------ validation helpers
    def _require_paged(self, what: str) -> None:
        if not self.paged:
            raise ValueError(f"{what}: needs a paged cache (page_size given), this cache is contiguous")

    def check_not_exported(self) -> None:
        """Raise NotImplementedError while torch.export traces a call over this cache when the
        cache was made outside the exported function: export records its k, v, lengths and
        page table as constants, so the exported program wrote into a private copy at
        positions that never moved (wrong results after save / load, no error). A cache made
        inside the function, and torch.compile over any cache, are supported. (Not checked
        under a torch without torch.compiler.is_exporting, such as 2.6.)

        ``cache.allow_export = True`` skips the check, for the "static cache" export pattern:
        a contiguous cache whose ``k``, ``v`` and ``lengths`` the exported module registers
        as its buffers, exported with ``strict=True`` (its buffers are then the program's
        state, updated in place; the host-side state, page tables included, is not)."""
        if exporting() and not (getattr(self, "_made_traced", False) or getattr(self, "allow_export", False)):
            raise NotImplementedError(
                "cache: exporting a decode step over a KVCache created outside the exported "
                "function is not supported: torch.export captures its tensors as constants "
                "(create the cache inside the function, or use torch.compile; for a contiguous "
                "cache registered as the module's buffers under strict export, see "
                "KVCache.allow_export)")

    def check_layer(self, layer) -> int:
        layer = check_int("layer", layer)
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer: expected 0 <= layer < {self.n_layers}, got {layer}")
        return layer

    def _check_seq(self, name: str, b) -> int:
        b = check_int(name, b)
        if not 0 <= b < self.batch:
            raise ValueError(f"{name}: expected a sequence index in [0, {self.batch}), got {b}")
        return b

    def counts(self, name: str, n, upper: int | None = None) -> list[int]:
        """``n`` (an int or an int tensor ``[batch]``) as a list of per-sequence counts, each
        in ``[0, upper]``; raises naming ``name``. Reads a device tensor (a host sync)."""
        if isinstance(n, bool):
            raise TypeError(f"{name}: expected an int or an int tensor [{self.batch}], got bool")
        if isinstance(n, numbers.Integral):
            vals = [int(n)] * self.batch
        elif isinstance(n, torch.Tensor):
            if n.dtype not in _INT_DTYPES:
                raise TypeError(f"{name}: expected an int32/int64 tensor, got dtype {n.dtype}")
            if tuple(n.shape) != (self.batch,):
                raise ValueError(f"{name}: expected shape ({self.batch},), got {tuple(n.shape)}")
            vals = [int(x) for x in n.tolist()]
        else:
            raise TypeError(f"{name}: expected an int or an int tensor [{self.batch}], got "
                            f"{type(n).__name__}")
        for b, x in enumerate(vals):
            if x < 0 or (upper is not None and x > upper):
                want = ">= 0" if upper is None else f"in [0, {upper}]"
                raise ValueError(f"{name}: expected values {want}, got {x} for sequence {b}")
        return vals

    def check_room(self, n_new: list[int], what: str = "n_new") -> None:
        """Raise (changing nothing) unless every sequence can take ``n_new[b]`` more tokens
        (``max_len`` and, for a paged cache, free pages)."""
        for b, n in enumerate(n_new):
            if self._host_lengths[b] + n > self.max_len:
                raise ValueError(f"{what}: cache overflow for sequence {b}: {self._host_lengths[b]} cached "
                                 f"+ {n} new tokens exceeds max_len {self.max_len}")
        if self.paged:
            need = self._pages_needed([self._host_lengths[b] + n for b, n in enumerate(n_new)])
            if need > len(self._free):
                raise ValueError(f"{what}: out of pages: the new tokens need {need} more pages of "
                                 f"{self.page_size}, {len(self._free)} of {self.num_pages} are free")

    def _pages_needed(self, ends: list[int]) -> int:
        # A sequence's pages always fill a leading run of its table row: O(batch), not
        # O(batch * blocks), per call (this runs for every append of every layer).
        # (A sequence within its pages is tested first: under torch.compile the page count
        # ceil(end / page_size) is a guard that recompiled the step at every page boundary.)
        ps = self.page_size
        return sum(-(-end // ps) - n for end, n in zip(ends, self._n_alloc) if end > n * ps)

    # ------------------------------------------------------------------ page allocation
    def _ensure_pages(self, ends: list[int]) -> None:
        """Give each sequence pages for tokens ``[0, ends[b])`` (room already checked).
        Interrupt-safe (see :meth:`_resync_device`): the new host state is built aside, the
        page table written from it, then the host state committed in one assignment."""
        n_alloc, grow = list(self._n_alloc), []
        for b, end in enumerate(ends):
            if end <= n_alloc[b] * self.page_size:   # (see _pages_needed)
                continue
            for j in range(n_alloc[b], -(-end // self.page_size)):
                grow.append((b, j))
            n_alloc[b] = -(-end // self.page_size)
        if not grow:
            return
        # The pages come off the end of the free list, last first; the list itself is cut
        # only at the commit (one ``del``: no copy of the free list or the counts per
        # allocation; a free page's count is not read, so it is set at once).
        cut = len(self._free) - len(grow)
        taken = self._free[cut:][::-1]
        table = list(self._host_table)
        for b in {b for b, _ in grow}:
            table[b] = list(table[b])
        for (b, j), p in zip(grow, taken):
            self._refcount[p] = 1
            table[b][j] = p
        try:
            self.page_table.copy_(torch.tensor(table, dtype=torch.int32, device="cpu"))
            self._host_table, self._n_alloc = table, n_alloc   # (no call from here to the
            del self._free[cut:]                               # end of the commit)
            self._note_device_state()
        except BaseException:
            self._resync_device()
            raise

    def _resync_device(self) -> None:
        """Write ``lengths`` and ``page_table`` from the host record. The methods that change
        the cache build the new host state aside, write the device tensors from it, then
        commit the host state in one assignment (no call or loop in between, so no signal
        handler runs there); on any exception before that commit, KeyboardInterrupt included,
        this puts the device tensors back. An interrupted reset otherwise left the device
        lengths at their old values, unseen (their version counter had not moved), and the
        reset sequence went on attending over its old tokens. (Host copies are built with
        ``device="cpu"``: under ``torch.set_default_device`` they were made on that device.)"""
        self.lengths.copy_(torch.tensor(self._host_lengths, dtype=torch.int32, device="cpu"))
        if self.paged:
            self.page_table.copy_(torch.tensor(self._host_table, dtype=torch.int32, device="cpu"))
        self._note_device_state()

    def _note_device_state(self) -> None:
        """Record ``lengths`` and ``page_table`` as this class last wrote them (the tensors and
        their in-place version counters): see :meth:`_check_device_state`. While torch.compile
        traces (a version counter is no Python int there), recorded as unknown: the next eager
        write compares the tensors once."""
        if _tracing_or_fake():
            self._device_state = None
            return
        self._device_state = (self.lengths, self.lengths._version, self.page_table,
                              None if self.page_table is None else self.page_table._version)

    def _check_device_state(self) -> None:
        """Raise ValueError if ``lengths`` or ``page_table`` was changed other than through this
        class's methods and no longer matches its host copy. The kernels write at
        ``lengths[b] + t`` through ``page_table``: a length or a page written there directly
        sent a Triton append out of bounds (memory corruption; the C++ kernels raised
        RuntimeError). Reads the device only when a version counter moved; not while
        torch.compile traces, under a fake tensor mode or during a CUDA graph capture."""
        if _tracing_or_fake() or (self.lengths.is_cuda and torch.cuda.is_current_stream_capturing()):
            return
        if self._device_state is not None:
            lengths, lv, table, tv = self._device_state
            if lengths is self.lengths and lv == lengths._version and table is self.page_table and (
                    table is None or tv == table._version):
                return
        for name, t, host in (("lengths", self.lengths, self._host_lengths),
                              ("page_table", self.page_table, getattr(self, "_host_table", None))):
            if t is None:
                continue
            want = torch.tensor(host, dtype=torch.int32, device="cpu")
            if not (isinstance(t, torch.Tensor) and t.dtype == torch.int32 and t.shape == want.shape
                    and t.device == self.device and torch.equal(t.cpu(), want)):
                raise ValueError(f"{name}: changed outside the KVCache methods (it no longer matches "
                                 f"the cache's own record of it); change a cache only through "
                                 f"append / advance / reserve / reset / fork")
        self._note_device_state()

    def reserve(self, n_tokens) -> None:
        """Allocate pages now for ``n_tokens`` (int or ``[batch]`` tensor) more tokens per
        sequence, so that later appends need no allocation (e.g. before capturing a decode
        step in a CUDA graph). A no-op for a contiguous cache apart from the overflow check."""
        n = self.counts("n_tokens", n_tokens)
        self.check_room(n, "n_tokens")
        if self.paged:
            self._ensure_pages([self._host_lengths[b] + x for b, x in enumerate(n)])

    # ------------------------------------------------------------------ writing
    def full_n_new(self, T: int) -> torch.Tensor:
        """A cached int32 tensor ``[batch]`` of ``T`` (the default ``n_new``); never written."""
        t = self._full_n_new.get(T)
        if t is None:
            t = torch.full((self.batch,), T, dtype=torch.int32, device=self.device)
            self._full_n_new[T] = t
        return t

    def check_like(self, name: str, t, ndim: int) -> None:
        """``t`` must be a tensor of the cache's dtype and device with ``ndim`` dims."""
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype != self.dtype:
            raise TypeError(f"{name}: expected dtype {self.dtype} (the cache's), got {t.dtype}")
        if t.device != self.device:
            raise ValueError(f"{name}: expected device {self.device} (the cache's), got {t.device}")
        if t.dim() != ndim:
            raise ValueError(f"{name}: expected {ndim} dims, got shape {list(t.shape)}")

    def prepare_write(self, layer, k, v, n_new) -> tuple[torch.Tensor, list[int]]:
        """Check an append of ``k``, ``v`` ``[batch, T, head_dim]`` to ``layer`` and allocate its
        pages. Returns (``n_new`` as an int32 device tensor, as a list). Shared by ``append`` and
        ``palm_fast.ops.rope_append``; nothing is changed when it raises."""
        self.check_layer(layer)
        self._check_device_state()
        for name, t in (("k", k), ("v", v)):
            self.check_like(name, t, 3)
            if t.shape[0] != self.batch or t.shape[2] != self.head_dim:
                raise ValueError(f"{name}: expected shape [{self.batch}, T, {self.head_dim}], got "
                                 f"{list(t.shape)}")
            if t.shape[2] > 1 and t.stride(2) != 1:
                raise ValueError(f"{name}: expected a unit stride in the last dim, got strides "
                                 f"{tuple(t.stride())}; call .contiguous() first")
        if k.shape != v.shape:
            raise ValueError(f"v: expected shape {list(k.shape)} (same as k), got {list(v.shape)}")
        if not _tracing_or_fake():
            # A view of the cache as the source: the kernels copy token by token, so a token's
            # slot written before a later token is read from it gave wrong rows silently
            # (torch's copy_ refuses such overlap too). One storage pointer each, ~0.5 us.
            cache_mem = (self.k.untyped_storage().data_ptr(), self.v.untyped_storage().data_ptr())
            for name, t in (("k", k), ("v", v)):
                if t.numel() and t.untyped_storage().data_ptr() in cache_mem:
                    raise ValueError(f"{name}: expected a tensor that does not share memory with "
                                     f"the cache (a view of its K or V, which this call writes); "
                                     f"pass {name}.clone()")
        T = k.shape[1]
        if n_new is None:
            n_list = [T] * self.batch
            n_dev = self.full_n_new(T)
        else:
            n_list = self.counts("n_new", n_new, upper=T)
            if not isinstance(n_new, torch.Tensor):   # (an int: counts checked it)
                n_dev = self.full_n_new(int(n_new))
            else:
                if n_new.device != self.device:
                    raise ValueError(f"n_new: expected device {self.device} (the cache's), "
                                     f"got {n_new.device}")
                n_dev = n_new.to(torch.int32).contiguous()   # (the kernels index it densely)
        self.check_room(n_list)
        if self.paged:
            self._ensure_pages([self._host_lengths[b] + n for b, n in enumerate(n_list)])
        return n_dev, n_list

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, n_new=None) -> None:
        """Write ``k``, ``v`` ``[batch, T, head_dim]`` into ``layer``: token ``t`` of sequence
        ``b`` goes to index ``lengths[b] + t`` for ``t < n_new[b]`` (``n_new``: int or int
        tensor ``[batch]``, default ``T``). Does not change ``lengths`` (see ``advance``)."""
        from palm_fast.ops.mqa_decode import append_kv

        append_kv(self, self.check_layer(layer), k, v, n_new)

    def advance(self, n_new) -> None:
        """``lengths += n_new`` (int or int tensor ``[batch]``); call once per step after every
        layer has appended."""
        n = self.counts("n_new", n_new)
        self.check_room(n)
        if self.paged:
            self._ensure_pages([self._host_lengths[b] + x for b, x in enumerate(n)])
        lengths = [x + y for x, y in zip(self._host_lengths, n)]
        if isinstance(n_new, torch.Tensor) and n_new.device == self.device:
            self._set_lengths(lengths, lambda: self.lengths.add_(n_new.to(torch.int32)))
        elif isinstance(n_new, int):
            # (one in-place add on the device: a copy from a host tensor waited for the GPU,
            # once per decode step)
            self._set_lengths(lengths, lambda: self.lengths.add_(n_new))
        else:
            self._set_lengths(lengths)

    def _set_lengths(self, lengths: list[int], write=None) -> None:
        """Write ``lengths`` to the device (``write()``, else a copy) and commit them to the
        host record, interrupt-safe (see :meth:`_resync_device`)."""
        try:
            if write is None:
                self.lengths.copy_(torch.tensor(lengths, dtype=torch.int32, device="cpu"))
            else:
                write()
            self._host_lengths = lengths
            self._note_device_state()
        except BaseException:
            self._resync_device()
            raise

    def reset(self, seqs=None) -> None:
        """Empty the sequences ``seqs`` (an int or a list of ints; default all): their lengths
        become 0 and their pages (paged) go back to the free list once no other sequence
        shares them. The cached values themselves are left in place."""
        seqs = list(range(self.batch)) if seqs is None else _index_list("seqs", seqs, "None, ")
        seqs = [self._check_seq("seqs", b) for b in seqs]
        # (interrupt-safe: the new state built aside, see _resync_device)
        lengths = list(self._host_lengths)
        for b in set(seqs):
            lengths[b] = 0
        if not self.paged:
            self._set_lengths(lengths)
            return
        table, free, refcount, n_alloc = (list(self._host_table), list(self._free),
                                          list(self._refcount), list(self._n_alloc))
        for b in set(seqs):
            row = table[b] = list(table[b])
            for j, p in enumerate(row):
                if p >= 0:
                    refcount[p] -= 1
                    if refcount[p] == 0:
                        free.append(p)
                    row[j] = -1
            n_alloc[b] = 0
        groups = self._groups_without(set(seqs))
        try:
            self.lengths.copy_(torch.tensor(lengths, dtype=torch.int32, device="cpu"))
            self.page_table.copy_(torch.tensor(table, dtype=torch.int32, device="cpu"))
            (self._host_lengths, self._host_table, self._free, self._refcount, self._n_alloc,
             self._groups, self._decode_meta) = lengths, table, free, refcount, n_alloc, groups, None
            self._note_device_state()
        except BaseException:
            self._resync_device()
            raise

    # ------------------------------------------------------------------ shared prefixes
    def fork(self, src: int, dst, n_tokens: int | None = None) -> None:
        """Let the empty sequences ``dst`` (an int or a list) start with the first ``n_tokens``
        tokens of ``src`` (default: all of src's) in every layer, without copying the full
        pages: they are shared (a partly filled last page is copied). Afterwards
        ``lengths[d] = n_tokens``. ``src`` and the ``dst`` become one prefix group (sharing
        the page-aligned part of the prefix), which ``mqa_decode`` reads once for all."""
        self._require_paged("fork")
        src = self._check_seq("src", src)
        dsts = [self._check_seq("dst", d) for d in _index_list("dst", dst)]
        if not dsts:
            raise ValueError("dst: expected at least one sequence index, got none")
        if len(set(dsts)) != len(dsts) or src in dsts:
            raise ValueError(f"dst: expected distinct sequence indices other than src={src}, got {dsts}")
        if n_tokens is None:
            if self._host_lengths[src] == 0:
                raise ValueError(f"src: sequence {src} is empty: nothing to fork")
            n_tokens = self._host_lengths[src]
        n_tokens = _check_pos_int("n_tokens", n_tokens)
        if n_tokens > self._host_lengths[src]:
            raise ValueError(f"n_tokens: expected <= the {self._host_lengths[src]} tokens cached for "
                             f"src={src}, got {n_tokens}")
        for d in dsts:
            if self._host_lengths[d] != 0:
                raise ValueError(f"dst: sequence {d} is not empty (length {self._host_lengths[d]}); "
                                 "reset it first")
            if any(p >= 0 for p in self._host_table[d]):
                raise ValueError(f"dst: sequence {d} holds reserved pages (length 0); reset it first")
        n_full, rem = divmod(n_tokens, self.page_size)
        if rem and len(self._free) < len(dsts):
            raise ValueError(f"dst: out of pages: copying the partly filled last page for {len(dsts)} "
                             f"sequences needs {len(dsts)} pages, {len(self._free)} are free")
        # (interrupt-safe: the new state built aside, see _resync_device; a partly filled
        # page is copied into pages still free until the commit)
        lengths, table, free, refcount, n_alloc = (list(self._host_lengths), list(self._host_table),
                                                   list(self._free), list(self._refcount),
                                                   list(self._n_alloc))
        src_row = table[src]
        shared = src_row[:n_full]
        try:
            for d in dsts:
                row = table[d] = list(table[d])
                for j, p in enumerate(shared):
                    row[j] = p
                    refcount[p] += 1
                n_alloc[d] = n_full
                if rem:
                    p_new = free.pop()
                    refcount[p_new] = 1
                    row[n_full] = p_new
                    n_alloc[d] = n_full + 1
                    self.k[:, p_new, :rem] = self.k[:, src_row[n_full], :rem]
                    self.v[:, p_new, :rem] = self.v[:, src_row[n_full], :rem]
                lengths[d] = n_tokens
            groups = self._groups_with(src, dsts, n_full, table) if n_full else self._groups
            self.page_table.copy_(torch.tensor(table, dtype=torch.int32, device="cpu"))
            self.lengths.copy_(torch.tensor(lengths, dtype=torch.int32, device="cpu"))
            (self._host_lengths, self._host_table, self._free, self._refcount, self._n_alloc,
             self._groups) = lengths, table, free, refcount, n_alloc, groups
            if n_full:
                self._decode_meta = None
            self._note_device_state()
        except BaseException:
            self._resync_device()
            raise

    def _groups_with(self, src: int, dsts: list[int], n_full: int, table) -> list[PrefixGroup]:
        """The prefix groups once ``dsts`` share ``src``'s first ``n_full`` pages (``table``:
        the host page table with the fork in it)."""
        n_tok = n_full * self.page_size
        members = {src, *dsts}
        for g in self._groups:  # forking a member again with the same prefix: one group
            if src in g.members and g.n_tokens == n_tok:
                members |= set(g.members)
        # A sequence belongs to at most one group (its other sharing is then read per
        # sequence, which gives the same attention up to rounding).
        groups = [PrefixGroup(tuple(m for m in g.members if m not in members), g.n_tokens, g.pages)
                  for g in self._groups]
        groups = [g for g in groups if len(g.members) >= 2]
        groups.append(PrefixGroup(tuple(sorted(members)), n_tok, tuple(table[src][:n_full])))
        return groups

    def _groups_without(self, seqs: set[int]) -> list[PrefixGroup]:
        """The prefix groups once ``seqs`` leave them."""
        groups = [PrefixGroup(tuple(m for m in g.members if m not in seqs), g.n_tokens, g.pages)
                  for g in self._groups]
        return [g for g in groups if len(g.members) >= 2]

    def decode_meta(self):
        """Index tensors of the shared-prefix decode, built once per group change (None
        without groups), all int32 on the cache's device: ``group_seq [G]`` (a member, whose
        page-table row holds the shared pages), ``group_len [G]`` (shared tokens),
        ``rows [G, M]`` (the members, padded with -1), ``starts [batch]`` (first unshared
        token of each sequence, 0 outside groups), ``slot [batch]`` (``g * M + j`` for the
        j-th member of group g, -1 outside groups)."""
        if not self.paged or not self._groups:
            return None
        if self._decode_meta is None:
            G = len(self._groups)
            M = max(len(g.members) for g in self._groups)
            rows = [[-1] * M for _ in range(G)]
            starts = [0] * self.batch
            slot = [-1] * self.batch
            for i, g in enumerate(self._groups):
                for j, m in enumerate(g.members):
                    rows[i][j] = m
                    starts[m] = g.n_tokens
                    slot[m] = i * M + j

            def dev(x):
                return torch.tensor(x, dtype=torch.int32, device=self.device)

            self._decode_meta = (dev([g.members[0] for g in self._groups]),
                                 dev([g.n_tokens for g in self._groups]), dev(rows), dev(starts), dev(slot))
            # The same as int64 gather indices (index_select), so that a decode call does not
            # convert them each time (each small op costs microseconds of host time).
            self._decode_index = (self._decode_meta[2].clamp(min=0).long().view(-1),
                                  self._decode_meta[0].long())
        return self._decode_meta

    def decode_index(self):
        """(``rows`` of :meth:`decode_meta` flattened, padding -> 0, and ``group_seq``), as
        int64 tensors for ``index_select``; None without groups."""
        return None if self.decode_meta() is None else self._decode_index
