"""Weights that wait on disk: a model whose decoder layers, embedding and LM head hold their matrices only while
they compute or are changed, so a cut needs memory for one layer at a time whatever the model's size.

The model is built from its config with no storage for its parameters (accelerate's ``init_empty_weights``);
every one-dimensional parameter (norms, biases: a few megabytes even at 70B) is read at once and stays. Every
matrix waits on disk, in the checkpoint's safetensors files, as a placeholder on PyTorch's meta device with its
shape and dtype (so parameter counts, shapes and the structure read as for a loaded model). A :class:`_Slot` groups
the matrices one module owns (a decoder layer; the embedding, with a tied LM head; an untied LM head): the slot
is *held* for a forward (hooks before and after, so any forward of the model runs with one layer in memory) or for
a change made in place (:func:`held`), reading its matrices from disk into the run's device and dtype; when the
last holder lets go, the matrices that changed (re-fit, sliced, folded; a tensor replaced or written in place) are
written to a scratch folder and read from there from then on, and the placeholders come back. llm-compressor's
``update_offload_parameter`` and accelerate's disk offload work this way; accelerate's offload alone does not keep a
change, which a cut makes on every layer.

What a slot costs: its matrices in the run's dtype while held, plus what safetensors maps of the file while they
are read. A pass holds one layer (the embedding at its start, the head at its end).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .errors import MaskPruneError

__all__ = [
    "PATCHED",
    "close_all",
    "DiskWeights",
    "slot_owners",
    "disk_weights",
    "held",
    "home_device",
    "checkpoint_files",
    "read_tensors",
    "is_offloaded",
]

log = logging.getLogger(__name__)

_SLOT = "_maskprune_slot"
PATCHED = "_maskprune_patched"
"""Set on a module whose forward is replaced for a pass that does not read its weights (no slot is held for it)."""


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Every tensor name of a safetensors checkpoint folder and the file that holds it (the index's weight map, or
    the single ``model.safetensors``)."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise MaskPruneError(
            f"cannot stream the weights of {str(folder)!r} from disk",
            expected="model.safetensors or model.safetensors.index.json in the folder",
            fix="run with --streaming off, or convert the checkpoint to safetensors",
        )
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def read_tensors(
    sources: dict[str, tuple[Path, str]], names: list[str], device, dtypes: dict[str, torch.dtype]
) -> dict:
    """The tensors ``names`` (each read from its ``(file, key)``), on ``device`` in their dtype in ``dtypes``; each
    file is opened once and closed after, so no mapping of it outlives the read."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(sources[name][0], []).append(name)
    out = {}
    for file, group in by_file.items():
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in group:
                t = f.get_tensor(sources[name][1])
                out[name] = t.to(device=device, dtype=dtypes[name]).contiguous()
                del t
    return out


