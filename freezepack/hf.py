"""Hugging Face transformers: a FreezeNet as a model directory, loaded back with the model's own class.

``save_pretrained(model, dir)`` writes ``dir/config.json`` (and ``generation_config.json`` for generative models,
a tokenizer when given) next to ``dir/model.fpk``; the .fpk carries the config in its metadata too, so the file
alone rebuilds the model (``freezepack fleet publish`` ships that one file). ``from_pretrained(dir)`` builds the
model from its config without running any initializer (transformers' ``no_init_weights``, allocated once on the
target device), regenerates the frozen weights straight into it, restores ties and checks every digest.

``model.save_pretrained(dir)`` on a FreezeNet (transformers' own method) writes the *dense* model, which
transformers' ``from_pretrained`` loads bit-exactly (:func:`save_pretrained_dense`, installed on every
transformers model freezepack freezes); without that a FreezeNet's ``state_dict`` holds parametrization keys that
transformers would drop and re-initialise.

transformers is imported only when a function here runs: ``import freezepack`` never needs it.
"""
from __future__ import annotations

import copy
import importlib
import json
import os

import torch

from .api import DTYPE_NAMES, TORCH_DTYPES, load_freezenet, load_into, safe_open, save
from .atomic import atomic_write
from .errors import FormatError, UsageError
from .method.freezenet import save_pretrained_dense, unwrap

__all__ = ["save_pretrained", "from_pretrained", "empty_model", "save_pretrained_dense", "FPK_NAME"]

FPK_NAME = "model.fpk"                  # the weights file of a freezepack model directory
CONFIG_KEY = "freezepack.hf.config"      # .fpk metadata: the model's config.json text
CLASS_KEY = "freezepack.hf.class"        # .fpk metadata: the model class it was saved from
BUFFERS_KEY = "freezepack.hf.buffers"    # .fpk metadata: dtypes of the buffers a model computes, not stores


def _computed_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Non-persistent floating buffers (rotary frequencies...): rebuilt by the constructor, not in any file. Their
    dtype follows the user's ``model.to(dtype)``, which a fresh build does not know: the file records it."""
    out = {}
    for mname, m in model.named_modules():
        for b in getattr(m, "_non_persistent_buffers_set", ()):
            t = m._buffers.get(b)
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                out[f"{mname}.{b}" if mname else b] = t
    return out


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UsageError("freezepack.hf needs transformers: pip install 'freezepack[hf]'") from None
    return transformers


def _config_of(model: torch.nn.Module):
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(config, "to_json_string", None)):
        raise UsageError(f"{type(model).__name__} is not a transformers model (no .config); save it with "
                         "freezepack.save(path, model) instead")
    return config


