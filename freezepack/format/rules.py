"""Every check on what a header *means*, once, run after either version's parser (and by the writers on what they
are about to publish).

A parser checks only its own encoding (JSON types and canonical form for v1, varints and codes for v2) and bounds
what it allocates; whatever a file says, its meaning is judged here, with one vocabulary of errors. Which error
wins when a header has several defects is deterministic: the parser's (in byte order) first, then these rules in
this order:

1. the header: generator, seed, producer, metadata (its size measured one way: canonical JSON bytes), tensor count;
2. each entry in file order: name (valid text, not reserved, unique) -> alias target (an earlier non-alias entry;
   v2's index ``j`` is 0-based and counts every entry) -> dtype -> shape (ndim, any one dimension, elements) ->
   elements of all tensors so far -> digest -> for a frozen entry: stream, initializer and its params, frozen_scale
   (a finite float32, exactly a number of its dtype), trainable count, mask coder and its params.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping

from ..errors import FormatError, SpecError
from . import entropy, maskcode
from .dtypes import DTYPE_SIZES, FROZEN_DTYPES, is_float32, round_float
from .initializers import params_problem
from .model import AliasEntry, FrozenEntry, Header, Limits, WholeEntry, limit_error, short
from .rng import SPEC_VERSION
from .strictjson import canonical_json, valid_text

_HEX = re.compile(r"[0-9a-f]+\Z")
DIGEST_HEX = {1: 64, 2: 32}  # per version: hex digits of an entry's dense digest (v2 keeps 128 bits, spec §12.6)
RESERVED_NAMES = ("", "__metadata__")
# The mask coders a version knows (v2 adds the context coder, spec §12.7.2).
MASK_CODERS = {1: maskcode.CODERS, 2: maskcode.CODERS + ("ans-ctx",)}


def check_name(name: object, path=None) -> str:
    if not isinstance(name, str) or name in RESERVED_NAMES or not valid_text(name):
        raise FormatError(f"invalid tensor name {short(name)} (empty, reserved, or not valid Unicode)", path=path)
    return name


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


def metadata_bytes(metadata: Mapping[str, str]) -> int:
    """The one measure of user metadata, whatever the version: its canonical JSON bytes."""
    return len(canonical_json(dict(metadata)))


def check_metadata(metadata: Mapping[str, str], limits: Limits, path=None) -> None:
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise FormatError("metadata must map strings to strings", path=path)
    bad = next((x for kv in metadata.items() for x in kv if not valid_text(x)), None)
    if bad is not None:
        raise FormatError(f"metadata text {short(bad)} is not valid Unicode (a lone surrogate?)", path=path)
    size = metadata_bytes(metadata)
    if size > limits.max_metadata_bytes:
        raise limit_error("metadata: canonical bytes", size, "max_metadata_bytes", limits, path)


def check_frozen_scale(scale: object, dtype: str, path=None, tensor=None) -> None:
    if not isinstance(scale, float) or not is_float32(scale):
        raise FormatError(f"frozen_scale must be a finite float32 number, got {short(scale)}", path=path,
                          tensor=tensor)
    if dtype != "F32" and scale != round_float(scale, dtype):
        raise FormatError(f"frozen_scale {scale!r} is not exactly a {dtype} number", path=path, tensor=tensor)


def check_init(e: FrozenEntry, path=None) -> None:
    """The initializer is known and ``params`` is exactly its record (initializers.TABLE), in both versions."""
    problem = params_problem(e.init.name, e.init.params)
    if problem is not None:
        raise SpecError(problem, path=path, tensor=e.name)
    for k in ("a", "b"):
        if not is_float32(float(getattr(e.init, k))):
            raise SpecError(f"init {k} must be a finite float32 number", path=path, tensor=e.name)


def check_mask(e: FrozenEntry, version: int, path=None) -> None:
    if e.coder not in MASK_CODERS.get(version, ()):
        raise FormatError(f"unknown mask coder {short(e.coder)}: written by a newer freezepack? (known: "
                          f"{', '.join(MASK_CODERS.get(version, ()))})", path=path, tensor=e.name)
    params = dict(e.coder_params)
    if e.coder == "ans-ctx":
        entropy.check_ctx(e.numel, e.trainable, e.shape, params, e.mask_words, path, e.name)
    else:
        maskcode.check_params(e.coder, e.numel, e.trainable, params, e.mask_words, where=path, tensor=e.name)


def check_header(h: Header, limits: Limits, path=None) -> None:
    """Judge a parsed header; the first defect in the order of the module docstring is raised."""
    if h.generator != SPEC_VERSION:
        raise SpecError(f"unknown generator {short(h.generator)} (this reader knows {SPEC_VERSION})", path=path)
    if type(h.seed) is not int or not 0 <= h.seed < 1 << 64:
        raise FormatError(f"seed must be an integer in [0, 2**64), got {short(h.seed)}", path=path)
    if not isinstance(h.producer, str) or not valid_text(h.producer):
        raise FormatError("producer must be valid Unicode text", path=path)
    check_metadata(h.metadata, limits, path)
    if len(h.entries) > limits.max_tensors:
        raise limit_error("number of tensors", len(h.entries), "max_tensors", limits, path)
    seen: dict[str, bool] = {}  # name -> is an alias
    total = 0
    for e in h.entries:
        name = check_name(e.name, path)
        if name in seen:
            raise FormatError("tensor name appears twice", path=path, tensor=name)
        if isinstance(e, AliasEntry):
            if seen.get(e.of) is True:
                raise FormatError(f"alias of {short(e.of)}, itself an alias", path=path, tensor=name)
            if seen.get(e.of) is not False:
                raise FormatError(f"alias of {short(e.of)}: not an earlier non-alias tensor", path=path, tensor=name)
            seen[name] = True
            continue
        seen[name] = False
        if e.dtype not in DTYPE_SIZES or (isinstance(e, FrozenEntry) and e.dtype not in FROZEN_DTYPES):
            raise FormatError(f"dtype {short(e.dtype)} is not allowed for a {e.kind} tensor", path=path, tensor=name)
        check_shape(e.shape, limits, path, name)
        total += e.numel
        if total > limits.max_total_elements:
            raise limit_error("elements of all tensors", total, "max_total_elements", limits, path, name)
        want = DIGEST_HEX.get(h.version, 64)
        if isinstance(e, WholeEntry) and e.sha256 is None and h.version == 2:
            pass  # v2 keeps no digest of a whole tensor apart from the body's
        elif not isinstance(e.sha256, str) or len(e.sha256) != want or not _HEX.match(e.sha256):
            raise FormatError(f"sha256 must be {want} lowercase hex digits", path=path, tensor=name)
        if not isinstance(e, FrozenEntry):
            continue
        if e.stream is not None and (not isinstance(e.stream, str) or e.stream in ("", name)
                                     or not valid_text(e.stream)):
            # the default is never spelled out: one file per model
            raise FormatError("stream must be given only when it differs from the name", path=path, tensor=name)
        check_init(e, path)
        check_frozen_scale(e.frozen_scale, e.dtype, path, name)
        if type(e.trainable) is not int or not 0 <= e.trainable <= e.numel:
            raise FormatError(f"trainable must be an integer in [0, {e.numel}], got {short(e.trainable)}",
                              path=path, tensor=name)
        check_mask(e, h.version, path)
