"""The FreezeNet method: saliency scores and masks (``saliency``), freezing modules (``freezenet``).

Depends on the format layer only; the file API (``freezepack.api``) sits above it.
"""
