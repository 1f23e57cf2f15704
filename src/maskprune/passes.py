"""Where a pass over the model runs: the one seam every calibration pass calls (llm-compressor's pipelines are the
model: the algorithms never know which execution runs them).

Two executions, one interface (:class:`Execution`):

- **resident**: the whole model sits on the compute device; a logits pass is the model's own forward, batch by
  batch.
- **streamed**: one decoder layer at a time. The inputs of the first layer are captured once for every batch, then
  each layer is moved to the compute device, runs every batch, and goes back (host memory on a GPU run; on a CPU
  run the layer stays where it is, and memory falls only where the weights are memory-mapped); its outputs, kept
  in the pass's storage dtype, are the next layer's inputs. The logits come from the model's own head on the last
  layer's outputs.

Both read a layer's inputs from :class:`LayerInputs`, which holds, per batch, the hidden states and the keyword
arguments the model itself passes *that* layer: Gemma 2 / 3 give sliding and global layers their own attention
masks, and Gemma 3 its own rotary embedding (local base 10k, global 1M), SmolLM3 none to its NoPE layers. They are
captured by running the model's own forward with every decoder layer's ``forward`` replaced by a recorder that
passes its input through (:func:`capture_layer_inputs`), so whatever a family computes per layer is what the layer
gets; a layer's arguments never depend on the hidden states, only the hidden states do, and those are carried
layer to layer. The head is applied the same way (:meth:`LayerInputs.logits`): the model's own forward with every
layer replaced by a feeder of the streamed outputs, so the final norm, soft-capping (Gemma 2) and logit scaling
(Granite) are the family's own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import DecoderAdapter
from .offload import PATCHED, held, home_device, is_offloaded

__all__ = ["Execution", "LayerInputs", "capture_layer_inputs", "layer_output", "patched_forward", "patched_layers"]

log = logging.getLogger(__name__)


def layer_output(out) -> torch.Tensor:
    """A decoder layer's hidden states out of whatever it returns (a tensor, or a tuple led by it)."""
    return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def patched_forward(module: nn.Module, forward: Callable, *, unread: bool = False) -> Iterator[None]:
    """``module``'s ``forward`` replaced by ``forward`` for the duration; an instance-level ``forward`` already there
    (accelerate's hooks, an outer patch) is put back after. ``unread``: the module's weights are not read for it
    (where they wait on disk)."""
    saved = module.__dict__.get("forward")
    module.forward = forward
    if unread:
        setattr(module, PATCHED, True)
    try:
        yield
    finally:
        if unread:
            module.__dict__.pop(PATCHED, None)
        if saved is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = saved


@contextlib.contextmanager
def patched_layers(layers: nn.ModuleList, make: Callable[[int], Callable]) -> Iterator[None]:
    """Every layer's ``forward`` replaced by ``make(i)`` for the duration (its weights are never read, so a layer
    may be on another device, or on none): :func:`patched_forward` each."""
    with contextlib.ExitStack() as stack:
        for i, layer in enumerate(layers):
            stack.enter_context(patched_forward(layer, make(i), unread=True))
        yield


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """``(hidden_states, the other positional arguments, the keyword arguments)`` of a decoder layer call."""
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    rest = dict(kwargs)
    return rest.pop("hidden_states"), (), rest


