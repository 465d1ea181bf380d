"""A KV-cache layer that decodes into preallocated buffers, used by `HFGenerateEngine`'s decode loop."""

from __future__ import annotations

from torch import Tensor

try:
    from transformers.cache_utils import DynamicLayer
except ImportError:  # transformers without per-layer caches: decode with whatever cache the model returns
    DynamicLayer = None


def preallocate(cache, capacity: int) -> None:
    """Swap each plain `DynamicLayer` of `cache` for one that appends in place into `capacity` slots.

    A `DynamicLayer` re-concatenates its whole K/V at every step, copying O(T²) memory over a
    completion; on the tiny CPU model that copy was 16% of decode time. Other layer types
    (sliding-window, linear attention) are left as they are.
    """
    layers = getattr(cache, "layers", None)
    if DynamicLayer is None or layers is None:
        return
    for index, layer in enumerate(layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.numel():
            layers[index] = PreallocatedLayer(layer.keys, layer.values, capacity)


PreallocatedLayer = None
if DynamicLayer is not None:

    class PreallocatedLayer(DynamicLayer):
        """A `DynamicLayer` whose K/V live in buffers of fixed capacity: `update` writes the new
        positions in place and returns views of the filled part (attention never sees the rest)."""

        def __init__(self, keys: Tensor, values: Tensor, capacity: int) -> None:
            super().__init__()
            length = keys.shape[-2]
            self._keys = keys.new_empty(*keys.shape[:-2], max(capacity, length), keys.shape[-1])
            self._values = values.new_empty(*values.shape[:-2], max(capacity, length), values.shape[-1])
            self._keys[..., :length, :] = keys
            self._values[..., :length, :] = values
            self.keys, self.values = self._keys[..., :length, :], self._values[..., :length, :]
            self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
            start = self.keys.shape[-2]
            end = start + key_states.shape[-2]
            if end > self._keys.shape[-2]:  # past the planned capacity: grow like a DynamicLayer
                return super().update(key_states, value_states, *args, **kwargs)
            self._keys[..., start:end, :] = key_states
            self._values[..., start:end, :] = value_states
            self.keys, self.values = self._keys[..., :end, :], self._values[..., :end, :]
            return self.keys, self.values

        def reorder_cache(self, beam_idx: Tensor) -> None:
            if self.keys.shape[-2] > self._keys.shape[-2]:  # grown past the buffers: a plain DynamicLayer now
                return super().reorder_cache(beam_idx)
            self._keys = self._keys.index_select(0, beam_idx.to(self._keys.device))
            self._values = self._values.index_select(0, beam_idx.to(self._values.device))
            length = self.keys.shape[-2]
            self.keys, self.values = self._keys[..., :length, :], self._values[..., :length, :]
