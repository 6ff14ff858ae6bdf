"""`compress merge` against PEFT: every adapter feature, several adapters, QA-LoRA, quantized bases,
bad input.

Adapters are made by PEFT itself (``get_peft_model`` on tiny transformers models, every LoRA
parameter re-drawn at random so that B != 0, ``save_pretrained``) and the reference is PEFT's
``PeftModel.from_pretrained(...).merge_and_unload()``. Tolerances:

- one float32 adapter into a float32 base: the merged weights are *identical* (``torch.equal``):
  the same float32 operations in the same order as PEFT (measured max |diff| 0.0 for every feature);
  so are the logits of the two merged models;
- PEFT's unmerged forward pass (the adapter applied on the fly) agrees with the merged logits to
  float32 noise, atol 2e-5 on logits of magnitude ~1 (measured <= 2.6e-6, rslora the largest);
- several adapters, against PEFT's ``add_weighted_adapter`` ("linear" on disjoint modules, "cat",
  "svd"): the same sums in another order, atol 1e-6 on weights of magnitude ~0.1 (measured 3e-8);
  the SVD one 2e-5 (two SVD runs; measured 3e-7).

QA-LoRA adapters are written by hand in PEFT's format (PEFT only attaches QA-LoRA to GPTQ layers)
and checked against PEFT's own ``QALoraLinearVariant.forward`` on random inputs.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import build_tiny_llama
from conftest import run_cli as run
from safetensors.torch import load_file, save_file

from compress.formats.peft_adapter import read_adapter
from compress.merge import (
    bias_delta,
    expand_group_delta,
    module_delta,
    qalora_group_delta,
)
from compress.merge.combine import dare_mask, derive_seed

pytestmark = pytest.mark.usefixtures("one_torch_thread", "narrow_err_console")

P = "base_model.model."
VOCAB = 128
IDS = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))


# --- helpers -------------------------------------------------------------------------------------


def merge(capsys: pytest.CaptureFixture[str], base: Path, adapters: list[Path], out: Path, *options: object) -> Path:
    argv: list[object] = ["merge", base]
    for a in adapters:
        argv += ["--adapter", a]
    # CPU: the exactness checks compare with PEFT on CPU (CUDA's matmuls round differently)
    device = () if "--device" in options else ("--device", "cpu")
    r = run(capsys, *argv, "-o", out, "--quiet", *device, *options)
    assert r.rc == 0, r.err
    return out


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def load_lm(folder: Path) -> Any:
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()


@torch.no_grad()
def logits(model: Any) -> torch.Tensor:
    return model(IDS).logits


def make_adapter(base: Path, folder: Path, seed: int, **lora: Any) -> Path:
    """A PEFT adapter with every trainable parameter drawn at random (B != 0), saved by PEFT."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(load_lm(base), LoraConfig(**{"r": 4, "lora_alpha": 8, **lora}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))  # around its initial norm, as after training
            elif "lora_" in name:
                p.normal_(0, 0.1)
            elif p.requires_grad:  # modules_to_save copies, biases with bias="all"/"lora_only"
                p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(str(folder))
    return folder


@dataclass
class Reference:
    state: dict[str, torch.Tensor]  # PEFT's merge_and_unload state dict
    merged_logits: torch.Tensor
    unmerged_logits: torch.Tensor  # the adapter applied on the fly


def peft_reference(base: Path, adapters: list[Path], *, combination: str | None = None,
                   weights: list[float] | None = None, **kwargs: Any) -> Reference:
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_lm(base), str(adapters[0]), adapter_name="a0")
    for i, a in enumerate(adapters[1:], 1):
        model.load_adapter(str(a), adapter_name=f"a{i}")
    if combination:
        assert weights is not None
        model.add_weighted_adapter([f"a{i}" for i in range(len(adapters))], weights, "combined",
                                   combination_type=combination, **kwargs)
        model.set_adapter("combined")
    model.eval()
    unmerged = logits(model)
    merged = model.merge_and_unload()
    return Reference({k: v.detach().clone() for k, v in merged.state_dict().items()}, logits(merged), unmerged)


def tiny_gpt2(folder: Path) -> Path:
    """GPT-2 (Conv1D layers stored [in, out], biases everywhere), 2 layers, width 64."""
    import transformers

    torch.manual_seed(5)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(folder))
    return folder