def save_pretrained(model: torch.nn.Module, directory, *, values: str | None = None,
                    metadata: dict[str, str] | None = None, tokenizer=None, version: int | None = None) -> str:
    """Write a transformers FreezeNet as a model directory: ``config.json`` + ``model.fpk`` (+ the generation
    config of a generative model, + ``tokenizer`` files when given). Returns the directory.

    The .fpk is written as :func:`freezepack.save` writes any FreezeNet (proven bit for bit before it is
    published; ``values`` opts into lossy trained values) and holds the config in its metadata.
    """
    target = unwrap(model)
    config = copy.deepcopy(_config_of(target))
    config.architectures = [type(target).__name__]
    dtype = getattr(target, "dtype", None)
    if isinstance(dtype, torch.dtype):
        config.dtype = dtype  # what a loader builds the model in (the file has every tensor's own dtype)
    text = config.to_json_string()
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    buffers = {n: DTYPE_NAMES[t.dtype] for n, t in _computed_buffers(target).items() if t.dtype in DTYPE_NAMES}
    meta = {**(metadata or {}), CONFIG_KEY: text, CLASS_KEY: type(target).__name__,
            BUFFERS_KEY: json.dumps(buffers, sort_keys=True)}
    save(os.path.join(directory, FPK_NAME), model, meta, values=values, version=version)
    atomic_write(os.path.join(directory, "config.json"), text.encode("utf-8"))
    generation = getattr(target, "generation_config", None)
    can_generate = getattr(target, "can_generate", lambda: False)
    if generation is not None and can_generate():
        atomic_write(os.path.join(directory, "generation_config.json"), generation.to_json_string().encode("utf-8"))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def _config_from_text(text: str, where: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        d = json.loads(text)
        model_type = d["model_type"]
        return CONFIG_MAPPING[model_type].from_dict(d)
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(f"not a transformers config this transformers knows: {type(e).__name__}: {e}",
                          path=where) from None


def _model_class(name: str | None, where: str):
    transformers = _transformers()
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise UsageError(f"the model class {name!r} is not in this transformers: pass model_class=", path=where)
    return cls


def _file_dtype(f) -> torch.dtype:
    """The floating dtype holding most of the file's numbers: the dtype to build the model in."""
    counts: dict[str, int] = {}
    for name in f.keys():
        e = f.entry(name)
        if e.kind != "alias" and e.dtype in ("F32", "F16", "BF16", "F64"):
            counts[e.dtype] = counts.get(e.dtype, 0) + e.numel
    return TORCH_DTYPES[max(counts, key=lambda k: counts[k])] if counts else torch.float32


def _no_init_weights():
    try:
        module = importlib.import_module("transformers.initialization")
    except ImportError:  # transformers 4 kept it in modeling_utils
        module = importlib.import_module("transformers.modeling_utils")
    return module.no_init_weights()


def empty_model(model_class, config, dtype: torch.dtype, device) -> torch.nn.Module:
    """``model_class`` (a model class or an Auto class) built from ``config`` on ``device`` in ``dtype`` without
    running any initializer: storage is allocated once and filled by the loader. Buffers the model computes in
    its constructor (rotary frequencies, position ids) are computed as usual."""
    build = getattr(model_class, "_from_config", None) or getattr(model_class, "from_config", None)
    if build is None:
        raise UsageError(f"{model_class!r} is not a transformers model class or Auto class")
    with _no_init_weights(), torch.device(device):
        return build(config, dtype=dtype)


def from_pretrained(path, model_class=None, *, device=None, freezenet: bool = False,
                    verify: bool = True) -> torch.nn.Module:
    """Load a directory written by :func:`save_pretrained` (or its ``model.fpk`` alone).

    ``model_class``: the model's class or an Auto class (``AutoModelForCausalLM``); default the class it was
    saved from. ``device``: where the model is built and its frozen weights regenerated (default CPU).
    ``freezenet=True`` gives a FreezeNet again (its trained values are the parameters: resume training);
    otherwise a plain model. Every tensor has the dtype it was saved in, ties are restored, and the model is
    returned in eval mode, as transformers' ``from_pretrained`` returns it.
    """
    path = os.fspath(path)
    fpk = os.path.join(path, FPK_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(fpk):
        raise FormatError(f"no {FPK_NAME} here: not a directory written by freezepack.hf.save_pretrained", path=path)
    _transformers()
    with safe_open(fpk) as f:
        meta = f.metadata()
        dtype = _file_dtype(f)
        dtypes = {name: f.entry(name).dtype for name in f.keys() if f.entry(name).kind != "alias"}
    config_json = os.path.join(path, "config.json") if os.path.isdir(path) else None
    if config_json is not None and os.path.isfile(config_json):  # the directory's config (a user may edit it)
        with open(config_json, encoding="utf-8") as cf:
            config = _config_from_text(cf.read(), config_json)
    elif CONFIG_KEY in meta:
        config = _config_from_text(meta[CONFIG_KEY], fpk)
    else:
        raise FormatError("no config.json and no transformers config in the file's metadata", path=path)
    if model_class is None:
        model_class = _model_class(meta.get(CLASS_KEY) or (config.architectures or [None])[0], fpk)
    device = torch.device(device if device is not None else "cpu")
    model = empty_model(model_class, config, dtype, device)
    own = model.state_dict(keep_vars=True)
    for name, code in dtypes.items():  # a tensor saved in another dtype than the bulk: give it its own
        t = own.get(name)
        if t is not None and t.dtype != TORCH_DTYPES[code]:
            t.data = torch.empty_like(t, dtype=TORCH_DTYPES[code])
    try:
        buffer_dtypes = json.loads(meta.get(BUFFERS_KEY, "{}"))
    except ValueError:
        raise FormatError(f"metadata {BUFFERS_KEY} is not JSON", path=fpk) from None
    for name, t in _computed_buffers(model).items():
        code = buffer_dtypes.get(name) if isinstance(buffer_dtypes, dict) else None
        if code in TORCH_DTYPES and t.dtype != TORCH_DTYPES[code]:
            mod, _, attr = name.rpartition(".")
            model.get_submodule(mod).register_buffer(attr, t.to(TORCH_DTYPES[code]), persistent=False)
    if freezenet:
        load_freezenet(model, fpk, verify=verify)
    else:
        load_into(model, fpk, verify=verify)
    return model.eval()
