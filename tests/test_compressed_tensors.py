"""The compressed-tensors "pack-quantized" export (W4A16 group-wise INT4), checked against the real library.

- symmetric outputs load in ``transformers.AutoModelForCausalLM.from_pretrained`` (compressed-tensors
  installed, CPU): the modules arrive compressed (int32 ``weight_packed``), compressed-tensors
  decompresses them on the first forward pass, and the weights it rebuilds are bit for bit our
  dequantized weights, so the logits equal those of the source model carrying our weights;
- asymmetric outputs hit a compressed-tensors bug on that path (transformers raises on a
  ``weight_zero_point`` size mismatch); the test pins the cause and proves the layout through
  compressed-tensors' own decompression and through transformers' ``dequantize=True`` load;
- the stored tensors are what ``PackedQuantizationCompressor.compress`` writes for the same scales and
  zero points (codes, packing, zero points, shapes);
- ``compress dequantize`` / ``compress inspect`` read the output back; impossible pairs exit 2.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_llama
from safetensors.torch import load_file, save_file

from compress.cli import main
from compress.formats import FORMATS, detect_format
from compress.formats.compressed_tensors import CompressedTensorsFormat, unpack_int4_cols
from compress.formats.gptq import unpack_int4_rows
from compress.formats.inputs import open_model
from compress.quant.int4 import Int4Config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import ModelCompressor, PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationArgs,
    QuantizationScheme,
    QuantizationStatus,
    apply_quantization_config,
)

VOCAB = 256
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
CT_ARGS = ("--method", "int4", "--format", "compressed-tensors")


@pytest.fixture(scope="module")
def token_ids() -> torch.Tensor:
    """A fixed batch: 2 sequences of 24 token ids."""
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1234))


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """quantize(src, *args) to compressed-tensors, each distinct call done once per module."""
    cache: dict[tuple[str, ...], Path] = {}
    root = tmp_path_factory.mktemp("ct")

    def get(src: Path, *args: str) -> Path:
        key = (str(src), *args)
        if key not in cache:
            out = root / f"out{len(cache)}"
            assert main(["quantize", str(src), "-o", str(out), "-q", *CT_ARGS, *args]) == 0
            cache[key] = out
        return cache[key]

    return get


def our_weights(out: Path) -> dict[str, torch.Tensor]:
    """Our reader's dequantized weights (``P.weight``, in the model dtype), by name."""
    with open_model(out) as reader:
        return {i.name: reader.get(i.name) for i in reader.infos() if reader.is_quantized(i.name)}