def write_adapter(folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """An adapter folder written by hand in PEFT's format."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    return folder


def lora_pair(module: str, r: int, n_in: int, n_out: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"{P}{module}.lora_A.weight": torch.randn(r, n_in, generator=gen) * 0.1,
            f"{P}{module}.lora_B.weight": torch.randn(n_out, r, generator=gen) * 0.1}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """float32 Llama: hidden 64, intermediate 128, 2 layers, vocabulary 128, untied lm_head."""
    return build_tiny_llama(tmp_path_factory.mktemp("llama"), hidden=64, intermediate=128, layers=2, vocab=VOCAB)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gpt2(tmp_path_factory.mktemp("gpt2"))


# --- one adapter, every PEFT feature, against merge_and_unload -------------------------------------

FEATURES: dict[str, tuple[str, dict[str, Any]]] = {
    "plain": ("llama", {"target_modules": ["q_proj", "v_proj"]}),
    "rslora": ("llama", {"target_modules": ["q_proj", "k_proj", "o_proj"], "lora_alpha": 16, "use_rslora": True}),
    "rank_alpha_patterns": ("llama", {"target_modules": "all-linear",
                                      "rank_pattern": {"q_proj": 2, "layers.1.mlp.down_proj": 6},
                                      "alpha_pattern": {"v_proj": 3, "gate_proj": 32}}),
    "layers_to_transform": ("llama", {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [1]}),
    "dora": ("llama", {"target_modules": ["q_proj", "v_proj", "down_proj"], "use_dora": True}),
    "embedding": ("llama", {"target_modules": ["embed_tokens", "q_proj"]}),
    "embedding_dora": ("llama", {"target_modules": ["embed_tokens"], "use_dora": True}),
    "modules_to_save": ("llama", {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}),
    "fan_in_fan_out": ("gpt2", {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True}),
    "lora_bias": ("gpt2", {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True, "lora_bias": True}),
    "bias_all": ("gpt2", {"target_modules": ["c_attn"], "fan_in_fan_out": True, "bias": "all"}),
    "dora_fan_in_fan_out": ("gpt2", {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True,
                                     "use_dora": True}),
    "modules_to_save_gpt2": ("gpt2", {"target_modules": ["c_attn"], "fan_in_fan_out": True,
                                      "modules_to_save": ["ln_f"]}),
    "bias_all_and_lora_bias": ("gpt2", {"target_modules": ["c_attn"], "fan_in_fan_out": True, "bias": "all",
                                        "lora_bias": True}),
    "embedding_tied": ("gpt2", {"target_modules": ["wte", "c_fc"], "fan_in_fan_out": True}),
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_single_adapter_matches_peft_merge_and_unload(feature: str, llama: Path, gpt2: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    model, lora = FEATURES[feature]
    base = llama if model == "llama" else gpt2
    adapter = make_adapter(base, tmp_path / "adapter", seed=11, **lora)
    ref = peft_reference(base, [adapter])
    out = merge(capsys, base, [adapter], tmp_path / "merged")
    ours, before = tensors_of(out), tensors_of(base)
    assert set(ours) == set(before)
    changed = [n for n in ours if not torch.equal(ours[n], before[n])]
    assert changed, "the adapter changed nothing"
    for name, tensor in ours.items():
        assert tensor.dtype == before[name].dtype
        assert torch.equal(tensor, ref.state[name]), (name, (tensor - ref.state[name]).abs().max().item())
    merged_logits = logits(load_lm(out))
    assert torch.equal(merged_logits, ref.merged_logits)
    report = json.loads((out / "report.json").read_text())
    if feature == "embedding_tied":
        # GPT-2 ties lm_head to wte: merging changes both, the unmerged adapter only the input side
        assert not torch.allclose(merged_logits, ref.unmerged_logits, rtol=0, atol=2e-5)
        assert any("tie_word_embeddings" in n for n in report["notes"])
    else:
        torch.testing.assert_close(merged_logits, ref.unmerged_logits, rtol=0, atol=2e-5)
    # the report names every changed tensor, with PEFT's kinds, and measures the change
    rows = {r["tensor"]: r for r in report["tensors"]}
    # (GPT-2's biases start at zero: their relative change is inf, written as "inf" in JSON)
    assert sorted(n for n in rows if float(rows[n]["delta_rel_to_base"]) > 0) == sorted(changed)
    for name in changed:
        W, W2 = before[name].double(), ours[name].double()
        expected = float((W2 - W).norm() / W.norm()) if W.norm() > 0 else math.inf
        assert math.isclose(float(rows[name]["delta_rel_to_base"]), expected, rel_tol=1e-4)
        assert rows[name]["method"] == "exact"
    assert report["totals"]["tensors_merged"] == len(rows)


def test_features_are_read_as_peft_defines_them(llama: Path, gpt2: Path, tmp_path: Path) -> None:
    """Scaling per module from r/alpha, rank/alpha patterns and rslora; layouts; kinds."""
    a = read_adapter(make_adapter(llama, tmp_path / "p", seed=1, **FEATURES["rank_alpha_patterns"][1]))
    m = a.modules
    assert m["model.layers.0.self_attn.q_proj"].rank == 2 and m["model.layers.0.self_attn.q_proj"].scaling == 4.0
    assert m["model.layers.1.mlp.down_proj"].rank == 6 and m["model.layers.0.mlp.down_proj"].rank == 4
    assert m["model.layers.0.self_attn.v_proj"].scaling == 3 / 4
    assert m["model.layers.0.mlp.gate_proj"].scaling == 32 / 4
    assert m["model.layers.0.self_attn.k_proj"].scaling == 2.0
    rs = read_adapter(make_adapter(llama, tmp_path / "rs", seed=1, **FEATURES["rslora"][1]))
    assert rs.modules["model.layers.0.self_attn.q_proj"].scaling == 16 / math.sqrt(4)
    e = read_adapter(make_adapter(llama, tmp_path / "e", seed=1, **FEATURES["embedding_dora"][1]))
    emb = e.modules["model.embed_tokens"]
    assert emb.kind == "embedding" and emb.out_axis == 1 and emb.weight_shape == (VOCAB, 64)
    assert emb.magnitude is not None and emb.magnitude.shape == (64,)
    assert "model.embed_tokens.weight" in e.replacements  # PEFT saves the embedding layer beside its LoRA
    g = read_adapter(make_adapter(gpt2, tmp_path / "g", seed=1, **FEATURES["lora_bias"][1]))
    c_attn = g.modules["transformer.h.0.attn.c_attn"]
    assert c_attn.fan_in_fan_out and c_attn.weight_shape == (64, 192) and c_attn.bias is not None
    dW = module_delta(c_attn)
    assert dW.shape == (64, 192)
    torch.testing.assert_close(dW, (c_attn.B @ c_attn.A).T * c_attn.scaling, rtol=0, atol=0)
    db = bias_delta(c_attn)
    assert db is not None
    torch.testing.assert_close(db, c_attn.bias * 2.0, rtol=0, atol=0)
    assert g.features() == ["fan_in_fan_out", "lora_bias"]


def test_config_without_rank_alpha_or_targets_is_taken_as_peft_takes_it(llama: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """PEFT's defaults (r 8, lora_alpha 8; the target modules its mapping gives a Llama: q_proj, v_proj) with one
    warning line naming them: the merge equals PEFT's merge of the same adapter with those values written out."""
    adapter = make_adapter(llama, tmp_path / "adapter", 3, r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    bare = tmp_path / "bare"
    shutil.copytree(adapter, bare)
    config = json.loads((bare / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "target_modules"):
        config.pop(key)
    (bare / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "merged"
    capsys.readouterr()
    r = run(capsys, "merge", llama, "--adapter", bare, "-o", out, "--quiet", "--device", "cpu")
    assert r.rc == 0, r.err
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("note: ") and "r=8, lora_alpha=8" in lines[0], r.err
    assert "'r', 'lora_alpha', 'target_modules'" in lines[0]
    expected = peft_reference(llama, [adapter]).state
    merged = tensors_of(out)
    assert any(not torch.equal(merged[k], tensors_of(llama)[k]) for k in merged)
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)


def test_bfloat16_base(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bfloat16 base: PEFT keeps the LoRA weights in float32 and adds the float32 delta to the
    bfloat16 weight; we do the same, so the weights agree exactly."""
    base = build_tiny_llama(tmp_path / "bf16", dtype=torch.bfloat16, hidden=64, intermediate=128, layers=2,
                            vocab=VOCAB, seed=2)
    adapter = make_adapter(base, tmp_path / "adapter", seed=4, target_modules=["q_proj", "v_proj", "up_proj"])
    ref = peft_reference(base, [adapter])
    ours = tensors_of(merge(capsys, base, [adapter], tmp_path / "merged"))
    for name, tensor in ours.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, ref.state[name]), name
    report = json.loads((tmp_path / "merged" / "report.json").read_text())
    assert 0 < report["totals"]["max_delta_lost_to_dtype"] < 0.2  # bfloat16 rounds part of each change away


# --- several adapters ------------------------------------------------------------------------------


def test_two_adapters_on_disjoint_modules_match_peft_linear(llama: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """PEFT's 'linear' mixes A's and B's separately, which is the weighted sum only when no module
    has two adapters: then it is comparable."""
    a1 = make_adapter(llama, tmp_path / "a1", seed=1, target_modules=["q_proj", "gate_proj"])
    a2 = make_adapter(llama, tmp_path / "a2", seed=2, target_modules=["v_proj", "down_proj"], lora_alpha=16)
    ref = peft_reference(llama, [a1, a2], combination="linear", weights=[0.7, 0.3])
    ours = tensors_of(merge(capsys, llama, [a1, a2], tmp_path / "merged", "--weight", 0.7, "--weight", 0.3))
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, ref.state[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(load_lm(tmp_path / "merged")), ref.merged_logits, rtol=0, atol=2e-5)


@pytest.mark.parametrize("combine", ["sum", "cat"])
def test_two_adapters_on_shared_modules_match_peft_cat(combine: str, llama: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    a1 = make_adapter(llama, tmp_path / "a1", seed=1, target_modules=["q_proj", "v_proj", "up_proj"])
    a2 = make_adapter(llama, tmp_path / "a2", seed=2, target_modules=["q_proj", "v_proj"], r=8, lora_alpha=4,
                      use_rslora=True)
    ref = peft_reference(llama, [a1, a2], combination="cat", weights=[0.7, -0.4])
    out = merge(capsys, llama, [a1, a2], tmp_path / "merged", "--weight", 0.7, "--weight", -0.4, "--combine", combine)
    ours = tensors_of(out)
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, ref.state[name], rtol=0, atol=1e-6)
    # and exactly the weighted sum of PEFT's own per-adapter deltas (float64 here)
    base = tensors_of(llama)
    r1, r2 = peft_reference(llama, [a1]).state, peft_reference(llama, [a2]).state
    name = "model.layers.1.self_attn.q_proj.weight"
    expected = base[name].double() + 0.7 * (r1[name].double() - base[name]) - 0.4 * (r2[name].double() - base[name])
    torch.testing.assert_close(ours[name].double(), expected, rtol=0, atol=1e-6)
    rows = {r["tensor"]: r for r in json.loads((out / "report.json").read_text())["tensors"]}
    assert rows[name]["adapters"] == ["#1 a1", "#2 a2"] and rows[name]["method"] == combine
    assert rows["model.layers.0.mlp.up_proj.weight"]["adapters"] == ["#1 a1"]


def test_svd_matches_peft_svd(llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a1 = make_adapter(llama, tmp_path / "a1", seed=1, target_modules=["q_proj", "v_proj"])
    a2 = make_adapter(llama, tmp_path / "a2", seed=2, target_modules=["q_proj", "v_proj"])
    ref = peft_reference(llama, [a1, a2], combination="svd", weights=[1.0, 0.5], svd_rank=5)
    out = merge(capsys, llama, [a1, a2], tmp_path / "merged", "--weight", 1, "--weight", 0.5, "--combine", "svd",
                "--rank", 5)
    for name, tensor in tensors_of(out).items():
        torch.testing.assert_close(tensor, ref.state[name], rtol=0, atol=2e-5)
    report = json.loads((out / "report.json").read_text())
    # two rank-4 deltas: their sum has rank 8, so rank 5 drops part of it
    assert all(0 < r["deviation_from_weighted_sum"] < 1 for r in report["tensors"])


def _peft_dense_deltas(llama: Path, adapters: list[Path], name: str) -> list[torch.Tensor]:
    """PEFT's own get_delta_weight for one module, for each adapter."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_lm(llama), str(adapters[0]), adapter_name="a0")
    for i, a in enumerate(adapters[1:], 1):
        model.load_adapter(str(a), adapter_name=f"a{i}")
    layer = model.base_model.model.get_submodule(name.removesuffix(".weight"))
    return [layer.get_delta_weight(f"a{i}").detach() for i in range(len(adapters))]


def test_ties_on_peft_dense_deltas(llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """TIES with unit weights equals PEFT's merge_utils.ties applied to PEFT's dense deltas."""
    from peft.utils.merge_utils import ties

    a1 = make_adapter(llama, tmp_path / "a1", seed=1, target_modules=["q_proj"])
    a2 = make_adapter(llama, tmp_path / "a2", seed=2, target_modules=["q_proj"])
    out = merge(capsys, llama, [a1, a2], tmp_path / "merged", "--combine", "ties", "--density", 0.3)
    name = "model.layers.0.self_attn.q_proj.weight"
    expected = tensors_of(llama)[name] + ties(_peft_dense_deltas(llama, [a1, a2], name), torch.ones(2), 0.3, "total")
    torch.testing.assert_close(tensors_of(out)[name], expected, rtol=0, atol=1e-6)


def test_dare_uses_documented_masks(llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a1 = make_adapter(llama, tmp_path / "a1", seed=1, target_modules=["q_proj"])
    a2 = make_adapter(llama, tmp_path / "a2", seed=2, target_modules=["q_proj"])
    args = ("--combine", "dare", "--density", 0.4, "--seed", 9, "--weight", 0.5, "--weight", 2)
    out = merge(capsys, llama, [a1, a2], tmp_path / "merged", *args)
    name = "model.layers.1.self_attn.q_proj.weight"
    d1, d2 = _peft_dense_deltas(llama, [a1, a2], name)
    m1, m2 = (dare_mask(d1.shape, 0.4, derive_seed(9, name, k)) for k in (0, 1))
    expected = tensors_of(llama)[name] + 0.5 * (d1 * m1 / 0.4) + 2 * (d2 * m2 / 0.4)
    torch.testing.assert_close(tensors_of(out)[name], expected, rtol=0, atol=1e-6)
    again = merge(capsys, llama, [a1, a2], tmp_path / "again", *args)
    assert torch.equal(tensors_of(again)[name], tensors_of(out)[name])  # seeded: reproducible


def test_dora_combined_through_its_realised_change(llama: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    d = make_adapter(llama, tmp_path / "dora", seed=1, target_modules=["q_proj"], use_dora=True)
    p = make_adapter(llama, tmp_path / "plain", seed=2, target_modules=["q_proj"])
    out = merge(capsys, llama, [d, p], tmp_path / "merged", "--weight", 0.5, "--weight", 1)
    base = tensors_of(llama)
    dora_alone, plain_alone = peft_reference(llama, [d]).state, peft_reference(llama, [p]).state
    name = "model.layers.0.self_attn.q_proj.weight"
    expected = base[name] + 0.5 * (dora_alone[name] - base[name]) + (plain_alone[name] - base[name])
    torch.testing.assert_close(tensors_of(out)[name], expected, rtol=0, atol=1e-6)
    notes = json.loads((out / "report.json").read_text())["notes"]
    assert any("DoRA is not additive" in n for n in notes)


# --- QA-LoRA -------------------------------------------------------------------------------------


def qalora_adapter(folder: Path, group: int, seed: int, **config: Any) -> Path:
    tensors = {**lora_pair("model.layers.0.self_attn.q_proj", 4, 64 // group, 64, seed),
               **lora_pair("model.layers.1.mlp.down_proj", 4, 128 // group, 64, seed + 1)}
    return write_adapter(folder, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"],
                                  "use_qalora": True, "qalora_group_size": group, **config}, tensors)


def peft_qalora_forward(entry: Any, x: torch.Tensor) -> torch.Tensor:
    """PEFT's QALoraLinearVariant.forward on a stand-in module holding the adapter's factors."""
    from peft.tuners.lora.variants import QALoraLinearVariant

    A = torch.nn.Linear(entry.A.shape[1], entry.rank, bias=False)
    B = torch.nn.Linear(entry.rank, entry.out_features, bias=False)
    with torch.no_grad():
        A.weight.copy_(entry.A)
        B.weight.copy_(entry.B)
    module = SimpleNamespace(lora_A={"a": A}, lora_B={"a": B}, lora_dropout={"a": torch.nn.Identity()},
                             scaling={"a": entry.scaling}, qalora_group_size={"a": entry.group_size},
                             in_features=entry.in_features, training=False)
    with torch.no_grad():
        return QALoraLinearVariant.forward(module, "a", x, torch.zeros(*x.shape[:-1], entry.out_features))


@pytest.mark.parametrize("group", [8, 32])
def test_qalora_dense_delta_matches_peft_forward(group: int, tmp_path: Path) -> None:
    adapter = read_adapter(qalora_adapter(tmp_path / "qa", group, seed=3))
    for entry in adapter.modules.values():
        assert entry.kind == "qalora" and entry.group_size == group
        x = torch.randn(3, 5, entry.in_features, generator=torch.Generator().manual_seed(1))
        dW = module_delta(entry)
        assert dW.shape == (entry.out_features, entry.in_features)
        # the dense delta is constant inside every (row, group)
        assert torch.equal(dW, expand_group_delta(dW[:, ::group], group))
        torch.testing.assert_close(x @ dW.T, peft_qalora_forward(entry, x), rtol=0, atol=1e-5)
        # the group delta by hand: c * s * (B @ A) with PEFT's c = (in/g) / g
        G = qalora_group_delta(entry)
        c = (entry.in_features / group) / group
        torch.testing.assert_close(G, (entry.B @ entry.A) * (c * entry.scaling), rtol=1e-6, atol=0)
        # the other poolings differ only by their factor: mean 1/g, sum 1
        torch.testing.assert_close(qalora_group_delta(entry, "mean"), G / (entry.in_features / group), rtol=1e-6,
                                   atol=1e-9)
        torch.testing.assert_close(qalora_group_delta(entry, "sum"), G * group / (entry.in_features / group),
                                   rtol=1e-6, atol=1e-9)


def test_qalora_merge_into_float_base(llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from compress.formats.inputs import open_checkpoint
    from compress.pipeline.merge_plan import MergeOptions, plan_merge
    from compress.pipeline.merged import MergedReader

    folder = qalora_adapter(tmp_path / "qa", 16, seed=5)
    adapter = read_adapter(folder)
    base = tensors_of(llama)
    for pooling, c in (("peft", None), ("sum", 1.0)):
        out = merge(capsys, llama, [folder], tmp_path / f"merged-{pooling}", "--qalora-pooling", pooling)
        ours = tensors_of(out)
        for entry in adapter.modules.values():
            n_in, g = entry.in_features, 16
            factor = (n_in / g) / g if c is None else c
            index = torch.arange(n_in) // g  # input channel -> its group
            expected = base[entry.weight_name].double() + (
                (entry.B.double() @ entry.A.double())[:, index] * (factor * entry.scaling))
            torch.testing.assert_close(ours[entry.weight_name].double(), expected, rtol=0, atol=1e-6)
    # the per-group delta the quantized path folds into zero points
    with open_checkpoint(llama) as reader:
        merged = MergedReader(reader, plan_merge(reader, [adapter], MergeOptions()))
        name = "model.layers.1.mlp.down_proj.weight"
        group = merged.group_delta(name)
        assert group is not None and group[1] == 16 and group[0].shape == (64, 128 // 16)
        piece = merged.merge_tensor(name)
        torch.testing.assert_close(expand_group_delta(group[0], 16), piece.delta, rtol=0, atol=0)
        assert merged.group_delta("model.layers.0.mlp.up_proj.weight") is None


# --- quantized bases -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["nf4", "int4"])
def test_merge_into_quantized_base(method: str, llama: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A compress NF4/INT4 output as BASE: the adapters go into its dequantized weights, which is
    exactly merging into `compress dequantize`'s float checkpoint."""
    quantized = tmp_path / "q"
    assert run(capsys, "quantize", llama, "-o", quantized, "--method", method, "--group-size", 32, "--quiet",
               "--device", "cpu").rc == 0
    dequantized = tmp_path / "deq"
    assert run(capsys, "dequantize", quantized, "-o", dequantized, "--quiet").rc == 0
    adapter = make_adapter(llama, tmp_path / "a", seed=1, target_modules=["q_proj", "down_proj"])
    out = merge(capsys, quantized, [adapter], tmp_path / "merged")
    expected = tensors_of(merge(capsys, dequantized, [adapter], tmp_path / "merged-deq"))
    ours = tensors_of(out)
    assert set(ours) == set(expected)
    for name, tensor in ours.items():
        assert torch.equal(tensor, expected[name]), name
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    notes = json.loads((out / "report.json").read_text())["notes"]
    assert any("the base was quantized" in n for n in notes)
    logits(load_lm(out))  # loads as a plain float model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("options", [(), ("--combine", "ties", "--density", 0.3),
                                     ("--combine", "dare", "--density", 0.4), ("--combine", "svd", "--rank", 3)])
def test_cuda_agrees_with_cpu(options: tuple[object, ...], llama: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    """The same merge on CUDA: float32 rounding of another matmul; DARE masks come from a CPU
    generator, so they are the same. TIES: an element within rounding of the trim threshold may be
    kept on one device and not the other, so a few elements per tensor may differ."""
    a1 = make_adapter(llama, tmp_path / "a1", seed=1, target_modules=["q_proj", "v_proj"], use_dora=False)
    a2 = make_adapter(llama, tmp_path / "a2", seed=2, target_modules=["q_proj", "down_proj"], use_dora=True)
    cpu = tensors_of(merge(capsys, llama, [a1, a2], tmp_path / "cpu", "--weight", 0.6, "--weight", 0.8, *options))
    gpu = tensors_of(merge(capsys, llama, [a1, a2], tmp_path / "gpu", "--weight", 0.6, "--weight", 0.8, *options,
                           "--device", "cuda"))
    for name, tensor in cpu.items():
        differ = int(((gpu[name] - tensor).abs() > 2e-5).sum())
        assert differ <= (3 if "ties" in options else 0), (name, differ)


# --- output folder, dry run, provenance ------------------------------------------------------------


def test_dry_run_summarises_unless_verbose(llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The dry run lists one row per (adapters, kinds, dtype) with the count and the shapes; every tensor with -v."""
    adapter = make_adapter(llama, tmp_path / "a", seed=1, target_modules=["q_proj", "v_proj", "down_proj"])
    plan = json.loads(run(capsys, "merge", llama, "--adapter", adapter, "--dry-run", "--json").out)
    r = run(capsys, "merge", llama, "--adapter", adapter, "--dry-run")
    assert r.rc == 0 and "(every tensor: --verbose)" in r.out
    names = [t["name"] for t in plan["tensors"]]
    assert len(names) == 6 and not any(n in r.out for n in names)
    shapes: dict[str, int] = {}
    for t in plan["tensors"]:
        shape = "×".join(map(str, t["shape"]))
        shapes[shape] = shapes.get(shape, 0) + 1
    row = next(line for line in r.out.splitlines() if " linear " in line)
    assert f" {len(names)} " in row and all(f"{s} ×{n}" in row for s, n in shapes.items())
    r = run(capsys, "merge", llama, "--adapter", adapter, "--dry-run", "--verbose")
    assert r.rc == 0 and all(n in r.out for n in names)


def test_output_folder_dry_run_and_force(llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = make_adapter(llama, tmp_path / "a", seed=1, target_modules=["q_proj"])
    out = tmp_path / "merged"
    r = run(capsys, "merge", llama, "--adapter", adapter, "-o", out, "--dry-run", "--json")
    assert r.rc == 0 and not out.exists()
    plan = json.loads(r.out)
    assert [t["name"] for t in plan["tensors"]] == [f"model.layers.{i}.self_attn.q_proj.weight" for i in (0, 1)]
    assert plan["adapters"][0]["ranks"] == [4] and plan["method"] == {"method": "sum"}
    r = run(capsys, "merge", llama, "--adapter", adapter, "--dry-run")
    assert r.rc == 0 and "dry run, nothing written" in r.out
    merge(capsys, llama, [adapter], out)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["compress_provenance.json", "config.json", "generation_config.json", "model.safetensors",
                     "report.json", "report.md"]
    assert json.loads((out / "config.json").read_text()) == json.loads((llama / "config.json").read_text())
    provenance = json.loads((out / "compress_provenance.json").read_text())
    assert provenance["command"] == "merge" and provenance["adapters"] == [str(adapter.resolve())]
    assert provenance["weights"] == [1.0] and provenance["combine"] == {"method": "sum"}
    assert "# Merge report" in (out / "report.md").read_text()
    first = tensors_of(out)
    r = run(capsys, "merge", llama, "--adapter", adapter, "-o", out, "--quiet")
    assert r.rc == 2 and "already exists" in r.err
    merge(capsys, llama, [adapter], out, "--force")
    assert all(torch.equal(v, tensors_of(out)[k]) for k, v in first.items())
    r = run(capsys, "merge", llama, "--adapter", adapter, "-o", tmp_path / "shown")
    assert r.rc == 0 and "merged tensors" in r.out


# --- bad input -------------------------------------------------------------------------------------


def assert_bad(capsys: pytest.CaptureFixture[str], out: Path, *argv: object, words: tuple[str, ...]) -> str:
    """Exit 2, nothing on stdout, one line on stderr, no OUT and no temporary folder beside it."""
    before = sorted(p.name for p in out.parent.iterdir())
    r = run(capsys, "merge", *argv, "-o", out)
    assert r.rc == 2, r.err
    assert r.out == ""
    lines = r.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not out.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == before
    return lines[0]


QP = "model.layers.0.self_attn.q_proj"


def _bad_adapters(tmp: Path, case: str) -> tuple[list[Path], list[object], tuple[str, ...]]:
    """(adapters, extra options, words the message must contain) for each bad-input case."""
    ok = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    good = lora_pair(QP, 4, 64, 64, 1)
    if case == "missing_module":
        return ([write_adapter(tmp / "a", ok, lora_pair("model.layers.5.self_attn.q_proj", 4, 64, 64, 1))], [],
                ("model.layers.5.self_attn.q_proj", "no tensor"))
    if case == "shape_mismatch":
        return ([write_adapter(tmp / "a", ok, lora_pair(QP, 4, 96, 64, 1))], [],
                (QP, "[64, 96]", "[64, 64]"))
    if case == "weights_count":
        return [write_adapter(tmp / "a", ok, good)], ["--weight", 0.5, "--weight", 0.5], ("2 --weight", "1 adapters")
    if case == "nan":
        bad = dict(good)
        bad[f"{P}{QP}.lora_B.weight"] = bad[f"{P}{QP}.lora_B.weight"].clone()
        bad[f"{P}{QP}.lora_B.weight"][3, 1] = float("nan")
        return [write_adapter(tmp / "a", ok, bad)], [], (f"{QP}.lora_B.weight", "non-finite")
    if case == "different_bases":
        a1 = write_adapter(tmp / "a1", ok | {"base_model_name_or_path": "org/model-a"}, good)
        a2 = write_adapter(tmp / "a2", ok | {"base_model_name_or_path": "/models/model-b"}, good)
        return [a1, a2], [], ("different base models", "org/model-a", "/models/model-b")
    if case == "rank_disagrees":
        return ([write_adapter(tmp / "a", ok | {"rank_pattern": {"q_proj": 2}}, good)], [],
                (QP, "rank 4", "r=2"))
    if case == "not_targeted":
        return ([write_adapter(tmp / "a", ok | {"target_modules": ["v_proj"]}, good)], [],
                (QP, "target_modules", "do not select"))
    if case == "lora_bias_without_bias":
        tensors = good | {f"{P}{QP}.lora_B.bias": torch.ones(64)}
        return [write_adapter(tmp / "a", ok | {"lora_bias": True}, tensors)], [], (QP, "no bias")
    if case == "fan_in_fan_out_conflict":
        a1 = write_adapter(tmp / "a1", ok, good)
        a2 = write_adapter(tmp / "a2", ok | {"fan_in_fan_out": True}, lora_pair(QP, 4, 64, 64, 2))
        return [a1, a2], [], ("disagree on fan_in_fan_out", QP)
    if case == "unsupported_variant":
        return ([write_adapter(tmp / "a", ok | {"alora_invocation_tokens": [5, 6]}, good)], [],
                ("alora_invocation_tokens", "does not support"))
    if case == "not_lora":
        return [write_adapter(tmp / "a", ok | {"peft_type": "IA3"}, good)], [], ("peft_type", "IA3")
    if case == "missing_factor":
        return ([write_adapter(tmp / "a", ok, {f"{P}{QP}.lora_A.weight": good[f"{P}{QP}.lora_A.weight"]})], [],
                (QP, "no lora_B"))
    if case == "no_config":
        folder = write_adapter(tmp / "a", ok, good)
        (folder / "adapter_config.json").unlink()
        return [folder], [], ("adapter_config.json",)
    if case == "resized_vocab":
        tensors = good | {f"{P}lm_head.weight": torch.zeros(VOCAB + 8, 64)}
        return ([write_adapter(tmp / "a", ok | {"modules_to_save": ["lm_head"]}, tensors)], [],
                ("lm_head.weight", "vocabulary was resized"))
    if case == "dora_without_magnitude":
        return [write_adapter(tmp / "a", ok | {"use_dora": True}, good)], [], (QP, "lora_magnitude_vector")
    if case == "density_with_sum":
        return [write_adapter(tmp / "a", ok, good)], ["--density", 0.3], ("--density", "sum")
    if case == "bad_density":
        return [write_adapter(tmp / "a", ok, good)], ["--combine", "ties", "--density", 1.5], ("--density",)
    raise AssertionError(case)


BAD_CASES = ["missing_module", "shape_mismatch", "weights_count", "nan", "different_bases", "rank_disagrees",
             "not_targeted", "lora_bias_without_bias", "fan_in_fan_out_conflict", "unsupported_variant", "not_lora",
             "missing_factor", "no_config", "resized_vocab", "dora_without_magnitude", "density_with_sum",
             "bad_density"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input(case: str, llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapters, options, words = _bad_adapters(tmp_path / "adapters", case)
    argv: list[object] = [llama]
    for a in adapters:
        argv += ["--adapter", a]
    (tmp_path / "outs").mkdir()
    assert_bad(capsys, tmp_path / "outs" / "merged", *argv, *options, words=words)


def test_tied_output_head(gpt2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """GPT-2 ties lm_head to wte and stores only wte: an lm_head adapter gets an explanation."""
    adapter = write_adapter(tmp_path / "a", {"r": 4, "lora_alpha": 8, "target_modules": ["lm_head"]},
                            lora_pair("lm_head", 4, 64, VOCAB, 1))
    (tmp_path / "outs").mkdir()
    assert_bad(capsys, tmp_path / "outs" / "merged", gpt2, "--adapter", adapter,
               words=("lm_head.weight", "tie_word_embeddings", "Untie the base"))


def test_half_precision_adapter(llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bfloat16 adapter on a float32 base: PEFT loads the factors into float32 LoRA layers, as we
    read them, so the merged weights are identical."""
    folder = make_adapter(llama, tmp_path / "a", seed=3, target_modules=["q_proj", "up_proj"], use_dora=True)
    path = folder / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(path)).items()}, str(path), metadata={"format": "pt"})
    ref = peft_reference(llama, [folder])
    for name, tensor in tensors_of(merge(capsys, llama, [folder], tmp_path / "merged")).items():
        assert torch.equal(tensor, ref.state[name]), name


def test_nan_in_merged_result_leaves_no_output(llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A DoRA magnitude over a zero norm: the error comes while writing, and the partial output is removed."""
    tensors = {**lora_pair(QP, 4, 64, 64, 1), f"{P}{QP}.lora_magnitude_vector": torch.ones(64)}
    tensors[f"{P}{QP}.lora_B.weight"] = torch.zeros(64, 4)
    base = tensors_of(llama)
    base[f"{QP}.weight"][7] = 0.0  # row 7 of W + dW is zero: m / 0
    zero_row = tmp_path / "base"
    zero_row.mkdir()
    save_file(base, str(zero_row / "model.safetensors"), metadata={"format": "pt"})
    (zero_row / "config.json").write_text((llama / "config.json").read_text())
    adapter = write_adapter(tmp_path / "a", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "use_dora": True},
                            tensors)
    (tmp_path / "outs").mkdir()
    assert_bad(capsys, tmp_path / "outs" / "merged", zero_row, "--adapter", adapter,
               words=(f"{QP}.weight", "non-finite"))