def _matrices(module: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(name, owning submodule, attribute)`` of every parameter of ``module`` with two or more dimensions (each
    shared one once), in ``named_parameters`` order."""
    out, seen = [], set()
    for mod_name, mod in module.named_modules():
        for attr, p in mod._parameters.items():
            if p is None or p.dim() < 2 or id(p) in seen:
                continue
            seen.add(id(p))
            out.append((f"{mod_name}.{attr}" if mod_name else attr, mod, attr))
    return out


def _fingerprint(p: torch.Tensor) -> tuple:
    return id(p), p._version, p.data_ptr(), p.dtype, tuple(p.shape)


@dataclasses.dataclass(eq=False)
class _Slot:
    """The matrices one module owns: ``owner`` (named ``prefix`` in the model), and ``aliases``, other
    ``(module, attribute)`` that hold the same tensor as ``owner``'s ``weight`` (a tied LM head)."""

    prefix: str
    owner: nn.Module
    sources: dict[str, tuple[Path, str]]  # matrix name under the owner -> (file, key in file)
    aliases: list[tuple[nn.Module, str]] = dataclasses.field(default_factory=list)
    holders: int = 0
    loaded: dict[str, tuple] = dataclasses.field(default_factory=dict)  # name -> fingerprint when read
    generation: int = 0


class DiskWeights:
    """The slots of one model and where their matrices are read and written (see the module's docstring).
    ``device``: where a held slot's matrices go; ``scratch``: the folder of changed matrices (removed by
    :meth:`close`)."""

    def __init__(self, slots: list[_Slot], device: torch.device, scratch: Path) -> None:
        self.slots = slots
        self.device = torch.device(device)
        self.scratch = Path(scratch)
        self.spills = 0  # slots written to the scratch folder
        self._hooks: list = []
        weakref.finalize(self, shutil.rmtree, str(self.scratch), True)  # dropped without close(), or at exit
        _OPEN.add(self)
        for slot in slots:
            for module in [slot.owner] + [m for m, _ in slot.aliases]:
                setattr(module, _SLOT, (self, slot))
                self._hooks.append(module.register_forward_pre_hook(self._before))
                # always_call: a forward stopped early by an exception (the re-fit stops a layer at the input it
                # needs) still lets go of what it read; without it the slot stayed held for the rest of the run
                self._hooks.append(module.register_forward_hook(self._after, always_call=True))

    # ---- building -----------------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls, config, folder: Path, adapter, *, device, dtype: torch.dtype, scratch: Path | None = None
    ) -> tuple[nn.Module, "DiskWeights"]:
        """The causal LM of ``config`` with its one-dimensional parameters read from ``folder`` (a safetensors
        checkpoint) and every matrix waiting there; its decoder layers, embedding and LM head are slots."""
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        files = checkpoint_files(folder)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.tie_weights()  # as from_pretrained does: a tied head shares the embedding's tensor
        model.eval()
        names = dict(model.named_parameters())
        missing = sorted(n for n in names if n not in files)
        if missing:
            raise MaskPruneError(
                f"cannot stream {str(folder)!r} from disk: the checkpoint's tensor names are not the model's",
                found=f"{len(missing)} parameters without a tensor, e.g. {missing[:3]}",
                fix="run with --streaming off (the model then loads whole)",
            )
        small = [n for n, p in names.items() if p.dim() < 2]
        values = read_tensors({n: (files[n], n) for n in small}, small, device, {n: dtype for n in small})
        for n, v in values.items():
            mod_name, _, attr = n.rpartition(".")
            mod = model.get_submodule(mod_name)
            mod._parameters[attr] = nn.Parameter(v, requires_grad=False)
        for p in model.parameters():
            p.requires_grad_(False)
        slots = cls._slots(model, adapter, files)
        covered = {id(p) for s in slots for _, m, a in _matrices(s.owner) for p in [m._parameters[a]]}
        stray = [n for n, p in model.named_parameters() if p.dim() >= 2 and id(p) not in covered]
        for n in stray:  # a matrix outside the layers, embedding and head: read once, kept
            mod_name, _, attr = n.rpartition(".")
            mod = model.get_submodule(mod_name)
            value = read_tensors({n: (files[n], n)}, [n], device, {n: dtype})[n]
            mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
        return model, cls(slots, device, Path(scratch) if scratch is not None else new_scratch())

    @staticmethod
    def _slots(model: nn.Module, adapter, files: dict[str, Path]) -> list[_Slot]:
        named = {id(m): n for n, m in model.named_modules()}
        emb, head = adapter.embedding(model), adapter.lm_head(model)
        tied = head is not None and head.weight is emb.weight
        owners = [emb, *adapter.layers(model)] + ([head] if head is not None and not tied else [])
        slots = []
        for owner in owners:
            prefix = named[id(owner)]
            sources = {n: (files[f"{prefix}.{n}"], f"{prefix}.{n}") for n, _, _ in _matrices(owner)}
            slots.append(_Slot(prefix, owner, sources, [(head, "weight")] if owner is emb and tied else []))
        return slots

    # ---- holding ------------------------------------------------------------------------------------------------
    def _before(self, module: nn.Module, _args) -> None:
        if not getattr(module, PATCHED, False):
            self.acquire(getattr(module, _SLOT)[1])

    def _after(self, module: nn.Module, _args, _out) -> None:
        if not getattr(module, PATCHED, False):
            self.release(getattr(module, _SLOT)[1])

    def acquire(self, slot: _Slot) -> None:
        """Hold ``slot``: its matrices read from disk onto the device on the first hold."""
        slot.holders += 1
        if slot.holders > 1:
            return
        mats = _matrices(slot.owner)
        unknown = [n for n, m, a in mats if n not in slot.sources and m._parameters[a].is_meta]
        if unknown:
            raise MaskPruneError(
                f"internal error: {slot.prefix} lost matrices {unknown[:3]} (changed while they waited on disk)",
                fix="this is a maskprune bug: please report it with the command",
            )
        dtypes = {n: m._parameters[a].dtype for n, m, a in mats}
        todo = [n for n, m, a in mats if m._parameters[a].is_meta]
        values = read_tensors(slot.sources, todo, self.device, dtypes) if todo else {}
        for n, mod, attr in mats:
            if n in values:
                value, placeholder = values.pop(n), mod._parameters[attr]
                if value.shape != placeholder.shape:  # changed while on disk: a bug, never a silent misread
                    raise MaskPruneError(
                        f"internal error: {slot.prefix}.{n} is {tuple(placeholder.shape)} in the model and "
                        f"{tuple(value.shape)} on disk (it was changed while its weights waited on disk)",
                        fix="this is a maskprune bug: please report it with the command",
                    )
                mod._parameters[attr] = nn.Parameter(value, requires_grad=placeholder.requires_grad)
            slot.loaded[n] = _fingerprint(mod._parameters[attr])
        self._tie(slot)

    def release(self, slot: _Slot) -> None:
        """Let go of ``slot``: on the last release, its changed matrices written to the scratch folder, then every
        matrix a placeholder again."""
        slot.holders -= 1
        if slot.holders > 0:
            return
        mats = _matrices(slot.owner)
        changed = any(
            not m._parameters[a].is_meta and slot.loaded.get(n) != _fingerprint(m._parameters[a]) for n, m, a in mats
        )
        if changed:
            self._spill(slot, mats)
        for _n, mod, attr in mats:
            p = mod._parameters[attr]
            if not p.is_meta:
                mod._parameters[attr] = nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=p.requires_grad
                )
        slot.loaded = {}
        self._tie(slot)

    def _tie(self, slot: _Slot) -> None:
        for mod, attr in slot.aliases:
            mod._parameters[attr] = slot.owner.weight

    def _spill(self, slot: _Slot, mats) -> None:
        from safetensors.torch import save_file

        slot.generation += 1
        path = self.scratch / f"{slot.prefix}.{slot.generation}.safetensors"
        self.scratch.mkdir(parents=True, exist_ok=True)
        tensors = {
            n: m._parameters[a].detach().to("cpu").contiguous() for n, m, a in mats if not m._parameters[a].is_meta
        }
        missing = [n for n, m, a in mats if m._parameters[a].is_meta]
        if missing:  # a slot partly held (never happens: a hold reads every matrix)
            raise MaskPruneError(f"internal error: {slot.prefix} spilled while partly on disk ({missing[:3]})")
        save_file(tensors, str(path))
        old = {file for file, _ in slot.sources.values() if file.parent == self.scratch}
        slot.sources = {n: (path, n) for n in tensors}
        for file in old - {path}:
            file.unlink(missing_ok=True)
        self.spills += 1

    @contextlib.contextmanager
    def holding(self, module: nn.Module) -> Iterator[nn.Module]:
        slot = getattr(module, _SLOT)[1]
        self.acquire(slot)
        try:
            yield module
        finally:
            self.release(slot)

    # ---- the end ------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """The hooks removed and the scratch folder deleted (the model's matrices are placeholders after)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        shutil.rmtree(self.scratch, ignore_errors=True)
        _OPEN.discard(self)