def reference_logits(src: Path, out: Path, token_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits of the source model with our dequantized weights in place of its quantized Linears."""
    ours = our_weights(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    missing, unexpected = model.load_state_dict(ours, strict=False)
    assert not unexpected and len(missing) == len(model.state_dict()) - len(ours)
    with torch.no_grad():
        return model(token_ids).logits, ours


def scheme(symmetric: bool, group_size: int) -> QuantizationScheme:
    return QuantizationScheme(targets=["Linear"], format="pack-quantized", weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=symmetric, group_size=group_size, strategy="group"))


def module_tensors(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The stored tensors of one module, by local name (weight_packed, weight_scale, ...)."""
    return {k.removeprefix(prefix + "."): v for k, v in sd.items() if k.startswith(prefix + ".")}


MODULES = [f"model.layers.{i}.{name}" for i in range(2) for name in LINEARS]


# --- layout and config ------------------------------------------------------------------------------

@pytest.mark.parametrize("model_fixture, args", [
    ("tiny_llama", ("--sym", "--group-size", "32")),
    ("tiny_llama", ("--asym", "--group-size", "128")),
    ("tiny_llama_bf16", ("--asym", "--group-size", "32")),
])
def test_layout_and_config(model_fixture: str, args: tuple[str, ...], outputs: Callable[..., Path],
                           request: pytest.FixtureRequest) -> None:
    src = request.getfixturevalue(model_fixture)
    out = outputs(src, *args)
    symmetric, group = args[0] == "--sym", int(args[2])
    dtype = torch.bfloat16 if model_fixture.endswith("bf16") else torch.float32
    sd = load_file(out / "model.safetensors")
    src_sd = load_file(src / "model.safetensors")
    for m in MODULES:
        t = module_tensors(sd, m)
        out_f, in_f = src_sd[f"{m}.weight"].shape
        assert set(t) == {"weight_packed", "weight_scale", "weight_shape"} | (set() if symmetric else
                                                                               {"weight_zero_point"})
        assert t["weight_packed"].dtype == torch.int32 and t["weight_packed"].shape == (out_f, in_f // 8)
        # scales in the model dtype, which the loader creates weight_scale in
        assert t["weight_scale"].dtype == dtype and t["weight_scale"].shape == (out_f, in_f // group)
        assert t["weight_shape"].dtype == torch.int64 and t["weight_shape"].tolist() == [out_f, in_f]
        if not symmetric:
            assert t["weight_zero_point"].dtype == torch.int32
            assert t["weight_zero_point"].shape == (out_f // 8, in_f // group)
    # kept in float: embeddings, lm_head, norms
    assert sd["lm_head.weight"].dtype == dtype and sd["model.embed_tokens.weight"].dtype == dtype
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed"
    assert qc["config_groups"] == {"group_0": {
        "targets": ["Linear"], "format": "pack-quantized", "input_activations": None, "output_activations": None,
        "weights": {"num_bits": 4, "type": "int", "symmetric": symmetric, "group_size": group, "strategy": "group",
                    "dynamic": False}}}
    assert "lm_head" in qc["ignore"] and not any(m in qc["ignore"] for m in MODULES)
    report = json.loads((out / "report.json").read_text())
    assert report["parameters"]["scale_dtype"] == str(dtype).removeprefix("torch.")
    # compressed-tensors parses the block the way transformers does
    parsed = transformers.CompressedTensorsConfig.from_dict(qc).quantization_config
    assert parsed.format == "pack-quantized" and parsed.config_groups["group_0"].weights.symmetric == symmetric


def test_unsupported_shapes_and_scale_dtype(tmp_path: Path) -> None:
    fmt = CompressedTensorsFormat()
    assert fmt.unsupported((128, 96), Int4Config(group_size=64)) is not None  # in % G: the loader refuses
    assert fmt.unsupported((100, 128), Int4Config(group_size=64, symmetric=False)) is not None  # packed zeros
    assert fmt.unsupported((100, 128), Int4Config(group_size=64, symmetric=True)) is None
    assert fmt.unsupported((128, 128, 1), Int4Config()) is not None
    assert fmt.adapt_config(Int4Config(), torch.bfloat16).scale_dtype == torch.bfloat16
    assert fmt.adapt_config(Int4Config(), torch.float32).scale_dtype == torch.float32
    assert FORMATS["gptq"].adapt_config(Int4Config(), torch.bfloat16).scale_dtype == torch.float16
    # a layer whose input size is not a multiple of the group size is kept in float (asked for: --allow-float),
    # listed in ignore
    src = build_tiny_llama(tmp_path / "src", hidden=64, intermediate=96, layers=1)
    out = tmp_path / "out"
    assert main(["quantize", str(src), "-o", str(out), "-q", *CT_ARGS, "--group-size", "64", "--allow-float"]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.down_proj" in qc["ignore"]  # in = 96
    kept = {r["name"]: r["reason"] for r in json.loads((out / "report.json").read_text())["kept"]}
    assert "multiple of the group size" in kept["model.layers.0.mlp.down_proj.weight"]
    assert "model.layers.0.mlp.up_proj.weight_packed" in load_file(out / "model.safetensors")


def test_default_group_size_fits_the_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Input sizes 96 and 160: the default 128 divides neither, so the largest group size dividing both (32) is
    chosen with one line; an explicit 64 that would leave most weights in float is an error naming 16 and 32."""
    src = build_tiny_llama(tmp_path / "src", hidden=96, intermediate=160, layers=1)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["quantize", str(src), "-o", str(out), "-q", *CT_ARGS]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note: --group-size 32 chosen: the default 128 would leave 7 of 7 "
                                               "weights in float"), err
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 32
    assert [r for r in json.loads((out / "report.json").read_text())["kept"] if r["name"].endswith("proj.weight")] == []
    assert main(["quantize", str(src), "-o", str(tmp_path / "explicit"), *CT_ARGS, "--group-size", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--group-size 64 would leave" in err[0] and "Use --group-size 16 or 32" in err[0], err
    assert "--allow-float" in err[0] and not (tmp_path / "explicit").exists()


# --- loading in transformers ------------------------------------------------------------------------

@pytest.mark.parametrize("model_fixture, group, algorithm", [
    ("tiny_llama", 32, "rtn"), ("tiny_llama", 128, "rtn"), ("tiny_llama_bf16", 128, "rtn"),
    ("tiny_llama", 32, "optimize"), ("tiny_llama_bf16", 128, "optimize"),  # searched scales load the same way
])
def test_symmetric_loads_in_transformers(model_fixture: str, group: int, algorithm: str, outputs: Callable[..., Path],
                                         token_ids: torch.Tensor, request: pytest.FixtureRequest) -> None:
    src = request.getfixturevalue(model_fixture)
    out = outputs(src, "--sym", "--group-size", str(group), "--algorithm", algorithm)
    ref, ours = reference_logits(src, out, token_ids)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    # transformers keeps the modules compressed: packed int32 codes, no float weight ...
    for m in MODULES:
        module = model.get_submodule(m)
        assert module.quantization_status == QuantizationStatus.COMPRESSED
        params = dict(module.named_parameters())
        assert "weight" not in params and params["weight_packed"].dtype == torch.int32
    with torch.no_grad():
        logits = model(token_ids).logits
    # ... and compressed-tensors decompresses them on the first forward pass, to exactly our weights
    for m in MODULES:
        module = model.get_submodule(m)
        assert module.quantization_status == QuantizationStatus.DECOMPRESSED
        assert torch.equal(module.weight, ours[f"{m}.weight"])
    # Same weights bit for bit, same forward code: measured max |diff| = 0.0 (float32 and bfloat16);
    # 1e-6 only allows float32 summation-order noise.
    assert logits.dtype == ref.dtype
    assert (logits.float() - ref.float()).abs().max().item() <= 1e-6


def asymmetric_zero_point_bug(out: Path) -> str | None:
    """What goes wrong on transformers' normal (compressed) load path for an asymmetric output, or None.

    transformers builds the model on the meta device, applies the scheme and calls
    ``ModelCompressor.compress_model``; ``PackedQuantizationCompressor.compress``'s meta-tensor branch
    packs the weight but leaves ``weight_zero_point`` unpacked as int8 [out, n_groups], while the
    checkpoint (like every pack-quantized checkpoint) holds int32 [out / 8, n_groups].
    """
    config = transformers.AutoConfig.from_pretrained(out)
    ct_config = transformers.CompressedTensorsConfig.from_dict(config.quantization_config).quantization_config
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    apply_quantization_config(model, ct_config, show_progress=False)
    ModelCompressor(quantization_config=ct_config).compress_model(model)
    stored = load_file(out / "model.safetensors")
    m = MODULES[0]
    expected = stored[f"{m}.weight_zero_point"]
    prepared = model.get_submodule(m).weight_zero_point
    if prepared.shape == expected.shape and prepared.dtype == expected.dtype:
        return None
    return f"{m}.weight_zero_point prepared as {prepared.dtype} {list(prepared.shape)}, stored {list(expected.shape)}"


@pytest.mark.parametrize("model_fixture, group", [("tiny_llama", 32), ("tiny_llama", 128), ("tiny_llama_bf16", 32)])
def test_asymmetric_through_compressed_tensors(model_fixture: str, group: int, outputs: Callable[..., Path],
                                               token_ids: torch.Tensor, request: pytest.FixtureRequest) -> None:
    src = request.getfixturevalue(model_fixture)
    out = outputs(src, "--asym", "--group-size", str(group))
    ref, ours = reference_logits(src, out, token_ids)
    # 1. compressed-tensors' own decompression of our safetensors gives exactly our weights
    stored = load_file(out / "model.safetensors")
    for m in MODULES:
        weight = PackedQuantizationCompressor.decompress(module_tensors(stored, m), scheme(False, group))["weight"]
        assert weight.dtype == ours[f"{m}.weight"].dtype and torch.equal(weight, ours[f"{m}.weight"])
    # 2. the normal load path: the known compressed-tensors bug, or (once fixed upstream) our logits
    bug = asymmetric_zero_point_bug(out)
    if bug is not None:
        assert "int8" in bug and "[128, " in bug
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            transformers.AutoModelForCausalLM.from_pretrained(out)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(out)
        with torch.no_grad():
            assert (model(token_ids).logits.float() - ref.float()).abs().max().item() <= 1e-6
    # 3. transformers' dequantize=True load (compressed-tensors decompresses while loading): our logits
    model = transformers.AutoModelForCausalLM.from_pretrained(
        out, quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
    for m in MODULES:
        assert torch.equal(model.get_submodule(m).weight, ours[f"{m}.weight"])
    with torch.no_grad():
        logits = model(token_ids).logits
    assert (logits.float() - ref.float()).abs().max().item() <= 1e-6  # measured 0.0


# --- stored tensors against compressed-tensors' compressor --------------------------------------------

@pytest.mark.parametrize("model_fixture, args", [
    ("tiny_llama", ("--sym", "--group-size", "32")),
    ("tiny_llama_bf16", ("--sym", "--group-size", "128")),
    ("tiny_llama", ("--asym", "--group-size", "128")),
    ("tiny_llama_bf16", ("--asym", "--group-size", "32")),
])
def test_stored_tensors_match_compressed_tensors_compressor(model_fixture: str, args: tuple[str, ...],
                                                            outputs: Callable[..., Path],
                                                            request: pytest.FixtureRequest) -> None:
    """``PackedQuantizationCompressor.compress`` given the source weight (in float32, the precision our
    quantizer divides in) and our scales and zero points. Its codes are round(w/s + z_s) in float32;
    ours are round(w/s) + z (GPTQ's order). Both round half to even, so with an odd zero point they
    can differ by one at a tie: an exact tie w/s = k + 1/2 (both codes equally near), or a quotient
    within 2^-20 of one that the float32 addition of z_s rounds onto the tie (ours is then the nearer
    code). Everywhere else the codes are identical (symmetric: everywhere), and packing, zero points
    and shapes are identical everywhere."""
    src = request.getfixturevalue(model_fixture)
    out = outputs(src, *args)
    symmetric, group = args[0] == "--sym", int(args[2])
    stored = load_file(out / "model.safetensors")
    source = load_file(src / "model.safetensors")
    ties = 0
    for m in MODULES:
        ours = module_tensors(stored, m)
        w = source[f"{m}.weight"].float()
        given = {"weight": w, "weight_scale": ours["weight_scale"].float()}
        zeros = torch.full_like(ours["weight_scale"], 8, dtype=torch.uint8)
        if not symmetric:
            zeros = unpack_int4_rows(ours["weight_zero_point"])
            given["weight_zero_point"] = zeros.to(torch.int8) - 8  # compressed-tensors' signed zero points
        theirs = PackedQuantizationCompressor.compress(given, scheme(symmetric, group))
        assert set(theirs) == set(ours)
        assert torch.equal(theirs["weight_shape"], ours["weight_shape"])
        if not symmetric:
            assert torch.equal(theirs["weight_zero_point"], ours["weight_zero_point"])
        if symmetric:
            assert torch.equal(theirs["weight_packed"], ours["weight_packed"])
            continue
        a = unpack_int4_cols(ours["weight_packed"], w.shape[1]).float()
        b = unpack_int4_cols(theirs["weight_packed"], w.shape[1]).float()
        g = torch.arange(w.shape[1]) // group
        s, z = given["weight_scale"][:, g], zeros.float()[:, g]
        r = w / s  # the float32 quotient both divide out
        differ = a != b
        frac = r[differ] - r[differ].floor()
        assert bool(((frac - 0.5).abs() <= 2.0**-20).all()), "codes differ away from a tie"
        assert bool((z[differ] % 2 == 1).all())
        # ours is the nearest code (exact error, in float64); theirs is as near at an exact tie
        err_ours = (w.double() - s.double() * (a.double() - z.double())).abs()
        err_theirs = (w.double() - s.double() * (b.double() - z.double())).abs()
        assert bool((err_ours <= err_theirs).all())
        ties += int(differ.sum())
    assert symmetric or ties < 0.01 * sum(source[f"{m}.weight"].numel() for m in MODULES)


# --- reading back, bad input --------------------------------------------------------------------------

def test_dequantize_and_inspect_read_it_back(tiny_llama_bf16: Path, outputs: Callable[..., Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = outputs(tiny_llama_bf16, "--asym", "--group-size", "32")
    stored = load_file(out / "model.safetensors")
    assert detect_format(set(stored)) is FORMATS["compressed-tensors"]
    floats = tmp_path / "float"
    assert main(["dequantize", str(out), "-o", str(floats), "-q"]) == 0
    dense = load_file(floats / "model.safetensors")
    ours = our_weights(out)
    source = load_file(tiny_llama_bf16 / "model.safetensors")
    assert set(dense) == set(source)
    for name, w in ours.items():
        assert dense[name].dtype == torch.bfloat16 and torch.equal(dense[name], w)
        # the report's error is the error of what is stored: a quantization, not garbage
        err = (dense[name].float() - source[name].float()).norm() / source[name].float().norm()
        assert 0 < err < 0.2
    assert "quantization_config" not in json.loads((floats / "config.json").read_text())
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["format"] == "compressed-tensors" and data["quantized_tensors"] == len(MODULES)
    assert data["quantization_config"]["quant_method"] == "compressed-tensors"


def test_corrupt_sizes_are_refused(tiny_llama: Path, outputs: Callable[..., Path], tmp_path: Path) -> None:
    out = outputs(tiny_llama, "--asym", "--group-size", "128")
    fmt = CompressedTensorsFormat()
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    tensors = module_tensors(load_file(out / "model.safetensors"), MODULES[0])
    name = f"{MODULES[0]}.weight"
    good = {f"{MODULES[0]}.{k}": v for k, v in tensors.items()}
    fmt.unpack(name, good, qc, torch.float32)
    for key, bad in [("weight_packed", tensors["weight_packed"][:, :-1]),
                     ("weight_scale", tensors["weight_scale"][:-1]),
                     ("weight_zero_point", tensors["weight_zero_point"][:-1]),
                     ("weight_shape", torch.tensor([128, 256]))]:
        with pytest.raises(ValueError, match=r"expected|multiple"):
            fmt.unpack(name, {**good, f"{MODULES[0]}.{key}": bad}, qc, torch.float32)
    with pytest.raises(ValueError, match="missing"):
        fmt.unpack(name, {k: v for k, v in good.items() if not k.endswith("zero_point")}, qc, torch.float32)
    # through the CLI: one line, exit 2
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    sd = load_file(broken / "model.safetensors")
    sd[f"{MODULES[0]}.weight_scale"] = sd[f"{MODULES[0]}.weight_scale"][:-1].contiguous()
    save_file(sd, str(broken / "model.safetensors"), metadata={"format": "pt"})
    assert main(["dequantize", str(broken), "-o", str(tmp_path / "f"), "-q"]) == 2


def test_impossible_pair_exits_2(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["quantize", str(tiny_llama), "-o", str(out), "--method", "nf4", "--format",
                 "compressed-tensors"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "int4+compressed-tensors" in err and "nf4+bnb" in err
    assert not out.exists()
