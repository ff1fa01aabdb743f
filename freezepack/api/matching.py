"""Which module tensor each file tensor fills: exact names first, then names without the wrapper prefixes that
DataParallel/DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) add, then the user's ``prefix_map``.

Two file tensors that would fill the same module tensor are an error naming both, never "the later one wins".
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..errors import FormatError
from ..format.model import Entry

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile put these before every name


def canonical(name: str, prefix_map: dict[str, str] | None) -> str:
    """A name with wrapper prefixes removed and the user's prefix map applied (longest prefix first)."""
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    renames = prefix_map or {}
    for old in sorted(renames, key=len, reverse=True):
        if name.startswith(old):
            return renames[old] + name[len(old):]
    return name


def match_names(module_names: Iterable[str], file_names: Iterable[str], prefix_map: dict[str, str] | None,
                path) -> dict[str, str]:
    """``{file name: module name}``. A file name the module has and the prefix map leaves alone matches exactly;
    any other is compared without wrapper prefixes (the map applied). A module name claimed twice is a
    FormatError, as is a file name that fits two module tensors equally well."""
    module_names, file_names = list(module_names), list(file_names)
    exact = set(module_names)
    canon_mod: dict[str, list[str]] = {}
    for n in module_names:
        canon_mod.setdefault(canonical(n, None), []).append(n)
    out: dict[str, str] = {}
    claimed: dict[str, str] = {}  # module name -> the file name that fills it
    for n in file_names:
        mapped = canonical(n, prefix_map)
        if n in exact and mapped == canonical(n, None):
            target = n
        else:
            candidates = canon_mod.get(mapped, [])
            if len(candidates) > 1:
                raise FormatError(f"file tensor {n!r} fits the module's {candidates[0]!r} and {candidates[1]!r} "
                                  "alike (rename with prefix_map)", path=path, tensor=n)
            if not candidates:
                continue
            target = candidates[0]
        if target in claimed:
            raise FormatError(f"file tensors {claimed[target]!r} and {n!r} would both fill the module's {target!r}: "
                              "a name collision (fix the names or the prefix_map)", path=path, tensor=n)
        claimed[target] = n
        out[n] = target
    return out


def fit(targets: dict, entries: Sequence[Entry], prefix_map, path, strict: bool):
    """``(match, missing, unexpected)`` of a file's entries against a module's state_dict; with ``strict`` any
    missing or unexpected name is a FormatError."""
    match = match_names(targets, [e.name for e in entries], prefix_map, path)
    unexpected = [e.name for e in entries if e.name not in match]
    matched = set(match.values())
    tied = tied_to_loaded(targets, match)
    missing = [k for k in targets if k not in matched and k not in tied]
    if strict and (missing or unexpected):
        raise FormatError(f"does not fit the module: missing {missing[:5]}, unexpected {unexpected[:5]}"
                          f"{_tie_hint(targets, entries, match, missing)}", path=path)
    return match, missing, unexpected


def tied_to_loaded(targets: dict, match: dict[str, str]) -> dict[str, str]:
    """``{module name: loaded module name}`` for names the file lacks whose tensor *is* one the file fills: a
    module that ties them (an LM head and its embedding) gets them with it, as transformers' loaders do."""
    loaded = {id(targets[n]): n for n in match.values()}
    return {k: loaded[id(t)] for k, t in targets.items() if k not in loaded.values() and id(t) in loaded}


def _tie_hint(targets: dict, entries: Sequence[Entry], match: dict[str, str], missing: list[str]) -> str:
    """A missing tensor shaped like one the file has is usually a tied weight stored once (an LM head)."""
    shapes = {tuple(e.shape): match[e.name] for e in entries if e.name in match and hasattr(e, "shape")}
    for k in missing:
        twin = shapes.get(tuple(targets[k].shape))
        if twin is not None and targets[k].dim() >= 2:
            return (f" ({k!r} has the shape of {twin!r}, which the file has: if the model ties them, tie them "
                    "before loading, e.g. transformers' model.tie_weights() or tie_word_embeddings=True in its "
                    "config; strict=False loads the rest)")
    return ""
