"""Carrying a Hugging Face byte-level BPE tokenizer into a GGUF file, as llama.cpp's ``convert_hf_to_gguf.py``
(``_set_vocab_gpt2``) does: tokens, token types, merges, special tokens and the pre-tokenizer name.

SentencePiece tokenizers (``tokenizer.model``: Llama 1/2, Mistral) are not supported yet and raise
:class:`~compress.errors.InputError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.errors import InputError

# The Hugging Face tokenizer files a GGUF's vocabulary is converted from.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json")
TOKENIZER_FIX = ("Pass --tokenizer PATH (a tokenizer.json, or a folder with one) to carry one from elsewhere, or "
                 "--tokenizer none to write the GGUF without one (llama.cpp cannot run it then).")

logger = logging.getLogger(__name__)

# llama.cpp's convert_hf_to_gguf.py identifies a BPE pre-tokenizer by encoding this text and hashing the ids.
_CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# chkhsh -> tokenizer.ggml.pre, for the byte-level BPE vocabularies of llama-architecture models
# (from convert_hf_to_gguf.py's get_vocab_base_pre).
_KNOWN_PRE_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
}
# Llama 3's split regex (tokenizer.json pre_tokenizer Split pattern), which llama.cpp calls "llama-bpe".
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED = 1, 3, 4, 5


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf.py's ``does_token_look_special``."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _pre_from_structure(tok: dict[str, Any]) -> str | None:
    """The llama.cpp pre-tokenizer whose regexes are exactly this tokenizer.json's, if one is."""
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # "\p{N}" then GPT-2's regex (also llama.cpp's starcoder/refact)
    if (kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True)
            and (steps[0].get("pattern") or {}).get("Regex") == _LLAMA3_PATTERN):
        return "llama-bpe"
    return None


def _pre_from_hash(tokenizer_json: dict[str, Any]) -> str | None:
    """llama.cpp's identification: sha256 of the ids of :data:`_CHKTXT` (None without ``tokenizers``)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    try:
        ids = Tokenizer.from_str(json.dumps(tokenizer_json)).encode(_CHKTXT).ids
    except Exception as e:  # the tokenizers library has no common exception base
        logger.debug("tokenizers cannot load tokenizer.json: %s", e)
        return None
    return _KNOWN_PRE_HASHES.get(hashlib.sha256(str(ids).encode()).hexdigest())


@dataclass
class BPEVocab:
    """A byte-level BPE vocabulary in llama.cpp's terms."""

    tokens: list[str]
    token_types: list[int]
    pre: str
    pre_source: str  # "hash" (llama.cpp's own identification) or "structure"


