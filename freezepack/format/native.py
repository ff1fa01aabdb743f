"""The compiled CPU kernel for the generator (``_philox.c``): the same bits as the numpy reference, an order of
magnitude faster than the torch eager path and faster than ``torch.randn`` (tools/bench_rng.py).

The C source ships with the package. Installing the package builds it (setup.py: an optional extension next to
the source, loaded with ctypes); that library is used while it was built from the installed source. Otherwise it
is compiled on first use with the system C compiler into a per-user cache directory, keyed by the source hash,
the compiler and its flags. Before first use the loaded kernel is checked against the numpy reference (a few
hundred elements of every distribution, and both ends of every octave of the normal table), so a compiler that
miscompiles it costs speed, not bits.

When there is neither an installed library nor a compiler, the build fails, or the check fails, :func:`available`
is False, callers use the torch path (bit-identical, much slower) and a RuntimeWarning says so once per process.
``FREEZEPACK_NO_NATIVE=1`` asks for the torch path without a warning.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import warnings
from importlib import machinery, resources

import numpy as np
import torch

from . import rng

log = logging.getLogger(__name__)

ABI_VERSION = 2  # 2: fp_simd
# -ffp-contract=off: no a*b+c fused into an FMA; no -ffast-math: IEEE float32 semantics for every operation.
CFLAGS = ("-O2", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared", "-pthread")
DISTS = {"normal": 0, "uniform": 1, "sign": 2}

_lock = threading.RLock()
_lib = None            # the loaded, checked library
_failure: str | None = None  # why it is unavailable (set once; a failed build is not retried in this process)


def disabled() -> bool:
    """True when ``FREEZEPACK_NO_NATIVE`` asks for the torch path (any value but '', '0')."""
    return os.environ.get("FREEZEPACK_NO_NATIVE", "") not in ("", "0")


def available() -> bool:
    """Whether the compiled kernel can be used in this process (builds it on first call)."""
    return not disabled() and _load() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    if disabled():
        return "FREEZEPACK_NO_NATIVE is set"
    return None if _load() is not None else _failure


def cache_dir() -> str:
    """Per-user directory for compiled kernels: ``$FREEZEPACK_CACHE``, else ``$XDG_CACHE_HOME/freezepack``,
    else ``~/.cache/freezepack`` (each + ``/native``)."""
    return _cache_dirs()[0]


def _cache_dirs() -> list[str]:
    base = os.environ.get("FREEZEPACK_CACHE")
    if base:
        return [os.path.join(base, "native")]
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    # a read-only home (CI sandboxes, services) still gets the kernel: a per-user temp directory is the fallback
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return [os.path.join(xdg, "freezepack", "native"),
            os.path.join(tempfile.gettempdir(), f"freezepack-{user}", "native")]


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _private_dir(path: str) -> None:
    """Create ``path`` for this user only. We load code from it, so refuse a directory that another user could
    write, or whose parent lets another user swap it (the parent must be ours or root's, and not writable by
    others unless sticky, like /tmp)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    if not hasattr(os, "getuid"):
        return
    st = os.stat(path)
    if st.st_uid != os.getuid():
        raise OSError(f"{path} is not owned by this user")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise OSError(f"{path} is writable by other users")
    if not os.access(path, os.W_OK):
        raise OSError(f"{path} is not writable")
    parent = os.stat(os.path.dirname(os.path.abspath(path)))
    if parent.st_uid not in (os.getuid(), 0) or (
            parent.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not parent.st_mode & stat.S_ISVTX):
        raise OSError(f"{os.path.dirname(path)} could be changed by other users")


