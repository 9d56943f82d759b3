"""The served base model and its tokenizer, loaded from a source (a directory, or ``PATH@REV`` via the store).

A base at a revision is materialized once into the cache directory (named by
its version), then loaded with transformers' ``from_pretrained``, which
streams the weights into the model without a second copy. A model without a
tokenizer (a tiny one built from a config) gets `ByteTokenizer`: text is its
UTF-8 bytes, token id = byte value, which needs a vocabulary of at least 256.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from fmhub.base.errors import FmhubError
from fmhub.serving.sources import Source, materialized

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}


class ByteTokenizer:
    """Text as UTF-8 bytes: for models that ship no tokenizer (vocabulary ≥ 256)."""

    name = "bytes"

    def __init__(self, eos: int | None) -> None:
        self.eos_token_id = eos

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def chat_prompt(self, messages: list[dict]) -> str:
        return plain_chat(messages)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return self.encode(self.chat_prompt(messages))


class HFTokenizer:
    """A transformers tokenizer, with the model's chat template when it has one."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.name = type(tok).__name__
        self.eos_token_id = tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=True))

    def decode(self, ids: list[int]) -> str:
        # no clean-up of spaces (" ." to ".", " n't" to "n't"): text is decoded a few tokens at a time
        # (fmhub.serving.stops), and a clean-up that reaches back into text already given out ("x ." after "x ")
        # stalled the decoding for good, losing the rest of the completion; vLLM's detokenizer does not clean up either
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def chat_prompt(self, messages: list[dict]) -> str:
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return plain_chat(messages)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The prompt's token ids. A chat template writes its own special tokens (Llama 3's ``{{ bos_token }}``), so its
        text is tokenized without adding any, as transformers' ``apply_chat_template(tokenize=True)`` and vLLM do;
        without a template, the ``role: content`` lines get the tokenizer's usual BOS."""
        text = self.chat_prompt(messages)
        if getattr(self.tok, "chat_template", None):
            return list(self.tok.encode(text, add_special_tokens=False))
        return self.encode(text)


def plain_chat(messages: list[dict]) -> str:
    """The prompt for a model without a chat template: one ``role: content`` line each, then ``assistant:``."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    device: Any
    dtype: Any
    eos: set[int]
    max_len: int
    pad: int
    directory: str
    version: str


def pick_device(device: str) -> Any:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise FmhubError(f"--device {device}: no CUDA device here; use --device cpu (or auto)")
    return d


def pick_dtype(dtype: str, device: Any) -> Any:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    name = _DTYPES.get(dtype)
    if name is None:
        raise FmhubError(f"--dtype {dtype}: use auto, float32, bfloat16 or float16")
    return getattr(torch, name)


def load_base(base: Source, cache_dir: str, device: str = "auto", dtype: str = "auto", max_model_len: int | None = None) -> Loaded:
    """Load ``base`` for serving (eval mode, on ``device``), with its tokenizer and generation limits."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    version = base.version
    if base.rev is None:
        directory = base.path
    else:
        directory = materialized(base, os.path.join(cache_dir, "base-" + version))  # policy checked on reuse too
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise FmhubError(f"{base.label}: no config.json, so this is not a transformers model directory")
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dt, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise FmhubError(f"{base.label}: cannot load it as a causal LM: {exc}") from None
    model.to(dev).eval()
    tokenizer = _tokenizer(directory, config)
    eos = config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(int(tokenizer.eos_token_id))
    limit = getattr(config, "max_position_embeddings", None) or 2048
    pad = config.pad_token_id if isinstance(getattr(config, "pad_token_id", None), int) else 0
    return Loaded(model, tokenizer, dev, dt, eos_ids, min(max_model_len or limit, limit), pad, directory, version)


def _tokenizer(directory: str, config: Any) -> Any:
    names = set(os.listdir(directory))
    if names & {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"}:
        from transformers import AutoTokenizer

        try:
            return HFTokenizer(AutoTokenizer.from_pretrained(directory, local_files_only=True))
        except (OSError, ValueError) as exc:
            raise FmhubError(f"{directory}: has tokenizer files but transformers cannot load them: {exc}") from None
    if getattr(config, "vocab_size", 0) < 256:
        raise FmhubError(f"{directory}: no tokenizer and a vocabulary under 256, so prompts must be token ids")
    eos = config.eos_token_id
    return ByteTokenizer(eos[0] if isinstance(eos, list) else eos)
