"""`compress extract-lora` end to end: planted deltas recovered, rank rules, PEFT round trips, bad input.

Checkpoints are tiny real architectures (Llama from conftest, a Qwen2 built here for biases); the
fine-tuned model is written by hand as base + a known delta, so every expected value (factors,
ranks, errors, logits) is computed independently of the package: float64 SVDs, transformers
forward passes and PEFT's own loader. Torch runs on one thread here (see ``one_torch_thread``).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import build_tiny_llama
from conftest import run_cli as run
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.usefixtures("one_torch_thread", "narrow_err_console")

P = "base_model.model."
VOCAB = 256


# --- helpers -------------------------------------------------------------------------------------


def extract(capsys: pytest.CaptureFixture[str], base: Path, tuned: Path, out: Path, *options: object) -> Path:
    r = run(capsys, "extract-lora", "--base", base, "--tuned", tuned, "-o", out, "--quiet", *options)
    assert r.rc == 0, r.err
    return out


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    return folder


def config_of(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())


def variant(base: Path, folder: Path, edits: dict[str, torch.Tensor | None], **config_changes: Any) -> Path:
    """A copy of ``base`` with some tensors replaced (None: removed) and config keys changed."""
    tensors = tensors_of(base)
    for name, value in edits.items():
        if value is None:
            tensors.pop(name)
        else:
            tensors[name] = value
    return write_checkpoint(folder, tensors, config_of(base) | config_changes)


def linear_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The Linear weights inside the transformer blocks."""
    return sorted(n for n, t in tensors.items() if t.dim() == 2 and ".layers." in n and n.endswith(".weight"))


def planted_delta(shape: tuple[int, ...], rank: int, gen: torch.Generator) -> torch.Tensor:
    """A float64 delta of exactly ``rank``, entries of std ~0.02 (weights have std 0.05)."""
    B = torch.randn(shape[0], rank, generator=gen, dtype=torch.float64)
    A = torch.randn(rank, shape[1], generator=gen, dtype=torch.float64)
    return B @ A * (0.02 / math.sqrt(rank))


def spectrum_delta(shape: tuple[int, ...], s: list[float], gen: torch.Generator) -> torch.Tensor:
    """U diag(s) V^T with orthonormal U [out, k], V [in, k] (float64)."""
    k = len(s)
    U, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=gen, dtype=torch.float64))
    return U @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ V.T


