"""Format v1 (spec/FORMAT.md §1-11): a JSON header inside safetensors metadata. ``reader``: bytes -> model;
``writer``: model -> bytes; ``layout``: the names and order both share."""
