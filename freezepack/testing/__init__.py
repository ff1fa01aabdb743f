"""Builders for tests and benchmarks of .fpk readers: small FreezeRecords, and a header rewriter for 'lying file' tests.

Part of the package (like ``numpy.testing``) so that tests, tools/bench_*.py and users' own reader tests import it
by name, without putting tests/ on ``sys.path``; test modules share helpers only through it. Not imported by
``import freezepack``. Submodules: ``hostile`` (crafted bomb and lie files, a memory probe), ``v2`` (hand-made v2
bodies), ``reference`` (the spec's decoders in plain integers), ``models`` (small models of many architectures),
``fleet`` (releases, publisher and device, test servers; needs the fleet extra), ``fleet_memprobe``.
"""
from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import torch

from ..format.init import make_init
from ..format.record import FreezeRecord, FrozenTensor
from ..format.strictjson import canonical_json
from ..format.v1.layout import HEADER_DIGEST_KEY, HEADER_KEY


def random_mask(shape, q: float, gen: torch.Generator) -> torch.Tensor:
    """A mask with exactly round((1-q) * n) trainable entries (True) at random places."""
    n = 1
    for s in shape:
        n *= s
    k = int(round((1 - q) * n))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=gen)[:k]] = True
    return mask.reshape(shape)


def record_for(shapes: dict, q: float, seed: int = 7, init: str = "xavier_normal", frozen_scale: float = 1.0,
               gen_seed: int = 0) -> FreezeRecord:
    """Weights (>= 2-D) frozen at rate q with random masks and trained values; 1-D tensors stored whole."""
    g = torch.Generator().manual_seed(gen_seed)
    rec = FreezeRecord(seed=seed)
    for name, shape in shapes.items():
        if len(shape) >= 2:
            m = random_mask(shape, q, g)
            rec.frozen[name] = FrozenTensor(make_init(init, shape), m, torch.randn(int(m.sum()), generator=g),
                                            frozen_scale)
        else:
            rec.whole[name] = torch.randn(shape, generator=g)
    return rec


def small_record(seed: int = 11) -> FreezeRecord:
    """Every coder and several dtypes in a file of a few KB: the corruption sweep's subject."""
    g = torch.Generator().manual_seed(seed)
    rec = FreezeRecord(seed=seed)
    m = torch.from_numpy(np.random.default_rng(0).random((40, 50)) < 0.2)  # a mask 'ans-bernoulli' codes best
    rec.frozen["conv.weight"] = FrozenTensor(make_init("kaiming_uniform", (40, 50)), m,
                                             torch.randn(int(m.sum()), generator=g))
    m = random_mask((12, 20), 0.9, g)                         # ans-gaps
    rec.frozen["conv2.weight"] = FrozenTensor(make_init("xavier_uniform", (12, 20)), m,
                                              torch.randn(int(m.sum()), generator=g))
    m = torch.zeros(30, 10, dtype=torch.bool)
    m[3, 4] = m[17, 9] = True                                # positions
    rec.frozen["fc.weight"] = FrozenTensor(make_init("pm_sigma", (30, 10)), m, torch.randn(2, generator=g), 0.5)
    rec.frozen["fc2.weight"] = FrozenTensor(make_init("xavier_normal", (8, 8)), torch.zeros(8, 8, dtype=torch.bool),
                                            torch.zeros(0))  # const, nothing trained
    rec.whole["fc.bias"] = torch.randn(10, generator=g)
    rec.whole["bn.num_batches_tracked"] = torch.tensor(5)
    rec.whole["half"] = torch.randn(3, generator=g).to(torch.bfloat16)
    return rec


def split_file(data: bytes):
    """(outer header dict, inner header dict, tensor data bytes) of an .fpk."""
    n = struct.unpack("<Q", data[:8])[0]
    outer = json.loads(data[8:8 + n])
    inner = json.loads(outer["__metadata__"][HEADER_KEY])
    return outer, inner, data[8 + n:]


def rewrite(data: bytes, edit_inner=None, edit_outer=None) -> bytes:
    """Re-encode a file after editing its headers, with *valid* digests and canonical form: a file that lies
    consistently, so only the semantic checks can catch it."""
    outer, inner, body = split_file(data)
    if edit_inner:
        edit_inner(inner)
    text = canonical_json(inner)
    outer["__metadata__"] = {HEADER_KEY: text,
                             HEADER_DIGEST_KEY: hashlib.sha256(text.encode()).hexdigest()}
    if edit_outer:
        edit_outer(outer)
    head = canonical_json(outer).encode()
    head += b" " * (-(8 + len(head)) % 8)
    return struct.pack("<Q", len(head)) + head + body


def with_inner_text(data: bytes, inner_text: str) -> bytes:
    """Put an arbitrary (already canonical) inner header text into a file, signed and canonically wrapped."""
    outer, _, body = split_file(data)
    outer["__metadata__"] = {HEADER_KEY: inner_text,
                             HEADER_DIGEST_KEY: hashlib.sha256(inner_text.encode()).hexdigest()}
    head = canonical_json(outer).encode()
    head += b" " * (-(8 + len(head)) % 8)
    return struct.pack("<Q", len(head)) + head + body


# ----------------------------------------------------------------------------------- tiny transformers models
HF_KINDS = ("gpt2", "bert", "llama")


def tiny_hf_model(kind: str, *, tied: bool = True, vocab: int = 100, seed: int = 0):
    """A tiny transformers model built from a config (2 layers, d = 32; nothing downloaded), in train mode as
    transformers builds it: GPT-2 (Conv1D layers, tied head), BERT (masked LM, tied decoder), Llama (untied
    unless ``tied``). transformers is imported here, not at module import."""
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "gpt2":
        gpt2 = tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=64, bos_token_id=0,
                             eos_token_id=0, tie_word_embeddings=tied)
        return tf.GPT2LMHeadModel(gpt2)
    if kind == "bert":
        bert = tf.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                             vocab_size=vocab, max_position_embeddings=64, tie_word_embeddings=tied)
        return tf.BertForMaskedLM(bert)
    if kind == "llama":
        llama = tf.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                               intermediate_size=64, vocab_size=vocab, max_position_embeddings=64, bos_token_id=0,
                               eos_token_id=0, pad_token_id=0, tie_word_embeddings=tied)
        return tf.LlamaForCausalLM(llama)
    raise ValueError(f"unknown tiny model kind {kind!r} (known: {', '.join(HF_KINDS)})")


def hf_tokens(vocab: int = 100, batch: int = 4, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """The model's own loss on ``ids`` (next-token for causal LMs, reconstruction for a masked LM): a loss_fn."""
    return model(input_ids=ids, labels=ids).loss


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits
