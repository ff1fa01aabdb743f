"""Every check on what a header *means*, once, for both versions (and for the writers' self-checks).

A parser checks only its own encoding (JSON types and canonical form for v1; varints, codes and lengths for v2);
whatever a file says, its meaning is judged here, with one vocabulary of errors. :class:`Checker` holds the rules,
field by field, and what they need to remember (names seen, elements so far):

* v2's parser calls each method *as it reads* the field, so of two defects the one at the lower offset wins
  (spec/FORMAT.md §12.9, "Which error wins");
* v1's parser reads the whole JSON first and then :func:`check_header` applies the same methods in file order.

Within the header: generator, seed, producer, metadata (one measure for both versions: the UTF-8 bytes of every
key and value, spec §5), tensor count. Within an entry, in this order: name (valid text, not reserved, unique) ->
an alias's target (an earlier non-alias entry; v2's ``j`` is 0-based and counts every entry) -> dtype -> shape
(ndim, any one dimension, elements) -> elements of all tensors so far -> for a frozen entry: its dtype, stream,
initializer (name, ``dist`` by name, ``params`` keys, types and values; ``a``, ``b`` float32) -> frozen_scale (a
finite float32, exactly a number of its dtype) -> trainable count -> mask coder and its parameters -> digest.
Generator and initializer problems are ``SpecError``, everything else ``FormatError``.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping

from ..errors import FormatError, SpecError
from . import entropy, maskcode
from .dtypes import DTYPE_SIZES, FROZEN_DTYPES, is_float32, round_float
from .init import InitSpec
from .initializers import TABLE, params_problem
from .model import AliasEntry, Entry, FrozenEntry, Header, Limits, WholeEntry, limit_error, short
from .rng import SPEC_VERSION
from .strictjson import valid_text

_HEX = re.compile(r"[0-9a-f]+\Z")
DIGEST_HEX = {1: 64, 2: 32}  # per version: hex digits of an entry's dense digest (v2 keeps 128 bits, spec §12.6)
RESERVED_NAMES = ("", "__metadata__")
# The mask coders a version knows (v2 adds the context coder, spec §12.7.2).
MASK_CODERS = {1: maskcode.CODERS, 2: maskcode.CODERS + ("ans-ctx",)}


def metadata_bytes(metadata: Mapping[str, str]) -> int:
    """The one measure of user metadata, whatever the version: the UTF-8 bytes of every key and value."""
    return sum(len(k.encode("utf-8", "surrogatepass")) + len(v.encode("utf-8", "surrogatepass"))
               for k, v in metadata.items())


def check_shape(shape: tuple[int, ...], limits: Limits, path=None, tensor=None, what: str = "shape") -> None:
    """At most ``max_ndim`` dimensions, none and their product over ``max_tensor_elements`` (a single dimension is
    bounded too: with a zero dimension the others could otherwise be anything)."""
    if len(shape) > limits.max_ndim:
        raise FormatError(f"{what} has {len(shape)} dimensions, over the reader limit max_ndim={limits.max_ndim}",
                          path=path, tensor=tensor)
    if any(type(d) is not int or d < 0 for d in shape):
        raise FormatError(f"{what} {short(list(shape))} must be non-negative integers", path=path, tensor=tensor)
    if any(d > limits.max_tensor_elements for d in shape):
        raise limit_error(f"{what} {list(shape)}: a dimension", max(shape), "max_tensor_elements", limits, path,
                          tensor)
    if math.prod(shape) > limits.max_tensor_elements:
        raise limit_error(f"{what} {list(shape)}: number of elements", math.prod(shape), "max_tensor_elements",
                          limits, path, tensor)


class Checker:
    """The rules for one header of format ``version``, applied field by field (see the module docstring)."""

    def __init__(self, version: int, limits: Limits, path=None):
        self.version, self.limits, self.path = version, limits, path
        self.seen: dict[str, bool] = {}  # name -> is an alias
        self.total = 0

    def _err(self, msg: str, tensor=None) -> FormatError:
        return FormatError(msg, path=self.path, tensor=tensor)

    # --- the header ---------------------------------------------------------------------------------------------

    def generator(self, generator: str) -> None:
        if generator != SPEC_VERSION:
            raise SpecError(f"unknown generator {short(generator)} (this reader knows {SPEC_VERSION})",
                            path=self.path)

    def seed(self, seed: int) -> None:
        if type(seed) is not int or not 0 <= seed < 1 << 64:
            raise self._err(f"seed must be an integer in [0, 2**64), got {short(seed)}")

    def producer(self, producer: str) -> None:
        if not isinstance(producer, str) or not valid_text(producer):
            raise self._err("producer must be valid Unicode text")

    def metadata(self, metadata: Mapping[str, str]) -> None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise self._err("metadata must map strings to strings")
        bad = next((x for kv in metadata.items() for x in kv if not valid_text(x)), None)
        if bad is not None:
            raise self._err(f"metadata text {short(bad)} is not valid Unicode (a lone surrogate?)")
        self.metadata_size(metadata_bytes(metadata))

    def metadata_size(self, size: int) -> None:
        """(v2's parser calls this as the metadata grows, so no more than the limit is ever built.)"""
        if size > self.limits.max_metadata_bytes:
            raise limit_error("metadata: UTF-8 bytes of keys and values", size, "max_metadata_bytes", self.limits,
                              self.path)

    def count(self, n: int) -> None:
        if n > self.limits.max_tensors:
            raise limit_error("number of tensors", n, "max_tensors", self.limits, self.path)

    # --- an entry -----------------------------------------------------------------------------------------------

    def name(self, name: object) -> str:
        if not isinstance(name, str) or name in RESERVED_NAMES or not valid_text(name):
            raise self._err(f"invalid tensor name {short(name)} (empty, reserved, or not valid Unicode)")
        if name in self.seen:
            raise self._err("tensor name appears twice", name)
        self.seen[name] = False
        return name

    def alias(self, name: str, of: str) -> None:
        if self.seen.get(of) is True:
            raise self._err(f"alias of {short(of)}, itself an alias: not an earlier non-alias tensor", name)
        if self.seen.get(of) is not False or of == name:
            raise self._err(f"alias of {short(of)}: not an earlier non-alias tensor", name)
        self.seen[name] = True

    def dtype(self, name: str, dtype: str) -> None:
        if dtype not in DTYPE_SIZES:
            raise self._err(f"dtype {short(dtype)} is not allowed for a tensor", name)

    def shape(self, name: str, shape: tuple[int, ...]) -> None:
        check_shape(shape, self.limits, self.path, name)
        self.total += math.prod(shape)
        if self.total > self.limits.max_total_elements:
            raise limit_error("elements of all tensors", self.total, "max_total_elements", self.limits, self.path,
                              name)

    def frozen_dtype(self, name: str, dtype: str) -> None:
        if dtype not in FROZEN_DTYPES:
            raise self._err(f"dtype {short(dtype)} is not allowed for a frozen tensor", name)

    def stream(self, name: str, stream: str | None) -> None:
        if stream is not None and (not isinstance(stream, str) or stream in ("", name) or not valid_text(stream)):
            # the default is never spelled out: one file per model
            raise self._err("stream must be given only when it differs from the name", name)

    def init_params(self, name: str, iname: str, params: object) -> None:
        """``params`` is exactly the record of initializer ``iname`` (initializers.TABLE): keys, JSON types,
        ``mode`` and ``nonlinearity`` among the listed values."""
        problem = params_problem(iname, params)
        if problem is not None:
            raise SpecError(problem, path=self.path, tensor=name)

    def init(self, name: str, init: InitSpec) -> None:
        self.init_params(name, init.name, init.params)
        if init.dist != TABLE[init.name].dist:
            raise SpecError(f"initializer {init.name!r} draws from {TABLE[init.name].dist!r}, not {init.dist!r}",
                            path=self.path, tensor=name)
        for k in ("a", "b"):
            if not is_float32(float(getattr(init, k))):
                raise SpecError(f"init {k} must be a finite float32 number", path=self.path, tensor=name)

    def frozen_scale(self, name: str, scale: object, dtype: str) -> None:
        if not isinstance(scale, float) or not is_float32(scale):
            raise self._err(f"frozen_scale must be a finite float32 number, got {short(scale)}", name)
        if dtype != "F32" and scale != round_float(scale, dtype):
            raise self._err(f"frozen_scale {scale!r} is not exactly a {dtype} number", name)

    def trainable(self, name: str, k: object, n: int) -> None:
        if type(k) is not int or not 0 <= k <= n:
            raise self._err(f"trainable must be an integer in [0, {n}], got {short(k)}", name)

    def mask(self, e: FrozenEntry) -> None:
        known = MASK_CODERS.get(self.version, ())
        if e.coder not in known:
            raise self._err(f"unknown mask coder {short(e.coder)}: written by a newer freezepack? (known: "
                            f"{', '.join(known)})", e.name)
        params = dict(e.coder_params)
        if e.coder == "ans-ctx":
            entropy.check_ctx(e.numel, e.trainable, e.shape, params, e.mask_words, self.path, e.name)
        else:
            maskcode.check_params(e.coder, e.numel, e.trainable, params, e.mask_words, where=self.path,
                                  tensor=e.name)

    def digest(self, e: FrozenEntry | WholeEntry) -> None:
        want = DIGEST_HEX.get(self.version, 64)
        if isinstance(e, WholeEntry) and e.sha256 is None and self.version == 2:
            return  # v2 keeps no digest of a whole tensor apart from the body's
        if not isinstance(e.sha256, str) or len(e.sha256) != want or not _HEX.match(e.sha256):
            raise self._err(f"sha256 must be {want} lowercase hex digits", e.name)

    def entry(self, e: Entry) -> None:
        """Every rule of one entry, in the order of the module docstring."""
        name = self.name(e.name)
        if isinstance(e, AliasEntry):
            self.alias(name, e.of)
            return
        self.dtype(name, e.dtype)
        self.shape(name, e.shape)
        if isinstance(e, FrozenEntry):
            self.frozen_dtype(name, e.dtype)
            self.stream(name, e.stream)
            self.init(name, e.init)
            self.frozen_scale(name, e.frozen_scale, e.dtype)
            self.trainable(name, e.trainable, e.numel)
            self.mask(e)
        self.digest(e)


def check_header(h: Header, limits: Limits, path=None) -> None:
    """Judge a whole parsed header; the first defect in the order of the module docstring is raised."""
    c = Checker(h.version, limits, path)
    c.generator(h.generator)
    c.seed(h.seed)
    c.producer(h.producer)
    c.metadata(h.metadata)
    c.count(len(h.entries))
    for e in h.entries:
        c.entry(e)