def _build(source: bytes, cc: str, *, rebuild: bool = False, name: str = "philox") -> str:
    tag = "\0".join([hashlib.sha256(source).hexdigest(), cc, *CFLAGS, platform.machine(), sys.platform])
    key = hashlib.sha256(tag.encode()).hexdigest()[:24]
    errors = []
    for directory in _cache_dirs():
        try:
            _private_dir(directory)
            break
        except OSError as e:
            errors.append(f"{directory}: {e}")
    else:
        raise OSError("no usable cache directory for the compiled kernel (" + "; ".join(errors) + ")")
    target = os.path.join(directory, f"{name}-{key}.so")
    if os.path.exists(target) and not rebuild:
        return target
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        src = os.path.join(tmp, f"_{name}.c")
        with open(src, "wb") as f:
            f.write(source)
        lib = os.path.join(tmp, f"{name}.so")
        proc = subprocess.run([cc, *CFLAGS, "-o", lib, src], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise OSError(f"{cc} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        os.replace(lib, target)  # atomic: a concurrent process sees the old state or a complete library
    return target


def open_library(path: str, abi_function: str, abi_version: int):
    """ctypes handle of ``path`` after checking that ``abi_function()`` returns ``abi_version`` (a stale or damaged
    cached library raises OSError)."""
    lib = ctypes.CDLL(path)
    abi = getattr(lib, abi_function)
    abi.restype, abi.argtypes = ctypes.c_int, []
    if abi() != abi_version:
        raise OSError(f"{path} has ABI {abi()}, expected {abi_version}")
    return lib


def _bind(path: str):
    lib = open_library(path, "fp_abi_version", ABI_VERSION)
    u64, f32, ptr, i32 = ctypes.c_uint64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int
    lib.fp_fill.restype = i32
    lib.fp_fill.argtypes = [ptr, u64, u64, u64, u64, i32, f32, f32, i32, f32, ptr, ptr, i32]
    lib.fp_words.restype = i32
    lib.fp_words.argtypes = [ptr, u64, u64, u64, u64]
    lib.fp_convert.restype = i32
    lib.fp_convert.argtypes = [ptr, ptr, u64, i32, f32, f32, i32, f32, ptr, ptr]
    lib.fp_simd.restype, lib.fp_simd.argtypes = i32, [i32]
    return lib


def _self_check(lib) -> None:
    """The kernel must equal the numpy reference bit for bit; checked once per process on a small sample that
    starts mid-block and crosses the kernel's 64-word batches, for every distribution, on its scalar path and on
    the vector path it uses where the CPU has one."""
    best = lib.fp_simd(-1)
    try:
        for mode in sorted({0, best}):
            lib.fp_simd(mode)
            _check_path(lib)
    finally:
        lib.fp_simd(best)


def _check_path(lib) -> None:
    seed, stream, start, count = 0x0123456789ABCDEF, rng.stream_id("freezepack.format.native.self_check"), 5, 389
    words = rng.words_np(seed, stream, start, count)
    got = np.empty(count, np.uint32)
    lib.fp_words(got.ctypes.data, start, count, seed, stream)
    if not np.array_equal(got, words):
        raise OSError("compiled Philox words differ from the numpy reference")
    a, b, scale = np.float32(-0.75), np.float32(0.0625), np.float32(1.5)
    refs = {"normal": a + b * rng.normal_np(words), "uniform": a + b * rng.uniform_np(words),
            "sign": a * rng.sign_np(words)}
    tab_a, tab_d = rng.normal_table_np()
    for dist, ref in refs.items():
        out = np.empty(count, np.float32)
        rc = lib.fp_fill(out.ctypes.data, start, count, seed, stream, DISTS[dist], float(a), float(b), 1,
                         float(scale), tab_a.ctypes.data, tab_d.ctypes.data, 1)
        if rc != 0 or not np.array_equal((ref * scale).view(np.uint32), out.view(np.uint32)):
            raise OSError(f"compiled {dist} output differs from the numpy reference")
    # the normal table's far tails are rare in a random sample: one word at each end of every octave, both signs
    edges = [v for e in range(32) for v in ((1 << e) >> 1, max((1 << e) - 1, 0), ((3 << e) >> 2))]
    w = np.array(edges + [v | 0x80000000 for v in edges], dtype=np.uint64).astype(np.uint32)
    out = np.empty(w.size, np.float32)
    rc = lib.fp_convert(w.ctypes.data, out.ctypes.data, w.size, DISTS["normal"], 0.0, 1.0, 0, 1.0,
                        tab_a.ctypes.data, tab_d.ctypes.data)
    if rc != 0 or not np.array_equal(rng.normal_np(w).view(np.uint32), out.view(np.uint32)):
        raise OSError("compiled normal conversion differs from the numpy reference in the tails")


def packaged_path(name: str) -> str | None:
    """The library the package installer built from ``_<name>.c`` (setup.py), if there is one."""
    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in machinery.EXTENSION_SUFFIXES:
        path = os.path.join(here, f"_{name}_lib{suffix}")
        if os.path.isfile(path):
            return path
    return None


def _load_packaged(path: str, source: bytes, abi_function: str, bind, self_check):
    lib = ctypes.CDLL(path)
    tag = getattr(lib, abi_function.replace("_abi_version", "_source_sha256"))
    tag.restype, tag.argtypes = ctypes.c_char_p, []
    built_from = tag().decode("ascii", "replace")
    if built_from != hashlib.sha256(source).hexdigest():  # an older build left behind (an editable checkout)
        raise OSError(f"built from another version of the source ({built_from[:12] or 'unknown'})")
    lib = bind(path)
    self_check(lib)
    return lib


def build_and_load(name: str, bind, self_check, abi_function: str | None = None):
    """The library of ``_<name>.c``: the one installed with the package when it matches the source, else compiled
    into the per-user cache if missing there; loaded with ``bind(path)`` and checked with ``self_check(lib)``.
    Raises on any failure (no compiler, failed build, wrong bits): callers fall back."""
    source = resources.files("freezepack.format").joinpath(f"_{name}.c").read_bytes()
    installed = packaged_path(name)
    why = ""
    if installed is not None and abi_function is not None:
        try:
            return _load_packaged(installed, source, abi_function, bind, self_check)
        except (OSError, AttributeError) as e:
            why = f"installed {os.path.basename(installed)} not usable: {e}; "
            log.debug("freezepack %s", why)
    cc = _compiler()
    if cc is None:
        raise OSError(f"{why}no C compiler found (set CC, or install cc/gcc/clang)")
    path = _build(source, cc, name=name)
    try:
        lib = bind(path)
    except OSError as e:  # a damaged cached library (e.g. a full disk long ago): build it afresh once
        log.debug("rebuilding %s: %s", path, e)
        lib = bind(_build(source, cc, rebuild=True, name=name))
    self_check(lib)
    return lib


ABI_FUNCTIONS = {"philox": "fp_abi_version", "ans": "fp_ans_abi_version"}


def load_once(mod, name: str, bind, self_check):
    """``mod._lib``: ``_<name>.c`` built, loaded and checked once per process; None after a failure, whose reason
    stays in ``mod._failure`` (not retried: any failure only means "use the fallback", said once as a warning)."""
    if mod._lib is not None or mod._failure is not None:
        return mod._lib
    with _lock:
        if mod._lib is not None or mod._failure is not None:
            return mod._lib
        try:
            mod._lib = build_and_load(name, bind, self_check, ABI_FUNCTIONS.get(name))
            log.debug("freezepack compiled %s loaded", name)
        except Exception as e:
            mod._failure = f"{type(e).__name__}: {e}"
            warnings.warn(f"freezepack: the compiled {name} kernel is unavailable ({mod._failure}); using the "
                          "pure-Python/torch path instead: the same bits, many times slower. Install a C compiler "
                          "(cc/gcc/clang) and reinstall freezepack, or set FREEZEPACK_NO_NATIVE=1 to silence this.",
                          RuntimeWarning, stacklevel=2)
    return mod._lib


def _load():
    return load_once(sys.modules[__name__], "philox", _bind, _self_check)


def _require():
    lib = _load()
    if lib is None or disabled():
        raise RuntimeError(f"native kernel unavailable: {unavailable_reason()}")
    return lib


def fill(out: torch.Tensor, dist: str, a: float, b: float, seed: int, stream: int, *, start: int = 0,
         scale: float | None = None, threads: int | None = None) -> None:
    """Write elements ``[start, start + out.numel())`` of ``stream`` into ``out`` (CPU, float32, contiguous):
    ``a + b*z`` (normal), ``a + b*u`` (uniform) or ``a*s`` (sign), then ``* scale`` when given — each a separate
    float32 operation, exactly as ``freezepack.format.init.generate_np``. ``threads`` defaults to torch's CPU threads;
    the result never depends on it. Raises RuntimeError when the kernel is unavailable."""
    lib = _require()
    if out.device.type != "cpu" or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError("out must be a contiguous float32 CPU tensor")
    if dist not in DISTS:
        raise ValueError(f"dist must be one of {', '.join(DISTS)}, got {dist!r}")
    rng.check_seed(seed)
    if not 0 <= stream < 2**64 or not 0 <= start or start + out.numel() > 2**64:
        raise ValueError("stream or start out of range")
    for v in (a, b, 1.0 if scale is None else scale):
        if float(np.float32(v)) != float(v):
            raise ValueError(f"{v!r} is not a float32 value")
    tab_a, tab_d = rng.normal_table_np()
    threads = torch.get_num_threads() if threads is None else int(threads)
    rc = lib.fp_fill(out.data_ptr(), start, out.numel(), seed, stream, DISTS[dist], float(a), float(b),
                     0 if scale is None else 1, 1.0 if scale is None else float(scale),
                     tab_a.ctypes.data, tab_d.ctypes.data, threads)
    if rc != 0:
        raise RuntimeError(f"native kernel rejected its arguments (rc={rc})")


def words(seed: int, stream: int, start: int, count: int) -> np.ndarray:
    """uint32 words of elements ``[start, start+count)`` from the compiled kernel (equals ``rng.words_np``)."""
    lib = _require()
    rng.check_seed(seed)
    if not 0 <= stream < 2**64 or not 0 <= start or start + count > 2**64:
        raise ValueError("stream or start out of range")
    out = np.empty(int(count), np.uint32)
    lib.fp_words(out.ctypes.data, int(start), int(count), seed, stream)
    return out


def convert(words_u32: np.ndarray, dist: str, a: float, b: float, *, scale: float | None = None) -> np.ndarray:
    """The compiled conversion alone on given uint32 words (for tests: reaches every octave of the table)."""
    lib = _require()
    if dist not in DISTS:
        raise ValueError(f"dist must be one of {', '.join(DISTS)}, got {dist!r}")
    w = np.ascontiguousarray(words_u32, dtype=np.uint32)
    out = np.empty(w.shape, np.float32)
    tab_a, tab_d = rng.normal_table_np()
    rc = lib.fp_convert(w.ctypes.data, out.ctypes.data, w.size, DISTS[dist], float(a), float(b),
                        0 if scale is None else 1, 1.0 if scale is None else float(scale),
                        tab_a.ctypes.data, tab_d.ctypes.data)
    if rc != 0:
        raise RuntimeError(f"native kernel rejected its arguments (rc={rc})")
    return out
