"""Small models of architectures the paper never used, each frozen and trained in seconds, for tests of "any model":
a ResNet with BatchNorm, residual adds, depthwise, grouped and bias-free convs; a transformer LM with tied
input/output embeddings, LayerNorm and MultiheadAttention; an EmbeddingBag model.

``trained(case)`` -> (a trained FreezeNet in eval mode, its batch); ``CASES[case]`` = (class, data, loss_fn).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..method.freezenet import make_freezenet


class Block(nn.Module):
    def __init__(self, c, groups):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)      # depthwise, bias-free
        self.bn1 = nn.BatchNorm2d(c)
        self.pw = nn.Conv2d(c, c, 1, groups=groups, bias=False)             # grouped 1x1
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.pw(F.relu(self.bn1(self.dw(x))))))  # residual add


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(Block(8, 2), Block(8, 4))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class TinyLM(nn.Module):
    """Decoder-only LM: tied embeddings, LayerNorm, MultiheadAttention (its in_proj_weight is a raw Parameter)."""

    def __init__(self, vocab=32, d=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(16, d))
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 32), nn.GELU(), nn.Linear(32, d))
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, tokens):
        t = tokens.shape[1]
        x = self.emb(tokens) + self.pos[:t]
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        x = x + self.ff(self.ln2(x))
        return self.head(x)


class BagModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(50, 12, mode="mean")
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        return self.out(self.bag(x))


def lm_loss(model, batch):
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def tokens(n=64, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 32, (n, 1), generator=g)
    return (base + torch.arange(t)) % 32  # a learnable pattern: next token = this + 1


CASES = {
    "resnet": (ResNet, lambda: (torch.randn(32, 1, 12, 12, generator=torch.Generator().manual_seed(1)),
                                torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(2))), None),
    "lm": (TinyLM, tokens, lm_loss),
    "bag": (BagModel, lambda: (torch.randint(0, 50, (32, 5), generator=torch.Generator().manual_seed(3)),
                               torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(4))), None),
}


def loss(case, model, batch):
    return (CASES[case][2] or (lambda m, b: F.cross_entropy(m(b[0]), b[1])))(model, batch)


def inputs(case, batch):
    return batch[:, :-1] if case == "lm" else batch[0]


def trained(case, steps=60, q=0.8, seed=7):
    cls, data, loss_fn = CASES[case]
    torch.manual_seed(0)
    model = cls()
    batch = data()
    make_freezenet(model, batch, q=q, seed=seed, loss_fn=loss_fn)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        loss(case, model, batch).backward()
        opt.step()
    return model.eval(), batch
