"""Hugging Face models, one run: dense safetensors (what transformers' save_pretrained writes) vs .fpk, side by side.

For tiny GPT-2 / BERT / Llama built from configs (default 2 layers, d = 32, vocab 1000; ``--d``/``--layers``/
``--vocab`` for bigger ones), each made a FreezeNet at ``--q`` (SNIP on random tokens, the model's own init) and
trained a few AdamW steps:
  * bytes: transformers' dense ``model.safetensors`` vs the .fpk lossless, and lossy (bf16, kmeans:4, kmeans:3;
    "best lossy" = the smallest);
  * load time (best of ``--repeat``): the file read (``safetensors.torch.load_file`` vs ``freezepack.load``, which
    regenerates and checks every digest) and read + load into a model (transformers' ``from_pretrained`` of the
    dense directory vs ``freezepack.hf.from_pretrained`` of the .fpk directory);
  * every loaded model's logits are compared with the trained model's (bit-exact or the run stops).

    .venv/bin/python tools/bench_hf.py [--q 0.9] [--d 32] [--layers 2] [--repeat 5] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings

import torch
import transformers as tf
from safetensors.torch import load_file

import freezepack
from freezepack import hf
from freezepack.method.freezenet import make_freezenet, rates

AUTO = {"gpt2": tf.AutoModelForCausalLM, "bert": tf.AutoModelForMaskedLM, "llama": tf.AutoModelForCausalLM}


def build(kind: str, d: int, layers: int, vocab: int):
    torch.manual_seed(0)
    heads = max(2, d // 64)
    if kind == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=layers, n_embd=d, n_head=heads, vocab_size=vocab,
                                                n_positions=128, bos_token_id=0, eos_token_id=0))
    if kind == "bert":
        return tf.BertForMaskedLM(tf.BertConfig(num_hidden_layers=layers, hidden_size=d, num_attention_heads=heads,
                                                intermediate_size=4 * d, vocab_size=vocab,
                                                max_position_embeddings=128))
    return tf.LlamaForCausalLM(tf.LlamaConfig(num_hidden_layers=layers, hidden_size=d, num_attention_heads=heads,
                                              num_key_value_heads=max(1, heads // 2), intermediate_size=4 * d,
                                              vocab_size=vocab, max_position_embeddings=128, bos_token_id=0,
                                              eos_token_id=0, pad_token_id=0))


def loss(m, ids):
    return m(input_ids=ids, labels=ids).loss


def best_of(fn, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def logits(m, ids):
    with torch.no_grad():
        return m(input_ids=ids).logits


def one(kind: str, args, tmp: str) -> dict:
    vocab = args.vocab
    ids = torch.randint(1, vocab, (8, 32), generator=torch.Generator().manual_seed(0))
    model = make_freezenet(build(kind, args.d, args.layers, vocab), ids, args.q, 7, init="model", loss_fn=loss)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(args.steps):
        loss(model, ids).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    model.eval()
    want = logits(model, ids)
    dense_dir, fpk_dir = os.path.join(tmp, kind + "-dense"), os.path.join(tmp, kind + "-fpk")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the 'writes the dense model' pointer)
        model.save_pretrained(dense_dir)
    hf.save_pretrained(model, fpk_dir)
    st_path, fpk_path = os.path.join(dense_dir, "model.safetensors"), os.path.join(fpk_dir, hf.FPK_NAME)
    row = {"model": kind, "parameters": sum(p.numel() for p in build(kind, args.d, args.layers, vocab).parameters()),
           "q_beta": round(rates(model)[1], 4), "dense_bytes": os.path.getsize(st_path),
           "fpk_bytes": os.path.getsize(fpk_path)}
    for coding in ("bf16", "kmeans:4", "kmeans:3"):
        p = os.path.join(tmp, f"{kind}-{coding.replace(':', '')}.fpk")
        freezepack.save(p, model, values=coding)
        row[f"fpk_{coding}_bytes"] = os.path.getsize(p)
    lossy = {c: row[f"fpk_{c}_bytes"] for c in ("bf16", "kmeans:4", "kmeans:3")}
    row["best_lossy"] = min(lossy, key=lossy.get)
    row["best_lossy_bytes"] = lossy[row["best_lossy"]]
    row["read_s_safetensors"], _ = best_of(lambda: load_file(st_path), args.repeat)
    row["read_s_fpk"], _ = best_of(lambda: freezepack.load(fpk_path), args.repeat)
    t_st, m_st = best_of(lambda: AUTO[kind].from_pretrained(dense_dir).eval(), args.repeat)
    t_fpk, m_fpk = best_of(lambda: hf.from_pretrained(fpk_dir, AUTO[kind]), args.repeat)
    if not (torch.equal(logits(m_st, ids), want) and torch.equal(logits(m_fpk, ids), want)):
        raise SystemExit(f"{kind}: a loaded model's logits differ from the trained model's")
    row.update(load_s_transformers=t_st, load_s_fpk=t_fpk)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--q", type=float, default=0.9)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tf.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [one(kind, args, tmp) for kind in ("gpt2", "bert", "llama")]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"q = {args.q}, d = {args.d}, {args.layers} layers, vocab {args.vocab}, torch {torch.__version__}, "
          f"transformers {tf.__version__}, {torch.get_num_threads()} threads; bytes, best of {args.repeat} ms")
    print("| model | params | q_beta | dense safetensors | .fpk lossless (x smaller) | best lossy (x smaller) "
          "| read: load_file / freezepack.load | read + load: from_pretrained / hf.from_pretrained |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        d = r["dense_bytes"]
        print(f"| {r['model']} | {r['parameters']:,} | {r['q_beta']} | {d:,} | {r['fpk_bytes']:,} "
              f"({d / r['fpk_bytes']:.1f}x) | {r['best_lossy']}: {r['best_lossy_bytes']:,} "
              f"({d / r['best_lossy_bytes']:.1f}x) | {1e3 * r['read_s_safetensors']:.1f} / "
              f"{1e3 * r['read_s_fpk']:.1f} | {1e3 * r['load_s_transformers']:.1f} / {1e3 * r['load_s_fpk']:.1f} |")


if __name__ == "__main__":
    main()
