"""A per-layer key/value cache for decoding a left-padded batch, as a ring buffer of slots.

Prompts of different lengths are left-padded so that every row's next token lands in the same
column ("slot"); row b's token in slot s has position s - pad_b. Slot distances equal position
distances, so causality and the sliding window are one band mask over slots (kernels.masks.band_mask,
the rule training uses), plus "key is not padding" per row.

With a window only the last W slots can ever be seen again, so the buffer holds W slots and
wraps around (a rolling cache): memory does not grow with the generated length. Without a
window the buffer is sized for the whole sequence and never wraps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mistral_lightning.kernels.masks import band_mask


@dataclass
class _Step:
    """Where the tokens of one forward pass go and what each of them may see (shared by all layers)."""

    write_index: torch.Tensor  # buffer entries that receive the step's last `len(write_index)` tokens
    prepend: int | None  # concat mode: attend over buffer[:prepend] + the new tokens; None: in place
    visible: int  # in-place mode: attend over buffer[:visible]
    mask: torch.Tensor  # bool [B, 1, T_new, T_keys]


class RollingKVCache:
    """Implements the model's `KVCache` protocol: `update(layer_idx, k, v) -> (k_all, v_all, mask)`.

    Call `advance(num_tokens)` before each forward pass; it returns the rotary position ids of the new
    tokens. Head count and head size are read from the first `update`, so under tensor parallelism
    the cache simply holds the local heads.
    """

    def __init__(self, pad_lengths: torch.Tensor, capacity: int, window: int | None) -> None:
        self.pad_lengths = pad_lengths
        self.capacity = capacity
        self.window = window
        # The sequence slot held by each buffer entry; -1 while empty.
        self.slot_of_entry = torch.full((capacity,), -1, dtype=torch.long, device=pad_lengths.device)
        self.next_slot = 0
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self._step: _Step | None = None

    def advance(self, num_tokens: int) -> torch.Tensor:
        """Reserve the next `num_tokens` slots of every row; returns their position ids [B, num_tokens]."""
        device = self.slot_of_entry.device
        first = self.next_slot
        if first + num_tokens > self.capacity and (self.window is None or self.capacity < self.window):
            raise RuntimeError(
                f"KV cache of {self.capacity} slots is full at slot {first}; size it for the prompt plus "
                "max_new_tokens, or for at least the sliding window"
            )
        new_slots = torch.arange(first, first + num_tokens, device=device)
        oldest_needed = 0 if self.window is None else max(0, first - self.window + 1)
        # Writing in place is safe unless the ring would overwrite a key the first new query still needs.
        in_place = max(0, first + num_tokens - self.capacity) <= oldest_needed
        if in_place:
            write_index = new_slots % self.capacity
            self.slot_of_entry[write_index] = new_slots
            visible = min(self.capacity, first + num_tokens)
            key_slots, prepend = self.slot_of_entry[:visible], None
        else:
            # A chunk longer than the ring: attend over old entries + all new keys, then keep the newest.
            prepend = visible = min(self.capacity, first)
            key_slots = torch.cat((self.slot_of_entry[:prepend], new_slots))
            kept = new_slots[-self.capacity :]
            write_index = kept % self.capacity
            self.slot_of_entry[write_index] = kept
        self._step = _Step(write_index, prepend, visible, self._mask(new_slots, key_slots))
        self.next_slot += num_tokens
        return (new_slots[None, :] - self.pad_lengths[:, None]).clamp(min=0)

    def _mask(self, query_slots: torch.Tensor, key_slots: torch.Tensor) -> torch.Tensor:
        band = band_mask(query_slots, key_slots, self.window) & (key_slots >= 0)  # empty entries hold -1
        real_key = key_slots[None, :] >= self.pad_lengths[:, None]
        mask = band[None] & real_key[:, None, :]
        # A padding query sees only itself: an all-False row would make softmax produce NaN.
        mask |= (query_slots[:, None] == key_slots[None, :])[None]
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
        kept = len(step.write_index)
        if step.prepend is None:
            key_buffer.index_copy_(1, step.write_index, k[:, -kept:])
            value_buffer.index_copy_(1, step.write_index, v[:, -kept:])
            return key_buffer[:, : step.visible], value_buffer[:, : step.visible], step.mask
        k_all = torch.cat((key_buffer[:, : step.prepend], k), dim=1)
        v_all = torch.cat((value_buffer[:, : step.prepend], v), dim=1)
        key_buffer.index_copy_(1, step.write_index, k[:, -kept:])
        value_buffer.index_copy_(1, step.write_index, v[:, -kept:])
        return k_all, v_all, step.mask
