"""Run a model decoder block by decoder block on calibration tokens, through transformers' own modules.

The model is built by transformers from the checkpoint's config on the ``meta`` device (no memory), and only
what the calibration needs is made real: the embeddings (and the rotary embedding of decoder families), then
one block at a time, each filled with its weights read from the checkpoint. The inputs of the first block are
caught as the model's own forward hands them over (hidden states and every keyword it passes: attention mask,
position embeddings, ...), so masks and positions are transformers' own, whatever the architecture.

Per block (:class:`Block`): :meth:`Block.statistics` runs the block on every sample with hooks on its Linear
layers and returns each one's H = X^T X (float32 [in, in]) and row count; the caller quantizes the weights;
:meth:`Block.finish` loads the quantized (dequantized) weights into the block, runs it again, and its outputs
become the next block's inputs -- GPTQ's sequential scheme: block k+1 is calibrated on what the quantized
block k really produces. Memory: one block's weights plus the activations of every sample (two copies of
[samples, length, hidden] float32) plus the H of the block's Linear layers.

Architectures: the Llama family (llama, mistral, qwen2, qwen3; SmolLM is llama) and BERT encoders
(:data:`ARCHITECTURES`); any other gets one clear line.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from compress.errors import InputError
from compress.formats.checkpoint import CheckpointReader


@dataclass(frozen=True)
class Architecture:
    """Where a family keeps its blocks (``layers``: the ModuleList's path in the transformers model), which
    modules run before the first block (``before``), and whether it is a causal LM or an encoder."""

    layers: str
    before: tuple[str, ...]
    causal: bool


_DECODER = Architecture(layers="model.layers", before=("model.embed_tokens", "model.rotary_emb"), causal=True)
ARCHITECTURES: dict[str, Architecture] = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "bert": Architecture(layers="encoder.layer", before=("embeddings",), causal=False),
}


class _Caught(Exception):
    """Raised by the catcher in place of the first block: the model's forward stops there."""


class _Catcher(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args:  # positional extras (BERT passes attention_mask positionally in some versions)
            kwargs = {**dict(zip(("attention_mask",), args, strict=False)), **kwargs}
        self.calls.append((hidden_states, kwargs))
        raise _Caught


@dataclass
class LinearStatistics:
    """H = X^T X over the ``rows`` input vectors a Linear saw (float32 [in, in]), or with ``diagonal`` statistics
    only its diagonal, the per-column sums of squares (float32 [in]: an importance matrix's ``in_sum2``)."""

    H: torch.Tensor
    rows: int


def architecture_of(config: dict[str, Any], where: str) -> Architecture:
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise InputError(f"the calibration runner does not know the architecture {model_type!r}", where=where,
                         fix=f"Calibrated algorithms support {', '.join(ARCHITECTURES)}; use --algorithm rtn or "
                             "optimize for this model.")
    return ARCHITECTURES[model_type]


def _build_skeleton(config_dict: dict[str, Any], arch: Architecture) -> torch.nn.Module:
    import transformers

    config_dict = {k: v for k, v in config_dict.items() if k != "quantization_config"}
    model_type = config_dict.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **config_dict)
    auto = transformers.AutoModelForCausalLM if arch.causal else transformers.AutoModel
    with torch.device("meta"):
        model = auto.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    return model.eval()


class CalibrationRunner:
    """Iterate over the blocks of ``reader``'s model run on ``tokens`` (int64 [samples, length]); see the module
    docstring. ``batch``: samples per forward call."""

    def __init__(self, reader: CheckpointReader, tokens: torch.Tensor, device: torch.device, batch: int = 8) -> None:
        where = str(reader.path)
        if not reader.config:
            raise InputError("no config.json: the calibration runner cannot tell the architecture", where=where,
                             fix="Calibrate a checkpoint folder with its config.json (or a GGUF).")
        self.arch = architecture_of(reader.config, where)
        self.reader = reader
        self.device = device
        self.model = _build_skeleton(dict(reader.config), self.arch)
        self.names = {info.name for info in reader.infos()}
        self.prefix = self._checkpoint_prefix()
        self.layers: torch.nn.ModuleList = self.model.get_submodule(self.arch.layers)
        self.batch = batch
        self.inputs, self.kwargs = self._first_inputs(tokens)

    @property
    def n_blocks(self) -> int:
        return len(self.layers)

    def block_prefix(self, index: int) -> str:
        """The checkpoint name prefix of block ``index`` (e.g. 'model.layers.3.')."""
        return f"{self.prefix}{self.arch.layers}.{index}."

    def _checkpoint_prefix(self) -> str:
        probe = f"{self.arch.layers}.0."
        for name in sorted(self.names):
            at = name.find(probe)
            if at >= 0 and (at == 0 or name[at - 1] == "."):
                return name[:at]
        raise InputError(f"no tensor of the first block ('{probe}...') in the checkpoint", where=str(self.reader.path),
                         fix="Check that config.json describes this checkpoint.")

    def _materialize(self, module: torch.nn.Module, path: str) -> None:
        """Allocate ``module`` (at ``path`` in the model) on the device and fill it from the checkpoint; buffers
        the checkpoint lacks (rotary frequencies, position ids) are rebuilt as their module's __init__ makes them."""
        if path.endswith("rotary_emb"):  # frequencies only: rebuild the module with its config, for real
            rebuilt = type(module)(config=self.model.config).to(self.device)
            parent, _, leaf = path.rpartition(".")
            setattr(self.model.get_submodule(parent), leaf, rebuilt)
            return
        module.to_empty(device=self.device)
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            full = f"{self.prefix}{path}.{name}"
            if full in self.names:
                with torch.no_grad():
                    tensor.copy_(self.reader.get(full).to(self.device, torch.float32))
            elif name.endswith("position_ids"):
                tensor.copy_(torch.arange(tensor.shape[-1], device=self.device).expand_as(tensor))
            elif name.endswith("token_type_ids"):
                tensor.zero_()
            else:
                raise InputError(f"the checkpoint lacks '{full}', which the model needs", where=str(self.reader.path),
                                 fix="Check that config.json describes this checkpoint.")

    @torch.no_grad()
    def _first_inputs(self, tokens: torch.Tensor) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
        for path in self.arch.before:
            self._materialize(self.model.get_submodule(path), path)
        first = self.layers[0]
        catcher = _Catcher()
        self.layers[0] = catcher
        base = self.model.get_submodule(self.arch.layers.split(".")[0]) if self.arch.causal else self.model
        try:
            for i in range(0, tokens.shape[0], self.batch):
                with contextlib.suppress(_Caught):
                    base(input_ids=tokens[i:i + self.batch].to(self.device), use_cache=False)
        finally:
            self.layers[0] = first
        return [h for h, _ in catcher.calls], [kw for _, kw in catcher.calls]

    @torch.no_grad()
    def head_statistics(self) -> dict[str, LinearStatistics]:
        """After the last block (causal LMs): the sums of squares of the output head's inputs (the final norm of
        the last block's outputs), by the head's checkpoint weight name; {} for encoders."""
        if not self.arch.causal:
            return {}
        norm_path = self.arch.layers.rsplit(".", 1)[0] + ".norm"
        self._materialize(self.model.get_submodule(norm_path), norm_path)
        norm = self.model.get_submodule(norm_path)
        sums = None
        rows = 0
        for hidden in self.inputs:
            x = norm(hidden).reshape(-1, hidden.shape[-1]).float()
            sums = x.square().sum(0) if sums is None else sums + x.square().sum(0)
            rows += x.shape[0]
        assert sums is not None
        return {f"{self.prefix}lm_head.weight": LinearStatistics(sums, rows)}

    def __iter__(self) -> Iterator[Block]:
        for index in range(self.n_blocks):
            block = Block(self, index)
            yield block
            block.release()


class Block:
    """One block of the model, real on the device while it is being calibrated."""

    def __init__(self, runner: CalibrationRunner, index: int) -> None:
        self.runner = runner
        self.index = index
        self.prefix = runner.block_prefix(index)
        self.module = runner.layers[index]
        runner._materialize(self.module, f"{runner.arch.layers}.{index}")
        # weight name in the checkpoint -> its Linear
        self.linears = {f"{self.prefix}{name}.weight": m for name, m in self.module.named_modules()
                        if isinstance(m, torch.nn.Linear)}

    def _forward(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        out = self.module(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def statistics(self, diagonal: bool = False) -> dict[str, LinearStatistics]:
        """H = X^T X (or its diagonal) and row count of every Linear of the block, over every calibration sample."""
        stats: dict[str, LinearStatistics] = {}
        # Linear layers that share their input (q/k/v, gate/up) share its statistics. The cache holds the input
        # tensor itself: compared by identity while it is alive (an id() could be reused by a later tensor).
        seen: list[Any] = []
        handles = []
        for name, linear in self.linears.items():
            def hook(module: torch.nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                if not seen or seen[0] is not args[0]:
                    x = args[0].reshape(-1, args[0].shape[-1]).float()
                    seen[:] = [args[0], x.square().sum(0) if diagonal else x.T @ x, x.shape[0]]
                value, rows = seen[1], seen[2]
                entry = stats.get(name)
                if entry is None:
                    stats[name] = LinearStatistics(value.clone(), rows)
                else:
                    entry.H += value
                    entry.rows += rows

            handles.append(linear.register_forward_pre_hook(hook))
        try:
            for hidden, kwargs in zip(self.runner.inputs, self.runner.kwargs, strict=True):
                self._forward(hidden, kwargs)
                seen.clear()
        finally:
            for h in handles:
                h.remove()
        return stats

    @torch.no_grad()
    def finish(self, weights: dict[str, torch.Tensor]) -> None:
        """Load ``weights`` (checkpoint name -> the weight as the quantized file reconstructs it) into the block and
        run it again: its outputs are the next block's inputs."""
        for name, W in weights.items():
            self.linears[name].weight.copy_(W.to(self.runner.device, torch.float32))
        self.runner.inputs = [self._forward(h, kw) for h, kw in zip(self.runner.inputs, self.runner.kwargs,
                                                                    strict=True)]

    def release(self) -> None:
        """Give the block's memory back (the module returns to the meta device)."""
        self.module.to("meta")