def hf_bpe_vocab(tokenizer_json: dict[str, Any], vocab_size: int, where: str) -> BPEVocab:
    """Tokens, token types and pre-tokenizer name of a byte-level BPE ``tokenizer.json``.

    As ``convert_hf_to_gguf.py``'s ``get_vocab_base``: ids ``0..vocab_size-1`` (the model's vocabulary
    size), missing ids as ``[PAD{i}]`` (UNUSED), added tokens CONTROL when ``special`` or when they
    look special (``<|...|>``), else USER_DEFINED, all others NORMAL. The pre-tokenizer is identified
    by llama.cpp's hash of the ids of a test text (needs the ``tokenizers`` package), else from the
    structure of ``pre_tokenizer`` when it is exactly one llama.cpp implements (GPT-2, SmolLM,
    Llama 3). Differences from llama.cpp: added tokens are not re-normalised through
    encode/decode (a no-op for byte-level BPE special tokens).
    """
    fix = TOKENIZER_FIX
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "SentencePiece-style BPE (byte_fallback)" if model.get("byte_fallback") else model.get("type")
        raise InputError(f"tokenizer.json is {kind}; only byte-level BPE (GPT-2 / Llama 3 style) tokenizers "
                         "can be carried into GGUF yet", where=where, fix=fix)
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {t["id"]: t for t in tokenizer_json.get("added_tokens", []) if isinstance(t, dict) and "id" in t}
    reverse = {i: tok for tok, i in vocab.items()}
    for i, t in added.items():
        reverse[i] = t["content"]
    if reverse and max(reverse) >= vocab_size:
        raise InputError(f"tokenizer has token id {max(reverse)} but the model's vocabulary is {vocab_size}",
                         where=where, fix="Use the tokenizer that belongs to this checkpoint.")
    tokens, types = [], []
    for i in range(vocab_size):
        tok = reverse.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(_TOKEN_UNUSED)
        elif i in added:
            if added[i].get("special") or _looks_special(tok):
                types.append(_TOKEN_CONTROL)
            else:
                tok = tok.replace("\u2581", " ")
                types.append(_TOKEN_USER_DEFINED)
            tokens.append(tok)
        else:
            tokens.append(tok)
            types.append(_TOKEN_NORMAL)
    pre, source = _pre_from_hash(tokenizer_json), "hash"
    if pre is None:
        pre, source = _pre_from_structure(tokenizer_json), "structure"
    if pre is None:
        raise InputError("the tokenizer's pre-tokenizer is not one llama.cpp is known to implement (checked by "
                         "llama.cpp's hash and by structure: GPT-2, SmolLM, Llama 3)", where=where, fix=fix)
    return BPEVocab(tokens, types, pre, source)


def add_hf_tokenizer(writer: Any, extra: dict[str, bytes | Path], config: dict[str, Any] | None, vocab_size: int,
                     where: str) -> dict[str, Any]:
    """Convert a Hugging Face tokenizer (tokenizer.json + tokenizer_config.json, among the checkpoint's non-weight
    files ``extra``) into the GGUF ``writer``, for a model of ``vocab_size`` tokens."""
    import gguf

    fix = TOKENIZER_FIX
    if "tokenizer.json" not in extra:
        sp = " (tokenizer.model, SentencePiece, is not supported yet)" if "tokenizer.model" in extra else ""
        raise InputError(f"checkpoint has no tokenizer.json to carry into the GGUF{sp}", where=where, fix=fix)
    with tempfile.TemporaryDirectory(prefix="compress-gguf-vocab-") as tmp:
        folder = Path(tmp)
        for name in TOKENIZER_FILES:
            src = extra.get(name)
            if src is not None:
                (folder / name).write_bytes(src if isinstance(src, bytes) else Path(src).read_bytes())
        if isinstance(config, dict):
            (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
        try:
            tokenizer_json = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"tokenizer.json is not valid JSON ({e})", where=where, fix=fix) from e
        vocab = hf_bpe_vocab(tokenizer_json, vocab_size, where)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(vocab.pre)
        writer.add_token_list(vocab.tokens)
        writer.add_token_types(vocab.token_types)
        special = gguf.SpecialVocab(folder, load_merges=True)
        special.add_to_gguf(writer, quiet=True)
        # convert_hf_to_gguf.py's LlamaModel.set_vocab adds these two
        config_file = folder / "tokenizer_config.json"
        tokenizer_config = {}
        if config_file.is_file():
            with contextlib.suppress(UnicodeDecodeError, json.JSONDecodeError):
                tokenizer_config = json.loads(config_file.read_text(encoding="utf-8"))
        if isinstance(tokenizer_config, dict) and isinstance(tokenizer_config.get("add_prefix_space"), bool):
            writer.add_add_space_prefix(tokenizer_config["add_prefix_space"])
        if vocab_size == 49152:  # llama.cpp's rule for SmolLM / Granite-small vocabularies
            writer.add_add_bos_token(False)
    return {"source": "tokenizer.json", "model": "gpt2", "pre": vocab.pre, "pre_identified_by": vocab.pre_source,
            "tokens": len(vocab.tokens), "merges": len(special.merges)}
