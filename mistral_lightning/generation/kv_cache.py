"""A per-layer key/value cache for decoding a left-padded batch, as a ring buffer of each row's positions.

Prompts of different lengths are left-padded so that every row's next token lands in the same column;
row b's token in column c has position c - pad_b. Each row keeps its own positions: position p lives in
entry p % capacity of that row, so the buffer needs as many entries as the longest row needs (its prompt
plus its own new tokens), not the longest prompt plus the largest number of new tokens, which sharing
columns would give every row. Causality and the sliding window are one band mask over the positions each
entry holds (kernels.masks.band_mask, the rule training uses).

With a window only the last W positions can ever be seen again, so the buffer holds W entries and wraps
around (a rolling cache): memory does not grow with the generated length. Without a window the buffer is
sized for the longest row and never wraps. `keep_rows` drops the rows that have stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mistral_lightning.kernels.masks import band_mask


@dataclass
class _Step:
    """Where the tokens of one forward pass go and what each of them may see (shared by all layers)."""

    rows: torch.Tensor  # [B, 1], the row of each write
    write_index: torch.Tensor  # [B, kept]: entries that receive the step's last `kept` tokens of each row
    prepend: int | None  # concat mode: attend over buffer[:, :prepend] + the new tokens; None: in place
    visible: int  # in-place mode: attend over buffer[:, :visible]
    mask: torch.Tensor  # bool [B, 1, T_new, T_keys]


class RollingKVCache:
    """Implements the model's `KVCache` protocol: `update(layer_idx, k, v) -> (k_all, v_all, mask)`.

    Call `advance(num_tokens)` before each forward pass; it returns the rotary position ids of the new
    tokens. Head count and head size are read from the first `update`, so under tensor parallelism
    the cache simply holds the local heads.
    """

    def __init__(self, pad_lengths: torch.Tensor, capacity: int, window: int | None) -> None:
        self.pad_lengths = pad_lengths
        self._pads: list[int] = pad_lengths.tolist()  # on the host, so that no step waits for the device
        self.capacity = capacity
        self.window = window
        # The position held by each entry of each row; negative while empty or holding padding.
        self.position_of_entry = torch.full(
            (len(self._pads), capacity), -1, dtype=torch.long, device=pad_lengths.device
        )
        self.next_column = 0
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self._step: _Step | None = None

    def advance(self, num_tokens: int) -> torch.Tensor:
        """Reserve the next `num_tokens` columns of every row; returns their position ids [B, num_tokens]."""
        device = self.position_of_entry.device
        # The row without padding left is the furthest along; every bound below is its.
        first = self.next_column - min(self._pads)
        if first + num_tokens > self.capacity and (self.window is None or self.capacity < self.window):
            raise RuntimeError(
                f"KV cache of {self.capacity} entries per row is full at position {first}; size it for the "
                "longest prompt plus its new tokens, or for at least the sliding window"
            )
        columns = torch.arange(self.next_column, self.next_column + num_tokens, device=device)
        positions = columns[None, :] - self.pad_lengths[:, None]  # padding: negative
        oldest_needed = 0 if self.window is None else max(0, first - self.window + 1)
        # Writing in place is safe unless the ring would overwrite a key the first new query still needs.
        in_place = max(0, first + num_tokens - self.capacity) <= oldest_needed
        rows = torch.arange(len(self._pads), device=device)[:, None]
        if in_place:
            kept = positions
            # Padding goes to the entry of its (negative) position modulo the capacity: the row's own
            # later tokens overwrite it, and no real query sees a negative position.
            self.position_of_entry[rows, kept % self.capacity] = kept
            visible = min(self.capacity, first + num_tokens)
            key_positions, prepend = self.position_of_entry[:, :visible], None
        else:
            # A chunk longer than the ring: attend over old entries + all new keys, then keep the newest.
            prepend = visible = max(0, min(self.capacity, first))
            key_positions = torch.cat((self.position_of_entry[:, :prepend], positions), dim=1)
            kept = positions[:, -self.capacity :]
            self.position_of_entry[rows, kept % self.capacity] = kept
        mask = self._mask(positions, key_positions)
        self._step = _Step(rows, kept % self.capacity, prepend, visible, mask)
        self.next_column += num_tokens
        return positions.clamp(min=0)

    def _mask(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        mask = band_mask(query_positions, key_positions, self.window) & (key_positions >= 0)[:, None, :]
        # A padding query sees the first key (always a finite one): an all-False row would make softmax
        # produce NaN, and NaN values stay NaN under a zero attention weight.
        mask[:, :, 0] |= query_positions < 0
        return mask[:, None]

    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        step = self._step
        if step is None:
            raise RuntimeError("RollingKVCache.update called before advance(); call advance(T) per forward")
        if layer_idx not in self.keys:
            shape = (k.shape[0], self.capacity, *k.shape[2:])
            self.keys[layer_idx] = k.new_zeros(shape)
            self.values[layer_idx] = v.new_zeros(shape)
        key_buffer, value_buffer = self.keys[layer_idx], self.values[layer_idx]
        kept = step.write_index.shape[1]
        if step.prepend is None:
            key_buffer[step.rows, step.write_index] = k[:, -kept:]
            value_buffer[step.rows, step.write_index] = v[:, -kept:]
            return key_buffer[:, : step.visible], value_buffer[:, : step.visible], step.mask
        k_all = torch.cat((key_buffer[:, : step.prepend], k), dim=1)
        v_all = torch.cat((value_buffer[:, : step.prepend], v), dim=1)
        key_buffer[step.rows, step.write_index] = k[:, -kept:]
        value_buffer[step.rows, step.write_index] = v[:, -kept:]
        return k_all, v_all, step.mask

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only these rows (in this order), e.g. when the others have stopped generating."""
        index = torch.tensor(rows, dtype=torch.long, device=self.position_of_entry.device)
        self._pads = [self._pads[row] for row in rows]
        self.pad_lengths = self.pad_lengths[index]
        self.position_of_entry = self.position_of_entry[index]
        for buffers in (self.keys, self.values):
            for layer_idx, buffer in buffers.items():
                buffers[layer_idx] = buffer[index]
        self._step = None
