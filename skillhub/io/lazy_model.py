"""A ``transformers`` model whose weights are read from its checkpoint one piece at a time.

The model is built from config.json with every parameter on the meta device (accelerate's
``init_empty_weights``; buffers such as rotary frequencies are computed for real), so building an
8B model costs nothing. :meth:`LazyModel.materialize` reads the parameters a caller is about to
run (one decoder layer, say) from the safetensors shards onto the compute device, and
:meth:`LazyModel.release` sends them back to meta; memory holds what runs, never the model.

Parameters the checkpoint stores under other names or fused differently (Mixtral's per-expert
``w1``/``w3`` inside a 3-D ``gate_up_proj``) are filled through the index maps of
:mod:`skillhub.io.layout`: transformers' own conversion, not a table of ours.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from skillhub.io.memory import return_freed_memory
from skillhub.io.checkpoint import Checkpoint
from skillhub.io.layout import CheckpointLayout, revert
from skillhub.progress import quiet_transformers


class LazyModel:
    """A causal LM built without weights over ``checkpoint``; see the module docstring.

    Attributes:
        model: The ``transformers`` model (parameters on meta until materialized).
        layout: Where each checkpoint tensor lives in it.
        device: Where materialized parameters go.
    """

    def __init__(self, checkpoint: Checkpoint, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.checkpoint = checkpoint
        self.device = torch.device(device)
        self.dtype = dtype
        with quiet_transformers():
            config = AutoConfig.from_pretrained(checkpoint.path)
            with init_empty_weights(include_buffers=False):
                # MoE experts run one expert at a time ("eager"), so each expert's inputs are seen alone.
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation="eager")
        model.tie_weights()  # from_pretrained ties a tied head to the embedding; from_config on meta does not
        self.model = model.eval().requires_grad_(False)
        for module in self.model.modules():  # buffers to the device; parameters stay on meta
            for key, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[key] = buffer.to(self.device)
        self.layout = CheckpointLayout(self.model)
        # Every (module, attribute) holding each parameter: a tied head and embedding share one.
        self._places: dict[str, list[tuple[torch.nn.Module, str]]] = {}
        name_of = {id(p): n for n, p in self.layout.parameters.items()}
        for module in self.model.modules():
            for attribute, parameter in module._parameters.items():
                if parameter is not None:
                    self._places.setdefault(name_of[id(parameter)], []).append((module, attribute))
        self._load_buffers()

    def _load_buffers(self) -> None:
        """Persistent buffers the checkpoint holds (DeepSeek-V3's router score bias) are weights too."""
        persistent = set(self.model.state_dict(keep_vars=True)) - set(self.layout.parameters)
        for name, buffer in self.model.named_buffers():
            if name not in persistent:
                continue
            saved = revert(self.model, name, torch.empty(buffer.shape, device="meta"))
            if len(saved) == 1 and next(iter(saved)) in self.checkpoint:
                buffer.copy_(self.checkpoint.read(next(iter(saved))).to(buffer.dtype).reshape(buffer.shape))

    def parameter(self, name: str) -> torch.nn.Parameter:
        """The parameter ``name`` as the model holds it now (meta or materialized)."""
        module, attribute = self._places[name][0]
        return module._parameters[attribute]

    def names(self, prefix: str = "") -> list[str]:
        """Parameter names (deduplicated: a tied weight once) starting with ``prefix``."""
        return [name for name in self._places if name.startswith(prefix)]

    def materialize(self, names: Iterable[str], *, matrices_as_stored: bool = False) -> None:
        """Read these parameters from the checkpoint onto the device, in the model's dtype.

        With ``matrices_as_stored``, 2-D parameters stored in a narrower float type (bfloat16)
        keep it: half the memory, for a caller that widens each one where it is used.
        """
        for name in names:
            self._set(name, self._read(name, as_stored=matrices_as_stored))

    def release(self, names: Iterable[str]) -> None:
        """Send these parameters back to the meta device, freeing their memory."""
        for name in names:
            self._set(name, torch.empty(self.layout.parameters[name].shape, dtype=self.dtype, device="meta"))
        return_freed_memory()

    def stored_whole(self, name: str) -> str | None:
        """The checkpoint tensor that holds parameter ``name`` whole, if one does: under the original
        format's name transformers converts from, or under its own name when the checkpoint was saved
        as the model holds it (experts fused on disk: ``save_pretrained(save_original_format=False)``).
        None when its parts are stored apart (Mixtral's per-expert ``w1``/``w3``)."""
        if name in self.checkpoint:
            return name
        return self.layout.whole.get(name)

    def _read(self, name: str, *, as_stored: bool = False) -> torch.Tensor:
        shape = self.layout.parameters[name].shape
        stored = self.stored_whole(name)
        if stored is not None:
            tensor = self.checkpoint.read(stored)
            narrower = tensor.is_floating_point() and tensor.element_size() < torch.finfo(self.dtype).bits // 8
            dtype = tensor.dtype if as_stored and len(shape) == 2 and narrower else self.dtype
            return tensor.to(self.device, dtype).reshape(shape)
        tensor = torch.empty(shape, dtype=self.dtype)
        flat = tensor.view(-1)
        for saved, index in self.layout.indices(name).items():
            flat[index.reshape(-1).long()] = self.checkpoint.read(saved).reshape(-1).to(self.dtype)
        return tensor.to(self.device)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids`` through the model's own input embedding module (scaled embeddings
        included), reading only the vocabulary rows they use from the checkpoint."""
        module = self.model.get_input_embeddings()
        name = next(n for n, places in self._places.items() if (module, "weight") in places)
        rows, remapped = torch.unique(input_ids, return_inverse=True)
        if name in self.layout.whole:
            weight = self.checkpoint.read_rows(self.layout.whole[name], rows.tolist())
        else:  # stored fused or renamed (no known model does): the whole matrix, then the rows
            weight = self._read(name)[rows]
        meta = module._parameters["weight"]
        module._parameters["weight"] = torch.nn.Parameter(weight.to(self.device, self.dtype), requires_grad=False)
        try:
            with torch.no_grad():
                return module(remapped.to(self.device))
        finally:
            module._parameters["weight"] = meta

    def _set(self, name: str, tensor: torch.Tensor) -> None:
        parameter = torch.nn.Parameter(tensor, requires_grad=False)
        for module, attribute in self._places[name]:
            module._parameters[attribute] = parameter