@dataclasses.dataclass
class LayerInputs:
    """The inputs of one decoder layer for every calibration batch.

    ``hidden[b]``: ``[batch, seq, hidden]`` hidden states of batch ``b`` (what changes from layer to layer), kept on
    ``store_device`` in ``store_dtype`` (None: as the layer produced them). ``extra[l][b]``: ``(args, kwargs)``
    beyond the hidden states that the model passes layer ``l`` for batch ``b`` (shared tensors, not copies).
    ``layer``: which layer's inputs ``hidden`` are. ``tuple_output``: whether the layers return a tuple."""

    hidden: list[torch.Tensor]
    extra: list[list[tuple[tuple, dict]]]
    layer: int = 0
    store_dtype: torch.dtype | None = None
    store_device: torch.device | None = None
    tuple_output: bool | None = None

    def calls(self, li: int | None = None) -> list[tuple[tuple, dict]]:
        """``(args, kwargs)`` of layer ``li`` (default: the layer whose inputs these are) for every batch, on the
        hidden states held now."""
        li = self.layer if li is None else li
        return [((h, *a), k) for h, (a, k) in zip(self.hidden, self.extra[li])]

    def run(self, layer: nn.Module, li: int | None = None) -> list[torch.Tensor]:
        """``layer``'s outputs on every batch (on the layer's device)."""
        device = _device_of(layer)
        outs = []
        for args, kwargs in self.calls(li):
            out = layer(args[0].to(device), *args[1:], **kwargs)
            if self.tuple_output is None:
                self.tuple_output = isinstance(out, tuple)
            outs.append(layer_output(out))
        return outs

    def advanced(self, layer: nn.Module, li: int | None = None) -> "LayerInputs":
        """The next layer's inputs: ``layer`` (the model's layer ``li``) run on every batch."""
        li = self.layer if li is None else li
        hidden = [self._store(h) for h in self.run(layer, li)]
        return dataclasses.replace(self, hidden=hidden, layer=li + 1)

    def advance_(self, layer: nn.Module, li: int | None = None) -> None:
        """Carry these inputs on in place: ``layer`` (the model's layer ``li``) run on every batch."""
        nxt = self.advanced(layer, li)
        self.hidden, self.layer = nxt.hidden, nxt.layer

    def carried_(self, outputs: list[torch.Tensor], li: int, tuple_output: bool) -> None:
        """Carry these inputs on in place with layer ``li``'s outputs on every batch computed by the caller (the
        re-fit's, :func:`maskprune.sequential.reconstruct_layerwise_`): what :meth:`advance_` stores."""
        self.hidden, self.layer = [self._store(h) for h in outputs], li + 1
        if self.tuple_output is None:
            self.tuple_output = tuple_output

    def _store(self, h: torch.Tensor) -> torch.Tensor:
        return h.to(device=self.store_device or h.device, dtype=self.store_dtype or h.dtype)

    @torch.no_grad()
    def replay(
        self, module: nn.Module, adapter: DecoderAdapter, model: nn.Module, windows: torch.Tensor, batch_size: int
    ):
        """``module``'s output per batch (``model``, the causal LM: its logits; the decoder under its head: the
        final hidden states) from the hidden states held now (the last layer's outputs): its own forward with every
        layer feeding them, so the final norm and head (soft-capping, scaling) run as the family wrote them. Yields
        ``(batch index, output)``."""
        device = _device_of(adapter.embedding(model))
        current: dict[str, torch.Tensor] = {}

        def feeder(_i):
            def forward(*args, **kwargs):
                out = current["h"].to(device)
                return (out,) if self.tuple_output else out

            return forward

        with (
            patched_layers(adapter.layers(model), feeder),
            _unread_embedding(adapter, model),
            held(adapter.lm_head(model) if module is model else None),
        ):
            for j, i in enumerate(range(0, windows.shape[0], batch_size)):
                current["h"] = self.hidden[j]
                out = module(input_ids=windows[i : i + batch_size].to(device), use_cache=False)
                yield j, _main_output(out)


@contextlib.contextmanager
def _unread_embedding(adapter: DecoderAdapter, model: nn.Module) -> Iterator[None]:
    """While the layers replay held hidden states, an embedding whose weights wait on disk is not read for the
    outputs nobody uses: it gives zeros of its shape and dtype (the masks and positions only read their shape)."""
    emb = adapter.embedding(model)
    if not is_offloaded(emb):
        yield
        return
    width, dtype, device = emb.weight.shape[1], emb.weight.dtype, home_device(emb)

    def forward(ids, *_a, **_k):
        return torch.zeros(*ids.shape, width, dtype=dtype, device=device)

    emb.forward = forward
    setattr(emb, PATCHED, True)
    try:
        yield
    finally:
        emb.__dict__.pop("forward", None)
        emb.__dict__.pop(PATCHED, None)


class _Captured(Exception):
    """Raised by the last layer's recorder: what comes after the layers (the final norm and its hooks) must not
    run on inputs that never went through them."""


def _main_output(out) -> torch.Tensor:
    """The logits of a causal LM's output, or the last hidden states of a decoder's."""
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _device_of(module: nn.Module) -> torch.device:
    return home_device(module)


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    adapter: DecoderAdapter,
    windows: torch.Tensor,
    batch_size: int,
    *,
    store_dtype: torch.dtype | None = None,
    store_device: torch.device | None = None,
) -> LayerInputs:
    """The first layer's hidden states and every layer's other arguments, per batch of ``windows``, from the
    model's own forward (the decoder under the LM head, so no vocabulary projection) with every layer replaced by
    a recorder that passes its input through, the last one ending the forward. Only the embedding, the rotary
    embedding and the masks compute."""
    layers = adapter.layers(model)
    base = adapter.base(model)
    device = _device_of(adapter.embedding(model))
    hidden: list[torch.Tensor] = []
    extra: list[list[tuple[tuple, dict]]] = [[] for _ in layers]

    def recorder(i):
        def forward(*args, **kwargs):
            h, a, k = _split_hidden(args, kwargs)
            if i == 0:
                hidden.append(h.to(device=store_device or h.device, dtype=store_dtype or h.dtype))
            extra[i].append((a, k))
            if i == len(layers) - 1:
                raise _Captured
            return h

        return forward

    with patched_layers(layers, recorder), held(adapter.embedding(model)):
        for i in range(0, windows.shape[0], batch_size):
            try:
                base(input_ids=windows[i : i + batch_size].to(device), use_cache=False)
            except _Captured:
                pass
    return LayerInputs(hidden, extra, 0, store_dtype, store_device)


