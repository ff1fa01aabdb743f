"""Format v2 (spec/FORMAT.md §12): one binary body inside a fixed safetensors frame. ``wire``: its frame, codes and
primitive encodings; ``reader``: bytes -> model; ``writer``: model -> bytes."""
