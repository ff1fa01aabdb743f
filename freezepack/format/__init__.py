"""The format layer: bits, initializers, coders and the .fpk file in both versions. Depends on nothing above it.

Generation: ``rng`` (spec'd Philox) -> ``native`` (its compiled kernel; builds ``ans``, the compiled ANS decoder)
-> ``initializers`` (the one table) -> ``init`` (named initializers) -> ``record`` (what a FreezeNet is, and
``reconstruct``). Coders: ``ans`` -> ``maskcode`` (v1 mask coders), ``entropy`` (ans-ctx, planes, codebook).

The file (modelled on gguf-py / safetensors: constants apart, reader and writer apart, typed records):
    dtypes       element types, sizes, torch twins, rounding        strictjson  canonical + strict bounded JSON
    model        typed entries (frozen / whole / alias), header, limits
    rules        every check of what a header means, once, after either parser
    io           open once, bounded reads, the one atomic_write      framing     the safetensors frame
    memory       what a load may allocate, checked before it does    dense       tensor bytes and digests
    v1/, v2/     per version: reader (bytes -> model), writer (model -> bytes), and their layout/wire
    base         the reader interface; reader: ``open_file`` (sniffs the version); writer: ``encode_file``
"""
