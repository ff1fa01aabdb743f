"""The spec's decoders in plain Python integers (spec/FORMAT.md §6): executable references that share no code with
freezepack.format, for tests and for anyone writing a reader of their own."""
from __future__ import annotations

import numpy as np


def reference_ans_start(words) -> tuple[list[int], int]:
    """The ANS core's start (spec/FORMAT.md 6.3): pop words off the end until the state holds >= 2**32."""
    stack = [int(w) for w in words]
    state = 0
    if stack:
        state = stack.pop()
        while stack and state < 1 << 32:
            state = (state << 32) | stack.pop()
    return stack, state


def reference_ans_decode(words: np.ndarray, n: int, cdf1: int) -> np.ndarray:
    """spec/FORMAT.md's 'ans-bernoulli' decoder, in plain integers (no constriction): the spec is executable."""
    stack, state = reference_ans_start(words)
    out = np.zeros(n, dtype=bool)
    for i in range(n):
        quantile = state & ((1 << 24) - 1)
        if quantile >= cdf1:
            out[i], left, prob = True, cdf1, (1 << 24) - cdf1
        else:
            left, prob = 0, cdf1
        state = (state >> 24) * prob + quantile - left
        if state < 1 << 32 and stack:
            state = (state << 32) | stack.pop()
    if state != 0 or stack:
        raise AssertionError("a valid stream is consumed exactly")
    return out


def reference_gap_table(phi):
    """spec/FORMAT.md §6.5's gap table, in Python integers."""
    x = [1 << 32]
    for _ in range(255):
        x.append((x[-1] * phi) >> 32)
    total, s = (1 << 24) - 256, sum(x)
    w = [xj * total // s for xj in x]
    for j in range(total - sum(w)):
        w[j] += 1
    return [wj + 1 for wj in w]


def reference_gap_decode(words, n, ones, value, b, phi):
    """spec/FORMAT.md's 'ans-gaps' decoder in plain integers, sharing only the ANS core with the one above."""
    table = reference_gap_table(phi)
    cdf = np.concatenate([[0], np.cumsum(table)]).tolist()
    stack, state = reference_ans_start(words)

    def pop(weights_cdf):
        nonlocal state
        quantile = state & ((1 << 24) - 1)
        s = next(i for i in range(len(weights_cdf) - 1) if weights_cdf[i + 1] > quantile)
        state = (state >> 24) * (weights_cdf[s + 1] - weights_cdf[s]) + quantile - weights_cdf[s]
        if state < 1 << 32 and stack:
            state = (state << 32) | stack.pop()
        return s

    m = ones if value else n - ones
    hs = [pop(cdf) for _ in range(m)]
    u16 = [i << 8 for i in range((1 << 16) + 1)]
    for i, h in enumerate(hs):
        if h == 255:
            hi, lo = pop(u16), pop(u16)
            hs[i] = 255 + (hi << 16 | lo)
    if b:
        ub = [i << (24 - b) for i in range((1 << b) + 1)]
        gaps = [(h << b) | pop(ub) for h in hs]
    else:
        gaps = [h << b for h in hs]
    if state != 0 or stack:
        raise AssertionError("a valid stream is consumed exactly")
    pos = np.cumsum(np.array(gaps) + 1) - 1
    out = np.full(n, not value)
    out[pos] = bool(value)
    return out