_OPEN: "weakref.WeakSet[DiskWeights]" = weakref.WeakSet()


def close_all() -> None:
    """Close every :class:`DiskWeights` still open (the end of a run: the scratch folders go)."""
    for store in list(_OPEN):
        store.close()


_SCRATCH_PREFIX = "maskprune-offload-"


def new_scratch() -> Path:
    """A fresh scratch folder for changed matrices, in ``$MASKPRUNE_OFFLOAD_DIR`` (default: the system's temporary
    folder; a cut of a large model writes about its fp32 size there), named with the process id; folders that
    processes no longer running left behind (a run killed with -9) are removed first."""
    root = Path(os.environ.get("MASKPRUNE_OFFLOAD_DIR") or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob(f"{_SCRATCH_PREFIX}*-*"):
        pid = old.name[len(_SCRATCH_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{_SCRATCH_PREFIX}{os.getpid()}-", dir=root))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def disk_weights(module: nn.Module) -> DiskWeights | None:
    """The :class:`DiskWeights` ``module`` (a slot's owner, or any module of a model with one) belongs to."""
    tag = getattr(module, _SLOT, None)
    if tag is not None:
        return tag[0]
    for sub in module.modules():
        tag = getattr(sub, _SLOT, None)
        if tag is not None:
            return tag[0]
    return None


def slot_owners(model: nn.Module) -> dict[str, nn.Module]:
    """The owner of every slot of ``model`` by its current name (after a depth cut, the layers' new names), in the
    model's module order; empty for a model without :class:`DiskWeights`."""
    return {name: m for name, m in model.named_modules() if _owns_slot(m)}


def _owns_slot(module: nn.Module) -> bool:
    tag = getattr(module, _SLOT, None)
    return tag is not None and tag[1].owner is module


def is_offloaded(module: nn.Module) -> bool:
    return getattr(module, _SLOT, None) is not None


@contextlib.contextmanager
def held(module: nn.Module | None) -> Iterator[nn.Module | None]:
    """``module``'s matrices in memory for the duration where they wait on disk (a slot's owner); a no-op for any
    other module. Changes made inside are kept."""
    tag = getattr(module, _SLOT, None) if module is not None else None
    if tag is None:
        yield module
        return
    with tag[0].holding(module):
        yield module


def home_device(module: nn.Module) -> torch.device:
    """Where ``module``'s parameters compute: the store's device for a module whose matrices wait on disk, else
    its first parameter's device (CPU for a module without parameters)."""
    tag = getattr(module, _SLOT, None)
    if tag is not None:
        return tag[0].device
    p = next(module.parameters(), None)
    if p is not None and p.is_meta:
        store = disk_weights(module)
        if store is not None:
            return store.device
    return p.device if p is not None else torch.device("cpu")
