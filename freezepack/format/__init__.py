"""The format layer: bits, initializers, mask coding and the file container. Depends on nothing above it.

``rng`` (spec'd Philox generator) -> ``native`` (its compiled kernel, and the builder of ``ans``: the compiled ANS
decoder) -> ``init`` (named initializers) -> ``record`` (what a FreezeNet is) -> ``maskcode`` (masks <-> bytes) ->
``container`` (the .fpk layout).
"""