def add(base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return (base.double() + delta).float()


def adapter_of(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    config = json.loads((folder / "adapter_config.json").read_text())
    report = json.loads((folder / "report.json").read_text())
    return tensors, config, report


def lora_product(tensors: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """B @ A (float64) of a Linear LoRA module, in the weight's [out, in] layout."""
    return tensors[f"{P}{module}.lora_B.weight"].double() @ tensors[f"{P}{module}.lora_A.weight"].double()


def singular_values(delta: torch.Tensor) -> np.ndarray:
    """The whole spectrum in float64 (LAPACK through torch: numpy's threaded BLAS crawls on shared CPUs)."""
    return torch.linalg.svdvals(delta.double()).numpy()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def stored_delta(base: Path, tuned: Path, name: str) -> torch.Tensor:
    """The delta the checkpoints really hold (tuned - base of the stored float32 values), float64."""
    return tensors_of(tuned)[name].double() - tensors_of(base)[name].double()


def modules_of(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["module"]: m for m in report["modules"]}


def load_lm(folder: Path) -> Any:
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def logits(model: Any) -> torch.Tensor:
    return model(IDS).logits.double()


def load_peft(base: Path, adapter: Path) -> Any:
    """PeftModel.from_pretrained with no missing-key warning; a second load of the same adapter under
    another name must report no missing and no unexpected keys (PEFT's own accounting)."""
    import peft

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(load_lm(base), str(adapter))
    key_warnings = [str(w.message) for w in caught
                    if any(s in str(w.message).lower() for s in ("missing", "unexpected", "not initialized",
                                                                   "mismatch"))]
    assert key_warnings == []
    probe = model.load_adapter(str(adapter), adapter_name="probe")
    assert list(probe.missing_keys) == []
    assert list(probe.unexpected_keys) == []
    model.delete_adapter("probe")
    model.set_adapter("default")
    return model.eval()


def lora_layers(model: Any) -> dict[str, Any]:
    """Module name in the base model -> PEFT LoRA layer."""
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix(P): m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def assert_bad_input(capsys: pytest.CaptureFixture[str], out: Path, *argv: object, words: tuple[str, ...]) -> str:
    """Exit 2, nothing on stdout, one line on stderr starting 'error:', no OUT and no temp folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    before = sorted(p.name for p in out.parent.iterdir())
    r = run(capsys, "extract-lora", *argv, "-o", out)
    assert r.rc == 2
    assert r.out == ""
    lines = r.err.splitlines()
    assert len(lines) == 1, r.err
    assert lines[0].startswith("error: ")
    for word in words:
        assert word in lines[0].lower(), lines[0]
    assert not out.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == before
    return lines[0]


# --- checkpoints -----------------------------------------------------------------------------------


@dataclass
class Planted:
    base: Path
    tuned: Path
    deltas: dict[str, torch.Tensor]  # weight name -> planted float64 delta
    ranks: dict[str, int]  # weight name -> planted rank
    unchanged: list[str]  # Linear weights left as in the base


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Planted:
    """Tiny Llama; TUNED = base + a rank-k delta (k in 1..4, different per module) on 11 of the 14
    Linear weights; the other 3 (and norms, embeddings, head) unchanged."""
    root = tmp_path_factory.mktemp("planted")
    base = build_tiny_llama(root / "base")
    tensors = tensors_of(base)
    gen = torch.Generator().manual_seed(1)
    deltas, ranks, unchanged = {}, {}, []
    for i, name in enumerate(linear_names(tensors)):
        if i % 5 == 2:
            unchanged.append(name)
            continue
        ranks[name] = (4, 2, 3, 1)[i % 4]
        deltas[name] = planted_delta(tuple(tensors[name].shape), ranks[name], gen)
    tuned = variant(base, root / "tuned", {n: add(tensors[n], d) for n, d in deltas.items()})
    return Planted(base, tuned, deltas, ranks, unchanged)


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory, planted: Planted) -> Path:
    """TUNED = base + a full-rank random perturbation (std 0.01) of every Linear weight."""
    tensors = tensors_of(planted.base)
    gen = torch.Generator().manual_seed(2)
    edits = {n: add(tensors[n], torch.randn(tensors[n].shape, generator=gen, dtype=torch.float64) * 0.01)
             for n in linear_names(tensors)}
    return variant(planted.base, tmp_path_factory.mktemp("dense") / "tuned", edits)


# --- 1. planted LoRA recovery ----------------------------------------------------------------------


def test_auto_engine_rule() -> None:
    from compress.lowrank.svd import EXACT_MAX_SIDE, pick_engine

    assert pick_engine("auto", (576, 1536), 64) == "exact"  # small matrices: exact, like mergekit's
    assert pick_engine("auto", (EXACT_MAX_SIDE, 4 * EXACT_MAX_SIDE), 16) == "exact"
    assert pick_engine("auto", (4096, 11008), 16) == "randomized"  # large ones, small rank: randomized
    assert pick_engine("auto", (4096, 11008), 2048) == "exact"  # unless the rank is large next to the side
    assert pick_engine("randomized", (64, 64), 4) == "randomized"


@pytest.mark.parametrize(("options", "engine"), [
    (["--rank", "4"], "exact"),  # auto: matrices up to 1024 on their smaller side get the exact SVD
    (["--rank", "6"], "exact"),
    (["--rank", "4", "--svd", "exact"], "exact"),
    (["--rank", "4", "--svd", "randomized"], "randomized"),
    (["--energy", "1.0"], "exact"),  # auto: the bound is the whole spectrum
])
def test_planted_deltas_are_recovered(planted: Planted, tmp_path: Path, capsys, options: list[str],
                                      engine: str) -> None:
    out = extract(capsys, planted.base, planted.tuned, tmp_path / "adapter", *options)
    tensors, config, report = adapter_of(out)
    changed = {n.removesuffix(".weight") for n in planted.deltas}
    # Exactly the changed modules, as LoRA pairs of matching shapes.
    assert set(tensors) == {f"{P}{m}.lora_{x}.weight" for m in changed for x in "AB"}
    rows = modules_of(report)
    assert set(rows) == changed
    for name, delta in planted.deltas.items():
        module = name.removesuffix(".weight")
        A, B = tensors[f"{P}{module}.lora_A.weight"], tensors[f"{P}{module}.lora_B.weight"]
        assert A.dtype == B.dtype == torch.float32
        r = A.shape[0]
        if options[0] == "--rank":
            assert r == int(options[1])
        else:
            assert r >= planted.ranks[name]
        assert A.shape == (r, delta.shape[1]) and B.shape == (delta.shape[0], r)
        assert rel(lora_product(tensors, module), delta) < 1e-5
        row = rows[module]
        assert row["rank"] == r
        assert row["kind"] == "lora" and row["engine"] == engine
        assert row["retained_energy"] == pytest.approx(1.0, abs=1e-5)
        assert row["rel_error"] < 1e-5
        assert row["delta_rel_to_base"] == pytest.approx(float(delta.norm() / tensors_of(planted.base)[name]
                                                               .double().norm()), rel=1e-5)
    # Unchanged tensors (3 Linear weights, norms, embeddings, head) are counted, not extracted.
    all_names = set(tensors_of(planted.base))
    assert set(report["unchanged"]) == all_names - set(planted.deltas)
    assert set(planted.unchanged) <= set(report["unchanged"])
    assert report["dropped"] == []
    totals = report["totals"]
    assert totals["modules_extracted"] == len(changed) == 11
    assert totals["modules_unchanged"] == len(all_names) - 11
    assert totals["worst_retained_energy"] == pytest.approx(1.0, abs=1e-5)
    # The adapter's size is what is in the file.
    assert totals["adapter_bytes"] == sum(t.numel() * 4 for t in tensors.values())
    # Scaling 1: alpha equals r for every module; PEFT's target rule picks exactly the changed modules.
    for module in changed:
        r_eff = config["rank_pattern"].get(module, config["r"])
        assert r_eff == tensors[f"{P}{module}.lora_A.weight"].shape[0]
        assert config["alpha_pattern"].get(module, config["lora_alpha"]) == r_eff
    every_module = {n.rsplit(".", 1)[0] for n in all_names}
    targeted = {m for m in every_module if any(m == t or m.endswith("." + t) for t in config["target_modules"])}
    assert targeted == changed
    assert config["lora_bias"] is False and config["modules_to_save"] is None


def test_energy_one_keeps_the_planted_rank(planted: Planted, tmp_path: Path, capsys) -> None:
    out = extract(capsys, planted.base, planted.tuned, tmp_path / "adapter", "--energy", "1.0")
    tensors, _, _ = adapter_of(out)
    got = {n: tensors[f"{P}{n.removesuffix('.weight')}.lora_A.weight"].shape[0] for n in planted.deltas}
    assert got == planted.ranks


def test_targets_regex_reports_the_other_changes(planted: Planted, tmp_path: Path, capsys) -> None:
    out = extract(capsys, planted.base, planted.tuned, tmp_path / "adapter", "--rank", "4",
                  "--targets", r"self_attn\.(q|v)_proj")
    tensors, _, report = adapter_of(out)
    wanted = {n for n in planted.deltas if ".q_proj." in n or ".v_proj." in n}
    assert {k.removeprefix(P).rsplit(".", 2)[0] + ".weight" for k in tensors} == wanted
    dropped = {d["name"]: d["reason"] for d in report["dropped"]}
    assert dropped == {n: "not a target module" for n in set(planted.deltas) - wanted}


# --- 2. rank rules ---------------------------------------------------------------------------------

SPECTRA = {
    "model.layers.0.self_attn.q_proj.weight": [2.0 * 0.5**i for i in range(10)],  # [128, 128]
    "model.layers.0.mlp.down_proj.weight": [1.0] * 6 + [0.1] * 6,  # [128, 256]
    "model.layers.1.self_attn.v_proj.weight": np.linspace(1.5, 0.15, 10).tolist(),  # [64, 128]
}


@pytest.fixture(scope="module")
def spectral(tmp_path_factory: pytest.TempPathFactory, planted: Planted) -> Path:
    tensors = tensors_of(planted.base)
    gen = torch.Generator().manual_seed(3)
    edits = {n: add(tensors[n], spectrum_delta(tuple(tensors[n].shape), s, gen)) for n, s in SPECTRA.items()}
    return variant(planted.base, tmp_path_factory.mktemp("spectral") / "tuned", edits)


def numpy_energy_rank(delta: torch.Tensor, energy: float) -> int:
    s = singular_values(delta)
    retained = np.cumsum(s**2) / np.sum(s**2)
    return int(np.argmax(retained >= energy)) + 1


@pytest.mark.parametrize(("options", "expected"), [
    (["--energy", "0.9"], {"q_proj": 2, "down_proj": 6, "v_proj": 6}),
    (["--energy", "0.995"], {"q_proj": 4, "down_proj": 9, "v_proj": 9}),
    (["--energy", "0.995", "--svd", "randomized", "--max-rank", "16"], {"q_proj": 4, "down_proj": 9, "v_proj": 9}),
    (["--energy", "0.995", "--max-rank", "5"], {"q_proj": 4, "down_proj": 5, "v_proj": 5}),
    (["--sv-threshold", "0.32"], {"q_proj": 3, "down_proj": 6, "v_proj": 8}),
    (["--sv-threshold", "0.32", "--max-rank", "4"], {"q_proj": 3, "down_proj": 4, "v_proj": 4}),
    (["--rank", "8", "--max-rank", "3"], {"q_proj": 3, "down_proj": 3, "v_proj": 3}),
])
def test_rank_rules(planted: Planted, spectral: Path, tmp_path: Path, capsys, options: list[str],
                    expected: dict[str, int]) -> None:
    out = extract(capsys, planted.base, spectral, tmp_path / "adapter", *options)
    tensors, config, report = adapter_of(out)
    rows = modules_of(report)
    assert set(rows) == {n.removesuffix(".weight") for n in SPECTRA}
    max_rank = int(options[options.index("--max-rank") + 1]) if "--max-rank" in options else 256
    for name, s in SPECTRA.items():
        module = name.removesuffix(".weight")
        delta = stored_delta(planted.base, spectral, name)
        s_np = singular_values(delta)
        np.testing.assert_allclose(s_np[: len(s)], s, rtol=1e-5)  # the spectrum is the chosen one
        if options[0] == "--energy":
            want = min(numpy_energy_rank(delta, float(options[1])), max_rank)
        elif options[0] == "--sv-threshold":
            want = min(int(np.sum(s_np > float(options[1]))), max_rank)
        else:
            want = min(int(options[1]), max_rank)
        assert want == expected[name.split(".")[-2]]
        r = tensors[f"{P}{module}.lora_A.weight"].shape[0]
        assert r == rows[module]["rank"] == want
        # Kept energy and error of a truncated exact spectrum (Eckart-Young).
        kept = float(np.sum(s_np[:r] ** 2) / np.sum(s_np**2))
        assert rows[module]["retained_energy"] == pytest.approx(kept, abs=1e-5)
        assert rows[module]["rel_error"] == pytest.approx(math.sqrt(max(1 - kept, 0)), abs=1e-4)
    # rank_pattern / alpha_pattern: the most common rank is r, the others are overrides, alpha = r.
    ranks = {m: tensors[f"{P}{m}.lora_A.weight"].shape[0] for m in rows}
    counts = {r: list(ranks.values()).count(r) for r in ranks.values()}
    default = max(counts, key=lambda r: (counts[r], r))
    assert config["r"] == config["lora_alpha"] == default
    assert config["rank_pattern"] == {m: r for m, r in ranks.items() if r != default}
    assert config["alpha_pattern"] == config["rank_pattern"]


def test_per_module_ranks_are_honoured_by_peft(planted: Planted, spectral: Path, tmp_path: Path, capsys) -> None:
    """Thresholds below every planted value keep all of them: ranks 10 / 12 / 10, a rank_pattern entry,
    and an adapter that reproduces the tuned model."""
    out = extract(capsys, planted.base, spectral, tmp_path / "adapter", "--sv-threshold", "1e-3")
    _, config, _ = adapter_of(out)
    assert config["r"] == 10
    assert config["rank_pattern"] == {"model.layers.0.mlp.down_proj": 12}
    model = load_peft(planted.base, out)
    layers = lora_layers(model)
    assert set(layers) == {n.removesuffix(".weight") for n in SPECTRA}
    for name, s in SPECTRA.items():
        layer = layers[name.removesuffix(".weight")]
        assert layer.r["default"] == len(s)
        assert layer.lora_A["default"].weight.shape[0] == len(s)
        assert layer.scaling["default"] == 1.0
    tuned = logits(load_lm(spectral))
    assert float((logits(load_lm(planted.base)) - tuned).abs().max()) > 0.05  # the deltas matter
    assert float((logits(model) - tuned).abs().max()) < 2e-5


# --- 3. PEFT round trip ----------------------------------------------------------------------------


def test_peft_round_trip_and_merge_of_planted_adapter(planted: Planted, tmp_path: Path, capsys) -> None:
    out = extract(capsys, planted.base, planted.tuned, tmp_path / "adapter", "--rank", "4")
    tensors, _, _ = adapter_of(out)
    model = load_peft(planted.base, out)
    assert set(lora_layers(model)) == {n.removesuffix(".weight") for n in planted.deltas}
    tuned = logits(load_lm(planted.tuned))
    base_logits = logits(load_lm(planted.base))
    assert float((base_logits - tuned).abs().max()) > 0.1
    assert float((logits(model) - tuned).abs().max()) < 2e-5
    # merge_and_unload: base + B @ A for every changed module, the base elsewhere.
    merged = model.merge_and_unload().state_dict()
    base = tensors_of(planted.base)
    assert set(merged) == set(base)
    for name, W in base.items():
        if name in planted.deltas:
            expected = W.double() + lora_product(tensors, name.removesuffix(".weight"))
            torch.testing.assert_close(merged[name].double(), expected, rtol=0, atol=2e-6)
        else:
            assert torch.equal(merged[name], W), name


@pytest.mark.parametrize("engine", ["exact", "randomized"])
def test_peft_round_trip_of_a_full_rank_delta(planted: Planted, dense: Path, tmp_path: Path, capsys,
                                              engine: str) -> None:
    """A full-rank delta at rank 8: the reported error is the measured one (the Eckart-Young optimum for
    the exact SVD, above it for the randomized one), and the adapter moves the model part of the way
    to the tuned one (exactly as far as base + B @ A does)."""
    out = extract(capsys, planted.base, dense, tmp_path / "adapter", "--rank", "8", "--svd", engine)
    tensors, _, report = adapter_of(out)
    rows = modules_of(report)
    base = tensors_of(planted.base)
    reference = load_lm(planted.base)
    names = linear_names(base)
    assert set(rows) == {n.removesuffix(".weight") for n in names}
    for name in names:
        module = name.removesuffix(".weight")
        delta = stored_delta(planted.base, dense, name)
        BA = lora_product(tensors, module)
        assert BA.shape == delta.shape
        measured = rel(BA, delta)
        s = singular_values(delta)
        eckart_young = float(np.sqrt(np.sum(s[8:] ** 2) / np.sum(s**2)))
        assert 0.5 < eckart_young < 1.0  # not low rank: most of the delta is left out
        row = rows[module]
        assert row["rank"] == 8 and row["engine"] == engine
        assert row["rel_error"] == pytest.approx(measured, rel=1e-5)
        # B @ A projects dW onto r directions, so the error is sqrt(1 - retained) for both engines.
        assert row["rel_error"] == pytest.approx(math.sqrt(1 - row["retained_energy"]), rel=1e-5)
        assert row["eckart_young_rel_error"] == pytest.approx(math.sqrt(1 - row["retained_energy"]), rel=1e-5)
        if engine == "exact":
            assert row["rel_error"] == pytest.approx(eckart_young, rel=1e-5)
            assert row["retained_energy"] == pytest.approx(float(np.sum(s[:8] ** 2) / np.sum(s**2)), rel=1e-5)
        else:  # no rank-8 approximation beats the optimum; the issue allows 2% above it
            assert eckart_young * (1 - 1e-6) <= measured < eckart_young * 1.02
        with torch.no_grad():
            reference.get_submodule(module).weight.copy_((base[name].double() + BA).float())
    assert report["totals"]["max_rel_error"] == pytest.approx(max(r["rel_error"] for r in rows.values()))
    model = load_peft(planted.base, out)
    adapted, tuned, original = logits(model), logits(load_lm(dense)), logits(load_lm(planted.base))
    assert float((adapted - logits(reference)).abs().max()) < 2e-5
    gap = float((original - tuned).norm())
    assert 0.5 * gap < float((adapted - tuned).norm()) < gap  # closer to tuned, far from equal


# --- 4. biases and changes LoRA cannot carry -------------------------------------------------------


def build_tiny_qwen2(folder: Path) -> Path:
    import transformers

    torch.manual_seed(4)
    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
            else:  # norm scales around 1, biases around 0
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    return folder


Q0 = "model.layers.0.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"
K0 = "model.layers.0.self_attn.k_proj"
NORM1 = "model.layers.1.input_layernorm.weight"


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """Qwen2 (q/k/v carry biases). TUNED: q_proj (layer 0) and v_proj (layer 1) weight + bias changed,
    k_proj bias changed with its weight unchanged, and a norm scale changed."""
    root = tmp_path_factory.mktemp("qwen2")
    base = build_tiny_qwen2(root / "base")
    tensors = tensors_of(base)
    assert f"{Q0}.bias" in tensors
    gen = torch.Generator().manual_seed(5)
    deltas = {f"{Q0}.weight": planted_delta(tuple(tensors[f"{Q0}.weight"].shape), 2, gen),
              f"{V1}.weight": planted_delta(tuple(tensors[f"{V1}.weight"].shape), 3, gen)}
    for name in (f"{Q0}.bias", f"{V1}.bias", f"{K0}.bias", NORM1):
        deltas[name] = torch.randn(tensors[name].shape, generator=gen, dtype=torch.float64) * 0.1
    tuned = variant(base, root / "tuned", {n: add(tensors[n], d) for n, d in deltas.items()})
    return base, tuned, deltas


@pytest.mark.parametrize("lora_only", [False, True], ids=["default", "lora-only"])
def test_bias_deltas_travel_with_lora_bias(qwen2, tmp_path: Path, capsys, lora_only: bool) -> None:
    base, tuned, deltas = qwen2
    out = extract(capsys, base, tuned, tmp_path / "adapter", "--rank", "4", *(["--lora-only"] if lora_only else []))
    tensors, config, report = adapter_of(out)
    assert config["lora_bias"] is True
    lora = {f"{P}{m}.lora_{x}" for m in (Q0, V1) for x in ("A.weight", "B.weight", "B.bias")}
    norm_module = NORM1.removesuffix(".weight")
    for module in (Q0, V1):
        assert rel(lora_product(tensors, module), deltas[f"{module}.weight"]) < 1e-5
        torch.testing.assert_close(tensors[f"{P}{module}.lora_B.bias"].double(),
                                   stored_delta(base, tuned, f"{module}.bias"), rtol=0, atol=1e-7)
    assert report["totals"]["bias_deltas"] == 2
    # Changes LoRA cannot carry are listed with their reason, never silently lost. The changed norm scale is
    # kept whole (modules_to_save, bit for bit the tuned one) unless --lora-only.
    dropped = {d["name"]: d for d in report["dropped"]}
    assert dropped[f"{K0}.bias"]["reason"] == "bias changed but its weight did not"
    if lora_only:
        assert set(tensors) == lora and config["modules_to_save"] is None
        assert set(dropped) == {f"{K0}.bias", NORM1}
        assert dropped[NORM1]["reason"] == "vector (--lora-only)"
        norm = tensors_of(base)[NORM1].double()
        assert dropped[NORM1]["delta_rel_to_base"] == pytest.approx(float(stored_delta(base, tuned, NORM1).norm()
                                                                          / norm.norm()), rel=1e-6)
    else:
        assert set(tensors) == lora | {f"{P}{NORM1}"} and config["modules_to_save"] == [norm_module]
        assert torch.equal(tensors[f"{P}{NORM1}"], tensors_of(tuned)[NORM1])
        assert set(dropped) == {f"{K0}.bias"}
        assert report["totals"]["modules_saved_whole"] == 1
        assert any("kept whole in modules_to_save" in n for n in report["notes"])
    # PEFT: the adapted model is the tuned one minus the dropped changes.
    model = load_peft(base, out)
    assert model.get_submodule(f"{P}{Q0}").lora_B["default"].bias is not None
    expected = load_lm(tuned)
    originals = tensors_of(base)
    with torch.no_grad():
        expected.get_submodule(K0).bias.copy_(originals[f"{K0}.bias"])
        if lora_only:
            expected.get_submodule(norm_module).weight.copy_(originals[NORM1])
    reference = logits(expected)
    assert float((logits(load_lm(tuned)) - reference).abs().max()) > 1e-3  # the dropped changes matter
    assert float((logits(model) - reference).abs().max()) < 2e-5


def test_dropped_bias_reports_its_relative_change(qwen2, tmp_path: Path, capsys) -> None:
    base, tuned, _ = qwen2
    out = extract(capsys, base, tuned, tmp_path / "adapter", "--rank", "4")
    _, _, report = adapter_of(out)
    entry = next(d for d in report["dropped"] if d["name"] == f"{K0}.bias")
    bias = tensors_of(base)[f"{K0}.bias"].double()
    expected = float(stored_delta(base, tuned, f"{K0}.bias").norm() / bias.norm())
    assert expected > 0.5
    assert entry["delta_rel_to_base"] == pytest.approx(expected, rel=1e-6)


def test_bias_of_a_rank_zero_module_is_reported_dropped(qwen2, tmp_path: Path, capsys) -> None:
    base, tuned, deltas = qwen2
    top = {m: float(singular_values(deltas[f"{m}.weight"])[0]) for m in (Q0, V1)}
    low, high = sorted(top, key=top.get)
    threshold = (top[low] + top[high]) / 2
    assert top[low] < threshold < top[high]  # one module keeps rank 0, the other stays
    out = extract(capsys, base, tuned, tmp_path / "adapter", "--sv-threshold", threshold)
    tensors, _, report = adapter_of(out)
    assert not any(k.startswith(f"{P}{low}.") for k in tensors)
    assert f"{P}{high}.lora_B.bias" in tensors
    assert report["totals"]["bias_deltas"] == sum(k.endswith(".bias") for k in tensors) == 1
    assert f"{low}.bias" in {d["name"] for d in report["dropped"]}


# --- 5. embeddings and output head -----------------------------------------------------------------

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"


@pytest.fixture(scope="module")
def with_embeddings(tmp_path_factory: pytest.TempPathFactory, planted: Planted) -> tuple[Path, dict[str, Any]]:
    """TUNED: rank-3 deltas on embed_tokens and lm_head, rank-2 on one Linear."""
    tensors = tensors_of(planted.base)
    gen = torch.Generator().manual_seed(6)
    deltas = {n: planted_delta(tuple(tensors[n].shape), k, gen) for n, k in
              ((EMBED, 3), (HEAD, 3), ("model.layers.0.self_attn.o_proj.weight", 2))}
    tuned = variant(planted.base, tmp_path_factory.mktemp("embeddings") / "tuned",
                    {n: add(tensors[n], d) for n, d in deltas.items()})
    return tuned, deltas


def test_embeddings_skipped_by_default_are_reported(planted: Planted, with_embeddings, tmp_path: Path,
                                                    capsys) -> None:
    tuned, _ = with_embeddings
    out = extract(capsys, planted.base, tuned, tmp_path / "adapter", "--rank", "4")
    tensors, config, report = adapter_of(out)
    assert set(tensors) == {f"{P}model.layers.0.self_attn.o_proj.lora_{x}.weight" for x in "AB"}
    assert config["modules_to_save"] is None
    assert {d["name"]: d["reason"] for d in report["dropped"]} == {
        EMBED: "embedding or output head (--embeddings skip)", HEAD: "embedding or output head (--embeddings skip)"}


def test_embeddings_as_lora(planted: Planted, with_embeddings, tmp_path: Path, capsys) -> None:
    tuned, deltas = with_embeddings
    out = extract(capsys, planted.base, tuned, tmp_path / "adapter", "--rank", "4", "--embeddings", "lora")
    tensors, config, report = adapter_of(out)
    e = f"{P}model.embed_tokens"
    assert tensors[f"{e}.lora_embedding_A"].shape == (4, VOCAB)  # [r, vocab]
    assert tensors[f"{e}.lora_embedding_B"].shape == (128, 4)  # [dim, r]
    assert not any(k.startswith(e) and k.endswith(".weight") for k in tensors)
    embedding_delta = (tensors[f"{e}.lora_embedding_B"].double() @ tensors[f"{e}.lora_embedding_A"].double()).T
    assert rel(embedding_delta, deltas[EMBED]) < 1e-5
    assert rel(lora_product(tensors, "lm_head"), deltas[HEAD]) < 1e-5
    assert modules_of(report)["model.embed_tokens"]["kind"] == "embedding-lora"
    assert report["dropped"] == []
    assert config["modules_to_save"] is None
    model = load_peft(planted.base, out)
    assert {"model.embed_tokens", "lm_head", "model.layers.0.self_attn.o_proj"} == set(lora_layers(model))
    assert float((logits(model) - logits(load_lm(tuned))).abs().max()) < 2e-5


def test_embeddings_full_copies(planted: Planted, with_embeddings, tmp_path: Path, capsys) -> None:
    tuned, _ = with_embeddings
    out = extract(capsys, planted.base, tuned, tmp_path / "adapter", "--rank", "4", "--embeddings", "full")
    tensors, config, report = adapter_of(out)
    assert sorted(config["modules_to_save"]) == ["lm_head", "model.embed_tokens"]
    tuned_tensors = tensors_of(tuned)
    for name in (EMBED, HEAD):
        assert torch.equal(tensors[P + name], tuned_tensors[name])
    assert report["totals"]["modules_saved_whole"] == 2
    model = load_peft(planted.base, out)
    assert float((logits(model) - logits(load_lm(tuned))).abs().max()) < 2e-5


@pytest.fixture(scope="module")
def bigger_vocab(tmp_path_factory: pytest.TempPathFactory, planted: Planted) -> Path:
    """TUNED: 4 new token rows in embed_tokens and lm_head, and a changed Linear."""
    tensors = tensors_of(planted.base)
    gen = torch.Generator().manual_seed(8)
    name = "model.layers.1.mlp.up_proj.weight"
    edits = {n: torch.cat([tensors[n], torch.randn(4, tensors[n].shape[1], generator=gen) * 0.05])
             for n in (EMBED, HEAD)}
    edits[name] = add(tensors[name], planted_delta(tuple(tensors[name].shape), 2, gen))
    return variant(planted.base, tmp_path_factory.mktemp("vocab") / "tuned", edits, vocab_size=VOCAB + 4)


def test_vocabulary_change_with_skip_is_a_note(planted: Planted, bigger_vocab: Path, tmp_path: Path,
                                               capsys) -> None:
    out = extract(capsys, planted.base, bigger_vocab, tmp_path / "adapter", "--rank", "2")
    tensors, _, report = adapter_of(out)
    assert set(tensors) == {f"{P}model.layers.1.mlp.up_proj.lora_{x}.weight" for x in "AB"}
    for name in (EMBED, HEAD):
        assert any(f"'{name}'" in n and "vocabulary" in n and f"{VOCAB} -> {VOCAB + 4}" in n for n in report["notes"])


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_vocabulary_change_with_lora_or_full_is_refused(planted: Planted, bigger_vocab: Path, tmp_path: Path,
                                                        capsys, mode: str) -> None:
    line = assert_bad_input(capsys, tmp_path / "outs" / "adapter", "--base", planted.base, "--tuned", bigger_vocab,
                            "--embeddings", mode, words=("resize", "vocabulary"))
    assert "embed_tokens" in line or "lm_head" in line


# --- 6. bad input ----------------------------------------------------------------------------------


def nan_tensor(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[3, 5] = float("nan")
    return t


UP1 = "model.layers.1.mlp.up_proj.weight"
BAD_CHECKPOINTS = {
    "linear shape differs": (lambda t: {"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 128)}, {},
                             ("q_proj", "[128, 128]", "[64, 128]")),
    "model_type differs": (lambda t: {"model.layers.0.self_attn.q_proj.weight": t[
        "model.layers.0.self_attn.q_proj.weight"] + 0.01}, {"model_type": "mistral"}, ("llama", "mistral")),
    "no common matrix": (lambda t: {**{n: None for n in t}, **{"backbone." + n: v for n, v in t.items()}}, {},
                         ("share no weight matrix",)),
    "nan in tuned": (lambda t: {UP1: nan_tensor(t[UP1])}, {}, ("up_proj", "nan")),
    "identical": (lambda t: {}, {}, ("does not differ",)),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoints(planted: Planted, tmp_path: Path, capsys, case: str) -> None:
    edits, config, words = BAD_CHECKPOINTS[case]
    tuned = variant(planted.base, tmp_path / "tuned", edits(tensors_of(planted.base)), **config)
    assert_bad_input(capsys, tmp_path / "outs" / "adapter", "--base", planted.base, "--tuned", tuned,
                     "--rank", "4", words=words)


@pytest.mark.parametrize(("options", "words"), [
    (["--energy", "0"], ("energy",)),
    (["--energy", "1.5"], ("energy",)),
    (["--rank", "0"], ("rank",)),
    (["--rank", "4", "--energy", "0.9"], ("exactly one",)),
    (["--energy", "0.9", "--sv-threshold", "0.1"], ("exactly one",)),
    (["--sv-threshold", "-1"], ("threshold",)),
    (["--max-rank", "0"], ("max rank",)),
])
def test_bad_options(planted: Planted, tmp_path: Path, capsys, options: list[str], words: tuple[str, ...]) -> None:
    assert_bad_input(capsys, tmp_path / "outs" / "adapter", "--base", planted.base, "--tuned", planted.tuned,
                     *options, words=words)


def test_existing_output_needs_force(planted: Planted, tmp_path: Path, capsys) -> None:
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run(capsys, "extract-lora", "--base", planted.base, "--tuned", planted.tuned, "-o", out, "--rank", "4")
    assert r.rc == 2 and r.out == ""
    assert len(r.err.splitlines()) == 1 and r.err.startswith("error: ") and "already exists" in r.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    extract(capsys, planted.base, planted.tuned, out, "--rank", "4", "--force")
    assert (out / "adapter_model.safetensors").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_tensors_in_one_checkpoint_only_are_a_note(planted: Planted, tmp_path: Path, capsys) -> None:
    tuned = variant(planted.tuned, tmp_path / "tuned", {"model.layers.1.post_attention_layernorm.weight": None,
                                                        "model.extra.weight": torch.ones(3, 4)})
    out = extract(capsys, planted.base, tuned, tmp_path / "adapter", "--rank", "4")
    tensors, _, report = adapter_of(out)
    assert len(tensors) == 2 * len(planted.deltas)
    assert any("1 tensors only in the base and 1 only in the tuned model" in n for n in report["notes"])


def test_rank_above_the_matrix_is_capped_and_exact(planted: Planted, dense: Path, tmp_path: Path, capsys) -> None:
    out = extract(capsys, planted.base, dense, tmp_path / "adapter", "--rank", "200")
    tensors, _, report = adapter_of(out)
    names = linear_names(tensors_of(planted.base))
    for name in names:
        delta = stored_delta(planted.base, dense, name)
        module = name.removesuffix(".weight")
        assert tensors[f"{P}{module}.lora_A.weight"].shape[0] == min(delta.shape)
        assert rel(lora_product(tensors, module), delta) < 1e-5
    assert any(n.startswith(f"--rank 200 exceeds the smaller side of {len(names)} matrices") for n in report["notes"])


# --- 7. dry run and determinism ----------------------------------------------------------------------


def test_dry_run_json_lists_actions_and_writes_nothing(planted: Planted, dense: Path, tmp_path: Path,
                                                       capsys) -> None:
    out = tmp_path / "adapter"
    r = run(capsys, "extract-lora", "--base", planted.base, "--tuned", dense, "-o", out, "--rank", "100",
            "--dry-run", "--json")
    assert r.rc == 0, r.err
    assert list(tmp_path.iterdir()) == []
    plan = json.loads(r.out)
    actions = {t["name"]: t["action"] for t in plan["tensors"]}
    base = tensors_of(planted.base)
    assert set(actions) == set(base)
    linear = linear_names(base)
    assert {n for n, a in actions.items() if a == "lora"} == set(linear)
    assert {n for n, a in actions.items() if a != "lora"} == set(base) - set(linear)
    # Vectors (norm scales) would be kept whole if changed; other matrices are only checked.
    assert all(a == ("whole" if base[n].dim() == 1 else "check") for n, a in actions.items() if n not in linear)
    assert any(a == "whole" for a in actions.values())
    assert {t["name"]: t["shape"] for t in plan["tensors"]} == {n: list(t.shape) for n, t in base.items()}
    expected = (sum(min(100, *base[n].shape) * sum(base[n].shape) for n in linear)
                + sum(t.numel() for t in base.values() if t.dim() == 1))
    assert plan["max_adapter_params"] == expected
    assert plan["only_in_base"] == plan["only_in_tuned"] == []


def test_two_runs_are_byte_identical(planted: Planted, dense: Path, tmp_path: Path, capsys) -> None:
    outs = [extract(capsys, planted.base, dense, tmp_path / f"adapter{i}", "--rank", "8", "--svd", "randomized")
            for i in range(2)]
    for file in ("adapter_model.safetensors", "adapter_config.json"):
        assert (outs[0] / file).read_bytes() == (outs[1] / file).read_bytes()
    _, _, report = adapter_of(outs[0])
    assert {m["engine"] for m in report["modules"]} == {"randomized"}  # the seeded engine
