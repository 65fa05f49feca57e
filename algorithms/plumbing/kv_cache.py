"""A KV cache whose buffers are allocated once for the whole decoding run.

``transformers``' ``DynamicCache`` grows by ``torch.cat`` of the whole cache and the new token
on every step: each decoding step copies every layer's keys and values. At 32 rows and 150
cached positions that copy costs as much as the attention itself (on the 33.6M ``small``
preset it was a third to a half of a CPU decoding step under the profiler). :func:`preallocate`
swaps the layers of a filled ``DynamicCache`` for :class:`PreallocatedLayer`, which keeps keys
and values in ``[B, H, capacity, D]`` buffers and writes each new position in place; the model
reads views of the filled part, so nothing else changes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import DynamicLayer

__all__ = ["MIN_MOVE_BYTES", "PreallocatedLayer", "preallocate"]


class PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` backed by buffers with room for ``capacity`` positions.

    ``keys`` / ``values`` are always views ``buffer[:, :, :length]`` of the buffers, so every
    ``DynamicLayer`` reader (sequence length, mask sizes) works unchanged. A buffer that runs out
    of room doubles (one copy).

    Args:
        keys: The cached keys so far, ``[B, H, n, D]``.
        values: The cached values so far, ``[B, H, n, D]``.
        capacity: Positions to make room for (at least ``n``).
    """

    def __init__(self, keys: Tensor, values: Tensor, capacity: int) -> None:
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._length = keys.shape[-2]
        self._keys = self._buffer(keys, max(capacity, self._length))
        self._values = self._buffer(values, max(capacity, self._length))
        self._views()

    @staticmethod
    def _buffer(filled: Tensor, capacity: int) -> Tensor:
        b, h, n, d = filled.shape
        buffer = filled.new_empty((b, h, capacity, d))
        buffer[:, :, :n] = filled
        return buffer

    def _views(self) -> None:
        self.keys = self._keys[:, :, : self._length]
        self.values = self._values[:, :, : self._length]

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Write the new positions into the buffers and return the filled views."""
        end = self._length + key_states.shape[-2]
        if end > self._keys.shape[-2]:
            self._keys = self._buffer(self.keys, 2 * end)
            self._values = self._buffer(self.values, 2 * end)
        self._keys[:, :, self._length : end] = key_states
        self._values[:, :, self._length : end] = value_states
        self._length = end
        self._views()
        return self.keys, self.values

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep the rows ``indices``.

        Dropping rows (strictly increasing indices: the decoding loops' finished rows leaving the
        batch) compacts the buffers in place: only the rows after the first dropped one move, block
        by block, and only their filled positions, with no new buffer and no temporary copy. At 128
        rows of the ``small`` preset copying both whole buffers instead took ~10% of a population
        decode (a row finishes every few steps); the in-place move is ~10x cheaper. Where the rows
        are so small that a move copies less than :data:`MIN_MOVE_BYTES` (e.g. the ``tiny`` preset),
        the per-copy overhead wins and the buffers are copied whole, as are any other selections
        (repeats, reordering).
        """
        rows = self._keys.shape[0]
        moves = _moves(indices.tolist()) if _drops_rows(indices, rows) else None
        if moves is None or (moves and _bytes_per_move(self._keys, self._length, moves) < MIN_MOVE_BYTES):
            self._keys, self._values = self._keys[indices], self._values[indices]
            self._views()
            return
        kept = indices.numel()
        for start, stop, shift in moves:
            for buffer in (self._keys, self._values):
                buffer[start:stop, :, : self._length].copy_(buffer[start + shift : stop + shift, :, : self._length])
        self._keys, self._values = self._keys[:kept], self._values[:kept]
        self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row ``repeats`` times (one copy of the buffers)."""
        self._keys = self._keys.repeat_interleave(repeats, dim=0)
        self._values = self._values.repeat_interleave(repeats, dim=0)
        self._views()

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` positions (``DynamicLayer``'s convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of positions to remove, got {tokens_to_remove}")
        self._length = max(self._length + tokens_to_remove, 0)
        self._views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the rows (beam search)."""
        self.batch_select_indices(beam_idx.to(self.device))


def _drops_rows(indices: Tensor, rows: int) -> bool:
    """Whether ``indices`` keeps some of ``rows`` rows in order, each at most once (strictly increasing, in range)."""
    if indices.dim() != 1 or indices.numel() == 0 or indices.numel() > rows or indices.dtype == torch.bool:
        return False
    ordered = bool((indices[1:] > indices[:-1]).all()) if indices.numel() > 1 else True
    return ordered and int(indices[0]) >= 0 and int(indices[-1]) < rows


MIN_MOVE_BYTES = 1 << 16
"""Below this many bytes per row move (one buffer), dropping rows copies the buffers whole instead
(:meth:`PreallocatedLayer.batch_select_indices`). Measured for one dropped row of 128 at 100 filled
positions (fp32, 1 thread, best of 40, shared host): ``tiny`` rows (2 heads x 16, 12.8 KB) ~1.3 ms moved
in place vs ~0.8 ms copied whole; ``small`` rows (8 x 64, 205 KB) 4.5 vs 60 ms."""


def _bytes_per_move(buffer: Tensor, filled: int, moves: list[tuple[int, int, int]]) -> float:
    row = buffer.shape[1] * filled * buffer.shape[3] * buffer.element_size()
    return row * sum(stop - start for start, stop, _ in moves) / len(moves)


def _moves(kept: list[int]) -> list[tuple[int, int, int]]:
    """Row copies ``(start, stop, shift)`` (rows ``start:stop`` get rows ``start+shift:stop+shift``), in
    order, that turn a buffer into its strictly increasing rows ``kept``, in place.

    The rows between two dropped ones move down by the number of rows dropped before them; a run
    longer than its shift is copied in chunks of ``shift`` rows, so no copy reads a row an earlier
    copy (or itself) writes.
    """
    moves, i = [], 0
    while i < len(kept):
        shift = kept[i] - i
        j = i + 1
        while j < len(kept) and kept[j] - j == shift:
            j += 1  # rows i:j all move down by shift
        if shift:
            moves.extend((a, min(a + shift, j), shift) for a in range(i, j, shift))
        i = j
    return moves


def preallocate(cache: Any, capacity: int) -> bool:
    """Swap every filled plain ``DynamicLayer`` of ``cache`` for a :class:`PreallocatedLayer`.

    Args:
        cache: A ``transformers`` ``Cache`` with a ``layers`` list (e.g. a prefilled ``DynamicCache``).
        capacity: Positions each layer must hold: prompt plus every token still to be decoded.

    Returns:
        True when every layer was swapped; False leaves the other layers (sliding-window,
        quantized, unfilled) as they were, which still works, only without the saving.
    """
    layers = getattr(cache, "layers", None)
    if not layers:
        return False
    swapped = 0
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.dim() == 4:
            layers[i] = PreallocatedLayer(layer.keys, layer.values, capacity)
            swapped += 1
    return swapped == len(layers)