@dataclasses.dataclass(frozen=True)
class Execution:
    """How a pass over the model runs: resident (``streamed`` False) or one decoder layer at a time.

    ``device``: where layers compute. ``offload``: where a streamed layer waits between its turns (None: it stays
    where it is, as on a CPU run). ``store_dtype``: the dtype of the hidden states carried between layers (the
    autocast dtype of the run; None: as computed)."""

    device: torch.device
    streamed: bool = False
    offload: torch.device | None = None
    store_dtype: torch.dtype | None = None

    @property
    def name(self) -> str:
        return "streamed" if self.streamed else "resident"

    @contextlib.contextmanager
    def onloaded(self, module: nn.Module) -> Iterator[nn.Module]:
        """``module`` on the compute device for the duration, then back where it was: a streamed layer that waits in
        host memory (``offload``) visits the device for its turn; one already on the device stays (a model loaded
        whole on the GPU is streamed without saving device memory, but every stage after finds it as it was)."""
        if is_offloaded(module):  # its weights wait on disk: read for the turn, changes kept
            with held(module):
                yield module
            return
        home = _device_of(module)
        if not self.streamed or self.offload is None or home == self.device or home != self.offload:
            yield module
            return
        module.to(self.device)
        try:
            yield module
        finally:
            module.to(home)

    def capture(self, model: nn.Module, adapter: DecoderAdapter, windows: torch.Tensor, batch_size: int):
        return capture_layer_inputs(
            model,
            adapter,
            windows,
            batch_size,
            store_dtype=self.store_dtype,
            store_device=self.offload if self.streamed else None,
        )

    def layerwise(
        self, model: nn.Module, adapter: DecoderAdapter, windows: torch.Tensor, batch_size: int, desc: str
    ) -> Iterator[tuple[int, nn.Module, LayerInputs]]:
        """``(index, layer, its inputs)`` for every decoder layer in turn, the layer on the compute device. The
        caller carries the inputs on (``inputs.advanced(layer)``) after changing the layer as it needs; the
        layer is offloaded again when the caller moves to the next."""
        inputs = self.capture(model, adapter, windows, batch_size)
        layers = adapter.layers(model)
        for li in tqdm(range(len(layers)), desc=desc, disable=not log.isEnabledFor(logging.INFO)):
            with self.onloaded(layers[li]) as layer:
                yield li, layer, inputs

    def logits(
        self,
        model: nn.Module,
        adapter: DecoderAdapter,
        windows: torch.Tensor,
        batch_size: int,
        *,
        autocast: torch.dtype | None = None,
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(batch index, logits [batch, seq, vocab])`` of the model on every batch of ``windows``, in order.
        Resident: the model's forward; streamed: layer by layer (every batch's hidden states held at once, in
        ``store_dtype``), then the model's head."""
        return self._through(model, model, adapter, windows, batch_size, autocast)

    def hidden_states(
        self,
        model: nn.Module,
        adapter: DecoderAdapter,
        windows: torch.Tensor,
        batch_size: int,
        *,
        autocast: torch.dtype | None = None,
        after_layer: Callable[[int, nn.Module], None] | None = None,
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(batch index, final hidden states [batch, seq, hidden])``: the decoder under the LM head (its final
        norm included) on every batch of ``windows``, in order; the hooks a pass attached to the layers and norms
        run as in a forward of the model. ``after_layer(index, layer)``: called once a layer has run on every batch
        (streamed: during its turn, its weights still in memory; resident: after the pass)."""
        return self._through(adapter.base(model), model, adapter, windows, batch_size, autocast, after_layer)

    @torch.no_grad()
    def _through(
        self, module, model, adapter, windows, batch_size, autocast, after_layer=None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """``module`` (the causal LM ``model``, or the decoder under its head) on every batch: its own forward where
        resident; streamed, the layers one at a time and then ``module``'s own forward fed their outputs."""
        ctx = torch.autocast(self.device.type, dtype=autocast or torch.float32, enabled=autocast is not None)
        with ctx:
            if not self.streamed:
                for j, i in enumerate(range(0, windows.shape[0], batch_size)):
                    out = module(input_ids=windows[i : i + batch_size].to(self.device), use_cache=False)
                    yield j, _main_output(out)
                for li, layer in enumerate(adapter.layers(model) if after_layer is not None else []):
                    after_layer(li, layer)
                return
            inputs = self.capture(model, adapter, windows, batch_size)
            for li, layer in enumerate(adapter.layers(model)):
                with self.onloaded(layer):
                    inputs = inputs.advanced(layer, li)
                    if after_layer is not None:
                        after_layer(li, layer)
            yield from inputs.replay(module, adapter, model, windows, batch_size)

    def forward(
        self,
        model: nn.Module,
        adapter: DecoderAdapter,
        windows: torch.Tensor,
        batch_size: int,
        *,
        autocast: torch.dtype | None = None,
        after_layer: Callable[[int, nn.Module], None] | None = None,
    ) -> int:
        """Run the decoder on every batch for the side effects of the hooks a pass attached (activation statistics,
        norm energies); no logits. Returns the number of tokens seen. ``after_layer``: as for
        :meth:`hidden_states`."""
        for _ in self.hidden_states(model, adapter, windows, batch_size, autocast=autocast, after_layer=after_layer):
            pass
        return int(windows.numel())


def resident(model: nn.Module) -> Execution:
    """The resident execution on the device ``model`` is on."""
    return Execution(_device_of(model))
